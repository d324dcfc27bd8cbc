"""Every stage of every layer of aprtrace's forward pass against Hugging Face transformers.

Tiny seeded llama, qwen2 (qkv bias) and qwen3 (q/k norm) models are built in transformers,
written to GGUF (F32, F16, Q8_0, Q4_0) and traced by aprtrace. transformers then computes on exactly
the weights the GGUF holds (decoded by gguf-py, llama Q/K un-permuted here), with forward hooks
and a wrapped eager attention capturing the same 20 stages. Bound: max abs error <= 1e-4 of the
stage's largest magnitude.
"""

from __future__ import annotations

import numpy as np
import pytest

import hfref
from aprtrace.config import ModelConfig
from aprtrace.formats import load_model
from aprtrace.formats.gguf_writer import tokenizer_dict_from_hf, write_gguf
from aprtrace.forward import forward

pytestmark = pytest.mark.reference

ARCHS = ("llama", "qwen2", "qwen3")
QTYPES = ("F32", "F16", "Q8_0", "Q4_0")
PROMPT = "What is 2+2? The quick brown fox, 1234 times.\n"
RELATIVE_BOUND = 1e-4
TOKENIZER_TEXTS = (
    PROMPT,
    "Hello, world! Hello again,   world.",
    "def forward(model, token_ids):\n    return model(token_ids)\n",
    "unseen words: zebra QUIXOTIC naïve 3.14159 ünïcödé 日本",
    "  \t\n\n trailing spaces   ",
)


def config_of(model) -> ModelConfig:
    """aprtrace's ModelConfig for a tiny transformers model."""
    c = model.config
    arch = c.model_type
    return ModelConfig(
        architecture=arch,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        intermediate_size=c.intermediate_size,
        vocab_size=c.vocab_size,
        head_dim=c.head_dim,
        rope_theta=hfref.config_rope_theta(c),
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=bool(c.tie_word_embeddings),
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
    )


@pytest.fixture(scope="module")
def tokenizer():
    return hfref.tiny_tokenizer()


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_gguf")


def write_tiny(arch: str, qtype: str, tokenizer, directory):
    """``(transformers model, gguf path)``: the seeded tiny model written as ``qtype``."""
    model = hfref.tiny_hf_model(arch, seed=7)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    meta = tokenizer_dict_from_hf(tokenizer, eos_token="<|endoftext|>")
    path = write_gguf(directory / f"{arch}-{qtype}.gguf", config_of(model), state, meta, qtype)
    return model, path


def aprtrace_stages(path, token_ids):
    model = load_model(path)
    captured: dict = {}

    def emit(stage, layer, values):
        key = (stage.value, layer)
        assert key not in captured, f"stage {key} emitted twice"
        captured[key] = np.array(values, dtype=np.float32, copy=True)

    logits = forward(model, list(token_ids), emit)
    return model, captured, logits


def stage_errors(ours: dict, ref: dict) -> list[tuple]:
    """``(key, max abs error, max |ref|)`` of every stage over the bound, in forward order."""
    bad = []
    for key, expected in ref.items():
        got = ours[key]
        assert got.shape == expected.shape, (
            f"{key}: aprtrace {got.shape} vs transformers {expected.shape}"
        )
        scale = float(np.max(np.abs(expected)))
        err = float(np.max(np.abs(got.astype(np.float64) - expected)))
        if not err <= RELATIVE_BOUND * scale:
            bad.append((key, err, scale))
    return bad


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_stage_matches_transformers(arch, qtype, tokenizer, gguf_dir):
    hf_model, path = write_tiny(arch, qtype, tokenizer, gguf_dir)
    stored_arch, weights = hfref.gguf_weights_hf(path)
    assert stored_arch == arch
    # transformers computes on the very weights the GGUF holds (rounded / quantized).
    hfref.load_weights_into(hf_model, weights)
    token_ids = tokenizer.encode(PROMPT).ids
    ref = hfref.hf_stage_activations(hf_model, token_ids)

    _, ours, logits = aprtrace_stages(path, token_ids)

    assert set(ours) == set(ref), (
        f"stages emitted by aprtrace but not captured from transformers: {set(ours) - set(ref)}; "
        f"captured but not emitted: {set(ref) - set(ours)}"
    )
    assert (("qkv_bias", 0) in ref) == (arch == "qwen2")
    bad = stage_errors(ours, ref)
    assert not bad, (
        "first stages over the bound (stage, layer), max abs err, max |ref|: "
        + "; ".join(f"{k}: {e:.3g} / {s:.3g}" for k, e, s in bad[:6])
    )
    np.testing.assert_array_equal(logits, ours[("lm_head", None)])
    assert int(np.argmax(logits)) == int(np.argmax(ref[("lm_head", None)]))


