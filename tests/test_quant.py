"""aprtrace.quant decodes bit for bit like gguf-py's reference NumPy code (ggml's formulas)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from aprtrace import quant
from aprtrace.errors import ModelLoadError

FAST_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
              "F16", "BF16"]  # fmt: skip

# Byte offsets of the f16 scale fields inside one block (from ggml's block structs).
SCALE_OFFSETS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}  # fmt: skip

# f16 bit patterns: quiet and signalling NaNs with payloads and both signs, infinities,
# signed zeros, the smallest subnormal, the largest finite value.
SPECIAL_F16 = [0x7E00, 0x7E01, 0xFE55, 0x7C01, 0x7D23, 0xFC02, 0x7C00, 0xFC00, 0x0000, 0x8000,
               0x0001, 0x7BFF]  # fmt: skip


def reference(raw: np.ndarray, qtype: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with np.errstate(all="ignore"):
            out = gguf_quants.dequantize(raw, GGMLQuantizationType[qtype])
    return np.asarray(out, dtype=np.float32).reshape(-1)


def assert_bit_identical(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.ndim == 1
    assert ours.shape == ref.shape
    mismatch = np.flatnonzero(ours.view(np.uint32) != ref.view(np.uint32))
    assert mismatch.size == 0, (
        f"{mismatch.size} values differ, first at {mismatch[0]}: "
        f"{ours.view(np.uint32)[mismatch[0]]:#010x} != {ref.view(np.uint32)[mismatch[0]]:#010x}"
    )


def geometry(qtype: str) -> tuple[int, int]:
    return GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]


def random_blocks(qtype: str, n_blocks: int, seed: int, sane_scales: bool = True) -> np.ndarray:
    """Random block bytes; with ``sane_scales`` the f16 scales are finite values in [-2, 2]."""
    rng = np.random.default_rng(seed)
    _, size = geometry(qtype)
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    if sane_scales:
        for offset in SCALE_OFFSETS.get(qtype, []):
            scales = rng.uniform(-2, 2, n_blocks).astype(np.float16)
            blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of a few blocks, so small tensors exercise the threaded multi-chunk path."""
    monkeypatch.setattr(quant, "CHUNK_VALUES", 256)


@pytest.mark.parametrize("qtype", FAST_TYPES)
@pytest.mark.parametrize("sane_scales", [True, False], ids=["sane-scales", "raw-random"])
def test_random_blocks_bit_identical_to_gguf(qtype: str, sane_scales: bool) -> None:
    block, _ = geometry(qtype)
    n_blocks = 3 * (quant.CHUNK_VALUES // block) + 7  # several chunks plus a partial one
    raw = random_blocks(qtype, n_blocks, seed=len(qtype) * 7 + sane_scales, sane_scales=sane_scales)
    assert_bit_identical(quant.dequantize(raw, qtype, n_blocks * block), reference(raw, qtype))


@pytest.mark.parametrize("qtype", sorted(SCALE_OFFSETS))
def test_special_scale_values_bit_identical(qtype: str, small_chunks: None) -> None:
    """NaN (payloads, signalling), Inf, -0, subnormal scales: every field, every pairing."""
    block, size = geometry(qtype)
    offsets = SCALE_OFFSETS[qtype]
    specials = np.array(SPECIAL_F16, dtype=np.uint16)
    # All pairs of specials for two-scale types, each special alone otherwise.
    combos = np.stack(np.meshgrid(*[specials] * len(offsets)), axis=-1).reshape(-1, len(offsets))
    raw = random_blocks(qtype, len(combos), seed=5).reshape(len(combos), size)
    for j, offset in enumerate(offsets):
        raw[:, offset : offset + 2] = combos[:, j].copy().view(np.uint8).reshape(-1, 2)
    raw = raw.reshape(-1)
    ours = quant.dequantize(raw, qtype, len(combos) * block)
    assert_bit_identical(ours, reference(raw, qtype))
    assert np.isnan(ours).any() and np.isinf(ours).any()


def test_f16_every_bit_pattern(small_chunks: None) -> None:
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)
    ours = quant.dequantize(raw, "F16", 1 << 16)
    assert_bit_identical(ours, reference(raw, "F16"))
    assert ours.view(np.uint32)[0x7C01] == 0x7F802000  # signalling NaN payload kept, as NumPy


