"""Compare APRT stage tensors: one file pair (``apr diff --values``) or two whole dumps.

Data flow: two dumps --> pair files by relative path --> per-pair metrics (streamed in chunks
through memory maps) --> verdict per pair --> first divergence and error attribution.

Conventions (documented for users in ``aprtrace diff --help`` and docs/diff-json.md):

- ``d = |a - b|`` in f32. **A is the reference**, B the candidate: relative error, SQNR and the
  ``rtol`` bound are measured against A.
- File-pair statistics follow apr exactly (NaN propagates into the f32 RMS; the cosine is 0.0
  unless both norms are > 0, so a NaN norm gives 0.0). Directory mode
  computes every statistic over the positions where both values are finite and reports
  NaN/Inf separately (counts per side and positions where the classes differ), so one shared
  NaN does not hide the rest of the tensor.
- Verdict: ``pass = no NaN/Inf mismatch and (max|d| <= atol or (cosine >= cos_min and
  max|d| <= atol + rtol * max|a|))``.
"""

from __future__ import annotations

import fnmatch
import math
import mmap as _mmap
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from aprtrace.aprt import AprtFile, read_aprt
from aprtrace.decode import step_of_path
from aprtrace.errors import InvalidFormatError, NotFoundError, ValidationError
from aprtrace.index_metrics import IndexAgreement, index_agreement
from aprtrace.manifest import Manifest, read_manifest
from aprtrace.stages import (
    WHOLE_MODEL_LAYER,
    Stage,
    computes,
    stage_from_file_stem,
    stage_inputs,
    stage_shape,
)

CHUNK = 1 << 18  # 256 Ki elements (1 MiB per side) per streamed chunk: cache-sized
_LO_BITS = 16
_LO_SIZE = 1 << _LO_BITS
_PAGE = _mmap.PAGESIZE

# ---------------------------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """Pass/fail thresholds of one pair (see the module docstring for the rule)."""

    atol: float = 1e-5
    rtol: float = 0.1
    cos_min: float = 0.999

    def as_dict(self) -> dict[str, float]:
        return {"atol": self.atol, "rtol": self.rtol, "cos_min": self.cos_min}


DEFAULT_TOLERANCE = Tolerance()
_TOL_KEYS = {"atol": "atol", "rtol": "rtol", "cos-min": "cos_min", "cos_min": "cos_min"}


@dataclass(frozen=True)
class TolOverride:
    """A ``--tol PATTERN:key=value,...`` rule. PATTERN with a ``/`` matches ``layer-N/stage``."""

    pattern: str
    values: dict[str, float]

    def matches(self, stage: str, rel_stem: str) -> bool:
        target = rel_stem if "/" in self.pattern else stage
        return fnmatch.fnmatchcase(target, self.pattern)


def parse_tol_override(spec: str) -> TolOverride:
    """Parse ``PATTERN:key=value[,key=value]`` (keys atol, rtol, cos-min)."""
    hint = (
        "expected PATTERN:key=value[,key=value], e.g. 'ffn_*:cos-min=0.99' or 'layer-3/*:atol=1e-3'"
    )
    pattern, sep, rest = spec.partition(":")
    pattern = pattern.strip()
    if not sep or not pattern or not rest.strip():
        raise ValidationError(f"invalid --tol '{spec}'", hint=hint)
    values: dict[str, float] = {}
    for item in rest.split(","):
        key, eq, raw = item.partition("=")
        key = key.strip().lower()
        if not eq or key not in _TOL_KEYS:
            raise ValidationError(
                f"invalid --tol '{spec}': unknown or malformed setting '{item.strip()}'",
                hint=f"keys are atol, rtol, cos-min; {hint}",
            )
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValidationError(
                f"invalid --tol '{spec}': '{raw.strip()}' is not a number"
            ) from None
        check_tolerance_value(_TOL_KEYS[key], value, f"--tol '{spec}'")
        values[_TOL_KEYS[key]] = value
    return TolOverride(pattern, values)


def check_tolerance_value(key: str, value: float, where: str) -> None:
    if math.isnan(value) or value < 0:
        raise ValidationError(f"{where}: {key} = {value} must be a non-negative number")
    if key == "cos_min" and value > 1:
        raise ValidationError(f"{where}: cos-min = {value} must be at most 1")


def tolerance_for(
    base: Tolerance, overrides: list[TolOverride], stage: str, rel_stem: str
) -> Tolerance:
    """``base`` with every matching override applied in order (later rules win)."""
    tol = base
    for rule in overrides:
        if rule.matches(stage, rel_stem):
            tol = replace(tol, **rule.values)
    return tol


