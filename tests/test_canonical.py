"""The canonicalisation passes, fold-bn and fold-constants, proven exact on built and real graphs.

Every graph is built here with onnx_ir, run through ``run_passes`` (which verifies after each
pass), and then compared again by the test itself with onnxruntime on seeded inputs: the
relative error max|Δ| / max|ref| must stay ≤ 1e-5.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes import common

from lowbit.core.calib import Calibration, input_specs
from lowbit.core.context import Context
from lowbit.core.errors import VerificationError
from lowbit.passes import base
from lowbit.passes.manager import run_model, run_passes
from lowbit.passes.pipeline import parse_pipeline

REL_TOL = 1e-5
FLOAT = ir.DataType.FLOAT


# --------------------------------------------------------------------------------------------
# helpers


def _rng(label: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(label.encode()))


class GraphBuilder:
    """A tiny tape over onnx_ir with named, seeded random constants."""

    def __init__(self, seed: str):
        self.tape = ir.tape.Tape()
        self.rng = _rng(seed)
        self.inputs: list[ir.Value] = []

    def input(self, name: str, shape) -> ir.Value:
        value = ir.val(name, FLOAT, list(shape))
        self.inputs.append(value)
        return value

    def const(self, name: str, array) -> ir.Value:
        array = np.asarray(array, dtype=np.float32)
        return self.tape.initializer(ir.tensor(array, name=name), name=name)

    def rand(self, name: str, shape, scale: float = 0.5) -> ir.Value:
        return self.const(name, self.rng.standard_normal(shape) * scale)

    def op(self, op_type: str, inputs, **attrs) -> ir.Value:
        return self.tape.op(op_type, inputs, attributes=attrs or None)

    def bn(self, x: ir.Value, channels: int, prefix: str, epsilon: float = 1e-3) -> ir.Value:
        """A BatchNormalization with non-trivial statistics (|γ| in [0.5, 1.5] with random signs,
        σ² in [0.05, 2], μ and β ~ N(0, 1))."""
        rng = self.rng
        gamma = rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels)
        beta = rng.standard_normal(channels)
        mean = rng.standard_normal(channels)
        var = rng.uniform(0.05, 2.0, channels)
        ins = [self.const(f"{prefix}.{k}", v) for k, v in
               (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var))]
        return self.op("BatchNormalization", [x, *ins], epsilon=epsilon)

    def model(self, outputs: list[ir.Value]) -> ir.Model:
        for out in outputs:
            out.dtype = FLOAT
        graph = ir.Graph(self.inputs, outputs, nodes=self.tape.nodes, initializers=self.tape.initializers,
                         opset_imports={"": 21}, name="test")
        # ONNX shape inference fills in every value's shape (graph outputs need one).
        return common.ShapeInferencePass()(ir.Model(graph, ir_version=10)).model


def _feed(model: ir.Model, seed: int = 0, batch: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        s.name: rng.standard_normal([d if isinstance(d, int) else batch for d in s.shape]).astype(np.float32)
        for s in input_specs(model)
    }


def _rel(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for name, r in ref.items():
        r64, g64 = r.astype(np.float64), got[name].astype(np.float64)
        assert r64.shape == g64.shape, name
        worst = max(worst, float(np.max(np.abs(g64 - r64)) / np.max(np.abs(r64))))
    return worst


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph.all_nodes()]


def _run(model: ir.Model, pipeline: str, ctx: Context | None = None) -> tuple[float, Context]:
    """Run ``pipeline`` on ``model`` in place; return the relative output error on a seeded feed."""
    ctx = ctx or Context()
    feed = _feed(model)
    ref = run_model(model, feed)
    run_passes(model, parse_pipeline(pipeline), ctx)
    return _rel(ref, run_model(model, feed)), ctx


def _notes(ctx: Context, name: str) -> dict:
    return next(r for r in ctx.report.passes if r.name == name).notes


# --------------------------------------------------------------------------------------------
# fold-bn on small graphs: one case per producer layout


def conv(b: GraphBuilder, *, bias: bool, group: int = 1, c_in: int = 4, c_out: int = 6):
    x = b.input("x", ["N", c_in, 7, 7])
    w = b.rand("conv.weight", [c_out, c_in // group, 3, 3])
    ins = [x, w] + ([b.rand("conv.bias", [c_out])] if bias else [])
    y = b.op("Conv", ins, group=group, pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    return [b.op("Relu", [b.bn(y, c_out, "bn")])]


def conv_transpose(b: GraphBuilder, *, group: int):
    x = b.input("x", ["N", 4, 5, 5])
    w = b.rand("deconv.weight", [4, 6 // group, 3, 3])  # C_in × C_out/group × kh × kw
    y = b.op("ConvTranspose", [x, w, b.rand("deconv.bias", [6])], group=group, strides=[2, 2],
             kernel_shape=[3, 3])
    return [b.bn(y, 6, "bn")]


def gemm(b: GraphBuilder, *, trans_b: int, alpha: float, beta: float | None, c_shape):
    x = b.input("x", ["N", 5])
    w = b.rand("fc.weight", [6, 5] if trans_b else [5, 6])
    ins = [x, w] + ([b.rand("fc.bias", c_shape)] if c_shape is not None else [])
    attrs = {"transB": trans_b, "alpha": alpha}
    if beta is not None:
        attrs["beta"] = beta
    return [b.bn(b.op("Gemm", ins, **attrs), 6, "bn")]


def matmul(b: GraphBuilder, *, bias: str | None):
    x = b.input("x", ["N", 5])
    y = b.op("MatMul", [x, b.rand("fc.weight", [5, 6])])
    if bias == "before":
        y = b.op("Add", [b.rand("fc.bias", [6]), y])  # constant first: either operand order folds
    y = b.bn(y, 6, "bn")
    if bias == "after":
        y = b.op("Add", [y, b.rand("fc.bias", [6])])
    return [y]


def conv_constant_node_weight(b: GraphBuilder):
    x = b.input("x", ["N", 3, 6, 6])
    w = b.op("Constant", [], value=ir.tensor(b.rng.standard_normal([5, 3, 1, 1]).astype(np.float32)))
    return [b.bn(b.op("Conv", [x, w]), 5, "bn")]


def conv_shared_weight(b: GraphBuilder):
    """Two Convs read one weight; only one has a BN: the weight is copied, not rewritten."""
    x = b.input("x", ["N", 4, 6, 6])
    w = b.rand("conv.weight", [4, 4, 3, 3])
    y1 = b.bn(b.op("Conv", [x, w], pads=[1, 1, 1, 1]), 4, "bn")
    y2 = b.op("Conv", [x, w], pads=[1, 1, 1, 1])
    return [b.op("Add", [y1, y2])]


FOLDABLE = {
    "conv_bias": lambda b: conv(b, bias=True),
    "conv_no_bias": lambda b: conv(b, bias=False),
    "conv_depthwise": lambda b: conv(b, bias=True, group=6, c_in=6),
    "conv_grouped": lambda b: conv(b, bias=False, group=2),
    "conv_transpose_g1": lambda b: conv_transpose(b, group=1),
    "conv_transpose_g2": lambda b: conv_transpose(b, group=2),
    "gemm_transB0_alpha": lambda b: gemm(b, trans_b=0, alpha=0.7, beta=1.3, c_shape=[6]),
    "gemm_transB1_alpha_noC": lambda b: gemm(b, trans_b=1, alpha=1.5, beta=None, c_shape=None),
    "gemm_transB1_C_row": lambda b: gemm(b, trans_b=1, alpha=1.0, beta=0.5, c_shape=[1, 6]),
    "gemm_transB0_C_scalar": lambda b: gemm(b, trans_b=0, alpha=2.0, beta=-1.0, c_shape=[1]),
    "matmul": lambda b: matmul(b, bias=None),
    "matmul_add_before": lambda b: matmul(b, bias="before"),
    "matmul_add_after": lambda b: matmul(b, bias="after"),
    "conv_constant_node_weight": conv_constant_node_weight,
    "conv_shared_weight": conv_shared_weight,
}


@pytest.mark.parametrize("case", sorted(FOLDABLE))
def test_fold_bn_small_graph_is_exact(case):
    b = GraphBuilder(case)
    model = b.model(FOLDABLE[case](b))
    ops_before = _ops(model)
    assert ops_before.count("BatchNormalization") == 1
    rel, ctx = _run(model, "fold-bn,cleanup")
    ops = _ops(model)
    assert "BatchNormalization" not in ops
    assert "Mul" not in ops  # folded into the producer, not rewritten as Mul+Add
    assert rel <= REL_TOL, f"{case}: relative error {rel:.2e}"
    notes = _notes(ctx, "fold-bn")
    assert notes["folded"] == 1 and notes["to_mul_add"] == 0 and notes["left"] == []
    # The BN disappears without adding nodes, except MatMul without a bias gains its Add.
    assert len(ops) == len(ops_before) - 1 + (case == "matmul") - (case == "conv_constant_node_weight")


def test_fold_bn_keeps_weight_names_and_is_deterministic():
    def build():
        b = GraphBuilder("names")
        return b.model(conv(b, bias=False))

    first, second = build(), build()
    for model in (first, second):
        run_passes(model, parse_pipeline("fold-bn"), Context(verify=False))
    conv_node = next(n for n in first.graph if n.op_type == "Conv")
    assert [v.name for v in conv_node.inputs[1:]] == ["conv.weight", "conv.bias"]
    assert sorted(first.graph.initializers) == ["conv.bias", "conv.weight"]  # BN statistics gone
    for name, value in first.graph.initializers.items():
        assert np.array_equal(value.const_value.numpy(), second.graph.initializers[name].const_value.numpy())


def test_fold_bn_graph_output_keeps_its_name():
    b = GraphBuilder("out")
    out = conv(b, bias=True)[0].producer().inputs[0]  # the BN output, before the Relu
    out.name = "features"
    model = b.model([out])
    rel, _ = _run(model, "fold-bn,cleanup")
    assert [v.name for v in model.graph.outputs] == ["features"]
    assert _ops(model) == ["Conv"]
    assert rel <= REL_TOL


def _unfoldable(b: GraphBuilder):
    """Conv output read by the BN and by a second consumer; plus a BN on a graph input."""
    x = b.input("x", ["N", 4, 6, 6])
    y = b.op("Conv", [x, b.rand("conv.weight", [4, 4, 3, 3])], pads=[1, 1, 1, 1])
    z = b.bn(y, 4, "bn1")
    side = b.op("Relu", [y])
    direct = b.bn(x, 4, "bn2")
    return [b.op("Add", [b.op("Add", [z, side]), direct])]


@pytest.mark.parametrize("standalone", [True, False])
def test_fold_bn_unfoldable_is_left_or_rewritten_exactly(standalone):
    b = GraphBuilder("unfoldable")
    model = b.model(_unfoldable(b))
    rel, ctx = _run(model, f"fold-bn(standalone={str(standalone).lower()}),cleanup")
    ops = _ops(model)
    notes = _notes(ctx, "fold-bn")
    assert notes["folded"] == 0
    assert len(notes["left"]) == 2
    assert any("2 consumers" in why for why in notes["left"])
    assert any("graph input" in why for why in notes["left"])
    if standalone:
        assert notes["to_mul_add"] == 2
        assert "BatchNormalization" not in ops and ops.count("Mul") == 2
    else:
        assert notes["to_mul_add"] == 0
        assert ops.count("BatchNormalization") == 2
    assert rel <= REL_TOL


def test_fold_bn_matmul_rank3_is_not_folded_into_weight():
    """BN normalises axis 1; for a [N, T, C] MatMul output that is T, not the weight's columns."""
    b = GraphBuilder("rank3")
    x = b.input("x", [2, 6, 5])
    y = b.bn(b.op("MatMul", [x, b.rand("w", [5, 4])]), 6, "bn")
    model = b.model([y])
    rel, ctx = _run(model, "fold-bn,cleanup")
    notes = _notes(ctx, "fold-bn")
    assert notes["folded"] == 0 and notes["to_mul_add"] == 1
    assert rel <= REL_TOL


