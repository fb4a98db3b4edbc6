"""Round to nearest, with an MSE-optimal clipping ratio per (row, group).

For each (row, group) the step is s_c = c · s0 (s0: the unclipped min/max step of
:mod:`lowbit.quant.grid`, zero point z fixed), and the clip ratio c ∈ (0, 1] is chosen to
minimise the group's squared rounding error::

    c* = argmin_c  Σ_k ( (clamp(round(w_k / s_c) + z, qmin, qmax) - z) · s_c - w_k )²

In units of s0 (x = w / s0) the error is s0² · Σ (c·clamp(round(x/c), qmin - z, qmax - z) - x)²,
so the search runs on the normalised x in float32, vectorised over rows and groups, in row
chunks that stay in cache. The default search (``clip_grid="auto"``) tries the geometric grid
1, 0.8, 0.64, … ≥ 0.01 (the optimum ranges from ~0.95 for 4-bit blocks to ~0.03 for 2-bit
heavy-tailed channels), then 7 ratios on each side of each group's winner, 2.8 % apart; an
explicit ``clip_grid`` is searched exhaustively. c = 1 is always a candidate and is replaced only
by a strictly smaller error, and the winner is checked once more against c = 1 in float64 with
the float32 scale actually stored, so clipping never makes a group worse than min/max rounding.
"""

from __future__ import annotations

import numpy as np

from lowbit.quant.grid import (
    Grid,
    GroupLayout,
    QuantInputError,
    QuantizedWeight,
    _as_scale,
    base_params,
    check_weight,
    quantize_with,
    truncated_11,
    weight_sqnr,
)

#: elements per chunk of the clip search (float32: 1 MiB per temporary)
_CHUNK_ELEMENTS = 1 << 18


#: default search: geometric coarse grid 1, 0.8, 0.8², … down to _CLIP_FLOOR, then
#: _REFINE_STEPS ratios on each side of the coarse winner, 0.8^(1/8) ≈ 2.8 % apart
_COARSE_FACTOR = 0.8
_CLIP_FLOOR = 0.01
_REFINE_STEPS = 7


def default_clip_grid() -> np.ndarray:
    """The coarse candidates of the default search: 1, 0.8, 0.64, … ≥ 0.01 (21 ratios).

    Geometric, because the optimum spans two decades: ~0.9 for 4-bit blocks of 32, ~0.2 for
    2-bit blocks, ~0.03 for a 2-bit heavy-tailed (Student-t, 3 dof) channel of 4096 weights.
    """
    n = int(np.floor(np.log(_CLIP_FLOOR) / np.log(_COARSE_FACTOR))) + 1
    return _COARSE_FACTOR ** np.arange(n)


def _check_clip_grid(clip_grid) -> np.ndarray:
    grid = np.unique(np.asarray(clip_grid, dtype=np.float64).ravel())[::-1]
    if grid.size == 0 or not np.all(np.isfinite(grid)) or grid[-1] <= 0 or grid[0] > 1:
        raise QuantInputError("clip_grid must be a non-empty list of ratios in (0, 1]")
    if grid[0] != 1.0:
        grid = np.concatenate([[1.0], grid])
    return grid


def _normalised_sse(x, c, lo, hi, weight, buf):
    """Σ_k (c·clamp(round(x_k / c), lo, hi) - x_k)² over the last axis, float32, in ``buf``.

    ``c`` is a float32 scalar or a [..., 1] array; ``weight`` (0/1) masks padding.
    """
    t = buf
    np.multiply(x, np.float32(1.0) / c, out=t)
    np.rint(t, out=t)
    np.clip(t, lo, hi, out=t)
    np.multiply(t, c, out=t)
    np.subtract(t, x, out=t)
    if weight is not None:  # 0/1 weights: squaring keeps them
        np.multiply(t, weight, out=t)
    return np.einsum("...k,...k->...", t, t)


def _refinements(centre):
    """Ratios ±_REFINE_STEPS fine steps around ``centre`` (capped at 1)."""
    return [
        np.minimum(centre * _COARSE_FACTOR ** (j / (_REFINE_STEPS + 1)), 1.0)
        for j in [*range(-_REFINE_STEPS, 0), *range(1, _REFINE_STEPS + 1)]
    ]


def _candidates(clip_grid):
    auto = isinstance(clip_grid, str)
    if auto and clip_grid != "auto":
        raise QuantInputError(f"clip_grid must be None, 'auto' or a list of ratios; got {clip_grid!r}")
    return auto, (default_clip_grid() if auto else _check_clip_grid(clip_grid))


def _bounds(grid: Grid, z):
    if grid.symmetric:  # scalar bounds are cheaper than broadcast arrays
        return np.float32(grid.qmin), np.float32(grid.qmax)
    return (grid.qmin - z[..., None]).astype(np.float32), (grid.qmax - z[..., None]).astype(np.float32)


