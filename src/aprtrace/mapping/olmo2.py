"""OLMo 2 names: post-norms instead of pre-norms, Q/K norms over the whole projection.

OLMo 2 has no ``input_layernorm``; its ``post_attention_layernorm`` normalizes the attention
*output* (llama.cpp: ``post_attention_norm``), not the FFN input as in Llama, and
``post_feedforward_layernorm`` the FFN output (``post_ffw_norm``). ``attn_q_norm`` /
``attn_k_norm`` hold ``[heads*head_dim]`` / ``[kv_heads*head_dim]`` weights. NeoX RoPE: no Q/K
permutation in GGUF.
"""

from __future__ import annotations

from aprtrace.mapping import llama

GLOBAL = llama.GLOBAL
LAYER = {k: v for k, v in llama.LAYER.items() if k not in ("attn_norm", "ffn_norm")} | {
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
