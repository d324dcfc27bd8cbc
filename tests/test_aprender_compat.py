"""Behaviour pinned against aprender's own Rust source (paiml/aprender), not against aprtrace.

Sources read (commit in brackets where the search index gave one):
- crates/apr-cli/src/commands/diff_05_aprt_stage.rs [23ef4281885e93df285f4a29d0ebceb56fbd5311]
  `apr diff --values`: compute_aprt_stage_stats, run_aprt_stage_diff (JSON via serde_json).
- realizar inference_trace/save_tensor.rs, save_tensor_stage.rs, save_tensor_plan.rs,
  save_tensor_paths.rs (workspace crate aprender-serve): APRT bytes, stage list, plan parsing.
- crates/apr-cli/src/commands/trace_save_tensor.rs [febb8d4d77412d61c5c72e559b6601b7b30bb77c]
- crates/apr-format/src/v2/{writer.rs, header_impl.rs, tensor_index_impl.rs}, crc32.rs
  [9dd8b59697b420d5b41d6754ac19d2740ba2ac68, 0d6e6fe2887fa2f160a1398eca5d6f487ecf2ff7,
  db8376f7ce2b1c2db104968ead20bb8d68ce225d]
- serde_json 1.0.150 (Cargo.lock) formats floats with zmij (dtolnay/zmij src/lib.rs `write`).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from aprtrace import report
from aprtrace.cli_diff import diff_command
from aprtrace.config import ModelConfig
from aprtrace.diff import compare_arrays, diff_files
from aprtrace.errors import ValidationError
from aprtrace.formats.apr import metadata_json, write_apr
from aprtrace.plan import parse_layers
from aprtrace.stages import ALL_STAGES, parse_stage_list, stages_for


def aprt_bytes(layer: int, values: list[float]) -> bytes:
    """apr's test helper `write_aprt_file`: b"APRT" + layer u32 + count u32 + f32 LE body."""
    body = np.asarray(values, dtype="<f4").tobytes()
    return b"APRT" + struct.pack("<II", layer, len(values)) + body


def write_pair(tmp_path: Path, a: list[float], b: list[float], layer: int = 0):
    pa, pb = tmp_path / "a.bin", tmp_path / "b.bin"
    pa.write_bytes(aprt_bytes(layer, a))
    pb.write_bytes(aprt_bytes(layer, b))
    return pa, pb


# ------------------------------------------------------------------------------------------
# apr diff --values: statistics (diff_05_aprt_stage.rs::compute_aprt_stage_stats)
# ------------------------------------------------------------------------------------------


def test_cosine_is_zero_when_a_norm_is_nan() -> None:
    # apr: `if na > 0.0 && nb > 0.0 { dot / .. } else { 0.0 }`; a NaN norm fails `> 0.0`.
    s = compare_arrays(np.array([math.nan, 1, 0], "f4"), np.array([0, 0, 1], "f4"), extended=False)
    assert s.cosine_sim == 0.0
    assert math.isnan(s.rms_diff)  # the RMS has no such guard: NaN -> JSON null


def test_cosine_with_inf_is_nan_as_in_apr() -> None:
    # na = inf passes `> 0.0`; dot / (inf * x) with dot = inf gives inf/inf = NaN.
    s = compare_arrays(np.array([math.inf, 1], "f4"), np.array([1, 1], "f4"), extended=False)
    assert math.isnan(s.cosine_sim)


def test_limit_zero_still_lists_one_difference(tmp_path: Path) -> None:
    # apr: `diffs.truncate(top_k.max(1))`.
    pa, pb = write_pair(tmp_path, [0, 0, 0], [0.5, 2, 1])
    r = diff_files(pa, pb, limit=0)
    assert [(t.index, t.abs_diff) for t in r.stats.top_diffs] == [(1, 2.0)]


def test_rms_is_rounded_to_f32(tmp_path: Path) -> None:
    # apr: `rms_diff: f32 = ((sum_sq_diff / n as f64).sqrt()) as f32`.
    pa, pb = write_pair(tmp_path, [0, 0, 0], [1, 1, 0])
    r = diff_files(pa, pb)
    exact = math.sqrt(2 / 3)
    assert r.stats.rms_diff == float(np.float32(exact)) != exact


def test_max_ties_first_index_and_top_ties_ascending_index(tmp_path: Path) -> None:
    # apr: `if d > max_abs_diff` (strict) from 0.0; top-k by a stable descending sort.
    pa, pb = write_pair(tmp_path, [0, 0, 0, 0, 0], [1, -3, 3, 2, -3])
    r = diff_files(pa, pb, limit=4)
    assert (r.stats.max_abs_diff, r.stats.max_abs_diff_index) == (3.0, 1)
    assert [t.index for t in r.stats.top_diffs] == [1, 2, 4, 3]