def test_bf16_every_bit_pattern(small_chunks: None) -> None:
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)
    ours = quant.dequantize(raw, "BF16", 1 << 16)
    assert_bit_identical(ours, reference(raw, "BF16"))
    assert np.array_equal(ours.view(np.uint32) >> 16, np.arange(1 << 16))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16", "F16"])
def test_gguf_quantized_weights_bit_identical(qtype: str, small_chunks: None) -> None:
    """Realistic data: weights quantized by gguf-py, including rows of zeros and outliers."""
    rng = np.random.default_rng(11)
    weights = rng.standard_normal((12, 256)).astype(np.float32) * 0.05
    weights[3] = 0.0
    weights[5, ::17] = 40.0
    raw = np.asarray(gguf_quants.quantize(weights, GGMLQuantizationType[qtype]))
    raw = raw.view(np.uint8).reshape(-1)
    ours = quant.dequantize(raw, qtype, weights.size)
    assert_bit_identical(ours, reference(raw, qtype))
    assert np.abs(ours - weights.reshape(-1)).max() < 2.0  # it really decodes these weights


@pytest.mark.parametrize("qtype", FAST_TYPES)
def test_partial_rows_match_whole_tensor(qtype: str, small_chunks: None) -> None:
    block, size = geometry(qtype)
    n_blocks = 41
    raw = random_blocks(qtype, n_blocks, seed=3)
    whole = quant.dequantize(raw, qtype, n_blocks * block)
    for first, last in [(0, 1), (5, 6), (7, 30), (40, 41), (0, 41)]:
        part = quant.dequantize(raw[first * size : last * size], qtype, (last - first) * block)
        assert_bit_identical(part, whole[first * block : last * block])


@pytest.mark.parametrize("qtype", ["TQ2_0", "TQ1_0", "IQ4_NL", "MXFP4"])
def test_other_types_use_gguf(qtype: str) -> None:
    block, size = geometry(qtype)
    raw = np.random.default_rng(9).integers(0, 256, 6 * size, dtype=np.uint8)
    raw.reshape(6, size)[:, -2:] = 0x3C  # keep trailing f16 scales (TQ*) finite
    assert_bit_identical(quant.dequantize(raw, qtype, 6 * block), reference(raw, qtype))


def test_f32_is_copied() -> None:
    values = np.array([1.5, -0.0, np.inf, 3.0], dtype=np.float32)
    raw = values.view(np.uint8).copy()
    out = quant.dequantize(raw, "F32", 3)
    assert_bit_identical(out, values[:3])
    raw[:] = 0
    assert out[0] == 1.5


def test_apr_q4_hand_computed() -> None:
    """APR-native Q4: f16 scale then 16 bytes; value j < 16 is low nibble of byte j, minus 8."""
    scale = np.array([0.5], dtype=np.float16).view(np.uint8)
    nibbles = np.array([0x80 | j for j in range(16)], dtype=np.uint8)  # low j, high 8
    raw = np.concatenate([scale, nibbles])
    expected = [(j - 8) * 0.5 for j in range(16)] + [0.0] * 16
    np.testing.assert_array_equal(quant.dequantize(raw, "APR_Q4", 32), expected)
    # A trailing partial block: only the values asked for come back.
    np.testing.assert_array_equal(quant.dequantize(raw, "APR_Q4", 20), expected[:20])


def test_apr_q4_is_q4_0_bytes(small_chunks: None) -> None:
    raw = random_blocks("Q4_0", 50, seed=4)
    assert_bit_identical(quant.dequantize(raw, "APR_Q4", 50 * 32), reference(raw, "Q4_0"))


def test_apr_q8_hand_computed() -> None:
    raw = np.concatenate(
        [
            np.array([0.5], dtype="<f4").view(np.uint8),
            np.array([-128, -1, 0, 1, 127], np.int8).view(np.uint8),
        ]
    )
    np.testing.assert_array_equal(quant.dequantize(raw, "APR_Q8", 5), [-64, -0.5, 0, 0.5, 63.5])


def test_apr_q8_many_chunks(small_chunks: None) -> None:
    rng = np.random.default_rng(6)
    values = rng.integers(-128, 128, 1000).astype(np.int8)
    scale = np.float32(0.0123)
    raw = np.concatenate([np.array([scale], "<f4").view(np.uint8), values.view(np.uint8)])
    assert_bit_identical(quant.dequantize(raw, "APR_Q8", 1000), values.astype(np.float32) * scale)


