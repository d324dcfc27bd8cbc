"""`aprtrace convert`: safetensors / GGUF -> APR keeps the weights, layout and tokenizer."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from aprtrace.cli import main
from aprtrace.convert import convert_model
from aprtrace.formats.apr import load_apr, read_apr
from aprtrace.formats.gguf import load_gguf, read_gguf
from aprtrace.formats.gguf_writer import tokenizer_dict_from_hf, write_gguf
from aprtrace.formats.safetensors import load_safetensors
from hfref import tiny_hf_model, tiny_tokenizer

PROMPT = "What is 2+2?"


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's Q/K permutation, written out independently."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def stored_f32(apr_path: Path, name: str) -> np.ndarray:
    """A tensor's stored rows, read straight from the APR index (no loader logic)."""
    apr = read_apr(apr_path)
    entry = next(e for e in apr.entries if e.name == name)
    assert entry.dtype == 0
    return np.frombuffer(bytes(apr.tensor_bytes(entry)), "<f4").reshape(entry.shape)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def hf_dir(request, tmp_path_factory) -> tuple[str, Path, dict]:
    model = tiny_hf_model(request.param)
    directory = tmp_path_factory.mktemp(f"hf-{request.param}")
    model.save_pretrained(directory)
    tiny_tokenizer().save(str(directory / "tokenizer.json"))
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return request.param, directory, state


@pytest.mark.reference
def test_safetensors_to_apr_roundtrip(hf_dir, tmp_path: Path) -> None:
    arch, directory, state = hf_dir
    out = tmp_path / "m.apr"
    summary = convert_model(directory, out)
    assert summary["architecture"] == arch and summary["dtypes"] == {"F32": len(state)}
    source = load_safetensors(directory)
    model = load_apr(out)
    assert model.config == source.config
    assert set(model.tensors) == set(source.tensors) == set(state)
    for name, w in state.items():
        np.testing.assert_array_equal(model.weight(name), w, err_msg=name)
    # Section 7: llama stores llama.cpp-permuted Q/K rows (rope_type 0), qwen HF rows (2).
    meta = model.metadata
    assert meta["architecture"] == arch and meta["rope_type"] == (0 if arch == "llama" else 2)
    q_name = "model.layers.1.self_attn.q_proj.weight"
    k_name = "model.layers.1.self_attn.k_proj.weight"
    if arch == "llama":
        assert model.qk_permuted
        np.testing.assert_array_equal(stored_f32(out, q_name), llama_cpp_permute(state[q_name], 4))
        np.testing.assert_array_equal(stored_f32(out, k_name), llama_cpp_permute(state[k_name], 2))
    else:
        assert not model.qk_permuted
        np.testing.assert_array_equal(stored_f32(out, q_name), state[q_name])
    # The embedded tokenizer encodes like tokenizer.json.
    assert meta["tokenizer.model"] == "gpt2" and meta["tokenizer.pre_type"]
    assert model.tokenizer.encode(PROMPT).ids == tiny_tokenizer().encode(PROMPT).ids


@pytest.mark.reference
def test_convert_is_deterministic_and_f16_option(hf_dir, tmp_path: Path) -> None:
    _, directory, state = hf_dir
    convert_model(directory, tmp_path / "a.apr")
    convert_model(directory, tmp_path / "b.apr")
    assert (tmp_path / "a.apr").read_bytes() == (tmp_path / "b.apr").read_bytes()
    summary = convert_model(directory, tmp_path / "h.apr", dtype="f16")
    model = load_apr(tmp_path / "h.apr")
    for name, w in state.items():
        t = model.tensors[name]
        assert t.qtype == ("F16" if w.ndim == 2 else "F32"), name
        expected = w.astype(np.float16).astype(np.float32) if w.ndim == 2 else w
        np.testing.assert_array_equal(model.weight(name), expected, err_msg=name)
    assert any("F32 -> F16" in note and "--dtype f16" in note for note in summary["notes"])


def _tiny_gguf(tmp_path: Path, arch: str, qtype: str) -> tuple[Path, dict]:
    hf = tiny_hf_model(arch)
    state = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    config = load_safetensors_config(hf, tmp_path)
    path = tmp_path / f"{arch}-{qtype}.gguf"
    write_gguf(path, config, state, tokenizer_dict_from_hf(tiny_tokenizer()), qtype=qtype)
    return path, state


