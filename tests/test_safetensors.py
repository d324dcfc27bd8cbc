"""Hugging Face safetensors checkpoints: directories, shards, dtypes, and bad headers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from aprtrace.errors import InvalidFormatError, ModelLoadError, NotFoundError
from aprtrace.formats.safetensors import load_safetensors

torch = pytest.importorskip("torch")  # the `ref` extra; installed on every project machine
from safetensors.numpy import save_file as save_numpy  # noqa: E402
from safetensors.torch import save_file as save_torch  # noqa: E402

from hfref import config_rope_theta, tiny_hf_model, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def hf_checkpoint(request, tmp_path_factory):
    model = tiny_hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    tiny_tokenizer().save(str(directory / "tokenizer.json"))
    return request.param, model, directory


@pytest.mark.reference
def test_transformers_checkpoint_loads_with_torch_weights(hf_checkpoint) -> None:
    arch, hf, directory = hf_checkpoint
    model = load_safetensors(directory)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    assert set(model.tensors) == set(state)
    for name, tensor in model.tensors.items():
        assert tensor.qtype == "F32"
        np.testing.assert_array_equal(model.weight(name), state[name], err_msg=name)
    c, hc = model.config, hf.config
    assert c.architecture == arch and model.format == "safetensors" and not model.qk_permuted
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads) == (
        hc.hidden_size,
        hc.num_hidden_layers,
        hc.num_attention_heads,
        hc.num_key_value_heads,
    )
    assert (c.intermediate_size, c.vocab_size, c.head_dim) == (
        hc.intermediate_size,
        hc.vocab_size,
        hc.head_dim,
    )
    assert c.rope_theta == config_rope_theta(hc) and c.rms_norm_eps == hc.rms_norm_eps
    assert c.qkv_bias == (arch == "qwen2") and c.qk_norm == (arch == "qwen3")
    assert not c.tie_word_embeddings
    ids = model.tokenizer.encode("What is 2+2?").ids
    assert ids == tiny_tokenizer().encode("What is 2+2?").ids


@pytest.mark.reference
def test_lone_safetensors_file_next_to_config(hf_checkpoint) -> None:
    _, hf, directory = hf_checkpoint
    model = load_safetensors(directory / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    np.testing.assert_array_equal(model.weight(name), hf.state_dict()[name].numpy())


# --- hand-made checkpoints -------------------------------------------------------------------

CONFIG = {
    "model_type": "llama",
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 16,
    "vocab_size": 10,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 64,
}


def tiny_weights(seed: int = 0, lm_head: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {
        "model.embed_tokens.weight": (10, 8),
        "model.norm.weight": (8,),
        "model.layers.0.input_layernorm.weight": (8,),
        "model.layers.0.post_attention_layernorm.weight": (8,),
        "model.layers.0.self_attn.q_proj.weight": (8, 8),
        "model.layers.0.self_attn.k_proj.weight": (4, 8),
        "model.layers.0.self_attn.v_proj.weight": (4, 8),
        "model.layers.0.self_attn.o_proj.weight": (8, 8),
        "model.layers.0.mlp.gate_proj.weight": (16, 8),
        "model.layers.0.mlp.up_proj.weight": (16, 8),
        "model.layers.0.mlp.down_proj.weight": (8, 16),
    }
    if lm_head:
        shapes["lm_head.weight"] = (10, 8)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def write_config(directory: Path, **changes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**CONFIG, **changes}))


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    weights = tiny_weights()
    names = sorted(weights)
    write_config(tmp_path)
    shards = {
        "model-00001-of-00002.safetensors": names[:5],
        "model-00002-of-00002.safetensors": names[5:],
    }
    weight_map = {}
    for shard, members in shards.items():
        save_numpy({n: weights[n] for n in members}, str(tmp_path / shard))
        weight_map.update({n: shard for n in members})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_safetensors(tmp_path)
    assert model.config.rope_theta == 500000.0 and model.tokenizer is None
    for name, w in weights.items():
        np.testing.assert_array_equal(model.weight(name), w)


def test_missing_shard_and_missing_config(tmp_path: Path) -> None:
    write_config(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "gone.safetensors"}})
    )
    with pytest.raises(NotFoundError, match="gone.safetensors"):
        load_safetensors(tmp_path)
    lone = tmp_path / "other" / "w.safetensors"
    lone.parent.mkdir()
    save_numpy(tiny_weights(), str(lone))
    with pytest.raises(NotFoundError, match="config.json"):
        load_safetensors(lone)


def test_tied_embeddings_and_transformers_v5_rope_parameters(tmp_path: Path) -> None:
    write_config(
        tmp_path,
        rope_theta=None,
        rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
        tie_word_embeddings=True,
        model_type="qwen2",
    )
    save_numpy(tiny_weights(lm_head=False), str(tmp_path / "model.safetensors"))
    model = load_safetensors(tmp_path)
    assert model.config.tie_word_embeddings and model.config.rope_theta == 1e6
    assert model.lm_head_name == "model.embed_tokens.weight"


def test_unsupported_or_incomplete_rope_scaling_is_refused(tmp_path: Path) -> None:
    save_numpy(tiny_weights(), str(tmp_path / "model.safetensors"))
    write_config(tmp_path, rope_scaling={"rope_type": "yarn", "factor": 8.0})
    with pytest.raises(ModelLoadError, match="yarn"):
        load_safetensors(tmp_path)
    # llama3 scaling is supported (tests/test_rope_scaling.py) but needs all its fields
    write_config(tmp_path, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ModelLoadError, match="low_freq_factor"):
        load_safetensors(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tensors(tmp_path: Path, dtype) -> None:
    weights = tiny_weights()
    write_config(tmp_path)
    save_torch(
        {n: torch.from_numpy(w).to(dtype) for n, w in weights.items()},
        str(tmp_path / "model.safetensors"),
    )
    model = load_safetensors(tmp_path)
    for name, w in weights.items():
        expected = torch.from_numpy(w).to(dtype).float().numpy()
        np.testing.assert_array_equal(model.weight(name), expected)
    assert model.tensors["model.norm.weight"].qtype == ("F16" if dtype == torch.float16 else "BF16")


def _raw_file(path: Path, header: dict | bytes, data: bytes = b"", header_len: int | None = None):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(blob) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + blob + data)


@pytest.mark.parametrize(
    ("header", "data", "header_len", "message"),
    [
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "outside"),
        (
            {"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "expected",
        ),
        ({"t": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "malformed"),
        (b"{not json", b"", None, "JSON"),
        (b"{}", b"", 1 << 40, "exceeds"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            None,
            "overlap",
        ),
    ],
)
def test_bad_safetensors_headers(tmp_path: Path, header, data, header_len, message) -> None:
    write_config(tmp_path)
    _raw_file(tmp_path / "model.safetensors", header, data, header_len)
    with pytest.raises(InvalidFormatError, match=message):
        load_safetensors(tmp_path)


def test_unsupported_dtype(tmp_path: Path) -> None:
    write_config(tmp_path)
    _raw_file(
        tmp_path / "model.safetensors",
        {"t": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}},
        b"\0" * 8,
    )
    with pytest.raises(ModelLoadError, match="I64"):
        load_safetensors(tmp_path)
