"""The llama.cpp engine (``--engine llama.cpp``) against aprtrace's NumPy engine.

llama.cpp is an independent implementation (C, its own kernels and graph); the NumPy engine
is the reference. On F32 weights the two agree to float rounding plus llama.cpp's f16 KV
cache; on the real SmolLM2 Q4_1 file llama.cpp also rounds every matmul's activations to
q8_1, and the bound below is derived from that rounding. Also tested: the manifest's
provenance, the tokens, `compare --engines`, a known bug named as the first divergence, a
killed or crashed child (no partial files), the layout probe's refusal and unmapped
architectures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from aprtrace.aprt import read_aprt
from aprtrace.cli import main
from aprtrace.errors import InferenceError, ValidationError
from aprtrace.formats import load_model
from aprtrace.forward import forward
from aprtrace.plan import make_plan
from aprtrace.stages import Stage
from aprtrace.trace import run_trace
from llamacpp_models import (
    ARCHS,
    GEMMA_ARCHS,
    GEMMA_WINDOW,
    write_tiny_gemma_gguf,
    write_tiny_gguf,
)

pytest.importorskip("cyllama", reason="the llama.cpp engine needs the `llamacpp` extra")

from aprtrace.engines import llamacpp, llamacpp_child  # noqa: E402
from aprtrace.engines.llamacpp import LlamaCppEngine  # noqa: E402

PROMPT = "What is 2+2? The quick brown fox."
F32_COSINE = 0.99999
ISSUE10_ARCHS = ("phi3", "olmo2")
ISSUE10_MORE_ARCHS = ("granite", "starcoder2", "stablelm", "gpt2")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run(engine, model, ids):
    """``({(stage, layer): array}, emission order, logits)`` of one engine run."""
    out, order = {}, []

    def emit(stage, layer, values):
        assert (stage, layer) not in out, f"{stage.value} {layer} emitted twice"
        out[(stage, layer)] = np.array(values, dtype=np.float32, copy=True)
        order.append((stage, layer))

    logits = engine(model, list(ids), emit)
    return out, order, logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamacpp")
    tiny = {arch: write_tiny_gguf(root, arch) for arch in ARCHS}
    return tiny | {arch: write_tiny_gemma_gguf(root, arch) for arch in GEMMA_ARCHS}


@pytest.mark.parametrize("arch", ARCHS + GEMMA_ARCHS)
def test_f32_every_stage_matches_numpy(tiny, arch):
    model = load_model(tiny[arch])
    ids = llamacpp.tokenize(model, PROMPT)
    ref, ref_order, ref_logits = run(forward, model, ids)
    got, order, logits = run(LlamaCppEngine(), model, ids)

    # Every stage NumPy writes, except the one llama.cpp fuses away, in the same order.
    assert [k for k in ref_order if k[0] is not Stage.FFN_SILU] == order
    assert llamacpp.not_captured(model.config) == ["ffn_silu"]
    assert (Stage.QKV_BIAS, 0) in got if arch == "qwen2" else (Stage.QKV_BIAS, 0) not in got
    worst = min(got, key=lambda k: cosine(ref[k], got[k]))
    assert cosine(ref[worst], got[worst]) >= F32_COSINE, f"{arch}: {worst}"
    for key, values in got.items():
        assert values.shape == ref[key].shape, key
        scale = float(np.abs(ref[key]).max())
        # f16 K/V cache: 2^-11 relative per element, a few times over the score sums
        assert np.abs(values - ref[key]).max() <= 5e-3 * scale, key
    # lm_head (row of result_output) is bit-identical to llama.cpp's own get_logits
    np.testing.assert_array_equal(got[(Stage.LM_HEAD, None)], logits)
    assert int(np.argmax(logits)) == int(np.argmax(ref_logits))


@pytest.fixture(scope="module")
def tiny_issue10(tmp_path_factory):
    """Phi-3 (fused Q|K|V and gate|up, partial RoPE) and OLMo 2 (no pre-norms, post-norms,
    whole-projection Q/K norms) as tiny F32 GGUFs, built by the architecture tests' helper
    (transformers models, no sliding window: this llama.cpp build ignores Phi-3's)."""
    pytest.importorskip("transformers")
    import hfref
    from archref import build_files

    root = tmp_path_factory.mktemp("llamacpp_issue10")
    built = build_files(ISSUE10_ARCHS, hfref.tiny_tokenizer(), root, windowed=False)
    return {arch: built[(arch, "gguf-F32")][0] for arch in ISSUE10_ARCHS}


@pytest.mark.reference
@pytest.mark.parametrize("arch", ISSUE10_ARCHS)
def test_f32_phi3_olmo2_every_stage_matches_numpy(tiny_issue10, arch):
    """Every stage of every layer, including the ones llama.cpp's builders leave unnamed
    (Phi-3's residual: the input of its FFN norm; the output projections) and the split ones
    (Phi-3's fused projections)."""
    path = tiny_issue10[arch]
    model = load_model(path)
    ids = llamacpp.tokenize(model, PROMPT)
    ref, ref_order, ref_logits = run(forward, model, ids)
    got, order, logits = run(LlamaCppEngine(), model, ids)
    assert [k for k in ref_order if k[0] is not Stage.FFN_SILU] == order
    assert llamacpp.not_captured(model.config) == ["ffn_silu"]
    for key, values in got.items():
        assert values.shape == ref[key].shape, key
        assert cosine(ref[key], values) >= F32_COSINE, key
        assert np.abs(values - ref[key]).max() <= 5e-3 * float(np.abs(ref[key]).max()), key
    assert int(np.argmax(logits)) == int(np.argmax(ref_logits))
    nodes = [n["name"] for n in llamacpp.list_nodes(str(path), [1, 2, 3])]
    if arch == "phi3":
        assert "wqkv-0" in nodes and "ffn_gate-0" not in nodes  # fused: split here
        assert "ffn_inp-0" not in nodes  # the residual is unnamed: read as an input
    else:
        assert "attn_norm-0" not in nodes and "ffn_post_norm" in nodes


@pytest.fixture(scope="module")
def tiny_issue10_more(tmp_path_factory):
    """Granite (four multipliers), StarCoder2 and GPT-2 (LayerNorm with bias, biased
    projections, non-gated GELU MLP; GPT-2 without RoPE, with learned positions and a fused
    Q|K|V) and StableLM (LayerNorm, Q/K/V bias, partial RoPE) as tiny F32 GGUFs, no sliding
    window (this llama.cpp build ignores StarCoder2's)."""
    pytest.importorskip("transformers")
    import hfref
    from archref import build_files

    root = tmp_path_factory.mktemp("llamacpp_issue10_more")
    built = build_files(ISSUE10_MORE_ARCHS, hfref.tiny_tokenizer(), root, windowed=False)
    return {arch: built[(arch, "gguf-F32")][0] for arch in ISSUE10_MORE_ARCHS}


@pytest.mark.reference
@pytest.mark.parametrize("arch", ISSUE10_MORE_ARCHS)
def test_f32_granite_starcoder2_stablelm_gpt2_every_stage_matches_numpy(tiny_issue10_more, arch):
    """Every stage of every layer: Granite's multipliers sit where aprtrace's stages expect
    them; the biased output projections (unnamed) and the GELU activation (``ffn_silu``,
    captured: it is its own node) of StarCoder2/GPT-2; GPT-2's fused Q|K|V without RoPE."""
    path = tiny_issue10_more[arch]
    model = load_model(path)
    ids = llamacpp.tokenize(model, PROMPT)
    ref, ref_order, ref_logits = run(forward, model, ids)
    got, order, logits = run(LlamaCppEngine(), model, ids)
    gated = arch in ("granite", "stablelm")  # SwiGLU is one fused op: no activation node
    skipped = [Stage.FFN_SILU] if gated else []
    assert [k for k in ref_order if k[0] not in skipped] == order
    assert llamacpp.not_captured(model.config) == [s.value for s in skipped]
    for key, values in got.items():
        assert values.shape == ref[key].shape, key
        assert cosine(ref[key], values) >= F32_COSINE, key
        assert np.abs(values - ref[key]).max() <= 5e-3 * float(np.abs(ref[key]).max()), key
    assert int(np.argmax(logits)) == int(np.argmax(ref_logits))
    nodes = [n["name"] for n in llamacpp.list_nodes(str(path), [1, 2, 3])]
    if not gated:
        assert "ffn_gelu-0" in nodes and "ffn_gate-0" not in nodes
    if arch == "gpt2":
        assert "pos_embd" in nodes and "wqkv-0" in nodes


def test_node_table_names_nodes_the_graph_has(tiny):
    """Every base name of every architecture's table occurs in llama.cpp's graph of that
    architecture, in every layer (Gemma 2's ``ffn_post_norm`` once per layer, without a layer
    number); Qwen3's q/k norm outputs come before the RoPE'd Qcur."""
    for arch, path in tiny.items():
        nodes = [n["name"] for n in llamacpp.list_nodes(str(path), [1, 2, 3])]
        cfg = load_model(path).config
        for stage, src in llamacpp.arch_nodes(arch).sources(cfg).items():
            for base in src.nodes:
                layered = stage.per_layer and stage is not Stage.EMBEDDING
                layers = range(cfg.num_layers) if layered else [None]
                for layer in layers:
                    name = base if layer is None else f"{base}-{layer}"
                    if arch == "gemma2" and base == "ffn_post_norm":
                        assert nodes.count(base) == cfg.num_layers
                        continue
                    assert name in nodes, (arch, stage, name)
        if arch == "qwen3":
            assert nodes.index("Qcur_normed-0") < len(nodes) - 1 - nodes[::-1].index("Qcur-0")
        if arch != "llama":
            assert "attn_out-0" not in nodes  # hence `follows` for attn_out


def test_capturing_changes_no_logit(smollm2_path):
    """The eval callback only observes: llama.cpp's logits with every node captured are the
    same bits as without the callback installed."""

    def logits(**flags):
        names = sorted({n for s in llamacpp.LLAMA_NODES.values() for n in s.nodes})
        request = llamacpp._request(
            "trace", str(smollm2_path), tokens=[1780, 314, 216, 34], names=names, **flags
        )
        _, messages = llamacpp.run_child(request)
        (payload,) = [p for h, p in messages if h["kind"] == "logits"]
        nodes = sum(h["kind"] == "node" for h, _ in messages)
        return np.frombuffer(payload, dtype="<f4"), nodes

    with_capture, captured = logits()
    without, none = logits(no_callback=True)
    assert captured > 30 * 15 and none == 0
    np.testing.assert_array_equal(with_capture, without)


def test_llama_qk_unpermutation_is_the_inverse_of_the_writer(tiny):
    """A llama file's Q/K columns come back in Hugging Face order: the masked entries of the
    scores and the RoPE pairs only line up when the un-permutation is right."""
    from aprtrace.model import permute_llama_qk

    cfg = load_model(tiny["llama"]).config
    rng = np.random.default_rng(0)
    q = rng.standard_normal((5, cfg.q_dim)).astype(np.float32)
    k = rng.standard_normal((5, cfg.kv_dim)).astype(np.float32)
    v = rng.standard_normal((5, cfg.kv_dim)).astype(np.float32)
    stored_q = permute_llama_qk(q.T, cfg.num_heads).T
    stored_k = permute_llama_qk(k.T, cfg.num_kv_heads).T
    out = llamacpp.to_stage_layout(Stage.QKV_MATMUL, [stored_q, stored_k, v], cfg, 5, True)
    np.testing.assert_array_equal(out, np.concatenate([q, k, v], axis=1))


def test_smollm2_q4_1_within_q8_1_rounding(smollm2_path):
    """Bound: llama.cpp quantizes each Q4_1 matmul's input to q8_1 (8 bits per block of 32,
    step = block max / 127). For activations whose block max is about 3x their RMS that is
    a relative L2 error of about 3 / (127 * sqrt(12)) = 0.7% per matmul input, i.e. a cosine
    of 1 - 0.007^2 / 2 = 0.99998 each; layer 0 goes through up to three such roundings in
    series (attention input, its output, the FFN input) plus the f16 K/V cache, so every
    layer-0 stage stays above 1 - 3 * 0.007^2 = 0.99985 (relative L2 error at most
    sqrt(2 * 0.00015) = 0.017, 0.02 with the norms' own rounding). Deeper layers compound
    these roundings without a closed-form bound; for this prompt every stage stays above
    cosine 0.99 (measured minimum 0.9969) and the logits above 0.999 (measured 0.99990) with
    the same argmax. A wrong mapping (rows not un-permuted, an unscaled score, an
    off-by-one layer) costs far more."""
    model = load_model(smollm2_path)
    ids = llamacpp.tokenize(model, "What is 2+2?")
    ref, _, ref_logits = run(forward, model, ids)
    got, _, logits = run(LlamaCppEngine(), model, ids)
    assert len(got) == len(ref) - model.config.num_layers  # all but ffn_silu
    layer0 = {k: cosine(ref[k], v) for k, v in got.items() if k[1] == 0}
    assert min(layer0.values()) >= 0.99985, min(layer0.items(), key=lambda kv: kv[1])
    for key, values in got.items():  # the same bound as a relative L2 error: scale included
        if key[1] == 0:
            rel = np.linalg.norm(values - ref[key]) / np.linalg.norm(ref[key])
            assert rel <= 0.02, (key, rel)
    everywhere = min(cosine(ref[k], v) for k, v in got.items())
    assert everywhere >= 0.99
    assert cosine(ref_logits, logits) >= 0.999
    assert int(np.argmax(logits)) == int(np.argmax(ref_logits))


@pytest.mark.parametrize("arch", GEMMA_ARCHS)
def test_gemma_scores_windowed_scaled_and_capped_like_numpy(tiny, arch):
    """Gemma's score map is made from a node llama.cpp computed from an already-scaled Q
    (Gemma 2: after the soft-cap nodes) and before the window mask: converted, sliding layers
    hold 0 outside the window and the values equal the NumPy engine's to float rounding, not
    just in direction (an extra or missing attention scale keeps the cosine at 1)."""
    model = load_model(tiny[arch])
    cfg = model.config
    ids = llamacpp.tokenize(model, PROMPT)
    assert len(ids) > 2 * GEMMA_WINDOW
    ref, _, _ = run(forward, model, ids)
    got, _, _ = run(LlamaCppEngine(), model, ids)
    q, k = np.indices((len(ids), len(ids)))
    sliding = [layer for layer in range(cfg.num_layers) if cfg.is_sliding(layer)]
    assert sliding and len(sliding) < cfg.num_layers
    for layer in range(cfg.num_layers):
        scores = got[(Stage.ATTN_SCORES, layer)]
        probs = got[(Stage.ATTN_SOFTMAX, layer)]
        inside = (k <= q) & ((q - k < GEMMA_WINDOW) if layer in sliding else True)
        assert np.all(scores[:, ~inside] == 0) and np.all(probs[:, ~inside] == 0)
        assert np.all(probs[:, inside] > 0)
        want = ref[(Stage.ATTN_SCORES, layer)]
        assert np.abs(scores - want).max() <= 1e-3 * np.abs(want).max(), layer
        if cfg.attn_logit_softcapping:
            assert np.abs(scores).max() < cfg.attn_logit_softcapping
    sources = llamacpp.source_notes(llamacpp.arch_nodes(arch), cfg, False)
    assert sources["attn_scores"].startswith("kq_scaled_2-N" if arch == "gemma2" else "kq-N")
    assert "sliding window" in sources["attn_scores"]
    assert sources["embedding"] == "inp_scaled"
    assert sources["post_ffn_norm"].startswith("ffn_post_norm")


def test_gemma3_270m_q4_k_m_within_activation_rounding(gemma3_path):
    """Bound: llama.cpp rounds the input of every quantized matmul to 8 bits per block, step =
    block max / 127 (q8_0 in blocks of 32 for this file's Q5_0/Q8_0 Q/K/V, gate and up; q8_K
    in blocks of 256 for the Q4_K attention output and Q6_K down projection: the same rounding
    as q8_1), an error of at most half a step per element. Layer 0 has four such roundings in
    series (attention input, attention context, FFN input, gated FFN product); their relative
    L2 errors are computed here by applying that rounding to the NumPy engine's own
    activations (about 0.9%, 1.6%, 0.9%, 2.1% for this prompt: 256-wide blocks of the
    heavy-tailed context and product have a max of 8-10x their RMS). A stage downstream of
    some of them is off by at most their sum R (triangle inequality; linear maps carry a
    relative error over, the norms and softmax measured here do not amplify past it), so
    every layer-0 stage stays within relative L2 error R and cosine 1 - R^2 / 2 (R = 0.056:
    0.9984; measured: 0.0214 and 0.99977, the worst being ffn_out). The embedding rows are
    looked up from Q8_0 without rounding and the first norm sees no matmul: both exact.
    Deeper layers compound without a closed form: measured minimum cosine 0.9913 (layer 11),
    logits 0.99904 with the same argmax. A wrong mapping (a missing or doubled query scale,
    the FFN post-norm given to the wrong layer, scores of the uncapped node) costs far more."""
    model = load_model(gemma3_path)
    cfg = model.config
    assert cfg.architecture == "gemma3"
    ids = llamacpp.tokenize(model, "What is 2+2?")
    ref, _, ref_logits = run(forward, model, ids)
    got, _, logits = run(LlamaCppEngine(), model, ids)
    assert len(got) == len(ref) - cfg.num_layers  # all but ffn_silu (fused GeGLU)

    def rounding(x: np.ndarray, block: int) -> float:
        x = x.reshape(-1, block).astype(np.float64)
        step = np.abs(x).max(axis=1, keepdims=True) / 127
        rounded = np.round(x / np.where(step == 0, 1, step)) * step
        return float(np.linalg.norm(rounded - x) / np.linalg.norm(x))

    roundings = [
        rounding(ref[(Stage.ATTN_NORM, 0)], 32),
        rounding(ref[(Stage.ATTENTION, 0)], 256),
        rounding(ref[(Stage.FFN_NORM, 0)], 32),
        rounding(ref[(Stage.FFN_SWIGL, 0)], 256),
    ]
    bound = sum(roundings)
    assert 0.03 < bound < 0.08, roundings  # the rounding this bound is about is real
    for stage in (Stage.EMBEDDING, Stage.ATTN_NORM):
        np.testing.assert_allclose(got[(stage, 0)], ref[(stage, 0)], rtol=1e-5, atol=1e-6)
    for key, values in got.items():
        if key[1] == 0:
            rel = np.linalg.norm(values - ref[key]) / np.linalg.norm(ref[key])
            assert rel <= bound, (key, rel, bound)
            assert cosine(ref[key], values) >= 1 - bound**2 / 2, key
    assert min(cosine(ref[k], v) for k, v in got.items()) >= 0.98
    assert cosine(ref_logits, logits) >= 0.998
    assert int(np.argmax(logits)) == int(np.argmax(ref_logits))


def test_tokens_come_from_llamacpp_and_equal_aprtrace(tiny, smollm2_path):
    for path in (smollm2_path, tiny["qwen2"]):
        model = load_model(path)
        ids, info = llamacpp.prompt_token_ids(model, PROMPT, add_bos=False)
        own = list(model.tokenizer.encode(PROMPT, add_special_tokens=False).ids)
        assert ids == own
        assert info == {"source": "llama.cpp", "aprtrace_agrees": True}


def test_trace_cli_writes_same_layout_and_provenance(tiny, tmp_path):
    path = tiny["qwen3"]
    runner = CliRunner()
    args = ["--save-tensor", "all", "--save-tensor-layers", "1", "--prompt", PROMPT, "-q"]
    np_dir, lc_dir = tmp_path / "np", tmp_path / "lc"
    r1 = runner.invoke(main, ["trace", *args, "--save-tensor-dir", str(np_dir), str(path)])
    r2 = runner.invoke(
        main,
        ["trace", "--engine", "llama.cpp", *args, "--save-tensor-dir", str(lc_dir), str(path)],
    )
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    np_files = {p.relative_to(np_dir).as_posix() for p in np_dir.rglob("*.bin")}
    lc_files = {p.relative_to(lc_dir).as_posix() for p in lc_dir.rglob("*.bin")}
    assert lc_files == np_files - {"layer-1/ffn_silu.bin"}
    assert "layer-1/attn_norm.bin" in lc_files and "layer-0/attn_norm.bin" not in lc_files
    manifest = json.loads((lc_dir / "manifest.json").read_text())
    assert manifest["engine"] == "llama.cpp"
    assert manifest["llama_cpp"]["build"] == llamacpp_child.EXPECTED_LLAMA_CPP
    assert manifest["llama_cpp"]["cyllama"] == llamacpp_child.EXPECTED_CYLLAMA
    assert manifest["llama_cpp"]["context"]["flash_attn"] is False
    assert manifest["not_captured"] == ["ffn_silu"]
    assert manifest["tokenizer"]["source"] == "llama.cpp"
    assert manifest["token_ids"] == json.loads((np_dir / "manifest.json").read_text())["token_ids"]
    assert "Qcur_normed" not in json.dumps(manifest["stage_sources"])
    assert manifest["stage_sources"]["attn_out"].startswith("node after kqv_out-N")
    for rel in lc_files:  # same shapes as the NumPy engine's files
        assert read_aprt(lc_dir / rel).values.shape == read_aprt(np_dir / rel).values.shape


def test_compare_engines_numpy_llamacpp_passes(tiny, tmp_path):
    result = CliRunner().invoke(
        main,
        ["compare", str(tiny["llama"]), "--engines", "numpy,llama.cpp", "--dir", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    assert "(llama.cpp)" in result.output
    assert "llama.cpp does not compute ffn_silu: not in B, not compared" in result.output
    assert "OK: all" in result.output


@pytest.mark.reference
def test_compare_engines_transformers_llamacpp_one_report(tiny, tmp_path):
    pytest.importorskip("transformers")
    result = CliRunner().invoke(
        main,
        [
            "compare",
            str(tiny["qwen2"]),
            "--engines",
            "transformers,llama.cpp",
            "--dir",
            str(tmp_path),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output[result.output.index("{") :])
    assert doc["only_in_a"] == ["layer-0/ffn_silu.bin", "layer-1/ffn_silu.bin"]
    assert len(doc["pairs"]) == 1 + 16 * 2 + 2  # embedding, 17 - ffn_silu x 2 layers, 2 final
    assert min(p["cosine_sim"] for p in doc["pairs"]) >= F32_COSINE
    for side, engine in (("A", "transformers"), ("B", "llama.cpp")):
        dump = tmp_path / f"{side}-qwen2-f32-{engine.replace('.', '')}"
        assert json.loads((dump / "manifest.json").read_text())["engine"] == engine


@pytest.mark.reference
@pytest.mark.parametrize("arch", GEMMA_ARCHS)
def test_compare_gemma_transformers_llamacpp_agree(tiny, tmp_path, arch):
    """Two implementations neither of which is aprtrace's forward pass: transformers' Gemma
    classes on the decoded weights and llama.cpp on the file, every stage of every layer."""
    pytest.importorskip("transformers")
    layers = load_model(tiny[arch]).config.num_layers
    result = CliRunner().invoke(
        main,
        [
            "compare",
            str(tiny[arch]),
            "--engines",
            "transformers,llama.cpp",
            "--dir",
            str(tmp_path),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output[result.output.index("{") :])
    assert doc["only_in_a"] == [f"layer-{i}/ffn_silu.bin" for i in range(layers)]
    # embedding, the 18 per-layer stages but ffn_silu, final norm and lm_head
    assert len(doc["pairs"]) == 1 + 17 * layers + 2
    assert min(p["cosine_sim"] for p in doc["pairs"]) >= F32_COSINE


def test_engines_option_is_validated(tiny, tmp_path):
    result = CliRunner().invoke(
        main, ["compare", str(tiny["llama"]), "--engines", "numpy,llamacpp", "--dir", str(tmp_path)]
    )
    assert result.exit_code == 5
    assert "invalid --engines 'numpy,llamacpp'" in result.output


def test_trace_without_save_prints_llamacpp_statistics(tiny):
    result = CliRunner().invoke(main, ["trace", "--engine", "llama.cpp", str(tiny["llama"])])
    assert result.exit_code == 0, result.output
    assert "kq" not in result.output and "attn_softmax" in result.output
    assert "ffn_silu" not in result.output


@pytest.mark.parametrize(
    "bug, stage, layer",
    [("rms_norm_eps", "attn_norm", 0), ("layer1_ffn_norm_weight", "ffn_norm", 1)],
)
def test_injected_bug_is_named_as_first_divergence(tiny, tmp_path, monkeypatch, bug, stage, layer):
    """A bug in the NumPy engine only: llama.cpp (side B) is the witness."""
    import aprtrace.formats as formats

    real_load = formats.load_model

    def buggy_load(path, **kwargs):
        model = real_load(path, **kwargs)
        if bug == "rms_norm_eps":
            model.config = dataclasses.replace(model.config, rms_norm_eps=0.1)
        else:
            real_weight = model.weight
            target = "model.layers.1.post_attention_layernorm.weight"

            def weight(name, shape=None):
                values = real_weight(name, shape)
                return values * np.float32(1.3) if name == target else values

            model.weight = weight
        return model

    monkeypatch.setattr(formats, "load_model", buggy_load)
    result = CliRunner().invoke(
        main,
        [
            "compare",
            str(tiny["qwen2"]),
            "--engines",
            "numpy,llama.cpp",
            "--dir",
            str(tmp_path),
            "--json",
        ],
    )
    assert result.exit_code == 1, result.output
    report = json.loads(result.output[result.output.index("{") :])
    first = report["first_divergence"]
    assert (first["stage"], first["layer"]) == (stage, layer)


def _written_files_are_complete(out: Path) -> list[Path]:
    files = sorted(out.rglob("*"))
    for f in files:
        if f.is_file():
            assert f.suffix == ".bin", f"unexpected file {f}"
            read_aprt(f)  # a partial file fails its size check
    assert not (out / "manifest.json").exists()
    return [f for f in files if f.is_file()]


def test_killed_child_leaves_no_partial_files(smollm2_path, tmp_path, monkeypatch):
    children = []
    real_popen = llamacpp.subprocess.Popen

    def popen(*args, **kwargs):
        children.append(real_popen(*args, **kwargs))
        return children[-1]

    monkeypatch.setattr(llamacpp.subprocess, "Popen", popen)
    model = load_model(smollm2_path)
    plan = make_plan("all", "all", tmp_path / "dump", smollm2_path)

    def kill_after_two_layers(done, total):
        if done == 2:
            os.kill(children[-1].pid, signal.SIGKILL)

    with pytest.raises(InferenceError) as info:
        run_trace(
            model, [1780, 314, 216, 34], plan, progress=kill_after_two_layers, engine="llama.cpp"
        )
    assert "SIGKILL" in str(info.value) and "exit code -9" in str(info.value)
    files = _written_files_are_complete(tmp_path / "dump")
    # A failed run commits nothing: its staging directory is removed (issue 14).
    assert files == []
    assert children[-1].poll() is not None  # reaped


CRASHING_CHILD = r"""
import ctypes, struct, sys, json
out = sys.stdout.buffer
head = json.dumps({"kind": "hello", "cyllama": "0.2.18"}).encode()
out.write(struct.pack("<II", len(head), 0) + head)
head = json.dumps({"kind": "node", "name": "embd", "ne": [4, 2, 1, 1]}).encode()
out.write(struct.pack("<II", len(head), 32) + head + b"\0" * 16)  # half a payload
out.flush()
ctypes.string_at(0)  # SIGSEGV, as a bug in native code would
"""


def test_native_crash_is_a_clear_error(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp, "child_command", lambda: [sys.executable, "-c", CRASHING_CHILD])
    model = load_model(tiny["llama"])
    plan = make_plan("all", "all", tmp_path / "dump", tiny["llama"])
    with pytest.raises(InferenceError) as info:
        run_trace(model, [1, 2], plan, engine="llama.cpp")
    assert "SIGSEGV (exit code -11)" in str(info.value)
    assert info.value.exit_code == 8
    assert _written_files_are_complete(tmp_path / "dump") == []


class _ForeignParams:
    """Same property names as cyllama's LlamaContextParams, but not a C struct inside."""

    def __init__(self):
        for name in llamacpp_child.PROBE_FIELDS:
            setattr(self, name, 0)


def test_probe_knows_the_installed_layout_and_refuses_others():
    import cyllama.llama.llama_cpp as cy

    params = cy.LlamaContextParams()
    n_ctx = params.n_ctx
    assert llamacpp_child.probe_layout(params).struct_offset > 0
    assert params.n_ctx == n_ctx  # defaults restored
    with pytest.raises(llamacpp_child.LayoutError, match="cannot find"):
        llamacpp_child.probe_layout(_ForeignParams())
    with pytest.raises(llamacpp_child.LayoutError, match="cyllama 0.2.18"):
        llamacpp_child.check_versions({"cyllama": "0.3.0", "llama_cpp": "b9999", "ggml": "0.13"})
    assert llamacpp.probe()["cyllama"] == "0.2.18"


def test_unknown_cyllama_is_refused_with_the_expected_version(tiny, monkeypatch):
    script = (
        "import sys, aprtrace.engines.llamacpp_child as c; "
        "c.EXPECTED_CYLLAMA = '9.9.9'; sys.exit(c.main())"
    )
    monkeypatch.setattr(llamacpp, "child_command", lambda: [sys.executable, "-c", script])
    result = CliRunner().invoke(main, ["trace", "--engine", "llama.cpp", str(tiny["llama"])])
    assert result.exit_code == 5, result.output
    assert "refused" in result.output and "cyllama 9.9.9" in result.output
    assert "cyllama==0.2.18" in result.output


def test_unmapped_architecture_and_non_gguf_are_clear_errors(tiny, tmp_path, monkeypatch):
    mapped = {"llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "mixtral", "gemma2", "gemma3"}
    mapped |= {"phi3", "olmo2", "granite", "starcoder2", "stablelm", "gpt2"}
    assert mapped <= set(llamacpp.ARCHITECTURES)
    # An architecture without a node table is refused by name, before llama.cpp runs, exit 5.
    monkeypatch.delitem(llamacpp.ARCHITECTURES, "gemma2")
    model = load_model(tiny["gemma2"])
    with pytest.raises(ValidationError, match="architecture 'gemma2'"):
        LlamaCppEngine()(model, [1, 2])
    result = CliRunner().invoke(main, ["trace", "--engine", "llama.cpp", str(tiny["gemma2"])])
    assert result.exit_code == 5, result.output
    assert "no node mapping for architecture 'gemma2'" in result.output
    assert "Traceback" not in result.output
    model = load_model(tiny["llama"])
    model.format = "safetensors"
    with pytest.raises(ValidationError, match="reads GGUF files"):
        LlamaCppEngine()(model, [1, 2])
    plan = make_plan("all", "all", tmp_path / "dump", tiny["llama"])
    with pytest.raises(ValidationError, match="reads GGUF files"):
        run_trace(model, [1, 2], plan, engine="llama.cpp")
    assert not (tmp_path / "dump").exists()  # refused before any output
