"""aprtrace.diff: metrics against hand-computed values, pairing, verdicts, attribution, CLI."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from aprtrace.aprt import write_aprt
from aprtrace.cli_diff import diff_command
from aprtrace.diff import (
    Tolerance,
    compare_arrays,
    decode_position,
    diff_dirs,
    diff_files,
    infer_shape,
    key_for,
    lm_head_stats,
    parse_tol_override,
    tolerance_for,
    ulp_distance,
    verdict,
)
from aprtrace.errors import InvalidFormatError, NotFoundError, ValidationError
from aprtrace.manifest import Manifest, write_manifest
from aprtrace.stages import WHOLE_MODEL_LAYER

F32 = np.float32
DEN_MIN = struct.unpack("<f", struct.pack("<I", 1))[0]  # smallest positive subnormal
NEG_DEN_MIN = struct.unpack("<f", struct.pack("<I", 0x80000001))[0]


def f32(*xs: float) -> np.ndarray:
    return np.array(xs, dtype=F32)


def ulp_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Independent ULP distance: signed-magnitude bits -> integer line, in Python ints."""

    def key(x: float) -> int:
        bits = struct.unpack("<I", struct.pack("<f", x))[0]
        return -(bits & 0x7FFFFFFF) if bits >> 31 else bits

    return np.array([abs(key(float(x)) - key(float(y))) for x, y in zip(a, b, strict=True)])


# ----------------------------------------------------------------------------- ULP


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [
        (1.0, float(np.nextafter(F32(1), F32(2))), 1),
        (-0.0, 0.0, 0),
        (DEN_MIN, NEG_DEN_MIN, 2),  # across the sign boundary, through the single zero
        (NEG_DEN_MIN, 0.0, 1),
        (NEG_DEN_MIN, -0.0, 1),
        (1.0, -1.0, 2 * 0x3F800000),
        (float(np.finfo(F32).max), math.inf, 1),
        (-2.0, -1.0, 0x40000000 - 0x3F800000),
        (float(-np.finfo(F32).max), float(np.finfo(F32).max), 2 * 0x7F7FFFFF),
    ],
)
def test_ulp_distance_hand_values(x, y, expected):
    assert int(ulp_distance(f32(x), f32(y))[0]) == expected
    assert int(ulp_distance(f32(y), f32(x))[0]) == expected


def test_ulp_distance_matches_reference_on_random_bits():
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 1 << 32, size=(2, 4000), dtype=np.uint64).astype(np.uint32)
    a, b = bits[0].view(F32), bits[1].view(F32)
    finite = np.isfinite(a) & np.isfinite(b)
    a, b = a[finite], b[finite]
    np.testing.assert_array_equal(ulp_distance(a, b).astype(np.int64), ulp_reference(a, b))


# ----------------------------------------------------------------------------- apr statistics


def test_apr_metrics_hand_computed():
    s = compare_arrays(f32(1, 2, 3, 4), f32(1, 2.5, 3, 3), limit=10, extended=False)
    assert s.count == 4
    assert s.max_abs_diff == 1.0 and s.max_abs_diff_index == 3
    # apr keeps rms_diff as f32 (diff_05_aprt_stage.rs)
    assert s.rms_diff == float(np.float32(math.sqrt((0.25 + 1.0) / 4)))
    assert s.cosine_sim == pytest.approx(27 / math.sqrt(30 * 25.25), rel=1e-15)
    # top list: by |d| descending, lower index first among ties
    assert [(t.index, t.abs_diff) for t in s.top_diffs] == [(3, 1.0), (1, 0.5), (0, 0.0), (2, 0.0)]
    assert (s.top_diffs[1].a, s.top_diffs[1].b) == (2.0, 2.5)


