"""Run a pipeline of passes on a model, verifying after each one.

After every pass the model must (1) pass the ONNX checker, (2) load in onnxruntime, and — unless
verification is off — (3) produce outputs on sample inputs that match the model before the pass:
within the pass's ``tolerance`` (relative, max |Δ| / max |ref|) for exact passes, else the run
stops with an error naming the pass; for lossy passes the added error is recorded. Sample inputs
are the first calibration samples, or seeded random data when there is no calibration data.
Wall time and error per pass go into ``ctx.report``.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx_ir as ir

from lowbit.core import io
from lowbit.core.calib import input_specs, random_feed
from lowbit.core.context import Context, PassRecord
from lowbit.core.errors import PassFailure, UserError, VerificationError
from lowbit.core.metrics import compare_outputs
from lowbit.passes.base import Pass
from lowbit.runtime.session import session


def sample_feed(model: ir.Model, ctx: Context) -> dict[str, np.ndarray]:
    if ctx.calib is not None:
        return ctx.calib.first(ctx.verify_samples)
    return random_feed(input_specs(model), min(ctx.verify_samples, 4), ctx.rng("verify"))


def run_model(model: ir.Model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed)))


def check_structure(model: ir.Model) -> None:
    """ONNX checker and onnxruntime loading; raises whatever they raise."""
    proto = io.to_proto(model)
    if proto.ByteSize() < io.PROTOBUF_LIMIT_BYTES:
        onnx.checker.check_model(proto)
    session(model)


def run_passes(model: ir.Model, passes: list[Pass], ctx: Context, *, progress=None) -> ir.Model:
    """Apply ``passes`` to ``model`` in place, in order, verifying after each; return the model."""
    feed = reference = original = None
    if ctx.verify:
        feed = sample_feed(model, ctx)
        reference = original = run_model(model, feed)
    history: list[str] = []
    for p in passes:
        record = PassRecord(name=p.name, pipeline=p.describe(), preserves=p.preserves)
        ctx.report.passes.append(record)
        ctx.current = record
        if progress is not None:
            progress.set_description(p.name)
        start = time.perf_counter()
        try:
            record.changed = bool(p.run(model, ctx))
        except UserError as exc:
            raise UserError(f"pass {p.name}: {exc}") from None
        except Exception as exc:
            raise PassFailure(p.name, f"{type(exc).__name__}: {exc}", tuple(history)) from exc
        finally:
            record.seconds = time.perf_counter() - start
            ctx.current = None
        start = time.perf_counter()
        try:
            check_structure(model)
        except Exception as exc:  # noqa: BLE001 - checker and onnxruntime raise many types
            raise PassFailure(p.name, f"produced a model that fails to load: {exc}", tuple(history)) from exc
        if ctx.verify:
            try:
                outputs = run_model(model, feed)
            except Exception as exc:  # noqa: BLE001
                raise PassFailure(p.name, f"produced a model that fails to run: {exc}", tuple(history)) from exc
            try:
                record.error = compare_outputs(reference, outputs)
                record.total_error = compare_outputs(original, outputs)
            except ValueError as exc:
                raise PassFailure(p.name, str(exc), tuple(history)) from exc
            if p.preserves == "exact" and record.error["rel"] > p.tolerance:
                raise VerificationError(
                    f"pass {p.name} must keep outputs equal but changed them by {record.error['rel']:.2e} "
                    f"relative (max abs {record.error['max_abs']:.2e}, tolerance {p.tolerance:.0e})"
                )
            reference = outputs
        record.verify_seconds = time.perf_counter() - start
        history.append(p.name)
        if progress is not None:
            progress.update(1)
    return model
