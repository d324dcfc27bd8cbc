"""Gemma 2 / Gemma 3 names and stored conventions.

llama.cpp names the four norms of a Gemma block ``attn_norm`` (input_layernorm),
``post_attention_norm``, ``ffn_norm`` (pre_feedforward_layernorm) and ``post_ffw_norm``;
Gemma 3 adds the per-head ``attn_q_norm`` / ``attn_k_norm``. Gemma RMSNorm multiplies by
``1 + w``; llama.cpp's converter (``Gemma2Model`` / ``Gemma3Model.modify_tensors``) stores
``w + 1`` for every tensor whose name ends in ``norm.weight`` so its plain RMSNorm kernel
applies. aprtrace hands the forward Hugging Face's ``w``: ``NORM_OFFSET`` is subtracted on
load from a GGUF and added back by the GGUF writer. Q/K rows keep Hugging Face's order
(Gemma uses NeoX RoPE in llama.cpp).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from aprtrace.errors import ModelLoadError
from aprtrace.mapping import llama

GLOBAL = dict(llama.GLOBAL)
LAYER = {
    **{k: v for k, v in llama.LAYER.items() if k != "ffn_norm"},
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# What llama.cpp's converter adds to every Gemma RMSNorm weight.
NORM_OFFSET = 1.0
# llama.cpp's default layer patterns (``set_swa_pattern``): every n-th layer is global.
SLIDING_WINDOW_PATTERN = {"gemma2": 2, "gemma3": 6}
# Gemma 3's RoPE base on sliding-window layers when the GGUF does not say (llama.cpp's
# ``rope_freq_base_train_swa``).
LOCAL_ROPE_THETA = 10000.0
# Layer counts llama.cpp takes as the 27B models, whose query scale is hidden / heads.
QUERY_SCALE_BY_HIDDEN = {"gemma2": 46, "gemma3": 62}


def is_offset_norm(hf_name: str) -> bool:
    """Whether a Hugging Face tensor is a Gemma RMSNorm weight (stored ``+1`` in GGUF)."""
    return hf_name.endswith("norm.weight")


def layer_types(pattern: int, num_layers: int) -> tuple[str, ...]:
    """transformers' ``layer_types`` for a sliding-window pattern (every ``pattern``-th layer
    global), which is also llama.cpp's ``set_swa_pattern``."""
    return tuple(
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)
    )


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ModelLoadError(f"{where}: {what} = {value!r} must be a positive number")
    return float(value)


