"""Channel dependency groups (``analysis.channels``) and channel removal (``passes.channel_edit``).

Exactness with planted zeros: for a seeded random subset of the channels of every prunable group
(the same count from each division of a grouped convolution), the weight entries of every "in"
member that read those channels are zeroed, so the channels no longer influence anything; the
outputs are recorded with onnxruntime, the channels are removed, and the outputs must agree within
1e-5 of max |output|, the model must pass ``onnx.checker`` (full check) and the float parameters
must drop by exactly what ``removed_entries`` predicts.

Measured when written (onnxruntime 1.31, 2 CPU cores; "conv parameters prunable" = conv weight
elements whose output channel is in a prunable group):

* digits CNN: 6 groups, 4 prunable (16, 32, 32, 64 channels; the two convs of the residual block
  share one); 100 % of the conv parameters prunable; analysis 0.03 s.
* EfficientNet-Lite0: 26 groups, 24 prunable (the input's 3 channels and the 1000 logits are
  not); 100 % of the conv parameters prunable; analysis about 1 s (0.35 s of it shape inference).
* YOLOv8n (nudenet 320n.onnx): 68 groups, 59 prunable; 99.5 % of the conv parameters prunable —
  the head's last convs are not (a Shape reads their channel count, a Reshape with a run-time
  target bakes it in, DFL's Softmax mixes its 16 bins); analysis 0.2-0.4 s.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import ShapeInferencePass

from helpers import zero_channels

from lowbit.analysis.channels import ChannelGraph, channel_groups
from lowbit.core import io
from lowbit.models import data
from lowbit.passes.channel_edit import remove_channels, removed_entries
from lowbit.runtime.session import session

MODELS = Path(__file__).resolve().parent.parent / "models"
REL_TOL = 1e-5
FLOAT = ir.DataType.FLOAT


# --------------------------------------------------------------------------------------------
# helpers


class _Graph:
    """A small float32 graph with named nodes (each output named like its node) and seeded weights."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[ir.Node] = []
        self.inits: list[ir.Value] = []
        self.inputs: list[ir.Value] = []

    def input(self, name: str, shape) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(FLOAT))
        self.inputs.append(value)
        return value

    def const(self, name: str, array) -> ir.Value:
        array = np.asarray(array)
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                         type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
        self.inits.append(value)
        return value

    def weight(self, name: str, *shape) -> ir.Value:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        return self.const(name, self.rng.standard_normal(shape) / math.sqrt(fan_in))

    def op(self, op_type: str, inputs, name: str, *, outputs: int = 1, domain: str = "", **attributes):
        node = ir.node(op_type, inputs, attributes=attributes or None, name=name, domain=domain,
                       num_outputs=outputs)
        for k, out in enumerate(node.outputs):
            out.name = name if outputs == 1 else f"{name}.{k}"
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else list(node.outputs)

    def conv(self, x, name, cin, cout, k=1, *, group=1, pads=0, transpose=False, **attributes):
        shape = (cin, cout // group, k, k) if transpose else (cout, cin // group, k, k)
        w = self.weight(f"{name}.weight", *shape)
        b = self.const(f"{name}.bias", self.rng.normal(0, 0.1, cout))
        return self.op("ConvTranspose" if transpose else "Conv", [x, w, b], name, kernel_shape=[k, k],
                       pads=[pads] * 4, group=group, **attributes)

    def model(self, *outputs: ir.Value, opset: int = 21) -> ir.Model:
        opsets = {"": opset, **{n.domain: 1 for n in self.nodes if n.domain}}
        graph = ir.Graph(self.inputs, list(outputs), nodes=self.nodes, initializers=self.inits,
                         opset_imports=opsets, name="test")
        model = ir.Model(graph, ir_version=10, producer_name="lowbit-tests")
        ShapeInferencePass()(model)
        return model


def _feed(model: ir.Model, seed: int = 0, batch: int = 2, dim: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for value in model.graph.inputs:
        shape = [d if isinstance(d, int) else (batch if i == 0 else dim) for i, d in enumerate(value.shape)]
        feed[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def _run(model: ir.Model, feed) -> list[np.ndarray]:
    return session(model).run(None, feed)


def _float_params(model: ir.Model) -> int:
    return sum(v.const_value.size for v in model.graph.initializers.values()
               if v.const_value is not None and v.dtype == FLOAT)


def _plant_zeros(model: ir.Model, cg: ChannelGraph, seed: int, fraction: float = 0.3) -> dict[int, list[int]]:
    """Choose channels to remove in every prunable group (the same count per division), zero the
    weight entries of every "in" member reading them, and return ``keep``."""
    rng = np.random.default_rng(seed)
    keep = {}
    for group in cg.prunable():
        per = group.size // group.divisions
        drop = max(1, int(per * fraction))
        if drop >= per:
            continue
        kept: list[int] = []
        for d in range(group.divisions):
            kept += rng.choice(np.arange(d * per, (d + 1) * per), per - drop, replace=False).tolist()
        keep[group.id] = sorted(kept)
        zero_channels(model, cg, group, sorted(set(range(group.size)) - set(kept)))
    return keep


def _exact_after_removal(model: ir.Model, feed, *, seed: int = 1, cg: ChannelGraph | None = None,
                         fraction: float = 0.3, copied: int = 0) -> tuple[ChannelGraph, dict, float]:
    """Plant zeros, remove the channels; assert exactness, the checker and the parameter count
    (``copied``: float elements that copies of shared constants keep or add). Returns (channel
    graph, keep, relative error)."""
    cg = channel_groups(model) if cg is None else cg
    keep = _plant_zeros(model, cg, seed, fraction)
    assert keep, "nothing to prune"
    reference = _run(model, feed)
    expected = sum(removed_entries(cg, keep).values())
    before = _float_params(model)
    remove_channels(model, cg, keep)
    assert before - _float_params(model) == expected - copied and expected > 0
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    got = _run(model, feed)
    worst = 0.0
    for ref, out in zip(reference, got):
        assert ref.shape == out.shape
        worst = max(worst, float(np.abs(ref.astype(np.float64) - out).max() / np.abs(ref).max()))
    assert worst <= REL_TOL, worst
    return cg, keep, worst


def _prunable_conv_share(model: ir.Model, cg: ChannelGraph) -> float:
    """Share of conv weight elements whose output channel is in a prunable group."""
    weights = {n.inputs[1].name for n in model.graph if n.op_type in ("Conv", "ConvTranspose")}
    masks = {}
    for group in cg.prunable():
        for member in group.members:
            if member.tensor in weights and member.role == "out":
                mask = cg.mask(group, member, range(group.size))
                masks[member.tensor] = masks.get(member.tensor, False) | mask
    total = sum(model.graph.initializers[w].const_value.size for w in weights)
    return sum(int(m.sum()) for m in masks.values()) / total


# --------------------------------------------------------------------------------------------
# the digits CNN


def test_digits_groups():
    model = io.load(MODELS / "digits_cnn.onnx")
    cg = channel_groups(model)
    assert len(cg.groups) == 6
    assert sorted(g.size for g in cg.prunable()) == [16, 32, 32, 64]
    # the two convs feeding the residual Add share one group, with both BNs and the Add
    residual = cg.group_of("features.3.weight", 0, 0)
    assert residual is cg.group_of("features.6.body.3.weight", 0, 0)
    assert residual.prunable and residual.size == 32
    roles = {(m.tensor, m.role) for m in residual.members}
    assert {("features.3.weight", "out"), ("features.6.body.3.weight", "out"),
            ("features.6.body.0.weight", "in"), ("features.8.weight", "in"),
            ("features.4.running_var", "param"), ("add_55", "act"), ("max_pool2d", "act")} <= roles
    # the Gemm's input columns are coupled one to one with the last conv's output channels
    last = cg.group_of("features.8.weight", 0, 0)
    assert last.size == 64 and last is cg.group_of("head.weight", 1, 0)
    by_tensor = {m.tensor: m for m in last.members}
    assert by_tensor["head.weight"].indices == by_tensor["features.8.weight"].indices
    assert by_tensor["head.weight"].role == "in" and by_tensor["mean"].role == "act"
    # model input and output are never in a prunable group
    first_in = cg.group_of("input", 1, 0)
    assert not first_in.prunable and "model input 'input'" in first_in.reason
    assert cg.group_of("features.0.weight", 1, 0) is first_in
    head = cg.group_of("head.weight", 0, 3)
    assert not head.prunable and "model output 'logits'" in head.reason and head.size == 10
    # the networkx graph: one node per channel, edges named after the coupling op
    graph = cg.graph
    assert graph.has_edge(("conv2d", 1, 5), ("getitem", 1, 5))
    assert graph.edges[("conv2d", 1, 5), ("getitem", 1, 5)]["node"] == "node__native_batch_norm_legit_no_training__0"
    assert not graph.has_edge(("conv2d", 1, 5), ("getitem", 1, 6))
    assert _prunable_conv_share(model, cg) > 0.99


def test_digits_exact_removal():
    model = io.load(MODELS / "digits_cnn.onnx")
    x = data.digits_eval_set()[0][:64]
    cg, keep, err = _exact_after_removal(model, {"input": x})
    assert len(keep) == 4
    weights = {n.name: n.inputs[1].const_value.shape for n in model.graph if n.op_type == "Conv"}
    assert weights["node_Conv_77"][0] == 32 - int(32 * 0.3)  # out rows of the residual group
    assert weights["node_Conv_77"][1] == 16 - int(16 * 0.3)  # in columns of the first group
    # the pruned model analyses to the same structure, smaller
    again = channel_groups(model)
    assert [g.size for g in again.prunable()] == [16 - 4, 32 - 9, 32 - 9, 64 - 19]


# --------------------------------------------------------------------------------------------
# small graphs: every layout the rewrite handles


def _grouped_model() -> ir.Model:
    """Conv → depthwise (multiplier 2) → grouped conv (3 groups) → ConvTranspose → grouped
    ConvTranspose (2 groups) → Conv."""
    g = _Graph(1)
    x = g.input("x", ["N", 4, 6, 6])
    a = g.op("Relu", [g.conv(x, "a", 4, 12)], "a_relu")
    d = g.op("Relu", [g.conv(a, "dw", 12, 24, 3, group=12, pads=1)], "dw_relu")
    c = g.op("Relu", [g.conv(d, "grouped", 24, 12, group=3)], "grouped_relu")
    t = g.op("Relu", [g.conv(c, "t", 12, 8, 2, transpose=True, strides=[2, 2])], "t_relu")
    t2 = g.op("Relu", [g.conv(t, "t2", 8, 8, 3, group=2, pads=1, transpose=True)], "t2_relu")
    return g.model(g.conv(t2, "z", 8, 3))


def test_grouped_and_transposed_convs():
    model = _grouped_model()
    cg = channel_groups(model)
    a = cg.group_of("a.weight", 0, 0)
    assert a.prunable and a.size == 12 and a.divisions == 3
    dw = {m.tensor: m for m in a.members}
    assert dw["dw.weight"].block == 2 and dw["dw_relu"].block == 2  # multiplier 2: rows 2c, 2c+1
    assert dw["grouped.weight"].fold == 8 and dw["grouped.weight"].block == 2
    grouped = cg.group_of("grouped.weight", 0, 0)
    assert grouped.divisions == 3 and grouped is cg.group_of("t.weight", 0, 0)
    t = cg.group_of("t.weight", 1, 0)
    assert t.divisions == 2 and t.size == 8 and t is cg.group_of("t2.weight", 0, 0)
    t2 = cg.group_of("t2.weight", 1, 0)
    assert t2.divisions == 2 and t2 is cg.group_of("z.weight", 1, 0)
    assert {m.fold for m in t2.members if m.tensor == "t2.weight"} == {4}
    assert len(cg.prunable()) == 4
    _exact_after_removal(model, _feed(model))
    nodes = {n.name: n for n in model.graph}
    assert nodes["dw"].attributes["group"].value == 12 - int(4 * 0.3) * 3
    assert nodes["grouped"].attributes["group"].value == 3
    assert nodes["t2"].attributes["group"].value == 2


def _concat_split_slice_model() -> ir.Model:
    """Two convs concatenated on channels (14), split 5 + 9, the 9 sliced [2:8]; plus two convs
    concatenated along the width, whose channels pass one to one."""
    g = _Graph(2)
    x = g.input("x", ["N", 4, 6, 6])
    a = g.op("Relu", [g.conv(x, "a", 4, 8)], "a_relu")
    b = g.op("Relu", [g.conv(x, "b", 4, 6)], "b_relu")
    cat = g.op("Concat", [a, b], "cat", axis=1)
    s0, s1 = g.op("Split", [cat, g.const("sizes", np.array([5, 9], np.int64))], "split", outputs=2, axis=1)
    sl = g.op("Slice", [s1, g.const("starts", np.array([2], np.int64)), g.const("ends", np.array([8], np.int64)),
                        g.const("axes", np.array([1], np.int64))], "slice")
    c = g.conv(s0, "c", 5, 4)
    d = g.conv(sl, "d", 6, 4)
    added = g.op("Relu", [g.op("Add", [c, d], "add")], "add_relu")
    f = g.conv(added, "f", 4, 5)
    h = g.conv(added, "h", 4, 5)
    wide = g.op("Concat", [f, h], "wide", axis=3)
    return g.model(g.conv(wide, "z", 5, 3))


def test_concat_split_slice():
    model = _concat_split_slice_model()
    cg = channel_groups(model)
    head = cg.group_of("a.weight", 0, 0)
    assert head.size == 5 and head.prunable  # a's 0…4 go to the first split output
    dropped = cg.group_of("a.weight", 0, 5)  # a's 5, 6: second split output, cut by the slice
    assert dropped.size == 2 and dropped.prunable and all(m.role != "in" for m in dropped.members)
    single = cg.group_of("a.weight", 0, 7)  # a's 7 is the only one of a that reaches d
    assert single.size == 1 and not single.prunable and "single channel" in single.reason
    b_head = cg.group_of("b.weight", 0, 0)
    assert b_head.size == 5 and b_head is cg.group_of("d.weight", 1, 1)
    member = next(m for m in b_head.members if m.tensor == "cat")
    assert member.indices == (8, 9, 10, 11, 12)
    assert cg.group_of("b.weight", 0, 5).size == 1
    # the residual-like Add couples c and d; f and h meet in a Concat along the width
    assert cg.group_of("c.weight", 0, 2) is cg.group_of("d.weight", 0, 2)
    assert cg.group_of("f.weight", 0, 1) is cg.group_of("h.weight", 0, 1) is cg.group_of("z.weight", 1, 1)
    _exact_after_removal(model, _feed(model), fraction=0.4)
    nodes = {n.name: n for n in model.graph}
    assert nodes["split"].inputs[1].const_value.numpy().tolist() == [5 - 2, 9 - 1 - 2]
    starts = int(nodes["slice"].inputs[1].const_value.numpy()[0])
    ends = int(nodes["slice"].inputs[2].const_value.numpy()[0])
    # before the slice, one of a's 5, 6 is left; inside it, a's 7 and b's 0…4 minus 2
    assert (starts, ends) == (1, 1 + 1 + 5 - 2)


def _flatten_gemm_model() -> ir.Model:
    """Conv → MaxPool → Flatten → Gemm (transB=1) → Relu → Gemm (transB=0); and the same pooled
    activation through Reshape([0, 24]) → MatMul + bias."""
    g = _Graph(3)
    x = g.input("x", ["N", 3, 4, 4])
    a = g.op("MaxPool", [g.op("Relu", [g.conv(x, "a", 3, 6, 3, pads=1)], "a_relu")], "pool",
             kernel_shape=[2, 2], strides=[2, 2])
    flat = g.op("Flatten", [a], "flat", axis=1)
    h = g.op("Relu", [g.op("Gemm", [flat, g.weight("fc1.weight", 10, 24), g.const("fc1.bias", np.zeros(10))],
                           "fc1", transB=1)], "fc1_relu")
    y1 = g.op("Gemm", [h, g.weight("fc2.weight", 10, 5), g.const("fc2.bias", np.ones(5))], "fc2")
    r = g.op("Reshape", [a, g.const("target", np.array([0, 24], np.int64))], "reshape")
    y2 = g.op("Add", [g.op("MatMul", [r, g.weight("mm.weight", 24, 5)], "mm"), g.const("mm.bias", np.ones(5))],
              "mm_bias")
    return g.model(g.op("Add", [y1, y2], "y"))


def test_flatten_into_gemm():
    model = _flatten_gemm_model()
    cg = channel_groups(model)
    group = cg.group_of("a.weight", 0, 0)
    assert group.prunable and group.size == 6
    members = {m.tensor: m for m in group.members}
    assert members["fc1.weight"].block == 4 and members["fc1.weight"].axis == 1 and members["fc1.weight"].role == "in"
    assert members["mm.weight"].block == 4 and members["mm.weight"].axis == 0
    assert members["flat"].block == 4 and members["reshape"].block == 4
    hidden = cg.group_of("fc1.weight", 0, 0)
    assert hidden.size == 10 and hidden is cg.group_of("fc2.weight", 0, 9)
    _exact_after_removal(model, _feed(model))
    nodes = {n.name: n for n in model.graph}
    assert nodes["reshape"].inputs[1].const_value.numpy().tolist() == [0, 4 * (6 - 1)]
    assert nodes["fc1"].inputs[1].const_value.shape == (10 - 3, 4 * (6 - 1))


def _mlp_model() -> ir.Model:
    """A residual stream of width 24 through two attention-free MLPs (Erf-chain GELU, Gelu op)."""
    g = _Graph(4)
    x = g.input("x", ["N", 8, 16])
    s = g.op("Relu", [g.op("MatMul", [x, g.weight("embed", 16, 24)], "embed_mm")], "stream0")
    for k, gelu in enumerate(("erf", "op")):
        u = g.op("Add", [g.op("MatMul", [s, g.weight(f"up{k}", 24, 32)], f"up{k}_mm"),
                         g.const(f"up{k}.bias", g.rng.normal(0, 0.1, 32))], f"up{k}_bias")
        if gelu == "erf":
            e = g.op("Erf", [g.op("Div", [u, g.const("sqrt2", np.float32(math.sqrt(2)))], "gelu_div")], "gelu_erf")
            act = g.op("Mul", [g.op("Mul", [u, g.op("Add", [e, g.const("one", np.float32(1))], "gelu_add")],
                                    "gelu_mul"), g.const("half", np.float32(0.5))], "gelu")
        else:
            act = g.op("Gelu", [u], f"gelu{k}")
        down = g.op("Add", [g.op("MatMul", [act, g.weight(f"down{k}", 32, 24)], f"down{k}_mm"),
                            g.const(f"down{k}.bias", g.rng.normal(0, 0.1, 24))], f"down{k}_bias")
        s = g.op("Add", [s, down], f"stream{k + 1}")
    return g.model(g.op("MatMul", [s, g.weight("out", 24, 4)], "head"))


def test_transformer_mlp_hidden_and_stream():
    model = _mlp_model()
    cg = channel_groups(model)
    for k in range(2):
        hidden = cg.group_of(f"up{k}", 1, 0)
        assert hidden.prunable and hidden.size == 32 and hidden is cg.group_of(f"down{k}", 0, 0)
        roles = {m.tensor: m.role for m in hidden.members}
        assert roles[f"up{k}"] == "out" and roles[f"down{k}"] == "in" and roles[f"up{k}.bias"] == "param"
    stream = cg.group_of("embed", 1, 0)
    assert stream.size == 24 and stream is cg.group_of("down1", 1, 3) is cg.group_of("out", 0, 3)
    assert len(cg.prunable()) == 3
    _exact_after_removal(model, _feed(model))


def _mul_resize_pad_model() -> ir.Model:
    """Conv → Mul by a per-channel constant [C,1,1] → Add of a [1,C,1,1] constant → Resize ×2 →
    Pad (spatial, reflect) → Conv → Sigmoid → Mul by a scalar."""
    g = _Graph(5)
    x = g.input("x", ["N", 3, 8, 8])
    a = g.conv(x, "a", 3, 8, 3, pads=1)
    m = g.op("Mul", [a, g.const("scale", g.rng.uniform(0.5, 2, (8, 1, 1)))], "scale_mul")
    s = g.op("Add", [m, g.const("shift", g.rng.normal(0, 1, (1, 8, 1, 1)))], "shift_add")
    up = g.op("Resize", [s, None, g.const("scales", np.array([1, 1, 2, 2], np.float32))], "up", mode="nearest")
    p = g.op("Pad", [up, g.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], "pad", mode="reflect")
    b = g.op("Sigmoid", [g.conv(p, "b", 8, 4, 3)], "b_sigmoid")
    return g.model(g.op("Mul", [b, g.const("gain", np.float32(3))], "gain_mul"))


def test_mul_resize_pad():
    model = _mul_resize_pad_model()
    cg = channel_groups(model)
    group = cg.group_of("a.weight", 0, 0)
    assert group.prunable and group.size == 8
    roles = {m.tensor: m.role for m in group.members}
    assert roles["scale"] == roles["shift"] == "param" and roles["up"] == roles["pad"] == "act"
    assert {m.axis for m in group.members if m.tensor in ("scale", "shift")} == {0, 1}
    _exact_after_removal(model, _feed(model))
    inits = model.graph.initializers
    assert inits["scale"].const_value.shape == (8 - 2, 1, 1) and inits["shift"].const_value.shape == (1, 6, 1, 1)


def test_yolo_style_reshape_with_runtime_target():
    """x.view(x.size(0), x.size(1), -1) computed at run time keeps the channel axis: prunable; a
    run-time target with the channel count baked in is not."""
    g = _Graph(6)
    x = g.input("x", ["N", 3, 4, 4])
    a = g.op("Relu", [g.conv(x, "a", 3, 6)], "a_relu")
    shape = g.op("Shape", [a], "shape", start=0, end=2)
    target = g.op("Concat", [shape, g.const("minus1", np.array([-1], np.int64))], "target", axis=0)
    r = g.op("Reshape", [a, target], "view")
    y = g.op("ReduceMean", [r, g.const("axes", np.array([2], np.int64))], "pool", keepdims=0)
    out = g.op("Gemm", [y, g.weight("fc.weight", 5, 6)], "fc", transB=1)
    b = g.op("Relu", [g.conv(x, "b", 3, 6)], "b_relu")
    batch = g.op("Shape", [b], "b_shape", start=0, end=1)
    baked = g.op("Concat", [batch, g.const("six", np.array([6, -1], np.int64))], "baked", axis=0)
    rb = g.op("Reshape", [b, baked], "b_view")
    yb = g.op("ReduceMean", [rb, g.const("axes_b", np.array([2], np.int64))], "b_pool", keepdims=0)
    out_b = g.op("Gemm", [yb, g.weight("fc_b.weight", 5, 6)], "fc_b", transB=1)
    model = g.model(g.op("Add", [out, out_b], "y"))
    cg = channel_groups(model)
    assert cg.group_of("a.weight", 0, 0).prunable
    blocked = cg.group_of("b.weight", 0, 0)
    assert not blocked.prunable and "Reshape 'b_view'" in blocked.reason
    _exact_after_removal(model, _feed(model))


# --------------------------------------------------------------------------------------------
# real models


def _analysed(model: ir.Model, label: str) -> tuple[ChannelGraph, float]:
    """The channel groups of a real model and its share of prunable conv parameters; prints the
    counts and the analysis time (reported, not asserted)."""
    t0 = time.perf_counter()
    cg = channel_groups(model)
    seconds = time.perf_counter() - t0
    share = _prunable_conv_share(model, cg)
    print(f"{label}: {len(cg.groups)} groups, {len(cg.prunable())} prunable, "
          f"{100 * share:.1f}% of conv parameters prunable, analysis {seconds:.2f} s")
    return cg, share


def test_lite0_exact_removal(lite0_path):
    model = io.load(lite0_path)
    cg, share = _analysed(model, "Lite0")
    assert len(cg.groups) == 26 and len(cg.prunable()) == 24
    assert not cg.group_of("input", 1, 0).prunable and not cg.group_of("_fc.weight", 0, 0).prunable
    dw = cg.group_of("_blocks.1._depthwise_conv.weight", 0, 0)  # expand, BN, Clip, Pad, depthwise, BN
    assert dw is cg.group_of("_blocks.1._expand_conv.weight", 0, 0) and dw.size == 96
    assert cg.group_of("_fc.weight", 1, 0).size == 1280 and cg.group_of("_fc.weight", 1, 0).prunable
    assert share > 0.99
    _exact_after_removal(model, _feed(model, batch=1), cg=cg)
    dw_node = next(n for n in model.graph
                   if n.op_type == "Conv" and n.inputs[1].name == "_blocks.1._depthwise_conv.weight")
    assert dw_node.attributes["group"].value == 96 - int(96 * 0.3)


def test_yolov8n_groups_and_exact_removal(yolo_path):
    model = io.load(yolo_path)
    cg, share = _analysed(model, "YOLOv8n")
    assert len(cg.prunable()) >= 59 and share >= 0.99
    # C2f: the second half of cv1 feeds the bottlenecks, their residual Adds and the Concat (twice)
    c2f = cg.group_of("model.4.cv1.conv.weight", 0, 32)
    assert c2f.prunable and c2f.size == 32
    assert c2f is cg.group_of("model.4.m.0.cv2.conv.weight", 0, 0) is cg.group_of("model.4.m.1.cv2.conv.weight", 0, 0)
    assert sum(m.tensor == "/model.4/Concat_output_0" for m in c2f.members) == 3
    sppf = cg.group_of("model.9.cv1.conv.weight", 0, 0)
    assert sppf.prunable and sum(m.tensor == "model.9.cv2.conv.weight" for m in sppf.members) == 4
    assert cg.group_of("model.9.cv2.conv.weight", 0, 0) is cg.group_of("model.21.cv1.conv.weight", 1, 128)
    # the head's last convs (box distributions, classes) and DFL: not prunable
    for scale in range(3):
        for branch in ("cv2", "cv3"):
            group = cg.group_of(f"model.22.{branch}.{scale}.2.weight", 0, 0)
            assert not group.prunable, group
    dfl = cg.group_of("model.22.dfl.conv.weight", 1, 0)
    assert dfl.reason == "Softmax '/model.22/dfl/Softmax' mixes channels on axis 1"
    feed = {"images": np.random.default_rng(0).uniform(0, 1, (1, 3, 320, 320)).astype(np.float32)}
    _exact_after_removal(model, feed, cg=cg)


# --------------------------------------------------------------------------------------------
# what cannot be pruned, and bad pruning decisions


def test_single_conv_from_input_to_output_is_not_prunable():
    g = _Graph(7)
    x = g.input("x", ["N", 3, 5, 5])
    model = g.model(g.conv(x, "only", 3, 4, 3))
    cg = channel_groups(model)
    assert cg.prunable() == [] and len(cg.groups) == 2
    reasons = sorted(group.reason for group in cg.groups)
    assert reasons == ["reaches model input 'x'", "reaches model output 'only'"]


@pytest.mark.parametrize("case, reason", [
    ("einsum", "Einsum 'mystery' is not supported"),
    ("custom", "example.Mystery 'mystery' is not supported"),
    ("softmax", "Softmax 'mystery' mixes channels on axis 1"),
    ("reduce", "ReduceMax 'mystery' reduces over the channel axis 1"),
    ("pad", "Pad 'mystery' pads the channel axis 1"),
    ("layernorm", "LayerNormalization 'mystery' mixes channels on axis 1"),
    ("batch_merge", "Reshape 'mystery' mixes the channel axis 1 of 'a_relu' with other axes"),
    ("split_reshape", "Reshape 'mystery' mixes the channel axis 1 of 'a_relu' with other axes"),
    ("runtime_weight", "Conv 'b': weight 'w_dyn' is not a constant"),
])
def test_unfollowable_ops_block_with_a_reason(case, reason):
    g = _Graph(8)
    x = g.input("x", ["N", 3, 4, 4])
    a = g.op("Relu", [g.conv(x, "a", 3, 6)], "a_relu")
    if case == "einsum":
        y = g.op("Einsum", [a], "mystery", equation="nchw->nhwc")
    elif case == "custom":
        y = g.op("Mystery", [a], "mystery", domain="example")
    elif case == "softmax":
        y = g.op("Softmax", [a], "mystery", axis=1)
    elif case == "reduce":
        y = g.op("ReduceMax", [a, g.const("axes", np.array([1], np.int64))], "mystery")
    elif case == "pad":
        y = g.op("Pad", [a, g.const("pads", np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64))], "mystery")
    elif case == "layernorm":
        y = g.op("LayerNormalization", [a, g.const("gamma", np.ones((6, 4, 4)))], "mystery", axis=1)
    elif case == "batch_merge":
        y = g.op("Reshape", [a, g.const("target", np.array([-1, 16], np.int64))], "mystery")
    elif case == "split_reshape":
        y = g.op("Reshape", [a, g.const("target", np.array([0, 4, 24], np.int64))], "mystery")
    else:
        w = g.op("Mul", [g.weight("w0", 6, 6, 1, 1), g.op("ReduceMax", [x], "xmax", keepdims=0)], "w_dyn")
        y = g.op("Conv", [a, w], "b")
    model = g.model(g.op("Identity", [y], "out"))
    cg = channel_groups(model)
    group = cg.group_of("a.weight", 0, 0)
    assert not group.prunable and group.reason == reason
    assert cg.prunable() == []


def test_subgraph_use_blocks():
    g = _Graph(9)
    x = g.input("x", ["N", 3, 4, 4])
    a = g.op("Relu", [g.conv(x, "a", 3, 6)], "a_relu")
    then_out = ir.node("Identity", [a], name="then_id")
    then_out.outputs[0].name, then_out.outputs[0].type = "then_y", ir.TensorType(FLOAT)
    else_out = ir.node("Neg", [a], name="else_neg")
    else_out.outputs[0].name, else_out.outputs[0].type = "else_y", ir.TensorType(FLOAT)
    then_graph = ir.Graph([], [then_out.outputs[0]], nodes=[then_out], name="then")
    else_graph = ir.Graph([], [else_out.outputs[0]], nodes=[else_out], name="else")
    cond = g.op("Greater", [g.op("ReduceMax", [x], "xmax", keepdims=0), g.const("zero", np.float32(0))], "cond")
    y = g.op("If", [cond], "branch", then_branch=ir.AttrGraph("then_branch", then_graph),
             else_branch=ir.AttrGraph("else_branch", else_graph))
    model = g.model(y)
    group = channel_groups(model).group_of("a.weight", 0, 0)
    assert not group.prunable and "subgraph" in group.reason


def test_bad_keep_raises_naming_the_group():
    model = _grouped_model()
    cg = channel_groups(model)
    a = cg.group_of("a.weight", 0, 0)
    name = re.escape(f"group {a.id} (12 channels of 'a.weight')")
    with pytest.raises(ValueError, match=f"^{name} would keep no channel"):
        remove_channels(model, cg, {a.id: []})
    with pytest.raises(ValueError, match=rf"^{name} must keep the same number of channels in each of its 3 divisions"):
        remove_channels(model, cg, {a.id: [0, 1, 2, 4]})
    with pytest.raises(ValueError, match=f"^{name}: a channel to keep is outside"):
        remove_channels(model, cg, {a.id: [0, 12]})
    blocked = cg.group_of("x", 1, 0)
    with pytest.raises(ValueError, match=f"^group {blocked.id} .* is not prunable: reaches model input 'x'"):
        remove_channels(model, cg, {blocked.id: [0]})
    with pytest.raises(ValueError, match="^group 99 does not exist"):
        remove_channels(model, cg, {99: [0]})
    # nothing was changed by the refused calls
    assert model.graph.initializers["a.weight"].const_value.shape == (12, 4, 1, 1)
    remove_channels(model, cg, {a.id: [0, 4, 8]})  # one per division is fine
    assert model.graph.initializers["a.weight"].const_value.shape == (3, 4, 1, 1)
    assert next(n for n in model.graph if n.name == "dw").attributes["group"].value == 3


def test_shared_weight_is_copied_not_changed_behind_a_readers_back():
    """A per-channel constant read by a pruned Mul and by a Mul on a tensor no layer touches."""
    g = _Graph(10)
    x = g.input("x", ["N", 4, 3, 3])
    side = g.input("side", ["N", 4, 3, 3])
    a = g.op("Relu", [g.conv(x, "a", 4, 4)], "a_relu")
    scale = g.const("scale", g.rng.uniform(0.5, 2, (4, 1, 1)))
    m = g.op("Mul", [a, scale], "m")
    other = g.op("Mul", [side, scale], "other")  # no weighted layer reads or writes these channels
    model = g.model(g.conv(m, "b", 4, 4), other)
    cg = channel_groups(model)
    group = cg.group_of("a.weight", 0, 0)
    assert group.prunable
    # the original keeps its 4 entries for 'other' (2 more than pruned) and a 2-entry copy appears
    _exact_after_removal(model, _feed(model), fraction=0.5, copied=2 + 2)
    nodes = {n.name: n for n in model.graph}
    assert nodes["other"].inputs[1].name == "scale" and nodes["other"].inputs[1].const_value.shape == (4, 1, 1)
    assert nodes["m"].inputs[1].name == "scale.pruned" and nodes["m"].inputs[1].const_value.shape == (2, 1, 1)
