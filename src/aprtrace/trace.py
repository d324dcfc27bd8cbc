"""One traced run: model + token ids + plan -> stage files, statistics and a manifest."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np

from aprtrace.atomic import write_bytes_atomic
from aprtrace.capture import CaptureLog, maybe_save_stage
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
    nan = int(np.count_nonzero(np.isnan(flat)))
    inf = int(np.count_nonzero(np.isinf(flat)))
    finite = flat if nan == 0 and inf == 0 else flat[np.isfinite(flat)]
    anomalies = []
    if nan:
        anomalies.append(f"{nan} NaN")
    if inf:
        anomalies.append(f"{inf} Inf")
    if finite.size:
        # f64 accumulation without an f64 copy of the buffer
        mean, std = finite.mean(dtype=np.float64), finite.std(dtype=np.float64)
        lo, hi = float(finite.min()), float(finite.max())
        if not np.any(finite):
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


def planned_paths(plan: SavePlan, model: Model, layers: tuple[int, ...]) -> list[str]:
    """Relative paths (posix) a run of ``plan`` over ``layers`` may write, in forward order."""
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
    return rels


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
    tokenizer: dict | None = None,
) -> TraceResult:
    """Run the forward pass, write the planned stage files, then the manifest (last).

    ``engine`` is ``numpy`` (aprtrace's own forward pass), ``transformers`` (Hugging Face
    transformers on the same decoded weights) or ``llama.cpp`` (llama.cpp's own graph nodes,
    GGUF only), each a dump in the same layout. ``tokenizer`` (which tokenizer made the ids)
    goes into the manifest.

    Every input is checked before ``plan.out_dir`` is touched; the stage files are written
    into a staging directory there and moved into place only when the forward pass
    succeeded (``aprtrace.outdir``), so a failed or interrupted run leaves the previous dump
    as it was.
    """
    run_forward = engine_forward(engine)
    if hasattr(run_forward, "check_model"):
        run_forward.check_model(model)  # an engine's refusal comes before the output dir
    # Every input is checked before the output directory is touched.
    check_token_ids(model.config, token_ids)
    if prompt is not None:
        check_prompt_text(prompt)
    run = partial(
        _run, model, token_ids, prompt=prompt, collect_stats=collect_stats, progress=progress,
        engine=engine, run_forward=run_forward, tokenizer=tokenizer,
    )  # fmt: skip
    if plan is None:
        return run(None, None, ())
    layers = plan.layers.resolve(model.config.num_layers)
    output = open_output(plan.out_dir, planned_paths(plan, model, layers), clean)
    try:
        return run(plan, output, layers)
    finally:
        output.close()


def _run(
    model, token_ids, plan, output, layers, *, prompt, collect_stats, progress, engine,
    run_forward, tokenizer,
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

    start = time.perf_counter()
    logits = run_forward(model, token_ids, emit, progress)
    seconds = time.perf_counter() - start

    result = TraceResult(
        token_ids=list(map(int, token_ids)),
        logits=logits,
        log=log,
        stats=stats,
        first_nonfinite=first_bad[0] if first_bad else None,
        seconds=seconds,
    )
    if plan is None:
        return result
    # The manifest's data (and the model's hash) is ready before the dump is changed, so the
    # commit is renames only.
    final = [replace(f, path=plan.out_dir / f.path.relative_to(output.staging)) for f in log.files]
    data = _manifest_data(model, plan, layers, token_ids, prompt, final, hasher, engine)
    data.update(getattr(run_forward, "manifest_info", None) or {})  # engine provenance
    if tokenizer is not None:
        data["tokenizer"] = tokenizer
    staged = [f.path for f in log.files]
    before = output.existing_stage_files()
    output.commit(staged)
    log.files[:] = final
    written = {f.path for f in final}
    deleted = {
        plan.out_dir / (f"{d.dir_rel}/{d.name}" if d.dir_rel else d.name) for d in output.deletions
    }
    result.stale_files = [p for p in before if p not in written and p not in deleted]
    result.leftovers_removed = list(output.orphans_removed)
    from aprtrace.manifest import write_manifest

    result.manifest_path = write_manifest(plan.out_dir, data)
    return result


def _manifest_data(model, plan, layers, token_ids, prompt, files, hasher, engine) -> dict:
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
    )


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


def parse_token_list(spec: str) -> list[int]:
    """``--tokens 1,2,3`` -> [1, 2, 3]."""
    items = [t for t in spec.replace(" ", "").split(",") if t != ""]
    for t in items:
        digits = t.lstrip("+-").lstrip("0")
        if t.isascii() and len(digits) > len(str(MAX_TOKEN_ID)):
            raise ValidationError(
                f"invalid --tokens '{spec[:80]}': token id {t[:24]}... is too large",
                hint=f"token ids are 0..{MAX_TOKEN_ID} and must be inside the model's vocabulary",
            )
    try:
        ids = [int(t) for t in items if t.isascii()]
        if len(ids) != len(items):
            raise ValueError("non-ASCII digits")
    except ValueError:
        raise ValidationError(
            f"invalid --tokens '{spec}'",
            hint="give comma-separated integers, e.g. --tokens 3838,374",
        ) from None
    if not ids:
        raise ValidationError("--tokens is empty", hint="give comma-separated integers")
    if any(i < 0 for i in ids):
        raise ValidationError(f"invalid --tokens '{spec}': token ids are >= 0")
    too_big = [i for i in ids if i > MAX_TOKEN_ID]
    if too_big:
        raise ValidationError(
            f"invalid --tokens: token id {too_big[0]} is too large",
            hint=f"token ids are 0..{MAX_TOKEN_ID} and must be inside the model's vocabulary",
        )
    return ids
