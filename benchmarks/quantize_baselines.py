"""Benchmark: lowbit's ``quantize`` pass against onnxruntime's own quantizers, same models, same run.

Four models, each quantized by onnxruntime's tools and by lowbit with matching settings, every
result scored with the model's own metric:

=============  ===========================================  ======================================
model          onnxruntime baseline                         metric (vs float)
=============  ===========================================  ======================================
digits CNN     ``quantize_static`` W8A8 QDQ, per-channel     top-1 on the 540 held-out digits
               weights, MinMax / Entropy calibration on
               256 training images
EfficientNet-  ``quantize_static`` as above (MinMax,         top-1 agreement with float on the 200
Lite0          Entropy, Percentile) on 64 calibration        photo crops (``imagenet_eval``)
               crops
all-MiniLM-    ``MatMulNBitsQuantizer`` 4-bit, block 32:     mean cosine of the sentence
L6-v2          ``DefaultWeightOnlyQuantConfig`` (symmetric   embeddings over 500 docstring
               and asymmetric), ``RTNWeightOnlyQuantConfig``  sentences (``minilm``)
               and ``GPTQWeightOnlyQuantConfig`` (128
               calibration sentences)
tiny LLaMA     ``MatMulNBitsQuantizer`` as above (128        bits per byte on held-out text
               windows of 128 training bytes for GPTQ)
=============  ===========================================  ======================================

``quantize_static`` runs after onnxruntime's recommended ``quant_pre_process`` (included in its
time). Note: through ``quantize_static`` the Entropy calibrator keeps its defaults
``num_bins = num_quantized_bins = 128``, which leaves a single candidate threshold, so its result
equals MinMax (``extra_options`` cannot change that); Percentile (99.999) is the stronger
onnxruntime setting on EfficientNet.

Each quantization runs in its own child process (this script with ``--job``), which reports the
wall time of the quantization call alone and its peak resident memory (``VmHWM``; it includes
the interpreter and onnxruntime, ``rss_start_mb`` is the level before quantizing).
lowbit runs through ``lowbit.core.compile.compress`` with the pipelines in ``LOWBIT``; while the
pass does not exist (or rejects an option) the entry says ``"status": "unavailable"`` with the
reason, and the onnxruntime numbers are still printed. ``memory`` repeats two lowbit
quantizations with 64 and 512 calibration samples: the issue requires < 10% growth.

MiniLM and EfficientNet-Lite0 are exported into the cache folder by their torch scripts (child
processes; torch never enters this process). Prints one JSON document. Run::

    HF_HUB_OFFLINE=1 python benchmarks/quantize_baselines.py [--cache DIR] [--models digits,lite0]
        [--no-ort-gptq] [--no-memory]

About 25 minutes on 2 cores: onnxruntime's GPTQ (about 3.5 min on MiniLM, 1 min on the tiny
LLaMA), lowbit's GPTQ runs (2-2.5 min each on MiniLM) and the 512-sample memory runs take most of it;
``--no-ort-gptq --no-memory`` brings it to about 10.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: lowbit pipelines, matching the onnxruntime settings they are compared with.
#: W8A8: BatchNormalization folded first (onnxruntime's quant_pre_process folds it too), then
#: per-channel 8-bit weights, 8-bit activations, entropy calibration (all samples given);
#: W4: block 32, symmetric (``_asym``: with zero points), MatMul weights only (as onnxruntime's
#: MatMulNBitsQuantizer does);
#: ``w4_rtn_all_weights`` also quantizes the embedding tables (Gather), lowbit's default.
LOWBIT = {
    "w8a8": "fold-constants,fold-bn,cleanup,"
            "quantize(weights=8,granularity=channel,activations=8,calibration=entropy,samples=256)",
    "w4_rtn": "quantize(weights=4,block=32,method=rtn,ops=[MatMul])",
    "w4_gptq": "quantize(weights=4,block=32,method=gptq,ops=[MatMul])",
    "w4_gptq_asym": "quantize(weights=4,block=32,method=gptq,ops=[MatMul],symmetric=false)",
    "w4_rtn_all_weights": "quantize(weights=4,block=32,method=rtn)",
}
#: The memory runs: the same settings, with every one of the 64 or 512 samples used.
MEMORY = {
    "minilm": "quantize(weights=4,block=32,method=gptq,ops=[MatMul],samples=512)",
    "lite0": "fold-constants,fold-bn,cleanup,"
             "quantize(weights=8,granularity=channel,activations=8,calibration=entropy,samples=512)",
}
MODELS = ("digits", "lite0", "minilm", "llama")
LLAMA_CALIB_WINDOWS, LLAMA_WINDOW = 128, 128


# --------------------------------------------------------------------------------------------
# Data and models (parent process)


def _python_module(module: str, *args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", module, *args], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@functools.lru_cache(maxsize=None)
def prepare(name: str, cache: Path) -> dict:
    """Paths of the float model and its calibration file(s), plus an ``evaluate`` callable."""
    from lowbit.models import data, evaluate, imagenet_eval, minilm

    cache.mkdir(parents=True, exist_ok=True)
    if name == "digits":
        src = Path(evaluate.__file__).with_name("digits_cnn.onnx")
        calib = cache / "digits_calib.npz"
        if not calib.exists():
            np.savez(calib, input=data.digits_calib(256))
        return {"src": src, "calib": calib, "metric": "top1", "evaluate": evaluate.digits_top1}
    if name == "llama":
        src = Path(evaluate.__file__).with_name("tiny_llama.onnx")
        calib = cache / "llama_calib.npz"
        if not calib.exists():
            train = np.frombuffer(data.text_split()[0], dtype=np.uint8)
            starts = np.linspace(0, len(train) - LLAMA_WINDOW - 1, LLAMA_CALIB_WINDOWS).astype(np.int64)
            np.savez(calib, tokens=np.stack([train[s : s + LLAMA_WINDOW] for s in starts]).astype(np.int64))
        return {"src": src, "calib": calib, "metric": "bits_per_byte", "evaluate": evaluate.llama_bits_per_byte}
    if name == "lite0":
        src = cache / "efficientnet_lite0.onnx"
        if not src.exists():
            _python_module("lowbit.models.efficientnet_lite0", str(src))
        crops = imagenet_eval.eval_crops()
        reference = imagenet_eval.logits(src, crops)

        def agreement(path):
            return imagenet_eval.top1_agreement(reference, imagenet_eval.logits(path, crops))

        return {"src": src, "calib": imagenet_eval.write_calib(cache), "metric": "top1_agreement",
                "evaluate": agreement, "calib_for_memory": {n: imagenet_eval.write_calib(cache, n) for n in (64, 512)}}
    if name == "minilm":
        src = cache / "minilm.onnx"
        if not src.exists():
            _python_module("lowbit.models.export_minilm", str(cache))
        eval_npz, calib = minilm.write_data(cache)
        ids, mask = minilm.load_data(eval_npz)
        reference = minilm.embed(src, ids, mask)

        def cosine(path):
            return minilm.mean_cosine(reference, minilm.embed(path, ids, mask))

        return {"src": src, "calib": calib, "metric": "mean_cosine", "evaluate": cosine,
                "calib_for_memory": {n: minilm.write_calib(cache, n) for n in (64, 512)}}
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def _file_bytes(path: Path) -> int:
    extra = Path(f"{path}.data")
    return path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)


def run_job(job: dict) -> dict:
    """Run one quantization in a child process; return its JSON answer."""
    answer = Path(job["out"] + ".answer.json")
    answer.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--job", json.dumps(job), "--answer", str(answer)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0 or not answer.exists():
        tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
        return {"status": "failed", "reason": tail}
    return json.loads(answer.read_text())


def measure(model: dict, job: dict) -> dict:
    """Quantize (child process), then score the output and size it (this process)."""
    out = Path(job["out"])
    result = {"config": {k: v for k, v in job.items() if k not in ("src", "out", "calib")}}
    result.update(run_job(job))
    if result.get("status") == "ok":
        result[model["metric"]] = model["evaluate"](out)
        result["file_bytes"] = _file_bytes(out)
    return result


def bench_model(name: str, cache: Path, out_dir: Path, *, ort_gptq: bool) -> dict:
    model = prepare(name, cache)
    src, calib = str(model["src"]), str(model["calib"])
    entry = {"float": {model["metric"]: model["evaluate"](src), "file_bytes": _file_bytes(model["src"])},
             "onnxruntime": {}, "lowbit": {}}

    def job(tool: str, label: str, **params) -> dict:
        spec = {"tool": tool, "src": src, "out": str(out_dir / f"{name}.{tool}.{label}.onnx"), "calib": calib, **params}
        return measure(model, spec)

    if name in ("digits", "lite0"):
        methods = ("MinMax", "Entropy") + (("Percentile",) if name == "lite0" else ())
        for method in methods:
            entry["onnxruntime"][f"quantize_static_w8a8_{method.lower()}"] = job(
                "ort_static", method.lower(), method=method, per_channel=True, batch=32 if name == "digits" else 8)
        entry["lowbit"]["w8a8"] = job("lowbit", "w8a8", pipeline=LOWBIT["w8a8"])
    else:
        entry["onnxruntime"]["matmulnbits_default_sym"] = job("ort_nbits", "default_sym", algo="default", symmetric=True)
        entry["onnxruntime"]["matmulnbits_default_asym"] = job("ort_nbits", "default_asym", algo="default", symmetric=False)
        entry["onnxruntime"]["matmulnbits_rtn"] = job("ort_nbits", "rtn", algo="rtn", symmetric=True)
        if ort_gptq:
            entry["onnxruntime"]["matmulnbits_gptq"] = job("ort_nbits", "gptq", algo="gptq", symmetric=True)
        entry["lowbit"]["w4_rtn"] = job("lowbit", "w4_rtn", pipeline=LOWBIT["w4_rtn"])
        entry["lowbit"]["w4_gptq"] = job("lowbit", "w4_gptq", pipeline=LOWBIT["w4_gptq"])
        entry["lowbit"]["w4_gptq_asym"] = job("lowbit", "w4_gptq_asym", pipeline=LOWBIT["w4_gptq_asym"])
        entry["lowbit"]["w4_rtn_all_weights"] = job("lowbit", "w4_rtn_all", pipeline=LOWBIT["w4_rtn_all_weights"])
    entry["lowbit_over_best_onnxruntime"] = _ratios(entry, model["metric"])
    return entry


def _ratios(entry: dict, metric: str) -> dict:
    """lowbit's time and metric over the best onnxruntime result (by metric) of the same model."""
    lower_is_better = metric == "bits_per_byte"
    ort = [r for r in entry["onnxruntime"].values() if r.get("status") == "ok"]
    if not ort:
        return {}
    best = (min if lower_is_better else max)(ort, key=lambda r: r[metric])
    ratios = {}
    for label, result in entry["lowbit"].items():
        if result.get("status") == "ok":
            ratios[label] = {"metric_ratio": result[metric] / best[metric],
                             "seconds_ratio": result["seconds"] / best["seconds"],
                             "size_ratio": result["file_bytes"] / best["file_bytes"]}
    return ratios


