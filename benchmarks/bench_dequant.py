"""Dequantization throughput: aprtrace.quant against gguf.quants.dequantize, bit for bit.

Run ``python benchmarks/bench_dequant.py [--quick]``. For each type a 1024x4096 tensor of
random blocks (finite f16 scales) is decoded by both, alternately, and the minimum of the runs
is kept for each, so that load from other processes affects both sides alike.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from aprtrace import quant

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
         "F16", "BF16"]  # fmt: skip
SHAPE = (1024, 4096)

# Byte offsets of the f16 scales in a block: set to finite values, as in real weights.
_SCALE_OFFSETS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}  # fmt: skip


def _tensor(qtype: str, n_values: int, rng: np.random.Generator) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    n_blocks = n_values // block
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for offset in _SCALE_OFFSETS.get(qtype, []):
        scales = rng.uniform(-0.05, 0.05, n_blocks).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    if qtype == "F16":
        blocks = rng.standard_normal(n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(-1)


def _gguf(raw: np.ndarray, qtype: str) -> np.ndarray:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return gguf_quants.dequantize(raw, GGMLQuantizationType[qtype]).reshape(-1)


def run(quick: bool = False) -> list[dict]:
    """One row per type: Melem/s of ours and gguf-py, their ratio, and the bit-identity check."""
    rng = np.random.default_rng(0)
    n_values = SHAPE[0] * SHAPE[1]
    repeats = 3 if quick else 9
    rows = []
    for qtype in TYPES:
        raw = _tensor(qtype, n_values, rng)
        ours_out = quant.dequantize(raw, qtype, n_values)
        ref_out = _gguf(raw, qtype)
        identical = ours_out.shape == ref_out.shape and np.array_equal(
            ours_out.view(np.uint32), ref_out.view(np.uint32)
        )
        del ours_out, ref_out
        best = {"ours": float("inf"), "gguf": float("inf")}
        for _ in range(repeats):
            start = time.perf_counter()
            quant.dequantize(raw, qtype, n_values)
            best["ours"] = min(best["ours"], time.perf_counter() - start)
            start = time.perf_counter()
            _gguf(raw, qtype)
            best["gguf"] = min(best["gguf"], time.perf_counter() - start)
        rows.append(
            {
                "type": qtype,
                "shape": f"{SHAPE[0]}x{SHAPE[1]}",
                "ours_ms": round(best["ours"] * 1e3, 2),
                "gguf_ms": round(best["gguf"] * 1e3, 2),
                "ours_melem_s": round(n_values / best["ours"] / 1e6, 1),
                "gguf_melem_s": round(n_values / best["gguf"] / 1e6, 1),
                "speedup": round(best["gguf"] / best["ours"], 2),
                "bit_identical": bool(identical),
                "decoder": "aprtrace" if qtype in quant._KERNELS else "gguf fallback",
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of ``run()``'s rows."""
    lines = [
        "| type | aprtrace Melem/s | gguf-py Melem/s | speedup | bit-identical | decoder |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['type']} | {r['ours_melem_s']:.0f} | {r['gguf_melem_s']:.0f} | "
            f"{r['speedup']:.2f}x | {'yes' if r['bit_identical'] else 'NO'} | {r['decoder']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 runs per side instead of 9")
    args = parser.parse_args()
    rows = run(quick=args.quick)
    print(f"dequantize a {SHAPE[0]}x{SHAPE[1]} tensor, min of runs, 2 threads (aprtrace)")
    print(format_table(rows))
    if not all(r["bit_identical"] for r in rows):
        raise SystemExit("some outputs are not bit-identical to gguf-py")


if __name__ == "__main__":
    main()
