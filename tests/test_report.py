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
    "input_note",
    "max_abs_diff_coords",
    "norm_a",
    "norm_b",
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
    "stale_a",
    "stale_b",
    "missing_a",
    "missing_b",
    "unreadable_a",
    "unreadable_b",
    "token_texts",
    "summary",
    "first_divergence",
    "first_token_disagreement",
    "amplifiers",
    "pairs",
}


@pytest.fixture
def diverged(tmp_path):
    stages = ["embedding", "attn_norm", "q_post_rope", "k_post_rope", "attn_scores", "attn_softmax"]
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
        "pairs": 13,
        "passed": 12,
        "failed": 1,
        "incomparable": 0,
        "unreadable": 0,
        "stopped_early": False,
        "exit_code": 1,
        "incomplete": [],
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
    assert (
        "layer 1 attn_softmax adds 0.039 (rel L2 0.001 -> 0.04, x40 vs layer 1 attn_scores)" in text
    )
    assert report.summary_line(diverged).startswith("DIVERGED: 1 of 13 pairs")


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


def _decode_png(png: bytes) -> tuple[int, int, bytes]:
    """Width, height and RGB rows of an 8-bit RGB PNG with filter 0 (what heatmap_png writes)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    length, tag = struct.unpack(">I4s", png[8:16])
    assert (tag, length) == (b"IHDR", 13)
    width, height = struct.unpack(">II", png[16:24])
    idat_len = struct.unpack(">I", png[33:37])[0]
    raw = zlib.decompress(png[41 : 41 + idat_len])
    assert len(raw) == height * (1 + 3 * width)
    rows = b"".join(raw[y * (1 + 3 * width) + 1 : (y + 1) * (1 + 3 * width)] for y in range(height))
    return width, height, rows


def test_svg_and_png_plots(tmp_path, diverged):
    svg = report.heatmap_svg(diverged, "rel-l2")
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    assert "out of tolerance" in svg and "first divergence: layer 1 attn_softmax" in svg
    width, height, rgb = _decode_png(report.heatmap_png(diverged, "rel-l2", cell=16))

    def px(x, y):
        return tuple(rgb[3 * (y * width + x) : 3 * (y * width + x) + 3])

    colours = {px(x, y) for y in range(height) for x in range(width)}
    # the colour bar spans the whole scale, from float32 rounding to far outside
    assert report.heatmap._color(0.0) in colours and report.heatmap._color(1.0) in colours
    # text (title, labels, legend) is drawn in black on white: many black pixels in the top band
    title_band = [px(x, y) for y in range(8, 21) for x in range(width)]
    assert sum(p == (0, 0, 0) for p in title_band) > 200
    assert width > 8 * 16 and height > 3 * 16  # more than the bare grid: labels and bar


def test_png_marks_failing_cells_and_the_first_divergence(diverged):
    from aprtrace.report.heatmap import _grid, png_grid_origin

    cell = 16
    width, _, rgb = _decode_png(report.heatmap_png(diverged, "rel-l2", cell=cell))
    rows, stages, cells = _grid(diverged)
    left, top = png_grid_origin(rows, stages)

    def px(x, y):
        return tuple(rgb[3 * (y * width + x) : 3 * (y * width + x) + 3])

    def inked(r, j):  # pixels of the 'x' mark: neither the cell colour nor the white gap
        x0, y0 = left + j * cell, top + r * cell
        fill = px(x0 + 1, y0 + 1)
        return sum(
            px(x, y) != fill
            for y in range(y0 + 2, y0 + cell - 3)
            for x in range(x0 + 2, x0 + cell - 3)
        )

    first = diverged.first_divergence
    for (row, stage), i in cells.items():
        r, j = rows.index(row), stages.index(stage)
        p = diverged.pairs[i]
        assert (inked(r, j) > 5) == (p.passed is False), (row, stage)
        if p is first:
            assert px(left + j * cell - 2, top + r * cell + 4) == (0, 0, 0)  # the outline
        elif r == 0 and j == 0:
            assert px(left - 2, top + 4) == (255, 255, 255)


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


def _table_text(d, width: int, wide: bool = False, show_all: bool = True) -> str:
    buf = io.StringIO()
    report.render_dir_table(d, Console(file=buf, width=width), wide=wide, show_all=show_all)
    return buf.getvalue()


@pytest.mark.parametrize("width", [120, 100, 80, 60])
def test_default_table_fits_the_terminal(diverged, width):
    text = _table_text(diverged, width)
    table_lines = [line for line in text.splitlines() if line.startswith("    ")]
    assert table_lines and all(len(line) <= width for line in table_lines), table_lines
    # the verdict and the first-divergence marker survive every width; ULP never by default
    assert "◀ first" in text and "FAIL max|d|" in text and "ULP" not in text
    assert text.splitlines()[2].startswith("DIVERGED: 1 of 13 pairs")
    assert text.rstrip().splitlines()[-1] == "verdict: DIVERGED (exit 1)"
    if width == 120:
        assert "x input" in text and "h0 q" in text and "not shown" not in text
    if width == 60:
        header = next(line for line in text.splitlines() if "stage" in line and "verdict" in line)
        assert "max|d|" not in header and "--wide shows all" in text


def test_wide_table_has_ulp_and_full_reasons(diverged):
    text = _table_text(diverged, 250, wide=True)
    assert "ULP max/med" in text and "rms" in text
    assert "FAIL max|d| 0.44 > atol + rtol*max|a| = 0.11 ◀ first" in text
    assert "head 0, query" in text  # positions spelled out


def test_cli_wide_option(diverged):
    a, b = str(diverged.a.path), str(diverged.b.path)
    narrow = CliRunner().invoke(diff_command, ["--values", a, b, "--rtol", "0.01", "--all"])
    wide = CliRunner().invoke(diff_command, ["--values", a, b, "--rtol", "0.01", "--wide", "--all"])
    assert narrow.exit_code == wide.exit_code == 1
    assert "ULP max/med" not in narrow.output and "ULP max/med" in wide.output
    table = [line for line in narrow.output.splitlines() if "attn_norm" in line]
    assert table and all(len(line) <= 120 for line in table)


@pytest.mark.parametrize(
    ("stage", "shape", "index", "text", "short"),
    [
        ("attn_norm", (2, 200), 321, "token 1, channel 121", "t1 c121"),
        ("attn_scores", (4, 6, 6), 3 * 36 + 5 * 6 + 2, "head 3, query 5, key 2", "h3 q5 k2"),
        ("lm_head", (384,), 267, "vocab id 267", "id 267"),
        ("unknown_stage", (2, 2, 2), 7, "[1, 1, 1]", "[1, 1, 1]"),
    ],
)
def test_positions_are_structured_not_parsed_back(stage, shape, index, text, short):
    from aprtrace.diff import position_of

    pos = position_of(stage, shape, index)
    assert pos.text == text and pos.short == short


def test_first_divergence_line_names_the_position(diverged):
    first = diverged.first_divergence
    line = report.first_divergence_line(diverged)
    assert line.startswith("First divergence: layer 1 attn_softmax")
    assert f"at {first.max_position}, 1 - cosine" in line


def test_default_view_shows_the_news_not_the_table(diverged):
    text = _table_text(diverged, 160, show_all=False)
    lines = text.splitlines()
    assert lines[2].startswith("DIVERGED") and lines[3].startswith("First divergence:")
    assert "Stages adding the most error" in text
    assert "Out of tolerance (1 of 13 pairs; --all prints every row)" in text
    rows = [line for line in lines if "◀ first" in line or " ok" in line]
    assert len(rows) == 1  # only the failing row, not the 12 passing ones
    every = _table_text(diverged, 160, show_all=True)
    assert sum(" ok" in line for line in every.splitlines()) == 12
    # rows that do not differ show no position; the ratio of a source is 'new', never 'inf'
    same = next(line for line in every.splitlines() if " embedding " in line)
    assert " t0 c0" not in same
    assert " inf" not in every and "new" in every
    assert "1-cos" in every and "e-" in every  # 1 - cosine in scientific notation


def test_float32_rounding_noise_is_not_reported_as_error_added(tmp_path):
    stages = ["embedding", "attn_norm", "qkv_matmul"]
    a = make_dump(tmp_path / "a", {0: stages})
    # a relative change of 1e-7 (f32 rounding), amplified x10 by qkv_matmul: still noise
    b = make_dump(
        tmp_path / "b",
        {0: stages},
        scale={"layer-0/attn_norm": 1 + 1.2e-7, "layer-0/qkv_matmul": 1 + 1.2e-6},
    )
    d = diff_dirs(a, b)
    qkv = next(p for p in d.pairs if p.key.stage == "qkv_matmul")
    assert qkv.attribution is not None and qkv.attribution > 2  # a ratio exists ...
    assert d.error_adders() == [] and d.amplifiers() == []  # ... but it is not news
    assert "Stages adding" not in _table_text(d, 160, show_all=False)


def test_color_scale_is_anchored_to_the_tolerance(diverged):
    # cos-min 0.999 (the fixture's): 1 - cos = 1e-3 and rel L2 = sqrt(2e-3) sit at yellow (0.5),
    # float32 rounding (rel L2 1e-8, 1 - cos 1e-16) at the low end (0), an uncorrelated 1 at
    # red (1), on a log axis: a float32-level bug (rel 1e-5) is not the colour of rounding.
    cos = report.color_scale(diverged, "cosine")
    assert cos.position(1e-3) == pytest.approx(0.5)
    assert cos.position(1e-16) == pytest.approx(0.0) and cos.position(1.0) == pytest.approx(1.0)
    assert cos.position(10**-9.5) == pytest.approx(0.25)
    rel = report.color_scale(diverged, "rel-l2")
    assert rel.position(math.sqrt(2e-3)) == pytest.approx(0.5)
    assert rel.position(1e-9) == 0.0 and rel.position(5.0) == 1.0 and rel.position(None) is None
    assert rel.position(1e-8) == pytest.approx(0.0)
    noise, bug = rel.position(1e-7), rel.position(1e-5)
    assert bug - noise > 0.1  # two decades apart: visibly different colours
    assert report.heatmap._color(noise) != report.heatmap._color(bug)
    sqnr = report.color_scale(diverged, "sqnr")  # values are -SQNR dB; bound 10*log10(500)
    assert sqnr.position(-10 * math.log10(500)) == pytest.approx(0.5)
    amp = report.color_scale(diverged, "attribution")
    assert amp.position(2.0) == pytest.approx(0.5) and amp.position(math.inf) == 1.0
    assert report.heatmap._color(0.5) == (250, 205, 60)


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
