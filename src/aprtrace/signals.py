"""Process signals for the command line: SIGTERM/SIGHUP like Ctrl-C, SIGBUS as an exit code.

- SIGTERM and SIGHUP raise :class:`~aprtrace.errors.Terminated` in the main thread, so a killed
  run unwinds as after Ctrl-C: the file being written and the staging directory are removed,
  the lock is released, and the CLI exits 128 + the signal number with one line.
- SIGBUS comes from touching a memory-mapped page past the end of a file another process
  truncated. Python cannot run a handler for it (the faulting instruction would fault again
  before the interpreter regains control), and the size check before each tensor decode
  (``model.check_source_intact``) catches the usual case. For a truncation during a decode,
  the C library's ``_exit`` is installed as the handler (async-signal-safe): the process ends
  at once with status 7 (the I/O error code; SIGBUS is signal 7 on Linux), after Python's
  ``faulthandler`` printed "Fatal Python error: Bus error" and the Python stack. The next run
  into the same DIR removes what the killed one left.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator

from aprtrace.errors import Terminated

_TERMINATING = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)
_sigbus_installed = False


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_like_interrupt() -> Iterator[None]:
    """While active, SIGTERM/SIGHUP raise Terminated (main thread only; restored after)."""
    previous = {}
    try:
        for signum in _TERMINATING:
            previous[signum] = signal.signal(signum, _raise_terminated)
    except ValueError:  # not the main thread: leave the process's handlers alone
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def install_sigbus_exit() -> bool:
    """Make SIGBUS end the process with status SIGBUS (7 on Linux) after faulthandler's
    report, instead of "Bus error" and status 135. Returns False where not possible."""
    global _sigbus_installed
    if _sigbus_installed:
        return True
    if not sys.platform.startswith("linux") or not hasattr(signal, "SIGBUS"):
        return False
    try:
        import ctypes
        import faulthandler

        libc = ctypes.CDLL(None, use_errno=True)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
        exit_address = ctypes.cast(libc._exit, ctypes.c_void_p).value
        was_enabled = faulthandler.is_enabled()
        if was_enabled:  # re-enabled below, on top of the _exit handler
            faulthandler.disable()
        if libc.signal(signal.SIGBUS, exit_address) == ctypes.c_void_p(-1).value:
            return False
        # faulthandler prints its report, restores the previous handler (_exit) and re-raises.
        faulthandler.enable(file=sys.__stderr__ or sys.stderr, all_threads=False)
    except (OSError, AttributeError, ValueError, TypeError):
        return False
    _sigbus_installed = True
    return True
