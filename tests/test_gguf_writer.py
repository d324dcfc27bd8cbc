"""write_gguf / tokenizer_dict_from_hf, read back with gguf-py's own reader (independent of
aprtrace's GGUF reader)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from aprtrace.config import ModelConfig
from aprtrace.errors import ModelLoadError, ValidationError
from aprtrace.formats.gguf_writer import gguf_tensor_name, tokenizer_dict_from_hf, write_gguf

# VOCAB leaves room for the small tokenizer (256 bytes + specials + merges < 300).
HIDDEN, HEADS, KV, HEAD_DIM, FFN, VOCAB, LAYERS = 64, 4, 2, 16, 96, 300, 2


def make_config(arch: str = "llama", **overrides) -> ModelConfig:
    values = dict(
        architecture=arch,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_heads=HEADS,
        num_kv_heads=KV,
        intermediate_size=FFN,
        vocab_size=VOCAB,
        head_dim=HEAD_DIM,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
    )
    values.update(overrides)
    return ModelConfig(**values)


def make_tensors(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    q, kv, ffn = cfg.q_dim, cfg.kv_dim, cfg.intermediate_size
    t = {"model.embed_tokens.weight": r(cfg.vocab_size, HIDDEN), "model.norm.weight": r(HIDDEN)}
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = r(cfg.vocab_size, HIDDEN)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        t |= {
            p + "input_layernorm.weight": r(HIDDEN),
            p + "self_attn.q_proj.weight": r(q, HIDDEN),
            p + "self_attn.k_proj.weight": r(kv, HIDDEN),
            p + "self_attn.v_proj.weight": r(kv, HIDDEN),
            p + "self_attn.o_proj.weight": r(HIDDEN, q),
            p + "post_attention_layernorm.weight": r(HIDDEN),
            p + "mlp.gate_proj.weight": r(ffn, HIDDEN),
            p + "mlp.up_proj.weight": r(ffn, HIDDEN),
            p + "mlp.down_proj.weight": r(HIDDEN, ffn),
        }
        if cfg.qkv_bias:
            t |= {
                p + "self_attn.q_proj.bias": r(q),
                p + "self_attn.k_proj.bias": r(kv),
                p + "self_attn.v_proj.bias": r(kv),
            }
        if cfg.qk_norm:
            t |= {
                p + "self_attn.q_norm.weight": r(HEAD_DIM),
                p + "self_attn.k_norm.weight": r(HEAD_DIM),
            }
    return t


def small_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["hello world, hello there", "what is 2+2"] * 3, trainer=trainer)
    return tok


def field_value(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def tensors_by_name(reader: gguf.GGUFReader) -> dict:
    return {t.name: t for t in reader.tensors}


def decoded(tensor) -> np.ndarray:
    shape = tuple(int(x) for x in reversed(tensor.shape.tolist()))
    return np.asarray(gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)).reshape(
        shape
    )


def test_metadata_and_tokenizer_read_back_with_gguf_py(tmp_path):
    cfg = make_config("qwen2")
    tok = tokenizer_dict_from_hf(small_tokenizer(), eos_token="<|endoftext|>")
    path = write_gguf(tmp_path / "m.gguf", cfg, make_tensors(cfg), tok)
    reader = gguf.GGUFReader(path)
    assert field_value(reader, "general.architecture") == "qwen2"
    expected = {
        "qwen2.block_count": LAYERS,
        "qwen2.context_length": 128,
        "qwen2.embedding_length": HIDDEN,
        "qwen2.feed_forward_length": FFN,
        "qwen2.attention.head_count": HEADS,
        "qwen2.attention.head_count_kv": KV,
        "qwen2.attention.key_length": HEAD_DIM,
        "qwen2.attention.value_length": HEAD_DIM,
        "qwen2.rope.freq_base": 50000.0,
    }
    assert {k: field_value(reader, k) for k in expected} == expected
    assert field_value(reader, "qwen2.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field_value(reader, "tokenizer.ggml.model") == "gpt2"
    assert field_value(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    types = field_value(reader, "tokenizer.ggml.token_type")
    n = len(tok["tokens"])
    assert n < VOCAB and len(tokens) == VOCAB  # padded to the embedding rows, as llama.cpp
    assert tokens[:n] == tok["tokens"]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, VOCAB)]
    assert set(types[n:]) == {int(gguf.TokenType.UNUSED)}
    assert types[0] == int(gguf.TokenType.CONTROL) and set(types[1:n]) == {1}
    assert field_value(reader, "tokenizer.ggml.merges") == tok["merges"]
    assert field_value(reader, "tokenizer.ggml.eos_token_id") == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tensor_names_types_and_values(tmp_path, arch):
    cfg = make_config(arch)
    tensors = make_tensors(cfg)
    path = write_gguf(tmp_path / "m.gguf", cfg, tensors, qtype="Q8_0")
    stored = tensors_by_name(gguf.GGUFReader(path))
    assert set(stored) == {gguf_tensor_name(n) for n in tensors}
    assert "blk.1.ffn_down.weight" in stored and "output.weight" in stored
    if arch == "qwen2":
        assert "blk.0.attn_q.bias" in stored
    if arch == "qwen3":
        assert "blk.0.attn_k_norm.weight" in stored
    for hf_name, values in tensors.items():
        t = stored[gguf_tensor_name(hf_name)]
        kind = gguf.GGMLQuantizationType
        assert t.tensor_type == (kind.F32 if values.ndim == 1 else kind.Q8_0), hf_name
        got = decoded(t)
        assert got.shape == values.shape
        if values.ndim == 1:
            np.testing.assert_array_equal(got, values)  # norms and biases stay exact F32
        elif not (arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name)):
            # Q8_0: per 32 values, half a step of max|x|/127, plus the f16 rounding of the
            # step (relative 2^-11, times |q| <= 127).
            blocks = values.reshape(values.shape[0], -1, 32)
            step = np.abs(blocks).max(axis=-1, keepdims=True) / 127
            err = np.abs(got.reshape(blocks.shape) - blocks)
            assert np.all(err <= (0.5 + 127 * 2.0**-11) * step), hf_name


def _rope_split_half(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """Hugging Face rotation of one head vector: pairs (i, i + d/2)."""
    half = x.shape[-1] // 2
    ang = pos * theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    a, b = x[:half], x[half:]
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)])


def _rope_adjacent(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """llama.cpp's normal (GPT-J) rotation of one head vector: pairs (2i, 2i + 1)."""
    half = x.shape[-1] // 2
    ang = pos * theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    a, b = x[0::2], x[1::2]
    out = np.empty_like(x)
    out[0::2] = a * np.cos(ang) - b * np.sin(ang)
    out[1::2] = a * np.sin(ang) + b * np.cos(ang)
    return out


