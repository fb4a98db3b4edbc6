"""Open onnxruntime sessions on lowbit models.

``session(model)`` accepts an ``onnx_ir`` model, serialized bytes or a path, and returns an
``onnxruntime.InferenceSession`` on the CPU provider. Models too large for one protobuf are written
to a temporary folder with external data first. Every caller (the verifier, ``compare``, ``demo``,
benchmarks) opens sessions here, so lowbit's own ops (domain ``lowbit``) run the same way
everywhere, by one of three implementations — recorded on the session as
``sess.lowbit_implementation`` and told by :func:`implementation`:

- ``"native"``: the model uses lowbit ops and the native library (:mod:`lowbit.runtime.library`) is
  registered;
- ``"reference"``: the model uses lowbit ops, the library is absent, and the numpy reference
  (:mod:`lowbit.runtime.reference`) runs them through onnxruntime-extensions — slow, but exact;
- ``"stock"``: the model uses no lowbit op; nothing is registered.

With lowbit ops and neither implementation at hand, ``session`` raises a ``UserError`` naming the
first lowbit node and how to get the library.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnxruntime as ort

from lowbit.core.errors import UserError
from lowbit.runtime import library, reference
from lowbit.runtime.ops import DOMAIN

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
#: onnxruntime's accuracy levels for MatMulNBits (0: as the model says … 4: int8 activations)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def session_options(*, threads: int | None = None, optimization: str = "all",
                    accuracy_level: int = 4, spinning: bool = True) -> ort.SessionOptions:
    """``spinning=False`` stops idle intra-op threads from busy-waiting for work: timing several
    sessions in turn (benchmarks) is otherwise unfair, the last one's threads spinning on the core
    the next one runs on (EfficientNet-Lite0 on 2 threads measured 12 ms with, 7 ms without)."""
    if accuracy_level not in ACCURACY_LEVELS:
        raise UserError(f"accuracy_level must be one of {', '.join(map(str, ACCURACY_LEVELS))}, not {accuracy_level!r}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = _OPT_LEVELS[optimization]
    # fatal only: a failing run's error reaches Python in the exception (which lowbit turns into
    # one line); at 3 onnxruntime also printed it, multi-line and coloured, to stderr first
    opts.log_severity_level = 4
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    # the accuracy of MatMulNBits nodes the QDQ fusion makes (4: int8 activations, what VNNI runs)
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def session(model, *, threads: int | None = None, optimization: str = "all",
            accuracy_level: int = 4, spinning: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session for an ``onnx_ir`` model, model bytes, or a model path.

    ``sess.lowbit_implementation`` says which implementation runs lowbit's ops (module docstring).
    """
    import onnx_ir as ir

    from lowbit.core import io

    if not isinstance(model, (str, os.PathLike, bytes, ir.Model)):
        raise TypeError(f"session() takes an onnx_ir model, bytes or a path, not {type(model).__name__}")
    opts = session_options(threads=threads, optimization=optimization, accuracy_level=accuracy_level,
                           spinning=spinning)
    providers = ["CPUExecutionProvider"]
    mode = implementation(model)
    if mode == "native":
        lib = library.path()
        try:
            opts.register_custom_ops_library(str(lib))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise UserError(f"lowbit's native op library {lib} does not load in onnxruntime "
                            f"({str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}); "
                            "reinstall lowbit (pip install .) to rebuild it") from None
    if mode == "reference":
        sess = _reference_session(model, opts, providers)
    elif isinstance(model, (str, os.PathLike)):
        sess = ort.InferenceSession(str(Path(model)), opts, providers=providers)
    elif isinstance(model, bytes):
        sess = ort.InferenceSession(model, opts, providers=providers)
    elif io.tensor_bytes(model) <= io.PROTOBUF_LIMIT_BYTES:
        sess = ort.InferenceSession(io.to_bytes(model), opts, providers=providers)
    else:
        with tempfile.TemporaryDirectory(prefix="lowbit-") as tmp:
            path = io.save(model, Path(tmp) / "model.onnx", external_data=True)
            sess = ort.InferenceSession(str(path), opts, providers=providers)
    sess.lowbit_implementation = mode
    return sess


