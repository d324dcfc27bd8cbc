"""Dequantization of block-quantized tensors to float32.

``qtype`` names are GGML type names (``"F32"``, ``"Q4_K"``, ...) plus the APR-native
``"APR_Q4"`` and ``"APR_Q8"``. Decoding defers to ``gguf.quants`` (bit-exact with ggml).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from aprtrace.errors import ModelLoadError


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
    block, size = block_geometry(qtype)
    if row_len % block:
        raise ModelLoadError(f"row length {row_len} is not a multiple of the {qtype} block {block}")
    return row_len // block * size


def dequantize(raw: np.ndarray, qtype: str, n_values: int) -> np.ndarray:
    """Decode ``raw`` (bytes of ``n_values`` values of ``qtype``) into a 1-D float32 array."""
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if qtype == "F32":
        return raw.view("<f4")[:n_values].astype(np.float32, copy=True)
    if qtype == "F16":
        return raw.view("<f2")[:n_values].astype(np.float32)
    if qtype == "BF16":
        return (raw.view("<u2")[:n_values].astype(np.uint32) << 16).view(np.float32)
    if qtype == "APR_Q4":
        return _dequantize_apr_q4(raw, n_values)
    try:
        gtype = GGMLQuantizationType[qtype]
    except KeyError:
        raise ModelLoadError(f"unknown tensor type {qtype}") from None
    try:
        out = gguf_quants.dequantize(raw, gtype)
    except NotImplementedError:
        raise ModelLoadError(f"tensor type {qtype} cannot be dequantized") from None
    return np.asarray(out, dtype=np.float32).reshape(-1)[:n_values]


def _dequantize_apr_q4(raw: np.ndarray, n_values: int) -> np.ndarray:
    """APR-native Q4: per 32 values an f16 scale and 16 bytes of nibbles, q = nibble - 8."""
    blocks = raw[: (raw.size // 18) * 18].reshape(-1, 18)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)
    nib = blocks[:, 2:]
    lo = (nib & 0x0F).astype(np.int8) - 8
    hi = (nib >> 4).astype(np.int8) - 8
    q = np.concatenate([lo, hi], axis=1).astype(np.float32)
    return (q * scale).reshape(-1)[:n_values]
