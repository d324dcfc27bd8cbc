"""SavePlan and ``--save-tensor-layers`` parsing (issue 2, FORMATS.md section 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aprtrace.errors import ValidationError
from aprtrace.plan import (
    DEFAULT_LAYERS,
    LayerSelection,
    SavePlan,
    default_out_dir,
    make_plan,
    parse_layers,
)
from aprtrace.stages import Stage


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0..1", {0}),
        ("0..4", {0, 1, 2, 3}),
        ("2..5", {2, 3, 4}),
        ("3", {3}),
        ("0", {0}),
        ("0,3,5", {0, 3, 5}),
        ("5,0,3,3", {0, 3, 5}),
        ("0..4,10", {0, 1, 2, 3, 10}),
        ("0..2,1..3", {0, 1, 2}),
        (" 0 , 3..5 ", {0, 3, 4}),
        ("007", {7}),
    ],
)
def test_layer_specs(spec: str, expected: set[int]) -> None:
    sel = parse_layers(spec)
    assert not sel.every
    assert set(sel.layers) == expected


def test_default_layers_are_zero_to_one() -> None:
    assert DEFAULT_LAYERS == "0..1"
    plan = make_plan("embedding", None, Path("out"), Path("m.gguf"))
    assert set(plan.layers.layers) == {0}
    assert 0 in plan.layers and 1 not in plan.layers


@pytest.mark.parametrize("spec", ["all", "ALL", " All "])
def test_all_layers(spec: str) -> None:
    sel = parse_layers(spec)
    assert sel.every
    assert 0 in sel and 12345 in sel
    assert sel.resolve(4) == (0, 1, 2, 3)


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("5..2", "is empty"),
        ("2..2", "is empty"),
        ("-1", "negative"),
        ("-1..3", "negative"),
        ("abc", "cannot read 'abc'"),
        ("1..", "cannot read '1..'"),
        ("..3", "cannot read"),
        ("1...3", "cannot read"),
        ("0..-1", "cannot read"),
        ("1.5", "cannot read"),
        ("1 2", "cannot read"),
        ("", "empty layer range"),
        ("   ", "empty layer range"),
        ("0,,1", "empty item"),
        (",", "empty item"),
        ("0..4,", "empty item"),
        (",3", "empty item"),
        ("\u0663", "cannot read"),  # ARABIC-INDIC DIGIT THREE: ASCII digits only
        ("70000", "too large"),
        ("0..4000000000", "too large"),  # must fail fast, not build a 4e9-element set
        pytest.param("9" * 5000, "too large", id="5000-digits"),  # beyond int()'s digit limit
    ],
)
def test_bad_layer_specs(spec: str, why: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_layers(spec)
    err = info.value
    assert err.exit_code == 5
    assert why in err.message
    assert err.message.startswith(f"invalid --save-tensor-layers '{spec[:20]}")
    assert "START..END" in (err.hint or "")


def test_resolve_sorts_layers_in_range() -> None:
    assert parse_layers("5,0..2").resolve(6) == (0, 1, 5)


def test_resolve_out_of_range_is_validation_error() -> None:
    sel = parse_layers("0..4,30")
    with pytest.raises(ValidationError) as info:
        sel.resolve(30)
    assert info.value.exit_code == 5
    assert "layer 30" in info.value.message and "30 layers" in info.value.message
    assert "'0..4,30'" in info.value.message


def test_resolve_boundary() -> None:
    sel = parse_layers("0..30")
    assert sel.resolve(30) == tuple(range(30))
    with pytest.raises(ValidationError, match="layer 29"):
        sel.resolve(29)


def test_layer_selection_membership() -> None:
    sel = LayerSelection(layers=frozenset({1, 4}))
    assert 1 in sel and 4 in sel and 0 not in sel


def _plan(stages: str, layers: str, out: Path) -> SavePlan:
    return make_plan(stages, layers, out, Path("model.gguf"))


def test_path_layout_per_layer_and_whole_model(tmp_path: Path) -> None:
    plan = _plan("all", "0..2", tmp_path)
    assert plan.path_for(Stage.FFN_GATE, 3) == tmp_path / "layer-3" / "ffn_gate.bin"
    assert plan.path_for(Stage.EMBEDDING, 0) == tmp_path / "layer-0" / "embedding.bin"
    assert plan.path_for(Stage.ATTN_OUT, 12) == tmp_path / "layer-12" / "attn_out.bin"
    assert plan.path_for(Stage.LM_HEAD, None) == tmp_path / "lm_head.bin"
    assert plan.path_for(Stage.FINAL_NORM, None) == tmp_path / "final_norm.bin"


def test_wants_filters_stage_and_layer(tmp_path: Path) -> None:
    plan = _plan("ffn_gate,lm_head", "1..3", tmp_path)
    assert plan.wants(Stage.FFN_GATE, 1) and plan.wants(Stage.FFN_GATE, 2)
    assert not plan.wants(Stage.FFN_GATE, 0)
    assert not plan.wants(Stage.FFN_GATE, 3)
    assert not plan.wants(Stage.FFN_GATE, None)
    assert not plan.wants(Stage.FFN_UP, 1)
    # The layer filter does not apply to whole-model stages.
    assert plan.wants(Stage.LM_HEAD, None)
    assert not plan.wants(Stage.FINAL_NORM, None)


def test_embedding_only_wanted_when_layer_zero_selected(tmp_path: Path) -> None:
    assert _plan("embedding", "0..1", tmp_path).wants(Stage.EMBEDDING, 0)
    assert not _plan("embedding", "1..4", tmp_path).wants(Stage.EMBEDDING, 0)


def test_make_plan_collects_stages_and_dir(tmp_path: Path) -> None:
    plan = make_plan("Layer_Output, embedding", "0,2", tmp_path / "d", tmp_path / "m.gguf")
    assert plan.stages == frozenset({Stage.EMBEDDING, Stage.POST_FFN_RESIDUAL})
    assert plan.out_dir == tmp_path / "d"
    assert set(plan.layers.layers) == {0, 2}


def test_default_out_dir_is_model_stem_trace(tmp_path: Path) -> None:
    assert default_out_dir(Path("/models/qwen2.5-0.5b.Q4_K.gguf")) == Path(
        "/models/qwen2.5-0.5b.Q4_K-trace"
    )
    assert default_out_dir(Path("m.apr")) == Path("m-trace")
    model_dir = tmp_path / "hf-model.v1"
    model_dir.mkdir()
    assert default_out_dir(model_dir) == tmp_path / "hf-model.v1-trace"
    plan = make_plan("lm_head", None, None, tmp_path / "tiny.safetensors")
    assert plan.out_dir == tmp_path / "tiny-trace"


@pytest.mark.parametrize(("stages", "layers"), [("bogus", "0..1"), ("embedding", "5..2")])
def test_plan_errors_before_model_is_touched(tmp_path: Path, stages: str, layers: str) -> None:
    # The model does not exist: a plan error must win over "not found", and nothing is created.
    missing = tmp_path / "missing.gguf"
    with pytest.raises(ValidationError) as info:
        make_plan(stages, layers, None, missing)
    assert info.value.exit_code == 5
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_layer_parser_raises_only_validation_error(spec: str) -> None:
    try:
        sel = parse_layers(spec)
    except ValidationError as exc:
        assert exc.exit_code == 5
        return
    assert sel.every or all(isinstance(x, int) and x >= 0 for x in sel.layers)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789.,- alL", max_size=20))
def test_layer_parser_on_near_miss_syntax(spec: str) -> None:
    try:
        parse_layers(spec)
    except ValidationError:
        pass


_item = st.one_of(
    st.integers(0, 200).map(lambda n: (str(n), {n})),
    st.tuples(st.integers(0, 200), st.integers(1, 20)).map(
        lambda t: (f"{t[0]}..{t[0] + t[1]}", set(range(t[0], t[0] + t[1])))
    ),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_item, min_size=1, max_size=6))
def test_valid_layer_lists_select_the_union(items) -> None:
    spec = ",".join(text for text, _ in items)
    expected = set().union(*(layers for _, layers in items))
    sel = parse_layers(spec)
    assert set(sel.layers) == expected
    assert sel.resolve(400) == tuple(sorted(expected))
