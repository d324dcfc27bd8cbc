"""Nothing the user had is ever lost (issue 14): the standing adversarial suite.

Classes: output ownership (failed runs, foreign manifests, crafted manifests, symlinks,
concurrent runs, orphans, signals), writers that refuse what is not theirs (convert, reports),
bounded reads (JSON bombs, FIFOs, devices, huge numbers), hostile command-line bytes and
non-UTF-8 names, and a model file truncated while it is in use.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import aprtrace
from aprtrace.aprt import write_aprt
from aprtrace.cli import main
from aprtrace.errors import OutputError
from aprtrace.formats import load_model
from aprtrace.stages import WHOLE_MODEL_LAYER
from reliability_models import seeds

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses run the aprtrace these tests import (so the suite can be pointed at any tree).
SRC = Path(aprtrace.__file__).resolve().parents[1]


def run_cli(*args):
    return CliRunner().invoke(
        main, [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args]
    )


def snapshot(directory: Path) -> dict[str, bytes | str]:
    """Every entry under ``directory``: file bytes, or the target of a symlink."""
    out: dict[str, bytes | str] = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_symlink():
            out[rel] = f"-> {os.readlink(path)}"
        elif path.is_file():
            out[rel] = path.read_bytes()
        else:
            out[rel] = "<dir>"
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return seeds.write_tiny_gguf(tmp_path_factory.mktemp("own") / "tiny.gguf")


@pytest.fixture
def dump(tiny, tmp_path) -> Path:
    """A complete all-stage dump of ``tiny`` (20 files + manifest)."""
    out = tmp_path / "dump"
    result = run_cli("trace", "-q", "--save-tensor", "all", "--save-tensor-dir", out, tiny)
    assert result.exit_code == 0, result.stderr
    return out


def _trace(tiny, out, *extra):
    return run_cli("trace", "-q", "--save-tensor", "all", "--save-tensor-dir", out, *extra, tiny)


# --- Output ownership: failed runs ----------------------------------------------------------


@pytest.mark.parametrize(
    "extra, code",
    [
        (("--clean", "--tokens", "1,2,99999"), 5),  # outside the vocabulary (issue item 1)
        (("--tokens", "1,2,99999"), 5),
        (("--clean", "--save-tensor-layers", "7"), 5),  # beyond the model's layers
        (("--clean", "--prompt", "abc\udcff"), 5),  # not UTF-8
        (("--clean", "--tokens", "9223372036854775808"), 5),
        (("--clean", "--tokens", ""), 5),
    ],
)
def test_failed_run_leaves_the_previous_dump_whole(tiny, dump, extra, code):
    before = snapshot(dump)
    result = _trace(tiny, dump, *extra)
    assert result.exit_code == code, result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(dump) == before


def test_run_failing_in_the_forward_pass_leaves_the_previous_dump_whole(tiny, dump):
    from aprtrace.errors import InferenceError
    from aprtrace.plan import make_plan
    from aprtrace.trace import run_trace

    def fail_after_the_first_layer(done: int, total: int) -> None:
        raise InferenceError("injected failure after the first layer")

    plan = make_plan("all", "all", dump, tiny)
    before = snapshot(dump)
    with pytest.raises(InferenceError, match="injected"):
        run_trace(load_model(tiny), [5, 6], plan, clean=True, progress=fail_after_the_first_layer)
    written = [p for p in dump.rglob("*") if ".aprtrace-staging" in str(p)]
    assert snapshot(dump) == before and written == []


# --- Output ownership: manifests ------------------------------------------------------------

FOREIGN_MANIFEST = b'{"manifest_version": 3, "name": "my web extension", "version": "1.0"}\n'


@pytest.mark.parametrize("clean", [False, True])
def test_foreign_manifest_is_never_replaced(tiny, tmp_path, clean):
    out = tmp_path / "ext"
    out.mkdir()
    (out / "manifest.json").write_bytes(FOREIGN_MANIFEST)
    (out / "main.js").write_text("code")
    before = snapshot(out)
    result = _trace(tiny, out, *(["--clean"] if clean else []))
    assert result.exit_code == 7
    assert "was not written by aprtrace" in result.stderr and "refusing" in result.stderr
    assert snapshot(out) == before  # no stage file, no staging directory, no lock left


@pytest.mark.parametrize("content", [b"not json at all", b"[1, 2]", b"\xff\xfe", b""])
def test_unreadable_manifest_is_foreign_too(tiny, tmp_path, content):
    out = tmp_path / "d"
    out.mkdir()
    (out / "manifest.json").write_bytes(content)
    result = _trace(tiny, out)
    assert result.exit_code == 7 and "was not written by aprtrace" in result.stderr
    assert (out / "manifest.json").read_bytes() == content


def test_manifest_with_the_schema_but_without_the_marker_is_foreign(tiny, dump):
    doc = json.loads((dump / "manifest.json").read_text())
    del doc["tool"]
    (dump / "manifest.json").write_text(json.dumps(doc))
    before = snapshot(dump)
    result = _trace(tiny, dump, "--clean")
    assert result.exit_code == 7 and "tool 'aprtrace'" in result.stderr
    assert snapshot(dump) == before


def test_manifest_symlink_and_fifo_are_refused(tiny, tmp_path):
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(b"{}")
    for kind in ("symlink", "fifo"):
        out = tmp_path / kind
        out.mkdir()
        if kind == "symlink":
            (out / "manifest.json").symlink_to(elsewhere)
        else:
            os.mkfifo(out / "manifest.json")
        result = _trace(tiny, out)
        assert result.exit_code == 7 and "not a manifest aprtrace wrote" in result.stderr
    assert elsewhere.read_bytes() == b"{}"


def _add_entries(dump: Path, *entries: dict) -> None:
    doc = json.loads((dump / "manifest.json").read_text())
    doc["files"].extend(entries)
    (dump / "manifest.json").write_text(json.dumps(doc))


def _entry(path, stage, layer=None, nbytes=4):
    return {"path": path, "stage": stage, "layer": layer, "shape": [1], "bytes": nbytes}


def test_clean_deletes_only_stage_files_it_can_prove_it_wrote(tiny, dump):
    (dump / "main.py").write_text("print('mine')")
    (dump / "model.gguf").write_bytes(b"GGUF my model")
    (dump / "layer-0" / "notes.bin").write_bytes(b"not a stage")
    (dump / "layer-3").mkdir()
    (dump / "layer-3" / "attn_norm.bin").write_bytes(b"mine, at a layout path")
    write_aprt(dump / "attn_norm.bin", WHOLE_MODEL_LAYER, np.ones(1, np.float32))
    bad_size = dump / "layer-0" / "ffn_up.bin"  # an APRT file whose size the manifest misstates
    _add_entries(
        dump,
        _entry("main.py", "main"),
        _entry("model.gguf", "embedding"),
        _entry("layer-0/notes.bin", "notes", 0),
        _entry("layer-3/attn_norm.bin", "attn_norm", 3),
        _entry("attn_norm.bin", "attn_norm", None, 16),  # a per-layer stage at the top
    )
    doc = json.loads((dump / "manifest.json").read_text())
    for entry in doc["files"]:
        if entry["path"] == "layer-0/ffn_up.bin":
            entry["bytes"] += 4
    (dump / "manifest.json").write_text(json.dumps(doc))

    result = _trace(tiny, dump, "--clean", "--save-tensor", "embedding")
    assert result.exit_code == 0, result.stderr
    assert (dump / "main.py").read_text() == "print('mine')"
    assert (dump / "model.gguf").read_bytes() == b"GGUF my model"
    assert (dump / "layer-0" / "notes.bin").read_bytes() == b"not a stage"
    assert (dump / "layer-3" / "attn_norm.bin").read_bytes() == b"mine, at a layout path"
    assert bad_size.exists()  # listed, but its size does not match: not provably aprtrace's
    assert (dump / "attn_norm.bin").exists()  # not a layout path of its stage: kept
    assert not (dump / "layer-0" / "attn_norm.bin").exists()  # a genuine old stage file
    assert (dump / "layer-0" / "embedding.bin").exists()


def test_clean_never_deletes_through_a_symlinked_layer_directory(tiny, dump, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "attn_norm.bin"
    victim.write_bytes((dump / "layer-0" / "attn_norm.bin").read_bytes())
    (dump / "layer-5").symlink_to(outside, target_is_directory=True)
    _add_entries(dump, _entry("layer-5/attn_norm.bin", "attn_norm", 5, victim.stat().st_size))
    result = _trace(tiny, dump, "--clean", "--save-tensor", "embedding")
    assert result.exit_code == 0, result.stderr
    assert victim.exists()


def test_clean_with_an_unwritable_directory_is_refused_before_anything_changes(
    tiny, dump, monkeypatch
):
    real_access = os.access

    def layer0_read_only(path, mode, *args, **kwargs):
        if Path(path).name == "layer-0" and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", layer0_read_only)
    before = snapshot(dump)
    result = _trace(tiny, dump, "--clean")
    assert result.exit_code == 7 and "layer-0" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(dump) == before


def test_clean_permission_error_during_the_commit_is_a_clean_error(tiny, dump, monkeypatch):
    real_unlink = os.unlink

    def refuse(path, *args, **kwargs):
        if str(path).endswith("attn_norm.bin"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse)
    result = _trace(tiny, dump, "--clean", "--save-tensor", "embedding")
    assert result.exit_code == 8, result.stderr  # not 70
    assert "Permission denied" in result.stderr and "Traceback" not in result.stderr


# --- Output ownership: symlinks ---------------------------------------------------------------


def test_symlinked_layer_directory_is_not_followed(tiny, tmp_path):
    out = tmp_path / "dump"
    out.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "attn_norm.bin").write_bytes(b"precious")
    (out / "layer-0").symlink_to(outside, target_is_directory=True)
    result = _trace(tiny, out)
    assert result.exit_code == 7 and "symlink" in result.stderr
    assert snapshot(outside) == {"attn_norm.bin": b"precious"}
    assert sorted(p.name for p in out.iterdir()) == ["layer-0"]


def test_symlinked_stage_file_is_not_replaced(tiny, dump, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"precious")
    (dump / "lm_head.bin").unlink()
    (dump / "lm_head.bin").symlink_to(outside)
    before = snapshot(dump)
    result = _trace(tiny, dump)
    assert result.exit_code == 7 and "symlink" in result.stderr
    assert outside.read_bytes() == b"precious" and snapshot(dump) == before


def test_non_stage_file_at_a_stage_path_is_not_replaced(tiny, tmp_path):
    out = tmp_path / "dump"
    (out / "layer-0").mkdir(parents=True)
    (out / "layer-0" / "attn_norm.bin").write_bytes(b"my own data, not APRT")
    result = _trace(tiny, out)
    assert result.exit_code == 7 and "not an APRT stage file" in result.stderr
    assert (out / "layer-0" / "attn_norm.bin").read_bytes() == b"my own data, not APRT"


# --- Concurrent runs --------------------------------------------------------------------------


def test_second_run_into_a_locked_directory_fails_clearly(tiny, dump):
    from aprtrace.outdir import open_output

    held = open_output(dump, [], clean=False)
    try:
        before = snapshot(dump)
        result = _trace(tiny, dump, "--clean")
        assert result.exit_code == 7
        assert f"another aprtrace run (pid {os.getpid()}) is writing to" in result.stderr
        assert snapshot(dump) == before
    finally:
        held.close()
    assert _trace(tiny, dump).exit_code == 0
    assert not (dump / ".aprtrace.lock").exists()


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    cfg = seeds.tiny_config(
        hidden_size=128, num_layers=24, num_heads=4, num_kv_heads=2, head_dim=32,
        intermediate_size=256, max_position_embeddings=4096,
    )  # fmt: skip
    return seeds.write_tiny_gguf(tmp_path_factory.mktemp("bigown") / "big.gguf", cfg)


def _trace_process(model: Path, out: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "aprtrace", "trace", "--save-tensor", "all"]
    argv += ["--save-tensor-layers", "all", "--save-tensor-dir", str(out), "-q", *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(ROOT)]))
    return subprocess.Popen(
        [*argv, str(model)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _wait_for_staging_layers(proc, out: Path, layers: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            stagings = [e.path for e in os.scandir(out) if e.name.startswith(".aprtrace-staging")]
            if any(
                sum(1 for e in os.scandir(s) if e.name.startswith("layer-")) >= layers
                for s in stagings
            ):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.002)


@pytest.mark.slow
def test_two_processes_into_one_directory(big_model, tmp_path):
    out = tmp_path / "dump"
    long_prompt = ",".join(str(i % 100) for i in range(96))  # a run of about a second
    first = _trace_process(big_model, out, "--tokens", long_prompt)
    _wait_for_staging_layers(first, out, 1)
    # Stopped mid-run (it keeps its lock), so the second run surely starts while the first
    # is running, however loaded the machine is.
    first.send_signal(signal.SIGSTOP)
    try:
        assert first.poll() is None, "the first trace finished too early"
        second = _trace_process(big_model, out, "--tokens", "4,5,6")
        _, err2 = second.communicate(timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    _, err1 = first.communicate(timeout=120)
    assert first.returncode == 0, err1
    assert second.returncode == 7 and "another aprtrace run (pid" in err2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["token_ids"] == [i % 100 for i in range(96)]
    # Every file the manifest lists holds the first run's data: compare with a fresh run.
    ref = tmp_path / "ref"
    assert run_cli(
        "trace", "-q", "--save-tensor", "all", "--save-tensor-layers", "all",
        "--save-tensor-dir", ref, "--tokens", long_prompt, big_model,
    ).exit_code == 0  # fmt: skip
    for entry in manifest["files"]:
        assert (out / entry["path"]).read_bytes() == (ref / entry["path"]).read_bytes()


# --- Orphans from killed runs and signals ---------------------------------------------------


def test_orphans_of_killed_runs_are_removed_by_the_next_run(tiny, dump):
    staging = dump / ".aprtrace-staging-999999-deadbeef"
    (staging / "layer-0").mkdir(parents=True)
    (staging / "layer-0" / "attn_norm.bin").write_bytes(b"x" * 1000)
    orphans = [
        dump / "layer-0" / ".attn_norm.bin.999999.tmp",
        dump / ".manifest.json.999999.tmp",
        dump / ".lm_head.bin.999998.tmp",
    ]
    for path in orphans:
        path.write_bytes(b"half written")
    keep = [dump / ".notes.txt.999999.tmp", dump / ".my-hidden-file", dump / "layer-0" / "x.tmp"]
    for path in keep:
        path.write_bytes(b"mine")
    result = _trace(tiny, dump, "--save-tensor", "embedding")
    assert result.exit_code == 0, result.stderr
    assert "note: removed 4 leftovers of interrupted runs" in result.stderr
    assert not staging.exists() and not any(p.exists() for p in orphans)
    assert all(p.read_bytes() == b"mine" for p in keep)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_behave_like_ctrl_c(big_model, tmp_path, signum):
    out = tmp_path / "dump"
    assert run_cli(
        "trace", "-q", "--save-tensor", "all", "--save-tensor-layers", "all",
        "--save-tensor-dir", out, "--tokens", "1,2,3", big_model,
    ).exit_code == 0  # fmt: skip
    before = snapshot(out)
    proc = _trace_process(big_model, out)
    _wait_for_staging_layers(proc, out, 3)
    assert proc.poll() is None, "the trace finished before it could be signalled"
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    assert stderr.startswith(f"interrupted ({signal.Signals(signum).name})")
    assert stderr.strip().count("\n") == 0 and "Traceback" not in stderr
    assert snapshot(out) == before  # staging, temporaries and lock removed; old dump whole


def test_terminated_write_removes_its_temporary(tmp_path):
    from aprtrace.atomic import atomic_path
    from aprtrace.errors import Terminated

    target = tmp_path / "report.html"
    target.write_text("old")
    with pytest.raises(Terminated), atomic_path(target) as tmp, open(tmp, "wb") as f:
        f.write(b"new, half written")
        raise Terminated(signal.SIGTERM)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [target.name]


# --- Writers: convert -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return seeds.write_tiny_safetensors(tmp_path_factory.mktemp("hfown") / "hf")


def _convert(src, dst):
    return run_cli("convert", src, dst)


def test_convert_refuses_to_overwrite_its_source(tiny, tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(tiny.read_bytes())
    hard = tmp_path / "hard.gguf"
    os.link(src, hard)
    for dst in (src, hard, tmp_path / "." / "m.gguf"):
        result = _convert(src, dst)
        assert result.exit_code == 5 and "source file" in result.stderr, result.stderr
    assert src.read_bytes() == tiny.read_bytes()


def test_convert_refuses_a_destination_inside_the_source_directory(hf_dir):
    before = snapshot(hf_dir)
    for dst in (hf_dir / "model.safetensors", hf_dir / "config.json", hf_dir / "sub" / "x.apr"):
        result = _convert(hf_dir, dst)
        assert result.exit_code == 5 and "inside the source directory" in result.stderr
    assert snapshot(hf_dir) == before


def test_convert_refuses_a_non_regular_destination(tiny, tmp_path):
    fifo = tmp_path / "fifo.apr"
    os.mkfifo(fifo)
    directory = tmp_path / "dir.apr"
    directory.mkdir()
    for dst, kind in ((fifo, "FIFO"), (directory, "directory"), (Path("/dev/null"), "device")):
        result = _convert(tiny, dst)
        assert result.exit_code == 5 and kind in result.stderr, result.stderr
    assert Path("/dev/null").is_char_device() and fifo.is_fifo()


def test_convert_does_not_turn_a_symlink_into_a_file(tiny, tmp_path):
    target = tmp_path / "real.apr"
    target.write_bytes(b"old model")
    link = tmp_path / "link.apr"
    link.symlink_to(target)
    result = _convert(tiny, link)
    assert result.exit_code == 5 and "symlink" in result.stderr and str(target) in result.stderr
    assert link.is_symlink() and target.read_bytes() == b"old model"
    assert _convert(tiny, target).exit_code == 0  # the target itself is a regular file


def test_convert_removes_orphaned_temporaries_of_killed_runs(tiny, tmp_path):
    dst = tmp_path / "out.apr"
    dead = tmp_path / ".out.apr.999999.tmp"
    dead.write_bytes(b"x" * 100)
    alive = tmp_path / f".out.apr.{os.getppid()}.tmp"  # a live process's: kept
    alive.write_bytes(b"y")
    other = tmp_path / ".other.apr.999999.tmp"
    other.write_bytes(b"z")
    assert _convert(tiny, dst).exit_code == 0
    assert not dead.exists() and alive.exists() and other.exists()


def test_convert_non_utf8_names(tiny, tmp_path):
    src = Path(os.fsdecode(bytes(tmp_path) + b"/m\xff.gguf"))
    src.write_bytes(tiny.read_bytes())
    dst = Path(os.fsdecode(bytes(tmp_path) + b"/out\xfe.apr"))
    result = _convert(src, dst)
    assert result.exit_code == 0, result.stderr
    assert load_model(dst).config.hidden_size == load_model(tiny).config.hidden_size


@pytest.mark.parametrize("fmt", ["gguf", "safetensors"])
def test_model_truncated_before_convert_writes_is_a_clean_error(
    tiny, hf_dir, tmp_path, monkeypatch, fmt
):
    from aprtrace import convert

    if fmt == "gguf":
        src = victim = tmp_path / "m.gguf"
        src.write_bytes(tiny.read_bytes())
    else:
        src = _hf_copy(hf_dir, tmp_path / "src")
        victim = src / "model.safetensors"
    real_load = convert._load_source

    def load_then_truncate(path):
        model = real_load(path)
        os.truncate(victim, victim.stat().st_size - 256)  # another process truncates it
        return model

    monkeypatch.setattr(convert, "_load_source", load_then_truncate)
    out = tmp_path / "out"
    out.mkdir()
    result = _convert(src, out / "m.apr")
    # GGUF: the tokenizer is re-read from the file, which is now found truncated (exit 4);
    # safetensors: the size check before the first tensor is copied (exit 7). Never SIGBUS.
    assert result.exit_code == (4 if fmt == "gguf" else 7), result.stderr
    assert "truncated" in result.stderr or "shrank" in result.stderr
    assert list(out.iterdir()) == []


# --- Writers: reports -------------------------------------------------------------------------


@pytest.fixture
def two_dumps(tiny, tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    assert _trace(tiny, a).exit_code == 0 and _trace(tiny, b, "--tokens", "98,95,99").exit_code == 0
    return a, b


@pytest.mark.parametrize("option, name", [("--html", "r.html"), ("--plot", "h.svg")])
def test_report_writers_are_atomic(two_dumps, tmp_path, monkeypatch, option, name):
    a, _ = two_dumps
    report = tmp_path / name
    report.write_text("the previous report")

    def disk_full(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    result = run_cli("diff", "--values", a, a, option, report)
    assert result.exit_code == 7 and "No space left" in result.stderr
    assert report.read_text() == "the previous report"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_report_writer_refuses_a_symlink_and_a_fifo(two_dumps, tmp_path):
    a, _ = two_dumps
    target = tmp_path / "keep.html"
    target.write_text("keep")
    (tmp_path / "link.html").symlink_to(target)
    os.mkfifo(tmp_path / "fifo.svg")
    assert run_cli("diff", "--values", a, a, "--html", tmp_path / "link.html").exit_code == 7
    assert run_cli("diff", "--values", a, a, "--plot", tmp_path / "fifo.svg").exit_code == 7
    assert target.read_text() == "keep"


def test_diff_html_with_non_utf8_paths(tiny, tmp_path):
    base = bytes(tmp_path)
    a, b = (Path(os.fsdecode(base + name)) for name in (b"/a\xff", b"/b\xfe"))
    assert _trace(tiny, a).exit_code == 0 and _trace(tiny, b).exit_code == 0
    html = Path(os.fsdecode(base + b"/r\xff.html"))
    svg = Path(os.fsdecode(base + b"/p\xff.svg"))
    result = run_cli("diff", "--values", a, b, "--html", html, "--plot", svg)
    assert result.exit_code == 0, result.stderr
    assert "\ufffd" in html.read_text(encoding="utf-8") and svg.stat().st_size > 0


# --- Bounded reads: JSON bombs, special files, huge numbers -----------------------------------

DEEP = b"[" * 200_000 + b"]" * 200_000
HUGE_INT = b"9" * 5000


def _hf_copy(hf_dir: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "hf"
    directory.mkdir(parents=True)
    for p in hf_dir.iterdir():
        (directory / p.name).write_bytes(p.read_bytes())
    return directory


def _with_key(doc_bytes: bytes, key: str, raw_value: bytes) -> bytes:
    doc = json.loads(doc_bytes)
    doc[key] = "@@"
    return json.dumps(doc).encode().replace(b'"@@"', raw_value)


@pytest.mark.parametrize("bomb", ["deep", "huge_int", "deep_object"])
def test_json_bombs_in_config_index_and_tokenizer(hf_dir, tmp_path, bomb):
    d = _hf_copy(hf_dir, tmp_path)
    config = (d / "config.json").read_bytes()
    bombs = {
        "deep": DEEP,
        "huge_int": _with_key(config, "hidden_size", HUGE_INT),
        "deep_object": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    }
    for victim in ("config.json", "model.safetensors.index.json", "tokenizer.json"):
        d = _hf_copy(hf_dir, tmp_path / victim)
        if victim == "model.safetensors.index.json":
            (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
        (d / victim).write_bytes(bombs[bomb])
        result = run_cli("inspect", d)
        assert result.exit_code == 4, (victim, result.stderr[-300:])
        assert "internal error" not in result.stderr


@pytest.mark.parametrize("bomb", [DEEP, b'{"a": ' + HUGE_INT + b"}"], ids=["deep", "huge_int"])
def test_json_bombs_in_a_manifest(dump, bomb):
    from aprtrace.errors import InvalidFormatError
    from aprtrace.manifest import read_manifest

    (dump / "manifest.json").write_bytes(bomb)
    with pytest.raises(InvalidFormatError, match="malformed manifest"):
        read_manifest(dump)
    result = run_cli("diff", "--values", dump, dump)
    assert result.exit_code == 4 and "internal error" not in result.stderr


def _apr_with_metadata(metadata: bytes, tmp_path: Path) -> Path:
    from fuzz.targets import apr_with_metadata

    seed = seeds.write_tiny_apr(tmp_path / "seed.apr").read_bytes()
    path = tmp_path / "bomb.apr"
    path.write_bytes(apr_with_metadata(seed, metadata))
    return path


def test_json_bombs_in_apr_metadata_and_safetensors_header(tmp_path):
    for metadata in (b"[" * 100_000, b'{"hidden_size": ' + HUGE_INT + b"}"):
        path = _apr_with_metadata(metadata, tmp_path)
        assert run_cli("trace", "--no-verify", path).exit_code == 4
    header = DEEP[:90_000] + DEEP[-90_000:]
    st = tmp_path / "x.safetensors"
    st.write_bytes(struct.pack("<Q", len(header)) + header)
    (tmp_path / "config.json").write_text("{}")
    assert run_cli("inspect", st).exit_code == 4


def _runs_within(argv: list[str], seconds: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(ROOT)]))
    return subprocess.run(
        [sys.executable, "-m", "aprtrace", *argv],
        capture_output=True,
        text=True,
        timeout=seconds,
        env=env,
    )


@pytest.mark.parametrize("special", ["dev_zero", "fifo"])
@pytest.mark.parametrize("victim", ["config.json", "tokenizer.json", "manifest.json"])
def test_special_files_are_refused_without_reading_them(hf_dir, tmp_path, tiny, special, victim):
    if victim == "manifest.json":
        d = tmp_path / "dump"
        assert _trace(tiny, d).exit_code == 0
        argv = ["diff", "--values", str(d), str(d)]
    else:
        d = _hf_copy(hf_dir, tmp_path)
        argv = ["inspect", str(d)]
    target = d / victim
    target.unlink(missing_ok=True)
    if special == "dev_zero":
        target.symlink_to("/dev/zero")
    else:
        os.mkfifo(target)
    result = _runs_within(argv, 30)  # a hang or an unbounded read fails here
    assert result.returncode == 4, result.stderr
    assert "not a regular file" in result.stderr


def test_tokenizer_that_loads_but_cannot_encode_is_a_load_error(hf_dir, tmp_path):
    """Found by the fuzz campaign: an empty BPE vocabulary loads, then encode raises a bare
    Exception ("unknown token but unk_id is missing")."""
    from fuzz.targets import tokenizer_json_seed

    doc = json.loads(tokenizer_json_seed())
    del doc["model"]["type"]  # what the campaign's input did: untyped model, empty vocabulary
    doc["model"]["vocab"] = []
    d = _hf_copy(hf_dir, tmp_path)
    (d / "tokenizer.json").write_text(json.dumps(doc))
    result = run_cli("trace", d)
    assert result.exit_code == 6, result.stderr
    assert "tokenizer failed on the prompt" in result.stderr


def test_tokenizer_json_that_panics_the_tokenizers_library_is_invalid_format(hf_dir, tmp_path):
    """Found by the fuzz campaign: a continuing_subword_prefix longer than a merged token
    makes the tokenizers library panic (PanicException, a BaseException) while loading."""
    from fuzz.targets import tokenizer_json_seed

    doc = json.loads(tokenizer_json_seed())
    doc["model"]["continuing_subword_prefix"] = "abcd"
    d = _hf_copy(hf_dir, tmp_path)
    (d / "tokenizer.json").write_text(json.dumps(doc))
    result = run_cli("inspect", d)
    assert result.exit_code == 4 and "not a valid tokenizer.json" in result.stderr


@pytest.mark.parametrize(
    "shard",
    ["x" * 300 + ".safetensors", "\udcff.safetensors", "\ud800.safetensors", "a\u0000b", "../m"],
    ids=["too-long", "undecodable", "lone-surrogate", "nul", "parent"],
)
def test_index_shard_names_that_are_not_file_names(hf_dir, tmp_path, shard):
    """Found by the fuzz campaign (too long, lone surrogate): OSError / UnicodeEncodeError."""
    d = _hf_copy(hf_dir, tmp_path)
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    index = json.dumps({"weight_map": {"model.norm.weight": "@@"}}).replace(
        '"@@"', json.dumps(shard)
    )
    (d / "model.safetensors.index.json").write_text(index)
    result = run_cli("inspect", d)
    assert result.exit_code in (3, 4), result.stderr
    assert "internal error" not in result.stderr


def test_huge_integer_where_a_float_belongs(hf_dir, tmp_path):
    """Found by the fuzz campaign: float() of a 40-digit rope_theta raised OverflowError."""
    huge = "1" + "0" * 400
    d = _config_case(tmp_path, hf_dir, rope_theta=huge, rms_norm_eps=huge)
    result = run_cli("trace", d)
    assert result.exit_code == 6 and "rope_theta" in result.stderr
    seed = seeds.write_tiny_apr(tmp_path / "seed.apr").read_bytes()
    (meta_size,) = struct.unpack_from("<I", seed, 20)
    for key in ("rope_theta", "rms_norm_eps"):
        meta = json.loads(seed[64 : 64 + meta_size])
        meta[key] = "@@"
        text = json.dumps(meta).replace('"@@"', huge).encode()
        result = run_cli("trace", "--no-verify", _apr_with_metadata(text, tmp_path))
        assert result.exit_code == 6 and key in result.stderr, result.stderr


def test_apr_tokenizer_model_of_the_wrong_type(tmp_path):
    """Found by the fuzz campaign: a list as tokenizer.model raised AttributeError."""
    seed = seeds.write_tiny_apr(tmp_path / "seed.apr").read_bytes()
    (meta_size,) = struct.unpack_from("<I", seed, 20)
    meta = json.loads(seed[64 : 64 + meta_size])
    meta["tokenizer.model"] = ["gpt2", "gpt2"]
    result = run_cli(
        "trace", "--no-verify", _apr_with_metadata(json.dumps(meta).encode(), tmp_path)
    )
    assert result.exit_code in (4, 6) and "not supported" in result.stderr


def test_model_path_that_is_a_fifo_is_refused(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    result = _runs_within(["trace", str(fifo)], 30)
    assert result.returncode == 4 and "FIFO" in result.stderr


def test_stage_file_that_is_a_fifo_or_device_is_refused(tmp_path):
    fifo = tmp_path / "a.bin"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        result = _runs_within(["diff", "--values", str(path), str(path)], 30)
        assert result.returncode in (4, 5) and "internal error" not in result.stderr
        result = _runs_within(["inspect", str(path)], 30)
        assert result.returncode == 4 and "not a regular file" in result.stderr
    from aprtrace.aprt import read_aprt
    from aprtrace.errors import InvalidFormatError

    with pytest.raises(InvalidFormatError, match="not a regular file"):
        read_aprt(fifo)


def test_oversized_json_is_refused_by_a_cap_measured_while_reading(tmp_path):
    from aprtrace.errors import InvalidFormatError
    from aprtrace.safeio import read_json_file

    path = tmp_path / "big.json"
    path.write_bytes(b"[" + b"0," * 600_000 + b"0]")
    with pytest.raises(InvalidFormatError, match="limit"):
        read_json_file(path, 1 << 20)
    assert read_json_file(path, 2 << 20)[-1] == 0


def _config_case(tmp_path: Path, hf_dir: Path, **changes) -> Path:
    d = _hf_copy(hf_dir, tmp_path)
    config = (d / "config.json").read_bytes()
    for key, raw in changes.items():
        config = _with_key(config, key, raw.encode() if isinstance(raw, str) else raw)
    (d / "config.json").write_bytes(config)
    return d


LLAMA3 = (
    '{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, '
    '"original_max_position_embeddings": %s}'
)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"head_dim": "200000000", "rope_scaling": LLAMA3 % "8192"}, "head_dim"),
        ({"rope_scaling": LLAMA3 % "1e999"}, "original_max_position_embeddings"),
        ({"rope_scaling": LLAMA3.replace("4.0", "1.0") % "8192"}, "high_freq_factor"),
        ({"num_attention_heads": "0"}, "num_heads"),
        ({"hidden_size": "1e999"}, "hidden_size"),
        ({"vocab_size": "4000000000000"}, "vocab_size"),
        ({"num_hidden_layers": "100000000"}, "num_layers"),
        ({"max_position_embeddings": "-5"}, "max_position_embeddings"),
    ],
)
def test_config_numbers_are_range_checked_before_they_size_anything(
    hf_dir, tmp_path, changes, words
):
    d = _config_case(tmp_path, hf_dir, **changes)
    start = time.monotonic()
    result = run_cli("trace", d)
    assert result.exit_code in (4, 6), result.stderr
    assert words in result.stderr and "internal error" not in result.stderr
    assert time.monotonic() - start < 5


def test_apr_zero_heads_without_head_dim_is_a_load_error(tmp_path):
    seed = seeds.write_tiny_apr(tmp_path / "seed.apr").read_bytes()
    (meta_size,) = struct.unpack_from("<I", seed, 20)
    meta = json.loads(seed[64 : 64 + meta_size])
    meta["num_heads"] = 0
    meta.pop("head_dim", None)
    path = _apr_with_metadata(json.dumps(meta).encode(), tmp_path)
    result = run_cli("trace", "--no-verify", path)
    assert result.exit_code == 6 and "num_heads = 0" in result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--prompt", "abc\udcff"],
        ["--tokens", "9223372036854775808"],
        pytest.param(["--tokens", "1," + "9" * 5000], id="5000-digits"),
        ["--tokens", "18446744073709551616,1"],
    ],
)
def test_hostile_command_line_values_are_clean_errors(tiny, argv):
    result = run_cli("trace", *argv, tiny)
    assert result.exit_code == 5, result.stderr
    assert "internal error" not in result.stderr


def test_non_utf8_prompt_bytes_from_a_real_shell(tiny):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(ROOT)]))
    argv = [sys.executable.encode(), b"-m", b"aprtrace", b"trace", b"--prompt", b"abc\xff"]
    result = subprocess.run([*argv, bytes(tiny)], capture_output=True, env=env, timeout=60)
    assert result.returncode == 5 and b"not valid UTF-8" in result.stderr


# --- mmap under truncation --------------------------------------------------------------------


def test_model_truncated_during_the_forward_pass_is_a_clean_error(tiny, tmp_path):
    from aprtrace.forward import forward

    path = tmp_path / "m.gguf"
    path.write_bytes(tiny.read_bytes())
    model = load_model(path)
    os.truncate(path, 4096)  # the embedding and layer tensors now lie past the end
    with pytest.raises(OutputError, match="shrank"):
        forward(model, [1, 2, 3])


@pytest.mark.parametrize("fmt", ["apr", "safetensors"])
def test_truncation_check_covers_every_container(tmp_path, fmt):
    if fmt == "apr":
        path = seeds.write_tiny_apr(tmp_path / "m.apr")
        victim = path
    else:
        path = seeds.write_tiny_safetensors(tmp_path / "hf")
        victim = path / "model.safetensors"
    model = load_model(path)
    os.truncate(victim, 300)
    tensor = model.tensors["model.layers.0.mlp.up_proj.weight"]
    for read in (tensor.load, lambda: tensor.rows(0, 2), lambda: tensor.take(np.array([0, 1]))):
        with pytest.raises(OutputError, match="shrank"):
            read()


@pytest.mark.slow
def test_trace_of_a_model_truncated_mid_run_exits_7_with_a_message(big_model, tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(big_model.read_bytes())
    out = tmp_path / "dump"
    proc = _trace_process(model, out)
    _wait_for_staging_layers(proc, out, 2)
    assert proc.poll() is None, "the trace finished before the truncation"
    os.truncate(model, 8192)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 7, stderr  # never 135 (SIGBUS) without a message
    assert "shrank" in stderr or "Bus error" in stderr
    left = [p.name for p in out.iterdir()] if out.exists() else []
    if "shrank" in stderr:  # the size check caught it: a clean unwind
        assert left == []
    else:  # SIGBUS inside a decode: _exit at once; staging and lock wait for the next run
        assert all(name.startswith(".aprtrace") for name in left), left


def test_sigbus_inside_a_decode_exits_7_with_a_message(tmp_path):
    """The race the size check cannot close: the file shrinks while a mapping is read."""
    script = f"""
