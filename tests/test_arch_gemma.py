"""Gemma 2 and Gemma 3, every stage of every layer, against transformers' own model classes.

Tiny seeded ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM`` models (head_dim 32 != hidden/heads,
GQA, tied embeddings, a sliding window of 5 shorter than the prompt, Gemma 2 with soft-caps
small enough to bite, Gemma 3 with Q/K norms and a local RoPE base) are saved as safetensors,
written as GGUF with llama.cpp's conventions (F32 and Q8_0) and converted to APR. transformers
then runs on the weights each container holds (GGUF decoded by gguf-py here, norms un-offset
here) and its stages are captured by the transformers engine's hooks. Bound as in
test_reference_tiny: max abs error <= 1e-4 of the stage's largest magnitude.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import hfref
from aprtrace.convert import convert_model
from aprtrace.errors import ValidationError
from aprtrace.formats import load_model
from aprtrace.formats.gguf_writer import tokenizer_dict_from_hf, write_gguf
from aprtrace.stages import Stage, stages_for
from test_reference_tiny import PROMPT, aprtrace_stages, stage_errors

pytestmark = pytest.mark.reference

ARCHS = ("gemma2", "gemma3")
CONTAINERS = ("safetensors", "gguf-F32", "gguf-Q8_0", "apr")
WINDOW = hfref.GEMMA_WINDOW
LAYERS = hfref.GEMMA_LAYERS

# llama.cpp's GGUF names of a Gemma block, written out here (not taken from aprtrace).
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}


def gguf_weights(path) -> dict[str, np.ndarray]:
    """``{hf_name: float32}`` of a Gemma GGUF via gguf-py, with llama.cpp's ``+1`` on the norm
    weights undone."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        values = np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), np.float32)
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{_GGUF_LAYER[parts[2]]}.{parts[3]}"
        else:
            name = f"{_GGUF_GLOBAL[parts[0]]}.{parts[1]}"
        if name.endswith("norm.weight"):
            values = values - np.float32(1.0)
        out[name] = values.reshape(shape)
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return hfref.tiny_tokenizer()


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer):
    """arch -> (transformers model, {container: path}), each model in every container."""
    out = {}
    for arch in ARCHS:
        directory = tmp_path_factory.mktemp(f"tiny_{arch}")
        hf_model = hfref.tiny_gemma(arch)
        st_dir = directory / "safetensors"
        hf_model.save_pretrained(st_dir)
        tokenizer.save(str(st_dir / "tokenizer.json"))
        config = load_model(st_dir).config
        state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
        meta = tokenizer_dict_from_hf(tokenizer, eos_token="<|endoftext|>")
        paths = {"safetensors": st_dir}
        for qtype in ("F32", "Q8_0"):
            paths[f"gguf-{qtype}"] = write_gguf(
                directory / f"{arch}-{qtype}.gguf", config, state, meta, qtype
            )
        convert_model(paths["gguf-F32"], directory / f"{arch}.apr")
        paths["apr"] = directory / f"{arch}.apr"
        out[arch] = (hf_model, paths, {k: v.copy() for k, v in state.items()})
    return out


def reference(built_arch, container: str, token_ids):
    """transformers' stages on the weights ``container`` holds (the APR is converted from the
    F32 GGUF, so it holds that file's values)."""
    hf_model, paths, original = built_arch
    if container == "safetensors":
        hfref.load_weights_into(hf_model, original)
    else:
        source = paths["gguf-F32" if container == "apr" else container]
        hfref.load_weights_into(hf_model, gguf_weights(source))
    return hfref.hf_stage_activations(hf_model, token_ids)


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_stage_matches_transformers(arch, container, built, tokenizer):
    paths = built[arch][1]
    token_ids = tokenizer.encode(PROMPT).ids
    assert len(token_ids) > 2 * WINDOW
    ref = reference(built[arch], container, token_ids)
    model, ours, logits = aprtrace_stages(paths[container], token_ids)

    assert model.config.architecture == arch
    assert set(ours) == set(ref), set(ours) ^ set(ref)
    for stage in (Stage.POST_ATTN_NORM, Stage.POST_FFN_NORM):
        assert all((stage.value, i) in ours for i in range(LAYERS[arch]))
    bad = stage_errors(ours, ref)
    assert not bad, "; ".join(f"{k}: {e:.3g} / {s:.3g}" for k, e, s in bad[:6])
    assert int(np.argmax(logits)) == int(np.argmax(ref[("lm_head", None)]))


