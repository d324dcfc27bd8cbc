"""``aprtrace demo``: a seeded Qwen2-style model as F32 and quantized GGUF, traced and diffed.

Everything is built locally and deterministically (no download): a byte-level BPE tokenizer
trained on a fixed text, random weights from a fixed seed, written with ``gguf_writer``.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from aprtrace.config import ModelConfig

DEMO_SEED = 20261127
_CORPUS = (
    "What is 2+2? Two plus two is four. What is 3+5? Three plus five is eight. "
    "The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100. "
    "A transformer computes attention, then a feed-forward network, layer after layer. "
    "Quantization trades precision for memory; tracing finds where the numbers diverge. "
    "Hello, world! How are you today? I am fine, thank you. "
)


def demo_cache_dir() -> Path:
    from aprtrace.trace import cache_dir

    return cache_dir() / "demo"


def build_demo_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenizer) trained on a fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok


def demo_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(
        architecture="qwen2",
        hidden_size=128,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        intermediate_size=352,
        vocab_size=vocab_size,
        head_dim=16,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        qkv_bias=True,
        bos_token_id=0,
        eos_token_id=0,
    )


def demo_weights(cfg: ModelConfig, seed: int = DEMO_SEED) -> dict[str, np.ndarray]:
    """Seeded weights scaled like a trained model (unit-variance activations)."""
    rng = np.random.default_rng(seed)
    h, q, kv, inter = cfg.hidden_size, cfg.q_dim, cfg.kv_dim, cfg.intermediate_size

    def mat(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def vec(n: int, center: float, spread: float) -> np.ndarray:
        return (center + spread * rng.standard_normal(n)).astype(np.float32)

    tensors = {
        # Tied embedding: rows of std 0.3 keep the logits' spread (about 0.3 * sqrt(hidden)) in
        # the range of a trained model, so the softmax is not one-hot and KL is informative.
        "model.embed_tokens.weight": (0.3 * rng.standard_normal((cfg.vocab_size, h))).astype(
            np.float32
        )
    }
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = vec(h, 1.0, 0.1)
        tensors[p + "self_attn.q_proj.weight"] = mat(q, h)
        tensors[p + "self_attn.k_proj.weight"] = mat(kv, h)
        tensors[p + "self_attn.v_proj.weight"] = mat(kv, h)
        tensors[p + "self_attn.q_proj.bias"] = vec(q, 0.0, 0.1)
        tensors[p + "self_attn.k_proj.bias"] = vec(kv, 0.0, 0.1)
        tensors[p + "self_attn.v_proj.bias"] = vec(kv, 0.0, 0.1)
        tensors[p + "self_attn.o_proj.weight"] = mat(h, q)
        tensors[p + "post_attention_layernorm.weight"] = vec(h, 1.0, 0.1)
        tensors[p + "mlp.gate_proj.weight"] = mat(inter, h)
        tensors[p + "mlp.up_proj.weight"] = mat(inter, h)
        tensors[p + "mlp.down_proj.weight"] = mat(h, inter)
    tensors["model.norm.weight"] = vec(h, 1.0, 0.1)
    return tensors


def write_demo_models(out_dir: Path, quant: str = "Q8_0") -> tuple[Path, Path]:
    """Write ``demo-f32.gguf`` and ``demo-<quant>.gguf`` (idempotent, deterministic)."""
    from aprtrace.formats.gguf_writer import tokenizer_dict_from_hf, write_gguf

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_demo_tokenizer()
    cfg = demo_config(tok.get_vocab_size())
    tensors = demo_weights(cfg)
    tok_meta = tokenizer_dict_from_hf(tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    f32 = out_dir / "demo-f32.gguf"
    quantized = out_dir / f"demo-{quant.lower()}.gguf"
    write_gguf(f32, cfg, tensors, tok_meta, qtype="F32")
    write_gguf(quantized, cfg, tensors, tok_meta, qtype=quant)
    return f32, quantized


@click.command()
@click.option(
    "--dir",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to put the demo models and dumps [default: ~/.cache/aprtrace/demo].",
)
@click.option(
    "--quant",
    type=click.Choice(["Q8_0", "Q4_0"], case_sensitive=False),
    default="Q4_0",
    show_default=True,
    help="Quantization of the second model.",
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the diff as a self-contained HTML report.",
)
def demo_command(out_dir, quant, html_path):
    """Build a tiny seeded Qwen2 model as F32 and quantized GGUF, trace both, diff them.

    Shows the whole workflow offline in a few seconds: where does quantization first push
    the activations past tolerance?

    \b
    Examples:
      aprtrace demo
      aprtrace demo --quant Q8_0 --html demo.html
    """
    from aprtrace.compare import trace_to_dir

    out_dir = Path(out_dir) if out_dir else demo_cache_dir()
    quant = quant.upper()
    f32_path, q_path = write_demo_models(out_dir, quant)
    dumps = []
    for path in (f32_path, q_path):
        dump = trace_to_dir(path, out_dir / f"{path.stem}-trace")
        click.echo(
            f"traced {path.name}: {dump.files} stage files -> {dump.out_dir} "
            f"({dump.seconds:.2f} s, tokens {dump.token_ids})"
        )
        dumps.append(dump.out_dir)
    click.echo(f"\n$ aprtrace diff --values {dumps[0]} {dumps[1]}\n")
    from aprtrace.cli_diff import DiffOptions, run_diff

    # The demo succeeds when it runs; the divergence verdict is the point of its output.
    run_diff(dumps[0], dumps[1], DiffOptions(html_path=Path(html_path) if html_path else None))
