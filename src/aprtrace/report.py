"""Render diffs: apr-style text/JSON for one pair; table, JSON, HTML, SVG, PNG for dumps."""

from __future__ import annotations

import html
import json
import math
import struct
import zlib
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from aprtrace import __version__
from aprtrace.diff import DirDiff, FilePairResult, PairResult, layer_label
from aprtrace.stages import Stage

FILE_PAIR_SCHEMA = "apr-stage-diff-v1"
DIR_SCHEMA = "aprtrace-diff-v1"
AMPLIFY_THRESHOLD = 2.0
HEATMAP_METRICS = ("rel-l2", "cosine", "max-abs", "sqnr", "ulp-max", "attribution")


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


# ---------------------------------------------------------------------------------------------
# File pair (apr diff --values)
# ---------------------------------------------------------------------------------------------


def file_pair_json(result: FilePairResult) -> dict[str, Any]:
    """The ``apr-stage-diff-v1`` document, keys exactly as apr writes them."""
    s = result.stats
    return {
        "schema": FILE_PAIR_SCHEMA,
        "path_a": str(result.path_a),
        "path_b": str(result.path_b),
        "layer": layer_label(result.layer),
        "dim_product": s.count,
        "max_abs_diff": finite_or_none(s.max_abs_diff),
        "max_abs_diff_index": s.max_abs_diff_index,
        "rms_diff": finite_or_none(s.rms_diff),
        "cosine_sim": finite_or_none(s.cosine_sim),
        "top_diffs": [
            {
                "index": t.index,
                "a": finite_or_none(t.a),
                "b": finite_or_none(t.b),
                "abs_diff": finite_or_none(t.abs_diff),
            }
            for t in s.top_diffs
        ],
    }


def file_pair_text(result: FilePairResult, verdict_line: str | None = None) -> str:
    s = result.stats
    lines = [
        f"A: {result.path_a}",
        f"B: {result.path_b}",
        f"layer: {layer_label(result.layer)}   dim_product: {s.count}",
        f"max |a-b|:  {fmt(s.max_abs_diff, '.6g')} at index {s.max_abs_diff_index}",
        f"RMS diff:   {fmt(s.rms_diff, '.6g')}",
        f"cosine sim: {fmt(s.cosine_sim, '.8f')}",
    ]
    if s.top_diffs:
        lines.append(f"top {len(s.top_diffs)} differences:")
        lines.append(f"  {'index':>10}  {'a':>14}  {'b':>14}  {'|a-b|':>12}")
        for t in s.top_diffs:
            lines.append(
                f"  {t.index:>10}  {fmt(t.a, '.7g'):>14}  {fmt(t.b, '.7g'):>14}  "
                f"{fmt(t.abs_diff, '.6g'):>12}"
            )
    if verdict_line:
        lines.append(verdict_line)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Directory diff: JSON
# ---------------------------------------------------------------------------------------------


def _verdict_word(p: PairResult) -> str:
    if p.error is not None:
        return "incomparable"
    return "pass" if p.passed else "fail"


def overall_verdict(d: DirDiff) -> str:
    if d.incomparable:
        return "incomparable"
    return "diverged" if d.failed else "pass"


def pair_json(p: PairResult) -> dict[str, Any]:
    s = p.stats
    out: dict[str, Any] = {
        "path": p.key.rel,
        "stage": p.key.stage,
        "layer": p.key.layer if p.key.layer is not None else "whole-model",
        "verdict": _verdict_word(p),
        "reason": p.error if p.error is not None else p.reason,
        "tolerance": p.tolerance.as_dict(),
        "shape": list(p.shape) if p.shape is not None else None,
        "dim_product": s.count if s else None,
    }
    keys = (
        "max_abs_diff",
        "max_abs_diff_index",
        "rms_diff",
        "cosine_sim",
        "rel_l2",
        "sqnr_db",
        "ulp_max",
        "ulp_median",
        "max_abs_a",
        "nan_a",
        "nan_b",
        "inf_a",
        "inf_b",
        "nonfinite_mismatch",
    )
    for k in keys:
        out[k] = finite_or_none(getattr(s, k)) if s else None
    out["max_abs_diff_position"] = p.max_position
    out["attribution"] = finite_or_none(p.attribution)
    out["attribution_source"] = p.attribution is not None and math.isinf(p.attribution)
    out["predecessor"] = p.predecessor
    out["lm_head"] = (
        None
        if p.lm_head is None
        else {
            "top1_a": p.lm_head.top1_a,
            "top1_b": p.lm_head.top1_b,
            "top1_agree": p.lm_head.top1_agree,
            "top5_overlap": p.lm_head.top5_overlap,
            "kl_divergence": finite_or_none(p.lm_head.kl_divergence),
        }
    )
    out["top_diffs"] = [
        {
            "index": t.index,
            "a": finite_or_none(t.a),
            "b": finite_or_none(t.b),
            "abs_diff": finite_or_none(t.abs_diff),
        }
        for t in (s.top_diffs if s else [])
    ]
    return out


