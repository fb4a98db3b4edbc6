"""Rank policies of the ``rank=`` option, parsed from text, and rounding ranks to a multiple.

``vbmf``        the rank EVBMF finds (``lowbit.decomp.vbmf``), computed by the caller.
``energy:F``    the smallest r with Σ_{h≤r} e_h ≥ F·Σ_h e_h, e the descending spectrum
                (squared singular values, or output-covariance eigenvalues); F in (0, 1].
``ratio:F``     r = ⌈F·full⌉, full the largest rank the layer allows; F in (0, 1].
``64``          a fixed rank; larger than the layer allows is an error, not a silent clamp.

Every policy returns a rank in [1, full]. ``round_rank`` rounds up to a multiple of m (kernel
efficiency): min(m·⌈r/m⌉, full).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

FORMS = "vbmf, energy:F or ratio:F with F in (0, 1], or a positive integer such as 64"
#: slack for floating-point products and sums compared against a fraction
_EPS = 1e-9


@dataclass(frozen=True)
class RankPolicy:
    """One rank policy: ``kind`` in vbmf / energy / ratio / fixed, ``value`` its number (None for vbmf)."""

    kind: str
    value: float | int | None = None

    def __str__(self) -> str:
        if self.kind in ("energy", "ratio"):
            return f"{self.kind}:{self.value:g}"
        return "vbmf" if self.kind == "vbmf" else str(self.value)

    def choose(self, full: int, energy: np.ndarray | None = None, vbmf: int | None = None) -> int:
        """The rank in [1, full] this policy picks; ``energy`` / ``vbmf`` as the kind needs."""
        if isinstance(full, bool) or not isinstance(full, (int, np.integer)) or full < 1:
            raise ValueError(f"the full rank must be a positive integer; got {full!r}")
        if self.kind == "fixed":
            if self.value > full:
                raise ValueError(f"rank {self.value} is larger than this layer allows (at most {full})")
            return int(self.value)
        if self.kind == "ratio":
            return _clamp(math.ceil(self.value * full - _EPS), full)
        if self.kind == "vbmf":
            if vbmf is None:
                raise ValueError("the vbmf rank policy needs the rank EVBMF found")
            return _clamp(int(vbmf), full)
        if energy is None:
            raise ValueError("the energy rank policy needs the layer's spectrum")
        return _clamp(_energy_rank(np.asarray(energy, dtype=np.float64), float(self.value)), full)


def parse_rank(text: str | int) -> RankPolicy:
    """The policy written as ``text`` (see the module docstring); ValueError naming bad text."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        text = str(int(text))
    if not isinstance(text, str):
        raise ValueError(f"rank {text!r} is not text; use {FORMS}")
    t = text.strip().lower()
    if t == "vbmf":
        return RankPolicy("vbmf")
    if re.fullmatch(r"\+?\d+", t):
        if int(t) < 1:
            raise ValueError(f"rank {text!r} must be at least 1; use {FORMS}")
        return RankPolicy("fixed", int(t))
    kind, sep, number = t.partition(":")
    if sep and kind in ("energy", "ratio"):
        try:
            value = float(number)
        except ValueError:
            value = math.nan
        if not 0.0 < value <= 1.0:
            raise ValueError(f"rank {text!r} needs a fraction in (0, 1] after '{kind}:'; use {FORMS}")
        return RankPolicy(kind, value)
    raise ValueError(f"rank {text!r} is not understood; use {FORMS}")


def round_rank(rank: int, multiple: int, full: int) -> int:
    """``rank`` rounded up to a multiple of ``multiple`` (1: unchanged), never above ``full``."""
    for name, v in (("rank", rank), ("multiple", multiple), ("full rank", full)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"the {name} must be a positive integer; got {v!r}")
    return int(min(-(-rank // multiple) * multiple, full))


def _energy_rank(energy: np.ndarray, fraction: float) -> int:
    """Smallest r with the first r entries holding at least ``fraction`` of the total."""
    if energy.ndim != 1 or energy.size == 0:
        raise ValueError(f"the spectrum must be a non-empty 1-D array; got shape {energy.shape}")
    kept = np.cumsum(energy)
    total = kept[-1]
    if not total > 0:
        return 1
    return int(np.searchsorted(kept, (fraction - _EPS) * total, side="left")) + 1


def _clamp(rank: int, full: int) -> int:
    return max(1, min(int(rank), full))
