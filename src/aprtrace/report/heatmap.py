"""The layer x stage heatmap: colour scale, SVG (standalone and inside the HTML), PNG."""

from __future__ import annotations

import html
import math
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aprtrace.diff import DirDiff, PairResult
from aprtrace.stages import Stage

if TYPE_CHECKING:
    pass
from aprtrace.report.text import AMPLIFY_THRESHOLD, fmt

HEATMAP_METRICS = ("rel-l2", "cosine", "max-abs", "sqnr", "ulp-max", "attribution")


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


@dataclass(frozen=True)
class ColorScale:
    """Metric value -> colour position in [0, 1] (0 best, 1 worst).

    Error metrics use a log axis; SQNR is already logarithmic and uses a linear one. When the
    metric has a natural bound from the tolerance (``mid``), that value sits at 0.5 (yellow), so
    green means well within tolerance and red far outside it, comparably across reports.
    Otherwise the axis spans the values present.
    """

    lo: float
    hi: float
    mid: float | None
    log: bool
    mid_label: str = ""

    def _axis(self, v: float) -> float:
        return math.log10(v) if self.log else v

    def position(self, v: float | None) -> float | None:
        if v is None or math.isnan(v):
            return None
        if math.isinf(v):
            return 1.0 if v > 0 else 0.0
        if self.log and v <= 0:
            return 0.0
        x, lo, hi = self._axis(v), self._axis(self.lo), self._axis(self.hi)
        if self.mid is None:
            t = 0.5 if hi == lo else (x - lo) / (hi - lo)
        else:
            m = self._axis(self.mid)
            t = 0.5 * (x - lo) / (m - lo) if x <= m else 0.5 + 0.5 * (x - m) / (hi - m)
        return min(1.0, max(0.0, t))

    def ticks(self) -> list[tuple[float, float]]:
        """(value, position) pairs for a colour bar: the ends, the tolerance mark and, on a
        log axis, every second decade between them."""
        values = [self.lo] + ([self.mid] if self.mid is not None else []) + [self.hi]
        if self.log and self.lo > 0 and self.hi > self.lo:
            lo, hi = math.ceil(math.log10(self.lo)), math.floor(math.log10(self.hi))
            step = 2 if hi - lo > 4 else 1
            for e in range(lo, hi + 1, step):
                v = 10.0**e
                if all(abs(self.position(v) - self.position(w)) > 0.12 for w in values):  # type: ignore[operator]
                    values.append(v)
        values.sort()
        return [(v, self.position(v) or 0.0) for v in values]


def color_scale(d: DirDiff, metric: str) -> ColorScale:
    """The heatmap's colour scale for ``metric``, anchored to the base tolerance when possible.

    cosine: 1 - cos-min at yellow, 1 (uncorrelated) red. rel-l2: the relative error a cosine
    of exactly cos-min implies for an error uncorrelated with A, sqrt(2 (1 - cos-min)), at
    yellow, 1 red. Below the tolerance the log axis reaches float32 rounding (rel L2 1e-8,
    1 - cos 1e-16): a float32-level bug (1e-5) is a different colour from rounding noise
    (1e-7), not one uniform green. sqnr: the same bound in dB (160 dB ~ rel L2 1e-8).
    attribution: the amplifier threshold (x2).
    max-abs and ulp-max have no tolerance-free bound and span the values present.
    """
    values = [metric_value(p, metric) for p in d.pairs]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    gap = 1.0 - d.base_tolerance.cos_min
    if metric in ("cosine", "rel-l2", "sqnr") and 0.0 < gap < 0.5:
        cos_text = f"cos-min {d.base_tolerance.cos_min:g}"
        if metric == "cosine":
            return ColorScale(FLOAT32_FLOOR**2, 1.0, gap, True, cos_text)
        rel = math.sqrt(2.0 * gap)
        if metric == "rel-l2":
            return ColorScale(FLOAT32_FLOOR, 1.0, rel, True, f"~{cos_text}")
        db = -20.0 * math.log10(rel)  # metric_value is -SQNR: larger is worse
        return ColorScale(20.0 * math.log10(FLOAT32_FLOOR), 0.0, -db, False, f"~{cos_text}")
    if metric == "attribution":
        return ColorScale(0.1, 100.0, AMPLIFY_THRESHOLD, True, f"x{AMPLIFY_THRESHOLD:g}")
    if metric == "sqnr":
        lo, hi = (min(finite), max(finite)) if finite else (-1.0, 0.0)
        return ColorScale(lo, hi, None, False)
    positive = [v for v in finite if v > 0]
    lo, hi = (min(positive), max(positive)) if positive else (0.1, 1.0)
    return ColorScale(lo, hi, None, True)


