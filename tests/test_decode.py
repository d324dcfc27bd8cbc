"""``--decode N``: decode steps through a KV cache, in every engine, and ``diff`` over the steps.

1. Self-consistency (every registered architecture): the stages of decode step k equal the last
   row of one prompt pass over prompt + the k fed tokens, up to float32 rounding. This holds
   exactly for a correct cache, whatever the weights, so it catches cache bugs that agreeing
   engines would share.
2. The NumPy engine's incremental path against transformers' cached decode (``DynamicCache``)
   on tiny seeded models of every registered architecture.
3. Bug injection: an off-by-one RoPE position in the decode path only, and a cache that drops
   its oldest entry once full, each named by ``diff`` at the right step, layer and stage.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

import hfref
from aprtrace import capture_decode, capture_stages
from aprtrace.arch import KVCache, PassContext, _load
from aprtrace.cli import main
from aprtrace.diff import diff_dirs, key_for
from aprtrace.errors import ValidationError
from aprtrace.formats import load_model
from aprtrace.plan import make_plan
from aprtrace.stages import Stage, stage_shape
from aprtrace.trace import run_trace

# Every architecture with a forward pass: modules added to the registry are tested too.
ARCHS = tuple(sorted(_load()))
PROMPT = "What is 2+2? The quick"
FORCED = [17, 250, 3, 99]
# float32 rounding: a one-row pass and a many-row pass sum in different orders.
ROUNDING = 2e-5
RELATIVE_BOUND = 1e-4  # against transformers, as tests/test_reference_tiny.py


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def tokenizer():
    return hfref.tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_dirs(tokenizer, tmp_path_factory):
    """``{arch: safetensors dir}`` of a tiny seeded transformers model per architecture."""
    out = {}
    for arch in ARCHS:
        directory = tmp_path_factory.mktemp(f"decode-{arch}")
        hfref.tiny_hf_model(arch, seed=11).save_pretrained(directory, safe_serialization=True)
        tokenizer.save(str(directory / "tokenizer.json"))
        out[arch] = directory
    return out


def last_rows(full: dict, key: tuple[str, int | None]) -> np.ndarray:
    """The last position of a prompt-pass buffer, in a decode step's layout."""
    values = full[key]
    if "seq" not in Stage(key[0]).spec.shape_dims:  # lm_head, the MoE stages: last row only
        return values
    if values.ndim == 3:  # attention map [heads, queries, keys]: the last query, every key
        return values[:, -1:, :]
    return values[-1:]


def assert_close(got: np.ndarray, want: np.ndarray, bound: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(got - want).max()) / scale
    assert err <= bound, f"{what}: max error {err:.3g} of the largest magnitude > {bound:g}"


def check_self_consistent(model, cap) -> None:
    cfg = model.config
    for step in cap.steps:
        fed = cap.token_ids + [s.token for s in cap.steps[: step.step]]
        full = capture_stages(model, fed)
        got = cap.stages[step.step]
        assert got.keys() == full.keys()
        for key, values in got.items():
            stage = Stage(key[0])
            assert values.shape == stage_shape(stage, cfg, 1, keys=step.position + 1) or (
                stage is Stage.LM_HEAD
            )
            assert_close(values, last_rows(full, key), ROUNDING, f"step {step.step} {key}")


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_steps_equal_last_rows_of_a_full_pass(arch, tiny_dirs):
    model = load_model(tiny_dirs[arch])
    greedy = capture_decode(model, PROMPT, 4)
    forced = capture_decode(model, PROMPT, 4, tokens=FORCED)
    assert [s.token for s in forced.steps] == FORCED
    assert greedy.steps[0].token == int(np.argmax(greedy.logits[0]))
    for k in range(1, 4):  # greedy: each step feeds the previous step's argmax
        assert greedy.steps[k].token == greedy.steps[k - 1].argmax
    n = len(greedy.token_ids)
    assert [s.position for s in greedy.steps] == [n, n + 1, n + 2, n + 3]
    check_self_consistent(model, greedy)
    check_self_consistent(model, forced)


