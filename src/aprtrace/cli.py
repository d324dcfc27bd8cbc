"""The ``aprtrace`` command line: parse, call the library, render. No logic of its own.

Exit codes (as ``apr``): 0 ok, 1 diff found a divergence, 2 the command line does not parse
(unknown option, missing argument), 3 file not found, 4 invalid format, 5 validation failed
(including every invalid option value), 6 model load failed, 7 I/O error, 8 inference failed,
9 diff INCOMPLETE, 70 internal error (a bug in aprtrace), 130 interrupted.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import sys
from pathlib import Path

import click

from aprtrace import __version__
from aprtrace.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    AprtraceError,
    Terminated,
    ValidationError,
)
from aprtrace.stages import Stage, stages_for

# OpenBLAS threads spin ~2^28 cycles after each call before they sleep: on a shared machine
# that burns the cores the dequantization pool and other jobs need (a 256-token SmolLM2 pass
# measured 6-12 s instead of 2.5-3.6 s at load 4-10 on 2 CPUs). Read when NumPy loads OpenBLAS,
# which the CLI does only after this line; how a call splits its work, and so every result bit,
# does not depend on it. A value the user set is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

DEFAULT_PROMPT = "What is 2+2?"
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer killed by SIGPIPE

# Commands in their own modules, imported only when used (keeps `trace` start-up short).
# name -> (module, attribute, first sentence of its help: `--help` lists it without the import).
LAZY_COMMANDS = {
    "compare": (
        "aprtrace.compare",
        "compare_command",
        "Trace MODEL_A and MODEL_B on the same token ids and diff every stage (A = reference).",
    ),
    "convert": (
        "aprtrace.convert",
        "convert_command",
        "Convert a GGUF file or Hugging Face safetensors directory to an APR v2 model.",
    ),
    "demo": (
        "aprtrace.demo",
        "demo_command",
        "Build a tiny seeded Qwen2 model as F32 and quantized GGUF, trace both, diff them.",
    ),
    "diff": (
        "aprtrace.cli_diff",
        "diff_command",
        "Compare stage tensors value by value: two APRT files, or two dump directories.",
    ),
}


class AprtraceGroup(click.Group):
    """Maps AprtraceError to its exit code in one place; tracebacks only with --debug."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            module, attr, _ = LAZY_COMMANDS[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of ``--help``, without importing the lazy commands' modules."""
        commands = []
        for name in self.list_commands(ctx):
            cmd = _help_stub(name) or super().get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                commands.append((name, cmd))
        limit = formatter.width - 6 - max(len(name) for name, _ in commands)
        with formatter.section("Commands"):
            formatter.write_dl([(name, cmd.get_short_help_str(limit)) for name, cmd in commands])

    def invoke(self, ctx: click.Context):
        debug = "--debug" in sys.argv[1:] or bool(ctx.params.get("debug"))
        from aprtrace.signals import install_sigbus_exit, terminate_like_interrupt

        install_sigbus_exit()
        _print_undecodable_names_as_given()
        try:
            with terminate_like_interrupt():
                return super().invoke(ctx)
        except AprtraceError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            if debug:
                raise
            signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
            name = signal.Signals(signum).name
            click.echo(
                f"interrupted ({name}): stopped; temporary files were removed and nothing "
                "already in the output was replaced",
                err=True,
            )
            ctx.exit(EXIT_INTERRUPTED if signum == signal.SIGINT else 128 + signum)
        except MemoryError:
            if debug:
                raise
            click.echo("error: out of memory", err=True)
            ctx.exit(8)
        except BrokenPipeError:
            # The reader went away (`aprtrace ... | head`): stop quietly, as shell tools do.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(EXIT_BROKEN_PIPE)
        except click.BadParameter as exc:
            # An invalid option value is exit 5 whoever checks it (click or aprtrace); 2 is
            # kept for a command line that does not parse (unknown option, missing argument).
            exc.exit_code = ValidationError.exit_code
            raise
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # a bug in aprtrace, not in the input
            if debug:
                raise
            click.echo(
                f"internal error: {type(exc).__name__}: {exc}\n"
                "  hint: this is a bug in aprtrace; rerun with --debug for the traceback "
                "and report it",
                err=True,
            )
            ctx.exit(EXIT_INTERNAL)


