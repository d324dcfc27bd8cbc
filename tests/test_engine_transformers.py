"""The transformers engine (``aprtrace.engines.transformers.hf_forward``) against two references.

1. aprtrace's NumPy forward pass on the same loaded file (GGUF F32 and Q8_0): same stages in
   the same order, each within 1e-4 of the stage's largest magnitude.
2. transformers run directly on the original seeded model (F32 GGUF holds its exact weights):
   checks the weight names, the Q/K un-permutation and the config mapping independently.
3. Llama 3 and linear RoPE scaling from a safetensors directory against transformers' own
   model built from that config.json.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest

import hfref
from aprtrace.errors import ValidationError
from aprtrace.formats import load_model
from aprtrace.formats.gguf_writer import tokenizer_dict_from_hf, write_gguf
from aprtrace.forward import forward
from aprtrace.model import LazyTensor
from aprtrace.stages import Stage

pytestmark = pytest.mark.reference

ARCHS = ("llama", "qwen2", "qwen3")
PROMPT = "What is 2+2? The quick brown fox, 1234 times.\n"
RELATIVE_BOUND = 1e-4
ROPE_TOKENS = [3, 50, 7, 120, 9, 33, 61, 2, 88, 14, 200, 5]
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def tokenizer():
    return hfref.tiny_tokenizer()


@pytest.fixture(scope="module")
def token_ids(tokenizer):
    return tokenizer.encode(PROMPT).ids


def save_hf_dir(hf_model, tokenizer, directory):
    """``hf_model`` as a safetensors directory with config.json and tokenizer.json."""
    hf_model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def gguf_of(st_model, tokenizer, path, qtype: str = "F32", tie: bool = False):
    """The safetensors-loaded ``st_model`` written as a ``qtype`` GGUF (optionally tied)."""
    config = dataclasses.replace(st_model.config, tie_word_embeddings=tie)
    tensors = {name: t.load() for name, t in st_model.tensors.items()}
    if tie:
        del tensors["lm_head.weight"]
    return write_gguf(path, config, tensors, tokenizer_dict_from_hf(tokenizer), qtype)


@pytest.fixture(scope="module")
def tiny_files(tokenizer, tmp_path_factory):
    """``{arch: (original transformers model, safetensors dir)}`` of the seeded tiny models."""
    root = tmp_path_factory.mktemp("engine_hf")
    out = {}
    for arch in ARCHS:
        hf_model = hfref.tiny_hf_model(arch, seed=7)
        out[arch] = (hf_model, save_hf_dir(hf_model, tokenizer, root / arch))
    return out


def run(engine, model, ids):
    """``(stages in emission order, returned logits, progress calls)`` of one engine run."""
    captured: dict = {}
    calls: list = []

    def emit(stage, layer, values):
        key = (stage.value, layer)
        assert key not in captured, f"{key} emitted twice"
        captured[key] = np.array(values, dtype=np.float32, copy=True)

    logits = engine(model, list(ids), emit, lambda done, total: calls.append((done, total)))
    return captured, logits, calls


def over_bound(got: dict, want: dict, bound: float = RELATIVE_BOUND) -> list[str]:
    """Stages whose max abs error exceeds ``bound`` times the reference's max magnitude."""
    bad = []
    for key, expected in want.items():
        have = got[key]
        assert have.shape == expected.shape, f"{key}: {have.shape} vs {expected.shape}"
        scale = max(float(np.max(np.abs(expected))), 1e-6)
        err = float(np.max(np.abs(have.astype(np.float64) - expected)))
        if not err <= bound * scale:
            bad.append(f"{key}: err {err:.3g} / scale {scale:.3g}")
    return bad


