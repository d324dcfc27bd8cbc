"""Shared fixtures of the per-architecture reference tests (tests/test_arch_*.py).

Tiny seeded transformers models of the architectures added in issue 10, the model files
aprtrace reads (safetensors, GGUF F32 / Q8_0 with llama.cpp's conventions, APR), the weights
transformers must run on for each file (a GGUF decoded by gguf-py and mapped to transformers'
names by the tables below, written from llama.cpp's tensor lists, independently of aprtrace's
mapping layer), and the stage comparison at the bound of test_reference_tiny.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import hfref
from aprtrace.convert import convert_model
from aprtrace.formats import load_model
from aprtrace.formats.gguf_writer import tokenizer_dict_from_hf, write_gguf
from aprtrace.forward import forward

TINY_ARCHS = ("phi3", "olmo2", "granite", "stablelm", "starcoder2", "mistral")
CONTAINERS = ("safetensors", "gguf-F32", "gguf-Q8_0", "apr-Q8_0")
PROMPT = "What is 2+2? The quick brown fox, 1234 times.\n"
RELATIVE_BOUND = 1e-4
WINDOW = {"phi3": 8, "mistral": 6, "starcoder2": 7}
LAYER_NORM_EPS = 1e-4  # StableLM / StarCoder2: their own config key, not rms_norm_eps
GRANITE = {
    "embedding_multiplier": 12.0,
    "residual_multiplier": 0.22,
    "attention_multiplier": 0.0078125,
    "logits_scaling": 8.0,
}

# llama.cpp's GGUF tensor names (llama-arch.cpp) -> transformers' parameter names, per arch.
_GGUF_TO_TRANSFORMERS = {
    "phi3": {
        "attn_norm": "input_layernorm",
        "attn_qkv": "self_attn.qkv_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_up": "mlp.gate_up_proj",
        "ffn_down": "mlp.down_proj",
    },
    "olmo2": {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "attn_output": "self_attn.o_proj",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    },
    "granite": "llama",
    "llama": {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    },
    "stablelm": "llama",
    "starcoder2": {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_up": "mlp.c_fc",
        "ffn_down": "mlp.c_proj",
    },
}
_GLOBALS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output_norm.bias": "model.norm.bias",
    "output.weight": "lm_head.weight",
}


def tiny_model(arch: str, seed: int = 7, windowed: bool = True):
    """A tiny seeded transformers model of ``arch`` (GQA 4/2 heads, untied head except
    StarCoder2, which ties it as its checkpoints do). ``windowed=False`` drops the sliding
    window of Phi-3 / Mistral / StarCoder2 (the llama.cpp check: llama.cpp ignores it)."""
    import transformers

    window = WINDOW.get(arch) if windowed else None
    common = dict(
        vocab_size=hfref.tiny_tokenizer().get_vocab_size(),
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **hfref.TINY_SIZES,
    )
    if arch == "phi3":
        config = transformers.Phi3Config(
            rope_theta=10000.0, partial_rotary_factor=0.5, sliding_window=window, **common
        )
        cls = transformers.Phi3ForCausalLM
    elif arch == "olmo2":
        config = transformers.Olmo2Config(rope_theta=500000.0, **common)
        cls = transformers.Olmo2ForCausalLM
    elif arch == "granite":
        config = transformers.GraniteConfig(rope_theta=10000.0, **GRANITE, **common)
        cls = transformers.GraniteForCausalLM
    elif arch == "stablelm":
        del common["rms_norm_eps"]
        config = transformers.StableLmConfig(
            rope_theta=10000.0,
            partial_rotary_factor=0.25,
            layer_norm_eps=LAYER_NORM_EPS,
            use_qkv_bias=True,
            **common,
        )
        cls = transformers.StableLmForCausalLM
    elif arch == "starcoder2":
        del common["rms_norm_eps"]
        common["tie_word_embeddings"] = True
        config = transformers.Starcoder2Config(
            rope_theta=100000.0,
            norm_epsilon=LAYER_NORM_EPS,
            use_bias=True,
            sliding_window=window,
            **common,
        )
        cls = transformers.Starcoder2ForCausalLM
    elif arch == "mistral":
        config = transformers.MistralConfig(rope_theta=10000.0, sliding_window=window, **common)
        cls = transformers.MistralForCausalLM
    else:
        raise ValueError(arch)
    return hfref.seeded_model(cls, config, seed)


def gguf_weights(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF decoded by gguf-py under transformers' names (llama Q/K rows
    un-permuted by hfref's independent inverse)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()

    def scalar(key: str) -> int:
        f = reader.fields[f"{arch}.{key}"]
        return int(f.parts[f.data[0]][0])

    out = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        values = np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type))
        values = values.astype(np.float32).reshape(shape)
        if t.name in _GLOBALS:
            name = _GLOBALS[t.name]
        else:
            _, layer, part, kind = t.name.split(".")
            table = _GGUF_TO_TRANSFORMERS[arch]
            if isinstance(table, str):
                table = _GGUF_TO_TRANSFORMERS[table]
            name = f"model.layers.{layer}.{table[part]}.{kind}"
        # llama.cpp permutes the Q/K rows of its NORM-RoPE architectures.
        permuted = arch in ("llama", "granite")
        if permuted and ".q_proj." in name:
            values = hfref._unpermute_rows(values, scalar("attention.head_count"))
        elif permuted and ".k_proj." in name:
            values = hfref._unpermute_rows(values, scalar("attention.head_count_kv"))
        out[name] = values
    return out


def build_files(archs, tokenizer, root: Path, windowed: bool = True) -> dict:
    """``{(arch, container): (model path, weights transformers must run on)}`` for ``archs``.

    The APR file is converted from the Q8_0 GGUF (kept Q8_0), so it shares its weights.
    """
    out = {}
    for arch in archs:
        hf_model = tiny_model(arch, windowed=windowed)
        hf_dir = root / f"{arch}-hf"
        hf_model.save_pretrained(hf_dir, safe_serialization=True)
        tokenizer.save(str(hf_dir / "tokenizer.json"))
        state = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
        out[(arch, "safetensors")] = (hf_dir, state)
        st = load_model(hf_dir)
        tensors = {name: t.load() for name, t in st.tensors.items()}
        meta = tokenizer_dict_from_hf(tokenizer)
        for qtype in ("F32", "Q8_0"):
            path = write_gguf(root / f"{arch}-{qtype}.gguf", st.config, tensors, meta, qtype)
            out[(arch, f"gguf-{qtype}")] = (path, gguf_weights(path))
        gguf_q8, weights_q8 = out[(arch, "gguf-Q8_0")]
        apr = root / f"{arch}-q8.apr"
        convert_model(gguf_q8, apr, dtype="keep")
        out[(arch, "apr-Q8_0")] = (apr, weights_q8)
    return out


def transformers_stages(arch: str, weights: dict, ids) -> dict:
    """transformers' own model class of ``arch`` on ``weights``: every stage."""
    hf_model = tiny_model(arch)
    hfref.load_weights_into(hf_model, weights)
    return hfref.hf_stage_activations(hf_model, ids)


