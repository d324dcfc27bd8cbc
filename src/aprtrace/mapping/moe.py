"""Mixture-of-experts names: Qwen2-MoE, Qwen3-MoE, Mixtral in GGUF, safetensors and APR.

The forward pass reads one expert at a time under per-expert Hugging Face names,
``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`` (the layout of the Qwen MoE
checkpoints on the Hub), so containers that stack experts are split here into zero-copy
per-expert views of the stacked bytes:

- llama.cpp's GGUF: ``blk.N.ffn_{gate,up,down}_exps.weight`` ``[n_expert, rows, cols]``
  (NumPy order), router ``ffn_gate_inp`` ``[n_expert, hidden]``, Qwen2-MoE's shared expert
  ``ffn_{gate,up,down}_shexp`` and its gate ``ffn_gate_inp_shexp``. llama.cpp writes Mixtral
  as ``general.architecture = llama`` with ``llama.expert_count`` > 0 and Q/K rows permuted.
- transformers 5.x in memory (and any file saved that way): ``mlp.experts.gate_up_proj``
  ``[n_expert, 2*moe_intermediate, hidden]`` (gate rows first) and ``mlp.experts.down_proj``
  ``[n_expert, hidden, moe_intermediate]``, without a ``.weight`` suffix.
- Mixtral's original checkpoints: ``block_sparse_moe.gate`` and
  ``block_sparse_moe.experts.E.w1`` (gate) / ``w3`` (up) / ``w2`` (down).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from aprtrace import quant
from aprtrace.errors import ModelLoadError
from aprtrace.mapping import llama

GLOBAL = llama.GLOBAL
LAYER = {k: v for k, v in llama.LAYER.items() if k not in ("ffn_gate", "ffn_up", "ffn_down")} | {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",  # stacked: split by split_stacked_experts
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
# llama.cpp writes Mixtral through its llama converter, Q/K rows permuted.
QK_PERMUTED = frozenset({"mixtral"})
# The GGUF ``general.architecture`` llama.cpp writes for each MoE architecture.
GGUF_ARCH = {"qwen2moe": "qwen2moe", "qwen3moe": "qwen3moe", "mixtral": "llama"}
# Routing weights renormalised over the top-k in llama.cpp's graph for each GGUF
# architecture (``build_moe_ffn``'s norm_w), used when the file has no expert_weights_norm key.
GGUF_NORM_TOPK = {"qwen2moe": False, "qwen3moe": True, "mixtral": True}

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_STACKED = re.compile(
    r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)\.weight$"
)
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_MIXTRAL_EXPERT = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.")
_MIXTRAL_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def expert_name(layer: int, expert: int, projection: str) -> str:
    """The per-expert name the forward pass reads: ``expert_name(3, 5, "up_proj")``."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"


def rename_mixtral(tensors: dict) -> dict:
    """Mixtral's original names (``block_sparse_moe``, ``w1/w2/w3``) as Qwen-MoE-style names."""
    out = {}
    for name, tensor in tensors.items():
        m = _MIXTRAL_EXPERT.match(name)
        if m:
            prefix, expert, w = m.groups()
            rest = name[m.end() :]
            name = f"{prefix}.mlp.experts.{expert}.{_MIXTRAL_PROJ[w]}.{rest}"
        else:
            name = name.replace(".block_sparse_moe.", ".mlp.")
        out[name] = tensor
    return out


def _expert_views(
    tensor, layer: int, n_experts: int, parts: tuple[tuple[str, int], ...], where: str
) -> dict:
    """Zero-copy per-expert LazyTensors of a stacked ``[n_expert, rows, cols]`` tensor, each
    expert's rows cut into ``parts`` (projection, rows) in order, under per-expert names."""
    from aprtrace.model import LazyTensor

    if len(tensor.shape) != 3 or tensor.shape[0] != n_experts:
        raise ModelLoadError(
            f"{where}: stacked expert tensor '{tensor.name}' has shape {list(tensor.shape)}, "
            f"expected [{n_experts}, rows, cols]"
        )
    _, rows, cols = tensor.shape
    if sum(n for _, n in parts) != rows:
        raise ModelLoadError(
            f"{where}: stacked expert tensor '{tensor.name}' has {rows} rows per expert, "
            f"expected {sum(n for _, n in parts)}"
        )
    per_row = quant.row_bytes(tensor.qtype, cols)  # rows of whole blocks: exact byte slices
    raw = tensor.raw.reshape(-1).view("uint8")
    out = {}
    start = 0
    for expert in range(n_experts):
        for projection, n_rows in parts:
            name = expert_name(layer, expert, projection)
            chunk = raw[start : start + n_rows * per_row]
            out[name] = LazyTensor(name, (n_rows, cols), tensor.qtype, chunk, tensor.where)
            start += n_rows * per_row
    return out


