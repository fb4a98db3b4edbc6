"""Shared fixtures: a tiny Conv-BN-Relu model written to disk, and a CLI runner."""

from __future__ import annotations

import contextlib
import io as _io
from pathlib import Path

import pytest

from helpers import tiny_cnn
from lowbit.core import io


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
