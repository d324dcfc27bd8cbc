"""APR v2 reader and writer against files built byte by byte from FORMATS.md section 5."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from aprtrace.errors import InvalidFormatError, ModelLoadError
from aprtrace.formats.apr import (
    AprIndexEntry,
    describe_apr,
    entry_qtype,
    load_apr,
    metadata_json,
    write_apr,
)

# --- an APR file from the spec's tables, independent of the writer ----------------------------

H, NH, NKV, HD, INTER, VOCAB = 8, 2, 1, 4, 16, 10
ROW_MAJOR, HAS_VOCAB = 0x0400, 0x0200

# The metadata JSON as the spec says the writer emits it: aprender's fields in its order,
# typed as its reader needs, then custom keys; compact separators.
GOLDEN_JSON = (
    '{"model_type":"llama","name":"golden","description":null,"author":null,"license":null,'
    '"version":null,"source":null,"original_format":null,"created_at":null,"total_size":0,'
    '"param_count":0,"quantization":null,"sharding":null,"chat_template":null,'
    '"chat_format":null,"special_tokens":null,"architecture":"llama","hidden_size":8,'
    '"num_layers":1,"num_heads":2,"num_kv_heads":1,"vocab_size":10,"intermediate_size":16,'
    '"max_position_embeddings":64,"rope_theta":10000.0,"rope_type":0,"rms_norm_eps":1e-05,'
    '"head_dim":4,"num_experts":null,"num_experts_per_tok":null,"moe_intermediate_size":null,'
    '"tied_embeddings":false}'
)
GOLDEN_META = {
    "tied_embeddings": False,  # custom keys may come in any order; standard ones are reordered
    "rope_type": 0,
    "model_type": "llama",
    "name": "golden",
    "architecture": "llama",
    "hidden_size": 8,
    "num_layers": 1,
    "num_heads": 2,
    "num_kv_heads": 1,
    "vocab_size": 10,
    "intermediate_size": 16,
    "max_position_embeddings": 64,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "head_dim": 4,
}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's Q/K permutation, written out here independently."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {
        "model.embed_tokens.weight": (VOCAB, H),
        "model.norm.weight": (H,),
        "lm_head.weight": (VOCAB, H),
        "model.layers.0.input_layernorm.weight": (H,),
        "model.layers.0.post_attention_layernorm.weight": (H,),
        "model.layers.0.self_attn.q_proj.weight": (NH * HD, H),
        "model.layers.0.self_attn.k_proj.weight": (NKV * HD, H),
        "model.layers.0.self_attn.v_proj.weight": (NKV * HD, H),
        "model.layers.0.self_attn.o_proj.weight": (H, NH * HD),
        "model.layers.0.mlp.gate_proj.weight": (INTER, H),
        "model.layers.0.mlp.up_proj.weight": (INTER, H),
        "model.layers.0.mlp.down_proj.weight": (H, INTER),
    }
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def stored_tensors(weights: dict[str, np.ndarray]) -> list[tuple[str, int, tuple, bytes]]:
    """(name, dtype code, shape, bytes) as a llama APR stores them: Q/K permuted, embedding F16."""
    out = []
    for name, w in weights.items():
        code = 0
        if name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, NH)
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, NKV)
        if name == "model.embed_tokens.weight":
            code, raw = 1, w.astype("<f2").tobytes()
        else:
            raw = w.astype("<f4").tobytes()
        out.append((name, code, w.shape, raw))
    return out


def crc_header(header: bytes) -> bytes:
    crc = zlib.crc32(header[:40] + header[44:64])
    return header[:40] + struct.pack("<I", crc) + header[44:64]


def build_apr(
    meta: bytes,
    tensors: list[tuple[str, int, tuple, bytes]],
    flags: int = ROW_MAJOR,
    sort: bool = True,
) -> bytes:
    """An APR v2 file assembled from the spec's tables with struct and zlib only."""
    if sort:
        tensors = sorted(tensors, key=lambda t: t[0].encode())
    pad = lambda n: b"\0" * (-n % 64)  # noqa: E731
    index = b""
    data = b""
    for name, code, shape, raw in tensors:
        name_b = name.encode()
        index += struct.pack("<H", len(name_b)) + name_b + struct.pack("<BB", code, len(shape))
        index += b"".join(struct.pack("<Q", d) for d in shape)
        index += struct.pack("<QQ", len(data), len(raw))
        data += raw + pad(len(raw))
    index_off = 64 + len(meta) + len(pad(len(meta)))
    data_off = index_off + len(index) + len(pad(len(index)))
    header = (
        b"APR\0"
        + bytes([2, 0])
        + struct.pack("<H", flags)
        + struct.pack("<I", len(tensors))
        + struct.pack("<Q", 64)
        + struct.pack("<I", len(meta))
        + struct.pack("<Q", index_off)
        + struct.pack("<Q", data_off)
        + b"\0\0\0\0"
        + b"\0" * 20
    )
    body = crc_header(header) + meta + pad(len(meta)) + index + pad(len(index)) + data
    return body + struct.pack("<I", zlib.crc32(body))


