"""``--target-ort X.Y``: make a compressed model load in an older onnxruntime, or say why it cannot.

The pipeline emits what the installed onnxruntime runs (opset 21 int4 / opset 25 int2 blocked
``DequantizeLinear``, ``MatMulNBits`` with 2 bits or a bias, IR 10+). ``TargetOrt`` runs after the
pipeline and rewrites what the target version cannot load into a form it can, then checks every
node against the target's table below and refuses the rest (``UserError`` naming the node, exit 2).

Measured, not guessed: each version's wheel from PyPI in a throwaway venv loaded probe models
(Identity at IR 7…13 / opset 17…25; ``MatMulNBits`` K=256, N=48 at bits 2/4/8, block 16…256,
accuracy_level 0 and 4, with zero points, with a bias; blocked DequantizeLinear int4/uint4 (opset
21) and int2 (opset 25) feeding a MatMul; lowbit's MatMulLowBit (2/4 bits, float/int8),
ConvLowBit and Hadamard through ``SessionOptions.register_custom_ops_library`` with the
``liblowbit_ops.so`` built for the installed onnxruntime), outputs compared with onnxruntime 1.31.1:

=======  ======  =====  ===============  ===========  ==================  =============  ===========
version  max IR  opset  MatMulNBits CPU  bias input   accuracy_level 4    blocked DQ     lowbit ops
                        bits (16…256)    (index 5)    vs 1.31 (relative)  int4 / int2    (3 ops)
=======  ======  =====  ===============  ===========  ==================  =============  ===========
1.17.3   9       20     4                no           1.5e-2 (own int8)   no / no        yes, 0.0
1.18.1   10      21     4                no           8.6e-3 (own int8)   no* / no       yes, 0.0
1.19.2   10      21     4                yes          0.0                 yes / no       yes, 0.0
1.20.1   10      21     4                yes          0.0                 yes / no       yes, 0.0
1.21.1   10      22     4                yes          0.0                 yes / no       yes, 0.0
1.22.1   10      22     4 (8: level 4)   yes          0.0                 yes / no       yes, 0.0
1.23.2   11      23     4, 8             yes          0.0                 yes / no       yes, 0.0
1.24.4   13      25     2, 4, 8          yes          0.0                 yes / yes      yes, 0.0
…1.30.0  13      25     2, 4, 8          yes          0.0                 yes / yes      yes, 0.0
=======  ======  =====  ===============  ===========  ==================  =============  ===========

(1.25.1, 1.26.0, 1.27.0, 1.28.0, 1.29.0, 1.30.0 probed: all as 1.24.4; 1.31 is the installed one.)
CPU kernels (``get_all_opkernel_def()`` of each wheel, against onnx's schemas up to the version's
opset, ops with a function body excepted): every version lacks ImageDecoder-20; ≤ 1.24 lack
DeformConv-19/22; 1.24 lacks TensorScatter-24 (``_no_kernel``).
accuracy_level 0 is float arithmetic: ≤ 5e-7 relative from 1.31 in 1.17, 0.0 from 1.18 on. At
level 4 1.17/1.18 quantize activations their own way: as far from the exact float product as
1.31 is (0.45–1.2 % vs 0.45–0.86 %), but not bit-equal. * 1.18 loads opset 21 but has no int4
tensor type ("MLDataType for: tensor(int4) is not currently registered"). uint2 was not probed;
it is assumed to come with int2 (both opset 25). onnxruntime 1.17–1.18 need numpy < 2; 1.19.2 was
checked to run with numpy 2.4. lowbit's op library asks for C API 17: it loads and runs bit-equal
in every version from 1.17.3 to 1.31.1.

Rewrites, each exact (float arithmetic, the same decoded weights; the pass manager measures it):

- MatMul/Gemm whose blocked/per-channel low-bit ``DequantizeLinear`` the target cannot load →
  ``MatMulNBits`` (accuracy_level 0) when its MatMulNBits runs those bits, else lowbit's
  ``MatMulLowBit`` (accuracy float) when lowbit's ops are allowed, else a 4-bit MatMulNBits
  holding the 2-bit codes (u + 8 − 2^(b−1), zero point likewise: same Ŵ, twice the bytes);
- Conv with such weights → ``ConvLowBit`` (lowbit's ops allowed), else refused;
- ``MatMulNBits`` of bits the target lacks → ``MatMulLowBit`` (accuracy float / int8 as its
  accuracy_level 0 / 4; not bit-equal at level 4: reported as the pass's error) or widened to 4
  bits; a bias input the target lacks → MatMulNBits without it, then ``Add``;
- any other low-bit ``DequantizeLinear`` (e.g. an int4 embedding table before a Gather) → int4
  codes when the target has int4 (int2 codes before 1.24), else int8 codes: per channel/tensor a
  plain int8 DequantizeLinear (opset 13), blocked
  Ŵ = Reshape((Cast(q) − z)·s) over [.., blocks, block, ..] — stock, 8 bits per weight on file.

Then the ai.onnx opset is lowered with onnx's version converter (node metadata copied back) and the
result must pass the ONNX checker at the lower opset (the converter is not exact for every op:
ReduceMean 18 → 17 keeps an attribute opset 17 lacks), and the IR version is set to the smallest
that holds the opset and element types. Checks that refuse: an ai.onnx op newer than the target's
opset or without a CPU kernel there, a low-bit element type the target lacks, a MatMulNBits of
unsupported bits, lowbit's ops when forbidden (``X.Y:stock``), IR above the target's. Ops of other
domains (other com.microsoft contrib ops, a third party's) are not in the tables: a warning says so.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir

from lowbit.core.errors import UserError
from lowbit.core.opset import take_converted

_ONNX = ("", "ai.onnx")
_LOWBIT_TYPES = (ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT2, ir.DataType.UINT2)
_INT4 = frozenset({ir.DataType.INT4, ir.DataType.UINT4})
_INT2 = frozenset({ir.DataType.INT2, ir.DataType.UINT2})


@dataclasses.dataclass(frozen=True)
class Target:
    """What one onnxruntime minor version loads (module docstring table)."""

    version: str  # "1.17"
    max_ir: int
    max_opset: int
    nbits_bits: frozenset  # MatMulNBits bit widths its CPU kernel runs
    nbits_bias: bool  # MatMulNBits takes a bias input (index 5)
    lowbit_types: frozenset  # low-bit element types it has kernels for
    lowbit_ops: bool  # lowbit's op library may be used (loads there, and not forbidden)

    @property
    def label(self) -> str:
        return f"onnxruntime {self.version}"


def _row(max_ir, max_opset, bits, bias, types):
    return max_ir, max_opset, frozenset(bits), bias, frozenset(types)


#: minor version → (max IR, max opset, MatMulNBits bits, bias input, low-bit types), measured.
TABLE = {
    17: _row(9, 20, {4}, False, ()),
    18: _row(10, 21, {4}, False, ()),
    19: _row(10, 21, {4}, True, _INT4),
    20: _row(10, 21, {4}, True, _INT4),
    21: _row(10, 22, {4}, True, _INT4),
    22: _row(10, 22, {4}, True, _INT4),
    23: _row(11, 23, {4, 8}, True, _INT4),
    **{minor: _row(13, 25, {2, 4, 8}, True, _INT4 | _INT2) for minor in range(24, 32)},
}
OPTION = "--target-ort"


def _no_kernel(minor: int) -> frozenset:
    """ai.onnx (op, since version) ≤ the version's opset with neither a CPU kernel nor a function
    body onnxruntime could inline (from each wheel's ``get_all_opkernel_def()``; ops before opset 7
    and Constant left out)."""
    missing = {("ImageDecoder", 20)}
    if minor <= 24:
        missing |= {("DeformConv", 19), ("DeformConv", 22)}
    if minor == 24:
        missing.add(("TensorScatter", 24))
    return frozenset(missing)


def parse(text: str) -> Target:
    """``1.17``, ``1.17.3`` (the patch release is ignored) or ``1.17:stock`` (lowbit's own ops
    forbidden) → Target; anything else is a UserError naming the option."""
    m = re.fullmatch(r"\s*1\.(\d+)(?:\.\d+)?(?::(stock))?\s*", str(text))
    supported = f"1.{min(TABLE)} … 1.{max(TABLE)}"
    if m is None:
        raise UserError(f"option {OPTION} takes an onnxruntime version such as 1.17 (or 1.17:stock to forbid "
                        f"lowbit's own ops), not '{text}'")
    minor = int(m.group(1))
    if minor not in TABLE:
        raise UserError(f"option {OPTION} {text}: onnxruntime 1.{minor} is not supported; supported are {supported}")
    max_ir, max_opset, bits, bias, types = TABLE[minor]
    return Target(f"1.{minor}", max_ir, max_opset, bits, bias, types, lowbit_ops=m.group(2) is None)


class TargetOrt:
    """The pass that runs last when ``--target-ort`` is given (run by the verifying pass manager,
    so its added error is measured; not registered as a pipeline pass)."""

    preserves = "lossy"  # exact except MatMulNBits level 4 → MatMulLowBit int8 (module docstring)
    tolerance = 1e-5
    wants_input_model = False

    def __init__(self, target: Target | str):
        self.target = parse(target) if isinstance(target, str) else target
        self.name = f"target-ort {self.target.version}"
        self.ir_version: int | None = None

    def describe(self) -> str:
        return self.name

    def run(self, model: ir.Model, ctx) -> bool:
        from onnx_ir.passes import common

        t = self.target
        counts: Counter = Counter()
        before = (model.opset_imports.get("", 1), _needed_ir(model))
        _rewrite_layers(model, t, counts)
        _rewrite_matmulnbits(model, t, counts)
        common.RemoveUnusedNodesPass()(model)  # the weight chains the rewrites left dead
        _widen_other_dequantize(model, t, counts)
        common.RemoveUnusedNodesPass()(model)
        if model.opset_imports.get("", 1) > t.max_opset:
            _downgrade(model, t)
            counts[f"ai.onnx opset {before[0]} → {t.max_opset}"] += 1
        unchecked = _check(model, t)
        if unchecked:
            ctx.warn(f"{OPTION} {t.version} does not know the ops {', '.join(sorted(unchecked))}; whether "
                     f"{t.label} runs them was not checked")
        self.ir_version = _needed_ir(model)
        if self.ir_version > t.max_ir:
            raise UserError(f"the model needs IR version {self.ir_version}; {t.label} loads ≤ {t.max_ir}")
        ctx.note("target", t.version)
        ctx.note("lowbit_ops_allowed", t.lowbit_ops)
        ctx.note("rewrites", dict(counts))
        ctx.note("opset", model.opset_imports.get("", 1))
        ctx.note("ir_version", self.ir_version)
        return bool(counts)


# --------------------------------------------------------------------------------------------
# Rewrites


def _lowbit_inputs(nodes) -> list[tuple[ir.Node, ir.Value]]:
    return [(n, v) for n in nodes for v in n.inputs if v is not None and v.dtype in _LOWBIT_TYPES]


def _rewrite_layers(model: ir.Model, t: Target, counts: Counter) -> None:
    from lowbit.passes import lower
    from lowbit.passes.edit import Names

    layers, _ = lower.find_layers(model.graph, 32)
    names = Names(model.graph)
    for layer in layers:
        if layer.kind not in ("MatMul", "Gemm", "Conv"):
            continue
        chain, _x = lower._closure(layer)
        lacking = [v for _n, v in _lowbit_inputs(chain) if v.dtype not in t.lowbit_types]
        if not lacking:
            continue
        w = layer.weight
        if layer.kind == "Conv":
            if not t.lowbit_ops:
                raise UserError(f"node '{layer.name}' (Conv) has {lacking[0].dtype.name.lower()} weights, which {t.label} "
                                "cannot load, and only lowbit's ConvLowBit would express them (forbidden by :stock)")
            lower.apply(model, layer, "ConvLowBit", "float", names)
            counts["Conv → lowbit.ConvLowBit"] += 1
        elif w.format == "uniform" and w.bits in t.nbits_bits:
            lower.apply(model, layer, "MatMulNBits", "float", names)
            counts[f"{layer.kind} → MatMulNBits ({w.bits} bits)"] += 1
        elif t.lowbit_ops:
            lower.apply(model, layer, "MatMulLowBit", "float", names)
            counts[f"{layer.kind} → lowbit.MatMulLowBit ({w.bits} bits)"] += 1
        elif w.format == "uniform" and 4 in t.nbits_bits:
            layer.weight = _widen(w)
            lower.apply(model, layer, "MatMulNBits", "float", names)
            counts[f"{layer.kind} → MatMulNBits ({w.bits}-bit codes widened to 4)"] += 1
        else:
            raise UserError(f"node '{layer.name}' ({layer.kind}) has {w.bits}-bit {w.format} weights, which {t.label} "
                            "cannot load and only lowbit's MatMulLowBit would express (forbidden by :stock)")


def _widen(w):
    """The same decoded weight with 4-bit codes: u' = u + 8 − 2^(b−1), zero point likewise."""
    if w.bits == 4:
        return w
    shift = 8 - (1 << (w.bits - 1))
    zp = None if w.zero_points is None else (w.zero_points + shift).astype(np.uint8)
    return dataclasses.replace(w, codes=(w.codes + shift).astype(np.uint8), zero_points=zp, bits=4, packed=None)


