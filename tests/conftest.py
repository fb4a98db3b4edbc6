"""Shared fixtures: a tiny Conv-BN-Relu model, real models exported or copied once per session, a CLI runner."""

from __future__ import annotations

import contextlib
import io as _io
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import digits_calibration, run_pipeline, tiny_cnn
from lowbit.core import io
from lowbit.models import minilm


@pytest.fixture
def tiny_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    io.save(tiny_cnn(), path)
    return path


@pytest.fixture(scope="session")
def lite0_path(tmp_path_factory) -> Path:
    """EfficientNet-Lite0 with its ImageNet weights, exported once per test session (torch)."""
    from lowbit.models import efficientnet_lite0

    path = tmp_path_factory.mktemp("efficientnet") / "efficientnet_lite0.onnx"
    efficientnet_lite0.export(path)
    return path


@pytest.fixture(scope="session")
def digits_w4_lowered(tmp_path_factory) -> Path:
    """The digits CNN with W4 block-32 weights lowered to lowbit's ops (5 ConvLowBit + 1
    MatMulNBits), written once per session for the host, edge and deploy tests."""
    from lowbit.models import demo

    model = io.load(demo.model_path("digits"))
    run_pipeline(model, "quantize(weights=4,block=32)", calib=digits_calibration(model))
    run_pipeline(model, "lower(select=rule,use=lowbit)")
    path = tmp_path_factory.mktemp("digits-w4") / "digits_w4.onnx"
    io.save(model, path)
    return path


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory):
    """all-MiniLM-L6-v2 exported once per session (torch, offline weights): a folder with
    ``minilm.onnx``, the evaluation/calibration .npz and the torch embeddings."""
    from lowbit.models import export_minilm

    folder = tmp_path_factory.mktemp("minilm")
    eval_npz, _ = minilm.write_data(folder)
    module = export_minilm.build()
    export_minilm.export(folder / "minilm.onnx", model=module)
    ids, mask = minilm.load_data(eval_npz)
    np.save(folder / "torch_embeddings.npy", export_minilm.embeddings(module, ids, mask))
    return folder


@pytest.fixture(scope="session")
def minilm_eval(minilm_dir):
    return minilm.load_data(minilm_dir / minilm.EVAL_NPZ)


@pytest.fixture(scope="session")
def minilm_float(minilm_dir, minilm_eval):
    """Sentence embeddings of the exported float model (onnxruntime), [500, 384]."""
    return minilm.embed(minilm_dir / "minilm.onnx", *minilm_eval)


@pytest.fixture(scope="session")
def gpt2_path(tmp_path_factory) -> Path:
    """A tiny GPT-2 (seeded random weights, ``transformers``, seed 0) exported once per session;
    rebuild the same torch module with ``export_gpt2.build()`` for reference logits."""
    from lowbit.models import export_gpt2

    path = tmp_path_factory.mktemp("gpt2") / "gpt2.onnx"
    export_gpt2.export(path, model=export_gpt2.build())
    return path


@pytest.fixture(scope="session")
def yolo_path(tmp_path_factory) -> Path:
    """nudenet's YOLOv8n (``320n.onnx``), copied to a temporary folder once per session so no
    test can write next to, or modify, the installed file."""
    from lowbit.models import yolo

    path = tmp_path_factory.mktemp("yolo") / "yolov8n.onnx"
    shutil.copyfile(yolo.model_path(), path)
    return path


@pytest.fixture
def run_cli():
    """Call ``lowbit.cli.main`` in-process; return (exit code, stdout, stderr)."""
    from lowbit.cli import main

    def run(*argv: str):
        out, err = _io.StringIO(), _io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as exc:  # --help / --version
                code = exc.code
        return code, out.getvalue(), err.getvalue()

    return run
