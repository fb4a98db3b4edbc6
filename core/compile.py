"""The library entry point: compress a model file with a pipeline, as ``lowbit compress`` does.

``compress(model_path, out_path, passes, ...)`` checks the output path before any work, loads the
model (refusing bad files), pins the input shapes asked for (``input_shapes``, the CLI's
``--input-shape``: symbolic dims replaced in the model's input types, so the output keeps them),
opens the calibration data, runs the passes through the verifying
manager, stamps the pipeline, version and seed into ``metadata_props`` (so a result says how to
reproduce it), saves atomically and returns the report as a JSON-ready dict: per pass time and
error, and parameters, MACs, nodes and file bytes before and after (MACs at the input shapes in
``before.input_shapes``; a warning when some nodes could not be counted).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

from lowbit.core import io



def compress(model_path, out_path, passes, *, calib=None, seed=0, verify=True, external_data=None,
             report_path=None, progress=True, batch_size=16, input_shapes=None, target_ort=None):
    """Load, run ``passes`` (configured Pass objects or pipeline text) with verification, save
    atomically; return the report dict.

    ``input_shapes``: ``{"images": (1, 3, 320, 320)}`` or ``["images=1,3,320,320"]`` (as
    ``--input-shape``), pinning symbolic input dimensions when the model is loaded.

    ``target_ort``: an onnxruntime version ("1.17", or "1.17:stock" to forbid lowbit's own ops)
    the result must load in; the ``core.target`` pass then runs last, rewriting what that version
    cannot load or refusing (``UserError``, nothing written). None: the installed onnxruntime."""
    from tqdm import tqdm

    from lowbit import __version__
    from lowbit.analysis.report_format import jsonable
    from lowbit.analysis.stats import model_stats
    from lowbit.core.calib import apply_input_shapes, open_calibration
    from lowbit.core.context import Context
    from lowbit.passes.manager import run_passes
    from lowbit.passes.pipeline import describe_pipeline

    if isinstance(passes, str):
        from lowbit.passes.pipeline import parse_pipeline

        passes = parse_pipeline(passes)
    retarget = None
    if target_ort is not None:
        from lowbit.core.target import TargetOrt

        retarget = TargetOrt(target_ort)  # a bad version is refused before any work
    out_path = io.check_output_path(out_path, (model_path,))
    if report_path is not None:
        io.check_output_path(report_path, (model_path, out_path))
    model = io.load(model_path)
    pinned = apply_input_shapes(model, input_shapes)
    ctx = Context(seed=seed, verify=verify, progress=progress)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx.calib = open_calibration(calib, model, batch_size=batch_size, seed=seed)
    for w in caught:
        ctx.warn(str(w.message))
    before = model_stats(model)
    text = describe_pipeline(passes)
    run = list(passes) + ([retarget] if retarget is not None else [])
    with tqdm(total=len(run), disable=not progress, unit="pass", file=sys.stderr, leave=False) as bar:
        run_passes(model, run, ctx, progress=bar)
    model.metadata_props["lowbit.pipeline"] = text
    model.metadata_props["lowbit.version"] = __version__
    model.metadata_props["lowbit.seed"] = str(seed)
    if pinned:
        model.metadata_props["lowbit.input_shapes"] = " ".join(
            f"{name}={','.join('?' if d is None else str(d) for d in dims)}" for name, dims in pinned.items())
    if retarget is not None:
        model.metadata_props["lowbit.target_ort"] = retarget.target.version + ("" if retarget.target.lowbit_ops else ":stock")
    io.save(model, out_path, external_data=external_data, ir_version=retarget.ir_version if retarget else None)
    after = model_stats(model)
    for label, stats in (("before", before), ("after", after)):
        if not stats.macs_complete:
            ctx.warn(f"MACs {label} are a lower bound: {len(stats.unknown_macs)} nodes have unknown shapes "
                     f"(e.g. {stats.unknown_macs[0]})" + (f"; {stats.shape_error}" if stats.shape_error else ""))
    ctx.report.info.update({
        "input": str(model_path), "output": str(out_path), "pipeline": text, "seed": seed,
        "calibration": calib, "verified": verify, "input_shapes": pinned or None,
        "target_ort": str(target_ort) if target_ort is not None else None,
        "before": {**before.to_dict(), "file_bytes": Path(model_path).stat().st_size},
        "after": {**after.to_dict(), "file_bytes": _saved_bytes(out_path)},
    })
    report = jsonable(ctx.report.to_dict())
    if report_path is not None:
        _write_json_atomic(report_path, report)
    return report


def _saved_bytes(path: Path) -> int:
    data = Path(f"{path}.data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _write_json_atomic(path, data) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.chmod(tmp, io.default_file_mode())
    os.replace(tmp, path)
