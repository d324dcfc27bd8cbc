"""Gemma 2 and Gemma 3 decoders, as in Hugging Face's modeling_gemma2.py / modeling_gemma3.py.

    x0 = embed(ids) * sqrt(hidden)
    h = x + post_attn_norm(o_proj(attention(rope(q_norm(q)), rope(k_norm(k)), v)))
    out = h + post_ffn_norm(down(gelu_tanh(gate(pre_ffn_norm(h))) * up(pre_ffn_norm(h))))

Every RMSNorm multiplies by ``1 + w`` (Hugging Face's ``w``; GGUF's stored ``w + 1`` is
undone on load, see ``aprtrace.mapping.gemma``). Scores are scaled by
``query_pre_attn_scalar ** -0.5`` and, in Gemma 2, soft-capped; the logits too. Layers of kind
``sliding_attention`` see only the last ``sliding_window`` positions and, in Gemma 3, rotate
with their own RoPE base (``rope_local_theta``); linear RoPE scaling applies to the global
layers only. Q/K norms exist in Gemma 3 only (``cfg.qk_norm``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aprtrace.arch import ops
from aprtrace.arch.base import Emit, PassContext
from aprtrace.arch.llama import (
    Llama,
    attention_shapes,
    gated_ffn,
    mlp_shapes,
    model_shapes,
    qkv_projection,
    split_qkv,
)
from aprtrace.config import ModelConfig
from aprtrace.errors import ModelLoadError
from aprtrace.model import layer_name
from aprtrace.stages import Stage


@dataclass
class GemmaLayerWeights:
    """One Gemma block's weights, float32, Hugging Face layout (norm weights are ``w``)."""

    input_layernorm: np.ndarray
    q_proj: np.ndarray
    k_proj: np.ndarray
    v_proj: np.ndarray
    q_norm: np.ndarray | None  # Gemma 3
    k_norm: np.ndarray | None
    o_proj: np.ndarray
    post_attention_layernorm: np.ndarray
    pre_feedforward_layernorm: np.ndarray
    post_feedforward_layernorm: np.ndarray
    gate_proj: np.ndarray
    up_proj: np.ndarray
    down_proj: np.ndarray
    has_qkv_bias = False  # Gemma has no attention biases (load_layer refuses them)


def gemma_rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Gemma's RMSNorm: ``x / rms(x) * (1 + w)``."""
    return ops.rms_norm(x, np.float32(1.0) + weight, eps)


_NORMS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm.weight",
)


