"""Empirical variational Bayesian matrix factorisation (EVBMF): the global analytic solution.

Nakajima, Sugiyama, Babacan & Tomioka, "Global analytic solution of fully-observed variational
Bayesian matrix factorization", JMLR 14 (2013). Kim et al. (2015) use it to pick Tucker ranks.

Model: Y = B Aᵀ + E with Y [L, M], L ≤ M (a wider-than-tall Y is transposed first: the model is
symmetric in A and B), E i.i.d. N(0, σ²), Gaussian priors on the columns of A and B whose
variances are estimated too (empirical Bayes). With γ_h the singular values of Y, α = L/M and
x_h = γ_h² / (M σ²), the solution is, per singular component:

* kept iff γ_h > γ̲ = σ·sqrt(M·x̲), x̲ = (1 + τ̲)(1 + α/τ̲), where τ̲ is the zero of
  Ξ(τ) = Φ(τ) + Φ(τ/α), Φ(z) = log(1 + z)/z − 1/2 (found with brentq; τ̲ ≈ 2.5129·√α);
* with posterior-mean singular value
  γ̂_h = (γ_h/2)·(1 − (L+M)σ²/γ_h² + sqrt((1 − (L+M)σ²/γ_h²)² − 4LMσ⁴/γ_h⁴)).

Noise variance, when not given: σ² minimises the free energy, which up to constants is
(with τ(x) = ½(x − 1 − α + sqrt((x − 1 − α)² − 4α)), the larger root of (1+τ)(1+α/τ) = x)

    2F(σ²) = Σ_h ψ0(x_h) + Σ_{x_h > x̲} ψ1(x_h),
    ψ0(x) = x − log x,   ψ1(x) = log(τ(x) + 1) + α·log(τ(x)/α + 1) − τ(x)   (ψ1(x̲) = 0).

Since Σ_h log x_h = Σ_h log γ_h² − L·log(Mσ²), this is ‖Y‖²_F/(Mσ²) + L·log σ² + Σ ψ1 plus a
constant, which stays finite when some γ_h are 0. The minimiser lies in [σ̲², σ̄²] (the paper):

    σ̄² = ‖Y‖²_F / (L·M),
    σ̲² = max(γ²_{η̄+1} / (M·x̲),  Σ_{h>η̄} γ_h² / (M·(L − η̄))),   η̄ = ⌈L/(1+α)⌉ − 1,

η̄ being the largest rank EVB can return. The search runs on log σ², first on a log-spaced grid
of that interval (the objective is only piecewise smooth: a component enters at each x_h = x̲),
then with a bounded Brent search between the neighbours of the best grid point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.optimize

from lowbit.decomp import finite_float64

#: points of the log-spaced σ² grid that picks the basin before the Brent refinement
_GRID = 64


@dataclass(frozen=True, eq=False)
class VBMFResult:
    """The EVBMF solution: rank, noise variance, kept posterior-mean singular values, threshold."""

    rank: int
    sigma2: float
    singular_values: np.ndarray  # posterior means of the kept components, descending
    threshold: float  # γ̲: singular values of Y above it are kept


def evbmf(Y: np.ndarray, sigma2: float | None = None) -> VBMFResult:
    """EVBMF of the matrix Y (either orientation); σ² estimated when ``sigma2`` is None."""
    Y = finite_float64(Y, 2, "evbmf needs a non-empty 2-D matrix", "the matrix given to evbmf")
    if sigma2 is not None and not (np.isfinite(sigma2) and sigma2 > 0):
        raise ValueError(f"sigma2 must be a positive noise variance; got {sigma2!r}")
    L, M = sorted(Y.shape)
    alpha = L / M
    gamma = scipy.linalg.svdvals(Y, check_finite=False)  # length L, descending
    total = float(np.sum(Y * Y))
    if total == 0.0:
        return VBMFResult(0, 0.0 if sigma2 is None else float(sigma2), np.zeros(0), 0.0)
    x_low = x_threshold(alpha)
    if sigma2 is None:
        sigma2 = _estimate_sigma2(gamma, total, L, M, x_low)
    threshold = math.sqrt(M * sigma2 * x_low)
    kept = gamma[gamma > threshold]
    return VBMFResult(int(kept.size), float(sigma2), _posterior_mean(kept, sigma2, L, M), threshold)


def x_threshold(alpha: float) -> float:
    """x̲ = (1 + τ̲)(1 + α/τ̲), the EVB threshold on γ²/(Mσ²) for the aspect ratio α = L/M ≤ 1."""
    def xi(t):  # Φ(τ) + Φ(τ/α), decreasing from 1 (τ → 0) to −1 (τ → ∞)
        return math.log1p(t) / t + alpha * math.log1p(t / alpha) / t - 1.0

    tau = scipy.optimize.brentq(xi, 1e-9, 1e3, xtol=1e-14, rtol=1e-14)
    return (1.0 + tau) * (1.0 + alpha / tau)


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """The larger root τ of (1 + τ)(1 + α/τ) = x (real for x ≥ (1 + √α)²)."""
    b = x - 1.0 - alpha
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))


def _free_energy(log_s2: float, g2: np.ndarray, total: float, L: int, M: int, x_low: float) -> float:
    """2F(σ²) up to a constant, at σ² = exp(log_s2) (see the module docstring)."""
    s2 = math.exp(log_s2)
    x = g2 / (M * s2)
    x = x[x > x_low]
    alpha = L / M
    tau = _tau(x, alpha)
    psi1 = np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau
    return total / (M * s2) + L * log_s2 + float(np.sum(psi1))


def _estimate_sigma2(gamma: np.ndarray, total: float, L: int, M: int, x_low: float) -> float:
    """σ² minimising the free energy over the paper's interval [σ̲², σ̄²]."""
    g2 = gamma * gamma
    eta = math.ceil(L / (1.0 + L / M)) - 1  # largest possible EVB rank, < L
    upper = total / (L * M)
    lower = max(g2[eta] / (M * x_low), float(np.sum(g2[eta:])) / (M * (L - eta)))
    lower = min(lower, upper)
    if lower >= upper:
        return upper
    grid = np.linspace(math.log(lower), math.log(upper), _GRID)
    values = [_free_energy(u, g2, total, L, M, x_low) for u in grid]
    best = int(np.argmin(values))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, _GRID - 1)]
    res = scipy.optimize.minimize_scalar(
        _free_energy, bounds=(lo, hi), args=(g2, total, L, M, x_low), method="bounded",
        options={"xatol": 1e-10},
    )
    u = float(res.x) if res.fun <= values[best] else float(grid[best])
    return math.exp(u)


def _posterior_mean(gamma: np.ndarray, sigma2: float, L: int, M: int) -> np.ndarray:
    """γ̂ = (γ/2)(1 − (L+M)σ²/γ² + sqrt((1 − (L+M)σ²/γ²)² − 4LMσ⁴/γ⁴)) for kept components."""
    a = 1.0 - (L + M) * sigma2 / gamma**2
    disc = np.maximum(a * a - 4.0 * L * M * sigma2**2 / gamma**4, 0.0)
    return 0.5 * gamma * (a + np.sqrt(disc))
