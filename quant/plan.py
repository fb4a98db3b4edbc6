"""The quantize pass's work, step by step: select layers, plan each, round, emit, calibrate.

Kept apart from ``passes/quantize.py`` (options and contract) so the sensitivity analysis can
quantize one layer at a time with exactly the same code.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx_ir as ir

from lowbit.core.errors import UserError, did_you_mean
from lowbit.quant import emit
from lowbit.quant.activations import activation_targets, insert_qdq, sensitive_values
from lowbit.quant.capture import capture
from lowbit.quant.grid import Grid, weight_sqnr
from lowbit.quant.sites import WeightSite, reduction_rows, row_blocks


@dataclasses.dataclass
class LayerPlan:
    """How one weight is quantized."""

    site: WeightSite
    bits: int
    block: int
    granularity: str
    method: str
    symmetric: bool
    #: emitted as com.microsoft.MatMulNBits (else QDQ or codebook)
    nbits: bool = False


# ---------------------------------------------------------------------------------- selection


def select(sites: list[WeightSite], o) -> tuple[list[WeightSite], list[tuple[str, str]]]:
    """Apply ops / exclude_ops / nodes / exclude_nodes / overrides(skip); refuse unknown overrides."""
    by_name = {s.name for s in sites}
    for name in o.overrides:
        if name not in by_name:
            raise UserError(f"quantize override names node '{name}', which does not exist or has no quantizable weight"
                            + did_you_mean(name, by_name))
    chosen, skipped = [], []
    include = re.compile(o.nodes) if o.nodes else None
    exclude = re.compile(o.exclude_nodes) if o.exclude_nodes else None
    for site in sites:
        if o.ops and site.op not in o.ops:
            skipped.append((site.name, f"op {site.op} not in ops"))
        elif site.op in o.exclude_ops:
            skipped.append((site.name, f"op {site.op} excluded"))
        elif include is not None and not include.search(site.name):
            skipped.append((site.name, "name does not match nodes"))
        elif exclude is not None and exclude.search(site.name):
            skipped.append((site.name, "name matches exclude_nodes"))
        elif o.overrides.get(site.name, {}).get("skip"):
            skipped.append((site.name, "skipped by override"))
        else:
            chosen.append(site)
    return chosen, skipped


def plans(sites: list[WeightSite], o, ctx, bits_by_node: dict[str, int] | None = None) -> list[LayerPlan]:
    """One plan per site from the options, the per-node overrides and (weights=auto) chosen bits."""
    out = []
    for site in sites:
        table = o.overrides.get(site.name, {})
        bits = table.get("bits", (bits_by_node or {}).get(site.name, o.weights))
        if bits == "auto":
            raise RuntimeError("weights=auto must be resolved to bits before planning")
        plan = LayerPlan(site, int(bits), int(table.get("block", o.block)), table.get("granularity", o.granularity),
                         table.get("method", o.method), bool(table.get("symmetric", o.symmetric)))
        if plan.method == "codebook" and plan.granularity == "block" and o.tables == "block" and (1 << plan.bits) * 4 >= plan.block:
            ctx.warn(f"{site.describe()}: a {plan.bits}-bit codebook per block of {plan.block} stores "
                     f"{1 << plan.bits} float levels for every {plan.block} weights; use a larger block to save space")
        if plan.method == "gptq" and not _gptq_supported(site):
            plan.method = "rtn"
            ctx.warn(f"{site.describe()}: GPTQ is defined here for MatMul, Gemm and 2-D Conv; rounded with RTN")
        right_weight = site.op in ("MatMul", "Gemm") and site.activation_index == 0
        plan.nbits = (o.format == "matmulnbits" and right_weight and plan.bits in (2, 4, 8)
                      and plan.method != "codebook" and plan.granularity == "block")
        if o.format == "matmulnbits" and right_weight and not plan.nbits:
            ctx.warn(f"{site.describe()}: kept as QDQ (MatMulNBits takes 2, 4 or 8 bits in blocks)")
        out.append(plan)
    return out


def _gptq_supported(site: WeightSite) -> bool:
    return site.op in ("MatMul", "Gemm") or (site.op == "Conv" and len(site.shape) == 4)


def check_finite(site: WeightSite) -> None:
    w = site.array()
    if not np.all(np.isfinite(w)):
        bad = int(np.size(w) - np.count_nonzero(np.isfinite(w)))
        raise UserError(f"weight '{site.value.name}' of node '{site.name}' holds {bad} NaN/Inf values; refusing to quantize it")


def ensure_opset(model: ir.Model, plans: list[LayerPlan], o) -> bool:
    """Raise the ai.onnx opset to what the emitted DequantizeLinear needs (21, or 25 for int2);
    return whether the model's graph was rebuilt (its nodes are new objects then)."""
    need = 21 if (plans or o.activations != "none") else 0
    if any(p.bits == 2 and not p.nbits and p.method != "codebook" and o.format == "qdq" for p in plans):
        need = 25
    if o.activations == 16:
        need = max(need, 21)
    if model.opset_imports.get("", 1) >= need:
        return False
    from lowbit.core.opset import upgrade

    upgrade(model, need)
    return True