@pytest.mark.parametrize("arch", ARCHS)
def test_sliding_window_is_kept_in_decode(arch, tiny_dirs):
    model = load_model(tiny_dirs[arch])
    window = 3
    model.config = dataclasses.replace(model.config, sliding_window=window)
    cap = capture_decode(model, PROMPT, 4, tokens=FORCED)
    check_self_consistent(model, cap)
    for step in cap.steps:
        probs = cap.stages[step.step][(Stage.ATTN_SOFTMAX.value, 0)]
        assert probs.shape[-1] == step.position + 1
        outside = probs[..., : step.position + 1 - window]
        assert not outside.any(), "keys outside the window are attended"
        assert (probs[..., step.position + 1 - window :] > 0).all()


def original_model_decode(arch: str, ids: list[int], fed: list[int]) -> list[dict]:
    """Stages of the seeded transformers model itself (not rebuilt from the file), one
    ``DynamicCache`` pass per step: independent of aprtrace's loader."""
    import transformers

    from aprtrace.engines.transformers import hooked_passes

    hf_model = hfref.tiny_hf_model(arch, seed=11)
    cache = transformers.DynamicCache()  # full layers: Gemma's sliding ones keep every key too
    passes: list[dict] = []

    def keeper():
        passes.append({})
        out = passes[-1]
        return lambda stage, layer, values: out.__setitem__((stage.value, layer), values)

    with hooked_passes(hf_model) as run_pass:
        run_pass(ids, keeper(), cache)
        for token in fed:
            run_pass([token], keeper(), cache)
    return passes


@pytest.mark.reference
@pytest.mark.parametrize("arch", ARCHS)
def test_decode_matches_transformers_cached_decode(arch, tiny_dirs):
    model = load_model(tiny_dirs[arch])
    ours = capture_decode(model, PROMPT, 4)
    fed = [s.token for s in ours.steps]
    theirs = capture_decode(model, PROMPT, 4, tokens=fed, engine="transformers")
    assert [s.position for s in theirs.steps] == [s.position for s in ours.steps]
    assert [s.argmax for s in theirs.steps] == [s.argmax for s in ours.steps]
    original = original_model_decode(arch, ours.token_ids, fed)
    for k, a in enumerate(ours.stages):
        for reference in (theirs.stages[k], original[k]):
            assert a.keys() == reference.keys()
            for key in a:
                assert_close(a[key], reference[key], RELATIVE_BOUND, f"step {k} {key}")


def test_decode_requests_are_validated(tiny_dirs):
    model = load_model(tiny_dirs[ARCHS[0]])
    with pytest.raises(ValidationError, match="every step needs a token"):
        capture_decode(model, PROMPT, 3, tokens=[1, 2])
    with pytest.raises(ValidationError, match="outside the vocabulary"):
        capture_decode(model, PROMPT, 1, tokens=[10**6])
    with pytest.raises(ValidationError, match="exceed the model's context"):
        capture_decode(model, PROMPT, model.config.max_position_embeddings)


def test_kv_cache_grows_in_place_and_counts_its_bytes():
    cache = KVCache(capacity=8)
    rows = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)
    k, v, pos = cache.extend(0, rows, rows + 1, np.arange(3))
    assert k.shape == (3, 2, 4) and pos.tolist() == [0, 1, 2]
    buffer = cache._k[0]
    k, v, pos = cache.extend(0, rows[:1] * 2, rows[:1], np.array([3]))
    assert cache._k[0] is buffer, "a step within capacity must not reallocate"
    assert pos.tolist() == [0, 1, 2, 3] and np.array_equal(k[3], rows[0] * 2)
    for _ in range(6):  # beyond capacity: grows, keeps every row
        k, v, pos = cache.extend(0, rows[:1], rows[:1], np.array([pos[-1] + 1]))
    assert cache.length == 10 and pos.tolist() == list(range(10))
    assert np.array_equal(k[:3], rows) and np.array_equal(v[:3], rows + 1)
    assert cache.nbytes == sum(b.nbytes for b in (cache._k[0], cache._v[0], cache._pos[0]))


