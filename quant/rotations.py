"""Orthogonal rotation matrices for folding into weights: Hadamard, Walsh, GSR, Haar-random.

Every builder returns a float64 matrix Q with QᵀQ = I (to rounding), seeded through the ``rng``
it is given. A row vector x is rotated as x·Q, so the columns of Q are the new basis; the
``rotate`` pass folds Q into weights (``lowbit.passes.rotate`` has the table of sides).

``hadamard``  Q = D·H/√n: a ±1 Hadamard matrix H (HHᵀ = n·I) with random sign flips D on the
              input side (the randomized Hadamard transform of QuaRot). H is built as a Kronecker
              product H_core ⊗ H_{2^j} of a Sylvester matrix H_{2^j} and a core of order
                * 1 or 2 (Sylvester, so n a power of two),
                * q + 1 for a prime power q ≡ 3 (mod 4) (Paley I: 4, 8, 12, 20, 24, 28, 32, 44, …),
                * 2(q + 1) for a prime power q ≡ 1 (mod 4) (Paley II: 12, 20, 28, 36, 52, …),
              found by trying the splits n = 2^j · core from the largest 2^j down. Orders with none of these forms (odd n,
              n ≡ 2 mod 4, and multiples of 4 such as 92 whose every core misses) are refused
              with the alternatives named: ``random`` (any n) or ``gsr`` with a power-of-two
              ``group`` dividing n (block-diagonal).
``walsh``     the Sylvester matrix with its rows sorted by sequency (number of sign changes
              along the row), i.e. the Walsh matrix, optionally with sign flips; n a power of two.
``gsr``       grouped sequency-arranged rotation: block-diagonal with n/group Walsh blocks of
              size ``group`` (a power of two dividing n), each with its own sign flips when
              ``signs``. Matching ``group`` to the quantization block keeps each block's mixing
              inside one scale group.
``random``    Haar-random orthogonal: Q from the QR decomposition of a standard Gaussian matrix,
              columns multiplied by sign(diag R) so the distribution is uniform (Mezzadri 2007).

The Paley constructions need finite-field arithmetic GF(p^k): elements are the integers
0 … q−1 read as base-p digit vectors (polynomial coefficients), multiplied modulo a monic
irreducible polynomial found by trial division; χ(a) is +1 on nonzero squares, −1 on
non-squares, 0 at 0, and the Jacobsthal matrix is J[a, b] = χ(a − b).
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable

import numpy as np

from lowbit.core.errors import UserError

KINDS = ("hadamard", "walsh", "gsr", "random")


# --------------------------------------------------------------------------------------------
# Public builders


def rotation(kind: str, n: int, rng: np.random.Generator, *, group: int | None = None, signs: bool = True) -> np.ndarray:
    """The orthogonal [n, n] matrix of ``kind`` (see the module docstring)."""
    if kind not in _BUILDERS:
        raise UserError(f"unknown rotation kind {kind!r}; choose one of {', '.join(KINDS)}")
    return _BUILDERS[kind](n, rng, group=group, signs=signs)


def factored(kind: str, n: int, rng: np.random.Generator, *, group: int | None = None,
             signs: bool = True) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
    """The same matrix as ``rotation`` (same ``rng`` state in, same Q out) as (s, A, B) with
    Q = diag(s)·(A ⊗ B): s the sign flips (None: none), A None for an identity factor.

    hadamard: A = H_core/√c, B = H_{2^j}/√(2^j); gsr: A = I (None), B = one Walsh block; walsh
    and random: A = None, B = Q. Applying x·Q this way costs n·(a + b) multiplies instead of n².
    """
    q = rotation(kind, n, rng, group=group, signs=signs)
    if kind == "hadamard":
        core, power = hadamard_split(n)
        a, b = _core(core) / np.sqrt(core), _sylvester(power) / np.sqrt(power)
    elif kind == "gsr":
        g = n if group is None else group
        a, b = None, sequency_order(_sylvester(g)) / np.sqrt(g)
    else:
        return None, None, q
    if a is not None and a.shape[0] == 1:
        a = None
    elif a is not None and b.shape[0] == 1:
        a, b = None, a
    unsigned = b if a is None and b.shape[0] == n else (np.kron(np.eye(n // b.shape[0]), b) if a is None else np.kron(a, b))
    s = np.sign(np.sum(q * unsigned, axis=1)) if signs else None  # q = diag(s)·unsigned exactly
    return s, a, b


def hadamard(n: int, rng: np.random.Generator, *, group: int | None = None, signs: bool = True) -> np.ndarray:
    h = hadamard_pm1(n) / np.sqrt(n)
    return _flip(h, rng) if signs else h


def walsh(n: int, rng: np.random.Generator, *, group: int | None = None, signs: bool = True) -> np.ndarray:
    _need_power_of_two(n, "walsh")
    w = sequency_order(_sylvester(n)) / np.sqrt(n)
    return _flip(w, rng) if signs else w


def gsr(n: int, rng: np.random.Generator, *, group: int | None = None, signs: bool = True) -> np.ndarray:
    group = n if group is None else group
    if group < 1 or group & (group - 1) or n % group:
        raise UserError(
            f"gsr rotation of dimension {n}: group {group} must be a power of two dividing {n}"
            f"{_gsr_hint(n)}; or use kind=random (any dimension)"
        )
    block = sequency_order(_sylvester(group)) / np.sqrt(group)
    q = np.zeros((n, n))
    for start in range(0, n, group):
        q[start:start + group, start:start + group] = _flip(block, rng) if signs else block
    return q


def haar_random(n: int, rng: np.random.Generator, *, group: int | None = None, signs: bool = True) -> np.ndarray:
    if n < 1:
        raise UserError(f"random rotation: dimension must be positive, not {n}")
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


_BUILDERS: dict[str, Callable[..., np.ndarray]] = {
    "hadamard": hadamard,
    "walsh": walsh,
    "gsr": gsr,
    "random": haar_random,
}


def sequency_order(h: np.ndarray) -> np.ndarray:
    """Rows of ``h`` sorted (stably) by their number of sign changes."""
    changes = np.count_nonzero(np.diff(np.sign(h), axis=1), axis=1)
    return h[np.argsort(changes, kind="stable")]


def hadamard_pm1(n: int) -> np.ndarray:
    """A ±1 Hadamard matrix of order ``n`` (H·Hᵀ = n·I), or a ``UserError`` naming alternatives."""
    split = hadamard_split(n)
    if split is None:
        raise UserError(
            f"no Hadamard matrix of dimension {n} can be built (orders 2^j·c with c = 1, 2, q+1 or "
            f"2(q+1) for a prime power q are supported); use kind=random (any dimension) or kind=gsr "
            f"with a group dividing {n}{_gsr_hint(n)}"
        )
    core, power = split
    return np.kron(_core(core), _sylvester(power))


def hadamard_split(n: int) -> tuple[int, int] | None:
    """(core, 2^j) with core · 2^j = n and a known core construction, the largest 2^j first
    (so powers of two are pure Sylvester matrices), or None."""
    if n < 1:
        return None
    power = n & -n  # the largest power of two dividing n
    while power >= 1:
        core = n // power
        if core == 1 or _paley_field(core) is not None:
            return core, power
        power //= 2
    return None


def is_orthogonal(q: np.ndarray, atol: float = 1e-12) -> bool:
    return q.ndim == 2 and q.shape[0] == q.shape[1] and np.allclose(q.T @ q, np.eye(q.shape[0]), rtol=0, atol=atol)


# --------------------------------------------------------------------------------------------
# Constructions


def _flip(q: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """D·q with D a random ±1 diagonal (flips the signs of input coordinates)."""
    return q * rng.choice(np.array([-1.0, 1.0]), size=q.shape[0])[:, None]


def _need_power_of_two(n: int, kind: str) -> None:
    if n < 1 or n & (n - 1):
        raise UserError(
            f"{kind} rotation needs a power-of-two dimension, not {n}; use kind=hadamard"
            f"{' (which builds ' + str(n) + ')' if hadamard_split(n) else ''}, kind=random, or kind=gsr"
            f"{_gsr_hint(n)}"
        )


def _gsr_hint(n: int) -> str:
    groups = [g for g in (16, 32, 64, 128, 256) if n % g == 0]
    return f" (e.g. group={groups[-1]})" if groups else " (no power-of-two group ≥ 16 divides it)"


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


@functools.lru_cache(maxsize=None)
def _core(order: int) -> np.ndarray:
    if order in (1, 2):
        return _sylvester(order)
    q, paley = _paley_field(order)
    return paley(q)


def _paley_field(order: int) -> tuple[int, Callable[[int], np.ndarray]] | None:
    """(q, construction) when ``order`` is q+1 (q ≡ 3 mod 4) or 2(q+1) (q ≡ 1 mod 4), q a prime power."""
    if order % 4:
        return None
    if _prime_power(order - 1) and (order - 1) % 4 == 3:
        return order - 1, _paley1
    if _prime_power(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
        return order // 2 - 1, _paley2
    return None


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime, k ≥ 1; None otherwise."""
    if q < 2:
        return None
    p = next(d for d in itertools.count(2) if q % d == 0)
    k, rest = 0, q
    while rest % p == 0:
        rest //= p
        k += 1
    return (p, k) if rest == 1 else None


