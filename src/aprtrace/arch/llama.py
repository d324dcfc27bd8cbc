"""Llama-family decoder: Llama 2/3, SmolLM2, Mistral-style GQA, Qwen2/2.5 (qkv bias), Qwen3
(per-head QK-norm). One config switch per difference, as in Hugging Face's modeling_llama.py.

    h = x + o_proj(attention(rope(q_norm(q)), rope(k_norm(k)), v))     q, k, v = proj(norm(x))
    out = h + down(silu(gate(norm(h))) * up(norm(h)))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from aprtrace.arch import ops
from aprtrace.arch.base import Architecture, Emit, PassContext
from aprtrace.config import ModelConfig
from aprtrace.model import layer_name
from aprtrace.stages import Stage


@dataclass
class AttentionWeights:
    """One decoder layer's attention weights and its two norms, float32, HF layout."""

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
    # LayerNorm biases (StableLM, StarCoder2); None for RMSNorm models. Keyword-only, so
    # subclasses may still add fields without defaults.
    input_layernorm_bias: np.ndarray | None = field(default=None, kw_only=True)
    post_attention_layernorm_bias: np.ndarray | None = field(default=None, kw_only=True)

    @property
    def has_qkv_bias(self) -> bool:
        return self.q_bias is not None or self.k_bias is not None or self.v_bias is not None


@dataclass
class LayerWeights(AttentionWeights):
    """One decoder layer's weights, float32, Hugging Face layout."""

    gate_proj: np.ndarray | None  # None: a non-gated MLP (StarCoder2)
    up_proj: np.ndarray
    down_proj: np.ndarray
    gate_bias: np.ndarray | None  # Llama with mlp_bias
    up_bias: np.ndarray | None
    down_bias: np.ndarray | None


def load_attention(model, layer: int) -> dict[str, np.ndarray | None]:
    """The ``AttentionWeights`` fields of block ``layer``, decoded and shape-checked."""
    cfg = model.config
    h, q, kv, d = cfg.hidden_size, cfg.q_dim, cfg.kv_dim, cfg.head_dim

    def w(suffix: str, shape: tuple[int, ...]) -> np.ndarray:
        return model.weight(layer_name(layer, suffix), shape)

    def opt(suffix: str, shape: tuple[int, ...]) -> np.ndarray | None:
        return model.optional_weight(layer_name(layer, suffix), shape)

    return dict(
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
    )


def attention_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer attention tensors of a Llama-style block (HF suffix -> shape)."""
    shapes: dict[str, tuple[int, ...]] = {
        "self_attn.q_proj.weight": (c.q_dim, c.hidden_size),
        "self_attn.k_proj.weight": (c.kv_dim, c.hidden_size),
        "self_attn.v_proj.weight": (c.kv_dim, c.hidden_size),
        "self_attn.o_proj.weight": (c.hidden_size, c.q_dim),
    }
    if c.qkv_bias:
        shapes |= {
            "self_attn.q_proj.bias": (c.q_dim,),
            "self_attn.k_proj.bias": (c.kv_dim,),
            "self_attn.v_proj.bias": (c.kv_dim,),
        }
    if c.qk_norm:
        shapes |= {
            "self_attn.q_norm.weight": (c.head_dim,),
            "self_attn.k_norm.weight": (c.head_dim,),
        }
    return shapes


# Hugging Face modules of a SwiGLU MLP's gate, up and down projections.
GATED_MLP: tuple[str | None, str, str] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def mlp_shapes(
    c: ModelConfig, modules: tuple[str | None, str, str] = GATED_MLP
) -> dict[str, tuple[int, ...]]:
    """Per-layer MLP weights; ``modules`` are (gate or None, up, down)."""
    gate, up, down = modules
    shapes = {
        f"{up}.weight": (c.intermediate_size, c.hidden_size),
        f"{down}.weight": (c.hidden_size, c.intermediate_size),
    }
    if gate is not None:
        shapes[f"{gate}.weight"] = (c.intermediate_size, c.hidden_size)
    return shapes


def model_shapes(
    c: ModelConfig, per_layer: dict[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """Embedding, final norm, untied head, and ``per_layer`` for every layer."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "model.norm.weight": (c.hidden_size,),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        shapes |= {layer_name(i, k): v for k, v in per_layer.items()}
    return shapes