def test_max_first_index_wins_ties_across_chunks():
    a, b = f32(0, 5, 0, 5), f32(0, 0, 0, 0)
    for chunk in (1, 2, 3, 100):
        s = compare_arrays(a, b, limit=1, extended=False, chunk=chunk)
        assert (s.max_abs_diff, s.max_abs_diff_index) == (5.0, 1)
        assert [t.index for t in s.top_diffs] == [1]


def test_nan_never_wins_and_propagates_in_apr_mode():
    s = compare_arrays(f32(math.nan, 1, 0), f32(0, 0, 1), limit=3, extended=False)
    assert (s.max_abs_diff, s.max_abs_diff_index) == (1.0, 1)
    # NaN propagates into the RMS; apr's cosine is 0.0 unless both norms are > 0 (NaN is not)
    assert math.isnan(s.rms_diff) and s.cosine_sim == 0.0
    assert [t.index for t in s.top_diffs] == [1, 2, 0]  # NaN ranks below every number
    # a zero norm gives cosine 0.0 even when the other side holds NaN (apr's rule)
    assert compare_arrays(f32(math.nan, 1), f32(0, 0), extended=False).cosine_sim == 0.0
    s = compare_arrays(f32(math.nan, math.nan), f32(1, 2), extended=False)
    assert (s.max_abs_diff, s.max_abs_diff_index) == (0.0, 0)


def test_zero_vectors_cosine_is_zero_as_apr_but_verdict_passes():
    s = compare_arrays(f32(0, 0, 0), f32(0, 0, 0), extended=True)
    assert s.cosine_sim == 0.0 and s.rms_diff == 0.0 and s.max_abs_diff == 0.0
    assert s.rel_l2 == 0.0 and s.sqnr_db == math.inf and s.ulp_max == 0
    assert verdict(s, Tolerance())[0] is True
    one_zero = compare_arrays(f32(0, 0), f32(1, 1), extended=True)
    assert one_zero.cosine_sim == 0.0 and one_zero.rel_l2 == math.inf
    assert verdict(one_zero, Tolerance())[0] is False


def test_identical_inputs():
    x = np.linspace(-3, 3, 101, dtype=F32)
    s = compare_arrays(x, x.copy(), extended=True)
    assert s.max_abs_diff == 0.0 and s.rms_diff == 0.0
    assert s.cosine_sim == pytest.approx(1.0, abs=1e-15)
    assert s.rel_l2 == 0.0 and s.sqnr_db == math.inf
    assert s.ulp_max == 0 and s.ulp_median == 0.0
    assert verdict(s, Tolerance(atol=0.0))[0] is True


def test_negative_zero_equals_zero():
    s = compare_arrays(f32(-0.0, 0.0), f32(0.0, -0.0), extended=True)
    assert s.max_abs_diff == 0.0 and s.ulp_max == 0


def test_denormals_accumulate_in_f64():
    # In f32, DEN_MIN**2 underflows to 0; f64 keeps it, so RMS and cosine are exact.
    s = compare_arrays(f32(DEN_MIN), f32(2 * DEN_MIN), extended=True)
    assert s.max_abs_diff == DEN_MIN
    assert s.rms_diff == pytest.approx(DEN_MIN, rel=1e-12)
    assert s.cosine_sim == pytest.approx(1.0, rel=1e-12)
    assert s.rel_l2 == pytest.approx(1.0, rel=1e-12)
    assert s.ulp_max == 1


def test_inf_handling_apr_and_directory_mode():
    a, b = f32(math.inf, 1, 2), f32(math.inf, 1, 3)
    apr = compare_arrays(a, b, extended=False)
    # inf - inf = NaN never wins; NaN propagates into RMS and cosine as in apr
    assert (apr.max_abs_diff, apr.max_abs_diff_index) == (1.0, 2)
    assert math.isnan(apr.rms_diff)
    ext = compare_arrays(a, b, extended=True)
    assert (ext.inf_a, ext.inf_b, ext.nonfinite_mismatch) == (1, 1, 0)
    assert ext.rms_diff == pytest.approx(math.sqrt(1 / 3))
    assert ext.cosine_sim == pytest.approx(7 / math.sqrt(5 * 10))
    mismatch = compare_arrays(f32(math.inf, math.nan, 1), f32(-math.inf, math.nan, 1))
    assert (mismatch.nan_a, mismatch.nan_b, mismatch.nonfinite_mismatch) == (1, 1, 1)
    ok, reason = verdict(mismatch, Tolerance())
    assert not ok and "NaN/Inf" in reason


