"""Remove channels from a model, group by group, as ``analysis.channels`` couples them.

``remove_channels(model, cg, keep)`` keeps, for every group id in ``keep``, the listed group
channels and deletes the others everywhere they live, in place. Removing a channel of a unit
deletes, per member of its group:

==========================  ====================================================================
member                      edit
==========================  ====================================================================
constant, plain axis        the channel's slice along the axis (Conv/ConvTranspose/Gemm/MatMul
                            weight rows or columns, biases, BatchNormalization γ/β/μ/σ², per-
                            channel broadcast constants, a constant concatenated on the axis);
                            a ``block`` member (Flatten → Gemm) loses the whole block of rows
constant, ``fold`` axis     grouped convolution: in the rows of division d only the columns of
                            that division's removed channels (every division loses as many)
activation                  nothing but its shape annotation (the axis shrinks)
==========================  ====================================================================

and fixes the ops whose attributes or parameter inputs count channels:

==========================  ====================================================================
op                          edit
==========================  ====================================================================
Conv / ConvTranspose        depthwise (group = input channels): ``group`` = the new count;
                            grouped: ``group`` kept (every division shrank equally)
Split                       sizes along the split axis recomputed (written as the ``split`` input
                            from opset 13, else the attribute; ``num_outputs`` dropped)
Slice                       along the axis: start' = kept channels before the old start, end' =
                            start' + kept channels inside the old range (step 1)
Reshape                     a positive literal of the target shape on a shrunk output axis
                            becomes the new size (−1, copies and run-time Shape reads follow)
Resize                      ``sizes`` entry of the axis = the new count
Expand                      a target entry equal to the old count = the new count
Concat, Pad, pools, …       nothing: offsets and sizes follow from the inputs
==========================  ====================================================================

Exactness. Removing a channel whose every reading weight ("in" member) is zero leaves the model's
outputs unchanged up to float rounding (its contribution was 0); the tests plant such zeros.

Shared constants. A constant is rewritten in place (name kept) when every node reading it is one
of the reads the analysis accounted for — they all need the same slicing, since the channel axis
of a value is one ``(tensor, axis)`` of the channel graph; otherwise each accounted read gets its
own pruned copy through ``passes.edit.set_const`` (named ``<name>.pruned``) and the other
readers keep the original. Parameter inputs (split sizes, slice bounds, shapes) are always
written per node with ``set_const``. Finally the shapes of the shrunk activations are set (exactly:
each loses its removed count) and ONNX shape inference refreshes the rest; graph inputs and
outputs never change (the analysis never lets a group reaching them be pruned).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from lowbit.analysis.channels import ChannelGraph, Group, Key, _Dim, node_label
from lowbit.passes.edit import Names, attribute, const_array, set_const

__all__ = ["remove_channels", "removed_entries"]

logger = logging.getLogger(__name__)


def _describe(group: Group) -> str:
    lead = next((m for m in group.members if m.role == "out"), group.members[0])
    return f"group {group.id} ({group.size} channels of '{lead.tensor}')"


def _removed_keys(cg: ChannelGraph, keep: Mapping[int, Sequence[int]]) -> dict[Key, set[int]]:
    """Validate ``keep``; (tensor, axis) → channel indices (unfolded) to delete."""
    groups = {g.id: g for g in cg.groups}
    removed: dict[Key, set[int]] = defaultdict(set)
    for gid, kept in keep.items():
        group = groups.get(int(gid))
        if group is None:
            raise ValueError(f"group {gid} does not exist (the analysis found {len(cg.groups)} groups)")
        name = _describe(group)
        if not group.prunable:
            raise ValueError(f"{name} is not prunable: {group.reason}")
        chosen = [int(j) for j in kept]
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"{name}: the channels to keep repeat an index")
        if any(not 0 <= j < group.size for j in chosen):
            raise ValueError(f"{name}: a channel to keep is outside 0…{group.size - 1}")
        if not chosen:
            raise ValueError(f"{name} would keep no channel (keep at least one)")
        if group.divisions > 1:
            per = [0] * group.divisions
            for j in chosen:
                per[group.division_of(j)] += 1
            if len(set(per)) != 1:
                raise ValueError(f"{name} must keep the same number of channels in each of its "
                                 f"{group.divisions} divisions (grouped convolution), not {per}")
        kept_set = set(chosen)
        for j in range(group.size):
            if j not in kept_set:
                for key, idx in group.units[j].items():
                    removed[key].update(idx)
    return removed


def removed_entries(cg: ChannelGraph, keep: Mapping[int, Sequence[int]]) -> dict[str, int]:
    """Constant name → how many of its elements ``remove_channels(…, keep)`` deletes."""
    removed = _removed_keys(cg, keep)
    out: dict[str, int] = {}
    by_const: dict[str, dict[int, set[int]]] = defaultdict(dict)
    for (name, axis), rem in removed.items():
        if cg.dims[(name, axis)].const and rem:
            by_const[name][axis] = rem
    for name, axes in by_const.items():
        shape = next(cg.dims[(name, a)].shape for a in axes)
        before = int(np.prod(shape))
        after = _pruned_shape(shape, {a: cg.dims[(name, a)] for a in axes}, axes)
        out[name] = before - int(np.prod(after))
    return out


def _pruned_shape(shape, dims: dict[int, _Dim], axes: dict[int, set[int]]) -> tuple[int, ...]:
    shape = list(shape)
    for axis, rem in axes.items():
        d = dims[axis]
        shape[axis] -= len(rem) // (d.size // d.fold) if d.fold else len(rem)
    return tuple(shape)


def _prune_array(array: np.ndarray, name: str, axes: dict[int, set[int]], dims: dict[Key, _Dim]) -> np.ndarray:
    """``array`` without the removed channels of each axis; fold axes (grouped conv) first, while
    axis 0 still has its original rows."""
    for axis in sorted(axes, key=lambda a: (dims[(name, a)].fold == 0, a)):
        d, rem = dims[(name, axis)], axes[axis]
        if d.fold:
            divisions = d.size // d.fold
            rows = array.shape[0] // divisions
            parts = []
            for div in range(divisions):
                cols = [c for c in range(d.fold) if div * d.fold + c not in rem]
                parts.append(np.take(array[div * rows:(div + 1) * rows], cols, axis=axis))
            if len({p.shape[axis] for p in parts}) != 1:
                raise ValueError(f"'{name}': the divisions of a grouped convolution would lose different "
                                 f"numbers of channels")
            array = np.concatenate(parts, axis=0)
        else:
            keep = [i for i in range(d.size) if i not in rem]
            array = np.take(array, keep, axis=axis)
    return np.ascontiguousarray(array)


class _Edit:
    """What the node fixers need: removals, old sizes, values, fresh names."""

    def __init__(self, model: ir.Model, cg: ChannelGraph, removed: dict[Key, set[int]]):
        self.graph = model.graph
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 21))
        self.cg = cg
        self.removed = removed
        self.names = Names(model.graph)

    def changed(self, value: ir.Value | None, axis: int) -> bool:
        return value is not None and bool(self.removed.get((value.name, axis)))

    def old(self, value: ir.Value, axis: int) -> int:
        return self.cg.dims[(value.name, axis)].size

    def new(self, value: ir.Value, axis: int) -> int:
        d = self.cg.dims.get((value.name, axis))
        if d is None:
            size = value.shape[axis] if value.shape is not None else None
            if not isinstance(size, int):
                raise ValueError(f"the size of axis {axis} of '{value.name}' is unknown")
            return size
        return d.size - len(self.removed.get((value.name, axis), ()))

    def rank(self, value: ir.Value) -> int | None:
        for (name, _), d in self.cg.dims.items():
            if name == value.name and d.shape is not None:
                return len(d.shape)
        return len(value.shape) if value.shape is not None else None

    def write(self, node: ir.Node, index: int, array: np.ndarray, what: str) -> None:
        value = node.inputs[index] if index < len(node.inputs) else None
        base = f"{value.name}.pruned" if value is not None and value.name else f"{node_label(node)}.{what}"
        set_const(self.graph, node, index, array, self.names, base)


def _fix_conv(e: _Edit, node: ir.Node) -> None:
    group = int(attribute(node, "group", 1))
    x = node.inputs[0]
    if group > 1 and e.changed(x, 1) and e.old(x, 1) == group:  # depthwise: one input channel per group
        node.attributes["group"] = ir.AttrInt64("group", e.new(x, 1))


def _fix_split(e: _Edit, node: ir.Node) -> None:
    x = node.inputs[0]
    rank = e.rank(x)
    axis = int(attribute(node, "axis", 0))
    axis = axis + rank if axis < 0 and rank is not None else axis
    if not e.changed(x, axis):
        return
    sizes = [e.new(o, axis) if (o.name, axis) in e.cg.dims else 0 for o in node.outputs]
    if e.opset >= 13:
        node.attributes.pop("num_outputs", None)
        e.write(node, 1, np.asarray(sizes, dtype=np.int64), "split")
    else:
        node.attributes["split"] = ir.AttrInt64s("split", sizes)


def _fix_slice(e: _Edit, node: ir.Node) -> None:
    x = node.inputs[0]
    rank = e.rank(x)
    if rank is None:
        return
    if e.opset < 10:
        starts, ends = list(attribute(node, "starts")), list(attribute(node, "ends"))
        axes = list(attribute(node, "axes", list(range(len(starts)))))
    else:
        starts = const_array(node.inputs[1]).reshape(-1).copy()
        ends = const_array(node.inputs[2]).reshape(-1).copy()
        axes_v = node.inputs[3] if len(node.inputs) > 3 else None
        axes = [int(a) for a in const_array(axes_v).reshape(-1)] if axes_v is not None and axes_v.name else \
            list(range(len(starts)))
    axes = [a + rank if a < 0 else a for a in axes]
    touched = False
    for i, axis in enumerate(axes):
        if not e.changed(x, axis):
            continue
        size, rem = e.old(x, axis), e.removed[(x.name, axis)]
        span = range(size)[slice(int(starts[i]), int(ends[i]))]
        before = sum(1 for c in range(span.start) if c not in rem)
        inside = sum(1 for c in span if c not in rem)
        starts[i], ends[i] = before, before + inside
        touched = True
    if not touched:
        return
    if e.opset < 10:
        node.attributes["starts"] = ir.AttrInt64s("starts", [int(s) for s in starts])
        node.attributes["ends"] = ir.AttrInt64s("ends", [int(s) for s in ends])
    else:
        e.write(node, 1, np.asarray(starts), "starts")
        e.write(node, 2, np.asarray(ends), "ends")


def _fix_reshape(e: _Edit, node: ir.Node) -> None:
    y = node.outputs[0]
    target = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if target is None:
        return  # a run-time target: the analysis allowed only entries that follow by themselves
    entries = target.reshape(-1).copy()
    touched = False
    for j in range(len(entries)):
        if e.changed(y, j) and entries[j] > 0:
            entries[j] = e.new(y, j)
            touched = True
    if touched:
        e.write(node, 1, entries.astype(target.dtype), "shape")


def _fix_resize(e: _Edit, node: ir.Node) -> None:
    if node.op_type != "Resize" or e.opset < 11 or len(node.inputs) < 4 or node.inputs[3] is None:
        return
    x, sizes_v = node.inputs[0], node.inputs[3]
    sizes = const_array(sizes_v)
    rank = e.rank(x)
    if sizes is None or not sizes.size or rank is None:
        return
    axes = attribute(node, "axes")
    axes = [a + rank if a < 0 else a for a in axes] if axes is not None else list(range(rank))
    sizes = sizes.reshape(-1).copy()
    touched = False
    for i, axis in enumerate(axes):
        if e.changed(x, axis):
            sizes[i] = e.new(x, axis)
            touched = True
    if touched:
        e.write(node, 3, sizes, "sizes")


def _fix_expand(e: _Edit, node: ir.Node) -> None:
    if node.op_type != "Expand":
        return
    y = node.outputs[0]
    shape = const_array(node.inputs[1])
    rank = e.rank(y)
    if shape is None or rank is None:
        return
    entries = shape.reshape(-1).copy()
    touched = False
    for k in range(len(entries)):
        o = k + rank - len(entries)
        if e.changed(y, o) and entries[k] == e.old(y, o):
            entries[k] = e.new(y, o)
            touched = True
    if touched:
        e.write(node, 1, entries, "shape")


_FIXERS = {
    "Conv": _fix_conv,
    "ConvTranspose": _fix_conv,
    "Split": _fix_split,
    "Slice": _fix_slice,
    "Reshape": _fix_reshape,
    "Resize": _fix_resize,
    "Expand": _fix_expand,
}


def _write_const(e: _Edit, value: ir.Value, reads: list[tuple[ir.Node, int]], array: np.ndarray) -> None:
    """Put the pruned ``array`` behind every accounted read of ``value`` (see the module docstring)."""
    uses = [(u.node, u.idx) for u in value.uses()]
    accounted = {(id(n), i) for n, i in reads}
    if (value.is_initializer() and value.const_value is not None and not value.is_graph_input()
            and not value.is_graph_output() and all((id(n), i) in accounted for n, i in uses)):
        value.const_value = ir.tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)
        return
    for node, index in reads:
        if index < len(node.inputs) and node.inputs[index] is value:
            set_const(e.graph, node, index, array, e.names, f"{value.name}.pruned")


def remove_channels(model: ir.Model, cg: ChannelGraph, keep: Mapping[int, Sequence[int]]) -> None:
    """Keep only the channels ``keep[group_id]`` (group-channel indices 0…size−1) of each listed
    group and delete the others everywhere they live (see the module docstring). Groups not in
    ``keep`` are untouched. ``cg`` must come from ``channel_groups`` on this model as it is now.

    Raises ``ValueError`` naming the group when a group is unprunable, would keep no channel,
    lists an index twice or out of range, or keeps different counts in the divisions of a grouped
    convolution; and when the model no longer matches ``cg``.
    """
    removed = {k: v for k, v in _removed_keys(cg, keep).items() if v}
    if not removed:
        return
    graph = model.graph
    values = ir.convenience.create_value_mapping(graph)
    nodes: dict[str, ir.Node] = {}
    for node in graph:
        nodes.setdefault(node_label(node), node)
    # the model must be the one analysed
    for (name, axis) in removed:
        d = cg.dims[(name, axis)]
        value = values.get(name)
        if value is None:
            raise ValueError(f"'{name}' is not in the model: the channel graph was built for another model")
        if d.const:
            array = const_array(value)
            if array is None or array.ndim <= axis or array.shape[axis] != (d.fold or d.size):
                raise ValueError(f"constant '{name}' does not have the shape the channel graph was built for")
        elif value.shape is not None and axis < len(value.shape) and isinstance(value.shape[axis], int) \
                and value.shape[axis] != d.size:
            raise ValueError(f"axis {axis} of '{name}' is not {d.size} long as in the channel graph")
    edit = _Edit(model, cg, removed)

    by_const: dict[str, dict[int, set[int]]] = defaultdict(dict)
    for (name, axis), rem in removed.items():
        if cg.dims[(name, axis)].const:
            by_const[name][axis] = rem
    for name, axes in by_const.items():
        value = values[name]
        pruned = _prune_array(const_array(value), name, axes, cg.dims)
        reads = []
        for label, index in cg.readers.get(name, []):
            node = nodes.get(label)
            if node is not None:
                reads.append((node, index))
        _write_const(edit, value, reads, pruned)

    for node in list(graph):
        fixer = _FIXERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if fixer is not None:
            fixer(edit, node)

    for (name, axis), rem in removed.items():
        if cg.dims[(name, axis)].const:
            continue
        value = values[name]
        if value.shape is not None and axis < len(value.shape):
            dims = list(value.shape)
            dims[axis] = edit.new(value, axis)
            value.shape = ir.Shape(dims)
    _refresh_shapes(model, {name for name, _ in removed})


def _refresh_shapes(model: ir.Model, touched: set[str]) -> None:
    """ONNX shape inference on a clone; shapes it finds are copied to the values without a full
    annotation (graph inputs and outputs keep theirs)."""
    from onnx_ir.passes.common import ShapeInferencePass

    clone = model.clone()
    try:
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(clone)
    except Exception as exc:  # noqa: BLE001 - the exact shapes set above stand on their own
        logger.info("shape inference after removing channels failed: %s", exc)
        return
    inferred = ir.convenience.create_value_mapping(clone.graph)
    for node in model.graph:
        for value in node.outputs:
            if value.is_graph_output() or not value.name:
                continue
            got = inferred.get(value.name)
            if got is None or got.shape is None:
                continue
            if value.shape is None or value.name in touched and value.shape != got.shape and _static(got.shape):
                value.shape = got.shape
            if value.dtype is None and got.dtype is not None:
                value.dtype = got.dtype


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)
