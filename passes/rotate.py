"""``rotate``: fold orthogonal rotations into weights (QuaRot / SliceGPT / GSR style) — exact.

Outliers make low-bit rounding fail; an orthogonal Q spreads them over all coordinates, and for a
linear map it is free when folded into the weights: x·W = (x·Q)(Qᵀ·W). Matrices come from
``lowbit.quant.rotations`` (``kind=hadamard|walsh|gsr|random``, seeded by the run's seed).

Fused mode (``mode=fused``), for pre-norm transformers
    The residual stream is the tree of Adds whose leaves are *writers*: linear layers with a
    constant weight (o_proj, down_proj; their bias Add included), embedding Gathers and row
    Slices of constant tables (token and position embeddings) and constants added to the stream;
    a scalar Mul may scale it. Its only readers are the *norms* — LayerNormalization,
    RMSNormalization, com.microsoft SimplifiedLayerNormalization, or the decomposed chains
    [ReduceMean → Sub →] Pow|Mul → ReduceMean → Add ε → Sqrt → Div | Reciprocal·Mul [→ Mul γ]
    [→ Add β] — and each norm's output is read only by linear layers with constant weights (Q, K,
    V, gate, up, head). Then, with d the stream width, C = I − 𝟙𝟙ᵀ/d, and x·Q the rotated stream:

    ========================  ======================  =========================================
    layer (weight layout)     role                    rewrite (W as [K, N]: y = x·W + b)
    ========================  ======================  =========================================
    MatMul W[K, N]            writer (N = d)          W ↦ W·C·Q,  b ↦ b·C·Q
    Gemm B[K, N] / B[N, K]ᵀ   writer                  as MatMul on Bᵀ when transB=1
    Gather / Slice table[V,d] writer (embedding)      T ↦ T·C·Q
    constant c[…, d] added    writer                  c ↦ c·C·Q
    MatMul / Gemm after norm  reader (K = d)          W ↦ Qᵀ·diag(γ)·W,  b ↦ b + β·W
    norm                      —                       replaced by x / √(mean(x²) + ε)
    ========================  ======================  =========================================

    The centering C (SliceGPT's identity) is applied only when some norm is a LayerNorm: with
    every writer centred the stream has zero mean, so LayerNorm(x) = RMSNorm(x), and RMSNorm
    commutes with any orthogonal Q: RMSNorm(x·Q) = RMSNorm(x)·Q. A stream with both LayerNorms
    and RMS norms is refused (centering would change the RMS norms). The norm's γ and β go into
    the readers (above), so the norm left behind has no parameters. The new norm is written in
    standard ops (Mul, ReduceMean, Add, Sqrt, Div).

Per attention head (``heads=true`` in any mode; ``mode=heads`` does only this), the V/O pair: with the head width h, R₂ an
    orthogonal [h, h] matrix and the attention output of head i, softmax(·)·V_i,
    W_v[:, head i] ↦ W_v[:, head i]·R₂ (and its bias), W_o[head i, :] ↦ R₂ᵀ·W_o[head i, :], exact
    for any norm placement. Found as MatMul(Softmax(…), V) whose V comes from a constant-weight
    projection through Reshape/Transpose (and Split/Slice of a fused QKV weight), and whose
    output reaches the o_proj through Transpose/Reshape.

Online mode (``mode=online``), for everything else (post-norm BERT-style models, SwiGLU's
    down_proj input — QuaRot's R₄ — which ``down=true`` adds in fused mode, a randomized Hadamard
    whatever the stream's kind unless ``down_kind=same``, as in QuaRot, SpinQuant and the GSR
    paper, which replace R₁ and keep R₄ a Hadamard): before a linear
    layer with a constant weight, x·W = (x·H)·(Hᵀ·W) with x·H computed at run time — a MatMul
    with the constant H (``online=matmul``; a 1×1 Conv with weight Hᵀ before a 1×1 Conv), or
    lowbit's ``Hadamard`` op (``online=op``, issue #7's runtime: x·H = Hadamard(x ∘ s) for
    H = diag(s)·Wᵀ/√g with W the g×g Walsh–Hadamard matrix — natural order for kind=hadamard
    of a power-of-two width, sequency order for kind=walsh, ``group`` for kind=gsr — a sign Mul
    and the O(k log g) transform; other widths (a Paley factor) stay MatMuls, with a warning;
    ``online=auto`` takes the op when the native library is built). Layers reading the same tensor
    share one online rotation. In online mode the default targets are every linear layer with a
    constant weight (MatMul, Gemm, 1×1 Conv with group 1); ``targets=[…]`` names nodes instead.
    The inserted nodes carry node metadata ``lowbit.role=rotation`` and are not quantized.

The report lists, for each rewritten weight, kurtosis and max/RMS before and after
(``lowbit.analysis.outliers``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from lowbit.analysis.outliers import before_after
from lowbit.core.errors import UserError, did_you_mean
from lowbit.passes.base import Pass, option
from lowbit.passes.edit import Names, const_array, new_const, set_const
from lowbit.quant import rotations
from lowbit.runtime import ops, reference

ROLE_KEY = "lowbit.role"
ROLE_ROTATION = "rotation"
_ONNX = ("", "ai.onnx")


@dataclasses.dataclass
class RotateOptions:
    kind: Literal["hadamard", "walsh", "gsr", "random"] = option("hadamard", "rotation matrix: randomized Hadamard, sequency-ordered Walsh, grouped sequency-arranged (block-diagonal Walsh), Haar-random")
    group: int = option(32, "block size of kind=gsr (a power of two; match the quantization block)")
    signs: bool = option(True, "random sign flips on the input side of hadamard/walsh/gsr matrices")
    mode: Literal["fused", "online", "heads"] = option("fused", "fused: rotate a pre-norm residual stream into the weights; online: rotate layer inputs at run time; heads: only each attention head's V/O pair")
    heads: bool = option(True, "also rotate each attention head's V/O pair (exact for any norm placement)")
    down: bool = option(True, "fused mode: also rotate the input of SwiGLU down projections online (QuaRot's R4)")
    down_kind: Literal["hadamard", "same"] = option("hadamard", "kind of the R4 rotation: a randomized Hadamard (QuaRot, SpinQuant and GSR all keep R4 a Hadamard; it builds widths such as 344 that walsh/gsr cannot), or the same kind as the stream's")
    online: Literal["auto", "op", "matmul"] = option("auto", "how online rotations run: lowbit's Hadamard op, a MatMul with the constant matrix, or auto (the op when the native runtime is available)")
    targets: list[str] = option([], "online mode: names of the linear nodes to rotate (empty: every linear layer with a constant weight)")

    def validate(self) -> None:
        if self.kind == "gsr" and (self.group < 2 or self.group & (self.group - 1)):
            raise UserError(f"option 'group' of pass rotate must be a power of two ≥ 2 for kind=gsr, not {self.group}")
        if self.online == "op" and self.kind == "random":
            raise UserError("option 'online' of pass rotate: online=op runs a fast Hadamard transform, which kind=random has not; use online=matmul")


def _use_hadamard_op(online: str) -> bool:
    """online=op: lowbit's Hadamard op (native, or the numpy reference through onnxruntime-extensions);
    auto: the op when the native library is built; matmul: never."""
    if online == "matmul":
        return False
    from lowbit.passes.lower import native_available

    if native_available():
        return True
    if online == "op" and not reference.available():
        raise UserError("option online=op of pass rotate needs lowbit's native op library or onnxruntime-extensions "
                        "(to run the Hadamard op on the numpy reference); use online=matmul")
    return online == "op"


class _NoStream(Exception):
    """Why fused mode cannot rotate this graph (one sentence naming the node)."""


class Rotate(Pass):
    """Fold orthogonal rotations (Hadamard, Walsh, GSR, random) into weights; online where needed (exact)."""

    name = "rotate"
    Options = RotateOptions
    preserves = "exact"
    tolerance = 1e-4

    def run(self, model: ir.Model, ctx) -> bool:
        opts = self.options
        graph = model.graph
        edit = _Editor(model, ctx, opts, use_op=_use_hadamard_op(opts.online))
        # Everything is found before anything is rewritten, so a refusal leaves the model as it was.
        # Heads go first: an online rotation of the o_proj input must see the head-rotated weight.
        from lowbit.analysis.stats import infer_shapes

        shapes = ir.convenience.create_value_mapping(infer_shapes(model).graph)
        if opts.mode == "fused":
            try:
                stream = _find_stream(graph, shapes)
            except _NoStream as why:
                raise UserError(
                    f"no rotatable residual stream in fused mode: {why}; use rotate(mode=online) "
                    f"for this model"
                ) from None
            online = _down_projections(graph, stream) if opts.down else []
        elif opts.mode == "online":
            online = _online_targets(graph, opts.targets)
        else:
            online = []
        heads = _find_heads(graph, shapes) if opts.heads or opts.mode == "heads" else []
        edit.heads(heads)
        if opts.mode == "fused":
            edit.fuse(stream)
        edit.online(online, "down_proj input" if opts.mode == "fused" else "online",
                    kind=opts.kind if opts.mode != "fused" or opts.down_kind == "same" else opts.down_kind)
        common.RemoveUnusedNodesPass()(model)
        ctx.note("layers", edit.report())
        ctx.note("rotations", edit.summary)
        return edit.changed


# --------------------------------------------------------------------------------------------
# Linear layers viewed as y = x·W + b with W as [K, N]


@dataclasses.dataclass
class _Linear:
    node: ir.Node
    op: str  # "matmul" | "gemm" | "conv"

    @property
    def label(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def x(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def shape_kn(self) -> tuple[int, int]:
        """(K, N) of the weight, without converting it."""
        k, n = _weight(self.node.inputs[1]).shape[:2]
        return (n, k) if self.op == "conv" or (self.op == "gemm" and _attr(self.node, "transB", 0)) else (k, n)

    def w_kn(self) -> np.ndarray:
        w = _weight(self.node.inputs[1]).astype(np.float64)
        if self.op == "conv":
            return w[:, :, 0, 0].T
        if self.op == "gemm" and _attr(self.node, "transB", 0):
            return w.T
        return w

    def set_w_kn(self, w: np.ndarray, names: Names) -> None:
        old = self.node.inputs[1]
        dtype = _weight(old).dtype
        if self.op == "conv":
            w = w.T[:, :, None, None]
        elif self.op == "gemm" and _attr(self.node, "transB", 0):
            w = w.T
        set_const(self.node.graph, self.node, 1, np.ascontiguousarray(w).astype(dtype), names, f"{old.name}.rot")

    @property
    def dtype(self) -> np.dtype:
        return _weight(self.node.inputs[1]).dtype

    def bias_site(self) -> tuple[ir.Node, int] | None:
        """(node, input index) of the constant bias, or None when the layer has none."""
        if self.op in ("gemm", "conv"):
            return (self.node, 2) if len(self.node.inputs) > 2 and self.node.inputs[2] is not None else None
        out = self.node.outputs[0]
        uses = out.uses()
        if len(uses) == 1 and not out.is_graph_output():
            add = uses[0][0]
            if add.op_type == "Add" and add.domain in _ONNX and len(add.inputs) == 2:
                other = add.inputs[1 - uses[0][1]]
                c = const_array(other)
                if c is not None and c.ndim >= 1 and c.shape[-1] == self.shape_kn[1] and c.size == c.shape[-1]:
                    return add, 1 - uses[0][1]
        return None

    def bias(self) -> np.ndarray | None:
        site = self.bias_site()
        if site is None:
            return None
        b = const_array(site[0].inputs[site[1]]).astype(np.float64)
        if self.op == "gemm":
            b = b * _attr(self.node, "beta", 1.0, float)
            if b.size == 1:
                b = np.full(self.shape_kn[1], float(b.ravel()[0]))
        return b.reshape(-1)

    def output(self) -> ir.Value:
        """The value carrying x·W + b (after the bias Add of a MatMul)."""
        site = self.bias_site()
        return site[0].outputs[0] if site is not None and site[0] is not self.node else self.node.outputs[0]

    def set_bias(self, b: np.ndarray, names: Names) -> None:
        dtype = self.dtype
        site = self.bias_site()
        if site is not None:
            node, index = site
            old = const_array(node.inputs[index])
            if self.op == "gemm":
                self.node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
            set_const(node.graph, node, index, b.reshape(old.shape if old.size == b.size else b.shape).astype(old.dtype),
                      names, f"{node.inputs[index].name}.rot")
            return
        base = f"{self.node.inputs[1].name}.bias"
        if self.op in ("gemm", "conv"):
            self.node.resize_inputs(3)
            self.node.replace_input_with(2, new_const(self.node.graph, names, base, b.astype(dtype)))
            return
        out = self.node.outputs[0]
        bias = new_const(self.node.graph, names, base, b.astype(dtype))
        add = ir.node("Add", [out, bias], name=names.fresh(f"{self.label}.bias_add"))
        self.node.graph.insert_after(self.node, add)
        new_out = add.outputs[0]
        new_out.type, new_out.shape = out.type, out.shape
        name, was_output = out.name, out.is_graph_output()
        new_out.name = names.fresh(f"{name}.biased")
        out.replace_all_uses_with(new_out, replace_graph_outputs=True)
        add.replace_input_with(0, out)
        if was_output:  # the graph output keeps its name
            out.name, new_out.name = names.fresh(f"{name}.unbiased"), name


def _attr(node: ir.Node, name: str, default, kind=int):
    a = node.attributes.get(name)
    if a is None:
        return default
    return kind(a.value)


def _linear(node: ir.Node | None) -> _Linear | None:
    """``node`` as a linear layer reading its input 0 through a constant 2-D weight, or None."""
    if node is None or node.domain not in _ONNX or len(node.inputs) < 2 or node.inputs[0] is None:
        return None
    w = _weight(node.inputs[1])
    if w is None or not np.issubdtype(w.dtype, np.floating) or const_array(node.inputs[0]) is not None:
        return None
    if node.op_type == "MatMul" and w.ndim == 2:
        return _Linear(node, "matmul")
    if node.op_type == "Gemm" and w.ndim == 2 and not _attr(node, "transA", 0):
        c = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros(1)
        return _Linear(node, "gemm") if c is not None and c.ndim <= 1 else None
    if (node.op_type == "Conv" and w.ndim == 4 and w.shape[2:] == (1, 1) and _attr(node, "group", 1) == 1
            and all(s == 1 for s in _ints(node, "strides")) and not any(_ints(node, "pads"))
            and all(d == 1 for d in _ints(node, "dilations"))):
        return _Linear(node, "conv")
    return None


def _weight(value: ir.Value | None) -> np.ndarray | None:
    """A constant weight, also when read through Transpose(perm=[1, 0]) of a constant matrix (a
    head tied to the embedding table: rewriting it gives the layer its own initializer)."""
    array = const_array(value)
    if array is not None or value is None:
        return array
    p = value.producer()
    if p is not None and p.op_type == "Transpose" and p.domain in _ONNX and _ints(p, "perm") in ((1, 0), ()):
        inner = const_array(p.inputs[0])
        if inner is not None and inner.ndim == 2:
            return inner.T
    return None


def _ints(node: ir.Node, name: str) -> tuple[int, ...]:
    a = node.attributes.get(name)
    return () if a is None else tuple(a.value)


# --------------------------------------------------------------------------------------------
# Norms


@dataclasses.dataclass
class _Norm:
    x: ir.Value
    y: ir.Value
    gamma: np.ndarray | None
    beta: np.ndarray | None
    eps: float
    kind: str  # "layer" | "rms"
    nodes: list[ir.Node]

    @property
    def label(self) -> str:
        return self.nodes[0].name or self.y.name


def _find_norms(graph: ir.Graph) -> list[_Norm]:
    norms, seen = [], set()
    for node in graph:
        if id(node) in seen:
            continue
        norm = _match_norm(node)
        if norm is not None:
            norms.append(norm)
            seen.update(id(n) for n in norm.nodes)
    return norms


def _match_norm(node: ir.Node) -> _Norm | None:
    op = (node.domain if node.domain not in _ONNX else "", node.op_type)
    if op in (("", "LayerNormalization"), ("", "RMSNormalization"), ("com.microsoft", "SimplifiedLayerNormalization")):
        if _attr(node, "axis", -1) != -1 and not (node.inputs[0].shape is not None and _attr(node, "axis", -1) == len(node.inputs[0].shape) - 1):
            return None
        if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
            return None
        gamma = const_array(node.inputs[1])
        beta = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if gamma is None or (len(node.inputs) > 2 and node.inputs[2] is not None and beta is None):
            return None
        kind = "layer" if op[1] == "LayerNormalization" else "rms"
        return _Norm(node.inputs[0], node.outputs[0], gamma.astype(np.float64).ravel(),
                     None if beta is None else beta.astype(np.float64).ravel(),
                     _attr(node, "epsilon", 1e-5, float), kind, [node])
    if op == ("", "ReduceMean"):
        return _match_decomposed(node)
    return None


def _single_user(value: ir.Value, op_types: tuple[str, ...]) -> ir.Node | None:
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    user = uses[0][0]
    return user if user.op_type in op_types and user.domain in _ONNX else None


def _is_last_axis_mean(node: ir.Node) -> bool:
    if node.op_type != "ReduceMean" or not _attr(node, "keepdims", 1):
        return False
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    axes = tuple(int(a) for a in np.ravel(axes)) if axes is not None else _ints(node, "axes")
    rank = None if node.inputs[0].shape is None else len(node.inputs[0].shape)
    return len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def _square_of(node: ir.Node | None) -> ir.Value | None:
    """v when ``node`` computes v² as Pow(v, 2) or Mul(v, v)."""
    if node is None or node.domain not in _ONNX:
        return None
    if node.op_type == "Pow":
        e = const_array(node.inputs[1])
        return node.inputs[0] if e is not None and e.size == 1 and float(e.ravel()[0]) == 2.0 else None
    if node.op_type == "Mul" and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    return None


def _scalar(value: ir.Value) -> float | None:
    c = const_array(value)
    return float(c.ravel()[0]) if c is not None and c.size == 1 else None


def _match_decomposed(mean2: ir.Node) -> _Norm | None:
    """[ReduceMean → Sub →] Pow|Mul → ReduceMean (this node) → Add ε → Sqrt → Div|Reciprocal+Mul → [Mul γ] → [Add β]."""
    if not _is_last_axis_mean(mean2):
        return None
    square = mean2.inputs[0].producer()
    v = _square_of(square)
    if v is None or _single_user(square.outputs[0], ("ReduceMean",)) is not mean2:
        return None
    nodes = [square, mean2]
    x, kind = v, "rms"
    sub = v.producer()
    if sub is not None and sub.op_type == "Sub" and sub.domain in _ONNX:
        mean1 = sub.inputs[1].producer()
        if mean1 is not None and _is_last_axis_mean(mean1) and mean1.inputs[0] is sub.inputs[0]:
            x, kind = sub.inputs[0], "layer"
            nodes = [mean1, sub, *nodes]
    add = _single_user(mean2.outputs[0], ("Add",))
    if add is None:
        return None
    eps = _scalar(add.inputs[1] if add.inputs[0] is mean2.outputs[0] else add.inputs[0])
    sqrt = _single_user(add.outputs[0], ("Sqrt",))
    if eps is None or sqrt is None:
        return None
    nodes += [add, sqrt]
    after = _single_user(sqrt.outputs[0], ("Div", "Reciprocal"))
    if after is None:
        return None
    if after.op_type == "Div":
        if after.inputs[0] is not v or after.inputs[1] is not sqrt.outputs[0]:
            return None
        y = after.outputs[0]
        nodes.append(after)
    else:
        mul = _single_user(after.outputs[0], ("Mul",))
        if mul is None or v not in mul.inputs:
            return None
        y = mul.outputs[0]
        nodes += [after, mul]
    # LayerNorm's centred v = x − mean(x) must feed only the square and the division.
    if kind == "layer" and (any(u not in nodes for u, _ in v.uses()) or v.is_graph_output()):
        return None
    gamma, y = _per_channel(y, "Mul", nodes)
    beta, y = _per_channel(y, "Add", nodes)
    return _Norm(x, y, gamma, beta, eps, kind, nodes)


def _per_channel(y: ir.Value, op: str, nodes: list[ir.Node]) -> tuple[np.ndarray | None, ir.Value]:
    """(γ or β, the value after it) when y's only user is ``op`` with a per-channel constant."""
    user = _single_user(y, (op,))
    if user is not None:
        c = const_array(user.inputs[1] if user.inputs[0] is y else user.inputs[0])
        if c is not None and c.ndim >= 1 and c.size == c.shape[-1]:
            nodes.append(user)
            return c.astype(np.float64).ravel(), user.outputs[0]
    return None, y