def split_stacked_experts(tensors: Mapping, n_experts: int, moe_intermediate: int, where: str):
    """``tensors`` with stacked expert tensors replaced by per-expert views (see module doc)."""
    out = dict(tensors)
    for name in list(out):
        match = _STACKED.match(name) or _FUSED.match(name)
        if not match:
            continue
        tensor = out.pop(name)
        layer, kind = int(match.group(1)), match.group(2)
        if kind == "gate_up_proj":
            parts = (("gate_proj", moe_intermediate), ("up_proj", moe_intermediate))
        else:
            parts = ((kind, tensor.shape[1] if len(tensor.shape) == 3 else 0),)
        out |= _expert_views(tensor, layer, n_experts, parts, where)
    return out


def stack_experts(tensors: Mapping, num_layers: int, n_experts: int) -> dict:
    """Per-expert (or transformers 5.x fused) float arrays -> llama.cpp's stacked
    ``mlp.experts.{proj}.weight`` arrays (the GGUF writer's input); others pass through."""
    out = {}
    per_expert = {
        expert_name(i, e, p)
        for i in range(num_layers)
        for e in range(n_experts)
        for p in PROJECTIONS
    }
    for name, value in tensors.items():
        fused = _FUSED.match(name)
        if fused and fused.group(2) == "gate_up_proj":  # transformers 5.x: [E, 2*I, H]
            gate, up = np.split(np.asarray(value, dtype=np.float32), 2, axis=1)
            out[f"model.layers.{fused.group(1)}.mlp.experts.gate_proj.weight"] = gate
            out[f"model.layers.{fused.group(1)}.mlp.experts.up_proj.weight"] = up
        elif fused:
            out[f"model.layers.{fused.group(1)}.mlp.experts.down_proj.weight"] = value
        elif name not in per_expert:
            out[name] = value
    for i in range(num_layers):
        for p in PROJECTIONS:
            names = [expert_name(i, e, p) for e in range(n_experts)]
            if all(n in tensors for n in names):
                out[f"model.layers.{i}.mlp.experts.{p}.weight"] = np.stack(
                    [np.asarray(tensors[n], dtype=np.float32) for n in names]
                )
    return out


def apr_metadata(cfg) -> dict:
    """The MoE keys of APR metadata: aprender's three fields plus aprtrace's two."""
    if not cfg.is_moe:
        return {}
    return {
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size,
        "norm_topk_prob": cfg.norm_topk_prob,
    }


def _meta_int(meta: Mapping, key: str, where: str) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelLoadError(f"{where}: metadata '{key}' = {value!r} must be an integer")
    return value


def gguf_moe_fields(
    meta: Mapping, raw_arch: str, arch: str, shapes: Mapping[str, tuple[int, ...]], where: str
) -> dict:
    """The ModelConfig MoE fields from llama.cpp's ``<arch>.expert_*`` keys (sizes missing
    from the metadata are read off the stacked tensors)."""
    p = raw_arch + "."
    n_experts = _meta_int(meta, p + "expert_count", where) or 0
    if arch not in GGUF_ARCH:
        if n_experts:
            raise ModelLoadError(f"{where}: '{raw_arch}' with {p}expert_count is not supported")
        return {}
    used = _meta_int(meta, p + "expert_used_count", where)
    if not n_experts or not used:
        raise ModelLoadError(
            f"{where}: a {arch} GGUF needs {p}expert_count and {p}expert_used_count",
            hint="the file's metadata is incomplete; re-convert it with llama.cpp",
        )
    gating = meta.get(p + "expert_gating_func")
    if gating not in (None, 1):  # LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX
        raise ModelLoadError(
            f"{where}: expert gating function {gating!r} ({p}expert_gating_func) is not "
            "supported; aprtrace routes with softmax"
        )
    scale = meta.get(p + "expert_weights_scale")
    if scale not in (None, 1, 1.0):
        raise ModelLoadError(f"{where}: {p}expert_weights_scale = {scale!r} is not supported")
    gate_exps = shapes.get("blk.0.ffn_gate_exps.weight")
    inter = _meta_int(meta, p + "expert_feed_forward_length", where)
    if inter is None and arch == "mixtral":  # llama.cpp's Mixtral experts use n_ff
        inter = _meta_int(meta, p + "feed_forward_length", where)
    if inter is None and gate_exps is not None and len(gate_exps) == 3:
        inter = gate_exps[1]
    shexp = shapes.get("blk.0.ffn_gate_shexp.weight")
    shared = _meta_int(meta, p + "expert_shared_feed_forward_length", where)
    if shared is None:
        shared = shexp[0] if shexp is not None else 0
    norm = meta.get(p + "expert_weights_norm")
    return {
        "num_experts": n_experts,
        "num_experts_per_tok": used,
        "moe_intermediate_size": inter or 0,
        "shared_expert_intermediate_size": shared if shexp is not None else 0,
        "norm_topk_prob": bool(norm) if isinstance(norm, bool) else GGUF_NORM_TOPK[arch],
    }


