"""``aprtrace convert``: GGUF or Hugging Face safetensors (or APR) -> APR v2, like `apr import`.

Quantized tensors stay as they are when APR has a code for their type (Q4_K, Q6_K, Q8_0, F16,
BF16, F32); any other type (Q4_0, Q4_1, Q5_*, Q5_K, ...) is dequantized to F32 (or F16 with
``--dtype f16``), and the summary says so. Names are Hugging Face style. Q/K rows are stored as
FORMATS.md section 7 says aprender expects: llama.cpp's permuted order for llama, Hugging Face
layout for qwen. Reordering rows is exact for every type (whole rows of blocks are moved).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import click
import numpy as np

from aprtrace.atomic import remove_orphaned_temps
from aprtrace.errors import ModelLoadError, ValidationError
from aprtrace.formats.apr import (
    ROPE_TYPE_ADJACENT,
    ROPE_TYPE_SPLIT_HALF,
    WRITER_DTYPE_CODES,
    expected_size,
    is_qwen_family,
    write_apr,
)
from aprtrace.mapping import apr_metadata_fields, is_norm_weight
from aprtrace.mapping.moe import apr_metadata as moe_apr_metadata
from aprtrace.model import (
    LazyTensor,
    Model,
    check_source_intact,
    permute_llama_qk,
    unpermute_llama_qk,
)
from aprtrace.safeio import file_kind, path_text

DTYPE_CHOICES = ("keep", "f32", "f16")
_QK_SUFFIXES = {
    "self_attn.q_proj.weight": "q",
    "self_attn.q_proj.bias": "q",
    "self_attn.k_proj.weight": "k",
    "self_attn.k_proj.bias": "k",
}
_FLOAT_WIDTHS = {"F32": 4, "F16": 2, "BF16": 2}


def _target_qtype(tensor: LazyTensor, dtype: str) -> str:
    if dtype == "f32":
        return "F32"
    if dtype == "f16":
        # 1-D norms and biases stay F32, as llama.cpp's converter keeps them.
        return "F16" if len(tensor.shape) == 2 else "F32"
    return tensor.qtype if tensor.qtype in WRITER_DTYPE_CODES else "F32"


def _qk_heads(model: Model, name: str) -> int | None:
    for suffix, kind in _QK_SUFFIXES.items():
        if name.endswith(suffix):
            return model.config.num_heads if kind == "q" else model.config.num_kv_heads
    return None


def _row_permutation(rows: int, n_heads: int, to_permuted: bool) -> np.ndarray:
    """Source row of every destination row for llama.cpp's Q/K (un)permutation."""
    fn = permute_llama_qk if to_permuted else unpermute_llama_qk
    return fn(np.arange(rows), n_heads)


def _encode(tensor: LazyTensor, qtype: str, perm: np.ndarray | None) -> np.ndarray:
    """The bytes of ``tensor`` as ``qtype``, rows reordered by ``perm`` when given."""
    check_source_intact(tensor.raw, tensor.where, tensor.name)
    if qtype == tensor.qtype:
        raw = tensor.raw.reshape(-1).view(np.uint8)
        if perm is None:
            return raw
        rows = tensor.shape[0]
        return np.ascontiguousarray(raw.reshape(rows, -1)[perm]).reshape(-1)
    values = tensor.load()
    if perm is not None:
        values = values[perm]
    if qtype == "F32":
        return values.astype("<f4").reshape(-1).view(np.uint8)
    if qtype == "F16":
        with np.errstate(over="ignore"):
            return values.astype("<f2").reshape(-1).view(np.uint8)
    raise ValueError(f"cannot encode {qtype}")  # unreachable: targets are F32/F16 or the source


def _decoded_f32(model: Model, name: str) -> np.ndarray:
    """The bytes of ``name`` decoded to Hugging Face values, as F32."""
    return model.weight(name).astype("<f4").reshape(-1).view(np.uint8)


def _tokenizer_metadata(model: Model) -> tuple[dict[str, Any], str | None]:
    """The ``tokenizer.*`` keys to embed, and a note when none could be extracted."""
    meta: dict[str, Any] = {}
    if model.format == "gguf":
        from aprtrace.formats.gguf import read_gguf

        raw = read_gguf(model.path).metadata
        tokens = raw.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list):
            return {}, "the GGUF has no tokenizer; none embedded"
        tok = {
            "tokens": tokens,
            "merges": raw.get("tokenizer.ggml.merges"),
            "model": raw.get("tokenizer.ggml.model"),
            "pre": raw.get("tokenizer.ggml.pre"),
            "scores": raw.get("tokenizer.ggml.scores"),
            "token_type": raw.get("tokenizer.ggml.token_type"),
            "add_space_prefix": raw.get("tokenizer.ggml.add_space_prefix"),
        }
    elif model.format == "safetensors":
        directory = model.path if model.path.is_dir() else model.path.parent
        tokenizer_json = directory / "tokenizer.json"
        if not tokenizer_json.exists():
            return {}, "no tokenizer.json; no tokenizer embedded"
        from aprtrace.formats.gguf_writer import tokenizer_dict_from_hf

        try:
            tok = tokenizer_dict_from_hf(tokenizer_json)
        except ModelLoadError as exc:
            return {}, f"tokenizer not embedded: {exc.message}"
    else:  # apr: copy the embedded keys through
        return {k: v for k, v in model.metadata.items() if k.startswith("tokenizer.")}, None

    meta["tokenizer.vocabulary"] = list(tok["tokens"])
    if tok.get("merges") is not None:
        meta["tokenizer.merges"] = list(tok["merges"])
    meta["tokenizer.vocab_size"] = len(tok["tokens"])
    meta["tokenizer.model"] = tok.get("model") or "gpt2"
    if tok.get("pre"):
        meta["tokenizer.pre_type"] = tok["pre"]
    if tok.get("scores") is not None:
        meta["tokenizer.scores"] = [float(s) for s in tok["scores"]]
    if tok.get("token_type") is not None:
        meta["tokenizer.token_type"] = [int(t) for t in tok["token_type"]]
    if isinstance(tok.get("add_space_prefix"), bool):  # SentencePiece's dummy prefix (Gemma: off)
        meta["tokenizer.add_space_prefix"] = tok["add_space_prefix"]
    return meta, None