def search_params(Wg: np.ndarray, grid: Grid, clip_grid="auto", weight: np.ndarray | None = None):
    """Unclipped step, zero point and MSE-optimal clip ratio for each group of ``Wg`` [..., S].

    ``clip_grid``: ``None`` skips the search (c = 1); ``"auto"`` searches :func:`default_clip_grid`
    and then refines around each group's winner (±7 steps of 2.8 %); an array is searched
    exhaustively as given (1.0 is always added). ``weight`` (broadcastable to ``Wg``, 0 on
    padding) weights each element's squared error. Returns float64 ``(s0, z, clip)``, each [...].
    """
    s0, z = base_params(Wg, grid)
    if clip_grid is None:
        return s0, z, np.ones_like(s0)
    auto, cands = _candidates(clip_grid)
    x = (Wg / s0[..., None]).astype(np.float32)
    lo, hi = _bounds(grid, z)
    buf = np.empty_like(x)

    def sse(c):
        return _normalised_sse(x, c, lo, hi, weight, buf)

    best = np.full(s0.shape, np.inf, dtype=np.float32)
    clip = np.ones(s0.shape, dtype=np.float64)
    for c in cands:  # descending: ties keep the larger ratio
        err = sse(np.float32(c))
        better = err < best
        best = np.where(better, err, best)
        clip[better] = c
    if auto:
        for c in _refinements(clip.copy()):
            err = sse(c[..., None].astype(np.float32))
            better = err < best
            best = np.where(better, err, best)
            clip = np.where(better, c, clip)
    return s0, z, clip


def _group_sse(Wg: np.ndarray, scale: np.ndarray, z: np.ndarray, grid: Grid, weight) -> np.ndarray:
    """float64 squared rounding error per group for float32 ``scale`` [...] and zero point ``z``."""
    s = scale.astype(np.float64)[..., None]
    zz = z[..., None]
    q = np.clip(np.rint(Wg / s) + zz, grid.qmin, grid.qmax)
    err = (q - zz) * s - Wg
    err *= err
    if weight is not None:
        err *= weight
    return err.sum(axis=-1)


def fit_params(Wg: np.ndarray, grid: Grid, clip_grid, weight=None):
    """Stored float32 ``scale``, zero point and clip ratio per group of ``Wg`` [..., S].

    The clip search runs in float32; the winner is then compared with c = 1 in float64 using the
    float32 scales actually stored, and c = 1 is kept where it is at least as good.
    """
    s0, z, clip = search_params(Wg, grid, clip_grid, weight)
    scale = _as_scale(s0, clip, grid)
    if clip_grid is not None:
        clipped = clip < 1.0
        if clipped.any():
            plain = _as_scale(s0, 1.0, grid)
            worse = _group_sse(Wg, scale, z, grid, weight) >= _group_sse(Wg, plain, z, grid, weight)
            worse &= clipped
            scale = np.where(worse, plain, scale)
            clip = np.where(worse, 1.0, clip)
    return scale, z, clip


def fit_tensor(W: np.ndarray, grid: Grid, clip_grid):
    """:func:`fit_params` with one group holding all of ``W``, searched in cache-sized chunks.

    Returns float32 ``scale`` [1, 1], float64 zero point [1, 1] and clip ratio [1, 1].
    """
    flat = W.reshape(1, 1, -1)
    s0, z = base_params(flat, grid)
    clip = np.ones_like(s0)
    if clip_grid is not None:
        auto, cands = _candidates(clip_grid)
        lo, hi = np.float32(grid.qmin - z[0, 0]), np.float32(grid.qmax - z[0, 0])
        buf = np.empty(min(flat.shape[-1], _CHUNK_ELEMENTS), dtype=np.float32)

        def best_of(ratios):
            total = np.zeros(len(ratios))
            for a in range(0, flat.shape[-1], _CHUNK_ELEMENTS):
                x = (flat[0, 0, a : a + _CHUNK_ELEMENTS] / s0[0, 0]).astype(np.float32)
                for j, c in enumerate(ratios):
                    total[j] += _normalised_sse(x, np.float32(c), lo, hi, None, buf[: x.size])
            j = int(np.argmin(total))  # first minimum: the largest ratio among ties
            return float(ratios[j]), total[j]

        c, err = best_of(list(cands))
        if auto:
            c2, err2 = best_of([float(r) for r in _refinements(np.float64(c))])
            c = c2 if err2 < err else c
        clip = np.full_like(s0, c)
    scale = _as_scale(s0, clip, grid)
    if clip[0, 0] < 1.0:
        plain = _as_scale(s0, 1.0, grid)
        if _group_sse(flat, scale, z, grid, None)[0, 0] >= _group_sse(flat, plain, z, grid, None)[0, 0]:
            scale, clip = plain, np.ones_like(s0)
    return scale, z, clip


def byte_steps(scale: np.ndarray, live: np.ndarray | None = None) -> np.ndarray:
    """Each row's step for ``Grid.byte_scales``: its largest scale (of ``live`` groups, when any is)
    / 255, cut to 11 significant bits (:func:`truncated_11`) so that step·q is exact in float32 for
    every integer q ≤ 255. ``scale`` [R, G] → float32 [R, 1]."""
    most = scale.max(axis=1, keepdims=True)
    if live is not None:
        alive = np.where(live, scale, 0).max(axis=1, keepdims=True)
        most = np.where(alive > 0, alive, most)
    return truncated_11(most / np.float32(255)).astype(np.float32)