def test_relative_error_and_sqnr_hand_computed():
    s = compare_arrays(f32(3, 4), f32(3, 5), extended=True)
    assert s.rel_l2 == pytest.approx(0.2)  # ||d|| = 1, ||a|| = 5
    assert s.sqnr_db == pytest.approx(10 * math.log10(25.0))
    assert s.max_abs_a == 4.0


def test_streaming_matches_numpy_reference():
    rng = np.random.default_rng(11)
    a = rng.standard_normal(10_007).astype(F32)
    b = (a + F32(1e-2) * rng.standard_normal(a.size)).astype(F32)
    b[[5, 9000]] = a[[5, 9000]] + F32(7)  # a tie for the largest difference
    d = np.abs(a - b)
    a64, b64, d64 = (x.astype(np.float64) for x in (a, b, d))
    ref_ulp = ulp_reference(a, b)
    order = sorted(range(a.size), key=lambda i: (-d[i], i))[:7]
    for chunk in (997, 4096, 1 << 22):
        for exact_max in (0, 1 << 24):  # histogram + second pass, and exact selection
            s = compare_arrays(a, b, limit=7, chunk=chunk, ulp_exact_max=exact_max)
            assert s.max_abs_diff_index == int(np.argmax(d))
            assert s.rms_diff == pytest.approx(math.sqrt(np.mean(d64 * d64)), rel=1e-12)
            cos = float(a64 @ b64 / math.sqrt(float(a64 @ a64) * float(b64 @ b64)))
            assert s.cosine_sim == pytest.approx(cos, rel=1e-12)
            assert [t.index for t in s.top_diffs] == order
            assert s.ulp_max == int(ref_ulp.max())
            assert s.ulp_median == float(np.median(ref_ulp))


@pytest.mark.parametrize("n", [1, 2, 9, 10])
def test_ulp_median_two_pass_even_and_odd_counts_across_buckets(n):
    # Distances spread over several 65536-wide buckets, so the second pass is needed.
    a = np.ones(n, dtype=F32)
    steps = np.array([3, 70_000, 200_000, 5, 1 << 20, 131_072, 0, 9, 65_536, 65_535][:n])
    b = (a.view(np.uint32) + steps.astype(np.uint32)).view(F32)
    for exact_max in (0, 1 << 24):
        s = compare_arrays(a, b, chunk=3, ulp_exact_max=exact_max)
        assert s.ulp_median == float(np.median(steps))
        assert s.ulp_max == int(steps.max())


# ----------------------------------------------------------------------------- lm_head


def test_lm_head_stats_hand_computed():
    a, b = f32(1, 2, 3, 0, 0, 0), f32(3, 2, 1, 0, 0, 0.5)
    h = lm_head_stats(a, b)
    assert (h.top1_a, h.top1_b, h.top1_agree) == (2, 0, False)
    assert h.top5_overlap == 4  # A: 2,1,0,3,4 (ties: lower id first)  B: 0,1,2,5,3
    za = [math.exp(x) for x in (1, 2, 3, 0, 0, 0)]
    zb = [math.exp(x) for x in (3, 2, 1, 0, 0, 0.5)]
    p = [x / sum(za) for x in za]
    q = [x / sum(zb) for x in zb]
    assert h.kl_divergence == pytest.approx(
        sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    )
    same = lm_head_stats(a, a)
    assert same.top1_agree and same.top5_overlap == 5 and same.kl_divergence == 0.0


