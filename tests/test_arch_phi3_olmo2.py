"""Phi-3, OLMo 2 and Mistral's sliding window, stage by stage against transformers.

Tiny seeded ``Phi3ForCausalLM`` (fused qkv_proj / gate_up_proj, partial rotary 0.5, a
sliding window shorter than the prompt), ``Olmo2ForCausalLM`` (post-norms only, Q/K norms over
the whole projection) and ``MistralForCausalLM`` (window shorter than the prompt) are saved as
safetensors, written as GGUF with llama.cpp's conventions (F32 and Q8_0) and converted to APR.
transformers then runs on exactly the weights each file holds (a GGUF is decoded by gguf-py and
mapped to transformers' names by tests/archref.py's tables, written from llama.cpp's tensor
lists, not by aprtrace) and every stage of every layer must agree within 1e-4 of the stage's
largest magnitude, the bound of test_reference_tiny.py.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest

import hfref
from aprtrace.errors import ModelLoadError
from aprtrace.formats import load_model
from aprtrace.formats.gguf import read_gguf
from aprtrace.stages import Stage, computes, stage_inputs
from archref import (
    CONTAINERS,
    PROMPT,
    WINDOW,
    aprtrace_stages,
    assert_engines_agree,
    assert_stages_match_transformers,
    build_files,
)

pytestmark = pytest.mark.reference

ARCHS = ("phi3", "olmo2", "mistral")


@pytest.fixture(scope="module")
def tokenizer():
    return hfref.tiny_tokenizer()


@pytest.fixture(scope="module")
def token_ids(tokenizer):
    ids = tokenizer.encode(PROMPT).ids
    assert len(ids) > 2 * max(WINDOW.values()), "the prompt must be longer than the windows"
    return ids


@pytest.fixture(scope="module")
def files(tokenizer, tmp_path_factory):
    return build_files(ARCHS, tokenizer, tmp_path_factory.mktemp("phi3_olmo2"))


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_stage_matches_transformers(arch, container, files, token_ids):
    assert_stages_match_transformers(files, arch, container, token_ids)


def test_quantized_files_hold_other_weights_than_the_original(files):
    """Guard: the Q8_0 references really run on the quantized weights (else a loader that
    ignored the file would pass)."""
    _, original = files[("phi3", "safetensors")]
    _, quantized = files[("phi3", "gguf-Q8_0")]
    name = "model.layers.0.self_attn.qkv_proj.weight"
    rel = np.max(np.abs(quantized[name] - original[name])) / np.max(np.abs(original[name]))
    assert 1e-4 < rel < 1e-2


def test_stage_sets_follow_the_block_structure(files, token_ids):
    """OLMo 2 has post-norms and no pre-norms; Phi-3 and Mistral have Llama's stages."""
    olmo = aprtrace_stages(files[("olmo2", "gguf-F32")][0], token_ids)
    names = {stage for stage, _ in olmo}
    assert {"post_attn_norm", "post_ffn_norm"} <= names
    assert not names & {"attn_norm", "ffn_norm", "qkv_bias"}
    from aprtrace.stages import stages_for

    phi_path = files[("phi3", "gguf-F32")][0]
    phi = aprtrace_stages(phi_path, token_ids)
    as_llama = dataclasses.replace(load_model(phi_path).config, architecture="llama")
    assert {stage for stage, _ in phi} == {s.value for s in stages_for(as_llama)}
    assert {"qkv_matmul", "ffn_gate", "ffn_up", "ffn_swigl"} <= {stage for stage, _ in phi}