def byte_round(Wg: np.ndarray, scale: np.ndarray, z: np.ndarray, grid: Grid, weight=None, step=None) -> np.ndarray:
    """Each row's group scales as step·q, q an integer in [1, 255] (``Grid.byte_scales``), for
    ``Wg`` [R, G, S] and ``scale`` [R, G]; returns float32 [R, G].

    ``step`` [R, 1] defaults to :func:`byte_steps` of the live groups: the row's largest scale then
    gets q = 255 and stays within 2^-10 of what it was. Every other group takes the better of the
    two q around scale / step (squared rounding error of its weights, zero point ``z`` kept; a
    scale above 255 steps is clipped to 255). Groups whose weights are all zero (any scale is exact
    for them) get q = 1 and do not set the step: a dead block must not coarsen its row. A reader
    recovers the step exactly from the scales of a row (lowbit's kernels: runtime/native).
    """
    live = np.abs(Wg if weight is None else Wg * weight).max(axis=-1) > 0
    if step is None:
        step = byte_steps(scale, live)
    ratio = scale.astype(np.float64) / step
    lo = np.clip(np.floor(ratio), 1, 255)
    hi = np.clip(lo + 1, 1, 255)
    s_lo, s_hi = (step * lo).astype(np.float32), (step * hi).astype(np.float32)
    better_hi = _group_sse(Wg, s_hi, z, grid, weight) < _group_sse(Wg, s_lo, z, grid, weight)
    out = np.where(better_hi, s_hi, s_lo)
    return np.where(live, out, np.broadcast_to(step, out.shape)).astype(np.float32)


def fit_groups(W: np.ndarray, layout: GroupLayout, grid: Grid, clip_grid):
    """:func:`fit_params` for every (row, group) of ``W`` [R, K], in cache-sized row chunks.

    Returns float32 ``scale`` [R, G], float64 zero point [R, G] and float64 clip ratio [R, G].
    """
    R = W.shape[0]
    scale = np.empty((R, layout.G), dtype=np.float32)
    z = np.empty((R, layout.G), dtype=np.float64)
    clip = np.empty((R, layout.G), dtype=np.float64)
    rows = max(1, _CHUNK_ELEMENTS // (layout.G * layout.S))
    for r0 in range(0, R, rows):
        r1 = min(R, r0 + rows)
        Wg = layout.gather(W[r0:r1])
        scale[r0:r1], z[r0:r1], clip[r0:r1] = fit_params(Wg, grid, clip_grid, layout.weight)
        if grid.byte_scales:
            scale[r0:r1] = byte_round(Wg, scale[r0:r1], z[r0:r1], grid, layout.weight)
    return scale, z, clip


def rtn(
    W,
    groups,
    grid: Grid,
    *,
    mse_clip: bool = True,
    clip_grid="auto",
    per_tensor: bool = False,
    name: str = "weight",
) -> tuple[QuantizedWeight, dict]:
    """Round ``W`` [R, K] to ``grid`` with one scale per (row, group), or per tensor.

    ``groups``: group map of length K (None: per channel). ``mse_clip``: search the clip ratio
    per (row, group) minimising the squared error (``clip_grid``: ``"auto"``, a coarse
    geometric grid refined around each winner, or an explicit list of ratios, e.g.
    ``np.linspace(0.5, 1, 26)``); otherwise plain min/max (c = 1). ``per_tensor``: one scale for
    the whole matrix (``groups`` ignored). ``name`` names the weight in error messages.

    Returns ``(QuantizedWeight, report)``; ``report`` has ``clip`` (float64 [R, G] or [1, 1],
    the chosen ratios), ``mean_clip`` and ``sqnr_db`` (weight SQNR of the dequantized result).
    """
    if not isinstance(grid, Grid):
        raise QuantInputError(f"grid must be a lowbit.quant.grid.Grid; got {grid!r}")
    W = check_weight(W, name)
    R, K = W.shape
    cands = clip_grid if mse_clip else None
    if per_tensor:
        groups = np.zeros(K, dtype=np.intp)
        scale, z, clip = fit_tensor(W, grid, cands)
    else:
        layout = GroupLayout(np.zeros(K, dtype=np.intp) if groups is None else groups, K)
        groups = layout.groups
        scale, z, clip = fit_groups(W, layout, grid, cands)
    zero_point = None if grid.symmetric else z.astype(np.uint8)
    qw = _make(W, scale, zero_point, groups, grid)
    report = {
        "clip": clip,
        "mean_clip": float(clip.mean()),
        "sqnr_db": weight_sqnr(W, qw.dequantize()),
    }
    return qw, report


def _make(W, scale, zero_point, groups, grid) -> QuantizedWeight:
    codes = quantize_with(W, scale, zero_point, groups, grid)
    return QuantizedWeight(codes=codes, scale=scale, zero_point=zero_point, groups=np.asarray(groups), grid=grid)
