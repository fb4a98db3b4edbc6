"""Non-uniform codebooks: 2^bits levels per (row, group), fitted by 1-D k-means (Lloyd-Max).

Each (row, group) of the canonical weight W [R, K] (group map as in :mod:`lowbit.quant.grid`)
gets its own sorted levels c_0 ≤ … ≤ c_{L-1}, L = 2^bits, and every weight is stored as the
index of its nearest level::

    ŵ_k = c[idx_k],   idx_k = #{ j : w_k > (c_j + c_{j+1}) / 2 }

The levels minimise Σ_k (w_k − ŵ_k)² by Lloyd's iteration, which in one dimension works on the
group's *sorted* values: each level's cell is the run of sorted values between two midpoints,
found by binary search, and its new level is the run's mean, read off prefix sums
(mean = (P[b_j] − P[b_{j−1}]) / (b_j − b_{j−1})). An iteration therefore costs O(L · log S) per
group whatever the group size S, vectorised over all rows and groups.

Initialisation is deterministic, from two starts, and the better fit per group is kept:
(a) level j at the ((j + ½)/L)-quantile of the group's values (a group with at most L distinct
values is then represented exactly), and (b) the levels of the better of the MSE-clipped
symmetric and asymmetric uniform grids (:mod:`lowbit.quant.rtn`). Lloyd's iteration never
increases the error, so the codebook is never worse than RTN at the same bits (up to the
float32 rounding of levels); start (b) also matters in practice, since quantile levels are far
from the optimal level density (∝ p^(1/3)) and Lloyd moves them slowly. A cell left empty (many
equal weights, as after pruning) gets the value farthest from its own level (a cell's first or
last value): that value's error drops to zero and no other error grows. Iteration stops when no
cell boundary moves (a fixed point of Lloyd's map) or after ``iters`` iterations. Levels are
stored as float32; the final indices are the nearest float32 levels. Same input ⇒ byte-identical
output: nothing is random, ``seed`` is accepted so callers can pass their context's seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from lowbit.quant.grid import Grid, GroupLayout, QuantInputError, check_weight, half_rounded
from lowbit.quant.rtn import fit_params

#: elements of W per row chunk (bounds the float64 sorted copy and prefix sums)
_CHUNK_ELEMENTS = 1 << 18


@dataclass
class CodebookWeight:
    """Indices into per-(row, group) level tables.

    ``indices`` uint8 [R, K]; ``levels`` float32 [R, G, 2^bits], ascending along the last axis;
    ``groups`` the group map [K]; ``iterations`` the most Lloyd iterations any row chunk ran.
    A row codebook (:func:`row_codebook`) has one table per row (G = 1, ``groups`` all 0) and
    ``scales`` float32 [R, B] over the blocks of ``scale_groups`` [K]: Ŵ = levels[r, 0, idx]·scales.
    """

    indices: np.ndarray
    levels: np.ndarray
    groups: np.ndarray
    bits: int
    iterations: int = 0
    scales: np.ndarray | None = None
    scale_groups: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.indices.shape)

    def dequantize(self) -> np.ndarray:
        """float32 [R, K]: ``levels[r, groups[k], indices[r, k]]`` (a Gather, as the ONNX form does)."""
        R, K = self.indices.shape
        L = self.levels.shape[-1]
        table = self.levels.reshape(R, -1)
        out = np.empty((R, K), dtype=np.float32)
        rows = max(1, _CHUNK_ELEMENTS // K)
        base = self.groups.astype(np.intp)[None, :] * L
        for r0 in range(0, R, rows):
            r1 = min(R, r0 + rows)
            out[r0:r1] = _take(table[r0:r1], base + self.indices[r0:r1])
            if self.scales is not None:
                out[r0:r1] *= self.scales[r0:r1][:, self.scale_groups]
        return out


def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``np.take_along_axis(a, idx, axis=-1)`` for idx [..., Q] with a's leading shape, via one
    flat ``np.take`` (several times faster than take_along_axis's broadcast fancy index)."""
    flat_idx = idx + _row_base(a.shape)
    return np.take(a.reshape(-1), flat_idx)


