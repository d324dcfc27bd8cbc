"""The self-contained HTML report; its CSS and JavaScript are package data
(``report.css``, ``report.js``) inlined into the page."""

from __future__ import annotations

import html
import json
import math
from importlib import resources
from typing import TYPE_CHECKING

from aprtrace import __version__
from aprtrace.diff import DirDiff
from aprtrace.report.chart import growth_chart_svg
from aprtrace.report.heatmap import heatmap_svg
from aprtrace.report.json import dir_json
from aprtrace.report.text import (
    _verdict_word,
    adder_sentence,
    cosine_gap,
    first_divergence_line,
    fmt,
    fmt_sci,
    localization_lines,
    overall_verdict,
    ratio_text,
    summary_line,
    token_disagreement_line,
)

if TYPE_CHECKING:
    from aprtrace.localize import Localization


def _asset(name: str) -> str:
    return resources.files("aprtrace.report").joinpath(name).read_text(encoding="utf-8")


def _manifest_rows(d: DirDiff) -> list[tuple[str, str]]:
    """Model, prompt and token ids of each side, from the manifests (apr dumps have none)."""
    rows = []
    for side, info in (("A", d.a), ("B", d.b)):
        m = info.manifest
        if m is None:
            rows.append((f"{side} model", "(no manifest.json: written by apr, or incomplete)"))
            continue
        model = m.model.get("path", "?")
        kind = ", ".join(x for x in (m.model.get("format"), m.architecture) if x)
        rows.append((f"{side} model", f"{model} ({kind})" if kind else str(model)))
    prompts = {
        (info.manifest.prompt, info.manifest.token_ids) for info in (d.a, d.b) if info.manifest
    }
    for prompt, ids in sorted(prompts, key=str):
        label = "prompt" if len(prompts) == 1 else "prompt (differs!)"
        text = f"tokens {list(ids)}" if prompt is None else f"{prompt!r}, tokens {list(ids)}"
        rows.append((label, text))
    token_line = token_disagreement_line(d)  # decode steps (issue 12)
    if token_line is not None:
        rows.append(("generation", token_line))
    return rows


