"""Local versus inherited error of each stage, by teacher forcing (``diff --values --model``).

A stage k of the candidate B computes ``B_k = f_k(x_B)`` from its own inputs ``x_B`` (other
stages of B's dump). aprtrace re-runs ``f_k`` on exactly those inputs with its float32 forward
pass and the weights of MODEL (the model B is supposed to run) and splits B's error:

    local     = ||B_k - f_k(x_B)|| / ||A_k||   what stage k itself adds, given its inputs
    inherited = ||A_k - f_k(x_B)|| / ||A_k||   what the exact computation gives from B's inputs

Both are measured against ``||A_k||`` like ``rel_l2`` (= ``||A_k - B_k|| / ||A_k||``), so
``rel_l2 <= local + inherited``; ``local_share = local / (local + inherited)``.

f_k is the architecture module's own block (``aprtrace.arch``), run for each layer with an
emit that hands back B's dumped buffer of every stage in place of the one just computed: each
line of the block then reads B's values, and the buffer it computed is f_k(x_B). Which files
a stage reads comes from the stage graph (``aprtrace.stages``); a stage whose inputs B did not
dump gets the note "inputs not dumped: ..." instead of numbers. There is no per-architecture
code here, so every registered architecture is localized, and a dump aprtrace wrote from MODEL
reproduces bit for bit: its local errors are exactly 0. Weights are decoded one layer at a
time, in forward order. MoE stages of the last position only (router, indices, output) are
computed from B's ffn_norm; the block output added to the residual uses aprtrace's routing
of every position, as B's full mixture is not dumped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aprtrace.aprt import read_aprt
from aprtrace.arch import architecture_of
from aprtrace.arch.base import PassContext
from aprtrace.arch.ops import SHORT_PROMPT, one_blas_thread
from aprtrace.config import ModelConfig
from aprtrace.diff import DirDiff, PairResult
from aprtrace.errors import ValidationError
from aprtrace.forward import LM_HEAD_CHUNK
from aprtrace.model import Model
from aprtrace.stages import Stage, computes, stage_from_file_stem, stage_inputs, stage_shape

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


class _NotComputed(Exception):
    """The architecture does not compute the stage (a file B should not have)."""


def _layer_rel(layer: int, stage: str) -> str:
    return f"layer-{layer}/{stage}.bin"


def _rel(layer: int | None, stage: Stage) -> str:
    return _layer_rel(layer, stage.value) if stage.per_layer else f"{stage.value}.bin"


def _expected_shape(cfg: ModelConfig, seq: int, stage: Stage) -> tuple[int, ...]:
    return stage_shape(stage, cfg, seq)


class _Context:
    """B's dump, the model, and the teacher-forced run of the layer being localized."""

    def __init__(self, model: Model, dump: Path, seq: int, token_ids: list[int] | None):
        self.model = model
        self.cfg = model.config
        self.dump = dump
        self.seq = seq
        self.token_ids = token_ids
        self.arch = architecture_of(self.cfg)
        self.pass_context = PassContext(model, np.arange(seq))
        self._layer: int | None = None
        self._computed: dict[Stage, np.ndarray] | None = None
        self._cache: dict[str, np.ndarray] = {}

    def enter(self, layer: int | None) -> None:
        """Move to the pairs of ``layer``: keep only what the next stages may still read."""
        if layer == self._layer:
            return
        self._layer, self._computed = layer, None
        keep = _layer_rel(layer - 1, "post_ffn_residual") if layer else None
        self._cache = {k: v for k, v in self._cache.items() if k == keep}

    def has(self, rel: str) -> bool:
        return (self.dump / rel).is_file()

    def read(self, rel: str, stage: Stage) -> np.ndarray:
        """B's ``rel`` as float32 in the shape the stage graph gives it, checked against MODEL."""
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

    def computed(self, layer: int) -> dict[Stage, np.ndarray]:
        """Every stage of ``layer`` as the architecture computes it from B's inputs.

        The architecture's own ``layer`` runs with an emit that records the buffer just
        computed and hands back B's dumped buffer of that stage, so each line of the block
        continues from B's values: the recorded buffer is f_k(x_B). A stage B did not dump
        hands back the computed buffer; the stages reading it get a note instead (see
        ``_inputs``). Stages kept for the last position only (MoE) feed nothing back.
        """
        assert layer == self._layer
        if self._computed is None:
            self._computed = {}
            record = self._computed
            rel, stage = self.layer_input(layer)
            # Without it, the stages reading the layer input are noted; the rest need a buffer.
            x = (
                self.read(rel, stage)
                if self.has(rel)
                else np.zeros((self.seq, self.cfg.hidden_size), dtype=np.float32)
            )

            def substitute(stage: Stage, at: int | None, values: np.ndarray) -> np.ndarray:
                record[stage] = np.array(values, dtype=np.float32, copy=True)
                rel = _layer_rel(layer, stage.value)
                if not self.has(rel):
                    return values
                dumped = self.read(rel, stage)
                return dumped.reshape(values.shape) if dumped.size == values.size else values

            weights = self.arch.load_layer(self.model, layer)
            self.arch.layer(self.cfg, weights, x, layer, self.pass_context, substitute)
        return self._computed

    def layer_input(self, layer: int) -> tuple[str, Stage]:
        """B's file holding the input of ``layer`` and its stage."""
        if layer == 0:
            return _layer_rel(0, "embedding"), Stage.EMBEDDING
        return _layer_rel(layer - 1, "post_ffn_residual"), Stage.POST_FFN_RESIDUAL


