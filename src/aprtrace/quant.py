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
import threading
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


def dequantize(
    raw: np.ndarray, qtype: str, n_values: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Decode ``raw`` (bytes of ``n_values`` values of ``qtype``) into a 1-D float32 array.

    ``out`` (1-D float32, ``n_values`` long) is a buffer to decode into, e.g. one reused from
    the previous layer: its pages are already mapped, where a fresh array of a few hundred MB
    costs the kernel a page fault (and zeroing) per 4 KB. It is used when the type decodes in
    place; the result is then ``out`` itself.
    """
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if out is not None and (out.dtype != np.float32 or out.shape != (n_values,)):
        raise ValueError(f"out must be float32 of shape ({n_values},), not {out.dtype} {out.shape}")
    if qtype == "F32":
        _check_size(raw.size, qtype, 4, n_values, 4 * n_values)
        if out is None:
            return raw.view("<f4")[:n_values].astype(np.float32, copy=True)
        np.copyto(out, raw.view("<f4")[:n_values])
        return out
    if qtype == "APR_Q8":
        return _dequantize_apr_q8(raw, n_values)
    kernel = _KERNELS.get(qtype)
    if kernel is None:
        return _dequantize_with_gguf(raw, qtype, n_values)
    block, size = block_geometry(qtype)
    n_blocks = -(-n_values // block)
    _check_size(raw.size, qtype, size, n_values, n_blocks * size)
    blocks = raw[: n_blocks * size].reshape(n_blocks, size)
    if out is None or n_values != n_blocks * block:
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


def _n_helpers() -> int:
    """Threads that help the calling thread decode: one per extra core, at most three."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(3, (cores or 1) - 1)


@cache
def _helpers() -> ThreadPoolExecutor | None:
    """The shared pool of helper threads, created on first use; None on a single core."""
    n = _n_helpers()
    return ThreadPoolExecutor(n, thread_name_prefix="aprtrace-dequant") if n else None


def _run_chunked(kernel: _Kernel, blocks: np.ndarray, out: np.ndarray, chunk: int) -> None:
    """Run ``kernel`` over row chunks of ``blocks``/``out``, on all cores when worthwhile.

    The calling thread takes chunks too, from the same queue as the helpers, so on a busy
    machine where a helper is not scheduled it does the work itself instead of waiting.
    """
    n = blocks.shape[0]
    starts = iter(range(0, n, chunk))
    lock = threading.Lock()

    def drain() -> None:
        with np.errstate(all="ignore"):  # NaN/Inf scales decode to NaN/Inf, as in ggml
            while True:
                with lock:
                    start = next(starts, None)
                if start is None:
                    return
                kernel(blocks[start : start + chunk], out[start : start + chunk])

    pool = _helpers() if n > chunk else None
    if pool is None:
        drain()
        return
    futures = [pool.submit(drain) for _ in range(min(_n_helpers(), n // chunk))]
    drain()
    for future in futures:
        future.result()


# --- kernels --------------------------------------------------------------------------------
# Each mirrors the formula of the same-named class in gguf-py's quants.py: f16 scales are
# widened to f32 first, integer parts are formed exactly, then the float32 products and sums
# are taken in gguf-py's order (which is ggml's), so every rounding step is the same.


_F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
"""Every f16 bit pattern widened by NumPy's own cast (as gguf-py does): a table lookup is faster
than the cast (much faster on NaN/subnormal patterns) and gives the same bits by construction."""

_BYTE_MASKS = {1: 0x01, 2: 0x03, 4: 0x0F}


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The f16 field at byte ``start`` of each block, widened to f32, shape (n, 1).

    Through the table of every f16 pattern (the same bits as the cast, several times faster
    on the strided scale column, and without the cast's slow path on subnormals and NaN)."""
    return _F16_TO_F32[blocks[:, start : start + 2].view(np.uint16)]


def _bit_fields(fields: np.ndarray, width: int, count: int) -> np.ndarray:
    """Split bytes into ``width``-bit fields: ``(byte >> width * i) & mask`` for ``i < count``.

    ``fields`` is (n, g, m) bytes, m a multiple of 8; the result is (n, g, count, m) uint8 with
    field ``i`` of byte ``[b, j, l]`` at ``[b, j, i, l]``. It works on 8-byte words, so each
    NumPy call handles eight bytes per element.
    """
    n, g, m = fields.shape
    words = np.ascontiguousarray(fields).view(np.uint64)
    out = np.empty((n, g, count, m // 8), dtype=np.uint64)
    for i in range(count):
        np.right_shift(words, np.uint64(width * i), out=out[:, :, i])
    np.bitwise_and(out, np.uint64(_BYTE_MASKS[width] * 0x0101010101010101), out=out)
    return out.view(np.uint8).reshape(n, g, count, m)


def _f16_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    np.take(_F16_TO_F32, blocks.view(np.uint16).reshape(-1), out=out.reshape(-1), mode="clip")


def _bf16_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    # gguf-py sign-extends then shifts left by 16; the extension bits are shifted out.
    bits = out.view(np.uint32)
    np.copyto(bits, blocks.view(np.uint16))
    np.left_shift(bits, 16, out=bits)


def _q8_0_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    d = _f16(blocks, 0)
    np.copyto(out, blocks[:, 2:].view(np.int8))
    np.multiply(out, d, out=out)  # x * d


def _q4_values(qs: np.ndarray, out: np.ndarray, offset: int = 0) -> None:
    """The 32 nibbles of each 16-byte ``qs`` row (low ones first), minus ``offset``, into
    ``out`` as float32; the subtraction is exact, done in int8."""
    q = _bit_fields(qs.reshape(-1, 1, 16), 4, 2).reshape(-1, 32)
    if offset:
        np.subtract(q, offset, out=q)  # wraps to the int8 value
    np.copyto(out, q.view(np.int8) if offset else q)


def _q4_0_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    d = _f16(blocks, 0)
    _q4_values(blocks[:, 2:], out, offset=8)
    np.multiply(d, out, out=out)  # d * q


def _q4_1_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    _q4_values(blocks[:, 4:], out)
    np.multiply(d, out, out=out)  # (d * q) + m
    np.add(out, m, out=out)


def _q5_values(qh: np.ndarray, qs: np.ndarray, out: np.ndarray, offset: int = 0) -> None:
    """The 5-bit values of Q5_0/Q5_1 blocks minus ``offset`` into ``out``: nibbles of ``qs``,
    bit 4 from ``qh``."""
    q = _bit_fields(qs.reshape(-1, 1, 16), 4, 2).reshape(-1, 32)
    high = np.unpackbits(qh, axis=1, bitorder="little")  # bit j of the little-endian u32
    np.left_shift(high, 4, out=high)
    np.bitwise_or(q, high, out=q)
    if offset:
        np.subtract(q, offset, out=q)  # wraps to the int8 value
    np.copyto(out, q.view(np.int8) if offset else q)


def _q5_0_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    d = _f16(blocks, 0)
    _q5_values(blocks[:, 2:6], blocks[:, 6:], out, offset=16)
    np.multiply(d, out, out=out)  # d * q


def _q5_1_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    _q5_values(blocks[:, 4:8], blocks[:, 8:], out)
    np.multiply(d, out, out=out)  # (d * q) + m
    np.add(out, m, out=out)


def _q2_k_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    n = blocks.shape[0]
    scales = blocks[:, :16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = d * (scales & 0x0F).astype(np.float32)
    ml = dmin * (scales >> 4).astype(np.float32)
    out16 = out.reshape(n, 16, 16)
    np.copyto(out16, _bit_fields(blocks[:, 16:80].reshape(n, 2, 32), 2, 4).reshape(n, 16, 16))
    np.multiply(dl.reshape(n, 16, 1), out16, out=out16)  # dl * q - ml
    np.subtract(out16, ml.reshape(n, 16, 1), out=out16)


def _q3_k_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    n = blocks.shape[0]
    packed = blocks[:, 96:108]
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
    # value = 2-bit low part, minus 4 where the hmask bit is clear; formed exactly in int8.
    q = _bit_fields(blocks[:, 32:96].reshape(n, 2, 32), 2, 4).reshape(n, 256)
    missing = _bit_fields(np.invert(blocks[:, :32]).reshape(n, 1, 32), 1, 8).reshape(n, 256)
    np.left_shift(missing, 2, out=missing)
    np.subtract(q, missing, out=q)  # wraps to the int8 value
    out16 = out.reshape(n, 16, 16)
    np.copyto(out16, q.view(np.int8).reshape(n, 16, 16))
    np.multiply(dl.reshape(n, 16, 1), out16, out=out16)  # dl * q


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and mins of a Q4_K/Q5_K block, as float32 (n, 8) each."""
    words = np.ascontiguousarray(packed).view(np.uint32)  # (n, 3): d, m, m_d; 4 fields each
    d, m, m_d = words[:, 0], words[:, 1], words[:, 2]
    fields = np.empty((packed.shape[0], 4), dtype=np.uint32)  # scales 0-3, 4-7, mins 0-3, 4-7
    np.bitwise_and(d, 0x3F3F3F3F, out=fields[:, 0])
    fields[:, 1] = (m_d & 0x0F0F0F0F) | ((d >> 2) & 0x30303030)
    np.bitwise_and(m, 0x3F3F3F3F, out=fields[:, 2])
    fields[:, 3] = ((m_d >> 4) & 0x0F0F0F0F) | ((m >> 2) & 0x30303030)
    both = fields.view(np.uint8).astype(np.float32)
    return both[:, :8], both[:, 8:]


def _k_affine(blocks: np.ndarray, q: np.ndarray, out: np.ndarray) -> None:
    """out = (d * sc) * q - (dmin * m) per 32-value sub-block, as gguf-py's Q4_K/Q5_K."""
    n = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dsc = _f16(blocks, 0) * sc
    dm = _f16(blocks, 2) * mn
    out8 = out.reshape(n, 8, 32)
    np.copyto(out8, q.reshape(n, 8, 32))
    np.multiply(dsc.reshape(n, 8, 1), out8, out=out8)
    np.subtract(out8, dm.reshape(n, 8, 1), out=out8)


def _q4_k_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    n = blocks.shape[0]
    _k_affine(blocks, _bit_fields(blocks[:, 16:].reshape(n, 4, 32), 4, 2), out)


def _q5_k_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    n = blocks.shape[0]
    q = _bit_fields(blocks[:, 48:].reshape(n, 4, 32), 4, 2).reshape(n, 256)
    high = _bit_fields(blocks[:, 16:48].reshape(n, 1, 32), 1, 8).reshape(n, 256)
    np.left_shift(high, 4, out=high)  # sub-block k takes bit k of each qh byte as its bit 4
    np.bitwise_or(q, high, out=q)
    _k_affine(blocks, q, out)


def _q6_k_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    n = blocks.shape[0]
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    dsc = _f16(blocks, 208) * scales
    # value index = half * 128 + k * 32 + l: nibble (k // 2) of ql[half * 64 + (k % 2) * 32 + l],
    # with bits (2k, 2k + 1) of qh[half * 32 + l] on top.
    q = _bit_fields(blocks[:, :128].reshape(n, 2, 64), 4, 2).reshape(n, 256)
    high = _bit_fields(blocks[:, 128:192].reshape(n, 2, 32), 2, 4).reshape(n, 256)
    np.left_shift(high, 4, out=high)
    np.bitwise_or(q, high, out=q)
    np.subtract(q, 32, out=q)  # wraps to the int8 value q - 32
    out16 = out.reshape(n, 16, 16)
    np.copyto(out16, q.view(np.int8).reshape(n, 16, 16))
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
