"""Write quantized weights into the graph, in the formats onnxruntime runs.

``qdq``: the weight initializer is replaced by integer codes followed by ``DequantizeLinear``
(opset 21 for int8/int4/uint4 — 3-bit codes ride in int4/uint4 — opset 25 for int2/uint2), with
``block_size`` along the reduction axis when blocked, ``axis`` on the output channels when
per-channel, scalar scale when per-tensor. Symmetric grids store signed codes and no zero point;
asymmetric grids store unsigned codes and a zero point of the same type. onnxruntime ≥ 1.21 fuses
a blocked int4/int2 ``DequantizeLinear`` on axis 0 feeding ``MatMul`` into ``MatMulNBits``.

``matmulnbits``: the node becomes ``com.microsoft.MatMulNBits(A, B, scales, zero_points?, bias?)``
with B stored [N, ceil(K/block), block·bits/8] — codes as unsigned (signed + 2^(bits−1)), packed
little-end first (element j of a byte at bits j·b … j·b+b−1), K padded with zero codes to whole
blocks; scales [N·blocks]; zero points packed the same way per row ([N, ceil(blocks·bits/8)]),
absent when symmetric (the kernel then uses 2^(bits−1)).

``codebook``: W[r, k] = levels[r, g(k), idx[r, k]] written with standard operators only —
``Gather(levels_flat, Cast(idx) + row_base + col_base)`` with row_base[r] = r·G·L and
col_base[k] = g(k)·L — so it runs on any onnxruntime (which folds it to a float weight at load);
``idx`` is stored as uint4/uint2/uint8 to keep the file small (uint2 only at opset ≥ 25, which
int2 types need; below it 2-bit indices are stored as uint4). A row codebook (one table per row,
G = 1, ``quantize(tables=row)``) multiplies that by its block scales,
``Mul(…, Gather(scales_flat, scale_row + scale_col))`` with scale_row[r] = r·B and scale_col[k]
= the block of column k.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lowbit.quant.sites import WeightSite

_SIGNED = {2: (ml_dtypes.int2, ir.DataType.INT2), 3: (ml_dtypes.int4, ir.DataType.INT4),
           4: (ml_dtypes.int4, ir.DataType.INT4), 8: (np.int8, ir.DataType.INT8)}
_UNSIGNED = {2: (ml_dtypes.uint2, ir.DataType.UINT2), 3: (ml_dtypes.uint4, ir.DataType.UINT4),
             4: (ml_dtypes.uint4, ir.DataType.UINT4), 8: (np.uint8, ir.DataType.UINT8)}


def required_opset(bits: int) -> int:
    """ai.onnx opset needed for DequantizeLinear on codes of ``bits`` bits."""
    return 25 if bits == 2 else 21


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


def _unique(graph: ir.Graph, base: str) -> str:
    names = set(graph.initializers)
    name, i = base, 1
    while name in names:
        name, i = f"{base}.{i}", i + 1
    return name


def emit_qdq(site: WeightSite, graph: ir.Graph, codes: np.ndarray, scale: np.ndarray,
             zero_point: np.ndarray | None, *, bits: int, granularity: str, block: int) -> ir.Node:
    """Replace the site's weight by codes → DequantizeLinear (→ Reshape/Transpose for a blocked
    kernel). ``codes`` [R, K], ``scale`` and ``zero_point`` [R, G] are canonical."""
    signed = zero_point is None
    np_type, _ = (_SIGNED if signed else _UNSIGNED)[bits]
    old = site.value
    dtype = old.dtype
    canonical = site.kernel and granularity == "block"
    stored_codes = codes if canonical else site.from_canonical(codes)
    base = _unique(graph, f"{old.name}.q{bits}")
    inputs = [_initializer(graph, base, stored_codes.astype(np_type)),
              _initializer(graph, _unique(graph, f"{base}.scale"), site.scales_to_stored(scale, granularity).astype(dtype.numpy()))]
    if not signed:
        zp = site.scales_to_stored(zero_point, granularity)
        inputs.append(_initializer(graph, _unique(graph, f"{base}.zero_point"), zp.astype(np_type)))
    attributes = {}
    if granularity == "block":
        attributes = {"axis": 1 if canonical else site.block_axis, "block_size": block}
    elif granularity == "channel":
        attributes = {"axis": site.channel_axis}
    prefix = _unique_node(graph, f"{site.name}.dq")
    dq = ir.node("DequantizeLinear", inputs, attributes=attributes, name=prefix)
    out = dq.outputs[0]
    out.name = f"{base}.dequantized"
    out.dtype, out.shape = dtype, ir.Shape(stored_codes.shape)
    nodes = [dq]
    if canonical:
        out = _canonical_to_stored_nodes(site, out, prefix, nodes, graph)
    _splice(site, graph, nodes, out)
    return dq


def _splice(site: WeightSite, graph: ir.Graph, nodes: list[ir.Node], weight: ir.Value) -> None:
    """Insert ``nodes`` before the site's node, feed it ``weight`` instead of the float initializer,
    and drop that initializer when nothing else reads it."""
    old = site.value
    for node in nodes:
        graph.insert_before(site.node, node)
    site.node.replace_input_with(site.input_index, weight)
    if not old.uses() and old.name in graph.initializers and not old.is_graph_output():
        del graph.initializers[old.name]


def _unique_node(graph: ir.Graph, base: str) -> str:
    names = {n.name for n in graph}
    name, i = base, 1
    while name in names:
        name, i = f"{base}.{i}", i + 1
    return name


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (last axis) into bytes, first element in the lowest bits."""
    per_byte = 8 // bits
    codes = codes.astype(np.uint8)
    pad = (-codes.shape[-1]) % per_byte
    if pad:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], pad), np.uint8)], axis=-1)
    codes = codes.reshape(*codes.shape[:-1], -1, per_byte)
    packed = np.zeros(codes.shape[:-1], dtype=np.uint8)
    for j in range(per_byte):
        packed |= (codes[..., j] << (j * bits)).astype(np.uint8)
    return packed


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of :func:`pack_bits`: bytes (last axis) → unsigned uint8 codes, 8/bits of them
    per byte, the first in the lowest bits (padding codes included)."""
    mask = (1 << bits) - 1
    parts = [(packed >> (j * bits)) & mask for j in range(8 // bits)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1).astype(np.uint8)


def emit_matmulnbits(site: WeightSite, graph: ir.Graph, codes_canonical: np.ndarray, scale: np.ndarray,
                     zero_point: np.ndarray | None, *, bits: int, block: int, accuracy_level: int) -> ir.Node:
    """Replace a MatMul/Gemm (weight on the right) by ``com.microsoft.MatMulNBits``.

    ``codes_canonical`` is [N, K]; ``scale``/``zero_point`` are [N, ceil(K/block)].
    """
    node = site.node
    n, k = codes_canonical.shape
    blocks = -(-k // block)
    offset = 0 if zero_point is not None else 1 << (bits - 1)
    unsigned = (codes_canonical.astype(np.int16) + offset).astype(np.uint8)
    padded = np.zeros((n, blocks * block), dtype=np.uint8)
    padded[:, :k] = unsigned
    if zero_point is None:
        padded[:, k:] = offset  # padding decodes to exactly zero
    packed = pack_bits(padded.reshape(n, blocks, block), bits)
    dtype = site.value.dtype
    base = _unique(graph, f"{site.value.name}.nbits{bits}")
    inputs = [node.inputs[site.activation_index],
              _initializer(graph, base, packed),
              _initializer(graph, _unique(graph, f"{base}.scales"), scale.reshape(-1).astype(dtype.numpy()))]
    if zero_point is not None:
        inputs.append(_initializer(graph, _unique(graph, f"{base}.zero_points"),
                                   pack_bits(zero_point.astype(np.uint8), bits).reshape(-1)))
    bias = _gemm_bias(node, n)
    if bias is not None:
        while len(inputs) < 5:
            inputs.append(None)
        inputs.append(bias)
    replacement = ir.node(
        "MatMulNBits", inputs, domain="com.microsoft", name=node.name,
        attributes={"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": accuracy_level},
    )
    graph.opset_imports.setdefault("com.microsoft", 1)
    nodes = [replacement] + _gemm_epilogue(graph, node, replacement.outputs[0], dtype, bias is not None)
    _replace_node(graph, node, nodes)
    return replacement


def _gemm_alpha_beta(node: ir.Node) -> tuple[float, float]:
    attrs = node.attributes
    return (float(attrs["alpha"].value) if "alpha" in attrs else 1.0,
            float(attrs["beta"].value) if "beta" in attrs else 1.0)


def _gemm_bias(node: ir.Node, n: int) -> ir.Value | None:
    """Gemm's C as a MatMulNBits bias: only with alpha = 1 and C a constant row of N (or one)
    elements (beta folded in); any other C is added after the MatMulNBits by ``_gemm_epilogue``."""
    if node.op_type != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    c = node.inputs[2]
    alpha, beta = _gemm_alpha_beta(node)
    if alpha != 1.0 or c.const_value is None:
        return None
    dims = tuple(c.const_value.shape)
    if not (all(d == 1 for d in dims) or (dims[-1] == n and all(d == 1 for d in dims[:-1]))):
        return None  # not a row vector: it varies along M
    array = c.const_value.numpy().reshape(-1) * beta
    if array.size == 1:
        array = np.full(n, array[0], dtype=array.dtype)
    value = ir.Value(name=f"{c.name}.bias", const_value=ir.tensor(array.astype(c.const_value.numpy().dtype), name=f"{c.name}.bias"),
                     shape=ir.Shape([n]), type=ir.TensorType(c.dtype))
    return value


def _gemm_epilogue(graph: ir.Graph, node: ir.Node, y: ir.Value, dtype: ir.DataType, bias_used: bool) -> list[ir.Node]:
    """The rest of Gemm's alpha·(A·B) + beta·C after the MatMulNBits, when C is not its bias:
    Mul by alpha (≠ 1), then Add of beta·C (a constant folded, else Mul(C, beta) first)."""
    if node.op_type != "Gemm":
        return []
    alpha, beta = _gemm_alpha_beta(node)
    nodes: list[ir.Node] = []

    def scalar(label: str, x: float) -> ir.Value:
        return _initializer(graph, _unique(graph, f"{node.name}.{label}"), np.array(x, dtype=dtype.numpy()))

    if alpha != 1.0:
        nodes.append(ir.node("Mul", [y, scalar("alpha", alpha)], name=f"{node.name}.alpha"))
        y = nodes[-1].outputs[0]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is not None and not bias_used:
        if c.const_value is not None and beta != 1.0:
            c = _initializer(graph, _unique(graph, f"{c.name}.scaled"), (c.const_value.numpy() * beta).astype(dtype.numpy()))
        elif beta != 1.0:
            nodes.append(ir.node("Mul", [c, scalar("beta", beta)], name=f"{node.name}.beta"))
            c = nodes[-1].outputs[0]
        nodes.append(ir.node("Add", [y, c], name=f"{node.name}.c"))
    return nodes


def _replace_node(graph: ir.Graph, old: ir.Node, new: ir.Node | list[ir.Node]) -> None:
    from onnx_ir.convenience import replace_nodes_and_values

    new = new if isinstance(new, list) else [new]
    for node in new:
        for value in node.inputs:
            if value is not None and value.const_value is not None and value.name not in graph.initializers and value.producer() is None:
                graph.register_initializer(value)
    replace_nodes_and_values(graph, old, [old], new, old.outputs, new[-1].outputs)
    for value in list(old.inputs):
        if value is not None and not value.uses() and value.name in graph.initializers and not value.is_graph_output():
            del graph.initializers[value.name]


def emit_codebook(site: WeightSite, graph: ir.Graph, fitted) -> ir.Node:
    """Replace the weight by a Gather from a per-(row, group) level table (standard ONNX); a row
    codebook's block scales multiply it, gathered the same way from a [R·B] table."""
    indices, levels, groups, bits = fitted.indices, fitted.levels, fitted.groups, fitted.bits
    rows, k = indices.shape
    n_groups, n_levels = levels.shape[1], levels.shape[2]
    dtype = site.value.dtype
    old = site.value
    base = _unique(graph, f"{old.name}.cb{bits}")
    # uint2 needs opset 25 (Cast takes it from there); below that 2-bit indices ride in uint4
    two = ml_dtypes.uint2 if graph.opset_imports.get("", 1) >= 25 else ml_dtypes.uint4
    index_type = {2: two, 3: ml_dtypes.uint4, 4: ml_dtypes.uint4}.get(bits, np.uint8)
    idx = _initializer(graph, base, indices.astype(index_type))
    table = _initializer(graph, _unique(graph, f"{base}.levels"), levels.reshape(-1).astype(dtype.numpy()))
    row_base = _initializer(graph, _unique(graph, f"{base}.row_base"),
                            (np.arange(rows, dtype=np.int64) * n_groups * n_levels).reshape(rows, 1))
    col_base = _initializer(graph, _unique(graph, f"{base}.col_base"), (groups.astype(np.int64) * n_levels).reshape(1, k))
    prefix = _unique_node(graph, f"{site.name}.codebook")
    cast = ir.node("Cast", [idx], attributes={"to": ir.DataType.INT64}, name=f"{prefix}.cast")
    add_row = ir.node("Add", [cast.outputs[0], row_base], name=f"{prefix}.row")
    add_col = ir.node("Add", [add_row.outputs[0], col_base], name=f"{prefix}.col")
    gather = ir.node("Gather", [table, add_col.outputs[0]], attributes={"axis": 0}, name=f"{prefix}.gather")
    nodes = [cast, add_row, add_col, gather]
    canonical = gather.outputs[0]
    if fitted.scales is not None:
        n_blocks = fitted.scales.shape[1]
        flat = _initializer(graph, _unique(graph, f"{base}.scales"), fitted.scales.reshape(-1).astype(dtype.numpy()))
        scale_row = _initializer(graph, _unique(graph, f"{base}.scale_row"),
                                 (np.arange(rows, dtype=np.int64) * n_blocks).reshape(rows, 1))
        scale_col = _initializer(graph, _unique(graph, f"{base}.scale_col"), fitted.scale_groups.astype(np.int64).reshape(1, k))
        at = ir.node("Add", [scale_row, scale_col], name=f"{prefix}.scale_index")
        scale = ir.node("Gather", [flat, at.outputs[0]], attributes={"axis": 0}, name=f"{prefix}.scale")
        mul = ir.node("Mul", [canonical, scale.outputs[0]], name=f"{prefix}.scaled")
        nodes += [at, scale, mul]
        canonical = mul.outputs[0]
    canonical.name = f"{base}.canonical"
    canonical.dtype, canonical.shape = dtype, ir.Shape([rows, k])
    _splice(site, graph, nodes, _canonical_to_stored_nodes(site, canonical, prefix, nodes, graph))
    return gather


