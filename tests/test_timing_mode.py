"""`trace --no-stats`: a run that captures nothing, for timing the forward pass alone."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from aprtrace.arch import ops
from aprtrace.cli import main
from aprtrace.formats import load_model
from aprtrace.trace import run_trace

TOKENS = [1, 9690, 28, 2, 17]


def test_timing_only_captures_nothing_and_gives_the_same_logits(smollm2_path, monkeypatch):
    model = load_model(smollm2_path)
    full = run_trace(model, TOKENS, None, collect_stats=True)
    maps = []
    real = ops.attention_scores
    monkeypatch.setattr(ops, "attention_scores", lambda *a: maps.append(1) or real(*a))
    timed = run_trace(model, TOKENS, None, collect_stats=False, timing_only=True)
    assert timed.stats == [] and timed.first_nonfinite is None and maps == []
    np.testing.assert_allclose(timed.logits, full.logits, rtol=0, atol=1e-4)
    assert int(np.argmax(timed.logits)) == int(np.argmax(full.logits))


def test_cli_no_stats_prints_the_forward_time_and_the_next_token(smollm2_path):
    tokens = ",".join(map(str, TOKENS))
    args = ["trace", "--no-stats", "--tokens", tokens, str(smollm2_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "Forward pass in" in result.output and "Per-stage statistics" not in result.output
    assert "Next token (argmax):" in result.output
    as_json = CliRunner().invoke(
        main, ["trace", "--no-stats", "--json", "--tokens", tokens, str(smollm2_path)]
    )
    assert as_json.exit_code == 0 and json.loads(as_json.output)["stats"] == []


def test_no_stats_with_save_tensor_is_a_usage_error(smollm2_path, tmp_path):
    result = CliRunner().invoke(
        main,
        ["trace", "--no-stats", "--save-tensor", "lm_head", "--save-tensor-dir", str(tmp_path),
         str(smollm2_path)],
    )  # fmt: skip
    assert result.exit_code == 2 and "--no-stats" in result.output
    assert not any(tmp_path.iterdir())
