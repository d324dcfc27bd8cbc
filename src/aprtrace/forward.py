"""The traced forward pass of a Llama / Qwen2 / Qwen3 decoder in float32 NumPy.

Reads top to bottom like the math (FORMATS.md section 6). Every capture point calls
``emit(stage, layer, buffer)`` right under the line that computes ``buffer``; the caller
routes it to ``maybe_save_stage`` and the statistics table. Buffers are already in the
APRT layout: token-major ``[seq, dim]``, attention maps ``[heads, seq, seq]``, logits
``[vocab]``.

Weights are decoded one layer at a time and dropped when the layer is done, so peak
memory is about one layer of float32 weights plus activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from aprtrace.config import ROPE_FREQS, ModelConfig
from aprtrace.errors import InferenceError, ValidationError
from aprtrace.model import Model, layer_name
from aprtrace.stages import Stage

Emit = Callable[[Stage, "int | None", np.ndarray], None]
Progress = Callable[[int, int], None]

# Rows of the output projection decoded at once: bounds the transient f32 copy of lm_head
# to LM_HEAD_CHUNK * hidden * 4 bytes (about 37 MB for hidden 4608).
LM_HEAD_CHUNK = 2048
# Up to this many tokens the matmuls run on one BLAS thread (see one_blas_thread).
SHORT_PROMPT = 64


def _no_emit(stage: Stage, layer: int | None, values: np.ndarray) -> None:
    return None


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
    seq: int,
    head_dim: int,
    theta: float,
    freq_divisors: np.ndarray | None = None,
    linear_factor: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin ``[seq, head_dim/2]`` for positions 0..seq-1 (computed in f64, stored f32).

    ``freq_divisors`` (Llama 3 ``rope_freqs``) divide each frequency; ``linear_factor``
    divides the positions (linear RoPE scaling).
    """
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(half, dtype=np.float64) * 2.0 / head_dim))
    if freq_divisors is not None:
        inv_freq = inv_freq / np.asarray(freq_divisors, dtype=np.float64)
    positions = np.arange(seq, dtype=np.float64) / linear_factor
    angles = positions[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def model_rope_tables(model: Model, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """``rope_tables`` with the model's theta, scaling and optional ``rope_freqs`` divisors."""
    cfg = model.config
    divisors = model.optional_weight(ROPE_FREQS, (cfg.head_dim // 2,))
    return rope_tables(seq, cfg.head_dim, cfg.rope_theta, divisors, cfg.rope_linear_factor)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NeoX split-half rotation of ``x`` ``[seq, heads, head_dim]`` (Hugging Face layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ weight.T (+ bias)`` for ``weight`` in ``[out, in]`` layout."""
    y = x @ weight.T
    return y if bias is None else y + bias


@dataclass
class LayerWeights:
    """One decoder layer's weights, float32, Hugging Face layout."""

    input_layernorm: np.ndarray
    q_proj: np.ndarray
    k_proj: np.ndarray
    v_proj: np.ndarray
    q_bias: np.ndarray | None
    k_bias: np.ndarray | None
    v_bias: np.ndarray | None
    q_norm: np.ndarray | None
    k_norm: np.ndarray | None
    o_proj: np.ndarray
    o_bias: np.ndarray | None
    post_attention_layernorm: np.ndarray
    gate_proj: np.ndarray
    up_proj: np.ndarray
    down_proj: np.ndarray
    gate_bias: np.ndarray | None  # Llama with mlp_bias
    up_bias: np.ndarray | None
    down_bias: np.ndarray | None

    @property
    def has_qkv_bias(self) -> bool:
        return self.q_bias is not None or self.k_bias is not None or self.v_bias is not None


def load_layer(model: Model, layer: int) -> LayerWeights:
    """Decode the weights of block ``layer``, checking every shape against the config."""
    cfg = model.config
    h, q, kv, inter, d = cfg.hidden_size, cfg.q_dim, cfg.kv_dim, cfg.intermediate_size, cfg.head_dim

    def w(suffix: str, shape: tuple[int, ...]) -> np.ndarray:
        return model.weight(layer_name(layer, suffix), shape)

    def opt(suffix: str, shape: tuple[int, ...]) -> np.ndarray | None:
        return model.optional_weight(layer_name(layer, suffix), shape)

    return LayerWeights(
        input_layernorm=w("input_layernorm.weight", (h,)),
        q_proj=w("self_attn.q_proj.weight", (q, h)),
        k_proj=w("self_attn.k_proj.weight", (kv, h)),
        v_proj=w("self_attn.v_proj.weight", (kv, h)),
        q_bias=opt("self_attn.q_proj.bias", (q,)),
        k_bias=opt("self_attn.k_proj.bias", (kv,)),
        v_bias=opt("self_attn.v_proj.bias", (kv,)),
        q_norm=opt("self_attn.q_norm.weight", (d,)) if cfg.qk_norm else None,
        k_norm=opt("self_attn.k_norm.weight", (d,)) if cfg.qk_norm else None,
        o_proj=w("self_attn.o_proj.weight", (h, q)),
        o_bias=opt("self_attn.o_proj.bias", (h,)),
        post_attention_layernorm=w("post_attention_layernorm.weight", (h,)),
        gate_proj=w("mlp.gate_proj.weight", (inter, h)),
        up_proj=w("mlp.up_proj.weight", (inter, h)),
        down_proj=w("mlp.down_proj.weight", (h, inter)),
        gate_bias=opt("mlp.gate_proj.bias", (inter,)),
        up_bias=opt("mlp.up_proj.bias", (inter,)),
        down_bias=opt("mlp.down_proj.bias", (h,)),
    )


def qkv_projection(w: LayerWeights, attn_norm: np.ndarray) -> np.ndarray:
    """The fused ``[Q|K|V]`` projection ``[seq, q_dim + 2*kv_dim]``, before any bias."""
    return np.concatenate(
        [linear(attn_norm, w.q_proj), linear(attn_norm, w.k_proj), linear(attn_norm, w.v_proj)],
        axis=1,
    )


def add_qkv_bias(cfg: ModelConfig, w: LayerWeights, qkv: np.ndarray) -> np.ndarray:
    """``qkv + [b_q|b_k|b_v]``; a missing part of the bias counts as zeros."""
    zeros = np.zeros
    return qkv + np.concatenate(
        [
            w.q_bias if w.q_bias is not None else zeros(cfg.q_dim, np.float32),
            w.k_bias if w.k_bias is not None else zeros(cfg.kv_dim, np.float32),
            w.v_bias if w.v_bias is not None else zeros(cfg.kv_dim, np.float32),
        ]
    )


def split_qkv(cfg: ModelConfig, qkv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views ``q [seq, heads, d]``, ``k`` and ``v [seq, kv_heads, d]`` of a fused buffer."""
    seq, d = qkv.shape[0], cfg.head_dim
    q = qkv[:, : cfg.q_dim].reshape(seq, cfg.num_heads, d)
    k = qkv[:, cfg.q_dim : cfg.q_dim + cfg.kv_dim].reshape(seq, cfg.num_kv_heads, d)
    v = qkv[:, cfg.q_dim + cfg.kv_dim :].reshape(seq, cfg.num_kv_heads, d)
    return q, k, v


def norm_and_rope(
    x: np.ndarray, norm: np.ndarray | None, eps: float, cos: np.ndarray, sin: np.ndarray
) -> np.ndarray:
    """Per-head QK-norm (Qwen3, when ``norm`` is given), then RoPE; ``x`` is ``[seq, heads, d]``."""
    if norm is not None:
        x = rms_norm(x, norm, eps)
    return apply_rope(x, cos, sin)


def attention_scores(cfg: ModelConfig, q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``q.k * scale`` ``[heads, seq, seq]`` with GQA; masked entries (key > query) are 0."""
    seq = q.shape[0]
    # Grouped-query attention: query head h reads kv head h // (n_heads / n_kv).
    group = cfg.num_heads // cfg.num_kv_heads
    q_heads = q.transpose(1, 0, 2)  # [heads, seq, d]
    k_heads = np.repeat(k.transpose(1, 0, 2), group, axis=0)
    scale = np.float32(1.0 / np.sqrt(cfg.head_dim))
    causal = np.tril(np.ones((seq, seq), dtype=bool))
    scores = (q_heads @ k_heads.transpose(0, 2, 1)) * scale
    return np.where(causal, scores, np.float32(0.0))


def causal_softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over keys 0..query of ``[heads, seq, seq]``; masked entries are 0."""
    seq = scores.shape[-1]
    causal = np.tril(np.ones((seq, seq), dtype=bool))
    shifted = scores - np.max(np.where(causal, scores, -np.inf), axis=-1, keepdims=True)
    weights = np.where(causal, np.exp(np.where(causal, shifted, 0.0)), np.float32(0.0))
    # Re-mask after dividing: a NaN row sum must not turn the masked zeros into NaN.
    return np.where(causal, weights / np.sum(weights, axis=-1, keepdims=True), np.float32(0.0))


def attend(cfg: ModelConfig, probs: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``probs . V`` back in token-major ``[seq, q_dim]``; ``v`` is ``[seq, kv_heads, d]``."""
    seq = v.shape[0]
    group = cfg.num_heads // cfg.num_kv_heads
    v_heads = np.repeat(v.transpose(1, 0, 2), group, axis=0)
    return (probs @ v_heads).transpose(1, 0, 2).reshape(seq, cfg.q_dim)


def attention_block(
    cfg: ModelConfig,
    w: LayerWeights,
    x: np.ndarray,
    layer: int,
    cos: np.ndarray,
    sin: np.ndarray,
    emit: Emit,
) -> np.ndarray:
    """Pre-norm causal self-attention with GQA; returns the output projection."""
    seq = x.shape[0]

    attn_norm = rms_norm(x, w.input_layernorm, cfg.rms_norm_eps)
    emit(Stage.ATTN_NORM, layer, attn_norm)

    qkv = qkv_projection(w, attn_norm)
    emit(Stage.QKV_MATMUL, layer, qkv)
    if w.has_qkv_bias:
        qkv = add_qkv_bias(cfg, w, qkv)
        emit(Stage.QKV_BIAS, layer, qkv)

    q, k, v = split_qkv(cfg, qkv)
    q = norm_and_rope(q, w.q_norm, cfg.rms_norm_eps, cos, sin)
    emit(Stage.Q_POST_ROPE, layer, q.reshape(seq, cfg.q_dim))
    k = norm_and_rope(k, w.k_norm, cfg.rms_norm_eps, cos, sin)
    emit(Stage.K_POST_ROPE, layer, k.reshape(seq, cfg.kv_dim))

    scores = attention_scores(cfg, q, k)
    emit(Stage.ATTN_SCORES, layer, scores)
    probs = causal_softmax(scores)
    emit(Stage.ATTN_SOFTMAX, layer, probs)
    context = attend(cfg, probs, v)
    emit(Stage.ATTENTION, layer, context)

    attn_out = linear(context, w.o_proj, w.o_bias)
    emit(Stage.ATTN_OUT, layer, attn_out)
    return attn_out


def mlp_block(
    cfg: ModelConfig, w: LayerWeights, x: np.ndarray, layer: int, emit: Emit
) -> np.ndarray:
    """Pre-norm SwiGLU feed-forward; returns the down projection."""
    ffn_norm = rms_norm(x, w.post_attention_layernorm, cfg.rms_norm_eps)
    emit(Stage.FFN_NORM, layer, ffn_norm)
    gate = linear(ffn_norm, w.gate_proj, w.gate_bias)
    emit(Stage.FFN_GATE, layer, gate)
    up = linear(ffn_norm, w.up_proj, w.up_bias)
    emit(Stage.FFN_UP, layer, up)
    activated = silu(gate)
    emit(Stage.FFN_SILU, layer, activated)
    swiglu = activated * up
    emit(Stage.FFN_SWIGL, layer, swiglu)
    ffn_out = linear(swiglu, w.down_proj, w.down_bias)
    emit(Stage.FFN_OUT, layer, ffn_out)
    return ffn_out


def decoder_layer(
    cfg: ModelConfig,
    w: LayerWeights,
    x: np.ndarray,
    layer: int,
    cos: np.ndarray,
    sin: np.ndarray,
    emit: Emit,
) -> np.ndarray:
    hidden = x + attention_block(cfg, w, x, layer, cos, sin, emit)
    emit(Stage.POST_ATTN_RESIDUAL, layer, hidden)
    hidden = hidden + mlp_block(cfg, w, hidden, layer, emit)
    emit(Stage.POST_FFN_RESIDUAL, layer, hidden)
    return hidden


def final_norm(model: Model, hidden: np.ndarray) -> np.ndarray:
    """The output RMSNorm (``model.norm``) over every position."""
    cfg = model.config
    return rms_norm(hidden, model.weight("model.norm.weight", (cfg.hidden_size,)), cfg.rms_norm_eps)


def embed(model: Model, ids: np.ndarray) -> np.ndarray:
    """Embedding rows of ``ids`` ``[seq, hidden]``, decoding only those rows."""
    return model.tensor("model.embed_tokens.weight").take(ids)


def lm_head(model: Model, h_last: np.ndarray) -> np.ndarray:
    """Logits ``[vocab]`` of one position, decoding the output matrix in row chunks."""
    weight = model.tensor(model.lm_head_name)
    vocab = weight.shape[0]
    logits = np.empty(vocab, dtype=np.float32)
    for start in range(0, vocab, LM_HEAD_CHUNK):
        rows = weight.rows(start, start + LM_HEAD_CHUNK)
        logits[start : start + rows.shape[0]] = rows @ h_last
    return logits


def check_token_ids(cfg: ModelConfig, token_ids: list[int]) -> np.ndarray:
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise ValidationError(
            "the prompt encodes to zero tokens", hint="give a non-empty --prompt or --tokens"
        )
    bad = ids[(ids < 0) | (ids >= cfg.vocab_size)]
    if bad.size:
        raise ValidationError(
            f"token id {int(bad[0])} is outside the vocabulary (0..{cfg.vocab_size - 1})",
            hint="check --tokens against the model's tokenizer",
        )
    if ids.size > cfg.max_position_embeddings:
        raise ValidationError(
            f"the prompt has {ids.size} tokens, longer than the model's context "
            f"({cfg.max_position_embeddings})"
        )
    return ids


def forward(
    model: Model,
    token_ids: list[int],
    emit: Emit | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """Run one forward pass over ``token_ids``; return the logits of the last position.

    ``emit(stage, layer, buffer)`` receives every capture point (``layer`` is None for the
    whole-model stages ``final_norm`` and ``lm_head``; ``embedding`` comes as layer 0).
    ``progress(done, total)`` is called after each layer.
    """
    cfg = model.config
    emit = emit or _no_emit
    ids = check_token_ids(cfg, token_ids)
    if cfg.num_layers <= 0:
        raise InferenceError("the model has zero layers; there is nothing to trace")
    cos, sin = model_rope_tables(model, len(ids))

    with np.errstate(all="ignore"), one_blas_thread(len(ids) <= SHORT_PROMPT):
        hidden = embed(model, ids)
        emit(Stage.EMBEDDING, 0, hidden)

        for layer in range(cfg.num_layers):
            weights = load_layer(model, layer)
            hidden = decoder_layer(cfg, weights, hidden, layer, cos, sin, emit)
            del weights
            if progress is not None:
                progress(layer + 1, cfg.num_layers)

        final = final_norm(model, hidden)
        emit(Stage.FINAL_NORM, None, final)
        logits = lm_head(model, final[-1])
        emit(Stage.LM_HEAD, None, logits)
    return logits
