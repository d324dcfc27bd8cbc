"""Write a Llama / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 / Phi-3 / OLMo 2 / Granite / StableLM /
StarCoder2 model as a GGUF file, the way llama.cpp's converter does (Gemma: RMSNorm weights
stored as ``w + 1``, its metadata keys; Phi-3: fused ``attn_qkv`` and ``ffn_up``).

Used by the test fixtures and by ``aprtrace demo``. Input tensors use Hugging Face names and
layout (float32 ``[out, in]``); they are renamed to GGUF names, llama Q/K rows are permuted for
llama.cpp's adjacent-pair RoPE, Phi-3's projections are fused (``attn_qkv``, ``ffn_up`` holding
gate then up), 2-D weights are encoded with ``gguf.quants.quantize`` and 1-D norms and biases
stay F32. The file is written atomically and its bytes are deterministic.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from aprtrace.atomic import atomic_path
from aprtrace.config import ModelConfig
from aprtrace.errors import ModelLoadError, ValidationError
from aprtrace.mapping import fuse, gguf_norm_offset, gguf_qk_permuted, hf_to_gguf, is_norm_weight
from aprtrace.mapping import gemma as gemma_mapping
from aprtrace.mapping import moe as moe_mapping
from aprtrace.model import permute_llama_qk

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")

# Types write_gguf encodes 2-D weights to, with the llama.cpp file type they make.
WRITE_TYPES = {
    "F32": "ALL_F32",
    "F16": "MOSTLY_F16",
    "BF16": "MOSTLY_BF16",
    "Q8_0": "MOSTLY_Q8_0",
    "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1",
    "Q5_0": "MOSTLY_Q5_0",
    "Q5_1": "MOSTLY_Q5_1",
}


def gguf_tensor_name(hf_name: str, arch: str | None = None) -> str:
    """GGUF name of a Hugging Face tensor name (``model.layers.3.mlp.up_proj.weight`` ->
    ``blk.3.ffn_up.weight``)."""
    name = hf_to_gguf(hf_name, arch)
    if name is not None:
        return name
    raise ValidationError(
        f"cannot map tensor '{hf_name}' to a GGUF name",
        hint="write_gguf takes Llama/Qwen2/Qwen3 tensors with Hugging Face names",
    )


def _sort_key(hf_name: str) -> tuple[int, int, str]:
    """llama.cpp's order: embeddings, blocks by index, then output norm and output."""
    match = _LAYER_RE.fullmatch(hf_name)
    if match:
        return (1, int(match.group(1)), hf_name)
    return (0 if "embed_tokens" in hf_name else 2, 0, hf_name)


