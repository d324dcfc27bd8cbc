"""Edge-case models against Hugging Face transformers, through every container.

Each scenario builds a small seeded transformers model with an unusual shape or switch
(head_dim != hidden / heads, MHA and MQA, one layer, tied embeddings, odd vocabulary, biases,
Llama 3 RoPE, F16 / BF16 / sharded checkpoints, NaN and Inf weights), writes it as safetensors,
GGUF and APR (from both), and checks:

- every stage of aprtrace's NumPy pass against transformers' own forward pass on the original
  model: max |error| <= 1e-4 x the stage's max |value|;
- the dumps of all containers are bit-identical (they hold the same float weights);
- ``--engine transformers`` on the GGUF and APR files agrees with the same reference;
- unsupported inputs fail with a clean error and exit code, never a traceback.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from aprtrace.cli import main
from aprtrace.convert import convert_model
from aprtrace.engines.transformers import hf_forward
from aprtrace.formats import load_model
from aprtrace.formats.gguf_writer import tokenizer_dict_from_hf, write_gguf
from aprtrace.forward import forward

pytestmark = pytest.mark.reference

TOKENS = [5, 17, 42, 7, 99, 3]
SIZES = dict(
    vocab_size=384,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def hf_model(arch: str, seed: int = 3, **overrides):
    """A seeded float32 eager transformers model of ``arch`` with SIZES plus ``overrides``."""
    import transformers

    from hfref import seeded_model

    kwargs = {**SIZES, **overrides}
    if arch == "llama":
        config = transformers.LlamaConfig(rope_theta=10000.0, **kwargs)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(rope_theta=1e6, use_sliding_window=False, **kwargs)
        cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.Qwen3Config(rope_theta=1e6, use_sliding_window=False, **kwargs)
        cls = transformers.Qwen3ForCausalLM
    return seeded_model(cls, config, seed)


def containers(
    model, root: Path, gguf_type: str = "F32", save_as=None, **save_kwargs
) -> dict[str, Path]:
    """``model`` as a safetensors directory, a GGUF and two APR files (from each)."""
    from hfref import tiny_tokenizer

    hf_dir = root / "hf"
    (save_as or model).save_pretrained(hf_dir, **save_kwargs)
    tiny_tokenizer().save(str(hf_dir / "tokenizer.json"))
    loaded = load_model(hf_dir)
    tensors = {name: t.load() for name, t in loaded.tensors.items()}
    gguf = write_gguf(
        root / "m.gguf",
        loaded.config,
        tensors,
        tokenizer_dict_from_hf(tiny_tokenizer(), bos_token="<|endoftext|>"),
        qtype=gguf_type,
    )
    convert_model(hf_dir, root / "from-hf.apr")
    convert_model(gguf, root / "from-gguf.apr")
    return {
        "safetensors": hf_dir,
        "gguf": gguf,
        "apr-from-hf": root / "from-hf.apr",
        "apr-from-gguf": root / "from-gguf.apr",
    }


def numpy_stages(path: Path, ids: list[int]) -> dict:
    out = {}
    forward(load_model(path), ids, lambda s, layer, v: out.__setitem__((s.value, layer), v.copy()))
    return out


def engine_stages(path: Path, ids: list[int]) -> dict:
    out = {}
    hf_forward(load_model(path), ids, lambda s, layer, v: out.__setitem__((s.value, layer), v))
    return out


def reference(model, ids: list[int]) -> dict:
    from hfref import hf_stage_activations

    return hf_stage_activations(model, ids)


def assert_matches(ref: dict, got: dict, label: str) -> None:
    assert got.keys() == ref.keys(), f"{label}: {sorted(set(got) ^ set(ref), key=str)}"
    for key, want in ref.items():
        have = got[key]
        assert have.shape == want.shape, f"{label} {key}: {have.shape} != {want.shape}"
        scale = max(float(np.max(np.abs(want))), 1e-6)
        err = float(np.max(np.abs(have.astype(np.float64) - want)))
        assert err <= 1e-4 * scale, f"{label} {key}: max err {err:.3g}, scale {scale:.3g}"


def assert_bit_identical(a: dict, b: dict, label: str) -> None:
    assert a.keys() == b.keys(), label
    different = [k for k in a if a[k].tobytes() != b[k].tobytes()]
    assert not different, f"{label}: {different[:5]}"


SCENARIOS = {
    "qwen3-head_dim-32": ("qwen3", dict(head_dim=32), TOKENS),
    "qwen2-head_dim-32": ("qwen2", dict(head_dim=32), TOKENS),
    "llama-mha": ("llama", dict(num_key_value_heads=4), TOKENS),
    "llama-mqa-head_dim-32": ("llama", dict(num_key_value_heads=1, head_dim=32), TOKENS),
    "qwen2-mqa-one-layer": ("qwen2", dict(num_key_value_heads=1, num_hidden_layers=1), TOKENS),
    "qwen3-single-token": ("qwen3", dict(num_hidden_layers=1), [7]),
    # Odd vocabulary (padded beyond the tokenizer's 384) and its last id.
    "llama-tied-vocab-391": ("llama", dict(tie_word_embeddings=True, vocab_size=391), [390, 5, 0]),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True), TOKENS),
    "qwen3-tied-mqa": ("qwen3", dict(tie_word_embeddings=True, num_key_value_heads=1), TOKENS),
    # Llama q/k biases are permuted with the rows in GGUF.
    "llama-attention-bias": ("llama", dict(attention_bias=True), TOKENS),
    "qwen3-attention-bias": ("qwen3", dict(attention_bias=True), TOKENS),
    # Llama mlp_bias: gate, up and down projections all have biases.
    "llama-mlp-bias": ("llama", dict(mlp_bias=True), TOKENS),
    "llama3-rope": ("llama", dict(rope_scaling=LLAMA3_ROPE), TOKENS),
    "qwen3-head_dim-64-over-hidden-32": (
        "qwen3",
        dict(hidden_size=32, head_dim=64, intermediate_size=48),
        TOKENS,
    ),
    "qwen2-hidden-40-head_dim-8": (
        "qwen2",
        dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=1, head_dim=8),
        TOKENS,
    ),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_edge_model_matches_transformers_in_every_container(name, tmp_path):
    arch, overrides, ids = SCENARIOS[name]
    model = hf_model(arch, **overrides)
    ref = reference(model, ids)
    paths = containers(model, tmp_path)
    if overrides.get("tie_word_embeddings"):
        for kind, path in paths.items():
            assert load_model(path).lm_head_name == "model.embed_tokens.weight", kind
    dumps = {kind: numpy_stages(path, ids) for kind, path in paths.items()}
    for kind, got in dumps.items():
        assert_matches(ref, got, f"{name} {kind}")
        assert_bit_identical(dumps["safetensors"], got, f"{name} {kind}")
    for kind in ("gguf", "apr-from-gguf"):
        assert_matches(ref, engine_stages(paths[kind], ids), f"{name} {kind} transformers engine")


def test_quantized_lm_head_across_row_chunks(tmp_path):
    # vocab 4099 crosses LM_HEAD_CHUNK (2048) with a ragged last chunk; Q8_0 and Q4_1 tied
    # embeddings in GGUF, and in APR from it (Q/K rows of one kv head permuted as whole rows).
    import gguf

    from aprtrace.forward import LM_HEAD_CHUNK

    vocab = 2 * LM_HEAD_CHUNK + 3
    model = hf_model(
        "llama",
        vocab_size=vocab,
        tie_word_embeddings=True,
        num_hidden_layers=1,
        num_key_value_heads=1,
        head_dim=32,
    )
    ids = [5, vocab - 1, 42, 2048, 3]
    paths = containers(model, tmp_path, gguf_type="Q8_0")
    loaded = load_model(paths["safetensors"])
    tensors = {name: t.load() for name, t in loaded.tensors.items()}
    for qtype in ("Q8_0", "Q4_1"):
        path = write_gguf(tmp_path / f"{qtype}.gguf", loaded.config, tensors, qtype=qtype)
        convert_model(path, tmp_path / f"{qtype}.apr")
        got = numpy_stages(path, ids)
        assert_bit_identical(got, numpy_stages(tmp_path / f"{qtype}.apr", ids), f"{qtype} apr")
        assert_matches(engine_stages(path, ids), got, f"{qtype} transformers engine")
        reader = gguf.GGUFReader(str(path))
        embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
        table = gguf.quants.dequantize(np.asarray(embd.data), embd.tensor_type)
        table = np.asarray(table, dtype=np.float32).reshape(vocab, -1)
        np.testing.assert_array_equal(got[("embedding", 0)], table[ids])
        want = table.astype(np.float64) @ got[("final_norm", None)][-1].astype(np.float64)
        np.testing.assert_allclose(got[("lm_head", None)], want, rtol=0, atol=1e-4)


def test_long_prompt_300_tokens(tmp_path):
    ids = np.random.default_rng(0).integers(0, SIZES["vocab_size"], 300).tolist()
    model = hf_model("qwen3", num_hidden_layers=1, num_key_value_heads=1)
    ref = reference(model, ids)
    paths = containers(model, tmp_path)
    base = numpy_stages(paths["safetensors"], ids)
    assert_matches(ref, base, "safetensors")
    assert_bit_identical(base, numpy_stages(paths["gguf"], ids), "gguf")
    assert_matches(ref, engine_stages(paths["gguf"], ids), "transformers engine")


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_safetensors(dtype, tmp_path):
    import torch

    torch_dtype = {"F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    model = hf_model("qwen2")
    with torch.no_grad():  # the float32 reference holds exactly the stored half values
        for param in model.parameters():
            param.copy_(param.to(torch_dtype).float())
    half = copy.deepcopy(model).to(torch_dtype)
    paths = containers(model, tmp_path, gguf_type=dtype, save_as=half)
    assert {t.qtype for t in load_model(paths["safetensors"]).tensors.values()} == {dtype}
    ref = reference(model, TOKENS)
    base = numpy_stages(paths["safetensors"], TOKENS)
    assert_matches(ref, base, dtype)
    for kind in ("gguf", "apr-from-hf", "apr-from-gguf"):
        assert_bit_identical(base, numpy_stages(paths[kind], TOKENS), f"{dtype} {kind}")


def test_sharded_safetensors_index(tmp_path):
    model = hf_model("qwen3")
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir, max_shard_size="40KB")
    assert (hf_dir / "model.safetensors.index.json").exists()
    assert len(list(hf_dir.glob("model-*.safetensors"))) > 2
    ref = reference(model, TOKENS)
    assert_matches(ref, numpy_stages(hf_dir, TOKENS), "sharded")
    convert_model(hf_dir, tmp_path / "m.apr")
    assert_bit_identical(
        numpy_stages(hf_dir, TOKENS), numpy_stages(tmp_path / "m.apr", TOKENS), "apr"
    )


def test_nan_and_inf_weights_are_counted_not_fatal(tmp_path):
    model = hf_model("qwen3", tie_word_embeddings=True, num_key_value_heads=1)
    import torch

    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[2, 1] = float("inf")
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    ids = [5, 17, 42]
    ref = reference(model, ids)
    paths = containers(model, tmp_path)
    for kind in ("safetensors", "gguf", "apr-from-hf"):
        result = CliRunner().invoke(
            main,
            ["trace", "--json", "--tokens", "5,17,42", str(paths[kind])],
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["first_nonfinite"] == {"stage": "attn_out", "layer": 0}
        for row in report["stats"]:
            want = ref[(row["stage"], row["layer"])]
            assert row["nan"] == int(np.isnan(want).sum()), (kind, row["stage"], row["layer"])
            assert row["inf"] == int(np.isinf(want).sum()), (kind, row["stage"], row["layer"])


def test_bos_id_zero_and_last_vocab_id(tmp_path):
    model = hf_model("llama", vocab_size=391, bos_token_id=0, eos_token_id=2, num_hidden_layers=1)
    paths = containers(model, tmp_path, gguf_type="Q8_0")
    from hfref import tiny_tokenizer

    prompt_ids = tiny_tokenizer().encode("Hi", add_special_tokens=False).ids
    runner = CliRunner()
    for kind in ("safetensors", "gguf", "apr-from-hf"):
        path = str(paths[kind])
        result = runner.invoke(main, ["trace", "--bos", "--prompt", "Hi", "--json", path])
        assert result.exit_code == 0, (kind, result.output)
        assert json.loads(result.output)["token_ids"] == [0, *prompt_ids], kind
        result = runner.invoke(main, ["trace", "--tokens", "390", "--json", path])
        assert result.exit_code == 0, (kind, result.output)
        result = runner.invoke(main, ["trace", "--tokens", "391", path])
        assert result.exit_code == 5 and "outside the vocabulary" in result.output, kind
        assert "Traceback" not in result.output


def test_compare_and_diff_model_on_edge_model(tmp_path):
    # MQA, head_dim != hidden / heads, tied, Q8_0 GGUF: NumPy versus transformers in one command.
    model = hf_model("llama", num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)
    paths = containers(model, tmp_path, gguf_type="Q8_0")
    runner = CliRunner()
    result = runner.invoke(
        main, ["compare", str(paths["gguf"]), "--tokens", "0,5,383,7", "--dir", str(tmp_path / "c")]
    )
    assert result.exit_code == 0, result.output
    assert "OK: all 35 pairs within tolerance" in result.output


def test_diff_model_recomputes_mlp_biases(tmp_path):
    # Teacher forcing on a Llama mlp_bias model: B is transformers' dump, so every stage
    # recomputed from B's own inputs with the model's weights (gate/up/down biases included)
    # must reproduce B to float rounding: no stage may show local error.
    model = hf_model("llama", mlp_bias=True, num_hidden_layers=1)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    runner = CliRunner()
    dumps = {}
    for engine in ("numpy", "transformers"):
        dumps[engine] = tmp_path / engine
        result = runner.invoke(
            main,
            ["trace", "--engine", engine, "--tokens", "5,17,42", "--save-tensor", "all"]
            + ["--save-tensor-layers", "all", "--save-tensor-dir", str(dumps[engine])]
            + [str(hf_dir)],
        )
        assert result.exit_code == 0, result.output
    result = runner.invoke(
        main,
        ["diff", "--values", str(dumps["numpy"]), str(dumps["transformers"]), "--json"]
        + ["--model", str(hf_dir)],
    )
    assert result.exit_code == 0, result.output
    pairs = json.loads(result.output)["pairs"]
    local = {(p["stage"], p["layer"]): p["local_rel_l2"] for p in pairs}
    assert ("ffn_gate", 0) in local and ("ffn_up", 0) in local, sorted(local, key=str)
    assert all(v is not None and v < 1e-5 for v in local.values()), local


def test_linear_rope_scaling_is_refused_by_convert(tmp_path):
    model = hf_model("llama", rope_scaling={"rope_type": "linear", "factor": 4.0})
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    result = CliRunner().invoke(main, ["convert", str(hf_dir), str(tmp_path / "m.apr")])
    assert result.exit_code == 5, result.output
    assert "linear RoPE scaling" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.apr").exists()