def reseal(blob: bytes) -> bytes:
    """Recompute both CRCs after an edit, so only the structural checks can fail."""
    blob = crc_header(blob[:64]) + blob[64:-4]
    return blob + struct.pack("<I", zlib.crc32(blob))


@pytest.fixture(scope="module")
def golden() -> bytes:
    return build_apr(GOLDEN_JSON.encode(), stored_tensors(hf_weights()))


@pytest.fixture
def golden_path(tmp_path: Path, golden: bytes) -> Path:
    path = tmp_path / "golden.apr"
    path.write_bytes(golden)
    return path


# --- golden ------------------------------------------------------------------------------------


def test_golden_file_loads_with_hf_layout_weights(golden_path: Path) -> None:
    model = load_apr(golden_path)
    c = model.config
    assert (c.architecture, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads) == (
        "llama",
        H,
        1,
        NH,
        NKV,
    )
    assert (c.head_dim, c.intermediate_size, c.vocab_size) == (HD, INTER, VOCAB)
    assert c.rope_theta == 10000.0 and c.rms_norm_eps == 1e-5 and c.max_position_embeddings == 64
    assert not c.tie_word_embeddings and not c.qkv_bias and not c.qk_norm
    assert model.qk_permuted and model.format == "apr"
    weights = hf_weights()
    for name, w in weights.items():
        expected = w.astype(np.float16).astype(np.float32) if "embed" in name else w
        np.testing.assert_array_equal(model.weight(name), expected, err_msg=name)
    # Zero-copy: the F32 tensors are views of the file's memory map.
    raw = model.tensors["model.norm.weight"].raw
    assert isinstance(raw.base, np.memmap) or isinstance(raw, np.memmap)


def test_writer_output_is_byte_identical_to_the_spec_built_file(
    tmp_path: Path, golden: bytes
) -> None:
    tensors = stored_tensors(hf_weights())
    tensors.reverse()  # input order must not matter
    out = tmp_path / "written.apr"
    size = write_apr(
        out, GOLDEN_META, [(n, c, s, np.frombuffer(r, np.uint8)) for n, c, s, r in tensors]
    )
    assert out.read_bytes() == golden
    assert size == len(golden)
    assert metadata_json(GOLDEN_META) == GOLDEN_JSON.encode()
    assert not list(tmp_path.glob("*.partial"))


def test_writer_is_deterministic_and_accepts_callables(tmp_path: Path) -> None:
    tensors = stored_tensors(hf_weights())
    write_apr(tmp_path / "a.apr", GOLDEN_META, tensors)
    write_apr(tmp_path / "b.apr", GOLDEN_META, [(n, c, s, lambda r=r: r) for n, c, s, r in tensors])
    assert (tmp_path / "a.apr").read_bytes() == (tmp_path / "b.apr").read_bytes()


