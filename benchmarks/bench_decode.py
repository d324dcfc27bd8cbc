"""Decode (``trace --decode N``): time per step and the memory of the KV cache.

- SmolLM2 (the real Q4_1 GGUF): the prompt pass, then 16 greedy decode steps through the cache,
  with no capture and with every stage of every layer written (``--save-tensor all``).
- Context 2k: one decode step at position 2047 after a cache pre-filled with 2047 positions
  (seeded random keys and values: the cost and memory of a 2k-context step do not depend on
  the values), for SmolLM2 and for the synthetic Qwen2.5-7B shapes of ``bench_7b`` (Q8_0,
  GQA with 4 KV heads). Each runs in its own process, so the peak RSS is that of the step.

The KV cache is float32: ``layers x positions x kv_dim x 2 (K and V) x 4 bytes`` plus 8 bytes
of position per row and layer; for Qwen2.5-7B at 2048 positions 28 x 2048 x 512 x 2 x 4 =
234,881,024 bytes (224 MiB), against the 3 GB peak-RSS bound ``bench_7b`` tracks.

    python -m benchmarks.bench_decode           # SmolLM2 figures + the 2k step (7B if present)
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import CACHE_DIR, SMOLLM2_NAME, aprtrace_command, measure_command

CONTEXT = 2048
STEPS = 16
SEED = 3


def kv_cache_bytes(layers: int, positions: int, kv_dim: int) -> int:
    """f32 K and V of every layer and position, plus one int64 position per row and layer."""
    return layers * positions * (2 * kv_dim * 4 + 8)


def step_times(model_path: Path, steps: int, ids: list[int] | None = None) -> dict:
    """Prompt pass + ``steps`` greedy steps, no capture: seconds of the prompt and per step
    (``ids`` default: "What is 2+2?" with the model's tokenizer)."""
    from aprtrace.arch.base import no_emit
    from aprtrace.decode import numpy_decode
    from aprtrace.formats import load_model

    model = load_model(model_path)
    if ids is None:
        ids = model.tokenizer.encode("What is 2+2?", add_special_tokens=False).ids
    marks: list[float] = []

    def emit_for(step: int):
        marks.append(time.perf_counter())
        return no_emit

    run = numpy_decode(model, ids, steps, emit_for)
    end = time.perf_counter()
    marks.append(end)
    spans = np.diff(marks)
    return {
        "prompt_tokens": len(ids),
        "prompt_s": float(spans[0]),
        "step_s_median": float(statistics.median(spans[1:])),
        "step_s_min": float(spans[1:].min()),
        "tokens": run.tokens,
    }


def step_at_context(model_path: Path, context: int = CONTEXT) -> dict:
    """One decode step at position ``context - 1`` after a pre-filled cache (this process)."""
    from aprtrace.arch import KVCache
    from aprtrace.arch.base import no_emit
    from aprtrace.formats import load_model
    from aprtrace.forward import run_layers

    model = load_model(model_path)
    cfg = model.config
    past = context - 1
    cache = KVCache(capacity=context)
    rng = np.random.default_rng(SEED)
    shape = (past, cfg.num_kv_heads, cfg.head_dim)
    for layer in range(cfg.num_layers):
        k = rng.standard_normal(shape, dtype=np.float32)
        v = rng.standard_normal(shape, dtype=np.float32)
        cache.extend(layer, k, v, np.arange(past))
    start = time.perf_counter()
    logits = run_layers(model, np.array([1]), np.array([past]), no_emit, None, cache)
    seconds = time.perf_counter() - start
    return {
        "context": context,
        "step_s": seconds,
        "cache_bytes": cache.nbytes,
        "cache_bytes_formula": kv_cache_bytes(cfg.num_layers, context, cfg.kv_dim),
        "finite": bool(np.isfinite(logits).all()),
        "layers": cfg.num_layers,
        "kv_dim": cfg.kv_dim,
    }


def measure_step_at_context(model_path: Path) -> dict:
    """``step_at_context`` in a child process, with its wall time and peak RSS."""
    cmd = [sys.executable, "-m", "benchmarks.bench_decode", "--step-at-context", str(model_path)]
    m = measure_command(cmd, cwd=Path(__file__).resolve().parent.parent)
    if m.returncode != 0:
        return {"error": m.stderr.strip()[-500:]}
    result = json.loads(m.stdout.strip().splitlines()[-1])
    return result | {"peak_rss_mb": m.peak_rss_mb, "process_wall_s": m.wall_s}


def trace_with_decode(model_path: Path, steps: int) -> dict:
    """``aprtrace trace --decode steps --save-tensor all --save-tensor-layers all`` (wall, RSS)."""
    with tempfile.TemporaryDirectory(prefix="aprtrace-decode-") as tmp:
        out = {}
        for n in (0, steps):
            cmd = [
                *aprtrace_command(),
                "trace",
                str(model_path),
                "--save-tensor",
                "all",
                "--save-tensor-layers",
                "all",
                "--save-tensor-dir",
                str(Path(tmp) / f"d{n}"),
                "--decode",
                str(n),
                "-q",
            ]
            m = measure_command(cmd)
            files = sum(1 for _ in (Path(tmp) / f"d{n}").rglob("*.bin"))
            out[n] = {"wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb, "files": files}
    per_step = (out[steps]["wall_s"] - out[0]["wall_s"]) / steps
    return {"steps": steps, "runs": out, "per_step_s": per_step}


def run() -> dict:
    from benchmarks.bench_7b import TOKENS as TOKENS_7B
    from benchmarks.bench_7b import synthetic_path

    smollm2 = CACHE_DIR / SMOLLM2_NAME
    result: dict = {
        "smollm2_steps": step_times(smollm2, STEPS),
        "smollm2_trace": trace_with_decode(smollm2, STEPS),
        "smollm2_2k": measure_step_at_context(smollm2),
    }
    if synthetic_path().is_file():
        ids = [int(t) for t in TOKENS_7B.split(",")]
        result["qwen25_7b_steps"] = step_times(synthetic_path(), 2, ids)
        result["qwen25_7b_2k"] = measure_step_at_context(synthetic_path())
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--step-at-context"]:
        print(json.dumps(step_at_context(Path(args[1]))))
        return 0
    print(json.dumps(run(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
