"""``fold-constants``: evaluate what depends only on constants, once, at compile time — exact.

A node whose inputs are all constants (initializers that are not graph inputs, or Constant
nodes) computes the same tensor on every run, so it is replaced by that tensor, an initializer
named after the node's output: ``f(c₁, …, cₖ) ↦ C``. Shape-only queries fold too when the shape
is static (``Shape(x)`` of an x whose shape is known, then ``Gather``/``Concat``/… on the result).

The evaluation is onnxscript's constant folder (``onnxscript.optimizer``), which runs each node
with the ONNX reference evaluator (``onnx.reference``) and has partial evaluators for shape ops;
lowbit adds no evaluator of its own. It does not fold random ops, control flow, ``ConstantOfShape``
or ``(De)QuantizeLinear`` (kept to preserve quantization info), nor nodes that read a graph input.
After folding, nodes and initializers nothing reads are removed, and (option ``lift``) the
remaining Constant nodes become initializers. Graph inputs and outputs keep their names.
Folded results are stored as C-contiguous arrays: the reference evaluator returns views (a
``Transpose`` then ``Unsqueeze`` of a constant is a strided view of it), which later hashing of
raw bytes (``cleanup``'s deduplication) cannot read.

Size limits bound the work and the file: a node with a constant input larger than
``input_limit`` elements is not evaluated, and a folded result larger than ``size_limit`` elements
is not stored unless it replaces at least as many elements of inputs only it reads (folding then
cannot grow the model).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnx_ir.passes import common

from lowbit.core.errors import UserError
from lowbit.passes.base import Pass, option
from lowbit.passes.cleanup import contiguous_initializers


@dataclasses.dataclass
class FoldConstantsOptions:
    size_limit: int = option(
        1 << 18,
        "largest folded result stored, in elements (bigger results are left as computation "
        "unless they replace as many input elements)",
    )
    input_limit: int = option(1 << 22, "largest constant input a node may have to be evaluated, in elements")
    shape_inference: bool = option(
        True, "infer shapes node by node while folding, so Shape of statically shaped values folds"
    )
    lift: bool = option(True, "turn the Constant nodes that remain into initializers")
    iterations: int = option(3, "at most this many folding sweeps (stops early when one changes nothing)")

    def validate(self) -> None:
        for name in ("size_limit", "input_limit"):
            if getattr(self, name) < 0:
                raise UserError(f"option '{name}' of pass fold-constants must be ≥ 0 elements, not {getattr(self, name)}")
        if self.iterations < 1:
            raise UserError(f"option 'iterations' of pass fold-constants must be ≥ 1, not {self.iterations}")


class FoldConstants(Pass):
    """Replace computations on constants by their results (onnxscript's folder; exact)."""

    name = "fold-constants"
    Options = FoldConstantsOptions
    preserves = "exact"

    def run(self, model: ir.Model, ctx) -> bool:
        from onnxscript.optimizer import FOLDED_FROM_KEY, fold_constants_ir

        opts = self.options
        inputs = [v.name for v in model.graph.inputs]
        outputs = [v.name for v in model.graph.outputs]
        before = _census(model)
        changed = False
        sweeps = 0
        for sweeps in range(1, opts.iterations + 1):
            result = fold_constants_ir(
                model,
                onnx_shape_inference=opts.shape_inference,
                input_size_limit=opts.input_limit,
                output_size_limit=opts.size_limit,
            )
            removed = common.RemoveUnusedNodesPass()(model).modified
            if not (result.modified or removed):
                break
            changed = True
        lifted = 0
        if opts.lift:
            constants = sum(1 for n in model.graph.all_nodes() if n.op_type == "Constant" and n.domain in ("", "ai.onnx"))
            if common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model).modified:
                changed = True
                lifted = constants - sum(
                    1 for n in model.graph.all_nodes() if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
                )
        contiguous_initializers(model)
        # The folder records provenance in metadata_props, which would be written to the file.
        for graph in [model.graph, *model.graph.subgraphs()]:
            for value in graph.initializers.values():
                value.metadata_props.pop(FOLDED_FROM_KEY, None)
        if [v.name for v in model.graph.inputs] != inputs or [v.name for v in model.graph.outputs] != outputs:
            raise RuntimeError("constant folding renamed a graph input or output")
        after = _census(model)
        ctx.note("nodes_removed", before[0] - after[0])
        ctx.note("nodes", after[0])
        ctx.note("initializers", after[1])
        ctx.note("constants_lifted", lifted)
        ctx.note("sweeps", sweeps)
        return changed


def _census(model: ir.Model) -> tuple[int, int]:
    return sum(1 for _ in model.graph.all_nodes()), len(model.graph.initializers)