def test_apr_q8_has_no_block_geometry() -> None:
    with pytest.raises(ModelLoadError, match="APR_Q8"):
        quant.row_bytes("APR_Q8", 64)


@pytest.mark.parametrize("qtype", FAST_TYPES + ["APR_Q4", "TQ2_0"])
def test_ragged_byte_count_is_a_load_error(qtype: str) -> None:
    block, size = quant.block_geometry(qtype)
    raw = np.zeros(3 * size + 1, dtype=np.uint8)
    with pytest.raises(ModelLoadError, match="not a whole number"):
        quant.dequantize(raw, qtype, 3 * block)


@pytest.mark.parametrize("qtype", ["Q4_K", "F16", "TQ2_0", "F32", "APR_Q8"])
def test_too_few_bytes_is_a_load_error(qtype: str) -> None:
    raw = np.zeros(144 * 66, dtype=np.uint8)  # whole blocks of every type here
    with pytest.raises(ModelLoadError, match="fewer than"):
        quant.dequantize(raw, qtype, 10**6)


def test_unknown_and_unsupported_types_are_load_errors() -> None:
    with pytest.raises(ModelLoadError, match="unknown tensor type"):
        quant.dequantize(np.zeros(64, np.uint8), "Q9_9", 16)
    with pytest.raises(ModelLoadError, match="cannot be dequantized"):
        quant.dequantize(np.zeros(40, np.uint8), "Q8_1", 32)


def test_row_bytes() -> None:
    assert quant.row_bytes("Q4_K", 512) == 288
    assert quant.row_bytes("APR_Q4", 64) == 36
    with pytest.raises(ModelLoadError, match="not a multiple"):
        quant.row_bytes("Q4_0", 40)


def test_read_only_memmap_and_unaligned_bytes(tmp_path, small_chunks: None) -> None:
    """Tensors come as slices of a read-only memory map, at any byte offset."""
    raw = random_blocks("Q4_K", 20, seed=8)
    path = tmp_path / "blob.bin"
    path.write_bytes(b"\0" + raw.tobytes())
    mapped = np.memmap(path, dtype=np.uint8, mode="r")[1:]  # odd address: unaligned fields
    assert_bit_identical(quant.dequantize(mapped, "Q4_K", 20 * 256), reference(raw, "Q4_K"))
    f16 = np.memmap(path, dtype=np.uint8, mode="r")[1 : 1 + 2 * 999]
    assert_bit_identical(quant.dequantize(f16, "F16", 999), reference(raw[: 2 * 999], "F16"))


@pytest.mark.parametrize("qtype", [*FAST_TYPES, "F32"])
def test_decoding_into_a_reused_buffer_is_bit_identical(qtype: str, small_chunks: None) -> None:
    if qtype == "F32":
        raw = np.random.default_rng(5).standard_normal(4096).astype(np.float32).view(np.uint8)
        n = 4096
    else:
        raw = random_blocks(qtype, 16, seed=5)
        n = 16 * geometry(qtype)[0]
    fresh = quant.dequantize(raw, qtype, n)
    buffer = np.full(n, np.nan, dtype=np.float32)  # stale contents must not leak through
    into = quant.dequantize(raw, qtype, n, out=buffer)
    assert into is buffer or np.shares_memory(into, buffer)
    assert_bit_identical(into, fresh)
    with pytest.raises(ValueError):
        quant.dequantize(raw, qtype, n, out=np.empty(n - 1, dtype=np.float32))


def test_layers_decode_into_the_buffers_of_the_previous_layer(smollm2_path) -> None:
    from aprtrace.formats import load_model

    model = load_model(smollm2_path)
    name = "model.layers.{}.mlp.up_proj.weight"
    outside = [model.weight(name.format(i)) for i in (0, 1)]
    assert not np.shares_memory(*outside)
    with model.layer_buffers():
        first = model.weight(name.format(0)).copy()
        second = model.weight(name.format(1))
        assert np.shares_memory(second, model.weight(name.format(2)))
        assert not np.shares_memory(second, model.weight("model.norm.weight"))
    np.testing.assert_array_equal(first, outside[0])
    np.testing.assert_array_equal(
        model.weight(name.format(2)), load_model(smollm2_path).weight(name.format(2))
    )