# --------------------------------------------------------------------------------------------
# fold-bn on the embedded digits CNN


def _digits_model():
    from lowbit.core import io
    from lowbit.models import data

    path = data.DIGITS_NPZ.with_name("digits_cnn.onnx")
    return io.load(path)


def test_fold_bn_digits_cnn_exact_on_heldout_digits():
    from lowbit.models import data

    model = _digits_model()
    x_test, y_test = data.digits_eval_set()
    feed = {"input": np.array(x_test)}
    assert _ops(model).count("BatchNormalization") == 5
    ref = run_model(model, feed)["logits"]

    calib = Calibration("digits", lambda: iter([{"input": np.array(data.digits_calib(64))}]), input_specs(model))
    ctx = Context(calib=calib, verify_samples=64)
    run_passes(model, parse_pipeline("fold-bn,cleanup"), ctx)
    got = run_model(model, feed)["logits"]

    assert _ops(model).count("BatchNormalization") == 0
    assert _notes(ctx, "fold-bn")["folded"] == 5
    rel = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    assert rel <= REL_TOL, rel
    assert np.array_equal(got.argmax(axis=1), ref.argmax(axis=1))
    accuracy = float(np.mean(got.argmax(axis=1) == y_test))
    assert accuracy == float(np.mean(ref.argmax(axis=1) == y_test)) and accuracy > 0.95
    print(f"digits: BN 5 -> 0, relative error {rel:.2e}, top-1 {accuracy:.4f} on {len(y_test)}")


