"""``aprtrace diff --values``: the click command. Parses, calls aprtrace.diff, renders."""

from __future__ import annotations

import contextlib
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import click
from rich.console import Console

from aprtrace import report
from aprtrace.atomic import remove_orphaned_temps, write_bytes_atomic
from aprtrace.console import stderr_progress, stdout_console
from aprtrace.diff import (
    DEFAULT_TOLERANCE,
    MAX_LIMIT,
    Tolerance,
    check_tol_pattern,
    check_tolerance_value,
    diff_dirs,
    diff_files,
    key_for,
    list_stage_files,
    parse_tol_override,
    tolerance_for,
    unmatched_tol_warnings,
    verdict,
)
from aprtrace.errors import EXIT_DIVERGED, NotFoundError, OutputError, ValidationError
from aprtrace.safeio import file_kind, path_text, text_for_output

_T = DEFAULT_TOLERANCE
_LAYER_DIR = re.compile(r"^layer-\d+$")

HELP = f"""Compare stage tensors value by value: two APRT files, or two dump directories.

\b
A is the reference, B the candidate (relative error, SQNR and rtol are measured against A).

\b
File pair (compatible with `apr diff --values A.bin B.bin`):
  aprtrace diff --values ref/layer-0/ffn_out.bin q8/layer-0/ffn_out.bin
  aprtrace diff --values --json --limit 5 a/lm_head.bin b/lm_head.bin
Directory mode (pairs files by relative path, forward order; dumps traced with --decode N
are walked prompt pass first, then decode-1/ .. decode-N/, and --steps filters them):
  aprtrace diff --values f32-trace/ q8-trace/
  aprtrace diff --values f32-trace/ q4-trace/ --cos-min 0.99 --tol 'attn_softmax:atol=1e-3'
  aprtrace diff --values a/ b/ --tol 'layer-3/ffn_*:cos-min=0.98,rtol=0.2' --fail-fast
  aprtrace diff --values a/ b/ --json > diff.json
  aprtrace diff --values a/ b/ --html report.html --plot heatmap.png --metric cosine
  aprtrace diff --values a/ b/ --all --wide       # every row and every column
Local vs inherited error (teacher forcing; MODEL = the model B ran, e.g. its quantized GGUF):
  aprtrace diff --values f32-trace/ q4-trace/ --model model-q4_0.gguf

\b
Verdict per pair (defaults: --atol {_T.atol:g} --rtol {_T.rtol:g} --cos-min {_T.cos_min:g}):
  pass  =  no NaN/Inf mismatch  and  ( max|d| <= atol
           or ( cosine >= cos-min  and  max|d| <= atol + rtol * max|a| ) )
cos-min 0.999 is aprender's practice (the Q4_K noise floor). The max|d| bound catches a
localized bug (a few wrong elements) that barely moves the cosine; rtol 0.1 lets each element
be off by up to 10% of the tensor's largest magnitude, above per-block quantization noise.
atol {_T.atol:g} passes tensors that are identical or all near zero. In directory mode NaN and
Inf are counted separately and every other statistic is over positions finite on both sides.
--tol PATTERN:key=value[,key=value] overrides per stage (keys atol, rtol, cos-min); PATTERN is
an fnmatch on the stage name, or on layer-N/stage when it contains a '/'; later rules win.

--model MODEL re-runs every stage of B on B's own dumped inputs with aprtrace's float32 math
and MODEL's weights: local = ||B_k - f_k(B inputs)|| / ||A_k|| is what stage k of B adds
itself (0 when B is aprtrace on MODEL), inherited = ||A_k - f_k(B inputs)|| / ||A_k|| is what
it receives. Pass A's model instead to see weight quantization as local error.

\b
Exit codes:
  0  every pair within tolerance, nothing missing
  1  at least one pair diverged (the report names the first one in forward order)
  2  the command line cannot be parsed (unknown option, missing argument)
  3  an input file or directory does not exist
  4  an input is not a valid APRT file or manifest
  5  incomparable inputs: element count or layer mismatch (as apr), a file paired with a
     directory, no files in common, two dumps of different models, token ids or
     prompts (refused before any pair is read), or any invalid option value
  9  INCOMPLETE: every compared pair is within tolerance, but files listed in a manifest
     are missing or unreadable, or some stage files exist on one side only
     (--only-common accepts one-sided files)

\b
The terminal shows the summary, the first divergence, the stages adding the most error
(float32 rounding noise, rel L2 < 1e-5, never counts) and the rows out of tolerance; --all
prints every row. 1-cos is 1 - cosine in scientific notation.

\b
With a manifest.json, a dump is exactly the files it lists; other .bin files in the
directory (left over from an earlier trace) are reported as stale and ignored unless
--include-stale is given. Dumps written by apr (no manifest) use every .bin file found.
"""


