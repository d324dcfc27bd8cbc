"""The real SmolLM2-135M-Instruct Q4_1 GGUF: aprtrace against Hugging Face transformers.

transformers loads the GGUF itself (``gguf_file=``, dequantizing to float32 and un-permuting the
llama Q/K rows) and its AutoTokenizer encodes the prompt. That load takes a while, so
transformers' stage values and token ids are cached under ~/.cache/aprtrace/ref/, keyed by the
file's sha256, the prompt, the transformers version and the harness version (see
``hfref.gguf_reference``). Only the reference's output is cached, never aprtrace's.
"""

from __future__ import annotations

import numpy as np
import pytest

import hfref
from aprtrace.formats import load_model
from aprtrace.forward import forward

pytestmark = [pytest.mark.reference, pytest.mark.slow]

PROMPT = "What is 2+2?"
HF_TOKEN_IDS = [1780, 314, 216, 34, 27, 34, 47]
STAGE_COSINE = 0.9999
RESIDUAL_COSINE = 0.99999
LOGITS_COSINE = 0.99999


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    if denom == 0.0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(a @ b / denom)


@pytest.fixture(scope="module")
def reference(smollm2_path):
    return hfref.gguf_reference(smollm2_path, PROMPT)


@pytest.fixture(scope="module")
def traced(smollm2_path):
    model = load_model(smollm2_path)
    captured: dict = {}

    def emit(stage, layer, values):
        captured[(stage.value, layer)] = np.array(values, dtype=np.float32, copy=True)

    ids = model.tokenizer.encode(PROMPT, add_special_tokens=False).ids
    logits = forward(model, ids, emit)
    return model, ids, captured, logits


def test_token_ids_equal_transformers(reference, traced):
    assert reference["token_ids"].tolist() == HF_TOKEN_IDS
    _, ids, _, _ = traced
    assert list(ids) == HF_TOKEN_IDS


def test_same_stages_as_transformers(reference, traced):
    _, _, ours, _ = traced
    ref_keys = {k for k in reference if isinstance(k, tuple)}
    assert set(ours) == ref_keys
    # 16 per-layer stages x 30 layers (llama: no qkv_bias) + embedding, final_norm, lm_head.
    assert len(ours) == 16 * 30 + 3


def test_every_stage_of_every_layer_has_high_cosine(reference, traced):
    _, _, ours, _ = traced
    bad = []
    for key, expected in reference.items():
        if not isinstance(key, tuple):
            continue
        got = ours[key]
        assert got.shape == expected.shape, f"{key}: {got.shape} vs {expected.shape}"
        bound = RESIDUAL_COSINE if key[0] == "post_ffn_residual" else STAGE_COSINE
        value = cosine(got, expected)
        if not value >= bound:
            bad.append((key, value, bound))
    assert not bad, "stages under the cosine bound: " + "; ".join(
        f"{k}: {v:.7f} < {b}" for k, v, b in bad[:8]
    )


def test_final_logits_match_transformers(reference, traced):
    _, _, ours, logits = traced
    expected = reference[("lm_head", None)]
    assert logits.shape == expected.shape == (49152,)
    assert int(np.argmax(logits)) == int(np.argmax(expected))
    assert cosine(logits, expected) >= LOGITS_COSINE
