"""``aprtrace compare``: trace two models (or one model on two engines) and diff the dumps.

The one-command form of the usual bisection: same token ids on both sides, every stage of
every layer, then ``diff --values`` with any diff options passed through.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from aprtrace.cli import DEFAULT_PROMPT
from aprtrace.cli_diff import diff_options, options_from, run_diff
from aprtrace.errors import ValidationError


@dataclass
class TracedDump:
    model_path: Path
    engine: str
    out_dir: Path
    token_ids: list[int]
    files: int
    seconds: float
    decode_tokens: list[int] | None = None  # the tokens fed at decode steps 1..N


def trace_to_dir(
    model_path: Path,
    out_dir: Path,
    *,
    engine: str = "numpy",
    prompt: str = DEFAULT_PROMPT,
    token_ids: list[int] | None = None,
    stages: str = "all",
    layers: str = "all",
    arch: str | None = None,
    model=None,
    allow_large: bool = False,
    decode: int = 0,
    decode_tokens: list[int] | None = None,
) -> TracedDump:
    """Trace ``model_path`` with ``engine`` into ``out_dir`` (cleaned of an earlier run's files).

    ``model``: the already loaded model of ``model_path``, when the caller has it. ``decode``
    steps follow the prompt pass, fed ``decode_tokens`` when given, else greedy."""
    from aprtrace.formats import load_model
    from aprtrace.plan import check_dump_size, make_plan
    from aprtrace.trace import encode_prompt, run_trace

    plan = make_plan(stages, layers, out_dir, model_path)
    model = model if model is not None else load_model(model_path, arch=arch)
    tokenizer = None
    if token_ids is not None:
        ids = list(token_ids)
    elif engine == "llama.cpp":
        from aprtrace.engines.llamacpp import prompt_token_ids

        ids, tokenizer = prompt_token_ids(model, prompt, False)
    else:
        ids = encode_prompt(model, prompt, False)
    check_dump_size(plan, model.config, len(ids), allow_large)
    result = run_trace(
        model,
        ids,
        plan,
        prompt=prompt if token_ids is None else None,
        collect_stats=False,
        clean=True,
        engine=engine,
        tokenizer=tokenizer,
        decode=decode,
        decode_tokens=decode_tokens,
    )
    fed = result.decode.tokens if result.decode is not None else None
    return TracedDump(
        Path(model_path), engine, plan.out_dir, ids, len(result.log.files), result.seconds, fed
    )


def check_models_comparable(model_a, model_b, token_ids: list[int], tokens_given: bool) -> None:
    """Before anything is traced: B must have A's shape and accept A's token ids."""
    from aprtrace.diff import config_difference

    differs = config_difference(model_a.config.to_dict(), model_b.config.to_dict())
    if differs is not None:
        raise ValidationError(
            f"MODEL_A and MODEL_B are different models ({differs}), so their stages cannot be "
            "compared",
            hint="compare two builds (quantizations, containers, engines) of the same model",
        )
    source = "--tokens" if tokens_given else "MODEL_A's tokenizer"
    for side, model in (("A", model_a), ("B", model_b)):
        vocab = model.config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValidationError(
                f"token id {bad[0]} (from {source}) is outside MODEL_{side}'s vocabulary "
                f"(0..{vocab - 1})",
                hint="both models need the same vocabulary"
                + ("" if tokens_given else "; or give --tokens that both accept"),
            )


def _dump_name(side: str, path: Path, engine: str) -> str:
    stem = path.name if path.is_dir() else path.stem
    return f"{side}-{stem}-{engine.replace('.', '')}"


ENGINE_CHOICE = click.Choice(["numpy", "transformers", "llama.cpp"])


def parse_engines(spec: str) -> tuple[str, str]:
    """``--engines numpy,llama.cpp`` -> ("numpy", "llama.cpp")."""
    names = [n.strip() for n in spec.split(",")]
    if len(names) != 2 or any(n not in ENGINE_CHOICE.choices for n in names):
        raise ValidationError(
            f"invalid --engines '{spec}'",
            hint=f"give two of {', '.join(ENGINE_CHOICE.choices)}, e.g. --engines numpy,llama.cpp",
        )
    return names[0], names[1]


@click.command()
@click.argument("model_a", metavar="MODEL_A", type=click.Path(path_type=Path))
@click.argument("model_b", metavar="[MODEL_B]", type=click.Path(path_type=Path), required=False)
@click.option("--engine-a", default="numpy", show_default=True, type=ENGINE_CHOICE)
@click.option(
    "--engine-b",
    default=None,
    type=ENGINE_CHOICE,
    help="[default: numpy with MODEL_B, transformers without it]",
)
@click.option(
    "--engines",
    metavar="A,B",
    default=None,
    help="Both engines at once, e.g. numpy,llama.cpp (same as --engine-a A --engine-b B).",
)
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True)
@click.option("--tokens", metavar="IDS", help="Comma-separated token ids for both sides.")
@click.option("--save-tensor", "stages", default="all", show_default=True, metavar="STAGES")
@click.option("--save-tensor-layers", "layers", default="all", show_default=True, metavar="LAYERS")
@click.option(
    "--dir",
    "work_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the two dumps go [default: <MODEL_A's parent>/aprtrace-compare].",
)
@click.option("--arch", help="Architecture for APR files that do not name one.")
@click.option(
    "--allow-large",
    is_flag=True,
    help="Trace even when a dump's estimated size is over 2 GB or the free disk space.",
)
@click.option(
    "--decode",
    "decode_steps",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Also N decode steps: A generates greedily (or --decode-tokens), B is fed A's "
    "tokens; the report says after which step the two would pick different tokens.",
)
@click.option("--decode-tokens", metavar="IDS", help="Tokens fed at decode steps on both sides.")
@diff_options
@click.pass_context
def compare_command(
    ctx,
    model_a,
    model_b,
    engine_a,
    engine_b,
    engines,
    prompt,
    tokens,
    stages,
    layers,
    work_dir,
    arch,
    allow_large,
    decode_steps,
    decode_tokens,
    **diff_params,
):
    """Trace MODEL_A and MODEL_B on the same token ids and diff every stage (A = reference).

    With one model, compares aprtrace's NumPy forward pass against Hugging Face transformers
    on the same decoded weights (`--engine-b transformers`). Both models are opened and
    checked first (same shape, B accepts A's token ids), before anything is traced. The
    options from --limit on are `aprtrace diff --values`'s (--html, --tol, --cos-min, --model,
    --json, ...); the exit code is diff's: 0 within tolerance, 1 diverged, 9 incomplete.

    \b
    Examples:
      aprtrace compare model-f16.gguf model-q4_k_m.gguf --html report.html
      aprtrace compare model.gguf                  # numpy vs transformers, same weights
      aprtrace compare model.gguf --engines numpy,llama.cpp
      aprtrace compare hf-dir/ model.apr --save-tensor-layers 0..4 --cos-min 0.99
      aprtrace compare model-f16.gguf model-q4_0.gguf --decode 8
    """
    from aprtrace.decode import decode_request
    from aprtrace.trace import parse_token_list

    opts = options_from(diff_params)
    opts.arch = arch
    if engines is not None:
        engine_a, engine_b = parse_engines(engines)
    if model_b is None:
        model_b = model_a
        engine_b = engine_b or "transformers"
    engine_b = engine_b or "numpy"
    if model_b == model_a and engine_a == engine_b:
        raise ValidationError(
            "both sides would be the same model on the same engine",
            hint="give a second model, or a different --engine-a / --engine-b",
        )
    if "transformers" in (engine_a, engine_b):
        from aprtrace.engines.transformers import import_ref

        import_ref()  # before tracing A, not after
    if "llama.cpp" in (engine_a, engine_b):
        from aprtrace.engines.llamacpp import check_installed

        check_installed()
    from aprtrace.formats import load_model
    from aprtrace.trace import encode_prompt

    if tokens is not None and ctx.get_parameter_source("prompt").name != "DEFAULT":
        raise ValidationError(
            "--prompt and --tokens both given; --tokens bypasses the tokenizer, so the prompt "
            "would be ignored",
            hint="give one of them",
        )
    work_dir = work_dir or Path(model_a).parent / "aprtrace-compare"
    ids = parse_token_list(tokens) if tokens is not None else None
    decode_steps, fed = decode_request(decode_steps, decode_tokens, (engine_a, engine_b))
    # Both models are opened (weights stay encoded) and checked before anything is traced.
    loaded_a = load_model(model_a, arch=arch)
    loaded_b = loaded_a if model_b == model_a else load_model(model_b, arch=arch)
    tokens_given = ids is not None
    if ids is None and engine_a == "llama.cpp":
        from aprtrace.engines.llamacpp import prompt_token_ids

        ids = list(prompt_token_ids(loaded_a, prompt, False)[0])  # llama.cpp's own tokenizer
    elif ids is None:
        ids = encode_prompt(loaded_a, prompt, False)
    check_models_comparable(loaded_a, loaded_b, ids, tokens_given)
    from aprtrace.plan import check_dump_size, make_plan

    for side, path, engine, loaded in (
        ("A", model_a, engine_a, loaded_a),
        ("B", model_b, engine_b, loaded_b),
    ):
        out = work_dir / _dump_name(side, Path(path), engine)
        check_dump_size(make_plan(stages, layers, out, path), loaded.config, len(ids), allow_large)
    dumps = []
    for side, path, engine, loaded in (
        ("A", model_a, engine_a, loaded_a),
        ("B", model_b, engine_b, loaded_b),
    ):
        dump = trace_to_dir(
            path,
            work_dir / _dump_name(side, Path(path), engine),
            engine=engine,
            prompt=prompt,
            # A encodes the prompt again (and records it); B runs on exactly A's ids.
            token_ids=ids if tokens_given or side == "B" else None,
            stages=stages,
            layers=layers,
            arch=arch,
            model=loaded,
            allow_large=allow_large,
            decode=decode_steps,
            decode_tokens=fed,
        )
        ids = dump.token_ids  # B runs on exactly A's token ids
        fed = dump.decode_tokens  # ... and is fed the tokens A generated (teacher forcing)
        click.echo(
            f"{side}: traced {path} ({engine}): {dump.files} stage files -> {dump.out_dir} "
            f"({dump.seconds:.2f} s, tokens {dump.token_ids}"
            + (f", decode tokens {dump.decode_tokens}" if dump.decode_tokens else "")
            + ")",
            err=opts.as_json,  # stdout holds only the JSON document
        )
        dumps.append(dump)
    if not opts.as_json:
        click.echo(f"\n$ aprtrace diff --values {dumps[0].out_dir} {dumps[1].out_dir}\n")
    ctx.exit(run_diff(dumps[0].out_dir, dumps[1].out_dir, opts))
