"""The self-contained HTML report; its CSS and JavaScript are package data
(``report.css``, ``report.js``) inlined into the page."""

from __future__ import annotations

import html
import json
from importlib import resources
from typing import TYPE_CHECKING

from aprtrace import __version__
from aprtrace.diff import DirDiff

if TYPE_CHECKING:
    from aprtrace.localize import Localization
from aprtrace.report.heatmap import heatmap_svg
from aprtrace.report.json import dir_json
from aprtrace.report.text import (
    AMPLIFY_THRESHOLD,
    _verdict_word,
    amplifier_sentence,
    fmt,
    localization_lines,
    overall_verdict,
    summary_line,
)


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
    amps = d.amplifiers(AMPLIFY_THRESHOLD)
    if amps:
        parts.append("<p><b>Error amplifiers</b></p><ul>")
        parts.extend(f"<li>{html.escape(amplifier_sentence(p))}</li>" for p in amps)
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
    parts.append(heatmap_svg(d, metric, interactive=True))
    parts.append(
        "<p>Hover over a cell, or click a cell or table row, for the statistics of that pair"
        " (shown first: the first divergence, else the largest relative error):</p>"
    )
    parts.append('<div id="details">(no cell selected)</div>')
    parts.append(
        "<table><tr><th>layer</th><th class=l>stage</th><th>max|d|</th><th class=l>at</th>"
        "<th>cosine</th><th>rel L2</th><th>SQNR dB</th><th>ULP max</th><th>x input</th>"
        "<th class=l>verdict</th></tr>"
    )
    for i, p in enumerate(d.pairs):
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
            f"<td{' class=l' if k in left else ''}>{html.escape(v)}</td>" for k, v in enumerate(row)
        )
        parts.append(f'<tr class="{" ".join(cls)}" data-i="{i}">{tds}</tr>')
    parts.append("</table>")
    parts.append(f'<script type="application/json" id="diff-data">{data}</script>')
    parts.append(f"<script>{_asset('report.js')}</script>")
    parts.append("</body></html>")
    return "\n".join(parts)