def test_writer_sets_has_vocab_and_checks_types(tmp_path: Path) -> None:
    meta = {**GOLDEN_META, "tokenizer.vocabulary": ["a", "b"], "tokenizer.merges": []}
    write_apr(tmp_path / "v.apr", meta, [])
    (flags,) = struct.unpack_from("<H", (tmp_path / "v.apr").read_bytes(), 6)
    assert flags == ROW_MAJOR | HAS_VOCAB
    with pytest.raises(ValueError, match="one spelling"):
        metadata_json({"hidden_dim": 8})
    with pytest.raises(ValueError, match="rope_type"):
        metadata_json({"rope_type": "neox"})
    with pytest.raises(ValueError, match="total_size"):
        metadata_json({"total_size": 1.5})
    assert json.loads(metadata_json({"model_type": None}))["model_type"] == ""
    with pytest.raises(ValueError, match="bytes"):
        write_apr(tmp_path / "x.apr", {}, [("t", 0, (3,), b"\0" * 8)])
    with pytest.raises(ValueError, match="dtype code"):
        write_apr(tmp_path / "x.apr", {}, [("t", 3, (3,), b"\0" * 8)])


# --- corruption ----------------------------------------------------------------------------


def _load_bytes(tmp_path: Path, blob: bytes, verify: bool = True):
    path = tmp_path / "bad.apr"
    path.write_bytes(blob)
    return load_apr(path, verify=verify)


def _index_offset(blob: bytes) -> int:
    return struct.unpack_from("<Q", blob, 24)[0]


def _data_offset(blob: bytes) -> int:
    return struct.unpack_from("<Q", blob, 32)[0]


@pytest.mark.parametrize("where", ["header", "metadata", "index", "data", "footer"])
def test_flipped_byte_is_a_crc_error(tmp_path: Path, golden: bytes, where: str) -> None:
    offset = {
        "header": 9,
        "metadata": 70,
        "index": _index_offset(golden) + 3,
        "data": _data_offset(golden) + 5,
        "footer": len(golden) - 2,
    }[where]
    blob = bytearray(golden)
    blob[offset] ^= 0x10
    with pytest.raises(InvalidFormatError, match="CRC-32 mismatch") as info:
        _load_bytes(tmp_path, bytes(blob))
    assert info.value.exit_code == 4


def test_no_verify_reads_a_file_with_a_damaged_data_byte(tmp_path: Path, golden: bytes) -> None:
    blob = bytearray(golden)
    blob[-3] ^= 0xFF  # the footer
    assert _load_bytes(tmp_path, bytes(blob), verify=False).config.hidden_size == H


def _check_truncations(tmp_path: Path, golden: bytes, cuts) -> None:
    # A fresh file per cut: rewriting one file in place is slow on ext4 (flush on truncate).
    for n in cuts:
        path = tmp_path / f"cut{n}.apr"
        path.write_bytes(golden[:n])
        for verify in (True, False):
            with pytest.raises(InvalidFormatError):
                load_apr(path, verify=verify)
        path.unlink()


def test_truncated_in_the_structural_parts_and_the_tail(tmp_path: Path, golden: bytes) -> None:
    """Every cut through header, metadata, index and the first tensor, and the last 200 bytes."""
    head = range(_data_offset(golden) + 200)
    tail = range(len(golden) - 200, len(golden))
    _check_truncations(tmp_path, golden, [*head, *tail])


@pytest.mark.slow
def test_truncated_at_every_offset(tmp_path: Path, golden: bytes) -> None:
    _check_truncations(tmp_path, golden, range(len(golden)))


def test_unsorted_index(tmp_path: Path) -> None:
    tensors = stored_tensors(hf_weights())
    blob = build_apr(GOLDEN_JSON.encode(), sorted(tensors, reverse=True), sort=False)
    with pytest.raises(InvalidFormatError, match="not sorted"):
        _load_bytes(tmp_path, blob)


def test_duplicate_name_is_unsorted(tmp_path: Path) -> None:
    tensors = stored_tensors(hf_weights())
    blob = build_apr(GOLDEN_JSON.encode(), [tensors[1], tensors[1]], sort=False)
    with pytest.raises(InvalidFormatError, match="not sorted"):
        _load_bytes(tmp_path, blob)


