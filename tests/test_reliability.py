"""Reliability: hostile files, interrupted runs, output-directory safety, NaN/Inf.

Issue 6. Every parser rejects truncated and absurd inputs with InvalidFormatError (exit 4)
before allocating anything large; a killed ``trace`` never leaves a stage file that looks
complete but is not, nor a manifest for an unfinished dump; ``--clean`` removes only what an
earlier manifest lists; NaN/Inf in weights are traced, written bit-exactly, counted and located.
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from aprtrace.aprt import read_aprt
from aprtrace.cli import main
from aprtrace.errors import AprtraceError, InvalidFormatError
from aprtrace.formats import load_model
from aprtrace.stages import Stage
from reliability_models import seeds

MB = 1 << 20
ALLOC_CEILING = 200 * MB


def run_cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def traced_peak(fn) -> int:
    """Peak bytes allocated (Python and NumPy, via tracemalloc) while ``fn`` runs."""
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


# --- Truncated at every offset --------------------------------------------------------------


def _sweep(valid: bytes, path: Path, load, step: int = 1) -> dict[str, int]:
    """Load every proper prefix of ``valid``; return the error classes seen (name -> count)."""
    seen: dict[str, int] = {}
    for n in range(0, len(valid), step):
        path.write_bytes(valid[:n])
        try:
            load(path)
        except InvalidFormatError as exc:
            seen[type(exc).__name__] = seen.get(type(exc).__name__, 0) + 1
        else:
            pytest.fail(f"a {n}-byte prefix of a {len(valid)}-byte file loaded")
    return seen


@pytest.mark.slow
def test_gguf_truncated_at_every_offset(tmp_path):
    valid = seeds.write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    seen = _sweep(valid, tmp_path / "cut.gguf", load_model)
    assert sum(seen.values()) == len(valid)


@pytest.mark.slow
def test_apr_truncated_at_every_offset(tmp_path):
    valid = seeds.write_tiny_apr(tmp_path / "tiny.apr").read_bytes()
    _sweep(valid, tmp_path / "cut.apr", load_model)
    # Without the CRC checks the bounds checks alone must catch every truncation.
    _sweep(valid, tmp_path / "cut2.apr", lambda p: load_model(p, verify=False))


def test_aprt_truncated_at_every_offset(tmp_path):
    valid = seeds.aprt_seed()
    for mmap in (False, True):
        _sweep(valid, tmp_path / "cut.bin", lambda p, m=mmap: read_aprt(p, mmap=m))


def test_safetensors_truncated_at_every_offset(tmp_path):
    directory = seeds.write_tiny_safetensors(tmp_path / "hf")
    weights = directory / "model.safetensors"
    valid = weights.read_bytes()
    _sweep(valid, weights, lambda p: load_model(directory), step=3)


# --- Absurd counts and sizes: exit 4 at once, no large allocation ----------------------------


def _gstr(s: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(s) if length is None else length) + s


def gguf_bytes(
    n_tensors: int, kv: list[bytes], infos: list[bytes], n_kv: int | None = None, size: int = 1024
) -> bytes:
    body = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kv) if n_kv is None else n_kv)
    body += b"".join(kv) + b"".join(infos)
    return body + bytes(max(0, size - len(body)))


def _tensor_info(name: bytes, dims: list[int], type_id: int = 0, offset: int = 0) -> bytes:
    return _gstr(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, offset)


_ARCH_KV = _gstr(b"general.architecture") + struct.pack("<I", 8) + _gstr(b"qwen2")
HOSTILE_GGUF = {
    "2^40 tensors": gguf_bytes(1 << 40, [], []),
    "2^62 metadata entries": gguf_bytes(0, [], [], n_kv=1 << 62),
    "2^62-byte key": gguf_bytes(0, [_gstr(b"k", 1 << 62)], []),
    "2^62-byte string value": gguf_bytes(
        0, [_gstr(b"general.name") + struct.pack("<I", 8) + _gstr(b"x", 1 << 62)], []
    ),
    "2^40-item array": gguf_bytes(
        0, [_gstr(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1 << 40)], []
    ),
    "2^40-item u32 array": gguf_bytes(0, [_gstr(b"a") + struct.pack("<IIQ", 9, 4, 1 << 40)], []),
    "tensor past EOF": gguf_bytes(1, [_ARCH_KV], [_tensor_info(b"token_embd.weight", [1 << 40])]),
    "dims overflow u64": gguf_bytes(
        1, [_ARCH_KV], [_tensor_info(b"t.weight", [1 << 40, 1 << 40, 1 << 40, 1 << 40])]
    ),
    "duplicate tensor names": gguf_bytes(
        2, [_ARCH_KV], [_tensor_info(b"t.weight", [4]), _tensor_info(b"t.weight", [4], offset=32)]
    ),
    "overlapping tensors": gguf_bytes(
        2, [_ARCH_KV], [_tensor_info(b"a.weight", [16]), _tensor_info(b"b.weight", [16], offset=32)]
    ),
    "5 dimensions": gguf_bytes(1, [_ARCH_KV], [_tensor_info(b"t.weight", [1, 1, 1, 1, 1])]),
    "nested arrays 2^40": gguf_bytes(0, [_gstr(b"a") + struct.pack("<IIQ", 9, 9, 1 << 40)], []),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_GGUF))
def test_hostile_gguf_fails_fast_without_big_allocation(tmp_path, case):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(HOSTILE_GGUF[case])
    assert path.stat().st_size <= 1024

    def load():
        with pytest.raises(InvalidFormatError):
            load_model(path)

    start = time.perf_counter()
    assert traced_peak(load) < ALLOC_CEILING
    assert time.perf_counter() - start < 2.0
    result = run_cli("inspect", path)
    assert result.exit_code == 4 and "Traceback" not in result.stderr


def test_huge_block_count_is_a_load_error_not_a_memory_blowup(tmp_path):
    """A valid file whose metadata claims 2^40 layers (found by fuzzing: it built 2^40 names)."""
    valid = seeds.write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    key = _gstr(b"qwen2.block_count") + struct.pack("<I", 4)  # type UINT32
    at = valid.index(key) + len(key)
    hostile = valid[:at] + struct.pack("<I", 0xFFFFFFFF) + valid[at + 4 :]
    path = tmp_path / "layers.gguf"
    path.write_bytes(hostile)

    def load():
        with pytest.raises(AprtraceError, match="4294967295"):
            load_model(path)

    assert traced_peak(load) < ALLOC_CEILING
    assert run_cli("trace", path).exit_code == 6


def _apr_with(header_fields: dict, tmp_path: Path) -> Path:
    """The tiny APR with header fields replaced and both CRCs made valid again."""
    valid = bytearray(seeds.write_tiny_apr(tmp_path / "tiny.apr").read_bytes())
    offsets = {
        "tensor_count": (8, "<I"),
        "metadata_size": (20, "<I"),
        "tensor_index_offset": (24, "<Q"),
        "data_offset": (32, "<Q"),
    }
    for name, value in header_fields.items():
        off, fmt = offsets[name]
        struct.pack_into(fmt, valid, off, value)
    struct.pack_into("<I", valid, 40, zlib.crc32(bytes(valid[:40]) + bytes(valid[44:64])))
    struct.pack_into("<I", valid, len(valid) - 4, zlib.crc32(bytes(valid[:-4])))
    path = tmp_path / "hostile.apr"
    path.write_bytes(bytes(valid))
    return path


@pytest.mark.parametrize(
    "fields",
    [
        {"tensor_count": 0xFFFFFFFF},
        {"metadata_size": 0xFFFFFFFF},
        {"tensor_index_offset": 1 << 62},
        {"data_offset": (1 << 64) - 1},
    ],
)
def test_hostile_apr_header_fails_fast(tmp_path, fields):
    path = _apr_with(fields, tmp_path)

    def load():
        with pytest.raises(InvalidFormatError):
            load_model(path)

    assert traced_peak(load) < ALLOC_CEILING
    assert run_cli("inspect", path).exit_code == 4


def test_aprt_claiming_2_32_values_in_12_bytes(tmp_path):
    path = tmp_path / "huge.bin"
    path.write_bytes(struct.pack("<4sII", b"APRT", 0, 0xFFFFFFFF))

    def load():
        with pytest.raises(InvalidFormatError, match="truncated APRT body"):
            read_aprt(path)

    assert traced_peak(load) < ALLOC_CEILING
    assert run_cli("inspect", path).exit_code == 4


def test_safetensors_header_length_2_62(tmp_path):
    directory = seeds.write_tiny_safetensors(tmp_path / "hf")
    weights = directory / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 1 << 62) + weights.read_bytes()[8:])

    def load():
        with pytest.raises(InvalidFormatError):
            load_model(directory)

    assert traced_peak(load) < ALLOC_CEILING
    assert run_cli("trace", directory).exit_code == 4


# --- Interrupted runs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """24 layers, hidden 128: a full-dump trace writes 411 files over about a second."""
    cfg = seeds.tiny_config(
        hidden_size=128,
        num_layers=24,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=256,
    )
    return seeds.write_tiny_gguf(tmp_path_factory.mktemp("big") / "big.gguf", cfg)


@pytest.fixture(scope="module")
def reference_dump(big_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "dump"
    result = run_cli(
        "trace",
        "--save-tensor",
        "all",
        "--save-tensor-layers",
        "all",
        "--save-tensor-dir",
        out,
        "-q",
        big_model,
    )
    assert result.exit_code == 0, result.stderr
    return out


def _trace_process(model: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aprtrace",
            "trace",
            "--save-tensor",
            "all",
            "--save-tensor-layers",
            "all",
            "--save-tensor-dir",
            str(out),
            "-q",
            str(model),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_layers(proc: subprocess.Popen, out: Path, layers: int, timeout: float = 60) -> None:
    """Return once ``layers`` layer directories exist under ``out``, in its staging directory
    or in ``out`` itself (or the process ended)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            roots = [out] + [
                Path(e.path) for e in os.scandir(out) if e.name.startswith(".aprtrace-")
            ]
            found = sum(1 for r in roots for e in os.scandir(r) if e.name.startswith("layer-"))
            if found >= layers:
                return
        except (FileNotFoundError, NotADirectoryError):
            pass
        time.sleep(0.002)


