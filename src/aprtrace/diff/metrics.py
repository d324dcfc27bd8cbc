"""Streaming statistics of one pair of f32 vectors: apr's, the extended ones, lm_head's."""

from __future__ import annotations

import math
import mmap as _mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

CHUNK = 1 << 18  # 256 Ki elements (1 MiB per side) per streamed chunk: cache-sized

_LO_BITS = 16

_LO_SIZE = 1 << _LO_BITS

_PAGE = _mmap.PAGESIZE


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
    norm_a: float | None = None  # L2 norms over the finite positions (directory mode)
    norm_b: float | None = None


def _classes(x: np.ndarray) -> np.ndarray:
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf."""
    out = np.zeros(x.shape, dtype=np.int8)
    out[np.isnan(x)] = 1
    out[x == np.inf] = 2
    out[x == -np.inf] = 3
    return out


# `--limit` bound: each listed difference costs about 24 bytes while a pair is compared (twice
# that while candidates are merged), and every one is printed in --json.
MAX_LIMIT = 1_000_000


@dataclass
class _TopArrays:
    """Top-difference candidates as parallel arrays (key: |d| with NaN as -1)."""

    key: np.ndarray
    index: np.ndarray
    a: np.ndarray
    b: np.ndarray
    d: np.ndarray
    full: bool = False
    threshold: float = -np.inf

    @property
    def size(self) -> int:
        return int(self.key.size)

    @staticmethod
    def concat(parts: list[_TopArrays]) -> _TopArrays:
        return _TopArrays(*(np.concatenate([getattr(p, f) for p in parts]) for f in _TOP_FIELDS))

    def select(self, k: int, ordered: bool = True) -> _TopArrays:
        """The ``k`` best by (-key, index) by partial selection; sorted when ``ordered``."""
        if self.size > k:
            kth = np.partition(self.key, self.size - k)[self.size - k]
            above = np.flatnonzero(self.key > kth)
            ties = np.flatnonzero(self.key == kth)
            ties = ties[np.argsort(self.index[ties], kind="stable")[: k - above.size]]
            keep = np.concatenate([above, ties])
        else:
            keep = np.arange(self.size)
        if ordered:
            keep = keep[np.lexsort((self.index[keep], -self.key[keep].astype(np.float64)))]
        out = _TopArrays(*(getattr(self, f)[keep] for f in _TOP_FIELDS))
        out.full = out.size >= k
        out.threshold = float(out.key.min()) if out.full and out.size else -np.inf
        return out

    def as_list(self) -> list[TopDiff]:
        return [
            TopDiff(int(i), float(x), float(y), float(z))
            for i, x, y, z in zip(
                self.index.tolist(), self.a.tolist(), self.b.tolist(), self.d.tolist(), strict=True
            )
        ]


_TOP_FIELDS = ("key", "index", "a", "b", "d")

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
        self.top_arrays: _TopArrays | None = None
        self.pending: list[_TopArrays] = []  # candidates not merged yet (bounded by 2 x limit)
        self.pending_size = 0
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
        """Keep the ``limit`` largest ``key`` values (lower index first among ties).

        Candidates are held in NumPy arrays and cut back to ``limit`` by a partial selection
        whenever they pass twice that: memory O(limit), time O(n) per chunk.
        """
        top = self.top_arrays
        if top is not None and top.full:
            # Later indices lose ties, so only strictly larger values can enter.
            idx = np.flatnonzero(np.greater(key, top.threshold, out=scratch))
        else:
            idx = np.arange(key.size)
        if idx.size == 0:
            return
        self.pending.append(_TopArrays(key[idx], idx + base, a[idx], b[idx], d[idx]))
        self.pending_size += int(idx.size)
        if self.pending_size + (top.size if top is not None else 0) >= 2 * self.limit:
            self._reduce(ordered=False)

    def _reduce(self, ordered: bool) -> None:
        """Merge the pending candidates into ``top_arrays`` and cut back to ``limit``."""
        parts = ([self.top_arrays] if self.top_arrays is not None else []) + self.pending
        self.pending, self.pending_size = [], 0
        if not parts:
            return
        merged = parts[0] if len(parts) == 1 else _TopArrays.concat(parts)
        self.top_arrays = merged.select(self.limit, ordered=ordered)

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
        if self.limit > 0:
            self._reduce(ordered=True)
        top = self.top_arrays.as_list() if self.top_arrays is not None else []
        stats = PairStats(n, self.max_d, self.max_i, rms, cosine, top)
        if not self.extended:
            return stats
        stats.max_abs_a = self.max_abs_a
        stats.norm_a, stats.norm_b = math.sqrt(self.norm_a), math.sqrt(self.norm_b)
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


@dataclass
class LmHeadStats:
    top1_a: int
    top1_b: int
    top1_agree: bool
    top5_overlap: int
    kl_divergence: float | None
    # The top-5 (token id, logit) of each side, highest first.
    top_a: list[tuple[int, float]] = field(default_factory=list)
    top_b: list[tuple[int, float]] = field(default_factory=list)


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
    overlap = len(set(top_a.tolist()) & set(top_b.tolist()))
    return LmHeadStats(
        t1a,
        t1b,
        t1a == t1b,
        overlap,
        kl,
        [(int(i), float(a[i])) for i in top_a],
        [(int(i), float(b[i])) for i in top_b],
    )
