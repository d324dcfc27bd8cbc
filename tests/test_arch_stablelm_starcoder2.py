"""StableLM and StarCoder2, stage by stage against transformers.

Tiny seeded ``StableLmForCausalLM`` (LayerNorm with bias, partial rotary 0.25, qkv bias) and
``Starcoder2ForCausalLM`` (LayerNorm with bias, biases on every projection, non-gated
GELU-tanh MLP, tied head, a sliding window shorter than the prompt) in safetensors, GGUF F32
and Q8_0 (llama.cpp's names and ``attention.layer_norm_epsilon``) and APR; every stage of
every layer within 1e-4 of the stage's largest magnitude (tests/archref.py).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import hfref
from aprtrace.errors import ModelLoadError
from aprtrace.formats import load_model
from aprtrace.formats.gguf import gguf_config, read_gguf
from archref import (
    CONTAINERS,
    LAYER_NORM_EPS,
    PROMPT,
    WINDOW,
    aprtrace_stages,
    assert_engines_agree,
    assert_stages_match_transformers,
    build_files,
)

pytestmark = pytest.mark.reference

ARCHS = ("stablelm", "starcoder2")


@pytest.fixture(scope="module")
def tokenizer():
    return hfref.tiny_tokenizer()


@pytest.fixture(scope="module")
def token_ids(tokenizer):
    ids = tokenizer.encode(PROMPT).ids
    assert len(ids) > 2 * WINDOW["starcoder2"]
    return ids


@pytest.fixture(scope="module")
def files(tokenizer, tmp_path_factory):
    return build_files(ARCHS, tokenizer, tmp_path_factory.mktemp("layernorm"))


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_stage_matches_transformers(arch, container, files, token_ids):
    assert_stages_match_transformers(files, arch, container, token_ids)


def test_starcoder2_has_no_gate_stages_and_attributes_to_up(files, token_ids):
    from types import SimpleNamespace

    from aprtrace.stages import Stage, computes, stage_inputs

    names = {s for s, _ in aprtrace_stages(files[("starcoder2", "gguf-F32")][0], token_ids)}
    assert not names & {"ffn_gate", "ffn_swigl"}
    assert {"qkv_bias", "ffn_up", "ffn_silu", "ffn_out"} <= names
    cfg = SimpleNamespace(architecture="starcoder2", qkv_bias=True)

    def has(stage):
        return computes(stage, cfg)

    assert stage_inputs(Stage.FFN_SILU, 1, has, 3) == [(1, Stage.FFN_UP)]
    assert stage_inputs(Stage.FFN_OUT, 1, has, 3) == [(1, Stage.FFN_SILU)]


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_norm_config_from_every_container(arch, files):
    """LayerNorm epsilon from each container's own key; partial rotary; the window."""
    for container in CONTAINERS:
        cfg = load_model(files[(arch, container)][0]).config
        assert cfg.rms_norm_eps == pytest.approx(LAYER_NORM_EPS, rel=1e-6), container
        assert cfg.rotary_dim == (4 if arch == "stablelm" else 16), container
        assert cfg.sliding_window == WINDOW.get(arch), container
    gf = read_gguf(files[(arch, "gguf-F32")][0])
    assert gf.metadata[f"{arch}.attention.layer_norm_epsilon"] == pytest.approx(LAYER_NORM_EPS)
    assert "output_norm.bias" in gf.tensors


def test_layer_norm_is_not_rms_norm(files, token_ids):
    """Guard: attn_norm is centred (mean 0 before the weight and bias), which RMSNorm is not."""
    path, state = files[("stablelm", "safetensors")]
    ours = aprtrace_stages(path, token_ids)
    w = state["model.layers.0.input_layernorm.weight"]
    b = state["model.layers.0.input_layernorm.bias"]
    normalized = (ours[("attn_norm", 0)] - b) / w
    np.testing.assert_allclose(normalized.mean(axis=-1), 0.0, atol=1e-4)
    np.testing.assert_allclose(normalized.std(axis=-1), 1.0, atol=1e-2)


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_engine_agrees(arch, files, token_ids):
    assert_engines_agree(files, arch, token_ids)


@pytest.mark.parametrize("key", ["use_parallel_residual", "qk_layernorm"])
def test_stablelm_2_12b_variants_are_refused(key, files, tmp_path):
    src, _ = files[("stablelm", "safetensors")]
    dst = tmp_path / "edited"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config[key] = True
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="StableLM 2 12B"):
        load_model(dst)
    gf = read_gguf(files[("stablelm", "gguf-F32")][0])
    gf.metadata["stablelm.use_parallel_residual"] = True
    with pytest.raises(ModelLoadError, match="parallel residual"):
        gguf_config(gf)


def test_each_architecture_has_exactly_one_module():
    """A base class (LayerNormLlama) must not register itself over Llama's names."""
    import importlib
    from types import SimpleNamespace

    from aprtrace.arch import _MODULES, Architecture, architecture_of
    from aprtrace.config import SUPPORTED_ARCHITECTURES

    claims: dict[str, list[str]] = {}
    for module_name in _MODULES:
        for value in vars(importlib.import_module(module_name)).values():
            if isinstance(value, type) and issubclass(value, Architecture):
                if value.__module__ == module_name:
                    for name in value.names:
                        claims.setdefault(name, []).append(value.__name__)
    assert all(len(owners) == 1 for owners in claims.values()), claims
    assert set(claims) == set(SUPPORTED_ARCHITECTURES)
    for name, (owner,) in claims.items():
        assert type(architecture_of(SimpleNamespace(architecture=name))).__name__ == owner