def _visible_files(out: Path) -> dict[str, bytes]:
    """Every file of a dump under its final name (hidden staging and lock files excluded)."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out).parts)
    }


def _check_killed_run(out: Path, before: dict[str, bytes], reference: Path, finished: bool) -> None:
    """A killed run leaves the previous dump whole; a finished one the reference dump. Only in
    the commit (renames only) may a kill leave a dump without a manifest, and then
    every file holds either the old bytes or the new run's."""
    after = _visible_files(out)
    new = _visible_files(reference)

    def stage_files(files: dict[str, bytes]) -> dict[str, bytes]:
        return {k: v for k, v in files.items() if k != "manifest.json"}

    if finished:
        assert stage_files(after) == stage_files(new)
        return
    if "manifest.json" in after:
        # Killed before the commit: the previous dump; after the manifest: the new one.
        assert after == before or stage_files(after) == stage_files(new), (
            "a killed run left a manifest over a mix of old and new files"
        )
        return
    for rel, data in after.items():  # killed inside the commit
        assert data in (before.get(rel), new.get(rel)), rel


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_sigkill_leaves_only_complete_stage_files(big_model, reference_dump, tmp_path, seed):
    rng = random.Random(seed)
    out = tmp_path / "dump"
    if seed in (1, 3):  # a complete earlier dump (other token ids) in the same directory
        result = run_cli(
            "trace", "--save-tensor", "all", "--save-tensor-layers", "all",
            "--save-tensor-dir", out, "--tokens", "1,2,3", "-q", big_model,
        )  # fmt: skip
        assert result.exit_code == 0
    before = _visible_files(out) if out.exists() else {}
    proc = _trace_process(big_model, out)
    if seed < 4:
        _wait_for_layers(proc, out, rng.randint(1, 23))
    else:
        time.sleep(rng.uniform(0.5, 2.5))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    finished = proc.returncode == 0
    assert finished or proc.returncode == -signal.SIGKILL
    if out.exists():
        _check_killed_run(out, before, reference_dump, finished)
    # The next run into the directory removes what the killed one left behind.
    result = run_cli("trace", "--save-tensor", "embedding", "--save-tensor-dir", out, big_model)
    assert result.exit_code == 0, result.stderr
    assert not [p for p in out.rglob(".*") if p.name != ".aprtrace.lock"]
    assert not (out / ".aprtrace.lock").exists()


