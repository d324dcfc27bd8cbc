"""Render diffs: apr-style text/JSON for one pair; table, JSON, HTML, SVG, PNG for dumps."""

from __future__ import annotations

import html
import json
import math
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from aprtrace import __version__
from aprtrace.diff import DirDiff, FilePairResult, PairResult, layer_label
from aprtrace.stages import Stage

if TYPE_CHECKING:
    from aprtrace.localize import Localization

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


def pair_json(p: PairResult, localization: Localization | None = None) -> dict[str, Any]:
    s = p.stats
    out: dict[str, Any] = {
        "path": p.key.rel,
        "step": p.key.step,
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
    out["index_agreement"] = p.index.to_json() if p.index is not None else None
    out["top_diffs"] = [
        {
            "index": t.index,
            "a": finite_or_none(t.a),
            "b": finite_or_none(t.b),
            "abs_diff": finite_or_none(t.abs_diff),
        }
        for t in (s.top_diffs if s else [])
    ]
    if localization is not None:
        out.update(local_json(localization, p))
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
        "step": p.key.step,
        "stage": p.key.stage,
        "layer": p.key.layer if p.key.layer is not None else "whole-model",
        "reason": p.reason,
    }


# --- decode steps (issue 12) -----------------------------------------------------------------


def _token_disagreement_json(d: DirDiff) -> dict[str, Any] | None:
    p = d.first_token_disagreement
    if p is None or p.lm_head is None:
        return None
    return {"step": p.key.step, "path": p.key.rel, "a": p.lm_head.top1_a, "b": p.lm_head.top1_b}


def token_disagreement_line(d: DirDiff) -> str | None:
    """Where the two runs would have generated different tokens (None: they never would)."""
    p = d.first_token_disagreement
    if p is None or p.lm_head is None:
        if len(d.steps) > 1 and any(q.lm_head is not None for q in d.pairs):
            steps = f"steps {d.steps[0]}..{d.steps[-1]}"
            return f"argmax: A and B pick the same token at every pass ({steps})"
        return None
    which = "the prompt pass" if p.key.step == 0 else f"step {p.key.step}"
    return (
        f"argmax: A and B first pick different tokens after {which} (A {p.lm_head.top1_a}, "
        f"B {p.lm_head.top1_b}): greedy generation would part there, at step {p.key.step + 1}"
    )


def _step_cell(p: PairResult) -> str:
    return str(p.key.step)


# --- end decode steps ---------------------------------------------------------------------------


def dir_json(d: DirDiff, localization: Localization | None = None) -> dict[str, Any]:
    """The ``aprtrace-diff-v1`` document (keys in docs/diff-json.md).

    With ``localization`` (``diff --model``) each pair gains ``local_rel_l2``,
    ``inherited_rel_l2``, ``local_share``, ``local_inputs``, ``local_note``, and the
    document a ``localization`` object; without it those keys are absent.
    """
    doc = {
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
        "first_token_disagreement": _token_disagreement_json(d),
        "amplifiers": [
            {
                **_ref(p),  # type: ignore[dict-item]
                "ratio": finite_or_none(p.attribution),
                "source": math.isinf(p.attribution or 0.0),
                "predecessor": p.predecessor,
            }
            for p in d.amplifiers(AMPLIFY_THRESHOLD)
        ],
        "pairs": [pair_json(p, localization) for p in d.pairs],
    }
    if localization is not None:
        doc["localization"] = localization_json(d, localization)
    return doc


def local_json(localization: Localization, p: PairResult) -> dict[str, Any]:
    """The per-pair keys of ``diff --model`` (null when the stage could not be re-run)."""
    loc = localization.get(p)
    if loc is None:
        return {
            "local_rel_l2": None,
            "inherited_rel_l2": None,
            "local_share": None,
            "local_inputs": [],
            "local_note": "not localized",
        }
    return {
        "local_rel_l2": finite_or_none(loc.local_rel_l2),
        "inherited_rel_l2": finite_or_none(loc.inherited_rel_l2),
        "local_share": finite_or_none(loc.local_share),
        "local_inputs": list(loc.inputs),
        "local_note": loc.note,
    }