def _print_undecodable_names_as_given() -> None:
    """File names that are not UTF-8 reach Python as lone surrogates; printing one to a
    strict UTF-8 stdout would fail, so they are written back as the original bytes (as
    ``ls`` does)."""
    stream = sys.stdout
    if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(errors="surrogateescape")


@click.group(cls=AprtraceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aprtrace")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
def main(debug: bool) -> None:
    """Capture per-stage tensors of an LLM forward pass and find where two runs diverge.

    \b
    Examples:
      aprtrace demo
      aprtrace trace --save-tensor all --save-tensor-layers all model.gguf
      aprtrace diff --values model-trace/ other-trace/
      aprtrace compare model-f16.gguf model-q4_k_m.gguf --html report.html
      aprtrace inspect model-trace/layer-0/attn_norm.bin

    \b
    Exit codes (as apr): 0 ok, 1 diff/compare diverged, 2 the command line does not
    parse (unknown option, missing argument), 3 file not found, 4 invalid format,
    5 validation failed (every invalid option value), 6 model load failed, 7 I/O error,
    8 inference failed (including a failed stage-file write), 9 diff INCOMPLETE (files
    missing, unreadable or on one side only), 70 internal error, 130 interrupted.
    """


def _help_stub(name: str) -> click.Command | None:
    """A stand-in carrying the first sentence of a lazy command's help, for listings."""
    return click.Command(name, help=LAZY_COMMANDS[name][2]) if name in LAZY_COMMANDS else None


def _progress_callback(quiet: bool):
    """A rich progress bar on a terminal's stderr; nothing otherwise."""
    if quiet or not sys.stderr.isatty():
        return None, None
    from aprtrace.console import stderr_progress

    bar, task = stderr_progress("forward pass (layers)", total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}"


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option(
    "--save-tensor",
    "save_tensor",
    metavar="STAGES",
    help="Comma-separated stages to write as APRT files, or 'all' (see `aprtrace stages`).",
)
@click.option(
    "--save-tensor-dir",
    "save_dir",
    type=click.Path(path_type=Path),
    metavar="DIR",
    help="Output directory [default: <parent>/<model-stem>-trace].",
)
@click.option(
    "--save-tensor-layers",
    "layers",
    metavar="LAYERS",
    default=None,
    help="Layers: START..END (end exclusive), N, a list 0,3,5, 0..4,10 or 'all' [default: 0..1].",
)
@click.option(
    "--prompt",
    default=DEFAULT_PROMPT,
    show_default=True,
    help="Text encoded with the model's own tokenizer (no BOS, no chat template).",
)
@click.option("--tokens", metavar="IDS", help="Comma-separated token ids; bypasses the tokenizer.")
@click.option("--bos", is_flag=True, help="Prepend the model's BOS token.")
@click.option(
    "--engine",
    type=click.Choice(["numpy", "transformers", "llama.cpp"]),
    default="numpy",
    show_default=True,
    help="numpy: aprtrace's forward pass. transformers: Hugging Face transformers on the same "
    "decoded weights, a reference dump in the same layout (needs the `ref` extra; default "
    "DIR <parent>/<model-stem>-trace-transformers). llama.cpp: llama.cpp's own graph nodes "
    "of a GGUF file, tokens from llama.cpp's tokenizer (needs the `llamacpp` extra; default "
    "DIR <parent>/<model-stem>-trace-llamacpp).",
)
@click.option(
    "--arch",
    help="Architecture for files that do not name one (APR): llama, qwen2, qwen3, gemma2, gemma3.",
)
@click.option("--no-verify", is_flag=True, help="Skip CRC checks of APR files (damaged files).")
@click.option(
    "--clean",
    is_flag=True,
    help="Delete the stage files an earlier aprtrace run listed in DIR's manifest first.",
)
@click.option(
    "--decode",
    "decode_steps",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="After the prompt pass, N decode steps through a KV cache, each stage of each step "
    "captured under DIR/decode-k/ [default: 0].",
)
@click.option(
    "--decode-tokens",
    metavar="IDS",
    help="Comma-separated tokens fed at decode steps 1..N (teacher forcing) instead of each "
    "step's greedy argmax; implies --decode with their count.",
)
@click.option(
    "--no-stats",
    is_flag=True,
    help="Without --save-tensor: no statistics table, nothing captured; time the forward pass "
    "alone (only NaN/Inf in the logits is reported).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display and no per-file listing.")
@click.option(
    "--allow-large",
    is_flag=True,
    help="Write the dump even when its estimated size is over 2 GB or the free disk space.",
)
def trace(
    model_path,
    save_tensor,
    save_dir,
    layers,
    prompt,
    tokens,
    bos,
    engine,
    arch,
    no_verify,
    clean,
    no_stats,
    decode_steps,
    decode_tokens,
    as_json,
    quiet,
    allow_large,
):
    """Run one forward pass of MODEL (GGUF, APR or safetensors dir) and capture its stages.

    With --save-tensor, every selected stage is written as an APRT file (12-byte header +
    raw f32 LE), byte-compatible with `apr trace --save-tensor`: per-layer stages under
    DIR/layer-N/<stage>.bin, whole-model stages (final_norm, lm_head) as DIR/<stage>.bin,
    then DIR/manifest.json (written last: a dump without it is incomplete). Without
    --save-tensor, prints per-layer, per-stage statistics (mean, std, min, max, NaN, Inf).

    \b
    Examples:
      aprtrace trace model.gguf
      aprtrace trace --save-tensor embedding,lm_head model.apr
      aprtrace trace --save-tensor all --save-tensor-layers all model.gguf
      aprtrace trace --save-tensor attn_norm,ffn_out --save-tensor-layers 0..4,10 \\
          --save-tensor-dir /tmp/q4 model.gguf
      aprtrace trace --tokens 3838,374,220,17 --json model.gguf
      aprtrace trace --engine transformers --save-tensor all --save-tensor-layers all model.gguf
      aprtrace trace --engine llama.cpp --save-tensor all --save-tensor-layers all model.gguf
      aprtrace trace --decode 8 --save-tensor all --save-tensor-layers all model.gguf
      aprtrace trace --decode-tokens 5,17,9 --save-tensor all model.gguf

    With --decode N, N decode steps follow the prompt pass, each feeding one token at the next
    position through a KV cache (greedy argmax, or --decode-tokens); step k is written under
    DIR/decode-k/ in the same layout, its buffers holding the one new position ([1, dim],
    attention maps [heads, 1, past + 1]); the manifest lists each step's token and position.
    """
    from aprtrace.formats import load_model
    from aprtrace.plan import make_plan, parse_layers
    from aprtrace.trace import ENGINE_DIR_SUFFIX, encode_prompt, parse_token_list, run_trace

    # Every argument error is reported before the model is loaded.

    plan = (
        make_plan(save_tensor, layers, save_dir, model_path, ENGINE_DIR_SUFFIX[engine])
        if save_tensor is not None
        else None
    )
    if plan is None and layers is not None:
        parse_layers(layers)
        click.echo("warning: --save-tensor-layers has no effect without --save-tensor", err=True)
    if tokens is not None and _given(click.get_current_context(), "prompt"):
        raise ValidationError(
            "--prompt and --tokens both given; --tokens bypasses the tokenizer, so the prompt "
            "would be ignored",
            hint="give one of them",
        )
    if no_stats and (plan is not None or decode_steps or decode_tokens):
        raise click.UsageError("--no-stats times the prompt pass alone: no --save-tensor/--decode")
    token_ids = parse_token_list(tokens) if tokens is not None else None
    from aprtrace.decode import decode_request

    decode_steps, forced = decode_request(decode_steps, decode_tokens, (engine,))
    if engine == "transformers":
        from aprtrace.engines.transformers import import_ref

        import_ref()  # a missing `ref` extra is reported before the model is loaded
    if engine == "llama.cpp":
        from aprtrace.engines.llamacpp import check_installed

        check_installed()

    model = load_model(model_path, verify=not no_verify, arch=arch)
    tokenizer_info = None
    if token_ids is None and engine == "llama.cpp":
        from aprtrace.engines.llamacpp import prompt_token_ids

        token_ids, tokenizer_info = prompt_token_ids(model, prompt, bos)
        if not tokenizer_info.get("aprtrace_agrees", True):
            click.echo(
                f"warning: llama.cpp's tokenizer gives {token_ids}, aprtrace's gives "
                f"{tokenizer_info['aprtrace_token_ids']}; tracing llama.cpp's ids",
                err=True,
            )
    if token_ids is None:
        token_ids = encode_prompt(model, prompt, bos)
        shown_prompt = prompt
    else:
        shown_prompt = prompt if tokenizer_info is not None else None
    cfg = model.config
    resolved = plan.layers.resolve(cfg.num_layers) if plan is not None else ()
    if plan is not None:
        from aprtrace.plan import check_dump_size

        check_dump_size(plan, cfg, len(token_ids), allow_large)

    if not as_json:
        click.echo(
            f"Model:   {model_path} ({model.format}, {cfg.architecture}, "
            f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size})"
        )
        if plan is not None:
            names = [s.value for s in stages_for(cfg) if s in plan.stages]
            click.echo(f"Stages:  {', '.join(names)}")
            click.echo(f"Layers:  {_layers_text(resolved)}")
            click.echo(f"Output:  {plan.out_dir}")
        if shown_prompt is not None:
            click.echo(f"Prompt:  {shown_prompt!r}")
        click.echo(f"Tokens:  {token_ids}")

    bar, update = _progress_callback(quiet or as_json)
    options = dict(
        prompt=shown_prompt,
        progress=update,
        clean=clean,
        collect_stats=(plan is None or as_json) and not no_stats,
        engine=engine,
        timing_only=no_stats,
        tokenizer=tokenizer_info,
        decode=decode_steps,
        decode_tokens=forced,
    )
    with bar if bar is not None else contextlib.nullcontext():
        result = run_trace(model, token_ids, plan, **options)

    import numpy as np

    # No next token when a logit is NaN: argmax would pick the first NaN.
    finite = result.logits.size and not np.isnan(result.logits).any()
    top = int(np.argmax(result.logits)) if finite else None
    if as_json:
        payload = {
            "schema": "aprtrace-trace-v1",
            "model": str(model_path),
            "format": model.format,
            "config": cfg.to_dict(),
            "prompt": shown_prompt,
            "token_ids": result.token_ids,
            "argmax_token": top,
            "first_nonfinite": _nonfinite_json(result.first_nonfinite),
            "seconds": round(result.seconds, 4),
            "stats": [s.to_dict() for s in result.stats],
            "files": [{"path": str(f.path), "bytes": f.size} for f in result.log.files],
            "output_dir": str(plan.out_dir) if plan else None,
            "stale_files": [str(p) for p in result.stale_files],
            "leftovers_removed": [str(p) for p in result.leftovers_removed],
        }
        if result.decode is not None:
            payload["decode"] = _decode_json(result)
        click.echo(json.dumps(payload, indent=2, allow_nan=False, default=_json_default))
        return

    if no_stats:
        click.echo(f"Forward pass in {result.seconds:.2f} s (nothing captured)")
    elif plan is None:
        _print_stats_table(result.stats)
    else:
        if not quiet:
            for f in result.log.files:
                click.echo(f"  wrote {f.path} ({f.size} bytes)")
        click.echo(
            f"Wrote {len(result.log.files)} files and {result.manifest_path.name} "
            f"to {plan.out_dir} in {result.seconds:.2f} s"
        )
        if result.leftovers_removed:
            click.echo(
                f"note: removed {len(result.leftovers_removed)} leftovers of interrupted runs "
                f"from {plan.out_dir} (staging directories, temporary files)",
                err=True,
            )
        if result.stale_files:
            click.echo(
                f"warning: {len(result.stale_files)} .bin files in {plan.out_dir} are not "
                "from this run (stale); use --clean or another --save-tensor-dir",
                err=True,
            )
            for p in result.stale_files[:10]:
                click.echo(f"  stale: {p}", err=True)
    if result.first_nonfinite is not None:
        stage, layer = result.first_nonfinite
        where = f"layer {layer} {stage}" if layer is not None else stage
        click.echo(f"warning: first NaN/Inf appears at {where}", err=True)
    label = "Next token (argmax)"
    if result.decode is not None:
        _print_decode_steps(result, model, plan is None)
        if result.decode.steps:
            top = result.decode.steps[-1].argmax
            label = f"Next token after step {result.decode.steps[-1].step} (argmax)"
    # With --tokens the tokenizer is never built (a vocabulary costs ~60-140 ms to parse).
    if top is not None and shown_prompt is not None and model.tokenizer is not None:
        text = model.tokenizer.decode([top], skip_special_tokens=False)
        click.echo(f"{label}: {top} {text!r}")
    elif top is not None:
        click.echo(f"{label}: {top}")
    else:
        click.echo("Next token: none (the logits contain NaN)")


