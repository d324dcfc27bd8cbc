"""The canonical stage list of ``apr trace --save-tensor`` (FORMATS.md section 2)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from aprtrace.errors import ValidationError

WHOLE_MODEL_LAYER = 0xFFFFFFFF


@dataclass(frozen=True)
class StageInfo:
    name: str
    per_layer: bool
    description: str
    shape: str


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
    POST_ATTN_RESIDUAL = "post_attn_residual"
    FFN_NORM = "ffn_norm"
    FFN_GATE = "ffn_gate"
    FFN_UP = "ffn_up"
    FFN_SILU = "ffn_silu"
    FFN_SWIGL = "ffn_swigl"
    FFN_OUT = "ffn_out"
    POST_FFN_RESIDUAL = "post_ffn_residual"
    FINAL_NORM = "final_norm"
    LM_HEAD = "lm_head"

    @property
    def info(self) -> StageInfo:
        return _INFO[self]

    @property
    def per_layer(self) -> bool:
        return _INFO[self].per_layer

    @property
    def order(self) -> int:
        return _ORDER[self]


_INFO = {
    Stage.EMBEDDING: StageInfo(
        "embedding", True, "token embedding rows (written as layer 0 only)", "[seq, hidden]"
    ),
    Stage.ATTN_NORM: StageInfo(
        "attn_norm", True, "input RMSNorm output (after the weight)", "[seq, hidden]"
    ),
    Stage.QKV_MATMUL: StageInfo(
        "qkv_matmul", True, "fused [Q|K|V] projection, before bias", "[seq, q_dim + 2*kv_dim]"
    ),
    Stage.QKV_BIAS: StageInfo(
        "qkv_bias",
        True,
        "[Q|K|V] after the bias add (only with a qkv bias)",
        "[seq, q_dim + 2*kv_dim]",
    ),
    Stage.Q_POST_ROPE: StageInfo(
        "q_post_rope", True, "Q after QK-norm (if any) and RoPE", "[seq, n_heads*head_dim]"
    ),
    Stage.K_POST_ROPE: StageInfo(
        "k_post_rope", True, "K after QK-norm (if any) and RoPE", "[seq, kv_dim]"
    ),
    Stage.ATTN_SCORES: StageInfo(
        "attn_scores", True, "q.k * scale, masked entries (j > i) stored as 0", "[heads, seq, seq]"
    ),
    Stage.ATTN_SOFTMAX: StageInfo(
        "attn_softmax", True, "causal softmax probabilities, masked entries 0", "[heads, seq, seq]"
    ),
    Stage.ATTENTION: StageInfo(
        "attention", True, "softmax . V, before the output projection", "[seq, n_heads*head_dim]"
    ),
    Stage.ATTN_OUT: StageInfo(
        "attn_out", True, "attention output projection (+ bias)", "[seq, hidden]"
    ),
    Stage.POST_ATTN_RESIDUAL: StageInfo(
        "post_attn_residual", True, "hidden after the attention residual add", "[seq, hidden]"
    ),
    Stage.FFN_NORM: StageInfo("ffn_norm", True, "post-attention RMSNorm output", "[seq, hidden]"),
    Stage.FFN_GATE: StageInfo("ffn_gate", True, "gate projection", "[seq, intermediate]"),
    Stage.FFN_UP: StageInfo("ffn_up", True, "up projection", "[seq, intermediate]"),
    Stage.FFN_SILU: StageInfo("ffn_silu", True, "silu(gate)", "[seq, intermediate]"),
    Stage.FFN_SWIGL: StageInfo("ffn_swigl", True, "silu(gate) * up", "[seq, intermediate]"),
    Stage.FFN_OUT: StageInfo("ffn_out", True, "down projection (+ bias)", "[seq, hidden]"),
    Stage.POST_FFN_RESIDUAL: StageInfo(
        "post_ffn_residual",
        True,
        "hidden after the FFN residual add (alias layer_output)",
        "[seq, hidden]",
    ),
    Stage.FINAL_NORM: StageInfo(
        "final_norm", False, "output RMSNorm over all positions", "[seq, hidden]"
    ),
    Stage.LM_HEAD: StageInfo("lm_head", False, "logits of the last position only", "[vocab]"),
}
_ORDER = {stage: i for i, stage in enumerate(Stage)}

ALIASES = {"layer_output": Stage.POST_FFN_RESIDUAL}
ALL_STAGES: tuple[Stage, ...] = tuple(Stage)
# The 16 capture points of the classic `apr` run (no RoPE / score / softmax stages).
APR_CLASSIC_STAGES: tuple[Stage, ...] = tuple(
    s
    for s in Stage
    if s not in (Stage.Q_POST_ROPE, Stage.K_POST_ROPE, Stage.ATTN_SCORES, Stage.ATTN_SOFTMAX)
)


def valid_names_text() -> str:
    return ", ".join(s.value for s in Stage) + ", layer_output (alias of post_ffn_residual), all"


def stage_from_name(name: str) -> Stage:
    """Map one stage name (trimmed, any case, alias allowed) to its Stage."""
    key = name.strip().lower()
    if key in ALIASES:
        return ALIASES[key]
    try:
        return Stage(key)
    except ValueError:
        raise ValidationError(
            f"unknown stage '{name.strip()}' in --save-tensor",
            hint=f"valid names: {valid_names_text()}",
        ) from None


def parse_stage_list(spec: str) -> tuple[Stage, ...]:
    """Parse ``--save-tensor`` (comma list or ``all``) into deduplicated stages, forward order."""
    if spec.strip().lower() == "all":
        return ALL_STAGES
    if not spec.strip():
        raise ValidationError(
            "--save-tensor needs at least one stage name", hint=f"valid names: {valid_names_text()}"
        )
    tokens = spec.split(",")
    # The list's shape is checked before its names, so `a,,b` reports the empty name.
    if any(not token.strip() for token in tokens):
        raise ValidationError(
            f"empty stage name in --save-tensor '{spec}'",
            hint=f"separate names with single commas; valid names: {valid_names_text()}",
        )
    chosen: set[Stage] = set()
    every = False
    for token in tokens:
        # `all` inside a list still selects everything, but the other names must be valid.
        if token.strip().lower() == "all":
            every = True
            continue
        chosen.add(stage_from_name(token))
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
