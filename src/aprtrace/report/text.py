"""Sentences and number formats shared by every renderer (terminal, HTML, JSON)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from aprtrace.diff import DirDiff, PairResult

if TYPE_CHECKING:
    from aprtrace.localize import Localization


AMPLIFY_THRESHOLD = 2.0


def finite_or_none(x: float | int | None) -> float | int | None:
    """JSON cannot hold NaN or Inf: they become null (as apr does)."""
    if x is None:
        return None
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def fmt(x: float | int | None, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)


def _verdict_word(p: PairResult) -> str:
    if p.unreadable is not None:
        return "unreadable"
    if p.error is not None:
        return "incomparable"
    return "pass" if p.passed else "fail"


def overall_verdict(d: DirDiff) -> str:
    return d.verdict.word


def amplifier_sentence(p: PairResult) -> str:
    where = p.key.label
    if p.attribution is not None and math.isinf(p.attribution):
        return f"{where} introduces error from an identical input ({p.predecessor})"
    return f"{where} multiplies the error by {p.attribution:.3g} (relative to {p.predecessor})"


def summary_line(d: DirDiff) -> str:
    tol = d.base_tolerance
    tol_text = f"atol {tol.atol:g}, rtol {tol.rtol:g}, cos-min {tol.cos_min:g}"
    n = len(d.pairs)
    if d.incomparable:
        bad = d.incomparable[0]
        return (
            f"INCOMPARABLE: {len(d.incomparable)} of {n} pairs cannot be compared "
            f"(first: {bad.key.rel}: {bad.error})"
        )
    problems = d.verdict.problems
    incomplete = f"; INCOMPLETE: {'; '.join(problems)}" if problems else ""
    if not d.failed and problems:
        return (
            f"INCOMPLETE: {n} pairs compared, all within tolerance ({tol_text}), but "
            f"{'; '.join(problems)}"
        )
    if not d.failed:
        return f"OK: all {n} pairs within tolerance ({tol_text})"
    first = d.first_divergence
    assert first is not None
    stop = " (stopped there: --fail-fast)" if d.stopped_early else ""
    return (
        f"DIVERGED: {d.failed} of {n} pairs out of tolerance ({tol_text}); first divergence: "
        f"{first.key.label}{stop}{incomplete}"
    )


POSITION_LEGEND = "at: t = token, c = channel, h = head, q = query, k = key, id = vocab id"


def cosine_gap(p: PairResult) -> float | None:
    """1 - cosine, the column that shows a small difference (a cosine of 0.9999999 is 1e-7)."""
    s = p.stats
    if s is None or math.isnan(s.cosine_sim):
        return None
    if s.max_abs_diff == 0 and s.nonfinite_mismatch == 0:
        return 0.0  # identical: the f64 cosine may still round to 1 - 1e-16
    return max(0.0, 1.0 - s.cosine_sim)


def fmt_sci(x: float | None) -> str:
    """Scientific notation with 2 digits; exact zero as '0'."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return fmt(x, ".1e")


def ratio_text(p: PairResult) -> str:
    """The stage's error relative to its input's: 'x40', 'new' (identical input), '-'."""
    if p.attribution is None:
        return "-"
    if math.isinf(p.attribution):
        return "new"
    return f"x{p.attribution:.3g}"


def adder_sentence(p: PairResult, added: float) -> str:
    """'layer 1 attn_softmax adds 0.039 (rel L2 0.001 -> 0.04, x40 vs layer 1 attn_scores)'."""
    own = p.stats.rel_l2 if p.stats is not None else None
    if p.attribution is not None and math.isinf(p.attribution):
        return (
            f"{p.key.label} adds {fmt(added, '.2g')} (rel L2 {fmt(own, '.2g')}; its input "
            f"{p.predecessor} is identical)"
        )
    inherited = own / p.attribution if own is not None and p.attribution else None
    return (
        f"{p.key.label} adds {fmt(added, '.2g')} (rel L2 {fmt(inherited, '.2g')} -> "
        f"{fmt(own, '.2g')}, {ratio_text(p)} vs {p.predecessor})"
    )


