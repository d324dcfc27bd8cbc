"""One traced run: model + token ids + plan -> stage files, statistics and a manifest."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np

from aprtrace.atomic import write_bytes_atomic
from aprtrace.capture import CaptureLog, maybe_save_stage
from aprtrace.decode import DecodeRun
from aprtrace.errors import ModelLoadError, OutputError, ValidationError
from aprtrace.forward import Progress, check_token_ids, forward
from aprtrace.model import Model
from aprtrace.outdir import open_output
from aprtrace.plan import SavePlan
from aprtrace.stages import Stage, stages_for

MANIFEST_NAME = "manifest.json"
# |x| above the float16 maximum is flagged: such values overflow any fp16 kernel, and real
# models stay below it (their "massive activations" in the residual reach about 1e4).
LARGE_VALUE = 65504.0


@dataclass
class StageStats:
    """Summary of one captured buffer, as in ``apr trace --payload``."""

    stage: str
    layer: int | None
    shape: list[int]
    count: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    nan: int
    inf: int
    anomalies: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def stage_stats(stage: Stage, layer: int | None, values: np.ndarray) -> StageStats:
    """Mean/std/min/max over finite values (f64 accumulation), NaN/Inf counts, anomaly flags."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    # min and max first: when both are finite there is no NaN or Inf to count (the usual case
    # saves two passes and their boolean temporaries).
    extremes = (flat.min(), flat.max()) if flat.size else None
    all_finite = extremes is None or bool(np.isfinite(extremes).all())
    nan = 0 if all_finite else int(np.count_nonzero(np.isnan(flat)))
    inf = 0 if all_finite else int(np.count_nonzero(np.isinf(flat)))
    finite = flat if nan == 0 and inf == 0 else flat[np.isfinite(flat)]
    anomalies = []
    if nan:
        anomalies.append(f"{nan} NaN")
    if inf:
        anomalies.append(f"{inf} Inf")
    if finite.size:
        # f64 accumulation without an f64 copy of the buffer
        mean, std = finite.mean(dtype=np.float64), finite.std(dtype=np.float64)
        lo, hi = map(float, extremes if all_finite else (finite.min(), finite.max()))
        if lo == 0.0 and hi == 0.0:
            anomalies.append("all zero")
        elif max(abs(lo), abs(hi)) > LARGE_VALUE:
            anomalies.append(f"|x| > {LARGE_VALUE:g}")
        return StageStats(
            stage.value,
            layer,
            list(np.shape(values)),
            int(flat.size),
            _finite_or_none(mean),
            _finite_or_none(std),
            lo,
            hi,
            nan,
            inf,
            anomalies,
        )
    if flat.size and not anomalies:
        anomalies.append("no finite values")
    return StageStats(
        stage.value,
        layer,
        list(np.shape(values)),
        int(flat.size),
        None,
        None,
        None,
        None,
        nan,
        inf,
        anomalies,
    )


@dataclass
class TraceResult:
    token_ids: list[int]
    logits: np.ndarray
    log: CaptureLog
    stats: list[StageStats]
    first_nonfinite: tuple[str, int | None] | None
    seconds: float
    stale_files: list[Path] = field(default_factory=list)
    manifest_path: Path | None = None
    # With --decode: the steps, the statistics of each step's pass (step -> stats) and the
    # first non-finite capture of each step that has one (step -> (stage, layer)).
    decode: DecodeRun | None = None
    step_stats: dict[int, list[StageStats]] = field(default_factory=dict)
    step_nonfinite: dict[int, tuple[str, int | None]] = field(default_factory=dict)
    # Staging directories and temporaries that killed runs left in DIR, removed by this run.
    leftovers_removed: list[Path] = field(default_factory=list)


def cache_dir() -> Path:
    """aprtrace's cache (``$APRTRACE_CACHE`` or ``~/.cache/aprtrace``)."""
    return Path(os.environ.get("APRTRACE_CACHE") or Path.home() / ".cache" / "aprtrace")


