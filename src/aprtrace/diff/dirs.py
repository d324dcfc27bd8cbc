"""Directory mode: pair the files of two dumps, compare them in forward order, find the
first divergence, attribute the error."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from aprtrace.aprt import read_aprt
from aprtrace.diff.attribution import attribute
from aprtrace.diff.files import check_comparable
from aprtrace.diff.layout import (
    DumpInfo,
    PairKey,
    check_same_run,
    dump_warnings,
    infer_shape,
    load_dump,
)
from aprtrace.diff.metrics import CHUNK, compare_arrays, lm_head_stats
from aprtrace.diff.results import DirDiff, PairResult
from aprtrace.diff.tokens import token_texts
from aprtrace.diff.tolerance import (
    DEFAULT_TOLERANCE,
    Tolerance,
    TolOverride,
    tolerance_for,
    verdict,
)
from aprtrace.errors import (
    NotFoundError,
    OutputError,
    ValidationError,
)
from aprtrace.index_metrics import index_agreement
from aprtrace.stages import Stage, stage_from_file_stem


def compare_pair(
    key: PairKey,
    a: DumpInfo,
    b: DumpInfo,
    tol: Tolerance,
    limit: int,
    chunk: int = CHUNK,
) -> PairResult:
    result = PairResult(key, tol)
    try:
        fa = read_aprt(a.path / key.rel)
        fb = read_aprt(b.path / key.rel)
    except (OutputError, NotFoundError) as exc:  # vanished or unreadable: the dump is incomplete
        result.unreadable = exc.message
        result.reason = "unreadable"
        return result
    try:
        check_comparable(fa, fb)
    except ValidationError as exc:
        result.error = exc.message
        result.reason = "incomparable"
        return result
    result.layer_header = fa.layer
    manifests = [m for m in (a.manifest, b.manifest) if m is not None]
    result.shape = infer_shape(key, fa.values.size, manifests)
    result.stats = compare_arrays(fa.values, fb.values, limit=limit, extended=True, chunk=chunk)
    if key.stage == Stage.LM_HEAD.value:
        result.lm_head = lm_head_stats(fa.values, fb.values)
    result.passed, result.reason = verdict(result.stats, tol)
    # Index payloads (expert ids as f32) are compared as integers, per token.
    stage = stage_from_file_stem(key.stage)
    if stage is not None and stage.index_payload:
        result.index = index_agreement(fa.values, fb.values, result.shape)
        result.passed, result.reason = result.index.passed, result.index.reason
    return result


def diff_dirs(
    path_a: Path,
    path_b: Path,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    overrides: list[TolOverride] | None = None,
    limit: int = 10,
    fail_fast: bool = False,
    chunk: int = CHUNK,
    on_pair: Callable[[PairResult], None] | None = None,
    select: Callable[[PairKey], bool] | None = None,
    include_stale: bool = False,
    decode_tokens: bool = True,
) -> DirDiff:
    """Compare two dump directories pair by pair in forward order.

    ``select`` keeps only the pairs it returns True for (``--stages`` / ``--layers``); files
    on one side only count against completeness only when selected. Two dumps whose
    manifests show different models, token ids or prompts are refused before any pair is read.
    """
    a = load_dump(path_a, "A", include_stale)
    b = load_dump(path_b, "B", include_stale)
    check_same_run(a, b)
    overrides = overrides or []
    common = sorted((a.files[rel] for rel in a.files.keys() & b.files.keys()), key=PairKey.sort_key)
    if select is not None:
        common = [key for key in common if select(key)]

    def one_sided(mine: DumpInfo, other: DumpInfo) -> list[str]:
        rels = [r for r in mine.files if r not in other.files]
        if select is not None:
            rels = [r for r in rels if select(mine.files[r])]
        return sorted(rels, key=lambda r: mine.files[r].sort_key())

    result = DirDiff(a, b, tolerance, [], one_sided(a, b), one_sided(b, a), dump_warnings(a, b))
    if not common:
        raise ValidationError(
            f"no stage files in common between {a.path} ({len(a.files)} files) and "
            f"{b.path} ({len(b.files)} files)",
            hint="pass two dump directories written by aprtrace trace or apr trace --save-tensor",
        )
    for key in common:
        tol = tolerance_for(tolerance, overrides, key.stage, key.step_stem)
        pair = compare_pair(key, a, b, tol, limit, chunk)
        result.pairs.append(pair)
        if on_pair is not None:
            on_pair(pair)
        if pair.passed is False and result.first_divergence is None:
            result.first_divergence = pair
            if fail_fast:
                result.stopped_early = key is not common[-1]
                break
    config = next((m.config for m in (a.manifest, b.manifest) if m is not None and m.config), None)
    num_layers = config.get("num_layers") if config else None
    for step in result.steps:  # each pass reads its own inputs (decode steps too)
        step_pairs = [p for p in result.pairs if p.key.step == step]
        attribute(step_pairs, num_layers if isinstance(num_layers, int) else None, config)
    result.adders = result.error_adders()
    result.amplifying = result.amplifiers()
    if decode_tokens:
        result.token_texts = token_texts([a.manifest, b.manifest])
    return result