def container_bits(plan: LayerPlan, o) -> int:
    """Bits of the ONNX code type holding the plan's codes (3 → 4; 2 → 4 when opset 25 is avoided)."""
    if plan.bits == 3:
        return 4
    if plan.bits == 2 and o.format == "matmulnbits":
        return 4
    return plan.bits


# ---------------------------------------------------------------------------------- weights


def quantize_weights(model: ir.Model, plans: list[LayerPlan], o, ctx) -> list[dict]:
    """Round and emit every planned weight; GPTQ layers are calibrated in stages."""
    layers = []
    gptq_plans = [p for p in plans if p.method == "gptq"]
    stages = _stages(gptq_plans)
    hessians: dict[int, list] = {}
    if gptq_plans and not o.sequential:
        hessians = _accumulate(model, [p for stage in stages for p in stage], o, ctx)
    done = set()
    for stage in stages:
        if o.sequential:
            hessians = _accumulate(model, stage, o, ctx)
        for plan in stage:
            layers.append(_quantize_one(model, plan, o, ctx, hessians.get(id(plan))))
            done.add(id(plan))
    for plan in plans:
        if id(plan) not in done:
            layers.append(_quantize_one(model, plan, o, ctx, None))
    order = {id(p.site.node): i for i, p in enumerate(plans)}
    return sorted(layers, key=lambda entry: order.get(entry.pop("_key"), 0))


def _stages(plans: list[LayerPlan]) -> list[list[LayerPlan]]:
    """GPTQ layers grouped by the activation they read (Q/K/V, gate/up share one calibration)."""
    stages: dict[str, list[LayerPlan]] = {}
    for plan in plans:
        x = plan.site.node.inputs[plan.site.activation_index]
        stages.setdefault(x.name, []).append(plan)
    return list(stages.values())


def _accumulate(model: ir.Model, plans: list[LayerPlan], o, ctx) -> dict[int, list]:
    from lowbit.quant.gptq import HessianAccumulator

    names = {}
    acc: dict[int, list] = {}
    for plan in plans:
        x = plan.site.node.inputs[plan.site.activation_index]
        names[id(plan)] = x.name
        acc[id(plan)] = [HessianAccumulator(plan.site.columns) for _ in row_blocks(plan.site)]
    label = f"GPTQ {plans[0].site.name}" if len(plans) == 1 else f"GPTQ {len(plans)} layers"
    for batch in _sweep(model, sorted(set(names.values())), o, ctx, label):
        for plan in plans:
            x = batch[names[id(plan)]]
            for accumulator, rows in zip(acc[id(plan)], reduction_rows(plan.site, x)):
                accumulator.update(rows)
    return acc


def _sweep(model: ir.Model, names: list[str], o, ctx, label: str):
    """One pass over at most ``o.samples`` calibration samples, yielding the named values per batch."""
    return ctx.track(capture(model, names, ctx.calib, max_samples=o.samples), label)