def hf_forward(*args, **kwargs):
    from aprtrace.engines.transformers import hf_forward as engine

    return engine(*args, **kwargs)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_numpy_engine_on_gguf(arch, qtype, tiny_files, tokenizer, token_ids, tmp_path):
    _, st_dir = tiny_files[arch]
    model = load_model(gguf_of(load_model(st_dir), tokenizer, tmp_path / "m.gguf", qtype))

    ours, ours_logits, ours_progress = run(forward, model, token_ids)
    theirs, logits, progress = run(hf_forward, model, token_ids)

    assert list(theirs) == list(ours), "same (stage, layer) keys in the same emission order"
    assert (("qkv_bias", 0) in theirs) == (arch == "qwen2")
    assert len(theirs) == 3 * (16 + (arch == "qwen2")) + 3
    assert progress == ours_progress == [(1, 3), (2, 3), (3, 3)]
    np.testing.assert_array_equal(logits, theirs[("lm_head", None)])
    bad = over_bound(ours, theirs)
    assert not bad, "; ".join(bad[:6])
    assert int(np.argmax(logits)) == int(np.argmax(ours_logits))


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_from_gguf_reproduce_the_original_model(arch, tiny_files, tokenizer, token_ids):
    """F32 GGUF -> aprtrace Model -> transformers gives the original transformers model's values:
    names, llama Q/K un-permutation, biases, q/k norms and config all map back exactly."""
    hf_model, st_dir = tiny_files[arch]
    path = gguf_of(load_model(st_dir), tokenizer, st_dir.parent / f"{arch}-f32.gguf")
    model = load_model(path)
    assert model.qk_permuted == (arch == "llama")

    theirs, _, _ = run(hf_forward, model, token_ids)
    original = hfref.hf_stage_activations(hf_model, token_ids)

    assert set(theirs) == set(original)
    bad = over_bound(theirs, original, bound=1e-6)
    assert not bad, "; ".join(bad[:6])


def test_tied_embeddings_use_the_embedding_as_lm_head(tiny_files, tokenizer, token_ids, tmp_path):
    _, st_dir = tiny_files["llama"]
    model = load_model(gguf_of(load_model(st_dir), tokenizer, tmp_path / "t.gguf", tie=True))
    assert "lm_head.weight" not in model.tensors

    theirs, logits, _ = run(hf_forward, model, token_ids)
    ours, _, _ = run(forward, model, token_ids)

    embed = model.weight("model.embed_tokens.weight")
    by_hand = embed.astype(np.float64) @ theirs[("final_norm", None)][-1].astype(np.float64)
    np.testing.assert_allclose(logits, by_hand, rtol=0, atol=1e-4 * np.max(np.abs(by_hand)))
    assert not over_bound(ours, theirs)


@pytest.mark.parametrize("scaling", [LLAMA3, {"rope_type": "linear", "factor": 4.0}])
def test_scaled_rope_from_safetensors_matches_transformers(scaling, tokenizer, tmp_path):
    hf_model = hfref.tiny_hf_model("llama", seed=5, rope_scaling=scaling)
    model = load_model(save_hf_dir(hf_model, tokenizer, tmp_path / "hf"))
    want = hfref.hf_stage_activations(hf_model, ROPE_TOKENS)

    theirs, _, _ = run(hf_forward, model, ROPE_TOKENS)

    assert set(theirs) == set(want)
    bad = over_bound(theirs, want)
    assert not bad, "; ".join(bad[:6])
    # The scaling matters: the same weights without it rotate the queries differently.
    plain = dataclasses.replace(
        model,
        config=dataclasses.replace(model.config, rope_linear_factor=1.0),
        tensors={k: v for k, v in model.tensors.items() if k != "rope_freqs.weight"},
    )
    unscaled, _, _ = run(hf_forward, plain, ROPE_TOKENS)
    key = ("q_post_rope", 0)
    assert not np.allclose(unscaled[key], want[key], atol=1e-3)


