"""SavePlan: what ``trace --save-tensor`` writes, validated before any model is loaded."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from aprtrace.errors import ValidationError
from aprtrace.stages import WHOLE_MODEL_LAYER, Stage, parse_stage_list

DEFAULT_LAYERS = "0..1"
# ASCII digits only: `\d` would also accept other scripts' digits (e.g. Arabic-Indic).
# As apr (u32::from_str after trimming each side of `..`): blanks around a bound and a leading
# '+' are accepted.
_RANGE = re.compile(r"^\+?([0-9]+)\s*\.\.\s*\+?([0-9]+)$")
_SINGLE = re.compile(r"^\+?([0-9]+)$")
# A layer index must fit the APRT header's u32 and stay below the whole-model marker; in
# practice no model has anywhere near this many layers, and a lower bound keeps a spec such as
# `0..4000000000` from materialising billions of indices before the model is even loaded.
_MAX_LAYER = min(WHOLE_MODEL_LAYER - 1, 65535)


@dataclass(frozen=True)
class LayerSelection:
    """Selected layer indices; ``every`` means all layers of whatever model is loaded."""

    layers: frozenset[int] = frozenset()
    every: bool = False
    spec: str = DEFAULT_LAYERS

    def __contains__(self, layer: int) -> bool:
        return self.every or layer in self.layers

    def resolve(self, num_layers: int) -> tuple[int, ...]:
        """The sorted layers for a model with ``num_layers`` layers; out-of-range is an error."""
        if self.every:
            return tuple(range(num_layers))
        too_big = sorted(x for x in self.layers if x >= num_layers)
        if too_big:
            raise ValidationError(
                f"--save-tensor-layers '{self.spec}' selects layer {too_big[0]}, "
                f"but the model has {num_layers} layers (0..{num_layers})",
                hint=f"use layers below {num_layers}, or 'all'",
            )
        return tuple(sorted(self.layers))


def _layer_error(spec: str, why: str, flag: str = "--save-tensor-layers") -> ValidationError:
    return ValidationError(
        f"invalid {flag} '{spec}': {why}",
        hint="expected START..END (end exclusive, e.g. 0..4), a layer (3), a list (0,3,5), "
        "a mix (0..4,10) or 'all'",
    )


def _layer_number(spec: str, digits: str, flag: str = "--save-tensor-layers") -> int:
    # Guard int(): Python refuses to convert strings of more than 4300 digits (ValueError).
    if len(digits.lstrip("0")) > len(str(_MAX_LAYER)) + 1:
        raise _layer_error(
            spec, f"layer {digits[:12]}... is too large (at most {_MAX_LAYER})", flag
        )
    return int(digits)


def parse_layers(spec: str, flag: str = "--save-tensor-layers") -> LayerSelection:
    """Parse ``--save-tensor-layers``: ``START..END`` (end exclusive), ``N``, lists, ``all``.

    ``flag`` names the option in error messages (``diff --steps`` shares the syntax)."""
    text = spec.strip()
    if text.lower() == "all":
        return LayerSelection(every=True, spec=text)
    if not text:
        raise _layer_error(spec, "empty layer range", flag)
    layers: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise _layer_error(spec, "empty item", flag)
        match = _RANGE.match(item)
        if match:
            start, end = (
                _layer_number(spec, match.group(1), flag),
                _layer_number(spec, match.group(2), flag),
            )
            if end <= start:
                raise _layer_error(
                    spec, f"range {item} is empty (end is exclusive and must be > start)", flag
                )
            if end - 1 > _MAX_LAYER:
                raise _layer_error(
                    spec, f"layer {end - 1} is too large (at most {_MAX_LAYER})", flag
                )
            layers.update(range(start, end))
        elif _SINGLE.match(item):
            value = _layer_number(spec, item.lstrip("+"), flag)
            if value > _MAX_LAYER:
                raise _layer_error(spec, f"layer {value} is too large (at most {_MAX_LAYER})", flag)
            layers.add(value)
        elif item.startswith("-"):
            raise _layer_error(spec, f"'{item}' is negative; layers count from 0", flag)
        else:
            raise _layer_error(spec, f"cannot read '{item}'", flag)
    return LayerSelection(layers=frozenset(layers), spec=text)


@dataclass(frozen=True)
class SavePlan:
    """Which stages and layers to write, and where."""

    stages: frozenset[Stage]
    layers: LayerSelection
    out_dir: Path

    def wants(self, stage: Stage, layer: int | None) -> bool:
        """True when ``stage`` at ``layer`` (None for whole-model stages) is to be written."""
        if stage not in self.stages:
            return False
        if not stage.per_layer:
            return True
        return layer is not None and layer in self.layers

    def path_for(self, stage: Stage, layer: int | None) -> Path:
        """``<dir>/layer-N/<stage>.bin`` or ``<dir>/<stage>.bin`` (FORMATS.md section 3)."""
        if stage.per_layer:
            return self.out_dir / f"layer-{layer}" / f"{stage.value}.bin"
        return self.out_dir / f"{stage.value}.bin"


def default_out_dir(model_path: Path, suffix: str = "") -> Path:
    """``<parent>/<model-stem>-trace`` as ``apr`` does (``suffix`` is appended for other
    engines, so a reference dump never overwrites aprtrace's own)."""
    model_path = Path(model_path)
    stem = model_path.name if model_path.is_dir() else model_path.stem
    return model_path.parent / f"{stem}-trace{suffix}"


def make_plan(
    stages_spec: str,
    layers_spec: str | None,
    out_dir: Path | None,
    model_path: Path,
    dir_suffix: str = "",
) -> SavePlan:
    """Build a SavePlan from CLI strings; every error here is raised before loading."""
    stages = parse_stage_list(stages_spec)
    layers = parse_layers(layers_spec if layers_spec is not None else DEFAULT_LAYERS)
    return SavePlan(
        stages=frozenset(stages),
        layers=layers,
        out_dir=Path(out_dir) if out_dir is not None else default_out_dir(model_path, dir_suffix),
    )


# Above this many bytes a dump needs --allow-large (attention maps grow as heads x seq^2).
LARGE_DUMP_BYTES = 2 << 30


def estimate_dump_bytes(plan: SavePlan, cfg, seq: int) -> int:
    """Bytes ``plan`` will write for a model with config ``cfg`` on ``seq`` tokens.

    From the stage graph's shapes: 12-byte header + 4 bytes per value per file, plus a
    small allowance for the manifest.
    """
    from aprtrace.stages import stage_shape, stages_for

    layers = plan.layers.resolve(cfg.num_layers)
    total = files = 0
    for stage in stages_for(cfg):
        if stage not in plan.stages:
            continue
        values = 1
        for dim in stage_shape(stage, cfg, seq):
            values *= dim
        if not stage.per_layer:
            count = 1
        elif stage is Stage.EMBEDDING:
            count = 1 if 0 in layers else 0
        else:
            count = len(layers)
        total += count * (12 + 4 * values)
        files += count
    return total + 150 * files + 4096  # manifest.json: one entry per file, plus the config


def free_bytes(directory: Path) -> int | None:
    """Free space on the file system that would hold ``directory`` (None if unknown)."""
    import shutil

    probe = Path(directory).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_dump_size(plan: SavePlan, cfg, seq: int, allow_large: bool) -> int:
    """Refuse (before the forward pass) a dump above LARGE_DUMP_BYTES or the free space,
    unless ``allow_large``. Returns the estimate."""
    size = estimate_dump_bytes(plan, cfg, seq)
    if allow_large:
        return size
    free = free_bytes(plan.out_dir)
    if free is not None and size > free:
        raise ValidationError(
            f"the dump would take about {human_bytes(size)}, more than the "
            f"{human_bytes(free)} free for {plan.out_dir}",
            hint="select fewer stages or layers (attention maps grow as heads x tokens^2), "
            "a shorter prompt or another --save-tensor-dir; --allow-large tries anyway",
        )
    if size > LARGE_DUMP_BYTES:
        raise ValidationError(
            f"the dump would take about {human_bytes(size)} (over "
            f"{human_bytes(LARGE_DUMP_BYTES)}) in {plan.out_dir}",
            hint="pass --allow-large to write it anyway, or select fewer stages or layers "
            "(attention maps grow as heads x tokens^2) or a shorter prompt",
        )
    return size