def qkv_projection(w: AttentionWeights, attn_norm: np.ndarray) -> np.ndarray:
    """The fused ``[Q|K|V]`` projection ``[seq, q_dim + 2*kv_dim]``, before any bias."""
    return np.concatenate(
        [
            ops.linear(attn_norm, w.q_proj),
            ops.linear(attn_norm, w.k_proj),
            ops.linear(attn_norm, w.v_proj),
        ],
        axis=1,
    )


def add_qkv_bias(cfg: ModelConfig, w: AttentionWeights, qkv: np.ndarray) -> np.ndarray:
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


def attend_and_project(
    arch: Architecture,
    cfg: ModelConfig,
    w: LayerWeights,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    layer: int,
    ctx: PassContext,
    emit: Emit,
) -> np.ndarray:
    """Causal (windowed) GQA attention of the RoPE'd ``q``/``k`` over the pass's keys, then
    the output projection: the stages attn_scores .. attn_out of every Llama-style block."""
    context = arch.attend(cfg, q, k, v, layer, ctx, emit)  # emits attn_scores, attn_softmax
    context = emit(Stage.ATTENTION, layer, context)

    attn_out = ops.linear(context, w.o_proj, w.o_bias)
    attn_out = emit(Stage.ATTN_OUT, layer, attn_out)
    return attn_out


def gated_ffn(
    x: np.ndarray,
    gate_proj: np.ndarray,
    up_proj: np.ndarray,
    down_proj: np.ndarray,
    act: Callable[[np.ndarray], np.ndarray],
    layer: int,
    emit: Emit,
    biases: tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None] = (None, None, None),
) -> np.ndarray:
    """``down(act(gate(x)) * up(x))``: the stages ffn_gate .. ffn_out of a gated MLP."""
    gate_bias, up_bias, down_bias = biases
    gate = ops.linear(x, gate_proj, gate_bias)
    gate = emit(Stage.FFN_GATE, layer, gate)
    up = ops.linear(x, up_proj, up_bias)
    up = emit(Stage.FFN_UP, layer, up)
    activated = act(gate)
    activated = emit(Stage.FFN_SILU, layer, activated)
    gated = activated * up
    gated = emit(Stage.FFN_SWIGL, layer, gated)
    ffn_out = ops.linear(gated, down_proj, down_bias)
    ffn_out = emit(Stage.FFN_OUT, layer, ffn_out)
    return ffn_out


def norm_and_rope(
    x: np.ndarray, norm: np.ndarray | None, eps: float, cos: np.ndarray, sin: np.ndarray
) -> np.ndarray:
    """Per-head QK-norm (Qwen3, when ``norm`` is given), then RoPE; ``x`` is ``[seq, heads, d]``."""
    if norm is not None:
        x = ops.rms_norm(x, norm, eps)
    return ops.apply_rope(x, cos, sin)


