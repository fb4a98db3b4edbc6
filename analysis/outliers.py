"""Outlier statistics of weights, reported before/after rotations and equalization.

For a weight w (any shape, taken as a flat sample in float64):

  kurtosis     E[(w − μ)⁴] / σ⁴  (Pearson; 3 for a Gaussian, 1.8 for a uniform, large when a few
               entries dominate — what makes low-bit rounding fail);
  max_rms      max |w| / √E[w²]  (the crest factor: how far the largest entry sits above the
               typical one; a per-tensor or per-block scale must cover it).

``channel_range_spread`` is the ratio of the largest to the median per-output-channel range
(max |w| over a channel), the quantity cross-layer equalization balances for per-tensor scales.
"""

from __future__ import annotations

import numpy as np


def outlier_stats(w: np.ndarray) -> dict[str, float]:
    """``{"kurtosis", "max_rms"}`` of all entries of ``w``."""
    x = np.asarray(w, dtype=np.float64).ravel()
    if x.size == 0:
        return {"kurtosis": float("nan"), "max_rms": float("nan")}
    centred = x - x.mean()
    var = float(np.mean(centred**2))
    rms = float(np.sqrt(np.mean(x**2)))
    return {
        "kurtosis": float(np.mean(centred**4) / var**2) if var > 0 else float("nan"),
        "max_rms": float(np.abs(x).max() / rms) if rms > 0 else float("nan"),
    }


def channel_range_spread(w: np.ndarray, axis: int = 0) -> float:
    """Largest over median per-channel range max|w| along ``axis`` (1.0: perfectly balanced)."""
    x = np.moveaxis(np.abs(np.asarray(w, dtype=np.float64)), axis, 0).reshape(w.shape[axis], -1)
    ranges = x.max(axis=1)
    median = float(np.median(ranges))
    return float(ranges.max() / median) if median > 0 else float("inf")


def before_after(before: np.ndarray, after: np.ndarray) -> dict[str, float]:
    """One report row: kurtosis and max/RMS of a weight before and after a rewrite."""
    b, a = outlier_stats(before), outlier_stats(after)
    return {
        "kurtosis_before": round(b["kurtosis"], 3),
        "kurtosis_after": round(a["kurtosis"], 3),
        "max_rms_before": round(b["max_rms"], 3),
        "max_rms_after": round(a["max_rms"], 3),
    }
