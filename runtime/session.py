"""Open onnxruntime sessions on lowbit models.

``session(model)`` accepts an ``onnx_ir`` model, serialized bytes or a path, and returns an
``onnxruntime.InferenceSession`` on the CPU provider. Models too large for one protobuf are written
to a temporary folder with external data first. When lowbit's native op library is built it is
registered here, so every caller (the verifier, ``compare``, ``demo``, benchmarks) runs lowbit's
own ops the same way.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnxruntime as ort

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(*, threads: int | None = None, optimization: str = "all") -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = _OPT_LEVELS[optimization]
    # fatal only: a failing run's error reaches Python in the exception (which lowbit turns into
    # one line); at 3 onnxruntime also printed it, multi-line and coloured, to stderr first
    opts.log_severity_level = 4
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def session(model, *, threads: int | None = None, optimization: str = "all") -> ort.InferenceSession:
    """An onnxruntime CPU session for an ``onnx_ir`` model, model bytes, or a model path."""
    import onnx_ir as ir

    from lowbit.core import io

    opts = session_options(threads=threads, optimization=optimization)
    providers = ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(Path(model)), opts, providers=providers)
    if isinstance(model, bytes):
        return ort.InferenceSession(model, opts, providers=providers)
    if not isinstance(model, ir.Model):
        raise TypeError(f"session() takes an onnx_ir model, bytes or a path, not {type(model).__name__}")
    if io.tensor_bytes(model) <= io.PROTOBUF_LIMIT_BYTES:
        return ort.InferenceSession(io.to_bytes(model), opts, providers=providers)
    with tempfile.TemporaryDirectory(prefix="lowbit-") as tmp:
        path = io.save(model, Path(tmp) / "model.onnx", external_data=True)
        return ort.InferenceSession(str(path), opts, providers=providers)
