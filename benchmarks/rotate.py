"""Benchmark: what rotations buy the quantizer, and what they cost, measured in one run.

* tiny LLaMA, bits/byte on the held-out text (``evaluate.llama_bits_per_byte``), float vs
  W4 block 32 RTN — plain min/max and the default MSE-clipped — with and without
  ``rotate(kind=hadamard)`` (seeds 0–7; for plain RTN also ``kind=gsr,group=32``), and W2
  block 64 GPTQ (64 calibration windows) with no rotation and with each kind side by side, each
  rotated row the mean of seeds 0–3. Every kind rotates the residual stream (R1) and the V/O
  pairs (R2) and adds QuaRot's R4 before the down projections as a randomized Hadamard
  (``down_kind=hadamard``, the default: walsh/gsr cannot build its width, 344); two extra rows
  leave R4 out (``down=false``) for hadamard and gsr. ``gsr`` uses ``group=64``, the
  quantization block. Scored on the whole held-out text, in bits/byte and in KL divergence from
  the float model (``evaluate.llama_kl_bits``: the distance to float without the held-out text's
  own term, which makes most of the W4 bits/byte gain — see the test's docstring). ``claims``
  checks the issue's two numbers: the W4 damage shrinks
  by ≥ 30% with hadamard (plain RTN, head kept float as in QuaRot), and gsr is not worse than
  hadamard at W2 (means over the seeds).
* time of the ``rotate`` pass alone on all-MiniLM-L6-v2 (22.7 M parameters, online mode) and
  on the tiny LLaMA (fused), against the time of loading + saving the same model (the baseline
  measured in the same run); the issue's bound is ≤ 10 s on the 22M-parameter model.
* onnxruntime latency of the online-rotated MiniLM against the original (ratio, same run): the
  price of running the rotations as MatMuls until lowbit's Hadamard op lands (#7).

Prints one JSON document; exits 1 when a claim fails. Run::

    HF_HUB_OFFLINE=1 python benchmarks/rotate.py [--cache DIR] [--skip-w2]

About 17 minutes on 2 cores (the 25 W2 GPTQ runs take most of it).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

from lowbit.core import io
from lowbit.core.compile import compress
from lowbit.core.context import Context
from lowbit.models import data, demo, evaluate, minilm
from lowbit.passes.manager import run_passes
from lowbit.passes.pipeline import parse_pipeline

W4_PLAIN = "quantize(weights=4,block=32,method=rtn,mse_clip=false,exclude_nodes=node_linear_28)"
W4_DEFAULT = "quantize(weights=4,block=32,method=rtn)"
#: rotation seeds the W4 damage is averaged over (the signs matter on a model this small)
SEEDS = tuple(range(8))
#: rotation seeds of each rotated W2 GPTQ row (the W2 seed spread is about ±0.02 bits/byte)
W2_SEEDS = (0, 1, 2, 3)
W2_GPTQ = "quantize(weights=2,block=64,method=gptq,samples=64)"
W2_KINDS = {
    "none": "",
    "random": "rotate(kind=random),",
    "hadamard": "rotate(kind=hadamard),",
    "walsh": "rotate(kind=walsh),",
    "gsr": "rotate(kind=gsr,group=64),",
    "hadamard_no_R4": "rotate(kind=hadamard,down=false),",
    "gsr_no_R4": "rotate(kind=gsr,group=64,down=false),",
}


def llama_calib(folder: pathlib.Path) -> pathlib.Path:
    train, _ = data.text_split()
    text = np.frombuffer(train, dtype=np.uint8)
    starts = np.linspace(0, len(text) - 129, 128).astype(np.int64)
    path = folder / "llama_calib.npz"
    np.savez(path, tokens=np.stack([text[s:s + 128] for s in starts]).astype(np.int64))
    return path


def score(src, reference, folder: pathlib.Path, name: str, pipeline: str, calib=None, seed: int = 0) -> tuple[float, float]:
    """Bits/byte on the whole held-out text (49 KB: its first 16 KB alone are too noisy to rank
    seeds), and the KL divergence from ``reference`` (the float model's session) in bits a byte
    on the same windows."""
    out = folder / f"{name}.onnx"
    compress(src, out, pipeline, calib=None if calib is None else str(calib), seed=seed, progress=False, verify=False)
    return (round(evaluate.llama_bits_per_byte(str(out), max_bytes=None), 4),
            round(evaluate.llama_kl_bits(str(out), reference, max_bytes=None), 5))


def _rows(src, reference, folder: pathlib.Path, name: str, pipeline: str, seeds, calib=None) -> tuple[list[float], list[float]]:
    """``score`` for each seed: the bits/byte list and the KL list."""
    pairs = [score(src, reference, folder, name, pipeline, calib, seed) for seed in seeds]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def llama_quality(folder: pathlib.Path, skip_w2: bool) -> dict:
    src = demo.model_path("llama")
    reference = evaluate.open_session(str(src))
    result = {"float": round(evaluate.llama_bits_per_byte(reference, max_bytes=None), 4)}
    for label, quant in (("w4_plain_rtn", W4_PLAIN), ("w4_default_rtn", W4_DEFAULT)):
        plain, plain_kl = score(src, reference, folder, f"{label}_none", quant)
        rows = {"hadamard": "rotate(kind=hadamard),"}
        if label == "w4_plain_rtn":  # not the claim (it names hadamard): GSR matched to the block
            rows["gsr_group32"] = "rotate(kind=gsr,group=32),"
        result[label] = {"none": plain, "none_kl": plain_kl}
        for kind, rot in rows.items():
            rotated, kl = _rows(src, reference, folder, f"{label}_{kind}", f"{rot}{quant}", SEEDS)
            result[label].update({
                f"{kind}_by_seed": rotated, f"{kind}_kl_by_seed": kl,
                f"{kind}_damage_reduction": round(1 - (np.mean(rotated) - result["float"]) / (plain - result["float"]), 3),
                f"{kind}_kl_reduction": round(1 - np.mean(kl) / plain_kl, 3),
            })
    if not skip_w2:
        calib = llama_calib(folder)
        w2 = {}
        for kind, rot in W2_KINDS.items():
            seeds = W2_SEEDS if rot else (0,)
            by_seed, kl = _rows(src, reference, folder, f"w2_{kind}", f"{rot}{W2_GPTQ}", seeds, calib)
            w2[kind], w2[f"{kind}_kl"] = round(float(np.mean(by_seed)), 4), round(float(np.mean(kl)), 5)
            if len(seeds) > 1:
                w2[f"{kind}_by_seed"] = by_seed
        result["w2_block64_gptq"] = w2
    return result


def rotate_time(src: pathlib.Path, pipeline: str) -> dict:
    start = time.perf_counter()
    model = io.load(src)
    with tempfile.TemporaryDirectory() as tmp:
        io.save(model, pathlib.Path(tmp) / "copy.onnx")
    baseline = time.perf_counter() - start
    model = io.load(src)
    ctx = Context(verify=False, progress=False)
    start = time.perf_counter()
    run_passes(model, parse_pipeline(pipeline), ctx)
    seconds = time.perf_counter() - start
    params = sum(int(np.prod(v.const_value.shape)) for v in model.graph.initializers.values() if v.const_value is not None)
    return {"pipeline": pipeline, "seconds": round(seconds, 2), "load_save_seconds": round(baseline, 2),
            "ratio_to_load_save": round(seconds / baseline, 2), "parameters_after": params}


def minilm_costs(cache: pathlib.Path) -> dict:
    import subprocess

    folder = cache / "minilm"
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "minilm.onnx"
    if not src.exists():
        subprocess.run([sys.executable, "-m", "lowbit.models.export_minilm", str(folder)], check=True, stdout=subprocess.DEVNULL)
    timing = rotate_time(src, "rotate(mode=online)")
    rotated = folder / "minilm_online.onnx"
    compress(src, rotated, "rotate(mode=online)", progress=False, verify=False)
    from lowbit.analysis.compare import compare_models

    ids, mask = minilm.tokenize(minilm.sentence_sets()[0][:8])
    result = compare_models(str(src), str(rotated), {"input_ids": ids, "attention_mask": mask}, threads=2)
    return {"rotate_online": timing, "max_rel_error": result["error"].get("rel"), "latency": result["latency"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "lowbit-bench")
    parser.add_argument("--skip-w2", action="store_true", help="skip the W2 GPTQ runs")
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        quality = llama_quality(pathlib.Path(tmp), args.skip_w2)
    result = {
        "llama": quality,
        "rotate_time_llama": rotate_time(demo.model_path("llama"), "rotate"),
        "minilm": minilm_costs(args.cache),
    }
    claims = {"w4_damage_reduction_ge_30pct": bool(quality["w4_plain_rtn"]["hadamard_damage_reduction"] >= 0.30),
              "rotate_22m_le_10s": bool(result["minilm"]["rotate_online"]["seconds"] <= 10)}
    if "w2_block64_gptq" in quality:
        claims["w2_gsr_not_worse_than_hadamard"] = bool(quality["w2_block64_gptq"]["gsr"] <= quality["w2_block64_gptq"]["hadamard"])
    result["claims"] = claims
    print(json.dumps(result, indent=2, default=str))
    return 0 if all(claims.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
