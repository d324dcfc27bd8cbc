"""Error attribution from the stage graph: each stage against the stages it consumes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from aprtrace.diff.layout import PairKey, _config_view
from aprtrace.diff.results import PairResult
from aprtrace.stages import (
    Stage,
    computes,
    stage_from_file_stem,
    stage_inputs,
)


@dataclass
class _Inputs:
    """The pairs a stage consumes, and the operands that are not in the dump."""

    found: list[PairResult]
    missing: list[str]  # labels of operands the graph names but the dump does not hold
    unknown: bool = False  # an operand cannot be named (last layer of a model of unknown depth)


def _label(layer: int | None, stage: Stage) -> str:
    return stage.value if layer is None else f"layer {layer} {stage.value}"


def _consumed(
    key: PairKey,
    present: dict[tuple[int | None, str], PairResult],
    num_layers: int | None,
    config: dict | None,
) -> _Inputs | None:
    """The pairs whose outputs ``key``'s stage consumes, read from the stage graph.

    Alternatives (``qkv_bias`` else ``qkv_matmul``) are chosen by the model's config when a
    manifest gives it, else by what the dump holds. None for a stage the graph does not know.
    """
    stage = stage_from_file_stem(key.stage)
    if stage is None:
        return None
    cfg = _config_view(config)
    if cfg is not None:

        def has(s: Stage) -> bool:
            return computes(s, cfg)
    else:

        def has(s: Stage) -> bool:
            return any(st == s.value for (_, st) in present)

    inputs = _Inputs([], [])
    for operand in stage_inputs(stage, key.layer, has, num_layers):
        if operand is None:
            inputs.unknown = True
            continue
        layer, source = operand
        pair = present.get((layer, source.value))
        if pair is not None:
            inputs.found.append(pair)
        else:
            inputs.missing.append(_label(layer, source))
    return inputs


def attribute(
    pairs: list[PairResult], num_layers: int | None = None, config: dict | None = None
) -> None:
    """Set ``attribution`` = rel_l2(stage) / rel_l2(consumed stage) where both are known.

    The consumed stages come from the stage graph, never from which layers a dump happens to
    hold: when one is not in the dump, ``input_note`` says so and there is no ratio. Without
    ``num_layers`` (an ``apr`` dump has no manifest) ``final_norm``'s input is unknown.
    inf when the stage creates error from an identical input; None when unknown.
    """
    present = {(p.key.layer, p.key.stage): p for p in pairs if p.stats is not None}
    for p in pairs:
        if p.stats is None or p.stats.rel_l2 is None:
            continue
        inputs = _consumed(p.key, present, num_layers, config)
        if inputs is None or (not inputs.found and not inputs.missing and not inputs.unknown):
            continue  # an unknown stage, or one with no inputs (embedding)
        if inputs.missing:
            p.input_note = f"its input {inputs.missing[0]} is not in the dump"
            continue
        if inputs.unknown:
            p.input_note = (
                "its input (the last layer's output) is unknown: no manifest gives the "
                "number of layers"
            )
            continue
        usable = [q for q in inputs.found if q.stats is not None and q.stats.rel_l2 is not None]
        if len(usable) < len(inputs.found):
            continue
        pred = max(usable, key=lambda q: q.stats.rel_l2)  # type: ignore[union-attr,return-value]
        p.predecessor = pred.key.label
        own, inherited = p.stats.rel_l2, pred.stats.rel_l2  # type: ignore[union-attr]
        if not (math.isfinite(own) and math.isfinite(inherited)):
            continue
        if inherited == 0:
            p.attribution = math.inf if own > 0 else None
        else:
            p.attribution = own / inherited
