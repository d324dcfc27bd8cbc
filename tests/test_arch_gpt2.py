"""GPT-2, stage by stage against transformers' ``GPT2LMHeadModel``.

A tiny seeded GPT-2 (learned absolute positions, LayerNorm with bias, fused Conv1D
``c_attn`` with bias, gelu_new MLP, tied head) in safetensors (Hugging Face's Conv1D
``[in, out]`` layout), GGUF F32 and Q8_0 (llama.cpp's names: ``position_embd``,
``attn_qkv``, weights transposed by its converter) and APR; every stage of every layer within
1e-4 of the stage's largest magnitude (tests/archref.py). The reference weights of a GGUF
are decoded by gguf-py and mapped to GPT-2's names by archref's own table.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import hfref
from aprtrace.errors import ModelLoadError
from aprtrace.formats import load_model
from aprtrace.formats.gguf import read_gguf
from archref import (
    CONTAINERS,
    LAYER_NORM_EPS,
    PROMPT,
    aprtrace_stages,
    assert_engines_agree,
    assert_stages_match_transformers,
    build_files,
)

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def tokenizer():
    return hfref.tiny_tokenizer()


@pytest.fixture(scope="module")
def token_ids(tokenizer):
    return tokenizer.encode(PROMPT).ids


@pytest.fixture(scope="module")
def files(tokenizer, tmp_path_factory):
    return build_files(("gpt2",), tokenizer, tmp_path_factory.mktemp("gpt2"))


@pytest.mark.parametrize("container", CONTAINERS)
def test_every_stage_matches_transformers(container, files, token_ids):
    assert_stages_match_transformers(files, "gpt2", container, token_ids)


def test_transformers_engine_agrees(files, token_ids):
    assert_engines_agree(files, "gpt2", token_ids)


def test_config_and_names_of_every_container(files):
    for container in CONTAINERS:
        model = load_model(files[("gpt2", container)][0])
        cfg = model.config
        assert cfg.architecture == "gpt2", container
        assert cfg.rms_norm_eps == pytest.approx(LAYER_NORM_EPS, rel=1e-6), container
        assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (64, 3, 4), container
        assert (cfg.intermediate_size, cfg.max_position_embeddings) == (128, 256), container
        assert cfg.tie_word_embeddings and cfg.qkv_bias, container
        assert model.tensor("model.embed_positions.weight").shape == (256, 64), container
    gf = read_gguf(files[("gpt2", "gguf-F32")][0])
    assert gf.architecture == "gpt2"
    assert {"position_embd.weight", "blk.0.attn_qkv.weight", "blk.0.attn_qkv.bias"} <= set(
        gf.tensors
    )
    assert gf.metadata["gpt2.attention.layer_norm_epsilon"] == pytest.approx(LAYER_NORM_EPS)
    assert not any(key.startswith("gpt2.rope.") for key in gf.metadata)


def test_embedding_adds_the_learned_positions(files, token_ids):
    """Guard: the embedding stage is wte[ids] + wpe[0..seq), and q_post_rope is the plain
    projection (no RoPE): Q of position p equals Q the same token would have anywhere."""
    path, state = files[("gpt2", "safetensors")]
    ours = aprtrace_stages(path, token_ids)
    expected = (
        state["transformer.wte.weight"][token_ids]
        + state["transformer.wpe.weight"][: len(token_ids)]
    )
    np.testing.assert_allclose(ours[("embedding", 0)], expected, atol=1e-6)
    qkv = ours[("qkv_bias", 0)]
    np.testing.assert_allclose(ours[("q_post_rope", 0)], qkv[:, :64], atol=1e-6)
    assert not {"ffn_gate", "ffn_swigl"} & {s for s, _ in ours}


@pytest.mark.parametrize(
    ("key", "value", "feature"),
    [
        ("scale_attn_by_inverse_layer_idx", True, "1/\\(layer \\+ 1\\)"),
        ("scale_attn_weights", False, "without the 1/sqrt"),
        ("activation_function", "relu", "activation 'relu'"),
    ],
)
def test_unsupported_gpt2_switches_are_refused(key, value, feature, files, tmp_path):
    src, _ = files[("gpt2", "safetensors")]
    dst = tmp_path / "edited"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=feature):
        load_model(dst)


@pytest.mark.parametrize("name", ["gpt-oss", "gpt_oss", "GptOssForCausalLM"])
def test_gpt_oss_is_refused_naming_the_missing_features(name):
    """gpt-oss (GGUF ``gpt-oss``, config.json ``gpt_oss``) is refused by its features."""
    from aprtrace.config import normalize_architecture

    with pytest.raises(ModelLoadError, match="attention sinks, YaRN RoPE") as info:
        normalize_architecture(name, "m.gguf")
    assert "clamped SwiGLU" in info.value.message and "MXFP4" in info.value.message


def test_original_checkpoint_names_and_mask_buffers(files, token_ids, tmp_path):
    """openai-community/gpt2's safetensors: no ``transformer.`` prefix and the causal-mask
    buffers ``h.N.attn.bias``; the same stages as the prefixed checkpoint."""
    from safetensors.numpy import load_file, save_file

    src, _ = files[("gpt2", "safetensors")]
    dst = tmp_path / "original"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    renamed = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for i in range(3):
        renamed[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 8, 8), np.float32))
    save_file(renamed, str(dst / "model.safetensors"))
    assert aprtrace_stages(dst, token_ids).keys() == aprtrace_stages(src, token_ids).keys()
    np.testing.assert_array_equal(
        aprtrace_stages(dst, token_ids)[("lm_head", None)],
        aprtrace_stages(src, token_ids)[("lm_head", None)],
    )


def test_convert_from_safetensors_keeps_the_stages(files, token_ids, tmp_path):
    """APR written from the Conv1D checkpoint (F32) computes the safetensors' stages."""
    from aprtrace.convert import convert_model

    src, _ = files[("gpt2", "safetensors")]
    apr = tmp_path / "gpt2.apr"
    convert_model(src, apr, dtype="keep")
    ours, ref = aprtrace_stages(apr, token_ids), aprtrace_stages(src, token_ids)
    assert ours.keys() == ref.keys()
    for key, values in ref.items():
        np.testing.assert_allclose(ours[key], values, rtol=1e-5, atol=1e-6, err_msg=str(key))
