"""End to end: trace one tiny model as F32 and as Q8_0 GGUF, diff the dumps, and check the
first divergence against one derived here independently (raw bytes, own cosine, own order)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from aprtrace.cli import main

# Forward order written out by hand (FORMATS.md section 2), not taken from aprtrace.stages.
PER_LAYER = [
    "embedding", "attn_norm", "qkv_matmul", "qkv_bias", "q_post_rope", "k_post_rope",
    "attn_scores", "attn_softmax", "attention", "attn_out", "post_attn_residual", "ffn_norm",
    "ffn_gate", "ffn_up", "ffn_silu", "ffn_swigl", "ffn_out", "post_ffn_residual",
]  # fmt: skip
WHOLE = ["final_norm", "lm_head"]


def _values(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    assert raw[:4] == b"APRT"
    n = int.from_bytes(raw[8:12], "little")
    return np.frombuffer(raw, dtype="<f4", count=n, offset=12).astype(np.float64)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / math.sqrt(np.dot(a, a) * np.dot(b, b)))


@pytest.fixture(scope="module")
def dumps(tmp_path_factory) -> tuple[Path, Path]:
    from aprtrace.demo import write_demo_models

    root = tmp_path_factory.mktemp("e2e")
    f32, q8 = write_demo_models(root / "models", "Q8_0")
    out = []
    for model, name in ((f32, "f32"), (q8, "q8")):
        target = root / name
        r = CliRunner().invoke(
            main,
            ["trace", str(model), "--save-tensor", "all", "--save-tensor-layers", "all",
             "--save-tensor-dir", str(target)],
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        assert (target / "manifest.json").exists()
        out.append(target)
    return out[0], out[1]


@pytest.mark.slow
def test_first_divergence_matches_independent_derivation(dumps):
    a, b = dumps
    layers = sorted(int(p.name.split("-")[1]) for p in a.glob("layer-*"))
    order = [f"layer-{n}/{s}.bin" for n in layers for s in PER_LAYER]
    order = [rel for rel in order if (a / rel).exists()] + [f"{s}.bin" for s in WHOLE]
    cosines = {rel: _cosine(_values(a / rel), _values(b / rel)) for rel in order}
    # A threshold between the observed cosines: some pairs pass, some fail.
    ranked = sorted(cosines.values())
    mid = len(ranked) // 2
    cos_min = (ranked[mid - 1] + ranked[mid]) / 2
    expected = next(rel for rel in order if cosines[rel] < cos_min)
    assert expected != order[0]  # the check is not trivially the first file

    r = CliRunner().invoke(
        main,
        ["diff", "--values", "--json", str(a), str(b), "--cos-min", repr(cos_min),
         "--atol", "0", "--rtol", "1000"],
    )  # fmt: skip
    assert r.exit_code == 1, r.output
    doc = json.loads(r.stdout)
    assert doc["first_divergence"]["path"] == expected
    assert [p["path"] for p in doc["pairs"]] == order
    assert doc["summary"]["failed"] == sum(c < cos_min for c in cosines.values())
    assert doc["manifest_a"]["token_ids"] == doc["manifest_b"]["token_ids"]
    text = CliRunner().invoke(
        main, ["diff", "--values", str(a), str(b), "--cos-min", repr(cos_min), "--rtol", "1000"]
    )
    layer, stage = expected.removesuffix(".bin").split("/")
    assert f"first divergence: layer {layer.split('-')[1]} {stage}" in text.output


@pytest.mark.slow
def test_q8_noise_passes_default_tolerances(dumps):
    """Q8_0 quantization noise is within aprender's 0.999 cosine practice at every stage."""
    a, b = dumps
    r = CliRunner().invoke(main, ["diff", "--values", str(a), str(b)])
    assert r.exit_code == 0, r.output
    assert "OK: all" in r.output
