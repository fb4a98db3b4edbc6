"""The layers low-rank decomposition can split, their costs, and the graph rewrites that split them.

Layout and cost of each split (P_in / P_out: input / output positions of one sample, i.e. the
product of the spatial dimensions — or of the leading dimensions for MatMul/Gemm; the batch is 1):

===================  ==========================================  ==================================
layer                 replaced by                                 MACs after
===================  ==========================================  ==================================
Conv N×C×k…, g=1      Conv 1×1 (C→R_in) → Conv k… (R_in→R_out,    P_in·C·R_in + P_out·R_in·R_out·∏k
(∏k > 1, Tucker-2)    original strides/pads/dilations)            + P_out·R_out·N
                      → Conv 1×1 (R_out→N, original bias)
Conv N×C×1…, g=1      Conv 1×1 (C→R, original strides/pads)       P_out·R·(C + N)
(truncated SVD)       → Conv 1×1 (R→N, original bias)
Gemm / MatMul         x·W₁ (K→R) → ·W₂ (R→N) (+ original bias)    P·R·(K + N)
===================  ==========================================  ==================================

Kernel form K̂ = core ×₀ U_out ×₁ U_in: the first 1×1 Conv holds U_inᵀ [R_in, C, 1…], the core
Conv the core [R_out, R_in, k…], the last 1×1 Conv U_out [N, R_out, 1…]. Zero padding commutes
with the bias-free first 1×1 Conv, so it stays on the core. For a linear layer W [K, N] in
x·W layout (Gemm: α·B, transposed when transB=1; its C times β is the bias), W ≈ W₁·W₂.

The original node becomes the *last* factor (its name, output value and bias are kept, so graph
outputs and downstream users are untouched); the new factors are inserted before it and named
``<node>/tucker_in``, ``<node>/tucker_core`` or ``<node>/lowrank_in``. A MatMul whose output feeds
only an Add with a constant vector counts that vector as its bias (the refit rewrites it).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from lowbit.passes.edit import Names, attribute, const_array, new_const, set_const


class Skip(Exception):
    """Why a layer is not decomposed (one short phrase)."""


@dataclasses.dataclass(eq=False)
class Layer:
    """One Conv / Gemm / MatMul with a constant float weight, read into float64."""

    node: ir.Node
    op: str
    #: Conv: kernel [N, C, k…]; Gemm / MatMul: W [K, N] with y = x·W
    w: np.ndarray
    dtype: np.dtype
    bias: np.ndarray | None = None  # [N]
    #: MatMul only: the Add that adds the constant bias, and which of its inputs the bias is
    bias_add: ir.Node | None = None
    bias_index: int = 1
    in_positions: int = 1
    out_positions: int = 1

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def is_conv(self) -> bool:
        return self.op == "Conv"

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.w.shape[2:]) if self.is_conv else ()

    @property
    def spatial(self) -> bool:
        """A Conv with a kernel larger than 1 (Tucker-2); otherwise a matrix (SVD)."""
        return math.prod(self.kernel) > 1

    @property
    def in_features(self) -> int:
        return self.w.shape[1] if self.is_conv else self.w.shape[0]

    @property
    def out_features(self) -> int:
        return self.w.shape[0] if self.is_conv else self.w.shape[1]

    def matrix(self) -> np.ndarray:
        """The weight as a [K, N] matrix in x·W layout (1×1 Conv and linear layers only)."""
        return self.w.reshape(self.w.shape[0], self.w.shape[1]).T if self.is_conv else self.w

    def dense(self, approx: np.ndarray) -> np.ndarray:
        """An approximation of ``w`` (same layout: a kernel for Conv, [K, N] otherwise) in the
        node's own weight layout and element type: Gemm's B undoes α and transB."""
        if self.is_conv:
            out = approx.reshape(self.w.shape)
        elif self.op == "Gemm":
            out = approx / float(attribute(self.node, "alpha", 1.0))
            out = out.T if int(attribute(self.node, "transB", 0)) else out
        else:
            out = approx
        return np.ascontiguousarray(out, dtype=self.dtype)

    def macs(self) -> int:
        return self.out_positions * self.out_features * self.in_features * math.prod(self.kernel)

    def params(self) -> int:
        return self.w.size

    def full_ranks(self) -> tuple[int, ...]:
        """The largest useful ranks: (N, C) for Tucker-2, (min(K, N),) for SVD."""
        if self.spatial:
            return (self.out_features, self.in_features)
        return (min(self.in_features, self.out_features),)

    def cost(self, ranks: tuple[int, ...]) -> tuple[int, int]:
        """(MACs, parameters) of the decomposed layer at ``ranks`` (bias not counted)."""
        n, c = self.out_features, self.in_features
        if self.spatial:
            r_out, r_in = ranks
            k = math.prod(self.kernel)
            macs = self.in_positions * c * r_in + self.out_positions * (r_in * r_out * k + r_out * n)
            return macs, c * r_in + r_in * r_out * k + r_out * n
        (r,) = ranks
        return self.out_positions * r * (c + n), r * (c + n)

    def pays(self, ranks: tuple[int, ...]) -> str | None:
        """None when both MACs and parameters fall at ``ranks``, else why not."""
        macs, params = self.cost(ranks)
        if macs >= self.macs():
            return f"ranks {list(ranks)} would not lower its MACs ({macs} ≥ {self.macs()})"
        if params >= self.params():
            return f"ranks {list(ranks)} would not lower its parameters ({params} ≥ {self.params()})"
        return None


# --------------------------------------------------------------------------------------------
# Reading


def _float_weight(value: ir.Value | None, what: str) -> np.ndarray:
    array = const_array(value)
    if array is None:
        raise Skip(f"its {what} is not a constant")
    if not np.issubdtype(array.dtype, np.floating):
        raise Skip(f"its {what} has element type {array.dtype}, not floating point")
    if not np.all(np.isfinite(array)):
        raise Skip(f"its {what} holds NaN or Inf")
    return array


def _positions(value: ir.Value | None, shapes: dict[str, tuple[int, ...]], lead: int) -> int:
    """Product of a value's dimensions after the first ``lead`` ones (batch, channels)."""
    shape = shapes.get(value.name) if value is not None else None
    if shape is None:
        raise Skip(f"the shape of '{value.name if value is not None else '?'}' is unknown")
    return math.prod(shape[lead:]) if lead else math.prod(shape)


