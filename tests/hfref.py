"""Hugging Face transformers as the independent reference for aprtrace's forward pass.

Helpers shared by the reference tests (this is not a test module):

- ``tiny_tokenizer()`` / ``tiny_hf_model(arch, seed)``: a small, deterministic byte-level BPE
  tokenizer trained in code and a tiny seeded transformers model (llama, qwen2, qwen3).
- ``hf_stage_activations(model, token_ids)``: transformers' values of the 20 stages of
  FORMATS.md section 2, in aprtrace's layout (delegates to ``aprtrace.engines.transformers``).
- ``cached_reference(key_parts, compute_fn)``: an npz cache outside the repository for slow
  references (transformers' load of a real GGUF takes minutes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

# Bump when the captured values' meaning or layout changes: invalidates cached references.
HARNESS_VERSION = "2"
REF_CACHE_DIR = Path(
    os.environ.get("APRTRACE_CACHE", Path.home() / ".cache" / "aprtrace")
).joinpath("ref")

StageKey = tuple[str, "int | None"]

# A fixed corpus for the tiny tokenizer: mixed case, digits, punctuation, spaces, newlines.
_CORPUS = [
    "What is 2+2? The answer is 4.",
    "Hello, world! Hello again, world.",
    "The quick brown fox jumps over the lazy dog 1234567890 times.",
    "def forward(model, token_ids):\n    return model(token_ids)\n",
    "Attention is all you need; RMSNorm, RoPE and SwiGLU are what we trace.",
    "Numbers: 3.14159, 2.71828, 1e-6 and -42.",
    "  indented   spaces\tand tabs\n\nnew paragraphs",
]


def tiny_tokenizer(vocab_size: int = 384):
    """A deterministic byte-level BPE ``tokenizers.Tokenizer`` trained on a fixed corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from aprtrace.formats.gguf_writer import QWEN2_PATTERN

    tok = Tokenizer(models.BPE())
    # Qwen2's pre-tokenizer: its split regex, then the byte-level mapping without GPT-2's regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


TINY_SIZES = {
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "head_dim": 16,
}


