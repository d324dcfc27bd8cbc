"""Local versus inherited error of each stage, by teacher forcing (``diff --values --model``).

A stage k of the candidate B computes ``B_k = f_k(x_B)`` from its own inputs ``x_B`` (other
stages of B's dump). aprtrace re-runs ``f_k`` on exactly those inputs with its float32 forward
pass and the weights of MODEL (the model B is supposed to run) and splits B's error:

    local     = ||B_k - f_k(x_B)|| / ||A_k||   what stage k itself adds, given its inputs
    inherited = ||A_k - f_k(x_B)|| / ||A_k||   what the exact computation gives from B's inputs

Both are measured against ``||A_k||`` like ``rel_l2`` (= ``||A_k - B_k|| / ||A_k||``), so
``rel_l2 <= local + inherited``; ``local_share = local / (local + inherited)``.

The stage functions are the ones ``forward`` runs (``rms_norm``, ``qkv_projection``,
``attention_scores``, ...), so a dump aprtrace wrote from MODEL reproduces bit for bit: its
local errors are exactly 0. Weights are decoded one layer at a time, in forward order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aprtrace.aprt import read_aprt
from aprtrace.arch import architecture_of
from aprtrace.arch.base import PassContext
from aprtrace.arch.llama import (
    LayerWeights,
    Llama,
    add_qkv_bias,
    norm_and_rope,
    qkv_projection,
    split_qkv,
)
from aprtrace.arch.ops import (
    SHORT_PROMPT,
    attend,
    attention_mask,
    attention_scores,
    linear,
    masked_softmax,
    one_blas_thread,
    rms_norm,
    silu,
)
from aprtrace.arch.phi3 import Phi3
from aprtrace.config import ModelConfig
from aprtrace.diff import DirDiff, PairResult
from aprtrace.errors import ValidationError
from aprtrace.forward import LM_HEAD_CHUNK
from aprtrace.model import Model
from aprtrace.stages import Stage, stage_from_file_stem, stage_shape

# Sizes that must agree between MODEL and the config in B's manifest.
_SHAPE_KEYS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
)
# Settings that do not change shapes but do change the math of some stages.
_MATH_KEYS = ("rope_theta", "rope_linear_factor", "rms_norm_eps", "qkv_bias", "qk_norm")
# Architectures whose stages are exactly the Llama functions below (Phi-3's fused weights are
# split on load; partial rotary and the window are in the RoPE tables and the mask).
TEACHER_FORCED = Llama.names + Phi3.names
# Stages whose function multiplies by a weight matrix that quantization changes.
WEIGHT_STAGES = frozenset(s for s in Stage if s.spec.weights == "matrix")


@dataclass
class StageLocalization:
    """Local and inherited error of one pair; ``note`` says why they are missing."""

    local_rel_l2: float | None = None
    inherited_rel_l2: float | None = None
    inputs: tuple[str, ...] = ()  # B's files fed to the stage function
    note: str | None = None

    @property
    def local_share(self) -> float | None:
        """Fraction of the error the stage adds itself, ``local / (local + inherited)``."""
        lo, inh = self.local_rel_l2, self.inherited_rel_l2
        if lo is None or inh is None or not (math.isfinite(lo) and math.isfinite(inh)):
            return None
        return lo / (lo + inh) if lo + inh > 0 else None


@dataclass
class Localization:
    """Teacher-forcing results of a directory diff, keyed by the pair's relative path."""

    model_path: Path
    architecture: str
    stages: dict[str, StageLocalization] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def get(self, pair: PairResult) -> StageLocalization | None:
        return self.stages.get(pair.key.rel)

    def sources(self, pairs: list[PairResult], top: int = 3) -> list[PairResult]:
        """Pairs with the largest local error (at least 1% of the largest), largest first."""
        hits = [
            p
            for p in pairs
            if (loc := self.get(p)) is not None
            and loc.local_rel_l2 is not None
            and loc.local_rel_l2 > 0
        ]
        if not hits:
            return []

        def local(p: PairResult) -> float:
            return self.stages[p.key.rel].local_rel_l2  # type: ignore[return-value]

        largest = max(local(p) for p in hits)
        hits = [p for p in hits if local(p) >= 0.01 * largest]
        hits.sort(key=lambda p: -local(p))
        return hits[:top]


class _MissingInput(Exception):
    def __init__(self, rel: str):
        super().__init__(rel)
        self.rel = rel


def _layer_rel(layer: int, stage: str) -> str:
    return f"layer-{layer}/{stage}.bin"