def localization_json(d: DirDiff, localization: Localization) -> dict[str, Any]:
    return {
        "model": str(localization.model_path),
        "architecture": localization.architecture,
        "warnings": list(localization.warnings),
        "localized": sum(1 for p in d.pairs if _localized(localization, p)),
        "sources": [
            {**_ref(p), **local_json(localization, p)}  # type: ignore[dict-item]
            for p in localization.sources(d.pairs)
        ],
    }


def to_json_text(doc: dict[str, Any]) -> str:
    """Pretty JSON; the ``apr-stage-diff-v1`` document is written exactly as apr prints it."""
    if doc.get("schema") == FILE_PAIR_SCHEMA:
        return _serde_pretty(doc)
    return json.dumps(doc, indent=2, allow_nan=False)


def file_pair_json_text(result: FilePairResult) -> str:
    """``apr diff --values --json`` output, byte for byte as serde_json prints it."""
    return to_json_text(file_pair_json(result))


_REPR = re.compile(r"^(-?)(\d+)(?:\.(\d+))?(?:e([-+]\d+))?$")


def serde_float(x: float) -> str:
    """A finite float as serde_json 1.0.150 writes it (zmij): the shortest round-trip digits,
    plain for decimal exponents -5..=15 (``0.000015``, ``1.0``), else ``d.ddde±X``."""
    sign, whole, frac, exp = _REPR.match(repr(float(x))).groups()  # type: ignore[union-attr]
    digits = (whole + (frac or "")).lstrip("0")
    if not digits:
        return f"{sign}0.0"
    # Decimal exponent of the first significant digit.
    e = int(exp or 0) + len(whole) - 1 - (len(whole + (frac or "")) - len(digits))
    digits = digits.rstrip("0")
    if -5 <= e <= 15:
        if e < 0:
            return f"{sign}0.{'0' * (-e - 1)}{digits}"
        if len(digits) <= e + 1:
            return f"{sign}{digits}{'0' * (e + 1 - len(digits))}.0"
        return f"{sign}{digits[: e + 1]}.{digits[e + 1 :]}"
    mantissa = digits[0] + (f".{digits[1:]}" if len(digits) > 1 else "")
    return f"{sign}{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"


def _serde_pretty(value: Any, indent: str = "") -> str:
    """serde_json::to_string_pretty: two-space indent, non-ASCII kept, NaN/Inf as null."""
    inner = indent + "  "
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{_serde_str(k)}: {_serde_pretty(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list):
        if not value:
            return "[]"
        return "[\n" + ",\n".join(inner + _serde_pretty(v, inner) for v in value) + f"\n{indent}]"
    if isinstance(value, str):
        return _serde_str(value)
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, float):
        return serde_float(value) if math.isfinite(value) else "null"
    return str(int(value))


def _serde_str(text: str) -> str:
    # Rust's Path::display() replaces undecodable bytes with U+FFFD; so do we.
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return json.dumps(text, ensure_ascii=False)


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
    where = ""
    if first.stats is not None:
        pos = first.max_position or f"index {first.stats.max_abs_diff_index}"
        where = f" (max|d| {fmt(first.stats.max_abs_diff, '.3g')} at {pos})"
    return (
        f"DIVERGED: {d.failed} of {n} pairs out of tolerance ({tol_text}); first divergence: "
        f"{first.key.label} [{first.key.rel}]: {first.reason}{where}{stop}"
    )


_POSITION_SHORT = (
    (re.compile(r"^token (\d+), channel (\d+)$"), r"t\1 c\2"),
    (re.compile(r"^head (\d+), query (\d+), key (\d+)$"), r"h\1 q\2 k\3"),
    (re.compile(r"^vocab id (\d+)$"), r"id \1"),
)
POSITION_LEGEND = "at: t = token, c = channel, h = head, q = query, k = key, id = vocab id"