def _window(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelLoadError(f"{where}: {what} = {value!r} must be a positive integer")
    return int(value)


def gguf_config_fields(
    arch: str,
    meta: Mapping[str, Any],
    num_layers: int,
    hidden: int,
    heads: int,
    head_dim: int,
    where: str,
) -> dict[str, Any]:
    """The Gemma fields of ModelConfig from GGUF metadata, read as llama.cpp reads them.

    ``{arch}.attention.sliding_window`` (Gemma 2 defaults to 4096), the layer pattern
    (``attention.sliding_window_pattern`` as a per-layer bool array or a period, else
    llama.cpp's fixed period), Gemma 3's local RoPE base (``rope.freq_base_swa``, else 10000),
    Gemma 2's soft-caps (``attn_logit_softcapping``, ``final_logit_softcapping``, defaults
    50 / 30 as llama.cpp's hparams). llama.cpp keeps no query scale key: it uses
    ``head_dim ** -0.5``, except ``(hidden / heads) ** -0.5`` for the 27B layer counts.
    """
    p = arch + "."
    window_key = p + "attention.sliding_window"
    if window_key not in meta and arch == "gemma3":
        raise ModelLoadError(f"{where}: required metadata '{window_key}' is missing")
    window = _window(meta.get(window_key, 4096), window_key, where)
    pattern = meta.get(p + "attention.sliding_window_pattern", SLIDING_WINDOW_PATTERN[arch])
    if isinstance(pattern, (list, np.ndarray)) and not isinstance(pattern, str):
        flags = [bool(v) for v in np.asarray(pattern).reshape(-1).tolist()]
        if len(flags) != num_layers:
            raise ModelLoadError(
                f"{where}: {p}attention.sliding_window_pattern has {len(flags)} entries for "
                f"{num_layers} layers"
            )
        kinds = tuple("sliding_attention" if f else "full_attention" for f in flags)
    else:
        kinds = layer_types(
            _window(pattern, p + "attention.sliding_window_pattern", where), num_layers
        )
    fields: dict[str, Any] = {
        "sliding_window": window,
        "layer_types": kinds,
        "query_pre_attn_scalar": float(
            hidden // heads if num_layers == QUERY_SCALE_BY_HIDDEN[arch] else head_dim
        ),
    }
    if arch == "gemma3":
        key = p + "rope.freq_base_swa"
        fields["rope_local_theta"] = _number(meta.get(key, LOCAL_ROPE_THETA), key, where)
    else:
        for name, default in (("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0)):
            fields[name] = _number(meta.get(p + name, default), p + name, where)
    return fields


def hf_config_fields(arch: str, raw: Mapping[str, Any], num_layers: int, where: str) -> dict:
    """The Gemma fields of ModelConfig from a transformers config.json (v4 or v5 layout)."""
    activation = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ModelLoadError(
            f"{where}: {arch} with hidden_activation {activation!r} is not supported",
            hint="aprtrace's Gemma MLP is GELU with the tanh approximation (gelu_pytorch_tanh)",
        )
    window = raw.get("sliding_window")
    kinds = raw.get("layer_types")
    if kinds is None:
        pattern = raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern")
        kinds = layer_types(
            _window(pattern or SLIDING_WINDOW_PATTERN[arch], "sliding_window_pattern", where),
            num_layers,
        )
    if not isinstance(kinds, (list, tuple)) or not all(isinstance(k, str) for k in kinds):
        raise ModelLoadError(f"{where}: config.json layer_types = {kinds!r} is not a list")
    fields: dict[str, Any] = {
        "sliding_window": _window(window, "sliding_window", where) if window is not None else None,
        "layer_types": tuple(kinds),
        "query_pre_attn_scalar": _number(
            raw.get("query_pre_attn_scalar", 256), "query_pre_attn_scalar", where
        ),
    }
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = raw.get(name)
        fields[name] = _number(value, name, where) if value is not None else None
    if arch == "gemma3":
        rope = raw.get("rope_parameters")
        local = None
        if isinstance(rope, dict) and isinstance(rope.get("sliding_attention"), dict):
            local = rope["sliding_attention"].get("rope_theta")
            kind = rope["sliding_attention"].get("rope_type", "default")
            if kind != "default":
                raise ModelLoadError(
                    f"{where}: RoPE scaling '{kind}' on the sliding-window layers is not supported",
                    hint="aprtrace scales (linearly) the global layers of Gemma 3 only",
                )
        if local is None:
            local = raw.get("rope_local_base_freq", LOCAL_ROPE_THETA)
        fields["rope_local_theta"] = _number(local, "rope_local_base_freq", where)
    return fields


def hf_global_rope(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma 3's v5 ``rope_parameters`` keep one dict per layer kind: the global layers' one
    (theta, scaling) is what the Llama-style reader expects at the top level."""
    rope = raw.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
        return {**raw, "rope_parameters": rope["full_attention"]}
    return dict(raw)


def apr_metadata_fields(cfg: Any) -> dict[str, Any]:
    """The Gemma fields of ``cfg`` under their config.json names (APR custom metadata)."""
    fields: dict[str, Any] = {
        "sliding_window": cfg.sliding_window,
        "layer_types": list(cfg.layer_types) if cfg.layer_types is not None else None,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
        "attn_logit_softcapping": cfg.attn_logit_softcapping,
        "final_logit_softcapping": cfg.final_logit_softcapping,
    }
    if cfg.architecture == "gemma3":
        fields["rope_local_base_freq"] = cfg.rope_local_theta
    return fields