# ---------------------------------------------------------------------------------------------
# Streaming statistics
# ---------------------------------------------------------------------------------------------


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Number of representable f32 steps between ``a`` and ``b`` (uint32, elementwise).

    Floats are placed on one integer line (sign-magnitude order), on which -0.0 and +0.0 are
    the same point: same signs give |mag_a - mag_b|, opposite signs mag_a + mag_b. Finite
    inputs (and Inf) fit uint32; NaN inputs give meaningless values and must be masked first.
    """
    a = np.ascontiguousarray(a, dtype="<f4").reshape(-1)
    b = np.ascontiguousarray(b, dtype="<f4").reshape(-1)
    return _ulp_into(a, b, _Workspace(a.size))


class _Workspace:
    """Scratch buffers reused for every chunk: no page faults from fresh allocations."""

    def __init__(self, size: int):
        self.d = np.empty(size, dtype=np.float32)
        self.ma = np.empty(size, dtype=np.uint32)
        self.mb = np.empty(size, dtype=np.uint32)
        self.dist = np.empty(size, dtype=np.uint32)
        self.flags = np.empty(size, dtype=bool)

    def view(self, n: int) -> _Workspace:
        w = object.__new__(_Workspace)
        for name, buf in vars(self).items():
            setattr(w, name, buf[:n])
        return w


_SIGN_OFF = np.uint32(0x7FFFFFFF)


def _dot64(x: np.ndarray, y: np.ndarray) -> float:
    """Sum of x*y with every product and the sum in f64 (einsum casts in small buffers).

    Not BLAS: a threaded ddot on chunk-sized vectors loses to this on a busy machine.
    """
    return float(np.einsum("i,i->", x, y, dtype=np.float64))


def _ulp_into(a: np.ndarray, b: np.ndarray, w: _Workspace) -> np.ndarray:
    """``ulp_distance`` into ``w.dist`` (uses ``w.ma``, ``w.mb``, ``w.flags``)."""
    ua, ub = a.view(np.uint32), b.view(np.uint32)
    ma, mb = np.bitwise_and(ua, _SIGN_OFF, out=w.ma), np.bitwise_and(ub, _SIGN_OFF, out=w.mb)
    np.bitwise_xor(ua, ub, out=w.dist)  # sign bits differ <=> xor > 0x7FFFFFFF
    np.greater(w.dist, _SIGN_OFF, out=w.flags)
    # Magnitudes are below 2**31, so their difference fits int32.
    signed = w.dist.view(np.int32)
    np.subtract(ma.view(np.int32), mb.view(np.int32), out=signed)
    np.abs(signed, out=signed)
    dist = w.dist
    opposite = np.flatnonzero(w.flags)  # rare outside noise around zero
    if opposite.size:
        dist[opposite] = ma[opposite] + mb[opposite]
    return dist


@dataclass
class TopDiff:
    index: int
    a: float
    b: float
    abs_diff: float


@dataclass
class PairStats:
    """Statistics of one pair. In directory mode over the positions where both are finite."""

    count: int
    max_abs_diff: float
    max_abs_diff_index: int
    rms_diff: float
    cosine_sim: float
    top_diffs: list[TopDiff]
    max_abs_a: float = 0.0
    rel_l2: float | None = None
    sqnr_db: float | None = None
    ulp_max: int | None = None
    ulp_median: float | None = None
    nan_a: int = 0
    nan_b: int = 0
    inf_a: int = 0
    inf_b: int = 0
    nonfinite_mismatch: int = 0


def _classes(x: np.ndarray) -> np.ndarray:
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf."""
    out = np.zeros(x.shape, dtype=np.int8)
    out[np.isnan(x)] = 1
    out[x == np.inf] = 2
    out[x == -np.inf] = 3
    return out


# Up to this many elements the ULP distances of a pair are kept (4 bytes each) and the median
# is exact by selection; above, a two-level histogram plus a second pass gives it exactly.
ULP_EXACT_MAX = 1 << 24
_HI_BUCKETS = 1 << (32 - _LO_BITS)


