"""GPTQ: rounding with second-order error feedback (Frantar et al., 2022, arXiv:2210.17323).

A layer computes y = W x with W [R, K]; its calibration inputs x give H = E[x xᵀ] [K, K]. GPTQ
minimises the layer's output error row by row, ‖W X − Ŵ X‖² = Σ_r (w_r − ŵ_r)ᵀ H (w_r − ŵ_r)
(the *proxy loss*), quantizing one column at a time and moving the rounding error onto the
columns not yet quantized (Optimal Brain Surgeon, with the column order fixed).

With H⁻¹ = Uᵀ U (U upper triangular, the Cholesky factor of the inverse), quantizing column i
of the (current) weights ``w`` to ``q`` updates the remaining columns j > i as::

    e_i = (w_i − q_i) / U_ii,      w_j ← w_j − e_i · U_ij

which is the OBS update restricted to the columns still free. Updates are applied lazily:
inside a block of ``block_size`` columns immediately, to the columns after the block once, as
``W[:, after] −= E_block · U[block, after]`` (one matrix product).

Numerics, all in float64:

* H is symmetrised; *dead* inputs (H_ii = 0: the input is always zero) get H_ii = 1 and weight
  0, as in the paper (any value is exact for them).
* Damping: λ = ``damp`` · mean(diag H) is added to the diagonal. U comes from one Cholesky
  factorisation of the reversed matrix: with J the reversal permutation, J H J = L Lᵀ gives
  H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), so U = J L⁻¹ J (no explicit inverse, no second factorisation).
  If the factorisation fails, λ is multiplied by 10, up to 4 times; the report says so.
* act_order: columns are processed by descending H_ii (the inputs with most energy first).
  Codes and scales are returned in the original column order.

Group scales are computed **inside the loop**, when the first column of a group (in processing
order) is reached, from the group's *current* weights: the values that already include the
error feedback of every column quantized before (also the pending, not yet applied, lazy
updates of the current block, so the result does not depend on ``block_size``). Groups follow
the *original* column map also with act_order: a group's columns may be scattered in
processing order, and its scale is fixed when the first of them comes up; none of its columns
has been quantized then. ``static_groups=True`` instead fits every group's scale up front from
the original weights (what the reference implementation's option of that name does); per-tensor
and per-channel scales are always fitted up front (for per-channel the two coincide). With a grid's
``byte_scales`` each row's step is set up front (:func:`lowbit.quant.rtn.byte_steps` of the original
weights' scales, with room above them) and every group's scale, fitted in the loop, is rounded to
a multiple of it.

The report compares the proxy loss with that of :func:`lowbit.quant.rtn.rtn` (same grid, groups
and clipping option) on the same, undamped H.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.linalg

from lowbit.quant.grid import (
    Grid,
    GroupLayout,
    QuantInputError,
    QuantizedWeight,
    check_weight,
    weight_sqnr,
)
from lowbit.quant.rtn import byte_round, byte_steps, fit_groups, fit_params, fit_tensor, rtn

#: byte scales (Grid.byte_scales): the row's step leaves room for scales up to this many times the
#: largest scale of the original weights, since error feedback grows the weights GPTQ has yet to
#: round. Tiny LLaMA, GPTQ block 32, bits/byte (float16 scales: W2 1.957, W4 1.7200): ratio 1 (the
#: largest scale 255 steps) W2 1.9711, W4 1.7208; 1.1 → 1.9431 / 1.7218; 1.25 → 1.9473 / 1.7210;
#: 1.5 → 1.9456 / 1.7244; 2 → 1.9296 / 1.7237.
_BYTE_STEP_MARGIN = 1.25

#: rows of X cast to float64 at a time in HessianAccumulator.update
_UPDATE_ROWS = 4096
#: columns per inner lazy-update batch inside a block (cache-sized rank-1 updates)
_SUB_BLOCK = 16
#: how many times a failed Cholesky factorisation retries with 10× the damping
_DAMP_RETRIES = 4


class HessianAccumulator:
    """Streams calibration inputs of one layer into H = mean(x xᵀ) [K, K], in float64.

    ``update(X)`` takes X of shape [..., K] (leading dimensions are flattened into samples) and
    adds XᵀX; X itself is never stored. ``H()`` returns the mean over all ``n`` samples.
    """

    def __init__(self, K: int, name: str = "calibration input"):
        if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or K < 1:
            raise QuantInputError(f"HessianAccumulator needs a positive number of columns; got {K!r}")
        self.K = int(K)
        self.name = name
        self.n = 0
        self._sum = np.zeros((self.K, self.K), dtype=np.float64, order="F")  # upper triangle

    def update(self, X) -> None:
        """Add the samples of X [..., K] (any float dtype) to the running sum."""
        X = np.asarray(X)
        if X.ndim < 1 or X.shape[-1] != self.K:
            raise QuantInputError(f"{self.name} has shape {X.shape}; its last axis must have {self.K} features")
        if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
            raise QuantInputError(f"{self.name} must hold real numbers; got dtype {X.dtype}")
        X = X.reshape(-1, self.K)
        if np.issubdtype(X.dtype, np.floating) and not np.isfinite(X).all():
            raise QuantInputError(f"{self.name} contains NaN or Inf values")
        for r0 in range(0, X.shape[0], _UPDATE_ROWS):
            chunk = np.asarray(X[r0 : r0 + _UPDATE_ROWS], dtype=np.float64)
            # S ← S + chunkᵀ chunk, upper triangle only (BLAS syrk: half the work of a product)
            self._sum = scipy.linalg.blas.dsyrk(1.0, chunk, beta=1.0, c=self._sum, trans=1, lower=0, overwrite_c=1)
        self.n += X.shape[0]

    def H(self) -> np.ndarray:
        """Mean of x xᵀ over the samples seen so far, float64 [K, K] (symmetric)."""
        if self.n == 0:
            raise QuantInputError(f"no samples of {self.name} were seen; cannot form its Hessian")
        upper = np.triu(self._sum)
        return (upper + np.triu(upper, 1).T) / self.n


def _inverse_cholesky(H: np.ndarray, damp: float, notes: list[str]):
    """Upper U with (H + λI)⁻¹ = Uᵀ U; retries with 10× λ when the factorisation fails."""
    K = H.shape[0]
    mean_diag = float(np.mean(np.diag(H)))
    lam = damp * mean_diag
    eye = np.eye(K)
    for attempt in range(_DAMP_RETRIES + 1):
        try:
            L = scipy.linalg.cholesky((H + lam * eye)[::-1, ::-1], lower=True, check_finite=False)
            Linv, info = scipy.linalg.lapack.dtrtri(L, lower=1)
            if info != 0:
                raise np.linalg.LinAlgError(f"dtrtri info {info}")
            U = np.ascontiguousarray(Linv[::-1, ::-1])
            if not np.all(np.isfinite(U)) or not np.all(np.diag(U) > 0):
                raise np.linalg.LinAlgError("non-finite inverse factor")
            return U, lam, attempt
        except (np.linalg.LinAlgError, ValueError):
            old = lam
            lam = lam * 10.0 if lam > 0 else 1e-6 * mean_diag
            if attempt < _DAMP_RETRIES:
                notes.append(f"Cholesky factorisation failed with damping {old:.3g}; retrying with {lam:.3g}")
    raise QuantInputError(
        f"the Hessian is not positive definite even with damping {lam / 10:.3g} "
        f"({lam / 10 / mean_diag if mean_diag else float('nan'):.3g} × its mean diagonal)"
    )


def proxy_loss(W, Wq, H) -> float:
    """Σ_r (w_r − ŵ_r)ᵀ H (w_r − ŵ_r): the layer output error GPTQ minimises, float64."""
    E = np.asarray(W, dtype=np.float64) - np.asarray(Wq, dtype=np.float64)
    return float(np.sum((E @ np.asarray(H, dtype=np.float64)) * E))


def gptq(
    W,
    H,
    groups,
    grid: Grid,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    mse_clip: bool = True,
    clip_grid="auto",
    static_groups: bool = False,
    per_tensor: bool = False,
    compare_rtn: bool = True,
    name: str = "weight",
) -> tuple[QuantizedWeight, dict]:
    """Quantize ``W`` [R, K] with GPTQ given the input second moment ``H`` [K, K].

    ``groups``: group map of length K (None: per channel); ``grid``: the integer grid.
    ``damp``: diagonal damping as a fraction of mean(diag H). ``block_size``: columns per lazy
    batch update (only speed depends on it). ``act_order``: process columns by descending H_ii.
    ``mse_clip`` / ``clip_grid``: search each group's clip ratio (minimising the squared weight
    error of the group's current weights, as :func:`~lowbit.quant.rtn.rtn` does). ``static_groups``:
    fit all group scales from the original weights before the loop. ``per_tensor``: one scale.
    ``compare_rtn``: also round with RTN and measure its proxy loss (one [R,K]·[K,K] product).

    Returns ``(QuantizedWeight, report)``; the report has ``proxy_loss`` and ``rtn_proxy_loss``
    (RTN with the same grid/groups/clipping on the same H), ``proxy_gain`` (1 − their ratio),
    ``sqnr_db``, ``clip`` [R, G] and ``mean_clip``, ``damp`` (λ, absolute), ``damp_ratio``
    (λ / mean diag H), ``damp_increases``, ``dead_columns``, ``notes`` and ``seconds``.
    """
    start = time.perf_counter()
    if not isinstance(grid, Grid):
        raise QuantInputError(f"grid must be a lowbit.quant.grid.Grid; got {grid!r}")
    W0 = check_weight(W, name)
    R, K = W0.shape
    H0 = _check_hessian(H, K, name)
    if not (isinstance(damp, (int, float, np.floating)) and np.isfinite(damp) and damp >= 0):
        raise QuantInputError(f"damp must be a non-negative fraction of the mean Hessian diagonal; got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise QuantInputError(f"block_size must be a positive integer; got {block_size!r}")
    cands = clip_grid if mse_clip else None
    notes: list[str] = []

    layout = GroupLayout(np.zeros(K, dtype=np.intp) if (groups is None or per_tensor) else groups, K)
    G = 1 if per_tensor else layout.G

    Hw = (H0 + H0.T) * 0.5
    dead = np.diag(Hw) <= 0
    Wd = W0.copy()
    if dead.any():
        Hw[dead, :] = 0.0
        Hw[:, dead] = 0.0
        Hw[dead, dead] = 1.0
        Wd[:, dead] = 0.0

    perm = np.argsort(-np.diag(Hw), kind="stable") if act_order else np.arange(K)
    U, lam, retries = _inverse_cholesky(Hw[np.ix_(perm, perm)], float(damp), notes)

    # scales: float32 as stored; s64/z64 are what the loop rounds with
    scale = np.ones((1 if per_tensor else R, G), dtype=np.float32)
    zero = np.zeros(scale.shape, dtype=np.float64)
    clip = np.ones(scale.shape, dtype=np.float64)
    if per_tensor:
        scale, zero, clip = fit_tensor(Wd, grid, cands)
    elif static_groups or G == 1:
        scale, zero, clip = fit_groups(Wd, layout, grid, cands)
    steps = None
    if grid.byte_scales and not (per_tensor or static_groups or G == 1):
        # a row's groups share one step (rtn.byte_round), set from the original weights' scales
        # with room above them; each group's scale, fitted in the loop, is rounded to a multiple
        steps = byte_steps(fit_groups(Wd, layout, grid, cands)[0] * np.float32(_BYTE_STEP_MARGIN))
    fitted = per_tensor or static_groups or G == 1

    gp = layout.groups[perm]  # group of each processing position
    pos = np.empty(K, dtype=np.intp)
    pos[perm] = np.arange(K)
    members = [np.sort(pos[layout.index[g, layout.mask[g]]]) for g in range(G)]  # processing positions
    first = np.array([m[0] for m in members])

    Wp = np.asfortranarray(Wd[:, perm])
    codes = np.empty((R, K), dtype=np.float64, order="F")
    Err = np.empty((R, K), dtype=np.float64, order="F")  # e_i of every column, processing order
    qmin, qmax = float(grid.qmin), float(grid.qmax)
    s64 = np.broadcast_to(scale.astype(np.float64), (R, G)).copy()
    z64 = np.broadcast_to(zero, (R, G)).copy()

    # Two levels of lazy updates: columns after the block get the block's feedback once (one
    # product); inside a block the same is done per sub-block, and only the columns of the
    # current sub-block get rank-1 updates (they stay in cache).
    for i1 in range(0, K, block_size):
        i2 = min(K, i1 + block_size)
        for j1 in range(i1, i2, _SUB_BLOCK):
            j2 = min(i2, j1 + _SUB_BLOCK)
            for i in range(j1, j2):
                g = gp[i]
                if not fitted and first[g] == i:
                    cur = _current(Wp, Err, U, members[g], i, i1, i2, j1, j2)
                    sc, zz, cc = fit_params(cur[:, None, :], grid, cands)
                    if steps is not None:
                        sc = byte_round(cur[:, None, :], sc, zz, grid, step=steps)
                    scale[:, g], zero[:, g], clip[:, g] = sc[:, 0], zz[:, 0], cc[:, 0]
                    s64[:, g], z64[:, g] = sc[:, 0].astype(np.float64), zz[:, 0]
                s, z = s64[:, g], z64[:, g]
                w = Wp[:, i]
                q = np.rint(w / s)
                q += z
                np.clip(q, qmin, qmax, out=q)
                codes[:, i] = q
                e = w - (q - z) * s
                e /= U[i, i]
                Err[:, i] = e
                if i + 1 < j2:
                    Wp[:, i + 1 : j2] -= np.outer(e, U[i, i + 1 : j2])
            if j2 < i2:
                Wp[:, j2:i2] -= Err[:, j1:j2] @ U[j1:j2, j2:i2]
        if i2 < K:
            Wp[:, i2:] -= Err[:, i1:i2] @ U[i1:i2, i2:]

    out_codes = np.empty((R, K), dtype=grid.code_dtype)
    out_codes[:, perm] = codes
    groups_out = np.zeros(K, dtype=np.intp) if per_tensor else layout.groups
    qw = QuantizedWeight(
        codes=out_codes,
        scale=scale,
        zero_point=None if grid.symmetric else zero.astype(np.uint8),
        groups=groups_out,
        grid=grid,
    )
    Wq = qw.dequantize()
    # OBS bookkeeping: quantizing column i adds e_i² to the loss under the damped H, so
    # (Wd − Ŵ)(H + λI)(Wd − Ŵ)ᵀ = Σ e²; subtract λ‖Wd − Ŵ‖². Dead columns are exact in Wd and
    # their rows/columns of H are zero, so this is also the loss of W itself under H.
    Ed = Wd - Wq
    loss = max(float(np.einsum("ij,ij->", Err, Err)) - lam * float(np.einsum("ij,ij->", Ed, Ed)), 0.0)
    rtn_loss = float("nan")
    if compare_rtn:
        rq, _ = rtn(W0, layout.groups, grid, mse_clip=mse_clip, clip_grid=clip_grid, per_tensor=per_tensor, name=name)
        rtn_loss = proxy_loss(W0, rq.dequantize(), H0)
    mean_diag = float(np.mean(np.diag(Hw)))
    report = {
        "proxy_loss": loss,
        "rtn_proxy_loss": rtn_loss,
        "proxy_gain": (1.0 - loss / rtn_loss) if rtn_loss > 0 else float("nan"),
        "sqnr_db": weight_sqnr(W0, Wq),
        "clip": clip,
        "mean_clip": float(np.mean(clip)),
        "damp": lam,
        "damp_ratio": lam / mean_diag if mean_diag > 0 else float("nan"),
        "damp_increases": retries,
        "dead_columns": int(dead.sum()),
        "act_order": bool(act_order),
        "static_groups": bool(static_groups),
        "notes": notes,
        "seconds": time.perf_counter() - start,
    }
    return qw, report


def _current(Wp, Err, U, P, i, i1, i2, j1, j2) -> np.ndarray:
    """Current weights of the columns at processing positions ``P`` (all ≥ i), at column i.

    Columns in the current sub-block [j1, j2) are up to date; those later in the block still
    miss the feedback of columns j1..i-1, those after the block that of columns i1..i-1.
    """
    cur = Wp[:, P]
    in_block = (P >= j2) & (P < i2)
    if in_block.any() and i > j1:
        cur[:, in_block] -= Err[:, j1:i] @ U[j1:i, P[in_block]]
    later = P >= i2
    if later.any() and i > i1:
        cur[:, later] -= Err[:, i1:i] @ U[i1:i, P[later]]
    return cur


def _check_hessian(H, K: int, name: str) -> np.ndarray:
    H = np.asarray(H)
    if H.shape != (K, K):
        raise QuantInputError(f"the Hessian for {name} must be [{K}, {K}]; got shape {H.shape}")
    H = H.astype(np.float64)
    if not np.isfinite(H).all():
        raise QuantInputError(f"the Hessian for {name} contains NaN or Inf values")
    return H
