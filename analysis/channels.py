"""Channel dependencies for structured pruning: which channel dimensions must be pruned together.

``channel_groups(model)`` follows every channel of every weighted layer through the graph (in the
spirit of DepGraph, Fang et al. 2023, but on the ONNX graph) and returns a ``ChannelGraph``:

* ``graph``: a ``networkx.Graph`` whose nodes are single channels ``(tensor, axis, index)`` — of
  activations and of constants (weights, BatchNormalization parameters, broadcast constants) —
  and whose edges join channels that one op couples (edge attribute ``node``: that op's name);
* ``groups``: the connected components of that graph are the pruning *units* (removing one
  channel means removing every channel of its unit); units that span exactly the same tensors
  (e.g. the 64 output channels of a Conv, its BatchNormalization and the next Conv's input
  columns) form one ``Group``, with one ``Member`` per tensor listing the unit's index in it.

How it works. Seeds are the channel axes of every weighted layer (Conv, ConvTranspose, Gemm and
MatMul with a constant operand): its output channels and the input channels it reads. From each
tracked ``(tensor, axis)`` the producer and every consumer are visited; each op has a rule that
maps channel i of the tracked axis to channels of its other tensors (adding one edge per pair)
and the newly reached axes are tracked in turn, until nothing new is reached. A rule that cannot
follow an op *blocks* the axis it was reached from, with a reason naming the op and node; a
blocked unit — and every group containing one — is reported unprunable. Nothing is guessed:

==================================  ==================================================================
op                                  channel i of the tracked axis maps to
==================================  ==================================================================
Conv, group 1                       input: X[:, i] ↔ W[:, i] ("in"); output: W[i] ("out") ↔ B[i]
                                    ("param") ↔ Y[:, i]
Conv, depthwise (C_in/group = 1)    X[:, i] ↔ W rows i·m … i·m+m−1 ↔ Y[:, same] ↔ B (m = C_out/group)
Conv, grouped (1 < group < C_in)    as group 1 per division; both sides get ``divisions = group``
                                    (W's input axis holds C_in/group columns: ``Member.fold``)
ConvTranspose (W: C_in × C_out/g)   the same with W's axes 0 (inputs) and 1 (outputs) exchanged
Gemm (transA, transB)               A's K axis ↔ B's K axis ("in" when B is constant); B's N axis
                                    ("out") ↔ Y[:, i] ↔ C; A's M axis ↔ Y[i, :]
MatMul (any rank, broadcasting)     A[..., i] ↔ B[..., i, :] (contraction: "in" on the constant
                                    side); B[..., i] ↔ Y[..., i] ("out"); A[..., i, :] ↔ Y[..., i, :];
                                    batch axes one to one. Two activations contracted: blocked
BatchNormalization                  axis 1 ↔ scale, B, mean, var [i] ("param"); other axes identity
InstanceNormalization               axis 1 ↔ scale, B [i]; spatial axes blocked (they are mixed)
LayerNormalization, RMSNorm.        axes before ``axis`` identity; a normalized axis is blocked
unary element-wise (Relu, Clip,     identity (Clip's bounds must be scalars; Dropout's mask too)
Sigmoid, Tanh, LeakyRelu, Hard*,
Erf, Gelu, Identity, Cast, …)
binary / variadic element-wise      numpy broadcasting, right-aligned: every operand whose axis has
(Add, Sub, Mul, Div, Pow, Max, Min,  the full size is coupled one to one (a constant becomes a
Sum, Mean, Where, PRelu, …)          "param" member, an activation is followed); size 1 broadcasts
Concat                              concat axis: input k's channel i ↔ output offset_k + i; other
                                    axes: all inputs and the output one to one
Split                               split axis: output k's channel i ↔ input offset_k + i (sizes
                                    from the output shapes; a run-time ``split`` input is blocked)
Slice                               sliced axis with constant starts/ends/axes and step 1: output i
                                    ↔ input start + i (dropped input channels couple nothing);
                                    other steps blocked; unsliced axes identity
Pad                                 identity when the axis is not padded (constant pads), else
                                    blocked
Resize, Upsample                    identity when the axis's scale is 1 or its size is the
                                    channel count (constant scales / sizes), else blocked
MaxPool, AveragePool, LpPool,       axes 0 and 1 identity (MaxPool's Indices output blocked);
Global*Pool                         pooled axes blocked
Reduce* , ArgMax, ArgMin            identity (axis renumbered without keepdims) unless the axis is
                                    reduced: blocked
Softmax, LogSoftmax, Hardmax,       identity unless the op works along the axis (opset < 13:
LpNormalization, CumSum              along any axis ≥ ``axis``): blocked
Transpose                           axis a ↔ axis perm⁻¹(a)
Reshape, Flatten, Squeeze,          from the static shapes: the axis kept whole ↔ one output axis
Unsqueeze                           (identity); merged with the axes after it into one output axis
                                    (Flatten → Gemm) ↔ a block of ``inner`` features i·inner …;
                                    split into an outer output axis ↔ index i // inner; merged with
                                    the axes before it (the batch) or cut unevenly: blocked.
                                    Reshape's target must be a constant, or computed from Shape of
                                    dimensions pruning does not change (the channel entry −1, 0 or
                                    Shape of the same axis)
Gather (not along the axis)         identity (axis renumbered); along the axis: blocked
Expand, Tile                        identity when the axis is not expanded / repeated (constant)
Quantize/DequantizeLinear           identity; a per-axis scale along the axis is a "param"
Shape                               blocked when it reads the axis's size (else nothing)
anything else, subgraphs            blocked ("<op> '<node>' is not supported")
==================================  ==================================================================

Graph inputs and outputs are never pruned: a unit reaching one is blocked ("reaches model input
'x'"). An activation axis whose size is symbolic in the model's own annotation (it depends on the
input size), or whose size shape inference cannot tell, is blocked.

Shapes. Rules need static shapes (offsets, Reshape/Flatten). Unless ``shapes`` is given they come
from ``lowbit.analysis.stats.infer_shapes(model, batch=2)``: a batch of 2, not 1, so that a
Reshape merging the batch with the channel axis is seen as such (with batch 1 it would look like
a plain renaming). Other symbolic dimensions become 64, which a detector's strides of up to 32
divide (pass a shaped model or a name → shape mapping to choose).

Groups. Units spanning the same tensors, each tensor the same number of times, form a group;
its ``size`` is the number of units (channels). In a group, a ``Member`` lists, for group channel
j, the index of that channel in one tensor's axis: when a unit holds a contiguous aligned run of
``block`` indices of one tensor (Flatten → Gemm: the H·W features of channel c; a depthwise
channel multiplier) the member has ``block`` set and lists run numbers; when a unit holds several
separate indices of one tensor (a C2f Concat that receives the same channels twice) the tensor
appears as several members. Grouped convolutions constrain a group to lose the same number of
channels from each of its ``divisions`` (group channels are ordered division by division); when
the divisions of one grouped conv spread unevenly over several groups, those groups are
unprunable. A group of one channel is unprunable (pruning must keep at least one).

``passes/channel_edit.remove_channels`` applies a pruning decision to the model.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
import numpy as np
import onnx_ir as ir

from lowbit.passes.edit import attribute, const_array

__all__ = ["Member", "Group", "ChannelGraph", "channel_groups", "node_label"]

ROLES = ("out", "in", "param", "act")
#: batch used for the analysis's own shape inference (see the module docstring)
ANALYSIS_BATCH = 2
#: every other symbolic dimension (image sides divisible by 32, sequence lengths)
ANALYSIS_DIM = 64

Key = tuple[str, int]  # (value name, axis)


@dataclasses.dataclass(frozen=True)
class Member:
    """One place where a group's channels live."""

    #: ONNX node name: the op that reads the constant, or produces (for a graph input: reads) the activation
    node: str
    #: value name: an activation or a constant (weight, BN parameter, broadcast constant)
    tensor: str
    #: the axis of ``tensor`` that carries the channels
    axis: int
    #: for group channel j, the index in this tensor's axis (the run number when ``block`` > 1)
    indices: tuple[int, ...]
    #: "out" (a layer's weight producing the channels), "in" (a layer's weight reading them),
    #: "param" (BN / bias / broadcast constant), "act" (an activation they flow through)
    role: str
    #: entries per channel on this axis: channel j owns indices[j]·block … indices[j]·block+block−1
    block: int = 1
    #: grouped (non-depthwise) Conv / ConvTranspose weights: the axis holds ``fold`` entries per
    #: division; index i is entry i % fold in the rows (axis 0) of division i // fold
    fold: int = 0


