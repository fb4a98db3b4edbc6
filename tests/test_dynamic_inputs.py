"""Models with symbolic or fixed input sizes: ``--input-shape``, guessed sizes, fixed batches.

Real model: nudenet's YOLOv8n (``lowbit.models.yolo``), input ``images`` [batch, 3, height,
width], height and width multiples of 32. At 320 × 320 it costs 1 012 627 200 MACs (64 Convs);
at the guessed image size 224 × 224, 0.49 of that (every feature map is an exact stride division).
Small graphs built here reproduce each bug alone: a strided (non-contiguous) folded constant,
an input model that fails at guessed sizes, fixed batches of 1 and 4.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx_ir as ir
import pytest

from helpers import refused, tiny_cnn
from lowbit.analysis.stats import format_stats, infer_shapes, model_stats
from lowbit.core import calib as calib_mod
from lowbit.core import io
from lowbit.core.calib import (
    InputSpec,
    apply_input_shapes,
    input_specs,
    open_calibration,
    parse_input_shapes,
    random_feed,
)
from lowbit.core.context import Context
from lowbit.core.errors import UserError
from lowbit.models import yolo
from lowbit.passes.cleanup import contiguous_initializers
from lowbit.passes.manager import run_model, run_passes, sample_feeds
from lowbit.passes.pipeline import parse_pipeline
from lowbit.quant.capture import limit_samples

YOLO_MACS_320 = 1_012_627_200
YOLO_MACS_224 = 496_187_328  # = YOLO_MACS_320 · (224 / 320)²
F32 = np.dtype(np.float32)


def _rel(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


@pytest.fixture(scope="module")
def yolo_dir(yolo_path, tmp_path_factory):
    """The dynamic YOLOv8n, copies fixed to 1×3×320×320 and 4×3×320×320, and the 16 calibration
    views as an .npz, in one folder."""
    folder = tmp_path_factory.mktemp("dynamic")
    shutil.copyfile(yolo_path, folder / "yolo.onnx")
    for batch in (1, 4):
        model = io.load(yolo_path)
        apply_input_shapes(model, {yolo.INPUT: (batch, 3, yolo.SIZE, yolo.SIZE)})
        io.save(model, folder / f"fixed{batch}.onnx")
    yolo.calibration(folder / "calib.npz")
    return folder


@pytest.fixture(scope="module")
def photos4():
    return yolo.photos().images[:4]


# --- guessed sizes --------------------------------------------------------------------------


def test_random_feed_guesses_images_and_sequences():
    rng = np.random.default_rng(0)
    image = InputSpec("images", F32, ("batch", 3, "height", "width"))
    nhwc = InputSpec("pixels", F32, (None, None, None, 3))
    assert random_feed([image], 4, rng)["images"].shape == (4, 3, 224, 224)
    assert random_feed([nhwc], 2, rng)["pixels"].shape == (2, 224, 224, 3)
    # A symbol has one size everywhere: the mask's "seq" is a sequence length because of ids.
    ids = InputSpec("ids", np.dtype(np.int64), ("batch", "seq"), vocab=10)
    mask = InputSpec("mask", F32, ("batch", 1, "seq", "seq"))
    feed = random_feed([ids, mask], 2, rng)
    assert feed["ids"].shape == (2, 16) and feed["mask"].shape == (2, 1, 16, 16)
    assert feed["ids"].max() < 10
    # Explicit sizes still win.
    assert random_feed([image], 1, rng, image=64)["images"].shape == (1, 3, 64, 64)
    assert calib_mod.DEFAULT_IMAGE % 32 == 0 and calib_mod.DEFAULT_SEQ == 16


def test_infer_shapes_uses_image_default_and_says_so():
    model = tiny_cnn()
    model.graph.inputs[0].shape = ir.Shape(["N", 3, "H", "W"])
    shaped = infer_shapes(model)
    assert shaped.graph.outputs[0].shape == ir.Shape([1, 4, 224, 224])
    assert shaped.meta["lowbit.assumed_dims"] == {"N": 1, "H": 224, "W": 224}
    stats = model_stats(model)
    assert stats.macs == 4 * 27 * 224 * 224 and stats.macs_complete
    assert stats.input_shapes == {"input": [1, 3, 224, 224]}
    text = format_stats(stats)
    assert "MACs at input [1,3,224,224]" in text and "assumed: N=1, H=224, W=224" in text
    assert "--input-shape" in text
    # dim= given explicitly applies to every non-batch symbolic dim, as before.
    assert model_stats(model, batch=2, dim=16).macs == 2 * 4 * 27 * 16 * 16


# --- --input-shape ----------------------------------------------------------------------------


def test_parse_and_apply_input_shapes():
    assert parse_input_shapes(["images=1,3,320,320", "x=?,8"]) == {"images": (1, 3, 320, 320), "x": (None, 8)}
    model = tiny_cnn()
    model.graph.inputs[0].shape = ir.Shape(["N", 3, "H", "W"])
    model.graph.outputs[0].shape = ir.Shape(["N", 4, "H", "W"])
    pinned = apply_input_shapes(model, ["2,3,?,8"])  # the only input: the name may be left out
    assert pinned == {"input": [2, 3, "H", 8]}
    # The symbols pinned are replaced everywhere they appear, the one kept stays.
    assert [d if isinstance(d, int) else str(d) for d in model.graph.outputs[0].shape] == [2, 4, "H", 8]
    assert apply_input_shapes(model, None) == {}


@pytest.mark.parametrize("text, match", [
    ("inptu=1,3,8,8", "no input 'inptu' (inputs: input); did you mean 'input'?"),
    ("input=1,3,8", "input 'input' has 4 dimensions [N, 3, 8, 8], not 3"),
    ("input=1,4,8,8", "dimension 1 of input 'input' is fixed to 3 by the model"),
    ("input=1,3,0,8", "dimension 2 of input 'input' is 0; dimensions must be positive integers"),
    ("input=-1,3,8,8", "dimension 0 of input 'input' is -1"),
    ("input=1,3,8,x", "'x' is not a dimension"),
    ("=1,3,8,8", "NAME=D0,D1"),
])
def test_input_shape_refused(run_cli, tmp_path, tiny_path, text, match):
    line = refused(run_cli, tmp_path, "compress", tiny_path, "-o", tmp_path / "o.onnx", "--passes", "fold-bn",
                   "--input-shape", text, match=match)
    assert f"--input-shape {text}" in line
    assert not (tmp_path / "o.onnx").exists()


def _two_inputs() -> ir.Model:
    """a, b [batch, 4] → Add."""
    x = ir.Value(name="a", shape=ir.Shape(["batch", 4]), type=ir.TensorType(ir.DataType.FLOAT))
    y = ir.Value(name="b", shape=ir.Shape(["batch", 4]), type=ir.TensorType(ir.DataType.FLOAT))
    add = ir.node("Add", [x, y], name="add")
    add.outputs[0].shape = ir.Shape(["batch", 4])
    graph = ir.Graph([x, y], [add.outputs[0]], nodes=[add], opset_imports={"": 18}, name="g")
    return ir.Model(graph, ir_version=10)


def test_input_shape_symbol_shared_by_two_inputs():
    with pytest.raises(UserError, match=r"--input-shape b=3,4: dimension 0 of input 'b' is 'batch', which another "
                                        r"--input-shape sets to 2, not 3"):
        apply_input_shapes(_two_inputs(), ["a=2,4", "b=3,4"])
    model = _two_inputs()
    assert apply_input_shapes(model, ["a=2,4"]) == {"a": [2, 4], "b": [2, 4]}  # b shares the symbol
    assert list(model.graph.outputs[0].shape) == [2, 4]
    # ? keeps a's symbol, which b's pin then fixes on both.
    assert apply_input_shapes(_two_inputs(), ["a=?,4", "b=3,?"]) == {"a": [3, 4], "b": [3, 4]}
    with pytest.raises(UserError, match="the model has 2 inputs"):
        apply_input_shapes(_two_inputs(), ["2,4"])


def test_input_shape_on_inspect_compare_and_before_the_command(run_cli, tmp_path, tiny_path):
    code, out, err = run_cli("--input-shape", "input=3,3,8,8", "inspect", tiny_path, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["macs"] == 3 * 4 * 27 * 64 and data["pinned_input_shapes"] == {"input": [3, 3, 8, 8]}
    assert data["assumed_dims"] == {} and data["input_shapes"] == {"input": [3, 3, 8, 8]}
    code, out, err = run_cli("compare", tiny_path, tiny_path, "--input-shape", "input=2,3,8,8", "--json",
                             "--no-latency")
    assert code == 0, err
    data = json.loads(out)
    assert data["samples"] == 2 and data["error"]["max_abs"] == 0 and data["input_shapes"] == {"input": [2, 3, 8, 8]}
    code, _, err = run_cli("--input-shape", "input=1,3,8,8", "passes")
    assert code == 2 and "--input-shape applies to compress, inspect and compare, not passes" in err


# --- an input model that fails at guessed sizes -------------------------------------------------


def _reshape_model() -> ir.Model:
    """x [N, 3, H, W] → Reshape to [1, 192]: runs only at 1×3×8×8."""
    x = ir.Value(name="x", shape=ir.Shape(["N", 3, "H", "W"]), type=ir.TensorType(ir.DataType.FLOAT))
    shape = ir.Value(name="shape", const_value=ir.tensor(np.array([1, 192], np.int64), name="shape"))
    node = ir.node("Reshape", [x, shape], name="reshape")
    node.outputs[0].name = "y"
    node.outputs[0].shape = ir.Shape([1, 192])
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], initializers=[shape], opset_imports={"": 18}, name="r")
    return ir.Model(graph, ir_version=10)


def test_guessed_sizes_failure_is_a_user_error(run_cli, tmp_path):
    path = tmp_path / "reshape.onnx"
    io.save(_reshape_model(), path)
    line = refused(run_cli, tmp_path, "compress", path, "-o", tmp_path / "o.onnx", "--passes", "cleanup",
                   match="the input model fails to run on random inputs of guessed size x [4,3,224,224] "
                         "(N, H, W guessed)")
    assert "--input-shape x=<N>,3,<H>,<W>" in line and "Reshape node 'reshape'" in line
    refused(run_cli, tmp_path, "compress", path, "-o", tmp_path / "o.onnx", "--passes", "cleanup",
            "--calib", "random:2", match="guessed size x [2,3,224,224]")
    refused(run_cli, tmp_path, "compare", path, path, "--no-latency",
            match=f"{path}: model A fails to run on random inputs of guessed size x [16,3,224,224]")
    code, out, err = run_cli("compress", path, "-o", tmp_path / "o.onnx", "--passes", "cleanup",
                             "--input-shape", "x=1,3,8,8", "--json")
    assert code == 0, err
    info = json.loads(out)["info"]
    assert info["input_shapes"] == {"x": [1, 3, 8, 8]} and info["before"]["input_shapes"] == {"x": [1, 3, 8, 8]}
    saved = io.load(tmp_path / "o.onnx")
    assert list(saved.graph.inputs[0].shape) == [1, 3, 8, 8]
    assert saved.metadata_props["lowbit.input_shapes"] == "x=1,3,8,8"


def test_yolo_at_old_guess_is_a_user_error(run_cli, yolo_dir, monkeypatch):
    """The original failure: at 16 × 16 YOLOv8n's upsampling Resize and Concat disagree. Now a
    one-line user error naming the input, its guessed shape and --input-shape; and MACs at that
    size are flagged as incomplete instead of shown as if whole."""
    monkeypatch.setattr(calib_mod, "DEFAULT_IMAGE", 16)
    out = yolo_dir / "never.onnx"
    line = refused(run_cli, yolo_dir, "compress", yolo_dir / "yolo.onnx", "-o", out, "--passes", "fold-bn",
                   match="guessed size images [4,3,16,16] (batch, height, width guessed)")
    assert "--input-shape images=<batch>,3,<height>,<width>" in line and "/model.10/Resize" in line
    refused(run_cli, yolo_dir, "compare", yolo_dir / "yolo.onnx", yolo_dir / "yolo.onnx", "--no-latency",
            match="model A fails to run on random inputs of guessed size images [16,3,16,16]")
    stats = model_stats(io.load(yolo_dir / "yolo.onnx"))
    assert not stats.macs_complete and len(stats.unknown_macs) == 37
    assert stats.macs < YOLO_MACS_320 / 100  # what used to be reported as the model's MACs
    text = format_stats(stats)
    assert f"≥ {stats.macs / 1e6:.2f} M MACs" in text and "INCOMPLETE: 37 of 64 compute nodes not counted" in text
    assert "onnxruntime could not run the model at these sizes" in text


# --- YOLOv8n end to end ---------------------------------------------------------------------------


def test_yolo_compress_and_compare_without_calibration(run_cli, yolo_dir):
    model = yolo_dir / "yolo.onnx"
    for extra in ([], ["--calib", "random:4"]):
        out = yolo_dir / f"guessed{len(extra)}.onnx"
        code, stdout, err = run_cli("compress", model, "-o", out, "--passes", "fold-constants,fold-bn,cleanup",
                                    "--json", *extra)
        assert code == 0, err
        info = json.loads(stdout)["info"]
        assert info["before"]["macs"] == info["after"]["macs"] == YOLO_MACS_224
        assert info["before"]["assumed_dims"] == {"batch": 1, "height": 224, "width": 224}
        assert info["before"]["macs_complete"] and info["after"]["macs_complete"]
    code, stdout, err = run_cli("compare", model, yolo_dir / "guessed0.onnx", "--no-latency", "--json",
                                "--batch-size", "2")
    assert code == 0, err
    data = json.loads(stdout)
    assert data["samples"] == 2 and data["error"]["rel"] <= 1e-5


def test_yolo_inspect_macs(run_cli, yolo_dir):
    code, out, err = run_cli("inspect", yolo_dir / "yolo.onnx", "--input-shape", "images=1,3,320,320", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["macs"] == YOLO_MACS_320 and data["macs_complete"] and not data["unknown_macs"]
    assert data["macs_by_op"] == {"Conv": YOLO_MACS_320} and data["assumed_dims"] == {}
    code, out, _ = run_cli("inspect", yolo_dir / "yolo.onnx")
    assert code == 0
    assert "Compute: 496 M MACs at images [1,3,224,224]" in out
    assert "assumed: batch=1, height=224, width=224" in out
    code, out, _ = run_cli("inspect", yolo_dir / "yolo.onnx", "--input-shape", "images=1,3,320,320")
    assert "Compute: 1.01 G MACs at images [1,3,320,320]" in out and "assumed" not in out


def test_yolo_fixed_fold_cleanup_exact(run_cli, yolo_dir, photos4):
    """fold-constants on a fixed-shape YOLOv8n folds the anchor grid (a Transpose + Unsqueeze of
    constants: a strided view), which cleanup's deduplication used to refuse to hash."""
    out = yolo_dir / "folded.onnx"
    code, stdout, err = run_cli("compress", yolo_dir / "yolo.onnx", "-o", out, "--input-shape", "images=1,3,320,320",
                                "--passes", "fold-constants,fold-bn,cleanup", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["info"]["input_shapes"] == {"images": [1, 3, 320, 320]}
    assert report["info"]["before"]["nodes"] == 323 and report["info"]["after"]["nodes"] == 241
    assert report["info"]["before"]["macs"] == report["info"]["after"]["macs"] == YOLO_MACS_320
    assert all(p["error"]["rel"] <= 1e-5 for p in report["passes"])
    folded = io.load(out)
    assert list(folded.graph.inputs[0].shape) == [1, 3, 320, 320]
    assert all(v.const_value.numpy().flags.c_contiguous for v in folded.graph.initializers.values())
    reference = yolo.run(yolo_dir / "yolo.onnx", photos4)
    assert _rel(reference, yolo.run(out, photos4)) <= 1e-5
    # lowbit compare of the dynamic original with the pinned result: data fits both.
    code, stdout, err = run_cli("compare", yolo_dir / "yolo.onnx", out, "--no-latency", "--json")
    assert code == 0, err
    assert json.loads(stdout)["error"]["rel"] <= 1e-5


# --- non-contiguous folded constants ----------------------------------------------------------------


def _strided_model() -> ir.Model:
    """y = x · Unsqueeze(Transpose(C)), C [3, 2] constant: the folded result is a strided view."""
    x = ir.Value(name="x", shape=ir.Shape([1, 2, 3]), type=ir.TensorType(ir.DataType.FLOAT))
    c = ir.Value(name="c", const_value=ir.tensor(np.arange(6, dtype=np.float32).reshape(3, 2) + 1, name="c"))
    axes = ir.Value(name="axes", const_value=ir.tensor(np.array([0], np.int64), name="axes"))
    t = ir.node("Transpose", [c], attributes={"perm": [1, 0]}, name="t")
    u = ir.node("Unsqueeze", [t.outputs[0], axes], name="u")
    m = ir.node("Mul", [x, u.outputs[0]], name="m")
    m.outputs[0].name = "y"
    m.outputs[0].shape = ir.Shape([1, 2, 3])
    m.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [m.outputs[0]], nodes=[t, u, m], initializers=[c, axes], opset_imports={"": 18}, name="s")
    return ir.Model(graph, ir_version=10)


