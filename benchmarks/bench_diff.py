"""Directory diff throughput and memory: ``aprtrace diff --values A/ B/`` on synthetic dumps.

Run ``python benchmarks/bench_diff.py [--mb 200] [--large]``. Two dumps of random f32 stage
files (B = A + small noise) are written once, read once so they are page-cached, then the
installed CLI diffs them in a child process; wall time and the peak RSS of exactly that
process are measured. The same is done at a quarter of the size, so the table shows that
peak RSS does not grow with the dump size (files are streamed in 4 Mi-element chunks through
memory maps whose pages are released after each chunk). ``--large`` adds a 2 GB pair with one
1 GB file (above the 16 Mi-element limit where the ULP median switches to the two-pass
histogram).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aprtrace.aprt import encode_header  # noqa: E402
from benchmarks import aprtrace_command, measure_command, python_env  # noqa: E402

STAGES = ("attn_norm", "qkv_matmul", "attention", "attn_out", "ffn_gate", "ffn_up", "ffn_out")
_BLOCK = 1 << 22  # values generated and written per step


def _write_pair(path_a: Path, path_b: Path, layer: int, n: int, rng: np.random.Generator) -> None:
    path_a.parent.mkdir(parents=True, exist_ok=True)
    path_b.parent.mkdir(parents=True, exist_ok=True)
    with open(path_a, "wb") as fa, open(path_b, "wb") as fb:
        fa.write(encode_header(layer, n))
        fb.write(encode_header(layer, n))
        for lo in range(0, n, _BLOCK):
            m = min(_BLOCK, n - lo)
            a = rng.standard_normal(m, dtype=np.float32)
            b = a + np.float32(1e-3) * rng.standard_normal(m, dtype=np.float32)
            fa.write(a.tobytes())
            fb.write(b.tobytes())


def make_dumps(root: Path, total_mb: int, big_file_mb: int = 0, seed: int = 0) -> int:
    """Write dumps ``root/a`` and ``root/b`` of about ``total_mb`` MB each; return bytes/side."""
    rng = np.random.default_rng(seed)
    n_total = total_mb * (1 << 20) // 4
    sizes = []
    if big_file_mb:
        sizes.append(big_file_mb * (1 << 20) // 4)
    rest = n_total - sum(sizes)
    per_file = max(1, rest // 14)
    while rest > 0:
        sizes.append(min(per_file, rest))
        rest -= sizes[-1]
    for i, n in enumerate(sizes):
        layer, stage = divmod(i, len(STAGES))
        rel = f"layer-{layer}/{STAGES[stage]}.bin"
        _write_pair(root / "a" / rel, root / "b" / rel, layer, n, rng)
    return sum(12 + 4 * n for n in sizes)


def _warm(root: Path) -> None:
    for path in root.rglob("*.bin"):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def _diff(root: Path) -> tuple[float, float, dict]:
    cmd = aprtrace_command() + ["diff", "--values", "--json", str(root / "a"), str(root / "b")]
    m = measure_command(cmd, env=python_env())
    if m.returncode not in (0, 1):
        raise RuntimeError(f"diff failed ({m.returncode}): {m.stderr.strip()[-300:]}")
    return m.wall_s, m.peak_rss_mb, json.loads(m.stdout)


def _in_process_seconds(root: Path, repeats: int) -> float:
    """Best wall time of the library call alone (no interpreter start, no rendering)."""
    from aprtrace.diff import diff_dirs

    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        diff_dirs(root / "a", root / "b")
        best = min(best, time.perf_counter() - start)
    return best


def run(total_mb: int = 200, large: bool = False, repeats: int = 2) -> dict:
    """Rows of {size_mb_per_side, files, cli_wall_s, peak_rss_mb, diff_s, gb_per_s} per size.

    ``peak_rss_mb`` and ``cli_wall_s`` are of the ``aprtrace diff --json`` child process;
    ``gb_per_s`` counts the bytes of both sides over the in-process ``diff_dirs`` time, all
    files page-cached.
    """
    sizes = [(max(4, total_mb // 4), 0), (total_mb, 0)]
    if large:
        sizes.append((2048, 1024))
    rows = []
    with tempfile.TemporaryDirectory(prefix="aprtrace-bench-diff-") as tmp:
        for size_mb, big_mb in sizes:
            root = Path(tmp) / f"d{size_mb}"
            side_bytes = make_dumps(root, size_mb, big_mb)
            _warm(root)
            runs = [_diff(root) for _ in range(repeats)]
            seconds = _in_process_seconds(root, repeats)
            rows.append(
                {
                    "size_mb_per_side": round(side_bytes / (1 << 20)),
                    "files": runs[0][2]["summary"]["pairs"],
                    "largest_file_mb": big_mb or round(side_bytes / (1 << 20) / 14),
                    "cli_wall_s": round(min(r[0] for r in runs), 3),
                    "peak_rss_mb": round(max(r[1] for r in runs), 1),
                    "diff_s": round(seconds, 3),
                    "gb_per_s": round(2 * side_bytes / seconds / 1e9, 3),
                }
            )
            shutil.rmtree(root)
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of each dump in MB")
    parser.add_argument("--large", action="store_true", help="also a 2 GB pair (1 GB file)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    result = run(args.mb, args.large, args.repeats)
    print(
        f"{'MB/side':>8} {'files':>6} {'big MB':>7} {'CLI wall s':>11} {'CLI peak RSS MB':>16} "
        f"{'diff s':>7} {'GB/s':>6}"
    )
    for r in result["rows"]:
        print(
            f"{r['size_mb_per_side']:>8} {r['files']:>6} {r['largest_file_mb']:>7} "
            f"{r['cli_wall_s']:>11.2f} {r['peak_rss_mb']:>16.1f} {r['diff_s']:>7.2f} "
            f"{r['gb_per_s']:>6.2f}"
        )


if __name__ == "__main__":
    main()