def short_reason(p: PairResult) -> str:
    """The failed check in a word: 'cos', 'max|d|', 'NaN/Inf' (full text in p.reason)."""
    if p.unreadable is not None:
        return "unreadable"
    if p.error is not None:
        return "incomparable"
    if p.passed:
        return ""
    for prefix, word in (("cosine", "cos"), ("max|d|", "max|d|")):
        if p.reason.startswith(prefix):
            return word
    return "NaN/Inf" if "NaN" in p.reason else p.reason


def _localized(localization: Localization, p: PairResult) -> bool:
    loc = localization.get(p)
    return loc is not None and loc.local_rel_l2 is not None


def localization_sentence(p: PairResult, localization: Localization) -> str:
    """'layer 3 ffn_out: 92% of its error is local (the stage itself), 8% inherited (...)'."""
    loc = localization.get(p)
    if loc is None or loc.note is not None:
        return f"{p.key.label}: not localized ({loc.note if loc else 'no result'})"
    share = loc.local_share
    local, inherited = fmt(loc.local_rel_l2, ".3g"), fmt(loc.inherited_rel_l2, ".3g")
    numbers = f"rel L2: local {local}, inherited {inherited}"
    if share is None:
        return f"{p.key.label}: no error ({numbers})"
    local_pct = round(100 * share)
    return (
        f"{p.key.label}: {local_pct}% of its error is local (the stage itself), "
        f"{100 - local_pct}% inherited ({numbers})"
    )


def localization_lines(d: DirDiff, localization: Localization) -> list[str]:
    """The findings of ``diff --model``: where B's own computation adds the most error."""
    lines = [
        "Local vs inherited error (stages re-run on B's inputs with "
        f"{localization.model_path.name}):"
    ]
    sources = localization.sources(d.pairs)
    lines.extend(f"  - {localization_sentence(p, localization)}" for p in sources)
    first = d.first_divergence
    if first is not None and first not in sources:
        lines.append(f"  first divergence: {localization_sentence(first, localization)}")
    done = sum(1 for p in d.pairs if _localized(localization, p))
    if not sources and done:
        lines.append(
            "  no stage adds error of its own: B computes exactly what the model gives from "
            "B's inputs, so all of its error is inherited (from the model's weights or inputs)"
        )
    missing = [
        p for p in d.pairs if (loc := localization.get(p)) is not None and loc.note is not None
    ]
    if missing:
        loc = localization.get(missing[0])
        lines.append(
            f"  {len(missing)} of {len(d.pairs)} stages not localized (n/d), e.g. "
            f"{missing[0].key.label}: {loc.note if loc else ''}"
        )
    return lines


def token_disagreement_line(d: DirDiff) -> str | None:
    """Where the two runs would have generated different tokens (None: they never would)."""
    p = d.first_token_disagreement
    if p is None or p.lm_head is None:
        if len(d.steps) > 1 and any(q.lm_head is not None for q in d.pairs):
            steps = f"steps {d.steps[0]}..{d.steps[-1]}"
            return f"argmax: A and B pick the same token at every pass ({steps})"
        return None
    which = "the prompt pass" if p.key.step == 0 else f"step {p.key.step}"
    return (
        f"argmax: A and B first pick different tokens after {which} (A {p.lm_head.top1_a}, "
        f"B {p.lm_head.top1_b}): greedy generation would part there, at step {p.key.step + 1}"
    )


def first_divergence_line(d: DirDiff) -> str | None:
    """'First divergence: layer 1 attn_softmax [layer-1/attn_softmax.bin]: <reason>; ...'."""
    first = d.first_divergence
    if first is None:
        return None
    where = ""
    if first.stats is not None:
        pos = first.max_coords
        at = pos.text if pos is not None else f"index {first.stats.max_abs_diff_index}"
        where = (
            f"; max|d| {fmt(first.stats.max_abs_diff, '.3g')} at {at}, "
            f"1 - cosine {fmt_sci(cosine_gap(first))}, rel L2 {fmt(first.stats.rel_l2, '.3g')}"
        )
    return f"First divergence: {first.key.label} [{first.key.rel}]: {first.reason}{where}"
