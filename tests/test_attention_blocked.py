"""Blocked attention (no ``[heads, seq, seq]`` maps) against the full kernels and torch.

The blocked kernel is what a trace runs when the attention maps are not captured; it must
give the context of the full path up to float32 summation order, and the maps must still be
built exactly as before for a layer whose ``attn_scores``/``attn_softmax`` is captured.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import hfref
from aprtrace.arch import ops
from aprtrace.formats import load_model
from aprtrace.formats.gguf_writer import tokenizer_dict_from_hf, write_gguf
from aprtrace.forward import forward
from test_reference_tiny import PROMPT, config_of, stage_errors

MAPS = {"attn_scores", "attn_softmax"}

CASES = [
    # queries, keys, heads, kv_heads, head_dim, window, softcap
    (7, 7, 9, 3, 64, None, None),
    (300, 300, 9, 3, 64, None, None),
    (97, 97, 4, 4, 16, 17, None),
    (5, 20, 8, 2, 32, None, None),  # decode rows after a cache of 15
    (40, 64, 6, 1, 8, 9, 30.0),  # MQA, window and Gemma-style soft-capping
]


def qkv(n_q, n_k, heads, kv_heads, d, seed=0):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((n_q, heads, d)) * 2).astype(np.float32)
    k = (rng.standard_normal((n_k, kv_heads, d)) * 2).astype(np.float32)
    v = rng.standard_normal((n_k, kv_heads, d)).astype(np.float32)
    return q, k, v, np.arange(n_k - n_q, n_k), np.arange(n_k)


def full_attention(q, k, v, scale, q_pos, k_pos, window, cap):
    mask = ops.attention_mask(q_pos, k_pos, window)
    probs = ops.masked_softmax(ops.attention_scores(q, k, scale, mask, cap), mask)
    return ops.attend(probs, v)


@pytest.fixture(params=[1 << 22, 4096])  # one block; blocks of a few query rows
def block_bytes(request, monkeypatch):
    monkeypatch.setattr(ops, "ATTENTION_BLOCK_BYTES", request.param)
    return request.param


@pytest.mark.parametrize("case", CASES)
def test_blocked_matches_the_full_kernels_to_float32_rounding(case, block_bytes):
    n_q, n_k, heads, kv_heads, d, window, cap = case
    q, k, v, q_pos, k_pos = qkv(n_q, n_k, heads, kv_heads, d)
    scale = d**-0.5
    full = full_attention(q, k, v, scale, q_pos, k_pos, window, cap)
    blocked = ops.blocked_attention(q, k, v, scale, q_pos, k_pos, window, cap)
    assert blocked.shape == full.shape == (n_q, heads * d) and blocked.dtype == np.float32
    # Only the order of the sums differs: float32 rounding of sums over up to n_k terms.
    bound = 4 * np.sqrt(n_k) * np.finfo(np.float32).eps * np.abs(v).max()
    np.testing.assert_allclose(blocked, full, rtol=0, atol=bound)


# torch's SDPA has no soft-capping: that case is covered against the full kernels above.
@pytest.mark.parametrize("case", [c for c in CASES if c[6] is None])
def test_blocked_matches_torch_scaled_dot_product_attention(case):
    import torch

    n_q, n_k, heads, kv_heads, d, window, _ = case
    q, k, v, q_pos, k_pos = qkv(n_q, n_k, heads, kv_heads, d, seed=1)
    mask = torch.from_numpy(ops.attention_mask(q_pos, k_pos, window))
    group = heads // kv_heads
    t = lambda a: torch.from_numpy(a.astype(np.float64)).transpose(0, 1)  # noqa: E731
    ref = torch.nn.functional.scaled_dot_product_attention(
        t(q), t(k).repeat_interleave(group, 0), t(v).repeat_interleave(group, 0), attn_mask=mask
    )
    expected = ref.transpose(0, 1).reshape(n_q, heads * d).numpy()
    got = ops.blocked_attention(q, k, v, d**-0.5, q_pos, k_pos, window)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_blocked_propagates_nan_and_zeroes_rows_without_keys():
    q, k, v, q_pos, k_pos = qkv(6, 6, 2, 1, 4)
    q[3, 0, 0] = np.nan
    q_pos = np.array([0, 1, 2, 3, 4, -1])  # the last query precedes every key
    with np.errstate(all="ignore"):
        full = full_attention(q, k, v, 0.5, q_pos, k_pos, None, None)
        blocked = ops.blocked_attention(q, k, v, 0.5, q_pos, k_pos)
    np.testing.assert_array_equal(np.isnan(blocked), np.isnan(full))
    assert np.isnan(blocked[3, :4]).all() and not np.isnan(blocked[3, 4:]).any()
    assert not blocked[5].any()
    finite = ~np.isnan(full)
    np.testing.assert_allclose(blocked[finite], full[finite], rtol=0, atol=1e-6)


def test_blocked_memory_is_a_block_not_heads_by_seq_by_seq():
    n, heads, d = 1536, 8, 16
    q, k, v, q_pos, k_pos = qkv(n, n, heads, 2, d)
    maps = heads * n * n * 4  # one f32 [heads, seq, seq] map: 75 MB
    tracemalloc.start()
    try:
        ops.blocked_attention(q, k, v, d**-0.5, q_pos, k_pos)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < maps / 4, f"peak {peak / 1e6:.1f} MB vs one map {maps / 1e6:.1f} MB"


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    tokenizer = hfref.tiny_tokenizer()
    model = hfref.tiny_hf_model("qwen2", seed=7)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    meta = tokenizer_dict_from_hf(tokenizer, eos_token="<|endoftext|>")
    path = write_gguf(
        tmp_path_factory.mktemp("blocked") / "q.gguf", config_of(model), state, meta, "F32"
    )
    hfref.load_weights_into(model, hfref.gguf_weights_hf(path)[1])
    ids = tokenizer.encode(PROMPT).ids
    return path, ids, hfref.hf_stage_activations(model, ids)


def capture(path, ids, wants=None):
    got: dict = {}

    def emit(stage, layer, values):
        got[(stage.value, layer)] = np.array(values, copy=True)

    logits = forward(load_model(path), ids, emit, wants=wants)
    return got, logits


@pytest.mark.reference
def test_forward_without_maps_matches_transformers(tiny_qwen2, monkeypatch):
    monkeypatch.setattr(ops, "ATTENTION_BLOCK_BYTES", 2048)  # several blocks per layer
    path, ids, ref = tiny_qwen2
    got, logits = capture(path, ids, wants=lambda stage, layer: stage.value not in MAPS)
    assert not any(name in MAPS for name, _ in got), "maps emitted although not wanted"
    assert set(got) == {key for key in ref if key[0] not in MAPS}
    bad = stage_errors(got, {key: r for key, r in ref.items() if key[0] not in MAPS})
    assert not bad, bad[:4]
    assert int(np.argmax(logits)) == int(np.argmax(ref[("lm_head", None)]))


def test_maps_are_built_up_to_the_last_layer_that_captures_them(tiny_qwen2, monkeypatch):
    path, ids, _ = tiny_qwen2
    everything, logits_full = capture(path, ids)
    blocked_layers = []
    real = ops.blocked_attention
    monkeypatch.setattr(ops, "blocked_attention", lambda *a: blocked_layers.append(1) or real(*a))
    only_layer_1, logits = capture(
        path, ids, wants=lambda stage, layer: stage.value not in MAPS or layer == 1
    )
    # Layer 0 computes (and emits) its maps too, so layer 1's are the same bytes as in a run
    # capturing every stage; layers 2.. attend blocked.
    assert len(blocked_layers) == load_model(path).config.num_layers - 2
    assert {key[1] for key in only_layer_1 if key[0] in MAPS} == {0, 1}
    for key in [("attn_scores", 1), ("attn_softmax", 1), ("attention", 1)]:
        np.testing.assert_array_equal(only_layer_1[key], everything[key])
    np.testing.assert_allclose(logits, logits_full, rtol=0, atol=1e-5 * np.abs(logits).max())


def test_forward_without_emit_builds_no_maps(tiny_qwen2, monkeypatch):
    path, ids, _ = tiny_qwen2
    calls = []
    monkeypatch.setattr(ops, "attention_scores", lambda *a, **k: calls.append(1))
    forward(load_model(path), ids)
    assert calls == []


def test_trace_builds_maps_only_when_the_plan_or_the_statistics_need_them(
    tiny_qwen2, tmp_path, monkeypatch
):
    from aprtrace.plan import make_plan
    from aprtrace.trace import run_trace

    path, ids, _ = tiny_qwen2
    n_layers = load_model(path).config.num_layers
    calls = []
    real = ops.attention_scores
    monkeypatch.setattr(ops, "attention_scores", lambda *a: calls.append(1) or real(*a))

    def maps_built(spec, layers, collect_stats):
        calls.clear()
        plan = make_plan(spec, layers, tmp_path / spec, path) if spec else None
        run_trace(load_model(path), ids, plan, collect_stats=collect_stats)
        return len(calls)

    assert maps_built("lm_head,attention", "all", collect_stats=False) == 0
    assert maps_built("", None, collect_stats=False) == 0
    assert maps_built("attn_softmax", "0", collect_stats=False) == 1
    assert maps_built("lm_head", "all", collect_stats=True) == n_layers  # the table has them


@pytest.mark.reference
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_without_maps_matches_transformers(arch, tmp_path, monkeypatch):
    """Sliding-window layers and Gemma 2's soft-capped scores through the blocked kernel."""
    monkeypatch.setattr(ops, "ATTENTION_BLOCK_BYTES", 2048)  # several blocks per layer
    hf_model = hfref.tiny_gemma(arch)
    path = tmp_path / "safetensors"  # the very weights transformers computes on
    hf_model.save_pretrained(path)
    ids = hfref.tiny_tokenizer().encode(PROMPT).ids
    assert len(ids) > 2 * hfref.GEMMA_WINDOW  # the window really cuts
    ref = hfref.hf_stage_activations(hf_model, ids)
    got, logits = capture(path, ids, wants=lambda stage, layer: stage.value not in MAPS)
    assert set(got) == {key for key in ref if key[0] not in MAPS}
    bad = stage_errors(got, {key: r for key, r in ref.items() if key[0] not in MAPS})
    assert not bad, bad[:4]
    assert int(np.argmax(logits)) == int(np.argmax(ref[("lm_head", None)]))
