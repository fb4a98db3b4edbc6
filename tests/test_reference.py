"""The numpy reference of lowbit's ops (``lowbit.runtime.reference``) and its onnxruntime-extensions path.

Measured when written (numpy 2.4, onnxruntime 1.31, onnxruntime-extensions 0.15.2):

* accuracy=float against a float64 product with the decoded weight: ≤ 1e-7 relative (bound 1e-6);
  ConvLowBit against onnxruntime's Conv on the decoded kernel: ≤ 2e-7 relative.
* accuracy=int8 against accuracy=float on Gaussian data: 0.4–0.9 % relative (bound 2 %).
* through onnxruntime (``prepare`` + ``register``): bit-identical to calling the reference.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.core import io
from lowbit.runtime import ops
from lowbit.runtime import reference as R


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(np.asarray(b, np.float64)).max())


def _weights(rng, n, k, bits, block, fmt="uniform", zero_points=True):
    codes = rng.integers(0, 1 << bits, (n, k))
    blocks = ops.blocks(k, block)
    w = R.pack(codes, bits, block)
    scales = rng.uniform(0.01, 0.1, (n, blocks)).astype(np.float32)
    zp = rng.integers(0, 1 << bits, (n, blocks)).astype(np.uint8) if zero_points and fmt == "uniform" else None
    levels = rng.standard_normal((n, blocks, 1 << bits)).astype(np.float32) if fmt == "codebook" else None
    return codes, w, scales, zp, levels


# -------------------------------------------------------------------------------- packing and decoding


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("block", [16, 32, 64, 128, 256])
def test_pack_unpack_round_trip_and_matmulnbits_layout(bits, block):
    rng = np.random.default_rng(bits * 1000 + block)
    k = block * 2 + 7  # the last block is padded
    codes = rng.integers(0, 1 << bits, (5, k))
    w = R.pack(codes, bits, block)
    assert w.shape == ops.packed_shape(5, k, bits, block)
    assert np.array_equal(R.unpack(w, k, bits, block), codes)
    # code of column k of row n sits in byte (k mod block)·bits/8 of block k // block, low bits first
    n, col = 3, block + 5
    byte = w[n, col // block, (col % block) * bits // 8]
    assert (byte >> ((col % (8 // bits)) * bits)) & ((1 << bits) - 1) == codes[n, col]


@pytest.mark.parametrize("fmt", ["uniform", "codebook"])
def test_decode_follows_the_schema(fmt):
    rng = np.random.default_rng(1)
    codes, w, scales, zp, levels = _weights(rng, 4, 40, 4, 16, fmt)
    got = R.decode(w, scales, zp, levels, K=40, N=4, bits=4, block_size=16, format=fmt)
    b = np.arange(40) // 16
    for n in range(4):
        for k in (0, 15, 16, 39):
            want = (levels[n, b[k], codes[n, k]] if fmt == "codebook" else (codes[n, k] - float(zp[n, b[k]]))) * scales[n, b[k]]
            assert got[n, k] == np.float32(want)
    # absent zero points: 2^(bits-1)
    sym = R.decode(w, scales, None, None, K=40, N=4, bits=4, block_size=16)
    assert np.array_equal(sym, ((codes - 8) * scales[:, b]).astype(np.float32))


# -------------------------------------------------------------------------------- MatMulLowBit


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("fmt", ["uniform", "codebook"])
@pytest.mark.parametrize("k,block", [(64, 32), (100, 32), (37, 16), (300, 256)])
def test_matmul_float_is_the_dense_product(bits, fmt, k, block):
    rng = np.random.default_rng(k + block + bits)
    n = 11
    _, w, scales, zp, levels = _weights(rng, n, k, bits, block, fmt)
    bias = rng.standard_normal(n).astype(np.float32)
    a = rng.standard_normal((2, 3, k)).astype(np.float32)
    dense = R.decode(w, scales, zp, levels, K=k, N=n, bits=bits, block_size=block, format=fmt).astype(np.float64)
    want = a.astype(np.float64) @ dense.T + bias
    y = R.matmul_lowbit(a, w, scales, zp, levels, bias, K=k, N=n, bits=bits, block_size=block, format=fmt)
    assert y.shape == (2, 3, n) and y.dtype == np.float32
    assert _rel(y, want) <= 1e-6


@pytest.mark.parametrize("fmt", ["uniform", "codebook"])
@pytest.mark.parametrize("bits", [2, 4])
def test_matmul_int8_error_is_small_and_follows_the_formula(fmt, bits):
    rng = np.random.default_rng(7)
    n, k, block = 16, 200, 32
    codes, w, scales, zp, levels = _weights(rng, n, k, bits, block, fmt)
    a = rng.standard_normal((8, k)).astype(np.float32)
    exact = R.matmul_lowbit(a, w, scales, zp, levels, None, K=k, N=n, bits=bits, block_size=block, format=fmt)
    y8 = R.matmul_lowbit(a, w, scales, zp, levels, None, K=k, N=n, bits=bits, block_size=block, format=fmt, accuracy="int8")
    assert 1e-4 < _rel(y8, exact) <= 2e-2
    # one output element written out by hand (float64 is exact for these integer sums)
    m, row = 3, 5
    total = 0.0
    for b in range(ops.blocks(k, block)):
        cols = slice(b * block, min(k, (b + 1) * block))
        x = a[m, cols]
        amax = np.abs(x).max()
        q = np.rint(x * (np.float32(127) / amax))
        if fmt == "uniform":
            wint, s = codes[row, cols] - float(zp[row, b]), float(scales[row, b])
        else:
            lmax = np.abs(levels[row, b]).max()
            wint = np.rint(levels[row, b, codes[row, cols]] * (np.float32(127) / lmax))
            s = float(np.float16(scales[row, b] * (lmax / np.float32(127))))  # rounded to a half (in range here)
        total += float(amax / np.float32(127)) * s * float(q @ wint)
    assert abs(y8[m, row] - total) <= 1e-5 * max(1.0, abs(total))


def test_matmul_int8_rounds_ties_to_even_and_zero_rows():
    k, n = 16, 1
    w = R.pack(np.full((n, k), 9), 4, 16)  # code 9 − 8 = 1
    scales = np.ones((n, 1), np.float32)
    a = np.zeros((2, k), np.float32)
    a[0, 0], a[0, 1], a[0, 2] = 254.0, 1.0, 3.0  # 127/254 = 0.5 → 0.5 → 0 and 1.5 → 2 (half to even)
    y = R.matmul_lowbit(a, w, scales, K=k, N=n, bits=4, block_size=16, accuracy="int8")
    assert y[0, 0] == np.float32(2.0) * (127 + 0 + 2)  # (amax/127)·Σq = 2·129
    assert y[1, 0] == 0.0  # amax = 0: q = 0


def test_matmul_empty_rows():
    rng = np.random.default_rng(0)
    _, w, scales, zp, _ = _weights(rng, 3, 32, 2, 32)
    y = R.matmul_lowbit(np.zeros((0, 4, 32), np.float32), w, scales, zp, K=32, N=3, bits=2, block_size=32, accuracy="int8")
    assert y.shape == (0, 4, 3)


def test_padding_columns_are_never_read():
    rng = np.random.default_rng(3)
    k, n = 40, 5
    codes = rng.integers(0, 16, (n, k))
    a = rng.standard_normal((4, k)).astype(np.float32)
    scales = rng.uniform(0.5, 1, (n, 3)).astype(np.float32)
    outs = [R.matmul_lowbit(a, R.pack(codes, 4, 16, pad_code=pad), scales, K=k, N=n, bits=4, block_size=16, accuracy=acc)
            for acc in ("float", "int8") for pad in (0, 15)]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[2], outs[3])


# -------------------------------------------------------------------------------- ConvLowBit


def _ort_conv(x, kernel, bias, **attrs):
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(kernel, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("case", [
    dict(c=6, n=4, kernel=(3, 3), group=1, strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1), bits=4, block=32, fmt="uniform"),
    dict(c=6, n=6, kernel=(3, 3), group=6, strides=(2, 1), pads=(1, 0, 2, 1), dilations=(1, 2), bits=2, block=16, fmt="uniform"),
    dict(c=8, n=4, kernel=(3, 2), group=2, strides=(2, 2), pads=(0, 1, 1, 0), dilations=(2, 1), bits=4, block=16, fmt="codebook"),
    dict(c=5, n=3, kernel=(1, 1), group=1, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), bits=2, block=64, fmt="codebook"),
])
def test_conv_equals_onnx_conv_on_the_decoded_kernel(case):
    rng = np.random.default_rng(case["c"] * 10 + case["n"])
    c, n, (kh, kw), group = case["c"], case["n"], case["kernel"], case["group"]
    k = c // group * kh * kw
    _, w, scales, zp, levels = _weights(rng, n, k, case["bits"], case["block"], case["fmt"])
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((2, c, 9, 11)).astype(np.float32)
    attrs = dict(kernel_shape=case["kernel"], strides=case["strides"], pads=case["pads"], dilations=case["dilations"], group=group)
    y = R.conv_lowbit(x, w, scales, zp, levels, bias, N=n, K=k, bits=case["bits"], block_size=case["block"],
                      format=case["fmt"], **attrs)
    kernel = R.decode(w, scales, zp, levels, K=k, N=n, bits=case["bits"], block_size=case["block"],
                      format=case["fmt"]).reshape(n, c // group, kh, kw)
    want = _ort_conv(x, kernel, bias, **{key: list(v) if isinstance(v, tuple) else v for key, v in attrs.items()})
    assert y.shape == want.shape
    assert _rel(y, want) <= 1e-6
    y8 = R.conv_lowbit(x, w, scales, zp, levels, bias, N=n, K=k, bits=case["bits"], block_size=case["block"],
                       format=case["fmt"], accuracy="int8", **attrs)
    assert _rel(y8, want) <= 2e-2


# -------------------------------------------------------------------------------- Hadamard


@pytest.mark.parametrize("order", ["natural", "sequency"])
def test_hadamard_is_orthogonal_and_ordered(order):
    size = 64
    h = R.hadamard(np.eye(size, dtype=np.float32), size=size, order=order)  # rows: H·e_j → columns of H
    assert np.abs(h @ h.T - np.eye(size)).max() <= 1e-6
    signs = np.sign(h.T)  # rows of the matrix the op applies
    changes = np.count_nonzero(np.diff(signs, axis=1), axis=1)
    if order == "sequency":
        assert changes.tolist() == list(range(size))  # row i has i sign changes
        assert np.abs(h.T @ h - np.eye(size)).max() <= 1e-6  # its inverse is its transpose
    else:
        assert np.allclose(h, h.T) and np.abs(h @ h - np.eye(size)).max() <= 1e-6  # its own inverse


def test_hadamard_groups_and_scale_match_the_dense_matrix():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 5, 96)).astype(np.float32)
    for order in ("natural", "sequency"):
        y = R.hadamard(x, size=96, group=32, order=order, scale=0.5)
        dense = np.kron(np.eye(3), R.hadamard_matrix(32, order).astype(np.float64)) * 0.5
        assert _rel(y, x.astype(np.float64) @ dense.T) <= 1e-6
    natural = R.hadamard_matrix(8)
    for i, row in enumerate(R.hadamard_matrix(8, "sequency")):
        assert np.array_equal(row, natural[ops.sequency_permutation(8)[i]])


# -------------------------------------------------------------------------------- validation


def _mm_args(**change):
    rng = np.random.default_rng(0)
    _, w, scales, zp, _ = _weights(rng, 4, 48, 4, 32)
    args = dict(A=np.ones((2, 48), np.float32), W=w, scales=scales, zero_points=zp, levels=None, bias=None,
                K=48, N=4, bits=4, block_size=32)
    args.update(change)
    return args


@pytest.mark.parametrize("change,named", [
    (dict(W=np.zeros((4, 2, 15), np.uint8)), "input 'W' holds 120 bytes"),
    (dict(W=np.zeros((4, 32), np.uint8)), "input 'W' has shape"),
    (dict(scales=np.ones((4, 3), np.float32)), "input 'scales' has shape"),
    (dict(scales=np.full((4, 2), np.nan, np.float32)), "input 'scales' holds 8 NaN"),
    (dict(bits=3), "attribute 'bits'"),
    (dict(block_size=48), "attribute 'block_size'"),
    (dict(zero_points=np.full((4, 2), 16, np.uint8)), "input 'zero_points' holds 16"),
    (dict(levels=np.ones((4, 2, 16), np.float32)), "input 'levels' is refused with format=uniform"),
    (dict(format="codebook", zero_points=None), "input 'levels' is required"),
    (dict(A=np.ones((2, 47), np.float32)), "input 'A' has shape [2, 47]"),
    (dict(A=np.ones((2, 48), np.float64)), "input 'A' must be float32"),
    (dict(K=0), "attribute 'K'"),
    (dict(accuracy="int4"), "attribute 'accuracy'"),
    (dict(bias=np.ones(5, np.float32)), "input 'bias' has shape"),
])
def test_matmul_validation_names_the_input(change, named):
    args = _mm_args(**change)
    a = args.pop("A")
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        R.matmul_lowbit(a, **args)


def test_conv_and_hadamard_validation_names_the_attribute():
    rng = np.random.default_rng(0)
    _, w, scales, _, _ = _weights(rng, 4, 27, 4, 32)
    x = np.ones((1, 3, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"input .X. has shape \[1, 4, 5, 5\].*= 3"):
        R.conv_lowbit(np.ones((1, 4, 5, 5), np.float32), w, scales, N=4, K=27, bits=4, block_size=32, kernel_shape=(3, 3))
    with pytest.raises(ValueError, match="attribute 'pads'"):
        R.conv_lowbit(x, w, scales, N=4, K=27, bits=4, block_size=32, kernel_shape=(3, 3), pads=(1, 1))
    with pytest.raises(ValueError, match="attribute 'group'"):
        R.conv_lowbit(x, w, scales, N=4, K=27, bits=4, block_size=32, kernel_shape=(3, 3), group=3)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        R.conv_lowbit(x, w, scales, N=4, K=27, bits=4, block_size=32, kernel_shape=(3, 3), dilations=(3, 3))
    with pytest.raises(ValueError, match="attribute 'group' must be a power of two"):
        R.hadamard(np.ones((2, 12), np.float32), size=12, group=12)
    with pytest.raises(ValueError, match="attribute 'order'"):
        R.hadamard(np.ones((2, 8), np.float32), size=8, order="walsh")
    with pytest.raises(ValueError, match="input 'X' has shape"):
        R.hadamard(np.ones((2, 8), np.float32), size=16)


# -------------------------------------------------------------------------------- onnxruntime-extensions


def _const(name, array):
    return ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                    type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))


def _one_node(op, x_shape, inputs: dict, attrs: dict, name="lowbit_node") -> bytes:
    x = ir.Value(name="x", shape=ir.Shape(x_shape), type=ir.TensorType(ir.DataType.FLOAT))
    values, initializers = [x], []
    for key, array in inputs.items():
        if array is None:
            values.append(None)
        else:
            values.append(_const(key, array))
            initializers.append(values[-1])
    while values and values[-1] is None:
        values.pop()
    node = ir.node(op, values, domain="lowbit", attributes=attrs, name=name)
    node.outputs[0].name = "y"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], initializers=initializers,
                     opset_imports={"": 21, "lowbit": 1})
    return io.to_bytes(ir.Model(graph, ir_version=10))


def _ext_session(model_bytes: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    R.register(opts)
    R.register(opts)  # registering twice is harmless
    return ort.InferenceSession(R.prepare(model_bytes), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("fmt,accuracy", [("uniform", "float"), ("uniform", "int8"), ("codebook", "int8")])
def test_extensions_matmul_equals_the_reference(fmt, accuracy):
    rng = np.random.default_rng(11)
    n, k = 9, 70
    _, w, scales, zp, levels = _weights(rng, n, k, 2, 32, fmt, zero_points=(accuracy == "float"))
    bias = rng.standard_normal(n).astype(np.float32)
    attrs = dict(K=k, N=n, bits=2, block_size=32, format=fmt, accuracy=accuracy)
    model = _one_node("MatMulLowBit", ["B", "S", k], dict(W=w, scales=scales, zero_points=zp, levels=levels, bias=bias), attrs)
    proto = onnx.ModelProto.FromString(R.prepare(model))
    assert [(nd.domain, nd.op_type) for nd in proto.graph.node][-1] == ("ai.onnx.contrib", "LowbitMatMulLowBit")
    sess = _ext_session(model)
    a = rng.standard_normal((2, 3, k)).astype(np.float32)
    want = R.matmul_lowbit(a, w, scales, zp, levels, bias, **attrs)
    assert np.array_equal(sess.run(None, {"x": a})[0], want)
    assert sess.run(None, {"x": a[:0]})[0].shape == (0, 3, n)


def test_extensions_conv_and_hadamard_equal_the_reference():
    rng = np.random.default_rng(12)
    c, n, group = 4, 6, 2
    k = c // group * 9
    _, w, scales, zp, _ = _weights(rng, n, k, 4, 16)
    attrs = dict(N=n, K=k, bits=4, block_size=16, kernel_shape=[3, 3], strides=[2, 1], pads=[1, 0, 1, 2], group=group)
    sess = _ext_session(_one_node("ConvLowBit", ["B", c, "H", "W"], dict(W=w, scales=scales, zero_points=zp), attrs))
    x = rng.standard_normal((2, c, 8, 7)).astype(np.float32)
    want = R.conv_lowbit(x, w, scales, zp, None, None, **attrs)
    assert np.array_equal(sess.run(None, {"x": x})[0], want)

    hattrs = dict(size=48, group=16, order="sequency")
    sess = _ext_session(_one_node("Hadamard", ["B", 48], {}, hattrs))
    x = rng.standard_normal((5, 48)).astype(np.float32)
    assert np.array_equal(sess.run(None, {"x": x})[0], R.hadamard(x, **hattrs))


def test_extensions_errors_name_the_node_and_input():
    rng = np.random.default_rng(13)
    _, w, scales, zp, _ = _weights(rng, 4, 48, 4, 32)
    attrs = dict(K=48, N=4, bits=4, block_size=32)
    bad_scales = scales.copy()
    bad_scales[1, 1] = np.nan
    with pytest.raises(ValueError, match="MatMulLowBit node 'fc': input 'scales' holds 1 NaN"):
        R.prepare(_one_node("MatMulLowBit", ["M", 48], dict(W=w, scales=bad_scales), attrs, name="fc"))
    with pytest.raises(ValueError, match="node 'fc': input 'W' holds 64 bytes"):
        R.prepare(_one_node("MatMulLowBit", ["M", 48], dict(W=w[:, :1], scales=scales), attrs, name="fc"))
    with pytest.raises(ValueError, match="node 'fc': attribute 'bits'"):
        R.prepare(_one_node("MatMulLowBit", ["M", 48], dict(W=w, scales=scales), dict(attrs, bits=3), name="fc"))
    with pytest.raises(ValueError, match="node 'h': attribute 'size' is required"):
        R.prepare(_one_node("Hadamard", ["M", 8], {}, {}, name="h"))
    # a wrong activation width fails the run (never the process) in the guard named after the problem
    sess = _ext_session(_one_node("MatMulLowBit", ["M", "K"], dict(W=w, scales=scales, zero_points=zp), attrs, name="fc"))
    for width in (47, 96, 1):  # 96 = 2·48 and 1 (broadcastable) too
        with pytest.raises(Exception, match="input 'A' of MatMulLowBit node 'fc' must end in K = 48"):
            sess.run(None, {"x": np.ones((2, width), np.float32)})
    assert sess.run(None, {"x": np.ones((2, 48), np.float32)})[0].shape == (2, 4)
    sess = _ext_session(_one_node("Hadamard", ["M", "S"], {}, dict(size=16), name="h"))
    with pytest.raises(Exception, match="input 'X' of Hadamard node 'h' must end in size = 16"):
        sess.run(None, {"x": np.ones((2, 8), np.float32)})
    k = 2 * 9
    _, w, scales, _, _ = _weights(rng, 4, k, 4, 32)
    conv = dict(N=4, K=k, bits=4, block_size=32, kernel_shape=[3, 3])
    sess = _ext_session(_one_node("ConvLowBit", ["B", "C", 5, 5], dict(W=w, scales=scales), conv, name="c"))
    with pytest.raises(Exception, match=r"input 'X' of ConvLowBit node 'c' must be \[B, C, H, W\] with C = 2"):
        sess.run(None, {"x": np.ones((1, 3, 5, 5), np.float32)})
    assert sess.run(None, {"x": np.ones((1, 2, 5, 5), np.float32)})[0].shape == (1, 4, 3, 3)


# -------------------------------------------------------------------------------- ConvLowBit's residual input Z
# (a fused Add: Y = min(max((conv + bias) + Z, clip_min), clip_max), Z of exactly Y's shape)


def _ort_conv_add(x, kernel, bias, z, clip, **attrs):
    """onnxruntime's Conv → Add(Z) → Clip, unoptimized (three nodes, as the model before lowering)."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], **attrs), helper.make_node("Add", ["c", "z"], ["s"]),
             helper.make_node("Clip", ["s", "lo", "hi"], ["y"])]
    inits = [numpy_helper.from_array(kernel, "w"), numpy_helper.from_array(bias, "b"),
             numpy_helper.from_array(np.array(clip[0], np.float32), "lo"), numpy_helper.from_array(np.array(clip[1], np.float32), "hi")]
    graph = helper.make_graph(nodes, "conv_add", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
                                                  helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, "z": z})[0]


