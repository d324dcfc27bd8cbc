"""StableLM (StableLM-3B-4E1T, StableLM 2 1.6B): a Llama block with LayerNorm (weight and
bias) instead of RMSNorm, and partial rotary (``partial_rotary_factor``, 0.25 by default).

    h = x + o_proj(attention(rope(q), rope(k), v))      q, k, v = proj(layer_norm(x))
    out = h + down(silu(gate(layer_norm(h))) * up(layer_norm(h)))

``attn_norm``, ``ffn_norm`` and ``final_norm`` hold the LayerNorm outputs. The parallel
residual and per-head Q/K LayerNorm variants (StableLM 2 12B) are refused when the file is
opened.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from aprtrace.arch import ops
from aprtrace.arch.llama import LayerWeights, Llama
from aprtrace.config import ModelConfig
from aprtrace.model import layer_name

_NORMS = ("input_layernorm", "post_attention_layernorm")


class LayerNormLlama(Llama):
    """Llama with ``torch.nn.LayerNorm`` (weight and bias) everywhere RMSNorm was."""

    names = ()  # a base class: registers no architecture itself

    def norm(
        self, cfg: ModelConfig, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None
    ) -> np.ndarray:
        return ops.layer_norm(x, weight, bias, cfg.rms_norm_eps)

    def expected_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        shapes = super().expected_shapes(cfg)
        h = (cfg.hidden_size,)
        shapes["model.norm.bias"] = h
        for i in range(cfg.num_layers):
            shapes |= {layer_name(i, f"{norm}.bias"): h for norm in _NORMS}
        return shapes

    def load_layer(self, model, layer: int) -> LayerWeights:
        """Llama's weights plus the LayerNorm biases."""
        h = (model.config.hidden_size,)
        biases = {
            f"{norm}_bias": model.weight(layer_name(layer, f"{norm}.bias"), h) for norm in _NORMS
        }
        return dataclasses.replace(super().load_layer(model, layer), **biases)

    def final_norm(self, model, hidden: np.ndarray) -> np.ndarray:
        cfg = model.config
        h = (cfg.hidden_size,)
        weight = model.weight("model.norm.weight", h)
        return ops.layer_norm(hidden, weight, model.weight("model.norm.bias", h), cfg.rms_norm_eps)


class StableLM(LayerNormLlama):
    names = ("stablelm",)
