"""Low-rank decomposition numerics, independent of any graph (numpy/scipy, float64).

``vbmf``   empirical variational Bayesian matrix factorisation: the rank (and noise variance)
           of a matrix, the rank selection of Kim et al. (2015).
``tucker`` partial Tucker-2 of a conv kernel on its output and input channel modes (HOSVD + HOOI).
``svd``    truncated and data-aware (input-covariance weighted) SVD of a MatMul weight.
``ranks``  the rank policies of the ``rank=`` option (vbmf, energy:F, ratio:F, an integer).
``lstsq``  streamed ridge / reduced-rank least squares, the refit of a decomposed layer.
``layers`` the layers that can be split, their costs, and the graph rewrites (onnx-ir).
``data``   calibration moments (im2col patches) and row-aligned refit pairs, streamed.
``budget`` rank allocation under a MAC budget (greedy walk along convex hulls).

The ``tucker`` and ``lowrank`` passes map graph weights onto these and back.
"""

import numpy as np


def finite_float64(array, ndim: int, need: str, what: str) -> np.ndarray:
    """``array`` as float64, or ValueError: ``need`` (with its shape) unless it is a non-empty
    ``ndim``-D array, "``what`` contains NaN or Inf values" unless every entry is finite."""
    array = np.asarray(array)
    if array.ndim != ndim or array.size == 0:
        raise ValueError(f"{need}; got shape {array.shape}")
    array = np.asarray(array, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contains NaN or Inf values")
    return array