def _given(ctx: click.Context, name: str) -> bool:
    """Whether the user typed option ``name`` (not its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _decode_json(result) -> dict:
    """The ``decode`` object of ``trace --json``: steps plus each step's statistics."""
    from aprtrace.trace import decode_manifest

    doc = decode_manifest(result.decode)
    for step in doc["steps"]:
        step["stats"] = [s.to_dict() for s in result.step_stats.get(step["step"], [])]
    return doc


def _print_decode_steps(result, model, with_stats: bool) -> None:
    """One line per decode step (token fed, position, argmax), flagging NaN/Inf per step."""
    run = result.decode
    mode = "teacher-forced" if run.forced else "greedy"
    click.echo(f"Decode:  {len(run.steps)} steps ({mode})")
    for s in run.steps:
        text = ""
        if model.tokenizer is not None:
            text = " " + repr(model.tokenizer.decode([s.token], skip_special_tokens=False))
        line = f"  step {s.step}: fed {s.token}{text} at position {s.position} -> argmax {s.argmax}"
        if s.step in result.step_nonfinite:
            stage, layer = result.step_nonfinite[s.step]
            where = f"layer {layer} {stage}" if layer is not None else stage
            line += f"  (first NaN/Inf at {where})"
        click.echo(line)
    if with_stats and run.steps:
        click.echo("(statistics above are the prompt pass; trace --json has every step's)")