def _manifest_json(info) -> dict[str, Any] | None:
    m = info.manifest
    if m is None:
        return None
    return {
        "version": m.version,
        "created": m.created,
        "model": m.model,
        "architecture": m.architecture,
        "prompt": m.prompt,
        "token_ids": list(m.token_ids),
    }


def _ref(p: PairResult | None) -> dict[str, Any] | None:
    if p is None:
        return None
    return {
        "path": p.key.rel,
        "stage": p.key.stage,
        "layer": p.key.layer if p.key.layer is not None else "whole-model",
        "reason": p.reason,
    }


def dir_json(d: DirDiff) -> dict[str, Any]:
    """The ``aprtrace-diff-v1`` document (keys in docs/diff-json.md)."""
    return {
        "schema": DIR_SCHEMA,
        "tool": "aprtrace",
        "version": __version__,
        "path_a": str(d.a.path),
        "path_b": str(d.b.path),
        "reference": "a",
        "tolerance": d.base_tolerance.as_dict(),
        "manifest_a": _manifest_json(d.a),
        "manifest_b": _manifest_json(d.b),
        "warnings": list(d.warnings),
        "only_in_a": list(d.only_a),
        "only_in_b": list(d.only_b),
        "summary": {
            "verdict": overall_verdict(d),
            "pairs": len(d.pairs),
            "passed": d.passed,
            "failed": d.failed,
            "incomparable": len(d.incomparable),
            "stopped_early": d.stopped_early,
        },
        "first_divergence": _ref(d.first_divergence),
        "amplifiers": [
            {
                **_ref(p),  # type: ignore[dict-item]
                "ratio": finite_or_none(p.attribution),
                "source": math.isinf(p.attribution or 0.0),
                "predecessor": p.predecessor,
            }
            for p in d.amplifiers(AMPLIFY_THRESHOLD)
        ],
        "pairs": [pair_json(p) for p in d.pairs],
    }


