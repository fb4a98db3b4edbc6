"""Partial Tucker-2 of a conv kernel K [N, C, kh, kw] on its channel modes (0 and 1), float64.

    K ≈ K̂ = G ×₀ U_out ×₁ U_in,   K̂[n, c, i, j] = Σ_{r,s} U_out[n, r]·U_in[c, s]·G[r, s, i, j]

with U_out [N, R_out], U_in [C, R_in] orthonormal columns and the core G [R_out, R_in, kh, kw].
(T ×ₘ A multiplies mode m of T by A: the mode-m index of T is summed against A's columns.)
A convolution y = K ⋆ x is then three convolutions (Kim et al., 2015):

    z = U_inᵀ ⋆ x   (1×1, C → R_in)      w = G ⋆ z   (kh×kw, R_in → R_out; the original strides,
    y = U_out ⋆ w + bias  (1×1, R_out → N)           pads, dilations)

costing C·R_in + R_in·R_out·kh·kw + R_out·N multiply-adds per output pixel instead of N·C·kh·kw
(the first 1×1 runs at the input resolution).

For orthonormal factors the best core is G = K ×₀ U_outᵀ ×₁ U_inᵀ and ‖K − K̂‖² = ‖K‖² − ‖G‖².
HOSVD starts U_out (U_in) as the leading left singular vectors of the mode-0 (mode-1) unfolding
of K, computed as the top eigenvectors of the unfolding's Gram matrix A·Aᵀ (a channel count
square, and defined for every rank even when A has fewer columns than the rank). HOOI then
alternates, each step maximising ‖G‖ over one factor with the other fixed: U_out = leading left
singular vectors of unfold(K ×₁ U_inᵀ, 0), then U_in = those of unfold(K ×₀ U_outᵀ, 1). The
error never rises; the loop tracks it as sqrt(1 − ‖G‖²/‖K‖²) (cheap, but rounding noise below
~1e-7) and stops when it improves by less than ``tol``, falls below that floor, or after
``iters`` sweeps (``iterations`` counts the sweeps run). The reported ``rel_error`` is measured
directly, ‖K − K̂‖/‖K‖.
Each factor's columns have their largest-magnitude entry positive (deterministic output).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from lowbit.decomp import finite_float64
from lowbit.decomp.svd import fix_signs
from lowbit.decomp.vbmf import evbmf

#: below this relative error the loop's ‖K‖² − ‖G‖² formula is rounding noise: stop iterating
_ERR_FLOOR = 1e-7


@dataclass(eq=False)
class Tucker2:
    """K ≈ core ×₀ u_out ×₁ u_in, with the relative Frobenius error and the HOOI sweeps run."""

    core: np.ndarray  # [R_out, R_in, kh, kw]
    u_out: np.ndarray  # [N, R_out]
    u_in: np.ndarray  # [C, R_in]
    rel_error: float  # ‖K − K̂‖_F / ‖K‖_F
    iterations: int

    def reconstruct(self) -> np.ndarray:
        """K̂ = core ×₀ u_out ×₁ u_in, [N, C, kh, kw]."""
        return mode_dot(mode_dot(self.core, self.u_out, 0), self.u_in, 1)


def unfold(T: np.ndarray, mode: int) -> np.ndarray:
    """Mode-``mode`` unfolding: rows indexed by that mode, the other modes in C order as columns."""
    return np.moveaxis(T, mode, 0).reshape(T.shape[mode], -1)


def mode_dot(T: np.ndarray, A: np.ndarray, mode: int) -> np.ndarray:
    """T ×ₘ A: mode ``mode`` of T (size A.shape[1]) replaced by A's rows (size A.shape[0])."""
    return np.moveaxis(np.tensordot(A, T, axes=(1, mode)), 0, mode)


