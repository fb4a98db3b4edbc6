"""``tucker``: Tucker-2 decomposition of Conv kernels, ranks by VBMF or a MAC budget — lossy.

A Conv with group = 1 and a kernel larger than 1×1, K [N, C, k…], becomes

    Conv 1×1 (C→R_in, U_inᵀ) → Conv k… (R_in→R_out, core; original strides/pads/dilations)
    → Conv 1×1 (R_out→N, U_out; original bias)

with K ≈ core ×₀ U_out ×₁ U_in, the partial Tucker decomposition on the output- and
input-channel modes (HOSVD initialisation, HOOI refinement, float64; Kim et al. 2015 chose the
ranks by empirical VBMF of the two unfoldings, ``rank=vbmf`` here). ``linear=true`` also splits
1×1 Convs, Gemm and MatMul by truncated SVD (see ``lowrank``), under one rank policy and budget.
Grouped and depthwise Convs and ConvTranspose are skipped and listed. Rank choice, refit and
budget: ``lowbit.passes.decompose``; layouts and costs: ``lowbit.decomp.layers``.
"""

from __future__ import annotations

from lowbit.decomp.layers import Layer
from lowbit.passes.decompose import Decompose, TuckerOptions


class Tucker(Decompose):
    """Tucker-2 decomposition of Conv kernels (VBMF / energy / ratio ranks or a MAC budget), with least-squares refit (lossy)."""

    name = "tucker"
    Options = TuckerOptions

    def eligible(self, layer: Layer) -> str | None:
        if layer.spatial or self.options.linear:
            return None
        return f"{'1×1 Conv' if layer.is_conv else layer.op}: use lowrank or tucker(linear=true)"