def load_safetensors_config(hf, tmp_path: Path):
    directory = tmp_path / "hf"
    hf.save_pretrained(directory)
    return load_safetensors(directory).config


@pytest.mark.reference
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_1"])
def test_gguf_to_apr_roundtrip(tmp_path: Path, arch: str, qtype: str) -> None:
    gguf_path, _ = _tiny_gguf(tmp_path, arch, qtype)
    out = tmp_path / "m.apr"
    summary = convert_model(gguf_path, out)
    source = load_gguf(gguf_path)
    model = load_apr(out)
    assert model.config == source.config
    assert set(model.tensors) == set(source.tensors)
    for name in source.tensors:
        np.testing.assert_array_equal(model.weight(name), source.weight(name), err_msg=name)
    gf = read_gguf(gguf_path)
    apr = read_apr(out)
    entries = {e.name: e for e in apr.entries}
    q_gguf = gf.tensors["blk.0.attn_q.weight"]
    q_apr = entries["model.layers.0.self_attn.q_proj.weight"]
    if qtype == "Q4_1":
        # No APR code for Q4_1: dequantized to F32, and the summary says so.
        assert q_apr.dtype == 0
        assert any("Q4_1 -> F32" in n and "no dtype code" in n for n in summary["notes"])
    else:
        # Kept: same code and the very same bytes (llama GGUF rows are already permuted).
        assert q_apr.dtype == {"F32": 0, "Q8_0": 8}[qtype]
        assert bytes(apr.tensor_bytes(q_apr)) == bytes(gf.tensor_bytes(q_gguf))
    assert model.tokenizer.encode(PROMPT).ids == source.tokenizer.encode(PROMPT).ids
    assert apr.metadata["tokenizer.vocabulary"] == gf.metadata["tokenizer.ggml.tokens"]


def test_cli_convert_and_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(main, ["convert", str(tmp_path / "nope.gguf"), str(tmp_path / "o.apr")])
    assert missing.exit_code == 3, missing.output
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\0" * 64)
    bad = runner.invoke(main, ["convert", str(junk), str(tmp_path / "o.apr")])
    assert bad.exit_code == 4, bad.output
    assert not (tmp_path / "o.apr").exists()


@pytest.mark.reference
def test_cli_convert_prints_a_summary(tmp_path: Path) -> None:
    gguf_path, _ = _tiny_gguf(tmp_path, "llama", "Q4_1")
    result = CliRunner().invoke(main, ["convert", str(gguf_path), str(tmp_path / "m.apr")])
    assert result.exit_code == 0, result.output
    assert "architecture: llama (rope_type 0" in result.output
    assert "Q4_1 -> F32 (APR has no dtype code for it)" in result.output
    assert "tokenizer: embedded" in result.output
    header = (tmp_path / "m.apr").read_bytes()[:64]
    assert header[:6] == b"APR\0\x02\x00"
    (flags,) = struct.unpack_from("<H", header, 6)
    assert flags == 0x0400 | 0x0200  # row-major, vocabulary embedded


@pytest.mark.slow
def test_smollm2_converts_and_matches_the_gguf(smollm2_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "smollm2.apr"
    summary = convert_model(smollm2_path, out)
    source = load_gguf(smollm2_path)
    model = load_apr(out)
    assert model.config == source.config and model.qk_permuted
    assert set(model.tensors) == set(source.tensors)
    for name in source.tensors:
        np.testing.assert_array_equal(model.weight(name), source.weight(name), err_msg=name)
    assert summary["converted"] == {"Q4_1 -> F32": 210}
    # The Q8_0 embedding is kept byte for byte; aprender's tied lm_head copy is written too.
    apr = read_apr(out)
    entries = {e.name: e for e in apr.entries}
    gf = read_gguf(smollm2_path)
    embed = gf.tensor_bytes(gf.tensors["token_embd.weight"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert entries[name].dtype == 8
        assert np.array_equal(apr.tensor_bytes(entries[name]), embed)
    assert apr.metadata["tied_embeddings"] is True
    assert apr.metadata["tokenizer.pre_type"] == "smollm"
    assert model.tokenizer.encode(PROMPT).ids == source.tokenizer.encode(PROMPT).ids
    json.dumps(apr.metadata)  # plain JSON types only