def _load_source(src: Path) -> Model:
    from aprtrace.formats import load_model

    return load_model(src)


def _files_read(model: Model, src: Path) -> list[Path]:
    """Every file the conversion of ``model`` reads (weights, config, tokenizer, index)."""
    files = {Path(t.where) for t in model.tensors.values() if t.where and Path(t.where).is_file()}
    if src.is_file():
        files.add(src)
    if model.format == "safetensors":
        directory = src if src.is_dir() else src.parent
        for name in ("config.json", "tokenizer.json", "model.safetensors.index.json"):
            files.add(directory / name)
    return sorted(files)


def check_destination(model: Model, src: Path, dst: Path) -> None:
    """Refuse a DST that is not a new or regular file of its own: the source itself (same
    inode, e.g. a hard link), inside the source directory, a symlink (never turned into a
    file; write to its target instead), a device, FIFO or directory."""
    shown = path_text(dst)
    kind = file_kind(dst)
    if kind == "symlink":
        raise ValidationError(
            f"{shown} is a symlink; convert does not replace symlinks",
            hint=f"pass the path it points to ({path_text(dst.resolve())}) to write there",
        )
    if kind not in (None, "file"):
        raise ValidationError(
            f"{shown} is a {kind}, not a regular file; refusing to replace it",
            hint="give a new or regular .apr file as DST",
        )
    target = dst.resolve()
    if src.is_dir() and src.resolve() in target.parents:
        raise ValidationError(
            f"{shown} is inside the source directory {path_text(src)}",
            hint="write the APR file outside the checkpoint it is converted from",
        )
    if kind is None:
        return
    dst_id = (os.stat(dst).st_dev, os.stat(dst).st_ino)
    for path in _files_read(model, src):
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == dst_id:
                raise ValidationError(
                    f"{shown} is the source file {path_text(path)}; refusing to overwrite "
                    "the model being converted",
                    hint="give another DST",
                )


