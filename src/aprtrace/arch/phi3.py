"""Phi-3 (Phi-3 mini / medium, Phi-3.5 mini, Phi-4 mini): a Llama block with fused weights.

    h = x + o_proj(attention(rope(q), rope(k), v))       [q|k|v] = qkv_proj(rms_norm(x))
    out = h + down(silu(gate) * up)                      [gate|up] = gate_up_proj(rms_norm(h))

The fused ``qkv_proj`` / ``gate_up_proj`` (llama.cpp: ``attn_qkv``, ``ffn_up``) are split into
q/k/v and gate/up row slices when the file is opened (``aprtrace.mapping.split_fused``), so
``qkv_matmul`` is exactly the fused projection and ``ffn_gate`` / ``ffn_up`` its two halves.
What remains is configuration the Llama module already reads: partial rotary
(``partial_rotary_factor``: RoPE on the first channels of each head only) and the sliding
attention window (``sliding_window``). LongRoPE ("longrope" / "su", the 128k models) is
refused when the file is opened.
"""

from __future__ import annotations

from aprtrace.arch.llama import Llama


class Phi3(Llama):
    names = ("phi3",)
