"""Container names and conventions -> Hugging Face names and layout, per architecture.

Container readers (``aprtrace.formats``) parse bytes only; this layer says what a GGUF
tensor is called in Hugging Face terms and which stored conventions must be undone
(llama.cpp's Q/K row permutation, and per architecture: stored norm offsets, stacked
experts, fused projections). Loading, tensor checks and the GGUF writer all read it.

Adding an architecture: a module beside ``llama.py`` with its ``GLOBAL`` / ``LAYER`` tables
(extending the shared ones) and a line in ``_TABLES``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np

from aprtrace.errors import ModelLoadError
from aprtrace.mapping import gemma, llama, moe, olmo2, phi3, starcoder2

# architecture -> (global names, per-layer names); GGUF short name -> HF module path.
_TABLES: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "llama": (llama.GLOBAL, llama.LAYER),
    "qwen2": (llama.GLOBAL, llama.LAYER),
    "qwen3": (llama.GLOBAL, llama.LAYER),
    "qwen2moe": (moe.GLOBAL, moe.LAYER),
    "qwen3moe": (moe.GLOBAL, moe.LAYER),
    "mixtral": (moe.GLOBAL, moe.LAYER),
    "gemma2": (gemma.GLOBAL, gemma.LAYER),
    "gemma3": (gemma.GLOBAL, gemma.LAYER),
    "phi3": (phi3.GLOBAL, phi3.LAYER),
    "olmo2": (olmo2.GLOBAL, olmo2.LAYER),
    "granite": (llama.GLOBAL, llama.LAYER),
    "stablelm": (llama.GLOBAL, llama.LAYER),
    "starcoder2": (llama.GLOBAL, starcoder2.LAYER),
}
# architecture -> what a GGUF adds to its RMSNorm weights (Gemma's stored ``w + 1``).
_GGUF_NORM_OFFSETS = {"gemma2": gemma.NORM_OFFSET, "gemma3": gemma.NORM_OFFSET}
_QK_PERMUTED = llama.QK_PERMUTED | moe.QK_PERMUTED

_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.([a-z_0-9.]+)\.(weight|bias)$")
_GGUF_GLOBAL = re.compile(r"^([a-z_0-9]+)\.(weight|bias)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def _tables(arch: str | None) -> tuple[dict[str, str], dict[str, str]]:
    return _TABLES.get(arch or "llama", _TABLES["llama"])


def gguf_to_hf(gguf_name: str, arch: str | None = None) -> str | None:
    """Hugging Face name of a GGUF tensor (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``), or None if it has no counterpart."""
    global_names, layer_names = _tables(arch)
    m = _GGUF_LAYER.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        hf = layer_names.get(part)
        return f"model.layers.{int(layer)}.{hf}.{kind}" if hf else None
    m = _GGUF_GLOBAL.match(gguf_name)
    if m:
        part, kind = m.groups()
        hf = global_names.get(part)
        return f"{hf}.{kind}" if hf else None
    return None


def hf_to_gguf(hf_name: str, arch: str | None = None) -> str | None:
    """GGUF name of a Hugging Face tensor name, or None if llama.cpp has no such tensor."""
    global_names, layer_names = _tables(arch)
    for short, hf in global_names.items():
        for kind in ("weight", "bias"):
            if hf_name == f"{hf}.{kind}":
                return f"{short}.{kind}"
    m = _HF_LAYER.match(hf_name)
    if m:
        layer, module, kind = m.groups()
        for short, hf in layer_names.items():
            if hf == module:
                return f"blk.{layer}.{short}.{kind}"
    return None


def gguf_qk_permuted(arch: str) -> bool:
    """Whether a GGUF of ``arch`` stores Q/K rows in llama.cpp's permuted order."""
    return arch in _QK_PERMUTED


# architecture -> module reading its extra ModelConfig fields from container metadata.
_CONFIG_FIELDS = {"gemma2": gemma, "gemma3": gemma}


def gguf_config_fields(
    arch: str, meta, num_layers: int, hidden: int, heads: int, head_dim: int, where: str
) -> dict:
    """ModelConfig fields beyond the Llama ones, from ``arch``'s GGUF keys ({} for Llama)."""
    module = _CONFIG_FIELDS.get(arch)
    if module is None:
        return {}
    return module.gguf_config_fields(arch, meta, num_layers, hidden, heads, head_dim, where)


def hf_config_fields(arch: str, raw, num_layers: int, where: str) -> dict:
    """ModelConfig fields beyond the Llama ones, from a transformers config.json."""
    module = _CONFIG_FIELDS.get(arch)
    return module.hf_config_fields(arch, raw, num_layers, where) if module else {}


def apr_metadata_fields(cfg) -> dict:
    """APR custom metadata for the ModelConfig fields beyond the Llama ones, under their
    config.json names (read back by ``hf_config_fields``); {} for Llama."""
    module = _CONFIG_FIELDS.get(cfg.architecture)
    return module.apr_metadata_fields(cfg) if module else {}