class Gemma(Llama):
    names = ("gemma2", "gemma3")

    def expected_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        per_layer = {name: (cfg.hidden_size,) for name in _NORMS}
        return model_shapes(cfg, per_layer | attention_shapes(cfg) | mlp_shapes(cfg))

    def load_layer(self, model, layer: int) -> GemmaLayerWeights:
        cfg = model.config
        h, q, kv, inter, d = (
            cfg.hidden_size,
            cfg.q_dim,
            cfg.kv_dim,
            cfg.intermediate_size,
            cfg.head_dim,
        )
        if cfg.qkv_bias or model.has(layer_name(layer, "self_attn.o_proj.bias")):
            raise ModelLoadError(
                f"{model.path}: a {cfg.architecture} model with attention biases is not supported",
                hint="Gemma checkpoints have no attention biases; the file may be mislabelled",
            )

        def w(suffix: str, shape: tuple[int, ...]) -> np.ndarray:
            return model.weight(layer_name(layer, suffix), shape)

        return GemmaLayerWeights(
            input_layernorm=w("input_layernorm.weight", (h,)),
            q_proj=w("self_attn.q_proj.weight", (q, h)),
            k_proj=w("self_attn.k_proj.weight", (kv, h)),
            v_proj=w("self_attn.v_proj.weight", (kv, h)),
            q_norm=w("self_attn.q_norm.weight", (d,)) if cfg.qk_norm else None,
            k_norm=w("self_attn.k_norm.weight", (d,)) if cfg.qk_norm else None,
            o_proj=w("self_attn.o_proj.weight", (h, q)),
            post_attention_layernorm=w("post_attention_layernorm.weight", (h,)),
            pre_feedforward_layernorm=w("pre_feedforward_layernorm.weight", (h,)),
            post_feedforward_layernorm=w("post_feedforward_layernorm.weight", (h,)),
            gate_proj=w("mlp.gate_proj.weight", (inter, h)),
            up_proj=w("mlp.up_proj.weight", (inter, h)),
            down_proj=w("mlp.down_proj.weight", (h, inter)),
        )

    def embed(self, model, ids: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """Embedding rows times ``sqrt(hidden)``, the scale rounded to float32 first (as HF)."""
        scale = np.float32(model.config.hidden_size**0.5)
        return model.tensor("model.embed_tokens.weight").take(ids) * scale

    def layer_rope(self, ctx: PassContext, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin of ``layer``: the local base on sliding layers (Gemma 3), else the global
        base with linear scaling."""
        cfg = ctx.cfg
        local = cfg.is_sliding(layer) and cfg.rope_local_theta is not None
        theta = cfg.rope_local_theta if local else cfg.rope_theta
        factor = 1.0 if local else cfg.rope_linear_factor

        def build(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return ops.rope_tables(positions, cfg.head_dim, theta, None, factor, cfg.rotary_dim)

        return ctx.rope(("gemma", theta, factor), build)

    def attention(
        self,
        cfg: ModelConfig,
        w: GemmaLayerWeights,
        x: np.ndarray,
        layer: int,
        ctx: PassContext,
        emit: Emit,
    ) -> np.ndarray:
        """Pre-norm causal (windowed on sliding layers) GQA attention, then its post-norm."""
        seq, eps = x.shape[0], cfg.rms_norm_eps
        cos, sin = self.layer_rope(ctx, layer)

        attn_norm = gemma_rms_norm(x, w.input_layernorm, eps)
        attn_norm = emit(Stage.ATTN_NORM, layer, attn_norm)

        qkv = qkv_projection(w, attn_norm)
        qkv = emit(Stage.QKV_MATMUL, layer, qkv)

        q, k, v = split_qkv(cfg, qkv)
        if w.q_norm is not None:
            q = gemma_rms_norm(q, w.q_norm, eps)
        q = ops.apply_rope(q, cos, sin)
        q = emit(Stage.Q_POST_ROPE, layer, q.reshape(seq, cfg.q_dim)).reshape(q.shape)
        if w.k_norm is not None:
            k = gemma_rms_norm(k, w.k_norm, eps)
        k = ops.apply_rope(k, cos, sin)
        k = emit(Stage.K_POST_ROPE, layer, k.reshape(seq, cfg.kv_dim)).reshape(k.shape)

        # Windowed on sliding layers, soft-capped scores; emits attn_scores, attn_softmax.
        context = self.attend(cfg, q, k, v, layer, ctx, emit)
        context = emit(Stage.ATTENTION, layer, context)

        attn_out = ops.linear(context, w.o_proj)
        attn_out = emit(Stage.ATTN_OUT, layer, attn_out)
        post_attn_norm = gemma_rms_norm(attn_out, w.post_attention_layernorm, eps)
        post_attn_norm = emit(Stage.POST_ATTN_NORM, layer, post_attn_norm)
        return post_attn_norm

    def mlp(
        self, cfg: ModelConfig, w: GemmaLayerWeights, x: np.ndarray, layer: int, emit: Emit
    ) -> np.ndarray:
        """Pre-norm GELU(tanh)-gated feed-forward, then its post-norm."""
        eps = cfg.rms_norm_eps
        ffn_norm = gemma_rms_norm(x, w.pre_feedforward_layernorm, eps)
        ffn_norm = emit(Stage.FFN_NORM, layer, ffn_norm)
        ffn_out = gated_ffn(
            ffn_norm, w.gate_proj, w.up_proj, w.down_proj, ops.gelu_tanh, layer, emit
        )
        post_ffn_norm = gemma_rms_norm(ffn_out, w.post_feedforward_layernorm, eps)
        post_ffn_norm = emit(Stage.POST_FFN_NORM, layer, post_ffn_norm)
        return post_ffn_norm

    def final_norm(self, model, hidden: np.ndarray) -> np.ndarray:
        cfg = model.config
        weight = model.weight("model.norm.weight", (cfg.hidden_size,))
        return gemma_rms_norm(hidden, weight, cfg.rms_norm_eps)

    def logits(self, model, h_last: np.ndarray, chunk: int) -> np.ndarray:
        """The output projection, soft-capped by ``final_logit_softcapping`` (Gemma 2)."""
        return ops.softcap(
            super().logits(model, h_last, chunk), model.config.final_logit_softcapping
        )
