"""Terminal renderer: the news first (summary, first divergence, error adders), then the
out-of-tolerance rows in a table that fits the terminal."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from aprtrace.diff import NOISE_REL_L2, DirDiff, FilePairResult, PairResult, layer_label
from aprtrace.report.text import (
    AMPLIFY_THRESHOLD,
    POSITION_LEGEND,
    adder_sentence,
    cosine_gap,
    first_divergence_line,
    fmt,
    fmt_sci,
    localization_lines,
    overall_verdict,
    ratio_text,
    short_reason,
    summary_line,
    token_disagreement_line,
)

if TYPE_CHECKING:
    from aprtrace.localize import Localization


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


@dataclass(frozen=True)
class _Column:
    """One column of the diff table; lower priority numbers are dropped last."""

    header: str
    justify: str
    priority: int
    cell: Callable[[PairResult], str | Text]
    wide_only: bool = False


def _verdict_cell(d: DirDiff, wide: bool) -> Callable[[PairResult], Text]:
    def cell(p: PairResult) -> Text:
        if p.unreadable is not None:
            text = Text("UNREADABLE", style="bold magenta")
        elif p.error is not None:
            text = Text("INCOMPARABLE", style="bold magenta")
        elif p.passed:
            text = Text("ok", style="green")
        else:
            text = Text("FAIL " + (p.reason if wide else short_reason(p)), style="bold red")
        if p is d.first_divergence:
            text.append(" ◀ first", style="bold reverse")
        return text

    return cell


def _ratio_cell(p: PairResult) -> Text:
    text = Text(ratio_text(p))
    if (
        p.attribution is not None
        and p.attribution >= AMPLIFY_THRESHOLD
        and p.stats is not None
        and (p.stats.rel_l2 or 0) >= NOISE_REL_L2
    ):
        text.stylize("bold yellow")
    return text


def _sqnr_cell(p: PairResult) -> str:
    """SQNR in dB; '-' when there is no error (an infinite SQNR)."""
    s = p.stats
    if s is None or s.sqnr_db is None or math.isinf(s.sqnr_db) and s.sqnr_db > 0:
        return "-"
    return fmt(s.sqnr_db, ".1f")


def _stat(spec: str, attr: str) -> Callable[[PairResult], str]:
    return lambda p: "-" if p.stats is None else fmt(getattr(p.stats, attr), spec)


def _local_columns(localization: Localization) -> list[_Column]:
    """``local`` and ``inherited`` relative errors of ``diff --model`` (teacher forcing)."""

    def value(attr: str) -> Callable[[PairResult], str]:
        def cell(p: PairResult) -> str:
            loc = localization.get(p)
            return "n/d" if loc is None or loc.note else fmt(getattr(loc, attr), ".3g")

        return cell

    return [
        _Column("local", "right", 1, value("local_rel_l2")),
        _Column("inherited", "right", 1, value("inherited_rel_l2")),
    ]


def _table_columns(
    d: DirDiff, wide: bool, localization: Localization | None = None
) -> list[_Column]:
    """Every column in display order. Priority 0 is always shown."""

    def at(p: PairResult) -> str:
        if p.stats is None or not p.stats.max_abs_diff > 0:
            return ""  # nothing differs: no position to show
        pos = p.max_coords
        if pos is None:
            return f"#{p.stats.max_abs_diff_index}"
        return pos.text if wide else pos.short

    def ulp(p: PairResult) -> str:
        s = p.stats
        return "-" if s is None else f"{fmt(s.ulp_max, 'd')}/{fmt(s.ulp_median, '.10g')}"

    columns = [
        *([_Column("step", "right", 0, lambda p: str(p.key.step))] if len(d.steps) > 1 else []),
        _Column("layer", "right", 0, lambda p: "-" if p.key.layer is None else str(p.key.layer)),
        _Column("stage", "left", 0, lambda p: p.key.stage),
        _Column("1-cos", "right", 1, lambda p: fmt_sci(cosine_gap(p))),
        _Column("rel L2", "right", 1, _stat(".3g", "rel_l2")),
        _Column("max|d|", "right", 2, _stat(".3g", "max_abs_diff")),
        _Column("at", "left", 3, at),
        _Column("x input", "right", 4, _ratio_cell),
        _Column("SQNR dB", "right", 5, _sqnr_cell),
        _Column("rms", "right", 6, _stat(".3g", "rms_diff")),
        _Column("ULP max/med", "right", 7, ulp, wide_only=True),
        _Column("verdict", "left", 0, _verdict_cell(d, wide)),
    ]
    if localization is not None:
        at = next(i for i, c in enumerate(columns) if c.header == "rel L2") + 1
        columns[at:at] = _local_columns(localization)
    return columns


def _fit_columns(columns: list[_Column], widths: list[int], budget: int) -> list[int]:
    """Indices of the columns kept: drop the least important until the table fits ``budget``."""
    keep = list(range(len(columns)))

    def total() -> int:  # no outer edge; 3 characters (padding, rule, padding) between cells
        return sum(widths[i] for i in keep) + 3 * (len(keep) - 1)

    for prio in sorted({c.priority for c in columns if c.priority > 0}, reverse=True):
        if total() <= budget:
            break
        keep = [i for i in keep if columns[i].priority != prio]
    return keep


def render_dir_table(
    d: DirDiff,
    console: Console,
    wide: bool = False,
    localization: Localization | None = None,
    show_all: bool = False,
) -> None:
    """The news first: summary, first divergence, the stages adding the most error, then the
    out-of-tolerance rows (every row with ``show_all``), findings, and the verdict again.

    The table drops its least important columns (rms, SQNR, x input, max|d| and its position)
    until it fits the console; ``wide`` shows every column, ULP distances and the full
    verdict reasons included.
    """
    verdict_style = "bold green" if overall_verdict(d) == "pass" else "bold red"
    # Paths and file names are printed as Text: a '[' in them is not rich markup.
    console.print(Text(f"A (reference): {d.a.path}"), soft_wrap=True)
    console.print(Text(f"B (candidate): {d.b.path}"), soft_wrap=True)
    console.print(Text(summary_line(d), style=verdict_style), soft_wrap=True)
    first_line = first_divergence_line(d)
    if first_line:
        console.print(Text(first_line, style="bold"), soft_wrap=True)
    adders = d.adders
    if adders:
        console.print(
            Text("Stages adding the most error (relative L2 added by the stage itself):"),
            soft_wrap=True,
        )
        for p, added in adders:
            console.print(Text(f"  - {adder_sentence(p, added)}"), soft_wrap=True)
    rows = d.pairs if show_all else [p for p in d.pairs if not p.passed]
    if rows:
        heading = (
            f"All {len(d.pairs)} pairs:"
            if show_all
            else f"Out of tolerance ({len(rows)} of {len(d.pairs)} pairs; --all prints every row):"
        )
        console.print(Text(heading), soft_wrap=True)
        _print_table(d, rows, console, wide, localization)
    else:
        console.print(
            Text(f"(no pair out of tolerance; --all prints all {len(d.pairs)} rows)", style="dim"),
            soft_wrap=True,
        )
    for p in d.pairs:
        if p.lm_head is not None:
            h = p.lm_head
            console.print(
                f"{'step ' + str(p.key.step) + ' ' if p.key.step else ''}"
                f"lm_head: top-1 {'agrees' if h.top1_agree else 'DIFFERS'} "
                f"(A {h.top1_a}, B {h.top1_b}), top-5 overlap {h.top5_overlap}/5, "
                f"KL(A||B) {fmt(h.kl_divergence, '.3g')}",
                soft_wrap=True,
            )
    token_line = token_disagreement_line(d)
    if token_line is not None:
        console.print(Text(token_line, style="bold"), soft_wrap=True)
    if localization is not None:
        for line in localization_lines(d, localization):
            console.print(Text(line), soft_wrap=True)
    for side, names in (("A", d.only_a), ("B", d.only_b)):
        if names:
            shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            console.print(
                Text.assemble((f"only in {side} ({len(names)}):", "yellow"), f" {shown}"),
                soft_wrap=True,
            )
    v = d.verdict
    console.print(
        Text(f"verdict: {v.word.upper()} (exit {v.exit_code})", style=verdict_style),
        soft_wrap=True,
    )


def _print_table(
    d: DirDiff,
    rows: list[PairResult],
    console: Console,
    wide: bool,
    localization: Localization | None,
) -> None:
    columns = [c for c in _table_columns(d, wide, localization) if wide or not c.wide_only]
    cells = [[c.cell(p) for c in columns] for p in rows]
    widths = [
        max(
            [len(c.header)]
            + [
                Text(row[j]).cell_len if isinstance(row[j], str) else row[j].cell_len
                for row in cells
            ]
        )
        for j, c in enumerate(columns)
    ]
    keep = list(range(len(columns))) if wide else _fit_columns(columns, widths, console.width)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for i in keep:
        c = columns[i]
        table.add_column(c.header, justify=c.justify, no_wrap=c.header != "verdict")  # type: ignore[arg-type]
    for k, (p, row) in enumerate(zip(rows, cells, strict=True)):
        style = "bold" if p is d.first_divergence else None
        # A rule between decode steps: the table groups by step.
        last_of_step = k + 1 < len(rows) and rows[k + 1].key.step != p.key.step
        table.add_row(*(row[i] for i in keep), style=style, end_section=last_of_step)
    console.print(table)  # the only hard-wrapped output
    notes = []
    if any(columns[i].header == "at" for i in keep) and not wide:
        notes.append(POSITION_LEGEND)
    if any(columns[i].header == "x input" for i in keep):
        notes.append("x input: rel L2 over its input's (new = input identical)")
    if notes:
        console.print(Text("; ".join(notes), style="dim"), soft_wrap=True)
    dropped = [columns[i].header for i in range(len(columns)) if i not in keep]
    if dropped:
        console.print(
            Text(
                f"(not shown for the terminal width: {', '.join(dropped)}; --wide shows all)",
                style="dim",
            ),
            soft_wrap=True,
        )
