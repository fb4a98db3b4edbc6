"""Calibration statistics for decomposition: input second moments and refit pairs, streamed.

Output error of a layer y = x·W changed by ΔW, over inputs x: E‖x·ΔW‖² = tr(ΔWᵀ Σ ΔW) with
Σ = E[x xᵀ] (uncentred: a bias does not change ΔW's effect). For a Conv, x is the im2col patch
(input channel major, then kernel offsets: c·∏k + offset — the order of ``K.reshape(N, -1)``)
at an output position, and Σ is estimated from a seeded random subset of at most ``ROWS``
positions per calibration batch, enough for the D×D moment (D = C·∏k) without materialising
every patch. Strides, dilations and zero padding (explicit or SAME) are honoured.

A refit needs, on the same calibration inputs, a layer's input in the current (decomposed or
pruned) model (Z) and its output in the original model (Y). ``paired_many`` runs two truncated
copies — the current model cut at the layers' inputs and the original cut at their outputs, each
keeping only the nodes those values need — in lockstep over the calibration batches, yielding
row-aligned (Z, Y) matrices per layer (``reduction_rows``: Z's im2col patches or rows, and Y,
channels last, at the same positions); ``paired_patches`` is the one-layer form.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from lowbit.decomp.layers import Layer, attribute
from lowbit.quant.capture import limit_samples
from lowbit.runtime.session import session

#: at most this many rows (positions) per calibration batch enter a moment
ROWS = 4096


def conv_geometry(node: ir.Node, in_spatial: tuple[int, ...], kernel: tuple[int, ...]):
    """(strides, dilations, begin pads, end pads) of a Conv, with auto_pad resolved."""
    nd = len(kernel)
    strides = list(attribute(node, "strides", None) or [1] * nd)
    dilations = list(attribute(node, "dilations", None) or [1] * nd)
    auto = attribute(node, "auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, s, k, d in zip(in_spatial, strides, kernel, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            begin.append(small if auto == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
    elif auto == "VALID":
        begin, end = [0] * nd, [0] * nd
    else:
        pads = list(attribute(node, "pads", None) or [0] * (2 * nd))
        begin, end = pads[:nd], pads[nd:]
    return strides, dilations, begin, end


def layer_rows(layer: Layer, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows of the layer's reduction input [S, D] from its input tensor ``x`` (one batch)."""
    return reduction_rows(layer.node, x, layer.kernel if layer.is_conv else None, rng)[0]


def reduction_rows(node: ir.Node, x: np.ndarray, kernel: tuple[int, ...] | None, rng: np.random.Generator,
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """At most ``ROWS`` seeded rows [S, D] of what a layer reduces over, from its input ``x``:
    im2col patches of a Conv (``kernel`` given, see ``patch_rows``) or the rows of a Gemm/MatMul
    input (``kernel`` None); and which output rows they belong to (flat indices into the output
    read channels last; None: all of them, in order)."""
    if kernel is not None:
        return patch_rows(node, x, kernel, rng)
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] <= ROWS:
        return rows, None
    pick = np.sort(rng.choice(rows.shape[0], ROWS, replace=False))
    return rows[pick], pick


def patch_rows(node: ir.Node, x: np.ndarray, kernel: tuple[int, ...], rng: np.random.Generator,
               ) -> tuple[np.ndarray, np.ndarray]:
    """im2col rows [S, C·∏k] of a Conv's input ``x`` at at most ``ROWS`` seeded output
    positions, and those positions as flat indices into the output's (batch, *spatial) grid."""
    strides, dilations, begin, end = conv_geometry(node, x.shape[2:], kernel)
    padded = np.pad(x, [(0, 0), (0, 0), *zip(begin, end)])
    out = [(p - (k - 1) * d - 1) // s + 1 for p, k, d, s in zip(padded.shape[2:], kernel, dilations, strides)]
    count = x.shape[0] * math.prod(out)
    pick = np.sort(rng.choice(count, ROWS, replace=False)) if count > ROWS else np.arange(count)
    index = np.unravel_index(pick, (x.shape[0], *out))
    batch, spots = index[0], index[1:]
    columns = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        where = tuple(o * s + j * d for o, s, j, d in zip(spots, strides, offset, dilations))
        columns.append(padded[(batch[:, None], np.arange(x.shape[1])[None, :], *(w[:, None] for w in where))])
    # columns: ∏k entries of [S, C] → [S, C, ∏k] → [S, C·∏k] (channel major, as K.reshape(N, -1))
    return np.stack(columns, axis=2).reshape(len(pick), -1), pick


def channels_last(a: np.ndarray, conv: bool) -> np.ndarray:
    """[B, C, …] → [B·…, C] for Conv activations; [..., C] → [-1, C] otherwise."""
    if conv:
        a = np.moveaxis(a, 1, -1)
    return a.reshape(-1, a.shape[-1])


def truncated(model: ir.Model, outputs: list[str]) -> ir.Model:
    """A copy of ``model`` whose outputs are ``outputs``, keeping only the nodes they need."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    copy = model.clone()
    values = ir.convenience.create_value_mapping(copy.graph)
    copy.graph.outputs.clear()
    for name in outputs:
        copy.graph.outputs.append(values[name])
    RemoveUnusedNodesPass()(copy)
    return copy


def paired_patches(current: ir.Model, x_name: str, original: ir.Model, y_name: str, calib, *, node: ir.Node,
                   kernel: tuple[int, ...] | None, max_samples: int, rng: np.random.Generator,
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Row-aligned (X [S, D], Y [S, N]): a layer's reduction input in the ``current`` model (im2col
    patches of a Conv's input, D = C·∏k; rows of a Gemm/MatMul input) and, at the same output
    positions, its output in the ``original`` model — the pairs of a least-squares refit of the
    whole layer (``kernel`` None for Gemm/MatMul)."""
    for (pair,) in paired_many(current, original, [(node, x_name, y_name, kernel)], calib,
                               max_samples=max_samples, rngs=[rng]):
        yield pair


def paired_many(current: ir.Model, original: ir.Model, layers: list[tuple[ir.Node, str, str, tuple[int, ...] | None]],
                calib, *, max_samples: int, rngs: list[np.random.Generator]) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
    """``paired_patches`` of several layers (node, input name, output name, kernel) at once: one
    run of each model per calibration batch; yields one (X, Y) pair per layer."""
    x_names = list(dict.fromkeys(x for _, x, _, _ in layers))
    y_names = list(dict.fromkeys(y for _, _, y, _ in layers))
    sess_x = session(truncated(current, x_names), optimization="basic")
    sess_y = session(truncated(original, y_names), optimization="basic")
    inputs_x = {i.name for i in sess_x.get_inputs()}
    inputs_y = {i.name for i in sess_y.get_inputs()}
    for feed in limit_samples(calib, max_samples):
        xs = dict(zip(x_names, sess_x.run(x_names, {k: v for k, v in feed.items() if k in inputs_x})))
        ys = dict(zip(y_names, sess_y.run(y_names, {k: v for k, v in feed.items() if k in inputs_y})))
        out = []
        for (node, x_name, y_name, kernel), rng in zip(layers, rngs):
            rows, pick = reduction_rows(node, xs[x_name], kernel, rng)
            y = channels_last(ys[y_name], kernel is not None)
            out.append((rows, y if pick is None else y[pick]))
        yield out