class _Sha256InBackground:
    """The model's sha256 for the manifest, hashed on another thread while the forward pass
    runs (hashlib frees the GIL). Digests are remembered per (path, size, mtime) so a model
    that is traced again is not read again (8 GB of hashing costs about 7 s of CPU).
    """

    def __init__(self, path: Path):
        self.digest: str | None = None
        self._thread = threading.Thread(target=self._run, args=(Path(path),), daemon=True)
        self._thread.start()

    @staticmethod
    def _files(path: Path) -> list[Path]:
        return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]

    def _run(self, path: Path) -> None:
        try:
            files = self._files(path)
            stamp = [(str(f.resolve()), (st := f.stat()).st_size, st.st_mtime_ns) for f in files]
            key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()
            memo = cache_dir() / "sha256" / key
            if memo.is_file():
                text = memo.read_text().strip()
                if len(text) == 64:
                    self.digest = text
                    return
            h = hashlib.sha256()
            for file in files:
                with open(file, "rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
            self.digest = h.hexdigest()
            write_bytes_atomic(memo, self.digest.encode())
        except (OSError, OutputError):
            return  # the manifest then says sha256: null; the trace itself is unaffected

    def result(self) -> str | None:
        self._thread.join()
        return self.digest


def planned_paths(
    plan: SavePlan, model: Model, layers: tuple[int, ...], decode_steps: int = 0
) -> list[str]:
    """Relative paths (posix) a run of ``plan`` over ``layers`` may write, in forward order:
    the prompt pass at the root, then each decode step k under ``decode-k/``."""
    from aprtrace.decode import step_dir

    rels = []
    for stage in stages_for(model.config):
        if stage not in plan.stages:
            continue
        if not stage.per_layer:
            rels.append(f"{stage.value}.bin")
            continue
        for layer in (0,) if stage is Stage.EMBEDDING else layers:
            if layer in layers:
                rels.append(f"layer-{layer}/{stage.value}.bin")
    return rels + [f"{step_dir(k)}/{rel}" for k in range(1, decode_steps + 1) for rel in rels]


ENGINES = ("numpy", "transformers", "llama.cpp")
# Suffix of the default output directory per engine (numpy keeps apr's `<stem>-trace`).
ENGINE_DIR_SUFFIX = {"numpy": "", "transformers": "-transformers", "llama.cpp": "-llamacpp"}


def engine_forward(engine: str):
    """The forward function of an engine; all share ``forward``'s signature and emit contract."""
    if engine == "numpy":
        return forward
    if engine == "transformers":
        from aprtrace.engines.transformers import hf_forward

        return hf_forward
    if engine == "llama.cpp":
        from aprtrace.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine()  # a fresh one per run: it keeps the run's manifest_info
    raise ValidationError(f"unknown engine '{engine}'", hint=f"choose one of {', '.join(ENGINES)}")


def run_trace(
    model: Model,
    token_ids: list[int],
    plan: SavePlan | None,
    *,
    prompt: str | None = None,
    collect_stats: bool = True,
    progress: Progress | None = None,
    clean: bool = False,
    engine: str = "numpy",
    timing_only: bool = False,
    tokenizer: dict | None = None,
    decode: int = 0,
    decode_tokens: list[int] | None = None,
) -> TraceResult:
    """Run the forward pass, write the planned stage files, then the manifest (last).

    ``engine`` is ``numpy`` (aprtrace's own forward pass), ``transformers`` (Hugging Face
    transformers on the same decoded weights) or ``llama.cpp`` (llama.cpp's own graph nodes,
    GGUF only), each a dump in the same layout. ``tokenizer`` (which tokenizer made the ids)
    goes into the manifest. ``decode`` steps follow the prompt pass through a KV cache
    (``DIR/decode-k/``), feeding ``decode_tokens`` when given (teacher forcing), else each
    step's greedy argmax. ``timing_only`` (without a plan or decode steps): capture nothing,
    not even the NaN/Inf check of each stage, so ``seconds`` is the forward pass alone; only
    non-finite logits are reported.

    Every input is checked before ``plan.out_dir`` is touched; the stage files are written
    into a staging directory there and moved into place only when the forward pass
    succeeded (``aprtrace.outdir``), so a failed or interrupted run leaves the previous dump
    as it was.
    """
    if timing_only and (plan is not None or decode or decode_tokens is not None):
        raise ValidationError(
            "a timing-only run captures nothing: give neither --save-tensor nor --decode"
        )
    run_forward = engine_forward(engine)
    if decode or decode_tokens is not None:
        engine_decode(engine)  # an engine without decode is refused before the output dir
    if hasattr(run_forward, "check_model"):
        run_forward.check_model(model)  # an engine's refusal comes before the output dir
    # Every input is checked before the output directory is touched.
    check_token_ids(model.config, token_ids)
    if prompt is not None:
        check_prompt_text(prompt)
    if decode_tokens is not None:
        check_token_ids(model.config, decode_tokens)
    run = partial(
        _run, model, token_ids, prompt=prompt, collect_stats=collect_stats, progress=progress,
        engine=engine, run_forward=run_forward, tokenizer=tokenizer, decode=decode,
        decode_tokens=decode_tokens, timing_only=timing_only,
    )  # fmt: skip
    if plan is None:
        return run(None, None, ())
    layers = plan.layers.resolve(model.config.num_layers)
    steps = decode or (len(decode_tokens) if decode_tokens else 0)
    output = open_output(plan.out_dir, planned_paths(plan, model, layers, steps), clean)
    try:
        return run(plan, output, layers)
    finally:
        output.close()


def _run(
    model, token_ids, plan, output, layers, *, prompt, collect_stats, progress, engine,
    run_forward, tokenizer, decode, decode_tokens, timing_only,
):  # fmt: skip
    """The forward pass into ``output``'s staging directory, then the commit."""
    staged_plan = replace(plan, out_dir=output.staging) if plan is not None else None
    hasher = _Sha256InBackground(model.path) if plan is not None else None
    log = CaptureLog()
    stats: list[StageStats] = []
    first_bad: list[tuple[str, int | None]] = []

    def emit(stage: Stage, layer: int | None, values: np.ndarray) -> None:
        maybe_save_stage(staged_plan, stage, layer, values, log)
        if collect_stats:
            stats.append(stage_stats(stage, layer, values))
            if not first_bad and (stats[-1].nan or stats[-1].inf):
                first_bad.append((stage.value, layer))
        elif not first_bad and not np.isfinite(values).all():
            first_bad.append((stage.value, layer))

    def wants(stage: Stage, layer: int | None) -> bool:
        # The statistics table covers every stage; otherwise only what the plan writes.
        return collect_stats or (plan is not None and plan.wants(stage, layer))

    start = time.perf_counter()
    decoded, step_stats, step_bad = None, {}, {}
    if decode or decode_tokens is not None:
        decoded, step_stats, step_bad = _decode_passes(
            engine,
            model,
            token_ids,
            staged_plan,
            log,
            emit,
            progress,
            decode,
            decode_tokens,
            collect_stats,
        )
        logits = decoded.logits[0]
    elif timing_only:
        logits = run_forward(model, token_ids, None, progress, None)
        if not np.isfinite(logits).all():
            first_bad.append((Stage.LM_HEAD.value, None))
    else:
        logits = run_forward(model, token_ids, emit, progress, wants)
    seconds = time.perf_counter() - start

    result = TraceResult(
        token_ids=list(map(int, token_ids)),
        logits=logits,
        log=log,
        stats=stats,
        first_nonfinite=first_bad[0] if first_bad else None,
        seconds=seconds,
        decode=decoded,
        step_stats=step_stats,
        step_nonfinite=step_bad,
    )
    if plan is None:
        return result
    # The manifest's data (and the model's hash) is ready before the dump is changed, so the
    # commit is renames only.
    final = [replace(f, path=plan.out_dir / f.path.relative_to(output.staging)) for f in log.files]
    data = _manifest_data(model, plan, layers, token_ids, prompt, final, hasher, engine, decoded)
    data.update(getattr(run_forward, "manifest_info", None) or {})  # engine provenance
    if tokenizer is not None:
        data["tokenizer"] = tokenizer
    staged = [f.path for f in log.files]
    before = output.existing_stage_files()
    output.commit(staged)
    log.files[:] = final
    written = {f.path for f in final}
    deleted = {plan.out_dir / d.rel for d in output.deletions}
    result.stale_files = [p for p in before if p not in written and p not in deleted]
    result.leftovers_removed = list(output.orphans_removed)
    from aprtrace.manifest import write_manifest

    result.manifest_path = write_manifest(plan.out_dir, data)
    return result


def _manifest_data(model, plan, layers, token_ids, prompt, files, hasher, engine, decoded) -> dict:
    from aprtrace.manifest import build_manifest_data

    return build_manifest_data(
        out_dir=plan.out_dir,
        model_path=Path(model.path),
        model_format=model.format,
        architecture=model.config.architecture,
        config=model.config.to_dict(),
        prompt=prompt,
        token_ids=token_ids,
        stages=[s.value for s in stages_for(model.config) if s in plan.stages],
        layers=layers,
        files=files,
        digest=hasher.result() if hasher else None,
        engine=engine,
        decode=decode_manifest(decoded) if decoded is not None else None,
    )


# --- decode (issue 12): N steps through a KV cache after the prompt pass -------------------


def engine_decode(engine: str):
    """The decode function of an engine (``aprtrace.decode.numpy_decode``'s signature)."""
    if engine == "numpy":
        from aprtrace.decode import numpy_decode

        return numpy_decode
    if engine == "transformers":
        from aprtrace.engines.transformers import hf_decode

        return hf_decode
    if engine in ENGINES:
        raise ValidationError(
            f"--decode is not implemented for the {engine} engine yet",
            hint="trace the decode steps with --engine numpy or --engine transformers",
        )
    raise ValidationError(f"unknown engine '{engine}'", hint=f"choose one of {', '.join(ENGINES)}")


def _decode_passes(
    engine, model, token_ids, plan, log, emit, progress, steps, forced, collect_stats
) -> tuple[DecodeRun, dict[int, list[StageStats]], dict[int, tuple[str, int | None]]]:
    """The prompt pass through ``emit`` (the dump root), then each step k into ``decode-k/``."""
    from dataclasses import replace

    from aprtrace.decode import step_dir

    if forced is not None and not steps:
        steps = len(forced)
    step_stats: dict[int, list[StageStats]] = {}
    step_bad: dict[int, tuple[str, int | None]] = {}

    def emit_for(step: int):
        if step == 0:
            return emit
        step_plan = replace(plan, out_dir=plan.out_dir / step_dir(step)) if plan else None
        stats = step_stats.setdefault(step, [])

        def emit_step(stage: Stage, layer: int | None, values: np.ndarray) -> None:
            maybe_save_stage(step_plan, stage, layer, values, log)
            if collect_stats:
                stats.append(stage_stats(stage, layer, values))
            if step not in step_bad and not np.isfinite(values).all():
                step_bad[step] = (stage.value, layer)

        return emit_step

    run = engine_decode(engine)(model, token_ids, steps, emit_for, progress, forced)
    return run, step_stats, step_bad


def decode_manifest(run: DecodeRun) -> dict:
    """The manifest's ``decode`` object: how each step's token was chosen and where it ran."""
    return {
        "mode": "forced" if run.forced else "greedy",
        "prompt_argmax": run.prompt_argmax,
        "steps": [s.to_dict() for s in run.steps],
    }


@dataclass
class DecodeCapture:
    """``capture_decode``'s result: ``stages[0]`` is the prompt pass, ``stages[k]`` step k."""

    token_ids: list[int]
    steps: list  # aprtrace.decode.DecodeStep, one per step 1..N
    stages: list[dict[tuple[str, int | None], np.ndarray]]
    logits: list[np.ndarray]


def capture_decode(
    model: Model,
    prompt: str | list[int],
    steps: int,
    *,
    tokens: list[int] | None = None,
    engine: str = "numpy",
    add_bos: bool = False,
) -> DecodeCapture:
    """Every stage of the prompt pass and of ``steps`` decode steps, in memory.

    Step k feeds ``tokens[k-1]`` when given (teacher forcing), else the argmax of step k-1.
    Inside a step arrays hold the one new position (``[1, dim]``, maps ``[heads, 1, n+k]``).
    """
    ids = encode_prompt(model, prompt, add_bos) if isinstance(prompt, str) else list(prompt)
    passes: list[dict[tuple[str, int | None], np.ndarray]] = []

    def emit_for(step: int):
        passes.append({})
        out = passes[-1]

        def keep(stage: Stage, layer: int | None, values: np.ndarray) -> None:
            out[(stage.value, layer)] = np.array(values, dtype=np.float32, copy=True)

        return keep

    run = engine_decode(engine)(model, ids, steps, emit_for, None, tokens)
    return DecodeCapture(ids, run.steps, passes, run.logits)


# --- end decode -----------------------------------------------------------------------------


def capture_stages(
    model: Model,
    prompt: str | list[int],
    *,
    engine: str = "numpy",
    add_bos: bool = False,
) -> dict[tuple[str, int | None], np.ndarray]:
    """Every stage of one forward pass in memory: ``{(stage name, layer): array}``.

    ``prompt`` is text (encoded with the model's tokenizer) or a list of token ids; layer is
    None for the whole-model stages. Arrays have the APRT layout (``[seq, dim]`` etc.).
    """
    ids = encode_prompt(model, prompt, add_bos) if isinstance(prompt, str) else list(prompt)
    out: dict[tuple[str, int | None], np.ndarray] = {}

    def keep(stage: Stage, layer: int | None, values: np.ndarray) -> None:
        out[(stage.value, layer)] = np.array(values, dtype=np.float32, copy=True)

    engine_forward(engine)(model, ids, keep)
    return out


def encode_prompt(model: Model, prompt: str, add_bos: bool) -> list[int]:
    """Token ids of ``prompt`` with the model's own tokenizer (no BOS unless asked, as apr)."""
    if model.tokenizer is None:
        raise ValidationError(
            f"{model.path} has no tokenizer", hint="pass the token ids with --tokens 1,2,3"
        )
    check_prompt_text(prompt)
    try:
        ids = list(model.tokenizer.encode(prompt, add_special_tokens=False).ids)
    except BaseException as exc:
        from aprtrace.tokenizer import is_rust_panic

        if not isinstance(exc, Exception) and not is_rust_panic(exc):
            raise
        raise ModelLoadError(
            f"{model.path}: the model's tokenizer failed on the prompt: {str(exc)[:200]}",
            hint="the tokenizer data is damaged; pass the token ids with --tokens",
        ) from None
    if add_bos:
        bos = model.config.bos_token_id
        if bos is None:
            raise ValidationError("--bos given but the model defines no BOS token id")
        ids.insert(0, bos)
    return ids


def check_prompt_text(prompt: str) -> None:
    """A prompt must be text: bytes that are not UTF-8 (kept by Python as lone surrogates,
    e.g. from ``--prompt $'abc\\xff'``) cannot be tokenized or stored in the manifest."""
    if not isinstance(prompt, str):
        raise ValidationError(f"the prompt must be text, not {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = prompt[exc.start : exc.end].encode("utf-8", "surrogateescape")
        raise ValidationError(
            f"--prompt is not valid UTF-8 (byte {raw[:1].hex()} at character {exc.start})",
            hint="pass UTF-8 text, or the token ids with --tokens",
        ) from None


# No vocabulary reaches 2^31 ids; larger numbers are refused before anything is sized by them.
MAX_TOKEN_ID = (1 << 31) - 1


_TOKEN_ID = re.compile(r"^[0-9]+$")  # ASCII digits only: no '1_000', no full-width digits


def parse_token_list(spec: str, flag: str = "--tokens") -> list[int]:
    """``--tokens 1,2,3`` -> [1, 2, 3]; blanks around an id are allowed, nothing else
    (``flag`` names the option in errors)."""
    hint = f"give comma-separated ASCII integers, e.g. {flag} 3838,374"
    items = [t.strip() for t in spec.split(",")]
    if all(not t for t in items):
        raise ValidationError(f"{flag} is empty", hint="give comma-separated integers")
    ids = []
    for item in items:
        if not item:
            raise ValidationError(f"invalid {flag} '{spec[:80]}': empty item", hint=hint)
        if item.startswith("-") and _TOKEN_ID.match(item[1:]):
            raise ValidationError(f"invalid {flag} '{spec[:80]}': token ids are >= 0")
        if not _TOKEN_ID.match(item):
            raise ValidationError(
                f"invalid {flag} '{spec[:80]}': '{item[:24]}' is not a token id", hint=hint
            )
        # Sized by digit count first, so a 5000-digit id is never converted.
        if len(item.lstrip("0")) > len(str(MAX_TOKEN_ID)) or int(item) > MAX_TOKEN_ID:
            raise ValidationError(
                f"invalid {flag}: token id {item[:24]} is too large",
                hint=f"token ids are 0..{MAX_TOKEN_ID} and must be inside the model's vocabulary",
            )
        ids.append(int(item))
    return ids
