"""Low-rank decomposition numerics (lowbit.decomp.vbmf / tucker / svd / ranks / lstsq), graph-free.

Every test asserts numbers: EVBMF ranks and noise variances on planted matrices, Tucker-2
exactness, recovery and HOOI ≤ HOSVD, data-aware SVD against plain SVD in output error, rank
policies and their bounds, streamed ridge solutions, and the errors raised on bad input.
"""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.decomp.lstsq import RidgeAccumulator
from lowbit.decomp.ranks import RankPolicy, parse_rank, round_rank
from lowbit.decomp.svd import error_curve, low_rank
from lowbit.decomp.tucker import Tucker2, mode_dot, partial_tucker, unfold, vbmf_ranks
from lowbit.decomp.vbmf import evbmf, x_threshold


def _orthonormal(rng, n, r):
    return np.linalg.qr(rng.standard_normal((n, r)))[0]


def _planted(seed, L=60, M=80, rank=7, sigma=0.1):
    """U diag(s) Vᵀ + N(0, σ²) noise with a strong, spread signal."""
    rng = np.random.default_rng(seed)
    s = np.linspace(10.0, 4.0, rank)
    return (_orthonormal(rng, L, rank) * s) @ _orthonormal(rng, M, rank).T + sigma * rng.standard_normal((L, M))


def _tucker_kernel(rng, shape, ranks):
    N, C, kh, kw = shape
    core = rng.standard_normal((ranks[0], ranks[1], kh, kw))
    return mode_dot(mode_dot(core, _orthonormal(rng, N, ranks[0]), 0), _orthonormal(rng, C, ranks[1]), 1)


# ---------------------------------------------------------------- vbmf


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evbmf_finds_planted_rank_and_noise(seed):
    Y = _planted(seed)
    res = evbmf(Y)
    assert res.rank == 7
    assert abs(res.sigma2 - 0.01) < 0.2 * 0.01
    assert res.singular_values.shape == (7,)
    assert np.all(np.diff(res.singular_values) <= 0)
    gamma = np.linalg.svd(Y, compute_uv=False)
    assert gamma[6] > res.threshold > gamma[7]
    # the posterior means shrink the observed singular values, less so the stronger ones
    shrink = res.singular_values / gamma[:7]
    assert np.all(shrink < 1) and np.all(shrink > 0.85) and np.all(np.diff(shrink) < 0)