def short_position(position: str | None) -> str | None:
    """'token 0, channel 121' -> 't0 c121' (see POSITION_LEGEND); other text unchanged."""
    if position is None:
        return None
    for pattern, repl in _POSITION_SHORT:
        if pattern.match(position):
            return pattern.sub(repl, position)
    return position


def short_reason(p: PairResult) -> str:
    """The failed check in a word: 'cos', 'max|d|', 'NaN/Inf' (full text in p.reason)."""
    if p.error is not None:
        return "incomparable"
    if p.passed:
        return ""
    for prefix, word in (("cosine", "cos"), ("max|d|", "max|d|")):
        if p.reason.startswith(prefix):
            return word
    return "NaN/Inf" if "NaN" in p.reason else p.reason


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
        if p.error is not None:
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
    text = Text(fmt(p.attribution, ".3g"))
    if (
        p.attribution is not None
        and p.attribution >= AMPLIFY_THRESHOLD
        and p.stats is not None
        and (p.stats.rel_l2 or 0) > 0
    ):
        text.stylize("bold yellow")
    return text


def _stat(spec: str, attr: str) -> Callable[[PairResult], str]:
    return lambda p: "-" if p.stats is None else fmt(getattr(p.stats, attr), spec)


def _localized(localization: Localization, p: PairResult) -> bool:
    loc = localization.get(p)
    return loc is not None and loc.local_rel_l2 is not None


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


def localization_sentence(p: PairResult, localization: Localization) -> str:
    """'layer 3 ffn_out: 92% of its error is local (the stage itself), 8% inherited (...)'."""
    loc = localization.get(p)
    if loc is None or loc.note is not None:
        return f"{p.key.label}: not localized ({loc.note if loc else 'no result'})"
    share = loc.local_share
    local, inherited = fmt(loc.local_rel_l2, ".3g"), fmt(loc.inherited_rel_l2, ".3g")
    numbers = f"rel L2: local {local}, inherited {inherited}"
    if share is None:
        return f"{p.key.label}: no error ({numbers})"
    local_pct = round(100 * share)
    return (
        f"{p.key.label}: {local_pct}% of its error is local (the stage itself), "
        f"{100 - local_pct}% inherited ({numbers})"
    )


def localization_lines(d: DirDiff, localization: Localization) -> list[str]:
    """The findings of ``diff --model``: where B's own computation adds the most error."""
    lines = [
        "Local vs inherited error (stages re-run on B's inputs with "
        f"{localization.model_path.name}):"
    ]
    sources = localization.sources(d.pairs)
    lines.extend(f"  - {localization_sentence(p, localization)}" for p in sources)
    first = d.first_divergence
    if first is not None and first not in sources:
        lines.append(f"  first divergence: {localization_sentence(first, localization)}")
    done = sum(1 for p in d.pairs if _localized(localization, p))
    if not sources and done:
        lines.append(
            "  no stage adds error of its own: B computes exactly what the model gives from "
            "B's inputs, so all of its error is inherited (from the model's weights or inputs)"
        )
    missing = [
        p for p in d.pairs if (loc := localization.get(p)) is not None and loc.note is not None
    ]
    if missing:
        loc = localization.get(missing[0])
        lines.append(
            f"  {len(missing)} of {len(d.pairs)} stages not localized (n/d), e.g. "
            f"{missing[0].key.label}: {loc.note if loc else ''}"
        )
    return lines