# The colour scale's low end: relative error of float32 rounding (a few ULP of eps 1.2e-7
# spread over a tensor gives ~1e-8..1e-7).
FLOAT32_FLOOR = 1e-8

# Below the tolerance (t < 0.5) the hue walks blue -> teal -> green -> yellow, so each decade
# between float32 rounding and the tolerance reads differently; above it, orange -> red.
_STOPS = [
    (0.0, (37, 52, 148)),
    (0.2, (34, 128, 168)),
    (0.35, (46, 160, 90)),
    (0.5, (250, 205, 60)),
    (0.75, (240, 120, 40)),
    (1.0, (190, 30, 45)),
]


def _color(t: float | None) -> tuple[int, int, int]:
    if t is None:
        return (210, 210, 210)
    stops = _STOPS
    t = min(1.0, max(0.0, t))
    for (t0, c0), (t1, c1) in zip(stops, stops[1:], strict=False):
        if t <= t1:
            u = (t - t0) / (t1 - t0)
            return tuple(round(c0[i] + u * (c1[i] - c0[i])) for i in range(3))  # type: ignore[return-value]
    return stops[-1][1]


def _ink(rgb: tuple[int, int, int]) -> str:
    """Black or white, whichever reads better on ``rgb`` (relative luminance)."""
    r, g, b = rgb
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 150 else "white"


def _grid(d: DirDiff) -> tuple[list[str], list[str], dict[tuple[str, str], int]]:
    """Rows (layer labels, whole-model last), columns (stages in forward order), cell -> pair."""
    rows = []
    for step in d.steps:  # a block of rows per decode step (step 0, the prompt, unprefixed)
        here = [p for p in d.pairs if p.key.step == step]
        layers = sorted({p.key.layer for p in here if p.key.layer is not None})
        rows += [_row_label(step, x) for x in layers]
        if any(p.key.layer is None for p in here):
            rows.append(_row_label(step, None))
    order = {s.value: s.order for s in Stage}
    stages = sorted({p.key.stage for p in d.pairs}, key=lambda s: (order.get(s, len(order)), s))
    cells = {}
    for i, p in enumerate(d.pairs):
        cells[(_row_label(p.key.step, p.key.layer), p.key.stage)] = i
    return rows, stages, cells


def _row_label(step: int, layer: int | None) -> str:
    row = "whole-model" if layer is None else f"layer {layer}"
    return f"step {step} {row}" if step else row


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


def _tick_text(value: float, metric: str) -> str:
    if metric == "sqnr":
        return f"{-value:.0f} dB"
    if metric == "attribution":
        return f"x{value:.3g}"
    text = fmt(value, ".2g")
    return text.replace("e-0", "e-").replace("e+0", "e")  # 1e-08 -> 1e-8


def _colorbar_svg(scale: ColorScale, metric: str, x: float, y: float, width: float) -> list[str]:
    """A horizontal gradient bar with the scale's end values and the tolerance mark."""
    stops = "".join(
        f'<stop offset="{t:.2f}" stop-color="rgb{_color(t)}"/>' for t in [i / 20 for i in range(21)]
    )
    out = [
        f'<defs><linearGradient id="cbar">{stops}</linearGradient></defs>',
        f'<rect x="{x}" y="{y}" width="{width}" height="12" fill="url(#cbar)" stroke="#888"/>',
    ]
    ticks = scale.ticks()
    for k, (value, t) in enumerate(ticks):
        tx = x + t * width
        anchor = "start" if k == 0 else "end" if k == len(ticks) - 1 else "middle"
        label = _tick_text(value, metric)
        is_mid = scale.mid is not None and value == scale.mid
        thick = ' stroke-width="2"' if is_mid else ""
        out.append(
            f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{y}" y2="{y + (16 if is_mid else 13)}" '
            f'stroke="#333"{thick}/>'
        )
        out.append(
            f'<text x="{tx:.1f}" y="{y + 26}" text-anchor="{anchor}" font-size="10">'
            f"{html.escape(label)}</text>"
        )
        if is_mid and scale.mid_label:
            out.append(
                f'<text x="{tx:.1f}" y="{y + 38}" text-anchor="middle" font-size="10">'
                f"tolerance ({html.escape(scale.mid_label)})</text>"
            )
    return out