def to_json_text(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# Directory diff: terminal
# ---------------------------------------------------------------------------------------------


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
    if not d.failed:
        return f"OK: all {n} pairs within tolerance ({tol_text})"
    first = d.first_divergence
    assert first is not None
    stop = " (stopped there: --fail-fast)" if d.stopped_early else ""
    return (
        f"DIVERGED: {d.failed} of {n} pairs out of tolerance ({tol_text}); first divergence: "
        f"{first.key.label} [{first.key.rel}]: {first.reason}{stop}"
    )


def render_dir_table(d: DirDiff, console: Console) -> None:
    """Rich table, one row per pair in forward order, then findings and the summary line."""
    table = Table(title=f"aprtrace diff  A={d.a.path}  B={d.b.path}  (A is the reference)")
    for col, justify in (
        ("layer", "right"),
        ("stage", "left"),
        ("max|d|", "right"),
        ("at", "left"),
        ("rms", "right"),
        ("cosine", "right"),
        ("rel L2", "right"),
        ("SQNR dB", "right"),
        ("ULP max/med", "right"),
        ("x input", "right"),
        ("verdict", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for p in d.pairs:
        s = p.stats
        layer = "-" if p.key.layer is None else str(p.key.layer)
        if s is None:
            table.add_row(
                layer, p.key.stage, *(["-"] * 8), Text("INCOMPARABLE", style="bold magenta")
            )
            continue
        if p.passed:
            verdict = Text("ok", style="green")
        else:
            verdict = Text("FAIL " + p.reason, style="bold red")
        if p is d.first_divergence:
            verdict.append("  <- first divergence", style="bold yellow")
        at = p.max_position or f"#{s.max_abs_diff_index}"
        ratio = p.attribution
        ratio_text = Text(fmt(ratio, ".3g"))
        if ratio is not None and ratio >= AMPLIFY_THRESHOLD and (s.rel_l2 or 0) > 0:
            ratio_text.stylize("bold yellow")
        table.add_row(
            layer,
            p.key.stage,
            fmt(s.max_abs_diff, ".3g"),
            at,
            fmt(s.rms_diff, ".3g"),
            fmt(s.cosine_sim, ".6f"),
            fmt(s.rel_l2, ".3g"),
            fmt(s.sqnr_db, ".1f"),
            f"{fmt(s.ulp_max, 'd')}/{fmt(s.ulp_median, '.10g')}",
            ratio_text,
            verdict,
        )
    console.print(table)
    for p in d.pairs:
        if p.lm_head is not None:
            h = p.lm_head
            console.print(
                f"lm_head: top-1 {'agrees' if h.top1_agree else 'DIFFERS'} "
                f"(A {h.top1_a}, B {h.top1_b}), top-5 overlap {h.top5_overlap}/5, "
                f"KL(A||B) {fmt(h.kl_divergence, '.3g')}"
            )
    amps = d.amplifiers(AMPLIFY_THRESHOLD)
    if amps:
        console.print("[bold]Error amplifiers[/bold] (relative error vs the stage it consumes):")
        for p in amps:
            console.print(f"  - {amplifier_sentence(p)}")
    for side, names in (("A", d.only_a), ("B", d.only_b)):
        if names:
            shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            console.print(f"[yellow]only in {side} ({len(names)}):[/yellow] {shown}")
    style = "bold green" if overall_verdict(d) == "pass" else "bold red"
    console.print(Text(summary_line(d), style=style))


# ---------------------------------------------------------------------------------------------
# Heatmap (SVG inside HTML, standalone SVG, PNG)
# ---------------------------------------------------------------------------------------------


def metric_value(p: PairResult, metric: str) -> float | None:
    """The heatmap value of a pair; larger always means worse (cosine -> 1 - cos)."""
    s = p.stats
    if s is None:
        return None
    if metric == "rel-l2":
        return s.rel_l2
    if metric == "cosine":
        return None if math.isnan(s.cosine_sim) else max(0.0, 1.0 - s.cosine_sim)
    if metric == "max-abs":
        return s.max_abs_diff
    if metric == "sqnr":
        return None if s.sqnr_db is None else -s.sqnr_db
    if metric == "ulp-max":
        return None if s.ulp_max is None else float(s.ulp_max)
    if metric == "attribution":
        return p.attribution
    raise ValueError(f"unknown heatmap metric {metric}")


def _metric_label(metric: str) -> str:
    return {
        "rel-l2": "relative L2 error",
        "cosine": "1 - cosine",
        "max-abs": "max |a-b|",
        "sqnr": "SQNR dB (lower is worse)",
        "ulp-max": "max ULP distance",
        "attribution": "error amplification vs input",
    }[metric]


def _scale(values: list[float | None], metric: str):
    """Map a metric value to [0, 1] (0 best). Log scale for error-like metrics."""
    if metric == "sqnr":
        finite = [v for v in values if v is not None and math.isfinite(v)]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)

        def f(v):
            if v is None:
                return None
            if math.isinf(v):
                return 0.0 if v < 0 else 1.0
            return 0.5 if hi == lo else (v - lo) / (hi - lo)

        return f
    positive = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    lo = math.log10(min(positive)) if positive else 0.0
    hi = math.log10(max(positive)) if positive else 1.0

    def g(v):
        if v is None or math.isnan(v):
            return None
        if v <= 0:
            return 0.0
        if math.isinf(v):
            return 1.0
        if hi == lo:
            return 0.5
        return 0.05 + 0.95 * (math.log10(v) - lo) / (hi - lo)

    return g


def _color(t: float | None) -> tuple[int, int, int]:
    if t is None:
        return (210, 210, 210)
    stops = [(0.0, (46, 125, 50)), (0.5, (249, 200, 40)), (1.0, (198, 40, 40))]
    t = min(1.0, max(0.0, t))
    for (t0, c0), (t1, c1) in zip(stops, stops[1:], strict=False):
        if t <= t1:
            u = (t - t0) / (t1 - t0)
            return tuple(round(c0[i] + u * (c1[i] - c0[i])) for i in range(3))  # type: ignore[return-value]
    return stops[-1][1]


def _grid(d: DirDiff) -> tuple[list[str], list[str], dict[tuple[str, str], int]]:
    """Rows (layer labels, whole-model last), columns (stages in forward order), cell -> pair."""
    layers = sorted({p.key.layer for p in d.pairs if p.key.layer is not None})
    rows = [f"layer {x}" for x in layers]
    if any(p.key.layer is None for p in d.pairs):
        rows.append("whole-model")
    order = {s.value: s.order for s in Stage}
    stages = sorted({p.key.stage for p in d.pairs}, key=lambda s: (order.get(s, len(order)), s))
    cells = {}
    for i, p in enumerate(d.pairs):
        row = "whole-model" if p.key.layer is None else f"layer {p.key.layer}"
        cells[(row, p.key.stage)] = i
    return rows, stages, cells


def _tooltip(p: PairResult, metric: str) -> str:
    s = p.stats
    if s is None:
        return f"{p.key.rel}: incomparable: {p.error}"
    lines = [
        f"{p.key.rel}: {'PASS' if p.passed else 'FAIL'} ({p.reason})",
        f"{_metric_label(metric)} = {fmt(metric_value(p, metric))}",
        f"max|d| {fmt(s.max_abs_diff)} at {p.max_position or s.max_abs_diff_index}",
        f"cosine {fmt(s.cosine_sim, '.6f')}  rel L2 {fmt(s.rel_l2)}",
        f"SQNR {fmt(s.sqnr_db, '.1f')} dB",
        f"ULP max {fmt(s.ulp_max, 'd')} median {fmt(s.ulp_median, '.10g')}",
    ]
    if p.attribution is not None:
        lines.append(f"x{fmt(p.attribution, '.3g')} vs {p.predecessor}")
    return "\n".join(lines)


def heatmap_svg(d: DirDiff, metric: str = "rel-l2", interactive: bool = False) -> str:
    """Layer-by-stage heatmap as SVG text; failing cells crossed, first divergence outlined."""
    rows, stages, cells = _grid(d)
    values = [metric_value(p, metric) for p in d.pairs]
    scale = _scale(values, metric)
    cw, ch, left, top = 34, 22, 110, 130
    width = left + cw * len(stages) + 20
    height = top + ch * len(rows) + 50
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" id="heatmap">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="4" y="16" font-size="13" font-weight="bold">'
        f"{html.escape(_metric_label(metric))} per layer and stage (A = reference)</text>",
    ]
    for j, stage in enumerate(stages):
        x = left + j * cw + cw / 2
        out.append(
            f'<text x="{x:.0f}" y="{top - 6}" transform="rotate(-60 {x:.0f} {top - 6})">'
            f"{html.escape(stage)}</text>"
        )
    first = d.first_divergence
    for r, row in enumerate(rows):
        y = top + r * ch
        out.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end">{html.escape(row)}</text>')
        for j, stage in enumerate(stages):
            x = left + j * cw
            idx = cells.get((row, stage))
            if idx is None:
                out.append(
                    f'<rect x="{x}" y="{y}" width="{cw - 2}" height="{ch - 2}" fill="#f4f4f4"/>'
                )
                continue
            p = d.pairs[idx]
            rgb = _color(scale(values[idx]))
            attrs = f' class="cell" data-i="{idx}"' if interactive else ""
            out.append(
                f"<g{attrs}><title>{html.escape(_tooltip(p, metric))}</title>"
                f'<rect x="{x}" y="{y}" width="{cw - 2}" height="{ch - 2}" '
                f'fill="rgb{rgb}"/>'
            )
            if p.passed is False or p.error is not None:
                out.append(
                    f'<text x="{x + cw / 2 - 1:.0f}" y="{y + 15}" text-anchor="middle" '
                    f'fill="white" font-weight="bold">x</text>'
                )
            if p is first:
                out.append(
                    f'<rect x="{x - 2}" y="{y - 2}" width="{cw + 2}" height="{ch + 2}" '
                    f'fill="none" stroke="black" stroke-width="3" class="first-divergence"/>'
                )
            out.append("</g>")
    y = top + ch * len(rows) + 20
    legend = "green = small, red = large (log scale); x = out of tolerance"
    if first is not None:
        legend += f"; black box = first divergence ({first.key.label})"
    out.append(f'<text x="4" y="{y}">{html.escape(legend)}</text>')
    out.append("</svg>")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} .ok{color:#2e7d32} .bad{color:#c62828}
table{border-collapse:collapse;font-size:12px;margin-top:1em}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
td.l,th.l{text-align:left} tr.fail{background:#fdecea} tr.first{outline:3px solid #000}
#details{white-space:pre;font-family:monospace;background:#f7f7f7;padding:.7em;min-height:3em;
border:1px solid #ddd;max-width:70em;overflow:auto}
.cell{cursor:pointer} .warn{color:#b26a00}
"""

_JS = """
const data = JSON.parse(document.getElementById('diff-data').textContent);
function show(i){const p=data.pairs[i];
  document.getElementById('details').textContent=JSON.stringify(p,null,1);}
document.querySelectorAll('.cell').forEach(function(el){
  el.addEventListener('click',function(){show(+el.dataset.i);});
  el.addEventListener('mouseenter',function(){show(+el.dataset.i);});});
"""


def html_report(d: DirDiff, metric: str = "rel-l2") -> str:
    """One self-contained HTML page: summary, heatmap, per-pair details, full table."""
    doc = dir_json(d)
    data = json.dumps(doc, allow_nan=False).replace("</", "<\\/")
    verdict_cls = "ok" if overall_verdict(d) == "pass" else "bad"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>aprtrace diff report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>aprtrace diff</h1>",
        f"<p>A (reference): <code>{html.escape(str(d.a.path))}</code><br>"
        f"B: <code>{html.escape(str(d.b.path))}</code></p>",
        f'<p class="{verdict_cls}" id="summary"><b>{html.escape(summary_line(d))}</b></p>',
    ]
    for w in d.warnings:
        parts.append(f'<p class="warn">warning: {html.escape(w)}</p>')
    amps = d.amplifiers(AMPLIFY_THRESHOLD)
    if amps:
        parts.append("<p><b>Error amplifiers</b></p><ul>")
        parts.extend(f"<li>{html.escape(amplifier_sentence(p))}</li>" for p in amps)
        parts.append("</ul>")
    for side, names in (("A", d.only_a), ("B", d.only_b)):
        if names:
            parts.append(f'<p class="warn">only in {side}: {html.escape(", ".join(names))}</p>')
    parts.append(heatmap_svg(d, metric, interactive=True))
    parts.append("<p>Hover or click a cell for the full statistics of that pair:</p>")
    parts.append('<div id="details">(no cell selected)</div>')
    parts.append(
        "<table><tr><th>layer</th><th class=l>stage</th><th>max|d|</th><th class=l>at</th>"
        "<th>cosine</th><th>rel L2</th><th>SQNR dB</th><th>ULP max</th><th>x input</th>"
        "<th class=l>verdict</th></tr>"
    )
    for p in d.pairs:
        s = p.stats
        cls = []
        if p.passed is False or p.error is not None:
            cls.append("fail")
        if p is d.first_divergence:
            cls.append("first")
        row = [
            "-" if p.key.layer is None else str(p.key.layer),
            p.key.stage,
            fmt(s.max_abs_diff) if s else "-",
            (p.max_position or str(s.max_abs_diff_index)) if s else "-",
            fmt(s.cosine_sim, ".6f") if s else "-",
            fmt(s.rel_l2) if s else "-",
            fmt(s.sqnr_db, ".1f") if s else "-",
            fmt(s.ulp_max, "d") if s else "-",
            fmt(p.attribution, ".3g"),
            _verdict_word(p) + ("" if p.passed else f": {p.error or p.reason}"),
        ]
        left = {1, 3, 9}
        tds = "".join(
            f"<td{' class=l' if i in left else ''}>{html.escape(v)}</td>" for i, v in enumerate(row)
        )
        parts.append(f'<tr class="{" ".join(cls)}">{tds}</tr>')
    parts.append("</table>")
    parts.append(f'<script type="application/json" id="diff-data">{data}</script>')
    parts.append(f"<script>{_JS}</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


def heatmap_png(d: DirDiff, metric: str = "rel-l2", cell: int = 16) -> bytes:
    """The heatmap as a label-free PNG (stdlib only): rows = layers, columns = stages."""
    rows, stages, cells = _grid(d)
    values = [metric_value(p, metric) for p in d.pairs]
    scale = _scale(values, metric)
    w, h = max(1, len(stages)) * cell, max(1, len(rows)) * cell
    first = d.first_divergence
    raw = bytearray()
    for y in range(h):
        raw.append(0)  # filter type None
        r = y // cell
        for x in range(w):
            j = x // cell
            idx = cells.get((rows[r], stages[j])) if rows and stages else None
            rgb = (244, 244, 244) if idx is None else _color(scale(values[idx]))
            edge = x % cell in (0, cell - 1) or y % cell in (0, cell - 1)
            if idx is not None and d.pairs[idx] is first and edge:
                rgb = (0, 0, 0)
            elif x % cell == cell - 1 or y % cell == cell - 1:
                rgb = (255, 255, 255)
            raw.extend(rgb)

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(raw), 9))
        + chunk(b"IEND", b"")
    )