def _json_default(value):
    import numpy as np

    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(type(value))


def _nonfinite_json(first):
    return None if first is None else {"stage": first[0], "layer": first[1]}


def _layers_text(layers: tuple[int, ...]) -> str:
    if not layers:
        return "(none)"
    if list(layers) == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}..{layers[-1] + 1} ({len(layers)} layers)"
    return ", ".join(map(str, layers))


def _print_stats_table(stats) -> None:
    from rich.table import Table

    from aprtrace.console import stdout_console

    flagged = any(s.anomalies for s in stats)
    columns = ["layer", "stage", "shape", "mean", "std", "min", "max", "NaN", "Inf"]
    table = Table(title="Per-stage statistics", show_lines=False)
    for col in columns + (["flags"] if flagged else []):
        table.add_column(col, justify="left" if col in ("stage", "flags") else "right")
    for s in stats:
        row = [
            "-" if s.layer is None else str(s.layer),
            s.stage,
            "x".join(map(str, s.shape)),
            _fmt(s.mean),
            _fmt(s.std),
            _fmt(s.min),
            _fmt(s.max),
            str(s.nan),
            str(s.inf),
        ]
        if flagged:
            row.append(", ".join(s.anomalies))
        table.add_row(*row, style="bold red" if s.anomalies else None)
    stdout_console().print(table)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--markdown", is_flag=True, help="Print the table of docs/stages.md.")
