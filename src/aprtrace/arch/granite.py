"""Granite 3 (IBM): a Llama block with four scalar multipliers (``ModelConfig``).

    h0 = embedding_multiplier * embed(ids)
    h = x + residual_multiplier * o_proj(attention(...))      scores = attention_multiplier * q.k
    out = h + residual_multiplier * down(silu(gate) * up)
    logits = lm_head(rms_norm(h_last)) / logits_scaling

The stages keep their Llama meaning: ``embedding`` is the scaled embedding (the residual stream
entering layer 0), ``attn_out`` / ``ffn_out`` the projections before the multiplier,
``post_*_residual`` the sums after it, ``lm_head`` the divided logits.
"""

from __future__ import annotations

import numpy as np

from aprtrace.arch.base import Emit, PassContext
from aprtrace.arch.llama import LayerWeights, Llama
from aprtrace.config import ModelConfig
from aprtrace.stages import Stage


class Granite(Llama):
    names = ("granite",)

    def embed(self, model, ids: np.ndarray) -> np.ndarray:
        return super().embed(model, ids) * np.float32(model.config.embedding_multiplier)

    def layer(
        self,
        cfg: ModelConfig,
        w: LayerWeights,
        x: np.ndarray,
        layer: int,
        ctx: PassContext,
        emit: Emit,
    ) -> np.ndarray:
        scale = np.float32(cfg.residual_multiplier)
        hidden = x + self.attention(cfg, w, x, layer, ctx, emit) * scale
        hidden = emit(Stage.POST_ATTN_RESIDUAL, layer, hidden)
        hidden = hidden + self.mlp(cfg, w, hidden, layer, emit) * scale
        hidden = emit(Stage.POST_FFN_RESIDUAL, layer, hidden)
        return hidden

    def logits(self, model, h_last: np.ndarray, chunk: int) -> np.ndarray:
        return super().logits(model, h_last, chunk) / np.float32(model.config.logits_scaling)
