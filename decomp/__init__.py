"""Low-rank decomposition numerics, independent of any graph (numpy/scipy, float64).

``vbmf``   empirical variational Bayesian matrix factorisation: the rank (and noise variance)
           of a matrix, the rank selection of Kim et al. (2015).
``tucker`` partial Tucker-2 of a conv kernel on its output and input channel modes (HOSVD + HOOI).
``svd``    truncated and data-aware (input-covariance weighted) SVD of a MatMul weight.
``ranks``  the rank policies of the ``rank=`` option (vbmf, energy:F, ratio:F, an integer).
``lstsq``  streamed ridge least squares, the refit of a decomposed layer's last factor and bias.

The ``tucker`` and ``lowrank`` passes map graph weights onto these and back.
"""
