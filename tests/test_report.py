"""aprtrace.report: JSON schema keys, terminal summary, self-contained HTML, SVG and PNG."""

from __future__ import annotations

import io
import json
import math
import struct
import xml.etree.ElementTree as ET
import zlib
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner
from rich.console import Console

from aprtrace import report
from aprtrace.cli_diff import diff_command
from aprtrace.diff import Tolerance, diff_dirs
from test_diff import make_dump

PAIR_KEYS = {
    "path",
    "stage",
    "layer",
    "verdict",
    "reason",
    "tolerance",
    "shape",
    "dim_product",
    "max_abs_diff",
    "max_abs_diff_index",
    "max_abs_diff_position",
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
    "attribution",
    "attribution_source",
    "predecessor",
    "lm_head",
    "top_diffs",
}
TOP_KEYS = {
    "schema",
    "tool",
    "version",
    "path_a",
    "path_b",
    "reference",
    "tolerance",
    "manifest_a",
    "manifest_b",
    "warnings",
    "only_in_a",
    "only_in_b",
    "summary",
    "first_divergence",
    "amplifiers",
    "pairs",
}


@pytest.fixture
def diverged(tmp_path):
    stages = ["embedding", "attn_norm", "q_post_rope", "attn_scores", "attn_softmax"]
    a = make_dump(tmp_path / "a", {0: stages, 1: stages[1:]})
    b = make_dump(
        tmp_path / "b",
        {0: stages, 1: stages[1:]},
        scale={"layer-1/attn_scores": 1.001, "layer-1/attn_softmax": 1.04},
    )
    return diff_dirs(a, b, Tolerance(atol=1e-6, rtol=0.01))


def test_dir_json_schema(diverged):
    doc = report.dir_json(diverged)
    assert set(doc) == TOP_KEYS and doc["schema"] == "aprtrace-diff-v1"
    assert all(set(p) == PAIR_KEYS for p in doc["pairs"])
    assert doc["summary"] == {
        "verdict": "diverged",
        "pairs": 11,
        "passed": 10,
        "failed": 1,
        "incomparable": 0,
        "stopped_early": False,
    }
    assert doc["first_divergence"]["path"] == "layer-1/attn_softmax.bin"
    json.loads(report.to_json_text(doc))  # strict JSON: no NaN / Infinity tokens
    scores = next(p for p in doc["pairs"] if p["path"] == "layer-1/attn_scores.bin")
    assert scores["attribution"] is None and scores["attribution_source"] is True
    assert scores["max_abs_diff_position"].startswith("head ")
    assert doc["pairs"][0]["sqnr_db"] is None  # identical: infinite SQNR -> null


def test_terminal_table_and_summary(diverged):
    buf = io.StringIO()
    report.render_dir_table(diverged, Console(file=buf, width=200))
    text = buf.getvalue()
    assert "first divergence" in text
    assert "layer 1 attn_softmax multiplies the error by 40" in text
    assert report.summary_line(diverged).startswith("DIVERGED: 1 of 11 pairs")


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.data: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.data.append(data)


def test_html_report_is_self_contained_with_heatmap(diverged):
    page = report.html_report(diverged, "cosine")
    parser = _Collect()
    parser.feed(page)
    parser.close()
    tags = parser.tags
    assert any(t == "svg" and a.get("id") == "heatmap" for t, a in tags)
    cells = [a for t, a in tags if t == "g" and a.get("class") == "cell"]
    assert len(cells) == len(diverged.pairs)
    assert any(a.get("class") == "first-divergence" for t, a in tags if t == "rect")
    # no network: no external scripts, styles, images or links
    for tag, attrs in tags:
        for key in ("src", "href"):
            assert not str(attrs.get(key, "")).startswith(("http", "//")), (tag, attrs)
    assert not any(t == "link" for t, _ in tags)
    data = next(d for d in parser.data if d.lstrip().startswith('{"schema"'))
    assert json.loads(data)["schema"] == "aprtrace-diff-v1"


def test_svg_and_png_plots(tmp_path, diverged):
    svg = report.heatmap_svg(diverged, "rel-l2")
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    png = report.heatmap_png(diverged, "rel-l2", cell=4)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    length, tag = struct.unpack(">I4s", png[8:16])
    width, height = struct.unpack(">II", png[16:24])
    assert (tag, length) == (b"IHDR", 13)
    assert (width, height) == (7 * 4, 3 * 4)  # 7 stages x (2 layers + whole-model)
    idat_len = struct.unpack(">I", png[33:37])[0]
    raw = zlib.decompress(png[41 : 41 + idat_len])
    assert len(raw) == height * (1 + 3 * width)


def test_cli_writes_html_and_plots(tmp_path, diverged):
    a, b = diverged.a.path, diverged.b.path
    html_path, svg_path, png_path = tmp_path / "r.html", tmp_path / "h.svg", tmp_path / "h.png"
    r = CliRunner().invoke(
        diff_command,
        [
            "--values",
            str(a),
            str(b),
            "--rtol",
            "0.01",
            "--html",
            str(html_path),
            "--plot",
            str(svg_path),
            "--metric",
            "sqnr",
        ],
    )
    assert r.exit_code == 1, r.output
    assert "<svg" in html_path.read_text() and svg_path.read_text().startswith("<svg")
    r = CliRunner().invoke(diff_command, ["--values", str(a), str(b), "--plot", str(png_path)])
    assert png_path.read_bytes()[:4] == b"\x89PNG"
    bad = CliRunner().invoke(diff_command, ["--values", str(a), str(b), "--plot", "x.jpg"])
    assert bad.exception is not None and getattr(bad.exception, "exit_code", None) == 5


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), (math.nan, None), (math.inf, None), (1.5, 1.5), (3, 3)]
)
def test_finite_or_none(value, expected):
    assert report.finite_or_none(value) == expected