def test_olmo2_attribution_reads_the_residual_stream():
    """Where attn_norm / ffn_norm are absent, the projections consume the residuals."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(architecture="olmo2", qkv_bias=False)

    def has(stage):
        return computes(stage, cfg)

    assert stage_inputs(Stage.QKV_MATMUL, 0, has, 3) == [(0, Stage.EMBEDDING)]
    assert stage_inputs(Stage.QKV_MATMUL, 2, has, 3) == [(1, Stage.POST_FFN_RESIDUAL)]
    assert stage_inputs(Stage.FFN_GATE, 1, has, 3) == [(1, Stage.POST_ATTN_RESIDUAL)]
    assert stage_inputs(Stage.POST_ATTN_RESIDUAL, 1, has, 3)[1] == (1, Stage.POST_ATTN_NORM)
    llama = SimpleNamespace(architecture="llama", qkv_bias=False)
    assert stage_inputs(Stage.QKV_MATMUL, 1, lambda s: computes(s, llama), 3) == [
        (1, Stage.ATTN_NORM)
    ]


def test_gguf_follows_llama_cpp_conventions(files):
    """Fused Phi-3 tensors, OLMo 2's post-norm names, the keys llama.cpp's loader reads."""
    phi = read_gguf(files[("phi3", "gguf-F32")][0])
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= set(phi.tensors)
    assert not {"blk.0.attn_q.weight", "blk.0.ffn_gate.weight"} & set(phi.tensors)
    h, inter = 64, 128
    assert phi.tensors["blk.0.ffn_up.weight"].shape == (2 * inter, h)  # gate rows, then up
    assert phi.metadata["phi3.rope.dimension_count"] == 8  # 0.5 of head_dim 16
    assert phi.metadata["phi3.attention.sliding_window"] == WINDOW["phi3"]
    olmo = read_gguf(files[("olmo2", "gguf-F32")][0])
    assert {"blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"} <= set(olmo.tensors)
    assert "blk.0.attn_norm.weight" not in olmo.tensors
    assert olmo.tensors["blk.0.attn_q_norm.weight"].shape == (64,)  # whole projection
    mistral = read_gguf(files[("mistral", "gguf-F32")][0])
    assert mistral.architecture == "llama"
    assert mistral.metadata["llama.attention.sliding_window"] == WINDOW["mistral"]


@pytest.mark.parametrize("arch", ARCHS)
def test_config_is_the_same_from_every_container(arch, files):
    configs = {c: load_model(files[(arch, c)][0]).config for c in CONTAINERS}
    first = configs["safetensors"]
    assert first.sliding_window == WINDOW.get(arch)
    assert first.rotary_dim == (8 if arch == "phi3" else 16)
    for container, cfg in configs.items():
        # GGUF stores eps as f32: compare it approximately, everything else exactly.
        assert cfg.rms_norm_eps == pytest.approx(first.rms_norm_eps, rel=1e-6)
        assert dataclasses.replace(cfg, rms_norm_eps=first.rms_norm_eps) == first, container


def test_sliding_window_masks_attention_maps(files, token_ids):
    """Entries outside the window are exactly 0 in scores and probabilities."""
    ours = aprtrace_stages(files[("mistral", "safetensors")][0], token_ids)
    seq = len(token_ids)
    q, k = np.indices((seq, seq))
    outside = (k > q) | (q - k >= WINDOW["mistral"])
    for stage in ("attn_scores", "attn_softmax"):
        values = ours[(stage, 1)]
        assert not values[:, outside].any()
        assert np.all(values[:, ~outside] != 0)
    np.testing.assert_allclose(ours[("attn_softmax", 1)].sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_engine_agrees(arch, files, token_ids):
    assert_engines_agree(files, arch, token_ids)


# --- refusals -------------------------------------------------------------------------------


def _edited_copy(files, arch, tmp_path, edit):
    import shutil

    src, _ = files[(arch, "safetensors")]
    dst = tmp_path / f"{arch}-edited"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


LONGROPE = {
    "long_factor": [1.0] * 4,
    "short_factor": [1.0] * 4,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    "edit, feature",
    [
        (lambda c: c.update(rope_scaling={"type": "longrope", **LONGROPE}), "LongRoPE"),
        (lambda c: c.update(rope_scaling={"type": "su", **LONGROPE}), "LongRoPE"),
        (
            lambda c: c["rope_parameters"].update(rope_type="longrope", **LONGROPE),
            "LongRoPE",
        ),
        (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "YaRN"),
        (lambda c: c.update(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "dynamic"),
        (lambda c: c.update(kv_lora_rank=16), "MLA"),
    ],
)
def test_unsupported_phi3_features_are_refused_by_name(edit, feature, files, tmp_path):
    path = _edited_copy(files, "phi3", tmp_path, edit)
    with pytest.raises(ModelLoadError, match=feature):
        load_model(path)


def test_longrope_gguf_and_olmo3_window_pattern_are_refused(files, tmp_path):
    import gguf

    from aprtrace.formats.gguf import gguf_config

    phi = read_gguf(files[("phi3", "gguf-F32")][0])
    phi.tensors["rope_factors_long.weight"] = phi.tensors["output_norm.weight"]
    with pytest.raises(ModelLoadError, match="LongRoPE"):
        gguf_config(phi)
    olmo = read_gguf(files[("olmo2", "gguf-F32")][0])
    olmo.metadata["olmo2.attention.sliding_window_pattern"] = np.array([True, True, False])
    with pytest.raises(ModelLoadError, match="sliding-window pattern"):
        gguf_config(olmo)
    olmo.metadata.pop("olmo2.attention.sliding_window_pattern")
    olmo.metadata["olmo2.rope.scaling.type"] = gguf.RopeScalingType.YARN.value
    with pytest.raises(ModelLoadError, match="yarn"):
        gguf_config(olmo)


def test_refusal_is_an_exit_code_not_a_traceback(files, tmp_path):
    from click.testing import CliRunner

    from aprtrace.cli import main

    path = _edited_copy(
        files, "phi3", tmp_path, lambda c: c.update(rope_scaling={"type": "longrope", **LONGROPE})
    )
    result = CliRunner().invoke(main, ["trace", str(path), "--tokens", "1,2,3"])
    assert result.exit_code == 6, result.output
    assert "LongRoPE" in result.output and "Traceback" not in result.output


def test_fused_split_checks_the_rows_against_the_config(files, tmp_path):
    path = _edited_copy(files, "phi3", tmp_path, lambda c: c.update(intermediate_size=96))
    with pytest.raises(ModelLoadError, match="gate_up_proj"):
        load_model(path)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_apr_with_llama_cpp_names_and_fused_tensors(files, token_ids, tmp_path):
    """An APR holding the GGUF's tensors under their llama.cpp names (fused ``attn_qkv`` and
    ``ffn_up`` = gate+up, as aprender's importer keeps them) traces exactly as the GGUF."""
    from aprtrace.formats.apr import WRITER_DTYPE_CODES, write_apr

    gguf_path, _ = files[("phi3", "gguf-F32")]
    gf = read_gguf(gguf_path)
    cfg = load_model(gguf_path).config
    entries = [
        (t.name, WRITER_DTYPE_CODES["F32"], t.shape, bytes(gf.tensor_bytes(t)))
        for t in sorted(gf.tensors.values(), key=lambda t: t.name)
    ]
    metadata = {
        "architecture": "phi3",
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_type": 2,
        "rms_norm_eps": cfg.rms_norm_eps,
        "head_dim": cfg.head_dim,
        "sliding_window": cfg.sliding_window,
        "partial_rotary_factor": cfg.partial_rotary_factor,
    }
    apr = tmp_path / "phi3-gguf-names.apr"
    write_apr(apr, metadata, entries)
    model = load_model(apr)
    assert "model.layers.0.mlp.gate_proj.weight" in model.tensors
    assert model.config == cfg
    a, b = aprtrace_stages(gguf_path, token_ids), aprtrace_stages(apr, token_ids)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_qwen_sliding_window_layers_are_refused(tmp_path):
    model = hfref.tiny_hf_model("qwen2", seed=1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["use_sliding_window"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="sliding-window layers"):
        load_model(tmp_path)


def test_rope_dimension_count_survives_the_division_into_a_factor():
    """GGUF gives rotated channels as a count; as a factor of head_dim it must give the same
    count back (int(62 / 78 * 78) is 61)."""
    from aprtrace.config import ModelConfig

    for head_dim in range(2, 258, 2):
        for rotated in range(2, head_dim + 1, 2):
            cfg = ModelConfig(
                "phi3", 64, 1, 1, 1, 1, 1, head_dim, partial_rotary_factor=rotated / head_dim
            )
            assert cfg.rotary_dim == rotated, (rotated, head_dim)


def test_unknown_activation_is_refused(files, tmp_path):
    path = _edited_copy(files, "olmo2", tmp_path, lambda c: c.update(hidden_act="gelu"))
    with pytest.raises(ModelLoadError, match="activation 'gelu'"):
        load_model(path)


def test_teacher_forcing_covers_phi3_and_olmo2(files, token_ids, tmp_path):
    """Phi-3 (split weights, partial rotary, window) and OLMo 2 (post-norms only): a dump
    localized against its own model has zero local and inherited error everywhere."""
    from aprtrace.diff import diff_dirs
    from aprtrace.localize import localize
    from aprtrace.plan import make_plan
    from aprtrace.trace import run_trace

    def dump(path, out):
        run_trace(load_model(path), token_ids, make_plan("all", "all", out, path), clean=True)
        return out

    f32, q8 = files[("phi3", "gguf-F32")][0], files[("phi3", "gguf-Q8_0")][0]
    a, b = dump(f32, tmp_path / "a"), dump(q8, tmp_path / "b")
    same = diff_dirs(a, a)
    loc = localize(same, load_model(f32))
    assert len(same.pairs) == 1 + 16 * 3 + 2
    for p in same.pairs:
        s = loc.get(p)
        assert s.note is None and (s.local_rel_l2, s.inherited_rel_l2) == (0.0, 0.0), p.key.label
    quantized = diff_dirs(a, b)
    loc = localize(quantized, load_model(f32))
    local = {p.key.label for p in quantized.pairs if loc.get(p).local_rel_l2 > 1e-4}
    assert "layer 0 qkv_matmul" in local and "layer 0 attn_softmax" not in local, local
    olmo = files[("olmo2", "gguf-F32")][0]
    o = dump(olmo, tmp_path / "o")
    same = diff_dirs(o, o)
    loc = localize(same, load_model(olmo))
    assert len(same.pairs) == 1 + 16 * 3 + 2
    for p in same.pairs:
        s = loc.get(p)
        assert s.note is None and (s.local_rel_l2, s.inherited_rel_l2) == (0.0, 0.0), p.key.label


@pytest.mark.parametrize("arch", ["phi3", "olmo2", "granite", "stablelm", "starcoder2", "mistral"])
def test_f32_dumps_identical_across_containers(arch, tokenizer, token_ids, tmp_path):
    """Every reader hands the forward pass the same float32 weights: safetensors, the F32
    GGUF written from it and the APR converted from it give bit-identical stages."""
    from aprtrace.convert import convert_model
    from archref import build_files as build

    built = build((arch,), tokenizer, tmp_path)
    hf_dir, gguf = built[(arch, "safetensors")][0], built[(arch, "gguf-F32")][0]
    apr = tmp_path / f"{arch}-from-hf.apr"
    convert_model(hf_dir, apr, dtype="keep")
    reference = aprtrace_stages(hf_dir, token_ids)
    for path in (gguf, apr):
        other = aprtrace_stages(path, token_ids)
        assert other.keys() == reference.keys()
        different = [k for k in reference if not np.array_equal(reference[k], other[k])]
        assert not different, f"{path.name}: {different[:4]}"
