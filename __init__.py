"""lowbit: a compiler for exported ONNX models.

Python API::

    import lowbit
    report = lowbit.compress("model.onnx", "model.lowbit.onnx", "fold-bn,cleanup", calib="calib.npz")
    model = lowbit.load("model.lowbit.onnx")        # an onnx_ir.Model, checked
    sess = lowbit.session("model.lowbit.onnx")      # onnxruntime session, lowbit ops registered
"""

__version__ = "0.1.0"

__all__ = ["compress", "load", "save", "session", "parse_pipeline", "run_passes", "Context", "UserError"]


def __getattr__(name):  # lazy, so `import lowbit` stays cheap and the CLI starts fast
    if name == "compress":
        from lowbit.core.compile import compress

        return compress
    if name in ("load", "save"):
        from lowbit.core import io

        return getattr(io, name)
    if name == "session":
        from lowbit.runtime.session import session

        return session
    if name == "parse_pipeline":
        from lowbit.passes.pipeline import parse_pipeline

        return parse_pipeline
    if name == "run_passes":
        from lowbit.passes.manager import run_passes

        return run_passes
    if name == "Context":
        from lowbit.core.context import Context

        return Context
    if name == "UserError":
        from lowbit.core.errors import UserError

        return UserError
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
