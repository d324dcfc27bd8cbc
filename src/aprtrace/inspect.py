"""``aprtrace inspect``: describe an APRT file, a dump directory or a model file."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from aprtrace.aprt import read_aprt
from aprtrace.console import stdout_console
from aprtrace.diff import layer_label
from aprtrace.errors import AprtraceError, NotFoundError
from aprtrace.formats import APRT, sniff_format
from aprtrace.stages import Stage, stage_from_file_stem
from aprtrace.trace import MANIFEST_NAME, stage_stats


def _file_row(path: Path, root: Path | None = None) -> dict:
    f = read_aprt(path)
    stage = stage_from_file_stem(path.stem)
    stats = stage_stats(stage or Stage.EMBEDDING, None, f.values)
    return {
        "path": str(path.relative_to(root)) if root else str(path),
        "stage": stage.value if stage else None,
        "layer": layer_label(f.layer),
        "dim_product": int(f.values.size),
        "bytes": path.stat().st_size,
        "mean": stats.mean,
        "std": stats.std,
        "min": stats.min,
        "max": stats.max,
        "nan": stats.nan,
        "inf": stats.inf,
    }


def _natural_key(name: str) -> list:
    """Sort ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.5g}" if isinstance(v, float) else str(v))


def inspect_path(path: Path, as_json: bool, verify: bool = True, arch: str | None = None) -> None:
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"file not found: {path}")
    if path.is_dir() and not (path / "config.json").exists():
        _inspect_dump(path, as_json)
        return
    if sniff_format(path) == APRT:
        row = _file_row(path)
        row["shape"] = _shape_from_manifest(path)
        if as_json:
            click.echo(json.dumps(row, indent=2))
            return
        for k, v in row.items():
            click.echo(f"{k:>12}: {_fmt(v)}")
        return
    _inspect_model(path, as_json, verify, arch)


def _shape_from_manifest(path: Path) -> list[int] | None:
    """The file's shape as recorded by the manifest of the dump it sits in, if any."""
    from aprtrace.manifest import read_manifest

    for root in (path.parent, path.parent.parent):
        if (root / MANIFEST_NAME).is_file():
            try:
                manifest = read_manifest(root)
            except AprtraceError:
                return None
            shape = manifest.shape_of(path.relative_to(root).as_posix()) if manifest else None
            return list(shape) if shape is not None else None
    return None


def _inspect_dump(root: Path, as_json: bool) -> None:
    from aprtrace.diff import load_dump

    # The same discovery as diff: with a manifest, exactly the files it lists.
    dump = load_dump(root, "dump")
    files = sorted(dump.files.values(), key=lambda k: k.sort_key())
    rows = [_file_row(root / k.rel, root) for k in files]
    has_manifest = dump.manifest is not None
    if as_json:
        doc = {
            "dir": str(root),
            "manifest": has_manifest,
            "files": rows,
            "stale": dump.stale,
            "missing": dump.missing,
            "unreadable": dump.unreadable,
        }
        click.echo(json.dumps(doc, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{root} ({len(rows)} stage files)")
    for col in ("file", "layer", "values", "mean", "std", "min", "max", "NaN", "Inf"):
        table.add_column(col, justify="left" if col == "file" else "right")
    for r in rows:
        table.add_row(
            r["path"],
            str(r["layer"]),
            str(r["dim_product"]),
            _fmt(r["mean"]),
            _fmt(r["std"]),
            _fmt(r["min"]),
            _fmt(r["max"]),
            str(r["nan"]),
            str(r["inf"]),
        )
    stdout_console().print(table)
    for what, rels in (
        ("stale (not in manifest.json, not shown)", dump.stale),
        ("listed in manifest.json but missing", dump.missing),
        ("unreadable", dump.unreadable),
    ):
        if rels:
            shown = ", ".join(rels[:5]) + (" ..." if len(rels) > 5 else "")
            click.echo(f"warning: {len(rels)} file(s) {what}: {shown}", err=True)
    if not has_manifest:
        click.echo(
            "note: no manifest.json: the dump is incomplete (interrupted run) or was "
            "written by apr",
            err=True,
        )


def _inspect_model(path: Path, as_json: bool, verify: bool, arch: str | None) -> None:
    from aprtrace.formats import load_model

    model = load_model(path, verify=verify, arch=arch)
    tensors = [
        {"name": t.name, "type": t.qtype, "shape": list(t.shape)}
        for t in sorted(model.tensors.values(), key=lambda t: _natural_key(t.name))
    ]
    info = {
        "path": str(path),
        "format": model.format,
        "config": model.config.to_dict(),
        "qk_rows_permuted": model.qk_permuted,
        "tokenizer": model.tokenizer is not None,
        "tensor_count": len(tensors),
        "parameters": int(sum(int(np.prod(t["shape"])) for t in tensors)),
        "tensors": tensors,
    }
    if model.format == "apr":
        from aprtrace.formats.apr import describe_apr

        info["apr"] = describe_apr(path, verify=verify)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    click.echo(f"{path}: {model.format}, {model.config.architecture}")
    if "apr" in info:
        header = info["apr"]["header"]
        click.echo(
            f"  APR v{header['version']}, flags {header['flags']:#06x} "
            f"({', '.join(header['flag_names']) or 'none'}), "
            f"{header['tensor_count']} index entries, checksum {header['checksum']}"
        )
        click.echo("  metadata:")
        for key, value in info["apr"]["metadata"].items():
            click.echo(f"    {key:<28} {json.dumps(value, default=str)[:90]}")
        click.echo("  config as read:")
    for k, v in model.config.to_dict().items():
        click.echo(f"  {k:<24} {v}")
    click.echo(f"  tokenizer                {'yes' if info['tokenizer'] else 'no'}")
    click.echo(f"  parameters               {info['parameters']:,}")
    click.echo(f"  tensors                  {len(tensors)} (as the forward pass sees them)")
    for t in tensors:
        click.echo(f"    {t['name']:<52} {t['type']:<6} {t['shape']}")
