"""One traced run: model + token ids + plan -> stage files, statistics and a manifest."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from aprtrace.atomic import write_bytes_atomic
from aprtrace.capture import CaptureLog, maybe_save_stage
from aprtrace.decode import DecodeRun
from aprtrace.errors import OutputError, ValidationError
from aprtrace.forward import Progress, forward
from aprtrace.model import Model
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


def prepare_out_dir(plan: SavePlan, clean: bool) -> list[Path]:
    """Make the output directory writable and forget the old manifest; return old .bin files.

    With ``clean``, files listed by an earlier aprtrace manifest are removed (nothing else).
    """
    out = plan.out_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".aprtrace-write-test-{np.random.default_rng().integers(1 << 30)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(
            f"cannot write to output directory {out}: {exc.strerror or exc}",
            hint="choose another --save-tensor-dir or fix its permissions",
        ) from exc
    manifest = out / MANIFEST_NAME
    if clean and manifest.exists():
        from aprtrace.manifest import read_manifest

        old = read_manifest(out)
        if old is not None:
            for entry in old.files:
                target = (out / entry.path).resolve()
                if target.is_file() and out.resolve() in target.parents:
                    target.unlink()
    if manifest.exists():
        try:
            manifest.unlink()  # a dump without a manifest is known to be incomplete
        except OSError as exc:
            raise OutputError(f"cannot remove stale {manifest}: {exc.strerror or exc}") from exc
    return sorted(out.rglob("*.bin"))


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
    if plan is not None:
        layers = plan.layers.resolve(model.config.num_layers)
        existing = prepare_out_dir(plan, clean)
    else:
        layers, existing = (), []
    hasher = _Sha256InBackground(model.path) if plan is not None else None

    log = CaptureLog()
    stats: list[StageStats] = []
    first_bad: list[tuple[str, int | None]] = []

    def emit(stage: Stage, layer: int | None, values: np.ndarray) -> None:
        maybe_save_stage(plan, stage, layer, values, log)
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
            plan,
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

    written = {f.path.resolve() for f in log.files}
    stale = [p for p in existing if p.resolve() not in written]
    result = TraceResult(
        token_ids=list(map(int, token_ids)),
        logits=logits,
        log=log,
        stats=stats,
        first_nonfinite=first_bad[0] if first_bad else None,
        seconds=seconds,
        stale_files=stale,
        decode=decoded,
        step_stats=step_stats,
        step_nonfinite=step_bad,
    )
    if plan is not None:
        extra = dict(getattr(run_forward, "manifest_info", None) or {})
        if tokenizer is not None:
            extra["tokenizer"] = tokenizer
        result.manifest_path = _write_manifest(
            model, plan, layers, token_ids, prompt, log, hasher, engine, extra, decoded
        )
    return result


def _write_manifest(
    model, plan, layers, token_ids, prompt, log, hasher, engine, extra, decoded=None
) -> Path:
    from aprtrace.manifest import build_manifest_data, write_manifest

    data = build_manifest_data(
        out_dir=plan.out_dir,
        model_path=Path(model.path),
        model_format=model.format,
        architecture=model.config.architecture,
        config=model.config.to_dict(),
        prompt=prompt,
        token_ids=token_ids,
        stages=[s.value for s in stages_for(model.config) if s in plan.stages],
        layers=layers,
        files=log.files,
        digest=hasher.result() if hasher else None,
        engine=engine,
        decode=decode_manifest(decoded) if decoded is not None else None,
    )
    data.update(extra)  # engine provenance (llama.cpp build, not_captured, ...)
    return write_manifest(plan.out_dir, data)


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
    ids = list(model.tokenizer.encode(prompt, add_special_tokens=False).ids)
    if add_bos:
        bos = model.config.bos_token_id
        if bos is None:
            raise ValidationError("--bos given but the model defines no BOS token id")
        ids.insert(0, bos)
    return ids


def parse_token_list(spec: str, flag: str = "--tokens") -> list[int]:
    """``--tokens 1,2,3`` -> [1, 2, 3] (``flag`` names the option in errors)."""
    try:
        ids = [int(t) for t in spec.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise ValidationError(
            f"invalid {flag} '{spec}'",
            hint=f"give comma-separated integers, e.g. {flag} 3838,374",
        ) from None
    if not ids:
        raise ValidationError(f"{flag} is empty", hint="give comma-separated integers")
    if any(i < 0 for i in ids):
        raise ValidationError(f"invalid {flag} '{spec}': token ids are >= 0")
    return ids
