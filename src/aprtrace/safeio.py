"""Reading what a user hands us without trusting it: bounded JSON reads and printable paths.

Every JSON file aprtrace reads (config.json, the safetensors index, tokenizer.json,
manifest.json) goes through :func:`read_json_file`, and every JSON blob embedded in a
container (APR metadata, a safetensors header) through :func:`loads_json`, so one place
decides what a hostile document can cost:

- only regular files are read: a FIFO would block forever, ``/dev/zero`` never ends and a
  directory is not JSON (the file is opened non-blocking, then checked with ``fstat``);
- the size cap is measured while reading, not taken from ``st_size`` (0 for devices and
  ``/proc`` files, and a file can grow after the ``stat``);
- nesting deep enough to exhaust Python's recursion and integers longer than Python converts
  (``ValueError``) become the caller's format error, like any other malformed document.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aprtrace.errors import AprtraceError, InvalidFormatError, NotFoundError, OutputError

MiB = 1 << 20
_CHUNK = 1 << 20

# Builds the caller's format error from a reason ("not valid JSON: ...").
MakeError = Callable[[str], AprtraceError]


def path_text(path: os.PathLike | str) -> str:
    """``path`` as printable UTF-8 text: undecodable bytes of a file name (which Python keeps
    as surrogates) are shown as U+FFFD instead of failing every encode that follows."""
    return os.fsencode(path).decode("utf-8", "replace")


def text_for_output(text: str) -> str:
    """``text`` with lone surrogates (undecodable command-line bytes) replaced by U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _default_error(path: Path) -> MakeError:
    return lambda why: InvalidFormatError(f"{path_text(path)}: {why}")


def read_regular_file(path: Path, limit: int, bad: MakeError | None = None) -> bytes:
    """All bytes of the regular file ``path``, at most ``limit`` of them.

    A missing file is NotFoundError, an unreadable one OutputError; a FIFO, device, socket or
    directory, or more than ``limit`` bytes, is ``bad(reason)`` (InvalidFormatError by
    default). Symlinks are followed to what they name, which must itself be a regular file.
    """
    path = Path(path)
    bad = bad or _default_error(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise NotFoundError(f"file not found: {path_text(path)}") from None
    except IsADirectoryError:
        raise bad("is a directory, not a file") from None
    except OSError as exc:
        raise OutputError(f"cannot read {path_text(path)}: {exc.strerror or exc}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise bad(f"is a {_kind(mode)}, not a regular file; refusing to read it")
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise bad(f"larger than the {_size_text(limit)} limit for this file")
        return b"".join(chunks)
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise bad("is a directory, not a file") from None
        raise OutputError(f"cannot read {path_text(path)}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def loads_json(raw: bytes, bad: MakeError) -> Any:
    """Decode UTF-8 JSON bytes; every way they can be malformed or hostile is ``bad(why)``."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise bad(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise bad(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise bad("JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise bad(f"invalid JSON value ({str(exc)[:120]})") from None


def read_json_file(path: Path, limit: int, bad: MakeError | None = None) -> Any:
    """The decoded JSON document of the regular file ``path`` (at most ``limit`` bytes)."""
    path = Path(path)
    bad = bad or _default_error(path)
    return loads_json(read_regular_file(path, limit, bad), bad)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISDIR, "directory"),
    ):
        if test(mode):
            return name
    return "special file"


def file_kind(path: Path) -> str | None:
    """What ``path`` is without following a final symlink: ``file``, ``symlink``, ``FIFO``,
    ``directory``...; None when nothing is there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return _kind(mode)


def _size_text(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n} bytes"
