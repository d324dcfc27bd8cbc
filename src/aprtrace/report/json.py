"""JSON renderers: apr's ``apr-stage-diff-v1`` (byte for byte as serde_json) and
``aprtrace-diff-v1`` for dumps (keys in docs/diff-json.md)."""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Any

from aprtrace import __version__
from aprtrace.diff import DirDiff, FilePairResult, PairResult, layer_label
from aprtrace.report.text import (
    _localized,
    _verdict_word,
    finite_or_none,
    overall_verdict,
)

if TYPE_CHECKING:
    from aprtrace.localize import Localization

FILE_PAIR_SCHEMA = "apr-stage-diff-v1"


DIR_SCHEMA = "aprtrace-diff-v1"


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


def _coords(pos) -> dict[str, int] | None:
    return None if pos is None else {name or f"dim{i}": v for i, (name, v) in enumerate(pos.coords)}


def _top_logits(top: list[tuple[int, float]], texts) -> list[dict[str, Any]]:
    return [
        {"id": i, "logit": finite_or_none(v), "text": texts.text(i) if texts else None}
        for i, v in top
    ]


def pair_json(
    p: PairResult, localization: Localization | None = None, texts=None
) -> dict[str, Any]:
    s = p.stats
    out: dict[str, Any] = {
        "path": p.key.rel,
        "step": p.key.step,
        "stage": p.key.stage,
        "layer": p.key.layer if p.key.layer is not None else "whole-model",
        "verdict": _verdict_word(p),
        "reason": p.error or p.unreadable or p.reason,
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
    out["max_abs_diff_coords"] = _coords(p.max_coords)
    out["attribution"] = finite_or_none(p.attribution)
    out["attribution_source"] = p.attribution is not None and math.isinf(p.attribution)
    out["predecessor"] = p.predecessor
    out["input_note"] = p.input_note
    out["lm_head"] = (
        None
        if p.lm_head is None
        else {
            "top1_a": p.lm_head.top1_a,
            "top1_b": p.lm_head.top1_b,
            "top1_agree": p.lm_head.top1_agree,
            "top5_overlap": p.lm_head.top5_overlap,
            "kl_divergence": finite_or_none(p.lm_head.kl_divergence),
            "top_a": _top_logits(p.lm_head.top_a, texts),
            "top_b": _top_logits(p.lm_head.top_b, texts),
        }
    )
    out["index_agreement"] = p.index.to_json() if p.index is not None else None
    out["top_diffs"] = [
        {
            "index": t.index,
            "a": finite_or_none(t.a),
            "b": finite_or_none(t.b),
            "abs_diff": finite_or_none(t.abs_diff),
            "coords": _coords(p.coords_of(t.index)),
        }
        for t in (s.top_diffs if s else [])
    ]
    out["norm_a"] = finite_or_none(s.norm_a) if s else None
    out["norm_b"] = finite_or_none(s.norm_b) if s else None
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


def _token_disagreement_json(d: DirDiff) -> dict[str, Any] | None:
    p = d.first_token_disagreement
    if p is None or p.lm_head is None:
        return None
    return {"step": p.key.step, "path": p.key.rel, "a": p.lm_head.top1_a, "b": p.lm_head.top1_b}


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
            "unreadable": len(d.unreadable),
            "stopped_early": d.stopped_early,
            "exit_code": d.verdict.exit_code,
            "incomplete": list(d.verdict.problems),
        },
        "stale_a": list(d.a.stale),
        "stale_b": list(d.b.stale),
        "missing_a": list(d.a.missing),
        "missing_b": list(d.b.missing),
        "unreadable_a": list(d.a.unreadable),
        "unreadable_b": list(d.b.unreadable),
        "first_divergence": _ref(d.first_divergence),
        "first_token_disagreement": _token_disagreement_json(d),
        "amplifiers": [
            {
                **_ref(p),  # type: ignore[dict-item]
                "ratio": finite_or_none(p.attribution),
                "source": math.isinf(p.attribution or 0.0),
                "predecessor": p.predecessor,
            }
            for p in d.amplifying
        ],
        "token_texts": d.token_texts.prompt if d.token_texts is not None else None,
        "pairs": [pair_json(p, localization, d.token_texts) for p in d.pairs],
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
