"""ModelConfig: the architecture switches and sizes the forward pass needs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from aprtrace.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = (
    "llama",
    "qwen2",
    "qwen3",
    "phi3",
    "olmo2",
    "granite",
    "stablelm",
    "starcoder2",
    "qwen2moe",
    "qwen3moe",
    "mixtral",
    "gemma2",
    "gemma3",
)
# Architecture strings that mean one of the supported families.
ARCH_ALIASES = {
    "llama": "llama",
    "mistral": "llama",
    "smollm": "llama",
    "smollm2": "llama",
    "tinyllama": "llama",
    "qwen2": "qwen2",
    "qwen2.5": "qwen2",
    "qwen": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "olmo2": "olmo2",
    "granite": "granite",
    "stablelm": "stablelm",
    "stablelm_epoch": "stablelm",
    "starcoder2": "starcoder2",
    # MoE (llama.cpp, Hugging Face model_type and APR spellings)
    "qwen2moe": "qwen2moe",
    "qwen2_moe": "qwen2moe",
    "qwen3moe": "qwen3moe",
    "qwen3_moe": "qwen3moe",
    "mixtral": "mixtral",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",  # transformers' model_type of Gemma3ForCausalLM
}


_MOE_CLASS_NAMES = {
    "qwen2moeforcausallm": "qwen2moe",
    "qwen3moeforcausallm": "qwen3moe",
    "mixtralforcausallm": "mixtral",
}


def normalize_architecture(name: str | None, where: str = "model") -> str:
    key = name.strip().lower() if isinstance(name, str) else ""
    for prefix in (
        "llamaforcausallm",
        "mistralforcausallm",
        "qwen2forcausallm",
        "qwen3forcausallm",
        "phi3forcausallm",
        "olmo2forcausallm",
        "graniteforcausallm",
        "stablelmforcausallm",
        "starcoder2forcausallm",
        "gemma2forcausallm",
        "gemma3forcausallm",
    ):
        if key == prefix:
            key = prefix.removesuffix("forcausallm")
    key = _MOE_CLASS_NAMES.get(key, key)
    if key not in ARCH_ALIASES:
        raise ModelLoadError(
            f"{where}: unsupported architecture '{name}'",
            hint=f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2/2.5, Qwen3, Qwen2-MoE, Qwen3-MoE, "
            "Mixtral, Gemma 2, Gemma 3, Phi-3, OLMo 2, Granite 3, StableLM, StarCoder2)",
        )
    return ARCH_ALIASES[key]


# Mixture-of-experts architectures (aprtrace.arch.moe); the others have a dense MLP.
MOE_ARCHITECTURES = ("qwen2moe", "qwen3moe", "mixtral")


# Name of the optional per-frequency RoPE divisor (GGUF `rope_freqs.weight`, Llama 3.1+
# "llama3" scaling): the forward pass uses inv_freq[i] / rope_freqs[i], as llama.cpp does.
ROPE_FREQS = "rope_freqs.weight"


def llama3_rope_factors(
    head_dim: int,
    theta: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_context: int,
) -> list[float]:
    """Per-frequency divisors of Llama 3.1 "llama3" RoPE scaling (what llama.cpp's converter
    stores as ``rope_freqs.weight``): 1 for short wavelengths, ``factor`` for long ones, a
    smooth blend in between."""
    import math

    low_wavelen = original_context / low_freq_factor
    high_wavelen = original_context / high_freq_factor
    out = []
    for i in range(head_dim // 2):
        freq = 1.0 / theta ** (2 * i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original_context / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out


# Upper bounds checked before any size sizes anything (a RoPE table, a buffer): generous
# against real models (hidden 16384, head_dim 256, vocab 256k, intermediate 53248) but far
# below what a corrupt header can claim.
SIZE_LIMITS = {
    "hidden_size": 1 << 18,
    "num_heads": 1 << 14,
    "num_kv_heads": 1 << 14,
    "intermediate_size": 1 << 20,
    "vocab_size": 1 << 23,
    "head_dim": 1 << 13,
}
MAX_LAYERS = 65535
MAX_CONTEXT = 1 << 31


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and switches of a Llama/Qwen-family decoder. Differences are flags, not copies."""

    architecture: str  # llama | qwen2 | qwen3
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int
    rope_theta: float = 10000.0
    # Linear RoPE scaling ("linear" rope_type): positions are divided by this factor.
    rope_linear_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # qwen2
    qk_norm: bool = False  # qwen3
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Attention window (Mistral-style sliding window): a query sees the last N positions.
    sliding_window: int | None = None
    # Fraction of head_dim that RoPE rotates (partial rotary); the rest passes through.
    partial_rotary_factor: float = 1.0
    # Query scale is query_pre_attn_scalar ** -0.5 when set (Gemma), else head_dim ** -0.5.
    query_pre_attn_scalar: float | None = None
    # MoE: routed experts (0: a dense MLP), experts per token, each expert's SwiGLU width,
    # the shared expert's width (0: none; Qwen2-MoE gates it with a sigmoid), and whether
    # the top-k routing weights are renormalised to sum to 1 (Mixtral, Qwen3-MoE).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True

    # Gemma
    # Per-layer attention kind, "sliding_attention" or "full_attention" (transformers'
    # layer_types); None: sliding_window, if any, applies to every layer.
    layer_types: tuple[str, ...] | None = None
    # RoPE base of the sliding-window layers (Gemma 3's rope_local_base_freq); None: rope_theta.
    rope_local_theta: float | None = None
    attn_logit_softcapping: float | None = None  # Gemma 2: cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: cap * tanh(logits / cap)

    # Phi-3 / OLMo 2 / Granite
    # (Phi-3 and OLMo 2 need no field of their own: partial rotary, sliding window and
    # architecture cover them.) Granite's multipliers: embeddings times embedding_multiplier,
    # each sub-block's output times residual_multiplier before its residual add, logits
    # divided by logits_scaling; attention_multiplier, when set, is the query scale itself.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (even).

        Truncated as transformers does, after a tolerance for the factor GGUF gives as
        ``rope.dimension_count / head_dim`` (62 / 78 * 78 is 61.99999999999999).
        """
        return int(self.head_dim * self.partial_rotary_factor + 1e-6) // 2 * 2

    @property
    def attention_scale(self) -> float:
        if self.attention_multiplier is not None:  # Granite
            return float(self.attention_multiplier)
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return 1.0 / math.sqrt(base)

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` attends only the last ``sliding_window`` positions."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    def layer_window(self, layer: int) -> int | None:
        """The attention window of ``layer`` (None: all earlier positions)."""
        return self.sliding_window if self.is_sliding(layer) else None

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, where: str = "model") -> ModelConfig:
        """Reject zero, negative, non-finite or inconsistent sizes with a clear error."""
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelLoadError(
                    f"{where}: config {name} = {value!r} must be a positive integer"
                )
            if value > limit:
                raise ModelLoadError(
                    f"{where}: config {name} = {value} is larger than any real model's "
                    f"(at most {limit})",
                    hint="the config is corrupt",
                )
        if not isinstance(self.num_layers, int) or not 0 <= self.num_layers <= MAX_LAYERS:
            raise ModelLoadError(
                f"{where}: config num_layers = {self.num_layers!r} is invalid (0..{MAX_LAYERS})"
            )
        if (
            not isinstance(self.max_position_embeddings, int)
            or not 0 < self.max_position_embeddings <= MAX_CONTEXT
        ):
            raise ModelLoadError(
                f"{where}: config max_position_embeddings = {self.max_position_embeddings!r} "
                f"must be in 1..{MAX_CONTEXT}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"{where}: num_heads {self.num_heads} is not a multiple of "
                f"num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"{where}: head_dim {self.head_dim} must be even for RoPE")
        for name in ("rope_theta", "rms_norm_eps", "rope_linear_factor", "logits_scaling"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ModelLoadError(f"{where}: config {name} = {value!r} must be finite and > 0")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim < 2:
            raise ModelLoadError(
                f"{where}: partial rotary factor {self.partial_rotary_factor!r} must leave "
                f"RoPE between 2 and head_dim {self.head_dim} channels"
            )
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool)
            or not isinstance(self.sliding_window, int)
            or self.sliding_window <= 0
        ):
            raise ModelLoadError(
                f"{where}: sliding window {self.sliding_window!r} must be a positive integer"
            )
        if self.layer_types is not None and (
            len(self.layer_types) != self.num_layers
            or set(self.layer_types) - {"sliding_attention", "full_attention"}
        ):
            raise ModelLoadError(
                f"{where}: layer_types must name 'sliding_attention' or 'full_attention' for "
                f"each of the {self.num_layers} layers, got {list(self.layer_types)[:8]}"
            )
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            normalize_architecture(self.architecture, where)
        self._validate_moe(where)
        return self

    def _validate_moe(self, where: str) -> None:
        moe_arch = self.architecture in MOE_ARCHITECTURES
        if moe_arch != self.is_moe:
            raise ModelLoadError(
                f"{where}: architecture '{self.architecture}' with num_experts = "
                f"{self.num_experts}: "
                + ("a MoE architecture needs experts" if moe_arch else "experts need a MoE arch")
            )
        if not self.is_moe:
            return
        for name in ("num_experts_per_tok", "moe_intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelLoadError(
                    f"{where}: config {name} = {value!r} must be a positive integer"
                )
        if self.num_experts_per_tok > self.num_experts:
            raise ModelLoadError(
                f"{where}: num_experts_per_tok {self.num_experts_per_tok} exceeds "
                f"num_experts {self.num_experts}"
            )
        if self.shared_expert_intermediate_size < 0:
            raise ModelLoadError(f"{where}: shared_expert_intermediate_size must be >= 0")