def test_fold_constants_then_cleanup_on_a_strided_constant():
    model = _strided_model()
    feed = {"x": np.random.default_rng(0).standard_normal((1, 2, 3)).astype(np.float32)}
    reference = run_model(model, feed)["y"]
    run_passes(model, parse_pipeline("fold-constants"), Context())
    assert [n.op_type for n in model.graph] == ["Mul"]
    [folded] = [v for v in model.graph.initializers.values() if v.const_value.shape == ir.Shape([1, 2, 3])]
    assert folded.const_value.raw.flags.c_contiguous  # stored contiguous by fold-constants itself
    np.testing.assert_array_equal(folded.const_value.numpy()[0], np.arange(6, dtype=np.float32).reshape(3, 2).T + 1)
    run_passes(model, parse_pipeline("cleanup"), Context())
    np.testing.assert_array_equal(run_model(model, feed)["y"], reference)


def test_cleanup_copes_with_a_strided_initializer():
    """Whatever left it there, cleanup makes a strided initializer contiguous and deduplicates it."""
    strided = (np.arange(6, dtype=np.float32).reshape(2, 3) + 1).T  # [3, 2], not C-contiguous
    assert not strided.flags.c_contiguous
    x = ir.Value(name="x", shape=ir.Shape([3, 2]), type=ir.TensorType(ir.DataType.FLOAT))
    c = ir.Value(name="c", const_value=ir.Tensor(strided, name="c"))
    twin = ir.Value(name="c2", const_value=ir.tensor(np.ascontiguousarray(strided), name="c2"))
    add, mul = ir.node("Add", [x, c], name="add"), ir.node("Mul", [x, twin], name="mul")
    for node, name in ((add, "y1"), (mul, "y2")):
        node.outputs[0].name = name
        node.outputs[0].shape = ir.Shape([3, 2])
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [add.outputs[0], mul.outputs[0]], nodes=[add, mul], initializers=[c, twin],
                     opset_imports={"": 18}, name="d")
    model = ir.Model(graph, ir_version=10)
    feed = {"x": np.random.default_rng(0).standard_normal((3, 2)).astype(np.float32)}
    reference = run_model(model, feed)
    run_passes(model, parse_pipeline("cleanup"), Context())
    assert len(model.graph.initializers) == 1  # the twins merged
    [kept] = model.graph.initializers.values()
    assert kept.const_value.numpy().flags.c_contiguous
    got = run_model(model, feed)
    for name in ("y1", "y2"):
        np.testing.assert_array_equal(got[name], reference[name])
    assert contiguous_initializers(model) == 0  # nothing left to fix