def memory(cache: Path, out_dir: Path) -> dict:
    """Peak memory of lowbit quantization with 64 and 512 calibration samples."""
    results = {}
    for name, pipeline in MEMORY.items():
        model = prepare(name, cache)
        runs = {}
        for n, calib in model["calib_for_memory"].items():
            spec = {"tool": "lowbit", "src": str(model["src"]), "out": str(out_dir / f"{name}.mem{n}.onnx"),
                    "calib": str(calib), "pipeline": pipeline}
            runs[str(n)] = run_job(spec)
        entry = {"pipeline": pipeline, "samples": runs}
        if all(r.get("status") == "ok" for r in runs.values()):
            entry["peak_growth_64_to_512"] = runs["512"]["peak_rss_mb"] / runs["64"]["peak_rss_mb"] - 1
        results[name] = entry
    return results


# --------------------------------------------------------------------------------------------
# Child process: one quantization


class _NpzReader:
    """onnxruntime ``CalibrationDataReader`` over an .npz (one array per input, first axis =
    samples). ``trim_mask``: one sample per feed, cut to its ``attention_mask`` length."""

    def __init__(self, path: str, batch: int, trim_mask: bool = False) -> None:
        with np.load(path) as npz:
            self.arrays = {key: npz[key] for key in npz.files}
        self.batch, self.trim, self.position = batch, trim_mask, 0
        self.count = len(next(iter(self.arrays.values())))

    def get_next(self):
        if self.position >= self.count:
            return None
        rows = slice(self.position, self.position + self.batch)
        self.position += self.batch
        feed = {key: np.ascontiguousarray(array[rows]) for key, array in self.arrays.items()}
        if self.trim and "attention_mask" in feed:
            width = max(int(feed["attention_mask"].sum(axis=1).max()), 1)
            feed = {key: np.ascontiguousarray(value[:, :width]) for key, value in feed.items()}
        return feed

    def rewind(self) -> None:
        self.position = 0