def _legend_svg(scale: ColorScale, first: str | None, x: float, y: float) -> list[str]:
    """One line per mark of the heatmap."""
    out = []
    if scale.mid is not None:
        out.append(
            f'<text x="{x}" y="{y + 9}">blue/green = below the tolerance (down to float32 '
            "rounding), yellow = at it, red = far outside</text>"
        )
        y += 16
    out.append(
        f'<text x="{x + 7}" y="{y + 9}" text-anchor="middle" font-weight="bold">x</text>'
        f'<text x="{x + 20}" y="{y + 9}">out of tolerance</text>'
        f'<rect x="{x + 130}" y="{y}" width="14" height="10" fill="#f4f4f4" stroke="#ccc"/>'
        f'<text x="{x + 150}" y="{y + 9}">not in both dumps</text>'
        f'<rect x="{x + 270}" y="{y}" width="14" height="10" fill="rgb(210, 210, 210)"/>'
        f'<text x="{x + 290}" y="{y + 9}">no value (incomparable)</text>'
    )
    if first is not None:
        out.append(
            f'<rect x="{x}" y="{y + 16}" width="14" height="10" fill="none" stroke="black" '
            f'stroke-width="2.5"/><text x="{x + 20}" y="{y + 25}">first divergence: '
            f"{html.escape(first)}</text>"
        )
    return out


def heatmap_svg(d: DirDiff, metric: str = "rel-l2", interactive: bool = False) -> str:
    """Layer-by-stage heatmap as SVG text: colour bar, failing cells crossed, first divergence
    outlined and its row and column labels in bold."""
    rows, stages, cells = _grid(d)
    values = [metric_value(p, metric) for p in d.pairs]
    scale = color_scale(d, metric)
    cw, ch, left, top = 34, 22, 110, 130
    legend_w = 560
    width = max(left + cw * len(stages) + 20, legend_w)
    grid_bottom = top + ch * len(rows)
    height = grid_bottom + 130
    first = d.first_divergence
    first_row = first_stage = None
    if first is not None:
        first_row = _row_label(first.key.step, first.key.layer)
        first_stage = first.key.stage
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" id="heatmap">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="4" y="16" font-size="13" font-weight="bold">'
        f"{html.escape(_metric_label(metric))} per layer and stage (A = reference)</text>",
    ]
    for j, stage in enumerate(stages):
        x = left + j * cw + cw / 2
        bold = ' font-weight="bold"' if stage == first_stage else ""
        out.append(
            f'<text x="{x:.0f}" y="{top - 6}" transform="rotate(-60 {x:.0f} {top - 6})"{bold}>'
            f"{html.escape(stage)}</text>"
        )
    first_box = ""
    for r, row in enumerate(rows):
        y = top + r * ch
        bold = ' font-weight="bold"' if row == first_row else ""
        out.append(
            f'<text x="{left - 6}" y="{y + 15}" text-anchor="end"{bold}>{html.escape(row)}</text>'
        )
        for j, stage in enumerate(stages):
            x = left + j * cw
            idx = cells.get((row, stage))
            if idx is None:
                out.append(
                    f'<rect x="{x}" y="{y}" width="{cw - 2}" height="{ch - 2}" fill="#f4f4f4"/>'
                )
                continue
            p = d.pairs[idx]
            rgb = _color(scale.position(values[idx]))
            attrs = f' class="cell" data-i="{idx}"' if interactive else ""
            out.append(
                f"<g{attrs}><title>{html.escape(_tooltip(p, metric))}</title>"
                f'<rect x="{x}" y="{y}" width="{cw - 2}" height="{ch - 2}" '
                f'fill="rgb{rgb}"/>'
            )
            if p.passed is False or p.error is not None:
                out.append(
                    f'<text x="{x + cw / 2 - 1:.0f}" y="{y + 15}" text-anchor="middle" '
                    f'fill="{_ink(rgb)}" font-weight="bold">x</text>'
                )
            out.append("</g>")
            if p is first:  # drawn last, above the neighbouring cells
                first_box = (
                    f'<rect x="{x - 2}" y="{y - 2}" width="{cw + 2}" height="{ch + 2}" '
                    f'fill="none" stroke="black" stroke-width="3" class="first-divergence" '
                    f'pointer-events="none"/>'
                )
    if first_box:
        out.append(first_box)
    y = grid_bottom + 16
    out.append(f'<text x="4" y="{y + 10}">colour:</text>')
    out.extend(_colorbar_svg(scale, metric, 50, y, 360))
    out.extend(_legend_svg(scale, first.key.label if first is not None else None, 4, y + 52))
    out.append("</svg>")
    return "\n".join(out)


