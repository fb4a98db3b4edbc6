"""``lower``: turn quantized layers into the fastest operators this machine runs — lossy.

What ``quantize`` (and ``rotate``) leave behind is read back as a packed low-bit weight, the
canonical matrix W[N, K] of ``lowbit.quant.sites`` (N output rows, K reduction columns, Conv's
K in im2col order c·kh·kw + ky·kw + kx), and rewritten as one operator:

==========================================  ==========================================================
found                                       read as (``lowbit.runtime.ops``)
==========================================  ==========================================================
DequantizeLinear(q, s[, z]) blocked         uniform: Ŵ = (u − zp)·s, u = q (unsigned) or q + 2^(b−1)
  (int4/uint4 opset 21, int2/uint2 25)        (signed, zp = z + 2^(b−1)); b = 2 when every code and
                                              zero point fits 2 bits (int4 holding 2-bit codes), else 4
DequantizeLinear per channel / per tensor   the same, re-blocked: a row's (or the tensor's) scale and
                                              zero point copied to every block of the row — exact
Cast→Add→Add→Gather codebook chain          codebook: Ŵ = levels[n, b, idx]·1, the level table
                                              [N, groups, L] padded to 2^b levels (b = 2 or 4); one
                                              group per row is re-blocked with one table per row
                                              (levels [N, 1, 2^b]) and scales 1
… → Mul(·, Gather(scales, row + col))       a row codebook (quantize's tables=row): levels [N, 1,
                                              2^b], the gathered block scales as ``scales``
com.microsoft.MatMulNBits (2/4 bits)        the same packed bytes (identical layout), zero points
                                              unpacked to one byte per block
online rotation (``lowbit.role=rotation``)  x·B with B = diag(s)·Hᵀ/√g (H of order g, a power of
  [Mul s] → MatMul B | Reshape·MatMul·Reshape  two, natural or sequency rows) = Hadamard(x ∘ s):
                                              Mul by the signs, then ``lowbit.Hadamard`` (group g)
==========================================  ==========================================================

and the weight feeds MatMul (weight on the right) / Gemm (transA = 0; alpha, beta and C kept
through MatMulNBits' bias or an epilogue, as ``quant.emit``) / 2-D Conv (``auto_pad`` resolved to
explicit pads). Candidates per layer: keep it as it is; stock ``com.microsoft.MatMulNBits``
(MatMul/Gemm, uniform; ``accuracy_level`` 4 for int8 accuracy, 0 for float); ``lowbit.MatMulLowBit``;
``lowbit.ConvLowBit``; ``lowbit.Hadamard``. 8-bit weights stay as they are (onnxruntime runs them
well), as do weights that are not float32.

``select=rule`` (the documented rule):
  MatMul/Gemm 4-bit uniform → MatMulNBits; 2-bit uniform → MatMulLowBit (stock MatMulNBits 2-bit
  when lowbit's ops are not used); codebook → MatMulLowBit; a MatMulNBits node of 2 bits →
  MatMulLowBit (4 bits: kept); Conv with ≤ 4-bit weights → ConvLowBit; power-of-two online
  rotations → Hadamard; anything lowbit's ops would take is kept when they are not used.
``select=measure``: per distinct layer (op, shapes, bits, block, format) each candidate runs as a
  one-layer model in onnxruntime (``lowbit.runtime.session``, ``threads`` threads, symbolic
  dimensions as ``analysis.stats.infer_shapes`` fixes them: batch 1, sequence 16), the candidates
  interleaved, ``repeats`` rounds, the best time per run kept; the fastest wins ("keep" on ties
  within 3 %). ``select=auto`` measures when the native library is built, else follows the rule.

``accuracy``: ``float`` (y = Σ a·Ŵ in float32: equal to the QDQ model to float rounding) or ``int8``
(activations quantized per block of K on the fly, ops.py: adds about 0.5 % relative error per
layer); ``auto`` = int8, except depthwise convs: float (``layer_accuracy``). ``use=auto`` emits
lowbit's ops only when the native library is built (``lowbit.runtime.library``), else only stock
MatMulNBits, and notes the layers it left;
``use=lowbit`` emits them anyway (they then run on the numpy reference through
onnxruntime-extensions: slow, exact — for tests and portability); ``use=stock`` never.

Report notes: ``layers`` (per layer: node, what was found, bits, block, [N, K], the choice, for
``measure`` the time per run of each candidate in ms, and ``fused``: the ops a ConvLowBit took in),
``left`` (node, reason), ``implementation``.

ConvLowBit takes in what onnxruntime fuses into a float Conv: a zero ``Pad`` before it (into its
pads), a residual ``Add`` after it (the Conv's only reader; the other operand, a run-time tensor of
the Conv output's own static shape — no broadcasting — becomes input Z: Y = (conv + bias) + Z, the
same float32 additions; the node takes the Add's place and output name) and a ``Relu``/``Clip``
after that (clip_min/clip_max). ``select=measure`` times the Conv alone (its output is the
one-layer model's output, so nothing is fused there).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from lowbit.core.errors import UserError
from lowbit.passes.base import Pass, option
from lowbit.passes.edit import Names, attribute, const_array, new_const
from lowbit.runtime import ops
from lowbit.runtime import reference as ref

ROLE_KEY = "lowbit.role"
ROLE_ROTATION = "rotation"
_ONNX = ("", "ai.onnx")
CANDIDATES = ("keep", "MatMulNBits", "MatMulLowBit", "ConvLowBit", "Hadamard")
OP_FILTERS = ("MatMul", "Gemm", "Conv", "MatMulNBits", "rotation")

_CODE_TYPES = {
    ir.DataType.INT4: (4, True), ir.DataType.UINT4: (4, False),
    ir.DataType.INT2: (2, True), ir.DataType.UINT2: (2, False),
    ir.DataType.INT8: (8, True), ir.DataType.UINT8: (8, False),
}


@dataclasses.dataclass
class LowerOptions:
    select: Literal["auto", "rule", "measure"] = option("auto", "how each layer's operator is chosen: rule (documented rule), measure (time each candidate on this machine), auto (measure when the native library is built, else rule)")
    accuracy: Literal["auto", "float", "int8"] = option("auto", "dot-product arithmetic of the emitted ops: float (exact), int8 (activations quantized per block, faster), auto (int8; float for depthwise convs)")
    use: Literal["auto", "lowbit", "stock"] = option("auto", "auto: lowbit's ops only when the native library is built; lowbit: also on the slow numpy reference; stock: onnxruntime's own ops only")
    threads: int = option(1, "select=measure: onnxruntime intra-op threads while timing")
    repeats: int = option(5, "select=measure: interleaved timing rounds per candidate")
    reblock: int = option(32, "block size (16…256) given to per-channel and per-tensor weights, whose scale is copied to every block")
    ops: list[str] = option([], "lower only these kinds: MatMul, Gemm, Conv, MatMulNBits, rotation (default: all)")
    nodes: str = option("", "lower only nodes whose name matches this regular expression")

    def validate(self) -> None:
        if self.threads < 1:
            raise UserError(f"option 'threads' of pass lower must be at least 1, not {self.threads}")
        if self.repeats < 1:
            raise UserError(f"option 'repeats' of pass lower must be at least 1, not {self.repeats}")
        if self.reblock not in ops.BLOCK_SIZES:
            raise UserError(f"option 'reblock' of pass lower must be one of {', '.join(map(str, ops.BLOCK_SIZES))}, not {self.reblock}")
        for kind in self.ops:
            if kind not in OP_FILTERS:
                raise UserError(f"option 'ops' of pass lower names '{kind}', which is not one of {', '.join(OP_FILTERS)}")
        try:
            re.compile(self.nodes)
        except re.error as exc:
            raise UserError(f"option 'nodes' of pass lower is not a regular expression: {exc}") from None


# --------------------------------------------------------------------------------------------
# What was found


@dataclasses.dataclass
class Packed:
    """A canonical low-bit weight in lowbit's packed form (ops.py)."""

    codes: np.ndarray  # [N, K] unsigned uint8
    scales: np.ndarray  # [N, blocks] float32
    zero_points: np.ndarray | None  # [N, blocks] uint8, None = 2^(bits−1)
    levels: np.ndarray | None  # [N, blocks or 1, 2^bits] float32 (codebook)
    bits: int
    block: int
    source: str  # "qdq block" | "qdq channel" | "qdq tensor" | "codebook" | "MatMulNBits"
    packed: np.ndarray | None = None  # W when already packed (MatMulNBits)

    @property
    def format(self) -> str:
        return "codebook" if self.levels is not None else "uniform"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def W(self) -> np.ndarray:
        if self.packed is not None:
            return self.packed
        pad = (1 << (self.bits - 1)) if self.zero_points is None else 0
        return ref.pack(self.codes, self.bits, self.block, pad_code=pad)

    def decoded(self) -> np.ndarray:
        n, k = self.shape
        return ref.decode(self.W(), self.scales, self.zero_points, self.levels, K=k, N=n, bits=self.bits,
                          block_size=self.block, format=self.format)


