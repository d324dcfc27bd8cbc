"""Mixture-of-experts models (Qwen2-MoE, Qwen3-MoE, Mixtral), every stage against transformers.

Tiny seeded ``Qwen2MoeForCausalLM`` (qkv bias, gated shared expert, no top-k renorm),
``Qwen3MoeForCausalLM`` (QK-norm, top-k renorm) and ``MixtralForCausalLM`` (llama.cpp's
``llama`` GGUF with permuted Q/K) are written as GGUF (F32 and Q8_0, llama.cpp's stacked
``ffn_*_exps`` tensors), as a safetensors directory (``save_pretrained``) and as APR. For each
container transformers computes on exactly the weights the file holds (GGUF decoded by
gguf-py and stacked into transformers' ``gate_up_proj`` here, independently of aprtrace), and
every stage of every layer must agree within 1e-4 of the stage's largest magnitude; the
router's expert ids must be equal. Also: the integer comparison of ``moe_router_indices`` in
``aprtrace diff``, experts decoded only when selected, and refusals of what is not supported.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import hfref
from aprtrace.config import ModelConfig
from aprtrace.convert import convert_model
from aprtrace.diff import diff_dirs
from aprtrace.errors import ModelLoadError
from aprtrace.formats import load_model
from aprtrace.formats.gguf_writer import tokenizer_dict_from_hf, write_gguf
from aprtrace.forward import forward
from aprtrace.index_metrics import index_agreement
from aprtrace.model import Model
from aprtrace.plan import make_plan
from aprtrace.stages import Stage, stages_for
from aprtrace.trace import run_trace

pytestmark = pytest.mark.reference

ARCHS = ("qwen2moe", "qwen3moe", "mixtral")
PROMPT = "What is 2+2? The quick brown fox, 1234 times.\n"
RELATIVE_BOUND = 1e-4


def tiny_moe_model(arch: str, seed: int = 5, **overrides):
    """The shared tiny seeded MoE model (``hfref.tiny_moe_model``): 2 layers, 8 experts."""
    return hfref.tiny_moe_model(arch, seed, **overrides)


def config_of(arch: str, hf_model) -> ModelConfig:
    """aprtrace's ModelConfig for a tiny transformers MoE model, written out by hand."""
    c = hf_model.config
    mixtral = arch == "mixtral"
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
        qkv_bias=arch == "qwen2moe",
        qk_norm=arch == "qwen3moe",
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=c.intermediate_size if mixtral else c.moe_intermediate_size,
        shared_expert_intermediate_size=64 if arch == "qwen2moe" else 0,
        norm_topk_prob=arch != "qwen2moe",
    )


@pytest.fixture(scope="module")
def tokenizer():
    return hfref.tiny_tokenizer()


@pytest.fixture(scope="module")
def token_ids(tokenizer):
    return tokenizer.encode(PROMPT).ids


def write_tiny_gguf(arch: str, qtype: str, tokenizer, directory):
    """``(transformers model, gguf path)`` of the seeded tiny model (its 5.x state dict, fused
    ``gate_up_proj`` experts, goes straight into the writer)."""
    hf_model = tiny_moe_model(arch)
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    meta = tokenizer_dict_from_hf(tokenizer, eos_token="<|endoftext|>")
    path = write_gguf(
        directory / f"{arch}-{qtype}.gguf", config_of(arch, hf_model), state, meta, qtype
    )
    return hf_model, path


# --------------------------------------------------------------------------------------------
# GGUF weights read with gguf-py, mapped to transformers 5.x parameters here (not by aprtrace)

_MOE_GGUF_PARTS = {
    "ffn_gate_inp": "mlp.gate.weight",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate.weight",
}


