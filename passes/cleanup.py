"""``cleanup``: remove what computes nothing — exact.

Built on onnx-ir's own passes, in this order: identities removed (x ↦ Identity(x) is x),
initialisers with equal bytes, dtype and shape merged into one, nodes whose outputs nothing reads
removed, common subexpressions merged (same op, attributes and inputs compute the same value),
unused opset imports dropped. Graph outputs are never renamed or removed.
"""

from __future__ import annotations

import dataclasses

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


def _census(model: ir.Model) -> tuple[int, int]:
    return sum(1 for _ in model.graph.all_nodes()), len(model.graph.initializers)