def _encode(name: str, values: np.ndarray, qtype: str) -> tuple[np.ndarray, Any]:
    """``(array to write, raw GGML type or None)`` for one tensor."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf import quants as gguf_quants

    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim < 2 or qtype == "F32":
        return values, None
    if qtype == "F16":
        return values.astype(np.float16), None
    gtype = GGMLQuantizationType[qtype]
    block, _ = GGML_QUANT_SIZES[gtype]
    if values.shape[-1] % block:
        # As llama.cpp's converter: a row that does not fill whole blocks falls back to F16.
        return values.astype(np.float16), None
    return gguf_quants.quantize(values, gtype), gtype


def write_gguf(
    path: str | os.PathLike,
    config: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    tokenizer: Mapping[str, Any] | None = None,
    qtype: str = "F32",
) -> Path:
    """Write ``tensors`` (Hugging Face names and layout, float32) as a GGUF model at ``path``.

    ``qtype`` is the type of the 2-D weights (see ``WRITE_TYPES``); 1-D norms and biases stay
    F32. ``tokenizer`` is a dict as made by ``tokenizer_dict_from_hf``. Returns ``path``.
    """
    import gguf

    path = Path(path)
    qtype = qtype.upper()
    if qtype not in WRITE_TYPES:
        raise ValidationError(
            f"cannot write GGUF tensors as {qtype}", hint=f"choose one of {', '.join(WRITE_TYPES)}"
        )
    config.validate("write_gguf")
    arch = config.architecture
    if arch not in _EXTRA_METADATA and arch not in moe_mapping.GGUF_ARCH:
        raise ModelLoadError(f"write_gguf: unsupported architecture '{arch}'")
    extra_metadata = _EXTRA_METADATA.get(arch, _no_metadata)
    extra_metadata(None, config)  # refuses a config the GGUF keys cannot carry
    norm_offset = np.float32(gguf_norm_offset(arch))
    if config.is_moe:  # llama.cpp stacks each layer's experts into one tensor
        tensors = moe_mapping.stack_experts(tensors, config.num_layers, config.num_experts)

    tensors = fuse(tensors, arch)
    names = sorted(tensors, key=_sort_key)
    if config.tie_word_embeddings:
        names = [n for n in names if n != "lm_head.weight"]
    elif "lm_head.weight" not in tensors:
        raise ValidationError(
            "write_gguf: lm_head.weight is missing and the config does not tie embeddings",
            hint="pass lm_head.weight or set tie_word_embeddings=True",
        )
    gguf_names = {name: gguf_tensor_name(name, config.architecture) for name in names}
    for name in names:
        _check_shape(name, np.shape(tensors[name]), config)

    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), moe_mapping.GGUF_ARCH.get(arch, arch))
        try:
            _add_metadata(writer, config, qtype)
            extra_metadata(writer, config)
            if tokenizer is not None:
                _add_tokenizer(writer, tokenizer, config.vocab_size)
            for hf_name in names:
                values = np.asarray(tensors[hf_name], dtype=np.float32)
                if gguf_qk_permuted(arch) and ".self_attn.q_proj." in hf_name:
                    values = permute_llama_qk(values, config.num_heads)
                elif gguf_qk_permuted(arch) and ".self_attn.k_proj." in hf_name:
                    values = permute_llama_qk(values, config.num_kv_heads)
                if norm_offset and is_norm_weight(hf_name):
                    values = values + norm_offset
                # As llama.cpp's converter: MoE routers and the shared-expert gate stay F32.
                keep_f32 = hf_name.endswith((".mlp.gate.weight", ".shared_expert_gate.weight"))
                data, raw_dtype = _encode(hf_name, values, "F32" if keep_f32 else qtype)
                writer.add_tensor(gguf_names[hf_name], data, raw_dtype=raw_dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path


def _check_shape(name: str, shape: tuple[int, ...], config: ModelConfig) -> None:
    """Reject a tensor whose shape does not fit ``config`` (it would make an unreadable file)."""
    h, q, kv, inter = config.hidden_size, config.q_dim, config.kv_dim, config.intermediate_size
    olmo2 = config.architecture == "olmo2"  # Q/K norms over the whole projection
    expected = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "lm_head.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }.get(name)
    match = _LAYER_RE.fullmatch(name)
    if match:
        if int(match.group(1)) >= config.num_layers:
            raise ValidationError(
                f"write_gguf: tensor '{name}' is beyond the config's {config.num_layers} layers"
            )
        expected = {
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "pre_feedforward_layernorm.weight": (h,),
            "post_feedforward_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.weight": (h, q),
            "self_attn.o_proj.bias": (h,),
            "self_attn.q_norm.weight": (q,) if olmo2 else (config.head_dim,),
            "self_attn.k_norm.weight": (kv,) if olmo2 else (config.head_dim,),
            "self_attn.qkv_proj.weight": (q + 2 * kv, h),
            "mlp.gate_up_proj.weight": (2 * inter, h),
            "mlp.c_fc.weight": (inter, h),
            "mlp.c_proj.weight": (h, inter),
            "mlp.gate_proj.weight": (inter, h),
            "mlp.up_proj.weight": (inter, h),
            "mlp.down_proj.weight": (h, inter),
            "mlp.down_proj.bias": (h,),
            **_moe_shapes(config),
        }.get(f"{match.group(2)}.{match.group(3)}")
    if expected is not None and tuple(shape) != expected:
        raise ValidationError(
            f"write_gguf: tensor '{name}' has shape {list(shape)}, "
            f"the config needs {list(expected)}",
            hint="make ModelConfig agree with the tensors (sizes, heads, head_dim)",
        )


def _moe_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the stacked expert tensors, router and shared expert (MoE configs)."""
    if not config.is_moe:
        return {}
    h, n, inter = config.hidden_size, config.num_experts, config.moe_intermediate_size
    shared = config.shared_expert_intermediate_size
    return {
        "mlp.gate.weight": (n, h),
        "mlp.experts.gate_proj.weight": (n, inter, h),
        "mlp.experts.up_proj.weight": (n, inter, h),
        "mlp.experts.down_proj.weight": (n, h, inter),
        "mlp.shared_expert.gate_proj.weight": (shared, h),
        "mlp.shared_expert.up_proj.weight": (shared, h),
        "mlp.shared_expert.down_proj.weight": (h, shared),
        "mlp.shared_expert_gate.weight": (1, h),
    }


