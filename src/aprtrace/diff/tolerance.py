"""Tolerances: the pass rule of one pair and its per-stage overrides (``--tol``)."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from aprtrace.errors import (
    ValidationError,
)
from aprtrace.stages import (
    stage_from_file_stem,
    suggest,
    valid_names_text,
)

if TYPE_CHECKING:
    from aprtrace.diff.metrics import PairStats
    from aprtrace.diff.results import PairResult


@dataclass(frozen=True)
class Tolerance:
    """Pass/fail thresholds of one pair (see the module docstring for the rule)."""

    atol: float = 1e-5
    rtol: float = 0.1
    cos_min: float = 0.999

    def as_dict(self) -> dict[str, float]:
        return {"atol": self.atol, "rtol": self.rtol, "cos_min": self.cos_min}


DEFAULT_TOLERANCE = Tolerance()

_TOL_KEYS = {"atol": "atol", "rtol": "rtol", "cos-min": "cos_min", "cos_min": "cos_min"}


@dataclass(frozen=True)
class TolOverride:
    """A ``--tol PATTERN:key=value,...`` rule. PATTERN with a ``/`` matches ``layer-N/stage``."""

    pattern: str
    values: dict[str, float]

    def matches(self, stage: str, rel_stem: str) -> bool:
        target = rel_stem if "/" in self.pattern else stage
        return fnmatch.fnmatchcase(target, self.pattern)


def parse_tol_override(spec: str) -> TolOverride:
    """Parse ``PATTERN:key=value[,key=value]`` (keys atol, rtol, cos-min)."""
    hint = (
        "expected PATTERN:key=value[,key=value], e.g. 'ffn_*:cos-min=0.99' or 'layer-3/*:atol=1e-3'"
    )
    pattern, sep, rest = spec.partition(":")
    pattern = pattern.strip()
    if not sep or not pattern or not rest.strip():
        raise ValidationError(f"invalid --tol '{spec}'", hint=hint)
    values: dict[str, float] = {}
    for item in rest.split(","):
        key, eq, raw = item.partition("=")
        key = key.strip().lower()
        if not eq or key not in _TOL_KEYS:
            raise ValidationError(
                f"invalid --tol '{spec}': unknown or malformed setting '{item.strip()}'",
                hint=f"keys are atol, rtol, cos-min; {hint}",
            )
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValidationError(
                f"invalid --tol '{spec}': '{raw.strip()}' is not a number"
            ) from None
        check_tolerance_value(_TOL_KEYS[key], value, f"--tol '{spec}'")
        values[_TOL_KEYS[key]] = value
    return TolOverride(pattern, values)


def check_tolerance_value(key: str, value: float, where: str) -> None:
    if math.isnan(value) or value < 0:
        raise ValidationError(f"{where}: {key} = {value} must be a non-negative number")
    if key == "cos_min" and value > 1:
        raise ValidationError(f"{where}: cos-min = {value} must be at most 1")


def check_tol_pattern(rule: TolOverride) -> None:
    """A ``--tol`` pattern without wildcards must name a stage (suggesting the nearest)."""
    stage_part = rule.pattern.rsplit("/", 1)[-1]
    if any(c in stage_part for c in "*?[") or stage_from_file_stem(stage_part) is not None:
        return
    close = suggest(stage_part)
    hint = f"did you mean '{close}'? " if close else ""
    raise ValidationError(
        f"--tol '{rule.pattern}:...': '{stage_part}' is not a stage name",
        hint=f"{hint}valid names: {valid_names_text()}",
    )


def unmatched_tol_warnings(rules: list[TolOverride], pairs: list[PairResult]) -> list[str]:
    """One warning per ``--tol`` rule that matched none of the compared pairs."""
    return [
        f"--tol '{rule.pattern}' matches no compared stage file; it has no effect"
        for rule in rules
        if not any(rule.matches(p.key.stage, p.key.rel_stem) for p in pairs)
    ]


def tolerance_for(
    base: Tolerance, overrides: list[TolOverride], stage: str, rel_stem: str
) -> Tolerance:
    """``base`` with every matching override applied in order (later rules win)."""
    tol = base
    for rule in overrides:
        if rule.matches(stage, rel_stem):
            tol = replace(tol, **rule.values)
    return tol


def verdict(stats: PairStats, tol: Tolerance) -> tuple[bool, str]:
    """Apply the pass rule; the reason names the failing statistic and its bound."""
    if stats.nonfinite_mismatch:
        return False, f"{stats.nonfinite_mismatch} NaN/Inf positions differ"
    if stats.max_abs_diff <= tol.atol:
        return True, f"max|d| {stats.max_abs_diff:.3g} <= atol {tol.atol:g}"
    if not stats.cosine_sim >= tol.cos_min:
        return False, f"cosine {stats.cosine_sim:.6f} < {tol.cos_min:g}"
    bound = tol.atol + tol.rtol * stats.max_abs_a
    if not stats.max_abs_diff <= bound:
        return False, f"max|d| {stats.max_abs_diff:.3g} > atol + rtol*max|a| = {bound:.3g}"
    return True, "within tolerance"