def read_layer(node: ir.Node, shapes: dict[str, tuple[int, ...]]) -> Layer:
    """The ``Layer`` of a Conv / Gemm / MatMul node, or ``Skip`` saying why it is not one."""
    reader = {"Conv": _read_conv, "Gemm": _read_gemm, "MatMul": _read_matmul}.get(node.op_type)
    if reader is None or node.domain not in ("", "ai.onnx"):
        raise Skip(f"{node.op_type} is not decomposed")
    if not node.inputs or node.inputs[0] is None:
        raise Skip("it has no data input")
    return reader(node, shapes)


def _read_conv(node: ir.Node, shapes) -> Layer:
    if len(node.inputs) < 2:
        raise Skip("it has no weight")
    w = _float_weight(node.inputs[1], "weight")
    groups = int(attribute(node, "group", 1))
    if groups != 1:
        kind = "depthwise" if groups == w.shape[0] and w.shape[1] == 1 else "grouped"
        raise Skip(f"{kind} convolution (group={groups}); only group=1 is decomposed")
    layer = Layer(node, "Conv", w.astype(np.float64), w.dtype,
                  in_positions=_positions(node.inputs[0], shapes, 2),
                  out_positions=_positions(node.outputs[0], shapes, 2))
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        layer.bias = _float_weight(node.inputs[2], "bias").astype(np.float64).reshape(-1)
    return layer