def implementation(model) -> str:
    """``"native"``, ``"reference"`` or ``"stock"``: what runs ``model``'s lowbit ops (module docstring).

    ``model`` is an open session from :func:`session`, an ``onnx_ir`` model, model bytes or a path.
    Raises the ``UserError`` that :func:`session` would when the model needs an implementation
    that is not there.
    """
    if isinstance(model, ort.InferenceSession):
        return getattr(model, "lowbit_implementation", "stock")
    node = first_lowbit_node(model)
    if node is None:
        return "stock"
    if library.available():
        return "native"
    if reference.available():
        return "reference"
    name, op_type = node
    where = f"{model}: " if isinstance(model, (str, os.PathLike)) else ""
    what = f"node '{name}' ({DOMAIN}.{op_type})" if name else f"an unnamed {DOMAIN}.{op_type} node"
    hidden = (" (LOWBIT_OPS_LIBRARY=none hides it)" if os.environ.get(library.ENV, "").lower() == "none"
              else " (it was not built at install)")
    raise UserError(f"{where}{what} needs lowbit's native op library, which is not available{hidden}: reinstall "
                    "lowbit with `pip install .` on a machine with a C++17 compiler and cmake, or `pip install "
                    "onnxruntime-extensions` to run lowbit's ops on the slow numpy reference")


def first_lowbit_node(model) -> tuple[str, str] | None:
    """(name, op_type) of the first node of domain ``lowbit`` (subgraphs and functions included), or None."""
    import onnx
    import onnx_ir as ir

    if isinstance(model, ir.Model):
        graphs = [model.graph, *model.functions.values()]
        for graph in graphs:
            for node in ir.traversal.RecursiveGraphIterator(graph):
                if node.domain == DOMAIN:
                    return node.name or "", node.op_type
        return None
    if isinstance(model, bytes):
        proto = onnx.ModelProto.FromString(model)
    else:
        try:
            proto = onnx.load(str(Path(model)), load_external_data=False)
        except Exception:  # noqa: BLE001 - an unreadable file: onnxruntime says why when it opens it
            return None
    stack = [list(proto.graph.node)] + [list(f.node) for f in proto.functions]
    while stack:
        for node in stack.pop(0):
            if node.domain == DOMAIN:
                return node.name, node.op_type
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(list(attr.g.node))
                stack += [list(g.node) for g in attr.graphs]
    return None


def _reference_session(model, opts: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    """A session running lowbit's ops on the numpy reference (onnxruntime-extensions Python ops)."""
    import onnx
    import onnx_ir as ir

    from lowbit.core import io

    where = f"{model}: " if isinstance(model, (str, os.PathLike)) else ""
    if isinstance(model, bytes):
        data = model
    elif isinstance(model, ir.Model):
        if io.tensor_bytes(model) > io.PROTOBUF_LIMIT_BYTES:
            raise UserError("the model is too large (over 2 GB) for the numpy reference ops; build lowbit's native "
                            "op library (pip install . with a C++17 compiler and cmake)")
        data = io.to_bytes(model)
    else:
        proto = onnx.load(str(Path(model)))  # external data loaded: the prepared model is one buffer
        if proto.ByteSize() > io.PROTOBUF_LIMIT_BYTES:
            raise UserError(f"{where}the model is too large (over 2 GB) for the numpy reference ops; build lowbit's "
                            "native op library (pip install . with a C++17 compiler and cmake)")
        data = proto.SerializeToString()
    try:
        prepared = reference.prepare(data)
    except ValueError as exc:
        raise UserError(f"{where}{exc}") from None
    reference.register(opts)
    return ort.InferenceSession(prepared, opts, providers=providers)
