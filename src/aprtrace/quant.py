"""Dequantization of block-quantized tensors to float32.

``qtype`` names are GGML type names (``"F32"``, ``"Q4_K"``, ...) plus the APR-native
``"APR_Q4"`` and ``"APR_Q8"``.

The common GGML types have their own NumPy kernels here. Each kernel decodes a chunk of whole
blocks straight into its slice of one preallocated float32 output, and chunks run on a small
thread pool (NumPy releases the GIL inside ufuncs), so decoding is several times faster than
``gguf.quants.dequantize`` and needs no transient copy of the output. Every kernel performs
the same float32 operations, in the same order and with the same operands, as gguf-py's NumPy
code (itself bit-exact with ggml's reference C), so the output is bit for bit identical,
NaN payloads included; ``tests/test_quant.py`` checks that against ``gguf.quants``. Every other
GGML type (IQ*, TQ*, MXFP4, ...) is decoded by ``gguf.quants``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from aprtrace.errors import ModelLoadError

# Values decoded per task: the chunk's scratch and output stay in L2, and a 4096x4096 tensor
# still splits into enough tasks to keep both cores busy.
CHUNK_VALUES = 1 << 17

_Kernel = Callable[[np.ndarray, np.ndarray], None]
"""``kernel(blocks, out)``: decode ``blocks`` (n, type_size) uint8 into ``out`` (n, block)."""


def block_geometry(qtype: str) -> tuple[int, int]:
    """``(values per block, bytes per block)`` of a type."""
    if qtype == "APR_Q4":
        return 32, 18
    if qtype == "APR_Q8":
        raise ModelLoadError("APR_Q8 has no fixed block geometry")
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    except KeyError:
        raise ModelLoadError(f"unknown tensor type {qtype}") from None


def row_bytes(qtype: str, row_len: int) -> int:
    """Bytes of one row of ``row_len`` values of ``qtype``."""
    block, size = block_geometry(qtype)
    if row_len % block:
        raise ModelLoadError(f"row length {row_len} is not a multiple of the {qtype} block {block}")
    return row_len // block * size


def dequantize(raw: np.ndarray, qtype: str, n_values: int) -> np.ndarray:
    """Decode ``raw`` (bytes of ``n_values`` values of ``qtype``) into a 1-D float32 array."""
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if qtype == "F32":
        _check_size(raw.size, qtype, 4, n_values, 4)
        return raw.view("<f4")[:n_values].astype(np.float32, copy=True)
    if qtype == "APR_Q8":
        return _dequantize_apr_q8(raw, n_values)
    kernel = _KERNELS.get(qtype)
    if kernel is None:
        return _dequantize_with_gguf(raw, qtype, n_values)
    block, size = block_geometry(qtype)
    n_blocks = -(-n_values // block)
    _check_size(raw.size, qtype, size, n_values, n_blocks * size)
    blocks = raw[: n_blocks * size].reshape(n_blocks, size)
    out = np.empty(n_blocks * block, dtype=np.float32)
    _run_chunked(kernel, blocks, out.reshape(n_blocks, block), max(1, CHUNK_VALUES // block))
    return out[:n_values]


def _check_size(n_bytes: int, qtype: str, unit: int, n_values: int, needed: int) -> None:
    if n_bytes % unit:
        raise ModelLoadError(
            f"{n_bytes} bytes of {qtype} data is not a whole number of {unit}-byte blocks",
            hint="the file is truncated or the tensor's type or offset is wrong",
        )
    if n_bytes < needed:
        raise ModelLoadError(
            f"{n_bytes} bytes of {qtype} data hold fewer than the {n_values} values expected "
            f"({needed} bytes)",
            hint="the file is truncated or the tensor's shape is wrong",
        )


def _dequantize_with_gguf(raw: np.ndarray, qtype: str, n_values: int) -> np.ndarray:
    try:
        gtype = GGMLQuantizationType[qtype]
    except KeyError:
        raise ModelLoadError(f"unknown tensor type {qtype}") from None
    block, size = GGML_QUANT_SIZES[gtype]
    _check_size(raw.size, qtype, size, n_values, -(-n_values // block) * size)
    try:
        with np.errstate(all="ignore"):
            out = gguf_quants.dequantize(raw, gtype)
    except NotImplementedError:
        raise ModelLoadError(f"tensor type {qtype} cannot be dequantized") from None
    return np.asarray(out, dtype=np.float32).reshape(-1)[:n_values]


def _dequantize_apr_q8(raw: np.ndarray, n_values: int) -> np.ndarray:
    """APR-native Q8: one f32 scale, then one i8 per value; value = i8 * scale."""
    if raw.size < 4 + n_values:
        raise ModelLoadError(
            f"{raw.size} bytes of APR_Q8 data hold fewer than the {n_values} values expected "
            f"({4 + n_values} bytes: an f32 scale and one byte per value)",
            hint="the file is truncated or the tensor's shape is wrong",
        )
    scale = raw[:4].copy().view("<f4").astype(np.float32)
    values = raw[4 : 4 + n_values].view(np.int8).reshape(n_values, 1)
    out = np.empty(n_values, dtype=np.float32)

    def kernel(q: np.ndarray, dst: np.ndarray) -> None:
        np.multiply(q, scale, out=dst)

    _run_chunked(kernel, values, out.reshape(n_values, 1), CHUNK_VALUES)
    return out


# --- scheduling -----------------------------------------------------------------------------


@cache
def _pool() -> ThreadPoolExecutor | None:
    """The shared decoding pool, or None on a single core."""
    workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    return ThreadPoolExecutor(workers, thread_name_prefix="aprtrace-dequant") if workers > 1 else None


def _run_chunked(kernel: _Kernel, blocks: np.ndarray, out: np.ndarray, chunk: int) -> None:
    """Run ``kernel`` over row chunks of ``blocks``/``out``, in parallel when worthwhile."""
    n = blocks.shape[0]
    spans = [(i, min(i + chunk, n)) for i in range(0, n, chunk)]

    def work(span: tuple[int, int]) -> None:
        with np.errstate(all="ignore"):  # NaN/Inf scales decode to NaN/Inf, as in ggml
            kernel(blocks[span[0] : span[1]], out[span[0] : span[1]])

    pool = _pool() if len(spans) > 1 else None
    if pool is None:
        for span in spans:
            work(span)
        return
    for future in [pool.submit(work, span) for span in spans]:
        future.result()


# --- kernels --------------------------------------------------------------------------------
# Each mirrors the formula of the same-named class in gguf-py's quants.py: f16 scales are
# widened to f32 first, integer parts are formed exactly, then the float32 products and sums
# are taken in gguf-py's order (which is ggml's), so every rounding step is the same.


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The f16 field at byte ``start`` of each block, widened to f32, shape (n, 1)."""
    return blocks[:, start : start + 2].view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, dst: np.ndarray) -> None:
    """Low nibbles of ``qs`` (n, k, m) into ``dst[:, :, 0]``, high ones into ``dst[:, :, 1]``."""
    np.bitwise_and(qs, 0x0F, out=dst[:, :, 0])
    np.right_shift(qs, 4, out=dst[:, :, 1])