def html_report(
    d: DirDiff, metric: str = "rel-l2", localization: Localization | None = None
) -> str:
    """One self-contained HTML page: summary, heatmap, per-pair details, full table."""
    doc = dir_json(d, localization)
    data = json.dumps(doc, allow_nan=False).replace("</", "<\\/")
    verdict_cls = "ok" if overall_verdict(d) == "pass" else "bad"
    meta = [("A (reference)", str(d.a.path)), ("B (candidate)", str(d.b.path))]
    meta += _manifest_rows(d)
    meta.append(("tool", f"aprtrace {__version__}, metric {metric}"))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>aprtrace diff report</title>",
        f"<style>{_asset('report.css')}</style></head><body>",
        "<h1>aprtrace diff</h1>",
        '<table class="meta">'
        + "".join(
            f"<tr><td>{html.escape(k)}</td><td><code>{html.escape(v)}</code></td></tr>"
            for k, v in meta
        )
        + "</table>",
        f'<p class="{verdict_cls}" id="summary"><b>{html.escape(summary_line(d))}</b></p>',
    ]
    for w in d.warnings:
        parts.append(f'<p class="warn">warning: {html.escape(w)}</p>')
    for problem in d.verdict.problems:
        parts.append(f'<p class="bad">incomplete: {html.escape(problem)}</p>')
    first_line = first_divergence_line(d)
    if first_line:
        parts.append(f'<p id="first"><b>{html.escape(first_line)}</b></p>')
    if d.adders:
        parts.append(
            "<p><b>Stages adding the most error</b> (relative L2 added by the stage)</p><ul>"
        )
        parts.extend(f"<li>{html.escape(adder_sentence(p, a))}</li>" for p, a in d.adders)
        parts.append("</ul>")
    if localization is not None:
        lines = localization_lines(d, localization)
        parts.append(f"<p><b>{html.escape(lines[0])}</b></p><ul>")
        parts.extend(
            f"<li>{html.escape(line.strip().removeprefix('- '))}</li>" for line in lines[1:]
        )
        parts.append("</ul>")
    for side, names in (("A", d.only_a), ("B", d.only_b)):
        if names:
            parts.append(f'<p class="warn">only in {side}: {html.escape(", ".join(names))}</p>')
    parts.append('<div class="figures">')
    parts.append(heatmap_svg(d, metric, interactive=True))
    parts.append(growth_chart_svg(d))
    parts.append("</div>")
    parts.append(
        "<p>Hover over a cell, or click a cell or table row, for the statistics of that pair"
        " (shown first: the first divergence, else the largest relative error):</p>"
    )
    parts.append('<div id="details">(no cell selected)</div>')
    n_bad = sum(1 for p in d.pairs if not p.passed)
    parts.append(
        '<p class="controls"><label><input type="checkbox" id="only-failures"> show only the '
        f"{n_bad} pairs out of tolerance</label> &middot; click a column header to sort "
        '&middot; <span id="row-count"></span></p>'
    )
    headers = [
        ("layer", "n", ""),
        ("stage", "s", "l"),
        ("1 - cosine", "n", ""),
        ("rel L2", "n", ""),
        ("max|d|", "n", ""),
        ("at", "s", "l"),
        ("SQNR dB", "n", ""),
        ("ULP max", "n", ""),
        ("x input", "n", ""),
        ("verdict", "s", "l"),
    ]
    parts.append(
        '<table id="pairs"><thead><tr>'
        + "".join(
            f'<th data-col="{k}" data-kind="{kind}"{" class=l" if cls else ""}>'
            f"{html.escape(name)}</th>"
            for k, (name, kind, cls) in enumerate(headers)
        )
        + "</tr></thead><tbody>"
    )
    for i, p in enumerate(d.pairs):
        s = p.stats
        cls = []
        if not p.passed:
            cls.append("fail")
        if p is d.first_divergence:
            cls.append("first")
        differs = s is not None and s.max_abs_diff > 0
        pos = p.max_coords if differs else None
        gap = cosine_gap(p)
        cells = [
            (
                ("" if p.key.step == 0 else f"step {p.key.step} ")
                + ("-" if p.key.layer is None else str(p.key.layer)),
                p.key.step * 1e6 + (p.key.layer if p.key.layer is not None else 1e5),
            ),
            (p.key.stage, p.key.stage),
            (fmt_sci(gap), gap),
            (fmt(s.rel_l2) if s else "-", s.rel_l2 if s else None),
            (fmt(s.max_abs_diff) if s else "-", s.max_abs_diff if s else None),
            (pos.text if pos is not None else "", pos.text if pos is not None else ""),
            (
                fmt(s.sqnr_db, ".1f")
                if s and s.sqnr_db is not None and s.sqnr_db != math.inf
                else "-",
                s.sqnr_db if s and s.sqnr_db is not None and math.isfinite(s.sqnr_db) else None,
            ),
            (fmt(s.ulp_max, "d") if s else "-", s.ulp_max if s else None),
            (
                ratio_text(p),
                p.attribution if p.attribution is None or math.isfinite(p.attribution) else 1e300,
            ),
            (
                _verdict_word(p) + ("" if p.passed else f": {p.error or p.unreadable or p.reason}"),
                _verdict_word(p),
            ),
        ]
        tds = "".join(
            f'<td{" class=l" if headers[k][2] else ""} data-v="{html.escape(_sort_value(v))}">'
            f"{html.escape(text)}</td>"
            for k, (text, v) in enumerate(cells)
        )
        parts.append(f'<tr class="{" ".join(cls)}" data-i="{i}">{tds}</tr>')
    parts.append("</tbody></table>")
    parts.append(
        '<p class="legend">Table: rows in forward order (layer, then stage); red rows are out '
        "of tolerance, the outlined row is the first divergence. 1 - cosine and rel L2 are 0 "
        "for identical tensors; at = where max|d| is (token, channel; head, query, key; vocab "
        "id); x input = rel L2 over the rel L2 of the stage it consumes (new = its input is "
        "identical, - = unknown); SQNR - = no error.</p>"
    )
    parts.append(f'<script type="application/json" id="diff-data">{data}</script>')
    parts.append(f"<script>{_asset('report.js')}</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _sort_value(v) -> str:
    """A cell's sort key: numbers as repr (the JS sorts numerically), text as is."""
    if v is None:
        return ""
    if isinstance(v, float) and math.isnan(v):
        return ""
    return repr(float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
