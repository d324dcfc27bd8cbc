"""Llama-family names: llama.cpp's GGUF tensor names -> Hugging Face module names.

llama.cpp's converter permutes the Q/K rows of ``llama`` and ``granite`` models for its
adjacent-pair RoPE (``LLAMA_ROPE_TYPE_NORM``); Qwen2/Qwen3 use NeoX RoPE and keep Hugging
Face's row order. Granite uses these tables unchanged.
"""

from __future__ import annotations

GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "rope_freqs": "rope_freqs",  # Llama 3 RoPE frequency divisors
}
LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Architectures whose GGUF Q/K rows are in llama.cpp's permuted (adjacent-pair) order.
QK_PERMUTED = frozenset({"llama", "granite"})
