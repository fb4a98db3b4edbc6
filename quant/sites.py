"""Where a graph holds quantizable weights, and how each weight maps to the canonical matrix.

Every quantizable weight is viewed as a canonical matrix W[R, K] — R output rows, K reduction
columns — plus a *group map* giving each column its scale group (per-channel: one group; blocked:
blocks of ``block`` consecutive reduction elements). The numerics in ``lowbit.quant`` work on that
view; ``to_canonical`` / ``from_canonical`` map the tensor and its scales back and forth, and the
layout of the emitted ``DequantizeLinear`` (axis, block_size) follows from the same table:

==================  ==================  ==============================  ======================
op (weight)         stored layout        canonical W[R, K]               DQ block axis / channel axis
==================  ==================  ==============================  ======================
MatMul(X, B)        B[K, N]              Bᵀ: rows n, cols k              block axis 0 / axis 1
MatMul(A, X)        A[M, K]              A: rows m, cols k               block axis 1 / axis 0
Gemm transB=0       B[K, N]              Bᵀ                              block axis 0 / axis 1
Gemm transB=1       B[N, K]              B                               block axis 1 / axis 0
Conv                W[O, I/g, kh, kw]    rows o, cols (i, ky, kx)        block axis 1 / axis 0
ConvTranspose g=1   W[I, O, kh, kw]      rows o, cols (i, ky, kx)        block axis 0 / axis 1
Gather(T, ids)      T[V, D]              T: rows v, cols d               block axis 1 / axis 0
==================  ==================  ==============================  ======================

For Conv the reduction runs over input channels *and* kernel positions (im2col order
i·kh·kw + ky·kw + kx). ONNX blocks along a single axis, so a blocked Conv weight is stored in
its canonical 2-D form [O, I·kh·kw], dequantized with blocks along axis 1, and reshaped (and for
ConvTranspose transposed) back to the kernel layout; per-channel and per-tensor Conv weights keep
the kernel layout, so int8 per-channel weights still fuse into QLinearConv. For every op the
group of canonical column k is k // block. A last block shorter than ``block`` (K not a multiple
of it) is allowed: ONNX blocked quantization gives that axis ceil(K / block) scales, so nothing
is padded in the QDQ format (MatMulNBits pads K itself).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")


@dataclasses.dataclass
class WeightSite:
    """One constant weight input of one node."""

    node: ir.Node
    input_index: int
    op: str
    #: original weight tensor shape
    shape: tuple[int, ...]
    #: index of the activation input whose rows multiply the weight (None for Gather)
    activation_index: int | None
    #: DequantizeLinear axes in the stored layout
    block_axis: int
    channel_axis: int

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def value(self) -> ir.Value:
        return self.node.inputs[self.input_index]

    def array(self) -> np.ndarray:
        return self.value.const_value.numpy()

    @property
    def conv_groups(self) -> int:
        return int(self.node.attributes["group"].value) if "group" in self.node.attributes else 1

    # ---- canonical view -------------------------------------------------------------------

    def to_canonical(self, w: np.ndarray) -> np.ndarray:
        if self.op == "Conv":
            return w.reshape(w.shape[0], -1)
        if self.op == "ConvTranspose":
            return w.transpose(1, 0, 2, 3).reshape(w.shape[1], -1) if w.ndim == 4 else w.swapaxes(0, 1).reshape(w.shape[1], -1)
        if self.block_axis == 0:  # B[K, N]
            return w.T
        return w

    def from_canonical(self, c: np.ndarray) -> np.ndarray:
        """Inverse of ``to_canonical`` for any array with the canonical [R, K] shape."""
        if self.op == "Conv":
            return c.reshape(self.shape)
        if self.op == "ConvTranspose":
            i, o = self.shape[0], self.shape[1]
            return c.reshape((o, i, *self.shape[2:])).swapaxes(0, 1)
        if self.block_axis == 0:
            return c.T
        return c

    @property
    def rows(self) -> int:
        return self.shape[1] if self.op == "ConvTranspose" or self.block_axis == 0 and not self.kernel else self.shape[0]

    @property
    def columns(self) -> int:
        """K of the canonical matrix."""
        return int(np.prod(self.shape, dtype=np.int64)) // self.rows

    @property
    def kernel(self) -> bool:
        """A Conv/ConvTranspose weight (blocked ones are stored in canonical 2-D form)."""
        return self.op in ("Conv", "ConvTranspose")

    def group_map(self, granularity: str, block: int) -> np.ndarray:
        """Scale group of every canonical column: k // block, or 0 for per-channel/per-tensor."""
        if granularity in ("channel", "tensor"):
            return np.zeros(self.columns, dtype=np.int64)
        return np.arange(self.columns, dtype=np.int64) // block

    def scales_to_stored(self, scale: np.ndarray, granularity: str) -> np.ndarray:
        """Canonical scales (or zero points) [R, G] / [1, 1] → the DequantizeLinear tensor."""
        if granularity == "tensor":
            return scale.reshape(())
        if granularity == "channel":
            return scale[:, 0]
        if self.kernel:
            return scale  # blocked kernels are dequantized in canonical form
        return scale.T if self.block_axis == 0 else scale

    def describe(self) -> str:
        return f"{self.op} '{self.name}' weight '{self.value.name}' {list(self.shape)}"


