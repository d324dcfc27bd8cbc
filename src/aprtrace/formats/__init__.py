"""Model containers: sniff the format by magic bytes and dispatch to its reader."""

from __future__ import annotations

import struct
from pathlib import Path

from aprtrace.errors import InvalidFormatError, NotFoundError, OutputError
from aprtrace.model import Model
from aprtrace.safeio import file_kind, path_text

GGUF = "gguf"
APR = "apr"
APRT = "aprt"
SAFETENSORS = "safetensors"


def sniff_format(path: Path) -> str:
    """Return ``gguf``, ``apr``, ``aprt`` or ``safetensors`` from the file's first bytes.

    A directory is a Hugging Face checkpoint when it holds ``config.json``.
    """
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"file not found: {path}")
    if path.is_dir():
        if (path / "config.json").exists():
            return SAFETENSORS
        raise InvalidFormatError(
            f"{path} is a directory without config.json",
            hint="pass a .gguf / .apr file, or a Hugging Face model directory",
        )
    if not path.is_file():  # a FIFO would block the read below, a device never ends
        raise InvalidFormatError(
            f"{path_text(path)} is a {file_kind(path.resolve())}, not a regular file",
            hint="pass a .gguf / .apr file, or a Hugging Face model directory",
        )
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if head[:4] == b"GGUF":
        return GGUF
    if head[:4] == b"APR\x00":
        return APR
    if head[:4] == b"APRT":
        return APRT
    if len(head) >= 9:
        (header_len,) = struct.unpack_from("<Q", head)
        if 2 <= header_len < (1 << 28) and head[8:9] == b"{":
            return SAFETENSORS
    raise InvalidFormatError(
        f"{path}: not a GGUF, APR, APRT or safetensors file (first bytes {head[:8].hex(' ')})",
        hint="aprtrace reads GGUF (llama.cpp), APR v2 (aprender) and Hugging Face safetensors",
    )


def _check_arch(model: Model, arch: str | None, container: str) -> Model:
    """``--arch`` only fills in a missing architecture (APR); these containers record one."""
    if arch is None:
        return model
    from aprtrace.config import normalize_architecture
    from aprtrace.errors import ValidationError

    if normalize_architecture(arch, "--arch") != model.config.architecture:
        raise ValidationError(
            f"--arch {arch} disagrees with {model.path}, a {container} file that records its "
            f"architecture ({model.config.architecture})",
            hint="drop --arch; it only fills in a missing architecture (APR files)",
        )
    return model


def load_model(path: Path, *, verify: bool = True, arch: str | None = None) -> Model:
    """Open a model of any supported container; weights stay encoded until used."""
    path = Path(path)
    kind = sniff_format(path)
    if kind == APR:
        from aprtrace.formats.apr import load_apr

        return load_apr(path, verify=verify, arch=arch)
    if kind == GGUF:
        from aprtrace.formats.gguf import load_gguf

        return _check_arch(load_gguf(path), arch, "GGUF")
    if kind == SAFETENSORS:
        from aprtrace.formats.safetensors import load_safetensors

        return _check_arch(load_safetensors(path), arch, "safetensors")
    raise InvalidFormatError(
        f"{path} is an APRT stage file, not a model",
        hint="use `aprtrace inspect` or `aprtrace diff --values` on stage files",
    )
