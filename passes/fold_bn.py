"""``fold-bn``: fold inference-form BatchNormalization into the layer before it — exact.

Algebra. BatchNormalization (one output, inference form) normalises along axis 1 of its input::

    BN(y) = (y − μ) · γ/√(σ² + ε) + β  =  y · s + t,   s = γ/√(σ² + ε),   t = β − μ·s

so for a linear producer y = x ⊛ W + b whose output channel c is axis 1 of y::

    W' = W · diag(s)   (channel c of W multiplied by s_c, on W's output-channel axis)
    b' = (b − μ) · s + β  =  b·s + t   (b = 0 when the producer has no bias)

Output-channel axis of the weight, per producer:

==================  =================================  =========================================
producer            weight layout                      axis scaled by s
==================  =================================  =========================================
Conv                C_out × C_in/group × k…            0 (any group, depthwise included)
ConvTranspose       C_in × C_out/group × k…            1, per group: W viewed as
                                                       [group, C_in/group, C_out/group, k…],
                                                       s viewed as [group, 1, C_out/group, 1…]
Gemm, transB=0      B: K × N                           1 (columns); C' = (β_gemm·C − μ)·s + β,
                                                       attribute beta set to 1; alpha untouched
                                                       (α·A·(B·s) = s·(α·A·B))
Gemm, transB=1      B: N × K                           0 (rows); C as above, added when absent
MatMul, 2-D         W: K × N, output rank 2            1 (columns); the shift t goes into a new
                                                       Add, or is merged into a bias Add that
                                                       precedes the BN (c' = c·s + t) or follows
                                                       it (c' = c + t)
==================  =================================  =========================================

MatMul folds only when its output has rank 2: BatchNormalization's channel axis is axis 1, which
is the weight's column axis only then.

A fold happens only when the producer's output has exactly one consumer (the BN, or the bias Add
in the MatMul → Add → BN form) and is not a graph output, and when weight, bias and the BN's
statistics are constants (initializers that are not graph inputs, or Constant nodes). The scale
and shift are computed in float64 and cast back to the weight's dtype. A weight or bias used only
by the folded node is rewritten in place, keeping its name; one shared with other nodes is
copied under a new name ``<name>.bnfold`` (a bias created where there was none is called
``<prefix>.bias`` after a weight ``<prefix>.weight``, else ``<weight>.bias``); names are made
unique with a numeric suffix, so the result is the same on every run.

A BatchNormalization that cannot be folded is, with ``standalone=true`` (the default), rewritten
as ``Mul(x, s) + t`` with s and t constant and shaped [C, 1, …] to broadcast along axis 1; its
reasons are noted under ``left``. The pass notes ``folded`` (BNs folded into a producer),
``to_mul_add`` (BNs rewritten as Mul+Add) and ``left`` (one line per BN not folded, with why).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from lowbit.passes.base import Pass, option
from lowbit.passes.edit import Names as _Names
from lowbit.passes.edit import drop_if_dead as _drop_if_dead
from lowbit.passes.edit import bias_name, new_const, set_const as _set_const


@dataclasses.dataclass
class FoldBNOptions:
    standalone: bool = option(
        True,
        "rewrite a BatchNormalization that cannot be folded as Mul+Add with constant per-channel "
        "scale and shift (exact); false leaves it as it is",
    )


class _Skip(Exception):
    """Why one BatchNormalization is not folded (one short phrase)."""


class FoldBN(Pass):
    """Fold BatchNormalization into a preceding Conv, ConvTranspose, Gemm or MatMul (exact)."""

    name = "fold-bn"
    Options = FoldBNOptions
    preserves = "exact"

    def run(self, model: ir.Model, ctx) -> bool:
        folded, to_mul_add, left = 0, 0, []
        names = _Names(model.graph)  # value names must be unique across nested graphs too
        for graph in [model.graph, *model.graph.subgraphs()]:
            for node in list(graph):
                if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
                    continue
                if node.graph is not graph:  # removed by an earlier rewrite in this loop
                    continue
                label = node.name or (node.outputs[0].name if node.outputs else "?")
                try:
                    bn = _BN.read(node)
                except _Skip as why:
                    left.append(f"{label}: {why}")
                    continue
                try:
                    _fold(graph, bn, names)
                    folded += 1
                    continue
                except _Skip as why:
                    reason = str(why)
                if self.options.standalone:
                    try:
                        _to_mul_add(graph, bn, names)
                        to_mul_add += 1
                        left.append(f"{label}: {reason} (rewritten as Mul+Add)")
                        continue
                    except _Skip as why:
                        reason = f"{reason}; not rewritten as Mul+Add: {why}"
                left.append(f"{label}: {reason}")
        ctx.note("folded", folded)
        ctx.note("to_mul_add", to_mul_add)
        ctx.note("left", left)
        return bool(folded or to_mul_add)


# --------------------------------------------------------------------------------------------
# Reading constants and the BatchNormalization itself


def _const(value: ir.Value | None, what: str) -> np.ndarray:
    """The constant array behind ``value`` (initializer or Constant node), or raise ``_Skip``."""
    if value is None:
        raise _Skip(f"{what} is missing")
    if value.is_graph_input():
        raise _Skip(f"{what} '{value.name}' is a graph input, not a constant")
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        raise _Skip(f"{what} '{value.name}' is not a constant")
    return tensor.numpy()


def _float_dtype(array: np.ndarray, what: str) -> np.dtype:
    dtype = array.dtype
    if not (np.issubdtype(dtype, np.floating) or dtype.name in ("bfloat16",)):
        raise _Skip(f"{what} has element type {dtype}, not floating point")
    return dtype


@dataclasses.dataclass
class _BN:
    node: ir.Node
    x: ir.Value
    y: ir.Value
    scale: np.ndarray  # s = γ/√(σ²+ε), float64 [C]
    shift: np.ndarray  # t = β − μ·s, float64 [C]

    @classmethod
    def read(cls, node: ir.Node) -> "_BN":
        if len(node.outputs) != 1:
            raise _Skip(f"training form ({len(node.outputs)} outputs)")
        mode = node.attributes.get("training_mode")
        if mode is not None and (mode.is_ref() or mode.as_int() != 0):
            raise _Skip("training_mode is set")
        if len(node.inputs) != 5 or node.inputs[0] is None:
            raise _Skip("expects 5 inputs")
        gamma, beta, mean, var = (
            _const(v, what).astype(np.float64)
            for v, what in zip(node.inputs[1:], ("scale", "bias", "mean", "var"))
        )
        if not (gamma.ndim == beta.ndim == mean.ndim == var.ndim == 1):
            raise _Skip("statistics are not 1-D per-channel vectors (spatial=0?)")
        if not (gamma.shape == beta.shape == mean.shape == var.shape):
            raise _Skip("statistics have different lengths")
        eps_attr = node.attributes.get("epsilon")
        eps = 1e-5 if eps_attr is None else float(eps_attr.as_float())
        # ε is a float32 attribute: onnxruntime adds it in float32; so do we (exactly representable).
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        return cls(node, node.inputs[0], node.outputs[0], scale, shift)

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])


# --------------------------------------------------------------------------------------------
# Graph edits


def _remove_bn(graph: ir.Graph, bn: _BN, replacement: ir.Value) -> None:
    """Send the BN's consumers (and graph output slot, keeping its name) to ``replacement``."""
    y, was_output = bn.y, bn.y.is_graph_output()
    name = y.name
    stats = list(bn.node.inputs[1:])
    y.replace_all_uses_with(replacement, replace_graph_outputs=True)
    graph.remove(bn.node, safe=True)
    if was_output:
        replacement.name = name
    for value in stats:
        if value is not None:
            _drop_if_dead(graph, value)