def test_lm_head_kl_is_stable_for_large_logits():
    h = lm_head_stats(f32(1000, 0), f32(999, 0))
    assert h.kl_divergence is not None and math.isfinite(h.kl_divergence)
    assert h.kl_divergence == pytest.approx(0.0, abs=1e-300)


# ----------------------------------------------------------------------------- tolerances


def test_verdict_rule():
    s = compare_arrays(f32(10, 0), f32(10, 0.5), extended=True)  # max|d| .5, max|a| 10
    assert verdict(s, Tolerance(atol=1e-5, rtol=0.1, cos_min=0.99))[0] is True
    ok, reason = verdict(s, Tolerance(atol=1e-5, rtol=0.01, cos_min=0.99))
    assert not ok and "rtol" in reason
    ok, reason = verdict(s, Tolerance(atol=1e-5, rtol=0.1, cos_min=0.9999))
    assert not ok and "cosine" in reason
    assert verdict(s, Tolerance(atol=0.5, rtol=0.0, cos_min=1.0))[0] is True


def test_parse_tol_override():
    rule = parse_tol_override("ffn_*:cos-min=0.99,atol=1e-3")
    assert rule.pattern == "ffn_*" and rule.values == {"cos_min": 0.99, "atol": 1e-3}
    assert rule.matches("ffn_gate", "layer-3/ffn_gate") and not rule.matches("attn_out", "x")
    layered = parse_tol_override("layer-3/ffn_*:rtol=0.5")
    assert layered.matches("ffn_up", "layer-3/ffn_up")
    assert not layered.matches("ffn_up", "layer-13/ffn_up")


@pytest.mark.parametrize(
    "spec",
    [
        "ffn_*",
        ":atol=1",
        "ffn_*:",
        "ffn_*:atol",
        "ffn_*:foo=1",
        "x:atol=abc",
        "x:rtol=-1",
        "x:cos-min=1.5",
        "x:atol=nan",
    ],
)
def test_parse_tol_override_errors(spec):
    with pytest.raises(ValidationError) as info:
        parse_tol_override(spec)
    assert info.value.exit_code == 5 and "--tol" in info.value.message


def test_tolerance_for_later_rules_win():
    base = Tolerance(atol=1e-5, rtol=0.1, cos_min=0.999)
    rules = [parse_tol_override("ffn_*:cos-min=0.99"), parse_tol_override("layer-2/*:cos-min=0.9")]
    assert tolerance_for(base, rules, "ffn_up", "layer-1/ffn_up").cos_min == 0.99
    assert tolerance_for(base, rules, "ffn_up", "layer-2/ffn_up").cos_min == 0.9
    assert tolerance_for(base, rules, "attn_out", "layer-1/attn_out") == base


# ----------------------------------------------------------------------------- positions


def test_decode_position():
    assert decode_position("attn_norm", (5, 16), 37) == "token 2, channel 5"
    assert decode_position("attn_softmax", (2, 5, 5), 31) == "head 1, query 1, key 1"
    assert decode_position("lm_head", (50,), 7) == "vocab id 7"
    assert decode_position("attn_norm", (5, 16), 80) is None


def _manifest(token_ids=(1, 2, 3), files=()) -> Manifest:
    return Manifest("0", "", {}, "llama", {}, None, tuple(token_ids), (), (), tuple(files))


def test_infer_shape_from_token_ids():
    m = _manifest(token_ids=(1, 2, 3))
    assert infer_shape(key_for("layer-0/attn_norm.bin"), 48, [m]) == (3, 16)
    assert infer_shape(key_for("layer-0/attn_scores.bin"), 2 * 9, [m]) == (2, 3, 3)
    assert infer_shape(key_for("lm_head.bin"), 50, []) == (50,)
    assert infer_shape(key_for("layer-0/attn_norm.bin"), 48, []) is None