@dataclasses.dataclass
class Group:
    """Channels that are pruned together."""

    id: int
    #: channels in the group
    size: int
    members: list[Member]
    prunable: bool
    #: why not prunable (names the node and the op or pattern), None when prunable
    reason: str | None
    #: grouped conv: channels form ``divisions`` equal consecutive blocks; a pruning must remove
    #: the same count from each block
    divisions: int = 1
    #: per group channel, {(tensor, axis): indices of that unit in the tensor} (fold axes unfolded)
    units: list[dict[Key, tuple[int, ...]]] = dataclasses.field(default_factory=list, repr=False)

    def division_of(self, channel: int) -> int:
        return channel // (self.size // self.divisions)


@dataclasses.dataclass
class _Dim:
    """A tracked channel axis of one value."""

    name: str
    axis: int
    #: entries along the axis — blocks included (a Flatten → Gemm weight axis has C·H·W); for a
    #: ``fold`` axis the unfolded count (the grouped conv's C_in or C_out, not the weight's width)
    size: int
    role: str
    node: str
    const: bool
    fold: int = 0
    shape: tuple[int, ...] | None = None
    #: integer id of channel 0 (channel i is ``base + i``) in the union-find
    base: int = 0


@dataclasses.dataclass
class ChannelGraph:
    """Channel couplings of a model (see the module docstring)."""

    groups: list[Group]
    #: tracked axes: (tensor, axis) → size (entries along the axis, see ``_Dim``), role,
    #: reading/producing node, fold, static shape (activations: at the analysis's batch of 2)
    dims: dict[Key, _Dim] = dataclasses.field(default_factory=dict, repr=False)
    #: constant name → [(node label, input index)] of the reads the rules accounted for
    readers: dict[str, list[tuple[str, int]]] = dataclasses.field(default_factory=dict, repr=False)
    _links: list = dataclasses.field(default_factory=list, repr=False)
    _roots: np.ndarray | None = dataclasses.field(default=None, repr=False)
    _group_of_root: dict[int, int] = dataclasses.field(default_factory=dict, repr=False)
    _graph: nx.Graph | None = dataclasses.field(default=None, repr=False)

    @property
    def graph(self) -> nx.Graph:
        """Nodes (tensor, axis, index); edges join coupled channels, attribute ``node`` = the op
        coupling them. Built on first use (the groups come from the same edges by union-find)."""
        if self._graph is None:
            g = nx.Graph()
            for d in self.dims.values():
                g.add_nodes_from((d.name, d.axis, i) for i in range(d.size))
            for a, b, ia, ib, label in self._links:
                g.add_edges_from((((a[0], a[1], i), (b[0], b[1], j)) for i, j in zip(ia.tolist(), ib.tolist())),
                                 node=label)
            self._graph = g
        return self._graph

    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def group_of(self, tensor: str, axis: int, index: int) -> Group:
        """The group holding channel ``index`` of axis ``axis`` of ``tensor`` (KeyError if untracked)."""
        d = self.dims.get((tensor, axis))
        if d is None or not 0 <= index < d.size:
            raise KeyError(f"channel {index} of axis {axis} of '{tensor}' is not tracked")
        return self.groups[self._group_of_root[int(self._roots[d.base + index])]]

    def positions(self, group: Group, member: Member, channels: Sequence[int]) -> list[int]:
        """Indices along ``member.axis`` (unfolded, blocks expanded) owned by ``channels`` of ``group``."""
        out = []
        for j in channels:
            i = member.indices[j]
            out.extend(range(i * member.block, (i + 1) * member.block))
        return out

    def mask(self, group: Group, member: Member, channels: Sequence[int],
             shape: Sequence[int] | None = None) -> np.ndarray:
        """Boolean mask over ``member.tensor`` (its static ``shape``: known for constants, and for
        activations at the analysis's shapes) of the entries owned by ``channels`` of ``group``."""
        dim = self.dims[(member.tensor, member.axis)]
        if shape is None:
            shape = dim.shape
        if shape is None:
            raise ValueError(f"the shape of '{member.tensor}' is unknown")
        mask = np.zeros(tuple(shape), dtype=bool)
        where = self.positions(group, member, channels)
        if not member.fold:
            index = [slice(None)] * len(shape)
            index[member.axis] = np.asarray(where, dtype=np.int64)
            mask[tuple(index)] = True
            return mask
        divisions = dim.size // member.fold
        rows = shape[0] // divisions
        for i in where:
            d, col = divmod(i, member.fold)
            mask[d * rows:(d + 1) * rows, col] = True
        return mask

    def summary(self) -> str:
        """One line per group: id, size, prunable or why not, and its members."""
        lines = []
        for g in self.groups:
            state = "prunable" if g.prunable else f"unprunable: {g.reason}"
            div = f", {g.divisions} divisions" if g.divisions > 1 else ""
            members = ", ".join(f"{m.role} {m.tensor}[{m.axis}]" + (f"×{m.block}" if m.block > 1 else "")
                                for m in g.members)
            lines.append(f"group {g.id}: {g.size} channels{div}, {state}; {members}")
        return "\n".join(lines)


def node_label(node: ir.Node) -> str:
    """A node's name, or its first output's name when it has none."""
    if node.name:
        return node.name
    return node.outputs[0].name if node.outputs and node.outputs[0].name else node.op_type


# ---------------------------------------------------------------------------------------------
# Small readers


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _ints(array: np.ndarray | None) -> list[int] | None:
    return None if array is None else [int(x) for x in np.asarray(array).reshape(-1)]


def _static_dims(shape) -> tuple[int | None, ...] | None:
    if shape is None:
        return None
    return tuple(int(d) if isinstance(d, int) and d >= 0 else None for d in shape)


class _Blocked(Exception):
    """A rule cannot follow the tracked axis through its op (message: the reason)."""


# ---------------------------------------------------------------------------------------------
# The builder


