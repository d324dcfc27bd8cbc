"""Dump discovery and layout: which files a dump holds (the manifest is the truth), how
they pair, their shapes and named positions, and whether two dumps come from one run."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aprtrace.decode import step_of_path
from aprtrace.errors import (
    NotFoundError,
    ValidationError,
)
from aprtrace.manifest import Manifest, read_manifest
from aprtrace.stages import (
    Stage,
    stage_from_file_stem,
    stage_shape,
)

_LAYER_DIR = re.compile(r"^layer-(\d+)$")

_STAGE_COUNT = len(Stage)


@dataclass(frozen=True)
class PairKey:
    """Identity of a stage file inside a dump, from its relative path."""

    rel: str  # posix relative path, e.g. "layer-0/attn_norm.bin"
    stage: str  # stage name (or the file stem when unknown)
    layer: int | None  # None for whole-model (top-level) files
    step: int = 0  # decode step (files under decode-k/); 0 = the prompt pass

    @property
    def rel_stem(self) -> str:
        return self.rel[: -len(".bin")] if self.rel.endswith(".bin") else self.rel

    @property
    def step_stem(self) -> str:
        """``rel_stem`` inside its step (``decode-2/layer-3/x`` -> ``layer-3/x``), for --tol."""
        return step_of_path(self.rel_stem)[1]

    def sort_key(self) -> tuple:
        known = stage_from_file_stem(self.stage)
        order = known.order if known is not None else _STAGE_COUNT
        if self.layer is None:
            return (self.step, 1, 0, order, self.rel)
        return (self.step, 0, self.layer, order, self.rel)

    @property
    def label(self) -> str:
        where = self.stage if self.layer is None else f"layer {self.layer} {self.stage}"
        return f"step {self.step} {where}" if self.step else where


def key_for(rel: str) -> PairKey:
    step, inner = step_of_path(rel)
    if step:
        key = key_for(inner)
        return PairKey(rel, key.stage, key.layer, step)
    parts = rel.split("/")
    stem = parts[-1][: -len(".bin")]
    known = stage_from_file_stem(stem)
    stage = known.value if known is not None else stem
    layer = None
    if len(parts) == 2:
        m = _LAYER_DIR.match(parts[0])
        if m:
            layer = int(m.group(1))
    return PairKey(rel, stage, layer)


def scan_dump(dump: Path) -> tuple[dict[str, PairKey], list[str]]:
    """Every ``*.bin`` under ``dump`` (hidden temp files skipped), by relative posix path,
    and the directories that could not be listed (relative paths; ``.`` for ``dump``)."""
    dump = Path(dump)
    out: dict[str, PairKey] = {}
    unreadable: list[str] = []

    def failed(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename else dump
        try:
            rel = where.relative_to(dump).as_posix()
        except ValueError:
            rel = str(where)
        unreadable.append(rel or ".")

    for root, dirs, names in os.walk(dump, onerror=failed):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        base = Path(root)
        for name in sorted(names):
            if name.startswith(".") or not name.endswith(".bin"):
                continue
            path = base / name
            if not path.is_file():
                continue
            rel = path.relative_to(dump).as_posix()
            out[rel] = key_for(rel)
    return dict(sorted(out.items())), sorted(unreadable)


def list_stage_files(dump: Path) -> dict[str, PairKey]:
    """Every ``*.bin`` under ``dump`` (hidden temp files skipped), by relative posix path."""
    return scan_dump(dump)[0]


@dataclass
class DumpInfo:
    """One side of a directory diff.

    With a manifest, ``files`` are exactly the files it lists (that exist); other ``.bin``
    files under the directory are ``stale`` and ignored unless the caller includes them.
    Without one (an ``apr`` dump), ``files`` are all ``.bin`` files found.
    """

    path: Path
    manifest: Manifest | None
    files: dict[str, PairKey]
    stale: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # listed in the manifest, not on disk
    unreadable: list[str] = field(default_factory=list)  # listed or found, but not readable


def _spec_of(stem: str):
    stage = stage_from_file_stem(stem)
    return stage.spec if stage is not None else None


@dataclass(frozen=True)
class Position:
    """Named coordinates of one element: ``(("token", 0), ("channel", 121))``."""

    coords: tuple[tuple[str, int], ...]

    @property
    def text(self) -> str:
        """'token 0, channel 121'; unnamed coordinates as '[1, 2, 3]'."""
        if all(name for name, _ in self.coords):
            return ", ".join(f"{name} {value}" for name, value in self.coords)
        return "[" + ", ".join(str(value) for _, value in self.coords) + "]"

    @property
    def short(self) -> str:
        """'t0 c121' (see POSITION_SHORT_NAMES)."""
        if not all(name for name, _ in self.coords):
            return self.text
        return " ".join(f"{POSITION_SHORT_NAMES[name]}{value}" for name, value in self.coords)


POSITION_SHORT_NAMES = {"token": "t", "channel": "c", "head": "h", "query": "q", "key": "k"}

POSITION_SHORT_NAMES["vocab id"] = "id "


def position_of(stage: str, shape: tuple[int, ...], index: int) -> Position | None:
    """Flat index -> named coordinates; None when the shape does not cover the index."""
    total = int(np.prod(shape)) if shape else 0
    if not shape or index >= total:
        return None
    c = [int(x) for x in np.unravel_index(index, shape)]
    spec = _spec_of(stage)
    if spec is not None and spec.attention_map and len(shape) == 3:
        names: tuple[str, ...] = ("head", "query", "key")
    elif len(shape) == 2:
        names = ("token", "channel")
    elif stage == Stage.LM_HEAD.value and len(shape) == 1:
        names = ("vocab id",)
    else:
        names = ("",) * len(c)
    return Position(tuple(zip(names, c, strict=True)))


def decode_position(stage: str, shape: tuple[int, ...], index: int) -> str | None:
    """Flat index -> 'token 0, channel 121'; None when the shape does not cover the index."""
    pos = position_of(stage, shape, index)
    return pos.text if pos is not None else None


def infer_shape(key: PairKey, count: int, manifests: list[Manifest]) -> tuple[int, ...] | None:
    """Shape from either manifest, else from the stage graph and a manifest's config and
    sequence length, else from the sequence length alone."""
    for m in manifests:
        shape = m.shape_of(key.rel)
        if shape is not None and int(np.prod(shape)) == count:
            return tuple(shape)
    stage = stage_from_file_stem(key.stage)
    if stage is not None and len(stage.spec.shape_dims) == 1:
        return (count,)
    for m in manifests:
        seq, keys = len(m.token_ids), None
        if key.step:  # a decode step: one new row attending every position up to its own
            at = [s.get("position") for s in m.decode_steps if s.get("step") == key.step]
            if not at or not isinstance(at[0], int):
                continue
            seq, keys = 1, at[0] + 1
        if seq <= 0:
            continue
        cfg = _config_view(m.config)
        if stage is not None and cfg is not None:
            try:
                shape = stage_shape(stage, cfg, seq, keys)
            except (AttributeError, TypeError):
                shape = None
            if shape is not None and int(np.prod(shape)) == count:
                return shape
        if stage is not None and stage.spec.attention_map:
            width = seq if keys is None else keys
            heads = count // (seq * width)
            if heads * seq * width == count:
                return (heads, seq, width)
        elif count % seq == 0:
            return (seq, count // seq)
    return None


def _check_dir(path: Path, side: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{side}: {path} does not exist")
    return path


def _config_view(config: dict | None):
    """A manifest's config as the attribute view the stage graph's predicates read."""
    if not config or "architecture" not in config:
        return None
    from types import SimpleNamespace

    return SimpleNamespace(**config)


def load_dump(path: Path, side: str, include_stale: bool = False) -> DumpInfo:
    """Discover one dump. With a manifest, the files it lists are the dump (see DumpInfo)."""
    path = _check_dir(path, side)
    if not path.is_dir():
        raise ValidationError(f"{side}: {path} is not a directory")
    found, unreadable = scan_dump(path)
    manifest = read_manifest(path)
    if manifest is None:
        return DumpInfo(path, None, found, unreadable=unreadable)
    listed = [f.path for f in manifest.files]
    listed_set = set(listed)
    missing = []
    for rel in listed:
        if rel in found:
            continue
        try:
            (path / rel).stat()
        except FileNotFoundError:
            missing.append(rel)
            continue
        except OSError:
            pass
        unreadable.append(rel)  # it exists, but its directory could not be listed
    stale = [rel for rel in found if rel not in listed_set]
    files = found if include_stale else {r: k for r, k in found.items() if r in listed_set}
    return DumpInfo(path, manifest, files, stale, missing, sorted(set(unreadable)))


# Config keys that decide every stage's shape: two dumps differing in one are different models.
SHAPE_KEYS = (
    "architecture",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
)


def config_difference(a: dict | None, b: dict | None) -> str | None:
    """The first shape-deciding config key on which ``a`` and ``b`` differ, as text."""
    if not a or not b:
        return None
    for key in SHAPE_KEYS:
        if key in a and key in b and a[key] != b[key]:
            return f"{key} {a[key]} vs {b[key]}"
    return None


def _ids_text(ids) -> str:
    ids = list(ids)
    return str(ids) if len(ids) <= 12 else f"[{', '.join(map(str, ids[:12]))}, ...] ({len(ids)})"


def check_same_run(a: DumpInfo, b: DumpInfo) -> None:
    """Refuse, before any pair is read, two dumps whose manifests show different model
    shapes, token ids or prompts: every pair would be incomparable or meaningless."""
    ma, mb = a.manifest, b.manifest
    if ma is None or mb is None:
        return
    differs = config_difference(ma.config, mb.config)
    if differs is not None:
        why = f"A and B are different models ({differs})"
    elif ma.token_ids != mb.token_ids:
        why = (
            f"A and B were traced on different token ids (A {_ids_text(ma.token_ids)}, "
            f"B {_ids_text(mb.token_ids)})"
        )
    elif ma.prompt is not None and mb.prompt is not None and ma.prompt != mb.prompt:
        why = f"A and B were traced on different prompts ({ma.prompt!r} vs {mb.prompt!r})"
    else:
        return
    raise ValidationError(
        f"{why}, so their stages cannot be compared position by position",
        hint="trace both on the same model shape and --tokens (aprtrace compare does this)",
    )


def not_captured(dump: DumpInfo) -> set[str]:
    """Stages the dump's engine does not compute (manifest ``not_captured``)."""
    skipped = dump.manifest.raw.get("not_captured") if dump.manifest is not None else None
    return {str(s) for s in skipped} if isinstance(skipped, list) else set()


