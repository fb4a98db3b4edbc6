"""``lowrank``: truncated SVD of Gemm, MatMul (constant weight) and 1×1 Conv layers — lossy.

A layer y = x·W (W [K, N]; a 1×1 Conv's kernel read as [C, N]) becomes two layers
x·W₁ (K→R) → ·W₂ (R→N) with the original bias on the second. Without calibration data W₁W₂ is
the truncated SVD; with it, the data-aware form W₁ = W·V_R, W₂ = V_Rᵀ, V_R the top-R
eigenvectors of Wᵀ Σ W (Σ = E[x xᵀ] of the layer's inputs), which minimises the expected output
error at rank R. Convs with a larger kernel belong to ``tucker``. Rank choice, refit and budget:
``lowbit.passes.decompose``; layouts and costs: ``lowbit.decomp.layers``.
"""

from __future__ import annotations

from lowbit.decomp.layers import Layer
from lowbit.passes.decompose import Decompose, DecomposeOptions


class LowRank(Decompose):
    """Truncated (data-aware) SVD of Gemm, MatMul and 1×1 Conv layers, with least-squares refit (lossy)."""

    name = "lowrank"
    Options = DecomposeOptions

    def eligible(self, layer: Layer) -> str | None:
        if layer.spatial:
            return f"Conv with a {'×'.join(map(str, layer.kernel))} kernel: use tucker"
        return None
