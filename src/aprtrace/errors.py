"""One exception hierarchy; the CLI maps each class to apr's exit code in one place."""

from __future__ import annotations


class AprtraceError(Exception):
    """Base of every error aprtrace reports to a user. ``exit_code`` follows ``apr``."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class NotFoundError(AprtraceError):
    """A named input file or directory does not exist (exit 3)."""

    exit_code = 3


class InvalidFormatError(AprtraceError):
    """A file is not what it claims to be, or is corrupt or truncated (exit 4)."""

    exit_code = 4


class ValidationError(AprtraceError):
    """Bad arguments, or inputs that cannot be compared (exit 5)."""

    exit_code = 5


class ModelLoadError(AprtraceError):
    """The model file is well-formed but cannot be used (exit 6)."""

    exit_code = 6


class OutputError(AprtraceError):
    """Reading or writing a file failed at the OS level (exit 7)."""

    exit_code = 7


class InferenceError(AprtraceError):
    """The forward pass failed, including a failure to write a stage file (exit 8, as apr)."""

    exit_code = 8


EXIT_DIVERGED = 1
EXIT_INCOMPLETE = 9  # diff: every compared pair passes, but files are missing or one-sided
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70  # EX_SOFTWARE: an unexpected exception, i.e. a bug in aprtrace


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: unwound like Ctrl-C (temporaries removed), exit 128 + signal.

    A KeyboardInterrupt subclass, so every ``finally`` and interrupt cleanup already in place
    runs for it exactly as for Ctrl-C.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