# ----------------------------------------------------------------------------- file pairs


def test_diff_files_checks_count_and_layer(tmp_path):
    write_aprt(tmp_path / "a.bin", 0, f32(1, 2, 3))
    write_aprt(tmp_path / "b.bin", 0, f32(1, 2))
    write_aprt(tmp_path / "c.bin", 1, f32(1, 2, 3))
    with pytest.raises(ValidationError) as info:
        diff_files(tmp_path / "a.bin", tmp_path / "b.bin")
    assert info.value.exit_code == 5 and "dim_product mismatch" in info.value.message
    with pytest.raises(ValidationError, match="layer mismatch"):
        diff_files(tmp_path / "a.bin", tmp_path / "c.bin")
    (tmp_path / "bad.bin").write_bytes(b"NOPE" + bytes(8))
    with pytest.raises(InvalidFormatError):
        diff_files(tmp_path / "a.bin", tmp_path / "bad.bin")
    with pytest.raises(NotFoundError):
        diff_files(tmp_path / "a.bin", tmp_path / "missing.bin")


def test_cli_file_pair_json_schema(tmp_path):
    write_aprt(tmp_path / "a.bin", WHOLE_MODEL_LAYER, f32(1, math.nan, 3))
    write_aprt(tmp_path / "b.bin", WHOLE_MODEL_LAYER, f32(1, 2, 5))
    r = CliRunner().invoke(
        diff_command,
        ["--values", "--json", "--limit", "2", str(tmp_path / "a.bin"), str(tmp_path / "b.bin")],
    )
    doc = json.loads(r.output)
    assert list(doc) == [
        "schema",
        "path_a",
        "path_b",
        "layer",
        "dim_product",
        "max_abs_diff",
        "max_abs_diff_index",
        "rms_diff",
        "cosine_sim",
        "top_diffs",
    ]
    assert doc["schema"] == "apr-stage-diff-v1" and doc["layer"] == "whole-model"
    assert doc["dim_product"] == 3 and doc["max_abs_diff"] == 2.0 and doc["max_abs_diff_index"] == 2
    assert doc["rms_diff"] is None and doc["cosine_sim"] == 0.0  # NaN -> null; NaN norm -> 0
    assert doc["top_diffs"] == [
        {"index": 2, "a": 3.0, "b": 5.0, "abs_diff": 2.0},
        {"index": 0, "a": 1.0, "b": 1.0, "abs_diff": 0.0},
    ]


def test_cli_file_pair_text_and_exit_codes(tmp_path):
    write_aprt(tmp_path / "a.bin", 0, f32(1, 2, 3))
    write_aprt(tmp_path / "b.bin", 0, f32(1, 2, 3.5))
    write_aprt(tmp_path / "short.bin", 0, f32(1, 2))
    runner = CliRunner()
    same = runner.invoke(
        diff_command, ["--values", str(tmp_path / "a.bin"), str(tmp_path / "a.bin")]
    )
    assert same.exit_code == 0, same.output
    assert "max |a-b|:  0 at index 0" in same.output
    r = runner.invoke(diff_command, ["--values", str(tmp_path / "a.bin"), str(tmp_path / "b.bin")])
    assert r.exit_code == 1 and "DIVERGED" in r.output and "0.5 at index 2" in r.output
    loose = runner.invoke(
        diff_command,
        [
            "--values",
            "--cos-min",
            "0.9",
            "--rtol",
            "0.5",
            str(tmp_path / "a.bin"),
            str(tmp_path / "b.bin"),
        ],
    )
    assert loose.exit_code == 0
    bad = runner.invoke(
        diff_command, ["--values", str(tmp_path / "a.bin"), str(tmp_path / "short.bin")]
    )
    assert isinstance(bad.exception, ValidationError) and bad.exception.exit_code == 5
    gone = runner.invoke(diff_command, ["--values", str(tmp_path / "a.bin"), str(tmp_path / "x")])
    assert isinstance(gone.exception, NotFoundError) and gone.exception.exit_code == 3


