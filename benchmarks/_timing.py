"""Same-run latency of several models in onnxruntime, for the benchmarks' speed claims.

Absolute times on the shared 2-core machines vary 2× between runs, so a benchmark never compares
against a stored number: it times every model in the same loop. Each round runs every model once,
in the order given on even rounds and reversed on odd ones, so a load spike or a cache that one
model warms for the next falls on all of them alike; the claim is a ratio of medians.

Benchmarks run as scripts (``python benchmarks/NAME.py``), which puts this folder on
``sys.path``: they import this module as ``_timing``.
"""

from __future__ import annotations

import os
import time

import numpy as np

from lowbit.runtime.session import session


def interleaved(models: dict[str, str | os.PathLike[str]], feed: dict[str, np.ndarray], runs: int, *,
                threads: int, warmup: int = 5) -> dict[str, list[float]]:
    """Milliseconds of each of ``runs`` timed calls per model (``models``: key → path), after
    ``warmup`` untimed rounds; sessions on ``threads`` intra-op threads (``lowbit.runtime.session``,
    graph optimisation "all"); one ``feed`` for every model."""
    sessions = {key: session(path, threads=threads, spinning=False) for key, path in models.items()}
    for _ in range(warmup):
        for s in sessions.values():
            s.run(None, feed)
    order = list(sessions)
    times: dict[str, list[float]] = {key: [] for key in sessions}
    for i in range(runs):
        for key in (order if i % 2 == 0 else order[::-1]):
            start = time.perf_counter_ns()
            sessions[key].run(None, feed)
            times[key].append((time.perf_counter_ns() - start) / 1e6)
    return times


def median_ms(times: list[float]) -> float:
    return float(np.median(times))


def p90_ms(times: list[float]) -> float:
    return float(np.percentile(times, 90))


def blas_threads() -> int:
    """The BLAS library's thread count (threadpoolctl), 1 when none is loaded."""
    from threadpoolctl import threadpool_info

    return max((info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"), default=1)
