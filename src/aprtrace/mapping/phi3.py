"""Phi-3 names: llama.cpp stores Hugging Face's fused projections as they are.

``blk.N.attn_qkv`` is ``self_attn.qkv_proj`` (rows ``[Q|K|V]``) and ``blk.N.ffn_up`` is
``mlp.gate_up_proj`` (rows ``[gate|up]``, llama.cpp's fused SwiGLU input). Loading splits both
into the Llama names (``FUSED``), zero-copy, so the forward pass and tensor checks see q/k/v
and gate/up like any Llama block. llama.cpp runs Phi-3 with NeoX RoPE: no Q/K permutation.
"""

from __future__ import annotations

from aprtrace.mapping import llama

GLOBAL = llama.GLOBAL | {
    # LongRoPE (Phi-3 128k) per-frequency factors: mapped so that loading can refuse them.
    "rope_factors_long": "rope_factors_long",
    "rope_factors_short": "rope_factors_short",
}
LAYER = {k: v for k, v in llama.LAYER.items() if k != "ffn_up"} | {
    "attn_qkv": "self_attn.qkv_proj",
    "ffn_up": "mlp.gate_up_proj",
}
