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

from aprtrace.mapping import llama, moe

# architecture -> (global names, per-layer names); GGUF short name -> HF module path.
_TABLES: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "llama": (llama.GLOBAL, llama.LAYER),
    "qwen2": (llama.GLOBAL, llama.LAYER),
    "qwen3": (llama.GLOBAL, llama.LAYER),
    "qwen2moe": (moe.GLOBAL, moe.LAYER),
    "qwen3moe": (moe.GLOBAL, moe.LAYER),
    "mixtral": (moe.GLOBAL, moe.LAYER),
}
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


__all__ = ["gguf_qk_permuted", "gguf_to_hf", "hf_to_gguf"]
