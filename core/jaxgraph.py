"""An ``onnx_ir`` graph as a jax function, so that gradients can flow through it (``finetune``).

``GraphFunction(graph)`` walks the graph's nodes once per call in their stored (topological)
order. Values are either numpy arrays — initializers, and everything computed from them and from
static shapes (``Shape`` of a traced tensor is its static shape under jit), so shape arithmetic
and ``Reshape`` targets stay concrete — or jax arrays, the traced path from the inputs and the
trainable parameters. Each rule receives its inputs and attributes and uses ``numpy`` when every
input is concrete, ``jax.numpy`` otherwise; the arithmetic is ONNX's, float32 throughout.

The rules cover the ops exported CNNs, MLPs and transformers are made of (``RULES``); a node of
any other op, or an attribute form a rule does not implement (``auto_pad`` other than NOTSET, a
non-constant ``Pad`` mode, ceil-mode pooling), is refused by ``check_supported`` with the node's
name, so a pass fails before it trains anything. The rules are checked against onnxruntime on
real models in ``tests/test_finetune.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from lowbit.core.errors import UserError
from lowbit.passes.edit import attribute as _attr


def _jnp():
    import jax.numpy as jnp

    return jnp


def _concrete(values) -> bool:
    return all(v is None or isinstance(v, (np.ndarray, np.generic)) for v in values)


def _xp(values):
    return np if _concrete(values) else _jnp()


def _ints(value) -> list[int]:
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _axes(node: ir.Node, inputs, index: int) -> list[int] | None:
    """Axes from the attribute (older opsets) or the optional input ``index`` (newer ones)."""
    if len(inputs) > index and inputs[index] is not None:
        if not isinstance(inputs[index], np.ndarray):
            raise UserError(f"node '{node.name}' ({node.op_type}) takes its axes from a computed tensor; finetune needs them constant")
        return _ints(inputs[index])
    axes = _attr(node, "axes")
    return None if axes is None else [int(a) for a in axes]


def _pads2(pads: list[int], rank: int) -> list[tuple[int, int]]:
    half = len(pads) // 2 if pads else rank
    pads = pads or [0] * (2 * rank)
    return [(int(pads[i]), int(pads[i + half])) for i in range(half)]


def _conv(node, inputs):
    import jax

    x, w = inputs[0], inputs[1]
    spatial = w.ndim - 2
    strides = _attr(node, "strides", [1] * spatial)
    dilations = _attr(node, "dilations", [1] * spatial)
    pads = _pads2(_attr(node, "pads", []), spatial)
    group = int(_attr(node, "group", 1))
    if spatial == 2 and group > 1 and group == x.shape[1] == w.shape[0]:
        y = _depthwise(x, w, strides, pads, dilations)
    else:
        y = jax.lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilations, feature_group_count=group)
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + inputs[2].reshape((1, -1) + (1,) * spatial)
    return y


def _depthwise(x, w, strides, pads, dilations):
    """A depthwise 2-D conv as a sum of shifted, per-channel scaled copies of the padded input:
    XLA's CPU backend differentiates grouped convolutions an order of magnitude slower."""
    jnp = _jnp()
    x = jnp.pad(x, [(0, 0), (0, 0), *pads])
    (sh, sw), (dh, dw) = strides, dilations
    kh, kw = w.shape[2:]
    oh = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    y = 0
    for i in range(kh):
        for j in range(kw):
            tap = x[:, :, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]
            y = y + tap * w[:, 0, i, j].reshape(1, -1, 1, 1)
    return y


def _pool(node, inputs, kind: str):
    import jax

    jnp = _jnp()
    x = inputs[0]
    spatial = x.ndim - 2
    kernel = [int(k) for k in _attr(node, "kernel_shape")]
    strides = [int(s) for s in _attr(node, "strides", [1] * spatial)]
    pads = _pads2(_attr(node, "pads", []), spatial)
    window, step, padding = (1, 1, *kernel), (1, 1, *strides), [(0, 0), (0, 0), *pads]
    if kind == "max":
        dilations = [int(d) for d in _attr(node, "dilations", [1] * spatial)]
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, step, padding,
                                     window_dilation=(1, 1, *dilations))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, step, padding)
    if _attr(node, "count_include_pad", 0) or not any(p for pair in pads for p in pair):
        return total / float(np.prod(kernel))
    ones = jnp.ones((1, 1, *x.shape[2:]), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, step, padding)
    return total / count


def _gemm(node, inputs):
    xp = _xp(inputs)
    a, b = inputs[0], inputs[1]
    if _attr(node, "transA", 0):
        a = a.T
    if _attr(node, "transB", 0):
        b = b.T
    y = float(_attr(node, "alpha", 1.0)) * xp.matmul(a, b)
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + float(_attr(node, "beta", 1.0)) * inputs[2]
    return y


