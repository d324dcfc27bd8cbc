"""Tiny models for the reliability, fuzz and CLI-error tests (built from ``fuzz/seeds.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fuzz import seeds  # noqa: E402
from fuzz.targets import build_targets  # noqa: E402

__all__ = ["ROOT", "build_targets", "seeds", "unsupported_arch_gguf"]


def unsupported_arch_gguf(path: Path) -> Path:
    """A well-formed GGUF whose architecture is ``gemma`` (same length as ``qwen2``)."""
    tmp = path.with_name(path.name + ".src")
    seeds.write_tiny_gguf(tmp)
    path.write_bytes(tmp.read_bytes().replace(b"qwen2", b"gemma"))
    tmp.unlink()
    return path
