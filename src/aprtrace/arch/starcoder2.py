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
from aprtrace.arch.llama import LayerWeights, attention_shapes, model_shapes
from aprtrace.arch.stablelm import LayerNormLlama
from aprtrace.config import ModelConfig
from aprtrace.model import layer_name
from aprtrace.stages import Stage


class Starcoder2(LayerNormLlama):
    names = ("starcoder2",)

    def expected_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        h = (cfg.hidden_size,)
        per_layer = {
            "input_layernorm.weight": h,
            "input_layernorm.bias": h,
            "post_attention_layernorm.weight": h,
            "post_attention_layernorm.bias": h,
            "mlp.c_fc.weight": (cfg.intermediate_size, cfg.hidden_size),
            "mlp.c_proj.weight": (cfg.hidden_size, cfg.intermediate_size),
        }
        shapes = model_shapes(cfg, per_layer | attention_shapes(cfg))
        shapes["model.norm.bias"] = h
        return shapes

    def load_layer(self, model, layer: int) -> LayerWeights:
        cfg = model.config
        h, q, kv, inter = cfg.hidden_size, cfg.q_dim, cfg.kv_dim, cfg.intermediate_size

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
            q_norm=None,
            k_norm=None,
            o_proj=w("self_attn.o_proj.weight", (h, q)),
            o_bias=opt("self_attn.o_proj.bias", (h,)),
            post_attention_layernorm=w("post_attention_layernorm.weight", (h,)),
            gate_proj=None,
            up_proj=w("mlp.c_fc.weight", (inter, h)),
            down_proj=w("mlp.c_proj.weight", (h, inter)),
            gate_bias=None,
            up_bias=opt("mlp.c_fc.bias", (inter,)),
            down_bias=opt("mlp.c_proj.bias", (h,)),
            **self.norm_biases(model, layer),
        )

    def mlp(
        self, cfg: ModelConfig, w: LayerWeights, x: np.ndarray, layer: int, emit: Emit
    ) -> np.ndarray:
        """LayerNorm, then the non-gated GELU feed-forward; returns c_proj's output."""
        ffn_norm = self.norm(cfg, x, w.post_attention_layernorm, w.post_attention_layernorm_bias)
        emit(Stage.FFN_NORM, layer, ffn_norm)
        up = ops.linear(ffn_norm, w.up_proj, w.up_bias)
        emit(Stage.FFN_UP, layer, up)
        activated = ops.gelu_tanh(up)
        emit(Stage.FFN_SILU, layer, activated)
        ffn_out = ops.linear(activated, w.down_proj, w.down_bias)
        emit(Stage.FFN_OUT, layer, ffn_out)
        return ffn_out
