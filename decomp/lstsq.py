"""Streamed ridge least squares: refit a decomposed layer's last factor (and bias) from data.

Given samples z [R] (the input of the last factor, computed through the decomposed layer) and
y [N] (the original layer's output), solve

    min_{B, b}  mean‖z·B + b − y‖² + λ‖B‖²_F,      λ = damp · mean(diag C_zz),

with C_zz = mean((z − z̄)ᵀ(z − z̄)) the centred second moment, whatever ``bias`` is (b is not
damped). Setting the derivative in b to zero gives b = ȳ − z̄·B, and substituting it leaves the
centred normal equations

    (C_zz + λI)·B = C_zy,      C_zy = mean((z − z̄)ᵀ(y − ȳ)).

Without a bias the raw moments take their place: (E[zᵀz] + λI)·B = E[zᵀy].

Samples are never stored: ``update`` adds Σz, Σy, ΣzᵀZ, Σzᵀy and Σ‖y‖² in float64, all about a
shift k (the mean of the first chunk), z' = z − k_z, y' = y − k_y. The centred moments do not
depend on k (C_zz = Σz'ᵀz'/n − m mᵀ with m = Σz'/n), but the shift keeps large feature means
from cancelling away the digits of the variance. If the damped matrix is singular (damp = 0 on
rank-deficient z), the minimum-norm solution (pseudo-inverse) is returned.

``residual(B, b)`` = sqrt(mean‖zB + b − y‖² / mean‖y‖²) from the same moments: with
c = k_z·B + b − k_y, Σ‖e‖² = tr(BᵀS_zzB) − 2·tr(BᵀS_zy) + S_yy + 2·cᵀ(Bᵀs_z − s_y) + n‖c‖²
(S, s the shifted sums) and Σ‖y‖² = S_yy + 2·k_yᵀs_y + n‖k_y‖².
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from lowbit.decomp.svd import fix_signs

#: rows cast to float64 at a time in RidgeAccumulator.update
_UPDATE_ROWS = 4096


class RidgeAccumulator:
    """Streams (Z [..., R], Y [..., N]) pairs into the moments of a ridge regression Y ≈ Z·B + b."""

    def __init__(self, R: int, N: int, *, bias: bool = True, name: str = "refit samples"):
        for label, v in (("R", R), ("N", N)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"RidgeAccumulator needs a positive {label}; got {v!r}")
        self.R, self.N, self.bias, self.name = int(R), int(N), bool(bias), name
        self.n = 0
        self._kz = np.zeros(self.R)
        self._ky = np.zeros(self.N)
        self._sz = np.zeros(self.R)
        self._sy = np.zeros(self.N)
        self._szz = np.zeros((self.R, self.R))
        self._szy = np.zeros((self.R, self.N))
        self._syy = 0.0

    def update(self, Z, Y) -> None:
        """Add the samples of Z [..., R] and Y [..., N] (same leading sample count)."""
        Z = self._check(Z, self.R, "inputs")
        Y = self._check(Y, self.N, "targets")
        if Z.shape[0] != Y.shape[0]:
            raise ValueError(f"{self.name} have {Z.shape[0]} input samples but {Y.shape[0]} target samples")
        if Z.shape[0] == 0:
            return
        if self.n == 0:
            self._kz = Z[:_UPDATE_ROWS].mean(axis=0, dtype=np.float64)
            self._ky = Y[:_UPDATE_ROWS].mean(axis=0, dtype=np.float64)
        for r0 in range(0, Z.shape[0], _UPDATE_ROWS):
            z = np.asarray(Z[r0 : r0 + _UPDATE_ROWS], dtype=np.float64) - self._kz
            y = np.asarray(Y[r0 : r0 + _UPDATE_ROWS], dtype=np.float64) - self._ky
            self._sz += z.sum(axis=0)
            self._sy += y.sum(axis=0)
            self._szz += z.T @ z
            self._szy += z.T @ y
            self._syy += float(np.sum(y * y))
        self.n += Z.shape[0]

    def combined(self, other: "RidgeAccumulator") -> "RidgeAccumulator":
        """A new accumulator holding the samples of both (about this one's shift): with
        d = k_other − k, the other's sums about k are S' = S_o + d·s_oᵀ + s_o·dᵀ + n_o·d·dᵀ
        (and likewise for the cross and target sums)."""
        if (other.R, other.N, other.bias) != (self.R, self.N, self.bias):
            raise ValueError(f"{self.name}: cannot combine with an accumulator of another shape")
        out = RidgeAccumulator(self.R, self.N, bias=self.bias, name=self.name)
        if self.n == 0 or other.n == 0:
            src = other if self.n == 0 else self
            for key in ("n", "_kz", "_ky", "_sz", "_sy", "_szz", "_szy", "_syy"):
                value = getattr(src, key)
                setattr(out, key, value.copy() if isinstance(value, np.ndarray) else value)
            return out
        dz, dy, m = other._kz - self._kz, other._ky - self._ky, other.n
        out.n, out._kz, out._ky = self.n + m, self._kz.copy(), self._ky.copy()
        out._sz = self._sz + other._sz + m * dz
        out._sy = self._sy + other._sy + m * dy
        out._szz = self._szz + other._szz + np.outer(dz, other._sz) + np.outer(other._sz, dz) + m * np.outer(dz, dz)
        out._szy = self._szy + other._szy + np.outer(dz, other._sy) + np.outer(other._sz, dy) + m * np.outer(dz, dy)
        out._syy = self._syy + other._syy + 2.0 * float(dy @ other._sy) + m * float(dy @ dy)
        return out

    def solve(self, damp: float = 1e-4) -> tuple[np.ndarray, np.ndarray | None]:
        """(B [R, N], b [N] or None without bias) minimising the damped mean squared error."""
        czz, czy, lam, zbar, ybar = self._normal_equations(damp)
        B = _solve_psd(czz + lam * np.eye(self.R), czy)
        return (B, ybar - zbar @ B) if self.bias else (B, None)

    def reduced_rank(self, rank: int, damp: float = 1e-4) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(first [R, rank], second [rank, N], b): the rank-constrained least-squares fit
        Y ≈ Z·first·second + b (reduced-rank regression). With B the ridge solution of ``solve``,
        the fitted values Z·B have covariance F = Bᵀ C_zz B; projecting them onto F's top
        ``rank`` eigenvectors V is the best rank-``rank`` map in mean squared error, so
        first = B·V, second = Vᵀ (orthonormal rows) and b = ȳ − z̄·first·second."""
        if not 1 <= rank <= min(self.R, self.N):
            raise ValueError(f"{self.name}: rank {rank} is outside 1..{min(self.R, self.N)}")
        czz, czy, lam, zbar, ybar = self._normal_equations(damp)
        B = _solve_psd(czz + lam * np.eye(self.R), czy)
        n = self.N
        _, vectors = scipy.linalg.eigh(B.T @ czz @ B, subset_by_index=[n - rank, n - 1], check_finite=False)
        V = fix_signs(vectors[:, ::-1])
        first = B @ V
        return first, V.T, (ybar - zbar @ first @ V.T) if self.bias else None

    def _normal_equations(self, damp: float):
        """(C_zz, C_zy, λ, z̄, ȳ): centred moments with a bias, raw moments E[zᵀz], E[zᵀy] without."""
        if self.n == 0:
            raise ValueError(f"no {self.name} were seen; cannot solve the refit")
        if not (isinstance(damp, (int, float, np.floating)) and np.isfinite(damp) and damp >= 0):
            raise ValueError(f"damp must be a non-negative fraction of the mean input variance; got {damp!r}")
        mz, my = self._sz / self.n, self._sy / self.n
        czz = self._szz / self.n - np.outer(mz, mz)
        czy = self._szy / self.n - np.outer(mz, my)
        lam = damp * max(float(np.mean(np.diag(czz))), 0.0)
        zbar, ybar = self._kz + mz, self._ky + my
        if not self.bias:
            czz, czy = czz + np.outer(zbar, zbar), czy + np.outer(zbar, ybar)
        return czz, czy, lam, zbar, ybar

    def residual(self, B, b=None) -> float:
        """sqrt(mean‖Z·B + b − Y‖² / mean‖Y‖²) over the samples seen, from the moments."""
        if self.n == 0:
            raise ValueError(f"no {self.name} were seen; cannot measure the residual")
        B = np.asarray(B, dtype=np.float64)
        b = np.zeros(self.N) if b is None else np.asarray(b, dtype=np.float64)
        if B.shape != (self.R, self.N) or b.shape != (self.N,):
            raise ValueError(f"residual needs B [{self.R}, {self.N}] and b [{self.N}]; got {B.shape} and {b.shape}")
        c = self._kz @ B + b - self._ky
        sse = (np.sum((self._szz @ B) * B) - 2.0 * np.sum(B * self._szy) + self._syy
               + 2.0 * c @ (B.T @ self._sz - self._sy) + self.n * (c @ c))
        total = self._syy + 2.0 * self._ky @ self._sy + self.n * (self._ky @ self._ky)
        if total <= 0:
            return 0.0 if sse <= 0 else float("inf")
        return float(np.sqrt(max(sse, 0.0) / total))

    def _check(self, X, width: int, what: str) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim < 1 or X.shape[-1] != width:
            raise ValueError(f"{self.name} {what} have shape {X.shape}; the last axis must have {width} features")
        if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
            raise ValueError(f"{self.name} {what} must hold real numbers; got dtype {X.dtype}")
        X = X.reshape(-1, width)
        if np.issubdtype(X.dtype, np.floating) and not np.isfinite(X).all():
            raise ValueError(f"{self.name} {what} contain NaN or Inf values")
        return X


def _solve_psd(A: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """A⁻¹·rhs for symmetric positive semi-definite A: Cholesky, or the pseudo-inverse when a
    pivot is (numerically) zero."""
    try:
        factor = scipy.linalg.cho_factor(A, check_finite=False)
        pivots = np.diag(factor[0]) ** 2
        if pivots.min() > A.shape[0] * np.finfo(np.float64).eps * np.max(np.diag(A)):
            return scipy.linalg.cho_solve(factor, rhs, check_finite=False)
    except np.linalg.LinAlgError:
        pass
    return scipy.linalg.pinvh(A, check_finite=False) @ rhs


class HeldOut:
    """A ridge regression's samples split by calibration batch: batch i is held out when
    i % 4 == 1 (the 2nd, 6th, 10th … — so two or three batches already give one), the rest fit.
    ``parts()`` → (fit, held out, all); when either side is empty, all three are every sample."""

    EVERY = 4

    def __init__(self, R: int, N: int, *, bias: bool = True, name: str = "refit samples"):
        self.fit = RidgeAccumulator(R, N, bias=bias, name=name)
        self.held = RidgeAccumulator(R, N, bias=bias, name=name)

    def update(self, batch: int, Z, Y) -> None:
        (self.held if batch % self.EVERY == 1 else self.fit).update(Z, Y)

    def parts(self) -> tuple[RidgeAccumulator, RidgeAccumulator, RidgeAccumulator]:
        every = self.fit.combined(self.held)
        if self.fit.n and self.held.n:
            return self.fit, self.held, every
        return every, every, every
