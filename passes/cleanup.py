"""``cleanup``: remove what computes nothing — exact.

Built on onnx-ir's own passes, in this order: identities removed (x ↦ Identity(x) is x),
initialisers with equal bytes, dtype and shape merged into one, nodes whose outputs nothing reads
removed, common subexpressions merged (same op, attributes and inputs compute the same value),
unused opset imports dropped. Graph outputs are never renamed or removed.

Before deduplicating, initialisers held as numpy views that are not C-contiguous (a transposed
or broadcast result of an earlier rewrite) are copied into contiguous arrays — same values,
dtype and shape — because onnx-ir hashes their raw buffers (``contiguous_initializers``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from lowbit.passes.base import Pass, option


@dataclasses.dataclass
class CleanupOptions:
    cse: bool = option(True, "merge nodes that compute the same value from the same inputs")
    dedup_limit: int = option(1 << 30, "largest initialiser (elements) compared for deduplication")


class Cleanup(Pass):
    """Remove identities, duplicate initialisers, dead nodes and unused opsets (exact)."""

    name = "cleanup"
    Options = CleanupOptions
    preserves = "exact"

    def run(self, model: ir.Model, ctx) -> bool:
        contiguous_initializers(model)
        steps = [
            common.IdentityEliminationPass(),
            common.DeduplicateHashedInitializersPass(size_limit=self.options.dedup_limit),
        ]
        if self.options.cse:
            steps.append(common.CommonSubexpressionEliminationPass())
        steps += [common.RemoveUnusedNodesPass(), common.RemoveUnusedOpsetsPass()]
        before = _census(model)
        changed = False
        for step in steps:
            changed |= step(model).modified
        after = _census(model)
        ctx.note("nodes_removed", before[0] - after[0])
        ctx.note("initializers_removed", before[1] - after[1])
        return changed


def contiguous_initializers(model: ir.Model) -> int:
    """Replace every initializer (all graphs) that is an ``ir.Tensor`` over a numpy array that is
    not C-contiguous by one over a contiguous copy; return how many were replaced. Values, dtype,
    shape, name and metadata are kept, so the model computes exactly the same."""
    count = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            raw = getattr(tensor, "raw", None) if isinstance(tensor, ir.Tensor) else None
            if not isinstance(raw, np.ndarray) or raw.flags.c_contiguous:
                continue
            value.const_value = ir.Tensor(np.ascontiguousarray(raw), dtype=tensor.dtype, shape=tensor.shape,
                                          name=tensor.name, doc_string=tensor.doc_string,
                                          metadata_props=dict(tensor.metadata_props))
            count += 1
    return count


def _census(model: ir.Model) -> tuple[int, int]:
    return sum(1 for _ in model.graph.all_nodes()), len(model.graph.initializers)