def test_all_equal_gives_index_zero(tmp_path: Path) -> None:
    pa, pb = write_pair(tmp_path, [1, 2], [1, 2])
    r = diff_files(pa, pb)
    assert (r.stats.max_abs_diff, r.stats.max_abs_diff_index) == (0.0, 0)
    assert r.stats.cosine_sim == pytest.approx(1.0, abs=1e-15)


# ------------------------------------------------------------------------------------------
# apr diff --values: errors and exit codes (run_aprt_stage_diff)
# ------------------------------------------------------------------------------------------


def test_dim_product_mismatch_message_is_apr_text(tmp_path: Path) -> None:
    pa, pb = tmp_path / "a.bin", tmp_path / "b.bin"
    pa.write_bytes(aprt_bytes(0, [1, 2]))
    pb.write_bytes(aprt_bytes(0, [1, 2, 3]))
    with pytest.raises(ValidationError) as info:
        diff_files(pa, pb)
    assert info.value.exit_code == 5
    assert info.value.message == (
        f"APRT dim_product mismatch: {pa} has 2 f32s, {pb} has 3 f32s — "
        "cannot compare stage tensors of different sizes"
    )


def test_layer_mismatch_message_is_apr_text_with_raw_u32(tmp_path: Path) -> None:
    pa, pb = tmp_path / "a.bin", tmp_path / "b.bin"
    pa.write_bytes(aprt_bytes(0, [1]))
    pb.write_bytes(aprt_bytes(0xFFFFFFFF, [1]))
    with pytest.raises(ValidationError) as info:
        diff_files(pa, pb)
    assert info.value.message == (
        f"APRT layer mismatch: {pa} is layer 0, {pb} is layer 4294967295 — "
        "stages from different layers cannot be compared element-wise"
    )


@pytest.mark.parametrize(
    "raw",
    [b"APRT\x00\x00", aprt_bytes(0, [1, 2])[:-4]],
    ids=["short-header", "short-body"],
)
def test_unreadable_aprt_file_is_exit_5_in_file_pair_mode(tmp_path: Path, raw: bytes) -> None:
    # apr maps every read_tensor_file error of an APRT-magic file to ValidationFailed (5).
    good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
    good.write_bytes(aprt_bytes(0, [1, 2]))
    bad.write_bytes(raw)
    r = CliRunner().invoke(diff_command, ["--values", str(good), str(bad)])
    assert isinstance(r.exception, ValidationError) and r.exception.exit_code == 5
    assert str(bad) in r.exception.message


# ------------------------------------------------------------------------------------------
# apr diff --values --json: serde_json::to_string_pretty of a json!{} object
# ------------------------------------------------------------------------------------------


def test_file_pair_json_text_is_byte_identical_to_serde(tmp_path: Path) -> None:
    # Expected text written out by hand from apr's json!{} (insertion order: the workspace
    # enables serde_json/preserve_order, Cargo.lock lists indexmap under serde_json), f32 values
    # widened exactly to f64 (serde_json Number::from_f32) and printed by zmij: plain decimal
    # for exponents -5..=15, else d.ddde±X without zero padding.
    pa, pb = write_pair(tmp_path, [0.1, 0, 0, 1e20], [0.1, 2.5e-5, -3e-7, 1e20], layer=3)
    text = report.file_pair_json_text(diff_files(pa, pb, limit=2))
    rms = float(np.float32(math.sqrt((np.float32(2.5e-5) ** 2 + np.float32(3e-7) ** 2) / 4)))
    expected = (
        "{\n"
        '  "schema": "apr-stage-diff-v1",\n'
        f'  "path_a": "{pa}",\n'
        f'  "path_b": "{pb}",\n'
        '  "layer": 3,\n'
        '  "dim_product": 4,\n'
        '  "max_abs_diff": 0.00002499999936844688,\n'
        '  "max_abs_diff_index": 1,\n'
        f'  "rms_diff": {report.serde_float(rms)},\n'
        '  "cosine_sim": 1.0,\n'
        '  "top_diffs": [\n'
        "    {\n"
        '      "index": 1,\n'
        '      "a": 0.0,\n'
        '      "b": 0.00002499999936844688,\n'
        '      "abs_diff": 0.00002499999936844688\n'
        "    },\n"
        "    {\n"
        '      "index": 2,\n'
        '      "a": 0.0,\n'
        '      "b": -3.000000106112566e-7,\n'
        '      "abs_diff": 3.000000106112566e-7\n'
        "    }\n"
        "  ]\n"
        "}"
    )
    assert text == expected
    assert json.loads(text)["max_abs_diff"] == float(np.float32(2.5e-5))


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0, "0.0"),
        (-0.0, "-0.0"),
        (1.0, "1.0"),
        (123.5, "123.5"),
        (1e15, "1000000000000000.0"),
        (1e16, "1e+16"),
        (1.5e300, "1.5e+300"),
        (0.0001, "0.0001"),
        (1.5e-5, "0.000015"),
        (1e-6, "1e-6"),
        (-1.25e-10, "-1.25e-10"),
        (5e-324, "5e-324"),
        (0.1, "0.1"),
    ],
)
def test_serde_float_layout(value: float, text: str) -> None:
    # Cases from zmij's own tests (1.0, 0.0, -0.0, 5e-324, d.ddde+NN) and its `write` ranges.
    assert report.serde_float(value) == text


