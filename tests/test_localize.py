"""Local versus inherited error (``diff --values --model``, aprtrace.localize).

Expectations are independent of the localizer: exact zeros where B is, by construction,
aprtrace's own math on MODEL's weights; an injected 5% scaling where a bug is planted; and a
weight-quantization error recomputed with gguf-py's dequantizer and the demo's source weights.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from aprtrace.aprt import read_aprt, write_aprt
from aprtrace.arch.llama import Llama
from aprtrace.cli import main
from aprtrace.demo import demo_config, demo_weights
from aprtrace.diff import diff_dirs
from aprtrace.formats import load_model
from aprtrace.formats.gguf_writer import write_gguf
from aprtrace.localize import WEIGHT_STAGES, localize
from aprtrace.plan import make_plan
from aprtrace.stages import Stage
from aprtrace.trace import run_trace

TOKENS = [304, 264, 290, 11, 18, 31]  # "What is 2+2?" with the demo tokenizer
BUG = 1.05  # the injected error: layer 1 ffn_gate scaled by 5%


def trace(model_path: Path, out: Path) -> Path:
    plan = make_plan("all", "all", out, model_path)
    run_trace(load_model(model_path), TOKENS, plan, collect_stats=False, clean=True)
    return out


@pytest.fixture(scope="module")
def dumps(tiny_gguf_pair, tmp_path_factory):
    f32, q8 = tiny_gguf_pair
    root = tmp_path_factory.mktemp("localize")
    return {
        "f32_model": f32,
        "q8_model": q8,
        "f32": trace(f32, root / "f32"),
        "q8": trace(q8, root / "q8"),
    }


def run(a: Path, b: Path, model: Path):
    result = diff_dirs(a, b)
    return result, localize(result, load_model(model))


def by_label(result, loc) -> dict[str, object]:
    return {p.key.label: loc.get(p) for p in result.pairs}


def test_self_diff_reproduces_every_stage_bit_for_bit(dumps):
    # f_k of B's own inputs is the code that wrote B: every stage, embedding and lm_head
    # included, comes out identical, so both errors are exactly 0.
    result, loc = run(dumps["f32"], dumps["f32"], dumps["f32_model"])
    assert len(result.pairs) == 1 + 4 * 17 + 2  # embedding, 17 stages per layer, 2 whole-model
    for p in result.pairs:
        s = loc.get(p)
        assert s.note is None, p.key.label
        assert (s.local_rel_l2, s.inherited_rel_l2) == (0.0, 0.0), p.key.label
    assert loc.sources(result.pairs) == []


def test_candidate_model_leaves_no_local_error(dumps):
    # B is exactly aprtrace on the Q8_0 weights: nothing is local, and the inherited part is
    # the whole error (f(B inputs) == B bit for bit, so ||A - f|| / ||A|| is rel_l2).
    result, loc = run(dumps["f32"], dumps["q8"], dumps["q8_model"])
    for p in result.pairs:
        s = loc.get(p)
        assert s.local_rel_l2 == 0.0, p.key.label
        # rel 1e-6: diff subtracts in f32, the localizer in f64.
        assert s.inherited_rel_l2 == pytest.approx(p.stats.rel_l2, rel=1e-6), p.key.label
        assert p.stats.rel_l2 > 1e-3  # Q8_0 noise is everywhere: the test is not vacuous
        assert s.local_share == 0.0


def _gguf_tensor(path: Path, name: str) -> np.ndarray:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    t = next(t for t in GGUFReader(path).tensors if t.name == name)
    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64)


def test_reference_model_shows_weight_quantization_as_local_error(dumps):
    result, loc = run(dumps["f32"], dumps["q8"], dumps["f32_model"])
    # Q8_0 rounds each weight to int8 steps of absmax/127 per block of 32, an RMS error of
    # step/sqrt(12): about 0.5% of a Gaussian weight's scale (block absmax ~ 2.2 sigma), and
    # a matmul output inherits that relative error. [0.2%, 1.5%] keeps a wide margin while
    # excluding 0 and the 5% bug of the other tests. Every other stage uses no quantized
    # weight (norms and biases stay F32), so its local error is exactly 0.
    for p in result.pairs:
        s = loc.get(p)
        if Stage(p.key.stage) in WEIGHT_STAGES:
            assert 2e-3 < s.local_rel_l2 < 1.5e-2, p.key.label
            assert s.inherited_rel_l2 > 0 or p.key.stage == "embedding"
        else:
            assert s.local_rel_l2 == 0.0, p.key.label
    # One value recomputed independently: gguf-py's dequantization and the demo's source
    # weights, in f64 on B's dumped input.
    cfg = demo_config(load_model(dumps["f32_model"]).config.vocab_size)
    w_f32 = demo_weights(cfg)["model.layers.2.mlp.up_proj.weight"].astype(np.float64)
    w_q8 = _gguf_tensor(dumps["q8_model"], "blk.2.ffn_up.weight")
    x = read_aprt(dumps["q8"] / "layer-2/ffn_norm.bin").values.reshape(len(TOKENS), -1)
    a = read_aprt(dumps["f32"] / "layer-2/ffn_up.bin").values.astype(np.float64)
    expected = np.linalg.norm(x @ (w_q8 - w_f32).T) / np.linalg.norm(a)
    assert by_label(result, loc)["layer 2 ffn_up"].local_rel_l2 == pytest.approx(expected, rel=1e-3)


def test_corrupted_stage_file_is_named_as_the_source(dumps, tmp_path):
    bad = tmp_path / "q8-bad"
    shutil.copytree(dumps["q8"], bad)
    gate = read_aprt(bad / "layer-1/ffn_gate.bin")
    write_aprt(bad / "layer-1/ffn_gate.bin", 1, np.asarray(gate.values) * np.float32(BUG))
    result, loc = run(dumps["f32"], bad, dumps["q8_model"])
    stages = by_label(result, loc)
    gate_loc = stages["layer 1 ffn_gate"]
    # B_k = 1.05 f(B inputs): local = 0.05 ||f|| / ||A||, and ||f|| ~ ||A|| (Q8_0 noise).
    assert gate_loc.local_rel_l2 == pytest.approx(BUG - 1, rel=0.05)
    # The inherited part is the Q8_0 noise upstream (rel L2 below 0.03 at layer 1), so the
    # 0.05 local error is the larger share.
    assert gate_loc.inherited_rel_l2 < 0.03
    assert gate_loc.local_share > 0.6
    # Only the file changed, so B's ffn_silu is silu of the *uncorrupted* gate: against its
    # dumped input it is wrong too (an inconsistent dump). Everything else consumes unchanged
    # files and reproduces exactly.
    assert stages["layer 1 ffn_silu"].local_rel_l2 > 0.01
    sources = [p.key.label for p in loc.sources(result.pairs)]
    assert sorted(sources) == ["layer 1 ffn_gate", "layer 1 ffn_silu"]
    for label, s in stages.items():
        if label not in ("layer 1 ffn_gate", "layer 1 ffn_silu"):
            assert s.local_rel_l2 == 0.0, label


def test_bug_inside_the_forward_pass_is_local_once_then_inherited(dumps, tmp_path, monkeypatch):
    # A real bug: layer 1's gate projection computed with weights 5% too large, and the rest
    # of the pass continues from the wrong values.
    real_load = Llama.load_layer

    def buggy_load(self, model, layer):
        w = real_load(self, model, layer)
        return dataclasses.replace(w, gate_proj=w.gate_proj * np.float32(BUG)) if layer == 1 else w

    monkeypatch.setattr(Llama, "load_layer", buggy_load)
    buggy = trace(dumps["q8_model"], tmp_path / "q8-buggy")
    monkeypatch.undo()

    result, loc = run(dumps["f32"], buggy, dumps["q8_model"])
    stages = by_label(result, loc)
    assert stages["layer 1 ffn_gate"].local_rel_l2 == pytest.approx(BUG - 1, rel=0.05)
    assert [p.key.label for p in loc.sources(result.pairs)] == ["layer 1 ffn_gate"]
    for label, s in stages.items():
        if label != "layer 1 ffn_gate":
            assert s.local_rel_l2 == 0.0, label
    # Downstream stages carry the bug as inherited error, far above Q8_0 noise (< 2%).
    for label in ("layer 1 ffn_silu", "layer 1 ffn_swigl", "layer 1 ffn_out"):
        assert stages[label].inherited_rel_l2 > 0.03, label
        assert stages[label].local_share == 0.0


def test_stages_whose_inputs_are_missing_are_reported(dumps, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(dumps["q8"], partial)
    (partial / "layer-1/ffn_norm.bin").unlink()
    result, loc = run(dumps["f32"], partial, dumps["q8_model"])
    stages = by_label(result, loc)
    for label in ("layer 1 ffn_gate", "layer 1 ffn_up"):
        assert stages[label].note == "inputs not dumped: layer-1/ffn_norm.bin"
        assert stages[label].local_rel_l2 is None
    assert stages["layer 1 ffn_silu"].local_rel_l2 == 0.0  # its input is still there


def test_dumps_without_manifest_infer_the_sequence(dumps, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(dumps["f32"], a)
    shutil.copytree(dumps["q8"], b)
    (a / "manifest.json").unlink()
    (b / "manifest.json").unlink()
    result, loc = run(a, b, dumps["q8_model"])
    stages = by_label(result, loc)
    assert stages["layer 0 embedding"].note.startswith("inputs not dumped: token ids")
    assert all(s.local_rel_l2 == 0.0 for k, s in stages.items() if k != "layer 0 embedding")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

LOCAL_KEYS = {"local_rel_l2", "inherited_rel_l2", "local_share", "local_inputs", "local_note"}


def test_cli_json_has_the_local_keys_only_with_model(dumps):
    args = ["diff", "--values", str(dumps["f32"]), str(dumps["q8"]), "--json"]
    plain = json.loads(CliRunner().invoke(main, args).output)
    assert "localization" not in plain and not LOCAL_KEYS & set(plain["pairs"][0])
    r = CliRunner().invoke(main, [*args, "--model", str(dumps["f32_model"])])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert all(LOCAL_KEYS <= set(p) for p in doc["pairs"])
    gate = next(p for p in doc["pairs"] if p["path"] == "layer-0/ffn_gate.bin")
    assert gate["local_inputs"] == ["layer-0/ffn_norm.bin"]
    assert 0 < gate["local_share"] < 1
    assert doc["localization"]["localized"] == len(doc["pairs"])
    assert doc["localization"]["sources"][0]["local_rel_l2"] > 0


def test_cli_text_shows_columns_and_sentence(dumps, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(dumps["q8"], bad)
    gate = read_aprt(bad / "layer-1/ffn_gate.bin")
    write_aprt(bad / "layer-1/ffn_gate.bin", 1, np.asarray(gate.values) * np.float32(BUG))
    r = CliRunner().invoke(
        main,
        ["diff", "--values", str(dumps["f32"]), str(bad), "--model", str(dumps["q8_model"])]
        + ["--all"],
    )
    assert r.exit_code == 0, r.output  # a 5% scaling keeps the cosine: the verdicts pass
    header = next(line for line in r.output.splitlines() if "stage" in line and "1-cos" in line)
    assert "local" in header and "inherited" in header
    assert "layer 1 ffn_gate: " in r.output and "% of its error is local" in r.output


@pytest.fixture(scope="module")
def other_shape_model(tmp_path_factory) -> Path:
    cfg = dataclasses.replace(demo_config(384), hidden_size=64, num_heads=4, intermediate_size=96)
    path = tmp_path_factory.mktemp("other") / "other.gguf"
    return write_gguf(path, cfg, demo_weights(cfg))


def test_cli_model_of_another_shape_exits_5(dumps, other_shape_model, tmp_path):
    args = ["diff", "--values", str(dumps["f32"]), str(dumps["q8"])]
    r = CliRunner().invoke(main, [*args, "--model", str(other_shape_model)])
    assert r.exit_code == 5
    assert "does not match dump B" in r.output and "hidden_size 64 in the model" in r.output
    # Without a manifest the element counts of B's files give it away.
    b = tmp_path / "b"
    shutil.copytree(dumps["q8"], b)
    (b / "manifest.json").unlink()
    r = CliRunner().invoke(
        main, ["diff", "--values", str(dumps["f32"]), str(b), "--model", str(other_shape_model)]
    )
    assert r.exit_code == 5 and "does not match dump B" in r.output


def test_cli_model_option_errors(dumps, tmp_path):
    args = ["diff", "--values", str(dumps["f32"]), str(dumps["q8"])]
    r = CliRunner().invoke(main, [*args, "--model", str(tmp_path / "missing.gguf")])
    assert r.exit_code == 3
    files = [str(dumps["f32"] / "lm_head.bin"), str(dumps["q8"] / "lm_head.bin")]
    r = CliRunner().invoke(main, ["diff", "--values", *files, "--model", str(dumps["q8_model"])])
    assert r.exit_code == 5 and "--model" in r.output


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_other_architectures_reproduce_exactly(arch, tmp_path):
    # llama: GGUF Q/K rows permuted, no qkv bias (RoPE input is qkv_matmul, untied lm_head);
    # qwen3: per-head QK-norm before RoPE. B is aprtrace on the Q8_0 weights, so with
    # --model Q8_0 every stage's local error is exactly 0 while its error is not.
    base = demo_config(384)
    cfg = dataclasses.replace(
        base,
        architecture=arch,
        qkv_bias=False,
        qk_norm=arch == "qwen3",
        tie_word_embeddings=arch == "qwen3",
    )
    tensors = {k: v for k, v in demo_weights(cfg).items() if not k.endswith("_proj.bias")}
    rng = np.random.default_rng(7)
    for i in range(cfg.num_layers):
        if arch == "qwen3":
            for name in ("q_norm", "k_norm"):
                tensors[f"model.layers.{i}.self_attn.{name}.weight"] = (
                    1 + 0.1 * rng.standard_normal(cfg.head_dim)
                ).astype(np.float32)
    if arch == "llama":
        tensors["lm_head.weight"] = rng.standard_normal((384, cfg.hidden_size)).astype(np.float32)
    f32 = write_gguf(tmp_path / "f32.gguf", cfg, tensors, qtype="F32")
    q8 = write_gguf(tmp_path / "q8.gguf", cfg, tensors, qtype="Q8_0")
    a, b = trace(f32, tmp_path / "a"), trace(q8, tmp_path / "b")
    assert not (b / "layer-0/qkv_bias.bin").exists()
    result, loc = run(a, b, q8)
    assert len(result.pairs) == 1 + 4 * 16 + 2  # no qkv_bias
    for p in result.pairs:
        s = loc.get(p)
        assert s.local_rel_l2 == 0.0 and p.stats.rel_l2 > 1e-3, p.key.label
    # Against the F32 weights, the permuted / normed projections show quantization error.
    result, loc = run(a, b, f32)
    stages = by_label(result, loc)
    assert 2e-3 < stages["layer 0 qkv_matmul"].local_rel_l2 < 1.5e-2
    assert stages["layer 0 q_post_rope"].local_rel_l2 == 0.0


@pytest.mark.slow
def test_smollm2_self_trace_reproduces_exactly(smollm2_path, tmp_path):
    # A real llama-family GGUF (Q4_1, 30 layers, GQA 9/3): every one of the 483 stage files
    # of aprtrace's own trace is reproduced bit for bit from its dumped inputs.
    plan = make_plan("all", "all", tmp_path / "s", smollm2_path)
    run_trace(load_model(smollm2_path), [1, 9690, 28, 2], plan, collect_stats=False)
    result, loc = run(tmp_path / "s", tmp_path / "s", smollm2_path)
    assert len(result.pairs) == 1 + 30 * 16 + 2  # no qkv_bias
    assert all(loc.get(p).local_rel_l2 == 0.0 for p in result.pairs)


# ---------------------------------------------------------------------------------------------
# Every registered architecture (teacher forcing runs each architecture's own block)
# ---------------------------------------------------------------------------------------------


def _tiny_hf(arch: str):
    """A tiny seeded transformers model of every architecture aprtrace registers."""
    import archref
    import hfref

    if arch in ("llama", "qwen2", "qwen3"):
        return hfref.tiny_hf_model(arch)
    if arch in ("qwen2moe", "qwen3moe", "mixtral"):
        return hfref.tiny_moe_model(arch)
    if arch in ("gemma2", "gemma3"):
        return hfref.tiny_gemma(arch)
    return archref.tiny_model(arch)  # phi3, olmo2, granite, stablelm, starcoder2


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """arch -> (safetensors directory, Q8_0 GGUF, prompt ids), built on first use."""
    import hfref
    from aprtrace.formats.gguf_writer import tokenizer_dict_from_hf
    from archref import PROMPT

    tokenizer = hfref.tiny_tokenizer()
    ids = tokenizer.encode(PROMPT).ids
    root = tmp_path_factory.mktemp("tiny_archs")
    built: dict[str, tuple[Path, Path, list[int]]] = {}

    def get(arch: str) -> tuple[Path, Path, list[int]]:
        if arch not in built:
            hf_model = _tiny_hf(arch)
            st = root / f"{arch}-hf"
            hf_model.save_pretrained(st, safe_serialization=True)
            tokenizer.save(str(st / "tokenizer.json"))
            state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
            meta = tokenizer_dict_from_hf(tokenizer, eos_token="<|endoftext|>")
            q8 = write_gguf(root / f"{arch}-q8.gguf", load_model(st).config, state, meta, "Q8_0")
            built[arch] = (st, q8, ids)
        return built[arch]

    return get


def trace_ids(model_path: Path, ids: list[int], out: Path) -> Path:
    plan = make_plan("all", "all", out, model_path)
    run_trace(load_model(model_path), ids, plan, collect_stats=False, clean=True)
    return out


def _registered() -> list[str]:
    from aprtrace.arch import _load

    return sorted(_load())


@pytest.mark.parametrize("arch", _registered())
def test_every_architecture_reproduces_its_own_dump_exactly(arch, tiny_files, tmp_path):
    # A: the F32 safetensors model; B: aprtrace on the Q8_0 GGUF written from it. Against
    # MODEL = that GGUF, every stage B dumped is f_k of B's own inputs bit for bit (local 0,
    # no note: no stage is left unlocalized), while B's error against A is not 0.
    st, q8, ids = tiny_files(arch)
    a, b = trace_ids(st, ids, tmp_path / "a"), trace_ids(q8, ids, tmp_path / "b")
    result, loc = run(a, b, q8)
    assert loc.architecture == arch
    layer_stages = {p.key.stage for p in result.pairs if p.key.layer == 1}
    assert len(layer_stages) >= 12, layer_stages
    for p in result.pairs:
        s = loc.get(p)
        assert s.note is None, (p.key.label, s.note)
        assert s.local_rel_l2 == 0.0, p.key.label
        if not p.key.stage.startswith("moe_router_indices"):
            assert s.inherited_rel_l2 == pytest.approx(p.stats.rel_l2, rel=1e-5, abs=1e-7)
    assert max(p.stats.rel_l2 for p in result.pairs) > 1e-3  # Q8_0 noise: not vacuous
    assert loc.sources(result.pairs) == []


def _bug_is_the_single_local_source(
    arch, cls, field_name, stage, tiny_files, tmp_path, monkeypatch
):
    """Trace ``arch`` with ``field_name`` of layer 1 scaled by BUG; localize against the
    clean model: ``stage`` of layer 1 is the only local error, about BUG - 1."""
    st, _, ids = tiny_files(arch)
    real_load = cls.load_layer

    def buggy_load(self, model, layer):
        w = real_load(self, model, layer)
        if layer != 1:
            return w
        return dataclasses.replace(w, **{field_name: getattr(w, field_name) * np.float32(BUG)})

    monkeypatch.setattr(cls, "load_layer", buggy_load)
    buggy = trace_ids(st, ids, tmp_path / "buggy")
    monkeypatch.undo()
    clean = trace_ids(st, ids, tmp_path / "clean")

    result, loc = run(clean, buggy, st)
    stages = by_label(result, loc)
    label = f"layer 1 {stage}"
    assert stages[label].local_rel_l2 == pytest.approx(BUG - 1, rel=0.02)
    assert [p.key.label for p in loc.sources(result.pairs)] == [label]
    for other, s in stages.items():
        assert s.note is None, other
        if other != label:
            assert s.local_rel_l2 == 0.0, other
    # Everything after it in the block carries the bug, as inherited error.
    assert stages["layer 1 post_ffn_residual"].inherited_rel_l2 > 1e-3
    return stages


def test_moe_shared_expert_bug_is_the_single_local_source(tiny_files, tmp_path, monkeypatch):
    # Qwen2-MoE's shared expert of layer 1 5% too large: moe_ffn_out and the residual read
    # B's (wrong) shared expert and reproduce; only moe_shared_expert is local.
    from aprtrace.arch.moe import MoE

    stages = _bug_is_the_single_local_source(
        "qwen2moe", MoE, "shared_down_proj", "moe_shared_expert", tiny_files, tmp_path, monkeypatch
    )
    assert stages["layer 1 moe_ffn_out"].inherited_rel_l2 > 1e-3


def test_olmo2_qk_norm_bug_is_the_single_local_source(tiny_files, tmp_path, monkeypatch):
    # OLMo 2's whole-projection Q norm of layer 1 5% too large: q_post_rope is local, the
    # scores computed from B's (wrong) q reproduce.
    from aprtrace.arch.olmo2 import Olmo2

    stages = _bug_is_the_single_local_source(
        "olmo2", Olmo2, "q_norm", "q_post_rope", tiny_files, tmp_path, monkeypatch
    )
    assert stages["layer 1 attn_scores"].inherited_rel_l2 > 1e-3


def test_olmo2_stage_reading_a_missing_residual_is_noted(tiny_files, tmp_path):
    # OLMo 2's FFN reads the residual itself (no ffn_norm): the stage graph names the file.
    st, q8, ids = tiny_files("olmo2")
    a, b = trace_ids(st, ids, tmp_path / "a"), trace_ids(q8, ids, tmp_path / "b")
    (b / "layer-1/post_attn_residual.bin").unlink()
    result, loc = run(a, b, q8)
    stages = by_label(result, loc)
    for label in ("layer 1 ffn_gate", "layer 1 ffn_up"):
        assert stages[label].note == "inputs not dumped: layer-1/post_attn_residual.bin"
    assert stages["layer 1 ffn_silu"].local_rel_l2 == 0.0
    assert stages["layer 1 post_ffn_norm"].local_rel_l2 == 0.0