def stages(as_json, markdown):
    """List the capture stages in forward order, with what each buffer holds.

    \b
    Examples:
      aprtrace stages
      aprtrace stages --json
    """
    rows = [
        {
            "index": i + 1,
            "name": s.value,
            "scope": "per-layer" if s.per_layer else "whole-model",
            "shape": s.spec.shape,
            "holds": s.spec.description,
            "inputs": [" | ".join(alts) for alts in s.spec.inputs],
            "weights": s.spec.weights,
            "architectures": sorted(s.spec.archs) if s.spec.archs else "all",
        }
        for i, s in enumerate(Stage)
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if markdown:
        from aprtrace.stages import stages_markdown

        click.echo(stages_markdown(), nl=False)
        return
    for r in rows:
        only = "" if r["architectures"] == "all" else f"  [{', '.join(r['architectures'])}]"
        click.echo(
            f"{r['index']:>2}  {r['name']:<19} {r['scope']:<12} {r['shape']:<24} {r['holds']}{only}"
        )
    click.echo(
        "\nAlias: layer_output = post_ffn_residual.  'all' selects every stage a model "
        "computes.\nInputs of each stage: aprtrace stages --json."
    )


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip CRC checks of APR files (damaged files).")
@click.option("--arch", help="Architecture for APR files that do not name one.")
def inspect(path, as_json, no_verify, arch):
    """Describe an APRT stage file, a dump directory, or a model file.

    \b
    Examples:
      aprtrace inspect model-trace/layer-0/attn_norm.bin
      aprtrace inspect model-trace/
      aprtrace inspect model.gguf
      aprtrace inspect --no-verify damaged.apr
    """
    from aprtrace.inspect import inspect_path

    inspect_path(path, as_json, verify=not no_verify, arch=arch)