def _write(path: Path, data: str | bytes) -> None:
    """Write a report atomically (temp + rename): a full disk or a kill leaves the previous
    report whole. Undecodable bytes of file names in the text are written as U+FFFD."""
    if file_kind(path) not in (None, "file"):
        raise OutputError(
            f"{path_text(path)} is a {file_kind(path)}, not a regular file; refusing to replace it",
            hint="give a new or regular file name",
        )
    if isinstance(data, str):
        data = text_for_output(data).encode("utf-8")
    remove_orphaned_temps(path)
    write_bytes_atomic(path, data)


def _pair_filter(stages_spec: str | None, layers_spec: str | None, steps_spec: str | None = None):
    """A PairKey predicate from --stages / --layers / --steps (None when none is given)."""
    if stages_spec is None and layers_spec is None and steps_spec is None:
        return None
    from aprtrace.decode import parse_steps
    from aprtrace.plan import parse_layers
    from aprtrace.stages import parse_stage_list

    names = {s.value for s in parse_stage_list(stages_spec, "--stages")} if stages_spec else None
    layers = parse_layers(layers_spec, "--layers") if layers_spec else None
    steps = parse_steps(steps_spec) if steps_spec else None

    def keep(key) -> bool:
        if names is not None and key.stage not in names:
            return False
        if steps is not None and key.step not in steps:
            return False
        return layers is None or key.layer is None or key.layer in layers

    return keep


def _pair_progress(path_a: Path, path_b: Path, select):
    """A progress bar over the file pairs on a terminal's stderr (large dumps take minutes)."""
    if not sys.stderr.isatty():
        return None, None
    files_a, files_b = list_stage_files(path_a), list_stage_files(path_b)
    total = sum(
        1 for rel in files_a.keys() & files_b.keys() if select is None or select(files_a[rel])
    )
    bar, task = stderr_progress("comparing stage files", total=total)
    return bar, lambda _pair: bar.advance(task)


def _console(wide: bool = False) -> Console:
    """The terminal's width; 120 columns when piped (--wide: 250, nothing is dropped)."""
    console = stdout_console()
    if wide:
        console = Console(highlight=False, width=max(console.width, 250))
    return console


def _file_pair(a: Path, b: Path, limit: int, as_json: bool, base: Tolerance, rules) -> int:
    result = diff_files(a, b, limit=limit, extended=True)
    # `layer-N/stage` patterns of --tol need the layer directory, as in directory mode.
    key = key_for(f"{b.parent.name}/{b.name}" if _LAYER_DIR.match(b.parent.name) else b.name)
    tol = tolerance_for(base, rules, key.stage, key.rel_stem)
    ok, reason = verdict(result.extended, tol)
    if as_json:
        click.echo(report.file_pair_json_text(result))
    else:
        word = "ok" if ok else "DIVERGED"
        click.echo(report.file_pair_text(result, f"verdict: {word}: {reason}"))
    return 0 if ok else EXIT_DIVERGED


def _localize(result, model_path: Path, arch: str | None):
    """Teacher forcing with ``--model`` (aprtrace.localize); warnings go to stderr."""
    from aprtrace.formats import load_model
    from aprtrace.localize import localize

    localization = localize(result, load_model(model_path, arch=arch))
    for w in localization.warnings:
        click.echo(f"warning: {w}", err=True)
    return localization


@dataclass
class DiffOptions:
    """Every option of ``diff --values`` except the two paths (shared with ``compare``)."""

    limit: int = 10
    as_json: bool = False
    atol: float = _T.atol
    rtol: float = _T.rtol
    cos_min: float = _T.cos_min
    tol_rules: tuple[str, ...] = ()
    fail_fast: bool = False
    html_path: Path | None = None
    plot_path: Path | None = None
    show_all: bool = False
    wide: bool = False
    model_path: Path | None = None
    arch: str | None = None
    metric: str = "rel-l2"
    stages_spec: str | None = None
    layers_spec: str | None = None
    steps_spec: str | None = None
    include_stale: bool = False
    only_common: bool = False