def _rewrite_matmulnbits(model: ir.Model, t: Target, counts: Counter) -> None:
    from lowbit.passes import lower
    from lowbit.passes.edit import Names, attribute, new_const
    from lowbit.quant.emit import pack_bits

    names = Names(model.graph)
    for node in list(model.graph):
        if node.domain != "com.microsoft" or node.op_type != "MatMulNBits":
            continue
        bits = attribute(node, "bits", 4)
        if bits not in t.nbits_bits:
            w, why = lower._from_matmulnbits(node)
            if w is None:
                raise UserError(f"node '{node.name}' (MatMulNBits) has {bits} bits, which {t.label} does not run ({why})")
            layer = lower.Layer(node, "MatMulNBits", weight=w)
            if t.lowbit_ops:
                accuracy = "int8" if attribute(node, "accuracy_level", 0) == 4 else "float"
                lower.apply(model, layer, "MatMulLowBit", accuracy, names)
                counts[f"MatMulNBits ({bits} bits) → lowbit.MatMulLowBit"] += 1
                continue
            if 4 not in t.nbits_bits:
                raise UserError(f"node '{node.name}' (MatMulNBits) has {bits} bits, which {t.label} does not run")
            wide = _widen(w)
            n, k = wide.shape
            node.replace_input_with(1, new_const(model.graph, names, f"{node.inputs[1].name}.4bit", wide.W().reshape(n, -1, wide.block // 2)))
            zero_points = None if wide.zero_points is None else new_const(
                model.graph, names, f"{node.inputs[1].name}.4bit.zero_points", pack_bits(wide.zero_points, 4).reshape(-1))
            if len(node.inputs) > 3:
                node.replace_input_with(3, zero_points)
            elif zero_points is not None:
                node.resize_inputs(4)
                node.replace_input_with(3, zero_points)
            node.attributes["bits"] = ir.AttrInt64("bits", 4)
            counts[f"MatMulNBits ({bits} bits) widened to 4 bits"] += 1
        if len(node.inputs) > 5 and node.inputs[5] is not None and not t.nbits_bias:
            bias = node.inputs[5]
            node.resize_inputs(4 if len(node.inputs) > 3 and node.inputs[3] is not None else 3)
            y = node.outputs[0]
            biased = ir.Value(name=names.fresh(f"{y.name}.biased"), type=y.type, shape=y.shape)
            y.replace_all_uses_with(biased, replace_graph_outputs=True)
            if biased.is_graph_output():  # the graph output keeps its name
                biased.name, y.name = y.name, biased.name
            add = ir.node("Add", [y, bias], name=names.fresh(f"{node.name}.bias"), outputs=[biased])
            model.graph.insert_after(node, add)
            counts["MatMulNBits bias → Add"] += 1


def _widen_other_dequantize(model: ir.Model, t: Target, counts: Counter) -> None:
    """Low-bit DequantizeLinear the target lacks and no layer took (e.g. before a Gather) → int8."""
    from lowbit.passes.edit import Names, attribute, const_array, new_const

    names = Names(model.graph)
    for node in list(model.graph):
        if node.domain not in _ONNX or node.op_type != "DequantizeLinear" or node.inputs[0].dtype not in _LOWBIT_TYPES:
            continue
        if node.inputs[0].dtype in t.lowbit_types:
            continue
        q = const_array(node.inputs[0])
        s = const_array(node.inputs[1])
        z = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if q is None or s is None or (len(node.inputs) > 2 and node.inputs[2] is not None and z is None):
            continue  # left for the check to name
        signed = node.inputs[0].dtype in (ir.DataType.INT4, ir.DataType.INT2)
        code_type = np.int8 if signed else np.uint8
        block = attribute(node, "block_size", 0) or 0
        axis = attribute(node, "axis", 1) % max(q.ndim, 1)
        base = node.inputs[0].name
        four = ir.DataType.INT4 if signed else ir.DataType.UINT4
        if node.inputs[0].dtype in _INT2 and four in t.lowbit_types and t.max_opset >= 21:  # int4 holds int2's codes
            import ml_dtypes

            kind = ml_dtypes.int4 if signed else ml_dtypes.uint4
            node.replace_input_with(0, new_const(model.graph, names, f"{base}.int4", q.astype(np.int8).astype(kind)))
            if z is not None:
                node.replace_input_with(2, new_const(model.graph, names, f"{base}.int4.zero_point", z.astype(np.int8).astype(kind)))
            counts["DequantizeLinear → 4-bit codes"] += 1
            continue
        if not block:  # per tensor / per axis: an int8 DequantizeLinear says the same (opset 13)
            node.replace_input_with(0, new_const(model.graph, names, f"{base}.int8", q.astype(code_type)))
            if z is not None:
                node.replace_input_with(2, new_const(model.graph, names, f"{base}.int8.zero_point", z.astype(code_type)))
            counts["DequantizeLinear → 8-bit codes"] += 1
            continue
        if q.shape[axis] % block:
            raise UserError(f"node '{node.name}' (DequantizeLinear) has blocks of {block} that do not divide its axis of "
                            f"{q.shape[axis]}; {t.label} has no {node.inputs[0].dtype.name.lower()} type to keep it")
        blocks = q.shape[axis] // block
        split = (*q.shape[:axis], blocks, block, *q.shape[axis + 1:])
        per_block = (*q.shape[:axis], blocks, 1, *q.shape[axis + 1:])
        x = new_const(model.graph, names, f"{base}.int8", q.astype(code_type).reshape(split))
        to = ir.DataType.FLOAT16 if s.dtype == np.float16 else ir.DataType.FLOAT
        new = [ir.node("Cast", [x], attributes={"to": int(to)},
                       name=names.fresh(f"{node.name}.cast"))]
        y = new[-1].outputs[0]
        if z is not None:
            zc = new_const(model.graph, names, f"{base}.zero_point", z.astype(s.dtype).reshape(per_block))
            new.append(ir.node("Sub", [y, zc], name=names.fresh(f"{node.name}.sub")))
            y = new[-1].outputs[0]
        new.append(ir.node("Mul", [y, new_const(model.graph, names, f"{base}.scale", s.reshape(per_block))],
                           name=names.fresh(f"{node.name}.mul")))
        shape = new_const(model.graph, names, f"{base}.shape", np.array(q.shape, np.int64))
        new.append(ir.node("Reshape", [new[-1].outputs[0], shape], name=names.fresh(f"{node.name}.reshape")))
        for n_ in new:
            n_.outputs[0].name = names.fresh(n_.name)
        out = node.outputs[0]
        new[-1].outputs[0].type, new[-1].outputs[0].shape = out.type, out.shape
        model.graph.insert_before(node, new)
        out.replace_all_uses_with(new[-1].outputs[0], replace_graph_outputs=True)
        counts["blocked DequantizeLinear → int8 codes, Cast·Mul·Reshape"] += 1


def _downgrade(model: ir.Model, t: Target) -> None:
    """Lower the ai.onnx opset with onnx's version converter; refuse ops the target's opset lacks
    and anything the converted model fails the ONNX checker for."""
    current = model.opset_imports.get("", 1)
    for node in model.graph.all_nodes():
        if node.domain in _ONNX:
            since = _since(node.op_type, current)
            if since is not None and _since(node.op_type, t.max_opset) is None:
                raise UserError(f"node '{node.name}' ({node.op_type}) needs ai.onnx opset {since}; {t.label} loads ≤ {t.max_opset}")
    proto = ir.serde.serialize_model(model)
    try:
        converted = onnx.version_converter.convert_version(proto, t.max_opset)
        converted.ir_version = min(converted.ir_version, onnx.IR_VERSION)
        onnx.checker.check_model(converted)
    except Exception as exc:  # noqa: BLE001 - converter and checker raise many types
        text = str(exc).strip()
        node = re.search(r"Name: (\S+) OpType: (\S+)", text)
        what = f"node '{node.group(1)}' ({node.group(2)})" if node else "the model"
        first = text.splitlines()[0] if text else type(exc).__name__
        raise UserError(f"{what} cannot be lowered from ai.onnx opset {current} to {t.max_opset} for {t.label}: "
                        f"{first}") from None
    take_converted(model, converted, t.max_opset)


def _since(op_type: str, opset: int) -> int | None:
    try:
        return onnx.defs.get_schema(op_type, opset, "").since_version
    except onnx.defs.SchemaError:
        return None


# --------------------------------------------------------------------------------------------
# Checks


def _check(model: ir.Model, t: Target) -> set[str]:
    """Refuse the first node the target cannot run; return the ops of domains it has no table for."""
    from lowbit.passes.edit import attribute

    opset = model.opset_imports.get("", 1)
    unchecked = set()
    for node in model.graph.all_nodes():
        where = f"node '{node.name}' ({node.op_type})"
        if node.domain in _ONNX:
            since = _since(node.op_type, opset)
            if since is None or since > t.max_opset:
                raise UserError(f"{where} needs ai.onnx opset {since or opset}; {t.label} loads ≤ {t.max_opset}")
            if (node.op_type, since) in _no_kernel(int(t.version.split(".")[1])):
                raise UserError(f"{where} (ai.onnx version {since}) has no CPU kernel in {t.label}")
        elif node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
            bits = attribute(node, "bits", 4)
            if bits not in t.nbits_bits:
                raise UserError(f"{where} has {bits} bits; {t.label} runs MatMulNBits of {', '.join(map(str, sorted(t.nbits_bits)))} bits")
        elif node.domain == "lowbit":
            if not t.lowbit_ops:
                raise UserError(f"{where} is lowbit's own op, which {OPTION} {t.version}:stock forbids (lower with "
                                "use=stock, or drop ':stock')")
        else:
            unchecked.add(f"{node.domain}.{node.op_type}")
        for value in (*node.inputs, *node.outputs):
            if value is not None and value.dtype in _LOWBIT_TYPES and value.dtype not in t.lowbit_types:
                raise UserError(f"{where} uses the {value.dtype.name.lower()} tensor '{value.name}'; {t.label} has no "
                                f"{value.dtype.name.lower()} type")
    return unchecked


def _needed_ir(model: ir.Model) -> int:
    """The smallest IR version holding the model's ai.onnx opset and element types."""
    from lowbit.core.io import _DTYPE_MIN_IR, _all_values

    opset = model.opset_imports.get("", 1)
    needed = next((row[1] for row in onnx.helper.VERSION_TABLE if row[2] >= opset), onnx.IR_VERSION)
    for value in _all_values(model):
        needed = max(needed, _DTYPE_MIN_IR.get(value.dtype, 0))
    return needed


def check_loads(model: ir.Model, version: str, where: str) -> None:
    """Raise a UserError, naming ``where`` (a file) and the first thing in the way, unless onnxruntime
    ``version`` loads ``model`` as it is: its ai.onnx opset, IR version, ops and element types."""
    t = parse(version)
    fix = f"compress it with {OPTION} {t.version}"
    opset = model.opset_imports.get("", 1)
    if opset > t.max_opset:
        raise UserError(f"{where} imports ai.onnx opset {opset}; {t.label} loads ≤ {t.max_opset} ({fix})")
    try:
        _check(model, t)
    except UserError as exc:
        raise UserError(f"{where}: {exc} ({fix})") from None
    if model.ir_version > t.max_ir:  # as written in the file: onnxruntime refuses a newer one
        raise UserError(f"{where} is IR version {model.ir_version}; {t.label} loads ≤ {t.max_ir} ({fix})")