def test_evbmf_transpose_gives_same_rank_and_noise():
    Y = _planted(3)
    a, b = evbmf(Y), evbmf(Y.T)
    assert a.rank == b.rank == 7
    assert b.sigma2 == pytest.approx(a.sigma2, rel=1e-6)
    np.testing.assert_allclose(a.singular_values, b.singular_values, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_evbmf_pure_noise_has_rank_zero(seed):
    res = evbmf(0.1 * np.random.default_rng(100 + seed).standard_normal((60, 80)))
    assert res.rank <= 1
    assert abs(res.sigma2 - 0.01) < 0.1 * 0.01


def test_evbmf_given_sigma2_sets_threshold():
    Y = _planted(4)
    res = evbmf(Y, sigma2=0.01)
    L, M = Y.shape
    assert res.sigma2 == 0.01
    assert res.threshold == pytest.approx(np.sqrt(M * 0.01 * x_threshold(L / M)), rel=1e-12)
    assert res.rank == 7
    # a huge σ² hides everything
    assert evbmf(Y, sigma2=10.0).rank == 0


def test_x_threshold_is_where_a_component_stops_paying():
    for alpha in (0.01, 0.05, 0.3, 0.75, 1.0):
        x = x_threshold(alpha)
        # τ̲ from x̲ = (1 + τ̲)(1 + α/τ̲); the free-energy gain ψ1 of a component is 0 there
        tau = 0.5 * (x - 1 - alpha + np.sqrt((x - 1 - alpha) ** 2 - 4 * alpha))
        assert np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau == pytest.approx(0.0, abs=1e-12)
        # the paper's approximation τ̲ ≈ 2.5129·√α: exact at α = 1, within 3% of x̲ down to α = 0.01
        approx = (1 + 2.5129 * np.sqrt(alpha)) * (1 + np.sqrt(alpha) / 2.5129)
        assert x == pytest.approx(approx, rel=1e-4 if alpha == 1.0 else 3e-2)


def test_evbmf_zero_and_bad_input():
    assert evbmf(np.zeros((5, 8))).rank == 0
    with pytest.raises(ValueError, match="2-D"):
        evbmf(np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        evbmf(np.full((3, 4), np.nan))
    with pytest.raises(ValueError, match="sigma2"):
        evbmf(np.ones((3, 4)), sigma2=-1.0)


# ---------------------------------------------------------------- tucker


def test_unfold_rows_are_the_mode():
    T = np.arange(2 * 3 * 4 * 5, dtype=float).reshape(2, 3, 4, 5)
    assert unfold(T, 0).shape == (2, 60) and unfold(T, 1).shape == (3, 40)
    np.testing.assert_array_equal(unfold(T, 1)[2], T[:, 2].ravel())


def test_tucker_full_rank_is_exact():
    K = np.random.default_rng(0).standard_normal((16, 12, 3, 3))
    t = partial_tucker(K, (16, 12))
    assert t.rel_error < 1e-12
    assert np.linalg.norm(t.reconstruct() - K) / np.linalg.norm(K) < 1e-12
    assert t.core.shape == (16, 12, 3, 3) and t.u_out.shape == (16, 16) and t.u_in.shape == (12, 12)


def test_tucker_recovers_exact_multilinear_rank():
    K = _tucker_kernel(np.random.default_rng(1), (32, 24, 3, 3), (6, 5))
    t = partial_tucker(K, (6, 5))
    assert t.rel_error < 1e-10
    assert np.linalg.norm(t.reconstruct() - K) / np.linalg.norm(K) < 1e-10


def test_hooi_not_worse_than_hosvd_and_factors_orthonormal():
    K = np.random.default_rng(2).standard_normal((24, 20, 3, 3))
    hosvd = partial_tucker(K, (8, 6), iters=0)
    hooi = partial_tucker(K, (8, 6), iters=20)
    assert hosvd.iterations == 0 and hooi.iterations >= 1
    assert hooi.rel_error <= hosvd.rel_error
    assert hooi.rel_error < hosvd.rel_error - 1e-4  # a random kernel: HOOI strictly helps
    for u in (hooi.u_out, hooi.u_in):
        np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-12)
        assert np.all(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])] > 0)  # signs fixed
    # rel_error is what reconstruct() gives
    assert hooi.rel_error == pytest.approx(np.linalg.norm(hooi.reconstruct() - K) / np.linalg.norm(K), rel=1e-12)


def test_tucker_is_deterministic_and_float64():
    K = np.random.default_rng(3).standard_normal((12, 10, 3, 3)).astype(np.float32)
    a, b = partial_tucker(K, (5, 4)), partial_tucker(K, (5, 4))
    assert isinstance(a, Tucker2) and a.core.dtype == np.float64
    assert a.core.tobytes() == b.core.tobytes() and a.u_out.tobytes() == b.u_out.tobytes()


def test_tucker_rank_bounds():
    K = np.zeros((8, 6, 3, 3))
    with pytest.raises(ValueError, match=r"R_out = 9 is outside 1\.\.8"):
        partial_tucker(K, (9, 2))
    with pytest.raises(ValueError, match=r"R_in = 0 is outside 1\.\.6"):
        partial_tucker(K, (2, 0))
    with pytest.raises(ValueError, match="kernel"):
        partial_tucker(np.zeros((8, 6)), (2, 2))
    with pytest.raises(ValueError, match="iters"):
        partial_tucker(K, (2, 2), iters=-1)
    # a rank above the columns of the mode-1 unfolding after projection (R_in > R_out·kh·kw)
    t = partial_tucker(np.random.default_rng(0).standard_normal((2, 12, 1, 1)), (1, 5))
    assert t.u_in.shape == (12, 5)
    np.testing.assert_allclose(t.u_in.T @ t.u_in, np.eye(5), atol=1e-12)


