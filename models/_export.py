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

__all__ = ["METRICS_JSON", "clean_exported", "export_torch", "finish_model", "op_histogram", "update_metrics"]

MODELS_DIR = pathlib.Path(__file__).resolve().parent
METRICS_JSON = MODELS_DIR / "metrics.json"

def op_histogram(model: ir.Model) -> dict[str, int]:
    """Count nodes per ``domain::op_type`` (domain omitted for ``ai.onnx``), sorted by name.

    Nodes inside subgraphs and model-local functions are counted too.
    """
    counts: collections.Counter[str] = collections.Counter()
    graphs: list[Any] = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            default_domain = node.domain in ("", "ai.onnx")
            key = node.op_type if default_domain else f"{node.domain}::{node.op_type}"
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
        rules.squeeze_reshape_1d_rule,
    ]


def _restore_parameter_names(graph: ir.Graph, parameter_names: set[str]) -> None:
    """Give a folded weight (e.g. ``Transpose(W)`` made constant) the name of its one source.

    Constant folding names its results ``val_<n>``; a pass report that says
    ``blocks.0.attn.wq.weight`` is more useful. The folded tensor keeps the ONNX layout its
    consumer needs (for ``MatMul``, W transposed to [in, out]).
    """
    from onnxscript.optimizer import FOLDED_FROM_KEY

    for value in list(graph.initializers.values()):
        sources = value.meta.get(FOLDED_FROM_KEY, set()) & parameter_names
        if len(sources) == 1:
            (source,) = sources
            if source not in graph.initializers:
                value.name = source
    for value in graph.initializers.values():
        value.meta.pop(FOLDED_FROM_KEY, None)
        value.metadata_props.pop(FOLDED_FROM_KEY, None)
        if value.const_value is not None:
            value.const_value.name = value.name


#: Node metadata the exporter writes that depends on where the script ran (absolute paths in
#: stack traces, FX node dumps); dropped so the files do not depend on the checkout.
_DROPPED_NODE_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


def clean_exported(model: ir.Model, *, iterations: int = 2) -> ir.Model:
    """Fold constants and drop no-ops in an unoptimized export, keeping every compute node.

    In place; returns ``model``. Raises if the result fails ``onnx.checker`` (full check).
    The exporter's module scopes (``namespace``, ``pkg.torch.onnx.name_scopes``) stay on the
    nodes; stack traces and FX dumps are removed.
    """
    from onnxscript import optimizer, rewriter

    parameter_names = set(model.graph.initializers)
    for _ in range(iterations):
        optimizer.fold_constants(model)
        rewriter.rewrite(model, pattern_rewrite_rules=_cleanup_rules())
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    _restore_parameter_names(model.graph, parameter_names)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for key in _DROPPED_NODE_METADATA:
            node.metadata_props.pop(key, None)
    passes = ir.passes.Sequential(
        common_passes.IdentityEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedFunctionsPass(),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.TopologicalSortPass(),
        common_passes.NameFixPass(),
        common_passes.CheckerPass(full_check=True),
    )
    return passes(model).model


def finish_model(model: ir.Model, path: pathlib.Path, metadata: dict[str, str]) -> None:
    """Stamp ``metadata_props`` and save with lowbit's own atomic writer (IR 10, weights inline)."""
    from lowbit.core import io

    for key, value in metadata.items():
        model.metadata_props[key] = str(value)
    io.save(model, pathlib.Path(path), external_data=False)


def export_torch(module, example, input_name: str | tuple[str, ...], dynamic_axes: dict[int, tuple[str, int]],
                 path: pathlib.Path, metadata: dict[str, str], *, tidy: bool = True,
                 output_name: str = "logits") -> ir.Model:
    """Export ``module`` with the dynamo exporter, BatchNormalization kept, and save it.

    ``example`` is one tensor, or a tuple of tensors when ``input_name`` is a tuple of names;
    ``dynamic_axes`` maps an axis of every input to (name, maximum size). The exporter's own
    optimizer is off (it would fold every BatchNormalization into its Conv); ``clean_exported``
    tidies the raw graph instead, unless ``tidy`` is false.
    """
    import torch

    names = (input_name,) if isinstance(input_name, str) else tuple(input_name)
    examples = (example,) if isinstance(input_name, str) else tuple(example)
    dims = {axis: torch.export.Dim(name, min=1, max=size) for axis, (name, size) in dynamic_axes.items()}
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            examples,
            input_names=list(names),
            output_names=[output_name],
            dynamic_shapes=tuple(dims for _ in names),
            opset_version=21,
            dynamo=True,
            verbose=False,  # the exporter's progress lines would land in callers' stdout (JSON)
            optimize=False,
            external_data=False,
        )
    model = clean_exported(program.model) if tidy else program.model
    finish_model(model, path, metadata)
    return model


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
