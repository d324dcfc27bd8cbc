"""Tiny seeded GGUF models of each architecture for the llama.cpp engine tests (NumPy only)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from aprtrace.demo import build_demo_tokenizer, demo_config
from aprtrace.formats.gguf_writer import tokenizer_dict_from_hf, write_gguf

ARCHS = ("llama", "qwen2", "qwen3")


def tiny_config(arch: str, vocab_size: int):
    """The demo's sizes (2 layers, GQA 8/2, head_dim 16) with ``arch``'s switches."""
    base = demo_config(vocab_size)
    return dataclasses.replace(
        base,
        architecture=arch,
        num_layers=2,
        qkv_bias=arch == "qwen2",
        rope_theta=10_000.0 if arch == "llama" else 1_000_000.0,
        rms_norm_eps=1e-5 if arch == "llama" else 1e-6,
        tie_word_embeddings=arch != "llama",
    )


def tiny_weights(cfg, seed: int) -> dict[str, np.ndarray]:
    """Seeded weights scaled like a trained model; norm weights around 1 with spread."""
    rng = np.random.default_rng(seed)
    h, q, kv, inter, d = cfg.hidden_size, cfg.q_dim, cfg.kv_dim, cfg.intermediate_size, cfg.head_dim

    def mat(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def vec(n: int, center: float, spread: float) -> np.ndarray:
        return (center + spread * rng.standard_normal(n)).astype(np.float32)

    embed = 0.3 * rng.standard_normal((cfg.vocab_size, h))
    t = {"model.embed_tokens.weight": embed.astype(np.float32)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = vec(h, 1.0, 0.3)
        t[p + "self_attn.q_proj.weight"] = mat(q, h)
        t[p + "self_attn.k_proj.weight"] = mat(kv, h)
        t[p + "self_attn.v_proj.weight"] = mat(kv, h)
        if cfg.qkv_bias:
            t[p + "self_attn.q_proj.bias"] = vec(q, 0.0, 0.3)
            t[p + "self_attn.k_proj.bias"] = vec(kv, 0.0, 0.3)
            t[p + "self_attn.v_proj.bias"] = vec(kv, 0.0, 0.3)
        if cfg.architecture == "qwen3":
            t[p + "self_attn.q_norm.weight"] = vec(d, 1.0, 0.3)
            t[p + "self_attn.k_norm.weight"] = vec(d, 1.0, 0.3)
        t[p + "self_attn.o_proj.weight"] = mat(h, q)
        t[p + "post_attention_layernorm.weight"] = vec(h, 1.0, 0.3)
        t[p + "mlp.gate_proj.weight"] = mat(inter, h)
        t[p + "mlp.up_proj.weight"] = mat(inter, h)
        t[p + "mlp.down_proj.weight"] = mat(h, inter)
    t["model.norm.weight"] = vec(h, 1.0, 0.3)
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = mat(cfg.vocab_size, h)
    return t


def write_tiny_gguf(directory: Path, arch: str, qtype: str = "F32", seed: int = 11) -> Path:
    """``<directory>/<arch>-<qtype>.gguf``: a seeded 2-layer model with the demo tokenizer."""
    tok = build_demo_tokenizer()
    cfg = tiny_config(arch, tok.get_vocab_size())
    meta = tokenizer_dict_from_hf(tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    path = Path(directory) / f"{arch}-{qtype.lower()}.gguf"
    return write_gguf(path, cfg, tiny_weights(cfg, seed), meta, qtype=qtype)


# Gemma: head_dim 32 != hidden / heads, GQA 4/2, tied embeddings, a sliding window of 5 (shorter
# than the test prompt); Gemma 2 alternates sliding/global from layer 0 and soft-caps scores and
# logits with caps small enough to bite; Gemma 3 has Q/K norms, a local RoPE base and every
# sixth layer global (6 layers: llama.cpp b9190 aborts, GGML_ASSERT(buffer) in
# ggml-backend.cpp, on the 4-layer gemma3 files tried, whatever their layer pattern).
GEMMA_ARCHS = ("gemma2", "gemma3")
GEMMA_WINDOW = 5
GEMMA_LAYER_TYPES = {
    "gemma2": ("sliding_attention", "full_attention", "sliding_attention"),
    "gemma3": ("sliding_attention",) * 5 + ("full_attention",),
}


def tiny_gemma_config(arch: str, vocab_size: int):
    from aprtrace.config import ModelConfig

    types = GEMMA_LAYER_TYPES[arch]
    return ModelConfig(
        architecture=arch,
        hidden_size=64,
        num_layers=len(types),
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        vocab_size=vocab_size,
        head_dim=32,
        rope_theta=10_000.0 if arch == "gemma2" else 1_000_000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        qk_norm=arch == "gemma3",
        sliding_window=GEMMA_WINDOW,
        query_pre_attn_scalar=32,  # = head_dim: the only value a GGUF carries for this shape
        layer_types=types,
        rope_local_theta=10_000.0 if arch == "gemma3" else None,
        attn_logit_softcapping=3.0 if arch == "gemma2" else None,
        final_logit_softcapping=2.0 if arch == "gemma2" else None,
    )


def tiny_gemma_weights(cfg, seed: int) -> dict[str, np.ndarray]:
    """Seeded Gemma weights in the Hugging Face layout (norm weights ``w`` of ``1 + w``)."""
    rng = np.random.default_rng(seed)
    h, q, kv, inter, d = cfg.hidden_size, cfg.q_dim, cfg.kv_dim, cfg.intermediate_size, cfg.head_dim

    def mat(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (0.3 * rng.standard_normal(n)).astype(np.float32)

    # Embedding rows of RMS ~ 1/sqrt(hidden): the sqrt(hidden) scale brings them to ~1.
    embed = rng.standard_normal((cfg.vocab_size, h)) / np.sqrt(h)
    t = {"model.embed_tokens.weight": embed.astype(np.float32)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(h)
        t[p + "self_attn.q_proj.weight"] = mat(q, h)
        t[p + "self_attn.k_proj.weight"] = mat(kv, h)
        t[p + "self_attn.v_proj.weight"] = mat(kv, h)
        if cfg.qk_norm:
            t[p + "self_attn.q_norm.weight"] = norm(d)
            t[p + "self_attn.k_norm.weight"] = norm(d)
        t[p + "self_attn.o_proj.weight"] = mat(h, q)
        t[p + "post_attention_layernorm.weight"] = norm(h)
        t[p + "pre_feedforward_layernorm.weight"] = norm(h)
        t[p + "post_feedforward_layernorm.weight"] = norm(h)
        t[p + "mlp.gate_proj.weight"] = mat(inter, h)
        t[p + "mlp.up_proj.weight"] = mat(inter, h)
        t[p + "mlp.down_proj.weight"] = mat(h, inter)
    t["model.norm.weight"] = norm(h)
    return t


def write_tiny_gemma_gguf(directory: Path, arch: str, seed: int = 13) -> Path:
    """``<directory>/<arch>-f32.gguf``: a seeded Gemma model with the demo tokenizer."""
    tok = build_demo_tokenizer()
    cfg = tiny_gemma_config(arch, tok.get_vocab_size())
    meta = tokenizer_dict_from_hf(tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    path = Path(directory) / f"{arch}-f32.gguf"
    return write_gguf(path, cfg, tiny_gemma_weights(cfg, seed), meta, qtype="F32")
