"""Render diffs: pure functions from structured results (aprtrace.diff) to text.

``json`` (apr-stage-diff-v1, aprtrace-diff-v1), ``table`` (terminal), ``heatmap`` (SVG, PNG),
``html`` (one self-contained page; CSS/JS are package data), ``text`` (shared sentences).
No renderer parses a string another produced, and none re-runs the analysis.
"""

from __future__ import annotations

from aprtrace.report.heatmap import (  # noqa: F401
    HEATMAP_METRICS,
    ColorScale,
    color_scale,
    heatmap_png,
    heatmap_svg,
    metric_value,
)
from aprtrace.report.html import (  # noqa: F401
    html_report,
)
from aprtrace.report.json import (  # noqa: F401
    DIR_SCHEMA,
    FILE_PAIR_SCHEMA,
    dir_json,
    file_pair_json,
    file_pair_json_text,
    local_json,
    localization_json,
    pair_json,
    serde_float,
    to_json_text,
)
from aprtrace.report.table import (  # noqa: F401
    file_pair_text,
    render_dir_table,
)
from aprtrace.report.text import (  # noqa: F401
    AMPLIFY_THRESHOLD,
    POSITION_LEGEND,
    _localized,  # noqa: F401
    adder_sentence,
    amplifier_sentence,
    cosine_gap,
    finite_or_none,
    first_divergence_line,
    fmt,
    fmt_sci,
    localization_lines,
    localization_sentence,
    overall_verdict,
    ratio_text,
    short_reason,
    summary_line,
    token_disagreement_line,
)
