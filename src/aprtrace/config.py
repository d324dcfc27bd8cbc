"""ModelConfig: the architecture switches and sizes the forward pass needs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from aprtrace.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
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
}


def normalize_architecture(name: str | None, where: str = "model") -> str:
    key = name.strip().lower() if isinstance(name, str) else ""
    for prefix in ("llamaforcausallm", "qwen2forcausallm", "qwen3forcausallm"):
        if key == prefix:
            key = prefix.removesuffix("forcausallm")
    if key not in ARCH_ALIASES:
        raise ModelLoadError(
            f"{where}: unsupported architecture '{name}'",
            hint=f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(Llama 2/3, SmolLM2, TinyLlama, Mistral-style GQA, Qwen2/2.5, Qwen3)",
        )
    return ARCH_ALIASES[key]


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

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (even)."""
        return int(self.head_dim * self.partial_rotary_factor) // 2 * 2

    @property
    def attention_scale(self) -> float:
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return 1.0 / math.sqrt(base)

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
        for name in ("rope_theta", "rms_norm_eps", "rope_linear_factor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ModelLoadError(f"{where}: config {name} = {value!r} must be finite and > 0")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            normalize_architecture(self.architecture, where)
        return self