def tiny_hf_model(
    arch: str, seed: int = 0, vocab_size: int | None = None, rope_scaling: dict | None = None
):
    """A tiny seeded float32 transformers causal LM of ``arch`` (llama, qwen2, qwen3; the MoE
    architectures through ``tiny_moe_model``, 3 layers; gemma2 and gemma3 through
    ``tiny_gemma``).

    GQA (4 heads, 2 kv heads), untied lm_head, non-trivial random norm weights and biases so that
    a wrong norm, bias or layout shows up. ``vocab_size`` defaults to the tiny tokenizer's size.
    ``rope_scaling`` (llama only) is transformers' ``rope_scaling`` dict, e.g. ``"llama3"``.
    """
    import transformers

    if vocab_size is None:
        vocab_size = tiny_tokenizer().get_vocab_size()
    common = dict(
        vocab_size=vocab_size,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        **TINY_SIZES,
    )
    if arch == "llama":
        config = transformers.LlamaConfig(
            rope_theta=10000.0,
            rope_scaling=rope_scaling,
            attention_bias=False,
            mlp_bias=False,
            **common,
        )
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(rope_theta=1000000.0, use_sliding_window=False, **common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "qwen3":
        config = transformers.Qwen3Config(
            rope_theta=1000000.0, attention_bias=False, use_sliding_window=False, **common
        )
        cls = transformers.Qwen3ForCausalLM
    elif arch in ("qwen2moe", "qwen3moe", "mixtral"):
        return tiny_moe_model(arch, seed, vocab_size=vocab_size, num_hidden_layers=3)
    elif arch in GEMMA_LAYERS:
        if rope_scaling is not None:
            raise ValueError("rope_scaling is only wired for the tiny llama")
        return tiny_gemma(arch, seed, vocab_size=vocab_size)
    else:
        from archref import TINY_ARCHS, tiny_model  # the architectures added in issue 10

        if arch not in TINY_ARCHS:
            raise ValueError(f"unknown tiny architecture {arch!r}")
        if rope_scaling is not None:
            raise ValueError("rope_scaling is only wired for the tiny llama")
        return tiny_model(arch, seed)
    if rope_scaling is not None and arch != "llama":
        raise ValueError("rope_scaling is only wired for the tiny llama")
    _set_rope_theta(config, config_rope_theta(config))
    return seeded_model(cls, config, seed)


# Tiny Gemma: a sliding window shorter than the test prompts; Gemma 3's default pattern
# (every 6th layer global) needs 6 layers to show a global one.
GEMMA_WINDOW = 5
GEMMA_LAYERS = {"gemma2": 3, "gemma3": 6}


def tiny_gemma(
    arch: str, seed: int = 5, global_rope: dict | None = None, vocab_size: int | None = None
):
    """A tiny seeded float32 transformers Gemma causal LM (``global_rope``: Gemma 3's RoPE
    parameters of the global layers)."""
    import transformers

    common = dict(
        vocab_size=vocab_size or tiny_tokenizer().get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=GEMMA_LAYERS[arch],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=32,  # llama.cpp derives head_dim for these shapes
        sliding_window=GEMMA_WINDOW,
        tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh",
    )
    if arch == "gemma2":
        config = transformers.Gemma2Config(
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            attn_logit_softcapping=3.0,
            final_logit_softcapping=2.0,
            **common,
        )
        cls = transformers.Gemma2ForCausalLM
    else:
        config = transformers.Gemma3TextConfig(
            rope_parameters={
                "full_attention": global_rope or {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            **common,
        )
        cls = transformers.Gemma3ForCausalLM
    return seeded_model(cls, config, seed)


MOE_SIZES = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "num_experts_per_tok": 2,
}


def tiny_moe_model(arch: str, seed: int = 5, **overrides):
    """A tiny seeded float32 transformers MoE model (qwen2moe, qwen3moe, mixtral): 8 experts
    of width 32, 2 per token; Qwen2-MoE with a shared expert of width 64 and no top-k renorm,
    Qwen3-MoE with it (as the released models). ``overrides`` go to the config."""
    import transformers

    sizes = MOE_SIZES | {"vocab_size": tiny_tokenizer().get_vocab_size()}
    sizes |= {k: v for k, v in overrides.items() if v is not None}
    if arch == "qwen2moe":
        config = transformers.Qwen2MoeConfig(
            intermediate_size=128,
            num_experts=8,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            norm_topk_prob=False,
            use_sliding_window=False,
            **sizes,
        )
        cls = transformers.Qwen2MoeForCausalLM
    elif arch == "qwen3moe":
        config = transformers.Qwen3MoeConfig(
            intermediate_size=128,
            num_experts=8,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            use_sliding_window=False,
            **sizes,
        )
        cls = transformers.Qwen3MoeForCausalLM
    else:
        config = transformers.MixtralConfig(intermediate_size=32, num_local_experts=8, **sizes)
        cls = transformers.MixtralForCausalLM
    return seeded_model(cls, config, seed)


def seeded_model(cls, config, seed: int):
    """``cls(config)`` in float32 eager mode with seeded, non-trivial weights: norm weights
    around 1 with spread and random biases, so a missing or misapplied weight shows."""
    import torch

    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and "norm" in name:
                param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=gen))
            elif param.ndim == 1:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
            else:
                std = 1.0 / param.shape[-1] ** 0.5
                param.copy_(std * torch.randn(param.shape, generator=gen))
    return model


def config_rope_theta(config) -> float:
    """RoPE base of a transformers config (v5 keeps it in ``rope_parameters``)."""
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def _set_rope_theta(config, theta: float) -> None:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        params["rope_theta"] = theta
    else:
        config.rope_theta = theta


# --------------------------------------------------------------------------------------------
# Stage capture (one implementation: aprtrace's transformers engine)


def hf_stage_activations(model, token_ids: Sequence[int]) -> dict[StageKey, np.ndarray]:
    """transformers' value of every stage of FORMATS.md section 2, in aprtrace's layout.

    Keys are ``(stage_name, layer)``; ``layer`` is None for ``final_norm`` and ``lm_head`` and 0
    for ``embedding``. ``qkv_bias`` is present only when the model has q/k/v biases. Captured by
    ``aprtrace.engines.transformers.stage_activations`` (forward hooks plus a wrapped eager
    attention), the code behind ``aprtrace trace --engine transformers``.
    """
    from aprtrace.engines.transformers import stage_activations

    return {
        (stage.value, layer): values
        for (stage, layer), values in stage_activations(model, token_ids).items()
    }