def _check_single_use(value: ir.Value, user: ir.Node, what: str) -> None:
    if value.is_graph_output():
        raise _Skip(f"{what} '{value.name}' is also a graph output")
    count = len(value.uses())
    if count != 1 or value.uses()[0][0] is not user:
        raise _Skip(f"{what} '{value.name}' has {count} consumers, not just the fold target")


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


# --------------------------------------------------------------------------------------------
# Folding into each producer


def _fold(graph: ir.Graph, bn: _BN, names: _Names) -> None:
    producer = bn.x.producer()
    if producer is None:
        raise _Skip("input is a graph input")
    if producer.graph is not graph:
        raise _Skip("producer lives in another graph")
    _check_single_use(bn.x, bn.node, "producer output")
    if producer.domain not in ("", "ai.onnx"):
        raise _Skip(f"producer {producer.domain}::{producer.op_type} is not foldable")
    folder = _FOLDERS.get(producer.op_type)
    if folder is None:
        raise _Skip(f"producer {producer.op_type} is not foldable")
    folder(graph, bn, producer, names)


def _scaled_conv_bias(bn: _BN, node: ir.Node, dtype: np.dtype) -> np.ndarray:
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b0 = _const(node.inputs[2], "bias")
        if b0.shape != (bn.channels,):
            raise _Skip(f"bias shape {b0.shape} is not [{bn.channels}]")
        return (b0.astype(np.float64) * bn.scale + bn.shift).astype(_float_dtype(b0, "bias"))
    return bn.shift.astype(dtype)


