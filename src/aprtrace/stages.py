"""The stage graph: every capture point, declared once (FORMATS.md section 2).

Each row says what a stage's buffer holds, its shape as a function of the config and the
sequence length, which stages it is computed from, whether it reads a weight, and which
architectures compute it. The forward passes (``aprtrace.arch``), diff's attribution,
localization, shape inference, ``aprtrace stages`` and the engines all read this table;
nothing else lists stage facts.

Enum order is forward (file) order, apr's order for the stages apr knows.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aprtrace.errors import ValidationError

WHOLE_MODEL_LAYER = 0xFFFFFFFF


class Stage(enum.Enum):
    """Capture points in forward order. The value is the file stem."""

    EMBEDDING = "embedding"
    ATTN_NORM = "attn_norm"
    QKV_MATMUL = "qkv_matmul"
    QKV_BIAS = "qkv_bias"
    Q_POST_ROPE = "q_post_rope"
    K_POST_ROPE = "k_post_rope"
    ATTN_SCORES = "attn_scores"
    ATTN_SOFTMAX = "attn_softmax"
    ATTENTION = "attention"
    ATTN_OUT = "attn_out"
    POST_ATTN_NORM = "post_attn_norm"
    POST_ATTN_RESIDUAL = "post_attn_residual"
    FFN_NORM = "ffn_norm"
    FFN_GATE = "ffn_gate"
    FFN_UP = "ffn_up"
    FFN_SILU = "ffn_silu"
    FFN_SWIGL = "ffn_swigl"
    FFN_OUT = "ffn_out"
    POST_FFN_NORM = "post_ffn_norm"
    POST_FFN_RESIDUAL = "post_ffn_residual"
    MOE_ROUTER = "moe_router"
    MOE_SHARED_EXPERT = "moe_shared_expert"
    MOE_FFN_OUT = "moe_ffn_out"
    MOE_ROUTER_INDICES = "moe_router_indices"
    FINAL_NORM = "final_norm"
    LM_HEAD = "lm_head"

    @property
    def spec(self) -> StageSpec:
        return GRAPH[self]

    @property
    def info(self) -> StageSpec:  # the name older callers use
        return GRAPH[self]

    @property
    def per_layer(self) -> bool:
        return GRAPH[self].per_layer

    @property
    def index_payload(self) -> bool:
        return GRAPH[self].index_payload

    @property
    def order(self) -> int:
        return _ORDER[self]


# Symbolic dimensions of the shapes below, resolved against a ModelConfig.
_DIMS: dict[str, Callable[[Any], int]] = {
    "hidden": lambda c: c.hidden_size,
    "q_dim + 2*kv_dim": lambda c: c.q_dim + 2 * c.kv_dim,
    "n_heads*head_dim": lambda c: c.q_dim,
    "kv_dim": lambda c: c.kv_dim,
    "heads": lambda c: c.num_heads,
    "intermediate": lambda c: c.intermediate_size,
    "vocab": lambda c: c.vocab_size,
    "experts_used": lambda c: c.num_experts_per_tok,
}

# Input references that are not a stage of the same layer.
LAYER_INPUT = "@layer_input"  # embedding for layer 0, else the previous post_ffn_residual
LAST_LAYER_OUTPUT = "@last_layer_output"  # post_ffn_residual of the model's last layer

ALL_ARCHS = None  # `archs` value of a stage every architecture computes


@dataclass(frozen=True)
class StageSpec:
    """One row of the stage graph.

    ``inputs``: each entry is one operand, given as alternatives in preference order (the
    first one the architecture computes is the operand: ``q_post_rope`` reads ``qkv_bias``
    when the model has a qkv bias, else ``qkv_matmul``). ``shape``: symbolic dims, ``seq``
    the number of positions, ``keys`` the attended positions. ``archs``: the architectures
    that compute the stage (None: all); ``when``: a config predicate on top of that.
    """

    name: str
    per_layer: bool
    inputs: tuple[tuple[str, ...], ...]
    shape_dims: tuple[str, ...]
    weights: str | None  # "matrix" (a projection), "vector" (norm / bias) or None
    description: str
    archs: frozenset[str] | None = ALL_ARCHS
    when: Callable[[Any], bool] | None = None
    index_payload: bool = False  # integer ids stored as f32: compared as integers

    @property
    def reads_weights(self) -> bool:
        return self.weights is not None

    @property
    def shape(self) -> str:
        return "[" + ", ".join(self.shape_dims) + "]"

    @property
    def attention_map(self) -> bool:
        return self.shape_dims[-2:] == ("seq", "keys")


def _row(
    stage: Stage,
    inputs: Iterable[str | tuple[str, ...]],
    shape: tuple[str, ...],
    description: str,
    *,
    weights: str | None = None,
    per_layer: bool = True,
    archs: Iterable[str] | None = ALL_ARCHS,
    when: Callable[[Any], bool] | None = None,
    index_payload: bool = False,
) -> tuple[Stage, StageSpec]:
    operands = tuple((i,) if isinstance(i, str) else tuple(i) for i in inputs)
    return stage, StageSpec(
        stage.value,
        per_layer,
        operands,
        shape,
        weights,
        description,
        frozenset(archs) if archs is not None else None,
        when,
        index_payload,
    )


_GEMMA = ("gemma2", "gemma3")
_MOE = ("qwen2moe", "qwen3moe", "mixtral")


def _dense_mlp(c: Any) -> bool:
    """The FFN is one SwiGLU MLP (not a mixture of experts)."""
    return not getattr(c, "num_experts", 0)


def _shared_expert(c: Any) -> bool:
    return bool(getattr(c, "shared_expert_intermediate_size", 0))


# Post-norm-only blocks (OLMo 2): RMSNorm on the attention / FFN outputs, none on their
# inputs, so attn_norm and ffn_norm do not exist and the projections read the residuals.
_POST_NORM_ONLY = ("olmo2",)


def _has_pre_norms(cfg: Any) -> bool:
    return cfg.architecture not in _POST_NORM_ONLY


# Non-gated MLPs (StarCoder2: c_proj(gelu(c_fc(x)))): no ffn_gate, no ffn_swigl.
_NON_GATED = ("starcoder2",)


def _gated_mlp(cfg: Any) -> bool:
    return cfg.architecture not in _NON_GATED


def _dense_gated_mlp(cfg: Any) -> bool:
    return _dense_mlp(cfg) and _gated_mlp(cfg)


_SEQ_H = ("seq", "hidden")
_SEQ_I = ("seq", "intermediate")
_MAP = ("heads", "seq", "keys")

GRAPH: dict[Stage, StageSpec] = dict(
    [
        _row(
            Stage.EMBEDDING,
            (),
            _SEQ_H,
            "token embedding rows (written as layer 0 only; Gemma: times sqrt(hidden);"
            " Granite: times embedding_multiplier)",
            weights="matrix",
        ),
        _row(
            Stage.ATTN_NORM,
            (LAYER_INPUT,),
            _SEQ_H,
            "input RMSNorm output (after the weight; StableLM/StarCoder2: LayerNorm + bias;"
            " OLMo 2 has none)",
            weights="vector",
            when=_has_pre_norms,
        ),
        _row(
            Stage.QKV_MATMUL,
            (("attn_norm", LAYER_INPUT),),
            ("seq", "q_dim + 2*kv_dim"),
            "fused [Q|K|V] projection, before bias (Phi-3: its qkv_proj)",
            weights="matrix",
        ),
        _row(
            Stage.QKV_BIAS,
            ("qkv_matmul",),
            ("seq", "q_dim + 2*kv_dim"),
            "[Q|K|V] after the bias add (only with a qkv bias)",
            weights="vector",
            when=lambda c: c.qkv_bias,
        ),
        _row(
            Stage.Q_POST_ROPE,
            (("qkv_bias", "qkv_matmul"),),
            ("seq", "n_heads*head_dim"),
            "Q after QK-norm (if any) and RoPE",
        ),
        _row(
            Stage.K_POST_ROPE,
            (("qkv_bias", "qkv_matmul"),),
            ("seq", "kv_dim"),
            "K after QK-norm (if any) and RoPE",
        ),
        _row(
            Stage.ATTN_SCORES,
            ("q_post_rope", "k_post_rope"),
            _MAP,
            "q.k * scale (Gemma 2: soft-capped), masked entries (key after query, outside a "
            "window) stored as 0",
        ),
        _row(
            Stage.ATTN_SOFTMAX,
            ("attn_scores",),
            _MAP,
            "causal softmax probabilities, masked entries 0",
        ),
        _row(
            Stage.ATTENTION,
            ("attn_softmax", ("qkv_bias", "qkv_matmul")),
            ("seq", "n_heads*head_dim"),
            "softmax . V, before the output projection",
        ),
        _row(
            Stage.ATTN_OUT,
            ("attention",),
            _SEQ_H,
            "attention output projection (+ bias)",
            weights="matrix",
        ),
        _row(
            Stage.POST_ATTN_NORM,
            ("attn_out",),
            _SEQ_H,
            "RMSNorm of the attention output, before the residual add (Gemma, OLMo 2)",
            weights="vector",
            archs=_GEMMA + _POST_NORM_ONLY,
        ),
        _row(
            Stage.POST_ATTN_RESIDUAL,
            (LAYER_INPUT, ("post_attn_norm", "attn_out")),
            _SEQ_H,
            "hidden after the attention residual add (Granite: attn_out times residual_multiplier)",
        ),
        _row(
            Stage.FFN_NORM,
            ("post_attn_residual",),
            _SEQ_H,
            "pre-FFN RMSNorm output (post_attention_layernorm; Gemma: pre_feedforward_layernorm;"
            " OLMo 2 has none)",
            weights="vector",
            when=_has_pre_norms,
        ),
        _row(
            Stage.FFN_GATE,
            (("ffn_norm", "post_attn_residual"),),
            _SEQ_I,
            "gate projection (dense MLP only; Phi-3: first half of the fused gate_up_proj)",
            weights="matrix",
            when=_dense_gated_mlp,
        ),
        _row(
            Stage.FFN_UP,
            (("ffn_norm", "post_attn_residual"),),
            _SEQ_I,
            "up projection (dense MLP only; Phi-3: second half of the fused gate_up_proj;"
            " StarCoder2: c_fc + bias)",
            weights="matrix",
            when=_dense_mlp,
        ),
        # The five dense-MLP stages are not computed by MoE models: each token runs its own
        # experts, so no one [seq, intermediate] buffer exists (aprender leaves them empty
        # too); the MoE block output is moe_ffn_out, a shared expert's is moe_shared_expert.
        _row(
            Stage.FFN_SILU,
            (("ffn_gate", "ffn_up"),),
            _SEQ_I,
            "act(gate): silu for Llama/Qwen, gelu_tanh for Gemma; StarCoder2 (no gate):"
            " gelu_tanh(ffn_up)",
            when=_dense_mlp,
        ),
        _row(
            Stage.FFN_SWIGL,
            ("ffn_silu", "ffn_up"),
            _SEQ_I,
            "act(gate) * up (dense gated MLPs only)",
            when=_dense_gated_mlp,
        ),
        _row(
            Stage.FFN_OUT,
            (("ffn_swigl", "ffn_silu"),),
            _SEQ_H,
            "down projection (+ bias; StarCoder2: c_proj) (dense MLP only)",
            weights="matrix",
            when=_dense_mlp,
        ),
        _row(
            Stage.POST_FFN_NORM,
            ("ffn_out",),
            _SEQ_H,
            "RMSNorm of the FFN output, before the residual add (Gemma, OLMo 2)",
            weights="vector",
            archs=_GEMMA + _POST_NORM_ONLY,
        ),
        _row(
            Stage.POST_FFN_RESIDUAL,
            ("post_attn_residual", ("post_ffn_norm", "ffn_out", "moe_ffn_out")),
            _SEQ_H,
            "hidden after the FFN residual add (alias layer_output)",
        ),
        # MoE stages, in apr's order after post_ffn_residual although post_ffn_residual is
        # computed from them (apr appended them to its enum; MOE_BLOCK below). As aprender's
        # qwen3_moe forward writes them, moe_router / moe_ffn_out / moe_router_indices hold
        # the LAST position only; experts are ranked by routing probability, highest first.
        _row(
            Stage.MOE_ROUTER,
            ("ffn_norm",),
            ("experts_used",),
            "last position: top-k routing weights, softmax over all experts then top-k, "
            "renormalised to sum 1 when the config says (Mixtral, Qwen3-MoE), highest first",
            weights="matrix",
            archs=_MOE,
        ),
        _row(
            Stage.MOE_SHARED_EXPERT,
            ("ffn_norm",),
            _SEQ_H,
            "Qwen2-MoE shared expert, every position: sigmoid(shared_expert_gate . x) * "
            "SwiGLU_shared(x), before it joins the routed experts",
            weights="matrix",
            archs=("qwen2moe",),
            when=_shared_expert,
        ),
        _row(
            Stage.MOE_FFN_OUT,
            ("ffn_norm", "moe_router", "moe_router_indices", ("moe_shared_expert", "ffn_norm")),
            ("hidden",),
            "last position: the MoE block output added to the residual, sum of weight * "
            "expert SwiGLU over the top-k experts (+ the gated shared expert)",
            weights="matrix",
            archs=_MOE,
        ),
        _row(
            Stage.MOE_ROUTER_INDICES,
            ("ffn_norm",),
            ("experts_used",),
            "last position: the top-k expert ids as f32, in moe_router's order "
            "(compared as integers)",
            weights="matrix",
            archs=_MOE,
            index_payload=True,
        ),
        _row(
            Stage.FINAL_NORM,
            (LAST_LAYER_OUTPUT,),
            _SEQ_H,
            "output RMSNorm over all positions",
            weights="vector",
            per_layer=False,
        ),
        _row(
            Stage.LM_HEAD,
            ("final_norm",),
            ("vocab",),
            "logits of the last position only (Gemma 2: soft-capped; Granite: divided by"
            " logits_scaling)",
            weights="matrix",
            per_layer=False,
        ),
    ]
)
assert list(GRAPH) == list(Stage), "every stage has exactly one row, in enum order"
# The MoE stages: written after post_ffn_residual (apr's file order), computed before it.
MOE_BLOCK = frozenset(
    {Stage.MOE_ROUTER, Stage.MOE_SHARED_EXPERT, Stage.MOE_FFN_OUT, Stage.MOE_ROUTER_INDICES}
)
_ORDER = {stage: i for i, stage in enumerate(Stage)}

ALIASES = {"layer_output": Stage.POST_FFN_RESIDUAL}
ALL_STAGES: tuple[Stage, ...] = tuple(Stage)
# The 16 capture points of the classic `apr` run (no RoPE / score / softmax stages).
APR_CLASSIC_STAGES: tuple[Stage, ...] = tuple(
    s
    for s in Stage
    if s
    in (
        Stage.EMBEDDING,
        Stage.ATTN_NORM,
        Stage.QKV_MATMUL,
        Stage.QKV_BIAS,
        Stage.ATTENTION,
        Stage.ATTN_OUT,
        Stage.POST_ATTN_RESIDUAL,
        Stage.FFN_NORM,
        Stage.FFN_GATE,
        Stage.FFN_UP,
        Stage.FFN_SILU,
        Stage.FFN_SWIGL,
        Stage.FFN_OUT,
        Stage.POST_FFN_RESIDUAL,
        Stage.FINAL_NORM,
        Stage.LM_HEAD,
    )
)


def computes(stage: Stage, cfg: Any) -> bool:
    """Whether a model with config ``cfg`` computes ``stage``."""
    spec = GRAPH[stage]
    if spec.archs is not None and cfg.architecture not in spec.archs:
        return False
    return spec.when is None or bool(spec.when(cfg))


def stages_for(cfg: Any) -> tuple[Stage, ...]:
    """The stages a model with config ``cfg`` computes, in forward order."""
    return tuple(s for s in Stage if computes(s, cfg))


def stage_shape(stage: Stage, cfg: Any, seq: int, keys: int | None = None) -> tuple[int, ...]:
    """The buffer's shape for ``seq`` positions attending ``keys`` positions (default seq)."""
    sizes = {"seq": seq, "keys": seq if keys is None else keys}
    return tuple(sizes[d] if d in sizes else _DIMS[d](cfg) for d in GRAPH[stage].shape_dims)


