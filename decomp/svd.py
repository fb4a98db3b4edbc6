"""Truncated and data-aware SVD of a MatMul weight W [K, N] (y = x·W), in float64.

Plain (no input statistics): W = U S Vᵀ, and the rank-R truncation Ŵ = (U_R S_R)·V_Rᵀ is the
best rank-R approximation in Frobenius norm (Eckart–Young), with

    ‖W − Ŵ‖²_F / ‖W‖²_F = Σ_{h>R} s_h² / Σ_h s_h².

The split is unbalanced on purpose: ``first`` = U_R·S_R [K, R] carries the scale, ``second`` =
V_Rᵀ [R, N] has orthonormal rows, the same form as the data-aware case, so a refit that replaces
``second`` (``lowbit.decomp.lstsq``) starts from the same kind of factor either way.

Data-aware (Σ = E[x xᵀ] [K, K] given): the expected output error of ŷ = x·Ŵ is
E‖x(W − Ŵ)‖² = tr((W − Ŵ)ᵀ Σ (W − Ŵ)) = ‖Lᵀ(W − Ŵ)‖²_F for any Σ = L Lᵀ. Eckart–Young on
LᵀW = Ũ S̃ Ṽᵀ gives the minimiser over rank-R Ŵ as Ŵ = W·V_R·V_Rᵀ with V_R the leading R right
singular vectors of LᵀW, i.e. the top eigenvectors of the output covariance Wᵀ Σ W (whose
eigenvalues are S̃²). So ``first`` = W·V_R, ``second`` = V_Rᵀ, and

    tr(EᵀΣE) / tr(WᵀΣW) = Σ_{h>R} s̃_h² / Σ_h s̃_h²         (E = W − Ŵ).

Lᵀ is the upper Cholesky factor of Σ + λI = L Lᵀ (a third of the cost of an eigendecomposition;
the symmetric square root Q diag(√μ) Qᵀ, negative rounding eigenvalues clipped to 0, when the
factorisation fails), with λ = ``damp``·mean(diag Σ): inputs never seen still count a
little, so directions Σ cannot tell apart are ordered by their weight-space size. The SVD of
LᵀW is taken rather than an eigendecomposition of WᵀΣW, which would square its condition.

Signs are fixed for determinism: each right singular vector has its largest-magnitude entry
positive (the matching column of ``first`` flips with it, so first·second is unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from lowbit.decomp import finite_float64


@dataclass(eq=False)
class LowRank:
    """W ≈ first @ second; ``energy`` is the whole descending spectrum the rank was cut from."""

    first: np.ndarray  # [K, R]
    second: np.ndarray  # [R, N], orthonormal rows
    rel_error: float  # weight-space (plain) or output (data-aware) relative error
    energy: np.ndarray  # s² (plain) or eigenvalues of Wᵀ Σ W (data-aware), descending


def low_rank(W, rank: int, cov=None, *, damp: float = 1e-6) -> LowRank:
    """Rank-``rank`` factorisation of W [K, N]: plain SVD, or data-aware when ``cov`` = E[xxᵀ]."""
    W = _check_weight(W)
    full = min(W.shape)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= full:
        raise ValueError(
            f"rank {rank!r} is outside the allowed range 1..{full} for a {W.shape[0]}×{W.shape[1]} weight"
        )
    energy, Vt = _spectrum(W, cov, damp, vectors=True)
    Vt = fix_signs(Vt[:rank].T).T
    first = W @ Vt.T  # = U_R S_R in the plain case
    return LowRank(first, Vt, float(energy_curve(energy)[rank]), energy)


def error_curve(W, cov=None, *, damp: float = 1e-6) -> np.ndarray:
    """Relative error (as ``LowRank.rel_error``) of every rank 0..min(K, N), from one SVD."""
    energy, _ = _spectrum(_check_weight(W), cov, damp, vectors=False)
    return energy_curve(energy)


def fix_signs(U: np.ndarray) -> np.ndarray:
    """U with each column multiplied by ±1 so that its largest-magnitude entry is positive."""
    idx = np.argmax(np.abs(U), axis=0)
    signs = np.sign(U[idx, np.arange(U.shape[1])])
    signs[signs == 0] = 1.0
    return U * signs


def energy_curve(energy: np.ndarray) -> np.ndarray:
    """sqrt(Σ_{h>r} e_h / Σ_h e_h) for r = 0..len(energy) (0 everywhere for a zero spectrum)."""
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    total = tail[0]
    return np.sqrt(np.maximum(tail, 0.0) / total) if total > 0 else np.zeros_like(tail)


def _spectrum(W: np.ndarray, cov, damp: float, *, vectors: bool):
    """(energy, Vᵀ or None): the squared singular values and right vectors of W or of LᵀW."""
    A = W if cov is None else _sqrt_cov(cov, W.shape[0], damp) @ W
    if not vectors:
        s = scipy.linalg.svdvals(A, check_finite=False)
        return s * s, None
    _, s, Vt = scipy.linalg.svd(A, full_matrices=False, check_finite=False)
    return s * s, Vt


def _sqrt_cov(cov, K: int, damp: float) -> np.ndarray:
    """Lᵀ with Lᵀᵀ·Lᵀ = Σ + λI, λ = damp · mean(diag Σ): the upper Cholesky factor, else the
    symmetric square root."""
    S = np.asarray(cov, dtype=np.float64)
    if S.shape != (K, K):
        raise ValueError(f"the input covariance has shape {S.shape}; the weight needs ({K}, {K})")
    if not np.isfinite(S).all():
        raise ValueError("the input covariance contains NaN or Inf values")
    if not (np.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be a non-negative fraction of the mean covariance diagonal; got {damp!r}")
    S = 0.5 * (S + S.T)
    S[np.diag_indices(K)] += damp * float(np.mean(np.diag(S)))
    try:
        return scipy.linalg.cholesky(S, lower=False, check_finite=False)
    except np.linalg.LinAlgError:
        return psd_sqrt(S)


def psd_sqrt(S: np.ndarray) -> np.ndarray:
    """The symmetric square root Q diag(√μ) Qᵀ of S = Q diag(μ) Qᵀ (negative round-off μ → 0)."""
    mu, Q = scipy.linalg.eigh(S, check_finite=False)
    return (Q * np.sqrt(np.maximum(mu, 0.0))) @ Q.T


def _check_weight(W) -> np.ndarray:
    return finite_float64(W, 2, "a low-rank factorisation needs a non-empty 2-D weight", "the weight")