def _high_bits(bits: np.ndarray, bit: int, width: int, dst: np.ndarray, tmp: np.ndarray) -> None:
    """OR ``((bits >> bit) & mask(width)) << 4`` into ``dst``."""
    if bit <= 4:
        np.left_shift(bits, 4 - bit, out=tmp)
    else:
        np.right_shift(bits, bit - 4, out=tmp)
    np.bitwise_and(tmp, ((1 << width) - 1) << 4, out=tmp)
    np.bitwise_or(dst, tmp, out=dst)


def _f16_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, blocks.view(np.float16))


def _bf16_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    # gguf-py sign-extends then shifts left by 16; the extension bits are shifted out.
    bits = out.view(np.uint32)
    np.copyto(bits, blocks.view(np.uint16))
    np.left_shift(bits, 16, out=bits)


def _q8_0_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    d = _f16(blocks, 0)
    np.multiply(blocks[:, 2:].view(np.int8), d, out=out)  # x * d


def _q4_0_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    q = np.empty((n, 1, 2, 16), dtype=np.uint8)
    _nibbles(blocks[:, 2:].reshape(n, 1, 16), q)
    np.subtract(q.reshape(n, 32), np.float32(8), out=out)  # exact: nibble - 8
    np.multiply(d, out, out=out)  # d * q


