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


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def sample_feed(model: ir.Model, ctx: Context) -> dict[str, np.ndarray]:
    if ctx.calib is not None:
        return ctx.calib.first(ctx.verify_samples)
    return random_feed(input_specs(model), min(ctx.verify_samples, 4), ctx.rng("verify"))


def run_model(sess, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name, from an open session or an ``onnx_ir`` model (run without optimisation)."""
    if isinstance(sess, ir.Model):
        sess = session(sess, optimization="disable")
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed)))


def open_checked(model: ir.Model):
    """ONNX checker, then an onnxruntime session; raises whatever they raise.

    The session has graph optimisation off, so the outputs compared are the pass's own work and
    not onnxruntime's rewrites of it (its Conv+BN fusion, for one).
    """
    proto = io.to_proto(model)
    if proto.ByteSize() < io.PROTOBUF_LIMIT_BYTES:
        onnx.checker.check_model(proto)
    return session(model, optimization="disable")


def _worst_output(reference, outputs) -> tuple[str, dict[str, float]]:
    per_output = {name: compare_outputs({name: ref}, {name: outputs[name]}) for name, ref in reference.items()}
    name = max(per_output, key=lambda n: per_output[n]["rel"])
    return name, per_output[name]


def run_passes(model: ir.Model, passes: list[Pass], ctx: Context, *, progress=None) -> ir.Model:
    """Apply ``passes`` to ``model`` in place, in order, verifying after each; return the model."""
    feed = reference = original = None
    try:
        sess = open_checked(model)
    except Exception as exc:  # noqa: BLE001 - checker and onnxruntime raise many types
        raise UserError(f"the input model does not load in onnxruntime before any pass ran: {_first_line(exc)}") from None
    if ctx.verify:
        feed = sample_feed(model, ctx)
        reference = original = run_model(sess, feed)
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
            raise type(exc)(f"pass {p.name}: {exc}") from None
        except Exception as exc:
            raise PassFailure(p.name, f"{type(exc).__name__}: {exc}", tuple(history)) from exc
        finally:
            record.seconds = time.perf_counter() - start
            ctx.current = None
        start = time.perf_counter()
        try:
            sess = open_checked(model)
        except Exception as exc:  # noqa: BLE001 - checker and onnxruntime raise many types
            raise PassFailure(p.name, f"produced a model that fails to load: {exc}", tuple(history)) from exc
        if ctx.verify:
            try:
                outputs = run_model(sess, feed)
            except Exception as exc:  # noqa: BLE001
                raise PassFailure(p.name, f"produced a model that fails to run: {exc}", tuple(history)) from exc
            try:
                record.error = compare_outputs(reference, outputs)
                record.total_error = compare_outputs(original, outputs)
            except ValueError as exc:
                raise PassFailure(p.name, str(exc), tuple(history)) from exc
            if p.preserves == "exact" and record.error["rel"] > p.tolerance:
                name, worst = _worst_output(reference, outputs)
                raise VerificationError(
                    p.name,
                    f"must keep outputs equal but changed output '{name}' by {worst['rel']:.2e} relative "
                    f"(max abs {worst['max_abs']:.2e}, tolerance {p.tolerance:.0e})",
                    tuple(history),
                )
            reference = outputs
        record.verify_seconds = time.perf_counter() - start
        history.append(p.name)
        if progress is not None:
            progress.update(1)
    return model
