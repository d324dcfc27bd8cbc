"""RoPE scaling: Llama 3.1 "llama3" frequency factors and linear scaling, against transformers.

transformers computes the scaled inverse frequencies itself from config.json; aprtrace turns
the same config into llama.cpp's ``rope_freqs.weight`` divisors (safetensors) or reads them
from the GGUF, and both must give transformers' activations.
"""

from __future__ import annotations

import numpy as np
import pytest

from aprtrace.config import llama3_rope_factors
from aprtrace.formats import load_model
from aprtrace.formats.gguf_writer import tokenizer_dict_from_hf, write_gguf
from aprtrace.forward import forward

pytestmark = pytest.mark.reference
TOKENS = [3, 50, 7, 120, 9, 33, 61, 2, 88, 14, 200, 5]
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _hf_model(rope_scaling: dict | None, seed: int = 3):
    import torch
    import transformers

    from hfref import tiny_tokenizer

    config = transformers.LlamaConfig(
        vocab_size=tiny_tokenizer().get_vocab_size(),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=rope_scaling,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for param in model.parameters():
            if param.ndim == 1:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
    return model


def _aprtrace_stages(path) -> dict:
    got = {}
    forward(load_model(path), TOKENS, lambda s, layer, v: got.__setitem__((s.value, layer), v))
    return got


def _assert_matches(got: dict, ref: dict) -> None:
    assert got.keys() >= ref.keys()
    for key, want in ref.items():
        have = got[key].reshape(want.shape)
        scale = max(float(np.max(np.abs(want))), 1e-6)
        err = float(np.max(np.abs(have - want)))
        assert err <= 1e-4 * scale, f"{key}: max err {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("scaling", [LLAMA3, {"rope_type": "linear", "factor": 4.0}])
def test_scaled_rope_matches_transformers_from_safetensors_and_gguf(scaling, tmp_path):
    from hfref import hf_stage_activations, tiny_tokenizer

    model = _hf_model(scaling)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir, safe_serialization=True)
    tiny_tokenizer().save(str(hf_dir / "tokenizer.json"))
    ref = hf_stage_activations(model, TOKENS)

    st_stages = _aprtrace_stages(hf_dir)
    _assert_matches(st_stages, ref)

    loaded = load_model(hf_dir)
    tensors = {name: t.load() for name, t in loaded.tensors.items()}
    gguf = write_gguf(
        tmp_path / "m.gguf", loaded.config, tensors, tokenizer_dict_from_hf(tiny_tokenizer())
    )
    gguf_stages = _aprtrace_stages(gguf)
    for key, value in st_stages.items():
        assert np.array_equal(value, gguf_stages[key]), key

    # The scaling matters: without it the rotated queries differ (so the test can fail).
    plain = hf_stage_activations(_hf_model(None), TOKENS)
    key = ("q_post_rope", 0)
    assert not np.allclose(plain[key], ref[key], atol=1e-3)


def test_llama3_factors_hand_values():
    # head_dim 16, theta 10000: wavelength_i = 2*pi*10000^(2i/16) = 6.28, 19.87, 62.83,
    # 198.7, ... With original context 64, high_freq_wavelen = 64/4 = 16 and
    # low_freq_wavelen = 64/1 = 64: i=0 keeps 1, i>=3 take the factor 8, i=1 and i=2 blend
    # with smooth = (64/wavelen - 1) / (4 - 1) into 1 / ((1 - smooth)/8 + smooth).
    f = llama3_rope_factors(16, 10000.0, 8.0, 1.0, 4.0, 64)
    assert f[0] == 1.0 and f[3:] == [8.0] * 5
    for i in (1, 2):
        smooth = (64 / (2 * np.pi * 10000 ** (2 * i / 16)) - 1) / 3
        assert f[i] == pytest.approx(1 / ((1 - smooth) / 8 + smooth), rel=1e-12)
    assert 1.0 < f[1] < f[2] < 8.0


def test_unsupported_gguf_rope_scaling_is_a_clear_error(tmp_path):
    import gguf

    from aprtrace.errors import ModelLoadError

    path = tmp_path / "yarn.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(0)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_feed_forward_length(16)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="yarn"):
        load_model(path)
