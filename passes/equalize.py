"""``equalize``: cross-layer equalization with bias absorption (Nagel et al., 2019) — exact.

Cross-layer equalization. Two layers joined by a chain of channel-wise positively homogeneous
ops, y = W₁x + b₁, z = P(y), u = W₂z + b₂, with f(x/s) = f(x)/s for every op f of P and every
s > 0 (ReLU, Clip with its bounds divided by s, zero padding, max pooling): for any S = diag(s),
s > 0, per channel i of y::

    W₁' = S⁻¹W₁   (row i of W₁ divided by s_i)      b₁' = S⁻¹b₁
    P'  = P with every bound divided by s (per channel)          so  z' = P'(y') = S⁻¹z
    W₂' = W₂S     (input column i of W₂ multiplied by s_i)       so  u' = W₂'z' + b₂ = u

With r₁_i = max|row i of W₁| and r₂_i = max|column i of W₂|, the choice r₁_i/s_i = r₂_i·s_i,
i.e. s_i = √(r₁_i / r₂_i), gives both the range √(r₁_i·r₂_i), which minimises the spread of
per-channel ranges that one per-tensor quantization scale must cover. A channel with r₁_i = 0 or
r₂_i = 0 keeps s_i = 1. Every pair is rescaled in turn, in graph order, for ``iterations`` rounds
or until no scale of a round differs from 1 by more than ``tolerance``: a depthwise conv is the
second layer of one pair and the first of the next, so chains expand → depthwise → project
(Nagel's triples) converge to ranges balanced across all three. Scales accumulate in float64
and weights are cast back to their dtype once.

Per-channel bounds. Clip(x, lo, hi)/s = Min(Max(x/s, lo/s), hi/s) for s > 0, so after scaling a
Clip (ReLU6) becomes Max(·, lo/s) then Min(·, hi/s) with constant bounds shaped [C, 1, …] (NCHW:
one value per channel, broadcast over the spatial axes) or [C] (channels last: Gemm, MatMul).
``lowbit.quant.activations`` treats such a Max/Min like Clip (one Q/DQ after the last clamp).
The price is speed: onnxruntime does not fuse a per-channel clamp into QLinearConv, so a Conv
followed by one runs in float between its DequantizeLinear inputs and the QuantizeLinear after the
clamp (EfficientNet-Lite0 per-tensor W8A8: 16 of 49 Convs become QLinearConv after equalize, 48
without; 200 crops take 5.8 s instead of 1.9 s, float 1.6 s).

Growth limit (``max_growth``, not in Nagel et al.). Scaling channel i of the activation z between
the layers by 1/s_i also changes the range that one per-tensor activation scale must cover. ReLU6
networks have nearly equal activation channel ranges ([0, 6]); balancing weights alone can blow a
channel up by 1/s_i ≫ 1 (on EfficientNet-Lite0 a depthwise channel whose expand row is ≈ 0 and
whose output is its bias, s_i = 0.009: range 6 → 316), which ruins the activation's resolution. So
each pair's accumulated scale s_i is bounded below: with [lo_i, hi_i] the range of channel i of the
chain's output (calibration minimum and maximum, measured before equalization; without
calibration data the last clamp's bounds), R = max(hi, 0) − min(lo, 0) the activation's range
and e_i = max(hi_i, 0) − min(lo_i, 0) (hi_i − lo_i when absorption will shift lo_i > 0 to 0)::

    s_i ≥ e_i / (max_growth · R)     (channel i spans e_i/s_i ≤ max_growth · R after scaling)

applied after every step (s_i ← max(s_i, floor_i)); ``max_growth=0`` is plain CLE. Measured on
EfficientNet-Lite0, per-tensor W8A8 top-1 agreement with float on 200 crops (73% unequalized):
max_growth 0 → 87.5%, 1 → 91.5%, 1.5 → 94%, 2 → 95.5% (the default), and over 20 rounds 3 →
93.5%, 4 → 88%, 8 → 83.5%. With max_growth=0, per-tensor activations alone (float weights,
onnxruntime graph optimisations off) drop from 95.5% to 89% agreement, while per-tensor weights
alone rise from 73% to 96.5%.

Bias absorption. With c ≥ 0 per channel, every clamp of the chain commutes with a shift:
Clip(y, lo, hi) − c = Clip(y − c, lo − c, hi − c), Relu(y) − c = Max(y − c, −c), and max pooling
likewise; so b₁' = b₁ − c, the chain's bounds shifted by −c, and b₂' = b₂ + W₂·c (for a conv the
sum of each filter over input channels and kernel positions) keep u unchanged. That is exact only
when the second layer sees no padding value that was not shifted: a Conv with nonzero ``pads`` (or
``auto_pad`` SAME) or a Pad op in the chain blocks absorption (1×1 convs without pads, Gemm and
MatMul with a bias Add are fine). c_i = max(lo_i / s_i, 0), lo_i the smallest value channel i of
the chain's output (the tensor the second layer reads, the one the activation quantizer sees)
takes over ``samples`` calibration samples before equalization: shifting by it moves the channel's
calibrated range [lo_i, hi_i]/s_i to [0, (hi_i − lo_i)/s_i] without creating negative values,
which lowers the per-tensor range of the activation (Nagel et al. use β − 3γ from BN statistics;
BNs are folded here, so calibration data stands in). Without calibration data nothing is absorbed,
and the pass notes why. Scales are chosen first (all rounds), then biases absorbed.

Weight axes scaled, per layer and layout:

==================  =================================  =================  ======================
layer               weight layout                      output channel i   input channel i
                                                       (first layer: ÷s)  (second layer: ×s)
==================  =================================  =================  ======================
Conv, group 1       W[O, I, k…]                        axis 0             axis 1
Conv, group g       W[O, I/g, k…] viewed as            axis 0             W[i // (I/g), :,
(depthwise: g = I)  [g, O/g, I/g, k…]                                     i mod (I/g), k…]
Gemm, transB=0      B[K, N]                            axis 1; C (×β)     axis 0
Gemm, transB=1      B[N, K]                            axis 0; C (×β)     axis 1
MatMul(x, W), 2-D   W[K, N], then Add(·, bias)         axis 1; bias Add   axis 0
==================  =================================  =================  ======================

Conv layers keep the channel on axis 1 of the activation (bounds [C, 1, …]); Gemm and MatMul on
the last axis (bounds [C]); a Conv never pairs with a Gemm or MatMul (a layout change sits
between them). Gemm with transA=1 and MatMul with a constant left operand are not equalized.

Chains. From a first layer's output, every tensor up to the second layer's activation input must
have exactly one consumer and not be a graph output, and every op between must be one of:

==================  ===========================================  ==========================
op                  scaling by 1/s                               shift by −c (absorption)
==================  ===========================================  ==========================
Relu                unchanged                                    becomes Max(·, −c)
Clip(lo, hi)        Max(·, lo/s) → Min(·, hi/s), per channel     bounds − c
Max / Min with a    constant ÷ s, per channel                    constant − c
constant scalar
or per-channel
Pad (constant 0,    unchanged (0/s = 0)                          blocks absorption
channel axis not
padded)
MaxPool             unchanged                                    unchanged (pads are −∞)
Identity            unchanged                                    unchanged
==================  ===========================================  ==========================

Anything else — a residual Add, Sigmoid/SiLU/HardSwish, Mul, Concat, Reshape, Transpose,
average pooling, a second consumer — breaks the chain and the pair is not equalized; each such
chain is noted under ``skipped`` with its reason. Only the main graph is rewritten.

Notes: ``pairs`` (per equalized pair: the two layers, the ops between, the range of the scales,
channels on the growth limit, channels absorbed or why none were, and for each weight
``analysis.outliers.before_after`` plus ``channel_range_spread`` along its output-channel axis
before and after); totals ``equalized`` (pairs), ``absorbed`` (pairs) and ``absorbed_channels``,
``limited_channels``; ``rounds``, ``converged`` and ``last_change``; ``skipped`` (one line per
layer whose output chain was not equalized, with why); ``reason`` when nothing was equalized.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from lowbit.analysis.outliers import before_after, channel_range_spread
from lowbit.core.errors import UserError
from lowbit.passes.base import Pass, option
from lowbit.passes.edit import Names, bias_name, const_array, drop_if_dead, new_const, set_const

#: layer ops the pass can equalize
LAYER_OPS = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass
class EqualizeOptions:
    iterations: int = option(50, "most rounds over all layer pairs (each round rescales every pair once)")
    tolerance: float = option(1e-4, "convergence: stop after a round in which no per-channel scale differs "
                                    "from 1 by more than this (relative)")
    absorb: bool = option(True, "absorb high biases into the next layer where that is exact (needs --calib)")
    samples: int = option(64, "calibration samples measured for bias absorption and the growth limit, at most")
    max_growth: float = option(2.0, "most an activation channel's extent may grow, as a multiple of the whole "
                                    "activation's range before equalization (per-tensor activation quantization "
                                    "must cover the widest channel); 0 = no limit (plain Nagel et al.)")
    ops: list[str] = option(list(LAYER_OPS), "layer types equalized (Conv, Gemm, MatMul)")

    def validate(self) -> None:
        if self.iterations < 1:
            raise UserError(f"option 'iterations' of pass equalize must be at least 1, not {self.iterations}")
        if not (0 < self.tolerance < 1) or math.isnan(self.tolerance):
            raise UserError(f"option 'tolerance' of pass equalize must be between 0 and 1, not {self.tolerance}")
        if self.max_growth < 0 or math.isnan(self.max_growth) or 0 < self.max_growth < 1:
            raise UserError(f"option 'max_growth' of pass equalize must be 0 (no limit) or at least 1, "
                            f"not {self.max_growth}")
        if self.samples < 1:
            raise UserError(f"option 'samples' of pass equalize must be at least 1, not {self.samples}")
        if not self.ops:
            raise UserError(f"option 'ops' of pass equalize needs at least one of {', '.join(LAYER_OPS)}")
        for op in self.ops:
            if op not in LAYER_OPS:
                raise UserError(f"option 'ops' of pass equalize names '{op}', which is not one of "
                                f"{', '.join(LAYER_OPS)}")


class _Skip(Exception):
    """Why a layer or a chain is not equalized (one short phrase)."""


class Equalize(Pass):
    """Cross-layer equalization of Conv/Gemm/MatMul pairs, with bias absorption (exact)."""

    name = "equalize"
    Options = EqualizeOptions
    preserves = "exact"
    tolerance = 1e-4

    def run(self, model: ir.Model, ctx) -> bool:
        o = self.options
        graph = model.graph
        layers = _find_layers(graph, set(o.ops))
        pairs, skipped = _find_pairs(graph, layers)
        ctx.note("skipped", skipped)
        if not pairs:
            if any(isinstance(v, _Layer) for v in layers.values()):
                reason = "no two layers are joined by a chain of channel-wise homogeneous ops"
            else:
                reason = f"the graph has no {'/'.join(o.ops)} layer with a constant weight"
            ctx.note("reason", f"nothing to equalize: {reason}; the model is unchanged")
            ctx.note("equalized", 0)
            return False
        originals = {id(layer): layer.w.copy() for pair in pairs for layer in (pair.first, pair.second)}
        absorbable = self._prepare(model, pairs, ctx)

        rounds, change = 0, float("inf")
        for rounds in range(1, o.iterations + 1):
            change = max(pair.equalize_step() for pair in pairs)
            if change <= o.tolerance:
                break
        ctx.note("rounds", rounds)
        ctx.note("converged", bool(change <= o.tolerance))
        ctx.note("last_change", float(change))

        for pair in absorbable:
            pair.absorb(np.maximum(pair.stats[0] / pair.scale, 0.0))

        names = Names(graph)
        names.used.update(node.name for node in graph.all_nodes() if node.name)  # new nodes get fresh names too
        changed, written = False, set()
        for pair in pairs:
            for layer in (pair.first, pair.second):
                if id(layer) not in written:
                    written.add(id(layer))
                    changed |= layer.write(graph, names)
            changed |= pair.rewrite_chain(graph, names)
        self._report(pairs, originals, ctx)
        return changed

    def _prepare(self, model: ir.Model, pairs: list[_Pair], ctx) -> list[_Pair]:
        """Measure the chains' channel ranges (one calibration sweep, before any rescaling), set
        each pair's growth limit, and return the pairs whose biases will be absorbed."""
        o = self.options
        absorbable = []
        for pair in pairs:
            why = pair.absorb_blocker() if o.absorb else "absorb=false"
            if why is None and ctx.calib is None:
                why = "no calibration data"
            if why is None:
                absorbable.append(pair)
            else:
                pair.absorb_note = why
        if o.absorb and ctx.calib is None:
            ctx.note("absorption", "skipped: no calibration data (pass --calib to absorb biases)")
        measured = pairs if o.max_growth > 0 else absorbable
        if ctx.calib is not None and measured:
            for pair, stats in zip(measured, _channel_stats(model, measured, o.samples, ctx)):
                pair.stats = stats
        if o.max_growth > 0:
            for pair in pairs:
                pair.floor = pair.growth_floor(pair in absorbable, o.max_growth)
            if ctx.calib is None:
                ctx.note("growth_limit", "from the chains' Clip bounds (no calibration data); chains without an "
                                         "upper bound are not limited")
        return absorbable

    def _report(self, pairs: list[_Pair], originals: dict[int, np.ndarray], ctx) -> None:
        rows = []
        for pair in pairs:
            row = {"first": pair.first.node.name, "second": pair.second.node.name,
                   "between": [f"{op.node.op_type} '{op.node.name}'" for op in pair.chain],
                   "scale_min": float(pair.scale.min()), "scale_max": float(pair.scale.max()),
                   "limited_channels": pair.limited_channels(),
                   "absorbed_channels": int(np.count_nonzero(pair.shift))}
            if isinstance(pair.absorb_note, str):
                row["not_absorbed"] = pair.absorb_note
            row["weights"] = {
                role: {"node": layer.node.name, "weight": layer.w_name,
                       **before_after(originals[id(layer)], layer.w),
                       "spread_before": round(channel_range_spread(originals[id(layer)], layer.out_axis), 3),
                       "spread_after": round(channel_range_spread(layer.w, layer.out_axis), 3)}
                for role, layer in (("first", pair.first), ("second", pair.second))
            }
            rows.append(row)
        ctx.note("pairs", rows)
        ctx.note("equalized", len(pairs))
        ctx.note("absorbed", sum(1 for row in rows if row["absorbed_channels"]))
        ctx.note("absorbed_channels", sum(row["absorbed_channels"] for row in rows))
        ctx.note("limited_channels", sum(row["limited_channels"] for row in rows))