# --------------------------------------------------------------------------------------------
# Bug injection: diff names the step, layer and stage


def trace_dump(model, out_dir, steps=4, tokens=FORCED):
    plan = make_plan("all", "all", out_dir, model.path)
    ids = model.tokenizer.encode(PROMPT, add_special_tokens=False).ids
    return run_trace(model, ids, plan, decode=steps, decode_tokens=tokens, collect_stats=False)


def test_off_by_one_rope_in_decode_is_named_at_step_1(tiny_dirs, tmp_path, monkeypatch):
    model = load_model(tiny_dirs["llama"])
    trace_dump(model, tmp_path / "good")
    original = PassContext.rope

    def off_by_one(self, key, build):
        if self.positions[0] > 0:  # a decode step (the prompt pass starts at position 0)
            return original(self, ("off-by-one", key), lambda pos: build(pos + 1))
        return original(self, key, build)

    monkeypatch.setattr(PassContext, "rope", off_by_one)
    trace_dump(model, tmp_path / "bad")
    result = diff_dirs(tmp_path / "good", tmp_path / "bad")
    first = result.first_divergence
    assert first is not None
    assert (first.key.step, first.key.layer, first.key.stage) == (1, 0, "q_post_rope")
    assert first.max_position.startswith("token 0, channel")
    assert all(p.passed for p in result.pairs if p.key.step == 0)
    assert first.key.label == "step 1 layer 0 q_post_rope"


def test_cache_dropping_its_oldest_entry_is_named_at_the_step_it_drops(
    tiny_dirs, tmp_path, monkeypatch
):
    model = load_model(tiny_dirs["qwen2"])
    prompt_len = len(model.tokenizer.encode(PROMPT, add_special_tokens=False).ids)
    trace_dump(model, tmp_path / "good")
    original = KVCache.extend
    limit = prompt_len + 2  # full after step 2: step 3 is the first to lose a key

    def bounded(self, layer, k, v, positions):
        keys, values, pos = original(self, layer, k, v, positions)
        if len(pos) > limit:  # the buggy cache no longer holds the oldest entry
            pos = pos.copy()
            pos[: len(pos) - limit] = np.iinfo(np.int64).max  # never attended again
        return keys, values, pos

    monkeypatch.setattr(KVCache, "extend", bounded)
    trace_dump(model, tmp_path / "bad")
    result = diff_dirs(tmp_path / "good", tmp_path / "bad")
    first = result.first_divergence
    assert first is not None
    assert (first.key.step, first.key.layer, first.key.stage) == (3, 0, "attn_scores")
    assert first.max_position.endswith("key 0")  # the dropped (oldest) key
    assert all(p.passed for p in result.pairs if p.key.step < 3)


# --------------------------------------------------------------------------------------------
# CLI: layout, manifest, flags


def test_decode_zero_writes_todays_dump_byte_for_byte(tiny_gguf, tmp_path, runner):
    base = ["trace", str(tiny_gguf), "--save-tensor", "all", "-q"]
    assert runner.invoke(main, [*base, "--save-tensor-dir", str(tmp_path / "a")]).exit_code == 0
    args = [*base, "--save-tensor-dir", str(tmp_path / "b"), "--decode", "0"]
    assert runner.invoke(main, args).exit_code == 0
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.bin"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.bin"))
    assert files_a == files_b
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    ma = json.loads((tmp_path / "a" / "manifest.json").read_text())
    mb = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert "decode" not in mb
    for m in (ma, mb):
        m.pop("created")
        m["files"] = [{k: v for k, v in f.items()} for f in m["files"]]
    assert ma.keys() == mb.keys() and ma["files"] == mb["files"]


