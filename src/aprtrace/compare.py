"""``aprtrace compare``: trace two models (or one model on two engines) and diff the dumps.

The one-command form of the usual bisection: same token ids on both sides, every stage of
every layer, then ``diff --values`` with any diff options passed through.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from aprtrace.cli import DEFAULT_PROMPT
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
    decode: int = 0,
    decode_tokens: list[int] | None = None,
) -> TracedDump:
    """Trace ``model_path`` with ``engine`` into ``out_dir`` (cleaned of an earlier run's files).

    ``decode`` steps follow the prompt pass, fed ``decode_tokens`` when given, else greedy."""
    from aprtrace.formats import load_model
    from aprtrace.plan import make_plan
    from aprtrace.trace import encode_prompt, run_trace

    plan = make_plan(stages, layers, out_dir, model_path)
    model = load_model(model_path, arch=arch)
    tokenizer = None
    if token_ids is not None:
        ids = list(token_ids)
    elif engine == "llama.cpp":
        from aprtrace.engines.llamacpp import prompt_token_ids

        ids, tokenizer = prompt_token_ids(model, prompt, False)
    else:
        ids = encode_prompt(model, prompt, False)
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


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
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
    "--decode",
    "decode_steps",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Also N decode steps: A generates greedily (or --decode-tokens), B is fed A's "
    "tokens; the report says after which step the two would pick different tokens.",
)
@click.option("--decode-tokens", metavar="IDS", help="Tokens fed at decode steps on both sides.")
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
    decode_steps,
    decode_tokens,
):
    """Trace MODEL_A and MODEL_B on the same token ids and diff every stage (A = reference).

    With one model, compares aprtrace's NumPy forward pass against Hugging Face transformers
    on the same decoded weights (`--engine-b transformers`). Options not listed here are
    passed to `aprtrace diff --values` (--html, --tol, --cos-min, --model, --json, ...); the
    exit code is diff's: 0 within tolerance, 1 diverged.

    \b
    Examples:
      aprtrace compare model-f16.gguf model-q4_k_m.gguf --html report.html
      aprtrace compare model.gguf                  # numpy vs transformers, same weights
      aprtrace compare model.gguf --engines numpy,llama.cpp
      aprtrace compare hf-dir/ model.apr --save-tensor-layers 0..4 --cos-min 0.99
      aprtrace compare model-f16.gguf model-q4_0.gguf --decode 8
    """
    from aprtrace.cli_diff import diff_command
    from aprtrace.trace import parse_token_list

    if model_b is not None and str(model_b).startswith("-"):
        # With one model, click takes the first pass-through diff option for MODEL_B.
        ctx.args.insert(0, str(model_b))
        model_b = None
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
    work_dir = work_dir or Path(model_a).parent / "aprtrace-compare"
    ids = parse_token_list(tokens) if tokens is not None else None
    fed = parse_token_list(decode_tokens, "--decode-tokens") if decode_tokens else None
    if decode_steps is None:
        decode_steps = len(fed) if fed is not None else 0
    elif decode_steps == 0 and fed is not None:
        raise ValidationError(
            "--decode 0 with --decode-tokens: no step to feed them to",
            hint="leave --decode out (it defaults to the number of --decode-tokens)",
        )
    if decode_steps:
        from aprtrace.trace import engine_decode

        for engine in (engine_a, engine_b):
            engine_decode(engine)  # refused before A is traced
    dumps = []
    for side, path, engine in (("A", model_a, engine_a), ("B", model_b, engine_b)):
        dump = trace_to_dir(
            path,
            work_dir / _dump_name(side, Path(path), engine),
            engine=engine,
            prompt=prompt,
            token_ids=ids,
            stages=stages,
            layers=layers,
            arch=arch,
            decode=decode_steps,
            decode_tokens=fed,
        )
        ids = dump.token_ids  # B runs on exactly A's token ids
        fed = dump.decode_tokens  # ... and is fed the tokens A generated (teacher forcing)
        click.echo(
            f"{side}: traced {path} ({engine}): {dump.files} stage files -> {dump.out_dir} "
            f"({dump.seconds:.2f} s, tokens {dump.token_ids}"
            + (f", decode tokens {dump.decode_tokens}" if dump.decode_tokens else "")
            + ")"
        )
        dumps.append(dump)
    args = ["--values", str(dumps[0].out_dir), str(dumps[1].out_dir), *ctx.args]
    click.echo(f"\n$ aprtrace diff {' '.join(args)}\n")
    ctx.exit(diff_command.main(args, prog_name="aprtrace diff", standalone_mode=False) or 0)