def _jacobsthal(q: int) -> np.ndarray:
    """J[a, b] = χ(a − b) over GF(q)."""
    p, k = _prime_power(q)
    digits = np.array([[(a // p**i) % p for i in range(k)] for a in range(q)])  # [q, k]
    weights = p ** np.arange(k)
    modulus = _irreducible(p, k)
    squares = {_encode(_polymul(d, d, modulus, p), weights) for d in digits[1:]}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)])
    diff = (digits[:, None, :] - digits[None, :, :]) % p  # a − b, digit-wise
    return chi[diff @ weights].astype(np.float64)


def _paley1(q: int) -> np.ndarray:
    j = _jacobsthal(q)
    s = np.zeros((q + 1, q + 1))
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = j
    return np.eye(q + 1) + s


def _paley2(q: int) -> np.ndarray:
    j = _jacobsthal(q)
    c = np.zeros((q + 1, q + 1))
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = j
    return np.kron(c, np.array([[1.0, -1.0], [-1.0, -1.0]])) + np.kron(np.eye(q + 1), np.array([[1.0, 1.0], [1.0, -1.0]]))


def _encode(coeffs: np.ndarray, weights: np.ndarray) -> int:
    return int(coeffs @ weights)


def _polymul(a: np.ndarray, b: np.ndarray, modulus: np.ndarray, p: int) -> np.ndarray:
    """a·b mod (modulus, p); a, b of length k, modulus monic of length k + 1 (low degree first)."""
    k = len(a)
    prod = np.convolve(a, b) % p
    for degree in range(len(prod) - 1, k - 1, -1):  # reduce from the top
        c = prod[degree]
        if c:
            prod[degree - k:degree + 1] = (prod[degree - k:degree + 1] - c * modulus) % p
    return prod[:k] if len(prod) >= k else np.pad(prod, (0, k - len(prod)))


def _irreducible(p: int, k: int) -> np.ndarray:
    """The first monic degree-k polynomial over GF(p) with no monic factor of degree ≤ k/2."""
    if k == 1:
        return np.array([0, 1])
    for low in itertools.product(range(p), repeat=k):
        f = np.array([*low, 1])
        if f[0] and not any(_divides(g, f, p) for d in range(1, k // 2 + 1) for g in _monic(p, d)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _monic(p: int, degree: int):
    for low in itertools.product(range(p), repeat=degree):
        yield np.array([*low, 1])


def _divides(g: np.ndarray, f: np.ndarray, p: int) -> bool:
    rest = f.copy()
    dg = len(g) - 1
    for degree in range(len(rest) - 1, dg - 1, -1):
        c = rest[degree]
        if c:
            rest[degree - dg:degree + 1] = (rest[degree - dg:degree + 1] - c * g) % p
    return not rest[:dg].any()
