"""Run a pipeline of passes on a model, verifying after each one.

After every pass the model must (1) pass the ONNX checker, (2) load in onnxruntime, and — unless
verification is off — (3) produce outputs on sample inputs that match the model before the pass:
within the pass's ``tolerance`` (relative, max |Δ| / max |ref|) for exact passes, else the run
stops with an error naming the pass; for lossy passes the added error is recorded. Sample inputs
are the first calibration samples, or seeded random data when there is no calibration data
(symbolic sizes guessed as ``core.calib`` says); a model with a fixed batch size is run on several
feeds of that size and their outputs joined. If the *input* model already fails to run on them,
no pass is to blame: that is a ``UserError`` naming the inputs and their shapes (for guessed
sizes, pointing at ``--input-shape``). Wall time and error per pass go into ``ctx.report``.
"""

from __future__ import annotations

import math
import re
import time

import numpy as np
import onnx
import onnx_ir as ir

from lowbit.core import io
from lowbit.core.calib import describe_feed, fixed_batch, input_specs, random_feed
from lowbit.core.context import Context, PassRecord
from lowbit.core.errors import PassFailure, UserError, VerificationError
from lowbit.core.metrics import compare_outputs
from lowbit.passes.base import Pass
from lowbit.runtime.session import session


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def ort_reason(exc: BaseException) -> str:
    """onnxruntime's error, shortened for a one-line message: the failing node and what failed,
    without the status codes and C++ source locations around them."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    head, sep, message = text.partition(" Status Message: ")
    if sep:
        message = re.split(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", message)[-1]
        message = re.sub(r"^\S+\.(?:cc|h|cpp):\d+ \S+ ", "", message)
        node = re.search(r"running (\w+) node\. Name:'([^']*)'", head)
        head = f"{node.group(1)} node '{node.group(2)}'" if node else head.rstrip(". ")
        message = re.sub(r"\s*Validate usage of dim_value.*$", "", message)
        text = f"{head}: {message}"
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return text.strip()[:300]


def sample_feeds(model: ir.Model, ctx: Context) -> list[dict[str, np.ndarray]]:
    """The verification inputs: one feed of ``ctx.verify_samples`` samples, or — for a model
    that fixes its batch size — as many feeds of that size as cover them."""
    if ctx.calib is not None:
        if ctx.calib.fixed_batch:
            return ctx.calib.batches(ctx.verify_samples)
        return [ctx.calib.first(ctx.verify_samples)]
    specs = input_specs(model)
    samples = min(ctx.verify_samples, 4)
    rng = ctx.rng("verify")
    fixed = fixed_batch(specs)
    if fixed:
        return [random_feed(specs, fixed, rng) for _ in range(math.ceil(samples / fixed))]
    return [random_feed(specs, samples, rng)]


def sample_feed(model: ir.Model, ctx: Context) -> dict[str, np.ndarray]:
    """The first of ``sample_feeds``."""
    return sample_feeds(model, ctx)[0]


def run_model(sess, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name, from an open session or an ``onnx_ir`` model (run without optimisation)."""
    if isinstance(sess, ir.Model):
        sess = session(sess, optimization="disable")
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed)))


def run_feeds(sess, feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``run_model`` on each feed, outputs joined along the first axis (flattened and joined
    when their other axes differ from feed to feed)."""
    results = [run_model(sess, feed) for feed in feeds]
    if len(results) == 1:
        return results[0]
    joined = {}
    for name in results[0]:
        parts = [np.asarray(r[name]) for r in results]
        if all(p.ndim and p.shape[1:] == parts[0].shape[1:] for p in parts):
            joined[name] = np.concatenate(parts)
        else:
            joined[name] = np.concatenate([p.reshape(-1) for p in parts])
    return joined


def _reference_failure(model: ir.Model, ctx: Context, feeds, exc: BaseException) -> UserError:
    """The input model fails on the verification inputs: the inputs are at fault, not a pass."""
    specs = input_specs(model)
    guessed = ctx.calib is None or ctx.calib.random
    shapes = describe_feed(specs, feeds[0], guessed=guessed)
    reason = ort_reason(exc)
    loose = [s for s in specs if any(not isinstance(d, int) for d in s.shape)]
    if guessed and loose:
        example = " ".join(
            f"--input-shape {s.name}=" + ",".join(str(d) if isinstance(d, int) else f"<{d or f'dim {i}'}>"
                                                  for i, d in enumerate(s.shape))
            for s in loose)
        return UserError(f"the input model fails to run on random inputs of guessed size {shapes}, before any pass "
                         f"ran; give the sizes it accepts with {example} ({reason})")
    source = f"the calibration data ({ctx.calib.label})" if ctx.calib is not None else "random inputs"
    return UserError(f"the input model fails to run on {source}, {shapes}, before any pass ran ({reason})")


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
    feeds = reference = original = None
    try:
        sess = open_checked(model)
    except Exception as exc:  # noqa: BLE001 - checker and onnxruntime raise many types
        raise UserError(f"the input model does not load in onnxruntime before any pass ran: {_first_line(exc)}") from None
    if ctx.verify:
        feeds = sample_feeds(model, ctx)
        try:
            reference = original = run_feeds(sess, feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types
            raise _reference_failure(model, ctx, feeds, exc) from None
    if any(p.wants_input_model for p in passes):
        ctx.input_model = model.clone()
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
                outputs = run_feeds(sess, feeds)
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
