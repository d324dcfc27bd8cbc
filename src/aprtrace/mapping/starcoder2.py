"""StarCoder2 names: a non-gated MLP, ``ffn_up`` / ``ffn_down`` are ``mlp.c_fc`` / ``mlp.c_proj``.

Every norm and projection may carry a ``.bias`` (LayerNorm and ``use_bias``); the bias keeps
its weight's name. NeoX RoPE: no Q/K permutation in GGUF.
"""

from __future__ import annotations

from aprtrace.mapping import llama

LAYER = {k: v for k, v in llama.LAYER.items() if k not in ("ffn_gate", "ffn_up", "ffn_down")} | {
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
