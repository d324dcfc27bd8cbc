"""Hugging Face transformers as a second engine for ``aprtrace trace``: a trusted reference.

``hf_forward(model, token_ids, emit, progress)`` has the contract of
``aprtrace.forward.forward``: it loads the *same* decoded weights (``Model.weight``, Hugging Face
names and layout, llama Q/K un-permuted, Gemma norm offsets undone, Phi-3's projections fused
again) into transformers' own class of the architecture (``LlamaForCausalLM``,
``MistralForCausalLM`` for a llama with a sliding window, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``, the MoE and Gemma classes, ``Phi3ForCausalLM``, ``Olmo2ForCausalLM``,
``GraniteForCausalLM``, ``StableLmForCausalLM``, ``Starcoder2ForCausalLM``) and captures the
stages of FORMATS.md section 2 the stage graph gives it with forward hooks plus a wrapped eager
attention (q/k after RoPE, scores, softmax; masked entries, per transformers' own mask, 0), in
the APRT layouts. So any container aprtrace reads (GGUF, APR, safetensors) gets a reference dump
that ``aprtrace diff --values`` can put next to the NumPy engine's.

Memory: unlike the NumPy engine (one layer at a time), this engine holds the whole model as
float32 tensors (4 bytes per weight: about 0.55 GB for a 135M model, 28 GB for a 7B one).
``hf_forward`` refuses up front, with a ``ValidationError``, when that exceeds 75% of the
memory the kernel reports available.

torch and transformers are optional (the ``ref`` extra) and imported only when called.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from aprtrace.config import ROPE_FREQS, ModelConfig, normalize_architecture
from aprtrace.errors import InferenceError, ValidationError
from aprtrace.forward import Emit, Progress, check_token_ids
from aprtrace.mapping import FUSED
from aprtrace.model import Model
from aprtrace.stages import Stage, stages_for

# Threads for torch's intra-op pool while the engine runs (restored afterwards).
TORCH_THREADS = 2
# Share of MemAvailable the float32 weights may take.
MEMORY_FRACTION = 0.75
MISSING_EXTRA_HINT = "pip install torch==2.13.0 && pip install -e '.[ref]'"

StageValues = dict[tuple[Stage, "int | None"], np.ndarray]

_CAUSAL_LM_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),  # a llama with a sliding window
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "granite": ("GraniteConfig", "GraniteForCausalLM"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM"),
    "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}
_ATTENTION_BIASES = ("q_proj.bias", "k_proj.bias", "v_proj.bias", "o_proj.bias")
_MLP_BIASES = ("mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias")


def import_ref() -> tuple[Any, Any]:
    """``(torch, transformers)``, or a ValidationError saying how to install them."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        missing = f" ({exc.name} is not installed)" if exc.name else ""
        raise ValidationError(
            f"--engine transformers needs the `ref` extra{missing}", hint=MISSING_EXTRA_HINT
        ) from None
    return torch, transformers


# --------------------------------------------------------------------------------------------
# Memory


def float32_weight_bytes(model: Model) -> int:
    """Bytes of every tensor of ``model`` decoded to float32 (a tied lm_head counts once)."""
    return sum(4 * t.n_values for t in model.tensors.values())


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes; None where the kernel does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(model: Model, budget: int | None = None) -> None:
    """Refuse before loading when the float32 weights would not fit in ``budget`` bytes
    (default: ``MEMORY_FRACTION`` of MemAvailable; no check where that is unknown)."""
    if budget is None:
        available = available_memory_bytes()
        if available is None:
            return
        budget = int(MEMORY_FRACTION * available)
    need = float32_weight_bytes(model)
    if need > budget:
        raise ValidationError(
            f"--engine transformers holds the whole model as float32: {model.path} needs "
            f"{need / 1e9:.2f} GB, over the budget of {budget / 1e9:.2f} GB "
            f"({MEMORY_FRACTION:.0%} of the memory available)",
            hint="use the default NumPy engine (it decodes one layer at a time), "
            "or run on a machine with more memory",
        )


