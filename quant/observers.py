"""Activation range calibration from streamed histograms, in bounded memory.

An :class:`Observer` watches one tensor. ``update(x)`` folds in one calibration batch and keeps
only the exact minimum, maximum, sample count, count of exact zeros, and a histogram of a fixed
number B of bins (``bins``, default 2048): memory is O(B) however many batches arrive. From that
state ``compute_range(method)`` picks the clipping range [lo, hi] and ``qparams(method, dtype=…)``
the ONNX ``QuantizeLinear`` scale and zero point. :class:`ObserverSet` keeps one observer per
tensor name.

Histogram grid (dyadic, anchored at zero)
-----------------------------------------
Bin j (any integer) is the half-open interval [j·w, (j+1)·w) with width w = 2^e, e an integer.
The B stored counts are the window j0 ≤ j < j0 + B. For data seen so far with bounds [m, M]::

    e(m, M) = max(e_floor, min{ e : ⌊M/2^e⌋ − ⌊m/2^e⌋ + 1 ≤ B })
    e_floor = max(−100, E − 24),  2^(E−1) ≤ max(|m|, |M|) < 2^E    (no finer than float32 itself)
    j0      = ⌊m / w⌋

When a batch widens [m, M] beyond what the current grid holds, e grows by some d ≥ 1 (the range
the B bins can hold doubles d times) and every stored bin j is merged into bin ⌊j / 2^d⌋ of the
coarser grid — 2^d old bins per new bin, whole bins only, because the edges of the coarse grid
are edges of the fine one (all are multiples of 2^e and start from 0). The window then slides to
the new j0. No count is ever split or approximated, so:

* the histogram after streaming equals, count for count, the histogram of all the data binned
  once on the final grid; both "is data in range for e" and e_floor are monotone in [m, M], so
  the final e is the one a one-shot observer of all the data picks. Streaming in any number of
  batches, in any order, gives bit-identical counts, min and max — hence identical ranges.
* the only error is resolution: e is minimal, so at e − 1 the data did not fit, i.e.
  (M − m)/(w/2) + 2 > B and w < 2·(M − m)/(B − 2): the data spans more than B/2 − 1 bins (unless
  e_floor binds, where the grid is already as fine as float32 itself). Every statistic below
  assumes values spread uniformly inside a bin (clipped to [m, M]), so quantiles are exact to
  within one bin width w, and candidate thresholds are the bin edges (w apart) and the bounds.
* binning is exact in floating point: x·2^(−e) is an exact float32 product (a power-of-two
  scaling; only magnitudes below 2^(e−126), far below one bin, can underflow), so ⌊x/w⌋ never
  depends on rounding. A batch is binned in chunks of 32768 values, so the temporaries are
  bounded too (about 400 kB), whatever the batch size.

Quantization algebra (ONNX QuantizeLinear / DequantizeLinear, b = bits, [qmin, qmax] the dtype)
---------------------------------------------------------------------------------------------
::

    q = clamp(round_half_even(x / s) + z, qmin, qmax),    x^ = (q − z)·s

Every range includes 0 (lo ≤ 0 ≤ hi), so 0 is represented exactly (x = 0 ↦ q = z).

* asymmetric: s = (hi − lo)/(qmax − qmin), z = round_half_even(qmin − lo/s), which lies in
  [qmin, qmax] because lo ≤ 0 ≤ hi (clamped there against float rounding).
* symmetric, range [−T, T]: s = T/(2^(b−1) − 1), z = 0 for int8/int16 and 2^(b−1) for
  uint8/uint16 (the "restricted" grid: ±T are codes ±(2^(b−1) − 1); code −2^(b−1) is unused).
* s is float32, computed first; z is computed from the float32 s. A range of width 0 (an
  all-zero tensor) gets s = 1, and s is never below float32's smallest normal number.

Methods (all read the histogram; exact zeros are tracked separately)
-------------------------------------------------------------------
The data are *one-sided* when m ≥ 0 (e.g. after ReLU: range [0, T]) or M ≤ 0 (range [−T, 0]).
One-sided and symmetric problems choose one threshold T on the histogram of |x| (folding bin j < 0
onto bin −j − 1, exact on the zero-anchored grid); symmetric gives [−T, T]. Two-sided asymmetric
problems (m < 0 < M, ``symmetric=False``) choose [lo, hi] directly. n is the number of steps in
[0, T]: 2^(b−1) − 1 symmetric, 2^b − 1 one-sided asymmetric.

``minmax``      [min(m, 0), max(M, 0)]; symmetric T = max(|m|, |M|).
``percentile``  p percent (default 99.99) of the samples are kept. One-sided: T = quantile_p(|x|) (the
                upper tail only). Two-sided: lo = quantile_{(1−p)/2}(x), hi = quantile_{1−(1−p)/2}(x).
                Symmetric: T = quantile_p(|x|). Quantiles interpolate linearly inside a bin.
``entropy``     KL-divergence calibration (Migacz, "8-bit inference with TensorRT", GTC 2017).
                On the |x| histogram h (bins k = 0…K−1, width w, exact zeros removed: they map
                to code z exactly and carry no information about the threshold), for each
                candidate i = L…K (threshold T = i·w, L quantization levels)::

                    P_k = h_k  (k < i−1),      P_{i−1} = h_{i−1} + Σ_{k≥i} h_k   (clipped mass)
                    Q:  split bins 0…i−1 into L contiguous groups of ⌊i/L⌋ or ⌈i/L⌉ bins; each
                        group's mass Σ h_k is spread evenly over the group's bins with P_k > 0
                    KL(P‖Q) = Σ_{P_k>0} p_k log(p_k / q_k),   p = P/ΣP, q = Q/ΣQ

                T = i*·w for the i* of least KL (q_k = 0 where p_k > 0 is floored at 1e−12).
                L = 2^b for one-sided asymmetric data ([0, T] has 2^b codes), L = 2^(b−1) for
                symmetric data (TensorRT's 128 levels per side at 8 bit). Two-sided asymmetric
                data use the symmetric threshold, clipped to the data: [max(m, −T), min(M, T)].
                When K ≤ L (e.g. 16-bit codes, more levels than bins) no threshold below the
                maximum can be judged and T = max |x| (no clipping). The |x| histogram is
                coarsened (exactly, as above) to at most B bins first. Resolution limit, as in
                TensorRT: the smallest candidate is L bins, T ≥ L·w with w > (M − m)/B, so with
                B = 2048 at 8 bits T ≥ (M − m)/16 (L = 128) or (M − m)/8 (L = 256); and when the
                bulk is flat (uniform) and narrower than L bins, KL is ≈ 0 with no clipping at
                all, so outliers far beyond such a bulk are kept (percentile or mse clip them).
``mse``         the range minimising the expected squared error, from the histogram::

                    E(lo, hi) = N_in·Δ²/12 + Σ_{bins above hi} h_k·((c_k − hi)² + v_k)
                                           + Σ_{bins below lo} h_k·((c_k − lo)² + v_k)

                with Δ = (hi − lo)/(2^b − 1) the step, N_in the number of nonzero samples
                inside, c_k and v_k = ℓ_k²/12 the mean and variance of a value uniform on bin k
                (clipped to [m, M], length ℓ_k). Candidates are bin edges plus the data bounds.
                One-sided/symmetric: the same on the |x| histogram with lo = 0, hi = T and
                Δ = T/n (n as above); two-sided: all (lo, hi) pairs (blocks of ≤ 256k pairs).
                Exact zeros contribute no error (0 is a code).

NaN or ±Inf in a batch is refused with :class:`CalibrationError` (a ``ValueError`` and a
:class:`~lowbit.core.errors.UserError`) naming the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from lowbit.core.errors import UserError, did_you_mean

__all__ = ["DTYPES", "METHODS", "CalibrationError", "Observer", "ObserverSet", "qparams_from_range"]

#: ONNX activation dtypes: name → (qmin, qmax, bits)
DTYPES: dict[str, tuple[int, int, int]] = {
    "uint8": (0, 255, 8),
    "int8": (-128, 127, 8),
    "uint16": (0, 65535, 16),
    "int16": (-32768, 32767, 16),
}

_E_MIN = -100          # finest bin width 2^-100: 2^100 is still a float32 scale factor
_MANTISSA = 24         # float32 significand bits: bins finer than max|x|·2^-24 add nothing
_CHUNK = 1 << 15       # values binned at a time (bounds the temporaries of update())
_KL_FLOOR = 1e-12      # q where p > 0 but q = 0 (only possible in the clipped last group)
_MAX_CANDIDATES = 4096  # thresholds evaluated by entropy/mse at most (evenly spaced when more)


class CalibrationError(UserError, ValueError):
    """Calibration data or options lowbit cannot use: one sentence naming the tensor or option."""


# --------------------------------------------------------------------------------------------
# scale / zero point


def qparams_from_range(lo: float, hi: float, dtype: str = "uint8", *,
                       symmetric: bool = False) -> tuple[np.float32, int]:
    """ONNX ``(scale, zero_point)`` for the range [lo, hi] (widened to include 0) in ``dtype``.

    Symmetric: T = max(|lo|, |hi|), scale = T/(2^(b−1) − 1), zero point 0 (signed) or 2^(b−1)
    (unsigned). Asymmetric: scale = (hi − lo)/(qmax − qmin), zero point = round(qmin − lo/scale).
    The scale is float32 and positive (1 for an empty range); the zero point lies in the dtype.
    """
    qmin, qmax, bits = _dtype(dtype)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CalibrationError(f"range [{lo}, {hi}] is not finite")
    tiny = float(np.finfo(np.float32).tiny)
    if symmetric:
        t = max(-lo, hi)
        scale = np.float32(max(t / (2 ** (bits - 1) - 1), tiny) if t > 0 else 1.0)
        return scale, (0 if qmin < 0 else 2 ** (bits - 1))
    scale = np.float32(max((hi - lo) / (qmax - qmin), tiny) if hi > lo else 1.0)
    zero = int(np.clip(np.rint(qmin - lo / float(scale)), qmin, qmax))
    return scale, zero


def _dtype(dtype: str) -> tuple[int, int, int]:
    try:
        return DTYPES[dtype]
    except (KeyError, TypeError):
        raise CalibrationError(f"activation dtype '{dtype}' is not one of {', '.join(DTYPES)}"
                               f"{did_you_mean(str(dtype), DTYPES)}") from None


# --------------------------------------------------------------------------------------------
# histogram views handed to the methods


@dataclass(frozen=True)
class _Hist:
    """Counts h over bins [(start + k)·w, (start + k + 1)·w), data within [lo, hi].

    ``zeros`` exact zeros are included in h (in the bin holding 0) and reported separately.
    """

    h: np.ndarray     # float64 counts
    start: int
    w: float
    lo: float
    hi: float
    zeros: int

    @property
    def edges(self) -> np.ndarray:
        return (self.start + np.arange(self.h.size + 1, dtype=np.float64)) * self.w

    def pieces(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance of a value uniform on each bin clipped to [lo, hi]."""
        e = self.edges
        a, b = np.clip(e[:-1], self.lo, self.hi), np.clip(e[1:], self.lo, self.hi)
        return 0.5 * (a + b), (b - a) ** 2 / 12.0

    def nonzero_counts(self) -> np.ndarray:
        """h with the exact zeros taken out of the bin that holds 0."""
        h = self.h.copy()
        k = -self.start
        if self.zeros and 0 <= k < h.size:
            h[k] -= self.zeros
        return h

    def quantile(self, q: float) -> float:
        """Value below which a fraction q of the samples lie (linear inside a bin)."""
        c = np.cumsum(self.h)
        target = q * c[-1]
        k = min(int(np.searchsorted(c, target, side="left")), c.size - 1)
        before = c[k - 1] if k > 0 else 0.0
        frac = (target - before) / self.h[k] if self.h[k] > 0 else 1.0
        return float(np.clip((self.start + k + min(max(frac, 0.0), 1.0)) * self.w, self.lo, self.hi))