# --------------------------------------------------------------------------------------------
# Cache of slow references


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _encode_key(key: StageKey) -> str:
    stage, layer = key
    return f"{stage}@{'model' if layer is None else layer}"


def _decode_key(text: str) -> StageKey:
    stage, layer = text.split("@")
    return stage, None if layer == "model" else int(layer)


def reference_cache_key(key_parts: Sequence) -> str:
    import transformers

    payload = json.dumps(
        [list(key_parts), transformers.__version__, HARNESS_VERSION], sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def cached_reference(
    key_parts: Sequence, compute_fn: Callable[[], dict], cache_dir: Path | None = None
) -> dict:
    """``compute_fn()`` (a dict of stage keys or strings to arrays), cached as an npz file.

    The cache key is the sha256 of ``key_parts`` (e.g. the model file's sha256 and the token ids),
    the transformers version and ``HARNESS_VERSION``. Only the reference's output is cached.
    """
    directory = Path(cache_dir or REF_CACHE_DIR)
    path = directory / f"{reference_cache_key(key_parts)}.npz"
    if path.exists():
        with np.load(path) as data:
            return {_decode_key(k) if "@" in k else k: data[k] for k in data.files}
    result = compute_fn()
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        _encode_key(k) if isinstance(k, tuple) else k: np.asarray(v) for k, v in result.items()
    }
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.partial")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return result


def gguf_reference(gguf_path: str | os.PathLike, prompt: str) -> dict:
    """transformers' stages and token ids for ``prompt`` on a GGUF file, cached.

    transformers dequantizes the GGUF (un-permuting llama Q/K) into a float32 model; the token
    ids come from its AutoTokenizer on the same file (no special tokens). The result holds the
    stage arrays under ``(stage, layer)`` keys plus ``"token_ids"``.
    """
    gguf_path = Path(gguf_path)

    def compute() -> dict:
        import time

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        start = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent),
            gguf_file=gguf_path.name,
            dtype=torch.float32,
            attn_implementation="eager",
        ).eval()
        load_seconds = time.perf_counter() - start
        result: dict = hf_stage_activations(model, ids)
        result["token_ids"] = np.asarray(ids, dtype=np.int64)
        result["load_seconds"] = np.asarray(load_seconds)
        return result

    return cached_reference(["gguf", file_sha256(gguf_path), prompt], compute)


# --------------------------------------------------------------------------------------------
# Weights of a GGUF file, read with gguf-py (not aprtrace), copied into a transformers model

_HF_OF_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_HF_OF_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_name_of(gguf_name: str) -> str:
    if gguf_name in _HF_OF_GGUF_GLOBAL:
        return _HF_OF_GGUF_GLOBAL[gguf_name]
    blk, layer, part, kind = gguf_name.split(".")
    assert blk == "blk", gguf_name
    return f"model.layers.{layer}.{_HF_OF_GGUF_LAYER[part]}.{kind}"


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's converter permutation (written here independently of aprtrace)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_weights_hf(gguf_path: str | os.PathLike) -> tuple[str, dict[str, np.ndarray]]:
    """``(architecture, {hf_name: float32 array})`` decoded by gguf-py's reader and quants.

    Llama Q/K rows are un-permuted back to Hugging Face's split-half layout.
    """
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()

    def scalar(key: str) -> int:
        f = reader.fields[f"{arch}.{key}"]
        return int(f.parts[f.data[0]][0])

    n_heads, n_kv = scalar("attention.head_count"), scalar("attention.head_count_kv")
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF ne order -> NumPy order
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        values = np.asarray(values, dtype=np.float32).reshape(shape)
        name = _hf_name_of(t.name)
        if arch == "llama" and ".q_proj." in name:
            values = _unpermute_rows(values, n_heads)
        elif arch == "llama" and ".k_proj." in name:
            values = _unpermute_rows(values, n_kv)
        out[name] = values
    return arch, out


def load_weights_into(model, weights: dict[str, np.ndarray]) -> None:
    """Copy ``weights`` into ``model`` in place; every parameter must be covered (tied ones
    through the embedding)."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            source = weights.get(name)
            if source is None and name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            if source is None:
                raise KeyError(f"GGUF has no tensor for parameter {name}")
            if tuple(source.shape) != tuple(param.shape):
                raise ValueError(f"{name}: GGUF shape {source.shape} != model {tuple(param.shape)}")
            param.copy_(torch.from_numpy(np.array(source, dtype=np.float32)))