def _quantize_one(model: ir.Model, plan: LayerPlan, o, ctx, hessian) -> dict:
    site, graph = plan.site, model.graph
    w = site.array()
    canonical = site.to_canonical(w).astype(np.float64)
    groups = site.group_map(plan.granularity, plan.block)
    per_tensor = plan.granularity == "tensor"
    key = id(site.node)
    entry = {"_key": key, "node": site.name, "op": site.op, "weight": site.value.name, "shape": list(site.shape),
             "bits": plan.bits, "method": plan.method, "granularity": plan.granularity,
             "block": plan.block if plan.granularity == "block" else None, "symmetric": plan.symmetric,
             "bytes_before": int(w.nbytes)}
    if plan.method == "codebook":
        from lowbit.quant.codebook import codebook, row_codebook

        if o.tables == "row" and plan.granularity == "block":
            fitted = row_codebook(canonical, groups, plan.bits, half_scales=_half_scales(plan, o))
        else:
            fitted = codebook(canonical, groups, plan.bits, seed=_seed(ctx, o, site))
        deq = fitted.dequantize()
        node_before = set(graph.initializers)
        emit.emit_codebook(site, graph, fitted)
        entry.update(format="codebook", tables="row" if fitted.scales is not None else "group",
                     weight_sqnr_db=weight_sqnr(canonical, deq), clip_ratio=None,
                     bytes_after=_new_bytes(graph, node_before))
        return entry
    byte = o.scales == "byte" and plan.granularity == "block"
    grid = Grid(plan.bits, plan.symmetric, half_scales=not byte and _half_scales(plan, o), byte_scales=byte)
    if plan.method == "gptq":
        from lowbit.quant.gptq import gptq

        parts, reports = [], []
        for rows, accumulator in zip(row_blocks(site), hessian):
            q, report = gptq(canonical[rows], accumulator.H(), groups, grid, damp=o.damp,
                             act_order=o.act_order, mse_clip=o.mse_clip, per_tensor=per_tensor)
            parts.append(q)
            reports.append(report)
        quantized = _concat(parts)
        clip = _mean([r.get("mean_clip") for r in reports])
        entry["gptq_proxy_gain"] = _mean([r.get("proxy_gain") for r in reports])
    else:
        from lowbit.quant.rtn import rtn

        quantized, report = rtn(canonical, groups, grid, mse_clip=o.mse_clip, per_tensor=per_tensor)
        clip = report.get("mean_clip")
    deq = quantized.dequantize()
    entry.update(weight_sqnr_db=weight_sqnr(canonical, deq), clip_ratio=clip)
    before = set(graph.initializers)
    if plan.nbits:
        emit.emit_matmulnbits(site, graph, quantized.codes, quantized.scale, quantized.zero_point, bits=plan.bits, block=plan.block,
                              accuracy_level=o.accuracy_level)
        entry["format"] = f"MatMulNBits {plan.bits}-bit"
    else:
        bits = container_bits(plan, o)
        emit.emit_qdq(site, graph, quantized.codes, quantized.scale, quantized.zero_point, bits=bits,
                      granularity=plan.granularity, block=plan.block)
        entry["format"] = f"QDQ {'int' if plan.symmetric else 'uint'}{bits}" + (f" holding {plan.bits}-bit codes" if bits != plan.bits else "")
    entry["bytes_after"] = _new_bytes(graph, before)
    return entry


def _half_scales(plan: LayerPlan, o) -> bool:
    """quantize's ``scales``: auto rounds to float16 the block scales of 2-4 bit weights, which
    lowbit's MatMulLowBit then keeps in half the bytes (its int8 path; exact, see quant.grid)."""
    if o.scales != "auto":
        return o.scales in ("float16", "byte")  # byte: a codebook's, or a channel scale's
    return plan.granularity == "block" and plan.bits <= 4


def _concat(parts):
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return dataclasses.replace(
        first,
        codes=np.concatenate([p.codes for p in parts]),
        scale=np.concatenate([p.scale for p in parts]),
        zero_point=None if first.zero_point is None else np.concatenate([p.zero_point for p in parts]),
    )


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _new_bytes(graph: ir.Graph, before: set[str]) -> int:
    from lowbit.analysis.stats import packed_nbytes

    return int(sum(packed_nbytes(v.const_value) for name, v in graph.initializers.items() if name not in before))


def _seed(ctx, o, site: WeightSite) -> int:
    return int(ctx.rng(f"quantize:{o.seed}:{site.name}").integers(0, 2**31 - 1))


# ---------------------------------------------------------------------------------- activations


def quantize_activations(model: ir.Model, o, ctx) -> dict:
    """Observe the chosen activation tensors over calibration data and insert Q/DQ pairs."""
    from lowbit.quant.observers import Observer

    graph = model.graph
    keep = sensitive_values(graph) if o.keep_float else {}
    skip_nodes = _excluded_nodes(graph, o)
    targets = activation_targets(graph, keep_float=keep, skip_nodes=skip_nodes)
    if not targets:
        return {"quantized": 0, "kept_float": keep}
    observers = {v.name: Observer(v.name) for v in targets}
    names = list(observers)
    for batch in _sweep(model, names, o, ctx, "activation ranges"):
        for name, array in batch.items():
            observers[name].update(array)
    dtype = np.uint8 if o.activations == 8 else np.uint16
    ranges = {}
    for value in targets:
        kwargs = {"percentile": o.percentile} if o.calibration == "percentile" else {}
        scale, zero_point = observers[value.name].qparams(o.calibration, dtype=np.dtype(dtype).name, **kwargs)
        insert_qdq(graph, value, float(scale), int(zero_point), dtype)
        ranges[value.name] = {"scale": float(scale), "zero_point": int(zero_point)}
    return {"quantized": len(targets), "bits": o.activations, "method": o.calibration,
            "kept_float": keep, "tensors": ranges}


def _excluded_nodes(graph: ir.Graph, o) -> set[str]:
    skip = set()
    include = re.compile(o.nodes) if o.nodes else None
    exclude = re.compile(o.exclude_nodes) if o.exclude_nodes else None
    for node in graph:
        if exclude is not None and exclude.search(node.name):
            skip.add(node.name)
        if include is not None and node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and not include.search(node.name):
            skip.add(node.name)
    return skip