def test_vbmf_ranks_find_planted_ranks():
    rng = np.random.default_rng(4)
    K = _tucker_kernel(rng, (64, 48, 3, 3), (12, 10))
    K += 0.01 * rng.standard_normal(K.shape)
    assert vbmf_ranks(K) == (12, 10)
    assert vbmf_ranks(0.01 * rng.standard_normal((16, 16, 3, 3))) >= (1, 1)  # clamped, never 0


# ---------------------------------------------------------------- svd


def _anisotropic(rng, K, n=4000):
    X = rng.standard_normal((n, K)) * np.exp(rng.uniform(-2, 2, K)) @ _orthonormal(rng, K, K)
    return X.T @ X / n


def test_low_rank_full_rank_exact_and_plain_svd():
    W = np.random.default_rng(5).standard_normal((40, 24))
    full = low_rank(W, 24)
    np.testing.assert_allclose(full.first @ full.second, W, atol=1e-12 * np.abs(W).max())
    assert full.rel_error == 0.0
    r = low_rank(W, 10)
    s = np.linalg.svd(W, compute_uv=False)
    np.testing.assert_allclose(r.energy, s**2, rtol=1e-12)
    err = np.linalg.norm(W - r.first @ r.second) / np.linalg.norm(W)
    assert r.rel_error == pytest.approx(err, rel=1e-10)
    assert err == pytest.approx(np.sqrt(np.sum(s[10:] ** 2) / np.sum(s**2)), rel=1e-10)
    np.testing.assert_allclose(r.second @ r.second.T, np.eye(10), atol=1e-12)
    cov = _anisotropic(np.random.default_rng(6), 40)
    full_cov = low_rank(W, 24, cov)
    np.testing.assert_allclose(full_cov.first @ full_cov.second, W, atol=1e-12 * np.abs(W).max())


def _output_error(W, What, cov):
    E = W - What
    return np.sqrt(np.trace(E.T @ cov @ E) / np.trace(W.T @ cov @ W))


def test_data_aware_beats_plain_svd_in_output_error():
    rng = np.random.default_rng(7)
    W = rng.standard_normal((48, 32))
    cov = _anisotropic(rng, 48)
    plain, aware = low_rank(W, 8), low_rank(W, 8, cov)
    e_plain = _output_error(W, plain.first @ plain.second, cov)
    e_aware = _output_error(W, aware.first @ aware.second, cov)
    assert e_aware < 0.8 * e_plain
    assert aware.rel_error == pytest.approx(e_aware, rel=1e-5)  # damp 1e-6 moves it slightly
    assert low_rank(W, 8, cov, damp=0.0).rel_error == pytest.approx(e_aware, rel=1e-9)


def test_data_aware_with_identity_covariance_is_plain_svd():
    W = np.random.default_rng(8).standard_normal((30, 20))
    plain, aware = low_rank(W, 6), low_rank(W, 6, np.eye(30))
    np.testing.assert_allclose(aware.first @ aware.second, plain.first @ plain.second, atol=1e-12)
    assert aware.rel_error == pytest.approx(plain.rel_error, rel=1e-12)
    np.testing.assert_allclose(aware.energy / aware.energy[0], plain.energy / plain.energy[0], rtol=1e-10)


@pytest.mark.parametrize("with_cov", [False, True])
def test_error_curve_matches_low_rank(with_cov):
    rng = np.random.default_rng(9)
    W = rng.standard_normal((20, 12))
    cov = _anisotropic(rng, 20) if with_cov else None
    curve = error_curve(W, cov)
    assert curve.shape == (13,) and curve[0] == pytest.approx(1.0) and curve[-1] == 0.0
    assert np.all(np.diff(curve) <= 0)
    for r in range(1, 13):
        assert curve[r] == pytest.approx(low_rank(W, r, cov).rel_error, rel=1e-12, abs=1e-15)


