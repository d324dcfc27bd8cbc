"""manifest.json: atomic write, strict read, shapes by relative path."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from aprtrace.capture import WrittenFile
from aprtrace.errors import InvalidFormatError
from aprtrace.manifest import (
    MANIFEST_NAME,
    SCHEMA,
    build_manifest_data,
    read_manifest,
    write_manifest,
)
from aprtrace.stages import Stage


def _doc(**over):
    doc = {
        "schema": SCHEMA,
        "tool": "aprtrace",
        "version": "0.1.0",
        "created": "2026-01-01T00:00:00+00:00",
        "model": {"path": "m.gguf", "size": 3, "sha256": "ab", "format": "gguf"},
        "architecture": "llama",
        "config": {"hidden_size": 4},
        "prompt": "What is 2+2?",
        "token_ids": [1, 2],
        "stages": ["attn_norm", "lm_head"],
        "layers": [0],
        "files": [
            {
                "path": "layer-0/attn_norm.bin",
                "stage": "attn_norm",
                "layer": 0,
                "shape": [2, 4],
                "bytes": 44,
            },
            {"path": "lm_head.bin", "stage": "lm_head", "layer": None, "shape": [9], "bytes": 48},
        ],
    }
    doc.update(over)
    return doc


def test_roundtrip_and_shapes(tmp_path):
    path = write_manifest(tmp_path, _doc())
    assert path == tmp_path / MANIFEST_NAME
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_NAME]  # no temp file left
    m = read_manifest(tmp_path)
    assert m is not None
    assert m.token_ids == (1, 2) and m.architecture == "llama" and m.prompt == "What is 2+2?"
    assert m.shape_of("layer-0/attn_norm.bin") == (2, 4)
    assert m.shape_of("lm_head.bin") == (9,)
    assert m.shape_of("layer-1/attn_norm.bin") is None
    assert m.file("lm_head.bin").layer is None
    assert json.loads(path.read_text())["schema"] == SCHEMA


def test_absent_manifest_is_none(tmp_path):
    assert read_manifest(tmp_path) is None


def test_rewrite_replaces_atomically(tmp_path):
    write_manifest(tmp_path, _doc(prompt="one"))
    write_manifest(tmp_path, _doc(prompt="two"))
    assert read_manifest(tmp_path).prompt == "two"
    assert len(list(tmp_path.iterdir())) == 1


def test_nan_is_refused_at_write(tmp_path):
    with pytest.raises(ValueError):
        write_manifest(tmp_path, _doc(config={"x": float("nan")}))
    assert not (tmp_path / MANIFEST_NAME).exists()


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{", "invalid JSON"),
        ("[]", "top level"),
        (json.dumps(_doc(schema="other")), "schema"),
        (json.dumps(_doc(files={})), "'files'"),
        (json.dumps(_doc(token_ids=[1, "2"])), "token_ids"),
        (json.dumps(_doc(token_ids=[True])), "token_ids"),
        (
            json.dumps(
                _doc(
                    files=[
                        {"path": "../x.bin", "stage": "a", "layer": 0, "shape": [1], "bytes": 16}
                    ]
                )
            ),
            "relative",
        ),
        (
            json.dumps(
                _doc(
                    files=[{"path": "x.bin", "stage": "a", "layer": -1, "shape": [1], "bytes": 16}]
                )
            ),
            "layer",
        ),
        (
            json.dumps(
                _doc(
                    files=[{"path": "x.bin", "stage": "a", "layer": 0, "shape": [-1], "bytes": 16}]
                )
            ),
            "negative",
        ),
        (json.dumps(_doc(prompt=3)), "prompt"),
    ],
)
def test_malformed_manifest(tmp_path, text, why):
    (tmp_path / MANIFEST_NAME).write_text(text)
    with pytest.raises(InvalidFormatError) as info:
        read_manifest(tmp_path)
    assert why in info.value.message and info.value.exit_code == 4


def test_non_utf8_manifest(tmp_path):
    (tmp_path / MANIFEST_NAME).write_bytes(b"\xff\xfe{}")
    with pytest.raises(InvalidFormatError, match="UTF-8"):
        read_manifest(tmp_path)


def test_build_manifest_data_from_capture_log(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF-ish bytes")
    out = tmp_path / "dump"
    files = [
        WrittenFile(Stage.ATTN_NORM, 0, out / "layer-0" / "attn_norm.bin", 44, (2, 4)),
        WrittenFile(Stage.LM_HEAD, None, out / "lm_head.bin", 48, (9,)),
    ]
    data = build_manifest_data(
        out_dir=out,
        model_path=model,
        model_format="gguf",
        architecture="llama",
        config={"hidden_size": 4},
        prompt=None,
        token_ids=np.array([5, 6]),
        stages=["attn_norm", "lm_head"],
        layers=[0],
        files=files,
    )
    assert data["model"]["sha256"] == hashlib.sha256(b"GGUF-ish bytes").hexdigest()
    assert data["model"]["size"] == 14 and data["token_ids"] == [5, 6]
    assert data["files"][0] == {
        "path": "layer-0/attn_norm.bin",
        "stage": "attn_norm",
        "layer": 0,
        "shape": [2, 4],
        "bytes": 44,
    }
    assert data["files"][1]["layer"] is None
    write_manifest(out, data)
    assert read_manifest(out).shape_of("lm_head.bin") == (9,)