# ----------------------------------------------------------------------------- directories

SEQ, HID, HEADS = 3, 4, 2


def _shape(stage: str) -> tuple[int, ...]:
    if stage in ("attn_scores", "attn_softmax"):
        return (HEADS, SEQ, SEQ)
    return (7,) if stage == "lm_head" else (SEQ, HID)


def make_dump(
    root: Path,
    layers: dict[int, list[str]],
    whole=("final_norm", "lm_head"),
    scale: dict[str, float] | None = None,
    token_ids=(1, 2, 3),
    manifest=True,
) -> Path:
    """A dump of deterministic tensors; ``scale[rel_stem]`` perturbs one file multiplicatively."""
    scale = scale or {}
    files = []
    entries = [(f"layer-{L}/{s}", L, s) for L, stages in layers.items() for s in stages]
    entries += [(s, None, s) for s in whole]
    for stem, layer, stage in entries:
        shape = _shape(stage)
        offset = zlib.crc32(stem.encode()) % 7  # same tensor for the same file in every dump
        x = (np.arange(np.prod(shape), dtype=F32) % 5 + 1 + offset).reshape(shape)
        x = x * F32(scale.get(stem, 1.0))
        size = write_aprt(root / f"{stem}.bin", WHOLE_MODEL_LAYER if layer is None else layer, x)
        files.append(
            {
                "path": f"{stem}.bin",
                "stage": stage,
                "layer": layer,
                "shape": list(shape),
                "bytes": size,
            }
        )
    if manifest:
        write_manifest(
            root,
            {
                "schema": "aprtrace-manifest-v1",
                "tool": "aprtrace",
                "version": "0",
                "created": "",
                "model": {},
                "architecture": "llama",
                "config": {},
                "prompt": None,
                "token_ids": list(token_ids),
                "stages": [],
                "layers": list(layers),
                "files": files,
            },
        )
    return root


def test_pairing_order_and_one_sided_files(tmp_path):
    a = make_dump(
        tmp_path / "a",
        {0: ["embedding", "ffn_out", "attn_norm"], 2: ["attn_norm"], 10: ["attn_norm"]},
    )
    b = make_dump(
        tmp_path / "b",
        {0: ["embedding", "attn_norm"], 2: ["attn_norm", "ffn_up"], 10: ["attn_norm"]},
    )
    (a / "layer-0" / ".attn_norm.bin.123.tmp").write_bytes(b"junk")
    (a / ".hidden.bin").write_bytes(b"junk")
    d = diff_dirs(a, b)
    assert [p.key.rel for p in d.pairs] == [
        "layer-0/embedding.bin",
        "layer-0/attn_norm.bin",
        "layer-2/attn_norm.bin",
        "layer-10/attn_norm.bin",
        "final_norm.bin",
        "lm_head.bin",
    ]
    assert d.only_a == ["layer-0/ffn_out.bin"] and d.only_b == ["layer-2/ffn_up.bin"]
    assert d.failed == 0 and d.first_divergence is None
    assert d.pairs[1].max_position == "token 0, channel 0"


