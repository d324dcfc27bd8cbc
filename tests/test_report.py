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
    "index_agreement",
    "top_diffs",
    "step",
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
    "first_token_disagreement",
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


def _table_text(d, width: int, wide: bool = False) -> str:
    buf = io.StringIO()
    report.render_dir_table(d, Console(file=buf, width=width), wide=wide)
    return buf.getvalue()


@pytest.mark.parametrize("width", [120, 100, 80, 60])
def test_default_table_fits_the_terminal(diverged, width):
    text = _table_text(diverged, width)
    table_lines = [line for line in text.splitlines() if line.startswith("    ")]
    assert table_lines and all(len(line) <= width for line in table_lines), table_lines
    # the verdict and the first-divergence marker survive every width; ULP never by default
    assert "◀ first" in text and "FAIL max|d|" in text and "ULP" not in text
    assert text.rstrip().splitlines()[-1].startswith("DIVERGED: 1 of 11 pairs")
    if width == 120:
        assert "x input" in text and "h0 q" in text and "not shown" not in text
    if width == 60:
        assert "max|d|" not in text.splitlines()[2] and "--wide shows all" in text


def test_wide_table_has_ulp_and_full_reasons(diverged):
    text = _table_text(diverged, 250, wide=True)
    assert "ULP max/med" in text and "rms" in text
    assert "FAIL max|d| 0.44 > atol + rtol*max|a| = 0.11 ◀ first" in text
    assert "head 0, query" in text  # positions spelled out


def test_cli_wide_option(diverged):
    a, b = str(diverged.a.path), str(diverged.b.path)
    narrow = CliRunner().invoke(diff_command, ["--values", a, b, "--rtol", "0.01"])
    wide = CliRunner().invoke(diff_command, ["--values", a, b, "--rtol", "0.01", "--wide"])
    assert narrow.exit_code == wide.exit_code == 1
    assert "ULP max/med" not in narrow.output and "ULP max/med" in wide.output
    table = [line for line in narrow.output.splitlines() if "attn_norm" in line]
    assert table and all(len(line) <= 120 for line in table)


@pytest.mark.parametrize(
    ("position", "short"),
    [
        ("token 0, channel 121", "t0 c121"),
        ("head 3, query 5, key 2", "h3 q5 k2"),
        ("vocab id 267", "id 267"),
        ("[1, 2, 3]", "[1, 2, 3]"),
        (None, None),
    ],
)
def test_short_position(position, short):
    assert report.short_position(position) == short


def test_summary_names_the_position_of_the_first_divergence(diverged):
    first = diverged.first_divergence
    assert f"at {first.max_position})" in report.summary_line(diverged)


def test_color_scale_is_anchored_to_the_tolerance(diverged):
    # cos-min 0.999 (the fixture's): 1 - cos = 1e-3 and rel L2 = sqrt(2e-3) sit at yellow (0.5),
    # a thousand times smaller at green (0), an uncorrelated 1 at red (1), on a log axis.
    cos = report.color_scale(diverged, "cosine")
    assert cos.position(1e-3) == pytest.approx(0.5)
    assert cos.position(1e-6) == pytest.approx(0.0) and cos.position(1.0) == pytest.approx(1.0)
    assert cos.position(10**-4.5) == pytest.approx(0.25)
    rel = report.color_scale(diverged, "rel-l2")
    assert rel.position(math.sqrt(2e-3)) == pytest.approx(0.5)
    assert rel.position(1e-9) == 0.0 and rel.position(5.0) == 1.0 and rel.position(None) is None
    sqnr = report.color_scale(diverged, "sqnr")  # values are -SQNR dB; bound 10*log10(500)
    assert sqnr.position(-10 * math.log10(500)) == pytest.approx(0.5)
    amp = report.color_scale(diverged, "attribution")
    assert amp.position(2.0) == pytest.approx(0.5) and amp.position(math.inf) == 1.0
    assert report._color(0.5) == (250, 205, 60)


def test_html_has_color_bar_metadata_and_clickable_rows(diverged):
    page = report.html_report(diverged, "rel-l2")
    parser = _Collect()
    parser.feed(page)
    tags = parser.tags
    assert any(t == "lineargradient" or t == "linearGradient" for t, _ in tags)
    rows = [a for t, a in tags if t == "tr" and "data-i" in a]
    assert [int(a["data-i"]) for a in rows] == list(range(len(diverged.pairs)))
    text = "".join(parser.data)
    assert "(~cos-min 0.999)" in text and "first divergence: layer 1 attn_softmax" in text
    assert "tokens [1, 2, 3]" in text and "(llama)" in text  # from the manifests
    # the first divergence's row and column labels are bold in the heatmap
    svg = report.heatmap_svg(diverged, "rel-l2")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    bold_labels = {e.text for e in root.iter(f"{ns}text") if e.get("font-weight") == "bold"}
    assert {"layer 1", "attn_softmax"} <= bold_labels


def test_html_says_when_a_dump_has_no_manifest(tmp_path):
    a = make_dump(tmp_path / "a", {0: ["attn_norm"]}, manifest=False)
    b = make_dump(tmp_path / "b", {0: ["attn_norm"]}, manifest=False)
    page = report.html_report(diff_dirs(a, b, Tolerance()))
    assert "no manifest.json: written by apr, or incomplete" in page and "OK: all" in page
