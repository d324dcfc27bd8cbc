"""The behaviour contract stays in step with the code and names only tests that exist."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

from aprtrace import aprt, errors
from aprtrace.stages import ALIASES, WHOLE_MODEL_LAYER, Stage

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT / "contracts" / "aprtrace-save-tensor-v1.yaml"
REQUIRED_INVARIANTS = {
    "cli_signature",
    "byte_format",
    "path_layout",
    "determinism",
    "nan_preservation",
    "plan_errors_before_load",
    "diff_compatibility",
    "atomic_writes",
}
_NODE = re.compile(r"^(tests/[\w/]+\.py)::(?:(\w+)::)?(\w+)(\[.*\])?$")


def load_contract() -> dict:
    with open(CONTRACT, encoding="utf-8") as f:
        return yaml.safe_load(f)


@cache
def _tests_in(path: Path) -> frozenset[str]:
    """``name`` and ``Class::name`` of every test function in a file, found with ``ast``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, funcs) and node.name.startswith("test"):
            found.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            for item in node.body:
                if isinstance(item, funcs) and item.name.startswith("test"):
                    found.add(f"{node.name}::{item.name}")
    return frozenset(found)


def missing_reason(node_id: str, root: Path = ROOT) -> str | None:
    """Why ``node_id`` does not name an existing test, or None when it does."""
    match = _NODE.match(node_id)
    if not match:
        return f"'{node_id}' is not of the form tests/<file>.py::[<Class>::]<test>[<param>]"
    rel, cls, name, _param = match.groups()
    path = root / rel
    if not path.is_file():
        return f"{rel} does not exist"
    key = f"{cls}::{name}" if cls else name
    if key not in _tests_in(path):
        return f"{rel} has no test {key}"
    return None


def _all_node_ids() -> list[str]:
    ids: list[str] = []
    for inv in load_contract().get("invariants") or []:
        for node in inv.get("falsification") or []:
            if node not in ids:
                ids.append(node)
    return ids


def test_contract_structure() -> None:
    contract = load_contract()
    meta = contract["metadata"]
    assert meta["id"] == CONTRACT.stem
    for key in ("kind", "version", "status", "description", "references"):
        assert meta.get(key), f"metadata.{key} is missing"
    invariants = contract["invariants"]
    assert isinstance(invariants, list) and invariants
    ids = [inv.get("id") for inv in invariants]
    assert len(ids) == len(set(ids)), f"duplicate invariant ids: {ids}"
    for inv in invariants:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", str(inv.get("id"))), inv
        assert isinstance(inv.get("statement"), str) and inv["statement"].strip(), inv["id"]
        nodes = inv.get("falsification")
        assert isinstance(nodes, list) and nodes, f"{inv['id']} names no falsification test"
        assert all(isinstance(n, str) for n in nodes), inv["id"]
        assert len(nodes) == len(set(nodes)), f"{inv['id']} lists a test twice"
    assert REQUIRED_INVARIANTS <= set(ids), REQUIRED_INVARIANTS - set(ids)


@pytest.mark.parametrize("node_id", _all_node_ids())
def test_named_falsification_test_exists(node_id: str) -> None:
    reason = missing_reason(node_id)
    assert reason is None, reason


def test_checker_rejects_what_does_not_exist(tmp_path: Path) -> None:
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_x.py").write_text(
        "def test_a():\n    pass\n\n"
        "def helper():\n    pass\n\n"
        "class TestB:\n    def test_c(self):\n        pass\n"
    )
    assert missing_reason("tests/test_x.py::test_a", tmp_path) is None
    assert missing_reason("tests/test_x.py::test_a[1-2]", tmp_path) is None
    assert missing_reason("tests/test_x.py::TestB::test_c", tmp_path) is None
    assert "has no test" in missing_reason("tests/test_x.py::test_missing", tmp_path)
    assert "has no test" in missing_reason("tests/test_x.py::helper", tmp_path)
    assert "has no test" in missing_reason("tests/test_x.py::test_c", tmp_path)
    assert "does not exist" in missing_reason("tests/test_y.py::test_a", tmp_path)
    assert "not of the form" in missing_reason("test_x.py::test_a", tmp_path)
    assert "not of the form" in missing_reason("tests/test_x.py", tmp_path)


def test_contract_stage_facts_match_code() -> None:
    contract = load_contract()
    assert contract["stages"] == [s.value for s in Stage]
    assert contract["whole_model_stages"] == [s.value for s in Stage if not s.per_layer]
    assert contract["aliases"] == {k: v.value for k, v in ALIASES.items()}


def test_contract_byte_format_matches_code() -> None:
    fmt = load_contract()["byte_format"]
    assert fmt["magic"].encode() == aprt.MAGIC
    assert fmt["header_bytes"] == aprt.HEADER_SIZE == fmt["body_offset"]
    assert fmt["whole_model_layer"] == WHOLE_MODEL_LAYER
    # Offsets against the header the code packs (layer 0x04030201, count 0x08070605).
    header = aprt.encode_header(0x04030201, 0x08070605)
    assert header[fmt["layer_offset"] : fmt["layer_offset"] + 4] == b"\x01\x02\x03\x04"
    assert header[fmt["dim_product_offset"] : fmt["dim_product_offset"] + 4] == b"\x05\x06\x07\x08"


def test_contract_exit_codes_match_error_classes() -> None:
    for name, code in load_contract()["exit_codes"].items():
        cls = getattr(errors, name)
        assert issubclass(cls, errors.AprtraceError)
        assert cls.exit_code == code, name