def test_low_rank_bad_input():
    W = np.ones((6, 4))
    with pytest.raises(ValueError, match=r"rank 5 is outside the allowed range 1\.\.4"):
        low_rank(W, 5)
    with pytest.raises(ValueError, match="rank 0"):
        low_rank(W, 0)
    with pytest.raises(ValueError, match=r"covariance has shape \(4, 4\)"):
        low_rank(W, 2, np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        low_rank(np.full((3, 3), np.nan), 1)


# ---------------------------------------------------------------- ranks


def test_parse_rank_forms():
    assert parse_rank("vbmf") == RankPolicy("vbmf")
    assert parse_rank(" VBMF ") == RankPolicy("vbmf")
    assert parse_rank("energy:0.95") == RankPolicy("energy", 0.95)
    assert parse_rank("ratio:0.5") == RankPolicy("ratio", 0.5)
    assert parse_rank("ratio:1") == RankPolicy("ratio", 1.0)
    assert parse_rank("64") == RankPolicy("fixed", 64)
    assert parse_rank(64) == RankPolicy("fixed", 64)
    assert [str(parse_rank(t)) for t in ("vbmf", "energy:0.95", "ratio:0.5", "64")] == [
        "vbmf", "energy:0.95", "ratio:0.5", "64"]


@pytest.mark.parametrize("text", ["", "svd", "energy", "energy:", "energy:0", "energy:1.5", "energy:nan",
                                  "ratio:-0.1", "ratio:abc", "0", "-3", "3.5", "rank:4", True])
def test_parse_rank_errors_name_text_and_forms(text):
    with pytest.raises(ValueError) as info:
        parse_rank(text)
    msg = str(info.value)
    assert repr(text) in msg
    assert "vbmf" in msg and "energy:F" in msg and "ratio:F" in msg and "positive integer" in msg
    assert msg.count(". ") == 0  # one sentence


def test_rank_policy_choose():
    energy = np.array([50.0, 30.0, 10.0, 5.0, 3.0, 2.0])  # cumulative 0.5, 0.8, 0.9, 0.95, 0.98, 1
    assert parse_rank("energy:0.95").choose(6, energy=energy) == 4
    assert parse_rank("energy:0.9").choose(6, energy=energy) == 3
    assert parse_rank("energy:0.96").choose(6, energy=energy) == 5
    assert parse_rank("energy:1").choose(6, energy=energy) == 6
    assert parse_rank("energy:0.1").choose(6, energy=energy) == 1
    assert parse_rank("energy:0.99").choose(3, energy=energy) == 3  # clamped to full
    assert parse_rank("ratio:0.5").choose(64) == 32
    assert parse_rank("ratio:0.7").choose(10) == 7  # 0.7·10 = 7.000000000000001 in floats
    assert parse_rank("ratio:0.01").choose(10) == 1
    assert parse_rank("ratio:1").choose(10) == 10
    assert parse_rank("vbmf").choose(16, vbmf=0) == 1
    assert parse_rank("vbmf").choose(16, vbmf=40) == 16
    assert parse_rank("vbmf").choose(16, vbmf=5) == 5
    assert parse_rank("12").choose(16) == 12
    with pytest.raises(ValueError, match=r"rank 20 is larger than this layer allows \(at most 16\)"):
        parse_rank("20").choose(16)
    with pytest.raises(ValueError, match="spectrum"):
        parse_rank("energy:0.9").choose(16)
    with pytest.raises(ValueError, match="EVBMF"):
        parse_rank("vbmf").choose(16)


def test_round_rank():
    assert round_rank(13, 1, 64) == 13
    assert round_rank(13, 8, 64) == 16
    assert round_rank(16, 8, 64) == 16
    assert round_rank(61, 8, 60) == 60
    assert round_rank(1, 8, 5) == 5
    with pytest.raises(ValueError, match="multiple"):
        round_rank(4, 0, 8)


# ---------------------------------------------------------------- lstsq


def _regression(seed, n=2000, R=12, N=7, noise=0.0):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, R)) @ rng.standard_normal((R, R)) + 3.0  # correlated, offset
    B, b = rng.standard_normal((R, N)), rng.standard_normal(N)
    return Z, Z @ B + b + noise * rng.standard_normal((n, N)), B, b


def test_ridge_recovers_planted_solution_from_chunks():
    Z, Y, B, b = _regression(10)
    acc = RidgeAccumulator(12, 7)
    for zc, yc in zip(np.array_split(Z, 5), np.array_split(Y, 5)):
        acc.update(zc.reshape(4, -1, 12), yc.reshape(4, -1, 7))  # leading dims flattened
    assert acc.n == 2000
    Bs, bs = acc.solve(damp=0.0)
    np.testing.assert_allclose(Bs, B, atol=1e-10)
    np.testing.assert_allclose(bs, b, atol=1e-10)
    assert acc.residual(Bs, bs) < 1e-6