# --------------------------------------------------------------------------------------------
# The residual stream


@dataclasses.dataclass
class _Stream:
    norms: list[_Norm]
    readers: list[tuple[_Norm, _Linear]]
    writers: list[_Linear]
    tables: list[tuple[ir.Node, int]]  # (Gather/Slice node, table input index)
    constants: list[tuple[ir.Node, int]]  # (Add node, constant input index)
    width: int


_PASS_THROUGH = ("Shape",)


def _keeps_width(node: ir.Node, shapes: dict[str, ir.Value]) -> bool:
    """A Reshape whose input and output have the same static last axis: each row stays a row."""
    if node.op_type != "Reshape" or node.domain not in _ONNX:
        return False
    dims = [shapes.get(v.name) for v in (node.inputs[0], node.outputs[0])]
    if any(d is None or d.shape is None or len(d.shape) == 0 for d in dims):
        return False
    last = [d.shape[-1] for d in dims]
    return isinstance(last[0], int) and last[0] == last[1]


def _find_stream(graph: ir.Graph, shapes: dict[str, ir.Value]) -> _Stream:
    norms = _find_norms(graph)
    if not norms:
        raise _NoStream("no normalization (LayerNormalization, RMSNormalization, SimplifiedLayerNormalization or a decomposed ReduceMean/Pow/Sqrt chain) was found")
    by_input: dict[int, list[_Norm]] = {}
    for norm in norms:
        by_input.setdefault(id(norm.x), []).append(norm)
    norm_nodes = {id(n) for norm in norms for n in norm.nodes}
    stream_values: dict[int, ir.Value] = {}
    stream_nodes: set[int] = set()
    writers: dict[int, _Linear] = {}
    tables, constants = [], []
    work = [norm.x for norm in norms]
    while work:
        v = work.pop()
        if id(v) in stream_values:
            continue
        stream_values[id(v)] = v
        p = v.producer()
        if p is None:
            raise _NoStream(f"the stream value '{v.name}' read by a norm is a graph input, not built from embeddings and layers")
        if p.domain not in _ONNX:
            raise _NoStream(f"the stream value '{v.name}' is produced by {p.domain}::{p.op_type} node '{p.name}'")
        linear = _linear(p)
        if linear is not None:
            writers[id(p)] = linear
            continue
        if p.op_type == "Add" and len(p.inputs) == 2:
            stream_nodes.add(id(p))
            consts = [i for i, inp in enumerate(p.inputs) if const_array(inp) is not None]
            if len(consts) == 2:
                raise _NoStream(f"Add node '{p.name}' adds two constants")
            if consts:
                i = consts[0]
                src = p.inputs[1 - i].producer()
                lin = _linear(src)
                if lin is not None and lin.bias_site() == (p, i):
                    writers[id(src)] = lin
                    stream_values[id(p.inputs[1 - i])] = p.inputs[1 - i]
                    continue
                c = const_array(p.inputs[i])
                if c.ndim == 0 or c.shape[-1] == 1:
                    raise _NoStream(f"Add node '{p.name}' adds a constant that broadcasts along the stream's width")
                constants.append((p, i))
                work.append(p.inputs[1 - i])
            else:
                work.extend(p.inputs)
            continue
        if _keeps_width(p, shapes):
            stream_nodes.add(id(p))
            work.append(p.inputs[0])
            continue
        if p.op_type == "Mul" and len(p.inputs) == 2 and any(_scalar(inp) is not None for inp in p.inputs):
            stream_nodes.add(id(p))
            work.append(p.inputs[0] if _scalar(p.inputs[1]) is not None else p.inputs[1])
            continue
        if p.op_type == "Gather" and const_array(p.inputs[0]) is not None and _attr(p, "axis", 0) == 0 \
                and const_array(p.inputs[0]).ndim == 2:
            tables.append((p, 0))
            continue
        if p.op_type == "Slice" and const_array(p.inputs[0]) is not None and const_array(p.inputs[0]).ndim == 2:
            axes = const_array(p.inputs[3]) if len(p.inputs) > 3 and p.inputs[3] is not None else np.array([0])
            if axes is not None and all(int(a) in (0, -2) for a in np.ravel(axes)):
                tables.append((p, 0))
                continue
        if id(p) in norm_nodes or p.op_type in ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"):
            raise _NoStream(
                f"the stream value '{v.name}' comes out of the {p.op_type} node '{p.name}' "
                f"(a post-norm model: the residual passes through its norms)"
            )
        raise _NoStream(f"the stream value '{v.name}' is produced by {p.op_type} node '{p.name}', which is neither a residual Add nor a linear layer or embedding")
    # Every stream value may be read only by the stream itself, norms, and Shape.
    bias_adds = {id(site[0]) for site in (lin.bias_site() for lin in writers.values()) if site is not None}
    for v in stream_values.values():
        if v.is_graph_output():
            raise _NoStream(f"the stream value '{v.name}' is a graph output")
        for user, _ in v.uses():
            if id(user) in stream_nodes or id(user) in norm_nodes or user.op_type in _PASS_THROUGH:
                continue
            if id(user) in bias_adds:
                continue
            raise _NoStream(f"the stream value '{v.name}' is also read by {user.op_type} node '{user.name}'")
    stream_norms = [n for n in norms if id(n.x) in stream_values]
    readers = [(norm, lin) for norm in stream_norms for lin in _readers(norm.y, norm, shapes)]
    kinds = {n.kind for n in stream_norms}
    if len(kinds) > 1:
        raise _NoStream("the stream has both LayerNorms and RMS norms")
    widths = {lin.shape_kn[1] for lin in writers.values()} | {const_array(t.inputs[i]).shape[1] for t, i in tables}
    widths |= {lin.shape_kn[0] for _, lin in readers}
    if len(widths) != 1:
        raise _NoStream(f"the stream's layers disagree on its width ({sorted(widths)})")
    return _Stream(stream_norms, readers, list(writers.values()), tables, constants, widths.pop())