def _clip(node, inputs):
    xp = _xp(inputs)
    x = inputs[0]
    lo = inputs[1] if len(inputs) > 1 and inputs[1] is not None else _attr(node, "min")
    hi = inputs[2] if len(inputs) > 2 and inputs[2] is not None else _attr(node, "max")
    if lo is not None:
        x = xp.maximum(x, lo)
    if hi is not None:
        x = xp.minimum(x, hi)
    return x


def _reduce(node, inputs, fn: str):
    xp = _xp(inputs)
    axes = _axes(node, inputs, 1)
    keep = bool(_attr(node, "keepdims", 1))
    if axes is None and _attr(node, "noop_with_empty_axes", 0):
        return inputs[0]
    return getattr(xp, fn)(inputs[0], axis=None if axes is None else tuple(axes), keepdims=keep)


def _softmax(node, inputs):
    import jax

    axis = int(_attr(node, "axis", -1))
    return jax.nn.softmax(inputs[0], axis=axis)


def _batchnorm(node, inputs):
    x, scale, bias, mean, var = inputs[:5]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    eps = float(_attr(node, "epsilon", 1e-5))
    xp = _xp(inputs)
    return (x - mean.reshape(shape)) / xp.sqrt(var.reshape(shape) + eps) * scale.reshape(shape) + bias.reshape(shape)


def _layernorm(node, inputs):
    xp = _xp(inputs)
    x = inputs[0]
    axis = int(_attr(node, "axis", -1)) % x.ndim
    axes = tuple(range(axis, x.ndim))
    eps = float(_attr(node, "epsilon", 1e-5))
    centred = x - xp.mean(x, axis=axes, keepdims=True)
    y = centred / xp.sqrt(xp.mean(centred * centred, axis=axes, keepdims=True) + eps) * inputs[1]
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + inputs[2]
    return y


def _reshape(node, inputs):
    x, shape = inputs
    if not isinstance(shape, np.ndarray):
        raise UserError(f"node '{node.name}' (Reshape) takes a computed shape; finetune needs it constant")
    shape = _ints(shape)
    if not _attr(node, "allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _flatten(node, inputs):
    x = inputs[0]
    axis = int(_attr(node, "axis", 1)) % max(x.ndim, 1)
    return x.reshape((int(np.prod(x.shape[:axis])), -1))


def _slice(node, inputs):
    x = inputs[0]
    if not _concrete(inputs[1:]):
        raise UserError(f"node '{node.name}' (Slice) takes computed bounds; finetune needs them constant")
    starts, ends = _ints(inputs[1]), _ints(inputs[2])
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        dim = x.shape[axis]
        index[axis] = slice(*slice(start, end, step).indices(dim))
    return x[tuple(index)]


def _pad(node, inputs):
    xp = _xp(inputs[:1])
    mode = _attr(node, "mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode != "constant":
        raise UserError(f"node '{node.name}' (Pad) uses mode '{mode}'; finetune handles constant padding only")
    x = inputs[0]
    pads = _ints(inputs[1]) if len(inputs) > 1 else _ints(_attr(node, "pads"))
    value = inputs[2] if len(inputs) > 2 and inputs[2] is not None else _attr(node, "value", 0.0)  # opset < 11: attribute
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(x.ndim))
    width = [(0, 0)] * x.ndim
    half = len(pads) // 2
    for i, axis in enumerate(axes):
        width[axis % x.ndim] = (pads[i], pads[i + half])
    if any(a < 0 or b < 0 for a, b in width):
        raise UserError(f"node '{node.name}' (Pad) crops with negative pads; finetune does not handle that")
    return xp.pad(x, width, constant_values=float(np.asarray(value).reshape(-1)[0]) if np.size(value) else 0.0)


def _squeeze(node, inputs):
    xp = _xp(inputs[:1])
    axes = _axes(node, inputs, 1)
    return xp.squeeze(inputs[0], axis=None if axes is None else tuple(axes))


def _unsqueeze(node, inputs):
    xp = _xp(inputs[:1])
    x = inputs[0]
    axes = sorted(a % (x.ndim + len(_axes(node, inputs, 1))) for a in _axes(node, inputs, 1))
    for axis in axes:
        x = xp.expand_dims(x, axis)
    return x


def _gather(node, inputs):
    xp = _xp(inputs)
    data, index = inputs
    axis = int(_attr(node, "axis", 0))
    index = _xp([index]).where(index < 0, index + data.shape[axis], index)
    return xp.take(data, index, axis=axis)


def _cast(node, inputs):
    to = ir.DataType(int(_attr(node, "to"))).numpy()
    x = inputs[0]
    return x.astype(to)


def _shape(node, inputs):
    shape = np.asarray(inputs[0].shape, dtype=np.int64)
    start, end = _attr(node, "start"), _attr(node, "end")
    return shape[slice(start, end)]


def _erf(node, inputs):
    import jax

    return jax.scipy.special.erf(inputs[0])


def _unary(fn: str) -> Callable:
    def rule(node, inputs):
        return getattr(_xp(inputs), fn)(inputs[0])
    return rule


def _binary(fn: str) -> Callable:
    def rule(node, inputs):
        return getattr(_xp(inputs), fn)(inputs[0], inputs[1])
    return rule


def _sigmoid(node, inputs):
    import jax

    return jax.nn.sigmoid(inputs[0])


def _relu(node, inputs):
    return _xp(inputs).maximum(inputs[0], 0)


RULES: dict[str, Callable] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": _binary("matmul"),
    "Add": _binary("add"),
    "Sub": _binary("subtract"),
    "Mul": _binary("multiply"),
    "Div": _binary("divide"),
    "Pow": _binary("power"),
    "Max": _binary("maximum"),
    "Min": _binary("minimum"),
    "Neg": _unary("negative"),
    "Sqrt": _unary("sqrt"),
    "Exp": _unary("exp"),
    "Tanh": _unary("tanh"),
    "Reciprocal": lambda node, inputs: 1.0 / inputs[0],
    "Relu": _relu,
    "Sigmoid": _sigmoid,
    "Erf": _erf,
    "Clip": _clip,
    "Softmax": _softmax,
    "MaxPool": lambda node, inputs: _pool(node, inputs, "max"),
    "AveragePool": lambda node, inputs: _pool(node, inputs, "average"),
    "GlobalAveragePool": lambda node, inputs: _jnp().mean(inputs[0], axis=tuple(range(2, inputs[0].ndim)), keepdims=True),
    "GlobalMaxPool": lambda node, inputs: _jnp().max(inputs[0], axis=tuple(range(2, inputs[0].ndim)), keepdims=True),
    "ReduceMean": lambda node, inputs: _reduce(node, inputs, "mean"),
    "ReduceSum": lambda node, inputs: _reduce(node, inputs, "sum"),
    "BatchNormalization": _batchnorm,
    "LayerNormalization": _layernorm,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda node, inputs: _xp(inputs).transpose(inputs[0], _attr(node, "perm")),
    "Concat": lambda node, inputs: _xp(inputs).concatenate(inputs, axis=int(_attr(node, "axis"))),
    "Identity": lambda node, inputs: inputs[0],
    "Shape": _shape,
    "Gather": _gather,
    "Slice": _slice,
    "Pad": _pad,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Cast": _cast,
}