def _ort_static(job: dict) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_NpzReader, CalibrationDataReader):
        pass

    pre = job["out"] + ".pre.onnx"
    quant_pre_process(job["src"], pre)
    quantize_static(pre, job["out"], Reader(job["calib"], job["batch"]), quant_format=QuantFormat.QDQ,
                    per_channel=job["per_channel"], activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, job["method"]))
    os.remove(pre)


def _ort_nbits(job: dict) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    class Reader(_NpzReader, CalibrationDataReader):
        pass

    if job["algo"] == "default":
        config = mnb.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=job["symmetric"], bits=4)
    elif job["algo"] == "rtn":
        config = mnb.RTNWeightOnlyQuantConfig()
    else:
        config = mnb.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(job["calib"], 1, trim_mask=True))
    quantizer = mnb.MatMulNBitsQuantizer(onnx.load(job["src"]), bits=4, block_size=32,
                                         is_symmetric=job["symmetric"], algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(job["out"], use_external_data_format=False)


def _lowbit(job: dict) -> dict:
    from lowbit.core.compile import compress
    from lowbit.core.errors import UserError

    try:
        compress(job["src"], job["out"], job["pipeline"], calib=job["calib"], progress=False)
    except UserError as exc:
        return {"status": "unavailable", "reason": str(exc)}
    return {}


def _memory_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB, from ``/proc/self/status``.

    Not ``ru_maxrss``: Linux carries that across fork and exec, so a child would report its
    parent's footprint. ``VmHWM`` belongs to the process's own address space.
    """
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def child(job: dict) -> dict:
    import onnxruntime  # noqa: F401  (imported before the clock and the memory baseline)

    import lowbit.core.compile  # noqa: F401

    start_rss, _ = _memory_mb()
    start = time.perf_counter()
    answer = {"ort_static": _ort_static, "ort_nbits": _ort_nbits, "lowbit": _lowbit}[job["tool"]](job) or {}
    seconds = time.perf_counter() - start
    if answer.get("status"):
        return answer
    _, peak = _memory_mb()
    return {"status": "ok", "seconds": seconds, "peak_rss_mb": peak, "rss_start_mb": start_rss}


# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, help="folder for exported models and data (default: a temporary one)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--no-ort-gptq", action="store_true", help="skip onnxruntime's GPTQ (about 4 min)")
    parser.add_argument("--no-memory", action="store_true", help="skip the 64 vs 512 calibration-sample memory runs")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--answer", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:  # child: the quantizers print progress on stdout, so the answer goes to a file
        args.answer.write_text(json.dumps(child(json.loads(args.job))))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    with tempfile.TemporaryDirectory(prefix="lowbit-quant-bench-") as tmp:
        cache = args.cache or Path(tmp) / "cache"
        out_dir = Path(tmp) / "out"
        out_dir.mkdir()
        import onnxruntime

        document = {"benchmark": "quantize_baselines", "onnxruntime": onnxruntime.__version__,
                    "cpus": os.cpu_count(), "lowbit_pipelines": LOWBIT, "memory_pipelines": MEMORY, "models": {}}
        for name in names:
            document["models"][name] = bench_model(name, cache, out_dir, ort_gptq=not args.no_ort_gptq)
        if not args.no_memory:
            document["memory"] = memory(cache, out_dir)
    print(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