def dump_warnings(a: DumpInfo, b: DumpInfo) -> list[str]:
    """Loud warnings: missing manifests, stale files left out."""
    out = []
    for side, dump in (("A", a), ("B", b)):
        if dump.manifest is None:
            out.append(
                f"{side} ({dump.path}): no manifest.json: the dump may be incomplete or "
                "written by apr; shapes are inferred where possible"
            )
        # An engine that does not compute some stages says so (llama.cpp: ffn_silu).
        skipped = not_captured(dump)
        if skipped:
            engine = dump.manifest.raw.get("engine", "this engine") if dump.manifest else ""
            out.append(
                f"{side} ({dump.path}): {engine} does not compute "
                f"{', '.join(sorted(skipped))}: not in {side}, not compared"
            )
        if dump.stale:
            out.append(
                f"{side} ({dump.path}): {len(dump.stale)} .bin file(s) not listed in "
                f"manifest.json (stale, e.g. {dump.stale[0]}) are ignored; --include-stale "
                "compares them too"
            )
    ma, mb = a.manifest, b.manifest
    if ma is not None and mb is not None:
        fed_a = [s.get("token") for s in ma.decode_steps]
        fed_b = [s.get("token") for s in mb.decode_steps]
        n = min(len(fed_a), len(fed_b))
        k = next((i for i in range(n) if fed_a[i] != fed_b[i]), None)
        if k is not None:
            out.append(
                f"A and B were fed DIFFERENT tokens from decode step {k + 1} on "
                f"(A {fed_a[k]}, B {fed_b[k]}): later steps are not comparable; trace B with "
                "--decode-tokens set to A's tokens (as `aprtrace compare --decode` does)"
            )
    return out
