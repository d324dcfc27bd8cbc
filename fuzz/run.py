"""Long fuzz campaign over every aprtrace parser (no atheris needed).

    python fuzz/run.py --inputs 100000 --seconds 1800

Seeds are valid tiny files built at start-up (``fuzz/seeds.py``); each input is a seed with
1 to 4 mutations (``fuzz/mutate.py``). Inputs run in-process in ``--workers`` forked worker
processes, each with its address space capped (``RLIMIT_AS``, default 1 GiB) so a blow-up
is a MemoryError rather than a frozen machine, and a per-input time limit so a hang is
reported. The bar: every input either succeeds or raises an ``AprtraceError``; anything else
is a crash, saved with its traceback under ``fuzz/crashes/`` (gitignored) for replay with
``python fuzz/run.py --replay fuzz/crashes/<file>.bin``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aprtrace.errors import AprtraceError  # noqa: E402
from fuzz.mutate import random_ops  # noqa: E402
from fuzz.targets import build_targets  # noqa: E402

CRASH_DIR = ROOT / "fuzz" / "crashes"


class InputTimeout(Exception):
    """One input ran longer than the per-input limit (a hang)."""


def _on_alarm(signum, frame):
    raise InputTimeout("input exceeded the time limit")


def _scratch_dir() -> Path:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="aprtrace-fuzz-", dir=base))


def _save_crash(target: str, data: bytes, exc: BaseException) -> Path:
    CRASH_DIR.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(data).hexdigest()[:12]
    path = CRASH_DIR / f"{target}-{digest}.bin"
    path.write_bytes(data)
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    path.with_suffix(".txt").write_text(f"target: {target}\n{text}")
    return path


def worker(
    worker_id: int,
    seed: int,
    n_inputs: int,
    deadline: float,
    names: list[str],
    rlimit_mb: int,
    timeout_s: float,
) -> dict:
    """Run ``n_inputs`` inputs (targets in turn) until ``deadline``; return the tallies."""
    if rlimit_mb:
        limit = rlimit_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGALRM, _on_alarm)
    workdir = _scratch_dir()
    targets = build_targets(workdir)
    rng = random.Random(seed * 1000 + worker_id)
    counts = {n: {"ok": 0, "rejected": 0, "crash": 0} for n in names}
    crashes: list[dict] = []
    signatures: set[tuple] = set()
    done = 0
    for i in range(n_inputs):
        if time.time() > deadline:
            break
        target = targets[names[i % len(names)]]
        data = target.generate(rng.choice(target.seeds), random_ops(rng), rng.random() < 0.6)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            target.run(data, workdir)
            counts[target.name]["ok"] += 1
        except AprtraceError:
            counts[target.name]["rejected"] += 1
        except BaseException as exc:  # noqa: BLE001 - everything else is what we hunt
            if isinstance(exc, KeyboardInterrupt):
                raise
            counts[target.name]["crash"] += 1
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            sig = (target.name, type(exc).__name__, frame.filename, frame.lineno)
            if sig not in signatures:
                signatures.add(sig)
                saved = _save_crash(target.name, data, exc)
                crashes.append(
                    {
                        "target": target.name,
                        "error": f"{type(exc).__name__}: {exc}"[:300],
                        "where": f"{frame.filename}:{frame.lineno}",
                        "file": str(saved),
                    }
                )
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        done += 1
    for leftover in workdir.iterdir():
        leftover.unlink() if leftover.is_file() else None
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"done": done, "counts": counts, "crashes": crashes, "peak_rss_mb": peak_kb / 1024}


def replay(path: Path) -> int:
    """Run one saved input against its target (named by the file's prefix)."""
    name = path.name.rsplit("-", 1)[0]
    targets = build_targets(_scratch_dir())
    targets[name].run(path.read_bytes(), _scratch_dir())
    print(f"{path}: no uncaught exception")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--inputs", type=int, default=100_000, help="total inputs (default 100000)")
    ap.add_argument("--seconds", type=float, default=3600, help="stop after this long")
    ap.add_argument("--seed", type=int, default=1, help="campaign seed (deterministic inputs)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--targets", default="", help="comma-separated subset of targets")
    ap.add_argument("--rlimit-mb", type=int, default=1024, help="address-space cap per worker")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per input")
    ap.add_argument("--replay", type=Path, help="run one saved crash input and exit")
    args = ap.parse_args(argv)
    if args.replay:
        return replay(args.replay)

    with tempfile.TemporaryDirectory() as tmp:
        names = sorted(build_targets(Path(tmp)))
    if args.targets:
        wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            ap.error(f"unknown targets {unknown}; known: {', '.join(names)}")
        names = wanted
    start = time.time()
    deadline = start + args.seconds
    per_worker = [
        args.inputs // args.workers + (w < args.inputs % args.workers) for w in range(args.workers)
    ]
    ctx = get_context("fork")
    with ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
        futures = [
            pool.submit(worker, w, args.seed, n, deadline, names, args.rlimit_mb, args.timeout)
            for w, n in enumerate(per_worker)
        ]
        results = [f.result() for f in futures]
    elapsed = time.time() - start

    total = {n: {"ok": 0, "rejected": 0, "crash": 0} for n in names}
    for r in results:
        for n, c in r["counts"].items():
            for k, v in c.items():
                total[n][k] += v
    done = sum(r["done"] for r in results)
    crashes = [c for r in results for c in r["crashes"]]
    peak = max(r["peak_rss_mb"] for r in results)
    print(
        f"fuzz campaign: {done} inputs in {elapsed:.1f} s with {args.workers} workers "
        f"(seed {args.seed}, RLIMIT_AS {args.rlimit_mb} MiB per worker)"
    )
    print(f"{'target':<14}{'inputs':>9}{'ok':>9}{'rejected':>10}{'crashes':>9}")
    for n in names:
        c = total[n]
        print(f"{n:<14}{sum(c.values()):>9}{c['ok']:>9}{c['rejected']:>10}{c['crash']:>9}")
    print(f"peak RSS of a worker: {peak:.1f} MiB")
    print(
        f"uncaught exceptions: {sum(c['crash'] for c in total.values())} ({len(crashes)} distinct)"
    )
    for c in crashes:
        print(f"  {c['target']}: {c['error']}\n    at {c['where']}\n    saved {c['file']}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