def aprtrace_stages(path, ids, engine=forward) -> dict:
    """Every stage aprtrace's ``engine`` emits for ``path`` (each key exactly once)."""
    model = load_model(path)
    captured: dict = {}

    def emit(stage, layer, values):
        key = (stage.value, layer)
        assert key not in captured, f"{key} emitted twice"
        captured[key] = np.array(values, dtype=np.float32, copy=True)

    engine(model, list(ids), emit)
    return captured


def over_bound(ours: dict, ref: dict) -> list[str]:
    """Stages whose max abs error exceeds RELATIVE_BOUND times the reference's max |value|."""
    bad = []
    for key, expected in ref.items():
        got = ours[key]
        assert got.shape == expected.shape, f"{key}: {got.shape} vs {expected.shape}"
        scale = float(np.max(np.abs(expected)))
        err = float(np.max(np.abs(got.astype(np.float64) - expected)))
        if not err <= RELATIVE_BOUND * scale:
            bad.append(f"{key}: {err:.3g} / {scale:.3g}")
    return bad


def assert_stages_match_transformers(files: dict, arch: str, container: str, ids) -> None:
    """Every stage of ``files[(arch, container)]`` equals transformers' on the file's weights."""
    path, weights = files[(arch, container)]
    ref = transformers_stages(arch, weights, ids)
    ours = aprtrace_stages(path, ids)
    assert set(ours) == set(ref), (set(ours) ^ set(ref), container)
    bad = over_bound(ours, ref)
    assert not bad, f"{arch} {container}: " + "; ".join(bad[:6])


def assert_engines_agree(files: dict, arch: str, ids) -> None:
    """``--engine transformers`` on the Q8_0 GGUF: the NumPy engine's stages, order, values."""
    from aprtrace.engines.transformers import hf_forward

    path, _ = files[(arch, "gguf-Q8_0")]
    ours = aprtrace_stages(path, ids)
    theirs = aprtrace_stages(path, ids, engine=hf_forward)
    assert list(theirs) == list(ours)  # same stages, same order
    bad = over_bound(theirs, ours)
    assert not bad, "; ".join(bad[:6])