_DIFF_OPTIONS = [
    click.option(
        "--limit",
        default=10,
        show_default=True,
        type=click.IntRange(min=0, max=MAX_LIMIT),
        help=f"Top differences listed per pair (at most {MAX_LIMIT:,}; found by partial "
        "selection, memory grows with the limit, not the tensor).",
    ),
    click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="JSON on stdout (apr-stage-diff-v1 for a file pair, aprtrace-diff-v1 for dumps).",
    ),
    click.option(
        "--atol",
        type=float,
        default=_T.atol,
        show_default=True,
        help="Absolute tolerance on max|a-b|.",
    ),
    click.option(
        "--rtol",
        type=float,
        default=_T.rtol,
        show_default=True,
        help="Relative tolerance on max|a-b|, times max|a|.",
    ),
    click.option(
        "--cos-min",
        "cos_min",
        type=float,
        default=_T.cos_min,
        show_default=True,
        help="Minimum cosine similarity.",
    ),
    click.option(
        "--tol",
        "tol_rules",
        multiple=True,
        metavar="PATTERN:K=V[,K=V]",
        help="Per-stage tolerance override (repeatable).",
    ),
    click.option(
        "--fail-fast",
        is_flag=True,
        help="Stop at the first pair out of tolerance (directory mode).",
    ),
    click.option(
        "--html",
        "html_path",
        type=click.Path(path_type=Path),
        help="Write a self-contained HTML report (directory mode).",
    ),
    click.option(
        "--plot",
        "plot_path",
        type=click.Path(path_type=Path),
        help="Write the heatmap as .svg or .png (directory mode).",
    ),
    click.option(
        "--all",
        "show_all",
        is_flag=True,
        help="Print every pair's row; by default only the pairs out of tolerance are listed "
        "(after the summary, the first divergence and the stages adding the most error).",
    ),
    click.option(
        "-w",
        "--wide",
        is_flag=True,
        help="Table with every column (rms, ULP max/median, full verdict reasons); by default "
        "the least important columns are dropped to fit the terminal.",
    ),
    click.option(
        "--model",
        "model_path",
        type=click.Path(path_type=Path),
        help="Model B was traced from (GGUF, APR or safetensors): adds local/inherited error "
        "per stage by re-running it on B's inputs (directory mode).",
    ),
    click.option(
        "--metric",
        type=click.Choice(report.HEATMAP_METRICS),
        default="rel-l2",
        show_default=True,
        help="Heatmap metric for --html/--plot.",
    ),
    click.option(
        "--stages",
        "stages_spec",
        metavar="STAGES",
        help="Directory mode: compare only these stages (comma list, as --save-tensor).",
    ),
    click.option(
        "--layers",
        "layers_spec",
        metavar="LAYERS",
        help="Directory mode: compare only these layers (as --save-tensor-layers; whole-model "
        "stages are kept).",
    ),
    click.option(
        "--steps",
        "steps_spec",
        metavar="STEPS",
        help="Directory mode, dumps traced with --decode: compare only these passes (0 = the "
        "prompt, k = DIR/decode-k; as --save-tensor-layers: 0..3 is 0, 1, 2).",
    ),
    click.option(
        "--include-stale",
        is_flag=True,
        help="Also compare .bin files a dump's manifest.json does not list (stale files).",
    ),
    click.option(
        "--only-common",
        is_flag=True,
        help="Files on one side only are listed but do not make the verdict INCOMPLETE "
        "(e.g. an aprtrace dump against apr's 16 classic stages).",
    ),
]


def diff_options(command):
    """Add every DiffOptions option to a click command (``diff`` and ``compare``)."""
    for option in reversed(_DIFF_OPTIONS):
        command = option(command)
    return command


def options_from(params: dict) -> DiffOptions:
    """The DiffOptions among a command's parsed parameters."""
    names = {f.name for f in fields(DiffOptions)}
    return DiffOptions(**{k: v for k, v in params.items() if k in names})


