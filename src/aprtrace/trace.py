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
) -> TraceResult:
    """Run the forward pass, write the planned stage files, then the manifest (last).

    ``engine`` is ``numpy`` (aprtrace's own forward pass), ``transformers`` (Hugging Face
    transformers on the same decoded weights) or ``llama.cpp`` (llama.cpp's own graph nodes,
    GGUF only), each a dump in the same layout. ``tokenizer`` (which tokenizer made the ids)
    goes into the manifest. ``timing_only`` (without a plan): capture nothing, not even the
    NaN/Inf check of each stage, so ``seconds`` is the forward pass alone; only non-finite
    logits are reported.
    """
    if timing_only and plan is not None:
        raise ValidationError("a timing-only run writes no stage files: give no --save-tensor")
    run_forward = engine_forward(engine)
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
    if timing_only:
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
    )
    if plan is not None:
        extra = dict(getattr(run_forward, "manifest_info", None) or {})
        if tokenizer is not None:
            extra["tokenizer"] = tokenizer
        result.manifest_path = _write_manifest(
            model, plan, layers, token_ids, prompt, log, hasher, engine, extra
        )
    return result


def _write_manifest(model, plan, layers, token_ids, prompt, log, hasher, engine, extra) -> Path:
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
    )
    data.update(extra)  # engine provenance (llama.cpp build, not_captured, ...)
    return write_manifest(plan.out_dir, data)


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


def parse_token_list(spec: str) -> list[int]:
    """``--tokens 1,2,3`` -> [1, 2, 3]."""
    try:
        ids = [int(t) for t in spec.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise ValidationError(
            f"invalid --tokens '{spec}'",
            hint="give comma-separated integers, e.g. --tokens 3838,374",
        ) from None
    if not ids:
        raise ValidationError("--tokens is empty", hint="give comma-separated integers")
    if any(i < 0 for i in ids):
        raise ValidationError(f"invalid --tokens '{spec}': token ids are >= 0")
    return ids