def gguf_moe_weights(path) -> tuple[str, dict, dict]:
    """``(general.architecture, metadata scalars, {transformers name: float32})``."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for name, f in reader.fields.items():
        if f.types and f.types[0] != gguf.GGUFValueType.ARRAY:
            value = f.parts[f.data[0]]
            meta[name] = (
                bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else value[0]
            )
    arch = meta["general.architecture"]
    n_heads = int(meta[f"{arch}.attention.head_count"])
    n_kv = int(meta[f"{arch}.attention.head_count_kv"])
    raw: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        raw[t.name] = np.asarray(values, dtype=np.float32).reshape(shape)
    out: dict[str, np.ndarray] = {}
    for name, values in raw.items():
        parts = name.split(".")
        if parts[0] == "blk" and parts[2] in _MOE_GGUF_PARTS:
            out[f"model.layers.{parts[1]}.{_MOE_GGUF_PARTS[parts[2]]}"] = values
        elif parts[0] == "blk" and parts[2] == "ffn_gate_exps":
            up = raw[name.replace("ffn_gate_exps", "ffn_up_exps")]
            out[f"model.layers.{parts[1]}.mlp.experts.gate_up_proj"] = np.concatenate(
                [values, up], axis=1
            )
        elif parts[0] == "blk" and parts[2] == "ffn_up_exps":
            continue
        else:
            hf = hfref._hf_name_of(name)
            if arch == "llama" and ".q_proj." in hf:
                values = hfref._unpermute_rows(values, n_heads)
            elif arch == "llama" and ".k_proj." in hf:
                values = hfref._unpermute_rows(values, n_kv)
            out[hf] = values
    return arch, meta, out


def load_into(hf_model, weights: dict) -> None:
    """Copy ``weights`` into every parameter of ``hf_model`` (shapes as transformers has them)."""
    import torch

    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            param.copy_(torch.from_numpy(weights[name].reshape(param.shape).copy()))


# --------------------------------------------------------------------------------------------
# Comparison


def aprtrace_stages(model: Model, token_ids) -> dict:
    captured: dict = {}

    def emit(stage, layer, values):
        key = (stage.value, layer)
        assert key not in captured, f"stage {key} emitted twice"
        captured[key] = np.array(values, dtype=np.float32, copy=True)

    forward(model, list(token_ids), emit)
    return captured


def assert_stages_match(ours: dict, ref: dict) -> None:
    assert set(ours) == set(ref), (
        f"emitted but not captured: {sorted(set(ours) - set(ref))}; "
        f"captured but not emitted: {sorted(set(ref) - set(ours))}"
    )
    bad = []
    for key, expected in ref.items():
        got = ours[key]
        assert got.shape == expected.shape, f"{key}: {got.shape} vs {expected.shape}"
        if key[0] == Stage.MOE_ROUTER_INDICES.value:
            np.testing.assert_array_equal(got, expected, err_msg=f"{key}: expert ids differ")
            continue
        scale = float(np.max(np.abs(expected)))
        err = float(np.max(np.abs(got.astype(np.float64) - expected)))
        if not err <= RELATIVE_BOUND * scale:
            bad.append(f"{key}: {err:.3g} / {scale:.3g}")
    assert not bad, "stages over the bound (max abs err / max |ref|): " + "; ".join(bad[:6])


def expected_stage_set(arch: str, layers: int) -> set:
    shared = arch == "qwen2moe"
    per_layer = [
        s.value
        for s in Stage
        if s.per_layer
        and s is not Stage.EMBEDDING
        and s not in (Stage.FFN_GATE, Stage.FFN_UP, Stage.FFN_SILU, Stage.FFN_SWIGL, Stage.FFN_OUT)
        and s not in (Stage.POST_ATTN_NORM, Stage.POST_FFN_NORM)
        and (s is not Stage.QKV_BIAS or arch == "qwen2moe")
        and (s is not Stage.MOE_SHARED_EXPERT or shared)
    ]
    keys = {(name, layer) for name in per_layer for layer in range(layers)}
    return keys | {("embedding", 0), ("final_norm", None), ("lm_head", None)}


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_every_stage_matches_transformers(arch, qtype, tokenizer, token_ids, tmp_path):
    hf_model, path = write_tiny_gguf(arch, qtype, tokenizer, tmp_path)
    stored_arch, meta, weights = gguf_moe_weights(path)
    # llama.cpp's conventions: Mixtral is a llama GGUF with experts; expert keys per arch.
    assert stored_arch == {"mixtral": "llama"}.get(arch, arch)
    assert meta[f"{stored_arch}.expert_count"] == 8
    assert meta[f"{stored_arch}.expert_used_count"] == 2
    if arch != "mixtral":
        assert meta[f"{stored_arch}.expert_feed_forward_length"] == 32
    if arch == "qwen2moe":
        assert meta["qwen2moe.expert_shared_feed_forward_length"] == 64
    load_into(hf_model, weights)  # transformers computes on the weights the file holds
    ref = hfref.hf_stage_activations(hf_model, token_ids)

    model = load_model(path)
    assert model.config.architecture == arch
    ours = aprtrace_stages(model, token_ids)
    assert set(ours) == expected_stage_set(arch, 2)
    assert_stages_match(ours, ref)


def test_gguf_stores_stacked_experts_and_f32_routers(tokenizer, tmp_path):
    import gguf

    _, path = write_tiny_gguf("qwen2moe", "Q8_0", tokenizer, tmp_path)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    gate = tensors["blk.0.ffn_gate_exps.weight"]
    assert [int(x) for x in gate.shape] == [64, 32, 8]  # ne order: hidden, width, experts
    assert gate.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert [int(x) for x in tensors["blk.0.ffn_down_exps.weight"].shape] == [32, 64, 8]
    for name in ("blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_inp_shexp.weight"):
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32, name
    assert "blk.0.ffn_gate.weight" not in tensors


@pytest.mark.parametrize("arch", ARCHS)
def test_safetensors_and_apr_every_stage_matches_transformers(arch, tokenizer, token_ids, tmp_path):
    hf_model = tiny_moe_model(arch, seed=9)
    hf_dir = tmp_path / f"{arch}-hf"
    hf_model.save_pretrained(hf_dir, safe_serialization=True)
    tokenizer.save(str(hf_dir / "tokenizer.json"))
    ref = hfref.hf_stage_activations(hf_model, token_ids)

    from_st = load_model(hf_dir)
    ids_unset = dict(bos_token_id=None, eos_token_id=None)
    assert dataclasses.replace(from_st.config, **ids_unset) == config_of(arch, hf_model)
    ours = aprtrace_stages(from_st, token_ids)
    assert_stages_match(ours, ref)

    apr = tmp_path / f"{arch}.apr"
    convert_model(hf_dir, apr)
    metadata = load_model(apr).metadata
    assert (metadata["num_experts"], metadata["num_experts_per_tok"]) == (8, 2)
    # The same float32 weights from GGUF (per-expert tensors stacked, Mixtral's Q/K permuted
    # and back) and APR: bit-identical dumps.
    tensors = {name: t.load() for name, t in from_st.tensors.items()}
    gguf = write_gguf(tmp_path / f"{arch}.gguf", from_st.config, tensors, None, "F32")
    for other in (apr, gguf):
        from_other = aprtrace_stages(load_model(other), token_ids)
        assert set(from_other) == set(ours)
        for key in ours:
            np.testing.assert_array_equal(from_other[key], ours[key], err_msg=f"{other} {key}")


def test_apr_from_quantized_gguf_keeps_q8_experts(tokenizer, token_ids, tmp_path):
    _, path = write_tiny_gguf("qwen3moe", "Q8_0", tokenizer, tmp_path)
    apr = tmp_path / "qwen3moe.apr"
    summary = convert_model(path, apr)
    assert "Q8_0" in summary["dtypes"]
    model = load_model(apr)
    expert = model.tensors["model.layers.1.mlp.experts.7.down_proj.weight"]
    assert (expert.qtype, expert.shape) == ("Q8_0", (64, 32))
    from_gguf = aprtrace_stages(load_model(path), token_ids)
    from_apr = aprtrace_stages(model, token_ids)
    for key in from_gguf:
        np.testing.assert_array_equal(from_apr[key], from_gguf[key], err_msg=str(key))


def test_mixtral_original_checkpoint_names(tokenizer, token_ids, tmp_path):
    """Mixtral's Hub checkpoints name experts ``block_sparse_moe.experts.E.w1/w2/w3``."""
    import torch
    from safetensors.torch import save_file

    hf_model = tiny_moe_model("mixtral", seed=4)
    hf_dir = tmp_path / "mixtral-v4"
    hf_model.save_pretrained(hf_dir, safe_serialization=True)
    state = {}
    for name, value in hf_model.state_dict().items():
        name = name.replace(".mlp.", ".block_sparse_moe.")
        if name.endswith("experts.gate_up_proj"):
            gate, up = value.chunk(2, dim=1)
            for e in range(value.shape[0]):
                state[name.replace("gate_up_proj", f"{e}.w1.weight")] = gate[e].contiguous()
                state[name.replace("gate_up_proj", f"{e}.w3.weight")] = up[e].contiguous()
        elif name.endswith("experts.down_proj"):
            for e in range(value.shape[0]):
                state[name.replace("down_proj", f"{e}.w2.weight")] = value[e].contiguous()
        else:
            state[name] = value.contiguous()
    for f in hf_dir.glob("*.safetensors"):
        f.unlink()
    save_file({k: v.to(torch.float32) for k, v in state.items()}, str(hf_dir / "model.safetensors"))
    ours = aprtrace_stages(load_model(hf_dir), token_ids)
    assert_stages_match(ours, hfref.hf_stage_activations(hf_model, token_ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_engine_matches_numpy_engine(arch, tokenizer, token_ids, tmp_path):
    from aprtrace.engines.transformers import hf_forward

    _, path = write_tiny_gguf(arch, "Q8_0", tokenizer, tmp_path)
    model = load_model(path)
    ours = aprtrace_stages(model, token_ids)
    engine: dict = {}

    def keep(stage, layer, values):
        engine[(stage.value, layer)] = np.array(values)

    hf_forward(model, list(token_ids), keep)
    assert_stages_match(ours, engine)
    layer1 = [Stage(name) for name, layer in engine if layer == 1]
    assert layer1 == [s for s in stages_for(model.config) if s.per_layer and s.value != "embedding"]


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_captures_the_moe_buffers_it_names(arch, tokenizer, token_ids):
    """The harness itself: MoE buffers checked against the state dict, so a hook on the wrong
    module cannot pass unnoticed."""
    import torch

    hf_model = tiny_moe_model(arch, seed=2)
    ref = hfref.hf_stage_activations(hf_model, token_ids)
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp."
        x = ref[("ffn_norm", layer)]
        logits = x[-1] @ state[p + "gate.weight"].T
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        ids = ref[("moe_router_indices", layer)].astype(int)
        np.testing.assert_array_equal(ids, np.argsort(-probs)[:2])
        weights = probs[ids] / (probs[ids].sum() if arch != "qwen2moe" else 1.0)
        np.testing.assert_allclose(ref[("moe_router", layer)], weights, rtol=1e-5)
        np.testing.assert_allclose(
            ref[("moe_ffn_out", layer)],
            ref[("post_ffn_residual", layer)][-1] - ref[("post_attn_residual", layer)][-1],
            atol=1e-5,
        )
        if arch == "qwen2moe":
            s = p + "shared_expert."
            silu = torch.nn.functional.silu(torch.from_numpy(x @ state[s + "gate_proj.weight"].T))
            shared = (silu.numpy() * (x @ state[s + "up_proj.weight"].T)) @ state[
                s + "down_proj.weight"
            ].T
            gate = 1 / (1 + np.exp(-(x @ state[p + "shared_expert_gate.weight"].T)))
            np.testing.assert_allclose(ref[("moe_shared_expert", layer)], gate * shared, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Experts decoded one at a time, only when selected


def test_only_selected_experts_are_decoded(tokenizer, tmp_path, monkeypatch):
    _, path = write_tiny_gguf("qwen3moe", "F32", tokenizer, tmp_path)
    model = load_model(path)
    decoded: list[str] = []
    real_weight = Model.weight

    def spy(self, name, shape=None):
        decoded.append(name)
        return real_weight(self, name, shape)

    monkeypatch.setattr(Model, "weight", spy)
    ours = aprtrace_stages(model, [17])  # one token: 2 experts per layer
    for layer in range(2):
        chosen = set(ours[("moe_router_indices", layer)].astype(int).tolist())
        prefix = f"model.layers.{layer}.mlp.experts."
        experts = {int(n[len(prefix) :].split(".")[0]) for n in decoded if n.startswith(prefix)}
        assert experts == chosen
        assert sum(n.startswith(prefix) for n in decoded) == 3 * len(chosen)


# --------------------------------------------------------------------------------------------
# diff: moe_router_indices compared as integers


def test_index_agreement_counts_sets_and_order():
    same = index_agreement(np.array([3, 1, 4, 0], np.float32), np.array([3, 1, 4, 0]), (2, 2))
    assert (same.tokens, same.same_set, same.same_order, same.passed) == (2, 2, 2, True)
    swapped = index_agreement(np.array([3, 1, 4, 0]), np.array([1, 3, 4, 0]), (2, 2))
    assert (swapped.same_set, swapped.same_order, swapped.passed) == (2, 1, True)
    assert swapped.order_agreement == 0.5
    other = index_agreement(np.array([3, 1, 4, 0]), np.array([3, 1, 4, 5]), (2, 2))
    assert (other.same_set, other.first_differing_token, other.passed) == (1, 1, False)
    assert other.set_agreement == 0.5
    # No shape: one token (aprender writes the last position's ids only).
    one = index_agreement(np.array([2, 7]), np.array([7, 2]), None)
    assert (one.tokens, one.top_k, one.same_set, one.same_order) == (1, 2, 1, 0)
    broken = index_agreement(np.array([2, np.nan]), np.array([2.5, 1]), (2,))
    assert broken.invalid == 2 and not broken.passed


def test_diff_compares_router_indices_as_integers(tokenizer, token_ids, tmp_path):
    import struct

    _, path = write_tiny_gguf("mixtral", "F32", tokenizer, tmp_path)
    model = load_model(path)
    dumps = []
    for name in ("a", "b"):
        out = tmp_path / name
        run_trace(model, token_ids, make_plan("all", "all", out, path), collect_stats=False)
        dumps.append(out)
    rel = "layer-1/moe_router_indices.bin"
    data = bytearray((dumps[1] / rel).read_bytes())
    first, second = struct.unpack_from("<2f", data, 12)
    struct.pack_into("<2f", data, 12, second, first)  # same experts, other order
    (dumps[1] / rel).write_bytes(bytes(data))
    swapped = next(p for p in diff_dirs(*dumps).pairs if p.key.rel == rel)
    assert swapped.passed and swapped.index.same_order == 0 and swapped.index.same_set == 1

    other = next(e for e in range(8) if e not in (first, second))
    struct.pack_into("<2f", data, 12, other, second)
    (dumps[1] / rel).write_bytes(bytes(data))
    result = diff_dirs(*dumps)
    pair = next(p for p in result.pairs if p.key.rel == rel)
    assert pair.passed is False and pair.index.same_set == 0
    assert "expert sets agree on 0/1 tokens" in pair.reason
    assert result.first_divergence is pair

    from aprtrace.report import pair_json

    entry = json.loads(json.dumps(pair_json(pair)))
    assert entry["index_agreement"]["set_agreement"] == 0.0
    assert entry["index_agreement"]["top_k"] == 2


# --------------------------------------------------------------------------------------------
# Refusals


def test_dense_layers_between_moe_layers_are_refused(tokenizer, tmp_path):
    hf_model = tiny_moe_model("qwen3moe", decoder_sparse_step=2)
    hf_model.save_pretrained(tmp_path / "sparse2", safe_serialization=True)
    with pytest.raises(ModelLoadError, match="dense MLP layers between MoE layers"):
        load_model(tmp_path / "sparse2")


def test_moe_gguf_without_expert_used_count_is_refused(tokenizer, tmp_path):
    from aprtrace.formats.gguf import parse_gguf

    _, path = write_tiny_gguf("qwen3moe", "F32", tokenizer, tmp_path)
    raw = path.read_bytes()
    key = b"qwen3moe.expert_used_count"
    broken = raw.replace(key, b"qwen3moe.expert_unused_cnt")
    assert broken != raw
    with pytest.raises(ModelLoadError, match="expert_used_count"):
        from aprtrace.formats.gguf import model_from_gguf

        model_from_gguf(parse_gguf(broken, tmp_path / "broken.gguf"))


def test_fused_transformers5_expert_names(tokenizer, token_ids, tmp_path):
    """A checkpoint saved with transformers 5.x's in-memory names: ``mlp.experts.gate_up_proj``
    ``[E, 2*I, H]`` and ``mlp.experts.down_proj``, split per expert without a copy."""
    from safetensors.torch import save_file

    hf_model = tiny_moe_model("qwen3moe", seed=6)
    hf_dir = tmp_path / "fused"
    hf_model.save_pretrained(hf_dir, safe_serialization=True)
    for f in hf_dir.glob("*.safetensors"):
        f.unlink()
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(hf_dir / "model.safetensors"))
    model = load_model(hf_dir)
    up = model.tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    np.testing.assert_array_equal(
        up.load(), state["model.layers.1.mlp.experts.gate_up_proj"][3, 32:].numpy()
    )
    assert isinstance(up.raw.base, np.ndarray)  # a view into the memory map, not a copy
    ours = aprtrace_stages(model, token_ids)
    assert_stages_match(ours, hfref.hf_stage_activations(hf_model, token_ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_llamacpp_engine_reads_the_tiny_gguf_and_agrees(arch, tokenizer, token_ids, tmp_path):
    """llama.cpp itself loads the writer's MoE GGUFs (its conventions: Mixtral as a ``llama``
    GGUF with experts, per-architecture top-k renormalisation) and computes every stage,
    expert ids included, as aprtrace does (f16 KV cache: 5e-3 of the scale)."""
    pytest.importorskip("cyllama", reason="the llama.cpp engine needs the `llamacpp` extra")
    from aprtrace.engines.llamacpp import LlamaCppEngine, not_captured

    _, path = write_tiny_gguf(arch, "F32", tokenizer, tmp_path)
    model = load_model(path)
    ours = aprtrace_stages(model, token_ids)
    theirs: dict = {}
    LlamaCppEngine()(
        model, list(token_ids), lambda s, layer, v: theirs.__setitem__((s.value, layer), v)
    )
    assert not_captured(model.config) == []
    assert set(theirs) == set(ours)
    for key, values in theirs.items():
        if key[0] == Stage.MOE_ROUTER_INDICES.value:
            np.testing.assert_array_equal(values, ours[key], err_msg=str(key))
            continue
        scale = float(np.abs(ours[key]).max())
        assert np.abs(values - ours[key]).max() <= 5e-3 * scale, key


def test_stacked_experts_of_the_wrong_shape_are_refused():
    from aprtrace.mapping.moe import split_stacked_experts
    from aprtrace.model import LazyTensor

    values = np.zeros((4, 32, 64), np.float32)
    stacked = LazyTensor("blk.0.ffn_up_exps.weight", values.shape, "F32", values.view(np.uint8))
    tensors = {"model.layers.0.mlp.experts.up_proj.weight": stacked}
    views = split_stacked_experts(tensors, 4, 32, "m.gguf")
    assert sorted(views) == [f"model.layers.0.mlp.experts.{e}.up_proj.weight" for e in range(4)]
    assert all(np.shares_memory(v.raw, values) for v in views.values())  # zero-copy views
    with pytest.raises(ModelLoadError, match=r"has shape \[4, 32, 64\], expected \[8, rows"):
        split_stacked_experts(tensors, 8, 32, "m.gguf")
    fused = {"model.layers.0.mlp.experts.gate_up_proj": stacked}
    with pytest.raises(ModelLoadError, match="32 rows per expert, expected 64"):
        split_stacked_experts(fused, 4, 32, "m.gguf")


def test_cli_trace_and_diff_of_a_moe_gguf(tokenizer, tmp_path):
    """Through the CLI: apr's file layout for the MoE stages (the last position's 2 ids and
    weights, its hidden-size output), `diff --json` with the index agreement, and a refused
    model as exit 6 with the reason."""
    from click.testing import CliRunner

    from aprtrace.aprt import read_aprt
    from aprtrace.cli import main

    _, path = write_tiny_gguf("qwen2moe", "Q8_0", tokenizer, tmp_path)
    runner = CliRunner()
    for name in ("a", "b"):
        args = ["trace", "-q", "--save-tensor", "all", "--save-tensor-layers", "all"]
        result = runner.invoke(main, [*args, "--save-tensor-dir", str(tmp_path / name), str(path)])
        assert result.exit_code == 0, result.output
    ids = read_aprt(tmp_path / "a" / "layer-1" / "moe_router_indices.bin")
    assert ids.layer == 1 and ids.values.size == 2 and set(ids.values) <= set(range(8))
    assert read_aprt(tmp_path / "a" / "layer-1" / "moe_router.bin").values.size == 2
    assert read_aprt(tmp_path / "a" / "layer-0" / "moe_ffn_out.bin").values.size == 64
    assert not (tmp_path / "a" / "layer-0" / "ffn_gate.bin").exists()
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["config"]["num_experts"] == 8

    result = runner.invoke(
        main, ["diff", "--values", "--json", str(tmp_path / "a"), str(tmp_path / "b")]
    )
    assert result.exit_code == 0, result.output
    pairs = {p["path"]: p for p in json.loads(result.output)["pairs"]}
    assert pairs["layer-0/moe_router_indices.bin"]["index_agreement"]["same_order"] == 1
    assert pairs["layer-0/moe_ffn_out.bin"]["index_agreement"] is None

    hf_model = tiny_moe_model("qwen2moe", mlp_only_layers=[1])
    hf_model.save_pretrained(tmp_path / "mixed", safe_serialization=True)
    result = runner.invoke(main, ["trace", str(tmp_path / "mixed")])
    assert result.exit_code == 6
    assert "dense MLP layers between MoE layers" in result.output