@pytest.mark.slow
def test_sigint_exits_130_with_one_line(big_model, reference_dump, tmp_path):
    out = tmp_path / "dump"
    proc = _trace_process(big_model, out)
    _wait_for_layers(proc, out, 3)
    assert proc.poll() is None, "the trace finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    assert stderr.strip().count("\n") == 0 and stderr.startswith("interrupted")
    # Ctrl-C removes the staging directory, the file being written and the lock.
    assert list(out.rglob("*")) == []


# --- Output directory safety ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return seeds.write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def _trace(model: Path, out: Path, *extra: str):
    return run_cli("trace", "--save-tensor-dir", out, *extra, model)


def test_stale_bin_files_are_reported(tiny, tmp_path):
    out = tmp_path / "dump"
    assert _trace(tiny, out, "--save-tensor", "all").exit_code == 0
    result = _trace(tiny, out, "--save-tensor", "embedding")
    assert result.exit_code == 0
    assert "are not from this run (stale)" in result.stderr
    assert "stale: " in result.stderr and "layer-0/attn_norm.bin" in result.stderr
    doc = json.loads(_trace(tiny, out, "--save-tensor", "embedding", "--json").stdout)
    assert f"{out}/lm_head.bin" in doc["stale_files"]
    assert f"{out}/layer-0/embedding.bin" not in doc["stale_files"]


