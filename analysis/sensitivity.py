"""Per-layer quantization sensitivity, and the mixed-precision choice built on it.

``sensitivity`` quantizes one layer at a time, at each candidate bit width, and measures the
model-output SQNR against the float model on calibration samples:
    SQNR_l(b) = 10·log10(Σ y² / Σ (ŷ_l,b − y)²)   (all outputs, all samples).
It runs one onnxruntime session in which every weight is an overridable input; a layer's
quantized-then-dequantized weight (bit-identical to what DequantizeLinear computes) is fed in its
place, so no model is rebuilt per measurement.

``allocate`` chooses bits per layer under a size budget. Treating the layers' quantization noise
as independent and additive, the output noise power is N(b) = Σ_l P·10^(−SQNR_l(b_l)/10) with P the
output power; it minimises N subject to Σ_l bytes_l(b_l) ≤ budget by a Lagrangian sweep — each
layer picks argmin N_l(b) + λ·bytes_l(b), λ bisected to the smallest that fits — then spends what
is left of the budget greedily on the upgrades with the best noise reduction per byte.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from lowbit.core.errors import UserError
from lowbit.quant.grid import Grid
from lowbit.quant.sites import WeightSite, find_sites


def _layer_bytes(site: WeightSite, bits: int, granularity: str, block: int) -> int:
    """Stored bytes of the layer at ``bits``: packed codes plus float32 scales (3-bit in 4-bit containers)."""
    elements = int(np.prod(site.shape))
    container = 4 if bits == 3 else bits
    groups = site.group_map(granularity, block)
    n_scales = 1 if granularity == "tensor" else site.rows * (int(groups.max()) + 1)
    return math.ceil(elements * container / 8) + 4 * n_scales


def _dequantized(site: WeightSite, bits: int, granularity: str, block: int, symmetric: bool) -> np.ndarray:
    from lowbit.quant.rtn import rtn

    w = site.array()
    canonical = site.to_canonical(w).astype(np.float64)
    quantized, _ = rtn(canonical, site.group_map(granularity, block), Grid(bits, symmetric),
                       per_tensor=granularity == "tensor", name=site.value.name)
    return site.from_canonical(quantized.dequantize()).astype(w.dtype)


def sensitivity(model: ir.Model, feed: dict[str, np.ndarray], *, bits=(2, 3, 4, 8), granularity: str = "block",
                block: int = 32, symmetric: bool = True, only: set[str] | None = None, progress=None) -> dict:
    """Output SQNR per (layer, bits); ``feed`` is one batch of calibration samples; ``only``
    limits the measurement to these node names."""
    from lowbit.runtime.session import session

    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    sites, _ = find_sites(copy.graph)
    if only is not None:
        sites = [s for s in sites if s.name in only]
    if not sites:
        raise UserError("the model has no quantizable weights to measure")
    graph_inputs = {v.name for v in copy.graph.inputs}
    for site in sites:
        if site.value.name not in graph_inputs:
            copy.graph.inputs.append(site.value)
            graph_inputs.add(site.value.name)
    sess = session(copy, optimization="disable")
    out_names = [o.name for o in sess.get_outputs()]
    reference = sess.run(out_names, feed)
    power = float(sum(np.sum(np.asarray(r, np.float64) ** 2) for r in reference))
    layers = []
    work = [(site, b) for site in sites for b in bits]
    iterator = progress(work, "sensitivity", len(work)) if progress else work
    results: dict[str, dict] = {}
    for site, b in iterator:
        entry = results.setdefault(site.name, {
            "node": site.name, "op": site.op, "weight": site.value.name, "shape": list(site.shape),
            "params": int(np.prod(site.shape)), "float_bytes": int(site.array().nbytes),
            "bytes": {}, "sqnr_db": {},
        })
        override = {site.value.name: _dequantized(site, b, granularity, block, symmetric)}
        outputs = sess.run(out_names, {**feed, **override})
        noise = float(sum(np.sum((np.asarray(o, np.float64) - np.asarray(r, np.float64)) ** 2)
                          for o, r in zip(outputs, reference)))
        entry["sqnr_db"][str(b)] = math.inf if noise == 0 else 10 * math.log10(power / noise) if power > 0 else -math.inf
        entry["bytes"][str(b)] = _layer_bytes(site, b, granularity, block)
    layers = [results[s.name] for s in sites]
    return {"bits": list(bits), "granularity": granularity, "block": block, "symmetric": symmetric,
            "samples": int(next(iter(feed.values())).shape[0]), "output_power": power, "layers": layers}


def parse_budget(text: str, layers: list[dict]) -> int:
    """'bits:4.5' (mean code bits per weight) or 'bytes:N' → a byte budget for the weights."""
    kind, _, amount = text.partition(":")
    try:
        value = float(amount)
    except ValueError:
        value = -1.0
    if kind not in ("bits", "bytes") or value <= 0:
        raise UserError(f"budget '{text}' must be 'bits:B' (mean bits per weight) or 'bytes:N'")
    if kind == "bytes":
        return int(value)
    return int(sum(layer["params"] * value / 8 + _scale_bytes(layer) for layer in layers))


def _scale_bytes(layer: dict) -> int:
    """Bytes of a layer's scales (the same at every bit width)."""
    bits, stored = next(iter(layer["bytes"].items()))
    return stored - math.ceil(layer["params"] * (4 if int(bits) == 3 else int(bits)) / 8)


