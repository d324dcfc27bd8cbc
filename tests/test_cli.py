"""The trace / stages / inspect commands through click's CliRunner."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from aprtrace.cli import main
from aprtrace.stages import Stage

DEMO_LAYERS = 4


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def header(path: Path) -> tuple[bytes, int, int]:
    return struct.unpack("<4sII", path.read_bytes()[:12])


def test_trace_writes_selected_stages_at_apr_paths(tiny_gguf, tmp_path):
    out = tmp_path / "dump"
    result = run(
        "trace",
        "--save-tensor",
        "embedding,ATTN_NORM, lm_head,layer_output",
        "--save-tensor-dir",
        str(out),
        str(tiny_gguf),
    )
    assert result.exit_code == 0, result.output
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.bin"))
    assert files == [
        "layer-0/attn_norm.bin",
        "layer-0/embedding.bin",
        "layer-0/post_ffn_residual.bin",
        "lm_head.bin",
    ]
    magic, layer, count = header(out / "layer-0" / "attn_norm.bin")
    assert (magic, layer) == (b"APRT", 0)
    seq = len(json.loads((out / "manifest.json").read_text())["token_ids"])
    assert count == seq * 128
    assert (out / "layer-0" / "attn_norm.bin").stat().st_size == 12 + 4 * count
    magic, layer, count = header(out / "lm_head.bin")
    assert layer == 0xFFFFFFFF and count > 0
    for name in files:
        assert f"wrote {out / name}" in result.output


def test_trace_default_out_dir_is_model_stem_trace(tiny_gguf, tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(tiny_gguf.read_bytes())
    result = run("trace", "--save-tensor", "final_norm", str(model))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m-trace" / "final_norm.bin").exists()


def test_embedding_not_written_when_layer_zero_excluded(tiny_gguf, tmp_path):
    out = tmp_path / "d"
    result = run(
        "trace",
        "--save-tensor",
        "embedding,attn_norm,final_norm",
        "--save-tensor-layers",
        "2..4",
        "--save-tensor-dir",
        str(out),
        str(tiny_gguf),
    )
    assert result.exit_code == 0, result.output
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.bin"))
    assert files == ["final_norm.bin", "layer-2/attn_norm.bin", "layer-3/attn_norm.bin"]
    assert header(out / "layer-3" / "attn_norm.bin")[1] == 3


def test_all_stages_all_layers_counts(tiny_gguf, tmp_path):
    out = tmp_path / "all"
    result = run(
        "trace",
        "--save-tensor",
        "all",
        "--save-tensor-layers",
        "all",
        "--save-tensor-dir",
        str(out),
        str(tiny_gguf),
    )
    assert result.exit_code == 0, result.output
    # qwen2 has a qkv bias: 17 stages per layer, embedding once (layer 0), 2 whole-model.
    expected = 1 + 17 * DEMO_LAYERS + 2
    assert len(list(out.rglob("*.bin"))) == expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["files"]) == expected
    assert manifest["layers"] == list(range(DEMO_LAYERS))


def test_two_runs_are_byte_identical(tiny_gguf, tmp_path):
    dumps = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert (
            run(
                "trace",
                "--save-tensor",
                "all",
                "--save-tensor-layers",
                "all",
                "--save-tensor-dir",
                str(out),
                str(tiny_gguf),
            ).exit_code
            == 0
        )
        dumps.append(out)
    files = sorted(p.relative_to(dumps[0]) for p in dumps[0].rglob("*.bin"))
    assert files
    for rel in files:
        assert (dumps[0] / rel).read_bytes() == (dumps[1] / rel).read_bytes(), rel


@pytest.mark.parametrize(
    "args",
    [
        ["--save-tensor", "attn_norm,,lm_head"],
        ["--save-tensor", "bogus"],
        ["--save-tensor", "all", "--save-tensor-layers", "5..2"],
        ["--save-tensor", "all", "--save-tensor-layers", "-1"],
        ["--save-tensor", "all", "--save-tensor-layers", "1.."],
        ["--tokens", "1,x"],
    ],
)
def test_plan_errors_exit_5_before_model_load(args, tmp_path):
    # The model does not exist: a plan error must still win (reported before loading).
    result = run("trace", *args, str(tmp_path / "missing.gguf"))
    assert result.exit_code == 5, result.output
    assert "error:" in result.output


def test_unknown_stage_message_lists_valid_names(tmp_path):
    result = run("trace", "--save-tensor", "attn_nrom", str(tmp_path / "x.gguf"))
    assert result.exit_code == 5
    assert "attn_nrom" in result.output and "ffn_swigl" in result.output


def test_layer_beyond_model_is_exit_5(tiny_gguf, tmp_path):
    result = run(
        "trace",
        "--save-tensor",
        "attn_norm",
        "--save-tensor-layers",
        "0..9",
        "--save-tensor-dir",
        str(tmp_path / "o"),
        str(tiny_gguf),
    )
    assert result.exit_code == 5, result.output
    assert "4 layers" in result.output
    assert not list((tmp_path).rglob("*.bin"))


def test_missing_model_exit_3(tmp_path):
    result = run("trace", str(tmp_path / "nope.gguf"))
    assert result.exit_code == 3
    assert "not found" in result.output


def test_garbage_model_exit_4(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all" * 10)
    result = run("trace", str(bad))
    assert result.exit_code == 4, result.output


def test_token_out_of_vocab_exit_5(tiny_gguf):
    result = run("trace", "--tokens", "1,999999", str(tiny_gguf))
    assert result.exit_code == 5, result.output
    assert "outside the vocabulary" in result.output


def test_stats_table_and_json(tiny_gguf):
    result = run("trace", str(tiny_gguf))
    assert result.exit_code == 0, result.output
    assert "post_ffn_residual" in result.output and "lm_head" in result.output
    result = run("trace", "--json", str(tiny_gguf))
    payload = json.loads(result.output)
    assert payload["schema"] == "aprtrace-trace-v1"
    names = [(s["stage"], s["layer"]) for s in payload["stats"]]
    assert names[0] == ("embedding", 0) and names[-1] == ("lm_head", None)
    assert len(names) == 1 + 17 * DEMO_LAYERS + 2
    first = payload["stats"][0]
    assert first["nan"] == 0 and first["count"] == len(payload["token_ids"]) * 128


def test_tokens_bypass_and_bos(tiny_gguf, tmp_path):
    result = run("trace", "--json", "--tokens", "5,6,7", str(tiny_gguf))
    assert json.loads(result.output)["token_ids"] == [5, 6, 7]
    plain = json.loads(run("trace", "--json", str(tiny_gguf)).output)["token_ids"]
    with_bos = json.loads(run("trace", "--json", "--bos", str(tiny_gguf)).output)["token_ids"]
    assert with_bos == [0] + plain


def test_stages_command_lists_20_in_order():
    result = run("stages", "--json")
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == [s.value for s in Stage]
    assert rows[-1]["scope"] == "whole-model" and rows[0]["scope"] == "per-layer"
    text = run("stages").output
    assert "ffn_swigl" in text and "layer_output" in text


def test_inspect_file_and_dir(tiny_gguf, tmp_path):
    out = tmp_path / "d"
    run(
        "trace", "--save-tensor", "attn_norm,lm_head", "--save-tensor-dir", str(out), str(tiny_gguf)
    )
    info = json.loads(run("inspect", "--json", str(out / "layer-0" / "attn_norm.bin")).output)
    values = np.fromfile(out / "layer-0" / "attn_norm.bin", dtype="<f4", offset=12)
    assert info["layer"] == 0 and info["dim_product"] == values.size
    assert info["max"] == pytest.approx(float(values.max()))
    assert info["mean"] == pytest.approx(float(values.astype(np.float64).mean()))
    listing = json.loads(run("inspect", "--json", str(out)).output)
    assert [f["path"] for f in listing["files"]] == ["layer-0/attn_norm.bin", "lm_head.bin"]
    assert listing["manifest"] is True


def test_help_has_examples():
    for cmd in ("trace", "stages", "inspect"):
        text = run(cmd, "--help").output
        assert "Examples:" in text and "aprtrace" in text


def test_inspect_apr_no_verify_reads_a_damaged_file(tiny_gguf, tmp_path):
    apr = tmp_path / "m.apr"
    assert run("convert", str(tiny_gguf), str(apr)).exit_code == 0
    data = bytearray(apr.read_bytes())
    data[len(data) // 2] ^= 1  # a data byte: the footer CRC no longer matches
    apr.write_bytes(bytes(data))
    damaged = run("inspect", str(apr))
    assert damaged.exit_code == 4 and "CRC" in damaged.output
    info = json.loads(run("inspect", "--no-verify", "--json", str(apr)).output)
    assert info["format"] == "apr" and info["apr"]["header"]["verified"] is False