def test_ridge_without_bias_recovers_planted_solution():
    Z, Y, B, _ = _regression(11)
    Y = Z @ B
    acc = RidgeAccumulator(12, 7, bias=False)
    acc.update(Z, Y)
    Bs, bs = acc.solve(damp=0.0)
    assert bs is None
    np.testing.assert_allclose(Bs, B, atol=1e-10)


def test_ridge_streaming_is_chunk_independent():
    Z, Y, _, _ = _regression(12, noise=0.3)
    one, seven = RidgeAccumulator(12, 7), RidgeAccumulator(12, 7)
    one.update(Z, Y)
    for zc, yc in zip(np.array_split(Z, 7), np.array_split(Y, 7)):
        seven.update(zc, yc)
    for damp in (0.0, 1e-4, 0.1):
        (B1, b1), (B7, b7) = one.solve(damp), seven.solve(damp)
        np.testing.assert_allclose(B7, B1, rtol=0, atol=1e-12 * np.abs(B1).max())
        np.testing.assert_allclose(b7, b1, rtol=0, atol=1e-12 * np.abs(b1).max())


def test_ridge_solution_and_residual_match_direct_computation():
    Z, Y, _, _ = _regression(13, noise=0.5)
    acc = RidgeAccumulator(12, 7)
    acc.update(Z, Y)
    damp = 0.05
    B, b = acc.solve(damp)
    # direct: centred normal equations with λ = damp · mean(diag(cov Z))
    Zc, Yc = Z - Z.mean(0), Y - Y.mean(0)
    lam = damp * np.mean(np.diag(Zc.T @ Zc / len(Z)))
    B_direct = np.linalg.solve(Zc.T @ Zc / len(Z) + lam * np.eye(12), Zc.T @ Yc / len(Z))
    np.testing.assert_allclose(B, B_direct, atol=1e-10)
    np.testing.assert_allclose(b, Y.mean(0) - Z.mean(0) @ B_direct, atol=1e-10)
    for Bt, bt in ((B, b), (B + 0.1, b - 1.0), (np.zeros((12, 7)), None)):
        pred = Z @ Bt + (0.0 if bt is None else bt)
        direct = np.sqrt(np.mean(np.sum((pred - Y) ** 2, 1)) / np.mean(np.sum(Y**2, 1)))
        assert acc.residual(Bt, bt) == pytest.approx(direct, rel=1e-10)


def test_ridge_damping_shrinks_and_handles_singular_inputs():
    Z, Y, _, _ = _regression(14, noise=0.5)
    acc = RidgeAccumulator(12, 7)
    acc.update(Z, Y)
    assert np.linalg.norm(acc.solve(1.0)[0]) < np.linalg.norm(acc.solve(0.0)[0])
    # a duplicated input column: damp 0 gives the minimum-norm solution, which splits the weight
    Zd = np.concatenate([Z, Z[:, :1]], axis=1)
    dup = RidgeAccumulator(13, 7)
    dup.update(Zd, Y)
    Bd, bd = dup.solve(0.0)
    assert np.all(np.isfinite(Bd))
    np.testing.assert_allclose(Bd[0], Bd[12], atol=1e-8)
    assert dup.residual(Bd, bd) == pytest.approx(acc.residual(*acc.solve(0.0)), rel=1e-8)


def test_ridge_bad_input_names_the_samples():
    acc = RidgeAccumulator(3, 2, name="conv1 refit samples")
    with pytest.raises(ValueError, match="conv1 refit samples inputs have shape"):
        acc.update(np.ones((4, 5)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="conv1 refit samples have 4 input samples but 5"):
        acc.update(np.ones((4, 3)), np.ones((5, 2)))
    with pytest.raises(ValueError, match="conv1 refit samples targets contain NaN"):
        acc.update(np.ones((4, 3)), np.full((4, 2), np.nan))
    with pytest.raises(ValueError, match="no conv1 refit samples were seen"):
        acc.solve()
    assert acc.n == 0
