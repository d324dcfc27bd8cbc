"""Hypothesis fuzzing of every parser: mutated valid seeds either load or raise AprtraceError.

Each target (``fuzz/targets.py``) parses one input and, for models that load, decodes every
tensor, tokenizes and runs a forward pass. Mutations are bit flips, byte inserts/deletes,
truncation, chunk copies and splices of extreme u32/u64 values over count/length/offset
fields; JSON inputs are also mutated structurally. ``fuzz/run.py`` runs the long campaign.
"""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
from fuzz.mutate import OPS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aprtrace.diff import parse_tol_override
from aprtrace.errors import AprtraceError
from aprtrace.plan import parse_layers
from aprtrace.stages import parse_stage_list
from aprtrace.trace import parse_token_list
from reliability_models import build_targets

TARGET_NAMES = [
    "json_reader",
    "safetensors_index",
    "tokenizer_json",
    "apr_metadata",
    "gguf",
    "apr",
    "aprt",
    "safetensors",
    "hf_config",
    "manifest",
    "tokenizer",
    "spec_stages",
    "spec_layers",
    "spec_tokens",
    "spec_tol",
]
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ops_strategy = st.lists(
    st.tuples(st.integers(0, len(OPS) - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)),
    min_size=1,
    max_size=4,
)
RSS_GROWTH_CEILING = 200 << 20


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    return build_targets(tmp_path_factory.mktemp("fuzz"))


def test_every_target_has_a_test(targets):
    assert sorted(targets) == sorted(TARGET_NAMES)


@pytest.mark.parametrize("name", TARGET_NAMES)
def test_seeds_are_valid(targets, name, tmp_path):
    for seed in targets[name].seeds:
        targets[name].run(seed, tmp_path)  # an unmutated seed never raises


@pytest.mark.parametrize("name", TARGET_NAMES)
def test_mutated_inputs_raise_only_aprtrace_errors(targets, name, tmp_path):
    target = targets[name]

    @FUZZ
    @given(ops=ops_strategy, which=st.integers(0, 7), structural=st.booleans())
    def check(ops, which, structural):
        data = target.generate(target.seeds[which % len(target.seeds)], ops, structural)
        try:
            target.run(data, tmp_path)
        except AprtraceError:
            pass  # a clean, classified error is the expected outcome for most mutations

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    check()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    # The process's peak RSS did not grow by the bar. (tracemalloc per input would
    # make this test ten times slower; fuzz/run.py records the real per-worker peak and
    # tests/test_reliability.py measures allocations of the hostile cases with tracemalloc.)
    assert grown < RSS_GROWTH_CEILING
    assert [p for p in tmp_path.iterdir()] == []  # the target cleaned up its inputs


# Arbitrary text (not only mutations of valid specs) for the CLI spec parsers.
@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(max_size=40))
def test_cli_spec_parsers_on_arbitrary_text(text):
    for parse in (parse_stage_list, parse_token_list, parse_tol_override):
        try:
            parse(text)
        except AprtraceError:
            pass
    try:
        parse_layers(text).resolve(8)
    except AprtraceError:
        pass


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.lists(
        st.one_of(st.integers(-5, 2**70), st.sampled_from(["..", ",", " ", "all"])), max_size=6
    )
)
def test_layer_specs_with_huge_numbers_fail_fast(parts):
    spec = "".join(str(p) for p in parts)
    try:
        selection = parse_layers(spec)
    except AprtraceError:
        return
    assert len(selection.layers) <= 65536  # never materialises billions of indices


def test_targets_are_importable_from_repo_root():
    assert Path(__file__).resolve().parents[1].joinpath("fuzz", "run.py").is_file()