# --------------------------------------------------------------------------------------------
# Constants and names


def _const(value: ir.Value | None, what: str) -> np.ndarray:
    """The constant array behind ``value`` (initializer or Constant node), or raise ``_Skip``."""
    if value is None:
        raise _Skip(f"{what} is missing")
    array = const_array(value)
    if array is None:
        raise _Skip(f"{what} '{value.name}' is not a constant")
    return array


def _float_const(value: ir.Value | None, what: str) -> np.ndarray:
    array = _const(value, what)
    if not np.issubdtype(array.dtype, np.floating):
        raise _Skip(f"{what} has element type {array.dtype}, not floating point")
    if not np.all(np.isfinite(array)):
        raise _Skip(f"{what} holds NaN or Inf")
    return array


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


# --------------------------------------------------------------------------------------------
# Layers


@dataclasses.dataclass(eq=False)
class _Layer:
    """One Conv / Gemm / MatMul whose constant weight is rescaled, with a float64 working copy."""

    node: ir.Node
    kind: str  # "conv" | "gemm" | "matmul"
    w: np.ndarray  # float64 working copy of the weight
    dtype: np.dtype
    out_axis: int  # weight axis of the output channels
    in_axis: int  # weight axis of the input channels (conv: see _in_view)
    groups: int = 1
    #: float64 bias broadcast to [..., channels] (None: no bias yet)
    bias: np.ndarray | None = None
    bias_dtype: np.dtype | None = None
    #: MatMul → Add(bias): the Add node and the index of its constant operand
    bias_add: ir.Node | None = None
    bias_index: int = 2
    gemm_beta: float = 1.0
    gemm_alpha: float = 1.0
    padded: bool = False
    w_dirty: bool = False
    b_dirty: bool = False

    @property
    def w_name(self) -> str:
        return self.node.inputs[1].name

    @property
    def output(self) -> ir.Value:
        return self.bias_add.outputs[0] if self.bias_add is not None else self.node.outputs[0]

    @property
    def out_channels(self) -> int:
        return int(self.w.shape[self.out_axis])

    @property
    def in_channels(self) -> int:
        if self.kind == "conv":
            return int(self.w.shape[1]) * self.groups
        return int(self.w.shape[self.in_axis])

    @property
    def layout(self) -> tuple[int | None, str]:
        """(rank of the output, 'first' | 'last'): where the channel axis of the activation is."""
        if self.kind == "conv":
            return self.w.ndim, "first"
        return None, "last"

    # -- ranges ---------------------------------------------------------------------------------
    def _in_view(self) -> np.ndarray:
        """Conv weight viewed as [g, O/g, I/g, k…] (a view of ``self.w``)."""
        o, i_g = self.w.shape[0], self.w.shape[1]
        return self.w.reshape(self.groups, o // self.groups, i_g, *self.w.shape[2:])

    def out_ranges(self) -> np.ndarray:
        a = np.moveaxis(np.abs(self.w), self.out_axis, 0)
        return a.reshape(a.shape[0], -1).max(axis=1)

    def in_ranges(self) -> np.ndarray:
        if self.kind == "conv":
            v = np.abs(self._in_view())
            axes = (1,) + tuple(range(3, v.ndim))
            return v.max(axis=axes).reshape(-1)
        a = np.moveaxis(np.abs(self.w), self.in_axis, 0)
        return a.reshape(a.shape[0], -1).max(axis=1)

    # -- rewrites -------------------------------------------------------------------------------
    def _broadcast(self, v: np.ndarray, axis: int) -> np.ndarray:
        shape = [1] * self.w.ndim
        shape[axis] = v.shape[0]
        return v.reshape(shape)

    def divide_out(self, s: np.ndarray) -> None:
        """Output channel i divided by s_i: weight row and bias."""
        if np.all(s == 1.0):
            return
        self.w /= self._broadcast(s, self.out_axis)
        self.w_dirty = True
        if self.bias is not None:
            self.bias = self.bias / s
            self.b_dirty = True

    def multiply_in(self, s: np.ndarray) -> None:
        """Input channel i multiplied by s_i."""
        if np.all(s == 1.0):
            return
        if self.kind == "conv":
            view = self._in_view()
            shape = (self.groups, 1, view.shape[2]) + (1,) * (view.ndim - 3)
            view *= s.reshape(shape)
        else:
            self.w *= self._broadcast(s, self.in_axis)
        self.w_dirty = True

    def shift_out(self, c: np.ndarray) -> None:
        """Output channel i minus c_i (through the bias)."""
        self.bias = (np.zeros(self.out_channels) if self.bias is None else self.bias) - c
        self.b_dirty = True

    def absorb_in(self, c: np.ndarray) -> None:
        """Bias plus W·c: what input channel i shifted by +c_i adds to every output."""
        if self.kind == "conv":
            view = self._in_view()
            shape = (self.groups, 1, view.shape[2]) + (1,) * (view.ndim - 3)
            add = (view * c.reshape(shape)).sum(axis=tuple(range(2, view.ndim))).reshape(-1)
        else:
            kn = self.w if self.in_axis == 0 else self.w.T  # [K, N]
            add = self.gemm_alpha * (c @ kn)
        self.bias = (np.zeros(self.out_channels) if self.bias is None else self.bias) + add
        self.b_dirty = True

    def write(self, graph: ir.Graph, names: Names) -> bool:
        """Cast the working copies back and store them in the graph; say whether anything changed."""
        node = self.node
        if self.w_dirty:
            set_const(graph, node, 1, self.w.astype(self.dtype), names, f"{self.w_name}.equalized")
        if self.b_dirty:
            dtype = self.bias_dtype if self.bias_dtype is not None else self.dtype
            if self.bias_add is not None:
                old = self.bias_add.inputs[self.bias_index]
                set_const(graph, self.bias_add, self.bias_index, self.bias.astype(dtype), names, f"{old.name}.equalized")
            else:
                has = len(node.inputs) > 2 and node.inputs[2] is not None
                base = f"{node.inputs[2].name}.equalized" if has else bias_name(node.inputs[1], "equalize")
                set_const(graph, node, 2, self.bias.astype(dtype), names, base)
                if self.kind == "gemm":
                    node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        return self.w_dirty or self.b_dirty


def _conv_layer(node: ir.Node) -> _Layer:
    if len(node.inputs) < 2 or node.inputs[0] is None:
        raise _Skip("has no weight input")
    w0 = _float_const(node.inputs[1], "weight")
    if w0.ndim < 3:
        raise _Skip(f"weight rank {w0.ndim} is below 3")
    groups = int(_attr(node, "group", 1))
    if groups < 1 or w0.shape[0] % groups:
        raise _Skip(f"{w0.shape[0]} output channels do not split into {groups} groups")
    layer = _Layer(node, "conv", w0.astype(np.float64), w0.dtype, out_axis=0, in_axis=1, groups=groups)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b0 = _float_const(node.inputs[2], "bias")
        if b0.shape != (w0.shape[0],):
            raise _Skip(f"bias shape {b0.shape} is not [{w0.shape[0]}]")
        layer.bias, layer.bias_dtype = b0.astype(np.float64), b0.dtype
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    pads = list(_attr(node, "pads", []) or [])
    layer.padded = auto_pad in ("SAME_UPPER", "SAME_LOWER") or any(p != 0 for p in pads)
    return layer


def _gemm_layer(node: ir.Node) -> _Layer:
    if int(_attr(node, "transA", 0)):
        raise _Skip("Gemm with transA=1 is not equalized")
    w0 = _float_const(node.inputs[1], "weight (B)")
    if w0.ndim != 2:
        raise _Skip(f"B has rank {w0.ndim}")
    trans_b = bool(int(_attr(node, "transB", 0)))
    out_axis, in_axis = (0, 1) if trans_b else (1, 0)
    layer = _Layer(node, "gemm", w0.astype(np.float64), w0.dtype, out_axis=out_axis, in_axis=in_axis,
                   gemm_alpha=float(_attr(node, "alpha", 1.0)), gemm_beta=float(_attr(node, "beta", 1.0)))
    n = w0.shape[out_axis]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c0 = _float_const(node.inputs[2], "bias (C)")
        if c0.ndim > 2 or (c0.ndim >= 1 and c0.shape[-1] not in (1, n)):
            raise _Skip(f"C shape {c0.shape} does not broadcast to [M, {n}]")
        lead = c0.shape[:-1] if c0.ndim == 2 else ()
        layer.bias = np.broadcast_to(layer.gemm_beta * c0.astype(np.float64), lead + (n,)).copy()
        layer.bias_dtype = c0.dtype
    return layer


def _matmul_layer(node: ir.Node) -> _Layer:
    a, b = node.inputs[0], node.inputs[1]
    if a is None or b is None:
        raise _Skip("has a missing input")
    if const_array(a) is not None:
        raise _Skip("MatMul with a constant left operand is not equalized")
    w0 = _float_const(b, "weight (second input)")
    if w0.ndim != 2:
        raise _Skip(f"weight has rank {w0.ndim}, not 2")
    layer = _Layer(node, "matmul", w0.astype(np.float64), w0.dtype, out_axis=1, in_axis=0)
    n = w0.shape[1]
    y = node.outputs[0]
    users = [u for u, _ in y.uses()]
    if len(users) == 1 and not y.is_graph_output() and users[0].op_type == "Add" and users[0].domain in ("", "ai.onnx") \
            and len(users[0].inputs) == 2 and users[0].graph is node.graph:
        add = users[0]
        index = 1 if add.inputs[0] is y else 0
        other = add.inputs[index]
        if other is not None and other is not y and const_array(other) is not None:
            try:
                k0 = _float_const(other, "bias Add constant")
            except _Skip:
                return layer
            if k0.ndim <= 1 and (k0.ndim == 0 or k0.shape[-1] in (1, n)):
                layer.bias_add, layer.bias_index = add, index
                layer.bias = np.broadcast_to(k0.astype(np.float64), (n,)).copy()
                layer.bias_dtype = k0.dtype
    return layer


_LAYER_READERS = {"Conv": _conv_layer, "Gemm": _gemm_layer, "MatMul": _matmul_layer}


def _find_layers(graph: ir.Graph, ops: set[str]) -> dict[int, "_Layer | str"]:
    """Every candidate layer node of the main graph (by id): a ``_Layer`` or why it is not one."""
    layers: dict[int, _Layer | str] = {}
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ops:
            continue
        try:
            layers[id(node)] = _LAYER_READERS[node.op_type](node)
        except _Skip as why:
            layers[id(node)] = str(why)
    return layers


# --------------------------------------------------------------------------------------------
# The ops between two layers


@dataclasses.dataclass(eq=False)
class _ChainOp:
    node: ir.Node
    kind: str  # "clamp" | "relu" | "pad" | "same"
    #: where the chain tensor enters the node
    index: int = 0
    #: per-channel float64 bounds of a clamp (−∞ / +∞ where absent)
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    #: can the chain be shifted through it (bias absorption)
    shiftable: bool = True


def _channel_vector(array: np.ndarray, channels: int, rank: int | None, where: str, what: str) -> np.ndarray:
    """A scalar or per-channel constant as a float64 vector [C], or raise ``_Skip``.

    Per-channel means, aligned to the activation from the right, size C (or 1) on the channel
    axis and 1 elsewhere: [C, 1, …] for channels-first activations of rank r (at most r axes),
    [C] for channels-last ones (at most one axis: the activation's rank may be unknown)."""
    a = np.asarray(array, dtype=np.float64)
    if where == "first":
        pos = a.ndim - (rank - 1)  # the channel axis' position in ``a`` (negative: not reached)
        fits = a.ndim <= rank
    else:
        pos = a.ndim - 1
        fits = a.ndim <= 1
    if not fits or any(d != 1 and not (j == pos and d == channels) for j, d in enumerate(a.shape)):
        raise _Skip(f"{what} shape {tuple(array.shape)} is neither a scalar nor per-channel")
    return np.broadcast_to(a.reshape(-1), (channels,)).copy()


def _chain_op(node: ir.Node, index: int, channels: int, rank: int | None, where: str) -> _ChainOp:
    """How the op ``node``, reading the chain tensor at input ``index``, passes channel scaling."""
    op = node.op_type
    label = f"{op} '{node.name}'"
    if node.domain not in ("", "ai.onnx"):
        raise _Skip(f"{node.domain}::{label} is not channel-wise homogeneous")
    if op == "Relu":
        return _ChainOp(node, "relu", 0, np.zeros(channels), np.full(channels, np.inf))
    if op == "Identity":
        return _ChainOp(node, "same")
    if op == "Clip":
        if index != 0:
            raise _Skip(f"the chain feeds a bound of {label}")
        lo = np.full(channels, -np.inf)
        hi = np.full(channels, np.inf)
        for i, bound in ((1, lo), (2, hi)):
            if len(node.inputs) > i and node.inputs[i] is not None:
                value = _float_const(node.inputs[i], f"bound of {label}")
                if value.size != 1:
                    raise _Skip(f"bound of {label} is not a scalar")
                bound[:] = float(value.reshape(()))
        if "min" in node.attributes or "max" in node.attributes:  # opset < 11
            lo[:] = float(_attr(node, "min", -np.inf))
            hi[:] = float(_attr(node, "max", np.inf))
        return _ChainOp(node, "clamp", 0, lo, hi)
    if op in ("Max", "Min"):
        if len(node.inputs) != 2 or node.inputs[0] is node.inputs[1]:
            raise _Skip(f"{label} does not take the chain and one constant")
        k = _channel_vector(_float_const(node.inputs[1 - index], f"operand of {label}"), channels, rank, where,
                            f"operand of {label}")
        if op == "Max":
            return _ChainOp(node, "clamp", index, k, np.full(channels, np.inf))
        return _ChainOp(node, "clamp", index, np.full(channels, -np.inf), k)
    if op == "Pad":
        return _pad_op(node, index, rank, where, label)
    if op == "MaxPool":
        if index != 0 or (len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses()):
            raise _Skip(f"{label} also returns indices")
        if where != "first":
            raise _Skip(f"{label} pools a channels-last tensor")
        return _ChainOp(node, "same")
    raise _Skip(f"{label} is not channel-wise homogeneous")


def _pad_op(node: ir.Node, index: int, rank: int | None, where: str, label: str) -> _ChainOp:
    if index != 0:
        raise _Skip(f"the chain feeds the pads of {label}")
    if _attr(node, "mode", "constant") != "constant":
        raise _Skip(f"{label} pads in mode {_attr(node, 'mode', '')}, not with zeros")
    if "pads" in node.attributes:  # opset < 11
        pads = [int(p) for p in node.attributes["pads"].value]
        value = float(_attr(node, "value", 0.0))
        axes = None
    else:
        pads = [int(p) for p in _const(node.inputs[1] if len(node.inputs) > 1 else None, f"pads of {label}").reshape(-1)]
        value = 0.0
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            v = _const(node.inputs[2], f"constant_value of {label}")
            value = float(v.reshape(-1)[0]) if v.size else 0.0
        axes = None
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            axes = [int(a) for a in _const(node.inputs[3], f"axes of {label}").reshape(-1)]
    if value != 0.0:
        raise _Skip(f"{label} pads with {value}, not 0")
    n_axes = len(pads) // 2
    full_rank = rank if axes is not None else n_axes
    if full_rank is None:
        raise _Skip(f"rank at {label} is unknown")
    axes = list(range(n_axes)) if axes is None else [a % full_rank for a in axes]
    channel = 1 if where == "first" else full_rank - 1
    for j, axis in enumerate(axes):
        if axis == channel and (pads[j] != 0 or pads[j + n_axes] != 0):
            raise _Skip(f"{label} pads the channel axis")
    shiftable = all(p <= 0 for p in pads)  # cropping only: no unshifted zeros appear
    return _ChainOp(node, "pad", 0, shiftable=shiftable)


# --------------------------------------------------------------------------------------------
# Pairs


@dataclasses.dataclass(eq=False)
class _Pair:
    first: _Layer
    second: _Layer
    chain: list[_ChainOp]
    #: accumulated per-channel scale s (the first layer's output channel i is divided by s_i)
    scale: np.ndarray = None  # type: ignore[assignment]
    shift: np.ndarray = None  # type: ignore[assignment]
    absorb_note: str | None = None
    #: (min, max) per channel of the chain's output over calibration data, before rescaling
    stats: tuple[np.ndarray, np.ndarray] | None = None
    #: lower bound of the accumulated scale per channel (the growth limit), or None
    floor: np.ndarray | None = None

    def __post_init__(self):
        self.scale = np.ones(self.first.out_channels)
        self.shift = np.zeros(self.first.out_channels)

    def equalize_step(self) -> float:
        """One rescaling of this pair; returns max |s − 1| of the step."""
        r1, r2 = self.first.out_ranges(), self.second.in_ranges()
        ok = (r1 > 0) & (r2 > 0) & np.isfinite(r1) & np.isfinite(r2)
        s = np.ones_like(r1)
        s[ok] = np.sqrt(r1[ok] / r2[ok])
        if self.floor is not None:  # the growth limit: S_i ≥ floor_i
            s = np.maximum(self.scale * s, self.floor) / self.scale
        self.first.divide_out(s)
        self.second.multiply_in(s)
        self.scale *= s
        return float(np.max(np.abs(s - 1.0))) if s.size else 0.0

    def limited_channels(self) -> int:
        """Channels whose scale sits on the growth limit."""
        if self.floor is None:
            return 0
        return int(np.count_nonzero(self.scale <= self.floor * (1 + 1e-9)))

    def growth_floor(self, absorbed: bool, growth: float) -> np.ndarray | None:
        """Smallest S_i that keeps channel i's extent within ``growth`` × the activation's range.

        Channel i of the chain's output spans [lo_i, hi_i] (calibration minimum and maximum, else
        the last clamp's bounds); a per-tensor quantizer covers [min(lo, 0), max(hi, 0)], of width
        R. After equalization channel i spans its extent e_i / S_i, with e_i = max(hi_i, 0) −
        min(lo_i, 0), or hi_i − lo_i when bias absorption will move lo_i > 0 to 0; so
        S_i ≥ e_i / (growth · R)."""
        if self.stats is not None:
            lo, hi = self.stats
        else:
            clamps = [op for op in self.chain if op.kind in ("clamp", "relu")]
            if not clamps:
                return None
            lo, hi = clamps[-1].lo, clamps[-1].hi
            for op in self.chain[self.chain.index(clamps[-1]) + 1:]:
                if op.kind == "pad":  # zeros join the range
                    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            return None
        width = float(np.max(np.maximum(hi, 0.0)) - np.min(np.minimum(lo, 0.0)))
        if width <= 0:
            return None
        extent = np.maximum(hi, 0.0) - (np.where(lo > 0, lo, 0.0) if absorbed else np.minimum(lo, 0.0))
        return np.maximum(extent, 0.0) / (growth * width)

    def absorb_blocker(self) -> str | None:
        """Why bias absorption would not be exact here (None: it would be)."""
        if not any(op.kind in ("clamp", "relu") for op in self.chain):
            return "no Relu/Clip between the layers"
        for op in self.chain:
            if not op.shiftable:
                return f"{op.node.op_type} '{op.node.name}' pads with zeros that would not be shifted"
        if self.second.padded:
            return f"{self.second.node.op_type} '{self.second.node.name}' pads its input with zeros"
        if self.second.kind == "matmul" and self.second.bias_add is None:
            return f"MatMul '{self.second.node.name}' has no bias Add to absorb into"
        if self.first.kind == "matmul" and self.first.bias_add is None:
            return f"MatMul '{self.first.node.name}' has no bias Add to shift"
        return None

    def absorb(self, c: np.ndarray) -> None:
        if not np.any(c):
            return
        self.first.shift_out(c)
        self.second.absorb_in(c)
        self.shift = self.shift + c

    @property
    def chain_input(self) -> ir.Value:
        """The tensor the second layer reads (the chain's output)."""
        return self.second.node.inputs[0]

    def rewrite_chain(self, graph: ir.Graph, names: Names) -> bool:
        """Give every clamp of the chain its per-channel bounds lo/s − c, hi/s − c."""
        if np.all(self.scale == 1.0) and not np.any(self.shift):
            return False
        rank, where = self.first.layout
        shape = (-1,) + (1,) * (rank - 2) if where == "first" else (-1,)
        changed = False
        for op in self.chain:
            if op.kind not in ("clamp", "relu"):
                continue
            lo = op.lo / self.scale - self.shift
            hi = op.hi / self.scale - self.shift
            if op.kind == "relu" and not np.any(self.shift):
                continue  # Relu(y/s) = Relu(y)/s
            changed = True
            node = op.node
            x = node.inputs[op.index]
            y = node.outputs[0]
            dtype = x.dtype.numpy() if x.dtype is not None else self.first.dtype
            if node.op_type in ("Max", "Min"):
                bound = lo if node.op_type == "Max" else hi
                k = node.inputs[1 - op.index]
                set_const(graph, node, 1 - op.index, bound.reshape(shape).astype(dtype), names,
                           f"{node.name or k.name}.{'lo' if node.op_type == 'Max' else 'hi'}")
                continue
            new_nodes = []
            current = x
            for op_type, bound, tag in (("Max", lo, "lo"), ("Min", hi, "hi")):
                if np.all(np.isinf(bound)):
                    continue
                const = new_const(graph, names, f"{node.name or y.name}.{tag}", bound.reshape(shape).astype(dtype))
                new = ir.node(op_type, [current, const], name=names.fresh(f"{node.name or y.name}.{op_type.lower()}"))
                out = new.outputs[0]
                out.name = names.fresh(f"{y.name}.{op_type.lower()}")
                out.type, out.shape = y.type, y.shape
                new_nodes.append(new)
                current = out
            if not new_nodes:  # Clip without bounds: an identity
                y.replace_all_uses_with(x)
                graph.remove(node, safe=True)
                continue
            graph.insert_after(node, new_nodes)
            old_name = y.name
            y.replace_all_uses_with(current)
            inputs = [v for v in node.inputs[1:] if v is not None]
            graph.remove(node, safe=True)
            y.name = None
            current.name = old_name  # the chain tensor keeps its name
            for value in inputs:
                drop_if_dead(graph, value)
        return changed


def _find_pairs(graph: ir.Graph, layers: dict[int, "_Layer | str"]) -> tuple[list[_Pair], list[str]]:
    pairs, skipped = [], []
    for node in graph:
        layer = layers.get(id(node))
        if layer is None:
            continue
        label = f"{node.op_type} '{node.name}'"
        if isinstance(layer, str):
            skipped.append(f"{label}: {layer}")
            continue
        try:
            pairs.append(_walk(graph, layer, layers))
        except _Skip as why:
            skipped.append(f"{label} → next layer: {why}")
    return pairs, skipped


def _walk(graph: ir.Graph, first: _Layer, layers: dict[int, "_Layer | str"]) -> _Pair:
    """Follow the first layer's output to the next layer through homogeneous single-use ops."""
    rank, where = first.layout
    channels = first.out_channels
    chain: list[_ChainOp] = []
    value = first.output
    while True:
        if value.is_graph_output():
            raise _Skip(f"'{value.name}' is a graph output")
        uses = value.uses()
        if len(uses) != 1:
            raise _Skip(f"'{value.name}' has {len(uses)} consumers")
        user, index = uses[0]
        if user.graph is not graph:
            raise _Skip(f"'{value.name}' is read inside a subgraph")
        second = layers.get(id(user))
        if second is not None and index == 0:
            if isinstance(second, str):
                raise _Skip(f"{user.op_type} '{user.name}' {second}")
            if second is first:
                raise _Skip("the layer feeds itself")
            _check_second(first, second)
            return _Pair(first, second, chain)
        chain.append(_chain_op(user, index, channels, rank, where))
        if len(user.outputs) < 1:
            raise _Skip(f"{user.op_type} '{user.name}' has no output")
        value = user.outputs[0]


def _check_second(first: _Layer, second: _Layer) -> None:
    label = f"{second.node.op_type} '{second.node.name}'"
    if (first.kind == "conv") != (second.kind == "conv"):
        raise _Skip(f"{label} reads the channels on another axis than {first.node.op_type} writes them")
    if first.kind == "conv" and first.w.ndim != second.w.ndim:
        raise _Skip(f"{label} has a {second.w.ndim - 2}-D kernel, the first layer a {first.w.ndim - 2}-D one")
    if second.in_channels != first.out_channels:
        raise _Skip(f"{label} reads {second.in_channels} channels, not {first.out_channels}")


# --------------------------------------------------------------------------------------------
# Calibration: per-channel minima and maxima of the chains' outputs


def _channel_stats(model: ir.Model, pairs: list[_Pair], samples: int, ctx) -> list[tuple[np.ndarray, np.ndarray]]:
    """(min, max) per channel of the tensor each pair's second layer reads, float64, over at most
    ``samples`` calibration samples (one sweep)."""
    from lowbit.quant.capture import capture

    names = {id(p): p.chain_input.name for p in pairs}
    lows = {id(p): np.full(p.first.out_channels, np.inf) for p in pairs}
    highs = {id(p): np.full(p.first.out_channels, -np.inf) for p in pairs}
    sweep = capture(model, sorted(set(names.values())), ctx.calib, max_samples=samples)
    for batch in ctx.track(sweep, "equalize: channel ranges"):
        for pair in pairs:
            x = batch[names[id(pair)]]
            channel = 1 if pair.first.layout[1] == "first" else x.ndim - 1
            others = tuple(a for a in range(x.ndim) if a != channel)
            lows[id(pair)] = np.minimum(lows[id(pair)], x.min(axis=others).astype(np.float64))
            highs[id(pair)] = np.maximum(highs[id(pair)], x.max(axis=others).astype(np.float64))
        del batch
    out = []
    for pair in pairs:
        lo, hi = lows[id(pair)], highs[id(pair)]
        seen = np.isfinite(lo) & np.isfinite(hi)
        out.append((np.where(seen, lo, 0.0), np.where(seen, hi, 0.0)))
    return out
