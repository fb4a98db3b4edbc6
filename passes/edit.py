"""Graph-editing helpers shared by the rewriting passes: constants, fresh names, dead values.

A pass that rewrites a weight calls ``set_const``: the initializer is changed in place when the
node is its only reader (its name kept), else a new initializer is made from ``base`` — so a
weight shared with another node (a tied embedding and head, say) is never changed behind that
node's back. Fresh names get a numeric suffix until unique, so the result is deterministic.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


class Names:
    """Names already used in one graph (and its subgraphs), to hand out fresh deterministic ones."""

    def __init__(self, graph: ir.Graph):
        self.used = set(ir.convenience.create_value_mapping(graph))

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}.{i}", i + 1
        self.used.add(name)
        return name


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The array behind an initializer or Constant output (not a graph input), else None."""
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def attribute(node: ir.Node, name: str, default=None):
    """The value of a node's attribute, or ``default`` when it is absent (or a reference to a
    function's attribute, whose value a graph pass cannot know)."""
    attr = node.attributes.get(name)
    return default if attr is None or attr.is_ref() else attr.value


def owned(value: ir.Value, user: ir.Node) -> bool:
    """True if ``value`` is an initializer that only ``user`` reads, once (safe to rewrite)."""
    return (
        value.is_initializer()
        and value.const_value is not None
        and not value.is_graph_input()
        and not value.is_graph_output()
        and [u for u, _ in value.uses()] == [user]
    )


def new_const(graph: ir.Graph, names: Names, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer named from ``base``."""
    value = ir.Value(
        name=names.fresh(base), shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), const_value=ir.tensor(array),
    )
    value.const_value.name = value.name
    graph.register_initializer(value)
    return value


def set_const(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, names: Names, base: str) -> None:
    """Make input ``index`` of ``node`` the constant ``array``: in place if ``node`` owns it,
    else as a new initializer named from ``base``."""
    old = node.inputs[index] if index < len(node.inputs) else None
    if old is not None and owned(old, node) and old.dtype == ir.DataType.from_numpy(array.dtype):
        old.shape = ir.Shape(array.shape)
        old.const_value = ir.tensor(array, name=old.name)
        return
    value = new_const(graph, names, base, array)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)
    if old is not None:
        drop_if_dead(graph, old)


def drop_if_dead(graph: ir.Graph, value: ir.Value) -> None:
    """Remove an initializer or Constant node that nothing reads any more."""
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    if value.is_initializer() and value.name in graph.initializers:
        graph.initializers.pop(value.name)
        return
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.graph is graph:
        graph.remove(producer, safe=True)


def bias_name(weight: ir.Value, fallback: str) -> str:
    """Name for a bias created next to ``weight``: ``x.weight`` → ``x.bias``, else ``<weight>.bias``
    (``fallback`` when the weight has no name)."""
    name = weight.name or fallback
    return name[: -len("weight")] + "bias" if name.endswith("weight") else name + ".bias"