def _inputs(ctx: _Context, stage: Stage, layer: int | None) -> tuple[str, ...]:
    """B's files the stage graph says ``stage`` reads; raise for the first one not dumped."""
    operands = stage_inputs(stage, layer, lambda s: computes(s, ctx.cfg), ctx.cfg.num_layers)
    rels = []
    for operand in operands:
        if operand is None:
            continue
        rel = _rel(*operand)
        if not ctx.has(rel):
            raise _MissingInput(rel)
        rels.append(rel)
    return tuple(dict.fromkeys(rels))


def _teacher_forced(ctx: _Context, stage: Stage, layer: int | None) -> np.ndarray:
    """f_k(x_B): the stage's buffer computed by MODEL's architecture from B's inputs."""
    arch, model = ctx.arch, ctx.model
    if stage is Stage.EMBEDDING:
        if ctx.token_ids is None:
            raise _MissingInput("token ids (no manifest.json in either dump)")
        return arch.embed(model, np.asarray(ctx.token_ids, dtype=np.int64))
    if stage is Stage.FINAL_NORM:
        last = ctx.cfg.num_layers - 1
        rel = _layer_rel(last, "post_ffn_residual")
        return arch.final_norm(model, ctx.read(rel, Stage.POST_FFN_RESIDUAL))
    if stage is Stage.LM_HEAD:
        final = ctx.read(f"{Stage.FINAL_NORM.value}.bin", Stage.FINAL_NORM)
        return arch.logits(model, final[-1], LM_HEAD_CHUNK)
    computed = ctx.computed(layer)
    if stage not in computed:
        raise _NotComputed(stage)
    return computed[stage]


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
    at = pair.key.layer if stage.per_layer else None
    try:
        inputs = _inputs(ctx, stage, at)
        expected = _teacher_forced(ctx, stage, at)
    except _MissingInput as missing:
        return StageLocalization(note=f"inputs not dumped: {missing.rel}")
    except _NotComputed:
        return StageLocalization(note=f"{ctx.cfg.architecture} does not compute {stage.value}")
    reference = read_aprt(diff.a.path / pair.key.rel).values
    local, inherited = split_error(reference, candidate, expected)
    return StageLocalization(local, inherited, inputs)


__all__ = [
    "Localization",
    "StageLocalization",
    "WEIGHT_STAGES",
    "check_model_matches",
    "localize",
    "split_error",
]