class _Builder:
    def __init__(self, model: ir.Model, shapes: Mapping[str, tuple[int | None, ...]]):
        self.model = model
        self.graph = model.graph
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 21))
        self.shapes = shapes
        self.links: list = []
        self.total = 0
        self.dims: dict[Key, _Dim] = {}
        self.blocked: dict[Key, tuple[int, str]] = {}
        self.queue: deque[Key] = deque()
        self.done: set[tuple[int, Key]] = set()
        self.values: dict[str, ir.Value] = {}
        self.consts: dict[str, np.ndarray | None] = {}
        self.readers: dict[str, list[tuple[str, int]]] = defaultdict(list)
        self.constraints: list[tuple[Key, int, str]] = []
        self.shape_reads: list[tuple[str, int, Key, str]] = []
        self.order = {node_label(n): i for i, n in enumerate(self.graph)}

    # -- values -------------------------------------------------------------------------------
    def const(self, value: ir.Value | None) -> np.ndarray | None:
        if value is None:
            return None
        if value.name not in self.consts:
            try:
                self.consts[value.name] = const_array(value)
            except Exception:  # noqa: BLE001 - an unreadable tensor is not a usable constant
                self.consts[value.name] = None
        return self.consts[value.name]

    def shape(self, value: ir.Value | None) -> tuple[int | None, ...] | None:
        if value is None:
            return None
        array = self.const(value)
        if array is not None:
            return tuple(array.shape)
        got = self.shapes.get(value.name)
        if got is None:
            got = _static_dims(value.shape)
        return got

    def rank(self, value: ir.Value | None) -> int | None:
        s = self.shape(value)
        return None if s is None else len(s)

    def size(self, value: ir.Value, axis: int) -> int | None:
        s = self.shape(value)
        if s is None or not 0 <= axis < len(s):
            return None
        return s[axis]

    def static(self, value: ir.Value) -> tuple[int, ...]:
        s = self.shape(value)
        if s is None or any(d is None for d in s):
            raise _Blocked(f"the shape of '{value.name}' is unknown")
        return tuple(int(d) for d in s)

    # -- dims and edges -----------------------------------------------------------------------
    def dim(self, value: ir.Value, axis: int, node: ir.Node, role: str | None = None, *,
            index: int | None = None, fold: int = 0, size: int | None = None) -> _Dim:
        """The tracked axis ``axis`` of ``value`` (created, and queued when an activation).
        ``index``: the input slot of ``node`` reading it (recorded for constants)."""
        key = (value.name, axis)
        label = node_label(node)
        is_const = self.const(value) is not None
        if is_const and index is not None:
            read = (label, index)
            if read not in self.readers[value.name]:
                self.readers[value.name].append(read)
        found = self.dims.get(key)
        if found is not None:
            if found.fold != fold or (size is not None and found.size != size):
                raise _Blocked(f"'{value.name}' is read with two different channel layouts")
            return found
        if size is None:
            size = self.size(value, axis)
        if size is None:
            raise _Blocked(f"the size of axis {axis} of '{value.name}' is unknown")
        shape = self.shape(value)
        shape = tuple(shape) if shape is not None and all(d is not None for d in shape) else None
        if is_const:
            d = _Dim(value.name, axis, int(size), role or "param", label, True, fold, shape, self.total)
        else:
            producer = value.producer()
            owner = node_label(producer) if producer is not None else label
            d = _Dim(value.name, axis, int(size), "act", owner, False, 0, shape, self.total)
        self.total += d.size
        self.dims[key] = d
        self.values[value.name] = value
        if not is_const:
            self.queue.append(key)
            original = value.shape
            if original is not None and axis < len(original) and not isinstance(original[axis], int):
                self.block(key, f"axis {axis} of '{value.name}' has a size that depends on the input "
                                f"('{original[axis]}')")
        return d

    def link(self, node: ir.Node, a: _Dim, ia, b: _Dim, ib) -> None:
        """Couple channel ia[k] of ``a`` with channel ib[k] of ``b`` for every k."""
        ia, ib = np.asarray(ia, dtype=np.int64), np.asarray(ib, dtype=np.int64)
        self.links.append(((a.name, a.axis), (b.name, b.axis), ia, ib, node_label(node)))
        self.done.add((id(node), (a.name, a.axis)))
        self.done.add((id(node), (b.name, b.axis)))

    def same(self, node: ir.Node, a: _Dim, b: _Dim) -> None:
        if a.size != b.size:
            raise _Blocked(f"{node.op_type} '{node_label(node)}' maps {a.size} channels of '{a.name}' "
                           f"onto {b.size} of '{b.name}'")
        r = range(a.size)
        self.link(node, a, r, b, r)

    def block(self, key: Key, reason: str) -> None:
        """Mark ``key`` unprunable; a group shows its most telling reason (unknown shapes last)."""
        rank = (1 if "unknown" in reason else 0, len(self.blocked))
        if key not in self.blocked or rank[0] < self.blocked[key][0][0]:
            self.blocked[key] = (rank, reason)

    # -- traversal ----------------------------------------------------------------------------
    def visit(self, node: ir.Node, value: ir.Value, axis: int) -> None:
        key = (value.name, axis)
        if (id(node), key) in self.done:
            return
        self.done.add((id(node), key))
        label = node_label(node)
        try:
            if node.graph is not self.graph:
                raise _Blocked(f"'{value.name}' is used inside a subgraph ({node.op_type} '{label}')")
            if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
                raise _Blocked(f"{node.op_type} '{label}' runs a subgraph")
            rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if rule is None:
                op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
                raise _Blocked(f"{op} '{label}' is not supported")
            rule(self, node, value, axis)
        except _Blocked as why:
            self.block(key, str(why))

    def run(self) -> None:
        for node in self.graph:
            if node.domain not in ("", "ai.onnx"):
                continue
            seed = SEEDS.get(node.op_type)
            if seed is None:
                continue
            for value, axis in seed(self, node):
                self.visit(node, value, axis)
            self.drain()
        self.drain()

    def drain(self) -> None:
        while self.queue:
            key = self.queue.popleft()
            value = self.values[key[0]]
            if value.is_graph_input():
                self.block(key, f"reaches model input '{value.name}'")
            if value.is_graph_output():
                self.block(key, f"reaches model output '{value.name}'")
            producer = value.producer()
            if producer is not None:
                self.visit(producer, value, key[1])
            for use in value.uses():
                self.visit(use.node, value, key[1])


# ---------------------------------------------------------------------------------------------
# Seeds: the channel axes of weighted layers


def _seed_conv(b: _Builder, node: ir.Node):
    x, w = _input(node, 0), _input(node, 1)
    if x is None or w is None or b.const(w) is None or not node.outputs:
        return []
    return [(node.outputs[0], 1), (x, 1)]


def _gemm_axes(node: ir.Node):
    ta, tb = int(attribute(node, "transA", 0)), int(attribute(node, "transB", 0))
    a_m, a_k = (1, 0) if ta else (0, 1)
    b_k, b_n = (1, 0) if tb else (0, 1)
    return a_m, a_k, b_k, b_n


def _seed_gemm(b: _Builder, node: ir.Node):
    a, w = _input(node, 0), _input(node, 1)
    if a is None or w is None:
        return []
    a_m, a_k, b_k, b_n = _gemm_axes(node)
    if b.const(w) is not None:
        return [(node.outputs[0], 1), (a, a_k)]
    if b.const(a) is not None:
        return [(node.outputs[0], 0), (w, b_k)]
    return []


def _matmul_axes(ra: int, rb: int, r: int):
    """(A's K axis, B's K axis, A's M axis → Y axis, B's N axis → Y axis) for MatMul ranks."""
    a_k, b_k = ra - 1, (rb - 2 if rb >= 2 else 0)
    m = (ra - 2, r - 2 if rb >= 2 else r - 1) if ra >= 2 else None
    n = (rb - 1, r - 1) if rb >= 2 else None
    return a_k, b_k, m, n


def _seed_matmul(b: _Builder, node: ir.Node):
    a, w = _input(node, 0), _input(node, 1)
    ra, rb, r = b.rank(a), b.rank(w), b.rank(node.outputs[0])
    if a is None or w is None or ra is None or rb is None or r is None or ra < 1 or rb < 1:
        return []
    a_k, b_k, m, n = _matmul_axes(ra, rb, r)
    if b.const(w) is not None:
        return ([(node.outputs[0], n[1])] if n else []) + [(a, a_k)]
    if b.const(a) is not None:
        return ([(node.outputs[0], m[1])] if m else []) + [(w, b_k)]
    return []


SEEDS = {"Conv": _seed_conv, "ConvTranspose": _seed_conv, "Gemm": _seed_gemm, "MatMul": _seed_matmul}


# ---------------------------------------------------------------------------------------------
# Rules: rule(builder, node, tracked value, tracked axis); raise _Blocked to stop


def _unary(b: _Builder, node: ir.Node) -> tuple[ir.Value, ir.Value, int]:
    """(first input, first output, the input's rank) of a node; blocked when the rank is unknown."""
    x, y = _input(node, 0), node.outputs[0]
    r = b.rank(x)
    if r is None:
        raise _Blocked(f"{_label(node)}: rank unknown")
    return x, y, r


def _label(node: ir.Node) -> str:
    return f"{node.op_type} '{node_label(node)}'"


