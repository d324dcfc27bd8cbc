"""GPT-2: learned absolute positions, LayerNorm with bias, no RoPE, a non-gated GELU MLP.

    x0 = wte[ids] + wpe[positions]
    h = x + c_proj(attention(q, k, v))          q, k, v = c_attn(layer_norm(x)) (+ bias)
    out = h + c_proj(gelu_tanh(c_fc(layer_norm(h))))

``embedding`` holds ``wte[ids] + wpe[positions]`` (Hugging Face's ``hidden_states[0]``; a
decode step adds the row of its own position). There is no RoPE: ``q_post_rope`` /
``k_post_rope`` hold Q and K as projected (after the bias). The MLP is StarCoder2's
(``gelu_new`` is the tanh approximation). Names and the Conv1D layout: ``mapping.gpt2``.
"""

from __future__ import annotations

import numpy as np

from aprtrace.arch.base import Emit, PassContext
from aprtrace.arch.llama import (
    AttentionWeights,
    add_qkv_bias,
    attend_and_project,
    qkv_projection,
    split_qkv,
)
from aprtrace.arch.starcoder2 import Starcoder2
from aprtrace.config import ModelConfig
from aprtrace.mapping.gpt2 import POSITIONS
from aprtrace.stages import Stage


class GPT2(Starcoder2):
    names = ("gpt2",)

    def expected_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        shapes = super().expected_shapes(cfg)
        return shapes | {POSITIONS: (cfg.max_position_embeddings, cfg.hidden_size)}

    def embed(self, model, ids: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """Token rows plus the learned position rows of ``positions`` (0.. by default)."""
        if positions is None:
            positions = np.arange(len(ids))
        return super().embed(model, ids) + model.tensor(POSITIONS).take(positions)

    def attention(
        self,
        cfg: ModelConfig,
        w: AttentionWeights,
        x: np.ndarray,
        layer: int,
        ctx: PassContext,
        emit: Emit,
    ) -> np.ndarray:
        """Pre-LayerNorm causal self-attention without RoPE; returns c_proj's output."""
        seq = x.shape[0]
        attn_norm = self.norm(cfg, x, w.input_layernorm, w.input_layernorm_bias)
        emit(Stage.ATTN_NORM, layer, attn_norm)

        qkv = qkv_projection(w, attn_norm)
        emit(Stage.QKV_MATMUL, layer, qkv)
        if w.has_qkv_bias:
            qkv = add_qkv_bias(cfg, w, qkv)
            emit(Stage.QKV_BIAS, layer, qkv)

        q, k, v = split_qkv(cfg, qkv)
        emit(Stage.Q_POST_ROPE, layer, q.reshape(seq, cfg.q_dim))  # no RoPE: Q as projected
        emit(Stage.K_POST_ROPE, layer, k.reshape(seq, cfg.kv_dim))

        return attend_and_project(self, cfg, w, q, k, v, layer, ctx, emit)