def test_first_divergence_fail_fast_and_attribution(tmp_path):
    stages = [
        "embedding",
        "attn_norm",
        "qkv_matmul",
        "q_post_rope",
        "k_post_rope",
        "attn_scores",
        "attn_softmax",
        "attention",
    ]
    # Multiplying a tensor by (1+e) gives a relative L2 error of exactly e.
    scale = {
        "layer-1/attn_scores": 1.001,
        "layer-1/attn_softmax": 1.04,
        "layer-1/attention": 1.04,
        "lm_head": 1.5,
    }
    a = make_dump(tmp_path / "a", {0: stages, 1: stages[1:]})
    b = make_dump(tmp_path / "b", {0: stages, 1: stages[1:]}, scale=scale)
    d = diff_dirs(a, b, Tolerance(atol=1e-6, rtol=0.01, cos_min=0.999))
    first = d.first_divergence
    # Uniform scaling keeps cosine at 1, so the max bound fails first: 4% > rtol 1%.
    assert first is not None and first.key.rel == "layer-1/attn_softmax.bin"
    assert "rtol" in first.reason
    by = {p.key.rel: p for p in d.pairs}
    softmax = by["layer-1/attn_softmax.bin"]
    assert softmax.stats.rel_l2 == pytest.approx(0.04, rel=1e-4)
    assert softmax.attribution == pytest.approx(40.0, rel=1e-3)
    assert softmax.predecessor == "layer 1 attn_scores"
    assert by["layer-1/attn_scores.bin"].attribution == math.inf  # input identical
    assert by["layer-1/attention.bin"].attribution == pytest.approx(1.0, rel=1e-3)
    assert by["lm_head.bin"].lm_head is not None
    amps = d.amplifiers()
    # Sources (inf) lead; attn_scores adds 0.001, under 1% of lm_head's 0.5, so it is left out.
    assert [p.key.rel for p in amps] == ["lm_head.bin", "layer-1/attn_softmax.bin"]
    fast = diff_dirs(a, b, Tolerance(atol=1e-6, rtol=0.01), fail_fast=True)
    assert fast.pairs[-1].key.rel == "layer-1/attn_softmax.bin" and fast.stopped_early


def test_manifest_warnings_and_inferred_shapes(tmp_path):
    a = make_dump(tmp_path / "a", {0: ["attn_norm"]}, token_ids=(1, 2, 3))
    b = make_dump(tmp_path / "b", {0: ["attn_norm"]}, token_ids=(1, 2, 4))
    c = make_dump(tmp_path / "c", {0: ["attn_norm"]}, manifest=False)
    with pytest.raises(
        ValidationError, match=r"different token ids \(A \[1, 2, 3\], B \[1, 2, 4\]\)"
    ):
        diff_dirs(a, b)
    b = make_dump(tmp_path / "b2", {0: ["attn_norm"]}, token_ids=(1, 2, 3))
    d = diff_dirs(c, c)
    assert sum("no manifest.json" in w for w in d.warnings) == 2
    assert d.pairs[0].shape is None and d.pairs[0].max_position is None
    d = diff_dirs(a, c)
    assert d.pairs[0].shape == (SEQ, HID)
    (a / "final_norm.bin").unlink()
    v = diff_dirs(a, b).verdict
    assert v.word == "incomplete" and v.exit_code == 9
    assert "A: 1 file(s) listed in manifest.json are missing (first: final_norm.bin)" in v.problems


def test_incomparable_pair_and_no_common_files(tmp_path):
    a = make_dump(tmp_path / "a", {0: ["attn_norm"]})
    b = make_dump(tmp_path / "b", {0: ["attn_norm"]})
    write_aprt(b / "layer-0" / "attn_norm.bin", 0, f32(1, 2))
    d = diff_dirs(a, b)
    assert d.pairs[0].error and "dim_product mismatch" in d.pairs[0].error
    r = CliRunner().invoke(diff_command, ["--values", str(a), str(b)])
    assert isinstance(r.exception, ValidationError) and r.exception.exit_code == 5
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValidationError, match="no stage files in common"):
        diff_dirs(a, empty)


