"""``manifest.json``: what a ``trace`` run wrote; written last, so it marks a complete dump.

APRT files carry no shape, stage or provenance; the manifest adds them without touching the
apr-compatible files. Schema ``aprtrace-manifest-v1``::

    {"schema": "aprtrace-manifest-v1", "tool": "aprtrace", "version": "0.1.0",
     "created": "2026-01-01T12:00:00+00:00",
     "model": {"path": str, "size": int, "sha256": str, "format": "gguf" | "apr" | ...},
     "architecture": "llama", "config": {...ModelConfig fields...},
     "prompt": "What is 2+2?" | null, "token_ids": [int, ...],
     "stages": ["embedding", ...], "layers": [0, 1, ...],
     "files": [{"path": "layer-0/attn_norm.bin", "stage": "attn_norm", "layer": 0 | null,
                "shape": [7, 576], "bytes": 16140}, ...],
     "decode": {"mode": "greedy" | "forced", "prompt_argmax": int | null,      (--decode N only)
                "steps": [{"step": 1, "dir": "decode-1", "token": int, "position": int,
                           "argmax": int | null}, ...]}}

``"engine"`` names who computed the pass (numpy | transformers | llama.cpp). A llama.cpp dump
adds ``"llama_cpp"`` (build, ggml, cyllama, context settings), ``"not_captured"`` (stages the
model has that llama.cpp does not compute, e.g. ``["ffn_silu"]``: not written, not faked),
``"stage_sources"`` (the graph node each stage came from, and how it was converted) and
``"tokenizer"`` (``{"source": "llama.cpp", "aprtrace_agrees": true}`` when the ids came from
llama.cpp's tokenizer).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aprtrace import __version__
from aprtrace.atomic import write_bytes_atomic
from aprtrace.errors import InvalidFormatError
from aprtrace.safeio import read_json_file

MANIFEST_NAME = "manifest.json"
SCHEMA = "aprtrace-manifest-v1"
# A manifest is a small JSON file; refuse to parse something absurd.
_MAX_MANIFEST_BYTES = 64 << 20


@dataclass(frozen=True)
class ManifestFile:
    """One stage file of a dump: relative posix path, stage, layer (None = whole-model)."""

    path: str
    stage: str
    layer: int | None
    shape: tuple[int, ...]
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json``. ``raw`` keeps the whole document for reports."""

    version: str
    created: str
    model: dict[str, Any]
    architecture: str | None
    config: dict[str, Any]
    prompt: str | None
    token_ids: tuple[int, ...]
    stages: tuple[str, ...]
    layers: tuple[int, ...]
    files: tuple[ManifestFile, ...]
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def file(self, rel_path: str) -> ManifestFile | None:
        """The entry for ``rel_path`` (posix, relative to the dump directory), or None."""
        for entry in self.files:
            if entry.path == rel_path:
                return entry
        return None

    @property
    def decode_steps(self) -> tuple[dict[str, Any], ...]:
        """The ``decode.steps`` entries (``--decode N``): step, dir, token, position, argmax."""
        decode = self.raw.get("decode")
        steps = decode.get("steps") if isinstance(decode, dict) else None
        if not isinstance(steps, list):
            return ()
        return tuple(s for s in steps if isinstance(s, dict))

    def shape_of(self, rel_path: str) -> tuple[int, ...] | None:
        """The logical shape of the file at ``rel_path``, or None when not listed."""
        entry = self.file(rel_path)
        return entry.shape if entry is not None else None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks (bounded memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def path_size(path: Path) -> int:
    """Bytes of a file, or of every file under a directory (a safetensors checkpoint)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def file_entry(
    out_dir: Path, path: Path, stage: str, layer: int | None, shape: Iterable[int], size: int
) -> dict[str, Any]:
    """A ``files`` entry with ``path`` made relative to ``out_dir`` in posix form."""
    rel = Path(path).resolve().relative_to(Path(out_dir).resolve()).as_posix()
    return {
        "path": rel,
        "stage": stage,
        "layer": layer,
        "shape": [int(x) for x in shape],
        "bytes": int(size),
    }


def build_manifest_data(
    *,
    out_dir: Path,
    model_path: Path,
    model_format: str,
    architecture: str,
    config: dict[str, Any],
    prompt: str | None,
    token_ids: Iterable[int],
    stages: Iterable[str],
    layers: Iterable[int],
    files: Iterable[Any],
    digest: str | None = None,
    engine: str = "numpy",
    decode: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the manifest dict. ``files`` are ``capture.WrittenFile`` records (or dicts).

    ``digest`` is the model's sha256 when the caller already has it; otherwise a model file
    is hashed here (streaming). ``size`` is the file's, or a directory's total.
    """
    model_path = Path(model_path)
    size = path_size(model_path)
    if digest is None and model_path.is_file():
        digest = sha256_file(model_path)
    entries = []
    for f in files:
        if isinstance(f, dict):
            entries.append(f)
            continue
        stage = getattr(f.stage, "value", f.stage)
        layer = f.layer if getattr(f.stage, "per_layer", f.layer is not None) else None
        entries.append(file_entry(out_dir, f.path, stage, layer, f.shape, f.size))
    data = {
        "schema": SCHEMA,
        "tool": "aprtrace",
        "version": __version__,
        "engine": engine,
        "created": now_iso(),
        "model": {
            "path": str(model_path.resolve()),
            "size": size,
            "sha256": digest,
            "format": model_format,
        },
        "architecture": architecture,
        "config": dict(config),
        "prompt": prompt,
        "token_ids": [int(t) for t in token_ids],
        "stages": list(stages),
        "layers": [int(x) for x in layers],
        "files": entries,
    }
    if decode is not None:  # --decode N: the steps (issue 12); absent otherwise
        data["decode"] = decode
    return data


def write_manifest(out_dir: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as ``<out_dir>/manifest.json`` atomically (temp file + rename).

    Call it after every stage file is written: a dump without a manifest is incomplete.
    """
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST_NAME
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"), fsync=True)
    return path


def _bad(path: Path, why: str) -> InvalidFormatError:
    return InvalidFormatError(
        f"{path}: malformed manifest: {why}",
        hint="delete it (the stage files stay usable) or re-run aprtrace trace",
    )


def _int_list(path: Path, value: Any, key: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in value
    ):
        raise _bad(path, f"'{key}' must be a list of integers")
    return tuple(value)


def _parse_file(path: Path, i: int, entry: Any) -> ManifestFile:
    where = f"files[{i}]"
    if not isinstance(entry, dict):
        raise _bad(path, f"{where} must be an object")
    rel = entry.get("path")
    if not isinstance(rel, str) or not rel or rel.startswith("/") or ".." in rel.split("/"):
        raise _bad(path, f"{where}.path must be a relative posix path inside the dump")
    stage = entry.get("stage")
    if not isinstance(stage, str):
        raise _bad(path, f"{where}.stage must be a string")
    layer = entry.get("layer")
    if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool) or layer < 0):
        raise _bad(path, f"{where}.layer must be a non-negative integer or null")
    shape = _int_list(path, entry.get("shape"), f"{where}.shape")
    if any(x < 0 for x in shape):
        raise _bad(path, f"{where}.shape has a negative dimension")
    size = entry.get("bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad(path, f"{where}.bytes must be a non-negative integer")
    return ManifestFile(rel, stage, layer, shape, size)


def parse_manifest(doc: Any, path: Path) -> Manifest:
    """Validate a decoded manifest document; InvalidFormatError names the first problem."""
    if not isinstance(doc, dict):
        raise _bad(path, "top level must be a JSON object")
    if doc.get("schema") != SCHEMA:
        raise _bad(path, f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    files = doc.get("files")
    if not isinstance(files, list):
        raise _bad(path, "'files' must be a list")
    token_ids = _int_list(path, doc.get("token_ids", []), "token_ids")
    layers = _int_list(path, doc.get("layers", []), "layers")
    stages = doc.get("stages", [])
    if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
        raise _bad(path, "'stages' must be a list of strings")
    for key in ("model", "config"):
        if not isinstance(doc.get(key, {}), dict):
            raise _bad(path, f"'{key}' must be an object")
    prompt = doc.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise _bad(path, "'prompt' must be a string or null")
    arch = doc.get("architecture")
    if arch is not None and not isinstance(arch, str):
        raise _bad(path, "'architecture' must be a string")
    return Manifest(
        version=str(doc.get("version", "")),
        created=str(doc.get("created", "")),
        model=doc.get("model", {}),
        architecture=arch,
        config=doc.get("config", {}),
        prompt=prompt,
        token_ids=token_ids,
        stages=tuple(stages),
        layers=layers,
        files=tuple(_parse_file(path, i, e) for i, e in enumerate(files)),
        raw=doc,
    )


def read_manifest(dump_dir: Path) -> Manifest | None:
    """The manifest of ``dump_dir``; None when there is none (apr dump or interrupted run).

    Read through the bounded JSON reader: a FIFO, device or oversized file is refused.
    """
    path = Path(dump_dir) / MANIFEST_NAME
    if not os.path.lexists(path):
        return None
    doc = read_json_file(path, _MAX_MANIFEST_BYTES, lambda why: _bad(path, why))
    return parse_manifest(doc, path)