# --------------------------------------------------------------------------------------------
# fold-constants


def _shape_and_constant_math(b: GraphBuilder):
    """Reshape(x, Concat(Gather(Shape(x), 0), -1)) + ((Constant·3) + 1): all but Reshape/Add fold."""
    x = b.input("x", [2, 3, 4, 5])
    shape = b.op("Shape", [x])
    batch = b.op("Gather", [shape, b.tape.initializer(ir.tensor(np.array([0], np.int64), name="i0"))], axis=0)
    minus1 = b.tape.initializer(ir.tensor(np.array([-1], np.int64), name="m1"))
    target = b.op("Concat", [batch, minus1], axis=0)
    flat = b.op("Reshape", [x, target])
    k = b.op("Constant", [], value=ir.tensor(np.linspace(-1, 1, 60, dtype=np.float32)))
    k = b.op("Add", [b.op("Mul", [k, b.const("three", 3.0)]), b.const("one", 1.0)])
    return [b.op("Add", [flat, k])]


def test_fold_constants_shrinks_and_is_exact():
    b = GraphBuilder("fold")
    model = b.model(_shape_and_constant_math(b))
    names_in, names_out = [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]
    before = len(_ops(model))
    feed = _feed(model)
    ref = run_model(model, feed)
    ctx = Context()
    run_passes(model, parse_pipeline("fold-constants"), ctx)
    got = run_model(model, feed)
    assert sorted(_ops(model)) == ["Add", "Reshape"]
    assert before == 8 and len(_ops(model)) == 2
    assert _notes(ctx, "fold-constants")["nodes_removed"] == 6
    assert _rel(ref, got) <= REL_TOL
    assert np.array_equal(ref[names_out[0]], got[names_out[0]])  # evaluated once, same bits here
    assert [v.name for v in model.graph.inputs] == names_in
    assert [v.name for v in model.graph.outputs] == names_out


