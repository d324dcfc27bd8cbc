"""StarCoder2: LayerNorm with bias, biases on every projection, a non-gated GELU MLP.

    h = x + o_proj(attention(rope(q), rope(k), v))      q, k, v = proj(layer_norm(x)) (+ bias)
    out = h + c_proj(gelu_tanh(c_fc(layer_norm(h))))

The MLP has no gate: ``ffn_up`` holds ``c_fc`` (+ bias), ``ffn_silu`` the activation
``gelu_tanh(ffn_up)``, ``ffn_out`` ``c_proj`` (+ bias); ``ffn_gate`` and ``ffn_swigl`` do not
exist. The attention window is ``sliding_window`` when the config sets one.
"""

from __future__ import annotations

import numpy as np

from aprtrace.arch import ops
from aprtrace.arch.base import Emit
from aprtrace.arch.llama import LayerWeights
from aprtrace.arch.stablelm import LayerNormLlama
from aprtrace.config import ModelConfig
from aprtrace.stages import Stage


class Starcoder2(LayerNormLlama):
    names = ("starcoder2",)
    mlp_modules = (None, "mlp.c_fc", "mlp.c_proj")

    def mlp(
        self, cfg: ModelConfig, w: LayerWeights, x: np.ndarray, layer: int, emit: Emit
    ) -> np.ndarray:
        """LayerNorm, then the non-gated GELU feed-forward; returns c_proj's output."""
        ffn_norm = self.norm(cfg, x, w.post_attention_layernorm, w.post_attention_layernorm_bias)
        ffn_norm = emit(Stage.FFN_NORM, layer, ffn_norm)
        up = ops.linear(ffn_norm, w.up_proj, w.up_bias)
        up = emit(Stage.FFN_UP, layer, up)
        activated = ops.gelu_tanh(up)
        activated = emit(Stage.FFN_SILU, layer, activated)
        ffn_out = ops.linear(activated, w.down_proj, w.down_bias)
        ffn_out = emit(Stage.FFN_OUT, layer, ffn_out)
        return ffn_out