@functools.lru_cache(maxsize=32)
def _row_base(shape: tuple) -> np.ndarray:
    """Offsets of each last-axis row of an array of ``shape`` in its flattened form: [..., 1]."""
    lead = int(np.prod(shape[:-1]))
    base = (np.arange(lead, dtype=np.intp) * shape[-1]).reshape(shape[:-1] + (1,))
    base.flags.writeable = False
    return base


def _count_le(sorted_vals: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Batched ``searchsorted(side="right")``: #values ≤ q along the last axis.

    ``sorted_vals`` [..., S] ascending (padding +inf), ``queries`` [..., Q]; returns intp [..., Q].
    """
    S = sorted_vals.shape[-1]
    count = np.zeros(queries.shape, dtype=np.intp)
    step = 1 << (S.bit_length() - 1)
    while step:
        cand = count + step
        ok = cand <= S
        probe = _take(sorted_vals, np.minimum(cand, S) - 1)
        count = np.where(ok & (probe <= queries), cand, count)
        step >>= 1
    return count


def _quantile_levels(vals: np.ndarray, n: np.ndarray, L: int) -> np.ndarray:
    """Level j at the value of rank floor((j + 1/2) n / L) of sorted ``vals`` [r, G, S]."""
    r, G, _ = vals.shape
    ranks = np.floor((np.arange(L) + 0.5)[None, :] * n[:, None] / L).astype(np.intp)  # [G, L]
    return _take(vals, np.broadcast_to(ranks[None], (r, G, L)))


def _lloyd(vals: np.ndarray, n: np.ndarray, levels: np.ndarray, iters: int):
    """Lloyd iterations from ``levels`` [r, G, L] on sorted ``vals`` [r, G, S] (first n[g] valid,
    the rest +inf). Never increases any group's squared error. Returns (levels, iterations)."""
    r, G, S = vals.shape
    finite = np.where(np.isfinite(vals), vals, 0.0)
    P = np.concatenate([np.zeros((r, G, 1)), np.cumsum(finite, axis=-1)], axis=-1)  # [r, G, S+1]
    first = np.zeros((r, G, 1), np.intp)
    last = np.broadcast_to(n[None, :, None], (r, G, 1)).astype(np.intp)
    levels = np.sort(levels, axis=-1)
    bounds_prev = None
    done = 0
    for done in range(1, iters + 1):
        mids = 0.5 * (levels[..., 1:] + levels[..., :-1])
        b = np.concatenate([first, _count_le(vals, mids), last], axis=-1)  # cell j = [b_j, b_j+1)
        if bounds_prev is not None and np.array_equal(b, bounds_prev):
            break
        bounds_prev = b
        lo, hi = b[..., :-1], b[..., 1:]
        cnt = hi - lo
        filled = cnt > 0
        s1 = _take(P, hi) - _take(P, lo)
        mean = np.where(filled, s1 / np.maximum(cnt, 1), levels)
        empty = ~filled
        if empty.any():
            # move an empty cell's level onto the value farthest from its level (a cell's first
            # or last value): that value's error drops to 0 and no other error grows
            v_lo = _take(finite, np.minimum(lo, S - 1))
            v_hi = _take(finite, np.maximum(hi - 1, 0))
            d_lo = np.where(filled, np.abs(v_lo - mean), -1.0)
            d_hi = np.where(filled, np.abs(v_hi - mean), -1.0)
            far = np.maximum(d_lo, d_hi)
            jw = np.argmax(far, axis=-1)
            dist = _take(far, jw[..., None])[..., 0]
            scale = np.abs(mean).max(axis=-1)
            split = empty.any(axis=-1) & (dist > 1e-9 * np.maximum(scale, 1e-300))
            if split.any():
                ri, gi = np.nonzero(split)
                je = np.argmax(empty[ri, gi], axis=-1)  # first empty cell
                jw = jw[ri, gi]
                use_lo = d_lo[ri, gi, jw] >= d_hi[ri, gi, jw]
                mean[ri, gi, je] = np.where(use_lo, v_lo[ri, gi, jw], v_hi[ri, gi, jw])
                bounds_prev = None  # cells moved: not a fixed point yet
        levels = np.sort(mean, axis=-1)
    return levels, done


def _uniform_levels(Wg: np.ndarray, weight, bits: int) -> np.ndarray:
    """The better (per group) of the MSE-clipped symmetric and asymmetric RTN grids, as levels."""
    best_lev, best_err = None, None
    for symmetric in (True, False):
        grid = Grid(bits, symmetric)
        scale, z, _ = fit_params(Wg, grid, "auto", weight)
        q = np.arange(grid.qmin, grid.qmax + 1, dtype=np.float64)
        lev = (q - z[..., None]) * scale.astype(np.float64)[..., None]
        err = _sse(Wg, weight, lev.astype(np.float32))
        if best_lev is None:
            best_lev, best_err = lev, err
        else:
            better = err < best_err
            best_lev = np.where(better[..., None], lev, best_lev)
            best_err = np.where(better, err, best_err)
    return best_lev


def _sse(Wg: np.ndarray, weight, levels: np.ndarray) -> np.ndarray:
    """Squared error per group of ``Wg`` [r, G, S] against its nearest of sorted ``levels``."""
    idx = _nearest(Wg, levels)
    err = _take(levels, idx).astype(np.float64) - Wg
    err *= err
    if weight is not None:
        err *= weight
    return err.sum(axis=-1)


def _nearest(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index of the nearest level (ties to the lower) for x [r, G, S], levels [r, G, L] sorted."""
    mids = 0.5 * (levels[..., 1:].astype(np.float64) + levels[..., :-1].astype(np.float64))
    L = levels.shape[-1]
    idx = np.zeros(x.shape, dtype=np.intp)
    step = L >> 1
    while step:  # idx = #{j : x > mid_j}, by binary search over the L-1 sorted midpoints
        probe = _take(mids, idx + step - 1)
        idx = np.where(x > probe, idx + step, idx)
        step >>= 1
    return idx


def codebook(
    W,
    groups,
    bits: int,
    *,
    seed: int = 0,
    iters: int = 100,
    name: str = "weight",
) -> CodebookWeight:
    """Fit 2^bits levels per (row, group) of ``W`` [R, K] and index every weight.

    ``groups``: group map of length K (None: per channel). ``bits`` in {2, 3, 4, 8}.
    ``iters``: at most this many Lloyd iterations (it usually converges well before).
    ``seed``: accepted for a uniform call signature; the fit is deterministic (see module doc).
    """
    bits = Grid(bits).bits  # validates, naming the value
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 1:
        raise QuantInputError(f"iters must be a positive integer; got {iters!r}")
    del seed  # deterministic: quantile initialisation, deterministic re-seeding
    W = check_weight(W, name)
    R, K = W.shape
    layout = GroupLayout(np.zeros(K, dtype=np.intp) if groups is None else groups, K)
    G, S, L = layout.G, layout.S, 1 << bits
    levels = np.empty((R, G, L), dtype=np.float32)
    indices = np.empty((R, K), dtype=np.uint8)
    pad = ~layout.mask
    exact = bool(layout.counts.max() <= L)  # every group fits its levels: quantiles are exact
    ran = 0
    rows = max(1, _CHUNK_ELEMENTS // (G * S))
    for r0 in range(0, R, rows):
        r1 = min(R, r0 + rows)
        Wg = layout.gather(W[r0:r1])
        vals = np.sort(np.where(pad, np.inf, Wg), axis=-1)
        lev = _quantile_levels(vals, layout.counts, L)
        if not exact:
            lev, it_q = _lloyd(vals, layout.counts, lev, int(iters))
            lev_u, it_u = _lloyd(vals, layout.counts, _uniform_levels(Wg, layout.weight, bits), int(iters))
            better = _sse(Wg, layout.weight, lev_u.astype(np.float32)) < _sse(Wg, layout.weight, lev.astype(np.float32))
            lev = np.where(better[..., None], lev_u, lev)
            ran = max(ran, it_q, it_u)
        lev32 = np.sort(lev.astype(np.float32), axis=-1)
        levels[r0:r1] = lev32
        idx = _nearest(Wg, lev32)  # [r, G, S]
        # scatter back to column order (padding repeats a real column, so later writes agree)
        block = np.empty((r1 - r0, K), dtype=np.uint8)
        block[:, layout.index[layout.mask]] = idx[:, layout.mask]
        indices[r0:r1] = block
    return CodebookWeight(indices=indices, levels=levels, groups=layout.groups, bits=bits, iterations=ran)


def row_codebook(W, groups, bits: int, *, half_scales: bool = True, iters: int = 100, rounds: int = 2,
                 name: str = "weight") -> CodebookWeight:
    """One table of 2^bits levels per row of ``W`` [R, K], scaled per group (block) of ``groups``.

    Each block starts divided by its largest magnitude (rounded to float16 with ``half_scales``).
    Then, ``rounds`` times: the row's normalised values get 1-D k-means levels (:func:`codebook`
    with one group per row), and each block keeps whichever is smaller in squared error: its
    scale with the nearest levels, or the least-squares scale for those indices, Σ w·c / Σ c²
    (rounded the same way), with the indices re-chosen for it. This is the format of
    any4/NF4-style codebooks: a block carries one scale, like a uniform block, so lowbit's
    kernels stream the bytes of the uniform format.
    """
    W = check_weight(W, name)
    R, K = W.shape
    layout = GroupLayout(groups, K)
    round_ = half_rounded if half_scales else (lambda x: np.asarray(x, np.float32))
    Wg = layout.gather(W)  # [R, G, S]; padding repeats a real column
    mask = 1.0 if layout.weight is None else layout.weight
    amax = np.abs(Wg).max(axis=-1)
    scales = round_(np.where(amax > 0, amax, 1.0).astype(np.float32))
    scales = np.where(scales > 0, scales, np.float32(1))
    for _ in range(rounds):
        fitted = codebook(W / scales[:, layout.groups], None, bits, iters=iters, name=name)
        table = fitted.levels[:, 0, :]  # [R, L], ascending
        idx, c, sse = _scaled_fit(Wg, mask, table, scales)
        den = (c * c * mask).sum(axis=-1)
        refit = round_(np.where(den > 0, (Wg * c * mask).sum(axis=-1) / np.where(den > 0, den, 1), scales).astype(np.float32))
        refit = np.where(refit > 0, refit, scales)
        idx2, _, sse2 = _scaled_fit(Wg, mask, table, refit)
        better = sse2 < sse
        scales = np.where(better, refit, scales).astype(np.float32)
        idx = np.where(better[..., None], idx2, idx)
    indices = np.empty((R, K), dtype=np.uint8)
    indices[:, layout.index[layout.mask]] = idx[:, layout.mask]
    return CodebookWeight(indices=indices, levels=fitted.levels, groups=fitted.groups, bits=fitted.bits,
                          iterations=fitted.iterations, scales=scales, scale_groups=layout.groups)


def _scaled_fit(Wg: np.ndarray, mask, table: np.ndarray, s: np.ndarray):
    """For blocks Wg [R, G, S] scaled by s [R, G]: the nearest levels of each row's table [R, L]
    (indices, the levels themselves) and each block's squared error (padding masked out)."""
    u = Wg / s[..., None]
    idx = _nearest(u, table[:, None, :])
    c = _take(np.ascontiguousarray(np.broadcast_to(table[:, None, :], (*u.shape[:2], table.shape[1]))), idx)
    return idx, c, (((Wg - c * s[..., None]) ** 2) * mask).sum(axis=-1)