class _Raster:
    """An RGB image with rectangles and bitmap text (report.font), encoded as PNG."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (3 * width * height))

    def rect(self, x: int, y: int, w: int, h: int, rgb: tuple[int, int, int]) -> None:
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + w), min(self.height, y + h)
        if x1 <= x0:
            return
        row = bytes(rgb) * (x1 - x0)
        for yy in range(y0, y1):
            i = 3 * (yy * self.width + x0)
            self.pixels[i : i + len(row)] = row

    def outline(self, x: int, y: int, w: int, h: int, rgb, t: int = 1) -> None:
        self.rect(x, y, w, t, rgb)
        self.rect(x, y + h - t, w, t, rgb)
        self.rect(x, y, t, h, rgb)
        self.rect(x + w - t, y, t, h, rgb)

    def text(self, x: int, y: int, text: str, rgb=(0, 0, 0), vertical: bool = False) -> int:
        """Draw ``text`` with its top-left at (x, y); ``vertical`` reads bottom to top, with
        (x, y) the bottom-left. Returns the advance in pixels."""
        from aprtrace.report.font import HEIGHT, WIDTH, glyph

        for k, ch in enumerate(text):
            rows = glyph(ch)
            for r, bits in enumerate(rows):
                for c in range(WIDTH):
                    if bits >> (WIDTH - 1 - c) & 1:
                        if vertical:
                            self.rect(x + r, y - k * WIDTH - c, 1, 1, rgb)
                        else:
                            self.rect(x + k * WIDTH + c, y + r, 1, 1, rgb)
        return len(text) * WIDTH if not vertical else HEIGHT

    def png(self) -> bytes:
        raw = bytearray()
        stride = 3 * self.width
        for y in range(self.height):
            raw.append(0)  # filter type None
            raw.extend(self.pixels[y * stride : (y + 1) * stride])

        def chunk(tag: bytes, body: bytes) -> bytes:
            crc = struct.pack(">I", zlib.crc32(tag + body))
            return struct.pack(">I", len(body)) + tag + body + crc

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(bytes(raw), 9))
            + chunk(b"IEND", b"")
        )


def png_grid_origin(rows: list[str], stages: list[str]) -> tuple[int, int]:
    """Top-left pixel of the PNG heatmap's grid: after the row labels, under the title and
    the vertical stage labels."""
    from aprtrace.report.font import HEIGHT, WIDTH

    left = max([len(r) for r in rows] + [5]) * WIDTH + 12
    label_h = max([len(s) for s in stages] + [5]) * WIDTH + 8
    return left, 8 + HEIGHT + 8 + HEIGHT + 4 + label_h


def heatmap_png(d: DirDiff, metric: str = "rel-l2", cell: int = 16) -> bytes:
    """The heatmap as a PNG that reads on its own (stdlib only): title, axis labels (layers
    down, stages across), the colour bar with its ticks and tolerance mark, out-of-tolerance
    cells crossed, the first divergence outlined, and a legend."""
    from aprtrace.report.font import HEIGHT, WIDTH

    rows, stages, cells = _grid(d)
    values = [metric_value(p, metric) for p in d.pairs]
    scale = color_scale(d, metric)
    first = d.first_divergence
    title = f"{_metric_label(metric)} per layer and stage (A = reference, B = candidate)"
    left, top = png_grid_origin(rows, stages)
    grid_w, grid_h = cell * max(1, len(stages)), cell * max(1, len(rows))
    bar_w = 360
    legend = [
        "x = out of tolerance; grey = not in both dumps",
        f"black box = first divergence: {first.key.label}" if first else "no divergence",
    ]
    width = max(left + grid_w + 16, 16 + len(title) * WIDTH, 40 + bar_w + 60)
    width = max(width, 16 + max(len(t) for t in legend) * WIDTH)
    height = top + grid_h + 16 + 14 + 3 * (HEIGHT + 2) + 8 + 2 * (HEIGHT + 4) + 8
    img = _Raster(width, height)
    img.text(8, 8, title)
    img.text(8, 8 + HEIGHT + 8, "stage ->", (80, 80, 80))
    img.text(8, top - HEIGHT - 2, "layer", (80, 80, 80))
    ink = {"black": (0, 0, 0), "white": (255, 255, 255)}
    for j, stage in enumerate(stages):
        bold = first is not None and stage == first.key.stage
        img.text(left + j * cell + (cell - HEIGHT) // 2, top - 4, stage, (0, 0, 0), vertical=True)
        if bold:
            img.rect(left + j * cell + 1, top - 3, cell - 2, 2, (0, 0, 0))
    for r, row in enumerate(rows):
        y = top + r * cell
        img.text(left - 6 - len(row) * WIDTH, y + (cell - HEIGHT) // 2, row)
        for j, stage in enumerate(stages):
            x = left + j * cell
            idx = cells.get((row, stage))
            if idx is None:
                img.rect(x, y, cell - 1, cell - 1, (244, 244, 244))
                continue
            rgb = _color(scale.position(values[idx]))
            img.rect(x, y, cell - 1, cell - 1, rgb)
            p = d.pairs[idx]
            if p.passed is False or p.error is not None:
                img.text(x + (cell - WIDTH) // 2, y + (cell - HEIGHT) // 2 - 1, "x", ink[_ink(rgb)])
    if first is not None:
        for r, row in enumerate(rows):
            for j, stage in enumerate(stages):
                if cells.get((row, stage)) is not None and d.pairs[cells[(row, stage)]] is first:
                    img.outline(
                        left + j * cell - 2, top + r * cell - 2, cell + 3, cell + 3, (0, 0, 0), 2
                    )
    y = top + grid_h + 16
    bx = 40
    img.text(8, y, "colour", (80, 80, 80))
    for k in range(bar_w):
        img.rect(bx + 20 + k, y, 1, 14, _color(k / (bar_w - 1)))
    img.outline(bx + 19, y - 1, bar_w + 2, 16, (136, 136, 136))
    ticks = scale.ticks()
    for k, (value, t) in enumerate(ticks):
        tx = bx + 20 + round(t * (bar_w - 1))
        is_mid = scale.mid is not None and value == scale.mid
        img.rect(tx, y + 14, 2 if is_mid else 1, 6 if is_mid else 4, (0, 0, 0))
        label = _tick_text(value, metric)
        lx = tx - len(label) * WIDTH // 2
        if k == 0:
            lx = tx
        elif k == len(ticks) - 1:
            lx = tx - len(label) * WIDTH
        img.text(lx, y + 21, label)
        if is_mid and scale.mid_label:
            text = f"tolerance ({scale.mid_label})"
            img.text(tx - len(text) * WIDTH // 2, y + 21 + HEIGHT + 2, text, (120, 0, 0))
    y += 14 + 3 * (HEIGHT + 2) + 8
    for line in legend:
        img.text(8, y, line)
        y += HEIGHT + 4
    return img.png()