def _add_moe_metadata(writer: Any, config: ModelConfig) -> None:
    """llama.cpp's ``<arch>.expert_*`` keys (its Mixtral is ``llama`` with experts, its
    experts' width ``feed_forward_length``)."""
    if not config.is_moe:
        return
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if config.architecture != "mixtral":
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if config.shared_expert_intermediate_size:
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    if config.norm_topk_prob != moe_mapping.GGUF_NORM_TOPK[config.architecture]:
        writer.add_expert_weights_norm(config.norm_topk_prob)


def _add_metadata(writer: Any, config: ModelConfig, qtype: str) -> None:
    import gguf

    # Neutral on purpose: llama.cpp's vocab loader patches token attributes by model name
    # ("phi3" expects Phi-3's own special tokens), which a tiny vocabulary does not have.
    writer.add_name("aprtrace model")
    writer.add_file_type(int(gguf.LlamaFileType[WRITE_TYPES[qtype]]))
    if qtype not in ("F32", "F16", "BF16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(
        config.moe_intermediate_size
        if config.architecture == "mixtral"
        else config.intermediate_size
    )
    _add_moe_metadata(writer, config)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.rotary_dim)
    if config.sliding_window is not None and config.architecture not in ("gemma2", "gemma3"):
        writer.add_sliding_window(config.sliding_window)  # Gemma's are in _gemma_metadata
    elif config.architecture == "phi3":  # as llama.cpp's converter: 0 means no window
        writer.add_sliding_window(0)
    if config.architecture == "granite":  # llama.cpp's converter writes the set multipliers
        writer.add_embedding_scale(float(config.embedding_multiplier))
        writer.add_residual_scale(float(config.residual_multiplier))
        writer.add_logit_scale(float(config.logits_scaling))
        if config.attention_multiplier is not None:
            writer.add_attention_scale(float(config.attention_multiplier))
    if config.architecture in ("stablelm", "starcoder2"):  # LayerNorm models
        writer.add_layer_norm_eps(float(config.rms_norm_eps))
    else:
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if config.architecture == "stablelm":
        writer.add_parallel_residual(False)
    writer.add_rope_freq_base(float(config.rope_theta))
    if config.rope_linear_factor != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config.rope_linear_factor))
    writer.add_vocab_size(config.vocab_size)