def test_llama_qk_rows_are_stored_for_adjacent_pair_rope(tmp_path):
    """The meaning of llama.cpp's permutation: q.k after adjacent-pair RoPE on the stored rows
    equals q.k after split-half RoPE on Hugging Face's rows."""
    cfg = make_config("llama")
    tensors = make_tensors(cfg)
    stored = tensors_by_name(gguf.GGUFReader(write_gguf(tmp_path / "m.gguf", cfg, tensors)))
    x = np.random.default_rng(1).standard_normal(HIDDEN)
    hf_q = (tensors["model.layers.0.self_attn.q_proj.weight"] @ x).reshape(HEADS, HEAD_DIM)
    hf_k = (tensors["model.layers.0.self_attn.k_proj.weight"] @ x).reshape(KV, HEAD_DIM)
    gg_q = (decoded(stored["blk.0.attn_q.weight"]) @ x).reshape(HEADS, HEAD_DIM)
    gg_k = (decoded(stored["blk.0.attn_k.weight"]) @ x).reshape(KV, HEAD_DIM)
    assert not np.allclose(hf_q, gg_q)  # the rows really are reordered
    theta = cfg.rope_theta
    for h in range(HEADS):
        kv = h // (HEADS // KV)
        hf_dot = _rope_split_half(hf_q[h], 5, theta) @ _rope_split_half(hf_k[kv], 2, theta)
        gg_dot = _rope_adjacent(gg_q[h], 5, theta) @ _rope_adjacent(gg_k[kv], 2, theta)
        assert gg_dot == pytest.approx(hf_dot, rel=1e-6, abs=1e-9)