@click.command("diff", help=HELP)
@click.option(
    "--values",
    "values_flag",
    is_flag=True,
    help="Compare tensor values (apr's flag; the only mode).",
)
@click.argument("path_a", metavar="A", type=click.Path(path_type=Path))
@click.argument("path_b", metavar="B", type=click.Path(path_type=Path))
@diff_options
@click.option(
    "--arch",
    help="Architecture of --model when the file does not name one (APR): llama, qwen2, qwen3, "
    "gemma2, gemma3.",
)
@click.pass_context
def diff_command(ctx: click.Context, values_flag: bool, path_a: Path, path_b: Path, **params):
    ctx.exit(run_diff(path_a, path_b, options_from(params)))


def run_diff(path_a: Path, path_b: Path, opts: DiffOptions) -> int:
    """Compare two APRT files or two dumps, render the result, return the exit code."""
    select = _pair_filter(opts.stages_spec, opts.layers_spec, opts.steps_spec)
    for name in ("atol", "rtol", "cos_min"):
        check_tolerance_value(name, getattr(opts, name), f"--{name.replace('_', '-')}")
    base = Tolerance(atol=opts.atol, rtol=opts.rtol, cos_min=opts.cos_min)
    rules = [parse_tol_override(spec) for spec in opts.tol_rules]
    for rule in rules:
        check_tol_pattern(rule)
    html_path, plot_path, model_path = opts.html_path, opts.plot_path, opts.model_path
    if plot_path is not None and plot_path.suffix.lower() not in (".svg", ".png"):
        raise ValidationError(
            f"--plot {plot_path}: unsupported extension", hint="use a .svg or .png file name"
        )
    for side, p in (("A", path_a), ("B", path_b)):
        if not p.exists():
            raise NotFoundError(f"{side}: {p} does not exist")
    for flag, out in (("--html", html_path), ("--plot", plot_path)):
        if out is not None and not out.parent.is_dir():
            # Fail before the (possibly long) comparison, not after it.
            raise OutputError(
                f"{flag} {out}: directory {out.parent} does not exist",
                hint=f"create it first (mkdir -p {out.parent}) or choose another path",
            )
    if model_path is not None and not model_path.exists():
        raise NotFoundError(f"--model: {model_path} does not exist")
    if path_a.is_file() and path_b.is_file():
        if html_path or plot_path or opts.fail_fast or model_path or select:
            raise ValidationError(
                "--html, --plot, --fail-fast, --model, --stages, --layers and --steps need two "
                "dump directories, not two files"
            )
        return _file_pair(path_a, path_b, opts.limit, opts.as_json, base, rules)
    if path_a.is_dir() != path_b.is_dir():
        raise ValidationError(
            f"cannot compare a file with a directory ({path_a}, {path_b})",
            hint="pass two APRT files or two dump directories",
        )
    bar, advance = _pair_progress(path_a, path_b, select)
    with bar if bar is not None else contextlib.nullcontext():
        result = diff_dirs(
            path_a,
            path_b,
            base,
            rules,
            limit=opts.limit,
            fail_fast=opts.fail_fast,
            on_pair=advance,
            select=select,
            include_stale=opts.include_stale,
        )
    result.one_sided_ok = opts.only_common
    result.warnings.extend(unmatched_tol_warnings(rules, result.pairs))
    localization = _localize(result, model_path, opts.arch) if model_path is not None else None
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    if opts.as_json:
        click.echo(report.to_json_text(report.dir_json(result, localization)))
    else:
        report.render_dir_table(
            result,
            _console(opts.wide),
            wide=opts.wide,
            localization=localization,
            show_all=opts.show_all,
        )
    if html_path is not None:
        _write(html_path, report.html_report(result, opts.metric, localization))
        click.echo(f"wrote {html_path}", err=True)
    if plot_path is not None:
        if plot_path.suffix.lower() == ".png":
            _write(plot_path, report.heatmap_png(result, opts.metric))
        else:
            _write(plot_path, report.heatmap_svg(result, opts.metric))
        click.echo(f"wrote {plot_path}", err=True)
    if result.incomparable:
        first = result.incomparable[0]
        raise ValidationError(
            f"{len(result.incomparable)} pair(s) cannot be compared; first: {first.error}",
            hint="both dumps must come from the same model shape and prompt",
        )
    sys.stdout.flush()
    return result.verdict.exit_code


__all__ = ["DiffOptions", "diff_command", "diff_options", "run_diff"]