def convert_model(src: Path, dst: Path, dtype: str = "keep") -> dict:
    """Convert a GGUF / safetensors / APR model to an APR v2 file; returns a summary."""
    if dtype not in DTYPE_CHOICES:
        raise ValidationError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    src, dst = Path(src), Path(dst)
    model = _load_source(src)
    check_destination(model, src, dst)
    remove_orphaned_temps(dst)
    cfg = model.config
    if cfg.rope_linear_factor != 1.0:
        # APR v2 metadata has no RoPE scaling field: the file would trace unscaled.
        raise ValidationError(
            f"{src}: linear RoPE scaling (factor {cfg.rope_linear_factor:g}) cannot be stored "
            "in APR v2 metadata; the converted model would run without it",
            hint="trace the GGUF or safetensors model directly",
        )
    llama_layout = not is_qwen_family(cfg.architecture)
    written: Counter[str] = Counter()
    changed: Counter[str] = Counter()
    entries = []
    param_count = 0
    total_size = 0
    out_qtypes: dict[str, str] = {}
    for name in sorted(model.tensors):
        tensor = model.tensors[name]
        qtype = _target_qtype(tensor, dtype)
        heads = _qk_heads(model, name)
        perm = None
        if heads is not None and llama_layout != model.qk_permuted:
            if len(tensor.shape) == 1 and tensor.qtype not in _FLOAT_WIDTHS:
                qtype = "F32"
            perm = _row_permutation(tensor.shape[0], heads, llama_layout)
        encode = partial(_encode, tensor, qtype, perm)  # run by write_apr, one at a time
        if model.norm_offset and is_norm_weight(name):
            # APR holds Hugging Face's norm weights: a Gemma GGUF's stored ``w + 1`` is undone.
            qtype = "F32"
            encode = partial(_decoded_f32, model, name)
        entries.append((name, WRITER_DTYPE_CODES[qtype], tensor.shape, encode))
        total_size += expected_size(qtype, tensor.n_values)
        out_qtypes[name] = qtype
        written[qtype] += 1
        if qtype != tensor.qtype:
            changed[f"{tensor.qtype} -> {qtype}"] += 1
        param_count += tensor.n_values
    if cfg.tie_word_embeddings and "lm_head.weight" not in model.tensors:
        # aprender's importers store lm_head as a copy of the tied embedding.
        embed_name = "model.embed_tokens.weight"
        _, code, shape, encode = next(e for e in entries if e[0] == embed_name)
        entries.append(("lm_head.weight", code, shape, encode))
        qtype = out_qtypes[embed_name]
        total_size += expected_size(qtype, model.tensors[embed_name].n_values)
        written[qtype] += 1

    tokenizer_meta, tokenizer_note = _tokenizer_metadata(model)
    metadata: dict[str, Any] = {
        "model_type": cfg.architecture,
        "name": path_text(src.stem if src.is_file() else src.name),
        "source": f"local://{path_text(src.name)}",
        "original_format": model.format,
        "created_at": None,  # deterministic output: no timestamp
        "total_size": total_size,
        "param_count": int(param_count),
        "architecture": cfg.architecture,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_type": ROPE_TYPE_ADJACENT if llama_layout else ROPE_TYPE_SPLIT_HALF,
        "rms_norm_eps": cfg.rms_norm_eps,
        "head_dim": cfg.head_dim,
        "tied_embeddings": cfg.tie_word_embeddings,
        **apr_metadata_fields(cfg),
        **moe_apr_metadata(cfg),  # MoE: aprender's expert fields (+ shared expert, top-k norm)
        **tokenizer_meta,
    }
    for key, value in (
        ("tokenizer.bos_token_id", cfg.bos_token_id),
        ("tokenizer.eos_token_id", cfg.eos_token_id),
        # Not aprender standard fields; read back by aprtrace's APR loader.
        ("sliding_window", cfg.sliding_window),
        (
            "partial_rotary_factor",
            cfg.partial_rotary_factor if cfg.rotary_dim < cfg.head_dim else None,
        ),
        (
            "embedding_multiplier",
            cfg.embedding_multiplier if cfg.embedding_multiplier != 1 else None,
        ),
        ("residual_multiplier", cfg.residual_multiplier if cfg.residual_multiplier != 1 else None),
        ("attention_multiplier", cfg.attention_multiplier),
        ("logits_scaling", cfg.logits_scaling if cfg.logits_scaling != 1 else None),
    ):
        if value is not None:
            metadata[key] = value
    size = write_apr(dst, metadata, entries)

    notes = []
    for change, count in sorted(changed.items()):
        source_type = change.split(" -> ")[0]
        reason = (
            "APR has no dtype code for it"
            if source_type not in WRITER_DTYPE_CODES
            else f"--dtype {dtype}"
        )
        notes.append(f"{count} tensors converted {change} ({reason})")
    if tokenizer_note:
        notes.append(tokenizer_note)
    return {
        "source": path_text(src),
        "source_format": model.format,
        "destination": path_text(dst),
        "architecture": cfg.architecture,
        "rope_type": metadata["rope_type"],
        "qk_layout": "llama.cpp-permuted (adjacent-pair)"
        if llama_layout
        else "Hugging Face (split-half)",
        "tensors": len(entries),
        "dtypes": dict(sorted(written.items())),
        "converted": dict(sorted(changed.items())),
        "tokenizer_embedded": "tokenizer.vocabulary" in metadata,
        "bytes": size,
        "notes": notes,
    }


@click.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_CHOICES, case_sensitive=False),
    default="keep",
    show_default=True,
    help="keep: keep every type APR can hold (Q4_K, Q6_K, Q8_0, F16, BF16, F32), dequantize "
    "the rest to F32; f32: everything F32; f16: 2-D weights F16, norms and biases F32.",
)
def convert_command(src: Path, dst: Path, dtype: str) -> None:
    """Convert a GGUF file or Hugging Face safetensors directory to an APR v2 model.

    \b
    Examples:
      aprtrace convert SmolLM2-135M-Instruct.Q4_1.gguf smollm2.apr
      aprtrace convert ./Qwen2.5-0.5B-Instruct qwen.apr --dtype f16
    """
    if dst.suffix.lower() != ".apr":
        click.echo(
            f"warning: {path_text(dst)} does not end in .apr; it is written as an APR v2 file "
            "all the same",
            err=True,
        )
    summary = convert_model(src, dst, dtype.lower())
    click.echo(
        f"converted {summary['source']} ({summary['source_format']}) -> {summary['destination']}"
    )
    click.echo(
        f"  architecture: {summary['architecture']} (rope_type {summary['rope_type']}, "
        f"Q/K rows {summary['qk_layout']})"
    )
    types = ", ".join(f"{k} x{v}" for k, v in summary["dtypes"].items())
    click.echo(f"  tensors: {summary['tensors']} ({types})")
    click.echo(f"  tokenizer: {'embedded' if summary['tokenizer_embedded'] else 'none'}")
    click.echo(f"  size: {summary['bytes']} bytes")
    for note in summary["notes"]:
        click.echo(f"  note: {note}")
