"""File-pair mode: ``apr diff --values A.bin B.bin``, apr's checks and statistics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aprtrace.aprt import AprtFile, read_aprt
from aprtrace.diff.metrics import PairStats, compare_arrays
from aprtrace.errors import (
    InvalidFormatError,
    ValidationError,
)
from aprtrace.stages import (
    WHOLE_MODEL_LAYER,
)


def layer_label(layer: int) -> int | str:
    return "whole-model" if layer == WHOLE_MODEL_LAYER else layer


def check_comparable(fa: AprtFile, fb: AprtFile) -> None:
    """apr's checks: element counts and header layers must match (else exit 5)."""
    # The messages are apr's text (diff_05_aprt_stage.rs), raw u32 layers included.
    if fa.values.size != fb.values.size:
        raise ValidationError(
            f"APRT dim_product mismatch: {fa.path} has {fa.values.size} f32s, "
            f"{fb.path} has {fb.values.size} f32s — cannot compare stage tensors of different "
            "sizes",
            hint="compare files of the same stage traced on the same prompt and model shape",
        )
    if fa.layer != fb.layer:
        raise ValidationError(
            f"APRT layer mismatch: {fa.path} is layer {fa.layer}, {fb.path} is layer "
            f"{fb.layer} — stages from different layers cannot be compared element-wise",
            hint="compare the same stage at the same layer",
        )


def _read_pair_file(path: Path) -> AprtFile:
    try:
        return read_aprt(path)
    except InvalidFormatError as exc:
        try:
            with open(path, "rb") as f:
                is_aprt = f.read(4) == b"APRT"
        except OSError:
            is_aprt = False
        if not is_aprt:
            raise
        raise ValidationError(f"Cannot read APRT stage tensor {exc.message}", exc.hint) from exc


@dataclass
class FilePairResult:
    path_a: Path
    path_b: Path
    layer: int
    stats: PairStats
    # Directory-mode statistics of the same pair (for the verdict), when asked for.
    extended: PairStats | None = None


def diff_files(
    path_a: Path, path_b: Path, limit: int = 10, extended: bool = False
) -> FilePairResult:
    """``apr diff --values A B``: apr's checks and statistics for one pair of APRT files.

    As apr: an APRT file that cannot be read is a validation failure (exit 5), and at least
    one top difference is listed even with ``limit=0``. ``extended`` also computes the
    directory-mode statistics (NaN/Inf counted apart) from the same reads, for a verdict.
    """
    fa, fb = _read_pair_file(Path(path_a)), _read_pair_file(Path(path_b))
    check_comparable(fa, fb)
    stats = compare_arrays(fa.values, fb.values, limit=max(limit, 1), extended=False)
    more = compare_arrays(fa.values, fb.values, limit=0, extended=True) if extended else None
    return FilePairResult(Path(path_a), Path(path_b), fa.layer, stats, more)
