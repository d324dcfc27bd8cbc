"""Who owns what in a trace's output directory, and how a run commits into it.

A run never writes into the dump directory DIR while the forward pass runs. It

1. takes ``DIR/.aprtrace.lock`` (``flock``): a second run into the same DIR fails at once;
2. checks DIR's ``manifest.json`` is absent or one aprtrace wrote (schema
   ``aprtrace-manifest-v1`` and ``"tool": "aprtrace"``), and that every path it will write is
   absent or an APRT stage file, under real ``layer-N`` directories (never a symlink);
3. removes what killed runs left (staging directories, hidden ``.<name>.<pid>.tmp`` files);
4. writes every stage file into a fresh staging directory ``DIR/.aprtrace-staging-<pid>-<id>``;
5. commits only when the forward pass succeeded: removes the old manifest, deletes (with
   ``--clean``) the old run's stage files, renames each staged file into place, and writes the
   new manifest last.

So a run that fails or is killed before the commit leaves the previous dump exactly as it
was; a kill inside the commit (renames only: tens of milliseconds for 483 files) leaves a
dump without a manifest, which ``diff`` and ``inspect`` call incomplete. Whatever a run
leaves behind is removed by the next run into DIR.

``--clean`` deletes a file only when it is listed in an aprtrace manifest, sits at a stage
layout path (``layer-N/<stage>.bin`` or ``<whole-model stage>.bin``) inside a real directory
of DIR, is a regular file (not a symlink) and is an APRT file whose size and layer field match
its manifest entry.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from aprtrace.aprt import HEADER_SIZE, MAGIC, parse_header
from aprtrace.atomic import TEMP_FILE
from aprtrace.errors import InferenceError, OutputError
from aprtrace.manifest import MANIFEST_NAME, SCHEMA, Manifest, parse_manifest
from aprtrace.safeio import file_kind, path_text, read_json_file
from aprtrace.stages import WHOLE_MODEL_LAYER, Stage

LOCK_NAME = ".aprtrace.lock"
STAGING_PREFIX = ".aprtrace-staging-"
MANIFEST_TOOL = "aprtrace"
_MAX_MANIFEST_BYTES = 64 << 20
_LAYER_DIR = re.compile(r"^layer-(0|[1-9][0-9]*)$")
_STEP_DIR = re.compile(r"^decode-[1-9][0-9]*$")
_STAGE_NAMES = {s.value for s in Stage}
# What atomic writes leave when killed: `.<final name>.<pid>.tmp`.
_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.tmp$")

OWNERSHIP_HINT = "choose another --save-tensor-dir, or move the file away"


def _refuse(what: str, hint: str = OWNERSHIP_HINT) -> OutputError:
    return OutputError(what, hint=hint)


def _os_error(action: str, path: Path, exc: OSError) -> OutputError:
    return OutputError(
        f"cannot {action} {path_text(path)}: {exc.strerror or exc}",
        hint="check the output directory's permissions and free space",
    )


def layout_stage(rel: str) -> tuple[str, int | None] | None:
    """``(stage, layer)`` of a relative posix path at a stage-file layout path, else None.

    The prompt pass is at the root (``layer-N/<stage>.bin``, ``<whole-model stage>.bin``),
    decode step k in the same layout under ``decode-k/``.
    """
    parts = rel.split("/")
    if parts and _STEP_DIR.match(parts[0]):
        parts = parts[1:]
    if len(parts) == 2 and _LAYER_DIR.match(parts[0]):
        stage, layer = parts[1].removesuffix(".bin"), int(parts[0][6:])
        per_layer = True
    elif len(parts) == 1:
        stage, layer, per_layer = parts[0].removesuffix(".bin"), None, False
    else:
        return None
    if not parts[-1].endswith(".bin") or stage not in _STAGE_NAMES:
        return None
    if Stage(stage).per_layer != per_layer:
        return None
    return stage, layer


def is_aprtrace_manifest(doc: object) -> bool:
    """The marker of a manifest aprtrace wrote: its schema and ``"tool": "aprtrace"``."""
    return (
        isinstance(doc, dict) and doc.get("schema") == SCHEMA and doc.get("tool") == MANIFEST_TOOL
    )


def _aprt_header(dir_fd: int, name: str) -> tuple[int, int, int] | None:
    """``(layer, count, size)`` of the regular APRT file ``name`` in ``dir_fd``, else None."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        head = os.read(fd, HEADER_SIZE)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(head) < HEADER_SIZE or head[:4] != MAGIC:
        return None
    layer, count = parse_header(head)
    return layer, count, st.st_size