def gguf_architecture(raw_arch: str, meta: Mapping) -> str | None:
    """The MoE architecture a GGUF's ``general.architecture`` stands for, if any: llama.cpp
    writes Mixtral as ``llama`` with experts."""
    if raw_arch == "llama" and meta.get("llama.expert_count"):
        return "mixtral"
    return None


def hf_moe_fields(raw: Mapping, arch: str, where: str) -> dict:
    """The ModelConfig MoE fields of a transformers ``config.json``; refuses what the forward
    pass does not implement (dense layers between MoE layers, router jitter is training-only)."""
    if arch not in GGUF_ARCH:
        return {}

    def integer(key: str, default: int | None = None) -> int:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelLoadError(f"{where}: config.json {key} = {value!r} must be an integer")
        return value

    if arch == "mixtral":
        return {
            "num_experts": integer("num_local_experts"),
            "num_experts_per_tok": integer("num_experts_per_tok"),
            "moe_intermediate_size": integer("intermediate_size"),
            "norm_topk_prob": True,  # MixtralTopKRouter always renormalises
        }
    if integer("decoder_sparse_step", 1) != 1 or raw.get("mlp_only_layers"):
        raise ModelLoadError(
            f"{where}: dense MLP layers between MoE layers (decoder_sparse_step "
            f"{raw.get('decoder_sparse_step')}, mlp_only_layers {raw.get('mlp_only_layers')}) "
            "are not supported",
            hint="aprtrace traces models whose every layer is a mixture of experts",
        )
    # transformers 5.x saves Qwen3-MoE's expert count as num_local_experts.
    count_key = "num_experts" if raw.get("num_experts") is not None else "num_local_experts"
    return {
        "num_experts": integer(count_key),
        "num_experts_per_tok": integer("num_experts_per_tok"),
        "moe_intermediate_size": integer("moe_intermediate_size"),
        "shared_expert_intermediate_size": (
            integer("shared_expert_intermediate_size", 0) if arch == "qwen2moe" else 0
        ),
        "norm_topk_prob": bool(raw.get("norm_topk_prob", False)),
    }


def hf_tensor_names(tensors: dict, cfg, where: str) -> dict:
    """A checkpoint's tensors under the names the forward pass reads (Mixtral's original
    names renamed, stacked / fused experts split per expert)."""
    if not cfg.is_moe:
        return tensors
    if cfg.architecture == "mixtral":
        tensors = rename_mixtral(tensors)
    return split_stacked_experts(tensors, cfg.num_experts, cfg.moe_intermediate_size, where)


def apr_moe_fields(metadata: Mapping, arch: str, tensors: Mapping, where: str) -> dict:
    """The ModelConfig MoE fields of APR metadata: aprender's ``num_experts``,
    ``num_experts_per_tok``, ``moe_intermediate_size``, and aprtrace's
    ``shared_expert_intermediate_size`` / ``norm_topk_prob`` (defaults: the shared expert's
    tensor shape, llama.cpp's per-architecture routing norm)."""
    if arch not in GGUF_ARCH:
        return {}
    fields = {}
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        value = _meta_int(metadata, key, where)
        if not value:
            raise ModelLoadError(
                f"{where}: a {arch} APR file needs metadata {key}",
                hint="aprender writes num_experts, num_experts_per_tok and moe_intermediate_size",
            )
        fields[key] = value
    shared = _meta_int(metadata, "shared_expert_intermediate_size", where)
    if shared is None:
        tensor = tensors.get("model.layers.0.mlp.shared_expert.gate_proj.weight")
        shared = tensor.shape[0] if tensor is not None else 0
    norm = metadata.get("norm_topk_prob")
    fields["shared_expert_intermediate_size"] = shared
    fields["norm_topk_prob"] = norm if isinstance(norm, bool) else GGUF_NORM_TOPK[arch]
    return fields


def hf_names_of_gguf_names(tensors: Mapping, arch: str) -> dict:
    """Tensors still under GGUF names (``blk.N.ffn_gate_exps.weight``) under HF names."""
    from aprtrace.mapping import gguf_to_hf

    return {
        (gguf_to_hf(name, arch) or name) if name.startswith("blk.") else name: tensor
        for name, tensor in tensors.items()
    }