def partial_tucker(K, ranks: tuple[int, int], *, iters: int = 20, tol: float = 1e-10) -> Tucker2:
    """Tucker-2 of K [N, C, kh, kw] at ``ranks`` = (R_out, R_in): HOSVD, then up to ``iters`` HOOI sweeps."""
    K = _check_kernel(K)
    r_out, r_in = _check_ranks(ranks, K.shape)
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
        raise ValueError(f"iters must be a non-negative number of HOOI sweeps; got {iters!r}")
    u_out = _leading(unfold(K, 0), r_out)
    u_in = _leading(unfold(K, 1), r_in)
    norm2 = float(np.sum(K * K))
    by_in, by_out = _layout(K, 1), _layout(K, 0)
    err = _core_error(_project(by_out, u_out), u_in, norm2)
    sweeps = 0
    while sweeps < iters and err > _ERR_FLOOR:
        new_out = _leading(_project(by_in, u_in), r_out)
        projected = _project(by_out, new_out)
        new_in = _leading(projected, r_in)
        new_err = _core_error(projected, new_in, norm2)
        sweeps += 1
        if new_err > err - tol:  # converged (or, by rounding, worse: keep the previous factors)
            if new_err <= err:
                u_out, u_in = new_out, new_in
            break
        u_out, u_in, err = new_out, new_in, new_err
    core = mode_dot(mode_dot(K, u_out.T, 0), u_in.T, 1)
    t = Tucker2(core, u_out, u_in, 0.0, sweeps)
    t.rel_error = float(np.linalg.norm(K - t.reconstruct()) / np.sqrt(norm2)) if norm2 > 0 else 0.0
    return t


def vbmf_ranks(K) -> tuple[int, int]:
    """(R_out, R_in) from EVBMF of the mode-0 and mode-1 unfoldings of K, each at least 1."""
    K = _check_kernel(K)
    return max(1, evbmf(unfold(K, 0)).rank), max(1, evbmf(unfold(K, 1)).rank)


def _leading(A: np.ndarray, r: int) -> np.ndarray:
    """The r leading left singular vectors of A [m, n], sign-fixed: the top eigenvectors of A·Aᵀ.

    The Gram matrix is m×m with m a channel count, far smaller than the n = m'·kh·kw columns, and
    its eigenvectors exist for every r ≤ m even when n < r (a thin SVD would stop at n).
    """
    _, V = scipy.linalg.eigh(A @ A.T, driver="evd", check_finite=False)  # all of them: faster than a subset
    return fix_signs(np.ascontiguousarray(V[:, : -r - 1 : -1]))


def _layout(K: np.ndarray, mode: int) -> np.ndarray:
    """K with channel mode ``mode`` last: [other, kh, kw, K.shape[mode]], contiguous (one copy)."""
    return np.ascontiguousarray(np.moveaxis(K, (1 - mode, mode), (0, 3)))


def _project(layout: np.ndarray, U: np.ndarray) -> np.ndarray:
    """unfold(K ×_mode Uᵀ, other mode) up to a column permutation, from ``_layout(K, mode)``.

    Left singular vectors (and Gram matrices) do not depend on the order of the columns, so the
    rows are the other channel mode and the columns (kh, kw, R) in the order the product gives.
    """
    return (layout.reshape(-1, layout.shape[3]) @ U).reshape(layout.shape[0], -1)


def _core_error(projected: np.ndarray, u_in: np.ndarray, norm2: float) -> float:
    """sqrt(1 − ‖G‖²/‖K‖²) with G = u_inᵀ·(K ×₀ u_outᵀ unfolded on mode 1): the loop's error."""
    if norm2 == 0.0:
        return 0.0
    core = u_in.T @ projected
    return float(np.sqrt(max(1.0 - float(np.sum(core * core)) / norm2, 0.0)))


def _check_kernel(K) -> np.ndarray:
    return finite_float64(K, 4, "a Tucker-2 decomposition needs a non-empty conv kernel [N, C, kh, kw]", "the conv kernel")


def _check_ranks(ranks, shape) -> tuple[int, int]:
    if not isinstance(ranks, (tuple, list)) or len(ranks) != 2:
        raise ValueError(f"Tucker-2 ranks must be a pair (R_out, R_in); got {ranks!r}")
    for rank, bound, label in ((ranks[0], shape[0], "R_out"), (ranks[1], shape[1], "R_in")):
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= bound:
            what = "output" if label == "R_out" else "input"
            raise ValueError(f"{label} = {rank!r} is outside 1..{bound} (the kernel's {what} channels)")
    return int(ranks[0]), int(ranks[1])