@pytest.mark.parametrize("arch", ARCHS)
def test_config_is_the_same_in_every_container(arch, built):
    paths = built[arch][1]
    configs = {c: load_model(p).config for c, p in paths.items()}
    expected = configs["safetensors"]
    assert expected.sliding_window == WINDOW
    assert expected.query_pre_attn_scalar == 32 and expected.head_dim * 4 != expected.hidden_size
    if arch == "gemma3":
        assert expected.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
        assert (expected.rope_theta, expected.rope_local_theta) == (1e6, 1e4)
        assert expected.qk_norm
    else:
        assert expected.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
        assert (expected.attn_logit_softcapping, expected.final_logit_softcapping) == (3.0, 2.0)
    fields = (
        "architecture",
        "num_layers",
        "head_dim",
        "qk_norm",
        "tie_word_embeddings",
        "rope_theta",
        "sliding_window",
        "layer_types",
        "rope_local_theta",
        "query_pre_attn_scalar",
        "attn_logit_softcapping",
        "final_logit_softcapping",
    )
    for container, config in configs.items():
        for name in fields:
            assert getattr(config, name) == getattr(expected, name), (container, name)


@pytest.mark.parametrize("arch", ARCHS)
def test_sliding_layers_mask_outside_the_window(arch, built, tokenizer):
    paths = built[arch][1]
    ids = tokenizer.encode(PROMPT).ids
    model, ours, _ = aprtrace_stages(paths["gguf-F32"], ids)
    q, k = np.indices((len(ids), len(ids)))
    for layer in range(LAYERS[arch]):
        probs, scores = ours[("attn_softmax", layer)], ours[("attn_scores", layer)]
        inside = (k <= q) & ((q - k < WINDOW) if model.config.is_sliding(layer) else True)
        assert np.all(probs[:, ~inside] == 0) and np.all(scores[:, ~inside] == 0)
        assert np.all(probs[:, inside] > 0)
    assert not model.config.is_sliding(1 if arch == "gemma2" else 5)


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_transformers_agrees_with_numpy(arch, built, tokenizer):
    from aprtrace.engines.transformers import hf_forward

    paths = built[arch][1]
    ids = tokenizer.encode(PROMPT).ids
    model, ours, _ = aprtrace_stages(paths["gguf-Q8_0"], ids)
    theirs = {}
    hf_forward(model, ids, lambda s, layer, v: theirs.setdefault((s.value, layer), v.copy()))
    assert set(theirs) == set(ours)
    assert {s for s, _ in ours} == {s.value for s in stages_for(model.config)}
    bad = stage_errors(ours, theirs)
    assert not bad, "; ".join(f"{k}: {e:.3g} / {s:.3g}" for k, e, s in bad[:6])


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_capture_is_gemma_shaped(arch, tokenizer):
    """Identities between the captured transformers buffers: the post-norms sit between each
    sublayer and its residual add, the embedding is scaled by sqrt(hidden)."""
    hf_model = hfref.tiny_gemma(arch, seed=9)
    ids = tokenizer.encode(PROMPT).ids
    ref = hfref.hf_stage_activations(hf_model, ids)
    embed = hf_model.state_dict()["model.embed_tokens.weight"].numpy()
    np.testing.assert_array_equal(ref[("embedding", 0)], embed[ids] * np.float32(64**0.5))
    for layer in range(LAYERS[arch]):
        x = ref[("embedding", 0)] if layer == 0 else ref[("post_ffn_residual", layer - 1)]
        h = ref[("post_attn_residual", layer)]
        np.testing.assert_allclose(h, x + ref[("post_attn_norm", layer)], atol=1e-5)
        np.testing.assert_allclose(
            ref[("post_ffn_residual", layer)], h + ref[("post_ffn_norm", layer)], atol=1e-5
        )
        assert not np.allclose(ref[("post_attn_norm", layer)], ref[("attn_out", layer)])
        if arch == "gemma2":  # saturated just below the cap: the soft-cap is applied and bites
            assert 2.9 < np.max(np.abs(ref[("attn_scores", layer)])) < 3.0
    if arch == "gemma2":
        assert 1.9 < np.max(np.abs(ref[("lm_head", None)])) < 2.0


