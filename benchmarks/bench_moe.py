"""30B-A3B class MoE: trace a synthetic GGUF with the per-layer shapes of Qwen3-30B-A3B.

Qwen3-30B-A3B (config.json of Qwen/Qwen3-30B-A3B): hidden 2048, 32 heads / 4 kv heads of
head_dim 128 with QK-norm, 128 experts of width 768, 8 per token, vocab 151936, 48 layers.
Each layer holds 128 x 3 expert matrices (604M weights, 642 MB in Q8_0) as llama.cpp's stacked
``ffn_{gate,up,down}_exps`` tensors, the router ``ffn_gate_inp`` in F32.

The file is synthesized once into ``~/.cache/aprtrace/bench`` (never committed) with seeded
random Q8_0 blocks, a few MB at a time (``bench_7b``'s generator), by default with 2 layers
(2.0 GB; ``--layers 48`` writes the full 31 GB depth). Then ``aprtrace trace --save-tensor all
--save-tensor-layers 0..2`` runs on it as a subprocess with 7 tokens: the peak RSS must stay
under 3 GB. The forward pass decodes one layer at a time and, inside a layer, one selected
expert at a time, so the peak does not grow with the depth (``bench_7b`` measures that for a
dense model: 3 MB from 1 to 28 layers).

    python -m benchmarks.bench_moe             # synthesize if missing, then measure
    python -m benchmarks.bench_moe --layers 48
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks import BENCH_CACHE, aprtrace_command, measure_command
from benchmarks.bench_7b import _f32_values, _nbytes, write_tensors

QWEN3_30B_A3B = dict(
    layers=48,
    hidden=2048,
    heads=32,
    kv_heads=4,
    head_dim=128,
    experts=128,
    experts_used=8,
    moe_intermediate=768,
    intermediate=6144,
    vocab=151936,
    rope_theta=1000000.0,
    rms_eps=1e-6,
    context=40960,
)
SEED = 30
TOKENS = "9707,11,1879,0,3555,374,220"  # 7 token ids
RSS_TARGET_MB = 3 * 1024
SAVED_LAYERS = "0..2"  # every stage of 2 layers (the forward still runs all of them)


def synthetic_path(layers: int) -> Path:
    return BENCH_CACHE / f"qwen3-30b-a3b-shapes-{layers}l-q8_0-seed{SEED}.gguf"


def _tensor_plan(s: dict, layers: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, NumPy shape, type) of every tensor, in llama.cpp's file order."""
    h, d = s["hidden"], s["head_dim"]
    q, kv = s["heads"] * d, s["kv_heads"] * d
    n, inter = s["experts"], s["moe_intermediate"]
    plan = [("token_embd.weight", (s["vocab"], h), "Q8_0")]
    for i in range(layers):
        b = f"blk.{i}."
        plan += [
            (b + "attn_norm.weight", (h,), "F32"),
            (b + "attn_q.weight", (q, h), "Q8_0"),
            (b + "attn_k.weight", (kv, h), "Q8_0"),
            (b + "attn_v.weight", (kv, h), "Q8_0"),
            (b + "attn_q_norm.weight", (d,), "F32"),
            (b + "attn_k_norm.weight", (d,), "F32"),
            (b + "attn_output.weight", (h, q), "Q8_0"),
            (b + "ffn_norm.weight", (h,), "F32"),
            (b + "ffn_gate_inp.weight", (n, h), "F32"),
            (b + "ffn_gate_exps.weight", (n, inter, h), "Q8_0"),
            (b + "ffn_up_exps.weight", (n, inter, h), "Q8_0"),
            (b + "ffn_down_exps.weight", (n, h, inter), "Q8_0"),
        ]
    plan += [("output_norm.weight", (h,), "F32"), ("output.weight", (s["vocab"], h), "Q8_0")]
    return plan


def _f32_tensor(rng: np.random.Generator, name: str, n: int) -> np.ndarray:
    if "ffn_gate_inp" in name:  # router logits of std ~1 for unit-RMS inputs
        return (rng.standard_normal(n) / np.sqrt(2048)).astype(np.float32)
    return _f32_values(rng, name, n)


def synthesize(path: Path, layers: int, shapes: dict = QWEN3_30B_A3B, seed: int = SEED) -> Path:
    """Write the synthetic MoE GGUF at ``path`` tensor by tensor, a few MB at a time."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    plan = _tensor_plan(shapes, layers)
    tmp = path.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(tmp), "qwen3moe")
    writer.add_name("aprtrace synthetic Qwen3-30B-A3B shapes (random Q8_0)")
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(layers)
    writer.add_context_length(shapes["context"])
    writer.add_embedding_length(shapes["hidden"])
    writer.add_feed_forward_length(shapes["intermediate"])
    writer.add_head_count(shapes["heads"])
    writer.add_head_count_kv(shapes["kv_heads"])
    writer.add_key_length(shapes["head_dim"])
    writer.add_value_length(shapes["head_dim"])
    writer.add_rope_freq_base(shapes["rope_theta"])
    writer.add_layer_norm_rms_eps(shapes["rms_eps"])
    writer.add_expert_count(shapes["experts"])
    writer.add_expert_used_count(shapes["experts_used"])
    writer.add_expert_feed_forward_length(shapes["moe_intermediate"])
    rng = np.random.default_rng(seed)
    return write_tensors(writer, plan, tmp, path, rng=rng, f32_values=_f32_tensor)


@dataclass
class RunMoE:
    model_layers: int
    file_gb: float
    wall_s: float
    peak_rss_mb: float
    files: int
    ok: bool
    error: str = ""


def run(layers: int = 2) -> RunMoE:
    """Synthesize the model if needed, then trace it once, saving every stage of 2 layers."""
    model = synthetic_path(layers)
    if not model.exists():
        need = sum(_nbytes(s, t) for _, s, t in _tensor_plan(QWEN3_30B_A3B, layers)) + (1 << 30)
        free = shutil.disk_usage(BENCH_CACHE if BENCH_CACHE.exists() else Path.home()).free
        if free < need:
            raise RuntimeError(f"needs {need / 1e9:.1f} GB free for {model}, {free / 1e9:.1f} GB")
        start = time.perf_counter()
        synthesize(model, layers)
        print(f"synthesized {model} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="aprtrace-moe-") as tmp:
        out_dir = Path(tmp) / "dump"
        cmd = [
            *aprtrace_command(),
            "trace",
            "-q",
            "--save-tensor",
            "all",
            "--save-tensor-layers",
            SAVED_LAYERS,
            "--tokens",
            TOKENS,
            "--save-tensor-dir",
            str(out_dir),
            str(model),
        ]
        m = measure_command(cmd)
        files = len(list(out_dir.rglob("*.bin"))) if out_dir.exists() else 0
    error = "" if m.returncode == 0 else (m.stderr.strip().splitlines() or ["?"])[-1][:200]
    return RunMoE(
        layers,
        round(model.stat().st_size / 1e9, 2),
        m.wall_s,
        m.peak_rss_mb,
        files,
        m.returncode == 0,
        error,
    )


def main() -> int:
    layers = int(sys.argv[sys.argv.index("--layers") + 1]) if "--layers" in sys.argv else 2
    result = run(layers)
    print(json.dumps(asdict(result)))
    return 0 if result.ok and result.peak_rss_mb <= RSS_TARGET_MB else 1


if __name__ == "__main__":
    raise SystemExit(main())
