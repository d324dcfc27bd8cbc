"""Mixture-of-experts decoders: Qwen2-MoE (qkv bias, gated shared expert), Qwen3-MoE
(QK-norm), Mixtral. Attention is the Llama/Qwen attention; the MLP becomes a routed mixture:

    x = ffn_norm(h)
    p = softmax(router . x)                         over all experts, per token
    ids, w = top_k(p)                               highest first; w /= sum(w) if norm_topk_prob
    moe(x) = sum_j w_j * down_j(silu(gate_j(x)) * up_j(x))       over the token's k experts
           + sigmoid(shared_gate . x) * shared_expert(x)         Qwen2-MoE only
    out = h + moe(x)

Experts are decoded one at a time, only those some token selects, and dropped after use, so
a layer of a 128-expert model costs one expert's float32 weights at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from aprtrace.arch import ops
from aprtrace.arch.base import Emit
from aprtrace.arch.llama import (
    AttentionWeights,
    Llama,
    attention_shapes,
    load_attention,
    model_shapes,
)
from aprtrace.config import ModelConfig
from aprtrace.mapping.moe import PROJECTIONS, expert_name
from aprtrace.model import layer_name
from aprtrace.stages import Stage


@dataclass
class Experts:
    """The routed experts of one layer, still encoded; ``swiglu`` decodes one on demand."""

    model: Any
    layer: int

    def swiglu(self, expert: int, x: np.ndarray) -> np.ndarray:
        """``down(silu(gate(x)) * up(x))`` of one expert over the rows ``x``."""
        cfg = self.model.config
        h, inter = cfg.hidden_size, cfg.moe_intermediate_size
        shapes = {"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
        gate, up, down = (
            self.model.weight(expert_name(self.layer, expert, p), shapes[p]) for p in PROJECTIONS
        )
        return swiglu(x, gate, up, down)


@dataclass
class MoeLayerWeights(AttentionWeights):
    """One MoE decoder layer: attention weights, the router, the shared expert (if any) and
    a handle decoding routed experts one at a time."""

    router: np.ndarray  # [num_experts, hidden]
    experts: Experts
    shared_gate_proj: np.ndarray | None = None  # Qwen2-MoE shared expert [shared, hidden]
    shared_up_proj: np.ndarray | None = None
    shared_down_proj: np.ndarray | None = None
    shared_expert_gate: np.ndarray | None = None  # [hidden]: one sigmoid gate per token


def swiglu(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    return ops.linear(ops.silu(ops.linear(x, gate)) * ops.linear(x, up), down)


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, probs)`` of the ``k`` most probable experts per row, highest first (ties: the
    lower expert id first)."""
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return ids, np.take_along_axis(probs, ids, axis=-1)


def routed_experts(
    x: np.ndarray, ids: np.ndarray, weights: np.ndarray, experts: Experts
) -> np.ndarray:
    """``sum_j weights[t, j] * expert_{ids[t, j]}(x[t])`` for every row ``t``, each selected
    expert decoded once (in id order) for all the rows that chose it."""
    out = np.zeros_like(x)
    for expert in np.unique(ids):
        rows, slot = np.nonzero(ids == expert)
        contribution = experts.swiglu(int(expert), x[rows])
        out[rows] += weights[rows, slot, None] * contribution
    return out


def moe_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer MoE tensors (HF suffix -> shape), experts one name each."""
    h, inter, shared = c.hidden_size, c.moe_intermediate_size, c.shared_expert_intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"mlp.gate.weight": (c.num_experts, h)}
    per_expert = {"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    for e in range(c.num_experts):
        for p, shape in per_expert.items():
            shapes[expert_name(0, e, p).removeprefix("model.layers.0.")] = shape
    if shared:
        shapes |= {
            "mlp.shared_expert.gate_proj.weight": (shared, h),
            "mlp.shared_expert.up_proj.weight": (shared, h),
            "mlp.shared_expert.down_proj.weight": (h, shared),
            "mlp.shared_expert_gate.weight": (h,),  # stored [1, hidden] or [hidden]
        }
    return shapes


class MoE(Llama):
    names = ("qwen2moe", "qwen3moe", "mixtral")

    def expected_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        h = (cfg.hidden_size,)
        per_layer = {"input_layernorm.weight": h, "post_attention_layernorm.weight": h}
        return model_shapes(cfg, per_layer | attention_shapes(cfg) | moe_shapes(cfg))

    def load_layer(self, model, layer: int) -> MoeLayerWeights:
        """Attention, router and shared expert of block ``layer``; routed experts stay encoded."""
        cfg = model.config
        h, shared = cfg.hidden_size, cfg.shared_expert_intermediate_size

        def w(suffix: str, shape: tuple[int, ...] | None) -> np.ndarray:
            return model.weight(layer_name(layer, suffix), shape)

        shared_expert = {}
        if shared:
            shared_expert = dict(
                shared_gate_proj=w("mlp.shared_expert.gate_proj.weight", (shared, h)),
                shared_up_proj=w("mlp.shared_expert.up_proj.weight", (shared, h)),
                shared_down_proj=w("mlp.shared_expert.down_proj.weight", (h, shared)),
                shared_expert_gate=w("mlp.shared_expert_gate.weight", None).reshape(h),
            )
        return MoeLayerWeights(
            **load_attention(model, layer),
            router=w("mlp.gate.weight", (cfg.num_experts, h)),
            experts=Experts(model, layer),
            **shared_expert,
        )

    def mlp(
        self, cfg: ModelConfig, w: MoeLayerWeights, x: np.ndarray, layer: int, emit: Emit
    ) -> np.ndarray:
        """Pre-norm mixture of SwiGLU experts; returns what is added to the residual."""
        last = x.shape[0] - 1
        ffn_norm = ops.rms_norm(x, w.post_attention_layernorm, cfg.rms_norm_eps)
        ffn_norm = emit(Stage.FFN_NORM, layer, ffn_norm)

        probs = ops.softmax(ops.linear(ffn_norm, w.router))
        ids, weights = top_k(probs, cfg.num_experts_per_tok)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        emit(Stage.MOE_ROUTER, layer, weights[last])
        emit(Stage.MOE_ROUTER_INDICES, layer, ids[last].astype(np.float32))

        moe_out = routed_experts(ffn_norm, ids, weights, w.experts)
        if w.shared_expert_gate is not None:
            shared = swiglu(ffn_norm, w.shared_gate_proj, w.shared_up_proj, w.shared_down_proj)
            shared = ops.sigmoid(ffn_norm @ w.shared_expert_gate)[:, None] * shared
            shared = emit(Stage.MOE_SHARED_EXPERT, layer, shared)
            moe_out = moe_out + shared
        emit(Stage.MOE_FFN_OUT, layer, moe_out[last])
        return moe_out