@pytest.mark.parametrize("clip", [(-np.inf, np.inf), (0.0, np.inf), (-0.5, 0.75)])
def test_conv_residual_z_is_added_after_the_bias_and_before_the_clamp(clip):
    rng = np.random.default_rng(41)
    c, n, group = 6, 4, 2
    k = c // group * 9
    _, w, scales, zp, _ = _weights(rng, n, k, 4, 16)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((2, c, 9, 8)).astype(np.float32)
    attrs = dict(kernel_shape=[3, 3], strides=[2, 1], pads=[1, 0, 1, 1], group=group)
    z = rng.standard_normal((2, n, 5, 7)).astype(np.float32)
    weight = dict(N=n, K=k, bits=4, block_size=16)
    y = R.conv_lowbit(x, w, scales, zp, None, bias, z, **weight, **attrs, clip_min=clip[0], clip_max=clip[1])
    # exactly the float32 additions of onnxruntime's separate Add, then the clamp
    plain = R.conv_lowbit(x, w, scales, zp, None, bias, **weight, **attrs)
    assert y.dtype == np.float32 and y.shape == (2, n, 5, 7)
    assert np.array_equal(y, np.clip(plain + z, np.float32(clip[0]), np.float32(clip[1])))
    kernel = R.decode(w, scales, zp, None, K=k, N=n, bits=4, block_size=16).reshape(n, c // group, 3, 3)
    want = _ort_conv_add(x, kernel, bias, z, clip, **attrs)
    assert _rel(y, want) <= 1e-6
    # without a bias, Z is added to the convolution alone
    y0 = R.conv_lowbit(x, w, scales, zp, None, None, z, **weight, **attrs)
    assert np.array_equal(y0, R.conv_lowbit(x, w, scales, zp, None, None, **weight, **attrs) + z)


def test_conv_residual_z_validation_names_the_input():
    rng = np.random.default_rng(42)
    _, w, scales, _, _ = _weights(rng, 4, 27, 4, 32)
    x = np.ones((2, 3, 5, 5), np.float32)
    conv = dict(N=4, K=27, bits=4, block_size=32, kernel_shape=(3, 3), pads=(1, 1, 1, 1))
    for shape in ((1, 4, 5, 5), (2, 4, 5), (2, 1, 5, 5), (2, 4, 1, 1)):  # never broadcast
        with pytest.raises(ValueError, match=rf"input 'Z' has shape \[{', '.join(map(str, shape))}\], expected \[2, 4, 5, 5\]"):
            R.conv_lowbit(x, w, scales, None, None, None, np.zeros(shape, np.float32), **conv)
    with pytest.raises(ValueError, match="input 'Z' must be float32, not float64"):
        R.conv_lowbit(x, w, scales, None, None, None, np.zeros((2, 4, 5, 5)), **conv)
    assert R.conv_lowbit(x, w, scales, None, None, None, np.zeros((2, 4, 5, 5), np.float32), **conv).shape == (2, 4, 5, 5)


def _conv_z_node(w, scales, attrs, *, z_shape, name="c", bias=None) -> bytes:
    """x, z (graph inputs) → ConvLowBit(x, W, scales, "", "", bias?, z) → y."""
    x = ir.Value(name="x", shape=ir.Shape(["B", attrs["K"] // 9 * attrs.get("group", 1), "H", "W"]),
                 type=ir.TensorType(ir.DataType.FLOAT))
    z = ir.Value(name="z", shape=ir.Shape(z_shape), type=ir.TensorType(ir.DataType.FLOAT))
    consts = [_const("W", w), _const("scales", scales)] + ([_const("bias", bias)] if bias is not None else [])
    node = ir.node("ConvLowBit", [x, consts[0], consts[1], None, None, consts[2] if bias is not None else None, z],
                   domain="lowbit", attributes=attrs, name=name)
    node.outputs[0].name = "y"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x, z], [node.outputs[0]], nodes=[node], initializers=consts, opset_imports={"": 21, "lowbit": 1})
    return io.to_bytes(ir.Model(graph, ir_version=10))


def test_extensions_conv_with_z_equals_the_reference(monkeypatch, tmp_path):
    """The onnxruntime-extensions path takes Z (a run-time input after absent optionals) and the
    fused clamp; through ``lowbit.session`` without the native library too."""
    from lowbit.runtime.session import session

    rng = np.random.default_rng(43)
    c, n = 4, 6
    k = c * 9
    _, w, scales, _, _ = _weights(rng, n, k, 4, 16)
    bias = rng.standard_normal(n).astype(np.float32)
    attrs = dict(N=n, K=k, bits=4, block_size=16, kernel_shape=[3, 3], pads=[1, 1, 1, 1], clip_min=0.0, clip_max=1.5)
    model = _conv_z_node(w, scales, attrs, z_shape=["B", n, "H", "W"], bias=bias)
    proto = onnx.ModelProto.FromString(R.prepare(model))
    contrib = [nd for nd in proto.graph.node if nd.domain == "ai.onnx.contrib"]
    assert len(contrib) == 1 and len(contrib[0].input) == 7 and contrib[0].input[6] == "z"
    x = rng.standard_normal((2, c, 6, 5)).astype(np.float32)
    z = rng.standard_normal((2, n, 6, 5)).astype(np.float32)
    want = R.conv_lowbit(x, w, scales, None, None, bias, z, **attrs)
    assert 0 < np.mean(want == 0) < 1 and 0 < np.mean(want == np.float32(1.5)) < 1  # both bounds reached
    assert np.array_equal(_ext_session(model).run(None, {"x": x, "z": z})[0], want)
    monkeypatch.setenv("LOWBIT_OPS_LIBRARY", "none")
    (tmp_path / "m.onnx").write_bytes(model)
    sess = session(tmp_path / "m.onnx")
    assert sess.lowbit_implementation == "reference"
    assert np.array_equal(sess.run(None, {"x": x, "z": z})[0], want)
    # without Z the same node (Z absent) gives the convolution alone
    no_z = _one_node("ConvLowBit", ["B", c, "H", "W"], dict(W=w, scales=scales, zero_points=None, levels=None, bias=bias),
                     attrs)
    assert np.array_equal(_ext_session(no_z).run(None, {"x": x})[0], R.conv_lowbit(x, w, scales, None, None, bias, **attrs))


def test_extensions_conv_z_errors():
    rng = np.random.default_rng(44)
    _, w, scales, _, _ = _weights(rng, 4, 18, 4, 16)
    attrs = dict(N=4, K=18, bits=4, block_size=16, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    # what Z's static shape tells is checked by prepare
    with pytest.raises(ValueError, match=r"ConvLowBit node 'c': input 'Z' has shape \['B', 3, 'H', 'W'\], expected Y's shape"):
        R.prepare(_conv_z_node(w, scales, attrs, z_shape=["B", 3, "H", "W"]))
    with pytest.raises(ValueError, match=r"ConvLowBit node 'c': input 'Z' has shape \['B', 4\]"):
        R.prepare(_conv_z_node(w, scales, attrs, z_shape=["B", 4]))
    # the rest at run time: the Python op never raises (that would abort the process), it names Z and returns NaN
    sess = _ext_session(_conv_z_node(w, scales, attrs, z_shape=["B", 4, "H", "W"]))
    x = np.ones((1, 2, 5, 5), np.float32)
    y = sess.run(None, {"x": x, "z": np.ones((1, 4, 5, 4), np.float32)})[0]
    assert not np.isfinite(y).any() and R.LAST_ERROR == "c: input 'Z' has shape [1, 4, 5, 4], expected [1, 4, 5, 5]"
    y = sess.run(None, {"x": x, "z": np.ones((1, 4, 5, 5), np.float32)})[0]
    assert np.array_equal(y, R.conv_lowbit(x, w, scales, None, None, None, np.ones((1, 4, 5, 5), np.float32), **attrs))