def stage_inputs(
    stage: Stage,
    layer: int | None,
    has: Callable[[Stage], bool],
    num_layers: int | None,
) -> list[tuple[int | None, Stage] | None]:
    """The ``(layer, stage)`` each operand of ``stage`` at ``layer`` is computed from.

    ``has(stage)`` says whether the model computes a stage (choosing among alternatives).
    An operand that cannot be named (the last layer of a model of unknown depth) is None.
    """
    out: list[tuple[int | None, Stage] | None] = []
    for alternatives in GRAPH[stage].inputs:
        # The first alternative the model computes; a layer reference always counts.
        chosen = next(
            (a for a in alternatives if a in (LAYER_INPUT, LAST_LAYER_OUTPUT) or has(Stage(a))),
            alternatives[-1],
        )
        if chosen == LAYER_INPUT:
            if layer is None:
                out.append(None)
            elif layer == 0:
                out.append((0, Stage.EMBEDDING))
            else:
                out.append((layer - 1, Stage.POST_FFN_RESIDUAL))
            continue
        if chosen == LAST_LAYER_OUTPUT:
            out.append((num_layers - 1, Stage.POST_FFN_RESIDUAL) if num_layers else None)
            continue
        source = Stage(chosen)
        out.append((layer if source.per_layer else None, source))
    return out


