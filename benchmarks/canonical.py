"""Benchmark: what the canonical pipeline buys at run time, and what verification costs.

For each embedded model: compress with ``fold-constants,fold-bn,cleanup``, then time the input
and the output in onnxruntime, interleaved in the same run, with graph optimisation fully on
(``all``: onnxruntime fuses BatchNorm itself, so expect a ratio near 1) and off (``disable``: what
a minimal edge build without graph optimisers sees). Also the pass manager's overhead: the
compress wall time with verification on, divided by the time with it off.

Prints one JSON document; ratios < 1 mean the compressed model is faster. Run:
    python benchmarks/canonical.py [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from lowbit.analysis.compare import compare_models
from lowbit.analysis.report_format import jsonable
from lowbit.core.compile import compress
from lowbit.models import demo
from lowbit.runtime.session import session

PIPELINE = "fold-constants,fold-bn,cleanup"


def bench(name: str, threads: int, folder: Path) -> dict:
    src = demo.model_path(name)
    out = folder / f"{name}.onnx"
    calib, feed = demo._calibration(name, src, folder)
    compress(src, out, PIPELINE, calib=str(calib), verify=False, progress=False)  # warm caches and imports
    start = time.perf_counter()
    compress(src, out, PIPELINE, calib=str(calib), verify=False, progress=False)
    plain = time.perf_counter() - start
    start = time.perf_counter()
    compress(src, folder / f"{name}.verified.onnx", PIPELINE, calib=str(calib), progress=False)
    verified = time.perf_counter() - start
    result = {"model": name, "pipeline": PIPELINE, "compress_seconds": plain, "verify_overhead_ratio": verified / plain}
    for level in ("all", "disable"):
        cmp = compare_models(
            lambda: session(str(src), threads=threads, optimization=level),
            lambda: session(str(out), threads=threads, optimization=level),
            [feed], latency=True, runs=50, min_seconds=1.0,
        )
        result[f"latency_{level}"] = {
            "before_ms": cmp["latency"]["a"]["median_ms"],
            "after_ms": cmp["latency"]["b"]["median_ms"],
            "ratio": cmp["latency"]["ratio"],
            "max_rel_error": cmp["error"]["rel"],
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench(name, args.threads, Path(tmp)) for name in ("digits", "llama")]
    print(json.dumps(jsonable({"benchmark": "canonical", "threads": args.threads, "results": results}), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
