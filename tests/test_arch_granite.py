"""Granite 3, stage by stage against transformers' GraniteForCausalLM.

A tiny seeded Granite model with all four multipliers far from 1 (embedding x12, residual
x0.22, query scale 1/128 instead of head_dim ** -0.5, logits / 8) in safetensors, GGUF F32 and
Q8_0 (llama.cpp's ``granite.*_scale`` keys, Llama's permuted Q/K rows) and APR; every stage of
every layer within 1e-4 of the stage's largest magnitude (tests/archref.py).
"""

from __future__ import annotations

import numpy as np
import pytest

import hfref
from aprtrace.formats import load_model
from aprtrace.formats.gguf import read_gguf
from archref import (
    CONTAINERS,
    GRANITE,
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
    return build_files(("granite",), tokenizer, tmp_path_factory.mktemp("granite"))


@pytest.mark.parametrize("container", CONTAINERS)
def test_every_stage_matches_transformers(container, files, token_ids):
    assert_stages_match_transformers(files, "granite", container, token_ids)


def test_multipliers_reach_every_container(files):
    """The four multipliers are read from config.json, llama.cpp's GGUF keys and APR."""
    gf = read_gguf(files[("granite", "gguf-F32")][0])
    assert gf.metadata["granite.embedding_scale"] == pytest.approx(12.0)
    assert gf.metadata["granite.residual_scale"] == pytest.approx(0.22)
    assert gf.metadata["granite.attention.scale"] == pytest.approx(0.0078125)
    assert gf.metadata["granite.logit_scale"] == pytest.approx(8.0)
    for container in CONTAINERS:
        cfg = load_model(files[("granite", container)][0]).config
        for name, value in GRANITE.items():
            assert getattr(cfg, name) == pytest.approx(value, rel=1e-6), (container, name)
        assert cfg.attention_scale == pytest.approx(0.0078125)


def test_multipliers_change_the_stages_they_should(files, token_ids):
    """Guard against multipliers that cancel out or are read but never applied: the
    embedding is 12x the table row, the residual adds scale the projections, the logits are
    the head's product divided by 8."""
    path, state = files[("granite", "safetensors")]
    ours = aprtrace_stages(path, token_ids)
    rows = state["model.embed_tokens.weight"][token_ids]
    np.testing.assert_allclose(ours[("embedding", 0)], rows * np.float32(12.0), rtol=1e-6)
    np.testing.assert_allclose(
        ours[("post_attn_residual", 0)],
        ours[("embedding", 0)] + np.float32(0.22) * ours[("attn_out", 0)],
        rtol=1e-5,
        atol=1e-6,
    )
    head = state["lm_head.weight"] @ ours[("final_norm", None)][-1]
    np.testing.assert_allclose(ours[("lm_head", None)], head / 8.0, rtol=1e-5, atol=1e-6)


def test_transformers_engine_agrees(files, token_ids):
    assert_engines_agree(files, "granite", token_ids)