def valid_names_text() -> str:
    return ", ".join(s.value for s in Stage) + ", layer_output (alias of post_ffn_residual), all"


def suggest(name: str) -> str | None:
    """The closest valid stage name to a misspelt one, if any is close."""
    import difflib

    names = [s.value for s in Stage] + list(ALIASES)
    match = difflib.get_close_matches(name.strip().lower(), names, n=1, cutoff=0.6)
    return match[0] if match else None


def stage_from_name(name: str, flag: str = "--save-tensor") -> Stage:
    """Map one stage name (trimmed, any case, alias allowed) to its Stage."""
    key = name.strip().lower()
    if key in ALIASES:
        return ALIASES[key]
    try:
        return Stage(key)
    except ValueError:
        close = suggest(key)
        hint = f"did you mean '{close}'? " if close else ""
        raise ValidationError(
            f"unknown stage '{name.strip()}' in {flag}",
            hint=f"{hint}valid names: {valid_names_text()}",
        ) from None


def parse_stage_list(spec: str, flag: str = "--save-tensor") -> tuple[Stage, ...]:
    """Parse a stage list (comma list or ``all``) into deduplicated stages, forward order."""
    if spec.strip().lower() == "all":
        return ALL_STAGES
    if not spec.strip():
        raise ValidationError(
            f"{flag} needs at least one stage name", hint=f"valid names: {valid_names_text()}"
        )
    tokens = spec.split(",")
    # The list's shape is checked before its names, so `a,,b` reports the empty name.
    if any(not token.strip() for token in tokens):
        raise ValidationError(
            f"empty stage name in {flag} '{spec}'",
            hint=f"separate names with single commas; valid names: {valid_names_text()}",
        )
    chosen: set[Stage] = set()
    every = False
    for token in tokens:
        # `all` inside a list still selects everything, but the other names must be valid.
        if token.strip().lower() == "all":
            every = True
            continue
        chosen.add(stage_from_name(token, flag))
    if every:
        return ALL_STAGES
    return tuple(s for s in Stage if s in chosen)


def stage_from_file_stem(stem: str) -> Stage | None:
    """The stage a file name denotes, or None when the stem is not a stage name."""
    key = stem.lower()
    if key in ALIASES:
        return ALIASES[key]
    try:
        return Stage(key)
    except ValueError:
        return None


def stages_markdown() -> str:
    """The stage table of docs/stages.md, generated from GRAPH (``aprtrace stages --markdown``)."""
    lines = [
        "| # | stage | scope | layout (shape) | computed from | weights | holds | architectures |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, stage in enumerate(Stage, 1):
        spec = stage.spec
        inputs = ", ".join(" or ".join(f"`{a}`" for a in alts) for alts in spec.inputs) or "-"
        archs = ", ".join(sorted(spec.archs)) if spec.archs else "all"
        if spec.when is not None:
            archs += " (when the config has it)"
        scope = "per-layer" if spec.per_layer else "whole-model"
        lines.append(
            f"| {i} | `{stage.value}` | {scope} | `{spec.shape}` | {inputs} | "
            f"{spec.weights or '-'} | {spec.description.replace('|', chr(92) + '|')} | {archs} |"
        )
    return "\n".join(lines) + "\n"