@pytest.mark.parametrize("limit, folded", [(100, False), (4096, True)])
def test_fold_constants_respects_size_limit(limit, folded):
    b = GraphBuilder("limit")
    x = b.input("x", [4])
    small = b.op("Constant", [], value=ir.tensor(np.arange(4, dtype=np.float32)))
    big = b.op("Expand", [small, b.tape.initializer(ir.tensor(np.array([256, 4], np.int64), name="shape"))])
    model = b.model([b.op("Add", [x, big])])
    feed = _feed(model)
    ref = run_model(model, feed)
    run_passes(model, parse_pipeline(f"fold-constants(size_limit={limit})"), Context())
    ops = _ops(model)
    largest = max(v.const_value.size for v in model.graph.initializers.values())
    if folded:
        assert ops == ["Add"] and largest == 1024
    else:
        assert ops == ["Expand", "Add"] and largest <= limit
    assert "Constant" not in ops  # lift=true turns the remaining Constant into an initializer
    assert _rel(ref, run_model(model, feed)) <= REL_TOL


def test_fold_constants_constant_graph_output_keeps_name():
    b = GraphBuilder("const-out")
    x = b.input("x", [3])
    y = b.op("Relu", [x])
    c = b.op("Mul", [b.const("a", [1.0, 2.0, 3.0]), b.const("k", 2.0)])
    c.name = "scaled"
    model = b.model([y, c])
    rel, _ = _run(model, "fold-constants")
    assert [v.name for v in model.graph.outputs] == [y.name, "scaled"]
    assert _ops(model) == ["Relu"]
    assert rel == 0.0


# --------------------------------------------------------------------------------------------
# the manager really checks exact passes


@pytest.fixture
def perturbing_pass():
    """A deliberately wrong 'exact' pass, registered under a test-only name for this test."""
    class PerturbWeight(base.Pass):
        """Claims to be exact but scales the largest weight by 1.01 (test only)."""

        name = "test-perturb-weight"  # registers itself, like every pass
        preserves = "exact"

        def run(self, model, ctx):
            value = max(model.graph.initializers.values(), key=lambda v: v.const_value.size)
            value.const_value = ir.tensor(value.const_value.numpy() * 1.01, name=value.name)
            return True

    assert base.get_pass(PerturbWeight.name) is PerturbWeight
    try:
        yield PerturbWeight.name
    finally:
        base.unregister(PerturbWeight.name)  # keep the registry clean for other tests


def test_manager_rejects_an_exact_pass_that_changes_outputs(perturbing_pass):
    b = GraphBuilder("perturb")
    model = b.model(conv(b, bias=True))
    ctx = Context()
    with pytest.raises(VerificationError, match=rf"pass {perturbing_pass} \(after fold-bn\): must keep outputs equal") as info:
        run_passes(model, parse_pipeline(f"fold-bn,{perturbing_pass}"), ctx)
    assert info.value.pass_name == perturbing_pass and info.value.exit_code == 1
    assert f"changed output '{model.graph.outputs[0].name}'" in str(info.value)
    folded, bad = ctx.report.passes
    assert folded.error["rel"] <= REL_TOL  # the honest pass before it verified fine
    assert bad.error["rel"] > 1e-3