def hf_global_rope(arch: str, raw: dict) -> dict:
    """``raw`` with the global layers' RoPE parameters where the Llama reader looks for them."""
    module = _CONFIG_FIELDS.get(arch)
    return module.hf_global_rope(raw) if module else raw


def gguf_norm_offset(arch: str) -> float:
    """What a GGUF of ``arch`` adds to each RMSNorm weight (0: stored as Hugging Face's)."""
    return _GGUF_NORM_OFFSETS.get(arch, 0.0)


def is_norm_weight(hf_name: str) -> bool:
    """Whether a Hugging Face tensor is an RMSNorm weight (the ones a norm offset applies to)."""
    return gemma.is_offset_norm(hf_name)


# Fused Hugging Face modules -> the Llama modules they hold, in row order. Loading splits any
# of them it finds (Phi-3 checkpoints, GGUF ``attn_qkv``, aprender's APR); writers and the
# transformers engine fuse them again for the architectures that store them fused.
FUSED: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_STORED_FUSED: dict[str, tuple[str, ...]] = {"phi3": ("self_attn.qkv_proj", "mlp.gate_up_proj")}
_HF_FUSED = re.compile(
    r"^(model\.layers\.\d+)\.(self_attn\.qkv_proj|mlp\.gate_up_proj)\.(weight|bias)$"
)


def part_rows(cfg: Any, fused: str) -> tuple[int, ...]:
    """Rows of each part of the fused module ``fused`` for config ``cfg``."""
    if fused == "self_attn.qkv_proj":
        return (cfg.q_dim, cfg.kv_dim, cfg.kv_dim)
    return (cfg.intermediate_size, cfg.intermediate_size)


def stored_fused(arch: str) -> tuple[str, ...]:
    """The fused modules a checkpoint of ``arch`` holds (Phi-3: qkv_proj, gate_up_proj)."""
    return _STORED_FUSED.get(arch, ())


def split_fused(tensors: MutableMapping[str, Any], cfg: Any, where: str) -> None:
    """Replace every fused ``qkv_proj`` / ``gate_up_proj`` LazyTensor by zero-copy row slices
    under the Llama names (q/k/v_proj, gate/up_proj), checking the row counts against ``cfg``."""
    from aprtrace import quant
    from aprtrace.model import LazyTensor

    for name in [n for n in tensors if _HF_FUSED.match(n)]:
        prefix, module, kind = _HF_FUSED.match(name).groups()
        fused = tensors.pop(name)
        rows = part_rows(cfg, module)
        if fused.shape[0] != sum(rows):
            raise ModelLoadError(
                f"{where}: fused '{name}' has {fused.shape[0]} rows, the config needs "
                f"{' + '.join(map(str, rows))} ({', '.join(FUSED[module])})"
            )
        if len(fused.shape) == 2:
            per_row = quant.row_bytes(fused.qtype, fused.shape[1])
        elif fused.qtype in ("F32", "F16", "BF16"):
            per_row = 4 if fused.qtype == "F32" else 2
        else:
            raise ModelLoadError(f"{where}: cannot split a {fused.qtype} fused bias '{name}'")
        raw = fused.raw.reshape(-1)
        start = 0
        for part, n_rows in zip(FUSED[module], rows, strict=True):
            part_name = f"{prefix}.{part}.{kind}"
            if part_name in tensors:
                raise ModelLoadError(f"{where}: both fused '{name}' and '{part_name}' are present")
            chunk = raw[start * per_row : (start + n_rows) * per_row]
            shape = (n_rows, *fused.shape[1:])
            tensors[part_name] = LazyTensor(part_name, shape, fused.qtype, chunk, fused.where)
            start += n_rows


def fuse(tensors: Mapping[str, np.ndarray], arch: str) -> dict[str, np.ndarray]:
    """Hugging Face float arrays with the parts of ``arch``'s stored-fused modules
    concatenated (q/k/v_proj -> qkv_proj, ...); other tensors pass through."""
    out = dict(tensors)
    for fused in stored_fused(arch):
        parts = FUSED[fused]
        for name in [n for n in tensors if f".{parts[0]}." in n]:
            names = [name.replace(f".{parts[0]}.", f".{p}.") for p in parts]
            if not all(n in out for n in names):
                continue
            out[name.replace(f".{parts[0]}.", f".{fused}.")] = np.concatenate(
                [np.asarray(out.pop(n)) for n in names]
            )
    return out


__all__ = [
    "FUSED",
    "apr_metadata_fields",
    "fuse",
    "gguf_config_fields",
    "gguf_norm_offset",
    "gguf_qk_permuted",
    "gguf_to_hf",
    "hf_config_fields",
    "hf_global_rope",
    "hf_to_gguf",
    "is_norm_weight",
    "part_rows",
    "split_fused",
    "stored_fused",
]
