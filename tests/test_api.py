"""The library API exposed at the package top level."""

from __future__ import annotations

import numpy as np
import pytest

import aprtrace
from aprtrace.trace import encode_prompt


def test_every_public_name_resolves():
    for name in aprtrace.__all__:
        assert getattr(aprtrace, name) is not None, name
    with pytest.raises(AttributeError):
        aprtrace.no_such_thing  # noqa: B018


def test_capture_holds_what_trace_writes(tiny_gguf, tmp_path):
    model = aprtrace.load_model(tiny_gguf)
    stages = aprtrace.capture_stages(model, "What is 2+2?")
    ids = encode_prompt(model, "What is 2+2?", False)
    assert aprtrace.capture_stages(model, ids).keys() == stages.keys()
    plan = aprtrace.make_plan("all", "all", tmp_path / "d", tiny_gguf)
    aprtrace.run_trace(model, ids, plan)
    for (stage, layer), values in stages.items():
        rel = f"layer-{layer}/{stage}.bin" if layer is not None else f"{stage}.bin"
        on_disk = aprtrace.read_aprt(tmp_path / "d" / rel)
        assert np.array_equal(on_disk.values, values.reshape(-1)), rel
    assert stages[("lm_head", None)].shape == (model.config.vocab_size,)
    assert stages[("attn_scores", 0)].shape == (model.config.num_heads, len(ids), len(ids))
