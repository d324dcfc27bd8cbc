"""Generation traced step by step: a prompt pass that fills a KV cache, then N decode steps.

    logits_0 = prompt pass over ids at positions 0..n-1            (the dump root)
    for k in 1..N:
        token_k  = forced[k-1]  or  argmax(logits_{k-1})            (greedy by default)
        logits_k = one row: token_k at position n + k - 1, attending the cache   (DIR/decode-k/)

Each decode step is a real incremental pass (one new row, keys and values read back from the
cache), not a re-run of the whole sequence: that is the path engines get wrong (a cache write in
the wrong slot, a RoPE position off by one, a window applied to the wrong length). Inside a
step the buffers hold the one new position: ``[1, dim]``, attention maps ``[heads, 1, n + k]``.

Every engine shares ``generate`` (which token is fed, at which position) and the emit contract
of ``aprtrace.forward.forward``, routed per pass by ``emit_for(step)`` (0 = the prompt pass).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from aprtrace.arch.base import Emit, KVCache
from aprtrace.config import ModelConfig
from aprtrace.errors import InferenceError, ValidationError
from aprtrace.plan import LayerSelection, parse_layers

# The forward driver is imported where a pass runs: `diff` reads step directories through
# this module and should not load the forward pass for that.
Progress = Callable[[int, int], None]
if TYPE_CHECKING:
    from aprtrace.model import Model

# Directory of step k inside a dump (the prompt pass stays at the root, as apr writes it).
STEP_DIR = "decode-{}"
STEP_DIR_RE = re.compile(r"^decode-([1-9][0-9]*)$")

StepEmit = Callable[[int], Emit]
# (token, position, emit) -> logits of that one-row pass
RunStep = Callable[[int, int, Emit], np.ndarray]


def step_dir(step: int) -> str:
    """``decode-k`` for step k >= 1 (step 0, the prompt pass, is the dump root)."""
    return STEP_DIR.format(step)


@dataclass(frozen=True)
class DecodeStep:
    """One decode step: the token fed, the position it ran at, what its logits choose."""

    step: int
    token: int
    position: int
    argmax: int | None  # greedy choice of this step's logits (None when they hold NaN)

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "dir": step_dir(self.step),
            "token": self.token,
            "position": self.position,
            "argmax": self.argmax,
        }


@dataclass
class DecodeRun:
    """The logits of every pass (index 0: the prompt) and the decode steps, in order."""

    logits: list[np.ndarray] = field(default_factory=list)
    steps: list[DecodeStep] = field(default_factory=list)
    forced: bool = False

    @property
    def prompt_argmax(self) -> int | None:
        return greedy(self.logits[0]) if self.logits else None

    @property
    def tokens(self) -> list[int]:
        """The tokens fed at steps 1..N."""
        return [s.token for s in self.steps]


def greedy(logits: np.ndarray) -> int | None:
    """argmax of ``logits``; None when a logit is NaN (argmax would pick the first NaN)."""
    if logits.size == 0 or np.isnan(logits).any():
        return None
    return int(np.argmax(logits))


def check_decode(
    cfg: ModelConfig, prompt_len: int, steps: int, forced: Sequence[int] | None
) -> list[int] | None:
    """Validate the decode request before any pass runs; return the forced tokens, if any."""
    if steps < 0:
        raise ValidationError(f"--decode {steps}: the number of steps is >= 0")
    if forced is not None:
        forced = [int(t) for t in forced]
        if len(forced) < steps:
            raise ValidationError(
                f"--decode {steps} with {len(forced)} --decode-tokens: every step needs a token",
                hint="give as many --decode-tokens as steps, or leave --decode out",
            )
        bad = [t for t in forced if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValidationError(
                f"--decode-tokens: token id {bad[0]} is outside the vocabulary "
                f"(0..{cfg.vocab_size - 1})"
            )
        forced = forced[:steps]
    if prompt_len + steps > cfg.max_position_embeddings:
        raise ValidationError(
            f"{prompt_len} prompt tokens + {steps} decode steps exceed the model's context "
            f"({cfg.max_position_embeddings})",
            hint="use fewer --decode steps or a shorter prompt",
        )
    return forced


def generate(
    first_logits: np.ndarray,
    prompt_len: int,
    steps: int,
    forced: Sequence[int] | None,
    run_step: RunStep,
    emit_for: StepEmit,
) -> DecodeRun:
    """Steps 1..``steps`` after a prompt pass of ``prompt_len`` tokens that gave ``first_logits``.

    ``run_step(token, position, emit)`` runs one incremental pass of an engine.
    """
    run = DecodeRun([first_logits], [], forced is not None)
    logits = first_logits
    for k in range(1, steps + 1):
        token = forced[k - 1] if forced is not None else greedy(logits)
        if token is None:
            raise InferenceError(
                f"decode step {k}: the logits of step {k - 1} contain NaN; no token to feed",
                hint="force the continuation with --decode-tokens",
            )
        position = prompt_len + k - 1
        logits = run_step(token, position, emit_for(k))
        run.steps.append(DecodeStep(k, int(token), position, greedy(logits)))
        run.logits.append(logits)
    return run


def numpy_decode(
    model: Model,
    token_ids: list[int],
    steps: int,
    emit_for: StepEmit,
    progress: Progress | None = None,
    forced: Sequence[int] | None = None,
    cache: KVCache | None = None,
) -> DecodeRun:
    """The NumPy engine: the prompt pass fills ``cache``, each step appends one row to it."""
    from aprtrace.forward import check_token_ids, run_layers

    cfg = model.config
    ids = check_token_ids(cfg, token_ids)
    if cfg.num_layers <= 0:
        raise InferenceError("the model has zero layers; there is nothing to trace")
    forced = check_decode(cfg, ids.size, steps, forced)
    cache = cache if cache is not None else KVCache(capacity=ids.size + steps)
    logits = run_layers(model, ids, np.arange(ids.size), emit_for(0), progress, cache)

    def run_step(token: int, position: int, emit: Emit) -> np.ndarray:
        if cache.length != position:
            raise InferenceError(
                f"KV cache holds {cache.length} positions before the step at position {position}"
            )
        return run_layers(model, np.array([token]), np.array([position]), emit, None, cache)

    return generate(logits, ids.size, steps, forced, run_step, emit_for)


def decode_request(
    decode_steps: int | None, decode_tokens: str | None, engines: Sequence[str]
) -> tuple[int, list[int] | None]:
    """``--decode N`` / ``--decode-tokens`` -> (steps, forced tokens), checked before any model
    loads: N defaults to the number of forced tokens, and every engine must decode."""
    from aprtrace.trace import engine_decode, parse_token_list

    forced = parse_token_list(decode_tokens, "--decode-tokens") if decode_tokens else None
    if decode_steps is None:
        decode_steps = len(forced) if forced is not None else 0
    elif decode_steps == 0 and forced is not None:
        raise ValidationError(
            "--decode 0 with --decode-tokens: no step to feed them to",
            hint="leave --decode out (it defaults to the number of --decode-tokens)",
        )
    if decode_steps:
        for engine in engines:
            engine_decode(engine)  # an engine without decode is refused up front
    return decode_steps, forced


def parse_steps(spec: str) -> LayerSelection:
    """``--steps 0..3`` (end exclusive, as --save-tensor-layers; 0 = the prompt pass)."""
    return parse_layers(spec, flag="--steps")


def step_of_path(rel: str) -> tuple[int, str]:
    """``decode-3/layer-0/x.bin`` -> (3, ``layer-0/x.bin``); other paths are step 0."""
    head, sep, rest = rel.partition("/")
    m = STEP_DIR_RE.match(head)
    if sep and m:
        return int(m.group(1)), rest
    return 0, rel


__all__ = [
    "DecodeRun",
    "DecodeStep",
    "check_decode",
    "generate",
    "greedy",
    "numpy_decode",
    "parse_steps",
    "step_dir",
    "step_of_path",
]