def _edit_first_entry(blob: bytes, field: str, value: int) -> bytes:
    """Set the offset/size/ndim/dtype of the first index entry (and reseal the CRCs)."""
    pos = _index_offset(blob)
    (name_len,) = struct.unpack_from("<H", blob, pos)
    dtype_at = pos + 2 + name_len
    ndim = blob[dtype_at + 1]
    offset_at = dtype_at + 2 + 8 * ndim
    out = bytearray(blob)
    if field == "offset":
        struct.pack_into("<Q", out, offset_at, value)
    elif field == "size":
        struct.pack_into("<Q", out, offset_at + 8, value)
    elif field == "ndim":
        out[dtype_at + 1] = value
    elif field == "dtype":
        out[dtype_at] = value
    return reseal(bytes(out))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("offset", 1 << 62, "past the end"),
        ("size", 1 << 62, "past the end"),
        ("offset", 64, "overlap|bytes"),
        ("ndim", 200, "ndim 200"),
    ],
)
def test_bad_index_entries(tmp_path: Path, golden: bytes, field, value, message) -> None:
    with pytest.raises(InvalidFormatError, match=message):
        _load_bytes(tmp_path, _edit_first_entry(golden, field, value))


def test_overlapping_tensors(tmp_path: Path, golden: bytes) -> None:
    # Point the first tensor (lm_head, 10x8 F32 = 320 bytes) at the second one's bytes.
    with pytest.raises(InvalidFormatError, match="overlap"):
        _load_bytes(tmp_path, _edit_first_entry(golden, "offset", 320))


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "message"),
    [
        (8, "<I", 0xFFFFFFFF, "tensor count"),
        (20, "<I", 0xFFFFFFFF, "16 MiB"),
        (24, "<Q", 1 << 63, "outside the file"),
        (32, "<Q", 1 << 63, "outside the file"),
        (12, "<Q", 8, "overlaps"),
    ],
)
def test_absurd_header_fields(tmp_path: Path, golden: bytes, offset, fmt, value, message) -> None:
    blob = bytearray(golden)
    struct.pack_into(fmt, blob, offset, value)
    with pytest.raises(InvalidFormatError, match=message):
        _load_bytes(tmp_path, reseal(bytes(blob)))


def test_bad_magic_version_and_metadata(tmp_path: Path, golden: bytes) -> None:
    with pytest.raises(InvalidFormatError, match="not an APR"):
        _load_bytes(tmp_path, b"GGUF" + golden[4:])
    with pytest.raises(InvalidFormatError, match="version 3.0"):
        _load_bytes(tmp_path, reseal(golden[:4] + b"\x03" + golden[5:]))
    meta = b"[1,2]"
    with pytest.raises(InvalidFormatError, match="expected an object"):
        _load_bytes(tmp_path, build_apr(meta, stored_tensors(hf_weights())))
    with pytest.raises(InvalidFormatError, match="JSON"):
        _load_bytes(tmp_path, build_apr(b"{\xff", stored_tensors(hf_weights())))


@pytest.mark.parametrize(
    ("flag", "name"),
    [(0x0001, "LZ4"), (0x0002, "ZSTD"), (0x0004, "ENCRYPTED"), (0x0800, "LAYOUT_COLUMN_MAJOR")],
)
def test_unusable_flags_are_named(tmp_path: Path, flag: int, name: str) -> None:
    blob = build_apr(GOLDEN_JSON.encode(), stored_tensors(hf_weights()), flags=ROW_MAJOR | flag)
    with pytest.raises(ModelLoadError, match=name):
        _load_bytes(tmp_path, blob)


def test_wrong_tensor_size_for_its_dtype(tmp_path: Path) -> None:
    tensors = stored_tensors(hf_weights())
    tensors = [
        (n, c, s, r + b"\0" * 4 if n == "model.norm.weight" else r) for n, c, s, r in tensors
    ]
    with pytest.raises(InvalidFormatError, match="model.norm.weight"):
        _load_bytes(tmp_path, build_apr(GOLDEN_JSON.encode(), tensors))