def test_quantized_weights_really_differ(tokenizer, gguf_dir):
    """Guard for the quantized cases: Q8_0 weights are not the float32 originals, so the
    reference really has to load the dequantized values to meet the bound."""
    hf_model, path = write_tiny("qwen2", "Q8_0", tokenizer, gguf_dir)
    _, weights = hfref.gguf_weights_hf(path)
    original = hf_model.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
    quantized = weights["model.layers.0.mlp.up_proj.weight"]
    assert 1e-4 < np.max(np.abs(quantized - original)) / np.max(np.abs(original)) < 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_ids_equal_hf_tokenizer(arch, tokenizer, gguf_dir):
    _, path = write_tiny(arch, "F32", tokenizer, gguf_dir)
    model = load_model(path)
    assert model.tokenizer is not None, "aprtrace built no tokenizer from the GGUF metadata"
    for text in TOKENIZER_TEXTS:
        expected = tokenizer.encode(text, add_special_tokens=False).ids
        assert model.tokenizer.encode(text, add_special_tokens=False).ids == expected, text


@pytest.mark.parametrize("arch", ARCHS)
def test_harness_captures_the_buffers_it_names(arch, tokenizer):
    """The reference itself: identities between the captured transformers buffers, so a hook on
    the wrong module cannot pass unnoticed."""
    model = hfref.tiny_hf_model(arch, seed=3)
    ids = tokenizer.encode(PROMPT).ids
    ref = hfref.hf_stage_activations(model, ids)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    seq, last = len(ids), model.config.num_hidden_layers - 1
    np.testing.assert_array_equal(ref[("embedding", 0)], state["model.embed_tokens.weight"][ids])
    for layer in range(model.config.num_hidden_layers):
        p = f"model.layers.{layer}."
        layer_input = ref[("embedding", 0)] if layer == 0 else ref[("post_ffn_residual", layer - 1)]
        np.testing.assert_allclose(
            ref[("post_attn_residual", layer)], layer_input + ref[("attn_out", layer)], atol=1e-5
        )
        np.testing.assert_allclose(
            ref[("post_ffn_residual", layer)],
            ref[("post_attn_residual", layer)] + ref[("ffn_out", layer)],
            atol=1e-5,
        )
        q_dim = state[p + "self_attn.q_proj.weight"].shape[0]
        np.testing.assert_allclose(
            ref[("qkv_matmul", layer)][:, :q_dim],
            ref[("attn_norm", layer)] @ state[p + "self_attn.q_proj.weight"].T,
            atol=1e-5,
        )
        if arch == "qwen2":
            bias = np.concatenate([state[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
            np.testing.assert_allclose(
                ref[("qkv_bias", layer)], ref[("qkv_matmul", layer)] + bias, atol=1e-5
            )
        np.testing.assert_allclose(
            ref[("ffn_swigl", layer)], ref[("ffn_silu", layer)] * ref[("ffn_up", layer)], atol=1e-6
        )
        probs, scores = ref[("attn_softmax", layer)], ref[("attn_scores", layer)]
        assert probs.shape == scores.shape == (model.config.num_attention_heads, seq, seq)
        np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
        assert not np.triu(probs, k=1).any() and not np.triu(scores, k=1).any()
        # Position 0 is not rotated: q_post_rope row 0 is the (q-normed) projection itself.
        q0 = ref[("qkv_matmul" if arch != "qwen2" else "qkv_bias", layer)][0, :q_dim]
        if arch != "qwen3":
            np.testing.assert_allclose(ref[("q_post_rope", layer)][0], q0, atol=1e-5)
    np.testing.assert_allclose(
        ref[("lm_head", None)],
        state["lm_head.weight"] @ ref[("final_norm", None)][-1],
        rtol=1e-5,
        atol=1e-5,
    )
    assert ref[("final_norm", None)].shape == ref[("post_ffn_residual", last)].shape


def test_cached_reference_stores_once_and_keys_on_every_part(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {("attn_norm", 2): np.arange(6.0).reshape(2, 3), ("lm_head", None): np.ones(4)}

    first = hfref.cached_reference(["file-sha", [1, 2, 3]], compute, cache_dir=tmp_path)
    again = hfref.cached_reference(["file-sha", [1, 2, 3]], compute, cache_dir=tmp_path)
    assert len(calls) == 1 and set(again) == set(first)
    np.testing.assert_array_equal(again[("attn_norm", 2)], first[("attn_norm", 2)])
    hfref.cached_reference(["file-sha", [1, 2, 4]], compute, cache_dir=tmp_path)
    assert len(calls) == 2
    assert len(list(tmp_path.glob("*.npz"))) == 2 and not list(tmp_path.glob("*.partial"))