@dataclass(frozen=True)
class _Problem:
    """What a method needs besides the histogram."""

    bits: int
    steps: int          # steps of the grid in [0, T] (one threshold) or [lo, hi] (two-sided)
    levels: int         # KL levels in [0, T]
    fraction: float     # percentile / 100


# --------------------------------------------------------------------------------------------
# methods: each gives a threshold T on the |x| histogram, and a two-sided (lo, hi) on the signed one


def _t_minmax(obs: Observer, fold: _Hist, pb: _Problem) -> float:
    return fold.hi


def _lohi_minmax(obs: Observer, pb: _Problem) -> tuple[float, float]:
    return obs.min, obs.max


def _t_percentile(obs: Observer, fold: _Hist, pb: _Problem) -> float:
    return fold.quantile(pb.fraction)


def _lohi_percentile(obs: Observer, pb: _Problem) -> tuple[float, float]:
    signed = obs._signed()
    tail = (1.0 - pb.fraction) / 2.0
    return signed.quantile(tail), signed.quantile(1.0 - tail)


def _t_entropy(obs: Observer, fold: _Hist, pb: _Problem) -> float:
    h = fold.nonzero_counts()
    nz = np.flatnonzero(h)
    if nz.size == 0:
        return fold.hi
    h = h[: nz[-1] + 1]
    K, L = h.size, pb.levels
    if K <= L:
        return fold.hi
    candidates = np.arange(L, K + 1)
    if candidates.size > _MAX_CANDIDATES:
        candidates = np.unique(np.linspace(L, K, _MAX_CANDIDATES).round().astype(np.int64))
    tail = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])   # tail[i] = Σ_{k≥i} h_k
    best_i, best_kl = K, math.inf
    for i in candidates:
        i = int(i)
        if tail[0] - tail[i] <= 0:        # nothing below the threshold: Q is empty, KL = ∞
            continue
        p = h[:i].copy()
        p[-1] += tail[i]
        starts = (np.arange(L, dtype=np.int64) * i) // L
        group = np.repeat(np.arange(L), np.diff(np.append(starts, i)))
        support = p > 0
        mass = np.add.reduceat(h[:i], starts)
        nnz = np.add.reduceat(support.astype(np.float64), starts)
        q = np.where(support, mass[group] / np.maximum(nnz[group], 1.0), 0.0)
        ps, qs = p[support] / p.sum(), q[support] / q.sum()
        kl = float(np.sum(ps * np.log(ps / np.maximum(qs, _KL_FLOOR))))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return min(best_i * fold.w, fold.hi)


