"""Hugging Face checkpoints: ``config.json`` + safetensors weights (+ ``tokenizer.json``).

The safetensors header is parsed here with strict bounds checks and every F32/F16/BF16 tensor
becomes a zero-copy view of a memory map. Weights are in Hugging Face layout (no Q/K
permutation).
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from aprtrace.config import (
    MAX_CONTEXT,
    ROPE_FREQS,
    ModelConfig,
    llama3_rope_factors,
    normalize_architecture,
)
from aprtrace.errors import InvalidFormatError, ModelLoadError, NotFoundError, OutputError
from aprtrace.formats.gguf import check_tensors
from aprtrace.mapping import hf_config_fields, hf_global_rope, split_fused
from aprtrace.mapping import moe as moe_mapping
from aprtrace.model import LazyTensor, Model
from aprtrace.safeio import file_kind, loads_json, path_text, read_json_file

MAX_HEADER_SIZE = 100 * 1024 * 1024
# config.json and the shard index are kilobytes; the index of a 400B model is about 100 KB.
MAX_JSON_SIZE = 64 << 20
_DTYPES = {"F32": ("F32", 4), "F16": ("F16", 2), "BF16": ("BF16", 2)}
INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"


def _bad(path: Path, what: str) -> InvalidFormatError:
    return InvalidFormatError(
        f"{path}: {what}", hint="the safetensors file is corrupt or truncated; re-download it"
    )


def read_safetensors(path: Path) -> dict[str, LazyTensor]:
    """Every tensor of one ``.safetensors`` file as a LazyTensor over a memory map."""
    path = Path(path)
    kind = file_kind(path.resolve())
    if kind not in ("file", None):
        raise _bad(path, f"is a {kind}, not a regular file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"truncated: {size} bytes, no header length")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, MAX_HEADER_SIZE):
                raise _bad(path, f"header length {header_len} exceeds the file ({size} bytes)")
            header_raw = f.read(header_len)
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    header = loads_json(header_raw, lambda why: _bad(path, f"header is not valid JSON ({why})"))
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    data_start = 8 + header_len
    data_len = size - data_start
    data = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    tensors: dict[str, LazyTensor] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise _bad(path, f"tensor '{name}': entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise _bad(path, f"tensor '{name}': malformed shape or data_offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise _bad(path, f"tensor '{name}': bytes [{begin}, {end}) lie outside the data")
        if dtype not in _DTYPES:
            raise ModelLoadError(
                f"{path}: tensor '{name}' has dtype {dtype}",
                hint="aprtrace reads F32, F16 and BF16 safetensors checkpoints",
            )
        qtype, width = _DTYPES[dtype]
        if end - begin != math.prod(shape) * width:
            raise _bad(
                path,
                f"tensor '{name}': {end - begin} bytes for {dtype} {shape} (expected "
                f"{math.prod(shape) * width})",
            )
        spans.append((begin, end, name))
        raw = data[data_start + begin : data_start + end]
        tensors[name] = LazyTensor(name, tuple(shape), qtype, raw, where=str(path))
    spans.sort()
    for (_, a_end, a), (b_begin, _, b) in zip(spans, spans[1:], strict=False):
        if a_end > b_begin:
            raise _bad(path, f"tensors '{a}' and '{b}' overlap")
    return tensors


def _is_file_name(name: str) -> bool:
    """A plain file name this system can represent: no directory part, no NUL, <= 255 bytes."""
    try:
        raw = os.fsencode(name)
    except UnicodeEncodeError:
        return False
    return 0 < len(raw) <= 255 and b"/" not in raw and b"\0" not in raw and raw not in (b".", b"..")


def _weight_files(path: Path) -> tuple[Path, list[Path]]:
    """(model directory, safetensors files) of a directory or a lone ``.safetensors`` file."""
    if path.is_file():
        return path.parent, [path]
    index = path / INDEX_NAME
    if index.exists():
        doc = read_json_file(
            index,
            MAX_JSON_SIZE,
            lambda why: InvalidFormatError(
                f"{path_text(index)}: not a valid safetensors index ({why})"
            ),
        )
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise InvalidFormatError(
                f"{path_text(index)}: not a valid safetensors index (no 'weight_map' object of "
                "file names)"
            )
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not _is_file_name(shard):
                raise InvalidFormatError(
                    f"{path_text(index)}: shard name {shard[:80]!r} is not a file name in "
                    "the model directory"
                )
        files = [path / shard for shard in shards]
        for f in files:
            if not f.is_file():
                raise NotFoundError(f"{path_text(index)}: shard {path_text(f.name)} is missing")
        return path, files
    if (path / WEIGHTS_NAME).exists():
        return path, [path / WEIGHTS_NAME]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise NotFoundError(
            f"{path}: no model.safetensors, {INDEX_NAME} or *.safetensors file",
            hint="pass a Hugging Face model directory",
        )
    return path, files


def _read_config(directory: Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.exists():
        raise NotFoundError(
            f"{config_path}: missing", hint="a safetensors model needs its config.json next to it"
        )
    config = read_json_file(
        config_path,
        MAX_JSON_SIZE,
        lambda why: InvalidFormatError(f"{path_text(config_path)}: not valid JSON ({why})"),
    )
    if not isinstance(config, dict):
        raise InvalidFormatError(f"{config_path}: not a JSON object")
    return config


def hf_config(raw: dict, tensors: dict[str, LazyTensor], where: str) -> ModelConfig:
    """ModelConfig from a transformers ``config.json`` (v4 or v5 layout) and the tensors."""
    arch_name = raw.get("model_type")
    if not arch_name and isinstance(raw.get("architectures"), list) and raw["architectures"]:
        arch_name = raw["architectures"][0]
    architecture = normalize_architecture(arch_name, where)
    raw = hf_global_rope(architecture, raw)

    def integer(key: str, default: int | None = None) -> int:
        value = raw.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelLoadError(f"{where}: config.json {key} = {value!r} must be an integer")
        return value

    def number(key: str, default: float) -> float:
        value = raw.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > 1e300:
            raise ModelLoadError(f"{where}: config.json {key} = {str(value)[:40]} must be a number")
        return float(value)

    hidden = integer("hidden_size")
    heads = integer("num_attention_heads")
    rope = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    rope_theta = rope.get("rope_theta", raw.get("rope_theta"))
    if rope_theta is not None and (
        isinstance(rope_theta, bool)
        or not isinstance(rope_theta, (int, float))
        or abs(rope_theta) > 1e300
    ):
        raise ModelLoadError(
            f"{where}: config.json rope_theta = {str(rope_theta)[:40]} must be a number"
        )
    scaling = raw.get("rope_scaling") if isinstance(raw.get("rope_scaling"), dict) else {}
    # v5 keeps the kind in rope_parameters, v4 in rope_scaling (Phi-3 128k spells it "type");
    # a scaling kind in either is honoured or refused, never dropped.
    kinds = [
        (kind, args)
        for kind, args in (
            (rope.get("rope_type"), rope),
            (scaling.get("rope_type") or scaling.get("type"), scaling),
        )
        if kind not in (None, "default")
    ]
    for kind, _ in kinds:
        if kind not in ("linear", "llama3"):
            feature = _ROPE_FEATURES.get(kind, f"RoPE scaling '{kind}'")
            raise ModelLoadError(
                f"{where}: {feature} is not supported (config.json rope_type '{kind}')",
                hint="aprtrace implements plain RoPE, 'linear' and 'llama3' scaling",
            )
    rope_kind, rope_args = kinds[0] if kinds else (None, {})
    _refuse_unsupported_config(raw, architecture, where)
    linear_factor = _scaling_number(rope_args, "factor", where) if rope_kind == "linear" else 1.0
    tied = "lm_head.weight" not in tensors or bool(raw.get("tie_word_embeddings", False))
    num_layers = integer("num_hidden_layers")
    moe = moe_mapping.hf_moe_fields(raw, architecture, where)
    return ModelConfig(
        architecture=architecture,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=integer("num_key_value_heads", heads),
        intermediate_size=integer("intermediate_size", moe.get("moe_intermediate_size")),
        vocab_size=integer("vocab_size"),
        head_dim=integer("head_dim", hidden // heads if heads else 0),
        rope_theta=float(rope_theta) if rope_theta is not None else 10000.0,
        rope_linear_factor=linear_factor,
        # StableLM spells it layer_norm_eps, StarCoder2 norm_epsilon (both LayerNorm).
        rms_norm_eps=number("rms_norm_eps", number("layer_norm_eps", number("norm_epsilon", 1e-6))),
        max_position_embeddings=integer("max_position_embeddings", 2048),
        tie_word_embeddings=tied,
        qkv_bias="model.layers.0.self_attn.q_proj.bias" in tensors,
        qk_norm="model.layers.0.self_attn.q_norm.weight" in tensors,
        bos_token_id=_token_id(raw.get("bos_token_id")),
        eos_token_id=_token_id(raw.get("eos_token_id")),
        **(
            {
                "sliding_window": _sliding_window(raw, architecture, where),
                "partial_rotary_factor": _partial_rotary(raw, rope, where),
                "embedding_multiplier": number("embedding_multiplier", 1.0),
                "residual_multiplier": number("residual_multiplier", 1.0),
                "attention_multiplier": number("attention_multiplier", 0.0) or None,
                "logits_scaling": number("logits_scaling", 1.0),
            }
            | hf_config_fields(architecture, raw, num_layers, where)  # Gemma's own reading
        ),
        **moe,
    ).validate(where)


_ROPE_FEATURES = {
    "longrope": "LongRoPE scaling (Phi-3 128k)",
    "su": "LongRoPE scaling (Phi-3 128k, 'su')",
    "yarn": "YaRN RoPE scaling",
    "dynamic": "dynamic NTK RoPE scaling",
}


# The MLP activation each module computes (transformers' ACT2FN names of the same function).
_ACTIVATIONS = {"starcoder2": ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")}
_OWN_ACTIVATION_CHECK = ("gemma2", "gemma3")  # mapping.gemma checks hidden_activation


def _refuse_unsupported_config(raw: dict, architecture: str, where: str) -> None:
    """Config switches that change the math in ways aprtrace does not implement."""
    refusals = [
        (
            architecture in ("qwen2", "qwen3") and bool(raw.get("use_sliding_window")),
            "Qwen sliding-window layers (use_sliding_window, max_window_layers)",
        ),
        (bool(raw.get("kv_lora_rank")), "multi-head latent attention (MLA, kv_lora_rank)"),
        (
            raw.get("layer_types") is not None and architecture == "olmo2",
            "per-layer attention types",
        ),
        (
            bool(raw.get("use_parallel_residual")),
            "parallel attention/MLP residual (StableLM 2 12B)",
        ),
        (bool(raw.get("qk_layernorm")), "per-head Q/K LayerNorm (StableLM 2 12B)"),
    ]
    act = raw.get("hidden_act", raw.get("hidden_activation"))
    allowed = _ACTIVATIONS.get(architecture, ("silu", "swish"))
    if act is not None and act not in allowed and architecture not in _OWN_ACTIVATION_CHECK:
        refusals.append(
            (True, f"MLP activation '{act}' for {architecture} (aprtrace: {allowed[0]})")
        )
    for refused, feature in refusals:
        if refused:
            raise ModelLoadError(
                f"{where}: {feature} is not supported",
                hint="see the README's list of supported architectures and features",
            )


def _sliding_window(raw: dict, architecture: str, where: str) -> int | None:
    """Mistral's and Phi-3's attention window (a query sees the last N positions)."""
    if architecture in ("qwen2", "qwen3"):  # only with use_sliding_window, which is refused
        return None
    value = raw.get("sliding_window")
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelLoadError(f"{where}: config.json sliding_window = {value!r} is invalid")
    return value


def _partial_rotary(raw: dict, rope: dict, where: str) -> float:
    value = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelLoadError(f"{where}: config.json partial_rotary_factor = {value!r} is invalid")
    return float(value)


def _token_id(value: Any) -> int | None:
    if isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _scaling_number(args: dict, key: str, where: str) -> float:
    value = args.get(key)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value <= _MAX_SCALING_NUMBER
    ):
        raise ModelLoadError(
            f"{where}: config.json RoPE scaling {key} = {value!r} is invalid "
            f"(a positive number up to {_MAX_SCALING_NUMBER:g})"
        )
    return float(value)


# Bounds every RoPE scaling number (a factor, a context length) before it is used; 1e999 in
# JSON is float('inf') and would overflow int() and the factor arithmetic.
_MAX_SCALING_NUMBER = float(MAX_CONTEXT)


def _add_llama3_rope_factors(
    raw: dict, config: ModelConfig, tensors: dict[str, LazyTensor], where: str
) -> None:
    """Llama 3.1 "llama3" scaling becomes the per-frequency divisors llama.cpp's converter
    stores as ``rope_freqs.weight``, so safetensors and GGUF feed the forward pass alike."""
    rope = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    scaling = raw.get("rope_scaling") if isinstance(raw.get("rope_scaling"), dict) else {}
    args = rope if rope.get("rope_type") == "llama3" else scaling
    if args.get("rope_type") != "llama3":
        return
    low = _scaling_number(args, "low_freq_factor", where)
    high = _scaling_number(args, "high_freq_factor", where)
    if not high > low:  # the blend between them divides by high - low
        raise ModelLoadError(
            f"{where}: config.json RoPE scaling high_freq_factor {high:g} must be larger "
            f"than low_freq_factor {low:g}"
        )
    factors = llama3_rope_factors(
        config.head_dim,
        config.rope_theta,
        _scaling_number(args, "factor", where),
        low,
        high,
        int(_scaling_number(args, "original_max_position_embeddings", where)),
    )
    values = np.asarray(factors, dtype="<f4")
    tensors[ROPE_FREQS] = LazyTensor(
        name=ROPE_FREQS,
        shape=(values.size,),
        qtype="F32",
        raw=values.view(np.uint8),
        where=f"{where} (config.json rope_scaling)",
    )


def load_safetensors(path: Path) -> Model:
    """Open a Hugging Face model directory (or a lone ``.safetensors`` beside config.json)."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"file not found: {path}")
    directory, files = _weight_files(path)
    raw_config = _read_config(directory)
    tensors: dict[str, LazyTensor] = {}
    for file in files:
        for name, tensor in read_safetensors(file).items():
            if name in tensors:
                raise InvalidFormatError(f"{file}: tensor '{name}' also appears in another shard")
            tensors[name] = tensor
    config = hf_config(raw_config, tensors, str(path))
    tensors = moe_mapping.hf_tensor_names(tensors, config, str(path))
    _add_llama3_rope_factors(raw_config, config, tensors, str(path))
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    split_fused(tensors, config, str(path))
    check_tensors(tensors, config, str(path))
    tokenizer = None
    if (directory / "tokenizer.json").exists():
        from aprtrace.tokenizer import load_tokenizer_json

        tokenizer = load_tokenizer_json(directory / "tokenizer.json")
    return Model(
        path=path,
        format="safetensors",
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        qk_permuted=False,
        metadata=raw_config,
    )
