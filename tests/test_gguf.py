"""GGUF reader: config, name mapping, shapes, decoded values, and hostile input.

Small GGUFs are written with gguf-py's own ``GGUFWriter`` (an independent writer); decoded values
are compared with the arrays written, or with ``gguf.quants`` for quantized types.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aprtrace.errors import AprtraceError, InvalidFormatError, ModelLoadError, NotFoundError
from aprtrace.formats.gguf import (
    hf_tensor_name,
    load_gguf,
    model_from_gguf,
    parse_gguf,
    read_gguf,
)
from aprtrace.model import permute_llama_qk

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 32, 4, 2, 64, 40
HEAD_DIM = HIDDEN // HEADS

_PIECES = ["a", "b", "c", "ab", "bc", "abc", "Ġ", "Ġa", "Ġab", "Ġabc"]
_FILLER = [f"t{i}" for i in range(VOCAB - 3 - len(_PIECES))]
TINY_TOKENS = ["<unk>", "<s>", "</s>"] + _PIECES + _FILLER
TINY_MERGES = ["Ġ a", "Ġa b", "Ġab c", "a b", "b c", "ab c"]


def _tiny_weights(arch: str, n_layers: int, tie: bool, seed: int) -> dict[str, np.ndarray]:
    """HF-named float32 weights of a tiny model, in Hugging Face layout."""
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) * 0.5

    w = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "model.norm.weight": rand(HIDDEN)}
    if not tie:
        w["lm_head.weight"] = rand(VOCAB, HIDDEN)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": rand(HIDDEN),
            p + "self_attn.q_proj.weight": rand(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": rand(HIDDEN, HEADS * HEAD_DIM),
            p + "post_attention_layernorm.weight": rand(HIDDEN),
            p + "mlp.gate_proj.weight": rand(FFN, HIDDEN),
            p + "mlp.up_proj.weight": rand(FFN, HIDDEN),
            p + "mlp.down_proj.weight": rand(HIDDEN, FFN),
        }
        if arch == "qwen2":
            w |= {
                p + "self_attn.q_proj.bias": rand(HEADS * HEAD_DIM),
                p + "self_attn.k_proj.bias": rand(KV_HEADS * HEAD_DIM),
                p + "self_attn.v_proj.bias": rand(KV_HEADS * HEAD_DIM),
            }
        if arch == "qwen3":
            w |= {
                p + "self_attn.q_norm.weight": rand(HEAD_DIM),
                p + "self_attn.k_norm.weight": rand(HEAD_DIM),
            }
    return w


_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    """Independent (test-side) HF -> GGUF name mapping."""
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in fixed:
        return fixed[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_TO_GGUF[module]}.{kind}"


def write_tiny_gguf(
    path: Path,
    arch: str = "qwen2",
    qtype: str = "F32",
    n_layers: int = 2,
    tie: bool = False,
    seed: int = 0,
    tokenizer: bool = True,
    skip: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """Write a tiny model with gguf-py's writer; returns the expected decoded HF-layout weights."""
    weights = _tiny_weights(arch, n_layers, tie, seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(n_layers)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(TINY_TOKENS)
        writer.add_token_merges(TINY_MERGES)
        writer.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    expected: dict[str, np.ndarray] = {}
    for name, value in weights.items():
        if name in skip:
            continue
        stored = value
        if arch == "llama" and ".self_attn.q_proj." in name:
            stored = permute_llama_qk(value, HEADS)
        elif arch == "llama" and ".self_attn.k_proj." in name:
            stored = permute_llama_qk(value, KV_HEADS)
        t = qtype if value.ndim == 2 else "F32"  # norms and biases stay F32, as llama.cpp does
        if t == "F32":
            writer.add_tensor(gguf_name(name), stored)
            expected[name] = value
        elif t == "F16":
            writer.add_tensor(gguf_name(name), stored.astype(np.float16))
            expected[name] = value.astype(np.float16).astype(np.float32)
        else:
            q = gguf.quants.quantize(stored, QT[t])
            writer.add_tensor(gguf_name(name), q, raw_shape=q.shape, raw_dtype=QT[t])
            decoded = gguf.quants.dequantize(q, QT[t]).reshape(value.shape)  # file layout
            if arch == "llama" and ".self_attn.q_proj." in name:
                decoded = _unpermute(decoded, HEADS)
            elif arch == "llama" and ".self_attn.k_proj." in name:
                decoded = _unpermute(decoded, KV_HEADS)
            expected[name] = decoded.astype(np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's permutation, written independently: (h, d/2, 2) -> (h, 2, d/2)."""
    rows = w.shape[0]
    d = rows // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        block = w[h * d : (h + 1) * d]
        out[h * d : h * d + d // 2] = block[0::2]
        out[h * d + d // 2 : (h + 1) * d] = block[1::2]
    return out


# --- Valid files --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_tiny_models_load_with_config_names_and_values(tmp_path, arch, qtype):
    path = tmp_path / f"{arch}-{qtype}.gguf"
    expected = write_tiny_gguf(path, arch=arch, qtype=qtype)
    model = load_gguf(path)
    c = model.config
    assert (c.architecture, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads) == (
        arch,
        HIDDEN,
        2,
        HEADS,
        KV_HEADS,
    )
    assert (c.intermediate_size, c.vocab_size, c.head_dim) == (FFN, VOCAB, HEAD_DIM)
    assert c.rope_theta == 1e6 and c.rms_norm_eps == pytest.approx(1e-6)
    assert c.qkv_bias is (arch == "qwen2")
    assert c.qk_norm is (arch == "qwen3")
    assert c.tie_word_embeddings is False
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    assert model.qk_permuted is (arch == "llama")
    assert set(model.tensors) == set(expected)
    for name, value in expected.items():
        lazy = model.tensors[name]
        assert lazy.shape == value.shape, name
        assert lazy.raw.dtype == np.uint8 and lazy.raw.base is not None  # a view, not a copy
        got = model.weight(name)
        np.testing.assert_array_equal(got, value, err_msg=name)
    q = model.tensors["model.layers.0.mlp.gate_proj.weight"]
    assert q.qtype == ("F32" if qtype == "F32" else qtype)


def test_llama_qk_rows_come_back_in_hf_layout(tmp_path):
    # Independent check of the un-permutation on a hand-made pattern: row r holds value r.
    path = tmp_path / "llama.gguf"
    write_tiny_gguf(path, arch="llama")
    model = load_gguf(path)
    raw = model.tensors["model.layers.0.self_attn.k_proj.weight"].load()
    hf = model.weight("model.layers.0.self_attn.k_proj.weight")
    # In the file, head 0's rows are interleaved pairs: row 2i -> HF row i, row 2i+1 -> i + d/2.
    np.testing.assert_array_equal(raw[0], hf[0])
    np.testing.assert_array_equal(raw[1], hf[HEAD_DIM // 2])
    np.testing.assert_array_equal(raw[2], hf[1])


def test_tied_embeddings_when_output_is_absent(tmp_path):
    path = tmp_path / "tied.gguf"
    write_tiny_gguf(path, tie=True)
    model = load_gguf(path)
    assert model.config.tie_word_embeddings is True
    assert "lm_head.weight" not in model.tensors
    assert model.lm_head_name == "model.embed_tokens.weight"


def test_metadata_keeps_scalars_not_token_arrays(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path)
    model = load_gguf(path)
    assert model.metadata["general.architecture"] == "qwen2"
    assert model.metadata["qwen2.block_count"] == 2
    assert "tokenizer.ggml.tokens" in read_gguf(path).metadata
    assert len(read_gguf(path).metadata["tokenizer.ggml.tokens"]) == VOCAB


def test_tokenizer_is_built_from_metadata(tmp_path):
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path)
    tok = load_gguf(path).tokenizer
    # "abc abc" -> "abc", "Ġabc" under the merges above.
    assert tok.encode("abc abc", add_special_tokens=False).ids == [8, 12]
    assert tok.encode("<s>abc", add_special_tokens=False).ids == [1, 8]


def test_hf_name_mapping():
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_tensor_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_tensor_name("blk.3.attn_q_norm.weight") == "model.layers.3.self_attn.q_norm.weight"
    assert hf_tensor_name("blk.3.ffn_norm.weight") == (
        "model.layers.3.post_attention_layernorm.weight"
    )
    assert hf_tensor_name("blk.1.ffn_down.weight") == "model.layers.1.mlp.down_proj.weight"
    assert hf_tensor_name("rope_freqs.weight") == "rope_freqs.weight"  # same name in both
    assert hf_tensor_name("blk.1.unknown_thing.weight") is None


def test_custom_alignment_is_honoured(tmp_path):
    path = tmp_path / "a.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_custom_alignment(64)
    writer.add_tensor("x.weight", np.arange(16, dtype=np.float32))
    writer.add_tensor("y.weight", np.arange(5, dtype=np.float32) * 2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    gf = read_gguf(path)
    assert gf.alignment == 64 and gf.data_offset % 64 == 0
    y = gf.tensors["y.weight"]
    np.testing.assert_array_equal(gf.tensor_bytes(y).view("<f4"), np.arange(5) * 2)


# --- Errors for valid files that cannot be used ----------------------------------------------


def test_unsupported_architecture_lists_supported(tmp_path):
    path = tmp_path / "bloom.gguf"  # (GPT-2, the example before, is supported now)
    writer = gguf.GGUFWriter(str(path), "bloom")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError) as err:
        load_gguf(path)
    assert err.value.exit_code == 6
    assert "bloom" in str(err.value) and "unsupported architecture" in str(err.value)
    assert all(arch in err.value.hint for arch in ("llama", "qwen3", "gpt2"))


def test_missing_tensor_is_reported_at_load(tmp_path):
    path = tmp_path / "missing.gguf"
    write_tiny_gguf(path, skip=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_gguf(path)


def test_undecodable_tensor_type_is_reported_at_load(tmp_path):
    path = tmp_path / "q.gguf"
    write_tiny_gguf(path, qtype="Q8_0")
    data = bytearray(path.read_bytes())
    gf = read_gguf(path)
    # Retype one Q8_0 tensor as I8 (1 byte per value: fits in the Q8_0 bytes; not decodable).
    info = gf.tensors["blk.1.ffn_up.weight"]
    name_at = bytes(data).index(b"blk.1.ffn_up.weight")
    type_at = name_at + len(b"blk.1.ffn_up.weight") + 4 + 8 * len(info.dims)
    assert struct.unpack_from("<I", data, type_at)[0] == QT.Q8_0
    struct.pack_into("<I", data, type_at, QT.I8)
    (tmp_path / "i8.gguf").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as err:
        load_gguf(tmp_path / "i8.gguf")
    assert err.value.exit_code == 6
    assert "model.layers.1.mlp.up_proj.weight" in str(err.value) and "I8" in str(err.value)


def test_missing_file_is_not_found(tmp_path):
    with pytest.raises(NotFoundError):
        load_gguf(tmp_path / "nope.gguf")


# --- Hostile input ------------------------------------------------------------------------------


def _header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _expect_invalid(path: Path) -> InvalidFormatError:
    start = time.perf_counter()
    with pytest.raises(InvalidFormatError) as err:
        load_gguf(path)
    assert time.perf_counter() - start < 1.0
    assert err.value.exit_code == 4
    return err.value


@pytest.mark.parametrize(
    "n_tensors, n_kv", [(2**40, 0), (0, 2**40), (2**64 - 1, 2**64 - 1), (40, 40)]
)
def test_absurd_counts_fail_at_once(tmp_path, n_tensors, n_kv):
    path = tmp_path / "big.gguf"
    path.write_bytes(_header(n_tensors, n_kv) + b"\0" * 1000)
    _expect_invalid(path)


def test_huge_string_length_fails(tmp_path):
    path = tmp_path / "s.gguf"
    kv = struct.pack("<Q", 2**62) + b"general.architecture"
    path.write_bytes(_header(0, 1) + kv + b"\0" * 1000)
    _expect_invalid(path)
    # A value string that claims 2^62 bytes.
    key = b"general.architecture"
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, 2**62) + b"llama"
    path.write_bytes(_header(0, 1) + kv + b"\0" * 1000)
    _expect_invalid(path)


def test_huge_array_fails(tmp_path):
    path = tmp_path / "arr.gguf"
    key = b"tokenizer.ggml.tokens"
    for item_type in (8, 4, 9):  # strings, u32, nested arrays
        kv = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, item_type, 2**40)
        path.write_bytes(_header(0, 1) + kv + b"\0" * 1000)
        _expect_invalid(path)


def test_bad_magic_version_and_empty(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"")
    _expect_invalid(path)
    path.write_bytes(b"GGML" + b"\0" * 100)
    _expect_invalid(path)
    path.write_bytes(_header(0, 0, version=7))
    assert "version 7" in str(_expect_invalid(path))
    path.write_bytes(b"GGUF" + struct.pack(">I", 3) + b"\0" * 16)
    assert "big-endian" in str(_expect_invalid(path))


def test_tensor_past_end_of_file(tmp_path):
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path, tokenizer=False)
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    assert "past the end" in str(_expect_invalid(path))
    # A tensor whose offset points far beyond the file.
    good = tmp_path / "good.gguf"
    write_tiny_gguf(good, tokenizer=False)
    raw = bytearray(good.read_bytes())
    name = b"output_norm.weight"
    at = bytes(raw).index(name) + len(name) + 4 + 8 + 4  # n_dims, one dim, type -> offset
    struct.pack_into("<Q", raw, at, 2**50)
    path.write_bytes(bytes(raw))
    _expect_invalid(path)


def test_duplicate_tensor_names(tmp_path):
    path = tmp_path / "dup.gguf"
    write_tiny_gguf(path, tokenizer=False)
    raw = path.read_bytes()
    assert raw.count(b"blk.0.attn_k.weight") == 1
    path.write_bytes(raw.replace(b"blk.0.attn_k.weight", b"blk.0.attn_q.weight"))
    assert "duplicate" in str(_expect_invalid(path))


def test_truncated_at_every_offset(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, n_layers=1)
    data = path.read_bytes()
    header_end = read_gguf(path).data_offset
    offsets = list(range(0, header_end + 64)) + list(range(header_end + 64, len(data), 31))
    for n in offsets:  # in memory: the same parser, without a file write per offset
        with pytest.raises(InvalidFormatError):
            model_from_gguf(parse_gguf(data[:n], f"cut at {n}"))
    cut = tmp_path / "cut.gguf"
    for n in (0, 3, 4, 23, header_end // 2, header_end, len(data) - 1):  # and through files
        cut.write_bytes(data[:n])
        with pytest.raises(InvalidFormatError):
            load_gguf(cut)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_mutated_files_fail_cleanly(tmp_path, data):
    seed = tmp_path / "seed.gguf"
    if not seed.exists():
        write_tiny_gguf(seed, n_layers=1)
    raw = bytearray(seed.read_bytes())
    header_end = 2000  # metadata and tensor infos live in the first ~2 KB
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, min(header_end, len(raw)) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    try:
        model_from_gguf(parse_gguf(bytes(raw), "mutated.gguf"))
    except AprtraceError as exc:
        assert exc.exit_code in (4, 6)


# --- The real SmolLM2 file ----------------------------------------------------------------------


def test_smollm2_open(smollm2_path):
    start = time.perf_counter()
    model = load_gguf(smollm2_path)
    elapsed = time.perf_counter() - start
    c = model.config
    assert c.architecture == "llama"
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (30, 576, 9, 3)
    assert (c.vocab_size, c.intermediate_size, c.head_dim) == (49152, 1536, 64)
    assert c.tie_word_embeddings is True and model.qk_permuted is True
    assert model.tensors["model.layers.0.self_attn.q_proj.weight"].qtype == "Q4_1"
    assert model.tensors["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert model.tokenizer is not None
    print(f"\nSmolLM2 open (header + config + tensors + tokenizer): {elapsed * 1000:.0f} ms")
    assert elapsed < 3.0  # "well under a second" unloaded; slack for a busy CI machine
