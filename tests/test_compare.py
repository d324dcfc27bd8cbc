"""``aprtrace compare``: two traces on the same token ids, then diff (exit code is diff's)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from aprtrace.aprt import read_aprt
from aprtrace.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_compare_f32_with_q8_passes_then_fails_a_strict_bound(tiny_gguf_pair, tmp_path):
    f32, q8 = tiny_gguf_pair
    ok = run("compare", str(f32), str(q8), "--dir", str(tmp_path), "--json")
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.output[ok.output.index("{") :])
    assert doc["schema"] == "aprtrace-diff-v1"
    a = tmp_path / "A-demo-f32-numpy"
    b = tmp_path / "B-demo-q8_0-numpy"
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (a, b)]
    assert manifests[0]["token_ids"] == manifests[1]["token_ids"]
    # the diff really compared these dumps: recompute one cosine by hand
    x = read_aprt(a / "layer-0" / "ffn_out.bin").values.astype(np.float64)
    y = read_aprt(b / "layer-0" / "ffn_out.bin").values.astype(np.float64)
    cos = float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
    pair = next(p for p in doc["pairs"] if p["path"] == "layer-0/ffn_out.bin")
    assert pair["cosine_sim"] == pytest.approx(cos, rel=1e-9)

    strict = run("compare", str(f32), str(q8), "--dir", str(tmp_path), "--cos-min", "0.999999")
    assert strict.exit_code == 1, strict.output
    assert "first divergence" in strict.output


def test_compare_same_model_same_engine_is_refused(tiny_gguf, tmp_path):
    result = run("compare", str(tiny_gguf), str(tiny_gguf), "--dir", str(tmp_path))
    assert result.exit_code == 5
    assert "same model on the same engine" in result.output


def test_compare_uses_the_given_tokens_on_both_sides(tiny_gguf_pair, tmp_path):
    f32, q8 = tiny_gguf_pair
    result = run(
        "compare",
        str(f32),
        str(q8),
        "--dir",
        str(tmp_path),
        "--tokens",
        "5,6,7",
        "--save-tensor",
        "lm_head",
    )
    assert result.exit_code in (0, 1), result.output
    for d in ("A-demo-f32-numpy", "B-demo-q8_0-numpy"):
        assert json.loads((tmp_path / d / "manifest.json").read_text())["token_ids"] == [5, 6, 7]


@pytest.mark.reference
def test_compare_one_model_numpy_against_transformers(tiny_gguf, tmp_path):
    result = run("compare", str(tiny_gguf), "--dir", str(tmp_path), "--json", "--limit", "1")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output[result.output.index("{") :])
    assert len(doc["pairs"]) == 1 + 17 * 4 + 2
    assert (tmp_path / "B-demo-f32-transformers" / "manifest.json").exists()
    engine = json.loads((tmp_path / "B-demo-f32-transformers" / "manifest.json").read_text())
    assert engine["engine"] == "transformers"
    # independent implementations on the same weights agree far inside the default bound
    assert min(p["cosine_sim"] for p in doc["pairs"]) > 0.99999


def test_diff_stage_and_layer_filters(tiny_gguf_pair, tmp_path):
    f32, q8 = tiny_gguf_pair
    run("compare", str(f32), str(q8), "--dir", str(tmp_path), "--save-tensor-layers", "0")
    a, b = tmp_path / "A-demo-f32-numpy", tmp_path / "B-demo-q8_0-numpy"
    result = run("diff", "--values", str(a), str(b), "--json", "--stages", "ffn_out,LM_HEAD")
    doc = json.loads(result.output)
    assert [p["path"] for p in doc["pairs"]] == ["layer-0/ffn_out.bin", "lm_head.bin"]
    result = run("diff", "--values", str(a), str(b), "--json", "--layers", "1..4")
    # only whole-model stages remain: layer 0 is filtered out, layers 1..3 were not traced
    assert [p["path"] for p in json.loads(result.output)["pairs"]] == [
        "final_norm.bin",
        "lm_head.bin",
    ]
    bad = run("diff", "--values", str(a), str(b), "--stages", "ffn_outt")
    assert bad.exit_code == 5 and "ffn_outt" in bad.output
    pair = run(
        "diff", "--values", str(a / "lm_head.bin"), str(b / "lm_head.bin"), "--stages", "lm_head"
    )
    assert pair.exit_code == 5
