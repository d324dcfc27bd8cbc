"""``maybe_save_stage``: the single gate of every capture point (FORMATS.md section 3)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from aprtrace.capture import CaptureLog, WrittenFile, maybe_save_stage
from aprtrace.errors import InferenceError, OutputError
from aprtrace.plan import make_plan
from aprtrace.stages import Stage


def plan_for(out: Path, stages: str = "all", layers: str = "0..1"):
    return make_plan(stages, layers, out, out.parent / "model.gguf")


def header(path: Path) -> tuple[bytes, int, int]:
    return struct.unpack("<4sII", path.read_bytes()[:12])


def test_no_plan_is_a_no_op(tmp_path: Path) -> None:
    log = CaptureLog()
    assert maybe_save_stage(None, Stage.EMBEDDING, 0, np.ones(3, np.float32), log) is None
    assert log.files == [] and list(tmp_path.iterdir()) == []


def test_unselected_stage_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "dump"
    plan = plan_for(out, stages="ffn_gate")
    log = CaptureLog()
    for stage in Stage:
        if stage is not Stage.FFN_GATE:
            assert maybe_save_stage(plan, stage, 0, np.ones(2, np.float32), log) is None
    assert not out.exists()  # not even the directory
    assert log.files == []


def test_unselected_layer_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "dump"
    plan = plan_for(out, stages="ffn_gate", layers="2..4")
    assert maybe_save_stage(plan, Stage.FFN_GATE, 1, np.ones(2, np.float32)) is None
    assert maybe_save_stage(plan, Stage.FFN_GATE, 4, np.ones(2, np.float32)) is None
    assert not out.exists()


def test_per_layer_path_and_header(tmp_path: Path) -> None:
    out = tmp_path / "dump"
    plan = plan_for(out, stages="ffn_gate", layers="0..4,10")
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = maybe_save_stage(plan, Stage.FFN_GATE, 10, values)
    assert path == out / "layer-10" / "ffn_gate.bin"
    data = path.read_bytes()
    assert data[:12] == b"APRT\x0a\x00\x00\x00\x06\x00\x00\x00"
    assert data[12:] == struct.pack("<6f", 0, 1, 2, 3, 4, 5)


@pytest.mark.parametrize("stage", [Stage.FINAL_NORM, Stage.LM_HEAD])
def test_whole_model_path_and_header(tmp_path: Path, stage: Stage) -> None:
    out = tmp_path / "dump"
    # The layer filter applies to per-layer stages only.
    plan = plan_for(out, stages=stage.value, layers="5")
    path = maybe_save_stage(plan, stage, None, np.array([1.5, -0.0], dtype=np.float32))
    assert path == out / f"{stage.value}.bin"
    assert path.read_bytes()[:12] == b"APRT\xff\xff\xff\xff\x02\x00\x00\x00"
    assert path.read_bytes()[12:] == b"\x00\x00\xc0\x3f\x00\x00\x00\x80"
    assert sorted(p.name for p in out.iterdir()) == [f"{stage.value}.bin"]


def test_whole_model_stage_ignores_layer_argument(tmp_path: Path) -> None:
    out = tmp_path / "dump"
    path = maybe_save_stage(plan_for(out, "lm_head"), Stage.LM_HEAD, 3, np.ones(1, np.float32))
    assert path == out / "lm_head.bin"
    assert header(path)[1] == 0xFFFFFFFF


def test_embedding_written_as_layer_zero(tmp_path: Path) -> None:
    out = tmp_path / "dump"
    path = maybe_save_stage(plan_for(out, "embedding"), Stage.EMBEDDING, 0, np.ones(4, np.float32))
    assert path == out / "layer-0" / "embedding.bin"
    assert header(path) == (b"APRT", 0, 4)


def test_embedding_not_written_when_layer_zero_excluded(tmp_path: Path) -> None:
    out = tmp_path / "dump"
    plan = plan_for(out, "embedding,ffn_up", layers="1..3")
    assert maybe_save_stage(plan, Stage.EMBEDDING, 0, np.ones(4, np.float32)) is None
    assert not out.exists()
    assert maybe_save_stage(plan, Stage.FFN_UP, 1, np.ones(4, np.float32)) is not None
    assert [p.name for p in out.iterdir()] == ["layer-1"]


def test_values_pass_through_bit_exact(tmp_path: Path) -> None:
    bits = [0x7FC00000, 0x7FC00001, 0x80000000, 0x7F800000, 0xFF800000]
    values = np.array(bits, dtype=np.uint32).view(np.float32)
    path = maybe_save_stage(plan_for(tmp_path / "d"), Stage.ATTN_OUT, 0, values)
    assert path.read_bytes()[12:] == struct.pack("<5I", *bits)


def test_capture_log_records_writes_in_order(tmp_path: Path) -> None:
    out = tmp_path / "dump"
    plan = plan_for(out, "embedding,attn_norm,lm_head", layers="0..2")
    log = CaptureLog()
    maybe_save_stage(plan, Stage.EMBEDDING, 0, np.zeros((3, 4), np.float32), log)
    maybe_save_stage(plan, Stage.FFN_UP, 0, np.zeros(2, np.float32), log)  # not selected
    maybe_save_stage(plan, Stage.ATTN_NORM, 1, np.zeros((3, 4), np.float32), log)
    maybe_save_stage(plan, Stage.ATTN_NORM, 2, np.zeros((3, 4), np.float32), log)  # layer 2 out
    maybe_save_stage(plan, Stage.LM_HEAD, None, np.zeros(7, np.float32), log)
    assert log.files == [
        WrittenFile(Stage.EMBEDDING, 0, out / "layer-0" / "embedding.bin", 12 + 48, (3, 4)),
        WrittenFile(Stage.ATTN_NORM, 1, out / "layer-1" / "attn_norm.bin", 12 + 48, (3, 4)),
        WrittenFile(Stage.LM_HEAD, None, out / "lm_head.bin", 12 + 28, (7,)),
    ]
    for entry in log.files:
        assert entry.path.stat().st_size == entry.size


def test_repeated_capture_is_byte_identical(tmp_path: Path) -> None:
    values = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    a = maybe_save_stage(plan_for(tmp_path / "a"), Stage.FFN_NORM, 0, values)
    b = maybe_save_stage(plan_for(tmp_path / "b"), Stage.FFN_NORM, 0, values)
    assert a.read_bytes() == b.read_bytes()


def test_write_failure_is_inference_error(tmp_path: Path) -> None:
    blocker = tmp_path / "dump"
    blocker.write_bytes(b"a file where the output directory should be")
    log = CaptureLog()
    with pytest.raises(InferenceError) as info:
        maybe_save_stage(plan_for(blocker), Stage.EMBEDDING, 0, np.ones(2, np.float32), log)
    assert info.value.exit_code == 8
    assert isinstance(info.value.__cause__, OutputError)
    assert str(blocker) in info.value.message
    assert info.value.hint
    assert log.files == []