# --------------------------------------------------------------------------------------------
# Building the transformers model from aprtrace's Model


def _has_any(model: Model, suffixes: Sequence[str]) -> bool:
    return any(name.endswith(suffixes) for name in model.tensors)


def _hf_family(cfg: ModelConfig) -> str:
    """The transformers model family computing ``cfg`` (Mistral: a windowed llama)."""
    if cfg.architecture == "llama" and cfg.sliding_window is not None:
        return "mistral"
    return cfg.architecture


def hf_config(model: Model):
    """The transformers config of ``model``'s ModelConfig (its family's class), eager, f32.

    Biases present in the file switch on the matching transformers flag (``attention_bias``,
    ``mlp_bias``); the parts transformers then expects but the file lacks load as zeros.
    """
    _, transformers = import_ref()
    cfg: ModelConfig = model.config
    family = _hf_family(cfg)
    config_name, _ = _CAUSAL_LM_CLASSES[family]
    extra: dict[str, Any] = {}
    if family in ("llama", "qwen3", "olmo2", "granite"):
        extra["attention_bias"] = _has_any(model, _ATTENTION_BIASES)
    if family in ("llama", "granite"):
        extra["mlp_bias"] = _has_any(model, _MLP_BIASES)
    if family == "granite":
        extra |= {
            "embedding_multiplier": cfg.embedding_multiplier,
            "residual_multiplier": cfg.residual_multiplier,
            "attention_multiplier": cfg.attention_scale,
            "logits_scaling": cfg.logits_scaling,
        }
    if family in ("mistral", "phi3", "starcoder2"):
        extra["sliding_window"] = cfg.sliding_window
    if family in ("phi3", "stablelm", "starcoder2"):
        extra["partial_rotary_factor"] = cfg.partial_rotary_factor
    if family == "stablelm":
        extra |= {
            "layer_norm_eps": cfg.rms_norm_eps,
            "use_qkv_bias": _has_any(model, _ATTENTION_BIASES),
            "qk_layernorm": False,
            "use_parallel_residual": False,
        }
    if family == "starcoder2":
        extra |= {
            "norm_epsilon": cfg.rms_norm_eps,
            "use_bias": _has_any(model, _ATTENTION_BIASES + ("mlp.c_fc.bias", "mlp.c_proj.bias")),
            "hidden_act": "gelu_pytorch_tanh",
        }
    if cfg.architecture in ("qwen2", "qwen3", "qwen2moe", "qwen3moe"):
        extra["use_sliding_window"] = False
    extra |= _moe_config(model)
    rope_scaling = None
    if cfg.rope_linear_factor != 1.0:
        rope_scaling = {"rope_type": "linear", "factor": float(cfg.rope_linear_factor)}
    if cfg.architecture in ("gemma2", "gemma3"):
        extra = _gemma_config_arguments(cfg, rope_scaling)
    else:  # the family's own settings above (StarCoder2's GELU) take precedence
        extra = (
            dict(rope_theta=float(cfg.rope_theta), rope_scaling=rope_scaling, hidden_act="silu")
            | extra
        )
    settings: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=model.lm_head_name == "model.embed_tokens.weight",
        pad_token_id=None,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )
    config = getattr(transformers, config_name)(**(settings | extra))
    config._attn_implementation = "eager"
    return config


def _gemma_config_arguments(cfg: ModelConfig, rope_scaling: dict | None) -> dict[str, Any]:
    """Gemma2Config / Gemma3TextConfig arguments beyond the shared ones: query scale, window
    and layer kinds, soft-caps, GELU, and Gemma 3's per-kind RoPE (scaling on global layers)."""
    scalar = cfg.query_pre_attn_scalar or cfg.head_dim
    args: dict[str, Any] = dict(
        query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
        sliding_window=cfg.sliding_window,
        layer_types=list(cfg.layer_types) if cfg.layer_types is not None else None,
        attn_logit_softcapping=cfg.attn_logit_softcapping,
        final_logit_softcapping=cfg.final_logit_softcapping,
        hidden_activation="gelu_pytorch_tanh",
        attention_bias=False,
    )
    if cfg.architecture == "gemma3":
        full = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
        if rope_scaling is not None:
            full |= rope_scaling
        local = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
        args["rope_parameters"] = {
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": float(local)},
        }
    else:
        args["rope_theta"] = float(cfg.rope_theta)
        args["rope_scaling"] = rope_scaling
    return args


