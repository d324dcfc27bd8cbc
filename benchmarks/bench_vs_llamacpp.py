"""aprtrace next to llama.cpp on the same file and the same token ids (issue 15's table).

Each case runs ``aprtrace trace`` (whole process, as a user runs it) and llama.cpp through
``cyllama`` (whole process: load + one prefill of the same ids on two threads, logits read)
in alternated pairs (A B, B A, ...), so that a burst of load on this shared machine hits both
sides; the figure of each side is its median. ratio = aprtrace / llama.cpp (lower is better).
The load average is recorded around every case.

    python -m benchmarks.bench_vs_llamacpp            # SmolLM2 cases
    python -m benchmarks.bench_vs_llamacpp --7b       # plus the 7B-shaped Q8_0 / Q4_K_M files
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks import aprtrace_command, measure_command, python_env

FULL = ["--save-tensor", "all", "--save-tensor-layers", "all"]
LM_HEAD = ["--save-tensor", "lm_head"]
STATS: list[str] = []  # no --save-tensor: the statistics table


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # smollm2 | 7b-q8_0 | 7b-q4_k_m
    tokens: int
    args: tuple[str, ...]
    pairs: int
    target: float | None = None  # ratio bound, None = information
    rss_target_mb: float | None = None


CASES = [
    Case("SmolLM2 Q4_1, 7 tokens, full trace", "smollm2", 7, tuple(FULL), 3, 1.5),
    Case("SmolLM2, 7 tokens, `lm_head` only", "smollm2", 7, tuple(LM_HEAD), 3, 1.3),
    Case("SmolLM2, 7 tokens, no `--save-tensor` (statistics table)", "smollm2", 7, (), 3),
    Case("SmolLM2, 256 tokens, `lm_head`", "smollm2", 256, tuple(LM_HEAD), 3, 1.0),
    Case("SmolLM2, 1024 tokens, `lm_head`", "smollm2", 1024, tuple(LM_HEAD), 2, 0.8),
    Case("SmolLM2, 1024 tokens, full trace", "smollm2", 1024, tuple(FULL), 1),
    Case("SmolLM2, 2048 tokens, `lm_head`", "smollm2", 2048, tuple(LM_HEAD), 2, 0.8, 400),
    Case("SmolLM2, 2048 tokens, full trace", "smollm2", 2048, tuple(FULL), 1),
    Case("SmolLM2, 5000 tokens, `lm_head`", "smollm2", 5000, tuple(LM_HEAD), 1, None, 1024),
]
CASES_7B = [
    Case("Qwen2.5-7B-shaped Q8_0, 7 tokens, full trace", "7b-q8_0", 7, tuple(FULL), 1, 2.0, 1536),
    Case(
        "Qwen2.5-7B-shaped Q4_K_M, 7 tokens, full trace",
        "7b-q4_k_m",
        7,
        tuple(FULL),
        1,
        2.0,
        1536,
    ),
]


@dataclass
class Side:
    wall_s: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    detail: str = ""
    error: str = ""

    @property
    def wall(self) -> float | None:
        return statistics.median(self.wall_s) if self.wall_s else None

    @property
    def rss(self) -> float | None:
        return max(self.rss_mb) if self.rss_mb else None


@dataclass
class CaseResult:
    case: Case
    ours: Side
    peer: Side
    load_before: float
    load_after: float
    files: int = 0

    @property
    def ratio(self) -> float | None:
        if self.ours.wall is None or self.peer.wall is None:
            return None
        return self.ours.wall / self.peer.wall

    @property
    def verdict(self) -> str:
        checks = []
        if self.case.target is not None:
            checks.append(self.ratio is not None and self.ratio <= self.case.target)
        if self.case.rss_target_mb is not None:
            checks.append(self.ours.rss is not None and self.ours.rss <= self.case.rss_target_mb)
        if not checks:
            return "info"
        return "met" if all(checks) else "MISSED"


def token_ids(n: int) -> list[int]:
    """``n`` deterministic ids spread over SmolLM2's (and Qwen's) common vocabulary."""
    return [100 + (i * 7919) % 40000 for i in range(n)]


def _aprtrace(model: Path, case: Case, ids: list[int], out: Path) -> tuple[float, float, int]:
    cmd = [*aprtrace_command(), "trace", "-q", "--tokens", ",".join(map(str, ids)), *case.args]
    if case.args:
        cmd += ["--save-tensor-dir", str(out), "--clean"]
    m = measure_command([*cmd, str(model)], env=python_env())
    files = len(list(out.rglob("*.bin"))) if out.exists() else 0
    shutil.rmtree(out, ignore_errors=True)
    if m.returncode != 0:
        raise RuntimeError((m.stderr.strip().splitlines() or ["?"])[-1][:200])
    return m.wall_s, m.peak_rss_mb, files


def _llamacpp(model: Path, ids: list[int]) -> tuple[float, float, str]:
    from benchmarks.peers import llamacpp_ids_command

    m = measure_command(llamacpp_ids_command(model, ids), env=python_env())
    if m.returncode != 0:
        raise RuntimeError((m.stderr.strip().splitlines() or ["?"])[-1][:200])
    return m.wall_s, m.peak_rss_mb, json.loads(m.stdout.strip().splitlines()[-1])["detail"]


def run_case(case: Case, model: Path, scratch: Path) -> CaseResult:
    ids = token_ids(case.tokens)
    result = CaseResult(case, Side(), Side(), os.getloadavg()[0], 0.0)

    def ours() -> None:
        wall, rss, files = _aprtrace(model, case, ids, scratch / "dump")
        result.ours.wall_s.append(wall)
        result.ours.rss_mb.append(rss)
        result.files = files

    def peer() -> None:
        wall, rss, detail = _llamacpp(model, ids)
        result.peer.wall_s.append(wall)
        result.peer.rss_mb.append(rss)
        result.peer.detail = detail

    sides = [("ours", ours), ("peer", peer)]
    for i in range(case.pairs):
        for side, step in sides if i % 2 == 0 else sides[::-1]:
            try:
                step()
            except RuntimeError as exc:
                getattr(result, side).error = str(exc)
    result.load_after = os.getloadavg()[0]
    return result


def model_paths(with_7b: bool) -> dict[str, Path | None]:
    from benchmarks import smollm2_path

    paths: dict[str, Path | None] = {"smollm2": smollm2_path()}
    if with_7b:
        from benchmarks import bench_7b

        paths["7b-q8_0"] = bench_7b.ensure_synthetic()
        paths["7b-q4_k_m"] = bench_7b.ensure_q4_k_m()
    return paths


def run(with_7b: bool = False, cases: list[Case] | None = None) -> list[CaseResult]:
    """Every case whose model is available, in order (the 7B ones last)."""
    cases = cases if cases is not None else CASES + (CASES_7B if with_7b else [])
    paths = model_paths(with_7b or any(c.model.startswith("7b") for c in cases))
    results = []
    with tempfile.TemporaryDirectory(prefix="aprtrace-vs-llamacpp-") as tmp:
        for case in cases:
            model = paths.get(case.model)
            if model is None:
                continue
            print(f"[vs llama.cpp] {case.name} ...", file=sys.stderr, flush=True)
            results.append(run_case(case, model, Path(tmp)))
    return results


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def render(results: list[CaseResult]) -> str:
    """The side-by-side table (Markdown)."""
    lines = [
        "| case | aprtrace (median, peak RSS) | llama.cpp (median, peak RSS) | ratio | target "
        "| verdict | runs, load avg (1 min) before / after |",
        "|---|---|---|---:|---|---|---|",
    ]
    for r in results:
        c = r.case
        ours = f"{_fmt(r.ours.wall)}, {r.ours.rss or 0:.0f} MB" if r.ours.wall else r.ours.error
        if r.files:
            ours += f", {r.files} files"
        peer = f"{_fmt(r.peer.wall)}, {r.peer.rss or 0:.0f} MB" if r.peer.wall else r.peer.error
        target = []
        if c.target is not None:
            target.append(f"ratio <= {c.target:g}")
        if c.rss_target_mb is not None:
            target.append(f"RSS <= {c.rss_target_mb:g} MB")
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        runs = f"{c.pairs} pair{'s' if c.pairs > 1 else ''}, load {r.load_before:.1f} / "
        runs += f"{r.load_after:.1f}"
        lines.append(
            f"| {c.name} | {ours} | {peer} | {ratio} | {', '.join(target) or '-'} "
            f"| {r.verdict} | {runs} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    results = run(with_7b="--7b" in argv)
    print(render(results))
    for r in results:
        print(json.dumps({"case": r.case.name, "ours": asdict(r.ours), "peer": asdict(r.peer)}))
    return 0 if all(r.verdict != "MISSED" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