def _gemma_metadata(writer: Any, config: ModelConfig) -> None:
    """llama.cpp's Gemma keys; with ``writer`` None, only check that they can hold ``config``.

    llama.cpp stores no query scale (it derives it, see ``mapping.gemma``), Gemma 2 has no
    separate RoPE base for sliding layers, and Gemma 2 always ties its embeddings.
    """
    arch = config.architecture
    by_hidden = config.num_layers == gemma_mapping.QUERY_SCALE_BY_HIDDEN[arch]
    derived = config.hidden_size // config.num_heads if by_hidden else config.head_dim
    scalar = config.query_pre_attn_scalar or config.head_dim
    if float(scalar) != float(derived):
        raise ValidationError(
            f"write_gguf: query_pre_attn_scalar {scalar:g} cannot be stored in a GGUF: "
            f"llama.cpp derives {derived} for this shape",
            hint="use query_pre_attn_scalar = head_dim (or safetensors for other values)",
        )
    if config.sliding_window is None:
        raise ValidationError(f"write_gguf: a {arch} config needs sliding_window")
    if arch == "gemma2" and not config.tie_word_embeddings:
        raise ValidationError("write_gguf: llama.cpp's gemma2 has no untied output matrix")
    if arch == "gemma2" and config.rope_local_theta not in (None, config.rope_theta):
        raise ValidationError("write_gguf: llama.cpp's gemma2 has one RoPE base for all layers")
    caps = (config.attn_logit_softcapping, config.final_logit_softcapping)
    if (arch == "gemma2") != all(caps) or (arch == "gemma3" and any(caps)):
        raise ValidationError(
            f"write_gguf: soft-caps {caps} cannot be stored for {arch}: llama.cpp always caps "
            "gemma2 (attention and logits) and never gemma3"
        )
    if writer is None:
        return
    writer.add_sliding_window(int(config.sliding_window))
    kinds = config.layer_types or ("sliding_attention",) * config.num_layers
    pattern = gemma_mapping.SLIDING_WINDOW_PATTERN[arch]
    if tuple(kinds) != gemma_mapping.layer_types(pattern, config.num_layers):
        writer.add_sliding_window_pattern([k == "sliding_attention" for k in kinds])
    if arch == "gemma3":
        local = config.rope_local_theta
        if local is not None and local != gemma_mapping.LOCAL_ROPE_THETA:
            writer.add_rope_freq_base_swa(float(local))
    if config.attn_logit_softcapping:
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def _no_metadata(writer: Any, config: ModelConfig) -> None:
    return None


# architecture -> writer of its keys beyond the Llama ones (MoE's are in _add_metadata).
_EXTRA_METADATA = {
    "llama": _no_metadata,
    "qwen2": _no_metadata,
    "qwen3": _no_metadata,
    "gemma2": _gemma_metadata,
    "gemma3": _gemma_metadata,
    # Phi-3 / OLMo 2 / Granite / StableLM / StarCoder2: their keys are in _add_metadata.
    "phi3": _no_metadata,
    "olmo2": _no_metadata,
    "granite": _no_metadata,
    "stablelm": _no_metadata,
    "starcoder2": _no_metadata,
}


def _add_tokenizer(writer: Any, tok: Mapping[str, Any], vocab_size: int) -> None:
    import gguf

    tokens = list(tok["tokens"])
    types = list(tok.get("token_type") or [int(gguf.TokenType.NORMAL)] * len(tokens))
    if len(types) != len(tokens):
        raise ValidationError(
            f"tokenizer has {len(tokens)} tokens but {len(types)} token types",
            hint="token_type must give one type per token",
        )
    if len(tokens) > vocab_size:
        raise ValidationError(
            f"tokenizer has {len(tokens)} tokens, more than the model's vocabulary {vocab_size}",
            hint="set ModelConfig.vocab_size to at least the tokenizer's size",
        )
    # As llama.cpp's converter: pad the vocabulary up to the embedding's rows.
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model(tok.get("model", "gpt2"))
    if tok.get("pre"):
        writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    if tok.get("scores") is not None:
        writer.add_token_scores([float(s) for s in tok["scores"]])
    if tok.get("merges"):
        writer.add_token_merges(list(tok["merges"]))
    if tok.get("bos_token_id") is not None:
        writer.add_bos_token_id(int(tok["bos_token_id"]))
    if tok.get("eos_token_id") is not None:
        writer.add_eos_token_id(int(tok["eos_token_id"]))
    if tok.get("padding_token_id") is not None:
        writer.add_pad_token_id(int(tok["padding_token_id"]))
    if tok.get("add_bos_token") is not None:
        writer.add_add_bos_token(bool(tok["add_bos_token"]))