def test_decode_layout_and_manifest(tiny_gguf, tmp_path, runner):
    out = tmp_path / "d"
    args = ["trace", str(tiny_gguf), "--save-tensor", "all", "--save-tensor-layers", "all"]
    result = runner.invoke(main, [*args, "--save-tensor-dir", str(out), "--decode", "3", "-q"])
    assert result.exit_code == 0, result.output
    assert "step 3: fed" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    n = len(manifest["token_ids"])
    steps = manifest["decode"]["steps"]
    assert manifest["decode"]["mode"] == "greedy"
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert [s["position"] for s in steps] == [n, n + 1, n + 2]
    assert steps[0]["token"] == manifest["decode"]["prompt_argmax"]
    assert steps[1]["token"] == steps[0]["argmax"]
    shapes = {f["path"]: f["shape"] for f in manifest["files"]}
    hidden, heads = manifest["config"]["hidden_size"], manifest["config"]["num_heads"]
    assert shapes["layer-0/attn_norm.bin"] == [n, hidden]  # the prompt pass at the root
    assert shapes["decode-2/layer-0/attn_norm.bin"] == [1, hidden]
    assert shapes["decode-2/layer-3/attn_scores.bin"] == [heads, 1, n + 2]
    assert (out / "decode-3" / "lm_head.bin").is_file()
    assert (out / "decode-3" / "final_norm.bin").is_file()
    listed = {f["path"] for f in manifest["files"]}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*.bin")}
    assert listed == on_disk


def test_decode_tokens_force_the_continuation(tiny_gguf, tmp_path, runner):
    out = tmp_path / "f"
    args = ["trace", str(tiny_gguf), "--save-tensor", "lm_head", "--save-tensor-dir", str(out)]
    result = runner.invoke(main, [*args, "--decode-tokens", "5,17,9", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["decode"]["mode"] == "forced"
    assert [s["token"] for s in doc["decode"]["steps"]] == [5, 17, 9]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["token"] for s in manifest["decode"]["steps"]] == [5, 17, 9]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--decode", "3", "--decode-tokens", "5,17"], "every step needs a token"),
        (["--decode-tokens", "5,x"], "invalid --decode-tokens"),
        (["--decode-tokens", "99999999"], "outside the vocabulary"),
        (["--decode", "-1"], "-1"),
        (["--decode", "100000"], "exceed the model's context"),
        (["--decode", "0", "--decode-tokens", "5"], "no step to feed them to"),
    ],
)
def test_bad_decode_flags_exit_with_usage_or_validation_codes(tiny_gguf, runner, extra, message):
    result = runner.invoke(main, ["trace", str(tiny_gguf), *extra])
    assert result.exit_code in (2, 5), result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_diff_steps_filter_and_step_in_json(tiny_gguf_pair, tmp_path, runner):
    f32, q8 = tiny_gguf_pair
    for name, path in (("a", f32), ("b", q8)):
        args = [
            "trace",
            str(path),
            "--save-tensor",
            "all",
            "--save-tensor-dir",
            str(tmp_path / name),
        ]
        assert runner.invoke(main, [*args, "--decode-tokens", "5,17,9", "-q"]).exit_code == 0
    result = runner.invoke(
        main, ["diff", "--values", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]
    )
    doc = json.loads(result.output)
    assert [p["step"] for p in doc["pairs"]] == sorted(p["step"] for p in doc["pairs"])
    assert {p["step"] for p in doc["pairs"]} == {0, 1, 2, 3}
    assert "first_token_disagreement" in doc
    filtered = runner.invoke(
        main,
        ["diff", "--values", str(tmp_path / "a"), str(tmp_path / "b"), "--json", "--steps", "1..3"],
    )
    assert {p["step"] for p in json.loads(filtered.output)["pairs"]} == {1, 2}
    html = tmp_path / "r.html"
    table = runner.invoke(
        main,
        ["diff", "--values", str(tmp_path / "a"), str(tmp_path / "b"), "--html", str(html)]
        + ["--all"],  # every row: the table is printed although every pair passes
    )
    page = html.read_text()
    assert ">step 3 layer 0<" in page and ">step 3 whole-model<" in page  # heatmap rows
    assert ">step 2 0</td>" in page  # table rows carry the step
    header = next(
        line for line in table.output.splitlines() if "stage" in line and "verdict" in line
    )
    assert "step" in header
    assert "step 3 lm_head: top-1" in table.output
    bad = runner.invoke(
        main, ["diff", "--values", str(tmp_path / "a"), str(tmp_path / "b"), "--steps", "x"]
    )
    assert bad.exit_code == 5 and "invalid --steps" in bad.output