@pytest.mark.parametrize("package", ["torch", "transformers"])
def test_missing_ref_extra_is_a_validation_error(package, tiny_gguf, monkeypatch):
    from aprtrace.engines import transformers as engine

    model = load_model(tiny_gguf)
    monkeypatch.setitem(sys.modules, package, None)  # `import <package>` now fails
    with pytest.raises(ValidationError) as info:
        engine.hf_forward(model, [1, 2, 3])
    assert info.value.exit_code == 5
    assert "--engine transformers needs the `ref` extra" in info.value.message
    assert package in info.value.message
    assert "pip install torch==2.13.0" in info.value.hint


def test_memory_budget_is_checked_before_loading(tiny_files, tokenizer, token_ids):
    from aprtrace.engines.transformers import float32_weight_bytes

    hf_model, st_dir = tiny_files["qwen2"]
    model = load_model(st_dir)
    # Independent count: transformers' own parameters (untied) at 4 bytes each.
    need = 4 * sum(p.numel() for p in hf_model.parameters())
    assert float32_weight_bytes(model) == need

    with pytest.raises(ValidationError, match="holds the whole model as float32") as info:
        hf_forward(model, token_ids, memory_budget=need - 1)
    assert info.value.exit_code == 5
    logits = hf_forward(model, token_ids, memory_budget=need)
    assert logits.shape == (model.config.vocab_size,)


def test_bias_without_a_transformers_place_is_refused(tiny_files, token_ids):
    """Qwen2 has no o_proj bias in transformers: silently dropping one would fake agreement."""
    _, st_dir = tiny_files["qwen2"]
    model = load_model(st_dir)
    bias = np.ones(model.config.hidden_size, dtype=np.float32)
    name = "model.layers.1.self_attn.o_proj.bias"
    extra = LazyTensor(name, bias.shape, "F32", bias.view(np.uint8))
    model = dataclasses.replace(model, tensors={**model.tensors, name: extra})
    with pytest.raises(ValidationError, match="o_proj.bias"):
        hf_forward(model, token_ids)


def test_bad_token_ids_are_refused_like_the_numpy_engine(tiny_files):
    model = load_model(tiny_files["llama"][1])
    with pytest.raises(ValidationError, match="outside the vocabulary"):
        hf_forward(model, [model.config.vocab_size])


@pytest.mark.slow
def test_smollm2_matches_numpy_engine(smollm2_path):
    """Real Q4_1 model with tied embeddings: every stage of all 30 layers."""
    model = load_model(smollm2_path)
    ids = model.tokenizer.encode("What is 2+2?", add_special_tokens=False).ids
    ours, _, _ = run(forward, model, ids)
    theirs, logits, progress = run(hf_forward, model, ids)
    assert list(theirs) == list(ours)
    assert progress[-1] == (30, 30)
    assert Stage.QKV_BIAS.value not in {stage for stage, _ in theirs}
    bad = over_bound(ours, theirs)
    assert not bad, "; ".join(bad[:6])


def test_default_budget_is_a_share_of_available_memory(tiny_files, token_ids, monkeypatch):
    from aprtrace.engines import transformers as engine

    model = load_model(tiny_files["llama"][1])
    need = engine.float32_weight_bytes(model)
    monkeypatch.setattr(engine, "available_memory_bytes", lambda: int(need / 0.75) - 8)
    with pytest.raises(ValidationError, match="75% of the memory available"):
        engine.hf_forward(model, token_ids)
    monkeypatch.setattr(engine, "available_memory_bytes", lambda: int(need / 0.75) + 8)
    assert engine.hf_forward(model, token_ids).shape == (model.config.vocab_size,)


def test_a_failing_emit_restores_transformers(tiny_files, token_ids):
    """An emit error (e.g. a full disk) propagates and leaves transformers' attention intact."""
    import transformers.models.llama.modeling_llama as modeling

    original = modeling.eager_attention_forward
    model = load_model(tiny_files["llama"][1])

    def emit(stage, layer, values):
        if stage is Stage.ATTN_OUT:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        hf_forward(model, token_ids, emit)
    assert modeling.eager_attention_forward is original