def check_supported(graph: ir.Graph, what: str) -> None:
    """Raise ``UserError`` naming the first node ``RULES`` cannot run (``what`` names the caller)."""
    for node in graph:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            continue
        if node.domain not in ("", "ai.onnx"):
            raise UserError(f"{what} trains float models of standard ops, but node '{node.name}' is {node.domain}.{node.op_type}; "
                            f"run it before quantize and lower")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
            raise UserError(f"{what} trains float weights, but node '{node.name}' is a {node.op_type}; run it before quantize")
        if node.op_type not in RULES:
            raise UserError(f"{what} cannot differentiate node '{node.name}' (op {node.op_type}); it handles "
                            f"{', '.join(sorted(RULES))}")
        auto_pad = _attr(node, "auto_pad", "NOTSET")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        if auto_pad != "NOTSET":
            raise UserError(f"{what}: node '{node.name}' ({node.op_type}) uses auto_pad={auto_pad}; only explicit pads are handled")
        if _attr(node, "ceil_mode", 0):
            raise UserError(f"{what}: node '{node.name}' ({node.op_type}) uses ceil_mode=1, which is not handled")


def _constant(node: ir.Node) -> np.ndarray:
    """The value of a Constant node, whichever attribute holds it."""
    (name, attr), = node.attributes.items()
    if name == "value":
        return attr.value.numpy()
    dtype = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}.get(name)
    if dtype is None:
        raise UserError(f"node '{node.name}' (Constant) holds its value as {name}, which finetune does not read")
    return np.asarray(attr.value, dtype=dtype)


class GraphFunction:
    """``f(params, feed) -> list of outputs`` for ``graph``: ``params`` maps initializer names to
    (traced) arrays and replaces those initializers; every other initializer is a numpy constant."""

    def __init__(self, graph: ir.Graph):
        self.constants = {name: v.const_value.numpy() for name, v in graph.initializers.items() if v.const_value is not None}
        self.nodes = list(graph)
        self.outputs = [v.name for v in graph.outputs]

    def __call__(self, params: dict, feed: dict) -> list:
        env: dict = dict(self.constants)
        env.update(params)
        env.update(feed)
        for node in self.nodes:
            if node.op_type == "Constant":
                env[node.outputs[0].name] = _constant(node)
                continue
            args = [None if v is None else env[v.name] for v in node.inputs]
            result = RULES[node.op_type](node, args)
            env[node.outputs[0].name] = result
        return [env[name] for name in self.outputs]