class _Accumulator:
    """Accumulates the statistics of one pair chunk by chunk (bounded memory)."""

    def __init__(self, limit: int, extended: bool, total: int, ulp_exact_max: int = ULP_EXACT_MAX):
        self.limit = limit
        self.extended = extended
        self.n = 0
        self.max_d = 0.0
        self.max_i = 0
        self.sum_d2 = 0.0
        self.dot = 0.0
        self.norm_a = 0.0
        self.norm_b = 0.0
        self.max_abs_a = 0.0
        self.top: list[tuple[float, int, float, float, float]] = []  # (key, index, a, b, d)
        self.nan_a = self.nan_b = self.inf_a = self.inf_b = self.mismatch = 0
        self.ulp_max = 0
        self.work: _Workspace | None = None
        self.ulp_all: np.ndarray | None = None
        self.ulp_hi: np.ndarray | None = None
        if extended and total <= ulp_exact_max:
            self.ulp_all = np.empty(total, dtype=np.uint32)
        elif extended:
            self.ulp_hi = np.zeros(_HI_BUCKETS, dtype=np.int64)

    def _finite_view(
        self, a: np.ndarray, b: np.ndarray, scratch: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        if np.isfinite(a, out=scratch).all() and np.isfinite(b, out=scratch).all():
            return a, b
        fa, fb = np.isfinite(a), np.isfinite(b)
        ca, cb = _classes(a), _classes(b)
        self.nan_a += int(np.count_nonzero(ca == 1))
        self.nan_b += int(np.count_nonzero(cb == 1))
        self.inf_a += int(np.count_nonzero(ca >= 2))
        self.inf_b += int(np.count_nonzero(cb >= 2))
        self.mismatch += int(np.count_nonzero(ca != cb))
        both = fa & fb
        # Zeroing both sides keeps indices and adds nothing to any sum.
        return np.where(both, a, np.float32(0)), np.where(both, b, np.float32(0))

    def update(self, a: np.ndarray, b: np.ndarray, base: int) -> None:
        a = np.asarray(a, dtype=np.float32)
        b = np.asarray(b, dtype=np.float32)
        m = a.size
        if self.work is None or self.work.d.size < m:
            self.work = _Workspace(m)
        w = self.work.view(m)
        if self.extended:
            a, b = self._finite_view(a, b, w.flags)
        self.n += m
        if m == 0:
            return
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf, f32 overflow
            d = np.subtract(a, b, out=w.d)
        np.abs(d, out=d)
        key = d
        if np.isnan(d.max()):
            key = np.where(np.isnan(d), np.float32(-1), d)  # NaN never wins
        i = int(np.argmax(key))
        if key[i] > self.max_d:  # strict: the first index wins ties across chunks
            self.max_d, self.max_i = float(key[i]), base + i
        self.sum_d2 += _dot64(d, d)
        self.dot += _dot64(a, b)
        self.norm_a += _dot64(a, a)
        self.norm_b += _dot64(b, b)
        if self.extended:
            self.max_abs_a = max(self.max_abs_a, float(a.max()), -float(a.min()))
            dist = _ulp_into(a, b, w)
            self.ulp_max = max(self.ulp_max, int(dist.max()))
            if self.ulp_all is not None:
                self.ulp_all[base : base + m] = dist
            else:
                assert self.ulp_hi is not None
                np.right_shift(dist, _LO_BITS, out=dist)
                self.ulp_hi += np.bincount(dist, minlength=_HI_BUCKETS)
        if self.limit > 0:
            self._update_top(key, a, b, d, base, w.flags)

    def _update_top(self, key, a, b, d, base, scratch) -> None:
        k = self.limit
        if len(self.top) >= k:
            # Later indices lose ties, so only strictly larger values can enter.
            idx = np.flatnonzero(np.greater(key, self.top[-1][0], out=scratch))
        elif key.size > k:
            kth = np.partition(key, key.size - k)[key.size - k]
            above = np.flatnonzero(key > kth)
            ties = np.flatnonzero(key == kth)[: k - above.size]
            idx = np.concatenate([above, ties])
        else:
            idx = np.arange(key.size)
        if idx.size > k:  # exact top-k of the candidates, lower index first among ties
            vals = key[idx]
            kth = np.partition(vals, vals.size - k)[vals.size - k]
            above = idx[vals > kth]
            ties = idx[vals == kth][: k - above.size]
            idx = np.concatenate([above, ties])
        for j in idx.tolist():
            self.top.append((float(key[j]), base + j, float(a[j]), float(b[j]), float(d[j])))
        self.top.sort(key=lambda t: (-t[0], t[1]))
        del self.top[k:]

    def finish(
        self, refine: Callable[[set[int]], dict[int, np.ndarray]] | None = None
    ) -> PairStats:
        n = self.n
        rms = math.sqrt(self.sum_d2 / n) if n else 0.0
        if not self.extended:
            rms = float(np.float32(rms))  # apr stores rms_diff as f32
        if not (self.norm_a > 0.0 and self.norm_b > 0.0):  # apr's test: a NaN norm gives 0.0
            cosine = 0.0
        else:
            cosine = self.dot / (math.sqrt(self.norm_a) * math.sqrt(self.norm_b))
        top = [TopDiff(i, av, bv, dv) for _, i, av, bv, dv in self.top]
        stats = PairStats(n, self.max_d, self.max_i, rms, cosine, top)
        if not self.extended:
            return stats
        stats.max_abs_a = self.max_abs_a
        stats.nan_a, stats.nan_b = self.nan_a, self.nan_b
        stats.inf_a, stats.inf_b = self.inf_a, self.inf_b
        stats.nonfinite_mismatch = self.mismatch
        if self.norm_a > 0:
            stats.rel_l2 = math.sqrt(self.sum_d2) / math.sqrt(self.norm_a)
        else:
            stats.rel_l2 = 0.0 if self.sum_d2 == 0 else math.inf
        if self.sum_d2 > 0:
            ratio = self.norm_a / self.sum_d2
            stats.sqnr_db = 10.0 * math.log10(ratio) if ratio > 0 else -math.inf
        else:
            stats.sqnr_db = math.inf
        if n:
            stats.ulp_max = self.ulp_max
            stats.ulp_median = self._median(refine)
        return stats

    def _median(self, refine: Callable[[set[int]], dict[int, np.ndarray]] | None) -> float:
        """Median as numpy defines it (mean of the two middle values for even counts)."""
        n = self.n
        ranks = sorted({(n - 1) // 2, n // 2})
        if self.ulp_all is not None:
            upper = n // 2
            part = self.ulp_all
            part.partition(upper)  # in place: the buffer is ours and no longer needed
            values = [int(part[upper])]
            if len(ranks) == 2:  # even count: the lower middle is the largest value below
                values.append(int(part[:upper].max()))
            return float(sum(values)) / len(values)
        assert self.ulp_hi is not None and refine is not None
        cum = np.cumsum(self.ulp_hi)
        bucket_of = {r: int(np.searchsorted(cum, r, side="right")) for r in ranks}
        fine = refine(set(bucket_of.values()))
        values = []
        for r in ranks:
            bucket = bucket_of[r]
            before = int(cum[bucket - 1]) if bucket else 0
            low = int(np.searchsorted(np.cumsum(fine[bucket]), r - before, side="right"))
            values.append((bucket << _LO_BITS) + low)
        return float(sum(values)) / len(values)


def _release(values: np.ndarray, lo: int, hi: int) -> None:
    """Drop the mapped pages of elements [lo, hi) from this process (they stay page-cached).

    Without this, touched pages of a read-only file mapping stay counted in RSS, so
    memory would look like it grows with the file size.
    """
    mm = getattr(values, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(_mmap, "MADV_DONTNEED"):
        return
    map_start = values.offset - values.offset % _mmap.ALLOCATIONGRANULARITY
    start = values.offset - map_start + 4 * lo
    end = values.offset - map_start + 4 * hi
    start -= start % _PAGE
    end -= end % _PAGE
    if end > start:
        try:
            mm.madvise(_mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass


def _chunks(
    a: np.ndarray, b: np.ndarray, chunk: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    n = a.size
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        yield lo, a[lo:hi], b[lo:hi]
        _release(a, lo, hi)
        _release(b, lo, hi)


def compare_arrays(
    a: np.ndarray,
    b: np.ndarray,
    limit: int = 10,
    extended: bool = True,
    chunk: int = CHUNK,
    ulp_exact_max: int = ULP_EXACT_MAX,
) -> PairStats:
    """Statistics of two equally long f32 vectors, streamed ``chunk`` elements at a time.

    ``extended=False`` gives apr's statistics exactly (NaN propagates); ``extended=True`` adds
    the directory-mode statistics, computed over positions where both values are finite.
    """
    a = a.reshape(-1)
    b = b.reshape(-1)
    if a.size != b.size:
        raise ValueError("compare_arrays needs equally long inputs")
    acc = _Accumulator(limit, extended, a.size, ulp_exact_max)
    for lo, ca, cb in _chunks(a, b, chunk):
        acc.update(ca, cb, lo)

    def refine(buckets: set[int]) -> dict[int, np.ndarray]:
        """Second pass: exact histograms of the low 16 bits inside the median's buckets."""
        hist = {k: np.zeros(_LO_SIZE, dtype=np.int64) for k in buckets}
        for _, ca, cb in _chunks(a, b, chunk):
            ca, cb = np.asarray(ca, np.float32), np.asarray(cb, np.float32)
            both = np.isfinite(ca) & np.isfinite(cb)
            if not both.all():
                ca, cb = np.where(both, ca, np.float32(0)), np.where(both, cb, np.float32(0))
            dist = ulp_distance(ca, cb)
            hi = dist >> _LO_BITS
            for k in buckets:
                sel = dist[hi == k] & np.uint32(_LO_SIZE - 1)
                hist[k] += np.bincount(sel, minlength=_LO_SIZE)
        return hist

    return acc.finish(refine)


# ---------------------------------------------------------------------------------------------
# File pair mode (apr diff --values)
# ---------------------------------------------------------------------------------------------


def layer_label(layer: int) -> int | str:
    return "whole-model" if layer == WHOLE_MODEL_LAYER else layer


def check_comparable(fa: AprtFile, fb: AprtFile) -> None:
    """apr's checks: element counts and header layers must match (else exit 5)."""
    # The messages are apr's text (diff_05_aprt_stage.rs), raw u32 layers included.
    if fa.values.size != fb.values.size:
        raise ValidationError(
            f"APRT dim_product mismatch: {fa.path} has {fa.values.size} f32s, "
            f"{fb.path} has {fb.values.size} f32s — cannot compare stage tensors of different "
            "sizes",
            hint="compare files of the same stage traced on the same prompt and model shape",
        )
    if fa.layer != fb.layer:
        raise ValidationError(
            f"APRT layer mismatch: {fa.path} is layer {fa.layer}, {fb.path} is layer "
            f"{fb.layer} — stages from different layers cannot be compared element-wise",
            hint="compare the same stage at the same layer",
        )


def _read_pair_file(path: Path) -> AprtFile:
    try:
        return read_aprt(path)
    except InvalidFormatError as exc:
        try:
            with open(path, "rb") as f:
                is_aprt = f.read(4) == b"APRT"
        except OSError:
            is_aprt = False
        if not is_aprt:
            raise
        raise ValidationError(f"Cannot read APRT stage tensor {exc.message}", exc.hint) from exc


@dataclass
class FilePairResult:
    path_a: Path
    path_b: Path
    layer: int
    stats: PairStats
    # Directory-mode statistics of the same pair (for the verdict), when asked for.
    extended: PairStats | None = None


def diff_files(
    path_a: Path, path_b: Path, limit: int = 10, extended: bool = False
) -> FilePairResult:
    """``apr diff --values A B``: apr's checks and statistics for one pair of APRT files.

    As apr: an APRT file that cannot be read is a validation failure (exit 5), and at least
    one top difference is listed even with ``limit=0``. ``extended`` also computes the
    directory-mode statistics (NaN/Inf counted apart) from the same reads, for a verdict.
    """
    fa, fb = _read_pair_file(Path(path_a)), _read_pair_file(Path(path_b))
    check_comparable(fa, fb)
    stats = compare_arrays(fa.values, fb.values, limit=max(limit, 1), extended=False)
    more = compare_arrays(fa.values, fb.values, limit=0, extended=True) if extended else None
    return FilePairResult(Path(path_a), Path(path_b), fa.layer, stats, more)


# ---------------------------------------------------------------------------------------------
# Directory mode
# ---------------------------------------------------------------------------------------------

_LAYER_DIR = re.compile(r"^layer-(\d+)$")
_STAGE_COUNT = len(Stage)


@dataclass(frozen=True)
class PairKey:
    """Identity of a stage file inside a dump, from its relative path."""

    rel: str  # posix relative path, e.g. "layer-0/attn_norm.bin"
    stage: str  # stage name (or the file stem when unknown)
    layer: int | None  # None for whole-model (top-level) files
    step: int = 0  # decode step (files under decode-k/); 0 = the prompt pass

    @property
    def rel_stem(self) -> str:
        return self.rel[: -len(".bin")] if self.rel.endswith(".bin") else self.rel

    @property
    def step_stem(self) -> str:
        """``rel_stem`` inside its step (``decode-2/layer-3/x`` -> ``layer-3/x``), for --tol."""
        return step_of_path(self.rel_stem)[1]

    def sort_key(self) -> tuple:
        known = stage_from_file_stem(self.stage)
        order = known.order if known is not None else _STAGE_COUNT
        if self.layer is None:
            return (self.step, 1, 0, order, self.rel)
        return (self.step, 0, self.layer, order, self.rel)

    @property
    def label(self) -> str:
        where = self.stage if self.layer is None else f"layer {self.layer} {self.stage}"
        return f"step {self.step} {where}" if self.step else where


def key_for(rel: str) -> PairKey:
    step, inner = step_of_path(rel)
    if step:
        key = key_for(inner)
        return PairKey(rel, key.stage, key.layer, step)
    parts = rel.split("/")
    stem = parts[-1][: -len(".bin")]
    known = stage_from_file_stem(stem)
    stage = known.value if known is not None else stem
    layer = None
    if len(parts) == 2:
        m = _LAYER_DIR.match(parts[0])
        if m:
            layer = int(m.group(1))
    return PairKey(rel, stage, layer)


def list_stage_files(dump: Path) -> dict[str, PairKey]:
    """Every ``*.bin`` under ``dump`` (hidden temp files skipped), by relative posix path."""
    out = {}
    for path in sorted(dump.rglob("*.bin")):
        rel = path.relative_to(dump).as_posix()
        if any(part.startswith(".") for part in rel.split("/")) or not path.is_file():
            continue
        out[rel] = key_for(rel)
    return out


@dataclass
class LmHeadStats:
    top1_a: int
    top1_b: int
    top1_agree: bool
    top5_overlap: int
    kl_divergence: float | None


@dataclass
class PairResult:
    """One compared pair of a directory diff."""

    key: PairKey
    tolerance: Tolerance
    layer_header: int | None = None
    shape: tuple[int, ...] | None = None
    stats: PairStats | None = None
    lm_head: LmHeadStats | None = None
    passed: bool | None = None  # None when incomparable
    reason: str = ""
    error: str | None = None  # incomparable: why
    attribution: float | None = None
    predecessor: str | None = None
    index: IndexAgreement | None = None  # index payloads (moe_router_indices): per token

    @property
    def max_position(self) -> str | None:
        if self.stats is None or self.shape is None:
            return None
        return decode_position(self.key.stage, self.shape, self.stats.max_abs_diff_index)


@dataclass
class DumpInfo:
    path: Path
    manifest: Manifest | None
    files: dict[str, PairKey]


@dataclass
class DirDiff:
    """The whole result of a directory diff, ready for rendering."""

    a: DumpInfo
    b: DumpInfo
    base_tolerance: Tolerance
    pairs: list[PairResult]
    only_a: list[str]
    only_b: list[str]
    warnings: list[str] = field(default_factory=list)
    first_divergence: PairResult | None = None
    stopped_early: bool = False

    @property
    def steps(self) -> list[int]:
        """The decode steps compared (0 = the prompt pass), in order."""
        return sorted({p.key.step for p in self.pairs})

    @property
    def first_token_disagreement(self) -> PairResult | None:
        """The first pass (prompt, then steps) whose lm_head argmax differs between A and B:
        from there on, the two engines would have generated different tokens."""
        for p in sorted(self.pairs, key=lambda p: p.key.step):
            if p.lm_head is not None and not p.lm_head.top1_agree:
                return p
        return None

    @property
    def passed(self) -> int:
        return sum(1 for p in self.pairs if p.passed)

    @property
    def failed(self) -> int:
        return sum(1 for p in self.pairs if p.passed is False)

    @property
    def incomparable(self) -> list[PairResult]:
        return [p for p in self.pairs if p.error is not None]

    def amplifiers(self, threshold: float = 2.0, top: int = 5) -> list[PairResult]:
        """Pairs whose relative error is at least ``threshold`` times their input's.

        Only stages adding at least 1% of the largest added relative error (own minus
        inherited) are kept; strongest multiplier first, sources (ratio inf) leading.
        """
        hits = [
            p
            for p in self.pairs
            if p.attribution is not None
            and p.attribution >= threshold
            and p.stats is not None
            and (p.stats.rel_l2 or 0) > 0
        ]

        def added(p: PairResult) -> float:
            return p.stats.rel_l2 * (1 - 1 / p.attribution)  # type: ignore[union-attr,operator]

        # Multiplying a negligible error is not news: keep those adding at least 1% of the
        # largest added error, then show the strongest multipliers first.
        largest = max((added(p) for p in hits), default=0.0)
        hits = [p for p in hits if added(p) >= 0.01 * largest]
        hits.sort(key=lambda p: -p.attribution)  # type: ignore[operator]
        return hits[:top]


def _spec_of(stem: str):
    stage = stage_from_file_stem(stem)
    return stage.spec if stage is not None else None


def decode_position(stage: str, shape: tuple[int, ...], index: int) -> str | None:
    """Flat index -> named coordinates; None when the shape does not cover the index."""
    total = int(np.prod(shape)) if shape else 0
    if not shape or index >= total:
        return None
    coords = np.unravel_index(index, shape)
    c = [int(x) for x in coords]
    spec = _spec_of(stage)
    if spec is not None and spec.attention_map and len(shape) == 3:
        return f"head {c[0]}, query {c[1]}, key {c[2]}"
    if len(shape) == 2:
        return f"token {c[0]}, channel {c[1]}"
    if stage == Stage.LM_HEAD.value and len(shape) == 1:
        return f"vocab id {c[0]}"
    return "[" + ", ".join(str(x) for x in c) + "]"


def infer_shape(key: PairKey, count: int, manifests: list[Manifest]) -> tuple[int, ...] | None:
    """Shape from either manifest, else from the stage graph and a manifest's config and
    sequence length, else from the sequence length alone."""
    for m in manifests:
        shape = m.shape_of(key.rel)
        if shape is not None and int(np.prod(shape)) == count:
            return tuple(shape)
    stage = stage_from_file_stem(key.stage)
    if stage is not None and len(stage.spec.shape_dims) == 1:
        return (count,)
    for m in manifests:
        seq, keys = len(m.token_ids), None
        if key.step:  # a decode step: one new row attending every position up to its own
            at = [s.get("position") for s in m.decode_steps if s.get("step") == key.step]
            if not at or not isinstance(at[0], int):
                continue
            seq, keys = 1, at[0] + 1
        if seq <= 0:
            continue
        cfg = _config_view(m.config)
        if stage is not None and cfg is not None:
            try:
                shape = stage_shape(stage, cfg, seq, keys)
            except (AttributeError, TypeError):
                shape = None
            if shape is not None and int(np.prod(shape)) == count:
                return shape
        if stage is not None and stage.spec.attention_map:
            width = seq if keys is None else keys
            heads = count // (seq * width)
            if heads * seq * width == count:
                return (heads, seq, width)
        elif count % seq == 0:
            return (seq, count // seq)
    return None


def verdict(stats: PairStats, tol: Tolerance) -> tuple[bool, str]:
    """Apply the pass rule; the reason names the failing statistic and its bound."""
    if stats.nonfinite_mismatch:
        return False, f"{stats.nonfinite_mismatch} NaN/Inf positions differ"
    if stats.max_abs_diff <= tol.atol:
        return True, f"max|d| {stats.max_abs_diff:.3g} <= atol {tol.atol:g}"
    if not stats.cosine_sim >= tol.cos_min:
        return False, f"cosine {stats.cosine_sim:.6f} < {tol.cos_min:g}"
    bound = tol.atol + tol.rtol * stats.max_abs_a
    if not stats.max_abs_diff <= bound:
        return False, f"max|d| {stats.max_abs_diff:.3g} > atol + rtol*max|a| = {bound:.3g}"
    return True, "within tolerance"


def _softmax_log(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max()
    return shifted - math.log(float(np.exp(shifted).sum()))


def lm_head_stats(a: np.ndarray, b: np.ndarray) -> LmHeadStats:
    """Top-1 agreement, top-5 overlap and KL(softmax(a) || softmax(b)) in f64."""
    a = np.asarray(a, dtype=np.float32).reshape(-1)
    b = np.asarray(b, dtype=np.float32).reshape(-1)
    k = min(5, a.size)
    # Stable sort: among equal logits the lower token id ranks first.
    top_a = np.argsort(-a.astype(np.float64), kind="stable")[:k]
    top_b = np.argsort(-b.astype(np.float64), kind="stable")[:k]
    kl = None
    if a.size and np.isfinite(a).all() and np.isfinite(b).all():
        la, lb = _softmax_log(a), _softmax_log(b)
        kl = float(np.sum(np.exp(la) * (la - lb)))
        kl = max(kl, 0.0)  # rounding can leave -1e-17 for identical inputs
    t1a = int(top_a[0]) if k else -1
    t1b = int(top_b[0]) if k else -1
    return LmHeadStats(t1a, t1b, t1a == t1b, len(set(top_a.tolist()) & set(top_b.tolist())), kl)


def _check_dir(path: Path, side: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{side}: {path} does not exist")
    return path


def _consumed(
    key: PairKey,
    present: dict[tuple[int | None, str], PairResult],
    num_layers: int | None,
    config: dict | None,
) -> list[PairResult]:
    """The pairs whose outputs ``key``'s stage consumes, read from the stage graph.

    Alternatives (``qkv_bias`` else ``qkv_matmul``) are chosen by the model's config when a
    manifest gives it, else by what the dump holds. Operands not in the dump are skipped.
    """
    stage = stage_from_file_stem(key.stage)
    if stage is None:
        return []
    cfg = _config_view(config)
    if cfg is not None:

        def has(s: Stage) -> bool:
            return computes(s, cfg)
    else:

        def has(s: Stage) -> bool:
            return any(st == s.value for (_, st) in present)

    found = []
    for operand in stage_inputs(stage, key.layer, has, num_layers):
        if operand is None:
            continue
        layer, source = operand
        pair = present.get((layer, source.value))
        if pair is not None:
            found.append(pair)
    return found


def _config_view(config: dict | None):
    """A manifest's config as the attribute view the stage graph's predicates read."""
    if not config or "architecture" not in config:
        return None
    from types import SimpleNamespace

    return SimpleNamespace(**config)


def attribute(
    pairs: list[PairResult], num_layers: int | None = None, config: dict | None = None
) -> None:
    """Set ``attribution`` = rel_l2(stage) / rel_l2(consumed stage) where both are known.

    inf when the stage creates error from an identical input; None when unknown.
    """
    present = {(p.key.layer, p.key.stage): p for p in pairs if p.stats is not None}
    if num_layers is None:  # no manifest (an apr dump): the deepest layer dumped
        layers = [
            p.key.layer
            for p in pairs
            if p.key.layer is not None and p.key.stage == "post_ffn_residual"
        ]
        num_layers = max(layers) + 1 if layers else None
    for p in pairs:
        if p.stats is None or p.stats.rel_l2 is None:
            continue
        inputs = [
            q
            for q in _consumed(p.key, present, num_layers, config)
            if q.stats is not None and q.stats.rel_l2 is not None
        ]
        if not inputs:
            continue
        pred = max(inputs, key=lambda q: q.stats.rel_l2)  # type: ignore[union-attr,return-value]
        p.predecessor = pred.key.label
        own, inherited = p.stats.rel_l2, pred.stats.rel_l2  # type: ignore[union-attr]
        if not (math.isfinite(own) and math.isfinite(inherited)):
            continue
        if inherited == 0:
            p.attribution = math.inf if own > 0 else None
        else:
            p.attribution = own / inherited


def load_dump(path: Path, side: str) -> DumpInfo:
    path = _check_dir(path, side)
    return DumpInfo(path, read_manifest(path), list_stage_files(path))


def dump_warnings(a: DumpInfo, b: DumpInfo) -> list[str]:
    """Loud warnings: missing manifests, incomplete dumps, different token ids."""
    out = []
    for side, dump in (("A", a), ("B", b)):
        if dump.manifest is None:
            out.append(
                f"{side} ({dump.path}): no manifest.json: the dump may be incomplete or "
                "written by apr; shapes are inferred where possible"
            )
            continue
        missing = [f.path for f in dump.manifest.files if f.path not in dump.files]
        if missing:
            out.append(
                f"{side} ({dump.path}): {len(missing)} file(s) listed in manifest.json are "
                f"missing, e.g. {missing[0]}"
            )
        # An engine that does not compute some stages says so (llama.cpp: ffn_silu).
        skipped = dump.manifest.raw.get("not_captured")
        if isinstance(skipped, list) and skipped:
            engine = dump.manifest.raw.get("engine", "this engine")
            out.append(
                f"{side} ({dump.path}): {engine} does not compute "
                f"{', '.join(map(str, skipped))}: not in {side}, not compared"
            )
    ma, mb = a.manifest, b.manifest
    if ma is not None and mb is not None and ma.token_ids != mb.token_ids:
        out.append(
            "A and B were traced on DIFFERENT token ids "
            f"(A {list(ma.token_ids)[:16]}, B {list(mb.token_ids)[:16]}): "
            "activations are not comparable position by position"
        )
    if ma is not None and mb is not None:
        fed_a = [s.get("token") for s in ma.decode_steps]
        fed_b = [s.get("token") for s in mb.decode_steps]
        n = min(len(fed_a), len(fed_b))
        k = next((i for i in range(n) if fed_a[i] != fed_b[i]), None)
        if k is not None:
            out.append(
                f"A and B were fed DIFFERENT tokens from decode step {k + 1} on "
                f"(A {fed_a[k]}, B {fed_b[k]}): later steps are not comparable; trace B with "
                "--decode-tokens set to A's tokens (as `aprtrace compare --decode` does)"
            )
    return out


def compare_pair(
    key: PairKey,
    a: DumpInfo,
    b: DumpInfo,
    tol: Tolerance,
    limit: int,
    chunk: int = CHUNK,
) -> PairResult:
    result = PairResult(key, tol)
    fa = read_aprt(a.path / key.rel)
    fb = read_aprt(b.path / key.rel)
    try:
        check_comparable(fa, fb)
    except ValidationError as exc:
        result.error = exc.message
        result.reason = "incomparable"
        return result
    result.layer_header = fa.layer
    manifests = [m for m in (a.manifest, b.manifest) if m is not None]
    result.shape = infer_shape(key, fa.values.size, manifests)
    result.stats = compare_arrays(fa.values, fb.values, limit=limit, extended=True, chunk=chunk)
    if key.stage == Stage.LM_HEAD.value:
        result.lm_head = lm_head_stats(fa.values, fb.values)
    result.passed, result.reason = verdict(result.stats, tol)
    # Index payloads (expert ids as f32) are compared as integers, per token.
    stage = stage_from_file_stem(key.stage)
    if stage is not None and stage.index_payload:
        result.index = index_agreement(fa.values, fb.values, result.shape)
        result.passed, result.reason = result.index.passed, result.index.reason
    return result


def diff_dirs(
    path_a: Path,
    path_b: Path,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    overrides: list[TolOverride] | None = None,
    limit: int = 10,
    fail_fast: bool = False,
    chunk: int = CHUNK,
    on_pair: Callable[[PairResult], None] | None = None,
    select: Callable[[PairKey], bool] | None = None,
) -> DirDiff:
    """Compare two dump directories pair by pair in forward order.

    ``select`` keeps only the pairs it returns True for (``--stages`` / ``--layers``).
    """
    a, b = load_dump(path_a, "A"), load_dump(path_b, "B")
    overrides = overrides or []
    common = sorted((a.files[rel] for rel in a.files.keys() & b.files.keys()), key=PairKey.sort_key)
    if select is not None:
        common = [key for key in common if select(key)]
    only_a = sorted(a.files.keys() - b.files.keys(), key=lambda r: a.files[r].sort_key())
    only_b = sorted(b.files.keys() - a.files.keys(), key=lambda r: b.files[r].sort_key())
    result = DirDiff(a, b, tolerance, [], only_a, only_b, dump_warnings(a, b))
    if not common:
        raise ValidationError(
            f"no stage files in common between {a.path} ({len(a.files)} files) and "
            f"{b.path} ({len(b.files)} files)",
            hint="pass two dump directories written by aprtrace trace or apr trace --save-tensor",
        )
    for key in common:
        tol = tolerance_for(tolerance, overrides, key.stage, key.step_stem)
        pair = compare_pair(key, a, b, tol, limit, chunk)
        result.pairs.append(pair)
        if on_pair is not None:
            on_pair(pair)
        if pair.passed is False and result.first_divergence is None:
            result.first_divergence = pair
            if fail_fast:
                result.stopped_early = key is not common[-1]
                break
    config = next((m.config for m in (a.manifest, b.manifest) if m is not None and m.config), None)
    num_layers = config.get("num_layers") if config else None
    for step in result.steps:  # each pass reads its own inputs (decode steps too)
        step_pairs = [p for p in result.pairs if p.key.step == step]
        attribute(step_pairs, num_layers if isinstance(num_layers, int) else None, config)
    return result
