"""Model statistics: shapes, multiply-accumulates, parameters, bytes, and how each weight is stored.

Everything here reads an ``onnx_ir`` model and never changes it: shape inference runs on a clone.

Shapes (``infer_shapes``)
    Symbolic dimensions of the graph inputs are fixed first: a symbol that is the first axis of
    any input (or an unnamed first axis) is the *batch* and becomes ``batch`` (default 1); every
    other symbolic or unnamed dimension becomes ``dim`` when it is given, else — as in
    ``core.calib`` — 224 for an image's height and width (a float input of rank 4 whose spatial
    dims are symbolic) and 16 for anything else (e.g. a sequence length). A symbol keeps one value
    everywhere it appears. These sizes are guesses: ``model.meta["lowbit.assumed_dims"]`` of the
    result lists them (symbol → size) and ``["lowbit.input_shapes"]`` the input shapes used, so
    reports can say so; pin real sizes on the model first (``core.calib.apply_input_shapes``,
    ``--input-shape``). Intermediate shapes are then recomputed by ONNX
    shape inference (``onnx_ir``'s ``ShapeInferencePass``, non-strict, with data propagation);
    the exporter's annotations are dropped first so stale ones cannot survive a rewrite. Values
    ONNX cannot infer (contrib / lowbit ops, data-dependent shapes) are asked of onnxruntime: the
    clone, with those values exposed as graph outputs, is opened without graph optimisation;
    the shapes onnxruntime infers while loading are used when all are static, otherwise the model
    runs once on seeded random inputs (``core.calib.random_feed``) and the shapes are read off the
    results. If even that fails (e.g. an op with no kernel, or input sizes the model cannot run
    at), the exporter's annotation is kept with its symbols replaced, and onnxruntime's reason
    goes to ``model.meta["lowbit.shape_error"]``. ``model.meta["lowbit.shape_source"]`` of the
    result says which sources were used.

Multiply-accumulates (``node_macs``), with ``prod`` the product of a shape's entries
    Conv / ConvInteger / QLinearConv / FusedConv / lowbit ``Conv*``:
        MACs = prod(Y.shape) · (C/g) · prod(kernel)      Y = [N, M, *out], C input channels,
        g = ``group`` (depthwise: C/g = 1), kernel = W.shape[2:] or the ``kernel_shape`` attribute.
    ConvTranspose:  MACs = prod(X.shape) · (M/g) · prod(kernel)     W = [C, M/g, *kernel]
        (every input element is scattered onto M/g · prod(kernel) outputs).
    Gemm:           MACs = M · K · N   (A = [M, K] or [K, M] with transA, B likewise).
    MatMul / MatMulInteger / QLinearMatMul / FusedMatMul (batched, broadcasting, 1-D operands
        promoted as numpy does):  MACs = prod(broadcast(A.batch, B.batch)) · M · K · N.
    com.microsoft MatMulNBits, lowbit ``MatMul*`` (attributes K and N):
        MACs = prod(A.shape[:-1]) · K · N.
    Einsum with ≥ 2 operands: MACs = prod(Y.shape) · prod(sizes of the summed-out letters)
        (exact for two operands; a lower bound for a contraction of three or more).
    Every other op: 0 (elementwise work, pooling and normalisation are not counted).
    A counted op whose shapes stay unknown counts nothing, so the total is then a lower bound:
    ``ModelStats.macs_complete`` is False, ``unknown_macs`` names those nodes, and ``format_stats``
    prints the total as "≥ … MACs (INCOMPLETE …)".

Parameters and bytes (``model_stats``)
    ``params`` counts *every* element of every initializer and ``Constant`` tensor, in all graphs
    (shape constants included — they are a handful of elements). It counts stored elements, so a
    weight packed into uint8 blobs (MatMulNBits) counts its bytes, not its logical elements; the
    per-layer tables give logical weight sizes instead. ``bytes_by_dtype`` uses the packed size
    ceil(elements · bits / 8): int4 is half a byte per element, int2 a quarter.

Weight storage (``weight_status``), one entry per weight-bearing node (Conv, ConvTranspose, Gemm,
MatMul, Einsum, Gather of an embedding table, their integer / contrib / lowbit forms) whose weight
is a constant, possibly reached through Transpose / Reshape / Cast / Identity / (Un)Squeeze /
Flatten:
    ``float``                       a float initializer;
    ``qdq int4 block=32``           DequantizeLinear of a low-bit initializer (``block=`` when
                                    blocked, ``per-channel`` when the scale has several entries);
    ``fakequant int8``              DequantizeLinear(QuantizeLinear(float initializer));
    ``matmulnbits bits=4 block=32`` com.microsoft MatMulNBits;
    ``lowbit MatMulLowBit bits=2``  lowbit's own ops (``bits`` / ``block_size`` attributes);
    ``codebook k=16``               Gather(constant table of k entries, constant indices), or a
                                    lowbit op with a codebook;
    ``int8``                        a raw integer weight (MatMulInteger, ConvInteger, QLinear*).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from lowbit.analysis.report_format import format_table, human_bytes, human_count, jsonable
from lowbit.passes.edit import attribute

__all__ = [
    "infer_shapes",
    "node_macs",
    "model_stats",
    "weight_status",
    "ModelStats",
    "format_stats",
    "format_table",
    "packed_tensor_bytes",
    "packed_nbytes",
    "dtype_name",
]

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 1
#: size of a symbolic sequence-like dimension (images get ``core.calib.DEFAULT_IMAGE``)
DEFAULT_DIM = 16
_SHAPE_SOURCE = "lowbit.shape_source"
_SHAPE_ERROR = "lowbit.shape_error"
_ASSUMED = "lowbit.assumed_dims"
_INPUT_SHAPES = "lowbit.input_shapes"

# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


def _static(shape) -> tuple[int, ...] | None:
    """The shape as a tuple of ints, or None when unknown or partly symbolic."""
    if shape is None:
        return None
    dims = []
    for d in shape:
        if not isinstance(d, int) or d < 0:
            return None
        dims.append(int(d))
    return tuple(dims)


def _input_specs(graph: ir.Graph) -> list:
    """``core.calib.InputSpec`` of every tensor graph input that is not an initializer."""
    from lowbit.core.calib import InputSpec

    specs = []
    for value in graph.inputs:
        if value.name in graph.initializers or value.shape is None:
            continue
        try:
            dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.float32)
        except (TypeError, ValueError, AttributeError):
            dtype = np.dtype(np.float32)
        shape = tuple(d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None)
                      for d in value.shape)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def _resolve_inputs(graph: ir.Graph, batch: int,
                    dim: int | None) -> tuple[dict[str, int], dict[str, tuple], dict[str, int]]:
    """(symbol → value, input name → concrete shape, guessed dim label → value) for the graph
    inputs, sized as the module docstring says."""
    from lowbit.core.calib import concrete_shape, symbol_sizes

    specs = _input_specs(graph)
    symbols = symbol_sizes(specs, batch, seq=dim, image=dim)
    shapes, assumed = {}, {}
    for spec in specs:
        shapes[spec.name] = concrete_shape(spec, symbols, batch, seq=dim, image=dim)
        for axis, d in enumerate(spec.shape):
            if not isinstance(d, int):
                assumed[d or f"{spec.name}[{axis}]"] = shapes[spec.name][axis]
    return symbols, shapes, assumed


def _substitute(shape: ir.Shape, symbols: Mapping[str, int]) -> ir.Shape | None:
    """``shape`` with symbols replaced, or None when a dimension is still unknown."""
    dims = []
    for d in shape:
        if isinstance(d, int):
            dims.append(d)
        elif isinstance(d, ir.SymbolicDim) and d.value in symbols:
            dims.append(symbols[d.value])
        else:
            return None
    return ir.Shape(dims)


def _missing_values(graph: ir.Graph) -> list[ir.Value]:
    missing = []
    for node in graph:
        for value in node.outputs:
            if value.name and _static(value.shape) is None:
                missing.append(value)
    return missing


def infer_shapes(model: ir.Model, *, batch: int = DEFAULT_BATCH, dim: int | None = None,
                 use_onnxruntime: bool = True, seed: int = 0) -> ir.Model:
    """A clone of ``model`` with static shapes on its values (see the module docstring).

    ``batch`` replaces the batch dimension of the inputs, ``dim`` every other symbolic one (None:
    224 for an image's height and width, 16 for the rest).
    ``use_onnxruntime=False`` skips the onnxruntime fallback. Tensors are shared with ``model``
    (``ir.Model.clone``), so the result must be treated as read-only where tensors are concerned.
    """
    from onnx_ir.passes.common import ShapeInferencePass

    from lowbit.core.errors import UserError

    if batch < 1 or (dim is not None and dim < 1):
        raise UserError(f"the batch size and default dimension must be positive integers, not {batch} and {dim}")
    clone = model.clone()
    graph = clone.graph
    symbols, input_shapes, assumed = _resolve_inputs(graph, batch, dim)
    original: dict[str, ir.Shape] = {}
    for value in graph.inputs:
        if value.name in input_shapes:
            value.shape = ir.Shape(input_shapes[value.name])
    # Drop intermediate and output annotations so ONNX recomputes them from the fixed inputs.
    for node in graph:
        for value in node.outputs:
            if value.shape is not None:
                original[value.name] = value.shape
                value.shape = None
    sources = []
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(clone)
    missing = _missing_values(graph)
    sources.append("onnx")
    error = None
    if missing and use_onnxruntime:
        found, error = _shapes_from_onnxruntime(clone, missing, batch, seed)
        if found:
            sources.append("onnxruntime")
        missing = _missing_values(graph)
    if missing:
        kept = 0
        for value in missing:
            if value.name in original:
                shape = _substitute(original[value.name], symbols)
                if shape is not None:
                    value.shape = shape
                    kept += 1
        if kept:
            sources.append("annotations")
        still = [v.name for v in _missing_values(graph)]
        if still:
            logger.info("shapes unknown for %d values, e.g. %s", len(still), still[:3])
    clone.meta[_SHAPE_SOURCE] = "+".join(sources)
    clone.meta[_ASSUMED] = assumed
    clone.meta[_INPUT_SHAPES] = {name: list(shape) for name, shape in input_shapes.items()}
    if error is not None and _missing_values(graph):
        clone.meta[_SHAPE_ERROR] = error
    return clone


def _shapes_from_onnxruntime(model: ir.Model, missing: list[ir.Value], batch: int,
                             seed: int) -> tuple[bool, str | None]:
    """Fill the shapes of ``missing`` (values of ``model``, whose inputs are static) from
    onnxruntime; (True if any were set, onnxruntime's reason when it failed)."""
    from lowbit.core.calib import input_specs, random_feed
    from lowbit.runtime.session import session

    probe = model.clone()
    by_name = {v.name: v for node in probe.graph for v in node.outputs if v.name}
    present = {v.name for v in probe.graph.outputs}
    wanted = [v.name for v in missing if v.name in by_name]
    for name in wanted:
        if name not in present:
            probe.graph.outputs.append(by_name[name])
    try:
        sess = session(probe, threads=1, optimization="disable")
        meta = {o.name: o.shape for o in sess.get_outputs()}
        # onnxruntime declares [] for the outputs of custom ops it cannot infer (lowbit's, contrib
        # ones), the same as for a scalar: an empty shape is asked of a run instead
        shapes = {name: _static(meta.get(name)) or None for name in wanted}
        if any(s is None for s in shapes.values()):
            specs = input_specs(model)
            feed = random_feed(specs, batch, np.random.default_rng(seed))
            results = sess.run(wanted, feed)
            shapes = {name: tuple(np.shape(r)) for name, r in zip(wanted, results)}
            dtypes = {name: np.asarray(r).dtype for name, r in zip(wanted, results)}
        else:
            dtypes = {}
    except Exception as exc:  # noqa: BLE001 - any failure leaves the shapes unknown
        from lowbit.passes.manager import ort_reason

        reason = ort_reason(exc)
        logger.info("onnxruntime could not provide shapes: %s", reason)
        return False, reason
    targets = {v.name: v for v in missing}
    changed = False
    for name, shape in shapes.items():
        if shape is not None and name in targets:
            targets[name].shape = ir.Shape(shape)
            if targets[name].dtype is None and name in dtypes:
                try:
                    targets[name].dtype = ir.DataType.from_numpy(dtypes[name])
                except TypeError:
                    pass
            changed = True
    return changed, None


# ---------------------------------------------------------------------------------------------
# MACs
# ---------------------------------------------------------------------------------------------

_CONV_OPS = {("", "Conv"): (0, 1), ("", "ConvInteger"): (0, 1), ("", "QLinearConv"): (0, 3),
             ("com.microsoft", "FusedConv"): (0, 1), ("com.microsoft", "NhwcConv"): (0, 1)}
_MATMUL_OPS = {("", "MatMul"): (0, 1), ("", "MatMulInteger"): (0, 1), ("", "QLinearMatMul"): (0, 3),
               ("com.microsoft", "FusedMatMul"): (0, 1)}
_NBITS_OPS = {("com.microsoft", "MatMulNBits")}


def is_lowbit_domain(domain: str) -> bool:
    return domain == "lowbit" or domain.startswith("lowbit.") or domain.endswith(".lowbit")


def _prod(dims) -> int:
    return int(math.prod(int(d) for d in dims))


def _shape_of(value: ir.Value | None, shapes: Mapping[str, Any] | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    if shapes is not None and value.name in shapes:
        got = _static(shapes[value.name])
        if got is not None:
            return got
    got = _static(value.shape)
    if got is None and value.const_value is not None:
        got = _static(value.const_value.shape)
    return got


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _conv_macs(node, x_i, w_i, shapes, *, packed_weight=False) -> int | None:
    y = _shape_of(node.outputs[0], shapes)
    w = None if packed_weight else _shape_of(_input(node, w_i), shapes)
    group = int(attribute(node, "group", 1))
    if y is None or len(y) < 2:
        return None
    if w is not None and len(w) == len(y):
        per_out = _prod(w[1:])  # (C/g) · prod(kernel)
    else:
        x = _shape_of(_input(node, x_i), shapes)
        kernel = attribute(node, "kernel_shape")
        if x is None or kernel is None:
            return None
        per_out = (x[1] // group) * _prod(kernel)
    return _prod(y) * per_out


def _conv_transpose_macs(node, shapes) -> int | None:
    x = _shape_of(_input(node, 0), shapes)
    w = _shape_of(_input(node, 1), shapes)
    if x is None or w is None:
        return None
    return _prod(x) * _prod(w[1:])  # prod(X) · (M/g) · prod(kernel)


def _gemm_macs(node, shapes) -> int | None:
    a = _shape_of(_input(node, 0), shapes)
    b = _shape_of(_input(node, 1), shapes)
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    m, k = (a[1], a[0]) if attribute(node, "transA", 0) else a
    n = b[0] if attribute(node, "transB", 0) else b[1]
    return m * k * n


def _matmul_macs(node, a_i, b_i, shapes) -> int | None:
    a = _shape_of(_input(node, a_i), shapes)
    b = _shape_of(_input(node, b_i), shapes)
    if a is None or b is None or not a or not b:
        y = _shape_of(node.outputs[0], shapes)
        if y is None or a is None or not a:
            return None
        return _prod(y) * a[-1]
    if node.op_type == "FusedMatMul":
        if attribute(node, "transA", 0) and len(a) >= 2:
            a = (*a[:-2], a[-1], a[-2])
        if attribute(node, "transB", 0) and len(b) >= 2:
            b = (*b[:-2], b[-1], b[-2])
    a2 = (1, *a) if len(a) == 1 else a
    b2 = (*b, 1) if len(b) == 1 else b
    try:
        batch = np.broadcast_shapes(tuple(a2[:-2]), tuple(b2[:-2]))
    except ValueError:
        return None
    return _prod(batch) * a2[-2] * a2[-1] * b2[-1]


def _nbits_macs(node, shapes) -> int | None:
    k, n = attribute(node, "K"), attribute(node, "N")
    if k is None or n is None:
        return None
    a = _shape_of(_input(node, 0), shapes)
    if a is not None and a:
        return _prod(a[:-1]) * int(k) * int(n)
    y = _shape_of(node.outputs[0], shapes)
    return None if y is None or not y else _prod(y[:-1]) * int(k) * int(n)


def _einsum_terms(equation: str, ranks: list[int]) -> tuple[list[str], str] | None:
    equation = equation.replace(" ", "")
    lhs, _, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        return None
    if "->" not in equation:
        counts = Counter(c for t in terms for c in t if c.isalpha())
        rhs = ("..." if "..." in lhs else "") + "".join(sorted(c for c, k in counts.items() if k == 1))
    return terms, rhs


def _einsum_macs(node, shapes) -> int | None:
    if len(node.inputs) < 2:
        return 0
    inputs = [_shape_of(v, shapes) for v in node.inputs]
    y = _shape_of(node.outputs[0], shapes)
    if any(s is None for s in inputs) or y is None:
        return None
    parsed = _einsum_terms(str(attribute(node, "equation", "")), [len(s) for s in inputs])
    if parsed is None:
        return None
    terms, rhs = parsed
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, inputs):
        head, ell, tail = term.partition("...")
        letters = list(zip(head, shape[: len(head)]))
        if ell:
            letters += list(zip(tail, shape[len(shape) - len(tail):])) if tail else []
        for letter, size in letters:
            sizes[letter] = max(sizes.get(letter, 1), int(size))
    summed = [c for c in sizes if c not in rhs]
    return _prod(y) * _prod(sizes[c] for c in summed)


def node_macs(node: ir.Node, shapes: Mapping[str, Any] | None = None) -> int | None:
    """Multiply-accumulates of one node (formulae in the module docstring).

    ``shapes`` maps value names to shapes; values not in it use their own ``shape`` (so after
    ``infer_shapes`` it may be omitted). Returns 0 for ops that are not counted, and ``None`` for a
    counted op whose shapes are unknown.
    """
    key = (node.domain, node.op_type)
    if key in _CONV_OPS:
        return _conv_macs(node, *_CONV_OPS[key], shapes)
    if key == ("", "ConvTranspose"):
        return _conv_transpose_macs(node, shapes)
    if key == ("", "Gemm"):
        return _gemm_macs(node, shapes)
    if key in _MATMUL_OPS:
        return _matmul_macs(node, *_MATMUL_OPS[key], shapes)
    if key in _NBITS_OPS:
        return _nbits_macs(node, shapes)
    if key == ("", "Einsum"):
        return _einsum_macs(node, shapes)
    if is_lowbit_domain(node.domain):
        if node.op_type.startswith("MatMul") or node.op_type.startswith("Gemm"):
            return _nbits_macs(node, shapes)
        if node.op_type.startswith("Conv"):
            return _conv_macs(node, 0, 1, shapes, packed_weight=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

#: ops a weight may pass through unchanged in meaning on its way from storage to use
_TRANSPORT = {"Transpose", "Reshape", "Cast", "CastLike", "Identity", "Squeeze", "Unsqueeze", "Flatten"}
#: (domain, op) → index of the weight input
_WEIGHT_INPUT = {
    ("", "Conv"): 1, ("", "ConvTranspose"): 1, ("", "Gemm"): 1, ("", "MatMul"): 1,
    ("", "ConvInteger"): 1, ("", "MatMulInteger"): 1, ("", "QLinearConv"): 3, ("", "QLinearMatMul"): 3,
    ("", "Einsum"): 1, ("", "Gather"): 0,
    ("com.microsoft", "MatMulNBits"): 1, ("com.microsoft", "FusedConv"): 1, ("com.microsoft", "FusedMatMul"): 1,
}
#: (domain, op) → index of the bias input
_BIAS_INPUT = {("", "Conv"): 2, ("", "ConvTranspose"): 2, ("", "Gemm"): 2, ("com.microsoft", "FusedConv"): 2,
               ("", "QLinearConv"): 8, ("com.microsoft", "MatMulNBits"): 5}
_LOW_BIT_DTYPES = {
    ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT16,
    ir.DataType.UINT16, ir.DataType.INT32,
    *(getattr(ir.DataType, n) for n in ("INT2", "UINT2", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2",
                                         "FLOAT8E5M2FNUZ", "FLOAT4E2M1", "FLOAT8E8M0") if hasattr(ir.DataType, n)),
}


def _const(value: ir.Value | None):
    if value is None:
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:
        return None


def dtype_name(dtype: ir.DataType) -> str:
    """``float32``, ``int4``, ``bfloat16``… (numpy / ml_dtypes spelling where there is one)."""
    if dtype == ir.DataType.STRING:
        return "string"
    try:
        return np.dtype(dtype.numpy()).name
    except (TypeError, ValueError, AttributeError):
        return dtype.name.lower()


def packed_nbytes(tensor) -> int:
    """Bytes a tensor takes packed: ceil(elements · bits / 8) (int4 → ½ byte, int2 → ¼ byte)."""
    try:
        return math.ceil(_prod(tensor.shape) * tensor.dtype.bitwidth / 8)
    except (TypeError, ValueError, AttributeError):
        return int(tensor.nbytes)


def _trace_to_const(value: ir.Value | None, limit: int = 16) -> tuple[Any, list[ir.Value]] | None:
    """Follow transport ops back to a constant: (tensor, constant values seen) or None."""
    for _ in range(limit):
        if value is None:
            return None
        tensor = _const(value)
        if tensor is not None:
            return tensor, [value]
        node = value.producer()
        if node is None or node.domain != "" or node.op_type not in _TRANSPORT:
            return None
        for extra in node.inputs[1:]:  # Reshape's shape etc. must be constant too
            if extra is not None and _const(extra) is None:
                return None
        value = node.inputs[0]
    return None


def _bytes_of(values: list[ir.Value]) -> int:
    total, done = 0, set()
    for value in values:
        tensor = _const(value)
        if tensor is not None and id(value) not in done:
            done.add(id(value))
            total += packed_nbytes(tensor)
    return total


def _describe_weight(value: ir.Value | None) -> dict | None:
    """How the weight ``value`` is stored, or None when it is not a constant-derived weight."""
    traced = _trace_to_const(value)
    if traced is not None:
        tensor, consts = traced
        kind = "float" if tensor.dtype.is_floating_point() else "integer"
        status = "float" if kind == "float" else dtype_name(tensor.dtype)
        return {"kind": kind, "status": status, "stored_dtype": dtype_name(tensor.dtype),
                "bits": tensor.dtype.bitwidth if kind == "integer" else None, "block": None,
                "shape": list(_static(tensor.shape) or ()), "initializer": consts[0].name, "consts": consts}
    # Walk back through transport ops to the producer that is not one.
    for _ in range(16):
        if value is None:
            return None
        node = value.producer()
        if node is None:
            return None
        if node.domain == "" and node.op_type in _TRANSPORT:
            value = node.inputs[0]
            continue
        break
    else:
        return None
    shape = list(_static(value.shape) or ())
    if node.domain == "" and node.op_type == "DequantizeLinear":
        q = _trace_to_const(node.inputs[0])
        scale = _const(_input(node, 1))
        extras = [v for v in node.inputs[1:] if v is not None and _const(v) is not None]
        block = int(attribute(node, "block_size", 0) or 0)
        if q is None:
            qnode = node.inputs[0].producer() if node.inputs[0] is not None else None
            if qnode is not None and qnode.op_type == "QuantizeLinear" and qnode.domain == "":
                src = _trace_to_const(qnode.inputs[0])
                if src is None:
                    return None
                zp = _input(qnode, 2)
                qdtype = zp.dtype if zp is not None and zp.dtype is not None else (
                    ir.DataType(int(attribute(qnode, "output_dtype", 0))) if attribute(qnode, "output_dtype", 0) else ir.DataType.UINT8)
                qname = dtype_name(qdtype)
                consts = src[1] + [v for v in qnode.inputs[1:] if v is not None and _const(v) is not None]
                return {"kind": "fakequant", "status": f"fakequant {qname}", "stored_dtype": dtype_name(src[0].dtype),
                        "bits": qdtype.bitwidth, "block": block or None, "shape": shape or list(src[0].shape),
                        "initializer": src[1][0].name, "consts": consts}
            return None
        tensor, consts = q
        qname = dtype_name(tensor.dtype)
        status = f"qdq {qname}"
        if block:
            status += f" block={block}"
        elif scale is not None and _prod(scale.shape) > 1:
            status += " per-channel"
        return {"kind": "qdq", "status": status, "stored_dtype": qname, "bits": tensor.dtype.bitwidth,
                "block": block or None, "shape": shape or list(_static(tensor.shape) or ()),
                "initializer": consts[0].name, "consts": consts + extras}
    if node.domain == "" and node.op_type == "Gather":
        table = _trace_to_const(node.inputs[0])
        index = _trace_to_const(_input(node, 1))
        if table is None or index is None:
            return None
        k = _prod(table[0].shape[: 1]) if table[0].shape else 1
        bits = max(1, math.ceil(math.log2(k))) if k > 1 else 1
        return {"kind": "codebook", "status": f"codebook k={k}", "stored_dtype": dtype_name(index[0].dtype),
                "bits": bits, "block": None, "shape": shape or list(_static(index[0].shape) or ()),
                "initializer": index[1][0].name, "consts": table[1] + index[1]}
    return None


def _lowbit_weight(node: ir.Node, shapes) -> dict:
    bits = attribute(node, "bits")
    block = attribute(node, "block_size", attribute(node, "block"))
    consts = [v for v in node.inputs[1:] if v is not None and _const(v) is not None]
    codebook = "Codebook" in node.op_type or any("codebook" in k.lower() for k in node.attributes)
    if codebook:
        k = attribute(node, "codebook_size", attribute(node, "k"))
        status = "codebook" + (f" k={k}" if k else "") + (f" bits={bits}" if bits else "")
        kind = "codebook"
    else:
        status = f"lowbit {node.op_type}" + (f" bits={bits}" if bits is not None else "") + (f" block={block}" if block else "")
        kind = "lowbit"
    shape: list[int] = []
    if attribute(node, "K") is not None and attribute(node, "N") is not None:
        shape = [int(attribute(node, "N")), int(attribute(node, "K"))]
    elif node.op_type.startswith("Conv"):
        x, y = _shape_of(_input(node, 0), shapes), _shape_of(node.outputs[0], shapes)
        kernel = attribute(node, "kernel_shape")
        if x is not None and y is not None and kernel is not None:
            shape = [y[1], x[1] // int(attribute(node, "group", 1)), *kernel]
    return {"kind": kind, "status": status, "stored_dtype": dtype_name(consts[0].dtype) if consts and consts[0].dtype else None,
            "bits": int(bits) if bits is not None else None, "block": int(block) if block else None,
            "shape": shape, "initializer": consts[0].name if consts else None, "consts": consts}


def _node_weight(node: ir.Node, shapes=None) -> dict | None:
    """Storage description of the node's weight, or None if the node bears no constant weight."""
    key = (node.domain, node.op_type)
    if key in _NBITS_OPS:
        consts = [v for v in node.inputs[1:5] if v is not None and _const(v) is not None]
        bits, block = attribute(node, "bits", 4), attribute(node, "block_size")
        k, n = attribute(node, "K"), attribute(node, "N")
        return {"kind": "matmulnbits", "status": f"matmulnbits bits={bits}" + (f" block={block}" if block else ""),
                "stored_dtype": "uint8", "bits": int(bits), "block": int(block) if block else None,
                "shape": [int(n), int(k)] if k is not None and n is not None else [],
                "initializer": node.inputs[1].name if len(node.inputs) > 1 and node.inputs[1] is not None else None,
                "consts": consts}
    if is_lowbit_domain(node.domain):
        return _lowbit_weight(node, shapes)
    if key not in _WEIGHT_INPUT:
        return None
    index = _WEIGHT_INPUT[key]
    if key == ("", "Gather"):
        if _const(_input(node, 1)) is not None:  # a codebook lookup, described at its consumer
            return None
        info = _describe_weight(_input(node, 0))
        return None if info is None or info["kind"] == "integer" else info  # integer tables index shapes
    info = _describe_weight(_input(node, index))
    if info is None and key in (("", "MatMul"), ("", "Gemm"), ("", "Einsum")):
        info = _describe_weight(_input(node, 0))  # W @ x
    if info is not None and key[1] in ("QLinearConv", "QLinearMatMul"):
        info["consts"] += [v for v in node.inputs[4:6] if v is not None and _const(v) is not None]
    return info


def _node_label(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else node.op_type)


def _op_key(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _bias_params(node: ir.Node) -> tuple[int, list[ir.Value]]:
    idx = _BIAS_INPUT.get((node.domain, node.op_type))
    if is_lowbit_domain(node.domain):
        idx = None
    bias = _input(node, idx) if idx is not None else None
    traced = _trace_to_const(bias) if bias is not None else None
    if traced is None:
        return 0, []
    return _prod(traced[0].shape), traced[1]


def _activation_status(node: ir.Node) -> str:
    x = _input(node, 0)
    producer = x.producer() if x is not None else None
    if producer is not None and producer.op_type == "DequantizeLinear" and producer.domain == "":
        q = producer.inputs[0]
        dtype = q.dtype if q is not None else None
        return f"qdq {dtype_name(dtype)}" if dtype is not None else "qdq"
    return "float"


def weight_status(model: ir.Model, *, shapes: Mapping[str, Any] | None = None) -> list[dict]:
    """One dict per weight-bearing node (see the module docstring for the statuses).

    Keys: ``node`` (name), ``op`` (``Conv``, ``com.microsoft.MatMulNBits``…), ``status``,
    ``kind`` (float | qdq | fakequant | matmulnbits | lowbit | codebook | integer), ``bits`` and
    ``block`` (None when not applicable), ``weight`` (name of the stored initializer),
    ``stored_dtype``, ``shape`` (logical weight shape, e.g. [N, K] for MatMulNBits), ``params``
    (logical weight elements + bias elements), ``bytes`` (packed bytes of every constant the
    weight and bias are made of: values, scales, zero points, codebooks), ``activation``
    (``qdq uint8`` when the data input comes through DequantizeLinear, else ``float``).
    """
    out = []
    for node in model.graph.all_nodes():
        info = _node_weight(node, shapes)
        if info is None:
            continue
        bias_n, bias_consts = _bias_params(node)
        shape = [int(d) for d in info["shape"]]
        out.append({
            "node": _node_label(node),
            "op": _op_key(node),
            "status": info["status"],
            "kind": info["kind"],
            "bits": info["bits"],
            "block": info["block"],
            "weight": info["initializer"],
            "stored_dtype": info["stored_dtype"],
            "shape": shape,
            "params": (_prod(shape) if shape else 0) + bias_n,
            "bytes": _bytes_of(info["consts"] + bias_consts),
            "activation": _activation_status(node),
        })
    return out


# ---------------------------------------------------------------------------------------------
# Model statistics
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelStats:
    """What ``lowbit inspect`` shows; ``to_dict()`` is JSON-serialisable."""

    ir_version: int
    opsets: dict[str, int]
    producer: str
    inputs: list[dict]
    outputs: list[dict]
    batch: int
    nodes: int
    #: op → count, most frequent first (``domain.Op`` outside the default domain)
    op_types: dict[str, int]
    #: elements of every initializer and Constant tensor (stored, not logical)
    params: int
    #: packed bytes of those tensors by dtype name, and their sum
    bytes_by_dtype: dict[str, int]
    tensor_bytes: int
    #: multiply-accumulates at ``batch`` (nodes with unknown shapes contribute nothing)
    macs: int
    macs_by_op: dict[str, int]
    #: names of counted nodes whose MACs could not be computed (shapes unknown)
    unknown_macs: list[str]
    #: weight-bearing / compute nodes: node, op, macs, params, shape, status
    layers: list[dict]
    top_macs: list[dict]
    top_params: list[dict]
    #: ``weight_status`` entries, and their statuses counted
    weights: list[dict]
    quantization: dict[str, int]
    shape_source: str
    path: str | None = None
    file_bytes: int | None = None
    #: False when some counted nodes' shapes are unknown: ``macs`` is then only a lower bound
    macs_complete: bool = True
    #: input name → the shape the shapes and MACs were computed at
    input_shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    #: symbolic input dimensions whose size was guessed (symbol, or ``input[axis]``, → size)
    assumed_dims: dict[str, int] = dataclasses.field(default_factory=dict)
    #: why onnxruntime could not supply missing shapes (e.g. the model fails at the guessed sizes)
    shape_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))


def _value_info(value: ir.Value) -> dict:
    dims = None
    if value.shape is not None:
        dims = [d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None) for d in value.shape]
    return {"name": value.name, "dtype": dtype_name(value.dtype) if value.dtype is not None else None, "shape": dims}


def _all_constants(model: ir.Model):
    """Every initializer and Constant tensor of every graph (each once)."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
        for node in graph:
            if node.op_type == "Constant" and node.domain == "" and node.outputs:
                tensor = _const(node.outputs[0])
                if tensor is not None:
                    yield tensor


def packed_tensor_bytes(model: ir.Model) -> int:
    """Packed bytes of every initializer and Constant tensor (int4 = ½ byte per element)."""
    return sum(packed_nbytes(t) for t in _all_constants(model))


def model_stats(model: ir.Model, *, batch: int = DEFAULT_BATCH, dim: int | None = None,
                path: str | os.PathLike | None = None, top: int = 10,
                use_onnxruntime: bool = True) -> ModelStats:
    """Statistics of ``model`` at the given ``batch`` (``dim`` for other symbolic dims; None:
    the defaults of ``infer_shapes``).

    ``path``: the file the model came from, for its size on disk. ``top``: rows in the
    largest-layer lists. The model is not modified.
    """
    shaped = infer_shapes(model, batch=batch, dim=dim, use_onnxruntime=use_onnxruntime)
    histogram: Counter[str] = Counter()
    macs_by_op: Counter[str] = Counter()
    unknown: list[str] = []
    layers: list[dict] = []
    weights = {w["node"]: w for w in weight_status(shaped)}
    nodes = 0
    for node in shaped.graph.all_nodes():
        nodes += 1
        key = _op_key(node)
        histogram[key] += 1
        macs = node_macs(node)
        label = _node_label(node)
        if macs is None:
            unknown.append(label)
        elif macs:
            macs_by_op[key] += macs
        w = weights.get(label)
        if w is not None or macs:
            layers.append({
                "node": label, "op": key, "macs": macs,
                "params": w["params"] if w else 0,
                "shape": w["shape"] if w else [],
                "status": w["status"] if w else "-",
            })
    params = 0
    by_dtype: Counter[str] = Counter()
    for tensor in _all_constants(model):
        params += _prod(tensor.shape)
        by_dtype[dtype_name(tensor.dtype)] += packed_nbytes(tensor)
    quant = Counter(w["status"] for w in weights.values())
    file_bytes = None
    if path is not None and os.path.exists(path):
        file_bytes = os.path.getsize(path)
        data = f"{path}.data"
        if os.path.exists(data):
            file_bytes += os.path.getsize(data)
    return ModelStats(
        ir_version=model.ir_version,
        opsets=dict(sorted(model.opset_imports.items())),
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        inputs=[_value_info(v) for v in model.graph.inputs if v.name not in model.graph.initializers],
        outputs=[_value_info(v) for v in model.graph.outputs],
        batch=batch,
        nodes=nodes,
        op_types=dict(histogram.most_common()),
        params=params,
        bytes_by_dtype=dict(by_dtype.most_common()),
        tensor_bytes=sum(by_dtype.values()),
        macs=sum(macs_by_op.values()),
        macs_by_op=dict(macs_by_op.most_common()),
        unknown_macs=unknown,
        layers=layers,
        top_macs=sorted((l for l in layers if l["macs"]), key=lambda l: -l["macs"])[:top],
        top_params=sorted((l for l in layers if l["params"]), key=lambda l: -l["params"])[:top],
        weights=list(weights.values()),
        quantization=dict(quant.most_common()),
        shape_source=str(shaped.meta.get(_SHAPE_SOURCE, "onnx")),
        path=str(path) if path is not None else None,
        file_bytes=file_bytes,
        macs_complete=not unknown,
        input_shapes=dict(shaped.meta.get(_INPUT_SHAPES, {})),
        assumed_dims=dict(shaped.meta.get(_ASSUMED, {})),
        shape_error=shaped.meta.get(_SHAPE_ERROR),
    )


def _shape_text(shape) -> str:
    if shape is None:
        return "?"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def format_stats(stats: ModelStats, *, max_rows: int = 30) -> str:
    """A multi-section text report of ``stats`` for ``lowbit inspect``."""
    sections = []
    head = []
    if stats.path:
        size = f"  ({human_bytes(stats.file_bytes)} on disk)" if stats.file_bytes is not None else ""
        head.append(f"model      {stats.path}{size}")
    opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in stats.opsets.items())
    head.append(f"format     IR {stats.ir_version}; opsets {opsets}")
    if stats.producer:
        head.append(f"producer   {stats.producer}")
    for label, values in (("inputs", stats.inputs), ("outputs", stats.outputs)):
        text = ", ".join(f"{v['name']} {v['dtype']}{_shape_text(v['shape'])}" for v in values)
        head.append(f"{label:<10} {text}")
    head.append(f"nodes      {stats.nodes} ({len(stats.op_types)} op types)")
    sections.append("\n".join(head))

    size = [f"Size: {human_count(stats.params)} parameters (stored elements), {human_bytes(stats.tensor_bytes)} of tensors"]
    if stats.bytes_by_dtype:
        rows = [[d, human_bytes(b), f"{100 * b / stats.tensor_bytes:.1f}%" if stats.tensor_bytes else "-"]
                for d, b in stats.bytes_by_dtype.items()]
        size.append(format_table(rows, ["dtype", "bytes", "share"], indent="  "))
    sections.append("\n".join(size))

    sections.append("\n".join(format_compute(stats)))

    rows = [[op, n] for op, n in list(stats.op_types.items())[:max_rows]]
    sections.append("Op types\n" + format_table(rows, ["op", "count"], indent="  ") + _more(stats.op_types, max_rows))

    def layer_rows(layers):
        return [[l["node"], l["op"], _shape_text(l["shape"]) if l["shape"] else "-", human_count(l["params"]),
                 human_count(l["macs"]) if l["macs"] is not None else "?", l["status"]] for l in layers]

    headers = ["node", "op", "weight", "params", "MACs", "weights stored as"]
    for title, layers in (("Largest layers by MACs", stats.top_macs), ("Largest layers by parameters", stats.top_params)):
        if layers:
            sections.append(f"{title}\n" + format_table(layer_rows(layers), headers, align="lllrrl", indent="  "))

    if stats.weights:
        quant = ", ".join(f"{n}× {s}" for s, n in stats.quantization.items())
        rows = [[w["node"], w["op"], _shape_text(w["shape"]), w["status"], human_bytes(w["bytes"])]
                for w in stats.weights[:max_rows]]
        sections.append(f"Weights: {quant}\n"
                        + format_table(rows, ["node", "op", "shape", "stored as", "bytes"], align="llllr", indent="  ")
                        + _more(stats.weights, max_rows))
    return "\n\n".join(sections) + "\n"


def macs_text(stats: ModelStats | Mapping[str, Any]) -> str:
    """``1.01 G``, or ``≥ 1.67 M`` when some nodes were not counted (``macs_complete`` False)."""
    get = stats.get if isinstance(stats, Mapping) else lambda key, default=None: getattr(stats, key, default)
    text = human_count(get("macs"))
    return text if get("macs_complete", True) else f"≥ {text}"


def format_compute(stats: ModelStats) -> list[str]:
    """The "Compute" lines of ``format_stats``: total MACs and the sizes they are for, a loud
    INCOMPLETE marker when some nodes' shapes are unknown, the MACs by op."""
    at = ", ".join(f"{name} {_shape_text(shape)}" for name, shape in stats.input_shapes.items())
    head = f"Compute: {macs_text(stats)} MACs at " + (at or f"batch {stats.batch}") + f" (shapes from {stats.shape_source})"
    counted = sum(1 for layer in stats.layers if layer["macs"])
    if not stats.macs_complete:
        head += (f" — INCOMPLETE: {len(stats.unknown_macs)} of {counted + len(stats.unknown_macs)} compute nodes "
                 "not counted (shapes unknown)")
    lines = [head]
    if stats.assumed_dims:
        sizes = ", ".join(f"{k}={v}" for k, v in stats.assumed_dims.items())
        lines.append(f"  symbolic input sizes assumed: {sizes}; pin the real ones with --input-shape NAME=D0,D1,…")
    if stats.macs_by_op:
        rows = [[op, human_count(m), f"{100 * m / stats.macs:.1f}%"] for op, m in stats.macs_by_op.items()]
        lines.append(format_table(rows, ["op", "MACs", "share"], indent="  "))
    if stats.unknown_macs:
        names = ", ".join(stats.unknown_macs[:5]) + (" …" if len(stats.unknown_macs) > 5 else "")
        lines.append(f"  not counted (shapes unknown): {len(stats.unknown_macs)} nodes: {names}")
    if stats.shape_error and stats.unknown_macs:
        lines.append(f"  onnxruntime could not run the model at these sizes: {stats.shape_error}")
    return lines


def _more(items, shown: int) -> str:
    extra = len(items) - shown
    return f"\n  … {extra} more" if extra > 0 else ""