def _fold_conv(graph: ir.Graph, bn: _BN, node: ir.Node, names: _Names) -> None:
    w0 = _const(node.inputs[1], "weight")
    dtype = _float_dtype(w0, "weight")
    if w0.ndim < 3 or w0.shape[0] != bn.channels:
        raise _Skip(f"Conv weight shape {w0.shape} does not have {bn.channels} output channels")
    bias = _scaled_conv_bias(bn, node, dtype)
    w = w0.astype(np.float64) * bn.scale.reshape((-1,) + (1,) * (w0.ndim - 1))
    _commit(graph, bn, node, w.astype(dtype), bias, names)


def _fold_conv_transpose(graph: ir.Graph, bn: _BN, node: ir.Node, names: _Names) -> None:
    w0 = _const(node.inputs[1], "weight")
    dtype = _float_dtype(w0, "weight")
    group_attr = node.attributes.get("group")
    group = 1 if group_attr is None else group_attr.as_int()
    if w0.ndim < 3 or w0.shape[0] % group or w0.shape[1] * group != bn.channels:
        raise _Skip(f"ConvTranspose weight shape {w0.shape} with group {group} does not give {bn.channels} channels")
    bias = _scaled_conv_bias(bn, node, dtype)
    c_in, c_out_g, kernel = w0.shape[0], w0.shape[1], w0.shape[2:]
    w = w0.astype(np.float64).reshape(group, c_in // group, c_out_g, *kernel)
    w = w * bn.scale.reshape((group, 1, c_out_g) + (1,) * len(kernel))
    _commit(graph, bn, node, w.reshape(w0.shape).astype(dtype), bias, names)


def _fold_gemm(graph: ir.Graph, bn: _BN, node: ir.Node, names: _Names) -> None:
    w0 = _const(node.inputs[1], "weight (B)")
    dtype = _float_dtype(w0, "weight (B)")
    trans_attr = node.attributes.get("transB")
    trans_b = bool(trans_attr is not None and trans_attr.as_int())
    axis = 0 if trans_b else 1
    if w0.ndim != 2 or w0.shape[axis] != bn.channels:
        raise _Skip(f"Gemm B shape {w0.shape} (transB={int(trans_b)}) does not have {bn.channels} columns of output")
    beta_attr = node.attributes.get("beta")
    gemm_beta = 1.0 if beta_attr is None else float(beta_attr.as_float())
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c0 = _const(node.inputs[2], "bias (C)")
        cdtype = _float_dtype(c0, "bias (C)")
        c = gemm_beta * c0.astype(np.float64)
        if c.ndim > 2 or (c.ndim >= 1 and c.shape[-1] not in (1, bn.channels)):
            raise _Skip(f"Gemm C shape {c0.shape} does not broadcast to [M, {bn.channels}]")
        bias = (c * bn.scale + bn.shift).astype(cdtype)
    else:
        bias = bn.shift.astype(dtype)
    w = w0.astype(np.float64) * (bn.scale[:, None] if trans_b else bn.scale[None, :])
    _commit(graph, bn, node, w.astype(dtype), bias, names)
    node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)