# --- metadata semantics ----------------------------------------------------------------------


def _with_meta(tmp_path: Path, changes: dict, drop=(), arch: str | None = None, tensors=None):
    meta = json.loads(GOLDEN_JSON)
    for key in drop:
        meta.pop(key)
    meta.update(changes)
    blob = build_apr(json.dumps(meta).encode(), tensors or stored_tensors(hf_weights()))
    path = tmp_path / "m.apr"
    path.write_bytes(blob)
    return load_apr(path, arch=arch)


def test_missing_architecture_needs_arch(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no architecture"):
        _with_meta(tmp_path, {"model_type": ""}, drop=["architecture"])
    model = _with_meta(tmp_path, {"model_type": ""}, drop=["architecture"], arch="llama")
    assert model.config.architecture == "llama" and model.qk_permuted


def test_architecture_aliases_and_null_stops_fallback(tmp_path: Path) -> None:
    model = _with_meta(tmp_path, {"model_type": "qwen2", "rope_type": 2}, drop=["architecture"])
    assert model.config.architecture == "qwen2" and not model.qk_permuted
    with pytest.raises(ModelLoadError, match="no architecture"):
        _with_meta(tmp_path, {"architecture": None, "model_type": "llama"})


def test_rope_type_must_agree_with_architecture(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="rope_type 2 disagrees"):
        _with_meta(tmp_path, {"rope_type": 2})
    with pytest.raises(ModelLoadError, match="rope_type 0 disagrees"):
        _with_meta(tmp_path, {"architecture": "qwen2", "rope_type": 0})
    model = _with_meta(tmp_path, {"architecture": "qwen2", "rope_type": None})
    assert not model.qk_permuted


def test_qwen_file_is_hf_layout(tmp_path: Path) -> None:
    weights = hf_weights()
    tensors = [(n, 0, w.shape, w.tobytes()) for n, w in weights.items()]
    model = _with_meta(tmp_path, {"architecture": "qwen2", "rope_type": 2}, tensors=tensors)
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ):
        np.testing.assert_array_equal(model.weight(name), weights[name])


def test_alias_spellings_are_read(tmp_path: Path) -> None:
    changes = {"hidden_dim": 8, "num_hidden_layers": 1, "num_attention_heads": 2}
    model = _with_meta(tmp_path, changes, drop=["hidden_size", "num_layers", "num_heads"])
    assert (model.config.hidden_size, model.config.num_layers, model.config.num_heads) == (8, 1, 2)


def test_gguf_names_and_fused_qkv(tmp_path: Path) -> None:
    weights = hf_weights()
    stored = {n: r for n, _, _, r in stored_tensors(weights)}
    tensors = []
    gguf_names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
        "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
        "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
        "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
        "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
        "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
        "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
    }
    for hf, gg in gguf_names.items():
        code = 1 if "embed" in hf else 0
        tensors.append((gg, code, weights[hf].shape, stored[hf]))
    qkv = b"".join(stored[f"model.layers.0.self_attn.{p}_proj.weight"] for p in ("q", "k", "v"))
    tensors.append(("model.layers.0.self_attn.qkv_proj.weight", 0, ((NH + 2 * NKV) * HD, H), qkv))
    model = _with_meta(tmp_path, {}, tensors=tensors)
    assert set(model.tensors) == set(weights)
    for name, w in weights.items():
        expected = w.astype(np.float16).astype(np.float32) if "embed" in name else w
        np.testing.assert_array_equal(model.weight(name), expected, err_msg=name)