def _open_dir(name: str | Path, dir_fd: int | None = None) -> int:
    """A descriptor of the real directory ``name`` (a symlink is refused by the kernel)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    return os.open(name, flags, dir_fd=dir_fd)


def _open_chain(root_fd: int, parts: tuple[str, ...] | list[str], create: bool = False) -> int:
    """A descriptor of ``root/parts...`` opened one real directory at a time, so no
    component, not only the last, can be a symlink; ``create`` makes missing ones."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
            child = _open_dir(part, fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class _Deletion:
    rel: str  # posix path relative to DIR

    @property
    def parts(self) -> list[str]:
        return self.rel.split("/")


@dataclass
class OutputRun:
    """One run's hold on DIR: the lock, the staging directory, what the commit will do."""

    out: Path
    staging: Path
    lock_fd: int
    old_manifest: Manifest | None
    deletions: list[_Deletion] = field(default_factory=list)
    orphans_removed: list[Path] = field(default_factory=list)

    # -- the commit ---------------------------------------------------------------------

    def existing_stage_files(self) -> list[Path]:
        """``.bin`` files in DIR now (hidden files and directories skipped)."""
        found = []
        for path in sorted(self.out.rglob("*.bin")):
            rel = path.relative_to(self.out).as_posix()
            if not any(part.startswith(".") for part in rel.split("/")):
                found.append(path)
        return found

    def commit(self, staged: list[Path]) -> list[Path]:
        """Move the staged stage files into DIR; return their final paths.

        The caller writes the manifest afterwards (last). Errors are InferenceError (exit 8),
        as apr reports a failed stage-file write.
        """
        out_fd = _open_dir(self.out)
        dir_fds: dict[tuple[str, ...], tuple[int, int]] = {}  # one pair per directory
        try:
            self._remove_old_manifest(out_fd)
            self._delete_cleaned(out_fd)
            return [self._move_into_place(out_fd, path, dir_fds) for path in staged]
        finally:
            for fds in dir_fds.values():
                for fd in fds:
                    os.close(fd)
            os.close(out_fd)

    def _remove_old_manifest(self, out_fd: int) -> None:
        if self.old_manifest is None:
            return
        try:
            if stat.S_ISREG(os.lstat(MANIFEST_NAME, dir_fd=out_fd).st_mode):
                os.unlink(MANIFEST_NAME, dir_fd=out_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise InferenceError(
                f"cannot remove the old {path_text(self.out / MANIFEST_NAME)}: "
                f"{exc.strerror or exc}"
            ) from exc

    def _delete_cleaned(self, out_fd: int) -> None:
        for item in self.deletions:
            try:
                dir_fd = _open_chain(out_fd, item.parts[:-1])
            except OSError:
                continue  # the directory went away or became a symlink: nothing to delete
            try:
                if stat.S_ISREG(os.lstat(item.parts[-1], dir_fd=dir_fd).st_mode):
                    os.unlink(item.parts[-1], dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise InferenceError(
                    f"--clean: cannot delete {path_text(self.out / item.rel)}: "
                    f"{exc.strerror or exc}"
                ) from exc
            finally:
                os.close(dir_fd)

    def _move_into_place(
        self, out_fd: int, staged: Path, dir_fds: dict[tuple[str, ...], tuple[int, int]]
    ) -> Path:
        rel = staged.relative_to(self.staging)
        target = self.out / rel
        try:
            key = rel.parts[:-1]
            if key not in dir_fds:
                dst_fd = _open_chain(out_fd, key, create=True)
                try:
                    dir_fds[key] = (_open_dir(staged.parent), dst_fd)
                except BaseException:
                    os.close(dst_fd)
                    raise
            src_fd, dst_fd = dir_fds[key]
            # A directory at the target makes the rename fail; a symlink there (refused up
            # front) would itself be replaced, its target never written.
            os.replace(staged.name, rel.name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        except OSError as exc:
            why = exc.strerror or str(exc)
            if exc.errno == errno.ELOOP:
                why = "it is a symlink; aprtrace does not write through symlinks"
            raise InferenceError(
                f"cannot write {path_text(target)}: {why}",
                hint="check the output directory's permissions and free space",
            ) from exc
        return target

    # -- the end ------------------------------------------------------------------------

    def close(self) -> None:
        """Remove the staging directory and release the lock (after a commit or a failure)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        lock = self.out / LOCK_NAME
        with contextlib.suppress(OSError):
            if os.fstat(self.lock_fd).st_ino == os.lstat(lock).st_ino:
                os.unlink(lock)  # still held, so no other run holds this file
        with contextlib.suppress(OSError):
            os.close(self.lock_fd)


def _acquire_lock(out: Path) -> int:
    """Hold ``DIR/.aprtrace.lock`` (``flock``); a second run fails at once, naming the first."""
    import fcntl

    path = out / LOCK_NAME
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    for _ in range(5):
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _refuse(
                    f"{path_text(path)} is a symlink; refusing to use it as a lock"
                ) from None
            raise _os_error("create the lock file", path, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                text = os.pread(fd, 32, 0).decode("ascii").strip()
                holder = f" (pid {int(text)})" if text else ""
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(
                    f"another aprtrace run{holder} is writing to {path_text(out)}",
                    hint="wait for it to finish, or choose another --save-tensor-dir",
                ) from None
            raise _os_error("lock", path, exc) from exc
        # The lock file may have been removed by the run that just released it; the lock is
        # ours only if the name still refers to the file we locked.
        try:
            same = os.fstat(fd).st_ino == os.lstat(path).st_ino
        except OSError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise OutputError(f"cannot lock {path_text(path)}: it keeps being replaced")


def _old_manifest(out: Path) -> Manifest | None:
    """DIR's manifest when aprtrace wrote it; a foreign or special file is refused."""
    path = out / MANIFEST_NAME
    kind = file_kind(path)
    if kind is None:
        return None
    if kind != "file":
        raise _refuse(
            f"{path_text(path)} is a {kind}, not a manifest aprtrace wrote; refusing to replace it"
        )

    def foreign(why: str) -> OutputError:
        return _refuse(
            f"{path_text(path)} was not written by aprtrace ({why}); refusing to replace it"
        )

    doc = read_json_file(path, _MAX_MANIFEST_BYTES, foreign)
    if not is_aprtrace_manifest(doc):
        raise foreign(f"no schema {SCHEMA!r} with tool {MANIFEST_TOOL!r}")
    return parse_manifest(doc, path)  # ours but damaged: InvalidFormatError (exit 4)


def _check_target(out: Path, rel: str) -> None:
    """``DIR/rel`` is absent or an APRT file, under real directories of DIR."""
    parts = rel.split("/")
    directory = out
    for part in parts[:-1]:
        directory = directory / part
        kind = file_kind(directory)
        if kind == "symlink":
            raise _refuse(
                f"{path_text(directory)} is a symlink; aprtrace does not write through symlinks"
            )
        if kind not in (None, "directory"):
            raise _refuse(f"{path_text(directory)} is a {kind}, not a dump directory")
        if kind is None:
            return
        if not os.access(directory, os.W_OK | os.X_OK):
            raise _refuse(
                f"cannot write into {path_text(directory)}: permission denied",
                hint="fix its permissions or choose another --save-tensor-dir",
            )
    target = out / rel
    kind = file_kind(target)
    if kind is None:
        return
    if kind == "symlink":
        raise _refuse(f"{path_text(target)} is a symlink; aprtrace does not replace symlinks")
    if kind != "file":
        raise _refuse(f"{path_text(target)} is a {kind}, not a stage file; refusing to replace it")
    dir_fd = _open_dir(target.parent)
    try:
        header = _aprt_header(dir_fd, target.name)
    finally:
        os.close(dir_fd)
    if header is None:
        raise _refuse(
            f"{path_text(target)} exists and is not an APRT stage file; refusing to replace it"
        )


def _planned_deletions(out: Path, old: Manifest) -> list[_Deletion]:
    """The old manifest's entries that --clean may delete (see the module docstring)."""
    deletions = []
    out_fd = _open_dir(out)
    try:
        for entry in old.files:
            placed = layout_stage(entry.path)
            if placed is None or placed[0] != entry.stage:
                continue
            stage, layer = placed
            if layer is not None and entry.layer != layer:
                continue
            parts = entry.path.split("/")
            try:
                dir_fd = _open_chain(out_fd, parts[:-1])
            except OSError:
                continue  # absent, or a symlink on the way: never followed
            try:
                header = _aprt_header(dir_fd, parts[-1])
            finally:
                os.close(dir_fd)
            if header is None:
                continue
            file_layer, count, size = header
            expected_layer = WHOLE_MODEL_LAYER if layer is None else layer
            if file_layer != expected_layer or not size == entry.bytes == HEADER_SIZE + 4 * count:
                continue
            parent = out.joinpath(*parts[:-1])
            if not os.access(parent, os.W_OK | os.X_OK):
                raise _refuse(
                    f"--clean: cannot delete {path_text(out / entry.path)}: its directory is "
                    "not writable",
                    hint="fix the permissions, or run without --clean",
                )
            deletions.append(_Deletion(entry.path))
    finally:
        os.close(out_fd)
    return deletions


def _dump_dirs(out: Path) -> list[Path]:
    """DIR and its real ``layer-N``, ``decode-K`` and ``decode-K/layer-N`` directories."""
    found = [out]
    for directory in (out, *[out / e.name for e in _real_dirs(out) if _STEP_DIR.match(e.name)]):
        found += [directory / e.name for e in _real_dirs(directory) if _LAYER_DIR.match(e.name)]
        if directory != out:
            found.append(directory)
    return found


def _real_dirs(directory: Path) -> list[os.DirEntry]:
    try:
        return [e for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _remove_orphans(out: Path) -> list[Path]:
    """Staging directories and layout temporaries in DIR: with the lock held, no live run
    owns them, so they are what killed runs left."""
    removed = []
    for entry in _real_dirs(out):
        if entry.name.startswith(STAGING_PREFIX):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    for directory in _dump_dirs(out):
        rel_dir = directory.relative_to(out).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        for entry in list(os.scandir(directory)):
            match = TEMP_FILE.match(entry.name)
            if not match or not entry.is_file(follow_symlinks=False):
                continue
            name = match["name"]
            is_manifest = rel_dir == "" and name == MANIFEST_NAME
            if layout_stage(rel_dir + name) is None and not is_manifest:
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def open_output(out: Path, planned: list[str], clean: bool) -> OutputRun:
    """Lock DIR, check everything the run will replace, and create its staging directory.

    ``planned`` lists the relative paths the run will write. Nothing in DIR is changed except
    the lock file, the removal of orphaned temporaries, and the new staging directory.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not out.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory")
    except OSError as exc:
        raise OutputError(
            f"cannot write to output directory {path_text(out)}: {exc.strerror or exc}",
            hint="choose another --save-tensor-dir or fix its permissions",
        ) from exc
    lock_fd = _acquire_lock(out)
    staging = out / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        old = _old_manifest(out)
        for rel in planned:
            _check_target(out, rel)
        deletions = _planned_deletions(out, old) if clean and old is not None else []
        orphans = _remove_orphans(out)
        try:
            os.mkdir(staging)
        except OSError as exc:
            raise _os_error("create the staging directory", staging, exc) from exc
    except BaseException:
        OutputRun(out, staging, lock_fd, None).close()
        raise
    return OutputRun(out, staging, lock_fd, old, deletions, orphans)
