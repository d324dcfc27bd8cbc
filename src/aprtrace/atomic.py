"""Atomic file output: write beside the target, rename over it only when complete."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from aprtrace.errors import OutputError

WRITE_HINT = "check that the output directory is writable and the disk has space"


# What ``atomic_path`` leaves when the process is killed: ``.<final name>.<pid>.tmp``.
TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.tmp$")


def temp_path_for(path: Path) -> Path:
    """The hidden temporary name used while ``path`` is being written."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_path(path: Path, *, make_parents: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed over ``path``.

    Whatever interrupts the writer (an OS error, Ctrl-C, an exception in the caller), the
    temporary file is removed and ``path`` is left as it was, so no reader ever sees a
    partial file under the final name. OS errors become OutputError (exit 7) naming ``path``.
    """
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise OutputError(
                f"cannot write {path}: {exc.strerror or exc}", hint=WRITE_HINT
            ) from exc
        raise


def write_bytes_atomic(path: Path, *chunks: bytes, fsync: bool = False) -> None:
    """Write ``chunks`` to ``path`` atomically (``fsync`` before the rename if asked)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def remove_orphaned_temps(path: Path) -> list[Path]:
    """Remove ``.<name>.<pid>.tmp`` beside ``path`` left by a killed aprtrace (dead pid).

    Only regular files are removed, never a symlink; a live process's temporary is kept.
    """
    path = Path(path)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        match = TEMP_FILE.match(entry.name)
        if not match or match["name"] != path.name or _pid_alive(int(match["pid"])):
            continue
        if entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed
