"""Valid tiny inputs for every parser, generated at run time (no binaries are committed).

The same builders serve the fuzz campaign (``fuzz/run.py``), the hypothesis fuzz tests and
the reliability tests: a tiny seeded Qwen2 model as GGUF / APR / safetensors, an APRT file,
a manifest, GGUF tokenizer metadata and CLI spec strings.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import numpy as np

from aprtrace.config import ModelConfig
from aprtrace.demo import demo_weights

# A byte-level BPE vocabulary small enough to keep the seed files a few KB: the printable
# ASCII characters (GPT-2 byte alphabet spells them as themselves) and a few merges.
_CHARS = [chr(c) for c in range(33, 127)]
_MERGES = ["W h", "Wh a", "Wha t", "i s", "2 +", "2+ 2"]
TINY_TOKENS = ["<|endoftext|>", *_CHARS, "Ġ", "Wh", "Wha", "What", "is", "2+", "2+2"]


def tiny_tokenizer_dict() -> dict:
    """GGUF ``tokenizer.ggml.*`` content of the tiny vocabulary (as ``tokenizer_dict_from_hf``)."""
    types = [3] + [1] * (len(TINY_TOKENS) - 1)  # CONTROL for <|endoftext|>, NORMAL otherwise
    return {
        "model": "gpt2",
        "pre": "qwen2",
        "tokens": list(TINY_TOKENS),
        "token_type": types,
        "merges": list(_MERGES),
        "bos_token_id": 0,
        "eos_token_id": 0,
    }


def tiny_config(**overrides) -> ModelConfig:
    """A 1-layer Qwen2-style config with hidden 8 (about 4 KB of F32 weights)."""
    base = ModelConfig(
        architecture="qwen2",
        hidden_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=16,
        vocab_size=len(TINY_TOKENS),
        head_dim=4,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        qkv_bias=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    return dataclasses.replace(base, **overrides)


def tiny_weights(cfg: ModelConfig, seed: int = 7) -> dict[str, np.ndarray]:
    return demo_weights(cfg, seed=seed)


def write_tiny_gguf(
    path: Path,
    cfg: ModelConfig | None = None,
    qtype: str = "F32",
    weights: dict[str, np.ndarray] | None = None,
    tokenizer: bool = True,
) -> Path:
    """A valid tiny GGUF model at ``path``."""
    from aprtrace.formats.gguf_writer import write_gguf

    cfg = cfg or tiny_config()
    weights = weights if weights is not None else tiny_weights(cfg)
    return write_gguf(path, cfg, weights, tiny_tokenizer_dict() if tokenizer else None, qtype)


def write_tiny_apr(path: Path, cfg: ModelConfig | None = None) -> Path:
    """A valid tiny APR v2 model (F32 tensors, embedded tokenizer) at ``path``."""
    from aprtrace.formats.apr import write_apr

    cfg = cfg or tiny_config()
    weights = tiny_weights(cfg)
    metadata = {
        "model_type": "qwen2",
        "architecture": "qwen2",
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_type": 2,
        "rms_norm_eps": cfg.rms_norm_eps,
        "head_dim": cfg.head_dim,
        "tokenizer.vocabulary": list(TINY_TOKENS),
        "tokenizer.merges": list(_MERGES),
        "tokenizer.model": "gpt2",
        "tokenizer.pre_type": "qwen2",
        "tokenizer.bos_token_id": 0,
        "tokenizer.eos_token_id": 0,
    }
    specs = [
        (name, 0, arr.shape, np.ascontiguousarray(arr, "<f4")) for name, arr in weights.items()
    ]
    write_apr(path, metadata, specs)
    return Path(path)


def write_tiny_safetensors(directory: Path, cfg: ModelConfig | None = None) -> Path:
    """A Hugging Face style directory: ``config.json`` + ``model.safetensors``."""
    from safetensors.numpy import save_file

    cfg = cfg or tiny_config()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tiny_weights(cfg), str(directory / "model.safetensors"))
    hf_config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(hf_config, indent=1))
    return directory


def aprt_seed() -> bytes:
    """A valid APRT file: layer 3, six values including NaN payloads, -0.0 and +-Inf."""
    bits = [0x3F800000, 0x7FC00000, 0x7FC00001, 0x80000000, 0x7F800000, 0xFF800000]
    return struct.pack("<4sII", b"APRT", 3, len(bits)) + struct.pack(f"<{len(bits)}I", *bits)


def manifest_seed() -> bytes:
    """A valid ``aprtrace-manifest-v1`` document with two files."""
    doc = {
        "schema": "aprtrace-manifest-v1",
        "tool": "aprtrace",
        "version": "0.1.0",
        "created": "2026-01-01T00:00:00Z",
        "model": {"path": "/m.gguf", "size": 10, "sha256": None, "format": "gguf"},
        "architecture": "qwen2",
        "config": {"hidden_size": 8},
        "prompt": "What is 2+2?",
        "token_ids": [1, 2, 3],
        "stages": ["embedding", "lm_head"],
        "layers": [0],
        "files": [
            {
                "path": "layer-0/embedding.bin",
                "stage": "embedding",
                "layer": 0,
                "shape": [3, 8],
                "bytes": 108,
            },
            {
                "path": "lm_head.bin",
                "stage": "lm_head",
                "layer": None,
                "shape": [104],
                "bytes": 428,
            },
        ],
    }
    return json.dumps(doc, indent=1).encode()


def tokenizer_metadata_seed() -> bytes:
    """GGUF tokenizer metadata as JSON (the fuzz target decodes it and builds the tokenizer)."""
    tok = tiny_tokenizer_dict()
    meta = {
        "tokenizer.ggml.model": tok["model"],
        "tokenizer.ggml.pre": tok["pre"],
        "tokenizer.ggml.tokens": tok["tokens"],
        "tokenizer.ggml.token_type": tok["token_type"],
        "tokenizer.ggml.merges": tok["merges"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
    }
    return json.dumps(meta).encode()


def safetensors_header_seed() -> bytes:
    """A small valid ``.safetensors`` file (u64 header length + JSON header + data)."""
    from safetensors.numpy import save

    cfg = tiny_config()
    return save({k: v for k, v in tiny_weights(cfg).items() if "layers" not in k})


CLI_SPEC_SEEDS = {
    "stages": [b"all", b"embedding,attn_norm,ffn_gate", b" FFN_GATE , layer_output ", b"lm_head"],
    "layers": [b"0..1", b"0..4,10", b"3", b"0,3,5", b"all", b"2..4"],
    "tokens": [b"3838,374,220,17", b"1", b"0, 1, 2"],
    "tol": [b"ffn_*:atol=0.5", b"layer-3/*:cos-min=0.99,rtol=0.2", b"*:rtol=1e-3"],
}