def _lohi_entropy(obs: Observer, pb: _Problem) -> tuple[float, float]:
    fold = obs._folded()
    t = _t_entropy(obs, fold, _Problem(pb.bits, 2 ** (pb.bits - 1) - 1, 2 ** (pb.bits - 1), pb.fraction))
    return max(obs.min, -t), min(obs.max, t)


def _t_mse(obs: Observer, fold: _Hist, pb: _Problem) -> float:
    h = fold.nonzero_counts()
    if not h.any():
        return fold.hi
    mean, var = fold.pieces()
    # candidate T = edge t·w for t = 1..K-1 (bins ≥ t clipped), and T = max|x| for t = K
    t_idx = np.arange(1, h.size + 1)
    thresholds = np.minimum(t_idx * fold.w, fold.hi)
    s0 = np.cumsum(h[::-1])[::-1]
    s1 = np.cumsum((h * mean)[::-1])[::-1]
    s2 = np.cumsum((h * (mean**2 + var))[::-1])[::-1]
    above0, above1, above2 = (np.append(s[1:], 0.0) for s in (s0, s1, s2))  # bins k ≥ t
    inside = s0[0] - above0
    t = thresholds
    err = inside * (t / pb.steps) ** 2 / 12.0 + above2 - 2.0 * t * above1 + t * t * above0
    return float(thresholds[int(np.argmin(err))])