def test_json_keeps_non_ascii_paths_and_nulls_non_finite(tmp_path: Path) -> None:
    (tmp_path / "é").mkdir()
    pa, pb = write_pair(tmp_path / "é", [math.nan, 1], [0, 1])
    text = report.file_pair_json_text(diff_files(pa, pb))
    assert f'"path_a": "{pa}"' in text  # serde_json does not \u-escape non-ASCII
    doc = json.loads(text)
    assert doc["rms_diff"] is None and doc["cosine_sim"] == 0.0
    assert doc["top_diffs"][-1] == {"index": 0, "a": None, "b": 0.0, "abs_diff": None}


def test_whole_model_layer_label_in_json(tmp_path: Path) -> None:
    pa, pb = write_pair(tmp_path, [1], [1], layer=0xFFFFFFFF)
    doc = json.loads(report.file_pair_json_text(diff_files(pa, pb)))
    assert doc["layer"] == "whole-model"


def test_cli_json_output_is_the_serde_text(tmp_path: Path) -> None:
    pa, pb = write_pair(tmp_path, [0, 1], [0.5, 1])
    r = CliRunner().invoke(diff_command, ["--values", "--json", str(pa), str(pb)])
    assert r.stdout == report.file_pair_json_text(diff_files(pa, pb)) + "\n"


# ------------------------------------------------------------------------------------------
# apr trace --save-tensor: stage list and layer range (save_tensor_stage.rs / _plan.rs)
# ------------------------------------------------------------------------------------------


def test_stage_order_is_apr_all() -> None:
    apr_all = (
        "embedding attn_norm qkv_matmul qkv_bias q_post_rope k_post_rope attn_scores "
        "attn_softmax attention attn_out post_attn_residual ffn_norm ffn_gate ffn_up ffn_silu "
        "ffn_swigl ffn_out post_ffn_residual moe_router moe_ffn_out moe_router_indices "
        "final_norm lm_head"
    ).split()
    dense = [s for s in apr_all if not s.startswith("moe_")]
    # apr's stages keep apr's relative order; the stages aprtrace adds (Gemma's post-norms,
    # Qwen2-MoE's shared expert) belong to named architectures only, so a dense Llama/Qwen
    # dump has exactly apr's list without the MoE stages, and a Qwen3-MoE dump apr's list
    # without the dense MLP's five stages.
    assert [s.value for s in ALL_STAGES if s.value in apr_all] == apr_all
    extra = [s for s in ALL_STAGES if s.value not in apr_all]
    assert all(s.spec.archs for s in extra)
    llama = ModelConfig("llama", 8, 1, 2, 2, 16, 32, 4)
    assert [s.value for s in stages_for(llama)] == [d for d in dense if d != "qkv_bias"]
    moe = ModelConfig("qwen3moe", 8, 1, 2, 2, 16, 32, 4, num_experts=4, num_experts_per_tok=2)
    mlp = ("ffn_gate", "ffn_up", "ffn_silu", "ffn_swigl", "ffn_out", "qkv_bias")
    assert [s.value for s in stages_for(moe)] == [s for s in apr_all if s not in mlp]
    assert [s.value for s in ALL_STAGES if not s.per_layer] == ["final_norm", "lm_head"]


@pytest.mark.parametrize("spec", ["all", "ALL", " aLL "])
def test_all_keyword_any_case(spec: str) -> None:
    assert parse_stage_list(spec) == ALL_STAGES


def test_stage_names_trimmed_case_folded_alias() -> None:
    got = parse_stage_list(" FFN_GATE , layer_output,Embedding")
    assert [s.value for s in got] == ["embedding", "ffn_gate", "post_ffn_residual"]


@pytest.mark.parametrize("spec", ["embedding,,ffn_gate", "embedding,ffn_gate,", "nope"])
def test_bad_stage_lists_are_validation_errors(spec: str) -> None:
    with pytest.raises(ValidationError):
        parse_stage_list(spec)


