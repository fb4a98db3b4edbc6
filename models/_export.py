"""Shared finishing steps of the model-building scripts (no torch import here).

After ``torch.onnx.export(..., dynamo=True)`` hands back an ``onnx_ir.Model``, the scripts:

1. cap the file format for the onnxruntime the project targets (``ir_version`` 10, the
   ``ai.onnx`` opset left as exported, at most 21 unless the ops need more),
2. stamp ``metadata_props`` (``lowbit.model``, ``lowbit.metric``, ...),
3. save the model with its weights inside the one file, atomically,
4. record the measured numbers under the model's key in ``metrics.json``.

``clean_exported`` tidies a graph exported with ``optimize=False``: constant folding and a
fixed, conservative set of onnxscript rewrite rules (no-op removal, zero-bias removal), but none
of the fusions — in particular BatchNormalization is *not* folded into Conv/Gemm, since that is
the job of lowbit's own ``fold-bn`` pass and the reference CNN must keep it for its tests.

Also ``op_histogram``, the op-type counts of a graph, which the scripts store in the metrics.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import tempfile
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

__all__ = ["METRICS_JSON", "clean_exported", "finish_model", "op_histogram", "update_metrics"]

MODELS_DIR = pathlib.Path(__file__).resolve().parent
METRICS_JSON = MODELS_DIR / "metrics.json"

#: IR version written into the committed models (onnxruntime 1.31 reads up to 13).
TARGET_IR_VERSION = 10


def op_histogram(model: ir.Model) -> dict[str, int]:
    """Count nodes per ``domain::op_type`` (domain omitted for ``ai.onnx``), sorted by name.

    Nodes inside subgraphs and model-local functions are counted too.
    """
    counts: collections.Counter[str] = collections.Counter()
    graphs: list[Any] = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            counts[key] += 1
    return dict(sorted(counts.items()))


def _cleanup_rules() -> list[Any]:
    from onnxscript.rewriter.rules import common as rules

    return [
        rules.no_op_cast_rule,
        rules.no_op_expand_rule,
        rules.no_op_transpose_rule,
        rules.cast_cast_rule,
        rules.reshape_reshape_rule,
        rules.unsqueeze_unsqueeze_rule,
        rules.transpose_transpose_rule,
        rules.add_0_rule,
        rules.sub_0_rule,
        rules.mul_by_1_rule,
        rules.div_by_1_rule,
        rules.dropout_inference_rule,
        rules.dropout_zero_rule,
        rules.remove_optional_bias_from_conv_rule,
        rules.remove_optional_bias_from_gemm_rule,
    ]


def clean_exported(model: ir.Model, *, iterations: int = 2) -> ir.Model:
    """Fold constants and drop no-ops in an unoptimized export, keeping every compute node.

    In place; returns ``model``. Raises if the result fails ``onnx.checker`` (full check).
    """
    from onnxscript import optimizer, rewriter

    for _ in range(iterations):
        optimizer.fold_constants(model)
        rewriter.rewrite(model, pattern_rewrite_rules=_cleanup_rules())
    passes = ir.passes.Sequential(
        common_passes.IdentityEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedFunctionsPass(),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.TopologicalSortPass(),
        common_passes.NameFixPass(),
        common_passes.CheckerPass(full_check=True),
    )
    return passes(model).model


def finish_model(
    model: ir.Model,
    path: pathlib.Path,
    metadata: dict[str, str],
    *,
    ir_version: int = TARGET_IR_VERSION,
) -> None:
    """Set ``ir_version`` and ``metadata_props`` on ``model`` and save it to ``path`` atomically.

    The weights are kept inside the file (no external data). The file is written next to
    ``path`` under a temporary name and renamed into place, so a failure leaves no half file.
    """
    model.ir_version = ir_version
    model.producer_name = "lowbit.models"
    for key, value in metadata.items():
        model.metadata_props[key] = str(value)
    # Initializers loaded from an external file by the exporter are made internal.
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        ir.save(model, tmp, format="protobuf")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def update_metrics(key: str, record: dict[str, Any], path: pathlib.Path = METRICS_JSON) -> None:
    """Replace the entry ``key`` in the metrics file with ``record`` (other entries kept)."""
    path = pathlib.Path(path)
    metrics: dict[str, Any] = {}
    if path.exists():
        metrics = json.loads(path.read_text())
    metrics[key] = record
    text = json.dumps(dict(sorted(metrics.items())), indent=2, sort_keys=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
