"""Analysis shared by passes and commands: shapes, MACs, sizes, weight storage, model comparison.

Nothing here rewrites a model: every function takes an ``onnx_ir`` model and leaves it as it was
(shape inference runs on a clone).
"""

from lowbit.analysis.compare import compare_models, format_compare, measure_latency
from lowbit.analysis.report_format import format_table, human_bytes, human_count, jsonable
from lowbit.analysis.stats import (
    ModelStats,
    format_stats,
    infer_shapes,
    model_stats,
    node_macs,
    packed_tensor_bytes,
    weight_status,
)

__all__ = [
    "ModelStats",
    "compare_models",
    "format_compare",
    "format_stats",
    "format_table",
    "human_bytes",
    "human_count",
    "jsonable",
    "infer_shapes",
    "measure_latency",
    "model_stats",
    "node_macs",
    "packed_tensor_bytes",
    "weight_status",
]
