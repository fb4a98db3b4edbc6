"""Small models built in code for tests (onnx-ir, no files), and the check that a command was refused."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lowbit.core.calib import Calibration, input_specs


def tiny_cnn(seed: int = 0) -> ir.Model:
    """input[N,3,8,8] → Conv(3→4, 3×3, pad 1) → BatchNormalization → Relu → out."""
    rng = np.random.default_rng(seed)

    def const(name, array):
        value = ir.Value(name=name, const_value=ir.tensor(array.astype(np.float32), name=name))
        value.shape, value.dtype = ir.Shape(array.shape), ir.DataType.FLOAT
        return value

    x = ir.Value(name="input", shape=ir.Shape(["N", 3, 8, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    w, b = const("w", rng.standard_normal((4, 3, 3, 3))), const("b", rng.standard_normal(4))
    bn = [const("gamma", rng.uniform(0.5, 2, 4)), const("beta", rng.standard_normal(4)),
          const("mean", rng.standard_normal(4)), const("var", rng.uniform(0.5, 2, 4))]
    conv = ir.node("Conv", [x, w, b], attributes={"pads": [1, 1, 1, 1]}, name="conv")
    norm = ir.node("BatchNormalization", [conv.outputs[0], *bn], name="bn")
    relu = ir.node("Relu", [norm.outputs[0]], name="relu")
    relu.outputs[0].name = "out"
    relu.outputs[0].shape = ir.Shape(["N", 4, 8, 8])
    relu.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [relu.outputs[0]], nodes=[conv, norm, relu], initializers=[w, b, *bn],
                     opset_imports={"": 18}, name="tiny")
    model = ir.Model(graph, ir_version=10, producer_name="lowbit-tests")
    model.metadata_props["origin"] = "tests"
    model.graph.doc_string = "a tiny test model"
    return model


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(run_cli, folder: Path, *argv, match: str) -> str:
    """Run the CLI, expect exit 2 with one line naming the problem and no file written or changed."""
    before = _digest(folder)
    code, out, err = run_cli(*argv)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lowbit: error: ")
    assert match in lines[0], lines[0]
    assert _digest(folder) == before, "a refused command wrote or changed files"
    return lines[0]


def array_calibration(model: ir.Model, data: dict[str, np.ndarray], batch: int = 16) -> Calibration:
    """In-memory calibration data for ``model``: ``data`` served in batches of ``batch`` rows."""
    n = len(next(iter(data.values())))

    def make():
        for start in range(0, n, batch):
            yield {k: v[start:start + batch] for k, v in data.items()}

    return Calibration("test data", make, input_specs(model), num_samples=n)


def digits_calibration(model: ir.Model, batch: int = 16) -> Calibration:
    """The digits CNN's 256 calibration images (``x_calib``) as in-memory calibration data."""
    from lowbit.models import data

    return array_calibration(model, {model.graph.inputs[0].name: data.digits_calib()}, batch=batch)


def digits_top1_of(model: ir.Model, folder: Path) -> float:
    """Top-1 of a (rewritten) digits CNN on the 540 held-out digits, saved into ``folder``."""
    from lowbit.core import io
    from lowbit.models import evaluate

    path = folder / "digits.onnx"
    io.save(model, path)
    return evaluate.digits_top1(path)


def run_pipeline(model: ir.Model, pipeline: str, calib=None):
    """Run a pipeline text on ``model`` in place; return the Context (its report)."""
    from lowbit.core.context import Context
    from lowbit.passes.manager import run_passes
    from lowbit.passes.pipeline import parse_pipeline

    ctx = Context(calib=calib, progress=False)
    run_passes(model, parse_pipeline(pipeline), ctx)
    return ctx


def pass_notes(ctx, name: str) -> dict:
    """The report notes of the (first) pass called ``name``."""
    return next(p for p in ctx.report.passes if p.name == name).notes


def zero_channels(model: ir.Model, cg, group, channels, roles=("in",)) -> None:
    """Zero, in place, the weight entries that ``channels`` of ``group`` own in every constant
    member with one of ``roles`` ("in": the layers reading them, "out": those producing them)."""
    from lowbit.passes.edit import const_array

    values = ir.convenience.create_value_mapping(model.graph)
    for member in group.members:
        if member.role not in roles:
            continue
        array = const_array(values[member.tensor])
        if array is None:
            continue
        array = array.copy()
        array[cg.mask(group, member, channels, array.shape)] = 0
        values[member.tensor].const_value = ir.tensor(array, name=member.tensor)