def test_qwen_rows_are_not_permuted_and_tied_output_is_omitted(tmp_path):
    cfg = make_config("qwen3", tie_word_embeddings=True)
    tensors = make_tensors(cfg)
    stored = tensors_by_name(gguf.GGUFReader(write_gguf(tmp_path / "m.gguf", cfg, tensors)))
    assert "output.weight" not in stored
    np.testing.assert_array_equal(
        decoded(stored["blk.1.attn_q.weight"]), tensors["model.layers.1.self_attn.q_proj.weight"]
    )


def test_bytes_are_deterministic_and_write_is_atomic(tmp_path):
    cfg = make_config("qwen2")
    tok = tokenizer_dict_from_hf(small_tokenizer())
    a = write_gguf(tmp_path / "a.gguf", cfg, make_tensors(cfg), tok, qtype="Q4_0")
    b = write_gguf(tmp_path / "b.gguf", cfg, dict(reversed(make_tensors(cfg).items())), tok, "Q4_0")
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf"]
    assert a.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_rows_that_do_not_fill_blocks_fall_back_to_f16(tmp_path, qtype):
    cfg = make_config("llama", intermediate_size=40)
    stored = tensors_by_name(
        gguf.GGUFReader(write_gguf(tmp_path / "m.gguf", cfg, make_tensors(cfg), qtype=qtype))
    )
    assert stored["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert stored["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType[qtype]


def test_bad_inputs_are_clear_errors(tmp_path):
    cfg = make_config("llama")
    tensors = make_tensors(cfg)
    with pytest.raises(ValidationError, match="Q3_K"):
        write_gguf(tmp_path / "m.gguf", cfg, tensors, qtype="Q3_K")
    with pytest.raises(ValidationError, match="rotary_emb.inv_freq"):
        write_gguf(tmp_path / "m.gguf", cfg, tensors | {"model.rotary_emb.inv_freq": np.ones(8)})
    no_head = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    with pytest.raises(ValidationError, match="lm_head"):
        write_gguf(tmp_path / "m.gguf", cfg, no_head)
    small = make_config("llama", vocab_size=10)
    with pytest.raises(ValidationError, match="more than the model's vocabulary"):
        write_gguf(
            tmp_path / "m.gguf",
            small,
            make_tensors(small),
            tokenizer_dict_from_hf(small_tokenizer()),
        )
    wrong = tensors | {"model.layers.0.self_attn.k_proj.weight": np.ones((HIDDEN, HIDDEN))}
    with pytest.raises(ValidationError, match=r"k_proj.weight' has shape \[64, 64\]"):
        write_gguf(tmp_path / "m.gguf", cfg, wrong)
    assert not any(tmp_path.iterdir())  # no partial files left behind


@pytest.mark.parametrize("qtype", ["BF16", "Q4_1", "Q5_0", "Q5_1"])
def test_other_types_decode_close_to_the_input(tmp_path, qtype):
    cfg = make_config("qwen2")
    tensors = make_tensors(cfg)
    stored = tensors_by_name(
        gguf.GGUFReader(write_gguf(tmp_path / "m.gguf", cfg, tensors, qtype=qtype))
    )
    t = stored["blk.0.ffn_up.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType[qtype]
    original = tensors["model.layers.0.mlp.up_proj.weight"]
    rel = np.abs(decoded(t) - original).max() / np.abs(original).max()
    assert 0 < rel < 0.1


def test_tokenizer_dict_from_json_file_and_pre_types(tmp_path):
    tok = small_tokenizer()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    meta = tokenizer_dict_from_hf(path, bos_token="<|endoftext|>", add_bos_token=False)
    vocab = tok.get_vocab()
    assert meta["tokens"] == sorted(vocab, key=vocab.get)
    assert meta["bos_token_id"] == 0 and meta["add_bos_token"] is False
    assert all(len(m.split(" ")) == 2 for m in meta["merges"])
    assert meta["pre"] == "gpt-2"

    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    assert tokenizer_dict_from_hf(tok)["pre"] == "smollm"
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ModelLoadError, match="pre-tokenizer"):
        tokenizer_dict_from_hf(tok)
    assert tokenizer_dict_from_hf(tok, pre="llama-bpe")["pre"] == "llama-bpe"
    with pytest.raises(ModelLoadError, match="not in the vocabulary"):
        tokenizer_dict_from_hf(tok, pre="gpt2", eos_token="</s>")


def test_non_bpe_tokenizer_is_rejected():
    wordlevel = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ModelLoadError, match="not byte-level BPE"):
        tokenizer_dict_from_hf(wordlevel)