def _expected_shape(cfg: ModelConfig, seq: int, stage: Stage) -> tuple[int, ...]:
    return stage_shape(stage, cfg, seq)


class _Context:
    """B's dump, the model, and the weights of the layer being localized."""

    def __init__(self, model: Model, dump: Path, seq: int, token_ids: list[int] | None):
        self.model = model
        self.cfg = model.config
        self.dump = dump
        self.seq = seq
        self.token_ids = token_ids
        self.arch = architecture_of(self.cfg)
        positions = np.arange(seq)
        self.pass_context = PassContext(model, positions)
        self.cos, self.sin = self.arch.default_rope(self.pass_context)
        self.mask = attention_mask(positions, positions, self.cfg.sliding_window)
        self._layer: int | None = None
        self._weights: LayerWeights | None = None
        self._cache: dict[str, np.ndarray] = {}
        self.used: list[str] = []

    @property
    def eps(self) -> float:
        return self.cfg.rms_norm_eps

    def enter(self, layer: int | None) -> None:
        """Move to the pairs of ``layer``: keep only what the next stages may still read."""
        if layer == self._layer:
            return
        self._layer, self._weights = layer, None
        keep = _layer_rel(layer - 1, "post_ffn_residual") if layer else None
        self._cache = {k: v for k, v in self._cache.items() if k == keep}

    def weights(self, layer: int) -> LayerWeights:
        """The current layer's weights, decoded on first use (one layer in memory)."""
        assert layer == self._layer
        if self._weights is None:
            self._weights = self.arch.load_layer(self.model, layer)
        return self._weights

    def has(self, rel: str) -> bool:
        return (self.dump / rel).is_file()

    def read(self, rel: str, stage: Stage) -> np.ndarray:
        """B's ``rel`` as float32 in the shape ``forward`` gives it, checked against MODEL."""
        self.used.append(rel)
        if rel in self._cache:
            return self._cache[rel]
        if not self.has(rel):
            raise _MissingInput(rel)
        values = read_aprt(self.dump / rel).values
        shape = _expected_shape(self.cfg, self.seq, stage)
        if values.size != math.prod(shape):
            raise ValidationError(
                f"--model {self.model.path} does not match dump B: {rel} has {values.size} "
                f"values, the model gives {stage.value} the shape {list(shape)} "
                f"({math.prod(shape)} values)",
                hint="pass the model B was traced from (e.g. the quantized GGUF it ran)",
            )
        array = np.array(values, dtype=np.float32).reshape(shape)  # own, aligned copy
        self._cache[rel] = array
        return array

    def layer_input(self, layer: int) -> np.ndarray:
        if layer == 0:
            return self.read(_layer_rel(0, "embedding"), Stage.EMBEDDING)
        return self.read(_layer_rel(layer - 1, "post_ffn_residual"), Stage.POST_FFN_RESIDUAL)

    def qkv(self, layer: int) -> np.ndarray:
        """The fused [Q|K|V] after the bias: B's qkv_bias, else B's qkv_matmul plus the bias."""
        rel = _layer_rel(layer, "qkv_bias")
        if self.has(rel):
            return self.read(rel, Stage.QKV_BIAS)
        qkv = self.read(_layer_rel(layer, "qkv_matmul"), Stage.QKV_MATMUL)
        w = self.weights(layer)
        return add_qkv_bias(self.cfg, w, qkv) if w.has_qkv_bias else qkv


