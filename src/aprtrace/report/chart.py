"""Error growth through the layers: the residual stream's relative error and both dumps' norms.

The residual stream (embedding, each layer's post_attn_residual and post_ffn_residual,
final_norm) carries everything one layer hands to the next, so its error per layer is the
curve that shows where a divergence starts and how it grows.
"""

from __future__ import annotations

import html
import math

from aprtrace.diff import DirDiff, PairResult
from aprtrace.report.heatmap import FLOAT32_FLOOR
from aprtrace.report.text import fmt
from aprtrace.stages import Stage

RESIDUAL_STREAM = (
    Stage.EMBEDDING.value,
    Stage.POST_ATTN_RESIDUAL.value,
    Stage.POST_FFN_RESIDUAL.value,
    Stage.FINAL_NORM.value,
)


def residual_points(d: DirDiff) -> list[PairResult]:
    """The residual-stream pairs with statistics, in forward order."""
    return [
        p
        for p in d.pairs
        if p.key.stage in RESIDUAL_STREAM and p.stats is not None and p.stats.rel_l2 is not None
    ]


def _short_label(p: PairResult) -> str:
    short = {"post_attn_residual": "attn", "post_ffn_residual": "ffn"}
    if p.key.layer is None or p.key.stage == Stage.EMBEDDING.value:
        return p.key.stage
    return f"L{p.key.layer} {short.get(p.key.stage, p.key.stage)}"


class _LogAxis:
    def __init__(self, values: list[float], top: float, height: float, floor: float):
        positive = [v for v in values if v > 0 and math.isfinite(v)] or [1.0]
        self.lo = math.floor(math.log10(max(min(positive), floor)))
        self.hi = math.ceil(math.log10(max(positive)))
        if self.hi <= self.lo:
            self.hi = self.lo + 1
        self.top, self.height = top, height

    def y(self, v: float) -> float:
        e = math.log10(v) if v > 0 else self.lo
        e = min(self.hi, max(self.lo, e))
        return self.top + self.height * (self.hi - e) / (self.hi - self.lo)

    def decades(self) -> list[int]:
        step = max(1, math.ceil((self.hi - self.lo) / 6))
        return list(range(self.lo, self.hi + 1, step))


def growth_chart_svg(d: DirDiff) -> str:
    """Two panels sharing the x axis: rel L2 per residual-stream stage (log, with the
    tolerance line), and ||A||, ||B|| (log). Empty when the dump holds fewer than 2 points."""
    points = residual_points(d)
    if len(points) < 2:
        return ""
    left, right, panel = 70, 20, 150
    step = max(14, min(48, 900 // len(points)))
    width = left + right + step * (len(points) - 1) + 40
    top1, top2 = 40, 40 + panel + 50
    height = top2 + panel + 95

    def x(i: int) -> float:
        return left + 20 + i * step

    rel = [p.stats.rel_l2 or 0.0 for p in points]  # type: ignore[union-attr]
    gap = 1.0 - d.base_tolerance.cos_min
    bound = math.sqrt(2.0 * gap) if 0.0 < gap < 0.5 else None
    axis1 = _LogAxis(rel + ([bound] if bound else []), top1, panel, FLOAT32_FLOOR)
    norms_a = [p.stats.norm_a or 0.0 for p in points]  # type: ignore[union-attr]
    norms_b = [p.stats.norm_b or 0.0 for p in points]  # type: ignore[union-attr]
    axis2 = _LogAxis(norms_a + norms_b, top2, panel, 1e-30)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" id="growth">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        '<text x="4" y="16" font-size="13" font-weight="bold">Error growth through the layers '
        "(residual stream)</text>",
    ]
    for axis, title in ((axis1, "relative L2 error of B vs A"), (axis2, "L2 norm")):
        out.append(f'<text x="4" y="{axis.top - 8}" font-weight="bold">{title}</text>')
        for e in axis.decades():
            y = axis.y(10.0**e)
            out.append(
                f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" '
                'stroke="#eee"/>'
                f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">1e{e}</text>'
            )
        out.append(
            f'<rect x="{left}" y="{axis.top}" width="{width - left - right}" '
            f'height="{panel}" fill="none" stroke="#999"/>'
        )
    if bound is not None:
        y = axis1.y(bound)
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#c62828" '
            f'stroke-dasharray="6 3"/><text x="{width - right - 4}" y="{y - 4:.1f}" '
            f'text-anchor="end" fill="#c62828">tolerance ~{bound:.2g} (cos-min '
            f"{d.base_tolerance.cos_min:g})</text>"
        )

    def line(axis: _LogAxis, values: list[float], colour: str, dash: str = "") -> None:
        pts = " ".join(f"{x(i):.1f},{axis.y(v):.1f}" for i, v in enumerate(values))
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(
            f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"{extra}/>'
        )

    line(axis1, rel, "#6a1b9a")
    for i, p in enumerate(points):
        failed = p.passed is False
        tip = html.escape(f"{p.key.label}: rel L2 {fmt(rel[i], '.3g')}")
        out.append(
            f'<circle cx="{x(i):.1f}" cy="{axis1.y(rel[i]):.1f}" r="{4 if failed else 3}" '
            f'fill="{"#c62828" if failed else "#6a1b9a"}"><title>{tip}</title></circle>'
        )
    line(axis2, norms_a, "#1565c0")
    line(axis2, norms_b, "#ef6c00", "5 3")
    label_y = top2 + panel + 12
    every = max(1, math.ceil(14 / step))  # rotated labels need ~14 px each
    for i, p in enumerate(points):
        if i % every and i != len(points) - 1:
            continue
        out.append(
            f'<text x="{x(i):.1f}" y="{label_y}" transform="rotate(-45 {x(i):.1f} {label_y})" '
            f'text-anchor="end" font-size="10">{html.escape(_short_label(p))}</text>'
        )
    ly = height - 14
    out.append(
        f'<line x1="{left}" x2="{left + 24}" y1="{ly}" y2="{ly}" stroke="#6a1b9a" '
        f'stroke-width="2"/><text x="{left + 28}" y="{ly + 4}">rel L2 (red dot: out of '
        "tolerance)</text>"
        f'<line x1="{left + 230}" x2="{left + 254}" y1="{ly}" y2="{ly}" stroke="#1565c0" '
        f'stroke-width="2"/><text x="{left + 258}" y="{ly + 4}">||A|| (reference)</text>'
        f'<line x1="{left + 380}" x2="{left + 404}" y1="{ly}" y2="{ly}" stroke="#ef6c00" '
        f'stroke-width="2" stroke-dasharray="5 3"/><text x="{left + 408}" y="{ly + 4}">'
        "||B|| (candidate)</text>"
    )
    out.append("</svg>")
    return "\n".join(out)
