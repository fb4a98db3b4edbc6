"""The ``finetune`` pass (distillation through a jax copy of the graph) and ``core.jaxgraph``.

Measured when written (2 shared cores, jax 0.10 on CPU):

* ``core.jaxgraph`` against onnxruntime, relative: digits CNN 1e-7, EfficientNet-Lite0 (49 Convs,
  16 depthwise, Pad/Clip/Shape/Reshape) 1e-6, tiny LLaMA (Slice/Transpose/Softmax/Gather…) 1e-6.
* digits CNN, ``fold-bn,tucker(rank=vbmf),finetune`` (256 calibration digits, 3000 steps, 40 s):
  top-1 0.9926 at seed 0 against float 0.9963 (seeds 0–4: 0.9926, 0.9944, 0.9963, 0.9889,
  0.9963), where the closed-form refit alone gives 0.665 — the issue's "within 1 pt of float" at
  the VBMF ranks (0.22× the MACs). Without mixup 0.972–0.978; 1500 steps: 0.983–0.991.
* EfficientNet-Lite0 after ``tucker(budget=macs:0.7,linear=true)``: 0.895 → 0.91 agreement with
  ``finetune(steps=200,batch=8,lr=5e-5,mix=0)`` on 256 crops (9.5 min; ``benchmarks/lowrank.py``).
"""

from __future__ import annotations

import sys

import numpy as np
import onnx_ir as ir
import jax
import onnx
import pytest

from helpers import array_calibration, digits_calibration, digits_top1_of, pass_notes, refused, run_pipeline

from lowbit.core import io
from lowbit.core.errors import UserError
from lowbit.models import data, demo, imagenet_eval
from lowbit.runtime.session import session


def _jax_outputs(model: ir.Model, feed: dict) -> list[np.ndarray]:
    from lowbit.core.jaxgraph import GraphFunction, check_supported

    check_supported(model.graph, "test")
    f = GraphFunction(model.graph)
    return [np.asarray(y) for y in jax.jit(lambda feed: f({}, feed))(feed)]


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _ort(model: ir.Model, feed: dict) -> list[np.ndarray]:
    return session(model, optimization="disable").run(None, feed)


# --------------------------------------------------------------------------------------------
# The graph as a jax function computes what onnxruntime computes


def test_jaxgraph_matches_onnxruntime_on_digits_and_tucker():
    model = io.load(demo.model_path("digits"))
    feed = {model.graph.inputs[0].name: np.ascontiguousarray(data.digits_eval_set()[0][:32])}
    assert _rel(_jax_outputs(model, feed)[0], _ort(model, feed)[0]) <= 1e-5
    run_pipeline(model, "fold-bn,tucker(rank=ratio:0.5)")
    assert _rel(_jax_outputs(model, feed)[0], _ort(model, feed)[0]) <= 1e-5


def test_jaxgraph_matches_onnxruntime_on_lite0(lite0_path):
    model = io.load(lite0_path)
    feed = {"input": imagenet_eval.eval_crops()[:4]}
    assert _rel(_jax_outputs(model, feed)[0], _ort(model, feed)[0]) <= 1e-4


def test_jaxgraph_matches_onnxruntime_on_tiny_llama():
    model = io.load(demo.model_path("llama"))
    text = np.frombuffer(data.text_split()[1][:4 * 64], dtype=np.uint8).astype(np.int64).reshape(4, 64)
    feed = {model.graph.inputs[0].name: text}
    assert _rel(_jax_outputs(model, {k: v.astype(np.int32) for k, v in feed.items()})[0], _ort(model, feed)[0]) <= 1e-4


def test_jaxgraph_reads_every_constant_form():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    nodes = [
        onnx.helper.make_node("Constant", [], ["a"], value_float=2.0),
        onnx.helper.make_node("Constant", [], ["b"], value_floats=[1.0, -1.0, 0.5]),
        onnx.helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(np.full((2, 1), 3.0, np.float32))),
        onnx.helper.make_node("Constant", [], ["shape"], value_ints=[3, 2]),
        onnx.helper.make_node("Mul", ["x", "a"], ["xa"]),
        onnx.helper.make_node("Add", ["xa", "b"], ["xb"]),
        onnx.helper.make_node("Sub", ["xb", "c"], ["xc"]),
        onnx.helper.make_node("Reshape", ["xc", "shape"], ["r"]),
        onnx.helper.make_node("Reshape", ["r", "back"], ["y"]),
    ]
    back = onnx.numpy_helper.from_array(np.array([2, 3], np.int64), "back")
    graph = onnx.helper.make_graph(nodes, "constants", [x], [y], initializer=[back])
    model = ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10))
    feed = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    assert _rel(_jax_outputs(model, feed)[0], _ort(model, feed)[0]) <= 1e-6


# --------------------------------------------------------------------------------------------
# What it reaches


def test_digits_vbmf_ranks_held_within_one_point_by_finetune(tmp_path):
    """Kim et al.'s recipe — VBMF ranks, Tucker-2, fine-tuning — on the digits CNN (#5)."""
    model = io.load(demo.model_path("digits"))
    float_top1 = digits_top1_of(model, tmp_path)
    ctx = run_pipeline(model, "fold-bn,tucker(rank=vbmf),finetune", calib=digits_calibration(model, batch=64))
    tucker = pass_notes(ctx, "tucker")
    assert tucker["model"]["macs_ratio"] <= 0.25
    notes = pass_notes(ctx, "finetune")
    assert notes["held_out_loss"]["after"] <= 0.2 * notes["held_out_loss"]["before"], notes["held_out_loss"]
    top1 = digits_top1_of(model, tmp_path)
    assert top1 >= float_top1 - 0.01, (top1, float_top1)  # measured 0.9926 against 0.9963


