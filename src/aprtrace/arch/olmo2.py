"""OLMo 2: post-norms instead of pre-norms, Q/K RMSNorm over the whole projection.

    h = x + rms_norm(o_proj(attention(rope(q_norm(q)), rope(k_norm(k)), v)))    q, k, v = proj(x)
    out = h + rms_norm(down(silu(gate(h)) * up(h)))

Unlike Llama there is no RMSNorm on a sub-block's *input* (``attn_norm`` and ``ffn_norm`` do
not exist: the projections read the residual stream itself); instead the attention output
and the FFN output are normalized before their residual adds (``post_attn_norm``,
``post_ffn_norm``). ``q_norm`` / ``k_norm`` normalize all heads of a position together
(weights ``[heads*head_dim]``), not each head as Qwen3 does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aprtrace.arch import ops
from aprtrace.arch.base import Architecture, Emit, PassContext
from aprtrace.arch.llama import (
    add_qkv_bias,
    attend_and_project,
    gated_ffn,
    mlp_shapes,
    model_shapes,
    qkv_projection,
    split_qkv,
)
from aprtrace.config import ModelConfig
from aprtrace.model import layer_name
from aprtrace.stages import Stage


@dataclass
class Olmo2LayerWeights:
    """One OLMo 2 block's weights, float32, Hugging Face layout."""

    q_proj: np.ndarray
    k_proj: np.ndarray
    v_proj: np.ndarray
    q_bias: np.ndarray | None  # attention_bias
    k_bias: np.ndarray | None
    v_bias: np.ndarray | None
    q_norm: np.ndarray  # [heads * head_dim]
    k_norm: np.ndarray  # [kv_heads * head_dim]
    o_proj: np.ndarray
    o_bias: np.ndarray | None
    post_attention_layernorm: np.ndarray
    gate_proj: np.ndarray
    up_proj: np.ndarray
    down_proj: np.ndarray
    post_feedforward_layernorm: np.ndarray

    @property
    def has_qkv_bias(self) -> bool:
        return self.q_bias is not None or self.k_bias is not None or self.v_bias is not None


class Olmo2(Architecture):
    names = ("olmo2",)

    def expected_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        h = (cfg.hidden_size,)
        per_layer = {
            "self_attn.q_proj.weight": (cfg.q_dim, cfg.hidden_size),
            "self_attn.k_proj.weight": (cfg.kv_dim, cfg.hidden_size),
            "self_attn.v_proj.weight": (cfg.kv_dim, cfg.hidden_size),
            "self_attn.o_proj.weight": (cfg.hidden_size, cfg.q_dim),
            "self_attn.q_norm.weight": (cfg.q_dim,),
            "self_attn.k_norm.weight": (cfg.kv_dim,),
            "post_attention_layernorm.weight": h,
            "post_feedforward_layernorm.weight": h,
        }
        return model_shapes(cfg, per_layer | mlp_shapes(cfg))

    def load_layer(self, model, layer: int) -> Olmo2LayerWeights:
        cfg = model.config
        h, q, kv, inter = cfg.hidden_size, cfg.q_dim, cfg.kv_dim, cfg.intermediate_size

        def w(suffix: str, shape: tuple[int, ...]) -> np.ndarray:
            return model.weight(layer_name(layer, suffix), shape)

        def opt(suffix: str, shape: tuple[int, ...]) -> np.ndarray | None:
            return model.optional_weight(layer_name(layer, suffix), shape)

        return Olmo2LayerWeights(
            q_proj=w("self_attn.q_proj.weight", (q, h)),
            k_proj=w("self_attn.k_proj.weight", (kv, h)),
            v_proj=w("self_attn.v_proj.weight", (kv, h)),
            q_bias=opt("self_attn.q_proj.bias", (q,)),
            k_bias=opt("self_attn.k_proj.bias", (kv,)),
            v_bias=opt("self_attn.v_proj.bias", (kv,)),
            q_norm=w("self_attn.q_norm.weight", (q,)),
            k_norm=w("self_attn.k_norm.weight", (kv,)),
            o_proj=w("self_attn.o_proj.weight", (h, q)),
            o_bias=opt("self_attn.o_proj.bias", (h,)),
            post_attention_layernorm=w("post_attention_layernorm.weight", (h,)),
            gate_proj=w("mlp.gate_proj.weight", (inter, h)),
            up_proj=w("mlp.up_proj.weight", (inter, h)),
            down_proj=w("mlp.down_proj.weight", (h, inter)),
            post_feedforward_layernorm=w("post_feedforward_layernorm.weight", (h,)),
        )

    def attention(
        self,
        cfg: ModelConfig,
        w: Olmo2LayerWeights,
        x: np.ndarray,
        layer: int,
        ctx: PassContext,
        emit: Emit,
    ) -> np.ndarray:
        """Causal self-attention on the un-normalized residual; returns the output projection."""
        seq, eps = x.shape[0], cfg.rms_norm_eps
        cos, sin = self.default_rope(ctx)

        qkv = qkv_projection(w, x)
        qkv = emit(Stage.QKV_MATMUL, layer, qkv)
        if w.has_qkv_bias:
            qkv = add_qkv_bias(cfg, w, qkv)
            qkv = emit(Stage.QKV_BIAS, layer, qkv)

        q, k, v = split_qkv(cfg, qkv)
        q = ops.rms_norm(q.reshape(seq, cfg.q_dim), w.q_norm, eps).reshape(q.shape)
        q = ops.apply_rope(q, cos, sin)
        q = emit(Stage.Q_POST_ROPE, layer, q.reshape(seq, cfg.q_dim)).reshape(q.shape)
        k = ops.rms_norm(k.reshape(seq, cfg.kv_dim), w.k_norm, eps).reshape(k.shape)
        k = ops.apply_rope(k, cos, sin)
        k = emit(Stage.K_POST_ROPE, layer, k.reshape(seq, cfg.kv_dim)).reshape(k.shape)

        return attend_and_project(self, cfg, w, q, k, v, layer, ctx, emit)

    def mlp(
        self, cfg: ModelConfig, w: Olmo2LayerWeights, x: np.ndarray, layer: int, emit: Emit
    ) -> np.ndarray:
        """SwiGLU feed-forward on the un-normalized residual; returns the down projection."""
        return gated_ffn(x, w.gate_proj, w.up_proj, w.down_proj, ops.silu, layer, emit)

    def layer(
        self,
        cfg: ModelConfig,
        w: Olmo2LayerWeights,
        x: np.ndarray,
        layer: int,
        ctx: PassContext,
        emit: Emit,
    ) -> np.ndarray:
        eps = cfg.rms_norm_eps
        attn = ops.rms_norm(
            self.attention(cfg, w, x, layer, ctx, emit), w.post_attention_layernorm, eps
        )
        attn = emit(Stage.POST_ATTN_NORM, layer, attn)
        hidden = x + attn
        hidden = emit(Stage.POST_ATTN_RESIDUAL, layer, hidden)
        ffn = ops.rms_norm(self.mlp(cfg, w, hidden, layer, emit), w.post_feedforward_layernorm, eps)
        ffn = emit(Stage.POST_FFN_NORM, layer, ffn)
        hidden = hidden + ffn
        hidden = emit(Stage.POST_FFN_RESIDUAL, layer, hidden)
        return hidden