def _q4_1_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    n = blocks.shape[0]
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = np.empty((n, 1, 2, 16), dtype=np.uint8)
    _nibbles(blocks[:, 4:].reshape(n, 1, 16), q)
    np.multiply(d, q.reshape(n, 32), out=out)  # (d * q) + m
    np.add(out, m, out=out)


def _q5_values(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """The 5-bit values (n, 32) of Q5_0/Q5_1 blocks: low nibbles from ``qs``, bit 4 from ``qh``."""
    n = qs.shape[0]
    q = np.empty((n, 1, 2, 16), dtype=np.uint8)
    _nibbles(qs.reshape(n, 1, 16), q)
    q = q.reshape(n, 32)
    high = np.unpackbits(qh, axis=1, bitorder="little")  # bit j of the little-endian u32
    np.left_shift(high, 4, out=high)
    np.bitwise_or(q, high, out=q)
    return q


def _q5_0_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    d = _f16(blocks, 0)
    np.subtract(_q5_values(blocks[:, 2:6], blocks[:, 6:]), np.float32(16), out=out)
    np.multiply(d, out, out=out)  # d * q


def _q5_1_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    np.multiply(d, _q5_values(blocks[:, 4:8], blocks[:, 8:]), out=out)  # (d * q) + m
    np.add(out, m, out=out)


def _q2_k_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    n = blocks.shape[0]
    scales = blocks[:, :16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = d * (scales & 0x0F).astype(np.float32)
    ml = dmin * (scales >> 4).astype(np.float32)
    qs = blocks[:, 16:80].reshape(n, 2, 32)
    q = np.empty((n, 2, 4, 32), dtype=np.uint8)
    for k in range(4):
        np.right_shift(qs, 2 * k, out=q[:, :, k])
    np.bitwise_and(q, 3, out=q)
    out16 = out.reshape(n, 16, 16)
    np.multiply(dl.reshape(n, 16, 1), q.reshape(n, 16, 16), out=out16)  # dl * q - ml
    np.subtract(out16, ml.reshape(n, 16, 1), out=out16)


def _q3_k_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    n = blocks.shape[0]
    hmask, qs, packed = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks, 108)
    # 16 six-bit scales: low nibbles from bytes 0..7, top two bits from bytes 8..11.
    sc = np.empty((n, 16), dtype=np.uint8)
    np.bitwise_and(packed[:, :8], 0x0F, out=sc[:, :8])
    np.right_shift(packed[:, :8], 4, out=sc[:, 8:])
    high = np.empty((n, 4, 4), dtype=np.uint8)
    for s in range(4):
        np.right_shift(packed[:, 8:], 2 * s, out=high[:, s])
    np.bitwise_and(high, 3, out=high)
    np.left_shift(high, 4, out=high)
    np.bitwise_or(sc, high.reshape(n, 16), out=sc)
    dl = d * (sc.view(np.int8) - np.int8(32)).astype(np.float32)
    # value = 2-bit low part - 4 where the hmask bit is clear; formed exactly in int8.
    q = np.empty((n, 2, 4, 32), dtype=np.uint8)
    qs2 = qs.reshape(n, 2, 32)
    for s in range(4):
        np.right_shift(qs2, 2 * s, out=q[:, :, s])
    np.bitwise_and(q, 3, out=q)
    q8 = q.reshape(n, 8, 32)
    missing = np.invert(hmask)
    tmp = np.empty((n, 32), dtype=np.uint8)
    for k in range(8):
        if k <= 2:
            np.left_shift(missing, 2 - k, out=tmp)
        else:
            np.right_shift(missing, k - 2, out=tmp)
        np.bitwise_and(tmp, 4, out=tmp)
        np.subtract(q8[:, k], tmp, out=q8[:, k])  # wraps to the int8 value
    out16 = out.reshape(n, 16, 16)
    np.multiply(dl.reshape(n, 16, 1), q.view(np.int8).reshape(n, 16, 16), out=out16)  # dl * q


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and mins of a Q4_K/Q5_K block, as float32 (n, 8) each."""
    d, m, m_d = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    n = packed.shape[0]
    sc = np.empty((n, 8), dtype=np.uint8)
    mn = np.empty((n, 8), dtype=np.uint8)
    np.bitwise_and(d, 0x3F, out=sc[:, :4])
    sc[:, 4:] = (m_d & 0x0F) | ((d >> 2) & 0x30)
    np.bitwise_and(m, 0x3F, out=mn[:, :4])
    mn[:, 4:] = (m_d >> 4) | ((m >> 2) & 0x30)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_affine(blocks: np.ndarray, q: np.ndarray, out: np.ndarray) -> None:
    """out = (d * sc) * q - (dmin * m) per 32-value sub-block, as gguf-py's Q4_K/Q5_K."""
    n = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dsc = _f16(blocks, 0) * sc
    dm = _f16(blocks, 2) * mn
    out8 = out.reshape(n, 8, 32)
    np.multiply(dsc.reshape(n, 8, 1), q.reshape(n, 8, 32), out=out8)
    np.subtract(out8, dm.reshape(n, 8, 1), out=out8)


def _q4_k_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    n = blocks.shape[0]
    q = np.empty((n, 4, 2, 32), dtype=np.uint8)
    _nibbles(blocks[:, 16:].reshape(n, 4, 32), q)
    _k_affine(blocks, q, out)


def _q5_k_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    n = blocks.shape[0]
    qh = blocks[:, 16:48]
    q = np.empty((n, 4, 2, 32), dtype=np.uint8)
    _nibbles(blocks[:, 48:].reshape(n, 4, 32), q)
    q8 = q.reshape(n, 8, 32)
    tmp = np.empty((n, 32), dtype=np.uint8)
    for k in range(8):  # sub-block k takes bit k of each qh byte as its bit 4
        _high_bits(qh, k, 1, q8[:, k], tmp)
    _k_affine(blocks, q, out)


def _q6_k_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 2, 32)
    qh = blocks[:, 128:192].reshape(n, 2, 32)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    dsc = _f16(blocks, 208) * scales
    # value index = half * 128 + k * 32 + l: nibble (k // 2) of ql[half, k % 2, l], and
    # bits (2k, 2k + 1) of qh[half, l] on top.
    q = np.empty((n, 2, 4, 32), dtype=np.uint8)
    np.bitwise_and(ql, 0x0F, out=q[:, :, 0:2])
    np.right_shift(ql, 4, out=q[:, :, 2:4])
    tmp = np.empty((n, 2, 32), dtype=np.uint8)
    for k in range(4):
        _high_bits(qh, 2 * k, 2, q[:, :, k], tmp)
    out16 = out.reshape(n, 16, 16)
    np.subtract(q.reshape(n, 16, 16), np.float32(32), out=out16)  # exact: q - 32
    np.multiply(dsc.reshape(n, 16, 1), out16, out=out16)  # (d * scale) * q


_KERNELS: dict[str, _Kernel] = {
    "F16": _f16_kernel,
    "BF16": _bf16_kernel,
    "Q4_0": _q4_0_kernel,
    "APR_Q4": _q4_0_kernel,  # same bytes as Q4_0: f16 scale, 16 bytes of nibbles, q = nib - 8
    "Q4_1": _q4_1_kernel,
    "Q5_0": _q5_0_kernel,
    "Q5_1": _q5_1_kernel,
    "Q8_0": _q8_0_kernel,
    "Q2_K": _q2_k_kernel,
    "Q3_K": _q3_k_kernel,
    "Q4_K": _q4_k_kernel,
    "Q5_K": _q5_k_kernel,
    "Q6_K": _q6_k_kernel,
}