def _table_columns(
    d: DirDiff, wide: bool, localization: Localization | None = None
) -> list[_Column]:
    """Every column in display order. Priority 0 is always shown."""

    def at(p: PairResult) -> str:
        if p.stats is None:
            return "-"
        pos = p.max_position
        if pos is None:
            return f"#{p.stats.max_abs_diff_index}"
        return pos if wide else (short_position(pos) or pos)

    def ulp(p: PairResult) -> str:
        s = p.stats
        return "-" if s is None else f"{fmt(s.ulp_max, 'd')}/{fmt(s.ulp_median, '.10g')}"

    columns = [
        *([_Column("step", "right", 0, _step_cell)] if len(d.steps) > 1 else []),
        _Column("layer", "right", 0, lambda p: "-" if p.key.layer is None else str(p.key.layer)),
        _Column("stage", "left", 0, lambda p: p.key.stage),
        _Column("cosine", "right", 1, _stat(".6f", "cosine_sim")),
        _Column("rel L2", "right", 1, _stat(".3g", "rel_l2")),
        _Column("max|d|", "right", 2, _stat(".3g", "max_abs_diff")),
        _Column("at", "left", 3, at),
        _Column("x input", "right", 4, _ratio_cell),
        _Column("SQNR dB", "right", 5, _stat(".1f", "sqnr_db")),
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
) -> None:
    """Table in forward order, then findings, the first divergence and the summary line.

    The default table drops its least important columns (rms, SQNR, x input, max|d| and its
    position) until it fits the console; ``wide`` shows every column, ULP distances and the
    full verdict reasons included.
    """
    columns = [c for c in _table_columns(d, wide, localization) if wide or not c.wide_only]
    cells = [[c.cell(p) for c in columns] for p in d.pairs]
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
    # Paths and file names are printed as Text: a '[' in them is not rich markup.
    console.print(Text(f"A (reference): {d.a.path}"), soft_wrap=True)
    console.print(Text(f"B (candidate): {d.b.path}"), soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for i in keep:
        c = columns[i]
        table.add_column(c.header, justify=c.justify, no_wrap=c.header != "verdict")  # type: ignore[arg-type]
    for i_pair, (p, row) in enumerate(zip(d.pairs, cells, strict=True)):
        style = "bold" if p is d.first_divergence else None
        # A rule between decode steps: the table groups by step.
        last_of_step = i_pair + 1 < len(d.pairs) and d.pairs[i_pair + 1].key.step != p.key.step
        table.add_row(*(row[i] for i in keep), style=style, end_section=last_of_step)
    console.print(table)  # the only hard-wrapped output
    if any(columns[i].header == "at" for i in keep) and not wide:
        console.print(Text(POSITION_LEGEND, style="dim"), soft_wrap=True)
    dropped = [columns[i].header for i in range(len(columns)) if i not in keep]
    if dropped:
        console.print(
            Text(
                f"(not shown for the terminal width: {', '.join(dropped)}; --wide shows all)",
                style="dim",
            ),
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
    amps = d.amplifiers(AMPLIFY_THRESHOLD)
    if amps:
        console.print(
            "[bold]Error amplifiers[/bold] (relative error vs the stage it consumes):",
            soft_wrap=True,
        )
        for p in amps:
            console.print(Text(f"  - {amplifier_sentence(p)}"), soft_wrap=True)
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
    style = "bold green" if overall_verdict(d) == "pass" else "bold red"
    console.print(Text(summary_line(d), style=style), soft_wrap=True)


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
        """(value, position) pairs for a colour bar: the ends and the tolerance mark."""
        values = [self.lo] + ([self.mid] if self.mid is not None else []) + [self.hi]
        return [(v, self.position(v) or 0.0) for v in values]


def color_scale(d: DirDiff, metric: str) -> ColorScale:
    """The heatmap's colour scale for ``metric``, anchored to the base tolerance when possible.

    cosine: 1 - cos-min at yellow, 1 (uncorrelated) red. rel-l2: the relative error a cosine
    of exactly cos-min implies for an error uncorrelated with A, sqrt(2 (1 - cos-min)), at
    yellow, 1 red. sqnr: the same bound in dB. attribution: the amplifier threshold (x2).
    max-abs and ulp-max have no tolerance-free bound and span the values present.
    """
    values = [metric_value(p, metric) for p in d.pairs]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    gap = 1.0 - d.base_tolerance.cos_min
    if metric in ("cosine", "rel-l2", "sqnr") and 0.0 < gap < 0.5:
        cos_text = f"cos-min {d.base_tolerance.cos_min:g}"
        if metric == "cosine":
            return ColorScale(gap * 1e-3, 1.0, gap, True, cos_text)
        rel = math.sqrt(2.0 * gap)
        if metric == "rel-l2":
            return ColorScale(rel * 1e-3, 1.0, rel, True, f"~{cos_text}")
        db = -20.0 * math.log10(rel)  # metric_value is -SQNR: larger is worse
        return ColorScale(-(db + 60.0), 0.0, -db, False, f"~{cos_text}")
    if metric == "attribution":
        return ColorScale(0.1, 100.0, AMPLIFY_THRESHOLD, True, f"x{AMPLIFY_THRESHOLD:g}")
    if metric == "sqnr":
        lo, hi = (min(finite), max(finite)) if finite else (-1.0, 0.0)
        return ColorScale(lo, hi, None, False)
    positive = [v for v in finite if v > 0]
    lo, hi = (min(positive), max(positive)) if positive else (0.1, 1.0)
    return ColorScale(lo, hi, None, True)


def _color(t: float | None) -> tuple[int, int, int]:
    if t is None:
        return (210, 210, 210)
    stops = [(0.0, (26, 135, 70)), (0.5, (250, 205, 60)), (1.0, (190, 30, 45))]
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
    return fmt(value, ".2g")


def _colorbar_svg(scale: ColorScale, metric: str, x: float, y: float, width: float) -> list[str]:
    """A horizontal gradient bar with the scale's end values and the tolerance mark."""
    stops = "".join(
        f'<stop offset="{t:.2f}" stop-color="rgb{_color(t)}"/>' for t in [i / 10 for i in range(11)]
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
        if scale.mid is not None and value == scale.mid:
            label = f"{label} ({scale.mid_label})" if scale.mid_label else label
        out.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{y}" y2="{y + 16}" stroke="#333"/>')
        out.append(
            f'<text x="{tx:.1f}" y="{y + 28}" text-anchor="{anchor}">{html.escape(label)}</text>'
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
    height = grid_bottom + 100
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
    out.extend(_colorbar_svg(scale, metric, 50, y, 300))
    legend = "x = out of tolerance"
    if scale.mid is not None:
        legend = f"yellow = at the tolerance, red = far outside; {legend}"
    out.append(f'<text x="4" y="{y + 50}">{html.escape(legend)}</text>')
    if first is not None:
        out.append(
            f'<rect x="4" y="{y + 60}" width="14" height="10" fill="none" stroke="black" '
            f'stroke-width="2.5"/><text x="24" y="{y + 69}">first divergence: '
            f"{html.escape(first.key.label)}</text>"
        )
    out.append("</svg>")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em;margin-bottom:.3em} .ok{color:#2e7d32} .bad{color:#c62828}
.meta{font-size:13px;color:#444} .meta td{border:none;text-align:left;padding:0 1em 0 0}
table{border-collapse:collapse;font-size:12px;margin-top:1em}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
td.l,th.l{text-align:left} tr.fail{background:#fdecea} tr.first{outline:3px solid #000}
tr.sel{background:#fff3c4} tr[data-i]{cursor:pointer}
#details{font-family:monospace;font-size:12px;background:#f7f7f7;padding:.7em;min-height:3em;
border:1px solid #ddd;max-width:70em;overflow:auto}
#details pre{margin:.3em 0} #details table{margin-top:.3em}
.cell{cursor:pointer} .cell.sel rect{stroke:#1565c0;stroke-width:3} .warn{color:#b26a00}
"""

_JS = """
const data = JSON.parse(document.getElementById('diff-data').textContent);
const num = function(x, d){ if (x === null || x === undefined) return '-';
  if (typeof x !== 'number') return String(x);
  if (Number.isInteger(x)) return String(x);
  return Number(x.toPrecision(d || 4)).toString(); };
const esc = function(s){ return String(s).replace(/[&<>"]/g, function(c){
  return {'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]; }); };
function render(i){
  const p = data.pairs[i];
  const first = data.first_divergence && data.first_divergence.path === p.path;
  const t = p.tolerance;
  const lines = [];
  lines.push('<b>' + esc(p.path) + '</b>  ' + esc(p.verdict.toUpperCase()) + ': ' +
    esc(p.reason || '') + (first ? '  <b>&#9664; first divergence</b>' : ''));
  lines.push('shape ' + esc((p.shape || []).join('x') || '?') + ', ' + num(p.dim_product) +
    ' values; tolerance atol ' + num(t.atol) + ', rtol ' + num(t.rtol) + ', cos-min ' +
    num(t.cos_min, 6));
  lines.push('max|d| ' + num(p.max_abs_diff) + ' at ' + esc(p.max_abs_diff_position ||
    ('index ' + p.max_abs_diff_index)) + ' (max|a| ' + num(p.max_abs_a) + ')');
  lines.push('cosine ' + num(p.cosine_sim, 7) + ', rel L2 ' + num(p.rel_l2) + ', SQNR ' +
    num(p.sqnr_db, 3) + ' dB, rms ' + num(p.rms_diff));
  lines.push('ULP max ' + num(p.ulp_max) + ', median ' + num(p.ulp_median, 10) +
    '; NaN A/B ' + num(p.nan_a) + '/' + num(p.nan_b) + ', Inf A/B ' + num(p.inf_a) + '/' +
    num(p.inf_b));
  if (p.predecessor) lines.push('x input ' + (p.attribution_source ? 'inf (input identical)' :
    num(p.attribution, 3)) + ' vs ' + esc(p.predecessor));
  if (p.lm_head) { const h = p.lm_head;
    lines.push('lm_head: top-1 ' + (h.top1_agree ? 'agrees' : 'DIFFERS') + ' (A ' + h.top1_a +
      ', B ' + h.top1_b + '), top-5 overlap ' + h.top5_overlap + '/5, KL(A||B) ' +
      num(h.kl_divergence)); }
  let html = '<pre>' + lines.join('\\n') + '</pre>';
  if (p.top_diffs.length) {
    html += '<table><tr><th>index</th><th>a</th><th>b</th><th>|a-b|</th></tr>' +
      p.top_diffs.map(function(r){ return '<tr><td>' + r.index + '</td><td>' + num(r.a, 7) +
        '</td><td>' + num(r.b, 7) + '</td><td>' + num(r.abs_diff) + '</td></tr>'; }).join('') +
      '</table>';
  }
  html += '<details><summary>JSON of this pair</summary><pre>' +
    esc(JSON.stringify(p, null, 1)) + '</pre></details>';
  document.getElementById('details').innerHTML = html;
  document.querySelectorAll('.sel').forEach(function(el){ el.classList.remove('sel'); });
  document.querySelectorAll('[data-i="' + i + '"]').forEach(function(el){
    el.classList.add('sel'); });
}
let pinned = null;
document.querySelectorAll('[data-i]').forEach(function(el){
  const i = +el.dataset.i;
  el.addEventListener('click', function(){ pinned = i; render(i); });
  if (el.classList.contains('cell')) {
    el.addEventListener('mouseenter', function(){ render(i); });
    el.addEventListener('mouseleave', function(){ if (pinned !== null) render(pinned); });
  }
});
// Start on the first divergence, else on the pair with the largest relative error.
let start = data.pairs.findIndex(function(p){
  return data.first_divergence && p.path === data.first_divergence.path; });
if (start < 0) { data.pairs.forEach(function(p, i){
  if (p.rel_l2 !== null && (start < 0 || p.rel_l2 > data.pairs[start].rel_l2)) start = i; }); }
if (start >= 0) { pinned = start; render(start); }
"""


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
        f"<style>{_CSS}</style></head><body>",
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
            ("" if p.key.step == 0 else f"step {p.key.step} ")
            + ("-" if p.key.layer is None else str(p.key.layer)),
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
    parts.append(f"<script>{_JS}</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


def heatmap_png(d: DirDiff, metric: str = "rel-l2", cell: int = 16) -> bytes:
    """The heatmap as a label-free PNG (stdlib only): rows = layers, columns = stages."""
    rows, stages, cells = _grid(d)
    values = [metric_value(p, metric) for p in d.pairs]
    scale = color_scale(d, metric).position
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