# ---------------------------------------------------------------------------------------------
# Tokenizer metadata from a Hugging Face tokenizer.json

# Pre-tokenizer split patterns of the byte-level BPE families llama.cpp names in
# ``tokenizer.ggml.pre``.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRE_TYPES = {_LLAMA3_PATTERN: "llama-bpe", QWEN2_PATTERN: "qwen2"}


def _pre_type(pre: Mapping[str, Any] | None) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a tokenizer.json pre_tokenizer, or None."""
    if not pre:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (llama-vocab.cpp); "gpt2" is refused there
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        return _SPLIT_PRE_TYPES.get(pattern)
    return None


def tokenizer_dict_from_hf(
    source: Any,
    *,
    pre: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    add_bos_token: bool | None = None,
) -> dict[str, Any]:
    """GGUF tokenizer metadata (``tokenizer.ggml.*``) of a byte-level BPE tokenizer.

    ``source`` is a ``tokenizer.json`` path or a ``tokenizers.Tokenizer``. Returns a dict with
    ``model`` ("gpt2"), ``pre``, ``tokens`` (ordered by id), ``token_type``, ``merges``
    (``"a b"`` strings) and, when the named tokens exist, ``bos_token_id`` / ``eos_token_id``.
    ``pre`` overrides the detected pre-tokenizer type.
    """
    import gguf
    from tokenizers import Tokenizer

    if isinstance(source, (str, os.PathLike)):
        from aprtrace.errors import AprtraceError
        from aprtrace.safeio import path_text
        from aprtrace.tokenizer import read_tokenizer_json

        where = path_text(source)
        try:
            tokenizer = Tokenizer.from_str(read_tokenizer_json(Path(source)))
        except AprtraceError as exc:
            raise ModelLoadError(f"cannot read tokenizer {where}: {exc.message}") from None
        except Exception as exc:
            raise ModelLoadError(f"cannot read tokenizer {where}: {exc}") from exc
    else:
        tokenizer, where = source, "tokenizer"
    data = json.loads(tokenizer.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ModelLoadError(
            f"{where}: a {model.get('type')} tokenizer, not byte-level BPE",
            hint="tokenizer_dict_from_hf handles GPT-2 style byte-level BPE tokenizers",
        )
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1 if vocab else 0
    tokens: list[str | None] = [None] * size
    for text, idx in vocab.items():
        tokens[idx] = text
    types = [int(gguf.TokenType.NORMAL)] * size
    for added in data.get("added_tokens") or []:
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        types[added["id"]] = int(kind)
    for idx, text in enumerate(tokens):
        if text is None:
            tokens[idx] = f"[PAD{idx}]"
            types[idx] = int(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre_name = pre or _pre_type(data.get("pre_tokenizer"))
    if pre_name is None:
        raise ModelLoadError(
            f"{where}: cannot tell the llama.cpp pre-tokenizer type of "
            f"{json.dumps(data.get('pre_tokenizer'))[:200]}",
            hint="pass pre= (for example 'llama-bpe', 'qwen2', 'smollm' or 'gpt2')",
        )
    result: dict[str, Any] = {
        "model": "gpt2",
        "pre": pre_name,
        "tokens": tokens,
        "token_type": types,
        "merges": merges,
    }
    for key, text in (("bos_token_id", bos_token), ("eos_token_id", eos_token)):
        if text is not None:
            if text not in vocab:
                raise ModelLoadError(f"{where}: token {text!r} is not in the vocabulary")
            result[key] = vocab[text]
    if add_bos_token is not None:
        result["add_bos_token"] = add_bos_token
    return result