def allocate(result: dict, budget_bytes: int) -> dict[str, int]:
    """Bits per layer minimising the summed output noise with total bytes ≤ budget_bytes."""
    layers = result["layers"]
    power = result["output_power"] or 1.0
    options = []
    for layer in layers:
        choices = []
        for key, sqnr in layer["sqnr_db"].items():
            noise = 0.0 if sqnr == math.inf else power * 10 ** (-sqnr / 10)
            choices.append((int(key), layer["bytes"][key], noise))
        options.append(sorted(choices))
    smallest = sum(min(c[1] for c in choices) for choices in options)
    if smallest > budget_bytes:
        raise UserError(f"the budget of {budget_bytes} bytes is below the smallest possible size, {smallest} bytes "
                        f"(every layer at {min(result['bits'])} bits)")

    def pick(lam: float) -> list[tuple]:
        return [min(choices, key=lambda c: (c[2] + lam * c[1], c[1])) for choices in options]

    lo, hi = 0.0, 1.0
    while sum(c[1] for c in pick(hi)) > budget_bytes:
        hi *= 4
        if hi > 1e30:
            break
    for _ in range(100):
        mid = (lo + hi) / 2
        if sum(c[1] for c in pick(mid)) > budget_bytes:
            lo = mid
        else:
            hi = mid
    chosen = pick(hi)
    spent = sum(c[1] for c in chosen)
    improved = True
    while improved:  # spend the rest on the best noise reduction per byte
        improved = False
        best = None
        for i, choices in enumerate(options):
            for c in choices:
                extra = c[1] - chosen[i][1]
                gain = chosen[i][2] - c[2]
                if extra > 0 and gain > 0 and spent + extra <= budget_bytes:
                    score = gain / extra
                    if best is None or score > best[0]:
                        best = (score, i, c)
        if best is not None:
            _, i, c = best
            spent += c[1] - chosen[i][1]
            chosen[i] = c
            improved = True
    return {layer["node"]: c[0] for layer, c in zip(layers, chosen)}


def plot(result: dict, path, *, title: str | None = None) -> None:
    """A PNG: output SQNR per layer, one bar per candidate bit width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    bits = result["bits"]
    width = 0.8 / len(bits)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(layers) + 2), 4.5), dpi=120)
    x = np.arange(len(layers))
    for i, b in enumerate(bits):
        values = [min(layer["sqnr_db"][str(b)], 99.0) for layer in layers]
        ax.bar(x + (i - (len(bits) - 1) / 2) * width, values, width, label=f"{b}-bit")
    ax.set_xticks(x)
    ax.set_xticklabels([layer["node"][-24:] for layer in layers], rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("model output SQNR (dB), this layer alone quantized")
    ax.set_title(title or "lowbit sensitivity")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