class Llama(Architecture):
    names = ("llama", "qwen2", "qwen3")
    #: The MLP's (gate, up, down) modules; gate None: a non-gated MLP (StarCoder2).
    mlp_modules: tuple[str | None, str, str] = GATED_MLP

    def expected_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        h = (cfg.hidden_size,)
        per_layer = {"input_layernorm.weight": h, "post_attention_layernorm.weight": h}
        mlp = mlp_shapes(cfg, self.mlp_modules)
        return model_shapes(cfg, per_layer | attention_shapes(cfg) | mlp)

    def load_layer(self, model, layer: int) -> LayerWeights:
        """Decode the weights of block ``layer``, checking every shape against the config."""
        cfg = model.config
        h, inter = cfg.hidden_size, cfg.intermediate_size

        def w(suffix: str, shape: tuple[int, ...]) -> np.ndarray:
            return model.weight(layer_name(layer, suffix), shape)

        def opt(suffix: str, shape: tuple[int, ...]) -> np.ndarray | None:
            return model.optional_weight(layer_name(layer, suffix), shape)

        gate, up, down = self.mlp_modules
        return LayerWeights(
            **load_attention(model, layer),
            gate_proj=w(f"{gate}.weight", (inter, h)) if gate else None,
            up_proj=w(f"{up}.weight", (inter, h)),
            down_proj=w(f"{down}.weight", (h, inter)),
            gate_bias=opt(f"{gate}.bias", (inter,)) if gate else None,
            up_bias=opt(f"{up}.bias", (inter,)),
            down_bias=opt(f"{down}.bias", (h,)),
        )

    def norm(
        self, cfg: ModelConfig, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None
    ) -> np.ndarray:
        """The block's normalization: RMSNorm (LayerNorm in StarCoder2 / StableLM)."""
        return ops.rms_norm(x, weight, cfg.rms_norm_eps)

    def position_encode(
        self, cfg: ModelConfig, x: np.ndarray, norm: np.ndarray | None, ctx: PassContext
    ) -> np.ndarray:
        """Per-head QK-norm (if any), then RoPE at the pass's positions (``[seq, heads, d]``)."""
        cos, sin = self.default_rope(ctx)
        return norm_and_rope(x, norm, cfg.rms_norm_eps, cos, sin)

    def attention(
        self,
        cfg: ModelConfig,
        w: AttentionWeights,
        x: np.ndarray,
        layer: int,
        ctx: PassContext,
        emit: Emit,
    ) -> np.ndarray:
        """Pre-norm causal self-attention with GQA; returns the output projection."""
        seq = x.shape[0]
        attn_norm = self.norm(cfg, x, w.input_layernorm, w.input_layernorm_bias)
        attn_norm = emit(Stage.ATTN_NORM, layer, attn_norm)

        qkv = qkv_projection(w, attn_norm)
        qkv = emit(Stage.QKV_MATMUL, layer, qkv)
        if w.has_qkv_bias:
            qkv = add_qkv_bias(cfg, w, qkv)
            qkv = emit(Stage.QKV_BIAS, layer, qkv)

        q, k, v = split_qkv(cfg, qkv)
        q = self.position_encode(cfg, q, w.q_norm, ctx)
        q = emit(Stage.Q_POST_ROPE, layer, q.reshape(seq, cfg.q_dim)).reshape(q.shape)
        k = self.position_encode(cfg, k, w.k_norm, ctx)
        k = emit(Stage.K_POST_ROPE, layer, k.reshape(seq, cfg.kv_dim)).reshape(k.shape)

        return attend_and_project(self, cfg, w, q, k, v, layer, ctx, emit)

    def mlp(
        self, cfg: ModelConfig, w: LayerWeights, x: np.ndarray, layer: int, emit: Emit
    ) -> np.ndarray:
        """Pre-norm SwiGLU feed-forward; returns the down projection."""
        ffn_norm = self.norm(cfg, x, w.post_attention_layernorm, w.post_attention_layernorm_bias)
        ffn_norm = emit(Stage.FFN_NORM, layer, ffn_norm)
        biases = (w.gate_bias, w.up_bias, w.down_bias)
        return gated_ffn(
            ffn_norm, w.gate_proj, w.up_proj, w.down_proj, ops.silu, layer, emit, biases
        )

    def layer(
        self,
        cfg: ModelConfig,
        w: LayerWeights,
        x: np.ndarray,
        layer: int,
        ctx: PassContext,
        emit: Emit,
    ) -> np.ndarray:
        hidden = x + self.attention(cfg, w, x, layer, ctx, emit)
        hidden = emit(Stage.POST_ATTN_RESIDUAL, layer, hidden)
        hidden = hidden + self.mlp(cfg, w, hidden, layer, emit)
        hidden = emit(Stage.POST_FFN_RESIDUAL, layer, hidden)
        return hidden