def _canonical_to_stored_nodes(site: WeightSite, canonical: ir.Value, prefix: str, nodes: list, graph: ir.Graph) -> ir.Value:
    """Append the Transpose/Reshape nodes that turn canonical [R, K] back into the stored layout."""
    value = canonical
    if site.op == "Conv":
        shape = _initializer(graph, _unique(graph, f"{prefix}.shape"), np.array(site.shape, dtype=np.int64))
        node = ir.node("Reshape", [value, shape], name=f"{prefix}.reshape")
        nodes.append(node)
        value = node.outputs[0]
    elif site.op == "ConvTranspose":
        i, o = site.shape[0], site.shape[1]
        shape = _initializer(graph, _unique(graph, f"{prefix}.shape"), np.array((o, i, *site.shape[2:]), dtype=np.int64))
        reshape = ir.node("Reshape", [value, shape], name=f"{prefix}.reshape")
        perm = [1, 0, *range(2, len(site.shape))]
        transpose = ir.node("Transpose", [reshape.outputs[0]], attributes={"perm": perm}, name=f"{prefix}.transpose")
        nodes += [reshape, transpose]
        value = transpose.outputs[0]
    elif site.block_axis == 0:
        node = ir.node("Transpose", [value], attributes={"perm": [1, 0]}, name=f"{prefix}.transpose")
        nodes.append(node)
        value = node.outputs[0]
    value.dtype, value.shape = site.value.dtype, ir.Shape(site.shape)
    value.name = f"{prefix}.weight"
    return value
