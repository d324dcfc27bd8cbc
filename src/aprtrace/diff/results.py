"""Structured results of a directory diff: per pair, the whole diff, and its Verdict."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from aprtrace.diff.layout import DumpInfo, PairKey, Position, not_captured, position_of
from aprtrace.diff.metrics import LmHeadStats, PairStats
from aprtrace.diff.tokens import TokenTexts
from aprtrace.diff.tolerance import Tolerance
from aprtrace.errors import (
    EXIT_DIVERGED,
    EXIT_INCOMPLETE,
    ValidationError,
)
from aprtrace.index_metrics import IndexAgreement


@dataclass
class PairResult:
    """One compared pair of a directory diff."""

    key: PairKey
    tolerance: Tolerance
    layer_header: int | None = None
    shape: tuple[int, ...] | None = None
    stats: PairStats | None = None
    lm_head: LmHeadStats | None = None
    passed: bool | None = None  # None when incomparable
    reason: str = ""
    error: str | None = None  # incomparable: why
    attribution: float | None = None
    predecessor: str | None = None
    # Why there is no attribution although the pair has statistics (an input not in the dump).
    input_note: str | None = None
    unreadable: str | None = None  # a file of the pair could not be read (OS error)
    index: IndexAgreement | None = None  # index payloads (moe_router_indices): per token

    def coords_of(self, index: int) -> Position | None:
        """Named coordinates of flat ``index`` (None without a shape)."""
        if self.shape is None:
            return None
        return position_of(self.key.stage, self.shape, index)

    @property
    def max_coords(self) -> Position | None:
        """Where max|d| is, as named coordinates (None without a shape)."""
        if self.stats is None:
            return None
        return self.coords_of(self.stats.max_abs_diff_index)

    @property
    def max_position(self) -> str | None:
        pos = self.max_coords
        return pos.text if pos is not None else None


# Relative L2 error below which a stage is float32 rounding noise, not news: two correct f32
# implementations of one stage differ by ~1e-7..1e-6 (summation order, fused operations).
NOISE_REL_L2 = 1e-5


@dataclass(frozen=True)
class Verdict:
    """The overall answer of a directory diff, and the exit code that says it.

    ``word``: ``pass`` (every pair within tolerance and nothing missing), ``diverged`` (a
    pair is out of tolerance; exit 1), ``incomplete`` (files missing, unreadable or on one
    side only; exit 9, never "OK"), ``incomparable`` (pairs of different sizes; exit 5).
    ``problems``: one sentence per reason the dump pair is incomplete.
    """

    word: str
    exit_code: int
    problems: tuple[str, ...] = ()


@dataclass
class DirDiff:
    """The whole result of a directory diff, ready for rendering."""

    a: DumpInfo
    b: DumpInfo
    base_tolerance: Tolerance
    pairs: list[PairResult]
    only_a: list[str]
    only_b: list[str]
    warnings: list[str] = field(default_factory=list)
    first_divergence: PairResult | None = None
    stopped_early: bool = False
    one_sided_ok: bool = False  # files on one side only do not make the verdict incomplete
    # Findings, set by diff_dirs once attribution is known (renderers only read them).
    adders: list[tuple[PairResult, float]] = field(default_factory=list)
    amplifying: list[PairResult] = field(default_factory=list)
    token_texts: TokenTexts | None = None  # from a dump's model tokenizer, when available

    @property
    def steps(self) -> list[int]:
        """The decode steps compared (0 = the prompt pass), in order."""
        return sorted({p.key.step for p in self.pairs})

    @property
    def first_token_disagreement(self) -> PairResult | None:
        """The first pass (prompt, then steps) whose lm_head argmax differs between A and B:
        from there on, the two engines would have generated different tokens."""
        for p in sorted(self.pairs, key=lambda p: p.key.step):
            if p.lm_head is not None and not p.lm_head.top1_agree:
                return p
        return None

    @property
    def passed(self) -> int:
        return sum(1 for p in self.pairs if p.passed)

    @property
    def failed(self) -> int:
        return sum(1 for p in self.pairs if p.passed is False)

    @property
    def incomparable(self) -> list[PairResult]:
        return [p for p in self.pairs if p.error is not None]

    @property
    def unreadable(self) -> list[PairResult]:
        return [p for p in self.pairs if p.unreadable is not None]

    def incomplete_problems(self) -> list[str]:
        """Why the comparison does not cover both dumps (empty when it does)."""
        out = []
        for side, dump in (("A", self.a), ("B", self.b)):
            if dump.missing:
                out.append(
                    f"{side}: {len(dump.missing)} file(s) listed in manifest.json are missing "
                    f"(first: {dump.missing[0]})"
                )
            if dump.unreadable:
                out.append(
                    f"{side}: {len(dump.unreadable)} path(s) could not be read "
                    f"(first: {dump.unreadable[0]})"
                )
        for side, mine, other, names in (
            ("A", self.a, self.b, self.only_a),
            ("B", self.b, self.a, self.only_b),
        ):
            # A stage the other side's engine does not compute (it says so) is not missing.
            skipped = not_captured(other)
            names = [r for r in names if r not in mine.files or mine.files[r].stage not in skipped]
            if names and not self.one_sided_ok:
                out.append(f"{len(names)} file(s) only in {side} (first: {names[0]})")
        bad = self.unreadable
        if bad:
            out.append(f"{len(bad)} pair(s) could not be read (first: {bad[0].unreadable})")
        return out

    @property
    def verdict(self) -> Verdict:
        problems = tuple(self.incomplete_problems())
        if self.incomparable:
            return Verdict("incomparable", ValidationError.exit_code, problems)
        if self.failed:
            return Verdict("diverged", EXIT_DIVERGED, problems)
        if problems:
            return Verdict("incomplete", EXIT_INCOMPLETE, problems)
        return Verdict("pass", 0)

    def error_adders(self, top: int = 5) -> list[tuple[PairResult, float]]:
        """The pairs that add the most relative error of their own, with the amount added.

        added = rel_l2(stage) - rel_l2(its input) (the whole rel_l2 for a source whose input is
        identical). Stages under NOISE_REL_L2 (float32 rounding) are left out.
        """
        out = []
        for p in self.pairs:
            s = p.stats
            if s is None or s.rel_l2 is None or not math.isfinite(s.rel_l2):
                continue
            if s.rel_l2 < NOISE_REL_L2 or p.attribution is None:
                continue
            added = s.rel_l2 if math.isinf(p.attribution) else s.rel_l2 * (1 - 1 / p.attribution)
            if added > 0.5 * NOISE_REL_L2:
                out.append((p, added))
        out.sort(key=lambda t: -t[1])
        return out[:top]

    def amplifiers(self, threshold: float = 2.0, top: int = 5) -> list[PairResult]:
        """Pairs whose relative error is at least ``threshold`` times their input's.

        Only stages adding at least 1% of the largest added relative error (own minus
        inherited) are kept; strongest multiplier first, sources (ratio inf) leading.
        """
        hits = [
            p
            for p in self.pairs
            if p.attribution is not None
            and p.attribution >= threshold
            and p.stats is not None
            and (p.stats.rel_l2 or 0) >= NOISE_REL_L2  # not float32 rounding noise
        ]

        def added(p: PairResult) -> float:
            return p.stats.rel_l2 * (1 - 1 / p.attribution)  # type: ignore[union-attr,operator]

        # Multiplying a negligible error is not news: keep those adding at least 1% of the
        # largest added error, then show the strongest multipliers first.
        largest = max((added(p) for p in hits), default=0.0)
        hits = [p for p in hits if added(p) >= 0.01 * largest]
        hits.sort(key=lambda p: -p.attribution)  # type: ignore[operator]
        return hits[:top]