def test_clean_removes_only_files_the_manifest_lists(tiny, tmp_path):
    out = tmp_path / "dump"
    assert _trace(tiny, out, "--save-tensor", "all").exit_code == 0
    unrelated = out / "notes.txt"
    unrelated.write_text("mine")
    foreign_bin = out / "layer-0" / "from-apr.bin"  # e.g. written by apr: not in the manifest
    foreign_bin.write_bytes(seeds.aprt_seed())
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"keep")
    (out / "layer-0" / "link.bin").symlink_to(outside)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"].append(
        {"path": "layer-0/link.bin", "stage": "attn_norm", "layer": 0, "shape": [1], "bytes": 4}
    )
    (out / "manifest.json").write_text(json.dumps(manifest))

    result = _trace(tiny, out, "--save-tensor", "embedding", "--clean")
    assert result.exit_code == 0, result.stderr
    # What survives is reported as not from this run; the files it removed are not.
    stale = sorted(
        line.split("/dump/")[1]
        for line in result.stderr.splitlines()
        if line.strip().startswith("stale: ")
    )
    assert stale == ["layer-0/from-apr.bin", "layer-0/link.bin"]
    assert unrelated.read_text() == "mine" and foreign_bin.exists()
    assert outside.read_bytes() == b"keep"  # a link out of the dump is never followed
    assert not (out / "lm_head.bin").exists() and not (out / "layer-0" / "attn_norm.bin").exists()
    assert (out / "layer-0" / "embedding.bin").exists() and (out / "manifest.json").exists()


def test_clean_refuses_a_manifest_pointing_outside(tiny, tmp_path):
    out = tmp_path / "dump"
    assert _trace(tiny, out, "--save-tensor", "embedding").exit_code == 0
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"keep")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"].append(
        {"path": "../victim.bin", "stage": "x", "layer": None, "shape": [1], "bytes": 4}
    )
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = _trace(tiny, out, "--save-tensor", "embedding", "--clean")
    assert result.exit_code == 4 and "malformed manifest" in result.stderr
    assert victim.read_bytes() == b"keep"


def test_failed_write_leaves_no_partial_file_and_no_manifest(tiny, tmp_path, monkeypatch):
    from aprtrace import capture
    from aprtrace.errors import OutputError

    out = tmp_path / "dump"
    assert _trace(tiny, out, "--save-tensor", "all", "--tokens", "1,2").exit_code == 0
    before = _visible_files(out)
    real_write = capture.write_aprt
    calls = []

    def disk_full_on_the_fifth(path, layer, values):
        calls.append(path)
        if len(calls) == 5:
            raise OutputError(f"cannot write {path}: No space left on device")
        return real_write(path, layer, values)

    monkeypatch.setattr(capture, "write_aprt", disk_full_on_the_fifth)
    result = _trace(tiny, out, "--save-tensor", "all")
    assert result.exit_code == 8  # apr reports a failed stage write as an inference failure
    assert "No space left" in result.stderr and "Traceback" not in result.stderr
    assert _visible_files(out) == before  # the previous dump, manifest included, is whole
    assert sorted(p.name for p in out.iterdir()) == [
        "final_norm.bin",
        "layer-0",
        "lm_head.bin",
        "manifest.json",
    ]  # no staging directory, no temporary, no lock left


def test_layer_path_that_is_a_file_is_refused_before_the_run(tiny, tmp_path):
    out = tmp_path / "dump"
    out.mkdir()
    (out / "layer-0").write_text("a file where the layer directory should be")
    result = _trace(tiny, out, "--save-tensor", "all")
    assert result.exit_code == 7
    assert "layer-0 is a file, not a dump directory" in result.stderr
    assert "Traceback" not in result.stderr
    assert [p.name for p in out.rglob("*")] == ["layer-0"]