def _readers(value: ir.Value, norm: _Norm, shapes: dict[str, ir.Value]) -> list[_Linear]:
    """The linear layers reading a norm's output, through width-keeping Reshapes."""
    if value.is_graph_output():
        raise _NoStream(f"the output of norm '{norm.label}' is a graph output")
    found = []
    for user, index in value.uses():
        if user.op_type in _PASS_THROUGH:
            continue
        if index == 0 and _keeps_width(user, shapes):
            found += _readers(user.outputs[0], norm, shapes)
            continue
        lin = _linear(user)
        if lin is None or index != 0:
            raise _NoStream(f"the output of norm '{norm.label}' is read by {user.op_type} node '{user.name}', not by a linear layer with a constant weight")
        found.append(lin)
    return found


def _down_projections(graph: ir.Graph, stream: _Stream) -> list[_Linear]:
    """Stream writers whose input is a gated product (SwiGLU / GeGLU: Mul of two branches)."""
    out = []
    for lin in stream.writers:
        p = lin.x.producer()
        if p is not None and p.op_type == "Mul" and all(const_array(i) is None for i in p.inputs):
            out.append(lin)
    return out


def _online_targets(graph: ir.Graph, names: list[str]) -> list[_Linear]:
    if not names:
        return [lin for lin in map(_linear, graph) if lin is not None]
    by_name = {n.name: n for n in graph}
    out = []
    for name in names:
        node = by_name.get(name)
        if node is None:
            raise UserError(f"option targets names node '{name}', which the graph does not have{did_you_mean(name, by_name)}")
        lin = _linear(node)
        if lin is None:
            if node.op_type in ("MatMul", "Gemm", "Conv") and len(node.inputs) > 1 and const_array(node.inputs[1]) is None:
                raise UserError(f"node '{name}' ({node.op_type}) has a non-constant weight '{node.inputs[1].name}'; only layers with constant weights can be rotated")
            raise UserError(f"node '{name}' ({node.op_type}) is not a MatMul/Gemm/1×1 Conv with a constant weight")
        out.append(lin)
    return out