def test_cli_directory_exit_codes_and_outputs(tmp_path):
    a = make_dump(tmp_path / "a", {0: ["embedding", "attn_norm"]})
    b = make_dump(tmp_path / "b", {0: ["embedding", "attn_norm"]}, scale={"layer-0/attn_norm": 1.5})
    runner = CliRunner()
    same = runner.invoke(diff_command, ["--values", str(a), str(a)])
    assert same.exit_code == 0, same.output
    assert "OK: all 4 pairs within tolerance" in same.output
    r = runner.invoke(diff_command, ["--values", str(a), str(b)])
    assert r.exit_code == 1
    assert "first divergence: layer 0 attn_norm" in r.output
    waived = runner.invoke(
        diff_command, ["--values", str(a), str(b), "--tol", "attn_norm:rtol=1,atol=10"]
    )
    assert waived.exit_code == 0, waived.output
    j = runner.invoke(diff_command, ["--values", "--json", str(a), str(b)])
    doc = json.loads(j.stdout)
    assert doc["schema"] == "aprtrace-diff-v1" and j.exit_code == 1
    assert doc["summary"]["verdict"] == "diverged"
    assert doc["first_divergence"]["path"] == "layer-0/attn_norm.bin"
    mixed = runner.invoke(diff_command, ["--values", str(a), str(b / "lm_head.bin")])
    assert isinstance(mixed.exception, ValidationError)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "lm_head.bin").write_bytes(b"APR")
    bad = runner.invoke(diff_command, ["--values", str(a), str(tmp_path / "bad")])
    assert isinstance(bad.exception, InvalidFormatError) and bad.exception.exit_code == 4


def test_cli_help_documents_exit_codes_and_examples():
    out = CliRunner().invoke(diff_command, ["--help"]).output
    for text in (
        "Exit codes",
        "0  every pair",
        "1  at least one",
        "5  incomparable",
        "aprtrace diff --values f32-trace/ q8-trace/",
        "--tol",
        "cos-min",
    ):
        assert text in out


def test_main_cli_maps_errors_to_exit_codes(tmp_path):
    from aprtrace.cli import main

    a = make_dump(tmp_path / "a", {0: ["attn_norm"]})
    runner = CliRunner()
    assert runner.invoke(main, ["diff", "--values", str(a), str(a)]).exit_code == 0
    assert runner.invoke(main, ["diff", "--values", str(a), str(tmp_path / "x")]).exit_code == 3
    r = runner.invoke(main, ["diff", "--values", str(a), str(a), "--tol", "bad"])
    assert r.exit_code == 5


def test_memory_mapped_files_stream_in_chunks(tmp_path):
    # Bodies over 1 MiB are memory-mapped by read_aprt; CHUNK splits them into several chunks.
    rng = np.random.default_rng(5)
    a = rng.standard_normal(700_001).astype(F32)
    b = (a + F32(1e-3) * rng.standard_normal(a.size)).astype(F32)
    write_aprt(tmp_path / "a.bin", 3, a)
    write_aprt(tmp_path / "b.bin", 3, b)
    r = diff_files(tmp_path / "a.bin", tmp_path / "b.bin", limit=3)
    d = np.abs(a - b)
    assert r.layer == 3 and r.stats.count == a.size
    assert r.stats.max_abs_diff_index == int(np.argmax(d))
    assert [t.index for t in r.stats.top_diffs] == list(np.argsort(-d, kind="stable")[:3])
    d64 = d.astype(np.float64)
    assert r.stats.rms_diff == pytest.approx(math.sqrt(float(d64 @ d64) / a.size), rel=2e-7)


def test_cli_file_pair_layer_tolerance_pattern(tmp_path):
    for side, last in (("a", 3.0), ("b", 3.5)):
        write_aprt(tmp_path / side / "layer-3" / "ffn_up.bin", 3, f32(1, 2, last))
    args = [
        "--values",
        str(tmp_path / "a/layer-3/ffn_up.bin"),
        str(tmp_path / "b/layer-3/ffn_up.bin"),
    ]
    runner = CliRunner()
    assert runner.invoke(diff_command, args).exit_code == 1
    assert runner.invoke(diff_command, args + ["--tol", "layer-3/ffn_*:atol=1"]).exit_code == 0
    assert runner.invoke(diff_command, args + ["--tol", "layer-4/ffn_*:atol=1"]).exit_code == 1