def test_tied_lm_head_copy_is_dropped_and_missing_lm_head_is_tied(tmp_path: Path) -> None:
    weights = hf_weights()
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    tensors = stored_tensors(weights)
    tensors = [(n, 1 if n == "lm_head.weight" else c, s, r) for n, c, s, r in tensors]
    tensors = [
        (n, c, s, weights[n].astype("<f2").tobytes()) if n == "lm_head.weight" else (n, c, s, r)
        for n, c, s, r in tensors
    ]
    model = _with_meta(tmp_path, {"tied_embeddings": True}, tensors=tensors)
    assert model.config.tie_word_embeddings and "lm_head.weight" not in model.tensors
    untied = _with_meta(tmp_path, {"tied_embeddings": False}, tensors=tensors)
    assert not untied.config.tie_word_embeddings and "lm_head.weight" in untied.tensors
    no_head = [t for t in tensors if t[0] != "lm_head.weight"]
    assert _with_meta(tmp_path, {}, tensors=no_head).config.tie_word_embeddings


# --- dtype codes ---------------------------------------------------------------------------


def _entry(code: int, shape: tuple, size: int) -> AprIndexEntry:
    return AprIndexEntry("t", code, shape, 0, size)


def test_ambiguous_dtype_codes_decode_as_aprender_trace_path() -> None:
    assert entry_qtype(_entry(8, (64,), 2 * 34)) == "Q8_0"
    assert entry_qtype(_entry(8, (64,), 2 * 18)) == "APR_Q4"
    assert entry_qtype(_entry(3, (64,), 2 * 20)) == "Q4_1"
    assert entry_qtype(_entry(6, (64,), 2 * 22)) == "Q5_0"
    assert entry_qtype(_entry(7, (64,), 2 * 24)) == "Q5_1"
    assert entry_qtype(_entry(13, (256,), 176)) == "Q5_K"
    assert entry_qtype(_entry(13, (256,), 144)) == "Q4_K"
    assert entry_qtype(_entry(128, (32,), 18)) == "APR_Q4"
    assert entry_qtype(_entry(129, (5,), 9)) == "APR_Q8"
    assert entry_qtype(_entry(30, (5,), 10)) == "BF16"
    with pytest.raises(ModelLoadError, match="I64"):
        entry_qtype(_entry(5, (4,), 32))


def test_apr_native_q4_and_q8_values(tmp_path: Path) -> None:
    """Hand-computed: Q4 block = f16 scale + 16 nibble bytes (low nibbles first), q = nib - 8;
    Q8 = f32 scale + one i8 per value."""
    weights = hf_weights()
    nibbles = np.arange(16, dtype=np.uint8)  # byte j: low nibble j%16, high nibble 0
    nibbles = (nibbles & 0xF) | (((15 - nibbles) & 0xF) << 4)
    q4_block = np.float16(0.5).tobytes() + nibbles.tobytes()
    q4_expected = np.concatenate([np.arange(16) - 8, (15 - np.arange(16)) - 8]) * 0.5
    ints = np.array([-128, -1, 0, 1, 127], dtype=np.int8)
    q8 = np.float32(0.25).tobytes() + ints.tobytes()
    tensors = stored_tensors(weights) + [
        ("extra.q4", 128, (32,), q4_block),
        ("extra.q8", 129, (5,), q8),
        ("extra.q8_legacy", 8, (32,), q4_block),
    ]
    model = _with_meta(tmp_path, {}, tensors=tensors)
    np.testing.assert_array_equal(model.tensors["extra.q4"].load(), q4_expected)
    np.testing.assert_array_equal(model.tensors["extra.q8_legacy"].load(), q4_expected)
    np.testing.assert_array_equal(model.tensors["extra.q8"].load(), ints * np.float32(0.25))


# --- inspect -------------------------------------------------------------------------------


def test_describe_apr(golden_path: Path) -> None:
    info = describe_apr(golden_path)
    assert info["header"]["version"] == "2.0"
    assert info["header"]["flag_names"] == ["LAYOUT_ROW_MAJOR"]
    assert info["header"]["tensor_count"] == 12
    assert info["metadata"]["architecture"] == "llama"
    names = [t["name"] for t in info["tensors"]]
    assert names == sorted(names)
    embed = next(t for t in info["tensors"] if t["name"] == "model.embed_tokens.weight")
    assert embed["dtype_name"] == "F16" and embed["shape"] == [VOCAB, H] and embed["size"] == 160