# --------------------------------------------------------------------------------------------
# Attention heads


@dataclasses.dataclass
class _Head:
    v: _Linear
    offset: int  # first column of V inside v's weight (fused QKV)
    o: _Linear
    heads: int
    width: int  # h, one head's width


def _find_heads(graph: ir.Graph, shapes: dict[str, ir.Value]) -> list[_Head]:
    candidates = []
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in _ONNX or len(node.inputs) != 2:
            continue
        p = node.inputs[0].producer()
        while p is not None and p.op_type in ("Cast", "Dropout"):
            p = p.inputs[0].producer()
        if p is None or p.op_type != "Softmax":
            continue
        candidates.append(node)
    found = []
    for mm in candidates:
        head = _trace_head(mm, shapes)
        if head is not None:
            found.append(head)
    return found


def _last_dim(shapes: dict[str, ir.Value], value: ir.Value) -> int | None:
    v = shapes.get(value.name)
    if v is None or v.shape is None or not len(v.shape) or not isinstance(v.shape[-1], int):
        return None
    return int(v.shape[-1])


def _single_use(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()


def _trace_head(mm: ir.Node, shapes) -> _Head | None:
    v4 = mm.inputs[1]
    shape = shapes.get(v4.name)
    if shape is None or shape.shape is None or len(shape.shape) != 4 or not isinstance(shape.shape[-1], int):
        return None
    width = int(shape.shape[-1])
    # Back from V through Reshape/Transpose to the projection (maybe a Split/Slice of fused QKV).
    value = v4
    while True:
        if not _single_use(value):
            return None
        p = value.producer()
        if p is None or p.op_type not in ("Reshape", "Transpose"):
            break
        value = p.inputs[0]
    offset, p = 0, value.producer()
    if p is not None and p.op_type == "Split":
        widths = [_last_dim(shapes, out) for out in p.outputs]
        rank = shapes.get(value.name).shape if shapes.get(value.name) is not None else None
        axis = _attr(p, "axis", 0)
        if None in widths or rank is None or axis not in (-1, len(rank) - 1):
            return None
        offset = int(sum(widths[:list(p.outputs).index(value)]))
        value = p.inputs[0]
        while _single_use(value) and value.producer() is not None and _keeps_width(value.producer(), shapes):
            value = value.producer().inputs[0]
        if not _single_use(value):
            return None
    proj = value.producer()
    if proj is not None and proj.op_type == "Add":
        src = next((i.producer() for i in proj.inputs if const_array(i) is None), None)
        lin = _linear(src)
        if lin is None or lin.bias_site() is None or lin.bias_site()[0] is not proj:
            return None
    else:
        lin = _linear(proj)
    if lin is None:
        return None
    total = lin.shape_kn[1]
    # Forward from the attention output through Transpose/Reshape to the o_proj.
    value = mm.outputs[0]
    while True:
        if not _single_use(value):
            return None
        user = value.uses()[0][0]
        if user.op_type not in ("Reshape", "Transpose"):
            break
        value = user.outputs[0]
    o = _linear(value.uses()[0][0]) if value.uses()[0][1] == 0 else None
    if o is None:
        return None
    rows = o.shape_kn[0]
    if rows % width or offset + rows > total:
        return None
    return _Head(lin, offset, o, rows // width, width)


# --------------------------------------------------------------------------------------------
# Rewriting


class _Editor:
    def __init__(self, model: ir.Model, ctx, opts: RotateOptions, use_op: bool = False):
        self.model, self.ctx, self.opts = model, ctx, opts
        self.use_op = use_op
        self.graph = model.graph
        self.names = Names(model.graph)
        self.before: dict[str, tuple[list[str], np.ndarray, _Linear]] = {}
        self.summary: dict[str, object] = {}
        self.changed = False
        self._online: dict[int, dict] = {}

    def matrix(self, n: int, label: str, where: str) -> np.ndarray:
        try:
            group = min(self.opts.group, n) if self.opts.kind == "gsr" else None
            return rotations.rotation(self.opts.kind, n, self.ctx.rng(f"rotate:{label}"), group=group, signs=self.opts.signs)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None

    def _remember(self, lin: _Linear, role: str) -> None:
        """Keep a layer's weight as it was before its first rewrite, and each role it plays."""
        roles, _, _ = self.before.setdefault(lin.label, ([], lin.w_kn(), lin))
        if role not in roles:
            roles.append(role)

    def report(self) -> list[dict]:
        return [
            {"node": label, "role": "+".join(roles), "shape": list(before.shape), **before_after(before, lin.w_kn())}
            for label, (roles, before, lin) in self.before.items()
        ]

    # fused mode ------------------------------------------------------------------------------
    def fuse(self, stream: _Stream) -> None:
        d = stream.width
        q = self.matrix(d, "stream", f"the residual stream (width {d})")
        center = stream.norms[0].kind == "layer"
        c = np.eye(d) - 1.0 / d if center else np.eye(d)
        cq = c @ q
        for lin in stream.writers:
            self._remember(lin, "writer")
            b = lin.bias()
            lin.set_w_kn(lin.w_kn() @ cq, self.names)
            if b is not None:
                lin.set_bias(b @ cq, self.names)
        for node, index in stream.tables:
            t = const_array(node.inputs[index])
            set_const(self.graph, node, index, (t.astype(np.float64) @ cq).astype(t.dtype), self.names, f"{node.inputs[index].name}.rot")
        for node, index in stream.constants:
            k = const_array(node.inputs[index])
            set_const(self.graph, node, index, (k.astype(np.float64) @ cq).astype(k.dtype), self.names, f"{node.inputs[index].name}.rot")
        order = {id(n): i for i, n in enumerate(self.graph)}
        for norm in stream.norms:
            new_y = self._rms(norm, order)
            for n2, lin in stream.readers:
                if n2 is not norm:
                    continue
                self._remember(lin, "reader")
                w = lin.w_kn()
                b = lin.bias()
                if norm.beta is not None:
                    lin.set_bias((b if b is not None else 0.0) + norm.beta @ w, self.names)
                gamma = norm.gamma if norm.gamma is not None else np.ones(d)
                lin.set_w_kn(q.T @ (gamma[:, None] * w), self.names)
            norm.y.replace_all_uses_with(new_y)
        self.summary.update({
            "stream_width": d, "norms": len(stream.norms), "norm_kind": stream.norms[0].kind,
            "centered": center, "writers": len(stream.writers), "readers": len(stream.readers),
            "tables": len(stream.tables), "stream_constants": len(stream.constants),
        })
        self.changed = True

    def _rms(self, norm: _Norm, order: dict[int, int]) -> ir.Value:
        """x / √(mean(x²) + ε) in standard ops, inserted before the old norm's first node."""
        x = norm.x
        dtype = np.float32 if x.dtype is None else x.dtype.numpy()
        base = norm.label
        opset = self.model.opset_imports.get("", 21)
        sq = ir.node("Mul", [x, x], name=self.names.fresh(f"{base}.rms_square"))
        if opset >= 18:
            axes = new_const(self.graph, self.names, f"{base}.rms_axes", np.array([-1], dtype=np.int64))
            mean = ir.node("ReduceMean", [sq.outputs[0], axes], attributes={"keepdims": 1}, name=self.names.fresh(f"{base}.rms_mean"))
        else:
            mean = ir.node("ReduceMean", [sq.outputs[0]], attributes={"axes": [-1], "keepdims": 1}, name=self.names.fresh(f"{base}.rms_mean"))
        eps = new_const(self.graph, self.names, f"{base}.rms_eps", np.array(norm.eps, dtype=dtype))
        add = ir.node("Add", [mean.outputs[0], eps], name=self.names.fresh(f"{base}.rms_add"))
        sqrt = ir.node("Sqrt", [add.outputs[0]], name=self.names.fresh(f"{base}.rms_sqrt"))
        div = ir.node("Div", [x, sqrt.outputs[0]], name=self.names.fresh(f"{base}.rms"))
        nodes = [sq, mean, add, sqrt, div]
        for node in nodes:
            node.outputs[0].name = self.names.fresh(node.name)
        div.outputs[0].type, div.outputs[0].shape = norm.y.type, norm.y.shape
        first = min(norm.nodes, key=lambda n: order.get(id(n), 0))
        self.graph.insert_before(first, nodes)
        return div.outputs[0]

    # online rotations -------------------------------------------------------------------------
    def online(self, targets: list[_Linear], role: str, kind: str) -> None:
        groups: dict[int, list[_Linear]] = {}
        for lin in targets:
            groups.setdefault(id(lin.x), []).append(lin)
        count = 0
        for members in groups.values():
            x = members[0].x
            k = members[0].shape_kn[0]
            h = self._online_matrix(k, kind, f"the input '{x.name}' of node '{members[0].label}' (width {k})")
            rotated = self._insert_online(x, k, members)
            for lin in members:
                self._remember(lin, role)
                lin.set_w_kn(h.T @ lin.w_kn(), self.names)
                lin.node.replace_input_with(0, rotated)
            count += 1
        if count:
            self.summary[f"online_{role.replace(' ', '_')}"] = count
            self.changed = True

    def _online_matrix(self, k: int, kind: str, where: str) -> np.ndarray:
        """One rotation per width, shared by every online site of that width (its constants are
        stored once): (s, A, B) with H = diag(s)·(A ⊗ B), see ``rotations.factored``."""
        if k not in self._online:
            try:
                group = min(self.opts.group, k) if kind == "gsr" else None
                s, a, b = rotations.factored(kind, k, self.ctx.rng(f"rotate:online:{k}"), group=group,
                                             signs=self.opts.signs)
            except UserError as exc:
                raise UserError(f"{where}: {exc}") from None
            unsigned = b if a is None and b.shape[0] == k else np.kron(np.eye(k // b.shape[0]) if a is None else a, b)
            self._online[k] = {"s": s, "a": a, "b": b, "h": unsigned if s is None else s[:, None] * unsigned}
        return self._online[k]["h"]

    def _hadamard_form(self, k: int) -> tuple[np.ndarray | None, int, str] | None:
        """(signs, group, order) with x·H = lowbit.Hadamard(x ∘ signs), or None (not a power-of-two
        Walsh–Hadamard block: a Kronecker factor A, or a random matrix); warns once per width."""
        spec = self._online[k]
        b = spec["b"]
        factors = reference.hadamard_factors(b) if spec["a"] is None and k % b.shape[0] == 0 else None
        if factors is None:
            if not spec.get("warned"):
                spec["warned"] = True
                self.ctx.warn(f"online rotation of width {k} is not a power-of-two Hadamard/Walsh block; it runs as a MatMul")
            return None
        inner, order = factors
        signs = np.tile(inner, k // b.shape[0]) * (1.0 if spec["s"] is None else spec["s"])
        return (None if np.all(signs > 0) else signs), b.shape[0], order

    def _shared(self, k: int, key: str, array: np.ndarray, dtype) -> ir.Value:
        cache = self._online[k].setdefault("values", {})
        if key not in cache:
            cache[key] = new_const(self.graph, self.names, f"rotation{k}.{key}", np.ascontiguousarray(array).astype(dtype))
        return cache[key]

    def _insert_online(self, x: ir.Value, k: int, members: list[_Linear]) -> ir.Value:
        """x·H as standard ops: Mul by the signs, then one MatMul by B (dense or block-diagonal
        through a Reshape to [-1, k/b, b]) and, for a Kronecker factor A, Transpose·MatMul·Transpose."""
        dtype = members[0].dtype
        base = x.name or members[0].label
        spec = self._online[k]
        nodes: list[ir.Node] = []

        def add(op, inputs, **attributes):
            node = ir.node(op, inputs, attributes=attributes or None, name=self.names.fresh(f"{base}.rotate_{op.lower()}"))
            node.metadata_props[ROLE_KEY] = ROLE_ROTATION
            node.outputs[0].name = self.names.fresh(f"{node.name}.out")
            nodes.append(node)
            return node.outputs[0]

        op_form = self._hadamard_form(k) if self.use_op and members[0].op != "conv" and dtype == np.float32 else None
        if members[0].op == "conv":
            out = add("Conv", [x, self._shared(k, "conv", spec["h"].T[:, :, None, None], dtype)])
        elif op_form is not None:
            signs, group, order = op_form
            cur = x if signs is None else add("Mul", [x, self._shared(k, "hadamard_signs", signs, dtype)])
            attributes = {"size": k, **({"group": group} if group != k else {}), **({"order": order} if order != "natural" else {})}
            node = ir.node("Hadamard", [cur], attributes=attributes, domain=ops.DOMAIN, name=self.names.fresh(f"{base}.rotate_hadamard"))
            node.metadata_props[ROLE_KEY] = ROLE_ROTATION
            node.outputs[0].name = self.names.fresh(f"{node.name}.out")
            nodes.append(node)
            self.model.opset_imports.setdefault(ops.DOMAIN, ops.VERSION)
            out = node.outputs[0]
        else:
            cur = x if spec["s"] is None else add("Mul", [x, self._shared(k, "signs", spec["s"], dtype)])
            b, a = spec["b"], spec["a"]
            if a is None and b.shape[0] == k:
                out = add("MatMul", [cur, self._shared(k, "matrix", b, dtype)])
            else:
                g = b.shape[0]
                shape = self._shared(k, "shape", np.array([-1, k // g, g], dtype=np.int64), np.int64)
                cur = add("MatMul", [add("Reshape", [cur, shape]), self._shared(k, "inner", b, dtype)])
                if a is not None:
                    cur = add("Transpose", [cur], perm=[0, 2, 1])
                    cur = add("Transpose", [add("MatMul", [cur, self._shared(k, "outer", a, dtype)])], perm=[0, 2, 1])
                out = add("Reshape", [cur, add("Shape", [x])])
        out.name = self.names.fresh(f"{base}.rotated")
        out.type, out.shape = x.type, x.shape
        order = {id(n): i for i, n in enumerate(self.graph)}
        first = min((m.node for m in members), key=lambda n: order[id(n)])
        self.graph.insert_before(first, nodes)
        return out

    # attention heads --------------------------------------------------------------------------
    def heads(self, heads: list[_Head]) -> None:
        for i, head in enumerate(heads):
            r = self.matrix(head.width, f"heads:{head.o.label}", f"the attention heads before '{head.o.label}' (head width {head.width})")
            blocks = np.kron(np.eye(head.heads), r)  # block-diagonal, one R₂ per head
            self._remember(head.v, "v")
            self._remember(head.o, "o")
            cols = slice(head.offset, head.offset + head.heads * head.width)
            w = head.v.w_kn()
            w[:, cols] = w[:, cols] @ blocks
            b = head.v.bias()
            head.v.set_w_kn(w, self.names)
            if b is not None:
                b = b.copy()
                b[cols] = b[cols] @ blocks
                head.v.set_bias(b, self.names)
            head.o.set_w_kn(blocks.T @ head.o.w_kn(), self.names)
        if heads:
            self.summary["attention_heads"] = {"layers": len(heads), "heads": heads[0].heads, "width": heads[0].width}
            self.changed = True