def _lohi_mse(obs: Observer, pb: _Problem) -> tuple[float, float]:
    sg = obs._signed()
    h = sg.nonzero_counts()
    mean, var = sg.pieces()
    edges = sg.edges
    zero = -sg.start                       # index of the bin [0, w); edge index of 0 is also zero
    # hi candidates: edges zero .. n-1 (bins ≥ that edge clipped) and the maximum (edge n)
    hi_idx = np.arange(zero, h.size + 1)
    hi_val = np.minimum(edges[hi_idx], sg.hi)
    hi_val[-1] = sg.hi
    up0 = np.append(np.cumsum(h[::-1])[::-1], 0.0)[hi_idx]
    up1 = np.append(np.cumsum((h * mean)[::-1])[::-1], 0.0)[hi_idx]
    up2 = np.append(np.cumsum((h * (mean**2 + var))[::-1])[::-1], 0.0)[hi_idx]
    clip_hi = up2 - 2.0 * hi_val * up1 + hi_val**2 * up0
    # lo candidates: edges 1 .. zero (bins below clipped) and the minimum (edge 0)
    lo_idx = np.arange(0, zero + 1)
    lo_val = np.maximum(edges[lo_idx], sg.lo)
    lo_val[0] = sg.lo
    dn0 = np.concatenate([[0.0], np.cumsum(h)])[lo_idx]
    dn1 = np.concatenate([[0.0], np.cumsum(h * mean)])[lo_idx]
    dn2 = np.concatenate([[0.0], np.cumsum(h * (mean**2 + var))])[lo_idx]
    clip_lo = dn2 - 2.0 * lo_val * dn1 + lo_val**2 * dn0
    hi_val, clip_hi, up0 = _thin(hi_val, clip_hi, up0)
    lo_val, clip_lo, dn0 = _thin(lo_val, clip_lo, dn0)
    total = h.sum()
    best, best_err = (sg.lo, sg.hi), math.inf
    rows = max(1, (1 << 18) // max(hi_val.size, 1))      # ≤ 256k pairs (2 MB) per block
    for r in range(0, lo_val.size, rows):
        lv = lo_val[r:r + rows, None]
        inside = total - up0[None, :] - dn0[r:r + rows, None]
        step = (hi_val[None, :] - lv) / pb.steps
        err = inside * step**2 / 12.0 + clip_hi[None, :] + clip_lo[r:r + rows, None]
        k = int(np.argmin(err))
        a, b = divmod(k, hi_val.size)
        if err.flat[k] < best_err:
            best_err, best = float(err.flat[k]), (float(lo_val[r + a]), float(hi_val[b]))
    return best


def _thin(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """At most _MAX_CANDIDATES entries of parallel arrays, evenly spaced, first and last kept."""
    n = arrays[0].size
    if n <= _MAX_CANDIDATES:
        return arrays
    keep = np.unique(np.linspace(0, n - 1, _MAX_CANDIDATES).round().astype(np.int64))
    return tuple(a[keep] for a in arrays)


@dataclass(frozen=True)
class _Method:
    threshold: Callable[[Observer, _Hist, _Problem], float]     # one-sided / symmetric
    two_sided: Callable[[Observer, _Problem], tuple[float, float]]


_METHODS: dict[str, _Method] = {
    "minmax": _Method(_t_minmax, _lohi_minmax),
    "percentile": _Method(_t_percentile, _lohi_percentile),
    "entropy": _Method(_t_entropy, _lohi_entropy),
    "mse": _Method(_t_mse, _lohi_mse),
}

#: calibration methods, by name
METHODS: tuple[str, ...] = tuple(_METHODS)


# --------------------------------------------------------------------------------------------


class Observer:
    """Streaming range observer of one tensor: min, max and a B-bin dyadic histogram.

    ``name`` is used in error messages; ``bins`` (B, ≥ 16) fixes the memory: B int64 counts.
    """

    def __init__(self, name: str = "tensor", *, bins: int = 2048):
        if not isinstance(bins, (int, np.integer)) or isinstance(bins, bool) or bins < 16:
            raise CalibrationError(f"observer option bins={bins!r} for '{name}' must be an integer ≥ 16")
        self.name = name
        self.bins = int(bins)
        self.counts = np.zeros(self.bins, dtype=np.int64)   # window of the histogram, fixed size
        self.count = 0            # samples seen
        self.zeros = 0            # samples exactly 0
        self.min: float | None = None
        self.max: float | None = None
        self._e: int | None = None    # bin width 2^e
        self._j0 = 0                  # absolute index of counts[0]

    # ---- state -----------------------------------------------------------------------------

    @property
    def bin_width(self) -> float:
        """Width of one histogram bin (a power of two); NaN before any data."""
        return math.nan if self._e is None else 2.0 ** self._e

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, edges)`` of the whole stored window (B counts, B + 1 edges)."""
        self._require_data()
        edges = (self._j0 + np.arange(self.bins + 1, dtype=np.float64)) * self.bin_width
        return self.counts.copy(), edges

    def __repr__(self) -> str:
        if self._e is None:
            return f"Observer({self.name!r}, bins={self.bins}, empty)"
        return (f"Observer({self.name!r}, bins={self.bins}, count={self.count}, "
                f"min={self.min:g}, max={self.max:g}, bin_width={self.bin_width:g})")

    # ---- streaming ---------------------------------------------------------------------------

    def update(self, x) -> None:
        """Fold one batch (any shape) into the running min/max and histogram."""
        x = np.asarray(x)
        if x.dtype != np.float32:
            if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
                    or x.dtype == np.bool_):
                raise CalibrationError(f"calibration tensor '{self.name}' has dtype {x.dtype}, "
                                       "not a real number type")
            x = x.astype(np.float32)
        if x.size == 0:
            return
        flat = x.reshape(-1)
        lo, hi = float(flat.min()), float(flat.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            self._refuse(flat)
        new_lo = lo if self.min is None else min(self.min, lo)
        new_hi = hi if self.max is None else max(self.max, hi)
        e = _exponent(new_lo, new_hi, self.bins)
        if self._e is not None:
            e = max(e, self._e)
        j0 = math.floor(new_lo / 2.0**e)
        if self._e is None:
            self._e, self._j0 = e, j0
        elif (e, j0) != (self._e, self._j0):
            self._regrid(e, j0)
        scale = np.float32(2.0 ** -e)
        offset = np.float32(j0)
        counts, zeros = self.counts, 0
        for s in range(0, flat.size, _CHUNK):
            part = flat[s:s + _CHUNK]
            zeros += int(np.count_nonzero(part == 0))
            t = np.multiply(part, scale, dtype=np.float32)
            np.floor(t, out=t)
            t -= offset                   # exact: an integer in [0, B)
            counts += np.bincount(t.astype(np.intp), minlength=self.bins)
        self.count += int(flat.size)
        self.zeros += zeros
        self.min, self.max = new_lo, new_hi

    def _refuse(self, flat: np.ndarray) -> None:
        nan = int(np.count_nonzero(np.isnan(flat)))
        inf = int(np.count_nonzero(np.isinf(flat)))
        what = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n)
        raise CalibrationError(f"calibration tensor '{self.name}' contains {what} value(s) "
                               f"out of {flat.size} in one batch; calibration data must be finite")

    def _regrid(self, e: int, j0: int) -> None:
        """Merge bins into the grid 2^e (e ≥ current) and slide the window to start at j0."""
        d = e - self._e
        nz = np.flatnonzero(self.counts)
        j = (self._j0 + nz.astype(np.int64)) >> min(d, 62)     # floor(j / 2^d), exact
        merged = np.zeros(self.bins, dtype=np.int64)
        np.add.at(merged, j - j0, self.counts[nz])
        self.counts = merged
        self._e, self._j0 = e, j0

    # ---- views -------------------------------------------------------------------------------

    def _require_data(self) -> None:
        if self._e is None:
            raise CalibrationError(f"calibration tensor '{self.name}' received no data; "
                                   "its range cannot be calibrated")

    def _signed(self) -> _Hist:
        """The occupied part of the histogram, bins ⌊min/w⌋ … ⌊max/w⌋."""
        w = self.bin_width
        a, b = math.floor(self.min / w) - self._j0, math.floor(self.max / w) - self._j0
        return _Hist(self.counts[a:b + 1].astype(np.float64), self._j0 + a, w, self.min, self.max, self.zeros)

    def _folded(self) -> _Hist:
        """Histogram of |x|: bin j < 0 folds onto −j − 1; coarsened to at most B bins."""
        j = self._j0 + np.flatnonzero(self.counts).astype(np.int64)
        c = self.counts[j - self._j0]
        k = np.where(j < 0, -j - 1, j)
        d = 0
        while (int(k.max()) >> d) + 1 > self.bins:
            d += 1
        k >>= d
        h = np.zeros(int(k.max()) + 1, dtype=np.float64)
        np.add.at(h, k, c.astype(np.float64))
        if self.min >= 0:
            lo, hi = self.min, self.max
        elif self.max <= 0:
            lo, hi = -self.max, -self.min
        else:
            lo, hi = 0.0, max(-self.min, self.max)
        return _Hist(h, 0, 2.0 ** (self._e + d), lo, hi, self.zeros)

    # ---- calibration ---------------------------------------------------------------------------

    def compute_range(self, method: str = "minmax", *, bits: int = 8, symmetric: bool = False,
                      percentile: float = 99.99) -> tuple[float, float]:
        """Clipping range ``(lo, hi)`` with lo ≤ 0 ≤ hi for ``bits``-bit codes (see module doc)."""
        impl = _method(method)
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 16:
            raise CalibrationError(f"calibration option bits={bits!r} must be an integer in 2..16")
        if not (isinstance(percentile, (int, float, np.floating, np.integer))
                and 0.0 < float(percentile) <= 100.0):
            raise CalibrationError(f"calibration option percentile={percentile!r} must be in (0, 100]")
        bits, fraction = int(bits), float(percentile) / 100.0
        self._require_data()
        one_sided = self.min >= 0 or self.max <= 0
        if symmetric or one_sided:
            if symmetric:
                pb = _Problem(bits, 2 ** (bits - 1) - 1, 2 ** (bits - 1), fraction)
            else:
                pb = _Problem(bits, 2**bits - 1, 2**bits, fraction)
            t = float(impl.threshold(self, self._folded(), pb))
            if symmetric:
                return -t, t
            return (0.0, t) if self.min >= 0 else (-t, 0.0)
        lo, hi = impl.two_sided(self, _Problem(bits, 2**bits - 1, 2 ** (bits - 1), fraction))
        return min(float(lo), 0.0), max(float(hi), 0.0)

    def qparams(self, method: str = "minmax", *, dtype: str = "uint8", symmetric: bool = False,
                percentile: float = 99.99) -> tuple[np.float32, int]:
        """ONNX ``(scale, zero_point)`` for ``dtype`` (uint8, int8, uint16, int16)."""
        _, _, bits = _dtype(dtype)
        lo, hi = self.compute_range(method, bits=bits, symmetric=symmetric, percentile=percentile)
        return qparams_from_range(lo, hi, dtype, symmetric=symmetric)


def _method(method: str) -> _Method:
    try:
        return _METHODS[method]
    except (KeyError, TypeError):
        raise CalibrationError(f"calibration method '{method}' is not one of {', '.join(METHODS)}"
                               f"{did_you_mean(str(method), METHODS)}") from None


def _exponent(lo: float, hi: float, bins: int) -> int:
    """Smallest e ≥ e_floor with ⌊hi/2^e⌋ − ⌊lo/2^e⌋ + 1 ≤ bins (see module doc)."""
    biggest = max(-lo, hi)
    e = _E_MIN
    if biggest > 0:
        e = max(e, math.frexp(biggest)[1] - _MANTISSA)
    if hi > lo:
        e = max(e, math.ceil(math.log2(hi - lo) - math.log2(bins)))
    while math.floor(hi / 2.0**e) - math.floor(lo / 2.0**e) + 1 > bins:
        e += 1
    return e


# --------------------------------------------------------------------------------------------


class ObserverSet(Mapping[str, Observer]):
    """Observers keyed by tensor name.

    With ``names``, only those tensors are observed (other keys of a feed are ignored); without,
    every tensor in a feed gets an observer on first sight. ``bins`` is passed to each observer.
    """

    def __init__(self, names: Iterable[str] | None = None, *, bins: int = 2048):
        self.bins = bins
        self._fixed = names is not None
        self._observers: dict[str, Observer] = {n: Observer(n, bins=bins) for n in (names or ())}

    def update(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Fold one batch of every observed tensor present in ``feeds``."""
        for name, value in feeds.items():
            obs = self._observers.get(name)
            if obs is None:
                if self._fixed:
                    continue
                obs = self._observers[name] = Observer(name, bins=self.bins)
            obs.update(value)

    def ranges_all(self, method: str = "minmax", *, bits: int = 8, symmetric: bool = False,
                   percentile: float = 99.99) -> dict[str, tuple[float, float]]:
        """``{name: (lo, hi)}`` for every observed tensor."""
        return {n: o.compute_range(method, bits=bits, symmetric=symmetric, percentile=percentile)
                for n, o in self._observers.items()}

    def qparams_all(self, method: str = "minmax", dtype: str = "uint8", *, symmetric: bool = False,
                    percentile: float = 99.99) -> dict[str, tuple[np.float32, int]]:
        """``{name: (scale, zero_point)}`` for every observed tensor."""
        return {n: o.qparams(method, dtype=dtype, symmetric=symmetric, percentile=percentile)
                for n, o in self._observers.items()}

    def __getitem__(self, name: str) -> Observer:
        return self._observers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._observers)

    def __len__(self) -> int:
        return len(self._observers)