import mmap, os, numpy as np
from aprtrace.signals import install_sigbus_exit
assert install_sigbus_exit()
path = {str(tmp_path / "f.bin")!r}
open(path, "wb").write(b"x" * (1 << 20))
f = open(path, "rb")
m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
a = np.frombuffer(m, dtype=np.uint8)
os.truncate(path, 0)
print(int(a.sum()))
"""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 7 and "Bus error" in result.stderr


def test_terminate_handlers_are_restored_after_a_command(tiny, tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    assert run_cli("trace", "-q", tiny).exit_code == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before
    assert threading.current_thread() is threading.main_thread()


# --- Decode steps (issue 12) go through the same staging and ownership rules -----------------


def test_decode_step_files_are_staged_committed_and_cleaned(tiny, tmp_path):
    out = tmp_path / "dump"
    assert _trace(tiny, out, "--decode", "2").exit_code == 0
    assert (out / "decode-2" / "layer-0" / "attn_norm.bin").is_file()
    before = snapshot(out)
    failed = _trace(tiny, out, "--clean", "--decode-tokens", "1,99999")  # outside the vocab
    assert failed.exit_code == 5 and snapshot(out) == before
    result = _trace(tiny, out, "--clean", "--save-tensor", "embedding")
    assert result.exit_code == 0, result.stderr
    assert not [p for p in out.rglob("*.bin") if "decode-" in str(p)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_symlinked_decode_step_directory_is_not_followed(tiny, tmp_path):
    out = tmp_path / "dump"
    out.mkdir()
    outside = tmp_path / "outside"
    (outside / "layer-0").mkdir(parents=True)
    (outside / "layer-0" / "attn_norm.bin").write_bytes(b"precious")
    (out / "decode-1").symlink_to(outside, target_is_directory=True)
    result = _trace(tiny, out, "--decode", "1")
    assert result.exit_code == 7 and "decode-1 is a symlink" in result.stderr
    assert (outside / "layer-0" / "attn_norm.bin").read_bytes() == b"precious"
