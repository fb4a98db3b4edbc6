"""Compare two models on the same inputs: output error and latency, measured in one run.

Error (``compare_models``) uses the definitions of ``lowbit.core.metrics`` with model A as the
reference, accumulated over every feed and kept per output, then the worst output is reported:
  max_abs, rel   worst over feeds (rel = max|B − A| / max|A| within a feed);
  sqnr_db        10·log10(ΣA² / Σ(B − A)²) with both sums taken over all feeds;
  cosine         ΣA·B / √(ΣA² · ΣB²) over all feeds;
  top1           agreeing argmax rows / all rows, over all feeds (classifier-like outputs only).
A non-finite output makes sqnr and cosine fall back to the worst per-feed value.

Latency (``measure_latency``, and inside ``compare_models``): ``warmup`` untimed runs, then timed
runs until at least ``runs`` were made *and* ``min_seconds`` passed (at most ``max_runs``);
median and 90th percentile in milliseconds. ``compare_models`` times A and B interleaved —
A B, B A, A B, … — on the first feed, so drift of the machine (clock, other load) affects both
alike, and reports ratio = median(B) / median(A) (below 1: B is faster).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from lowbit.analysis.report_format import format_number, format_table, human_bytes
from lowbit.core.errors import UserError
from lowbit.core.metrics import WORST, compare_arrays

__all__ = ["measure_latency", "random_input_latency_ms", "compare_models", "format_compare"]

Feed = dict[str, np.ndarray]


def _open(target, threads: int | None):
    """An onnxruntime session from a model / bytes / path / session / factory."""
    import onnxruntime as ort

    from lowbit.runtime.session import session

    if isinstance(target, ort.InferenceSession):
        return target
    if callable(target) and not isinstance(target, (ir.Model, bytes, str)):
        return target()
    return session(target, threads=threads)


def _summary(times_ns: list[int]) -> dict[str, float]:
    ms = np.asarray(times_ns, dtype=np.float64) / 1e6
    return {
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(np.mean(ms)),
        "min_ms": float(np.min(ms)),
        "runs": int(ms.size),
    }


def random_input_latency_ms(model: ir.Model, rng: np.random.Generator, *, runs: int = 20, threads: int = 2) -> float:
    """Median milliseconds of ``model`` on one random sample of its inputs (``random_feed``),
    as passes report latency before and after they rewrite a model."""
    from lowbit.core.calib import input_specs, random_feed

    return measure_latency(model, random_feed(input_specs(model), 1, rng), runs=runs, threads=threads)["median_ms"]


def measure_latency(target, feed: Mapping[str, np.ndarray], *, warmup: int = 3, runs: int = 10,
                    min_seconds: float = 0.2, max_runs: int = 1000, threads: int | None = None) -> dict[str, float]:
    """Latency of one model on ``feed``: ``{"median_ms", "p90_ms", "mean_ms", "min_ms", "runs"}``.

    ``target``: an ``onnx_ir`` model, model bytes or path (opened with ``lowbit.runtime.session``
    and ``threads``), an open ``InferenceSession``, or a function returning one.
    """
    sess = _open(target, threads)
    feed = dict(feed)
    for _ in range(warmup):
        sess.run(None, feed)
    times: list[int] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < runs or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        times.append(time.perf_counter_ns() - t0)
    return _summary(times)


def _interleaved_latency(sess_a, sess_b, feed: Feed, *, warmup: int, runs: int, min_seconds: float,
                         max_runs: int) -> dict[str, Any]:
    for _ in range(warmup):
        sess_a.run(None, feed)
        sess_b.run(None, feed)
    times: dict[str, list[int]] = {"a": [], "b": []}
    sessions = {"a": sess_a, "b": sess_b}
    start = time.perf_counter()
    i = 0
    while len(times["a"]) < max_runs and (len(times["a"]) < runs or time.perf_counter() - start < min_seconds):
        for key in ("a", "b") if i % 2 == 0 else ("b", "a"):
            t0 = time.perf_counter_ns()
            sessions[key].run(None, feed)
            times[key].append(time.perf_counter_ns() - t0)
        i += 1
    a, b = _summary(times["a"]), _summary(times["b"])
    ratio = b["median_ms"] / a["median_ms"] if a["median_ms"] > 0 else math.inf
    return {"a": a, "b": b, "ratio": ratio}


class _Accumulator:
    """Running error metrics of one output over several feeds."""

    def __init__(self):
        self.max_abs = 0.0
        self.rel = 0.0
        self.signal = self.noise = self.dot = self.cand = 0.0
        self.agree = self.rows = 0
        self.classifier = False
        self.fallback: dict[str, float] = {}
        self.count = 0

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        metrics = compare_arrays(ref, got)
        self.count += 1
        self.max_abs = max(self.max_abs, metrics["max_abs"])
        self.rel = max(self.rel, metrics["rel"])
        r = np.asarray(ref, dtype=np.float64).ravel() if ref.dtype != np.bool_ else ref.astype(np.float64).ravel()
        c = np.asarray(got, dtype=np.float64).ravel() if got.dtype != np.bool_ else got.astype(np.float64).ravel()
        if np.all(np.isfinite(r)) and np.all(np.isfinite(c)):
            e = c - r
            self.signal += float(np.dot(r, r))
            self.noise += float(np.dot(e, e))
            self.dot += float(np.dot(r, c))
            self.cand += float(np.dot(c, c))
        else:
            for key in ("sqnr_db", "cosine"):
                self.fallback[key] = WORST[key](self.fallback[key], metrics[key]) if key in self.fallback else metrics[key]
        if "top1" in metrics:
            self.classifier = True
            self.agree += int(np.sum(np.argmax(ref, axis=-1) == np.argmax(got, axis=-1)))
            self.rows += int(np.prod(ref.shape[:-1]))

    def result(self) -> dict[str, float]:
        if self.noise == 0:
            sqnr = math.inf
        elif self.signal > 0:
            sqnr = 10 * math.log10(self.signal / self.noise)
        else:
            sqnr = -math.inf
        nr, nc = math.sqrt(self.signal), math.sqrt(self.cand)
        cosine = 1.0 if nr == 0 and nc == 0 else (self.dot / (nr * nc) if nr and nc else 0.0)
        out = {"max_abs": self.max_abs, "rel": self.rel, "sqnr_db": sqnr, "cosine": min(cosine, 1.0)}
        for key, value in self.fallback.items():
            out[key] = WORST[key](out[key], value)
        if self.classifier and self.rows:
            out["top1"] = self.agree / self.rows
        return out


def _feeds(feeds, model_a, seed: int) -> list[Feed]:
    if feeds is None:
        if not isinstance(model_a, ir.Model):
            raise TypeError("compare_models needs feeds unless model_a is an onnx_ir model")
        from lowbit.core.calib import input_specs, random_feed

        return [random_feed(input_specs(model_a), 1, np.random.default_rng(seed))]
    if isinstance(feeds, Mapping):
        return [dict(feeds)]
    return feeds  # any iterable of feeds, consumed once


def _run(sess, feed: Feed, label: str) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    expected = {i.name for i in sess.get_inputs()}
    missing = expected - set(feed)
    if missing:
        raise UserError(f"model {label} needs input '{sorted(missing)[0]}', which the data does not have "
                        f"(data has: {', '.join(sorted(feed))})")
    feed = {k: v for k, v in feed.items() if k in expected}
    return dict(zip(names, sess.run(names, feed)))


def _batch_len(feed: Feed) -> int:
    return min((np.shape(v)[0] for v in feed.values() if np.ndim(v)), default=1)


def compare_models(model_a, model_b, feeds: Iterable[Feed] | Feed | None = None, *, latency: bool = True,
                   threads: int | None = None, warmup: int = 3, runs: int = 10, min_seconds: float = 0.2,
                   max_runs: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Run A (the reference) and B on the same feeds; return their output error and latencies.

    ``feeds``: one feed dict, an iterable of them (e.g. a ``Calibration``), or None for one seeded
    random sample. Returns ``{"error": worst-output metrics, "per_output": {name: metrics},
    "feeds": n, "samples": rows, "latency": {"a": {...}, "b": {...}, "ratio": B/A} or None,
    "size": {"a": bytes, "b": bytes, "ratio": B/A} or None, "threads": threads}``.
    Neither model is modified.
    """
    sess_a = _open(model_a, threads)
    sess_b = _open(model_b, threads)
    names_b = {o.name for o in sess_b.get_outputs()}
    for out in sess_a.get_outputs():
        if out.name not in names_b:
            raise UserError(f"model B has no output '{out.name}' (its outputs: {', '.join(sorted(names_b))}); "
                            "the two models must have the same outputs to be compared")
    acc: dict[str, _Accumulator] = {o.name: _Accumulator() for o in sess_a.get_outputs()}
    first: Feed | None = None
    count = samples = 0
    for feed in _feeds(feeds, model_a, seed):
        feed = {k: np.asarray(v) for k, v in feed.items()}
        if first is None:
            first = feed
        ref = _run(sess_a, feed, "A")
        got = _run(sess_b, feed, "B")
        for name, r in ref.items():
            try:
                acc[name].add(np.asarray(r), np.asarray(got[name]))
            except ValueError as exc:
                raise UserError(f"output '{name}': {exc} between model A and model B") from None
        count += 1
        samples += _batch_len(feed)
    if first is None:
        raise UserError("no data to compare the models on (the feeds are empty)")
    per_output = {name: a.result() for name, a in acc.items()}
    worst: dict[str, float] = {}
    for metrics in per_output.values():
        for key, value in metrics.items():
            worst[key] = WORST[key](worst[key], value) if key in worst else value
    timing = None
    if latency:
        timing = _interleaved_latency(sess_a, sess_b, first, warmup=warmup, runs=runs, min_seconds=min_seconds,
                                      max_runs=max_runs)
        timing["samples"] = _batch_len(first)
    size = None
    if isinstance(model_a, ir.Model) and isinstance(model_b, ir.Model):
        from lowbit.analysis.stats import packed_tensor_bytes

        size_a, size_b = packed_tensor_bytes(model_a), packed_tensor_bytes(model_b)
        size = {"a": size_a, "b": size_b, "ratio": size_b / size_a if size_a else math.inf}
    return {"error": worst, "per_output": per_output, "feeds": count, "samples": samples,
            "latency": timing, "size": size, "threads": threads}