def _const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.dtype in (
        ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def find_sites(graph: ir.Graph) -> tuple[list[WeightSite], list[tuple[str, str]]]:
    """All quantizable weights of the main graph in topological order, and (node, reason) pairs
    for nodes of a quantizable type that were passed over."""
    sites, skipped = [], []
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in QUANTIZABLE_OPS:
            continue
        if node.metadata_props.get("lowbit.role") == "rotation":
            skipped.append((node.name, "online rotation (kept in float)"))
            continue
        site, reason = _site(node)
        if site is not None:
            sites.append(site)
        elif reason:
            skipped.append((node.name, reason))
    return sites, skipped


def _site(node: ir.Node) -> tuple[WeightSite | None, str | None]:
    op = node.op_type
    inputs = list(node.inputs)

    def make(index, activation, block_axis, channel_axis):
        shape = tuple(inputs[index].const_value.shape)
        return WeightSite(node, index, op, shape, activation, block_axis, channel_axis), None

    if op in ("Conv", "ConvTranspose"):
        if not _const(inputs[1]):
            return None, "weight is not a constant"
        if len(inputs[1].const_value.shape) < 3:
            return None, "weight rank below 3"
        if op == "ConvTranspose":
            if "group" in node.attributes and node.attributes["group"].value != 1:
                return None, "grouped ConvTranspose is not quantized"
            return make(1, 0, 0, 1)
        return make(1, 0, 1, 0)
    if op == "Gemm":
        attrs = node.attributes
        if "transA" in attrs and attrs["transA"].value:
            return None, "Gemm with transA=1 is not quantized"
        if not _const(inputs[1]):
            return None, "weight is not a constant"
        trans_b = bool(attrs["transB"].value) if "transB" in attrs else False
        return make(1, 0, 1, 0) if trans_b else make(1, 0, 0, 1)
    if op == "MatMul":
        a, b = inputs[0], inputs[1]
        if _const(b) and not _const(a) and len(b.const_value.shape) == 2:
            return make(1, 0, 0, 1)
        if _const(a) and not _const(b) and len(a.const_value.shape) == 2:
            return make(0, 1, 1, 0)
        if _const(a) or _const(b):
            return None, "constant operand is not a matrix (rank ≠ 2)"
        return None, None  # activation × activation: no weight
    if op == "Gather":
        axis = node.attributes["axis"].value if "axis" in node.attributes else 0
        if _const(inputs[0]) and len(inputs[0].const_value.shape) == 2 and axis == 0 and not _const(inputs[1]):
            return make(0, None, 1, 0)
        return None, None
    return None, None


def _conv_pads(node: ir.Node, spatial: tuple[int, ...], kernel: tuple[int, ...], strides, dilations) -> list[int]:
    attrs = node.attributes
    auto_pad = attrs["auto_pad"].value if "auto_pad" in attrs else "NOTSET"
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads_begin, pads_end = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pads_begin.append(small if auto_pad == "SAME_UPPER" else large)
            pads_end.append(large if auto_pad == "SAME_UPPER" else small)
        return pads_begin + pads_end
    if auto_pad == "VALID":
        return [0] * (2 * len(spatial))
    return list(attrs["pads"].value) if "pads" in attrs else [0] * (2 * len(spatial))


def reduction_rows(site: WeightSite, x: np.ndarray) -> list[np.ndarray]:
    """The rows that multiply the canonical weight: one [n, K] matrix per conv group.

    MatMul/Gemm: the activation's last axis is the reduction (first axis for a constant left
    operand). Conv (2-D): im2col patches in the canonical column order (c, ky, kx), split by group.
    """
    if site.op in ("MatMul", "Gemm"):
        if site.activation_index == 1:  # A[M, K] @ X[..., K, N]: rows are X's columns
            x = np.moveaxis(x, -2, -1)
        return [x.reshape(-1, x.shape[-1])]
    if site.op != "Conv" or x.ndim != 4:
        raise NotImplementedError(f"{site.describe()}: calibration rows are defined for MatMul, Gemm and 2-D Conv")
    attrs = site.node.attributes
    kernel = tuple(site.shape[2:])
    strides = list(attrs["strides"].value) if "strides" in attrs else [1, 1]
    dilations = list(attrs["dilations"].value) if "dilations" in attrs else [1, 1]
    pads = _conv_pads(site.node, x.shape[2:], kernel, strides, dilations)
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    windows = np.lib.stride_tricks.sliding_window_view(xp, span, axis=(2, 3))
    windows = windows[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]
    n, c, oh, ow, kh, kw = windows.shape
    patches = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c, kh * kw)
    groups = site.conv_groups
    per_group = c // groups
    return [patches[:, g * per_group:(g + 1) * per_group, :].reshape(n * oh * ow, -1) for g in range(groups)]


def row_blocks(site: WeightSite) -> list[slice]:
    """Canonical rows belonging to each conv group (one slice covering all rows otherwise)."""
    rows = site.rows
    groups = site.conv_groups if site.op == "Conv" else 1
    per = rows // groups
    return [slice(g * per, (g + 1) * per) for g in range(groups)]
