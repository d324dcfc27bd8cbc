"""Shared float32 kernels of the decoder forward passes: norms, RoPE, attention, activations.

Every architecture module composes these; none of them knows about stages or files. Inputs
and outputs are token-major (``[seq, ...]``); attention maps are ``[heads, queries, keys]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

# Up to this many tokens the matmuls run on one BLAS thread (see one_blas_thread).
SHORT_PROMPT = 64


@contextlib.contextmanager
def one_blas_thread(enabled: bool = True) -> Iterator[None]:
    """Run BLAS on one thread while ``enabled``; restore it afterwards.

    A short prompt's matmuls have only ``seq`` rows, too small to gain from a second BLAS
    thread, and OpenBLAS threads spin after each call, taking the cores the dequantization
    pool needs: one thread makes the SmolLM2 pass about 4x cheaper in CPU time. The results
    are the same bits (OpenBLAS splits the output between threads, not the sums).
    """
    if not enabled:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis, in float32."""
    variance = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    return (x * (np.float32(1.0) / np.sqrt(variance + np.float32(eps)))) * weight


def rope_tables(
    positions: np.ndarray,
    head_dim: int,
    theta: float,
    freq_divisors: np.ndarray | None = None,
    linear_factor: float = 1.0,
    rotary_dim: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin ``[len(positions), rotary_dim/2]`` (computed in f64, stored f32).

    ``freq_divisors`` (Llama 3 ``rope_freqs``) divide each frequency; ``linear_factor``
    divides the positions (linear RoPE scaling); ``rotary_dim`` (default ``head_dim``) is the
    number of rotated channels (partial rotary).
    """
    dim = head_dim if rotary_dim is None else rotary_dim
    half = dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(half, dtype=np.float64) * 2.0 / dim))
    if freq_divisors is not None:
        inv_freq = inv_freq / np.asarray(freq_divisors, dtype=np.float64)
    pos = np.asarray(positions, dtype=np.float64) / linear_factor
    angles = pos[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NeoX split-half rotation of ``x`` ``[seq, heads, head_dim]`` (Hugging Face layout).

    When the tables cover fewer channels than ``head_dim`` (partial rotary), only the first
    ``2 * cos.shape[-1]`` channels rotate; the rest pass through.
    """
    rot = 2 * cos.shape[-1]
    if rot < x.shape[-1]:
        return np.concatenate([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], axis=-1)
    half = rot // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (no mask), max-shifted."""
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (``gelu_pytorch_tanh``), in float32."""
    c = np.float32(np.sqrt(2.0 / np.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x**3)))


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ weight.T (+ bias)`` for ``weight`` in ``[out, in]`` layout."""
    y = x @ weight.T
    return y if bias is None else y + bias


def softcap(x: np.ndarray, cap: float | None) -> np.ndarray:
    """``cap * tanh(x / cap)`` (Gemma 2 soft-capping); identity when ``cap`` is None."""
    if not cap:
        return x
    c = np.float32(cap)
    return np.tanh(x / c) * c


def attention_mask(q_pos: np.ndarray, k_pos: np.ndarray, window: int | None = None) -> np.ndarray:
    """``[queries, keys]`` True where a query may attend a key: causal, within ``window``."""
    q = np.asarray(q_pos)[:, None]
    k = np.asarray(k_pos)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= (q - k) < window
    return allowed


def attention_scores(
    q: np.ndarray,
    k: np.ndarray,
    scale: float,
    mask: np.ndarray,
    cap: float | None = None,
) -> np.ndarray:
    """``q.k * scale`` ``[heads, queries, keys]`` with GQA; masked entries are 0.

    ``q`` is ``[queries, heads, d]``, ``k`` ``[keys, kv_heads, d]``; query head h reads kv
    head ``h // (heads / kv_heads)``. ``cap`` soft-caps the scores (Gemma 2).
    """
    group = q.shape[1] // k.shape[1]
    q_heads = q.transpose(1, 0, 2)  # [heads, queries, d]
    k_heads = np.repeat(k.transpose(1, 0, 2), group, axis=0)
    scores = softcap((q_heads @ k_heads.transpose(0, 2, 1)) * np.float32(scale), cap)
    return np.where(mask, scores, np.float32(0.0))


def masked_softmax(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Softmax over the allowed keys of ``[heads, queries, keys]``; masked entries are 0."""
    shifted = scores - np.max(np.where(mask, scores, -np.inf), axis=-1, keepdims=True)
    weights = np.where(mask, np.exp(np.where(mask, shifted, 0.0)), np.float32(0.0))
    # Re-mask after dividing: a NaN row sum must not turn the masked zeros into NaN.
    return np.where(mask, weights / np.sum(weights, axis=-1, keepdims=True), np.float32(0.0))


def attend(probs: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``probs . V`` in token-major ``[queries, heads*d]``; ``v`` is ``[keys, kv_heads, d]``."""
    heads = probs.shape[0]
    group = heads // v.shape[1]
    v_heads = np.repeat(v.transpose(1, 0, 2), group, axis=0)
    out = probs @ v_heads  # [heads, queries, d]
    return out.transpose(1, 0, 2).reshape(probs.shape[1], heads * v.shape[2])
