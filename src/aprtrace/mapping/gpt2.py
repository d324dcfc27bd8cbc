"""GPT-2 names and layout: Conv1D weights, one fused ``c_attn``, learned positions.

aprtrace computes GPT-2 under the Llama module names its other architectures use, so the
forward pass, tensor checks and writers share them:

    HF GPT2LMHeadModel                          aprtrace (HF layout [out, in])    GGUF
    transformer.wte                             model.embed_tokens                token_embd
    transformer.wpe                             model.embed_positions             position_embd
    transformer.h.N.ln_1 (+ bias)               input_layernorm                   attn_norm
    transformer.h.N.attn.c_attn (Conv1D)        self_attn.{q,k,v}_proj            attn_qkv
    transformer.h.N.attn.c_proj (Conv1D)        self_attn.o_proj                  attn_output
    transformer.h.N.ln_2 (+ bias)               post_attention_layernorm          ffn_norm
    transformer.h.N.mlp.c_fc / c_proj (Conv1D)  mlp.c_fc / mlp.c_proj             ffn_up / ffn_down
    transformer.ln_f (+ bias)                   model.norm                        output_norm

Hugging Face's ``Conv1D`` stores its weight as ``[in, out]``: reading a checkpoint transposes
those four weights (a copy of their bytes, no decoding), and the transformers engine
transposes them back. llama.cpp's converter writes them transposed to ``[out, in]`` already,
``attn_qkv`` with rows ``[Q|K|V]`` (split on load like Phi-3's). No RoPE: no Q/K permutation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from aprtrace.errors import ModelLoadError
from aprtrace.mapping import llama

GLOBAL = {k: v for k, v in llama.GLOBAL.items() if k != "rope_freqs"} | {
    "position_embd": "model.embed_positions",
}
LAYER = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
POSITIONS = "model.embed_positions.weight"

# transformers' GPT-2 module -> aprtrace's (global and per layer); Conv1D ones transposed.
_HF_GLOBAL = {
    "wte": "model.embed_tokens",
    "wpe": "model.embed_positions",
    "ln_f": "model.norm",
}
_HF_LAYER = {
    "ln_1": "input_layernorm",
    "attn.c_attn": "self_attn.qkv_proj",
    "attn.c_proj": "self_attn.o_proj",
    "ln_2": "post_attention_layernorm",
    "mlp.c_fc": "mlp.c_fc",
    "mlp.c_proj": "mlp.c_proj",
}
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_HF_NAME = re.compile(r"^(?:transformer\.)?(?:h\.(\d+)\.)?([a-z_.0-9]+)\.(weight|bias)$")
# Buffers of old checkpoints (the causal mask), not weights.
_BUFFERS = re.compile(r"^(?:transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")

# config.json (GPT2Config) -> the Llama-style keys the safetensors reader reads.
_CONFIG_KEYS = {
    "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_positions": "max_position_embeddings",
    "layer_norm_epsilon": "layer_norm_eps",
    "activation_function": "hidden_act",
}


def hf_config(raw: dict, where: str) -> dict:
    """A GPT2Config ``config.json`` under the Llama keys, refusing the switches aprtrace
    does not compute (scaled-by-layer or unscaled attention, upcast reordering)."""
    for key, wanted, feature in (
        ("scale_attn_weights", True, "attention without the 1/sqrt(head_dim) scale"),
        ("scale_attn_by_inverse_layer_idx", False, "attention scaled by 1/(layer + 1)"),
        ("reorder_and_upcast_attn", False, "reorder_and_upcast_attn"),
        ("add_cross_attention", False, "cross-attention"),
    ):
        if raw.get(key, wanted) != wanted:
            raise ModelLoadError(
                f"{where}: GPT-2 {feature} ({key} = {raw[key]!r}) is not supported",
                hint="see the README's list of supported architectures and features",
            )
    out = dict(raw)
    for old, new in _CONFIG_KEYS.items():
        if old in raw:
            out[new] = raw[old]
    hidden = out.get("hidden_size")
    inner = raw.get("n_inner")
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        out["intermediate_size"] = inner if inner is not None else 4 * hidden
    return out


def _transposed(tensor, name: str):
    """A 2-D LazyTensor ``[in, out]`` as ``[out, in]`` (its bytes copied transposed)."""
    from aprtrace.model import LazyTensor

    rows, cols = tensor.shape
    width = tensor.raw.nbytes // max(1, rows * cols)
    raw = tensor.raw.reshape(-1).view(np.uint8).reshape(rows, cols, width)
    data = np.ascontiguousarray(raw.transpose(1, 0, 2)).reshape(-1)
    return LazyTensor(name, (cols, rows), tensor.qtype, data, tensor.where)


def hf_tensor_names(tensors: Mapping, where: str) -> dict:
    """A GPT2LMHeadModel checkpoint's tensors under aprtrace's names and ``[out, in]``
    layout (``c_attn`` still fused; ``split_fused`` splits it)."""
    out = {}
    for name, tensor in tensors.items():
        if _BUFFERS.match(name):
            continue
        if name == "lm_head.weight":
            out[name] = tensor
            continue
        m = _HF_NAME.match(name)
        layer, module, kind = m.groups() if m else (None, None, None)
        target = (_HF_LAYER if layer is not None else _HF_GLOBAL).get(module or "")
        if target is None:
            raise ModelLoadError(f"{where}: tensor '{name}' is not part of a GPT-2 model")
        new = (
            f"model.layers.{int(layer)}.{target}.{kind}"
            if layer is not None
            else f"{target}.{kind}"
        )
        if module in CONV1D and kind == "weight":
            if len(tensor.shape) != 2:
                raise ModelLoadError(f"{where}: Conv1D weight '{name}' is not 2-D")
            tensor = _transposed(tensor, new)
        out[new] = tensor
    return out


def transformers_name(hf_name: str) -> tuple[str, bool] | None:
    """(aprtrace name, transposed?) of a GPT2LMHeadModel parameter; None for lm_head."""
    if hf_name == "lm_head.weight":
        return None
    m = _HF_NAME.match(hf_name)
    if not m:
        return None
    layer, module, kind = m.groups()
    target = (_HF_LAYER if layer is not None else _HF_GLOBAL).get(module)
    if target is None:
        return None
    name = f"model.layers.{int(layer)}.{target}.{kind}" if layer is not None else f"{target}.{kind}"
    return name, module in CONV1D and kind == "weight"


def from_transformers_arrays(tensors: Mapping) -> dict:
    """A GPT2LMHeadModel state dict (``transformer.h.N.attn.c_attn.weight`` ``[in, out]``,
    ...) as float arrays under aprtrace's names, ``[out, in]``; names already aprtrace's
    pass through, the causal-mask buffers are dropped."""
    out = {}
    for name, values in tensors.items():
        if _BUFFERS.match(name):
            continue
        found = transformers_name(name)
        if found is None:
            out[name] = values
            continue
        target, conv1d = found
        out[target] = np.asarray(values).T if conv1d else values
    return out
