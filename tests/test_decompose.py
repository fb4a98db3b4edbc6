"""The ``tucker`` and ``lowrank`` passes: exactness at full rank, rank policies, budget, refit, bad input.

Measured when written (onnxruntime 1.31, 2 shared CPU cores):

* full rank: digits CNN (5 Tucker-2 Convs + the Gemm by SVD) 5.5e-7 relative; tiny LLaMA
  (every MatMul by SVD) and the synthetic layouts (Gemm transB=1 with α, β, C[1, N]; MatMul +
  bias Add; strided 1×1 Conv) within 1e-5.
* digits CNN (float top-1 0.9963 on 540 held-out digits), 256 calibration digits:
  ``tucker(budget=macs:0.6)`` → 0.58 of the MACs, top-1 0.9963 with refit, 0.9870 without;
  ``tucker(rank=vbmf)`` → ranks 10–17 of 32 (data-aware EVBMF), 0.22 of the MACs, top-1 0.665
  with refit and 0.096 without — the closed-form refit alone does not hold VBMF ranks within
  1 pt on this model (its weight spectra are flat: plain EVBMF on the weights calls almost every
  layer noise, rank 0–2); a MAC budget does, and so does the seed paper's third step, fine-tuning
  (``finetune``, tests/test_finetune.py: 0.99).
* EfficientNet-Lite0 ``tucker(budget=macs:0.7,linear=true)`` with 64 calibration crops: 0.70 of
  the MACs, top-1 agreement with float 0.87–0.895 on the 200 crops (±2 pt is one standard error
  on 200 crops); about 45 s. The issue's 0.90 is reached with ``finetune`` after it (0.91 on 256
  crops, 9.5 min: ``benchmarks/lowrank.py``, too slow for this suite).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import array_calibration, digits_calibration, digits_top1_of, pass_notes, refused, run_pipeline

from lowbit.core import io
from lowbit.decomp.budget import Candidate, allocate, lower_hull
from lowbit.models import data, demo, evaluate, imagenet_eval
from lowbit.runtime.session import session



def _outputs(model, feed) -> np.ndarray:
    return session(model, optimization="disable").run(None, feed)[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())



# --------------------------------------------------------------------------------------------
# Exactness at full rank


def test_full_rank_tucker_and_svd_are_exact_on_digits():
    model = io.load(demo.model_path("digits"))
    run_pipeline(model, "fold-bn")
    feed = {model.graph.inputs[0].name: data.digits_eval_set()[0][:64]}
    ref = _outputs(model, feed)
    ctx = run_pipeline(model, "tucker(rank=ratio:1.0,only_smaller=false,linear=true)")
    notes = pass_notes(ctx, "tucker")
    assert notes["decomposed"] == 6
    assert {row["method"] for row in notes["layers"]} == {"tucker2", "svd"}
    assert all(row["weight_error"] < 1e-9 for row in notes["layers"])
    assert _rel(ref, _outputs(model, feed)) <= 1e-4
    assert sum(n.op_type == "Conv" for n in model.graph) == 15  # 5 Convs → 3 each


def test_full_rank_lowrank_is_exact_on_tiny_llama():
    model = io.load(demo.model_path("llama"))
    rng = np.random.default_rng(0)
    feed = {model.graph.inputs[0].name: rng.integers(0, 256, (2, 32)).astype(np.int64)}
    ref = _outputs(model, feed)
    ctx = run_pipeline(model, "lowrank(rank=ratio:1.0,only_smaller=false)")
    assert pass_notes(ctx, "lowrank")["decomposed"] >= 14
    assert _rel(ref, _outputs(model, feed)) <= 1e-4


def _layouts(dynamic: bool = True) -> onnx.ModelProto:
    """x[N,8,6,6] → 1×1 Conv stride 2 (8→12, bias) → Relu → Flatten → Gemm transB=1 (α, β, C[1,N])
    → MatMul → Add bias → out; plus a grouped Conv and a ConvTranspose on a side branch."""
    rng = np.random.default_rng(1)

    def t(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1x1", strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Flatten", ["r1"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "cg"], ["g"], name="gemm", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("MatMul", ["g", "wm"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "bm"], ["y"], name="bias_add"),
        helper.make_node("Conv", ["x", "wgrp"], ["side1"], name="grouped", group=2, pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["side1", "wt"], ["side2"], name="deconv"),
        helper.make_node("Conv", ["x", "wdyn"], ["side3"], name="dynamic"),
    ][: None if dynamic else -1]
    inits = [t("w1", 12, 8, 1, 1), t("b1", 12), t("wg", 40, 108), t("cg", 1, 40), t("wm", 40, 24), t("bm", 24),
             t("wgrp", 8, 4, 3, 3), t("wt", 8, 4, 2, 2)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
               for n, shape in (("y", ["N", 24]), ("side2", ["N", 4, 7, 7]), ("side3", ["N", 4, 4, 4]))][: 3 if dynamic else 2]
    if dynamic:
        inputs.append(helper.make_tensor_value_info("wdyn", TensorProto.FLOAT, [4, 8, 3, 3]))
    graph = helper.make_graph(nodes, "layouts", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _layout_feed(n: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 8, 6, 6)).astype(np.float32),
            "wdyn": rng.standard_normal((4, 8, 3, 3)).astype(np.float32)}


def test_full_rank_is_exact_on_every_layout_and_skips_are_listed():
    model = ir.serde.deserialize_model(_layouts())
    feed = _layout_feed()
    ref = session(model, optimization="disable").run(None, feed)
    ctx = run_pipeline(model, "tucker(rank=ratio:1.0,only_smaller=false,linear=true)")
    notes = pass_notes(ctx, "tucker")
    assert sorted(row["node"] for row in notes["layers"]) == ["conv1x1", "gemm", "matmul"]
    skipped = "\n".join(notes["skipped"])
    assert "grouped: grouped convolution (group=2)" in skipped
    assert "deconv: ConvTranspose is not decomposed" in skipped
    assert "dynamic: its weight is not a constant" in skipped
    got = session(model, optimization="disable").run(None, feed)
    for a, b in zip(ref, got):
        assert _rel(a, b) <= 1e-5


def test_refit_on_every_layout_is_checked_on_held_out_data():
    calib_data = {"x": _layout_feed(64, seed=3)["x"]}
    errors = {}
    for refit in (False, True):
        model = ir.serde.deserialize_model(_layouts(dynamic=False))
        calib = array_calibration(model, calib_data, batch=16)
        ctx = run_pipeline(model, f"lowrank(rank=ratio:0.3,refit={str(refit).lower()})", calib=calib)
        notes = pass_notes(ctx, "lowrank")
        feed = {"x": _layout_feed(32, seed=9)["x"]}
        ref = session(ir.serde.deserialize_model(_layouts(dynamic=False)), optimization="disable").run(["y"], feed)[0]
        errors[refit] = _rel(ref, session(model, optimization="disable").run(["y"], feed)[0])
        if refit:
            rows = {row["node"]: row for row in notes["layers"]}
            assert rows["conv1x1"]["refit_method"] == "last factor"  # strided: positions move
            assert rows["gemm"]["refit_method"] == "reduced-rank regression"
            assert all(row["output_error"] <= row["output_error_before_refit"] for row in rows.values())
    # random weights on random inputs: the data-aware SVD is already the optimum, so the held-out
    # check must keep the refit from making things worse (measured 0.697 both ways)
    assert errors[True] <= 1.05 * errors[False], errors
    assert errors[False] < 0.8, errors


# --------------------------------------------------------------------------------------------
# Rank policies, budget and refit on the digits CNN


def test_digits_budget_with_refit_keeps_top1(tmp_path):
    float_top1 = evaluate.digits_top1(demo.model_path("digits"))
    result = {}
    for refit in (True, False):
        model = io.load(demo.model_path("digits"))
        ctx = run_pipeline(model, f"fold-bn,tucker(budget=macs:0.6,refit={str(refit).lower()})", calib=digits_calibration(model, batch=64))
        notes = pass_notes(ctx, "tucker")
        assert notes["model"]["macs_ratio"] <= 0.6
        assert notes["budget"]["reached"]
        # every decomposed layer's sensitivity was probed; they differ by orders of magnitude
        sensitivity = notes["sensitivity"]
        assert {row["node"] for row in notes["layers"]} <= set(sensitivity)
        spread = [v for probes in sensitivity.values() for v in probes.values()]
        assert max(spread) > 10 * min(spread), sensitivity
        result[refit] = digits_top1_of(model, tmp_path)
    assert result[True] >= float_top1 - 0.01, result  # measured 0.9963 = float
    # with the layers' own errors summed instead of the measured model error: 0.9870
    assert result[False] >= float_top1 - 0.01, result  # measured 0.9944
    assert result[True] >= result[False], result


def test_digits_vbmf_ranks(tmp_path):
    model = io.load(demo.model_path("digits"))
    ctx = run_pipeline(model, "fold-bn,tucker(rank=vbmf)", calib=digits_calibration(model, batch=64))
    notes = pass_notes(ctx, "tucker")
    ranks = {row["node"]: row["ranks"] for row in notes["layers"]}
    # data-aware EVBMF of the unfoldings: a third of the channels or so (measured 10–17 of 32)
    assert all(1 <= r <= 24 for node, rr in ranks.items() for r in rr if node != "node_Conv_76")
    assert notes["model"]["macs_ratio"] < 0.35  # measured 0.22
    top1 = digits_top1_of(model, tmp_path)
    plain = io.load(demo.model_path("digits"))
    run_pipeline(plain, "fold-bn,tucker(rank=vbmf,refit=false)", calib=digits_calibration(plain, batch=64))
    # the refit is what keeps the network working at these ranks (measured 0.665 vs 0.096)
    assert top1 >= digits_top1_of(plain, tmp_path) + 0.3


def test_only_when_it_pays():
    model = io.load(demo.model_path("digits"))
    ctx = run_pipeline(model, "fold-bn,tucker(rank=ratio:0.9)")
    notes = pass_notes(ctx, "tucker")
    assert notes["decomposed"] == 0
    assert sum("would not lower its MACs" in s for s in notes["skipped"]) == 5


def test_integer_rank_above_a_layers_bound_skips_it():
    model = io.load(demo.model_path("digits"))
    ctx = run_pipeline(model, "fold-bn,tucker(rank=20)")
    skipped = "\n".join(pass_notes(ctx, "tucker")["skipped"])
    assert "node_Conv_76: rank 20 exceeds the layer's bound 1" in skipped
    assert "node_Conv_77: rank 20 exceeds the layer's bound 16" in skipped


# --------------------------------------------------------------------------------------------
# The budget allocation


def test_lower_hull_and_greedy_allocation_match_brute_force():
    rng = np.random.default_rng(5)
    layers = []
    for _ in range(4):
        macs = sorted(rng.choice(np.arange(10, 100), 6, replace=False))[::-1]
        errors = np.sort(rng.uniform(0, 1, 5))
        layers.append([Candidate(int(macs[0]), 0.0, None)] + [Candidate(int(m), float(e), i) for i, (m, e) in enumerate(zip(macs[1:], errors))])
    hull = lower_hull(layers[0])
    slopes = [(b.error - a.error) / (a.macs - b.macs) for a, b in zip(hull, hull[1:])]
    assert slopes == sorted(slopes)
    total = sum(options[0].macs for options in layers)
    target = int(0.6 * total)
    picks, macs = allocate(layers, total, target)
    assert macs <= target and macs == sum(p.macs for p in picks)
    # the greedy hull walk is optimal among the allocations that reach the target with hull points
    import itertools

    best = min(sum(c.error for c in combo) for combo in itertools.product(*(lower_hull(o) for o in layers))
               if sum(c.macs for c in combo) <= target)
    assert sum(p.error for p in picks) <= best + 0.35  # greedy overshoots by at most one step


def test_allocation_backs_off_an_overshooting_last_move():
    # the hull goes straight from 100 to 50 MACs; the target 85 is reached by (80, 0.45), off the hull
    layer = [Candidate(100, 0.0, None), Candidate(80, 0.45, "r80"), Candidate(50, 0.5, "r50")]
    assert [c.choice for c in lower_hull(layer)] == [None, "r50"]
    (pick,), macs = allocate([layer], 100, 85)
    assert (pick.choice, macs) == ("r80", 80)
    # a second layer already cut stays cut; only the last move is revised
    other = [Candidate(40, 0.0, None), Candidate(30, 0.01, "o30")]
    picks, macs = allocate([other, layer], 140, 115)
    assert [p.choice for p in picks] == ["o30", "r80"] and macs == 110


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 under a MAC budget


def test_lite0_budget(lite0_path, tmp_path):
    from lowbit.core.compile import compress

    calib = imagenet_eval.write_calib(tmp_path)
    out = tmp_path / "lite0_lowrank.onnx"
    report = compress(lite0_path, out, "tucker(budget=macs:0.7,linear=true)", calib=str(calib), progress=False)
    notes = report["passes"][0]["notes"]
    assert notes["model"]["macs_ratio"] <= 0.70
    skipped = "\n".join(notes["skipped"])
    assert skipped.count("depthwise convolution") == 16
    images = imagenet_eval.eval_crops()
    agreement = imagenet_eval.top1_agreement(imagenet_eval.logits(lite0_path, images), imagenet_eval.logits(out, images))
    assert agreement >= 0.85, agreement  # measured 0.87–0.895; 0.91 with finetune (benchmarks/lowrank.py)


# --------------------------------------------------------------------------------------------
# Bad input, named


@pytest.mark.parametrize("passes, message", [
    ("tucker(budget=macs:1.5)", "option 'budget' of pass tucker must be 'macs:F' with 0 < F ≤ 1"),
    ("tucker(budget=macs:0)", "option 'budget' of pass tucker must be 'macs:F'"),
    ("lowrank(budget=flops:0.5)", "option 'budget' of pass lowrank must be 'macs:F'"),
    ("tucker(rank=ratio:2)", "option 'rank' of pass tucker"),
    ("lowrank(rank=lots)", "option 'rank' of pass lowrank"),
    ("tucker(refit=true)", "option 'refit' of pass tucker needs calibration data (--calib)"),
    ("tucker(round=0)", "option 'round' of pass tucker must be at least 1"),
])
def test_bad_options_exit_2_one_line(run_cli, tmp_path, tiny_path, passes, message):
    refused(run_cli, tmp_path, "compress", tiny_path, "-o", tmp_path / "out.onnx", "--passes", passes, match=message)


@pytest.mark.parametrize("ranks, message", [
    ('"node_Conv_77" = [40, 8]', "rank 40 for node 'node_Conv_77' is outside 1…32"),
    ('"node_Conv_77" = 0', "rank 0 for node 'node_Conv_77' is outside"),
    ('"nope" = 4', "names node 'nope', which is not a Conv of the graph"),
    ('"node_Conv_77" = "x"', "node 'node_Conv_77' needs an integer or [R_out, R_in]"),
])
def test_bad_explicit_ranks_exit_2(run_cli, tmp_path, ranks, message):
    src = tmp_path / "digits.onnx"
    src.write_bytes(demo.model_path("digits").read_bytes())
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[[pass]]\nname = "tucker"\n[pass.ranks]\n{ranks}\n')
    refused(run_cli, tmp_path, "compress", src, "-o", tmp_path / "out.onnx", "--recipe", recipe, match=message)


def test_explicit_rank_on_a_skipped_layer_is_refused(run_cli, tmp_path):
    src = tmp_path / "layouts.onnx"
    onnx.save(_layouts(), src)
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "tucker"\n[pass.ranks]\ngrouped = 2\n')
    refused(run_cli, tmp_path, "compress", src, "-o", tmp_path / "out.onnx", "--recipe", recipe,
            match="names node 'grouped', which cannot be decomposed: grouped convolution (group=2)")
