"""Cross-format invariant: one model gives the same stage files from every container.

A tiny transformers model is saved as a Hugging Face safetensors directory, written as GGUF
(F32; llama Q/K rows permuted as llama.cpp does) and converted to APR from each. All four
dumps must be bit-identical, because every reader hands the forward pass the same float32
weights in Hugging Face layout. With Q8_0 kept in APR, the APR dump equals the GGUF dump of
the same quantized weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aprtrace.convert import convert_model
from aprtrace.formats import load_model
from aprtrace.formats.gguf_writer import tokenizer_dict_from_hf, write_gguf
from aprtrace.plan import make_plan
from aprtrace.trace import run_trace

pytestmark = pytest.mark.reference
TOKENS = [5, 17, 42, 7, 99, 3]


def _dump(model_path: Path, out: Path) -> dict[str, bytes]:
    model = load_model(model_path)
    plan = make_plan("all", "all", out, model_path)
    run_trace(model, TOKENS, plan, collect_stats=False)
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.bin"))}


def _save_hf(arch: str, root: Path) -> Path:
    from hfref import tiny_hf_model, tiny_tokenizer

    model = tiny_hf_model(arch, seed=11)
    hf_dir = root / f"{arch}-hf"
    model.save_pretrained(hf_dir, safe_serialization=True)
    tiny_tokenizer().save(str(hf_dir / "tokenizer.json"))
    return hf_dir


def _gguf_from_hf(hf_dir: Path, out: Path, qtype: str) -> Path:
    from hfref import tiny_tokenizer

    model = load_model(hf_dir)
    tensors = {name: t.load() for name, t in model.tensors.items()}
    tok = tokenizer_dict_from_hf(tiny_tokenizer())
    return write_gguf(out, model.config, tensors, tok, qtype=qtype)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_f32_dumps_identical_across_containers(arch, tmp_path):
    hf_dir = _save_hf(arch, tmp_path)
    gguf = _gguf_from_hf(hf_dir, tmp_path / f"{arch}.gguf", "F32")
    apr_from_hf = tmp_path / f"{arch}-from-hf.apr"
    apr_from_gguf = tmp_path / f"{arch}-from-gguf.apr"
    convert_model(hf_dir, apr_from_hf, dtype="keep")
    convert_model(gguf, apr_from_gguf, dtype="keep")

    reference = _dump(hf_dir, tmp_path / "d-hf")
    assert len(reference) == 1 + (17 if arch == "qwen2" else 16) * 3 + 2
    for source in (gguf, apr_from_hf, apr_from_gguf):
        other = _dump(source, tmp_path / f"d-{source.name}")
        assert other.keys() == reference.keys(), source
        different = [k for k in reference if reference[k] != other[k]]
        assert not different, f"{source.name}: {different[:5]}"


def test_q8_0_kept_in_apr_gives_identical_dump(tmp_path):
    hf_dir = _save_hf("qwen2", tmp_path)
    gguf = _gguf_from_hf(hf_dir, tmp_path / "q8.gguf", "Q8_0")
    apr = tmp_path / "q8.apr"
    summary = convert_model(gguf, apr, dtype="keep")
    kinds = {t.qtype for t in load_model(apr).tensors.values()}
    assert "Q8_0" in kinds, summary
    a, b = _dump(gguf, tmp_path / "d-gguf"), _dump(apr, tmp_path / "d-apr")
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a)
    # and quantization did change the numbers relative to F32 (the test can fail)
    f32 = _dump(hf_dir, tmp_path / "d-f32")
    la = np.frombuffer(a["lm_head.bin"][12:], dtype="<f4")
    lf = np.frombuffer(f32["lm_head.bin"][12:], dtype="<f4")
    assert not np.array_equal(la, lf)
