"""``lowbit demo``: the main job on an embedded model, before and after, in one table.

It compresses ``digits_cnn.onnx`` (or ``tiny_llama.onnx``) with the default pipeline, using the
model's own calibration samples (digits: 256 training images; llama: windows of the training
text), then measures on the held-out data what a user cares about: the task metric (top-1 /
bits per byte), file size, parameters, MACs, and onnxruntime latency of both models measured in
the same run (interleaved, so the ratio is fair on a noisy machine).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from lowbit.core.calib import input_specs

HERE = Path(__file__).resolve().parent
MODELS = {
    "digits": ("digits_cnn.onnx", "top-1 accuracy", True),
    "llama": ("tiny_llama.onnx", "bits per byte", False),
}


def model_path(name: str) -> Path:
    return HERE / MODELS[name][0]


def _calibration(name: str, model_file: Path, folder: Path) -> tuple[Path, dict]:
    """Write the demo's calibration samples to an .npz (named after the model's input)."""
    from lowbit.core import io
    from lowbit.models import data

    (spec,) = input_specs(io.load(model_file))
    if name == "digits":
        samples = data.digits_calib(256)
        x_eval, _ = data.digits_eval_set()
        eval_feed = {spec.name: x_eval[:64]}
    else:
        train, held = data.text_split()
        width = 64
        train = np.frombuffer(train, dtype=np.uint8)
        starts = np.linspace(0, len(train) - width - 1, 64).astype(np.int64)
        samples = np.stack([train[s:s + width] for s in starts]).astype(np.int64)
        held = np.frombuffer(held, dtype=np.uint8)[: 4 * width].astype(np.int64)
        eval_feed = {spec.name: held.reshape(4, width)}
    path = folder / "calib.npz"
    np.savez(path, **{spec.name: samples})
    return path, eval_feed


def _metric(name: str, model) -> float:
    from lowbit.models import evaluate

    return evaluate.digits_top1(model) if name == "digits" else evaluate.llama_bits_per_byte(model)


def run(name: str = "digits", *, pipeline: str | None = None, output: str | Path | None = None,
        progress: bool = False) -> dict:
    """Compress the embedded model ``name``; return metrics, sizes and latency before/after."""
    from lowbit.analysis.compare import compare_models
    from lowbit.cli import DEMO_PIPELINE
    from lowbit.core import io
    from lowbit.core.compile import compress

    src = model_path(name)
    with tempfile.TemporaryDirectory(prefix="lowbit-demo-") as tmp:
        tmp = Path(tmp)
        out = Path(output) if output else tmp / f"{src.stem}.lowbit.onnx"
        calib, eval_feed = _calibration(name, src, tmp)
        report = compress(src, out, pipeline or DEMO_PIPELINE, calib=str(calib), progress=progress)
        before, after = _metric(name, src), _metric(name, out)
        speed = compare_models(io.load(src), io.load(out), [eval_feed], latency=True, threads=1, min_seconds=1.0)
    info = report["info"]
    return {
        "model": name,
        "pipeline": info["pipeline"],
        "metric": MODELS[name][1],
        "higher_is_better": MODELS[name][2],
        "before": {"metric": before, "file_bytes": info["before"]["file_bytes"], "params": info["before"]["params"],
                   "macs": info["before"]["macs"], "latency_ms": speed["latency"]["a"]["median_ms"]},
        "after": {"metric": after, "file_bytes": info["after"]["file_bytes"], "params": info["after"]["params"],
                  "macs": info["after"]["macs"], "latency_ms": speed["latency"]["b"]["median_ms"]},
        "output_error": report["passes"][-1]["total_error"] if report["passes"] else None,
        "passes": report["passes"],
        "output": str(output) if output else None,
    }


def format_result(result: dict) -> str:
    from lowbit.analysis.report_format import format_table, human_bytes, human_count

    b, a = result["before"], result["after"]

    def row(label, key, fmt, better="smaller", worse="larger"):
        if key == "metric":
            change = f"{a[key] - b[key]:+.4f}"
        elif not a[key] or not b[key] or b[key] == a[key]:
            change = "same"
        else:
            change = f"{b[key] / a[key]:.2f}x {better}" if a[key] < b[key] else f"{a[key] / b[key]:.2f}x {worse}"
        return [label, fmt(b[key]), fmt(a[key]), change]

    table = format_table(
        [
            row(result["metric"], "metric", lambda v: f"{v:.4f}"),
            row("file size", "file_bytes", human_bytes),
            row("parameters", "params", human_count, "fewer", "more"),
            row("MACs", "macs", human_count, "fewer", "more"),
            row("latency (median, 1 thread)", "latency_ms", lambda v: f"{v:.3f} ms", "faster", "slower"),
        ],
        ["", "before", "after", "change"],
    )
    passes = ", ".join(f"{p['name']} {p['seconds']:.2f}s" for p in result["passes"])
    lines = [f"lowbit demo: {result['model']} with {result['pipeline']}", "", table, "", f"passes: {passes}"]
    if result.get("output"):
        lines.append(f"wrote {result['output']}")
    return "\n".join(lines)