# --- fixed batch sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 4])
def test_fixed_batch_feeds(yolo_dir, batch):
    model = io.load(yolo_dir / f"fixed{batch}.onnx")
    calib = open_calibration(str(yolo_dir / "calib.npz"), model, batch_size=16)
    assert calib.fixed_batch == batch
    # Verification: 8 samples as feeds of the fixed batch, never one feed of 8.
    feeds = sample_feeds(model, Context(calib=calib, verify_samples=8))
    assert [len(f[yolo.INPUT]) for f in feeds] == [batch] * (8 // batch)
    assert len(calib.first(8)[yolo.INPUT]) == batch  # the first feed, at the fixed size
    # Sweeps cut to a number of samples keep whole batches.
    assert [len(f[yolo.INPUT]) for f in limit_samples(calib, 6)] == [batch] * (-(-6 // batch))
    # Random data and verification without data come in the fixed batch too.
    with pytest.warns(UserWarning, match="random calibration data"):
        random8 = open_calibration("random:8", model, batch_size=16)
    assert [len(f[yolo.INPUT]) for f in random8] == [batch] * (8 // batch)
    assert [len(f[yolo.INPUT]) for f in sample_feeds(model, Context())] == [batch] * (4 // batch)


def test_dynamic_batch_feeds_unchanged(yolo_dir):
    model = io.load(yolo_dir / "yolo.onnx")
    calib = open_calibration(str(yolo_dir / "calib.npz"), model, batch_size=16)
    assert calib.fixed_batch is None
    assert [len(f[yolo.INPUT]) for f in sample_feeds(model, Context(calib=calib, verify_samples=8))] == [8]
    assert [len(f[yolo.INPUT]) for f in limit_samples(calib, 6)] == [6]


@pytest.mark.parametrize("batch", [1, 4])
def test_yolo_fixed_batch_with_npz(run_cli, yolo_dir, photos4, batch):
    out = yolo_dir / f"fixed{batch}.out.onnx"
    code, stdout, err = run_cli("compress", yolo_dir / f"fixed{batch}.onnx", "-o", out, "--passes",
                                "fold-constants,fold-bn,cleanup", "--calib", yolo_dir / "calib.npz", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["info"]["before"]["macs"] == batch * YOLO_MACS_320
    assert all(p["error"]["rel"] <= 1e-5 for p in report["passes"])
    assert _rel(yolo.run(yolo_dir / f"fixed{batch}.onnx", photos4), yolo.run(out, photos4)) <= 1e-5


def test_fixed_batch_quantize_and_sensitivity(run_cli, tmp_path):
    """Activation calibration sweeps (limit_samples) and sensitivity (Calibration.first) on a
    model fixed to batch 4, with 6 samples asked of 16."""
    model = tiny_cnn()
    apply_input_shapes(model, {"input": (4, 3, 8, 8)})
    path = tmp_path / "tiny4.onnx"
    io.save(model, path)
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x)
    code, out, err = run_cli("compress", path, "-o", tmp_path / "q.onnx", "--calib", tmp_path / "calib.npz", "--json",
                             "--passes", "fold-bn,quantize(weights=8,granularity=channel,activations=8,samples=6)")
    assert code == 0, err
    assert json.loads(out)["passes"][-1]["error"]["sqnr_db"] > 25
    code, out, err = run_cli("sensitivity", path, "--calib", tmp_path / "calib.npz", "-o", tmp_path / "s.json",
                             "--bits", "8", "--samples", "6", "--json")
    assert code == 0, err
    assert json.loads(out)["layers"][0]["sqnr_db"]["8"] > 25
    specs = input_specs(io.load(path))
    assert specs[0].shape == (4, 3, 8, 8)


def test_a_failing_run_prints_only_lowbits_line():
    """onnxruntime's own C++ error log must not reach stderr ahead of lowbit's one-line error."""
    import subprocess
    import sys

    script = ("import numpy as np\nfrom lowbit.runtime.session import session\nfrom lowbit.models import yolo\n"
              "s = session(yolo.model_path())\ntry:\n    s.run(None, {'images': np.zeros((1, 3, 16, 16), np.float32)})\n"
              "except Exception as e:\n    print('raised', 'Concat' in str(e))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "raised True"  # the reason still travels in the exception
    assert "sequential_executor" not in done.stderr and "[E:onnxruntime" not in done.stderr, done.stderr