def _read_gemm(node: ir.Node, shapes) -> Layer:
    if int(attribute(node, "transA", 0)):
        raise Skip("Gemm with transA=1 is not decomposed")
    b = _float_weight(node.inputs[1], "weight (B)")
    if b.ndim != 2:
        raise Skip(f"its weight has rank {b.ndim}")
    w = b.astype(np.float64) * float(attribute(node, "alpha", 1.0))
    if int(attribute(node, "transB", 0)):
        w = w.T
    layer = Layer(node, "Gemm", w, b.dtype, in_positions=_positions(node.inputs[0], shapes, 0) // w.shape[0],
                  out_positions=_positions(node.outputs[0], shapes, 0) // w.shape[1])
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = _float_weight(node.inputs[2], "bias (C)")
        if c.size not in (1, w.shape[1]) or c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
            raise Skip(f"its C of shape {list(c.shape)} is not a bias vector")
        beta = float(attribute(node, "beta", 1.0))
        layer.bias = np.broadcast_to(beta * c.astype(np.float64).reshape(-1), (w.shape[1],)).copy()
    return layer


def _read_matmul(node: ir.Node, shapes) -> Layer:
    if const_array(node.inputs[0]) is not None:
        raise Skip("MatMul with a constant left operand is not decomposed")
    w = _float_weight(node.inputs[1], "weight (second input)")
    if w.ndim != 2:
        raise Skip(f"its weight has rank {w.ndim}, not 2")
    layer = Layer(node, "MatMul", w.astype(np.float64), w.dtype,
                  in_positions=_positions(node.inputs[0], shapes, 0) // w.shape[0],
                  out_positions=_positions(node.outputs[0], shapes, 0) // w.shape[1])
    y = node.outputs[0]
    users = [u for u, _ in y.uses()]
    if len(users) == 1 and not y.is_graph_output() and users[0].op_type == "Add" and users[0].domain in ("", "ai.onnx"):
        add = users[0]
        index = 1 if add.inputs[0] is y else 0
        k = const_array(add.inputs[index])
        if k is not None and np.issubdtype(k.dtype, np.floating) and k.size in (1, w.shape[1]) \
                and (k.ndim <= 1 or all(d == 1 for d in k.shape[:-1])) and len({u for u, _ in add.inputs[index].uses()}) == 1:
            layer.bias_add, layer.bias_index = add, index
            layer.bias = np.broadcast_to(k.astype(np.float64).reshape(-1), (w.shape[1],)).copy()
    return layer


# --------------------------------------------------------------------------------------------
# Rewriting


def _make_last_factor(node: ir.Node) -> None:
    """Turn a Conv into a plain 1×1 Conv (stride 1, no padding) in place."""
    for name in ("strides", "pads", "dilations", "auto_pad", "kernel_shape", "group"):
        node.attributes.pop(name, None)


def _insert(graph: ir.Graph, before: ir.Node, names: Names, op: str, inputs, attrs: dict, label: str,
            before_dtype: np.dtype) -> ir.Value:
    new = ir.node(op, inputs, attributes=attrs, name=names.fresh(f"{before.name}/{label}"))
    new.outputs[0].name = names.fresh(f"{before.name}/{label}_out")
    new.outputs[0].dtype = ir.DataType.from_numpy(before_dtype)
    graph.insert_before(before, new)
    return new.outputs[0]


def write_tucker(graph: ir.Graph, layer: Layer, core: np.ndarray, u_out: np.ndarray, u_in: np.ndarray,
                 names: Names) -> ir.Value:
    """Split a Conv into 1×1 → core → 1×1 (see the module table); returns the core's output."""
    node, dt = layer.node, layer.dtype
    nd = len(layer.kernel)
    ones = (1,) * nd
    x = node.inputs[0]
    w_in = new_const(graph, names, f"{node.name}/tucker_in.weight", u_in.T.reshape(u_in.shape[1], -1, *ones).astype(dt))
    first = _insert(graph, node, names, "Conv", [x, w_in], {}, "tucker_in", dt)
    core_w = new_const(graph, names, f"{node.name}/tucker_core.weight", core.astype(dt))
    attrs = {k: node.attributes[k].value for k in ("strides", "pads", "dilations", "auto_pad") if k in node.attributes}
    middle = _insert(graph, node, names, "Conv", [first, core_w], attrs, "tucker_core", dt)
    _make_last_factor(node)
    node.replace_input_with(0, middle)
    set_const(graph, node, 1, u_out.reshape(u_out.shape[0], -1, *ones).astype(dt), names, f"{node.name}/tucker_out.weight")
    return middle


def write_lowrank(graph: ir.Graph, layer: Layer, first: np.ndarray, second: np.ndarray, names: Names) -> ir.Value:
    """Split a 1×1 Conv, Gemm or MatMul into x·W₁ → ·W₂; returns the first factor's output."""
    node, dt = layer.node, layer.dtype
    x = node.inputs[0]
    w1 = new_const(graph, names, f"{node.name}/lowrank_in.weight", _first_layout(layer, first))
    normalize_gemm_bias(graph, layer, names)
    if layer.is_conv:
        attrs = {k: node.attributes[k].value for k in ("strides", "pads", "auto_pad") if k in node.attributes}
        middle = _insert(graph, node, names, "Conv", [x, w1], attrs, "lowrank_in", dt)
        _make_last_factor(node)
        w2 = second.T.reshape(second.shape[1], second.shape[0], *(1,) * len(layer.kernel))
    elif layer.op == "Gemm":
        middle = _insert(graph, node, names, "Gemm", [x, w1], {}, "lowrank_in", dt)
        for name in ("alpha", "transA", "transB"):
            node.attributes.pop(name, None)
        w2 = second
    else:
        middle = _insert(graph, node, names, "MatMul", [x, w1], {}, "lowrank_in", dt)
        w2 = second
    node.replace_input_with(0, middle)
    set_const(graph, node, 1, w2.astype(dt), names, f"{node.name}/lowrank_out.weight")
    return middle


def _first_layout(layer: Layer, first: np.ndarray) -> np.ndarray:
    """W₁ [K, R] in the first factor's stored layout (a 1×1 kernel [R, C, 1…] for a Conv)."""
    if layer.is_conv:
        first = first.T.reshape(first.shape[1], first.shape[0], *(1,) * len(layer.kernel))
    return first.astype(layer.dtype)


def write_first(graph: ir.Graph, layer: Layer, middle: ir.Value, first: np.ndarray, names: Names) -> None:
    """Replace the first factor's weight (the producer of ``middle``) by ``first`` [K, R]."""
    set_const(graph, middle.producer(), 1, _first_layout(layer, first), names, f"{layer.node.name}/lowrank_in.weight")


def write_last(graph: ir.Graph, layer: Layer, b: np.ndarray, bias: np.ndarray | None, names: Names) -> None:
    """Replace the last factor's weight by ``b`` [R, N] (x·W layout) and its bias by ``bias``."""
    node, dt = layer.node, layer.dtype
    if layer.is_conv:
        set_const(graph, node, 1, b.T.reshape(b.shape[1], b.shape[0], *(1,) * len(layer.kernel)).astype(dt), names,
                  f"{node.name}/out.weight")
    else:
        set_const(graph, node, 1, b.astype(dt), names, f"{node.name}/out.weight")
    if bias is None:
        return
    if layer.op == "MatMul":
        add = layer.bias_add
        old = const_array(add.inputs[layer.bias_index])
        set_const(graph, add, layer.bias_index, bias.reshape(old.shape).astype(dt), names, f"{node.name}.bias")
    else:  # Conv, or a Gemm whose bias normalize_gemm_bias made a plain [N] vector with beta=1
        set_const(graph, node, 2, bias.astype(dt), names, f"{node.name}.bias")


def normalize_gemm_bias(graph: ir.Graph, layer: Layer, names: Names) -> None:
    """Store a Gemm's β·C as a plain [N] bias with beta=1, so the last factor adds it as is."""
    if layer.op == "Gemm" and layer.bias is not None:
        layer.node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        set_const(graph, layer.node, 2, layer.bias.astype(layer.dtype), names, f"{layer.node.name}.bias")

