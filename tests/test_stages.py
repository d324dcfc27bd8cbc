"""The stage list and ``--save-tensor`` parsing (FORMATS.md section 2)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aprtrace.errors import ValidationError
from aprtrace.stages import (
    ALL_STAGES,
    APR_CLASSIC_STAGES,
    WHOLE_MODEL_LAYER,
    Stage,
    parse_stage_list,
    stage_from_file_stem,
    stage_from_name,
)

# Copied by hand from FORMATS.md section 2, in forward (capture) order.
SPEC_NAMES = [
    "embedding",
    "attn_norm",
    "qkv_matmul",
    "qkv_bias",
    "q_post_rope",
    "k_post_rope",
    "attn_scores",
    "attn_softmax",
    "attention",
    "attn_out",
    "post_attn_residual",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_silu",
    "ffn_swigl",
    "ffn_out",
    "post_ffn_residual",
    "final_norm",
    "lm_head",
]


def test_apr_stages_in_forward_order_and_extensions_are_per_architecture() -> None:
    apr = [s.value for s in Stage if s.value in SPEC_NAMES]
    assert apr == SPEC_NAMES
    assert [s.value for s in ALL_STAGES if s.value in SPEC_NAMES] == SPEC_NAMES
    assert [s.order for s in Stage] == list(range(len(Stage)))
    # Every stage aprtrace adds is computed by named architectures only, never by Llama/Qwen.
    for s in Stage:
        if s.value not in SPEC_NAMES:
            assert s.spec.archs and not s.spec.archs & {"llama", "qwen2", "qwen3"}, s


def test_stage_graph_inputs_name_real_stages_computed_earlier() -> None:
    from aprtrace.stages import GRAPH, LAST_LAYER_OUTPUT, LAYER_INPUT, MOE_BLOCK

    for stage, spec in GRAPH.items():
        for alternatives in spec.inputs:
            for name in alternatives:
                if name in (LAYER_INPUT, LAST_LAYER_OUTPUT):
                    continue
                if Stage(name) in MOE_BLOCK and (
                    stage in MOE_BLOCK or stage is Stage.POST_FFN_RESIDUAL
                ):
                    # apr writes its MoE stages after post_ffn_residual; computed before it,
                    # from ffn_norm, and the router before the combined output.
                    assert Stage(name) is not Stage.MOE_FFN_OUT or stage not in MOE_BLOCK
                    continue
                assert Stage(name).order < stage.order, (stage, name)


def test_only_final_norm_and_lm_head_are_whole_model() -> None:
    whole = [s.value for s in Stage if not s.per_layer]
    assert whole == ["final_norm", "lm_head"]


def test_whole_model_layer_marker() -> None:
    assert WHOLE_MODEL_LAYER == 0xFFFFFFFF


def test_classic_apr_run_has_sixteen_stages() -> None:
    dropped = {"q_post_rope", "k_post_rope", "attn_scores", "attn_softmax"}
    assert [s.value for s in APR_CLASSIC_STAGES] == [n for n in SPEC_NAMES if n not in dropped]
    assert len(APR_CLASSIC_STAGES) == 16


def test_every_stage_has_info() -> None:
    for stage in Stage:
        assert stage.info.name == stage.value
        assert stage.info.per_layer == stage.per_layer
        assert stage.info.description and stage.info.shape.startswith("[")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("ffn_gate", ["ffn_gate"]),
        ("  ffn_gate  ", ["ffn_gate"]),
        ("FFN_GATE", ["ffn_gate"]),
        ("Ffn_Gate, EMBEDDING ", ["embedding", "ffn_gate"]),
        ("layer_output", ["post_ffn_residual"]),
        ("LAYER_OUTPUT", ["post_ffn_residual"]),
        ("layer_output,post_ffn_residual", ["post_ffn_residual"]),
        ("ffn_gate,FFN_GATE, ffn_gate", ["ffn_gate"]),
        ("lm_head,embedding,ffn_up,attn_norm", ["embedding", "attn_norm", "ffn_up", "lm_head"]),
        ("ffn_swigl", ["ffn_swigl"]),
    ],
)
def test_stage_list_parsing(spec: str, expected: list[str]) -> None:
    assert [s.value for s in parse_stage_list(spec)] == expected


@pytest.mark.parametrize("spec", ["all", "ALL", " All ", "aLl", "embedding,all", "ALL,lm_head"])
def test_all_in_any_case_selects_every_stage(spec: str) -> None:
    assert parse_stage_list(spec) == tuple(Stage)


@pytest.mark.parametrize("spec", ["a,,b", "embedding,,lm_head", ",", "embedding,", ",embedding"])
def test_empty_token_is_an_error(spec: str) -> None:
    with pytest.raises(ValidationError, match="empty stage name") as info:
        parse_stage_list(spec)
    assert info.value.exit_code == 5
    assert "lm_head" in str(info.value)  # the message lists the valid names


@pytest.mark.parametrize("spec", ["", "   "])
def test_blank_list_is_an_error(spec: str) -> None:
    with pytest.raises(ValidationError, match="at least one stage") as info:
        parse_stage_list(spec)
    assert info.value.exit_code == 5


@pytest.mark.parametrize("spec", ["ffn_swiglu", "embedding,bogus", "all,bogus", "all,,x", "ffn"])
def test_unknown_name_error_lists_valid_names(spec: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_stage_list(spec)
    text = str(info.value)
    assert info.value.exit_code == 5
    for name in [*SPEC_NAMES, "layer_output", "all"]:
        assert name in text


def test_unknown_name_is_quoted_in_message() -> None:
    with pytest.raises(ValidationError, match="unknown stage 'Bogus'"):
        parse_stage_list("embedding, Bogus ")


def test_stage_from_name_single() -> None:
    assert stage_from_name(" Layer_Output ") is Stage.POST_FFN_RESIDUAL
    with pytest.raises(ValidationError):
        stage_from_name("all")


@pytest.mark.parametrize(
    ("stem", "expected"),
    [
        ("embedding", Stage.EMBEDDING),
        ("LM_HEAD", Stage.LM_HEAD),
        ("layer_output", Stage.POST_FFN_RESIDUAL),
        ("notes", None),
        ("", None),
    ],
)
def test_stage_from_file_stem(stem: str, expected: Stage | None) -> None:
    assert stage_from_file_stem(stem) is expected


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_stage_parser_raises_only_validation_error(spec: str) -> None:
    try:
        stages = parse_stage_list(spec)
    except ValidationError:
        return
    assert stages and list(stages) == sorted(set(stages), key=lambda s: s.order)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([*SPEC_NAMES, "layer_output"]), min_size=1, max_size=8))
def test_stage_list_is_deduplicated_forward_order(names: list[str]) -> None:
    expected = {("post_ffn_residual" if n == "layer_output" else n) for n in names}
    spec = ",".join(n.upper() if i % 2 else f" {n} " for i, n in enumerate(names))
    assert [s.value for s in parse_stage_list(spec)] == [n for n in SPEC_NAMES if n in expected]
