"""Output-error metrics shared by the pass manager's verifier and ``lowbit compare``.

For a reference output r and a candidate c (flattened, float64):
  max_abs = max|c − r|;  rel = max_abs / max|r|  (the exactness criterion);
  sqnr_db = 10·log10(Σr² / Σ(c − r)²)  (inf when equal);  cosine = ⟨r, c⟩ / (‖r‖‖c‖);
  top1 = share of rows whose argmax over the last axis agrees (classifier-like outputs only:
  floating point, rank ≥ 2, last axis > 1).
Across several outputs the worst value of each metric is kept.
"""

from __future__ import annotations

import math

import numpy as np


def compare_arrays(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    if ref.shape != got.shape:
        raise ValueError(f"shape changed from {ref.shape} to {got.shape}")
    if not np.issubdtype(ref.dtype, np.number) and ref.dtype != np.bool_:
        ref, got = ref.astype(np.float64), got.astype(np.float64)
    r = ref.astype(np.float64).ravel()
    c = got.astype(np.float64).ravel()
    if r.size == 0:
        return {"max_abs": 0.0, "rel": 0.0, "sqnr_db": math.inf, "cosine": 1.0}
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(c))):
        same = bool(np.array_equal(r, c, equal_nan=True))
        bad = 0.0 if same else math.inf
        return {"max_abs": bad, "rel": bad, "sqnr_db": math.inf if same else -math.inf, "cosine": 1.0 if same else 0.0}
    err = c - r
    max_abs = float(np.max(np.abs(err)))
    scale = float(np.max(np.abs(r)))
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    signal, noise = float(np.dot(r, r)), float(np.dot(err, err))
    sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    nr, nc = math.sqrt(signal), math.sqrt(float(np.dot(c, c)))
    cosine = 1.0 if nr == 0 and nc == 0 else (float(np.dot(r, c)) / (nr * nc) if nr and nc else 0.0)
    out = {"max_abs": max_abs, "rel": rel, "sqnr_db": sqnr, "cosine": cosine}
    if np.issubdtype(ref.dtype, np.floating) and ref.ndim >= 2 and ref.shape[-1] > 1:
        out["top1"] = float(np.mean(np.argmax(ref, axis=-1) == np.argmax(got, axis=-1)))
    return out


#: how to combine one metric over several outputs or batches: keep the worst
WORST = {"max_abs": max, "rel": max, "sqnr_db": min, "cosine": min, "top1": min}


def compare_outputs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    """Worst-case metrics over all outputs (``ref`` and ``got`` keyed by output name)."""
    total: dict[str, float] = {}
    for name, r in ref.items():
        if name not in got:
            raise ValueError(f"output '{name}' disappeared")
        for key, value in compare_arrays(r, got[name]).items():
            total[key] = WORST[key](total[key], value) if key in total else value
    return total