def test_pair_keys_carry_the_step():
    key = key_for("decode-12/layer-3/attn_scores.bin")
    assert (key.step, key.layer, key.stage) == (12, 3, "attn_scores")
    assert key.step_stem == "layer-3/attn_scores"
    assert key_for("decode-2/lm_head.bin").layer is None
    assert key_for("layer-3/attn_scores.bin").step == 0
    assert key_for("decode-1/lm_head.bin").sort_key() > key_for("lm_head.bin").sort_key()
    assert key_for("decode-1/layer-0/attn_norm.bin").sort_key() > key_for("lm_head.bin").sort_key()


def test_compare_feeds_b_the_tokens_a_generated(tiny_gguf_pair, tmp_path, runner):
    f32, q8 = tiny_gguf_pair
    work = tmp_path / "cmp"
    result = runner.invoke(
        main, ["compare", str(f32), str(q8), "--decode", "3", "--dir", str(work), "--json"]
    )
    assert result.exit_code in (0, 1), result.output
    dirs = sorted(work.iterdir())
    a, b = (json.loads((d / "manifest.json").read_text())["decode"] for d in dirs)
    assert a["mode"] == "greedy" and b["mode"] == "forced"
    assert [s["token"] for s in a["steps"]] == [s["token"] for s in b["steps"]]
    doc = json.loads(result.output[result.output.index("{") :])
    assert {p["step"] for p in doc["pairs"]} == {0, 1, 2, 3}


def test_first_token_disagreement_names_the_step(tiny_dirs, tmp_path, monkeypatch):
    """B's logits of step 2 are altered to pick another token: the report says so."""
    model = load_model(tiny_dirs["llama"])
    trace_dump(model, tmp_path / "a")
    trace_dump(model, tmp_path / "b")
    from aprtrace.aprt import read_aprt, write_aprt

    path = tmp_path / "b" / "decode-2" / "lm_head.bin"
    logits = read_aprt(path).values.copy()
    runner_up = int(np.argsort(logits)[-2])
    logits[runner_up] = logits.max() + 1.0
    write_aprt(path, 0xFFFFFFFF, logits)
    result = diff_dirs(tmp_path / "a", tmp_path / "b")
    p = result.first_token_disagreement
    assert p is not None and p.key.step == 2 and p.lm_head.top1_b == runner_up
    from aprtrace.report import token_disagreement_line

    assert "after step 2" in token_disagreement_line(result)


# --------------------------------------------------------------------------------------------
# The real SmolLM2: 8 decode steps, NumPy engine against transformers' cached decode

SMOLLM2_STEPS = 8


@pytest.mark.reference
@pytest.mark.slow
def test_smollm2_decode_matches_transformers_at_default_tolerances(smollm2_path, tmp_path):
    model = load_model(smollm2_path)
    ids = model.tokenizer.encode("What is 2+2?", add_special_tokens=False).ids
    ours = run_trace(
        model,
        ids,
        make_plan("all", "all", tmp_path / "numpy", smollm2_path),
        decode=SMOLLM2_STEPS,
        collect_stats=False,
    )
    fed = ours.decode.tokens
    theirs = run_trace(
        model,
        ids,
        make_plan("all", "all", tmp_path / "hf", smollm2_path),
        decode=SMOLLM2_STEPS,
        decode_tokens=fed,
        collect_stats=False,
        engine="transformers",
    )
    assert [s.argmax for s in theirs.decode.steps] == [s.argmax for s in ours.decode.steps]
    result = diff_dirs(tmp_path / "numpy", tmp_path / "hf")
    assert result.steps == list(range(SMOLLM2_STEPS + 1))
    assert result.failed == 0 and not result.incomparable, result.first_divergence
    assert result.first_token_disagreement is None
    assert len(result.pairs) == len(ours.log.files) == len(theirs.log.files)