@dataclasses.dataclass
class Layer:
    node: ir.Node
    kind: str  # "MatMul" | "Gemm" | "Conv" | "MatMulNBits" | "rotation"
    weight: Packed | None = None
    # rotations: the rotated input, the value to replace, signs, group, order, width
    x: ir.Value | None = None
    out: ir.Value | None = None
    signs: np.ndarray | None = None
    group: int = 0
    order: str = "natural"
    size: int = 0

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    def signature(self, x_shape) -> tuple:
        w = self.weight
        attrs = tuple(sorted((k, str(a.value)) for k, a in self.node.attributes.items()))
        if w is None:
            return (self.kind, self.size, self.group, self.order, self.signs is not None, tuple(x_shape or ()))
        return (self.kind, w.source, w.shape, w.bits, w.block, w.format, w.zero_points is not None, attrs, tuple(x_shape or ()))


def _pow2(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def _fit_bits(u: np.ndarray, zp: np.ndarray, signed: bool, container: int) -> tuple[int, np.ndarray, np.ndarray] | None:
    """(bits, unsigned codes, zero points) with bits ∈ {2, 4}: 2 when everything fits in 2 bits."""
    for bits in (2, 4):
        if bits > container and container in (2, 4):
            break
        shift = (1 << (bits - 1)) if signed else 0
        codes, zero = u.astype(np.int16) + shift, zp.astype(np.int16) + shift
        if codes.min(initial=0) >= 0 and codes.max(initial=0) < 1 << bits and zero.min(initial=0) >= 0 and zero.max(initial=0) < 1 << bits:
            return bits, codes.astype(np.uint8), zero.astype(np.uint8)
    return None


def _reblock(k: int, block: int) -> int:
    """The block given to a per-channel/per-tensor weight: ``block``, or the smallest allowed
    block holding all of K when K is shorter."""
    fits = [b for b in ops.BLOCK_SIZES if b >= k]
    return min(block, fits[0]) if fits else block


def _from_dq(dq: ir.Node, k_axis: int | None, reblock: int) -> tuple[Packed | None, str | None]:
    """A DequantizeLinear whose output is the stored weight: [N, K] (k_axis 1), [K, N] (k_axis 0) or
    an OIHW kernel (k_axis None: K = the trailing axes)."""
    q, s = const_array(dq.inputs[0]), const_array(dq.inputs[1])
    z = const_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    if q is None:
        return None, None  # a dequantized activation, not a weight
    if s is None or (len(dq.inputs) > 2 and dq.inputs[2] is not None and z is None):
        return None, "its DequantizeLinear scale or zero point is not a constant"
    container, signed = _CODE_TYPES.get(dq.inputs[0].dtype, (None, None))
    if container is None:
        return None, f"codes of type {dq.inputs[0].dtype} are not 2/4/8-bit integers"
    if container == 8:
        return None, "8-bit weights stay as they are"
    if s.dtype != np.float32:
        return None, f"scales are {s.dtype}, lowbit's ops take float32"
    axis = attribute(dq, "axis", 1)
    block = attribute(dq, "block_size", 0) or 0
    q = q.astype(np.int16)
    if k_axis is None:  # kernel: [N, ...] → [N, K]
        if block:
            return None, "a blocked DequantizeLinear on a kernel that is not in canonical [N, K] form"
        codes = q.reshape(q.shape[0], -1)
        n_axis = 0
    else:
        if q.ndim != 2:
            return None, "its weight is not a matrix"
        codes = q if k_axis == 1 else q.T
        n_axis = 1 - k_axis
        axis = axis % 2
    n, k = codes.shape
    zero = np.zeros_like(s, dtype=np.int16) if z is None else z.astype(np.int16)
    if block:
        if axis != (k_axis if k_axis is not None else 1):
            return None, "blocks of its DequantizeLinear are not along the reduction axis"
        if block not in ops.BLOCK_SIZES:
            return None, f"block size {block} is not one of {', '.join(map(str, ops.BLOCK_SIZES))}"
        scales = s if k_axis == 1 else s.T
        zps = zero if k_axis == 1 else zero.T
        source = "qdq block"
    elif s.size == 1:
        block = _reblock(k, reblock)
        shape = (n, ops.blocks(k, block))
        scales, zps, source = np.full(shape, s.reshape(-1)[0], np.float32), np.full(shape, zero.reshape(-1)[0], np.int16), "qdq tensor"
    elif s.ndim == 1 and (axis % q.ndim) == n_axis and s.size == n:
        block = _reblock(k, reblock)
        blocks = ops.blocks(k, block)
        scales, zps, source = np.repeat(s[:, None], blocks, 1), np.repeat(zero.reshape(-1)[:, None], blocks, 1), "qdq channel"
    else:
        return None, "its DequantizeLinear is neither blocked along K, per output channel, nor per tensor"
    fitted = _fit_bits(codes, zps, signed, container)
    if fitted is None:
        return None, "its codes do not fit 2 or 4 bits"
    bits, u, zp = fitted
    default = np.all(zp == 1 << (bits - 1))
    return Packed(u, np.ascontiguousarray(scales, np.float32), None if default else zp, None, bits, block, source), None


def _codebook_node(node: ir.Node | None) -> bool:
    """The last node of a codebook chain: its Gather, or the Mul by a row codebook's block scales."""
    if node is None or node.domain not in _ONNX:
        return False
    if node.op_type == "Mul":
        node = node.inputs[0].producer()
    return node is not None and node.op_type == "Gather"


def _row_scales(mul: ir.Node, rows: int, k: int) -> tuple[np.ndarray | None, int | None]:
    """Mul(·, Gather(scales_flat, Add(scale_row, scale_col))) → (scales [R, B], block), or Nones."""
    gather = mul.inputs[1].producer()
    if gather is None or gather.op_type != "Gather":
        return None, None
    flat, add = const_array(gather.inputs[0]), gather.inputs[1].producer()
    if flat is None or add is None or add.op_type != "Add" or flat.dtype != np.float32 or flat.size % rows:
        return None, None
    row, col = const_array(add.inputs[0]), const_array(add.inputs[1])
    n_blocks = flat.size // rows
    if row is None or col is None or not np.array_equal(row.reshape(-1), np.arange(rows) * n_blocks):
        return None, None
    col = col.reshape(-1)
    block = int(np.count_nonzero(col == 0))
    if n_blocks == 1 and block == k:  # one block shorter than any block size: the smallest that holds it
        block = next((b for b in ops.BLOCK_SIZES if b >= k), block)
    if col.size != k or block not in ops.BLOCK_SIZES or not np.array_equal(col, np.arange(k) // block):
        return None, None
    return flat.reshape(rows, n_blocks), block


def _from_codebook(last: ir.Node, reblock: int) -> tuple[Packed | None, str | None]:
    """Gather(levels_flat, Add(Add(Cast(idx), row_base), col_base)) [→ Mul by gathered block
    scales] → canonical [R, K] codebook."""
    gather = last.inputs[0].producer() if last.op_type == "Mul" else last
    table = const_array(gather.inputs[0])
    add_col = gather.inputs[1].producer()
    if table is None or add_col is None or add_col.op_type != "Add":
        return None, None
    add_row = add_col.inputs[0].producer()
    col_base = const_array(add_col.inputs[1])
    if add_row is None or add_row.op_type != "Add" or col_base is None:
        return None, None
    cast = add_row.inputs[0].producer()
    row_base = const_array(add_row.inputs[1])
    if cast is None or cast.op_type != "Cast" or row_base is None:
        return None, None
    idx = const_array(cast.inputs[0])
    if idx is None or idx.ndim != 2 or table.dtype != np.float32:
        return None, "the codebook is not a float32 constant table"
    rows, k = idx.shape
    per_row = table.size // rows
    col = col_base.reshape(-1).astype(np.int64)
    if table.size % rows or not np.array_equal(row_base.reshape(-1), np.arange(rows) * per_row) or col.size != k:
        return None, "the codebook chain is not the one quantize emits"
    steps = np.unique(col[col > 0])
    n_levels = int(steps[0]) if steps.size else per_row
    groups = col // n_levels
    n_groups = per_row // n_levels
    levels = table.reshape(rows, n_groups, n_levels)
    scales = None
    if last.op_type == "Mul":
        scales, block = _row_scales(last, rows, k)
        if scales is None or n_groups != 1:
            return None, "its block scales are not the chain quantize(tables=row) emits"
    elif n_groups == 1:  # one table per row, used by every block
        block = _reblock(k, reblock)
    else:
        block = int(np.count_nonzero(groups == 0))
        if block not in ops.BLOCK_SIZES or not np.array_equal(groups, np.arange(k) // block):
            return None, "its codebook groups are not blocks of 16, 32, 64, 128 or 256 columns"
    bits = 2 if n_levels <= 4 else 4 if n_levels <= 16 else None
    if bits is None:
        return None, f"a codebook of {n_levels} levels needs more than 4 bits"
    if n_levels < 1 << bits:
        levels = np.concatenate([levels, np.zeros((*levels.shape[:2], (1 << bits) - n_levels), levels.dtype)], axis=2)
    u = idx.astype(np.uint8)
    if u.max(initial=0) >= n_levels:
        return None, "codebook indices exceed the level table"
    if scales is None:
        scales = np.ones((rows, ops.blocks(k, block)), np.float32)
    return Packed(u, np.ascontiguousarray(scales, np.float32), None, np.ascontiguousarray(levels, np.float32), bits,
                  block, "codebook"), None


def _weight(value: ir.Value, layout: str, reblock: int) -> tuple[Packed | None, str | None]:
    """The packed canonical weight behind a MatMul/Gemm/Conv weight input. ``layout``: "kn" (stored
    [K, N]), "nk" (stored [N, K]) or "kernel" (OIHW)."""
    p = value.producer()
    if p is None:
        return None, None  # a float (or 8-bit-free) weight: nothing to lower
    if layout == "kernel" and p.op_type == "Reshape" and p.domain in _ONNX:
        inner = p.inputs[0].producer()
        if inner is not None and inner.op_type == "DequantizeLinear":
            return _from_dq(inner, 1, reblock)
        if _codebook_node(inner):
            return _from_codebook(inner, reblock)
        return None, None
    if p.op_type == "DequantizeLinear" and p.domain in _ONNX:
        return _from_dq(p, {"kn": 0, "nk": 1, "kernel": None}[layout], reblock)
    if layout == "kn" and p.op_type == "Transpose" and list(attribute(p, "perm", [1, 0])) == [1, 0]:
        inner = p.inputs[0].producer()
        if _codebook_node(inner):
            return _from_codebook(inner, reblock)
    if layout == "nk" and _codebook_node(p):
        return _from_codebook(p, reblock)
    return None, None


def _kernel_shape(node: ir.Node) -> list[int] | None:
    """The OIHW shape of a Conv's weight: its value's shape, else the Reshape target or codes it comes from."""
    w = node.inputs[1]
    if w.shape is not None and all(isinstance(d, int) for d in w.shape):
        return [int(d) for d in w.shape]
    p = w.producer()
    if p is not None and p.op_type == "Reshape":
        target = const_array(p.inputs[1])
        return None if target is None else [int(d) for d in target]
    if p is not None and p.op_type == "DequantizeLinear":
        codes = const_array(p.inputs[0])
        return None if codes is None else list(codes.shape)
    return None


def _from_matmulnbits(node: ir.Node) -> tuple[Packed | None, str | None]:
    bits, block = attribute(node, "bits", 4), attribute(node, "block_size", 0)
    n, k = attribute(node, "N", 0), attribute(node, "K", 0)
    if bits not in ops.BITS:
        return None, f"{bits}-bit MatMulNBits stays as it is"
    if block not in ops.BLOCK_SIZES:
        return None, f"block size {block} is not one of {', '.join(map(str, ops.BLOCK_SIZES))}"
    b, s = const_array(node.inputs[1]), const_array(node.inputs[2])
    z = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    if b is None or s is None or (len(node.inputs) > 3 and node.inputs[3] is not None and z is None):
        return None, "its inputs are not constants"
    if len(node.inputs) > 4 and node.inputs[4] is not None:
        return None, "g_idx is not supported"
    if s.dtype != np.float32 or (z is not None and z.dtype != np.uint8):
        return None, "scales are not float32 (or zero points not packed uint8)"
    blocks = ops.blocks(k, block)
    if b.size != n * blocks * block * bits // 8 or s.size != n * blocks:
        return None, "its packed weight does not match K and N"
    packed = b.reshape(ops.packed_shape(n, k, bits, block))
    zp = None
    if z is not None:
        from lowbit.quant.emit import unpack_bits

        zp = unpack_bits(z.reshape(n, -1), bits)[:, :blocks]  # packed per row like the codes
        if np.all(zp == 1 << (bits - 1)):
            zp = None
    codes = ref.unpack(packed, k, bits, block)
    return Packed(codes, s.reshape(n, blocks).astype(np.float32), zp, None, bits, block, "MatMulNBits", packed=packed), None


def _rotation(mm: ir.Node) -> Layer | None:
    """An online rotation ``rotate`` inserted, as x ∘ s then Hadamard — or None."""
    b = const_array(mm.inputs[1])
    if b is None or b.ndim != 2 or b.shape[0] != b.shape[1] or not _pow2(b.shape[0]):
        return None
    factors = ref.hadamard_factors(b)
    if factors is None:
        return None
    inner_signs, order = factors
    g = b.shape[0]
    cur, out = mm.inputs[0], mm.outputs[0]
    p = cur.producer()
    if p is not None and p.op_type == "Reshape" and p.metadata_props.get(ROLE_KEY) == ROLE_ROTATION:
        shape = const_array(p.inputs[1])
        uses = out.uses()
        if shape is None or shape.size != 3 or shape[2] != g or len(uses) != 1:
            return None
        after = uses[0][0]
        if after.op_type != "Reshape" or after.metadata_props.get(ROLE_KEY) != ROLE_ROTATION:
            return None  # e.g. a Kronecker factor (Transpose·MatMul·Transpose) follows
        size = int(shape[1]) * g
        cur, out = p.inputs[0], after.outputs[0]
    else:
        size = g
    signs = np.tile(inner_signs, size // g)
    p = cur.producer()
    if p is not None and p.op_type == "Mul" and p.metadata_props.get(ROLE_KEY) == ROLE_ROTATION:
        s = const_array(p.inputs[1])
        if s is None or s.shape != (size,):
            return None
        signs = signs * np.sign(s)
        cur = p.inputs[0]
    if cur.dtype not in (None, ir.DataType.FLOAT):
        return None
    return Layer(mm, "rotation", x=cur, out=out, signs=None if np.all(signs > 0) else signs.astype(np.float32),
                 group=g, order=order, size=size)


def find_layers(graph: ir.Graph, reblock: int) -> tuple[list[Layer], list[dict]]:
    """Every lowerable layer of the main graph (topological order), and why others were left."""
    layers, left = [], []
    for node in graph:
        kind = None
        if node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
            packed, why = _from_matmulnbits(node)
            kind = "MatMulNBits"
        elif node.domain in _ONNX and node.op_type == "MatMul" and node.metadata_props.get(ROLE_KEY) == ROLE_ROTATION:
            layer = _rotation(node)
            if layer is not None:
                layers.append(layer)
            else:
                left.append({"node": node.name, "reason": "online rotation that is not a power-of-two Hadamard/Walsh"})
            continue
        elif node.domain in _ONNX and node.op_type in ("MatMul", "Gemm", "Conv") and len(node.inputs) > 1 and node.inputs[1] is not None:
            kind = node.op_type
            if kind == "Gemm" and attribute(node, "transA", 0):
                packed, why = None, None
            elif kind == "Conv":
                packed, why = _weight(node.inputs[1], "kernel", reblock)
                if packed is not None and len(_kernel_shape(node) or ()) != 4:
                    packed, why = None, "only 2-D convolutions are lowered"
            else:
                layout = "nk" if kind == "Gemm" and attribute(node, "transB", 0) else "kn"
                packed, why = _weight(node.inputs[1], layout, reblock)
        else:
            continue
        if packed is not None and node.inputs[0].dtype not in (None, ir.DataType.FLOAT):
            packed, why = None, f"its activation is {node.inputs[0].dtype}, lowbit's ops take float32"
        if packed is not None:
            layers.append(Layer(node, kind, weight=packed))
        elif why:
            left.append({"node": node.name, "reason": why})
    return layers, left


# --------------------------------------------------------------------------------------------
# Rewriting


def candidates(layer: Layer, lowbit_ops: bool) -> list[str]:
    """The operators ``layer`` may become (first: keep)."""
    out = ["keep"]
    w = layer.weight
    if layer.kind in ("MatMul", "Gemm") and w.format == "uniform":
        out.append("MatMulNBits")
    if not lowbit_ops:
        return out
    if layer.kind in ("MatMul", "Gemm", "MatMulNBits"):
        out.append("MatMulLowBit")
    elif layer.kind == "Conv":
        out.append("ConvLowBit")
    elif layer.kind == "rotation":
        out.append("Hadamard")
    return out


def rule(layer: Layer, lowbit_ops: bool) -> str:
    """The documented rule (module docstring)."""
    allowed = candidates(layer, lowbit_ops)
    w = layer.weight
    if layer.kind in ("MatMul", "Gemm"):
        if w.format == "uniform" and w.bits == 4:
            return "MatMulNBits"
        if "MatMulLowBit" in allowed:
            return "MatMulLowBit"
        return "MatMulNBits" if w.format == "uniform" else "keep"
    if layer.kind == "MatMulNBits":
        return "MatMulLowBit" if w.bits == 2 and "MatMulLowBit" in allowed else "keep"
    for op in ("ConvLowBit", "Hadamard"):
        if op in allowed:
            return op
    return "keep"


def _weight_inputs(graph: ir.Graph, names: Names, base: str, w: Packed) -> list[ir.Value | None]:
    inputs = [new_const(graph, names, f"{base}.lowbit{w.bits}", w.W()),
              new_const(graph, names, f"{base}.lowbit{w.bits}.scales", w.scales),
              None if w.zero_points is None else new_const(graph, names, f"{base}.lowbit{w.bits}.zero_points", w.zero_points),
              None if w.levels is None else new_const(graph, names, f"{base}.lowbit{w.bits}.levels", w.levels)]
    return inputs


def _weight_attributes(w: Packed, accuracy: str) -> dict:
    n, k = w.shape
    attrs = {"K": k, "N": n, "bits": w.bits, "block_size": w.block}
    if w.format != "uniform":
        attrs["format"] = w.format
    if accuracy != "float":
        attrs["accuracy"] = accuracy
    return attrs


def _base(layer: Layer) -> str:
    value = layer.node.inputs[1] if layer.kind != "rotation" else layer.out
    return (value.name if value is not None and value.name else layer.name)


def apply(model: ir.Model, layer: Layer, choice: str, accuracy: str, names: Names,
          shapes: dict | None = None) -> list[str] | None:
    """Rewrite ``layer`` as ``choice`` (one of ``CANDIDATES``); dead nodes are left for the caller.
    A ConvLowBit returns the op types it took in besides the Conv (Pad, Add, Relu/Clip), in order."""
    from lowbit.quant import emit

    graph = model.graph
    node, w = layer.node, layer.weight
    if choice == "keep":
        return
    if choice == "MatMulNBits":
        from lowbit.quant.sites import WeightSite

        nk = layer.kind == "Gemm" and attribute(node, "transB", 0)
        site = WeightSite(node, 1, layer.kind, tuple(w.shape if nk else w.shape[::-1]), 0, 1 if nk else 0, 0 if nk else 1)
        if w.zero_points is None:  # signed codes: emit adds 2^(bits−1) back and writes no zero points
            codes, zp = w.codes.astype(np.int16) - (1 << (w.bits - 1)), None
        else:
            codes, zp = w.codes, w.zero_points
        emit.emit_matmulnbits(site, graph, codes, w.scales, zp, bits=w.bits, block=w.block,
                              accuracy_level=4 if accuracy == "int8" else 0)
        return
    model.opset_imports.setdefault(ops.DOMAIN, ops.VERSION)
    if choice == "MatMulLowBit":
        n = w.shape[0]
        inputs = [node.inputs[0], *_weight_inputs(graph, names, _base(layer), w)]
        if layer.kind == "MatMulNBits":
            bias = node.inputs[5] if len(node.inputs) > 5 else None
            epilogue_from = None
        else:
            bias = emit._gemm_bias(node, n)
            epilogue_from = node if layer.kind == "Gemm" else None
        inputs.append(bias)
        while inputs and inputs[-1] is None:
            inputs.pop()
        new = ir.node("MatMulLowBit", inputs, domain=ops.DOMAIN, name=node.name, attributes=_weight_attributes(w, accuracy))
        nodes = [new]
        if epilogue_from is not None:
            nodes += emit._gemm_epilogue(graph, node, new.outputs[0], ir.DataType.FLOAT, bias is not None)
        emit._replace_node(graph, node, nodes)
        return
    if choice == "ConvLowBit":
        attrs = _weight_attributes(w, accuracy)
        kernel = _kernel_shape(node)[2:]
        strides = list(attribute(node, "strides", [1, 1]))
        dilations = list(attribute(node, "dilations", [1, 1]))
        pads = _pads(node, kernel, strides, dilations, shapes)
        x = node.inputs[0]
        absorbed = _zero_pad(x)
        if absorbed is not None:  # onnxruntime fuses Pad into a float Conv; ConvLowBit takes it the same way
            x, extra = absorbed
            pads = [p + e for p, e in zip(pads, extra)]
        attrs.update(kernel_shape=[int(v) for v in kernel], strides=strides, pads=pads, dilations=dilations,
                     group=int(attribute(node, "group", 1)))
        inputs = [x, *_weight_inputs(graph, names, _base(layer), w),
                  node.inputs[2] if len(node.inputs) > 2 else None]
        fused = ["Pad"] if absorbed is not None else []
        residual = _residual_after(node.outputs[0])
        if residual is not None:  # onnxruntime fuses a residual Add into a float Conv (FusedConv's Z); ConvLowBit too
            inputs.append(residual[1])  # Z, after absent optionals left as None (ONNX: "" in their places)
            fused.append("Add")
        while inputs and inputs[-1] is None:
            inputs.pop()
        act = _clamp_after(node.outputs[0] if residual is None else residual[0].outputs[0])
        if act is not None:  # onnxruntime fuses Relu/Clip into a float Conv; ConvLowBit clamps as it stores
            attrs.update(clip_min=act[1], clip_max=act[2])
            fused.append(act[0].op_type)
        new = ir.node("ConvLowBit", inputs, domain=ops.DOMAIN, name=node.name, attributes=attrs)
        if residual is None:
            emit._replace_node(graph, node, [new])
        else:  # where the Add was, since Z may be computed after the Conv; the Add's output keeps its name
            emit._replace_node(graph, residual[0], [new])
            graph.remove(node, safe=True)  # its one reader, the Add, is gone; its weight chain is left dead
        if act is not None:
            from onnx_ir.convenience import replace_nodes_and_values

            replace_nodes_and_values(graph, act[0], [act[0]], [], act[0].outputs, new.outputs)
        return fused
    if choice == "Hadamard":
        layer = _rotation(layer.node) or layer  # its input may be the output of a layer lowered since
        x = layer.x
        anchor = _first_rotation_node(layer)
        nodes = []
        if layer.signs is not None:
            mul = ir.node("Mul", [x, new_const(graph, names, f"rotation{layer.size}.hadamard_signs", layer.signs)],
                          name=names.fresh(f"{layer.name}.signs"))
            mul.outputs[0].name = names.fresh(f"{layer.name}.signed")
            nodes.append(mul)
            x = mul.outputs[0]
        attrs = {"size": layer.size}
        if layer.group != layer.size:
            attrs["group"] = layer.group
        if layer.order != "natural":
            attrs["order"] = layer.order
        had = ir.node("Hadamard", [x], domain=ops.DOMAIN, name=names.fresh(f"{layer.name}.hadamard"), attributes=attrs)
        had.outputs[0].name = names.fresh(f"{layer.name}.hadamard")
        had.outputs[0].type, had.outputs[0].shape = layer.out.type, layer.out.shape
        nodes.append(had)
        for n_ in nodes:
            n_.metadata_props[ROLE_KEY] = ROLE_ROTATION
        graph.insert_before(anchor, nodes)
        layer.out.replace_all_uses_with(had.outputs[0], replace_graph_outputs=True)
        return
    raise ValueError(f"unknown candidate {choice!r}")


def _first_rotation_node(layer: Layer) -> ir.Node:
    """The first node of the rotation chain (the new nodes go before it)."""
    consumers = [u for u, _ in layer.x.uses() if u.metadata_props.get(ROLE_KEY) == ROLE_ROTATION]
    order = {id(n): i for i, n in enumerate(layer.node.graph)}
    return min(consumers or [layer.node], key=lambda n: order.get(id(n), 0))


def _pads(node: ir.Node, kernel, strides, dilations, shapes: dict | None) -> list[int]:
    auto_pad = attribute(node, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        from lowbit.quant.sites import _conv_pads

        value = (shapes or {}).get(node.inputs[0].name)
        spatial = list(value.shape)[2:] if value is not None and value.shape is not None else []
        if len(spatial) != 2 or not all(isinstance(d, int) for d in spatial):
            raise UserError(f"Conv node '{node.name}' has auto_pad={auto_pad} and an input whose height and width "
                            "are not known; give the input's size (--input-shape) to lower it")
        return _conv_pads(node, tuple(spatial), tuple(kernel), strides, dilations)
    if auto_pad == "VALID":
        return [0, 0, 0, 0]
    return [int(v) for v in attribute(node, "pads", [0, 0, 0, 0])]


def _same_static_shape(a: ir.Value, b: ir.Value) -> bool:
    """Both shapes known and equal dimension by dimension: the same integer, or the same named
    symbolic dimension (ONNX: one name, one size) — so that no broadcasting can be involved."""
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    for d, e in zip(a.shape, b.shape):
        if isinstance(d, int) or isinstance(e, int):
            if not (isinstance(d, int) and isinstance(e, int) and d == e):
                return False
        elif d.value is None or d.value != e.value:
            return False
    return True


def _residual_after(y: ir.Value) -> tuple[ir.Node, ir.Value] | None:
    """(Add, Z) when the Conv output ``y`` feeds only an ai.onnx Add whose other operand Z is a
    run-time tensor of y's own static shape, so that the Add can be fused into ConvLowBit as its
    input Z (Y = (conv + bias) + Z: the same float32 additions); else None."""
    users = y.uses()
    if len(users) != 1 or y.is_graph_output():
        return None
    add, index = users[0]
    if add.domain not in _ONNX or add.op_type != "Add" or len(add.inputs) != 2:
        return None
    z = add.inputs[1 - index]
    if z is None or z is y or const_array(z) is not None or z.dtype not in (None, ir.DataType.FLOAT):
        return None
    return (add, z) if _same_static_shape(y, z) else None


def _clamp_after(y: ir.Value) -> tuple[ir.Node, float, float] | None:
    """(node, low, high) when ``y`` (a Conv's output, or that of the residual Add fused into it)
    feeds only a Relu or a Clip with constant bounds (ReLU6), so the clamp can be fused into
    ConvLowBit; else None."""
    users = y.uses()
    if len(users) != 1 or y.is_graph_output():
        return None
    act = users[0][0]
    if act.domain not in _ONNX:
        return None
    if act.op_type == "Relu":
        return act, 0.0, float("inf")
    if act.op_type != "Clip":
        return None
    if len(act.inputs) == 1 and ("min" in act.attributes or "max" in act.attributes):  # opset < 11
        return act, float(attribute(act, "min", -np.inf)), float(attribute(act, "max", np.inf))
    bounds = []
    for i, default in ((1, -np.inf), (2, np.inf)):
        value = act.inputs[i] if len(act.inputs) > i else None
        array = None if value is None else const_array(value)
        if value is not None and (array is None or array.size != 1):
            return None  # a run-time bound
        bounds.append(default if array is None else float(array.reshape(-1)[0]))
    return (act, *bounds) if bounds[0] <= bounds[1] else None


def _zero_pad(x: ir.Value) -> tuple[ir.Value, list[int]] | None:
    """(Pad's input, [top, left, bottom, right]) when ``x`` is a 4-D constant-mode Pad by zeros of
    the two spatial axes only — which a Conv's own pads do the same as — else None. The Pad stays
    for any other reader (and is removed when the Conv was its only one)."""
    pad = x.producer()
    if pad is None or pad.op_type != "Pad" or pad.domain not in _ONNX or attribute(pad, "mode", "constant") != "constant":
        return None
    if len(pad.inputs) > 1:
        amounts = const_array(pad.inputs[1])
        value = const_array(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2] is not None else np.zeros(1)
        if amounts is None or value is None or (len(pad.inputs) > 3 and pad.inputs[3] is not None):
            return None  # run-time amounts or value, or an axes input
    else:  # opset < 11: attributes
        amounts, value = np.asarray(attribute(pad, "pads", [])), np.asarray(attribute(pad, "value", 0.0))
    amounts = np.asarray(amounts).reshape(-1)
    if amounts.size != 8 or np.any(amounts < 0) or np.any(amounts[[0, 1, 4, 5]] != 0) or np.any(np.asarray(value) != 0):
        return None
    return pad.inputs[0], [int(amounts[2]), int(amounts[3]), int(amounts[6]), int(amounts[7])]


# --------------------------------------------------------------------------------------------
# Measuring


def _closure(layer: Layer) -> tuple[list[ir.Node], ir.Value]:
    """The nodes of one layer (its weight chain and the layer, or the rotation chain), in graph
    order, and its activation input."""
    x = layer.x if layer.kind == "rotation" else layer.node.inputs[0]
    last = layer.out.producer() if layer.kind == "rotation" else layer.node
    nodes, stack, seen = [], [last], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        nodes.append(n)
        stack += [v.producer() for v in n.inputs if v is not None and v is not x and v.producer() is not None]
    order = {id(n): i for i, n in enumerate(layer.node.graph)}
    return sorted(nodes, key=lambda n: order[id(n)]), x


def _mini_model(model: ir.Model, layer: Layer, x_shape: list[int]) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """The layer alone as a model (input ``x`` of ``x_shape``), sharing the weight tensors."""
    nodes, x = _closure(layer)
    new_x = ir.Value(name="x", shape=ir.Shape(x_shape), type=ir.TensorType(ir.DataType.FLOAT))
    mapping: dict[int, ir.Value] = {id(x): new_x}
    initializers = []
    copies = []
    for n in nodes:
        inputs = []
        for v in n.inputs:
            if v is None:
                inputs.append(None)
            elif id(v) in mapping:
                inputs.append(mapping[id(v)])
            else:
                c = ir.Value(name=v.name, shape=v.shape, type=v.type, const_value=v.const_value)
                mapping[id(v)] = c
                initializers.append(c)
                inputs.append(c)
        copy = ir.node(n.op_type, inputs, attributes=dict(n.attributes), domain=n.domain, name=n.name,
                       num_outputs=len(n.outputs), metadata_props=dict(n.metadata_props))
        for old, new in zip(n.outputs, copy.outputs):
            new.name, new.type, new.shape = old.name, old.type, old.shape
            mapping[id(old)] = new
        copies.append(copy)
    out = mapping[id(layer.out if layer.kind == "rotation" else layer.node.outputs[0])]
    graph = ir.Graph([new_x], [out], nodes=copies, initializers=initializers,
                     opset_imports=dict(model.opset_imports), name="layer")
    feed = {"x": np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)}
    return ir.Model(graph, ir_version=model.ir_version), feed


def _measure(model: ir.Model, layer: Layer, choices: list[str], x_shape, accuracy: str, o) -> dict[str, float]:
    """Best time per run (ms) of each candidate on a one-layer model, the candidates interleaved."""
    from lowbit.runtime.session import session

    sessions = {}
    feed = None
    for choice in choices:
        mini, feed = _mini_model(model, layer, x_shape)
        layers, _ = find_layers(mini.graph, o.reblock)
        if len(layers) != 1:
            raise RuntimeError(f"the one-layer model of '{layer.name}' holds {len(layers)} lowerable layers")
        apply(mini, layers[0], choice, accuracy, Names(mini.graph))
        common.RemoveUnusedNodesPass()(mini)
        sessions[choice] = session(mini, threads=o.threads, spinning=False)
    best = {c: float("inf") for c in choices}
    for sess in sessions.values():
        sess.run(None, feed)  # warm up (prepacking, allocations)
    for _ in range(o.repeats):
        for choice, sess in sessions.items():
            runs, start = 0, time.perf_counter()
            while True:
                sess.run(None, feed)
                runs += 1
                elapsed = time.perf_counter() - start
                if elapsed > 0.01 or runs >= 50:
                    break
            best[choice] = min(best[choice], 1000 * elapsed / runs)
    return best


# --------------------------------------------------------------------------------------------
# The pass


def native_available() -> bool:
    """The native library is built (a LOWBIT_OPS_LIBRARY naming no file counts as absent here;
    opening a session says what is wrong with it)."""
    from lowbit.runtime import library

    try:
        return library.available()
    except UserError:
        return False


def layer_accuracy(layer: Layer, accuracy: str) -> str:
    """``accuracy=auto``: int8, except depthwise convs, which get float — int8 quantizes every
    output pixel's kh·kw window on its own, which costs more than the few multiply-adds it
    replaces (4-bit depthwise 3×3 measured 2× slower in int8, at par with float Conv in float)."""
    if accuracy != "auto":
        return accuracy
    if layer.kind == "Conv" and layer.weight is not None and attribute(layer.node, "group", 1) == layer.weight.shape[0] > 1:
        return "float"
    return "int8"


class Lower(Pass):
    """Lower quantized layers to MatMulNBits / lowbit's MatMulLowBit, ConvLowBit, Hadamard (lossy)."""

    name = "lower"
    Options = LowerOptions
    preserves = "lossy"

    def run(self, model: ir.Model, ctx) -> bool:
        o = self.options
        native = native_available()
        if o.use == "lowbit" and not native and not ref.available():
            raise UserError("option use=lowbit needs lowbit's native op library or onnxruntime-extensions (for the "
                            "numpy reference ops); neither is installed")
        lowbit_ops = o.use == "lowbit" or (o.use == "auto" and native)
        select = o.select if o.select != "auto" else ("measure" if native else "rule")
        ctx.note("implementation", "native" if native and lowbit_ops else "reference" if lowbit_ops else "stock")
        ctx.note("select", select)

        layers, left = find_layers(model.graph, o.reblock)
        pattern = re.compile(o.nodes) if o.nodes else None
        chosen = []
        for layer in layers:
            if o.ops and layer.kind not in o.ops:
                continue
            if pattern is not None and not pattern.search(layer.name):
                continue
            chosen.append(layer)
        shapes = self._shapes(model, chosen, select)
        for layer in chosen:  # refuse what cannot be lowered before anything is rewritten
            if layer.kind == "Conv":
                _pads(layer.node, _kernel_shape(layer.node)[2:], [1, 1], [1, 1], shapes)
        cache: dict[tuple, tuple[str, dict]] = {}
        rows, changed = [], False
        names = Names(model.graph)
        for layer in chosen:
            allowed = candidates(layer, lowbit_ops)
            accuracy = layer_accuracy(layer, o.accuracy)
            times = None
            if select == "measure":
                x_shape = self._x_shape(layer, shapes)
                if x_shape is None:
                    choice = rule(layer, lowbit_ops)
                    times = "input shape unknown: rule used"
                else:
                    key = layer.signature(x_shape)
                    if key not in cache:
                        measured = _measure(model, layer, allowed, x_shape, accuracy, o)
                        fastest = min(measured, key=measured.get)
                        if measured[fastest] >= 0.97 * measured["keep"]:
                            fastest = "keep"
                        cache[key] = (fastest, measured)
                    choice, measured = cache[key]
                    times = {c: round(t, 4) for c, t in measured.items()}
            else:
                choice = rule(layer, lowbit_ops)
            row = self._row(layer, choice, accuracy)
            if times is not None:
                row["times_ms"] = times
            if choice == "keep":
                lowbit_only = [c for c in candidates(layer, True) if c not in allowed]
                reason = ("lowbit's ops are not used (no native library; use=lowbit runs them on the numpy reference)"
                          if lowbit_only and not lowbit_ops and rule(layer, True) != "keep" else
                          "measured fastest as it is" if select == "measure" else "the rule keeps it")
                left.append({"node": layer.name, "reason": reason})
            else:
                fused = apply(model, layer, choice, accuracy, names, shapes)
                if fused:
                    row["fused"] = fused
                changed = True
            rows.append(row)
        if changed:
            common.RemoveUnusedNodesPass()(model)
        ctx.note("layers", rows)
        ctx.note("left", left)
        ctx.note("lowered", sum(r["choice"] != "keep" for r in rows))
        if not rows:
            ctx.warn("the model has no quantized layer to lower; it is unchanged")
        return changed

    @staticmethod
    def _row(layer: Layer, choice: str, accuracy: str) -> dict:
        row = {"node": layer.name, "op": layer.kind, "choice": choice}
        if layer.weight is not None:
            w = layer.weight
            row.update(found=w.source, bits=w.bits, block=w.block, format=w.format, shape=list(w.shape))
        else:
            row.update(found="online rotation", size=layer.size, group=layer.group, order=layer.order)
        if choice in ("MatMulLowBit", "ConvLowBit", "MatMulNBits"):
            row["accuracy"] = accuracy
        return row

    @staticmethod
    def _shapes(model: ir.Model, layers: list[Layer], select: str) -> dict | None:
        need = select == "measure" or any(layer.kind == "Conv" and attribute(layer.node, "auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER")
                                          for layer in layers)
        if not need or not layers:
            return None
        from lowbit.analysis.stats import infer_shapes

        return ir.convenience.create_value_mapping(infer_shapes(model, batch=1).graph)

    @staticmethod
    def _x_shape(layer: Layer, shapes: dict | None) -> list[int] | None:
        x = layer.x if layer.kind == "rotation" else layer.node.inputs[0]
        value = (shapes or {}).get(x.name)
        if value is None or value.shape is None or not all(isinstance(d, int) for d in value.shape):
            return None
        return [int(d) for d in value.shape]