def _split(ctx: _Context, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return split_qkv(ctx.cfg, ctx.qkv(layer))


def _stage_functions() -> dict[Stage, Callable[[_Context, int], np.ndarray]]:
    """f_k for every stage: B's inputs (read through the context) -> the stage's buffer."""

    def b(stage: Stage) -> Callable[[_Context, int], np.ndarray]:
        return lambda ctx, layer: ctx.read(_layer_rel(layer, stage.value), stage)

    attn_norm, qkv_matmul, q_rope, k_rope = (
        b(Stage.ATTN_NORM),
        b(Stage.QKV_MATMUL),
        b(Stage.Q_POST_ROPE),
        b(Stage.K_POST_ROPE),
    )
    scores, probs, context, post_attn = (
        b(Stage.ATTN_SCORES),
        b(Stage.ATTN_SOFTMAX),
        b(Stage.ATTENTION),
        b(Stage.POST_ATTN_RESIDUAL),
    )
    ffn_norm, gate, up, silu_out, swiglu = (
        b(Stage.FFN_NORM),
        b(Stage.FFN_GATE),
        b(Stage.FFN_UP),
        b(Stage.FFN_SILU),
        b(Stage.FFN_SWIGL),
    )
    w = _Context.weights

    def rope(ctx: _Context, layer: int, part: int) -> np.ndarray:
        x = _split(ctx, layer)[part]
        norm = w(ctx, layer).q_norm if part == 0 else w(ctx, layer).k_norm
        out = norm_and_rope(x, norm, ctx.eps, ctx.cos, ctx.sin)
        return out.reshape(ctx.seq, -1)

    def attention_scores_of(ctx: _Context, layer: int) -> np.ndarray:
        q = q_rope(ctx, layer).reshape(ctx.seq, ctx.cfg.num_heads, ctx.cfg.head_dim)
        k = k_rope(ctx, layer).reshape(ctx.seq, ctx.cfg.num_kv_heads, ctx.cfg.head_dim)
        return attention_scores(q, k, ctx.cfg.attention_scale, ctx.mask)

    def embedding(ctx: _Context, layer: int) -> np.ndarray:
        if ctx.token_ids is None:
            raise _MissingInput("token ids (no manifest.json in either dump)")
        return ctx.arch.embed(ctx.model, np.asarray(ctx.token_ids, dtype=np.int64))

    def last_residual(ctx: _Context) -> np.ndarray:
        last = ctx.cfg.num_layers - 1
        return ctx.read(_layer_rel(last, "post_ffn_residual"), Stage.POST_FFN_RESIDUAL)

    return {
        Stage.EMBEDDING: embedding,
        Stage.ATTN_NORM: lambda c, i: rms_norm(c.layer_input(i), w(c, i).input_layernorm, c.eps),
        Stage.QKV_MATMUL: lambda c, i: qkv_projection(w(c, i), attn_norm(c, i)),
        Stage.QKV_BIAS: lambda c, i: add_qkv_bias(c.cfg, w(c, i), qkv_matmul(c, i)),
        Stage.Q_POST_ROPE: lambda c, i: rope(c, i, 0),
        Stage.K_POST_ROPE: lambda c, i: rope(c, i, 1),
        Stage.ATTN_SCORES: attention_scores_of,
        Stage.ATTN_SOFTMAX: lambda c, i: masked_softmax(scores(c, i), c.mask),
        Stage.ATTENTION: lambda c, i: attend(probs(c, i), _split(c, i)[2]),
        Stage.ATTN_OUT: lambda c, i: linear(context(c, i), w(c, i).o_proj, w(c, i).o_bias),
        Stage.POST_ATTN_RESIDUAL: lambda c, i: c.layer_input(i) + b(Stage.ATTN_OUT)(c, i),
        Stage.FFN_NORM: lambda c, i: rms_norm(
            post_attn(c, i), w(c, i).post_attention_layernorm, c.eps
        ),
        Stage.FFN_GATE: lambda c, i: linear(ffn_norm(c, i), w(c, i).gate_proj, w(c, i).gate_bias),
        Stage.FFN_UP: lambda c, i: linear(ffn_norm(c, i), w(c, i).up_proj, w(c, i).up_bias),
        Stage.FFN_SILU: lambda c, i: silu(gate(c, i)),
        Stage.FFN_SWIGL: lambda c, i: silu_out(c, i) * up(c, i),
        Stage.FFN_OUT: lambda c, i: linear(swiglu(c, i), w(c, i).down_proj, w(c, i).down_bias),
        Stage.POST_FFN_RESIDUAL: lambda c, i: post_attn(c, i) + b(Stage.FFN_OUT)(c, i),
        Stage.FINAL_NORM: lambda c, i: c.arch.final_norm(c.model, last_residual(c)),
        Stage.LM_HEAD: lambda c, i: c.arch.logits(
            c.model, c.read(f"{Stage.FINAL_NORM.value}.bin", Stage.FINAL_NORM)[-1], LM_HEAD_CHUNK
        ),
    }


def _gemma_stage_functions() -> dict[Stage, Callable[[_Context, int], np.ndarray]]:
    """f_k of Gemma 2/3 (``aprtrace.arch.gemma``): (1 + w) norms, post-norms before each
    residual add, per-layer RoPE base and window, soft-capped scores, GELU."""
    from aprtrace.arch.gemma import gemma_rms_norm
    from aprtrace.arch.ops import apply_rope, gelu_tanh

    def b(stage: Stage) -> Callable[[_Context, int], np.ndarray]:
        return lambda ctx, layer: ctx.read(_layer_rel(layer, stage.value), stage)

    w = _Context.weights

    def mask(ctx: _Context, layer: int) -> np.ndarray:
        positions = np.arange(ctx.seq)
        return attention_mask(positions, positions, ctx.cfg.layer_window(layer))

    def rope(ctx: _Context, layer: int, part: int) -> np.ndarray:
        x = _split(ctx, layer)[part]
        norm = w(ctx, layer).q_norm if part == 0 else w(ctx, layer).k_norm
        if norm is not None:
            x = gemma_rms_norm(x, norm, ctx.eps)
        cos, sin = ctx.arch.layer_rope(ctx.pass_context, layer)
        return apply_rope(x, cos, sin).reshape(ctx.seq, -1)

    def scores(ctx: _Context, layer: int) -> np.ndarray:
        cfg = ctx.cfg
        q = b(Stage.Q_POST_ROPE)(ctx, layer).reshape(ctx.seq, cfg.num_heads, cfg.head_dim)
        k = b(Stage.K_POST_ROPE)(ctx, layer).reshape(ctx.seq, cfg.num_kv_heads, cfg.head_dim)
        return attention_scores(
            q, k, cfg.attention_scale, mask(ctx, layer), cfg.attn_logit_softcapping
        )

    def norm(source: Stage, weight: str) -> Callable[[_Context, int], np.ndarray]:
        return lambda c, i: gemma_rms_norm(b(source)(c, i), getattr(w(c, i), weight), c.eps)

    return _FUNCTIONS | {
        Stage.ATTN_NORM: lambda c, i: gemma_rms_norm(
            c.layer_input(i), w(c, i).input_layernorm, c.eps
        ),
        Stage.Q_POST_ROPE: lambda c, i: rope(c, i, 0),
        Stage.K_POST_ROPE: lambda c, i: rope(c, i, 1),
        Stage.ATTN_SCORES: scores,
        Stage.ATTN_SOFTMAX: lambda c, i: masked_softmax(b(Stage.ATTN_SCORES)(c, i), mask(c, i)),
        Stage.ATTN_OUT: lambda c, i: linear(b(Stage.ATTENTION)(c, i), w(c, i).o_proj),
        Stage.POST_ATTN_NORM: norm(Stage.ATTN_OUT, "post_attention_layernorm"),
        Stage.POST_ATTN_RESIDUAL: lambda c, i: c.layer_input(i) + b(Stage.POST_ATTN_NORM)(c, i),
        Stage.FFN_NORM: norm(Stage.POST_ATTN_RESIDUAL, "pre_feedforward_layernorm"),
        Stage.FFN_GATE: lambda c, i: linear(b(Stage.FFN_NORM)(c, i), w(c, i).gate_proj),
        Stage.FFN_UP: lambda c, i: linear(b(Stage.FFN_NORM)(c, i), w(c, i).up_proj),
        Stage.FFN_SILU: lambda c, i: gelu_tanh(b(Stage.FFN_GATE)(c, i)),
        Stage.FFN_OUT: lambda c, i: linear(b(Stage.FFN_SWIGL)(c, i), w(c, i).down_proj),
        Stage.POST_FFN_NORM: norm(Stage.FFN_OUT, "post_feedforward_layernorm"),
        Stage.POST_FFN_RESIDUAL: lambda c, i: (
            b(Stage.POST_ATTN_RESIDUAL)(c, i) + b(Stage.POST_FFN_NORM)(c, i)
        ),
    }


_FUNCTIONS = _stage_functions()
_GEMMA_FUNCTIONS = _gemma_stage_functions()
# architecture -> its stage functions (the Llama family's by default).
_FUNCTIONS_OF = {"gemma2": _GEMMA_FUNCTIONS, "gemma3": _GEMMA_FUNCTIONS}


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def split_error(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> tuple[float, float]:
    """``(||b - f|| / ||a||, ||a - f|| / ||a||)`` in f64, over positions finite in all three."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    f = np.asarray(f, dtype=np.float64).reshape(-1)
    finite = np.isfinite(a) & np.isfinite(b) & np.isfinite(f)
    if not finite.all():
        a, b, f = a[finite], b[finite], f[finite]
    norm_a = float(np.sqrt(np.dot(a, a)))
    return (
        _ratio(float(np.linalg.norm(b - f)), norm_a),
        _ratio(float(np.linalg.norm(a - f)), norm_a),
    )


def check_model_matches(cfg: ModelConfig, diff: DirDiff, model_path: Path) -> list[str]:
    """Raise when MODEL's sizes differ from B's manifest; warn when only its math settings do."""
    manifest = diff.b.manifest
    if manifest is None or not manifest.config:
        return []
    mine = cfg.to_dict()
    theirs = manifest.config
    wrong = [k for k in _SHAPE_KEYS if k in theirs and theirs[k] != mine[k]]
    if wrong:
        detail = ", ".join(f"{k} {mine[k]} in the model, {theirs[k]} in B" for k in wrong)
        raise ValidationError(
            f"--model {model_path} does not match dump B ({diff.b.path}): {detail}",
            hint="pass the model B was traced from (e.g. the quantized GGUF it ran)",
        )
    return [
        f"--model {model_path}: {k} is {mine[k]!r}, B's manifest says {theirs[k]!r}; "
        "the local error of the stages it affects includes this difference"
        for k in _MATH_KEYS
        if k in theirs and theirs[k] != mine[k]
    ]


def _token_ids(diff: DirDiff) -> list[int] | None:
    for m in (diff.b.manifest, diff.a.manifest):
        if m is not None and m.token_ids:
            return [int(t) for t in m.token_ids]
    return None


def _infer_seq(cfg: ModelConfig, diff: DirDiff, model_path: Path) -> int | None:
    """Sequence length from B's token ids, else from a ``[seq, hidden]`` file of B."""
    ids = _token_ids(diff)
    if ids is not None:
        return len(ids)
    for rel, key in diff.b.files.items():
        stage = stage_from_file_stem(key.stage)
        if stage is None or _expected_shape(cfg, 1, stage) != (1, cfg.hidden_size):
            continue
        count = read_aprt(diff.b.path / rel).values.size
        if count % cfg.hidden_size:
            raise ValidationError(
                f"--model {model_path} does not match dump B: {rel} has {count} values, "
                f"not a multiple of the model's hidden size {cfg.hidden_size}",
                hint="pass the model B was traced from (e.g. the quantized GGUF it ran)",
            )
        return count // cfg.hidden_size
    return None


def localize(diff: DirDiff, model: Model) -> Localization:
    """Local and inherited error of every compared pair of ``diff`` (see the module doc)."""
    cfg = model.config
    result = Localization(Path(model.path), cfg.architecture)
    result.warnings = check_model_matches(cfg, diff, Path(model.path))
    seq = _infer_seq(cfg, diff, Path(model.path))
    if seq is None:
        for p in diff.pairs:
            result.stages[p.key.rel] = StageLocalization(note="sequence length unknown")
        return result
    if cfg.architecture not in (*TEACHER_FORCED, *_FUNCTIONS_OF):
        note = f"teacher forcing is not implemented for {cfg.architecture} yet"
        for p in diff.pairs:
            result.stages[p.key.rel] = StageLocalization(note=note)
        return result
    ctx = _Context(model, diff.b.path, seq, _token_ids(diff))
    with np.errstate(all="ignore"), one_blas_thread(seq <= SHORT_PROMPT):
        for pair in diff.pairs:
            if pair.key.step:  # a decode step's attention reads the cache, which is not dumped
                note = "decode steps are not localized (the KV cache is not in the dump)"
                result.stages[pair.key.rel] = StageLocalization(note=note)
                continue
            result.stages[pair.key.rel] = _localize_pair(ctx, diff, pair)
    return result


def _localize_pair(ctx: _Context, diff: DirDiff, pair: PairResult) -> StageLocalization:
    stage = stage_from_file_stem(pair.key.stage)
    if pair.stats is None:
        return StageLocalization(note="incomparable pair")
    if stage is None or (stage.per_layer and pair.key.layer is None):
        return StageLocalization(note="not a known stage file")
    layer = pair.key.layer if stage.per_layer else -1
    if layer is not None and layer >= ctx.cfg.num_layers:
        raise ValidationError(
            f"--model {ctx.model.path} does not match dump B: {pair.key.rel} is beyond the "
            f"model's {ctx.cfg.num_layers} layers",
            hint="pass the model B was traced from (e.g. the quantized GGUF it ran)",
        )
    ctx.enter(pair.key.layer)
    candidate = ctx.read(pair.key.rel, stage)
    ctx.used = []
    try:
        functions = _FUNCTIONS_OF.get(ctx.cfg.architecture, _FUNCTIONS)
        expected = functions[stage](ctx, layer if layer is not None else -1)
    except _MissingInput as missing:
        return StageLocalization(note=f"inputs not dumped: {missing.rel}")
    reference = read_aprt(diff.a.path / pair.key.rel).values
    local, inherited = split_error(reference, candidate, expected)
    inputs = tuple(dict.fromkeys(ctx.used))
    return StageLocalization(local, inherited, inputs)


__all__ = [
    "Localization",
    "StageLocalization",
    "WEIGHT_STAGES",
    "check_model_matches",
    "localize",
    "split_error",
]