def test_decode_shapes_are_inferred_from_the_step_position(tiny_gguf, tmp_path, runner):
    """Without the files list, a step's shapes come from its manifest position."""
    out = tmp_path / "d"
    args = ["trace", str(tiny_gguf), "--save-tensor", "all", "--save-tensor-dir", str(out)]
    assert runner.invoke(main, [*args, "--decode", "2", "-q"]).exit_code == 0
    from aprtrace.diff import infer_shape
    from aprtrace.manifest import read_manifest

    manifest = read_manifest(out)
    listed = {f.path: f.shape for f in manifest.files}
    stripped = dataclasses.replace(manifest, files=())
    for rel in (
        "decode-2/layer-0/attn_scores.bin",
        "decode-2/layer-0/ffn_out.bin",
        "decode-1/lm_head.bin",
    ):
        count = int(np.prod(listed[rel]))
        assert infer_shape(key_for(rel), count, [stripped]) == tuple(listed[rel])


@pytest.mark.parametrize("command", ["trace", "compare"])
def test_engine_without_decode_is_refused_before_anything_runs(
    tiny_gguf, tmp_path, runner, command
):
    out = tmp_path / "out"
    if command == "trace":
        args = ["trace", str(tiny_gguf), "--engine", "llama.cpp", "--save-tensor", "all"]
        args += ["--save-tensor-dir", str(out), "--decode", "2"]
    else:
        args = ["compare", str(tiny_gguf), "--engines", "numpy,llama.cpp", "--dir", str(out)]
        args += ["--decode", "2"]
    result = runner.invoke(main, args)
    assert result.exit_code == 5, result.output
    assert "--decode is not implemented for the llama.cpp engine" in result.output
    assert not out.exists()


@pytest.mark.parametrize("decode", ["garbage", {"steps": "x"}, {"steps": [1, {"step": 1}]}, None])
def test_a_malformed_decode_field_does_not_break_reading_a_manifest(decode, tmp_path):
    from aprtrace.manifest import parse_manifest

    doc = {"schema": "aprtrace-manifest-v1", "files": [], "decode": decode}
    manifest = parse_manifest(doc, tmp_path / "manifest.json")
    steps = manifest.decode_steps
    assert all(isinstance(s, dict) for s in steps)
    key = key_for("decode-1/layer-0/attn_scores.bin")
    from aprtrace.diff import infer_shape

    assert infer_shape(key, 12, [manifest]) is None


def test_first_nan_of_a_step_is_reported_per_step(tiny_gguf, tmp_path, runner, monkeypatch):
    original = KVCache.extend

    def poisoned(self, layer, k, v, positions):
        keys, values, pos = original(self, layer, k, v, positions)
        if positions[0] == pos[0] + 7:  # the second decode step of a 6-token prompt
            values = np.full_like(values, np.nan)
        return keys, values, pos

    monkeypatch.setattr(KVCache, "extend", poisoned)
    out = tmp_path / "nan"
    args = ["trace", str(tiny_gguf), "--save-tensor", "lm_head", "--save-tensor-dir", str(out)]
    result = runner.invoke(main, [*args, "--decode-tokens", "5,17,9", "-q"])
    assert result.exit_code == 0, result.output
    lines = {line.split(":")[0].strip(): line for line in result.output.splitlines()}
    assert "NaN" not in lines["step 1"]
    assert lines["step 2"].endswith("(first NaN/Inf at layer 0 attention)")
    # Step 2's NaN rows of layer 1 are in the cache now: step 3 meets them in its scores.
    assert lines["step 3"].endswith("(first NaN/Inf at layer 1 attn_scores)")