def test_same_seed_same_bytes_and_the_model_only_improves(tmp_path):
    models = []
    for _ in range(2):
        model = io.load(demo.model_path("digits"))
        ctx = run_pipeline(model, "fold-bn,tucker(rank=ratio:0.4,refit=false),finetune(steps=60)",
                           calib=digits_calibration(model, batch=64))
        models.append(model)
    notes = pass_notes(ctx, "finetune")
    assert notes["held_out_loss"]["after"] < notes["held_out_loss"]["before"]
    assert notes["samples"] == {"train": 224, "held_out": 32, "mixed": 1.0}
    first, second = ({n: v.const_value.numpy().tobytes() for n, v in m.graph.initializers.items()} for m in models)
    assert first == second


def test_train_changed_trains_only_what_the_pipeline_changed():
    """After a Tucker-2 of the five convs and no refit, the changed weights are the new factors and
    the cores (the last factors reuse the original node and bias); the Gemm is untouched."""
    original = io.load(demo.model_path("digits"))
    gemm_weights = {v.name: v.const_value.numpy().copy() for n in original.graph if n.op_type == "Gemm"
                    for v in n.inputs[1:] if v is not None}
    model = io.load(demo.model_path("digits"))
    calib = digits_calibration(model, batch=64)
    pipeline = "fold-bn,tucker(rank=ratio:0.5,refit=false),finetune(steps=30{})"
    ctx = run_pipeline(model, pipeline.format(",train=changed"), calib=calib)
    notes = pass_notes(ctx, "finetune")
    assert notes["held_out_loss"]["after"] < notes["held_out_loss"]["before"]
    everything = run_pipeline(io.load(demo.model_path("digits")), pipeline.format(""), calib=calib)
    assert 0 < notes["trained"]["weights"] < pass_notes(everything, "finetune")["trained"]["weights"]
    after = model.graph.initializers
    assert gemm_weights and all(np.array_equal(a, after[name].const_value.numpy()) for name, a in gemm_weights.items())


def test_nothing_to_gain_keeps_the_input_weights():
    """Student = teacher: the held-out loss starts at 0, so the input weights are kept."""
    model = io.load(demo.model_path("digits"))
    before = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    ctx = run_pipeline(model, "finetune(steps=20)", calib=digits_calibration(model, batch=64))
    notes = pass_notes(ctx, "finetune")
    assert notes["kept"] == "input" and notes["held_out_loss"]["before"] == 0.0
    assert all(np.array_equal(before[n], v.const_value.numpy()) for n, v in model.graph.initializers.items())


def test_token_model_trains_without_mixing():
    model = io.load(demo.model_path("llama"))
    text = np.frombuffer(data.text_split()[0][:32 * 64], dtype=np.uint8).astype(np.int64).reshape(32, 64)
    calib = array_calibration(model, {model.graph.inputs[0].name: text}, batch=8)
    ctx = run_pipeline(model, "lowrank(rank=ratio:0.25,refit=false),finetune(steps=40,batch=8,lr=1e-3)", calib=calib)
    notes = pass_notes(ctx, "finetune")
    assert notes["samples"]["mixed"] == 0.0
    assert notes["held_out_loss"]["after"] <= 0.9 * notes["held_out_loss"]["before"], notes["held_out_loss"]


# --------------------------------------------------------------------------------------------
# Bad input, named


@pytest.mark.parametrize("passes, message", [
    ("finetune(steps=0)", "option 'steps' of pass finetune must be ≥ 1"),
    ("finetune(lr=0)", "option 'lr' of pass finetune must be > 0"),
    ("finetune(mix=1.5)", "option 'mix' of pass finetune must be between 0 and 1"),
])
def test_bad_options_exit_2_one_line(run_cli, tmp_path, tiny_path, passes, message):
    calib = tmp_path / "calib" / "c.npz"
    calib.parent.mkdir()
    np.savez(calib, input=np.random.default_rng(0).random((8, 3, 8, 8), dtype=np.float32))
    refused(run_cli, tmp_path, "compress", tiny_path, "-o", tmp_path / "out.onnx", "--calib", calib,
            "--passes", passes, match=message)


def test_no_calibration_data_is_refused(run_cli, tmp_path, tiny_path):
    refused(run_cli, tmp_path, "compress", tiny_path, "-o", tmp_path / "out.onnx", "--passes", "finetune",
            match="pass finetune needs calibration data (--calib)")


def test_quantized_or_unsupported_graphs_are_refused_by_node():
    model = io.load(demo.model_path("digits"))
    calib = digits_calibration(model, batch=64)
    run_pipeline(model, "quantize(weights=4,block=32,method=rtn)")
    with pytest.raises(UserError, match=r"node '[^']+' is a DequantizeLinear; run it before quantize"):
        run_pipeline(model, "finetune(steps=1)", calib=calib)

    model = io.load(demo.model_path("digits"))
    relu = next(n for n in model.graph if n.op_type == "Relu")
    relu.op_type = "Softplus"
    with pytest.raises(UserError, match=f"cannot differentiate node '{relu.name}' \\(op Softplus\\)"):
        run_pipeline(model, "finetune(steps=1)", calib=calib)


def test_missing_jax_is_named(monkeypatch):
    model = io.load(demo.model_path("digits"))
    monkeypatch.setitem(sys.modules, "jax", None)
    with pytest.raises(UserError, match=r"pass finetune needs jax: pip install 'lowbit\[finetune\]'"):
        run_pipeline(model, "finetune(steps=1)", calib=digits_calibration(model, batch=64))