def test_failed_run_keeps_the_old_manifest(tiny, tmp_path):
    out = tmp_path / "dump"
    assert _trace(tiny, out, "--save-tensor", "all").exit_code == 0
    (out / "layer-0" / "ffn_up.bin").unlink()
    (out / "layer-0" / "ffn_up.bin").mkdir()  # not a stage file: the run refuses to start
    before = _visible_files(out)
    result = _trace(tiny, out, "--save-tensor", "all")
    assert result.exit_code == 7 and "ffn_up.bin is a directory" in result.stderr
    assert _visible_files(out) == before and (out / "manifest.json").exists()


# --- Numerical hazards ------------------------------------------------------------------------

NAN_PAYLOAD = 0x7FC00001


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory) -> tuple[Path, int]:
    """Embedding row 5 holds a NaN payload, -0.0 and +-Inf; up_proj row 2 holds a NaN."""
    cfg = seeds.tiny_config()
    weights = seeds.tiny_weights(cfg)
    row = weights["model.embed_tokens.weight"][5]
    row[:4] = np.array([NAN_PAYLOAD, 0x80000000, 0x7F800000, 0xFF800000], np.uint32).view(
        np.float32
    )
    weights["model.layers.0.mlp.up_proj.weight"][2, 3] = np.nan
    path = tmp_path_factory.mktemp("nan") / "nan.gguf"
    return seeds.write_tiny_gguf(path, cfg, weights=weights), 5


def test_nan_weights_trace_and_are_written_bit_exactly(nan_model, tmp_path):
    path, token = nan_model
    out = tmp_path / "dump"
    result = run_cli(
        "trace", "--save-tensor", "all", "--save-tensor-dir", out, "--tokens", f"1,{token},2", path
    )
    assert result.exit_code == 0, result.stderr
    assert "warning: first NaN/Inf appears at layer 0 embedding" in result.stderr
    emb = read_aprt(out / "layer-0" / "embedding.bin").values.reshape(3, 8)
    assert emb[1, :4].view(np.uint32).tolist() == [NAN_PAYLOAD, 0x80000000, 0x7F800000, 0xFF800000]
    assert np.isfinite(emb[[0, 2]]).all()
    assert run_cli("inspect", out).exit_code == 0


def test_nan_in_a_weight_is_located_and_counted(nan_model):
    path, _ = nan_model
    result = run_cli("trace", "--tokens", "1,2,3", "--json", path)  # row 5 unused
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    # up_proj row 2 has a NaN: column 2 of ffn_up is NaN for each of the 3 tokens.
    assert doc["first_nonfinite"] == {"stage": "ffn_up", "layer": 0}
    stats = {(s["stage"], s["layer"]): s for s in doc["stats"]}
    assert stats[("ffn_norm", 0)]["nan"] == 0
    assert stats[("ffn_up", 0)]["nan"] == 3 and stats[("ffn_up", 0)]["inf"] == 0
    assert stats[("ffn_swigl", 0)]["nan"] == 3
    assert stats[("ffn_out", 0)]["nan"] == 3 * 8  # the down projection mixes every column
    text = run_cli("trace", "--tokens", "1,2,3", path)
    assert "warning: first NaN/Inf appears at layer 0 ffn_up" in text.stderr
    assert "3 NaN" in text.stdout


def test_nan_everywhere_does_not_crash_the_forward_pass(tmp_path):
    cfg = seeds.tiny_config()
    weights = {k: np.full_like(v, np.nan) for k, v in seeds.tiny_weights(cfg).items()}
    path = seeds.write_tiny_gguf(tmp_path / "allnan.gguf", cfg, weights=weights)
    result = run_cli(
        "trace",
        "--save-tensor",
        "all",
        "--save-tensor-dir",
        tmp_path / "d",
        "--tokens",
        "1,2",
        path,
    )
    assert result.exit_code == 0, result.stderr
    logits = read_aprt(tmp_path / "d" / "lm_head.bin").values
    assert logits.size == cfg.vocab_size and np.isnan(logits).all()


def test_stage_buffers_are_the_ones_emitted(nan_model):
    """Guard for the NaN tests: row 5's Inf reaches attn_norm as NaN (x/inf), located there."""
    from aprtrace.forward import forward

    model = load_model(nan_model[0])
    seen: list[tuple[Stage, int | None, bool]] = []
    forward(model, [5], lambda s, layer, v: seen.append((s, layer, bool(np.isfinite(v).all()))))
    assert seen[0] == (Stage.EMBEDDING, 0, False)
