"""Compare APRT stage tensors: one file pair (``apr diff --values``) or two whole dumps.

Data flow: two dumps --> pair files by relative path --> per-pair metrics (streamed in chunks
through memory maps) --> verdict per pair --> first divergence and error attribution.

Conventions (documented for users in ``aprtrace diff --help`` and docs/diff-json.md):

- ``d = |a - b|`` in f32. **A is the reference**, B the candidate: relative error, SQNR and the
  ``rtol`` bound are measured against A.
- File-pair statistics follow apr exactly (NaN propagates into the f32 RMS; the cosine is 0.0
  unless both norms are > 0, so a NaN norm gives 0.0). Directory mode
  computes every statistic over the positions where both values are finite and reports
  NaN/Inf separately (counts per side and positions where the classes differ), so one shared
  NaN does not hide the rest of the tensor.
- Verdict: ``pass = no NaN/Inf mismatch and (max|d| <= atol or (cosine >= cos_min and
  max|d| <= atol + rtol * max|a|))``.

Modules: ``layout`` (dump discovery, pairing, shapes, positions, same-run check),
``metrics`` (streaming statistics), ``tolerance`` (the pass rule), ``results`` (PairResult,
DirDiff, Verdict), ``attribution`` (from the stage graph), ``dirs`` (directory mode, first
divergence), ``files`` (apr's file-pair mode).
"""

from __future__ import annotations

from aprtrace.diff.attribution import (  # noqa: F401
    attribute,
)
from aprtrace.diff.dirs import (  # noqa: F401
    compare_pair,
    diff_dirs,
)
from aprtrace.diff.files import (  # noqa: F401
    FilePairResult,
    check_comparable,
    diff_files,
    layer_label,
)
from aprtrace.diff.layout import (  # noqa: F401
    POSITION_SHORT_NAMES,
    SHAPE_KEYS,
    DumpInfo,
    PairKey,
    Position,
    check_same_run,
    config_difference,
    decode_position,
    dump_warnings,
    infer_shape,
    key_for,
    list_stage_files,
    load_dump,
    position_of,
    scan_dump,
)
from aprtrace.diff.metrics import (  # noqa: F401
    CHUNK,
    MAX_LIMIT,
    ULP_EXACT_MAX,
    LmHeadStats,
    PairStats,
    TopDiff,
    compare_arrays,
    lm_head_stats,
    ulp_distance,
)
from aprtrace.diff.results import (  # noqa: F401
    EXIT_INCOMPLETE,
    NOISE_REL_L2,
    DirDiff,
    PairResult,
    Verdict,
)
from aprtrace.diff.tokens import TokenTexts, token_texts  # noqa: F401
from aprtrace.diff.tolerance import (  # noqa: F401
    DEFAULT_TOLERANCE,
    Tolerance,
    TolOverride,
    check_tol_pattern,
    check_tolerance_value,
    parse_tol_override,
    tolerance_for,
    unmatched_tol_warnings,
    verdict,
)