def _rule_conv(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    transpose = node.op_type == "ConvTranspose"
    x, w, bias = _input(node, 0), _input(node, 1), _input(node, 2)
    y = node.outputs[0]
    wa = b.const(w)
    if wa is None:
        raise _Blocked(f"{_label(node)}: weight '{w.name if w is not None else '?'}' is not a constant")
    if value is not x and value is not y and value is not bias:
        raise _Blocked(f"{_label(node)} reads '{value.name}' as a weight")
    if value is not bias and axis != 1:
        raise _Blocked(f"{_label(node)} mixes axis {axis} of '{value.name}'")
    g = int(attribute(node, "group", 1))
    if transpose:
        c_in, c_out = int(wa.shape[0]), int(wa.shape[1]) * g
    else:
        c_out, c_in = int(wa.shape[0]), int(wa.shape[1]) * g
    if g < 1 or c_in % g or c_out % g:
        raise _Blocked(f"{_label(node)}: weight shape {tuple(wa.shape)} does not fit group {g}")
    per_in, per_out = c_in // g, c_out // g
    dx = b.dim(x, 1, node)
    dy = b.dim(y, 1, node)
    if dx.size != c_in or dy.size != c_out:
        raise _Blocked(f"{_label(node)}: weight shape {tuple(wa.shape)} does not match the activations")
    w_out_axis, w_in_axis = (1, 0) if transpose else (0, 1)
    bias_dim = None
    if bias is not None:
        bias_dim = b.dim(bias, 0, node, "param", index=2)
        if bias_dim.size != c_out:
            raise _Blocked(f"{_label(node)}: bias '{bias.name}' has {bias_dim.size} entries, not {c_out}")
    if per_in == 1 and g > 1:  # depthwise: input channel i owns its group's per_out outputs
        # W's axis 0 is indexed by output channel (Conv) or by input channel (ConvTranspose)
        dw = b.dim(w, 0, node, "out", index=1)
        outs = np.arange(c_out)
        groups = outs // per_out
        b.link(node, dx, groups, dw, groups if transpose else outs)
        b.link(node, dx, groups, dy, outs)
        if bias_dim is not None:
            b.link(node, dy, outs, bias_dim, outs)
        return
    fold_in = per_in if (g > 1 and not transpose) else 0
    fold_out = per_out if (g > 1 and transpose) else 0
    dw_in = b.dim(w, w_in_axis, node, "in", index=1, fold=fold_in, size=c_in)
    dw_out = b.dim(w, w_out_axis, node, "out", index=1, fold=fold_out, size=c_out)
    b.same(node, dx, dw_in)
    b.same(node, dw_out, dy)
    if bias_dim is not None:
        b.same(node, dy, bias_dim)
    if g > 1:
        b.constraints.append(((x.name, 1), g, node_label(node)))
        b.constraints.append(((y.name, 1), g, node_label(node)))


def _rule_gemm(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    a, w, c = _input(node, 0), _input(node, 1), _input(node, 2)
    y = node.outputs[0]
    a_m, a_k, b_k, b_n = _gemm_axes(node)
    rc = b.rank(c) if c is not None else None
    if c is not None and rc is None:
        raise _Blocked(f"the shape of '{c.name}' is unknown")
    if value is a:
        family = "K" if axis == a_k else "M"
    elif value is w:
        family = "K" if axis == b_k else "N"
    elif value is y:
        family = "M" if axis == 0 else "N"
    else:  # C, broadcast to [M, N]
        family = "N" if axis == rc - 1 else "M"
    ca, cw = b.const(a) is not None, b.const(w) is not None
    if family == "K":
        if not ca and not cw:
            raise _Blocked(f"{_label(node)} multiplies two activations")
        da = b.dim(a, a_k, node, "in" if ca else None, index=0)
        dw = b.dim(w, b_k, node, "in" if cw else None, index=1)
        b.same(node, da, dw)
        return
    if family == "M":
        src, src_axis, out_axis, role, idx = a, a_m, 0, "out" if ca else None, 0
    else:
        src, src_axis, out_axis, role, idx = w, b_n, 1, "out" if cw else None, 1
    ds = b.dim(src, src_axis, node, role, index=idx)
    dy = b.dim(y, out_axis, node)
    b.same(node, ds, dy)
    if c is not None and rc:
        c_axis = rc - 1 if out_axis == 1 else (0 if rc == 2 else None)
        if c_axis is not None and b.size(c, c_axis) not in (1, None):
            dc = b.dim(c, c_axis, node, "param", index=2)
            b.same(node, dy, dc)
        elif c_axis is not None and b.size(c, c_axis) is None:
            raise _Blocked(f"the shape of '{c.name}' is unknown")


def _rule_matmul(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    a, w = _input(node, 0), _input(node, 1)
    y = node.outputs[0]
    ra, rb, r = b.rank(a), b.rank(w), b.rank(y)
    if ra is None or rb is None or r is None or ra < 1 or rb < 1:
        raise _Blocked(f"{_label(node)}: operand ranks unknown")
    a_k, b_k, m, n = _matmul_axes(ra, rb, r)
    ca, cw = b.const(a) is not None, b.const(w) is not None
    if (value is a and axis == a_k) or (value is w and axis == b_k):
        if not ca and not cw:
            raise _Blocked(f"{_label(node)} contracts two activations on axis {axis} of '{value.name}'")
        da = b.dim(a, a_k, node, "in" if ca else None, index=0)
        dw = b.dim(w, b_k, node, "in" if cw else None, index=1)
        b.same(node, da, dw)
        return
    if m is not None and ((value is a and axis == m[0]) or (value is y and axis == m[1])):
        b.same(node, b.dim(a, m[0], node, "out" if ca else None, index=0), b.dim(y, m[1], node))
        return
    if n is not None and ((value is w and axis == n[0]) or (value is y and axis == n[1])):
        b.same(node, b.dim(w, n[0], node, "out" if cw else None, index=1), b.dim(y, n[1], node))
        return
    # batch axes, right-aligned against the output's batch axes
    yb = r - (1 if ra >= 2 else 0) - (1 if rb >= 2 else 0)
    operands = [(a, ra - 2 if ra >= 2 else 0, 0, ca), (w, rb - 2 if rb >= 2 else 0, 1, cw)]
    if value is y:
        o = axis
    else:
        nb = ra - 2 if value is a else rb - 2
        o = axis + (yb - nb)
    if not 0 <= o < yb:
        raise _Blocked(f"{_label(node)}: axis {axis} of '{value.name}' is not a batch axis")
    dy = b.dim(y, o, node)
    for operand, nb, idx, is_const in operands:
        i = o - (yb - nb)
        if i < 0 or operand is None:
            continue
        s = b.size(operand, i)
        if s == 1 and dy.size != 1:
            continue
        b.same(node, b.dim(operand, i, node, "param" if is_const else None, index=idx), dy)


def _rule_unary(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    x = _input(node, 0)
    outs = [o for o in node.outputs if o.name]
    if value is not x and value not in outs:
        if node.op_type == "CastLike":
            return  # the second input only names a type
        raise _Blocked(f"{_label(node)} reads '{value.name}' as a parameter")
    for extra in node.inputs[1:]:
        if extra is not None and extra.name and node.op_type not in ("CastLike", "Dropout"):
            s = b.shape(extra)
            if s is None or math.prod(d if d is not None else 2 for d in s) != 1:
                raise _Blocked(f"{_label(node)}: parameter '{extra.name}' is not a scalar")
    dx = b.dim(x, axis, node)
    for o in outs:
        b.same(node, dx, b.dim(o, axis, node))


def _rule_broadcast(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    y = node.outputs[0]
    r = b.rank(y)
    ranks = [b.rank(v) if v is not None else 0 for v in node.inputs]
    if r is None or any(rk is None for rk in ranks):
        raise _Blocked(f"{_label(node)}: operand ranks unknown")
    if value is y:
        o = axis
    else:
        o = axis + r - b.rank(value)
    dy = b.dim(y, o, node)
    for idx, v in enumerate(node.inputs):
        if v is None or not v.name:
            continue
        i = o - (r - ranks[idx])
        if i < 0:
            continue
        s = b.size(v, i)
        if s is None:
            raise _Blocked(f"the shape of '{v.name}' is unknown")
        if s == 1 and dy.size != 1:
            continue
        dv = b.dim(v, i, node, "param" if b.const(v) is not None else None, index=idx)
        b.same(node, dv, dy)


def _rule_batchnorm(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    x, y = _input(node, 0), node.outputs[0]
    if len([o for o in node.outputs if o.name and (o.uses() or o.is_graph_output())]) > 1:
        raise _Blocked(f"{_label(node)} is in training mode")
    if value is not x and value is not y:
        raise _Blocked(f"{_label(node)} reads '{value.name}' as a parameter")
    if node.op_type == "InstanceNormalization" and axis >= 2:
        raise _Blocked(f"{_label(node)} normalizes over axis {axis}")
    dx, dy = b.dim(x, axis, node), b.dim(y, axis, node)
    b.same(node, dx, dy)
    if axis == 1:
        for idx, p in enumerate(node.inputs[1:], start=1):
            if p is not None and p.name:
                b.same(node, dy, b.dim(p, 0, node, "param", index=idx))


def _rule_layernorm(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    x = _input(node, 0)
    r = b.rank(x)
    if r is None:
        raise _Blocked(f"{_label(node)}: rank unknown")
    start = int(attribute(node, "axis", -1))
    start = start + r if start < 0 else start
    if value is not x and value not in node.outputs:
        raise _Blocked(f"{_label(node)} reads '{value.name}' as a parameter")
    if axis >= start:
        raise _Blocked(f"{_label(node)} mixes channels on axis {axis}")
    dx = b.dim(x, axis, node)
    for o in node.outputs:
        if o.name:
            b.same(node, dx, b.dim(o, axis, node))


def _rule_mixing_axis(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    """Ops working along one axis (Softmax, LogSoftmax, Hardmax, LpNormalization, CumSum, LRN,
    GroupNormalization): identity on the other axes."""
    x, y, r = _unary(b, node)
    if value is not x and value is not y:
        raise _Blocked(f"{_label(node)} reads '{value.name}' as a parameter")
    op = node.op_type
    if op in ("LRN", "GroupNormalization"):
        mixed = {1} | (set(range(2, r)) if op == "GroupNormalization" else set())
    elif op == "CumSum":
        along = _ints(b.const(_input(node, 1)))
        if along is None:
            raise _Blocked(f"{_label(node)}: axis is not a constant")
        mixed = {along[0] % r}
    else:
        default = -1 if (op == "LpNormalization" or b.opset >= 13) else 1
        k = int(attribute(node, "axis", default))
        k = k + r if k < 0 else k
        mixed = {k} if (op == "LpNormalization" or b.opset >= 13) else set(range(k, r))
    if axis in mixed:
        raise _Blocked(f"{_label(node)} mixes channels on axis {axis}")
    b.same(node, b.dim(x, axis, node), b.dim(y, axis, node))


def _rule_concat(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    y = node.outputs[0]
    r = b.rank(y)
    if r is None:
        raise _Blocked(f"{_label(node)}: rank unknown")
    k = int(attribute(node, "axis", 0))
    k = k + r if k < 0 else k
    inputs = [(i, v) for i, v in enumerate(node.inputs) if v is not None and v.name]
    dy = b.dim(y, axis, node)
    if axis != k:
        for i, v in inputs:
            b.same(node, b.dim(v, axis, node, "param" if b.const(v) is not None else None, index=i), dy)
        return
    offset = 0
    for i, v in inputs:
        s = b.size(v, k)
        if s is None:
            raise _Blocked(f"the shape of '{v.name}' is unknown")
        if s:
            dv = b.dim(v, k, node, "param" if b.const(v) is not None else None, index=i)
            b.link(node, dv, range(s), dy, range(offset, offset + s))
        offset += s
    if offset != dy.size:
        raise _Blocked(f"{_label(node)}: input sizes do not add up to the output's")


def _rule_split(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    x = _input(node, 0)
    r = b.rank(x)
    if r is None:
        raise _Blocked(f"{_label(node)}: rank unknown")
    k = int(attribute(node, "axis", 0))
    k = k + r if k < 0 else k
    split = _input(node, 1)
    if split is not None and split.name and b.const(split) is None:
        raise _Blocked(f"{_label(node)}: split sizes are computed at run time")
    dx = b.dim(x, axis, node)
    outs = list(node.outputs)
    if axis != k:
        for o in outs:
            b.same(node, dx, b.dim(o, axis, node))
        return
    offset = 0
    for o in outs:
        s = b.size(o, k)
        if s is None:
            raise _Blocked(f"the shape of '{o.name}' is unknown")
        if s:
            b.link(node, dx, range(offset, offset + s), b.dim(o, k, node), range(s))
        offset += s
    if offset != dx.size:
        raise _Blocked(f"{_label(node)}: output sizes do not add up to the input's")


def _slice_params(b: _Builder, node: ir.Node, r: int):
    """(starts, ends, axes, steps) of a Slice as int lists, or raise _Blocked."""
    if b.opset < 10:
        starts, ends = attribute(node, "starts"), attribute(node, "ends")
        axes = attribute(node, "axes", list(range(len(starts or []))))
        steps = [1] * len(starts or [])
    else:
        starts, ends = _ints(b.const(_input(node, 1))), _ints(b.const(_input(node, 2)))
        av, sv = _input(node, 3), _input(node, 4)
        axes = _ints(b.const(av)) if av is not None and av.name else None
        steps = _ints(b.const(sv)) if sv is not None and sv.name else None
        if (av is not None and av.name and axes is None) or (sv is not None and sv.name and steps is None):
            starts = None
        if starts is not None:
            axes = axes if axes is not None else list(range(len(starts)))
            steps = steps if steps is not None else [1] * len(starts)
    if starts is None or ends is None:
        raise _Blocked(f"{_label(node)}: starts/ends/axes/steps are computed at run time")
    axes = [int(a) + r if int(a) < 0 else int(a) for a in axes]
    return [int(s) for s in starts], [int(e) for e in ends], axes, [int(s) for s in steps]


def _rule_slice(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    x, y, r = _unary(b, node)
    if value is not x and value is not y:
        raise _Blocked(f"{_label(node)} reads '{value.name}' as a parameter")
    starts, ends, axes, steps = _slice_params(b, node, r)
    if axis not in axes:
        b.same(node, b.dim(x, axis, node), b.dim(y, axis, node))
        return
    i = axes.index(axis)
    if steps[i] != 1:
        raise _Blocked(f"{_label(node)} slices the channel axis {axis} with step {steps[i]}")
    dx = b.dim(x, axis, node)
    chosen = np.arange(dx.size)[slice(starts[i], ends[i])]
    dy = b.dim(y, axis, node)
    if len(chosen) != dy.size:
        raise _Blocked(f"{_label(node)}: slice of {dx.size} channels does not give {dy.size}")
    b.link(node, dx, chosen, dy, range(dy.size))


def _rule_pad(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    x, y, r = _unary(b, node)
    if value is not x and value is not y:
        raise _Blocked(f"{_label(node)} reads '{value.name}' as a parameter")
    if b.opset < 11:
        pads = attribute(node, "pads")
        axes = list(range(r))
    else:
        pads = _ints(b.const(_input(node, 1)))
        av = _input(node, 3)
        axes = _ints(b.const(av)) if av is not None and av.name else list(range(r))
        if av is not None and av.name and axes is None:
            pads = None
    if pads is None:
        raise _Blocked(f"{_label(node)}: pads are computed at run time")
    axes = [a + r if a < 0 else a for a in axes]
    n = len(axes)
    if axis in axes:
        i = axes.index(axis)
        if pads[i] != 0 or pads[i + n] != 0:
            raise _Blocked(f"{_label(node)} pads the channel axis {axis}")
    b.same(node, b.dim(x, axis, node), b.dim(y, axis, node))


def _rule_resize(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    x, y, r = _unary(b, node)
    if value is not x and value is not y:
        raise _Blocked(f"{_label(node)} reads '{value.name}' as a parameter")
    if attribute(node, "coordinate_transformation_mode", "") in ("tf_crop_and_resize", b"tf_crop_and_resize"):
        raise _Blocked(f"{_label(node)} crops (tf_crop_and_resize)")
    axes = attribute(node, "axes")
    axes = [a + r if a < 0 else a for a in axes] if axes is not None else list(range(r))
    if node.op_type == "Upsample" or b.opset < 11:
        scales_v, sizes_v = _input(node, 1), None
        scales = attribute(node, "scales") if scales_v is None else None
    else:
        scales_v, sizes_v = _input(node, 2), _input(node, 3)
        scales = None
    if axis in axes:
        i = axes.index(axis)
        dx = b.dim(x, axis, node)
        if sizes_v is not None and sizes_v.name:
            sizes = _ints(b.const(sizes_v))
            if sizes is None:
                raise _Blocked(f"{_label(node)}: sizes are computed at run time")
            if sizes[i] != dx.size:
                raise _Blocked(f"{_label(node)} resizes the channel axis {axis}")
        else:
            if scales is None:
                arr = b.const(scales_v) if scales_v is not None and scales_v.name else None
                if arr is None:
                    raise _Blocked(f"{_label(node)}: scales are computed at run time")
                scales = [float(s) for s in np.asarray(arr).reshape(-1)]
            if float(scales[i]) != 1.0:
                raise _Blocked(f"{_label(node)} resizes the channel axis {axis}")
    b.same(node, b.dim(x, axis, node), b.dim(y, axis, node))


def _rule_pool(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    x, y = _input(node, 0), node.outputs[0]
    if value is not x and value is not y:
        raise _Blocked(f"{_label(node)}: its indices output carries channel positions")
    if len(node.outputs) > 1 and node.outputs[1].name and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        raise _Blocked(f"{_label(node)}: its indices output carries channel positions")
    if axis not in (0, 1):
        raise _Blocked(f"{_label(node)} pools over axis {axis}")
    b.same(node, b.dim(x, axis, node), b.dim(y, axis, node))


def _reduce_axes(b: _Builder, node: ir.Node, r: int) -> list[int] | None:
    """Reduced axes (normalized), [] for none; None for 'all'."""
    op = node.op_type
    if op in ("ArgMax", "ArgMin"):
        k = int(attribute(node, "axis", 0))
        return [k + r if k < 0 else k]
    from_input = b.opset >= 18 or (op == "ReduceSum" and b.opset >= 13)
    if from_input:
        av = _input(node, 1)
        if av is None or not av.name:
            axes = []
        else:
            axes = _ints(b.const(av))
            if axes is None:
                raise _Blocked(f"{_label(node)}: axes are computed at run time")
    else:
        axes = list(attribute(node, "axes", []) or [])
    if not axes:
        return [] if int(attribute(node, "noop_with_empty_axes", 0)) else None
    return sorted(a + r if a < 0 else a for a in axes)


def _rule_reduce(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    x, y, r = _unary(b, node)
    if value is not x and value is not y:
        raise _Blocked(f"{_label(node)} reads '{value.name}' as a parameter")
    axes = _reduce_axes(b, node, r)
    if axes is None:
        axes = list(range(r))
    keep = int(attribute(node, "keepdims", 1))
    kept = [a for a in range(r) if a not in axes]
    if value is x:
        if axis in axes:
            raise _Blocked(f"{_label(node)} reduces over the channel axis {axis}")
        ax, ay = axis, axis if keep else kept.index(axis)
    else:
        ay = axis
        ax = axis if keep else kept[axis]
        if ax in axes:
            raise _Blocked(f"{_label(node)} reduces over the channel axis {ax}")
    b.same(node, b.dim(x, ax, node), b.dim(y, ay, node))


def _rule_transpose(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    x, y, r = _unary(b, node)
    perm = list(attribute(node, "perm", list(range(r))[::-1]))
    if value is x:
        ax, ay = axis, perm.index(axis)
    else:
        ax, ay = perm[axis], axis
    b.same(node, b.dim(x, ax, node), b.dim(y, ay, node))


def _reshape_map(src: Sequence[int], dst: Sequence[int], a: int):
    """How axis ``a`` of a tensor shaped ``src`` lands in the same data shaped ``dst``:
    ("intact", j, 1), ("merge", j, inner) — axis j of ``dst`` holds axis a as its outermost part,
    channel c owning j-indices c·inner … c·inner+inner−1 —, ("split", j, inner) — axis a is split,
    axis j of ``dst`` its outer part: channel c ↔ j-index c // inner —, or None (mixed with the
    axes before it, or no clean boundary)."""
    c = src[a]
    prefix = math.prod(src[:a])
    acc, j = 1, None
    for i, d in enumerate(dst):
        if acc == prefix and (d != 1 or c == 1):
            j = i
            break
        acc *= d
        if acc > prefix:
            return None
    if j is None:
        return None
    d = dst[j]
    if d == c:
        return ("intact", j, 1)
    if d > c:  # merged with the axes after it: they must make up exactly d // c
        return ("merge", j, d // c) if d % c == 0 and _leading_product_is(src[a + 1:], d // c) else None
    # split into an outer axis of d and inner axes that must make up exactly c // d
    return ("split", j, c // d) if c % d == 0 and _leading_product_is(dst[j + 1:], c // d) else None


def _leading_product_is(dims: Sequence[int], target: int) -> bool:
    """Whether some leading run of ``dims`` (possibly empty) multiplies to exactly ``target``."""
    acc = 1
    for s in dims:
        if acc == target:
            break
        acc *= s
    return acc == target


def _shape_entries(b: _Builder, value: ir.Value | None, depth: int = 0):
    """Entries of a 1-D shape tensor: int, ("dim", tensor, axis) for Shape reads, or "?"; None if
    not even the length is known."""
    if value is None or depth > 12:
        return None
    array = b.const(value)
    if array is not None:
        return [int(v) for v in np.asarray(array).reshape(-1)]
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op == "Shape":
        x = _input(node, 0)
        r = b.rank(x)
        if r is None:
            return None
        start, end = int(attribute(node, "start", 0)), attribute(node, "end", None)
        end = r if end is None else int(end)
        start, end = (start + r if start < 0 else start), (end + r if end < 0 else end)
        return [("dim", x.name, i) for i in range(max(start, 0), min(end, r))]
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten"):
        return _shape_entries(b, _input(node, 0), depth + 1)
    if op == "Concat":
        out = []
        for v in node.inputs:
            part = _shape_entries(b, v, depth + 1)
            if part is None:
                return None
            out.extend(part)
        return out
    if op == "Gather":
        data = _shape_entries(b, _input(node, 0), depth + 1)
        index = _ints(b.const(_input(node, 1)))
        if data is None or index is None:
            return None
        return [data[i] for i in index]
    shape = b.shape(value)
    if shape is not None and len(shape) <= 1 and all(d is not None for d in shape):
        return ["?"] * (int(shape[0]) if shape else 1)
    return None


def _rule_reshape(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    x, y = _input(node, 0), node.outputs[0]
    if value is not x and value is not y:
        raise _Blocked(f"{_label(node)} reads the channel count of '{value.name}' as a shape")
    si, so = b.static(x), b.static(y)
    if value is x:
        got = _reshape_map(si, so, axis)
        ax = axis
    else:
        back = _reshape_map(so, si, axis)
        got = None if back is None else {"intact": "intact", "merge": "split", "split": "merge"}[back[0]]
        if back is not None:
            ax = back[1]
            got = (got, axis, back[2])
    if got is None:
        raise _Blocked(f"{_label(node)} mixes the channel axis {axis} of '{value.name}' with other axes")
    kind, j, inner = got
    if node.op_type == "Reshape":
        _check_reshape_target(b, node, x, ax, kind, j)
    dx, dy = b.dim(x, ax, node), b.dim(y, j, node)
    chans = np.arange(dx.size)
    if kind == "intact":
        b.same(node, dx, dy)
    elif kind == "merge":
        b.link(node, dx, np.repeat(chans, inner), dy, np.arange(dx.size * inner))
    else:
        b.link(node, dx, chans, dy, chans // inner)


def _check_reshape_target(b: _Builder, node: ir.Node, x: ir.Value, ax: int, kind: str, j: int) -> None:
    target = _input(node, 1)
    entries = _shape_entries(b, target)
    if entries is None or j >= len(entries):
        raise _Blocked(f"{_label(node)}: its target shape is computed at run time")
    constant = b.const(target) is not None
    allowzero = int(attribute(node, "allowzero", 0))
    entry = entries[j]
    ok = entry == -1
    if isinstance(entry, int) and entry > 0:
        ok = constant  # rewritten on pruning (only possible in a constant)
    elif entry == 0 and not allowzero:
        ok = kind == "intact" and j == ax
    elif isinstance(entry, tuple):
        ok = kind == "intact" and entry[1] == x.name and entry[2] == ax
    if not ok:
        raise _Blocked(f"{_label(node)}: entry {j} of its target shape would not follow a pruning")
    for pos, e in enumerate(entries):
        if e == "?":
            raise _Blocked(f"{_label(node)}: its target shape is computed at run time")
        if isinstance(e, tuple) and not (pos == j and e[1] == x.name and e[2] == ax):
            b.shape_reads.append((e[1], e[2], (x.name, ax), f"{_label(node)} reads the size of axis "
                                                              f"{e[2]} of '{e[1]}' for its target shape"))


def _rule_gather(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    data, idx, y = _input(node, 0), _input(node, 1), node.outputs[0]
    r, ri = b.rank(data), b.rank(idx)
    if r is None or ri is None:
        raise _Blocked(f"{_label(node)}: ranks unknown")
    k = int(attribute(node, "axis", 0))
    k = k + r if k < 0 else k
    if value is idx:
        raise _Blocked(f"{_label(node)} uses '{value.name}' as indices")
    if value is data:
        if axis == k:
            raise _Blocked(f"{_label(node)} gathers along the channel axis {axis}")
        ad, ay = axis, axis if axis < k else axis + ri - 1
    else:
        if k <= axis < k + ri:
            raise _Blocked(f"{_label(node)}: axis {axis} of '{y.name}' comes from the indices")
        ad, ay = (axis if axis < k else axis - ri + 1), axis
    dd = b.dim(data, ad, node, "param" if b.const(data) is not None else None, index=0)
    b.same(node, dd, b.dim(y, ay, node))


def _rule_expand(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    x, y = _input(node, 0), node.outputs[0]
    rx, r = b.rank(x), b.rank(y)
    if rx is None or r is None:
        raise _Blocked(f"{_label(node)}: rank unknown")
    if value is not x and value is not y:
        raise _Blocked(f"{_label(node)} reads the channel count of '{value.name}' as a shape")
    ax, ay = (axis, axis + r - rx) if value is x else (axis - (r - rx), axis)
    if ax < 0:
        raise _Blocked(f"{_label(node)} creates axis {ay} by broadcasting")
    if node.op_type == "Tile":
        reps = _ints(b.const(_input(node, 1)))
        if reps is None or reps[ax] != 1:
            raise _Blocked(f"{_label(node)} repeats the channel axis {ax}")
    else:
        shape = _ints(b.const(_input(node, 1)))
        if shape is None:
            raise _Blocked(f"{_label(node)}: its target shape is computed at run time")
        if b.size(x, ax) != b.size(y, ay):
            raise _Blocked(f"{_label(node)} broadcasts the channel axis {ax}")
    b.same(node, b.dim(x, ax, node), b.dim(y, ay, node))


def _rule_qdq(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    x, scale, zero, y = _input(node, 0), _input(node, 1), _input(node, 2), node.outputs[0]
    if value is not x and value is not y:
        raise _Blocked(f"{_label(node)} reads '{value.name}' as a parameter")
    if int(attribute(node, "block_size", 0)):
        raise _Blocked(f"{_label(node)} is block-quantized")
    dx, dy = b.dim(x, axis, node), b.dim(y, axis, node)
    b.same(node, dx, dy)
    r = b.rank(x)
    q_axis = int(attribute(node, "axis", 1))
    q_axis = q_axis + r if (r is not None and q_axis < 0) else q_axis
    srank = b.rank(scale)
    if srank and b.size(scale, 0) not in (1, None) and q_axis == axis:
        for idx, p in ((1, scale), (2, zero)):
            if p is not None and p.name:
                b.same(node, dx, b.dim(p, 0, node, "param", index=idx))


def _rule_shape(b: _Builder, node: ir.Node, value: ir.Value, axis: int) -> None:
    r = b.rank(value)
    if node.op_type == "Size" or r is None:
        raise _Blocked(f"{_label(node)} reads the channel count of '{value.name}'")
    start, end = int(attribute(node, "start", 0)), attribute(node, "end", None)
    end = r if end is None else int(end)
    start, end = (start + r if start < 0 else start), (end + r if end < 0 else end)
    if start <= axis < end and not _feeds_only_own_reshape(value, node.outputs[0]):
        raise _Blocked(f"{_label(node)} reads the channel count of '{value.name}'")


_SHAPE_ARITH = ("Concat", "Gather", "Unsqueeze", "Squeeze", "Cast", "Identity")


def _feeds_only_own_reshape(value: ir.Value, shape_out: ir.Value) -> bool:
    """True when the Shape output only ends, through shape plumbing (Concat, Gather, (Un)Squeeze,
    Cast, Identity), in the target of Reshapes of ``value`` itself — whose rule then checks that
    the channel entry lands on the channel axis (x.view(x.size(0), x.size(1), -1))."""
    stack, seen = [shape_out], set()
    while stack:
        v = stack.pop()
        if v.is_graph_output() or id(v) in seen:
            return False
        seen.add(id(v))
        for use in v.uses():
            user = use.node
            if user.domain not in ("", "ai.onnx"):
                return False
            if user.op_type == "Reshape" and use.idx == 1:
                if user.inputs[0] is not value:
                    return False
            elif user.op_type in _SHAPE_ARITH and (user.op_type != "Gather" or use.idx == 0):
                stack.extend(user.outputs)
            else:
                return False
    return True


_UNARY = (
    "Relu Clip Sigmoid Tanh LeakyRelu HardSigmoid HardSwish Erf Gelu Identity Dropout Cast CastLike "
    "Neg Abs Exp Log Sqrt Reciprocal Softplus Softsign Elu Selu Celu Mish Sin Cos Tan Asin Acos Atan "
    "Sinh Cosh Asinh Acosh Atanh Floor Ceil Round Sign ThresholdedRelu Not IsNaN IsInf Shrink Swish"
).split()
_BROADCAST = (
    "Add Sub Mul Div Pow Max Min Sum Mean Where PRelu Equal Less LessOrEqual Greater GreaterOrEqual "
    "And Or Xor Mod BitShift BitwiseAnd BitwiseOr BitwiseXor"
).split()
_REDUCE = ("ReduceMean ReduceMax ReduceMin ReduceSum ReduceProd ReduceL1 ReduceL2 ReduceLogSum "
           "ReduceLogSumExp ReduceSumSquare ArgMax ArgMin").split()

RULES: dict[str, Any] = {
    **{op: _rule_unary for op in _UNARY},
    **{op: _rule_broadcast for op in _BROADCAST},
    **{op: _rule_reduce for op in _REDUCE},
    **{op: _rule_mixing_axis for op in ("Softmax", "LogSoftmax", "Hardmax", "LpNormalization", "CumSum",
                                         "LRN", "GroupNormalization")},
    **{op: _rule_pool for op in ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
                                 "GlobalMaxPool", "GlobalLpPool")},
    **{op: _rule_reshape for op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze")},
    "Conv": _rule_conv,
    "ConvTranspose": _rule_conv,
    "Gemm": _rule_gemm,
    "MatMul": _rule_matmul,
    "BatchNormalization": _rule_batchnorm,
    "InstanceNormalization": _rule_batchnorm,
    "LayerNormalization": _rule_layernorm,
    "RMSNormalization": _rule_layernorm,
    "Concat": _rule_concat,
    "Split": _rule_split,
    "Slice": _rule_slice,
    "Pad": _rule_pad,
    "Resize": _rule_resize,
    "Upsample": _rule_resize,
    "Transpose": _rule_transpose,
    "Gather": _rule_gather,
    "Expand": _rule_expand,
    "Tile": _rule_expand,
    "QuantizeLinear": _rule_qdq,
    "DequantizeLinear": _rule_qdq,
    "Shape": _rule_shape,
    "Size": _rule_shape,
}


# ---------------------------------------------------------------------------------------------
# Components → groups


def _shape_map(model: ir.Model, shapes) -> dict[str, tuple[int | None, ...]]:
    if shapes is None:
        from lowbit.analysis.stats import infer_shapes

        shapes = infer_shapes(model, batch=ANALYSIS_BATCH, dim=ANALYSIS_DIM)
    if isinstance(shapes, ir.Model):
        out = {}
        for value in ir.convenience.create_value_mapping(shapes.graph).values():
            dims = _static_dims(value.shape)
            if dims is not None:
                out[value.name] = dims
        return out
    return {name: _static_dims(s) for name, s in shapes.items() if s is not None}


def _run_of(indices: tuple[int, ...]) -> int | None:
    """The run number when ``indices`` are one contiguous aligned run, else None."""
    n = len(indices)
    if indices[0] % n or indices[-1] - indices[0] != n - 1:
        return None
    return indices[0] // n


def _divisions(units: list[dict[Key, tuple[int, ...]]], constraints, dims) -> tuple[int, list, str | None]:
    """(divisions, per-unit division key, problem) for the units of one group."""
    mine = [(key, g, label) for key, g, label in constraints if key in units[0]]
    if not mine:
        return 1, [()] * len(units), None
    keys = []
    for unit in units:
        keys.append(tuple(tuple(sorted({i // (dims[key].size // g) for i in unit[key]})) for key, g, _ in mine))
    counts = defaultdict(int)
    for k in keys:
        counts[k] += 1
    sizes = set(counts.values())
    names = ", ".join(sorted({f"'{label}'" for _, _, label in mine}))
    if len(sizes) != 1:
        return 1, keys, f"grouped convolution {names} divides the channels unevenly"
    for c, (key, g, label) in enumerate(mine):
        per = defaultdict(int)
        for k in counts:
            for d in k[c]:
                per[d] += 1
        if len(per) != g or len(set(per.values())) != 1:
            return 1, keys, f"grouped convolution '{label}' divides the channels unevenly"
    return len(counts), keys, None


def channel_groups(model: ir.Model, *, shapes=None) -> ChannelGraph:
    """Channel dependency groups of ``model``'s main graph (see the module docstring).

    ``shapes``: a shaped model (e.g. ``infer_shapes(model, dim=320)``) or a mapping value name →
    shape; by default ``infer_shapes(model, batch=2)``. The model is not modified.
    """
    builder = _Builder(model, _shape_map(model, shapes))
    builder.run()
    for tensor, axis, key, reason in builder.shape_reads:
        if (tensor, axis) in builder.dims:
            builder.block(key, reason)
    return _assemble(builder)


def _union_find(total: int, links, dims: dict[Key, _Dim]) -> np.ndarray:
    """Root id of every channel id (connected components of the coupling edges)."""
    parent = list(range(total))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b, ia, ib, _ in links:
        for u, v in zip((ia + dims[a].base).tolist(), (ib + dims[b].base).tolist()):
            ru, rv = find(u), find(v)
            if ru != rv:
                parent[max(ru, rv)] = min(ru, rv)
    return np.array([find(x) for x in range(total)], dtype=np.int64)


def _assemble(b: _Builder) -> ChannelGraph:
    dims = b.dims
    roots = _union_find(b.total, b.links, dims)
    keys = list(dims)
    units_of: dict[int, dict[Key, list[int]]] = {}
    for key in keys:  # dims in creation order, channels ascending: indices come out sorted
        d = dims[key]
        for i, root in enumerate(roots[d.base:d.base + d.size].tolist()):
            unit = units_of.get(root)
            if unit is None:
                unit = units_of[root] = {}
            got = unit.get(key)
            if got is None:
                unit[key] = [i]
            else:
                got.append(i)
    units_by_key: dict[tuple, list[tuple[int, dict[Key, tuple[int, ...]]]]] = defaultdict(list)
    reasons: dict[tuple, tuple] = {}
    for root, unit in units_of.items():
        frozen = {k: tuple(v) for k, v in unit.items()}
        gkey = tuple(sorted((k, len(v)) for k, v in frozen.items()))
        units_by_key[gkey].append((root, frozen))
        blocked = [b.blocked[k] for k in frozen if k in b.blocked]
        if blocked:
            worst = min(blocked)
            if gkey not in reasons or worst < reasons[gkey]:
                reasons[gkey] = worst
    raw = []
    for gkey, entries in units_by_key.items():
        first = gkey[0][0]
        units = [u for _, u in entries]
        divisions, div_keys, problem = _divisions(units, b.constraints, dims)
        order = sorted(range(len(units)), key=lambda u: (div_keys[u], units[u][first]))
        units = [units[u] for u in order]
        unit_roots = [entries[u][0] for u in order]
        reason = reasons[gkey][1] if gkey in reasons else problem
        if reason is None and len(units) < 2:
            reason = "a single channel (pruning keeps at least one)"
        members = []
        for key, n in gkey:
            d = dims[key]
            runs = [_run_of(u[key]) for u in units] if n > 1 else None
            if n == 1:
                members.append(Member(d.node, d.name, d.axis, tuple(u[key][0] for u in units), d.role, 1, d.fold))
            elif all(r is not None for r in runs):
                members.append(Member(d.node, d.name, d.axis, tuple(runs), d.role, n, d.fold))
            else:
                for k in range(n):
                    members.append(Member(d.node, d.name, d.axis, tuple(u[key][k] for u in units), d.role, 1, d.fold))
        members.sort(key=lambda m: (ROLES.index(m.role), b.order.get(m.node, len(b.order)), m.tensor, m.axis,
                                    m.indices[0]))
        where = min(b.order.get(m.node, len(b.order)) for m in members)
        group = Group(-1, len(units), members, reason is None, reason, divisions, units)
        raw.append((where, members[0].tensor, members[0].axis, members[0].indices[0], unit_roots, group))
    raw.sort(key=lambda t: t[:4])
    groups, group_of_root = [], {}
    for gid, (*_, unit_roots, group) in enumerate(raw):
        group.id = gid
        groups.append(group)
        for root in unit_roots:
            group_of_root[root] = gid
    # a grouped conv whose divisions spread over several groups: those groups must not be pruned alone
    for key, g, label in b.constraints:
        d = dims.get(key)
        if d is None:
            continue
        touching = {group_of_root[r] for r in roots[d.base:d.base + d.size].tolist()}
        if len(touching) > 1:
            for gid in sorted(touching):
                grp = groups[gid]
                if grp.prunable and grp.divisions < g:
                    grp.prunable = False
                    grp.reason = f"grouped convolution '{label}' spans several groups"
    return ChannelGraph(groups, dict(dims), {k: list(v) for k, v in b.readers.items()}, b.links, roots,
                        group_of_root)