@pytest.mark.parametrize(
    ("spec", "layers"),
    [("0..1", {0}), ("  3..7 ", {3, 4, 5, 6}), ("3 .. 5", {3, 4}), ("+2..3", {2})],
)
def test_layer_range_accepts_what_apr_accepts(spec: str, layers: set[int]) -> None:
    # apr: trim, split_once(".."), trim each side, u32::from_str (which accepts a leading '+').
    assert set(parse_layers(spec).layers) == layers


@pytest.mark.parametrize("spec", ["5..5", "10..3", "0-3", "-1..3", "0..abc", "0..4294967296"])
def test_layer_range_rejects_what_apr_rejects(spec: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_layers(spec)
    assert info.value.exit_code == 5


# ------------------------------------------------------------------------------------------
# APR v2 container: aprender's AprV2Writer::write, re-implemented here from its source
# ------------------------------------------------------------------------------------------


def _align64(n: int) -> int:
    return (n + 63) // 64 * 64


def aprender_v2_bytes(meta: bytes, tensors: list[tuple[str, int, tuple[int, ...], bytes]]) -> bytes:
    """AprV2Writer::write: sort by name, index entries, 64-byte padding, header CRC over
    [0..40)+[44..64), footer CRC over everything before it; flags = LAYOUT_ROW_MAJOR."""
    tensors = sorted(tensors, key=lambda t: t[0].encode())
    index, offset = b"", 0
    for name, dtype, shape, data in tensors:
        raw = name.encode()
        index += struct.pack("<H", len(raw)) + raw + bytes([dtype, len(shape)])
        index += b"".join(struct.pack("<Q", d) for d in shape)
        index += struct.pack("<QQ", offset, len(data))
        offset += _align64(len(data))
    index_off = 64 + _align64(len(meta))
    data_off = index_off + _align64(len(index))
    head = (
        b"APR\x00"
        + bytes([2, 0])
        + struct.pack("<HIQIQQ", 0x0400, len(tensors), 64, len(meta), index_off, data_off)
    )
    head += b"\x00" * 4 + b"\x00" * 20
    crc = zlib.crc32(head[:40] + head[44:])
    head = head[:40] + struct.pack("<I", crc) + head[44:]
    out = (
        head + meta.ljust(_align64(len(meta)), b"\x00") + index.ljust(_align64(len(index)), b"\x00")
    )
    for _, _, _, data in tensors:
        out += data.ljust(_align64(len(data)), b"\x00")
    return out + struct.pack("<I", zlib.crc32(out))


def test_crc32_is_ieee_check_value() -> None:
    # crc32.rs: `crc32(b"123456789") == 0xCBF43926`, `crc32(&[0xFF]) == 0xFF000000`.
    assert zlib.crc32(b"123456789") == 0xCBF43926 and zlib.crc32(b"\xff") == 0xFF000000


def test_write_apr_is_byte_identical_to_aprender_writer(tmp_path: Path) -> None:
    meta = {"architecture": "qwen2", "hidden_size": 4, "rope_type": 2}
    w = np.arange(8, dtype="<f4").reshape(2, 4)
    half = np.arange(4, dtype="<f2")
    tensors = [
        ("model.norm.weight", 1, (4,), half.tobytes()),
        ("model.embed_tokens.weight", 0, (2, 4), w.tobytes()),
        ("lm_head.weight", 0, (0, 4), b""),  # an empty tensor: size 0, offset not advanced
        ("a" * 70, 30, (1,), b"\x80\x3f"),  # a name long enough to push the index past 64
    ]
    path = tmp_path / "m.apr"
    size = write_apr(path, meta, tensors)
    expected = aprender_v2_bytes(metadata_json(meta), tensors)
    got = path.read_bytes()
    assert size == len(got)
    # HAS_VOCAB is aprtrace's only addition and is not set here (no tokenizer.vocabulary).
    assert got == expected


def test_write_apr_with_no_tensors_matches_aprender(tmp_path: Path) -> None:
    path = tmp_path / "empty.apr"
    write_apr(path, {"architecture": "llama"}, [])
    meta = metadata_json({"architecture": "llama"})
    assert path.read_bytes() == aprender_v2_bytes(meta, [])


def test_metadata_types_aprender_reader_needs() -> None:
    # AprV2Metadata: model_type String (default ""), total_size/param_count u64 (default 0),
    # rope_type Option<u32>, rope_theta / rms_norm_eps Option<f32>; license always serialized.
    doc = json.loads(metadata_json({"architecture": "qwen2", "rope_type": 2, "rope_theta": 1e6}))
    assert doc["model_type"] == "" and doc["total_size"] == 0 and doc["param_count"] == 0
    assert doc["rope_type"] == 2 and isinstance(doc["rope_theta"], float)
    assert list(doc)[0] == "model_type"