_METRIC_ORDER = ("max_abs", "rel", "sqnr_db", "cosine", "top1")


def format_compare(result: Mapping[str, Any], *, names: tuple[str, str] = ("A", "B")) -> str:
    """A readable report of a ``compare_models`` result."""
    a, b = names
    lines = []
    if isinstance(result.get("a"), str) and isinstance(result.get("b"), str):  # model paths, as the CLI adds
        lines += [f"{a} = {result['a']}", f"{b} = {result['b']}", ""]
    lines.append(f"Output error of {b} against {a} over {result['samples']} samples ({result['feeds']} batches)")
    keys = [k for k in _METRIC_ORDER if any(k in m for m in result["per_output"].values())]
    rows = [[name, *(format_number(m.get(k)) for k in keys)] for name, m in result["per_output"].items()]
    if len(rows) > 1:
        rows.append(["worst", *(format_number(result["error"].get(k)) for k in keys)])
    lines.append(format_table(rows, ["output", *keys], indent="  "))
    timing = result.get("latency")
    if timing:
        lines.append("")
        threads = result.get("threads")
        lines.append(f"Latency (batch {timing.get('samples', '?')}, "
                     f"{'default threads' if threads is None else f'{threads} threads'}, interleaved runs)")
        rows = [[label, f"{t['median_ms']:.3f}", f"{t['p90_ms']:.3f}", t["runs"]]
                for label, t in ((a, timing["a"]), (b, timing["b"]))]
        lines.append(format_table(rows, ["model", "median ms", "p90 ms", "runs"], indent="  "))
        ratio = timing["ratio"]
        verdict = (f"{b} is {1 / ratio:.2f}× faster" if ratio < 1 else f"{b} is {ratio:.2f}× slower") if ratio > 0 else ""
        lines.append(f"  ratio {b}/{a}: {ratio:.3f} ({verdict})")
    size = result.get("size")
    if size:
        lines.append("")
        lines.append(f"Tensor bytes: {a} {human_bytes(size['a'])}, {b} {human_bytes(size['b'])} "
                     f"(ratio {size['ratio']:.3f})")
    return "\n".join(lines) + "\n"
