"""The traced forward pass: the driver every architecture module plugs into.

    ids -> embed -> for each layer: arch.layer(...) -> final norm -> logits of the last row

The math of each block lives in its architecture module (``aprtrace.arch``), with one
``emit(stage, layer, buffer)`` right under the line that computes ``buffer``; the caller
routes it to ``maybe_save_stage`` and the statistics table. A block continues from what its
emit returns (``x = emit(Stage.X, layer, x)``): here the buffer itself (``passing``), in
teacher forcing (``aprtrace.localize``) the dumped buffer of another run. Buffers are already in the
APRT layout: token-major ``[seq, dim]``, attention maps ``[heads, seq, seq]``, logits
``[vocab]``.

Weights are decoded one layer at a time, into buffers the next layer reuses, and dropped
when the layer is done, so peak memory is about one layer of float32 weights plus
activations.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from aprtrace.arch import KVCache, PassContext, architecture_of
from aprtrace.arch.base import Emit, Wants, no_emit, passing, wants_everything, wants_nothing
from aprtrace.arch.ops import SHORT_PROMPT, one_blas_thread
from aprtrace.config import ModelConfig
from aprtrace.errors import InferenceError, ValidationError
from aprtrace.model import Model
from aprtrace.stages import Stage

Progress = Callable[[int, int], None]

# Rows of the output projection decoded at once: bounds the transient f32 copy of lm_head
# to LM_HEAD_CHUNK * hidden * 4 bytes (about 37 MB for hidden 4608).
LM_HEAD_CHUNK = 2048


def check_token_ids(cfg: ModelConfig, token_ids: list[int]) -> np.ndarray:
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise ValidationError(
            "the prompt encodes to zero tokens", hint="give a non-empty --prompt or --tokens"
        )
    bad = ids[(ids < 0) | (ids >= cfg.vocab_size)]
    if bad.size:
        raise ValidationError(
            f"token id {int(bad[0])} is outside the vocabulary (0..{cfg.vocab_size - 1})",
            hint="check --tokens against the model's tokenizer",
        )
    if ids.size > cfg.max_position_embeddings:
        raise ValidationError(
            f"the prompt has {ids.size} tokens, longer than the model's context "
            f"({cfg.max_position_embeddings})"
        )
    return ids


def run_layers(
    model: Model,
    ids: np.ndarray,
    positions: np.ndarray,
    emit: Emit,
    progress: Progress | None = None,
    cache: KVCache | None = None,
    wants: Wants = wants_everything,
) -> np.ndarray:
    """Embedding, every decoder layer, final norm and logits for the rows ``ids`` at
    ``positions`` (a prompt from 0, or decode rows after what ``cache`` holds).

    ``wants(stage, layer)`` says which captures the caller uses: a stage it does not want
    may be skipped (and then not emitted) where that saves work, e.g. the attention maps.
    """
    cfg = model.config
    arch = architecture_of(cfg)
    ctx = PassContext(model, np.asarray(positions, dtype=np.int64), cache, wants)
    with (
        np.errstate(all="ignore"),
        one_blas_thread(len(ids) <= SHORT_PROMPT),
        model.layer_buffers(),
    ):
        hidden = arch.embed(model, ids)
        emit(Stage.EMBEDDING, 0, hidden)

        layer_emit = passing(emit)
        for layer in range(cfg.num_layers):
            weights = arch.load_layer(model, layer)
            hidden = arch.layer(cfg, weights, hidden, layer, ctx, layer_emit)
            del weights
            if progress is not None:
                progress(layer + 1, cfg.num_layers)

        final = arch.final_norm(model, hidden)
        emit(Stage.FINAL_NORM, None, final)
        logits = arch.logits(model, final[-1], LM_HEAD_CHUNK)
        emit(Stage.LM_HEAD, None, logits)
    return logits


def forward(
    model: Model,
    token_ids: list[int],
    emit: Emit | None = None,
    progress: Progress | None = None,
    wants: Wants | None = None,
) -> np.ndarray:
    """Run one forward pass over ``token_ids``; return the logits of the last position.

    ``emit(stage, layer, buffer)`` receives every capture point (``layer`` is None for the
    whole-model stages ``final_norm`` and ``lm_head``; ``embedding`` comes as layer 0).
    ``wants(stage, layer)`` narrows that to what the caller uses, so stages nobody wants
    (the ``[heads, seq, seq]`` attention maps) need not be built: by default every stage
    when ``emit`` is given, none without it. ``progress(done, total)`` is called after each
    layer.
    """
    cfg = model.config
    ids = check_token_ids(cfg, token_ids)
    if cfg.num_layers <= 0:
        raise InferenceError("the model has zero layers; there is nothing to trace")
    if wants is None:
        wants = wants_everything if emit is not None else wants_nothing
    return run_layers(model, ids, np.arange(ids.size), emit or no_emit, progress, wants=wants)


__all__ = [
    "Emit",
    "LM_HEAD_CHUNK",
    "Progress",
    "Wants",
    "check_token_ids",
    "forward",
    "run_layers",
]