def _moe_config(model: Model) -> dict[str, Any]:
    """transformers' MoE config arguments (every layer sparse, as aprtrace requires)."""
    cfg = model.config
    if not cfg.is_moe:
        return {}
    if cfg.architecture == "mixtral":
        return {
            "num_local_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "sliding_window": None,
        }
    extra = {
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "norm_topk_prob": cfg.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }
    if cfg.architecture == "qwen2moe":
        extra["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
        extra["qkv_bias"] = _has_any(model, _ATTENTION_BIASES[:3])
    return extra


def _moe_parameter(model: Model, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """transformers 5.x's stacked expert parameters (``mlp.experts.gate_up_proj``
    ``[E, 2*I, H]``, ``mlp.experts.down_proj`` ``[E, H, I]``) and the ``[1, H]`` shared
    expert gate, from aprtrace's per-expert tensors; None for any other name."""
    from aprtrace.mapping.moe import expert_name

    parts = name.split(".")
    if name.endswith(".mlp.shared_expert_gate.weight"):
        return model.weight(name).reshape(shape)
    if len(parts) != 6 or parts[3:5] != ["mlp", "experts"]:
        return None
    layer, kind = int(parts[2]), parts[5]
    projections = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
    stacked = [
        np.concatenate([model.weight(expert_name(layer, e, p)) for p in projections])
        for e in range(shape[0])
    ]
    return np.stack(stacked).reshape(shape)


def _state_dict(model: Model, expected: dict[str, tuple[int, ...]], torch) -> dict:
    """transformers' parameter name -> float32 tensor from ``model`` (zeros for absent biases)."""
    loaded: dict[str, Any] = {}

    def source_of(name: str) -> str:
        return model.lm_head_name if name == "lm_head.weight" else name

    def fused_parts(name: str) -> list[str] | None:
        """The Llama-named parts of a fused parameter the file does not hold as such."""
        for fused, parts in FUSED.items():
            if f".{fused}." in name and not model.has(name):
                return [name.replace(f".{fused}.", f".{part}.") for part in parts]
        return None

    state = {}
    for name, shape in expected.items():
        source = source_of(name)
        parts = fused_parts(name)
        if parts is not None:
            values = np.concatenate([model.weight(part) for part in parts])
            if values.shape != shape:
                raise InferenceError(f"{name}: fused {list(values.shape)}, expected {list(shape)}")
            state[name] = torch.from_numpy(np.require(values, np.float32, ["C", "W"]))
            continue
        if source not in loaded:
            moe_values = _moe_parameter(model, name, shape) if model.config.is_moe else None
            if moe_values is not None:
                values = moe_values
            elif not model.has(source) and name.endswith(".bias"):
                values = np.zeros(shape, dtype=np.float32)
            else:
                values = model.weight(source, shape)
            # Writable, contiguous float32: torch shares the memory without a copy.
            loaded[source] = torch.from_numpy(np.require(values, np.float32, ["C", "W"]))
        state[name] = loaded[source]
    return state


def _check_all_used(model: Model, expected: dict[str, tuple[int, ...]], class_name: str) -> None:
    """A bias the NumPy engine would add but transformers has no place for is an error."""
    for name in model.tensors:
        if name.endswith(".bias") and name not in expected:
            raise ValidationError(
                f"{model.path}: tensor '{name}' has no counterpart in transformers' {class_name}",
                hint="trace this model with the default NumPy engine",
            )


def _set_rope_frequencies(hf_model, config, model: Model, torch) -> None:
    """A fresh rotary embedding (its buffers are not weights, so they are still empty); with
    ``rope_freqs.weight`` (Llama 3 scaling) transformers' inverse frequencies are divided by
    those divisors, exactly as the NumPy engine and llama.cpp do."""
    base = hf_model.model
    rotary = type(base.rotary_emb)(config)
    divisors = model.optional_weight(ROPE_FREQS, (model.config.rotary_dim // 2,))
    if divisors is not None:
        inv_freq = rotary.inv_freq.double() / torch.from_numpy(divisors.astype(np.float64))
        rotary.inv_freq = inv_freq.float()
        rotary.original_inv_freq = rotary.inv_freq.clone()
    base.rotary_emb = rotary


def build_hf_model(model: Model):
    """A float32, eval-mode transformers causal LM holding ``model``'s decoded weights.

    Built on the meta device, so no random weights are allocated; the decoded arrays are then
    assigned as the parameters without another copy.
    """
    torch, transformers = import_ref()
    config = hf_config(model)
    _, class_name = _CAUSAL_LM_CLASSES[_hf_family(model.config)]
    with torch.device("meta"):
        hf_model = getattr(transformers, class_name)(config)
    expected = {name: tuple(t.shape) for name, t in hf_model.state_dict().items()}
    _check_all_used(model, expected, class_name)
    hf_model.load_state_dict(_state_dict(model, expected, torch), strict=True, assign=True)
    _set_rope_frequencies(hf_model, config, model, torch)
    embed = hf_model.model.embed_tokens
    if hasattr(embed, "embed_scale"):  # Gemma's sqrt(hidden): a buffer, not a weight
        embed.embed_scale = torch.tensor(embed.scalar_embed_scale)
    empty = [n for n, t in (*hf_model.named_parameters(), *hf_model.named_buffers()) if t.is_meta]
    if empty:
        raise InferenceError(f"transformers model left without values: {', '.join(empty[:5])}")
    return hf_model.to(torch.float32).eval()


# --------------------------------------------------------------------------------------------
# Capturing the stages of a transformers model


def _np(tensor) -> np.ndarray:
    return tensor.detach().to("cpu").float().numpy().copy()


def _first(value):
    return value[0] if isinstance(value, tuple) else value


@contextlib.contextmanager
def _wrapped_eager_attention(hf_model, record: Callable) -> Iterator[None]:
    """Replace ``eager_attention_forward`` in the model's modeling module by a recording wrapper.

    The attention modules look the function up in their module's globals at call time, so
    patching the module attribute is enough; it is restored on exit.
    """
    module = sys.modules[type(hf_model).__module__]
    original = module.eager_attention_forward

    def wrapper(attn_module, query, key, value, attention_mask, *args, **kwargs):
        out, weights = original(attn_module, query, key, value, attention_mask, *args, **kwargs)
        scaling = kwargs.get("scaling", attn_module.scaling)
        record(attn_module, query, key, weights, scaling, kwargs.get("softcap"), attention_mask)
        return out, weights

    module.eager_attention_forward = wrapper
    try:
        yield
    finally:
        module.eager_attention_forward = original


@contextlib.contextmanager
def _torch_threads(torch, n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def capture_stages(
    hf_model,
    token_ids: Sequence[int],
    emit: Emit,
    progress: Progress | None = None,
    has_qkv_bias: bool | None = None,
) -> np.ndarray:
    """Run ``hf_model`` on ``token_ids``, calling ``emit`` for every stage; return last logits.

    Each layer's stages are emitted in Stage order when the layer finishes (as the NumPy
    engine emits them); ``embedding`` as layer 0, ``final_norm``/``lm_head`` with layer None.
    ``qkv_bias`` is emitted when ``has_qkv_bias`` (default: the q projection has a bias).
    """
    with hooked_passes(hf_model, progress, has_qkv_bias) as run_pass:
        return run_pass(token_ids, emit, None)


@contextlib.contextmanager
def hooked_passes(
    hf_model, progress: Progress | None = None, has_qkv_bias: bool | None = None
) -> Iterator[Callable[[Sequence[int], Emit, Any], np.ndarray]]:
    """Install the capture hooks once; yield ``run_pass(token_ids, emit, cache)``.

    ``cache`` is None (one pass over ``token_ids``, no cache) or a transformers ``Cache``
    that the pass reads and extends (a decode step: its rows come after the cached ones).
    """
    import torch
    import torch.nn.functional as F

    if getattr(hf_model.config, "_attn_implementation", "eager") != "eager":
        hf_model.config._attn_implementation = "eager"
    base = hf_model.model
    n_layers = len(base.layers)
    n_heads = hf_model.config.num_attention_heads
    if has_qkv_bias is None:
        q_proj = getattr(base.layers[0].self_attn, "q_proj", None) if n_layers else None
        has_qkv_bias = q_proj is not None and q_proj.bias is not None
    pending: dict[int, dict[Stage, np.ndarray]] = {}
    projected: dict[int, list] = {}
    current: dict[str, Any] = {"emit": None, "progress": progress, "past": 0}
    handles = []

    def emit(stage: Stage, layer: int | None, values: np.ndarray) -> None:
        current["emit"](stage, layer, values)

    def put(stage: Stage, layer: int, value) -> None:
        pending[layer][stage] = _np(value)

    def on_output(module, stage: Stage, layer: int) -> None:
        handles.append(
            module.register_forward_hook(lambda _m, _i, o: put(stage, layer, _first(o)[0]))
        )

    def on_input(module, stage: Stage, layer: int) -> None:
        handles.append(module.register_forward_pre_hook(lambda _m, i: put(stage, layer, i[0][0])))

    def on_projection(proj, layer: int) -> None:
        def hook(_m, inputs, output) -> None:
            projected[layer].append((F.linear(inputs[0][0], proj.weight), output[0]))
            if len(projected[layer]) == 3:  # q, k, v done: the fused buffer, before/after bias
                matmuls, biased = zip(*projected[layer], strict=True)
                put(Stage.QKV_MATMUL, layer, torch.cat(matmuls, dim=-1))
                if has_qkv_bias:
                    put(Stage.QKV_BIAS, layer, torch.cat(biased, dim=-1))

        handles.append(proj.register_forward_hook(hook))

    # The stages this architecture computes, from the stage graph (as the NumPy engine).
    graph_view = _graph_view(hf_model.config, has_qkv_bias)
    per_layer = {s for s in stages_for(graph_view) if s.per_layer and s is not Stage.EMBEDDING}

    def flush(layer: int) -> None:
        stages = pending.pop(layer)
        missing = per_layer - stages.keys()
        if missing:
            names = ", ".join(s.value for s in sorted(missing, key=lambda s: s.order))
            raise InferenceError(f"transformers layer {layer}: no capture of {names}")
        for stage in sorted(stages, key=lambda s: s.order):
            emit(stage, layer, stages[stage])
        if current["progress"] is not None:
            current["progress"](layer + 1, n_layers)

    def on_layer_done(module, layer: int) -> None:
        def hook(_m, _i, output) -> None:
            put(Stage.POST_FFN_RESIDUAL, layer, _first(output)[0])
            flush(layer)

        handles.append(module.register_forward_hook(hook))

    def record(attn_module, query, key, weights, scaling, softcap, attention_mask) -> None:
        layer = attn_module.layer_idx
        q, k = query[0], key[0]  # [heads, queries, d], [kv_heads, keys (cached + new), d]
        queries, keys = q.shape[1], k.shape[1]
        put(Stage.Q_POST_ROPE, layer, q.transpose(0, 1).reshape(queries, -1))
        # Only this pass's rows: the cached keys were emitted by the passes that made them.
        new_k = k[:, keys - queries :]
        put(Stage.K_POST_ROPE, layer, new_k.transpose(0, 1).reshape(queries, -1))
        k_rep = k.repeat_interleave(n_heads // k.shape[0], dim=0)
        # Query i sits at absolute position (keys - queries) + i; it sees keys up to there.
        allowed = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
        if attention_mask is not None:  # transformers' own mask (a sliding window, padding)
            mask = attention_mask[0, 0, :, :keys]
            allowed &= mask if mask.dtype == torch.bool else mask == 0  # additive: 0 = allowed
        scores = torch.matmul(q, k_rep.transpose(1, 2)) * scaling
        if softcap is not None:  # Gemma 2, as its eager attention
            scores = torch.tanh(scores / softcap) * softcap
        # A sliding-window cache (Phi-3, StarCoder2) keeps only the last keys: the ones it
        # dropped are outside the window, 0 in the APRT layout of [heads, queries, all keys].
        dropped = (current["past"] + queries - keys, 0)  # (left, right) of the key axis
        put(Stage.ATTN_SCORES, layer, F.pad(scores.masked_fill(~allowed, 0.0), dropped))
        put(Stage.ATTN_SOFTMAX, layer, F.pad(weights[0].masked_fill(~allowed, 0.0), dropped))

    def emit_output(stage: Stage, layer: int | None):
        def hook(_m, _i, output) -> None:  # returns None: the module's output stays as is
            emit(stage, layer, _np(output[0]))

        return hook

    def on_layer_input(_m, args, kwargs) -> None:
        # The residual stream entering layer 0: the embedding after any scale the model
        # applies outside embed_tokens (Granite's embedding_multiplier).
        hidden = args[0] if args else kwargs["hidden_states"]
        emit(Stage.EMBEDDING, 0, _np(hidden[0]))

    if n_layers:
        handles.append(base.layers[0].register_forward_pre_hook(on_layer_input, with_kwargs=True))

    def on_gate_up(proj, layer: int) -> None:
        def hook(_m, _i, output) -> None:  # Phi-3's fused [gate|up] rows, split in halves
            gate, up = output[0].chunk(2, dim=-1)
            put(Stage.FFN_GATE, layer, gate)
            put(Stage.FFN_UP, layer, up)

        handles.append(proj.register_forward_hook(hook))

    for i, layer in enumerate(base.layers):
        attn, mlp = layer.self_attn, layer.mlp
        # OLMo 2's post_attention_layernorm normalizes the attention output (no pre-norms).
        post_norms_only = not hasattr(layer, "input_layernorm")
        if not post_norms_only:
            on_output(layer.input_layernorm, Stage.ATTN_NORM, i)
        if hasattr(attn, "qkv_proj"):  # Phi-3: one fused projection, no bias
            on_output(attn.qkv_proj, Stage.QKV_MATMUL, i)
        else:
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                on_projection(proj, i)
        on_input(attn.o_proj, Stage.ATTENTION, i)
        on_output(attn.o_proj, Stage.ATTN_OUT, i)
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma: norms after each sublayer
            on_output(layer.post_attention_layernorm, Stage.POST_ATTN_NORM, i)
            on_input(layer.pre_feedforward_layernorm, Stage.POST_ATTN_RESIDUAL, i)
            on_output(layer.pre_feedforward_layernorm, Stage.FFN_NORM, i)
            on_output(layer.post_feedforward_layernorm, Stage.POST_FFN_NORM, i)
        elif post_norms_only:  # OLMo 2: norms after each sublayer, none before
            on_output(layer.post_attention_layernorm, Stage.POST_ATTN_NORM, i)
            on_input(mlp, Stage.POST_ATTN_RESIDUAL, i)
            on_output(layer.post_feedforward_layernorm, Stage.POST_FFN_NORM, i)
        else:
            on_input(layer.post_attention_layernorm, Stage.POST_ATTN_RESIDUAL, i)
            on_output(layer.post_attention_layernorm, Stage.FFN_NORM, i)
        if hasattr(mlp, "experts"):
            handles.extend(_moe_hooks(mlp, i, put))
        elif hasattr(mlp, "c_fc"):  # StarCoder2: c_proj(act(c_fc(x))), no gate
            on_output(mlp.c_fc, Stage.FFN_UP, i)
            on_output(mlp.act, Stage.FFN_SILU, i)
            on_output(mlp.c_proj, Stage.FFN_OUT, i)
        else:
            if hasattr(mlp, "gate_up_proj"):
                on_gate_up(mlp.gate_up_proj, i)
                on_output(mlp.activation_fn, Stage.FFN_SILU, i)
            else:
                on_output(mlp.gate_proj, Stage.FFN_GATE, i)
                on_output(mlp.up_proj, Stage.FFN_UP, i)
                on_output(mlp.act_fn, Stage.FFN_SILU, i)
            on_input(mlp.down_proj, Stage.FFN_SWIGL, i)
            on_output(mlp.down_proj, Stage.FFN_OUT, i)
        on_layer_done(layer, i)
    handles.append(base.norm.register_forward_hook(emit_output(Stage.FINAL_NORM, None)))

    # The cache keyword: `cache` in recent transformers (`past_key_values` is deprecated there).
    forward_params = inspect.signature(hf_model.forward).parameters
    cache_name = "cache" if "cache" in forward_params else "past_key_values"

    def run_pass(token_ids: Sequence[int], pass_emit: Emit, cache) -> np.ndarray:
        current["emit"] = pass_emit
        current["past"] = cache.get_seq_length() if cache is not None else 0
        pending.clear()
        pending.update({i: {} for i in range(n_layers)})
        projected.clear()
        projected.update({i: [] for i in range(n_layers)})
        ids = torch.tensor([list(map(int, token_ids))], dtype=torch.long)
        cache_kw = {cache_name: cache}
        with torch.no_grad():
            if cache is None:
                result = hf_model(input_ids=ids, use_cache=False, logits_to_keep=1)
            else:
                result = hf_model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kw)
        if pending:
            raise InferenceError(f"transformers ran without finishing layers {sorted(pending)}")
        logits = _np(result.logits[0, -1])
        pass_emit(Stage.LM_HEAD, None, logits)
        return logits

    try:
        with _wrapped_eager_attention(hf_model, record):
            yield run_pass
    finally:
        for handle in handles:
            handle.remove()


def _graph_view(hf_config, has_qkv_bias: bool) -> SimpleNamespace:
    """The config attributes the stage graph's predicates read, from a transformers config."""

    experts = getattr(hf_config, "num_experts", None) or getattr(hf_config, "num_local_experts", 0)
    return SimpleNamespace(
        architecture=normalize_architecture(hf_config.model_type),
        qkv_bias=has_qkv_bias,
        num_experts=experts or 0,
        shared_expert_intermediate_size=(
            getattr(hf_config, "shared_expert_intermediate_size", 0) or 0
        )
        if hf_config.model_type == "qwen2_moe"
        else 0,
    )


def _moe_hooks(block, layer: int, put: Callable) -> list:
    """Hooks on a sparse MoE block: the router's top-k weights and ids (last position), the
    gated shared expert (every position) and the block output (last position)."""
    shared: dict[str, Any] = {}

    def on_router(_m, _i, output) -> None:
        _, weights, ids = output  # (logits, top-k weights, top-k ids), highest first
        put(Stage.MOE_ROUTER, layer, weights[-1])
        put(Stage.MOE_ROUTER_INDICES, layer, ids[-1].float())

    def on_shared_expert(_m, _i, output) -> None:
        shared["out"] = output

    def on_shared_gate(_m, _i, output) -> None:
        import torch

        put(Stage.MOE_SHARED_EXPERT, layer, torch.sigmoid(output) * shared.pop("out"))

    def on_block(_m, _i, output) -> None:
        put(Stage.MOE_FFN_OUT, layer, _first(output)[0][-1])

    handles = [
        block.gate.register_forward_hook(on_router),
        block.register_forward_hook(on_block),
    ]
    if getattr(block, "shared_expert_gate", None) is not None:
        handles.append(block.shared_expert.register_forward_hook(on_shared_expert))
        handles.append(block.shared_expert_gate.register_forward_hook(on_shared_gate))
    return handles


def stage_activations(hf_model, token_ids: Sequence[int]) -> StageValues:
    """Every stage of ``hf_model`` on ``token_ids`` as ``{(stage, layer): array}``."""
    out: StageValues = {}

    def keep(stage: Stage, layer: int | None, values: np.ndarray) -> None:
        out[(stage, layer)] = values

    capture_stages(hf_model, token_ids, keep)
    return out


# --------------------------------------------------------------------------------------------
# The engine


def _has_qkv_bias(model: Model) -> bool:
    """As the NumPy engine: the ``qkv_bias`` stage exists when the file holds a q/k/v bias."""
    return _has_any(model, _ATTENTION_BIASES[:3])


def hf_forward(
    model: Model,
    token_ids: list[int],
    emit: Emit | None = None,
    progress: Progress | None = None,
    wants=None,  # accepted for forward()'s signature; transformers computes every stage
    *,
    memory_budget: int | None = None,
) -> np.ndarray:
    """``aprtrace.forward.forward`` computed by Hugging Face transformers on the same weights.

    Same contract: ``emit(stage, layer, buffer)`` for every capture point in the APRT layouts,
    ``progress(done, total)`` after each layer, returns the last position's logits ``[vocab]``.
    Raises ValidationError when torch/transformers are missing or when the float32 weights
    would exceed ``memory_budget`` bytes (default: 75% of MemAvailable).
    """
    cfg = model.config
    ids = check_token_ids(cfg, token_ids)
    if cfg.num_layers <= 0:
        raise InferenceError("the model has zero layers; there is nothing to trace")
    torch, _ = import_ref()
    check_memory(model, memory_budget)
    threads = max(1, min(TORCH_THREADS, os.cpu_count() or 1))
    with _torch_threads(torch, threads), torch.no_grad():
        hf_model = build_hf_model(model)
        return capture_stages(
            hf_model,
            ids.tolist(),
            emit or (lambda stage, layer, values: None),
            progress,
            has_qkv_bias=_has_qkv_bias(model),
        )


def hf_decode(
    model: Model,
    token_ids: list[int],
    steps: int,
    emit_for: Callable[[int], Emit],
    progress: Progress | None = None,
    forced: Sequence[int] | None = None,
    *,
    memory_budget: int | None = None,
):
    """``aprtrace.decode.numpy_decode`` computed by transformers: the prompt pass fills a
    ``DynamicCache`` (``past_key_values``), then one token per step, every stage captured."""
    from aprtrace.decode import check_decode, generate

    cfg = model.config
    ids = check_token_ids(cfg, token_ids)
    if cfg.num_layers <= 0:
        raise InferenceError("the model has zero layers; there is nothing to trace")
    forced = check_decode(cfg, ids.size, steps, forced)
    torch, transformers = import_ref()
    check_memory(model, memory_budget)
    threads = max(1, min(TORCH_THREADS, os.cpu_count() or 1))
    with _torch_threads(torch, threads), torch.no_grad():
        hf_model = build_hf_model(model)
        # Full layers only (no config): a sliding-window layer would drop the keys outside its
        # window, and the attention maps keep every position ([heads, 1, past + 1]).
        cache = transformers.DynamicCache()
        with hooked_passes(hf_model, progress, _has_qkv_bias(model)) as run_pass:
            logits = run_pass(ids.tolist(), emit_for(0), cache)

            def run_step(token: int, position: int, emit: Emit) -> np.ndarray:
                if cache.get_seq_length() != position:
                    raise InferenceError(
                        f"transformers' cache holds {cache.get_seq_length()} positions before "
                        f"the step at position {position}"
                    )
                return run_pass([token], emit, cache)

            return generate(logits, ids.size, steps, forced, run_step, emit_for)
