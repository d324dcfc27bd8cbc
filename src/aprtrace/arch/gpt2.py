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

from aprtrace.arch.base import PassContext
from aprtrace.arch.starcoder2 import Starcoder2
from aprtrace.config import ModelConfig
from aprtrace.mapping.gpt2 import POSITIONS


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

    def position_encode(
        self, cfg: ModelConfig, x: np.ndarray, norm: np.ndarray | None, ctx: PassContext
    ) -> np.ndarray:
        """No RoPE (positions are learned, added in ``embed``): q/k_post_rope hold Q and K as
        projected."""
        return x
