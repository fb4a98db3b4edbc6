"""Analysis layer: exact MAC / parameter / byte counts on graphs built here, weight-storage
statuses, shape inference fallbacks, non-mutation, and compare_models' error and latency numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from lowbit.analysis import (
    compare_models,
    format_compare,
    format_stats,
    format_table,
    human_bytes,
    human_count,
    infer_shapes,
    jsonable,
    measure_latency,
    model_stats,
    node_macs,
    weight_status,
)

F = ir.DataType.FLOAT
MODELS = Path(__file__).resolve().parent.parent / "models"


# --------------------------------------------------------------------------------------------
# graph building helpers
# --------------------------------------------------------------------------------------------


class G:
    """A tiny builder: inputs, initializers and nodes of one graph."""

    def __init__(self, opsets=None):
        self.inputs, self.inits, self.nodes = [], [], []
        self.opsets = {"": 21, **(opsets or {})}

    def input(self, name, shape, dtype=F):
        v = ir.val(name, dtype, None if shape is None else ir.Shape(shape))
        self.inputs.append(v)
        return v

    def init(self, name, array):
        v = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        v.shape = ir.Shape(array.shape)
        v.dtype = v.const_value.dtype
        self.inits.append(v)
        return v

    def op(self, op_type, inputs, out=None, domain="", **attrs):
        node = ir.node(op_type, inputs, attributes=attrs, domain=domain, name=f"{op_type.lower()}{len(self.nodes)}")
        node.outputs[0].name = out or f"{op_type.lower()}{len(self.nodes)}_out"
        self.nodes.append(node)
        return node.outputs[0]

    def model(self, *outputs, dtype=F):
        for o in outputs:
            if o.dtype is None:
                o.dtype = dtype
        graph = ir.Graph(self.inputs, list(outputs), nodes=self.nodes, initializers=self.inits,
                         opset_imports=self.opsets, name="g")
        return ir.Model(graph, ir_version=10)


def rng(seed=0):
    return np.random.default_rng(seed)


def serialized(model):
    return ir.to_proto(model).SerializeToString()


def node_named(model, prefix):
    return next(n for n in model.graph if n.name.startswith(prefix))


def conv_model(batch="N"):
    g = G()
    x = g.input("x", [batch, 3, 8, 8])
    w = g.init("w", rng().standard_normal((8, 3, 3, 3)).astype(np.float32))
    b = g.init("b", rng(1).standard_normal(8).astype(np.float32))
    y = g.op("Conv", [x, w, b], "y", pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    return g.model(g.op("Relu", [y], "z"))


# --------------------------------------------------------------------------------------------
# MACs
# --------------------------------------------------------------------------------------------


def test_conv_macs_params_and_bytes():
    model = conv_model()
    stats = model_stats(model)
    assert stats.macs == 8 * 3 * 9 * 8 * 8 == 13824
    assert stats.macs_by_op == {"Conv": 13824}
    assert stats.params == 8 * 3 * 9 + 8
    assert stats.bytes_by_dtype == {"float32": 4 * (8 * 3 * 9 + 8)}
    assert stats.tensor_bytes == 896
    assert stats.op_types == {"Conv": 1, "Relu": 1}
    # batch scales MACs linearly; symbolic dims resolve to the batch given
    assert model_stats(model, batch=4).macs == 4 * 13824
    [layer] = stats.top_macs
    assert layer["op"] == "Conv" and layer["shape"] == [8, 3, 3, 3] and layer["params"] == 224
    assert stats.inputs == [{"name": "x", "dtype": "float32", "shape": ["N", 3, 8, 8]}]


def test_symbolic_spatial_dims_use_default_dim():
    g = G()
    x = g.input("x", ["batch", 3, "H", "W"])
    w = g.init("w", np.ones((8, 3, 3, 3), np.float32))
    model = g.model(g.op("Conv", [x, w], "y", pads=[1, 1, 1, 1]))
    shaped = infer_shapes(model, batch=2, dim=16)
    assert shaped.graph.outputs[0].shape == ir.Shape([2, 8, 16, 16])
    assert model_stats(model, batch=2, dim=16).macs == 2 * 8 * 27 * 16 * 16
    # the input model still has its symbols and no shape on y
    assert [str(d) for d in model.graph.inputs[0].shape] == ["batch", "3", "H", "W"]


def test_depthwise_conv_macs():
    g = G()
    x = g.input("x", [1, 8, 8, 8])
    w = g.init("w", np.ones((8, 1, 3, 3), np.float32))
    y = g.op("Conv", [x, w], "y", pads=[1, 1, 1, 1], strides=[2, 2], group=8)
    model = g.model(y)
    shaped = infer_shapes(model)
    assert shaped.graph.outputs[0].shape == ir.Shape([1, 8, 4, 4])
    assert node_macs(node_named(shaped, "conv")) == 8 * 1 * 9 * 4 * 4 == 1152
    assert model_stats(model).macs == 1152


def test_gemm_matmul_einsum_macs():
    g = G()
    a = g.input("a", [4, 16])
    w = g.init("w", np.ones((10, 16), np.float32))
    gemm = g.op("Gemm", [a, w], "gemm", transB=1)
    x = g.input("x", [2, 3, 4, 5])
    b = g.init("b", np.ones((5, 6), np.float32))
    mm = g.op("MatMul", [x, b], "mm")
    # two activations, broadcast batch dims (2,1) × (3,) → (2,3)
    p = g.input("p", [2, 1, 4, 5])
    q = g.input("q", [3, 5, 6])
    mm2 = g.op("MatMul", [p, q], "mm2")
    e = g.input("e", [2, 3, 4])
    we = g.init("we", np.ones((4, 5), np.float32))
    ein = g.op("Einsum", [e, we], "ein", equation="bij,jk->bik")
    model = g.model(gemm, mm, mm2, ein)
    shaped = infer_shapes(model)
    macs = {n.name: node_macs(n) for n in shaped.graph}
    assert macs == {"gemm0": 4 * 16 * 10, "matmul1": 2 * 3 * 4 * 5 * 6, "matmul2": 2 * 3 * 4 * 5 * 6,
                    "einsum3": 2 * 3 * 4 * 5}
    stats = model_stats(model)
    assert stats.macs == 640 + 720 + 720 + 120
    assert stats.macs_by_op == {"MatMul": 1440, "Gemm": 640, "Einsum": 120}
    # only nodes with a constant weight are weight-bearing: the activation×activation MatMul is not
    assert [w["node"] for w in stats.weights] == ["gemm0", "matmul1", "einsum3"]
    # an explicit shapes mapping overrides (here: a batch of 7 rows for the Gemm)
    assert node_macs(node_named(model, "gemm"), {"a": (7, 16)}) == 7 * 16 * 10
    assert node_macs(node_named(model, "matmul2")) == 720  # shapes read from the values themselves


def test_conv_transpose_macs():
    g = G()
    x = g.input("x", [1, 4, 5, 5])
    w = g.init("w", np.ones((4, 2, 3, 3), np.float32))
    y = g.op("ConvTranspose", [x, w], "y", strides=[2, 2])
    w2 = g.init("w2", np.ones((4, 1, 3, 3), np.float32))
    y2 = g.op("ConvTranspose", [x, w2], "y2", strides=[2, 2], group=2)
    model = g.model(y, y2)
    shaped = infer_shapes(model)
    assert shaped.graph.outputs[0].shape == ir.Shape([1, 2, 11, 11])
    # each of the 4·5·5 inputs is scattered onto (M/g)·3·3 outputs
    assert [node_macs(n) for n in shaped.graph] == [100 * 2 * 9, 100 * 1 * 9]


def test_non_compute_ops_count_zero_and_unknown_is_none():
    g = G()
    x = g.input("x", [1, 4])
    model = g.model(g.op("Relu", [x], "y"))
    assert node_macs(model.graph.node(0)) == 0
    g = G()
    a, b = g.input("a", None), g.input("b", None)
    model = g.model(g.op("MatMul", [a, b], "y"))
    assert node_macs(model.graph.node(0)) is None
    stats = model_stats(model)
    assert stats.unknown_macs == ["matmul0"] and stats.macs == 0


# --------------------------------------------------------------------------------------------
# weight storage, bytes by dtype
# --------------------------------------------------------------------------------------------


def int4_blocked_model():
    g = G()
    x = g.input("x", [1, 64])
    q = rng().integers(-8, 8, size=(64, 16)).astype(ml_dtypes.int4)
    wq = g.init("w_q", q)
    scale = g.init("w_scale", np.full((2, 16), 0.1, np.float32))
    w = g.op("DequantizeLinear", [wq, scale], "w_dq", axis=0, block_size=32)
    y = g.op("MatMul", [x, w], "y")
    g.init("odd_int4", np.zeros((3, 5), ml_dtypes.int4))  # 15 elements → 8 bytes
    return g.model(y)


def test_int4_blocked_qdq_status_and_packed_bytes():
    model = int4_blocked_model()
    before = serialized(model)
    stats = model_stats(model)
    [w] = stats.weights
    assert w["status"] == "qdq int4 block=32"
    assert (w["kind"], w["bits"], w["block"], w["weight"]) == ("qdq", 4, 32, "w_q")
    assert w["shape"] == [64, 16] and w["params"] == 1024
    assert w["bytes"] == 512 + 2 * 16 * 4
    assert stats.bytes_by_dtype == {"int4": 512 + math.ceil(15 / 2), "float32": 128}
    assert stats.params == 1024 + 32 + 15
    assert stats.macs == 64 * 16
    assert stats.quantization == {"qdq int4 block=32": 1}
    assert serialized(model) == before


def test_other_weight_statuses():
    g = G()
    x = g.input("x", [2, 8])
    # per-channel int8 QDQ, through a Transpose
    q8 = g.init("q8", rng().integers(-127, 127, size=(4, 8)).astype(np.int8))
    s8 = g.init("s8", np.full((4,), 0.02, np.float32))
    w8 = g.op("Transpose", [g.op("DequantizeLinear", [q8, s8], "dq8", axis=0)], "w8t", perm=[1, 0])
    y1 = g.op("MatMul", [x, w8], "y1")
    # fake quantisation of a float weight
    wf = g.init("wf", rng(2).standard_normal((8, 4)).astype(np.float32))
    sf = g.init("sf", np.array(0.05, np.float32))
    zf = g.init("zf", np.array(0, np.int8))
    fq = g.op("DequantizeLinear", [g.op("QuantizeLinear", [wf, sf, zf], "q"), sf, zf], "dq")
    y2 = g.op("MatMul", [x, fq], "y2")
    # codebook: Gather(table of 16 floats, constant indices)
    table = g.init("table", np.linspace(-1, 1, 16, dtype=np.float32))
    idx = g.init("idx", rng(3).integers(0, 16, size=(8, 4)).astype(np.uint8))
    wc = g.op("Gather", [table, idx], "wc")
    y3 = g.op("MatMul", [x, wc], "y3")
    model = g.model(y1, y2, y3)
    statuses = {w["node"]: w["status"] for w in weight_status(model)}
    assert statuses == {"matmul2": "qdq int8 per-channel", "matmul5": "fakequant int8", "matmul7": "codebook k=16"}
    stats = model_stats(model)
    assert stats.macs == 3 * 2 * 8 * 4


def test_embedding_gather_and_constant_nodes():
    g = G()
    ids = g.input("ids", ["batch", "seq"], ir.DataType.INT64)
    table = g.init("emb", rng().standard_normal((100, 8)).astype(np.float32))
    e = g.op("Gather", [table, ids], "e")
    shape = g.op("Constant", [], "shape", value=ir.tensor(np.array([-1, 8], np.int64)))
    model = g.model(g.op("Reshape", [e, shape], "flat"))
    stats = model_stats(model, batch=2, dim=5)
    [w] = stats.weights
    assert (w["node"], w["status"], w["shape"], w["params"]) == ("gather0", "float", [100, 8], 800)
    assert stats.macs == 0
    assert stats.params == 800 + 2  # the Constant node's two elements count too
    assert stats.bytes_by_dtype == {"float32": 3200, "int64": 16}
    assert infer_shapes(model, batch=2, dim=5).graph.outputs[0].shape == ir.Shape([10, 8])


def test_data_dependent_shape_from_an_onnxruntime_run():
    g = G()
    x = g.input("x", [1, 6])
    model = g.model(g.op("NonZero", [x], "nz"), dtype=ir.DataType.INT64)
    shaped = infer_shapes(model)
    # random normal inputs are never exactly zero: every one of the 6 positions is listed
    assert shaped.graph.outputs[0].shape == ir.Shape([2, 6])
    assert shaped.meta["lowbit.shape_source"] == "onnx+onnxruntime"
    # ONNX alone knows only the rank and the first dim
    alone = infer_shapes(model, use_onnxruntime=False).graph.outputs[0].shape
    assert alone[0] == 2 and not isinstance(alone[1], int)


def test_matmulnbits_shapes_from_onnxruntime():
    k, n = 32, 16
    g = G({"com.microsoft": 1})
    x = g.input("x", ["batch", k])
    b = g.init("B", np.zeros((n, 1, 16), np.uint8))
    s = g.init("S", np.ones((n,), np.float32))
    y = g.op("MatMulNBits", [x, b, s], "y", domain="com.microsoft", K=k, N=n, bits=4, block_size=32)
    model = g.model(g.op("Relu", [y], "z"))
    before = serialized(model)
    shaped = infer_shapes(model, batch=3)
    assert shaped.meta["lowbit.shape_source"] == "onnx+onnxruntime"
    assert [v.shape for n_ in shaped.graph for v in n_.outputs] == [ir.Shape([3, n]), ir.Shape([3, n])]
    stats = model_stats(model, batch=3)
    assert stats.macs == 3 * k * n and stats.macs_by_op == {"com.microsoft.MatMulNBits": 3 * k * n}
    [w] = stats.weights
    assert w["status"] == "matmulnbits bits=4 block=32" and w["shape"] == [n, k]
    assert w["bytes"] == n * 16 + n * 4
    assert serialized(model) == before


def test_lowbit_ops_by_attribute():
    g = G({"lowbit": 1})
    x = g.input("x", [2, 64])
    packed = g.init("wp", np.zeros((16, 16), np.uint8))
    y = g.op("MatMulLowBit", [x, packed], "y", domain="lowbit", K=64, N=16, bits=2, block_size=64)
    y.shape = ir.Shape([2, 16])
    img = g.input("img", [1, 8, 6, 6])
    cp = g.init("cp", np.zeros((16, 36), np.uint8))
    c = g.op("ConvLowBit", [img, cp], "c", domain="lowbit", kernel_shape=[3, 3], group=1, pads=[1, 1, 1, 1], bits=4)
    c.shape = ir.Shape([1, 16, 6, 6])
    model = g.model(y, c)
    # onnxruntime cannot run lowbit ops without the library: the annotations are used instead
    stats = model_stats(model)
    assert stats.macs_by_op == {"lowbit.MatMulLowBit": 2 * 64 * 16, "lowbit.ConvLowBit": 16 * 36 * 8 * 9}
    statuses = {w["node"]: (w["status"], w["shape"]) for w in stats.weights}
    assert statuses == {"matmullowbit0": ("lowbit MatMulLowBit bits=2 block=64", [16, 64]),
                        "convlowbit1": ("lowbit ConvLowBit bits=4", [16, 8, 3, 3])}
    # explicit shapes work without inference too
    assert node_macs(node_named(model, "matmullowbit"), {"x": (5, 64)}) == 5 * 64 * 16


# --------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------


def test_stats_serialise_and_format():
    model = int4_blocked_model()
    stats = model_stats(model)
    data = stats.to_dict()
    assert json.loads(json.dumps(data, allow_nan=False))["macs"] == 1024
    text = format_stats(stats)
    for needle in ("IR 10", "ai.onnx 21", "1.02 K MACs", "qdq int4 block=32", "int4", "520 B", "Largest layers by MACs"):
        assert needle in text, needle


def test_format_helpers():
    assert human_bytes(1_234_567) == "1.23 MB" and human_bytes(999) == "999 B" and human_bytes(12_345) == "12.3 kB"
    assert human_count(12_300_000) == "12.3 M" and human_count(950) == "950" and human_count(1_000) == "1.00 K"
    table = format_table([["conv", 12, "1.5 MB"], ["gemm_layer", 3, "12 kB"]], ["name", "n", "size"])
    assert table.splitlines() == [
        "name         n    size",
        "----------  --  ------",
        "conv        12  1.5 MB",
        "gemm_layer   3   12 kB",
    ]


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------


def classifier(weight, bias):
    g = G()
    x = g.input("x", ["N", weight.shape[1]])
    w = g.init("w", weight)
    b = g.init("b", bias)
    return g.model(g.op("Gemm", [x, w, b], "logits", transB=1))


def test_compare_model_with_itself():
    weight = rng().standard_normal((10, 16)).astype(np.float32)
    bias = rng(1).standard_normal(10).astype(np.float32)
    model = classifier(weight, bias)
    before = serialized(model)
    feeds = [{"x": rng(s).standard_normal((8, 16)).astype(np.float32)} for s in range(3)]
    result = compare_models(model, model, feeds, threads=1, min_seconds=0.2)
    err = result["error"]
    assert err["max_abs"] == 0 and err["sqnr_db"] == math.inf and err["top1"] == 1.0 and err["cosine"] == 1.0
    assert result["feeds"] == 3 and result["samples"] == 24
    lat = result["latency"]
    assert 0.5 <= lat["ratio"] <= 2.0
    assert lat["a"]["runs"] == lat["b"]["runs"] >= 10
    assert 0 < lat["a"]["median_ms"] <= lat["a"]["p90_ms"]
    assert result["size"] == {"a": (160 + 10) * 4, "b": 680, "ratio": 1.0}
    assert "ratio B/A" in format_compare(result)
    assert json.loads(json.dumps(jsonable(result), allow_nan=False))["error"]["sqnr_db"] == "inf"
    assert serialized(model) == before


def test_compare_perturbed_weight_error_matches_numpy():
    weight = rng().standard_normal((10, 16)).astype(np.float32)
    bias = rng(1).standard_normal(10).astype(np.float32)
    delta = np.zeros_like(weight)
    delta[2, 3] = 0.5
    a, b = classifier(weight, bias), classifier(weight + delta, bias)
    feeds = [{"x": rng(s).standard_normal((8, 16)).astype(np.float32)} for s in range(4)]
    result = compare_models(a, b, iter(feeds), latency=False)
    xs = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    ya = xs @ weight.T.astype(np.float64) + bias
    yb = xs @ (weight + delta).T.astype(np.float64) + bias
    err = result["error"]
    # only logit 2 changes, by 0.5·x[:, 3]
    assert err["max_abs"] == pytest.approx(0.5 * np.abs(xs[:, 3]).max(), rel=1e-5)
    assert err["sqnr_db"] == pytest.approx(10 * np.log10(np.sum(ya**2) / np.sum((yb - ya) ** 2)), abs=1e-3)
    assert err["top1"] == pytest.approx(np.mean(ya.argmax(1) == yb.argmax(1)))
    worst_rel = max(np.abs(yb[i:i + 8] - ya[i:i + 8]).max() / np.abs(ya[i:i + 8]).max() for i in range(0, 32, 8))
    assert err["rel"] == pytest.approx(worst_rel, rel=1e-4)
    assert result["latency"] is None and result["samples"] == 32


def test_compare_refuses_different_outputs():
    from lowbit.core.errors import UserError

    a = conv_model()
    g = G()
    x = g.input("x", ["N", 3, 8, 8])
    b = g.model(g.op("Relu", [x], "other"))
    with pytest.raises(UserError, match="no output 'z'"):
        compare_models(a, b, latency=False)


def test_measure_latency():
    model = conv_model()
    feed = {"x": np.zeros((1, 3, 8, 8), np.float32)}
    result = measure_latency(model, feed, warmup=1, runs=5, min_seconds=0.0)
    assert result["runs"] == 5 and 0 < result["min_ms"] <= result["median_ms"] <= result["p90_ms"]


# --------------------------------------------------------------------------------------------
# the real model
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (MODELS / "digits_cnn.onnx").exists(), reason="models/digits_cnn.onnx not built")
def test_digits_cnn_stats_match_hand_count():
    from lowbit.core.io import load

    model = load(MODELS / "digits_cnn.onnx")
    before = serialized(model)
    stats = model_stats(model, path=MODELS / "digits_cnn.onnx")
    convs = [n for n in model.graph if n.op_type == "Conv"]
    assert stats.op_types["Conv"] == len(convs) >= 4
    # Hand count: walk the graph keeping each value's (channels, height, width) from the 8×8 input,
    # using the conv / pool output-size formula out = (in + pads − kernel) // stride + 1.
    size = {model.graph.inputs[0].name: (1, 8, 8)}
    expected = 0
    for node in model.graph:
        attrs = {k: a.value for k, a in node.attributes.items()}
        if node.op_type in ("Conv", "MaxPool"):
            c, h, w = size[node.inputs[0].name]
            if node.op_type == "Conv":
                m, cg, kh, kw = node.inputs[1].const_value.shape
            else:
                m, (kh, kw) = c, attrs["kernel_shape"]
            pads, strides = attrs.get("pads", (0, 0, 0, 0)), attrs.get("strides", (1, 1))
            ho = (h + pads[0] + pads[2] - kh) // strides[0] + 1
            wo = (w + pads[1] + pads[3] - kw) // strides[1] + 1
            size[node.outputs[0].name] = (m, ho, wo)
            if node.op_type == "Conv":
                expected += m * cg * kh * kw * ho * wo
        elif node.op_type == "Gemm":
            n_out, k_in = node.inputs[1].const_value.shape  # transB=1: W is [N, K], batch 1
            expected += n_out * k_in
        elif node.inputs and node.inputs[0] is not None and node.inputs[0].name in size:
            c, h, w = size[node.inputs[0].name]
            size[node.outputs[0].name] = (c, 1, 1) if node.op_type.startswith("Reduce") else (c, h, w)
    assert stats.macs == expected > 0
    assert stats.macs_by_op["Conv"] > 0.99 * stats.macs
    assert stats.file_bytes == (MODELS / "digits_cnn.onnx").stat().st_size
    assert all(w["status"] == "float" for w in stats.weights) and len(stats.weights) == len(convs) + 1
    constants = [n.attributes["value"].value for n in model.graph if n.op_type == "Constant" and "value" in n.attributes]
    assert stats.params == sum(v.const_value.size for v in model.graph.initializers.values()) + sum(
        t.size for t in constants)
    assert serialized(model) == before
    result = compare_models(model, model, {"input": rng().standard_normal((4, 1, 8, 8)).astype(np.float32)},
                            min_seconds=0.1)
    assert result["error"]["max_abs"] == 0 and result["error"]["top1"] == 1.0
