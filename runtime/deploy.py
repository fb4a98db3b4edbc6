"""``lowbit deploy``: the folder a device team copies to the target, checked before it leaves.

A deployment is four files in one folder, for one CPU architecture (``x86_64`` or ``aarch64``):

- the compressed model (and its external-data file, if it has one), copied byte for byte;
- ``lowbit-run``, the C++ host (``runtime/native/host``): loads the model, registers the op
  library, feeds ``.npy``/raw inputs, writes outputs and prints latency; only onnxruntime's public
  C/C++ API, RPATH ``$ORIGIN``;
- ``libonnxruntime.so.1``, onnxruntime 1.21 for that architecture (from the npm package
  ``onnxruntime-node``, whose C API 21 is the one the op library and the host are built against);
  a model that version cannot load (opset > 22, IR > 10, int2 weights) is refused with the fix,
  ``lowbit compress --target-ort 1.21``;
- ``liblowbit_ops.so``, lowbit's op library, only when the model has nodes in the ``lowbit``
  domain — registered by the one call ``SessionOptions::RegisterCustomOpsLibrary(path)``.

Everything is built from source for the target by ``runtime.edge`` (cross-compiled with Debian's
``g++-aarch64-linux-gnu`` for ``aarch64``) and stripped; builds are cached per architecture and
source digest in ``~/.cache/lowbit``. ``check=True`` runs the folder's own host on the first batch
of ``inputs`` (the forms of ``--calib``) or on seeded random inputs —
under ``qemu-aarch64`` for ``aarch64`` — and compares its outputs with this machine's Python run
of the same model: within ``edge.FLOAT_TOLERANCE`` for a float model and within
``edge.LOWBIT_TOLERANCE`` when lowbit's low-bit ops run (``DEVELOPERS.md`` says why the two
architectures' kernels may differ at all). The folder is written under a temporary name and
renamed when complete, so a failed build or check leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from lowbit.core import calib, io, target
from lowbit.core.errors import UserError
from lowbit.runtime import edge

MANIFEST = "manifest.json"


@dataclasses.dataclass
class Deployment:
    """What ``deploy`` wrote: the folder, its files with sizes in bytes, and the check's figures."""

    folder: Path
    arch: str
    files: dict[str, int]
    lowbit_ops: list[str]
    check: dict | None = None

    def to_dict(self) -> dict:
        return {"folder": str(self.folder), "arch": self.arch, "files": self.files,
                "total_bytes": sum(self.files.values()), "lowbit_ops": self.lowbit_ops, "check": self.check}


def _external_files(model_path: Path) -> list[Path]:
    """The external-data files a model refers to (relative to its folder), each once."""
    proto = onnx.load(str(model_path), load_external_data=False)
    found: list[str] = []

    def visit(graph: onnx.GraphProto) -> None:
        tensors = list(graph.initializer) + [a.t for n in graph.node for a in n.attribute if a.HasField("t")]
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                location = next((e.value for e in tensor.external_data if e.key == "location"), None)
                if location and location not in found:
                    found.append(location)
        for node in graph.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    visit(sub)

    visit(proto.graph)
    return [model_path.parent / name for name in found]


def _lowbit_ops(model) -> list[str]:
    return sorted({node.op_type for node in model.graph.all_nodes() if node.domain == "lowbit"})


def _check_feed(model, inputs: str | None, *, seed: int, batch: int) -> dict[str, np.ndarray]:
    """The check's inputs: the first batch of ``inputs`` (the forms of ``--calib``: .npz, a folder of
    them, module:function), else seeded random data (fine for comparing two runs of one model)."""
    if inputs is None:
        return calib.random_feed(calib.input_specs(model), batch, np.random.default_rng(seed))
    return calib.open_calibration(inputs, model, batch_size=batch, seed=seed).first(batch)


def _check(model, model_path: Path, build: edge.Build, folder: Path, feed: dict[str, np.ndarray], *,
           lowbit_ops: bool) -> dict:
    """Run the folder's host on ``feed`` and compare with this machine's Python run (within the
    low-bit tolerance when the model has lowbit's ops)."""
    from lowbit.runtime.session import session

    want = session(str(model_path)).run(None, feed)
    names = [v.name for v in model.graph.outputs]
    with tempfile.TemporaryDirectory(prefix="lowbit-deploy-check-") as work:
        got, report = edge.run_host(build, folder / model_path.name, feed, runs=3, warmup=1, threads=1,
                                    workdir=Path(work))
    tolerance = edge.LOWBIT_TOLERANCE if lowbit_ops else edge.FLOAT_TOLERANCE
    worst = 0.0
    for name, expected in zip(names, want):
        expected = np.asarray(expected, np.float64)
        scale = float(np.abs(expected).max()) or 1.0
        worst = max(worst, float(np.abs(np.asarray(got[name], np.float64) - expected).max()) / scale)
    result = {"max_rel_diff": worst, "tolerance": tolerance, "passed": worst <= tolerance,
              "inputs": {k: list(v.shape) for k, v in feed.items()},
              "latency_ms": report["latency_ms"], "emulated": bool(edge.emulator(build.arch)),
              "onnxruntime": report.get("onnxruntime")}
    return result


def deploy(model_path, out_dir, *, arch: str = "x86_64", check: bool = False, inputs: str | None = None,
           seed: int = 0, batch: int = 1) -> Deployment:
    """Write ``out_dir`` (which must not exist, or be empty) with what ``model_path`` needs on ``arch``.

    Raises ``UserError`` for a missing or unreadable model, an unknown architecture, an output
    folder in the way, or a check whose outputs differ beyond the tolerance (nothing is written).
    """
    model_path = Path(model_path)
    out_dir = Path(out_dir)
    if arch not in edge.ARCHES:
        raise UserError(f"--target {arch}: choose one of {', '.join(edge.ARCHES)}")
    model = io.load(model_path)  # names the file when it is missing or not a model
    target.check_loads(model, edge.ORT_NODE_VERSION, str(model_path))  # the onnxruntime that ships with it
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"output folder {out_dir} exists and is not empty (give a new folder)")
    if not out_dir.parent.is_dir():
        raise UserError(f"the folder for {out_dir} does not exist: {out_dir.parent}")
    lowbit_ops = _lowbit_ops(model)
    feed = _check_feed(model, inputs, seed=seed, batch=batch) if check else None  # bad data named before building
    build = edge.cached_build(arch)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        files = [model_path, *_external_files(model_path), build.host, build.onnxruntime]
        if lowbit_ops:
            files.append(build.library)
        for src in files:
            shutil.copy2(src, staging / src.name)
        staged = dataclasses.replace(build, out_dir=staging, selftests=(), host=staging / build.host.name, onnxruntime=staging / build.onnxruntime.name,
                                     library=staging / build.library.name)
        result = None
        if check:
            result = _check(model, model_path, staged, staging, feed, lowbit_ops=bool(lowbit_ops))
            if not result["passed"]:
                raise UserError(f"deploy check failed: {model_path.name} on {arch} differs from this machine's run by "
                                f"{result['max_rel_diff']:.2e} relative (tolerance {result['tolerance']:.0e})")
        sizes = {p.name: p.stat().st_size for p in sorted(staging.iterdir())}
        deployment = Deployment(out_dir, arch, sizes, lowbit_ops, result)
        manifest = deployment.to_dict() | {"model": model_path.name, "onnxruntime": edge.ORT_NODE_VERSION,
                                           "run": f"./lowbit-run {model_path.name} --input NAME=FILE.npy --output-dir out"}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(staging, out_dir)
        return deployment
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
