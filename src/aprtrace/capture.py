"""``maybe_save_stage``: the single gate every capture point of the forward pass calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aprtrace.aprt import write_aprt
from aprtrace.errors import InferenceError, OutputError
from aprtrace.plan import SavePlan
from aprtrace.stages import WHOLE_MODEL_LAYER, Stage


@dataclass
class WrittenFile:
    stage: Stage
    layer: int | None
    path: Path
    size: int
    shape: tuple[int, ...]


@dataclass
class CaptureLog:
    """What a run wrote, in write order (the manifest and the CLI listing come from this)."""

    files: list[WrittenFile] = field(default_factory=list)


def maybe_save_stage(
    plan: SavePlan | None,
    stage: Stage,
    layer: int | None,
    values: np.ndarray,
    log: CaptureLog | None = None,
) -> Path | None:
    """Write ``values`` as the APRT file of ``stage``/``layer`` when ``plan`` selects it.

    ``layer`` is the block index for per-layer stages and ignored for whole-model stages.
    A cheap no-op (returns None) when ``plan`` is None or does not select this capture.
    """
    if plan is None or not plan.wants(stage, layer):
        return None
    path = plan.path_for(stage, layer)
    header_layer = layer if stage.per_layer else WHOLE_MODEL_LAYER
    try:
        size = write_aprt(path, header_layer, values)
    except OutputError as exc:
        # apr reports a failed stage write as an inference failure (exit 8).
        raise InferenceError(str(exc.message), hint=exc.hint) from exc
    if log is not None:
        log.files.append(WrittenFile(stage, layer, path, size, tuple(np.shape(values))))
    return path