def test_gguf_follows_llama_cpp_conventions(built):
    """Tensor names as llama.cpp's gguf-py lists them for the architecture, norms stored
    as w + 1, and the Gemma metadata keys."""
    for arch, (_, paths, original) in built.items():
        reader = gguf.GGUFReader(str(paths["gguf-F32"]))
        arch_id = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
        allowed = {
            gguf.TENSOR_NAMES[t].format(bid=i) + ".weight"
            for t in gguf.MODEL_TENSORS[arch_id]
            for i in range(LAYERS[arch])
        }
        names = {t.name for t in reader.tensors}
        assert names <= allowed and len(names) == 2 + LAYERS[arch] * (
            11 if arch == "gemma2" else 13
        )
        stored = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
        hf_w = original["model.layers.0.input_layernorm.weight"]
        np.testing.assert_array_equal(np.asarray(stored.data), hf_w + np.float32(1.0))
        fields = reader.fields
        assert int(fields[f"{arch}.attention.sliding_window"].parts[-1][0]) == WINDOW
        assert f"{arch}.attention.sliding_window_pattern" not in fields  # llama.cpp's default
        if arch == "gemma2":
            assert float(fields["gemma2.attn_logit_softcapping"].parts[-1][0]) == 3.0
            assert float(fields["gemma2.final_logit_softcapping"].parts[-1][0]) == 2.0


def test_gguf_writer_refuses_what_llama_cpp_cannot_read(built, tmp_path):
    import dataclasses

    paths = built["gemma2"][1]
    model = load_model(paths["safetensors"])
    state = {name: model.weight(name) for name in model.tensors}
    for change in (
        {"query_pre_attn_scalar": 48.0},
        {"attn_logit_softcapping": None},
        {"tie_word_embeddings": False},
    ):
        config = dataclasses.replace(model.config, **change)
        with pytest.raises(ValidationError):
            write_gguf(tmp_path / "x.gguf", config, state)


def test_gemma3_linear_rope_scaling_on_global_layers_only(tmp_path, tokenizer):
    """Gemma 3 4B+ scale RoPE linearly on the global layers only (transformers' per-kind
    rope_parameters, llama.cpp's rope_freq_scale_train_swa = 1)."""
    import dataclasses

    scaled = {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}
    hf_model = hfref.tiny_gemma("gemma3", seed=13, global_rope=scaled)
    original = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
    hf_model.save_pretrained(tmp_path / "st")
    config = load_model(tmp_path / "st").config
    assert config.rope_linear_factor == 4.0
    meta = tokenizer_dict_from_hf(tokenizer, eos_token="<|endoftext|>")
    gguf_path = write_gguf(tmp_path / "scaled.gguf", config, original, meta, "F32")
    ids = tokenizer.encode(PROMPT).ids
    for path, weights in ((tmp_path / "st", original), (gguf_path, gguf_weights(gguf_path))):
        hfref.load_weights_into(hf_model, weights)
        ref = hfref.hf_stage_activations(hf_model, ids)
        model, ours, _ = aprtrace_stages(path, ids)
        assert model.config.rope_linear_factor == 4.0
        bad = stage_errors(ours, ref)
        assert not bad, "; ".join(f"{k}: {e:.3g} / {s:.3g}" for k, e, s in bad[:6])
    model.config = dataclasses.replace(model.config, rope_linear_factor=1.0)
    _, unscaled, _ = aprtrace_stages_of(model, ids)
    np.testing.assert_array_equal(unscaled[("q_post_rope", 0)], ours[("q_post_rope", 0)])
    assert not np.allclose(unscaled[("q_post_rope", 5)], ours[("q_post_rope", 5)], atol=1e-3)