def _commit(graph, bn: _BN, node: ir.Node, weight: np.ndarray, bias: np.ndarray, names: _Names) -> None:
    """Write the folded weight (input 1) and bias (input 2) of ``node`` and drop the BN."""
    w_value = node.inputs[1]
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    bias_base = f"{node.inputs[2].name}.bnfold" if has_bias else bias_name(w_value, "bnfold")
    _set_const(graph, node, 1, weight, names, f"{w_value.name}.bnfold")
    _set_const(graph, node, 2, bias, names, bias_base)
    _remove_bn(graph, bn, node.outputs[0])


def _matmul_weight(bn: _BN, node: ir.Node) -> np.ndarray:
    """The constant [K, N] weight of a MatMul whose output has rank 2 and N = channels."""
    if node.inputs[1] is None:
        raise _Skip("MatMul has no weight")
    w0 = _const(node.inputs[1], "MatMul weight (second input)")
    _float_dtype(w0, "MatMul weight")
    if w0.ndim != 2 or w0.shape[1] != bn.channels:
        raise _Skip(f"MatMul weight shape {w0.shape} is not [K, {bn.channels}]")
    x_rank = _rank(node.inputs[0]) if node.inputs[0] is not None else None
    out_rank = _rank(bn.x)
    if out_rank != 2 and x_rank != 2:
        raise _Skip("MatMul output rank is not known to be 2 (BN normalises axis 1)")
    return w0


def _fold_matmul(graph: ir.Graph, bn: _BN, node: ir.Node, names: _Names) -> None:
    w0 = _matmul_weight(bn, node)
    w = (w0.astype(np.float64) * bn.scale[None, :]).astype(w0.dtype)
    # A following bias Add that only the BN feeds: merge the shift into it.
    users = [u for u, _ in bn.y.uses()]
    if len(users) == 1 and not bn.y.is_graph_output() and _is_const_add(users[0], bn.y):
        add = users[0]
        index = 1 if add.inputs[0] is bn.y else 0
        c0 = _const(add.inputs[index], "Add constant")
        cdtype = _float_dtype(c0, "Add constant")
        if c0.ndim <= 2 and (c0.ndim == 0 or c0.shape[-1] in (1, bn.channels)):
            c = (c0.astype(np.float64) + bn.shift).astype(cdtype)
            _set_const(graph, node, 1, w, names, f"{node.inputs[1].name}.bnfold")
            _set_const(graph, add, index, c, names, f"{add.inputs[index].name}.bnfold")
            _remove_bn(graph, bn, node.outputs[0])
            return
    _set_const(graph, node, 1, w, names, f"{node.inputs[1].name}.bnfold")
    shift = bn.shift.astype(w0.dtype)
    bias = new_const(graph, names, bias_name(node.inputs[1], "bnfold"), shift)
    add = ir.node("Add", [node.outputs[0], bias], name=names.fresh(f"{bn.node.name or 'bn'}.add"))
    out = add.outputs[0]
    out.name = names.fresh(f"{bn.y.name}.folded")
    out.type, out.shape = bn.y.type, bn.y.shape
    graph.insert_after(bn.node, add)
    _remove_bn(graph, bn, out)


