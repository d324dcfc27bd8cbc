"""Start-up work a command does not need is not done: imports, tokenizer, help listing."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from aprtrace.cli import LAZY_COMMANDS

SRC = str(Path(__file__).resolve().parent.parent / "src")


def modules_loaded_by(*argv: str) -> set[str]:
    """Names in ``sys.modules`` after ``aprtrace argv`` ran in a fresh interpreter."""
    code = (
        "import sys, json\n"
        "from aprtrace.cli import main\n"
        f"sys.argv = ['aprtrace', *{list(argv)!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "sys.stdout.flush()\n"
        "print('\\nMODULES' + json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return set(json.loads(done.stderr.rsplit("MODULES", 1)[1]))


def test_help_imports_neither_numpy_nor_any_command_module():
    loaded = modules_loaded_by("--help")
    heavy = {"numpy", "aprtrace.report", "aprtrace.diff", "aprtrace.formats", "rich"}
    heavy |= {module for module, _, _ in LAZY_COMMANDS.values()}
    assert not heavy & loaded, sorted(heavy & loaded)


def test_diff_does_not_import_the_forward_pass(tmp_path):
    from aprtrace.aprt import write_aprt

    for side in "ab":
        write_aprt(tmp_path / f"{side}.bin", 0, [[1.0, 2.0]])
    loaded = modules_loaded_by("diff", "--values", str(tmp_path / "a.bin"), str(tmp_path / "b.bin"))
    assert "aprtrace.diff" in loaded  # it ran
    # The driver, the architecture modules, model loading and dequantization (the shared
    # kernels in aprtrace.arch.ops/base may come in with the decode-step parser).
    forward_pass = {"aprtrace.forward", "aprtrace.arch.llama", "aprtrace.quant", "aprtrace.model"}
    forward_pass |= {"aprtrace.formats", "aprtrace.formats.gguf", "gguf"}
    assert not forward_pass & loaded, sorted(forward_pass & loaded)


@pytest.mark.parametrize("name", sorted(LAZY_COMMANDS))
def test_help_listing_quotes_the_first_sentence_of_each_lazy_command(name):
    module, attr, summary = LAZY_COMMANDS[name]
    command = getattr(importlib.import_module(module), attr)
    assert command.help.split("\n\n")[0].replace("\n", " ").startswith(summary)


def test_tokenizer_is_built_only_when_used(smollm2_path, monkeypatch):
    import aprtrace.tokenizer
    from aprtrace.formats import load_model

    built = []
    real = aprtrace.tokenizer.tokenizer_from_gguf_metadata
    monkeypatch.setattr(
        aprtrace.tokenizer,
        "tokenizer_from_gguf_metadata",
        lambda *a, **k: built.append(1) or real(*a, **k),
    )
    model = load_model(smollm2_path)
    assert built == []
    assert model.tokenizer.encode("2+2").ids and model.tokenizer is model.tokenizer
    assert built == [1]


def test_trace_with_tokens_never_builds_the_tokenizer(smollm2_path, monkeypatch):
    from click.testing import CliRunner

    import aprtrace.tokenizer
    from aprtrace.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("tokenizer built although --tokens was given")

    monkeypatch.setattr(aprtrace.tokenizer, "tokenizer_from_gguf_metadata", refuse)
    result = CliRunner().invoke(main, ["trace", "--tokens", "1,2,3", str(smollm2_path)])
    assert result.exit_code == 0, result.output
    assert "Next token (argmax):" in result.output


def test_cli_sets_a_short_openblas_spin_before_numpy_loads_and_keeps_the_users():
    code = (
        "import sys, os\n"
        "import aprtrace.cli\n"
        "assert 'numpy' not in sys.modules\n"
        "print(os.environ['OPENBLAS_THREAD_TIMEOUT'])\n"
    )

    def timeout_seen(env: dict) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin", **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert timeout_seen({}) == "4"
    assert timeout_seen({"OPENBLAS_THREAD_TIMEOUT": "12"}) == "12"
