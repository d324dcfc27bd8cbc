"""Shared float32 kernels of the decoder forward passes: norms, RoPE, attention, activations.

Every architecture module composes these; none of them knows about stages or files. Inputs
and outputs are token-major (``[seq, ...]``); attention maps are ``[heads, queries, keys]``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

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
    with _blas_controller().limit(limits=1, user_api="blas"):
        yield


@functools.cache
def _blas_controller():
    """threadpoolctl's view of the loaded BLAS, scanned once (a scan per call costs ~1 ms)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis, in float32."""
    variance = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    return (x * (np.float32(1.0) / np.sqrt(variance + np.float32(eps)))) * weight


def layer_norm(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, eps: float
) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps) * weight (+ bias)`` over the last axis (biased variance,
    as ``torch.nn.LayerNorm``), in float32."""
    mean = np.mean(x, axis=-1, keepdims=True, dtype=np.float32)
    centered = x - mean
    variance = np.mean(np.square(centered), axis=-1, keepdims=True, dtype=np.float32)
    y = centered * (np.float32(1.0) / np.sqrt(variance + np.float32(eps))) * weight
    return y if bias is None else y + bias


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


# Bytes of one block of attention scores in blocked_attention: a few MB keeps the scores of a
# block in L2/L3 while it is exponentiated, normalised and multiplied by V.
ATTENTION_BLOCK_BYTES = 4 << 20


def blocked_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    scale: float,
    q_pos: np.ndarray,
    k_pos: np.ndarray,
    window: int | None = None,
    cap: float | None = None,
) -> np.ndarray:
    """``attend(masked_softmax(attention_scores(...)), v)`` without the ``[heads, queries,
    keys]`` maps: token-major ``[queries, heads*d]``.

    Query rows are taken in blocks; each block scores only the span of keys some row of it may
    attend (the causal, windowed part), exponentiates and normalises it in place, and
    multiplies it by V, so memory is one block of scores per core instead of heads x seq x seq.
    The float32 operations on every allowed score are those of the full kernels; only the
    order of the sums (the softmax denominator, the products with V) can differ.
    """
    n_q, heads, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    q_pos, k_pos = np.asarray(q_pos), np.asarray(k_pos)
    k_heads = np.ascontiguousarray(k.transpose(1, 0, 2))  # [kv_heads, keys, d]
    v_heads = np.ascontiguousarray(v.transpose(1, 0, 2))
    out = np.empty((n_q, heads * d), dtype=np.float32)
    rows = max(1, min(n_q, ATTENTION_BLOCK_BYTES // max(1, 4 * heads * k.shape[0])))
    c = np.float32(cap) if cap else None

    def block(start: int) -> None:
        stop = min(start + rows, n_q)
        allowed = attention_mask(q_pos[start:stop], k_pos, window)
        reachable = np.flatnonzero(allowed.any(axis=0))
        if reachable.size == 0:  # no key for any row: the full kernels give zeros
            out[start:stop] = 0.0
            return
        lo, hi = int(reachable[0]), int(reachable[-1]) + 1
        allowed = allowed[:, lo:hi]
        # [kv_heads, group * rows, d]: query head h = kv * group + g reads kv head kv
        qb = q[start:stop].reshape(stop - start, kv_heads, group, d).transpose(1, 2, 0, 3)
        qb = qb.reshape(kv_heads, group * (stop - start), d)
        # One 2-D matmul per kv head: NumPy hands those to BLAS directly (stacked matmuls over
        # strided views are several times slower).
        s = np.empty((kv_heads, group * (stop - start), hi - lo), dtype=np.float32)
        for kv in range(kv_heads):
            np.matmul(qb[kv], k_heads[kv, lo:hi].T, out=s[kv])
        np.multiply(s, np.float32(scale), out=s)
        if c is not None:
            np.divide(s, c, out=s)
            np.tanh(s, out=s)
            np.multiply(s, c, out=s)
        s4 = s.reshape(kv_heads, group, stop - start, hi - lo)
        np.copyto(s4, np.float32(-np.inf), where=~allowed)
        top = np.max(s, axis=-1, keepdims=True)
        top[top == -np.inf] = 0.0  # a row with no allowed key stays all zero below
        np.subtract(s, top, out=s)
        np.exp(s, out=s)
        total = np.sum(s, axis=-1, keepdims=True)
        total[total == 0] = 1.0
        np.divide(s, total, out=s)
        ctx = np.empty((kv_heads, group * (stop - start), d), dtype=np.float32)
        for kv in range(kv_heads):
            np.matmul(s[kv], v_heads[kv, lo:hi], out=ctx[kv])
        ctx = ctx.reshape(kv_heads, group, stop - start, d).transpose(2, 0, 1, 3)
        out[start:stop] = ctx.reshape(stop - start, heads * d)

    starts = list(range(0, n_q, rows))[::-1]  # the widest (latest) blocks first
    with one_blas_thread(len(starts) > 1):
        _on_both_cores(block, starts)
    return out


def _on_both_cores(work: Callable[[int], None], items: list[int]) -> None:
    """``work(item)`` for every item, on the calling thread and one helper (NumPy frees the
    GIL inside matmuls and ufuncs); the first exception is raised here."""
    pool = _attention_helper()
    if pool is None or len(items) < 2:
        for item in items:
            work(item)
        return
    queue = iter(items)
    lock = threading.Lock()

    def drain() -> None:
        with np.errstate(all="ignore"):
            while True:
                with lock:
                    item = next(queue, None)
                if item is None:
                    return
                work(item)

    helper = pool.submit(drain)
    try:
        drain()
    finally:
        helper.result()


@functools.cache
def _attention_helper() -> ThreadPoolExecutor | None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if (cores or 1) < 2:
        return None
    return ThreadPoolExecutor(1, thread_name_prefix="aprtrace-attention")
