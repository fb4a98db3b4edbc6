"""Which activation tensors get QuantizeLinear/DequantizeLinear pairs, and inserting them.

Placement follows onnxruntime's QDQ conventions so its fusions apply: a float tensor is quantized
when it is produced by an op onnxruntime can run quantized (or is a graph input) and every consumer
is such an op — except between a Conv/Gemm/MatMul/Add and the Relu/Clip it feeds, which
onnxruntime fuses into the quantized op (the range is taken after the activation) — so Conv/MatMul/Gemm get a DQ on each activation input and a Q on their output
(→ QLinearConv / QLinearMatMul), and Relu, Clip, pooling, Reshape, Transpose, Concat and friends
sit between Q/DQ pairs that onnxruntime propagates through or fuses away.

A Max or Min with one constant operand is a clamp like Clip (the ``equalize`` pass writes a Clip
with per-channel bounds as Max(·, lo) → Min(·, hi)): it is treated as an activation, so the range
is taken once, after the last clamp, as for a fused Conv+Clip. onnxruntime does not fuse a
per-channel clamp into QLinearConv: such a Conv runs in float between its DQ inputs and the Q
after the clamp, with the same numbers.

Left in float by default, and reported, are the tensors that collapse accuracy when quantized
naively: inputs of Softmax, the internals of LayerNorm/RMSNorm — fused norm ops' inputs and the
decomposed ReduceMean/Pow/Sqrt/Div/Reciprocal chains up to the scale (γ) multiplication — and the
Erf/GELU chain up to its final multiplication.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

#: ops whose float inputs and outputs may carry Q/DQ (onnxruntime runs or propagates them quantized)
QUANTIZED_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Relu", "Clip", "LeakyRelu", "Sigmoid",
    "HardSigmoid", "HardSwish", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Concat",
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize", "Split", "Slice", "Gather",
    "Pad", "DepthToSpace", "SpaceToDepth", "Softmax", "ArgMax",
})
#: producers that onnxruntime fuses with a following Relu/Clip into one quantized op; the tensor
#: between them is never quantized (its pre-activation range would waste the grid, e.g. a
#: depthwise conv's output spanning ±50 ahead of a ReLU6 that keeps [0, 6])
_FUSES_ACTIVATION = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"})
_ACTIVATIONS = frozenset({"Relu", "Clip"})
_NORM_OPS = frozenset({"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
                       "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "GroupNormalization",
                       "InstanceNormalization"})
_CHAIN_OPS = frozenset({"Sub", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Reciprocal", "Mul", "Cast"})
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _is_const(value: ir.Value | None) -> bool:
    if value is None:
        return True
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _is_clamp(node: ir.Node) -> bool:
    """Relu, Clip, or Max/Min of one tensor and one constant (a clamp with per-channel bounds)."""
    if node.op_type in _ACTIVATIONS:
        return True
    return (node.op_type in ("Max", "Min") and len(node.inputs) == 2
            and sum(_is_const(v) for v in node.inputs) == 1)


def _quantizable(node: ir.Node) -> bool:
    return node.op_type in QUANTIZED_OPS or _is_clamp(node)


def sensitive_values(graph: ir.Graph) -> dict[str, str]:
    """Tensors kept in float by default, with the reason for each."""
    keep: dict[str, str] = {}
    for node in graph:
        op = node.op_type
        if op == "Softmax" and node.inputs[0] is not None:
            keep[node.inputs[0].name] = f"input of Softmax '{node.name}'"
        elif op in _NORM_OPS and node.inputs[0] is not None:
            keep[node.inputs[0].name] = f"input of {op} '{node.name}'"
        elif op == "ReduceMean":
            _mark_chain(node, keep, f"inside the normalisation around ReduceMean '{node.name}'", depth=6)
        elif op == "Erf":
            keep[node.inputs[0].name] = f"input of Erf '{node.name}' (GELU)"
            _mark_gelu(node, keep, f"inside the GELU around Erf '{node.name}'")
    return keep


def _mark_gelu(erf: ir.Node, keep: dict[str, str], reason: str) -> None:
    """Erf GELU, x·½·(1 + erf(x/√2)) in any association: mark erf's output and the elementwise
    results after it, up to the GELU's output — the product with x, or the constant factor
    (½) applied after that product — which is left quantizable."""
    value = erf.outputs[0]
    for _ in range(4):
        keep.setdefault(value.name, reason)
        users = list(value.uses())
        if len(users) != 1:
            return
        user, _ = users[0]
        if user.op_type not in ("Add", "Mul", "Div"):
            return
        if user.op_type == "Mul" and not all(_is_const(v) for v in user.inputs if v is not value):
            product = user.outputs[0]  # · x: the result, unless a constant factor follows
            after = list(product.uses())
            if len(after) == 1 and after[0][0].op_type in ("Mul", "Div") and all(
                    _is_const(v) for v in after[0][0].inputs if v is not product):
                keep.setdefault(product.name, reason)
            return
        value = user.outputs[0]


def _mark_chain(start: ir.Node, keep: dict[str, str], reason: str, depth: int) -> None:
    """Mark outputs forward through elementwise ops; stop after a multiplication or addition by a
    constant (γ / β / the GELU's ½), whose output is the pattern's result and may be quantized."""
    frontier = [(start, 0)]
    seen = set()
    while frontier:
        node, level = frontier.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        ends = node is not start and node.op_type in ("Mul", "Add") and any(_is_const(v) for v in node.inputs)
        if ends and node.op_type == "Mul":
            continue
        for out in node.outputs:
            keep.setdefault(out.name, reason)
            if level >= depth:
                continue
            for user, _ in out.uses():
                if user.op_type in _CHAIN_OPS:
                    frontier.append((user, level + 1))


def _ensure_types(graph: ir.Graph) -> None:
    """Give untyped intermediate values their element types by ONNX shape inference (annotating
    the graph in place): exported models often carry no value_info, and placement must know
    which tensors are float. Values inference cannot type stay untyped and are not quantized."""
    if all(out.dtype is not None for node in graph for out in node.outputs):
        return
    from onnx_ir.passes.common import ShapeInferencePass

    ShapeInferencePass(strict_mode=False)(ir.Model(graph, ir_version=13))


def activation_targets(graph: ir.Graph, *, keep_float: dict[str, str] | None = None,
                       skip_nodes: set[str] | frozenset = frozenset()) -> list[ir.Value]:
    """Float activation tensors to quantize, in graph order (see the module docstring)."""
    _ensure_types(graph)
    keep_float = keep_float or {}
    targets, seen = [], set()
    weights = _weight_values(graph)

    def consider(value: ir.Value | None):
        if value is None or value.name in seen or _is_const(value) or value.name in weights:
            return
        seen.add(value.name)
        if value.dtype not in _FLOATS or value.name in keep_float:
            return
        producer = value.producer()
        if producer is not None and (not _quantizable(producer) or producer.name in skip_nodes):
            return
        users = [user for user, _ in value.uses()]
        if not users or any(not _quantizable(u) or u.name in skip_nodes for u in users):
            return
        if producer is not None and producer.op_type in _FUSES_ACTIVATION and all(_is_clamp(u) for u in users):
            return  # quantized after the Relu/Clip instead, as one fused QLinear op
        if producer is not None and producer.op_type in ("Max", "Min") and _is_clamp(producer) \
                and all(u.op_type in ("Max", "Min") and _is_clamp(u) for u in users):
            return  # inside a clamp split into Max → Min: quantized after the last one
        targets.append(value)

    for value in graph.inputs:
        consider(value)
    for node in graph:
        for value in node.inputs:
            consider(value)
        for value in node.outputs:
            consider(value)
    return targets


def _weight_values(graph: ir.Graph) -> set[str]:
    """Values computed from constants alone — e.g. a blocked Conv weight's DequantizeLinear →
    Reshape — which are weights, not activations: quantizing them again would put 8-bit QDQ on a
    weight already quantized."""
    derived: set[str] = set()
    for node in graph:  # topological order
        if node.inputs and all(v is None or _is_const(v) or v.name in derived for v in node.inputs):
            derived.update(v.name for v in node.outputs)
    return derived


def insert_qdq(graph: ir.Graph, value: ir.Value, scale: float, zero_point: int, dtype: np.dtype) -> None:
    """value → QuantizeLinear → DequantizeLinear → every former consumer (graph outputs keep value)."""
    elem = value.dtype.numpy()
    s = ir.tensor(np.array(scale, dtype=elem), name=f"{value.name}.scale")
    z = ir.tensor(np.array(zero_point, dtype=dtype), name=f"{value.name}.zero_point")
    scale_value = ir.Value(name=_fresh(graph, f"{value.name}.scale"), const_value=s, shape=ir.Shape([]), type=ir.TensorType(s.dtype))
    zp_value = ir.Value(name=_fresh(graph, f"{value.name}.zero_point"), const_value=z, shape=ir.Shape([]), type=ir.TensorType(z.dtype))
    graph.register_initializer(scale_value)
    graph.register_initializer(zp_value)
    users = list(value.uses())
    q = ir.node("QuantizeLinear", [value, scale_value, zp_value], name=_fresh_node(graph, f"{value.name}.q"))
    dq = ir.node("DequantizeLinear", [q.outputs[0], scale_value, zp_value], name=_fresh_node(graph, f"{value.name}.dq"))
    q.outputs[0].name = f"{value.name}.quantized"
    q.outputs[0].dtype, q.outputs[0].shape = z.dtype, value.shape
    dq.outputs[0].name = f"{value.name}.qdq"
    dq.outputs[0].dtype, dq.outputs[0].shape = value.dtype, value.shape
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, [q, dq])
    else:
        first = next(iter(graph), None)
        graph.insert_before(first, [q, dq]) if first is not None else graph.extend([q, dq])
    for user, index in users:
        user.replace_input_with(index, dq.outputs[0])


def _fresh(graph: ir.Graph, base: str) -> str:
    name, i = base, 1
    while name in graph.initializers:
        name, i = f"{base}.{i}", i + 1
    return name


def _fresh_node(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base.N``: node names must be unique (weight DQs are named after their node,
    and exporters often name a node's output after the node)."""
    names = {node.name for node in graph}
    name, i = base, 1
    while name in names:
        name, i = f"{base}.{i}", i + 1
    return name
