"""aprtrace: capture per-stage tensors of an LLM forward pass and find where two runs diverge.

Byte-compatible with aprender's ``apr trace --save-tensor`` (APRT files) and
``apr diff --values``. The library API, for notebooks and test suites::

    import aprtrace

    model = aprtrace.load_model("model.gguf")          # GGUF, APR v2 or a safetensors dir
    stages = aprtrace.capture_stages(model, "What is 2+2?")  # {(stage, layer): ndarray}
    gen = aprtrace.capture_decode(model, "What is 2+2?", 8)  # gen.stages[k]: step k
    plan = aprtrace.make_plan("all", "all", "dump/", "model.gguf")
    aprtrace.run_trace(model, [1780, 314], plan)       # APRT files + manifest.json
    result = aprtrace.diff_dirs("ref-dump/", "dump/")  # first divergence, per-pair metrics
    aprtrace.write_aprt("x.bin", 0, values)            # dump from your own engine
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names, imported on first use so that `import aprtrace` stays cheap.
_LAZY = {
    "load_model": "aprtrace.formats",
    "forward": "aprtrace.forward",
    "capture_stages": "aprtrace.trace",
    "run_trace": "aprtrace.trace",
    "capture_decode": "aprtrace.trace",
    "DecodeCapture": "aprtrace.trace",
    "make_plan": "aprtrace.plan",
    "Stage": "aprtrace.stages",
    "read_aprt": "aprtrace.aprt",
    "write_aprt": "aprtrace.aprt",
    "diff_dirs": "aprtrace.diff",
    "diff_files": "aprtrace.diff",
    "AprtraceError": "aprtrace.errors",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aprtrace' has no attribute {name!r}")