def _is_const_add(node: ir.Node, operand: ir.Value) -> bool:
    if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    other = node.inputs[1] if node.inputs[0] is operand else node.inputs[0]
    if other is None or other is operand or other.is_graph_input():
        return False
    return ir.convenience.get_const_tensor(other) is not None


def _fold_add(graph: ir.Graph, bn: _BN, add: ir.Node, names: _Names) -> None:
    """MatMul(x, W) → Add(·, c) → BN: W' = W·s, c' = c·s + t."""
    if len(add.inputs) != 2:
        raise _Skip("Add does not have two inputs")
    for index in (0, 1):
        mm_out, c_value = add.inputs[index], add.inputs[1 - index]
        producer = mm_out.producer() if mm_out is not None else None
        if producer is not None and producer.op_type == "MatMul" and producer.domain in ("", "ai.onnx"):
            break
    else:
        raise _Skip("producer Add is not a bias Add after a MatMul")
    if producer.graph is not graph:
        raise _Skip("MatMul lives in another graph")
    _check_single_use(mm_out, add, "MatMul output")
    if c_value is None or c_value.is_graph_input() or ir.convenience.get_const_tensor(c_value) is None:
        raise _Skip("bias Add's other operand is not a constant")
    w0 = _matmul_weight(bn, producer)
    c0 = _const(c_value, "Add constant")
    cdtype = _float_dtype(c0, "Add constant")
    if c0.ndim > 2 or (c0.ndim >= 1 and c0.shape[-1] not in (1, bn.channels)):
        raise _Skip(f"bias shape {c0.shape} does not broadcast to [M, {bn.channels}]")
    w = (w0.astype(np.float64) * bn.scale[None, :]).astype(w0.dtype)
    c = (c0.astype(np.float64) * bn.scale + bn.shift).astype(cdtype)
    _set_const(graph, producer, 1, w, names, f"{producer.inputs[1].name}.bnfold")
    _set_const(graph, add, 1 - index, c, names, f"{c_value.name}.bnfold")
    _remove_bn(graph, bn, add.outputs[0])


_FOLDERS = {
    "Conv": _fold_conv,
    "ConvTranspose": _fold_conv_transpose,
    "Gemm": _fold_gemm,
    "MatMul": _fold_matmul,
    "Add": _fold_add,
}


# --------------------------------------------------------------------------------------------
# Standalone: BN(x) = x·s + t


def _to_mul_add(graph: ir.Graph, bn: _BN, names: _Names) -> None:
    rank = _rank(bn.x)
    if rank is None:
        raise _Skip("input rank unknown")
    if rank < 2:
        raise _Skip(f"input rank {rank} < 2")
    dtype = bn.x.dtype.numpy() if bn.x.dtype is not None else _const(bn.node.inputs[1], "scale").dtype
    shape = (bn.channels,) + (1,) * (rank - 2)
    base = bn.y.name or bn.node.name or "bn"
    consts = []
    for label, array in (("bn_scale", bn.scale), ("bn_shift", bn.shift)):
        a = array.reshape(shape).astype(dtype)
        consts.append(new_const(graph, names, f"{base}.{label}", a))
    prefix = bn.node.name or base
    mul = ir.node("Mul", [bn.x, consts[0]], name=names.fresh(f"{prefix}.mul"))
    add = ir.node("Add", [mul.outputs[0], consts[1]], name=names.fresh(f"{prefix}.add"))
    mul.outputs[0].name = names.fresh(f"{base}.scaled")
    mul.outputs[0].type, mul.outputs[0].shape = bn.y.type, bn.y.shape
    add.outputs[0].name = names.fresh(f"{base}.shifted")
    add.outputs[0].type, add.outputs[0].shape = bn.y.type, bn.y.shape
    graph.insert_after(bn.node, [mul, add])
    _remove_bn(graph, bn, add.outputs[0])