def aprtrace_stages_of(model, ids):
    from aprtrace.forward import forward

    captured: dict = {}
    logits = forward(
        model, list(ids), lambda s, layer, v: captured.setdefault((s.value, layer), v.copy())
    )
    return model, captured, logits


def test_cli_engine_transformers_dump_diffs_clean_against_numpy(built, tmp_path):
    """`trace --engine transformers` and the NumPy trace of a Gemma GGUF, then `diff --values`:
    exit 0, every one of the 21 stage kinds (with the post-norms) compared."""
    from click.testing import CliRunner

    from aprtrace.cli import main

    path = built["gemma3"][1]["gguf-Q8_0"]
    runner = CliRunner()
    dumps = []
    for engine in ("numpy", "transformers"):
        out = tmp_path / engine
        args = ["trace", "--engine", engine, "--save-tensor", "all", "--save-tensor-layers"]
        result = runner.invoke(main, [*args, "all", "--save-tensor-dir", str(out), "-q", str(path)])
        assert result.exit_code == 0, result.output
        dumps.append(out)
    assert {p.stem for p in dumps[0].rglob("*.bin")} == {
        s.value for s in stages_for(load_model(path).config)
    }
    result = runner.invoke(main, ["diff", "--values", str(dumps[0]), str(dumps[1]), "--all"])
    assert result.exit_code == 0, result.output
    assert "post_ffn_norm" in result.output and "OK: all" in result.output


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported"),
        ({"layer_types": ["sliding_attention"]}, "layer_types must name"),
        ({"sliding_window": 0}, "sliding_window = 0 must be a positive integer"),
    ],
)
def test_bad_gemma_config_is_exit_6(built, tmp_path, change, message):
    import json
    import shutil

    from click.testing import CliRunner

    from aprtrace.cli import main

    directory = tmp_path / "model"
    shutil.copytree(built["gemma2"][1]["safetensors"], directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | change))
    result = CliRunner().invoke(main, ["trace", "-q", str(directory)])
    assert result.exit_code == 6, result.output
    assert message in result.output


def test_gemma3_gguf_without_sliding_window_is_refused():
    from aprtrace.errors import ModelLoadError
    from aprtrace.mapping import gguf_config_fields

    with pytest.raises(ModelLoadError, match="gemma3.attention.sliding_window"):
        gguf_config_fields("gemma3", {}, 6, 64, 4, 32, "x.gguf")


@pytest.mark.parametrize("arch", ARCHS)
def test_diff_model_teacher_forcing_reproduces_gemma_exactly(arch, built, tokenizer, tmp_path):
    """`diff --values --model`: B traced from the Q8_0 GGUF re-runs bit for bit from its own
    inputs (local error 0 on every stage, post-norms, windowed and soft-capped attention
    included), while against the F32 weights the quantized projections show local error."""
    from aprtrace.diff import diff_dirs
    from aprtrace.localize import localize
    from aprtrace.plan import make_plan
    from aprtrace.trace import run_trace

    paths = built[arch][1]
    ids = tokenizer.encode(PROMPT).ids

    def trace(model_path, out):
        plan = make_plan("all", "all", out, model_path)
        run_trace(load_model(model_path), ids, plan, collect_stats=False, clean=True)
        return out

    a, b = trace(paths["gguf-F32"], tmp_path / "a"), trace(paths["gguf-Q8_0"], tmp_path / "b")
    result = diff_dirs(a, b)
    loc = localize(result, load_model(paths["gguf-Q8_0"]))
    assert len(result.pairs) == 1 + LAYERS[arch] * 18 + 2
    for p in result.pairs:
        s = loc.get(p)
        assert s.note is None and s.local_rel_l2 == 0.0, p.key.label
        assert p.stats.rel_l2 > 1e-4, p.key.label
    loc = localize(result, load_model(paths["gguf-F32"]))
    stages = {p.key.label: loc.get(p) for p in result.pairs}
    assert 2e-3 < stages["layer 0 qkv_matmul"].local_rel_l2 < 1.5e-2
    assert stages["layer 0 post_attn_norm"].local_rel_l2 < 1e-6
