"""APRT stage-tensor files: 12-byte header + raw f32 LE (FORMATS.md section 1)."""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aprtrace.atomic import write_bytes_atomic
from aprtrace.errors import InvalidFormatError, NotFoundError, OutputError
from aprtrace.stages import WHOLE_MODEL_LAYER

MAGIC = b"APRT"
HEADER = struct.Struct("<4sII")
HEADER_SIZE = HEADER.size  # 12
# Below this many bytes a plain read is cheaper than setting up a memory map.
_MMAP_THRESHOLD = 1 << 20


@dataclass(frozen=True)
class AprtFile:
    """A read APRT file. ``values`` is a read-only float32 view (memory-mapped when large)."""

    path: Path
    layer: int
    values: np.ndarray

    @property
    def whole_model(self) -> bool:
        return self.layer == WHOLE_MODEL_LAYER

    @property
    def layer_label(self) -> str:
        return "whole-model" if self.whole_model else str(self.layer)


def encode_header(layer: int, count: int) -> bytes:
    return HEADER.pack(MAGIC, layer, count)


def write_aprt(path: Path, layer: int, values: np.ndarray) -> int:
    """Write ``values`` (flattened, as f32 LE) atomically; return the file size.

    The bytes go to a temporary file in the same directory which is then renamed over
    ``path``, so a reader never sees a partial file under the final name.
    """
    path = Path(path)
    data = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
    if not 0 <= layer <= WHOLE_MODEL_LAYER:
        raise ValueError(f"layer {layer} does not fit the APRT header")
    write_bytes_atomic(path, encode_header(layer, data.size), data.tobytes())
    return HEADER_SIZE + 4 * data.size


def parse_header(buf: bytes, where: str = "APRT data") -> tuple[int, int]:
    """Return ``(layer, count)`` from the first 12 bytes, or raise InvalidFormatError."""
    if len(buf) < HEADER_SIZE:
        raise InvalidFormatError(
            f"{where}: truncated APRT header ({len(buf)} of {HEADER_SIZE} bytes)"
        )
    magic, layer, count = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise InvalidFormatError(
            f"{where}: bad magic {magic!r}, expected b'APRT'",
            hint="this is not a stage file written by apr trace --save-tensor / aprtrace",
        )
    return layer, count


def read_aprt(path: Path, mmap: bool | None = None) -> AprtFile:
    """Read an APRT file. Large bodies are memory-mapped (zero-copy, read-only)."""
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
            # A FIFO would block the read below and a device never ends.
            raise InvalidFormatError(f"{path} is not a regular file, expected an APRT file")
        size = st.st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
            layer, count = parse_header(head, str(path))
            body = 4 * count
            if size - HEADER_SIZE < body:
                raise InvalidFormatError(
                    f"{path}: truncated APRT body: header says {count} values "
                    f"({body} bytes), file has {size - HEADER_SIZE} bytes after the header"
                )
            use_mmap = body >= _MMAP_THRESHOLD if mmap is None else mmap
            if count == 0:
                values = np.zeros(0, dtype="<f4")
                values.flags.writeable = False
            elif use_mmap:
                values = np.memmap(path, dtype="<f4", mode="r", offset=HEADER_SIZE, shape=(count,))
            else:
                values = np.frombuffer(f.read(body), dtype="<f4")
    except FileNotFoundError:
        raise NotFoundError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise InvalidFormatError(f"{path} is a directory, expected an APRT file") from None
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return AprtFile(path=path, layer=layer, values=values)
