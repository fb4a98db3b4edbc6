"""``quantize``: low-bit weights (RTN, GPTQ, codebooks) and QDQ activations — lossy.

Weights of Conv (grouped and depthwise too), ConvTranspose, Gemm, MatMul with a constant operand
and Gather on a constant table are viewed as a canonical matrix W[R, K] (``lowbit.quant.sites``)
and quantized per tensor, per output channel, or in blocks of ``block`` reduction elements:

  rtn       ŵ = s·(clamp(round(w/s) + z, qmin, qmax) − z) with s, z from the block's range,
            shrunk by the clipping ratio that minimises ‖w − ŵ‖² when ``mse_clip`` is on;
  gptq      per layer H = E[xxᵀ] over the layer's calibration inputs (streamed), damped by
            ``damp``·mean(diag H); columns quantized in order with the error w − ŵ fed back into
            the columns not yet quantized through H⁻¹'s Cholesky factor (Frantar et al., 2022);
            with ``sequential`` each group of layers reading the same tensor is calibrated on the
            model whose earlier layers are already quantized;
  codebook  2^bits levels per block fitted by 1-D k-means (Lloyd-Max), written in standard ONNX;
            ``tables=row``: one table per row, scaled per block (any4/NF4 style).

Activations (``activations=8|16``) get QuantizeLinear/DequantizeLinear pairs where onnxruntime's
QDQ fusions apply, with ranges from streamed histograms (``calibration``); Softmax inputs,
normalisation internals and GELU chains stay float unless ``keep_float=false``
(``lowbit.quant.activations``).

Formats: ``qdq`` (standard ONNX; int8/int4/uint4 at opset 21, int2/uint2 at opset 25; 3-bit codes
ride in int4 containers and are reported as such) or ``matmulnbits`` (``com.microsoft.MatMulNBits``
for MatMul/Gemm weights; other weights stay QDQ at opset 21, 2-bit codes then in int4 containers).
A ``block`` that does not divide K leaves a shorter last block (ONNX gives that axis ceil(K/block)
scales); nothing is refused for it.

Scales (``scales``): with ``auto`` (the default) the block scales of 2-4 bit weights are rounded to
float16 values before the codes are chosen (a relative change ≤ 2^-11; the tensors stay float32),
as GPTQ/AWQ checkpoints store them: lowbit's MatMulLowBit int8 kernels then keep them in 2 bytes,
so a 2-bit block-32 weight streams 2.5 instead of 3 bits per weight. ``float16``/``float32`` force
either for every weight. ``byte`` makes each row's block scales multiples of one step (s = step·q,
q an integer in [1, 255], :func:`lowbit.quant.rtn.byte_round`; GPTQ sets each row's step before its
loop): lowbit's AVX-512 and NEON int8 kernels keep a byte a block (rows of more than 4 blocks), so
a 2-bit block-32 weight streams 2.25 bits per weight. A layer an override makes a codebook keeps
float16 scales.
"""

from __future__ import annotations

import dataclasses
import re
import time
import tracemalloc
from typing import Literal

import onnx_ir as ir

from lowbit.core.errors import UserError
from lowbit.passes.base import Pass, option
from lowbit.quant.sites import QUANTIZABLE_OPS, find_sites

BLOCKS = (16, 32, 64, 128, 256)


@dataclasses.dataclass
class QuantizeOptions:
    weights: Literal[2, 3, 4, 8, "auto", "none"] = option(4, "weight bits: 2, 3, 4, 8; auto (mixed precision under `budget`, from sensitivity); none (activations only)")
    granularity: Literal["block", "channel", "tensor"] = option("block", "scale sharing: blocks of `block` reduction elements, one per output channel, or one per tensor")
    block: int = option(32, "reduction elements per scale block (16, 32, 64, 128 or 256), with granularity=block")
    symmetric: bool = option(True, "signed codes with zero point 0 (false: unsigned codes with a zero point)")
    method: Literal["rtn", "gptq", "codebook"] = option("rtn", "weight rounding: round-to-nearest, GPTQ (needs --calib), or non-uniform codebook")
    tables: Literal["block", "row"] = option("block", "codebook level tables with granularity=block: one per block, or one per row that each block scales (a float16 scale a block: the bytes of uniform weights, which lowbit's kernels run as fast as uniform)")
    scales: Literal["auto", "float16", "float32", "byte"] = option("auto", "weight scale values: float16 rounds each to the nearest half (still float32 tensors; lowbit's 2/4-bit kernels then read half the scale bytes), float32 keeps full precision, byte makes a row's block scales multiples of one step, step·q with q in 1-255 (uniform block weights; lowbit's AVX-512 and NEON kernels then read a byte a block); auto: float16 for blocks of 2-4 bit weights")
    mse_clip: bool = option(True, "search the clipping ratio that minimises each block's squared error")
    damp: float = option(0.01, "GPTQ damping, as a fraction of the mean diagonal of H")
    act_order: bool = option(False, "GPTQ: quantize columns in order of decreasing H diagonal")
    sequential: bool = option(True, "GPTQ: calibrate each layer on the model with earlier layers already quantized")
    samples: int = option(128, "calibration samples used (GPTQ Hessians and activation ranges), at most")
    activations: Literal["none", 8, 16] = option("none", "activation bits: none (weight-only), 8 (uint8) or 16 (uint16)")
    calibration: Literal["minmax", "percentile", "entropy", "mse"] = option("entropy", "activation range method")
    percentile: float = option(99.99, "percentile for calibration=percentile, in percent")
    keep_float: bool = option(True, "keep Softmax inputs, normalisation internals and GELU chains in float")
    format: Literal["qdq", "matmulnbits"] = option("qdq", "weight format: standard QDQ, or com.microsoft.MatMulNBits for MatMul/Gemm")
    accuracy_level: int = option(4, "MatMulNBits accuracy_level (0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations)")
    ops: list[str] = option([], "quantize only these op types (default: Conv, ConvTranspose, Gemm, MatMul, Gather)")
    exclude_ops: list[str] = option([], "never quantize these op types")
    nodes: str = option("", "quantize only nodes whose name matches this regular expression")
    exclude_nodes: str = option("", "never quantize nodes whose name matches this regular expression")
    overrides: dict = option({}, "per-node table (recipe only): node name → {bits, block, granularity, method, symmetric, skip}")
    budget: str = option("", "for weights=auto: 'bits:4.5' (mean code bits per weight) or 'bytes:N' (bytes of quantized weights, scales included)")
    candidates: list[int] = option([2, 4, 8], "for weights=auto: bit widths each layer may get")
    seed: int = option(0, "seed of the codebook fit (combined with the run's --seed)")

    def validate(self) -> None:
        if self.block not in BLOCKS:
            raise UserError(f"option 'block' of pass quantize must be one of {', '.join(map(str, BLOCKS))}, not {self.block}")
        if not 0 < self.damp < 1:
            raise UserError(f"option 'damp' of pass quantize must be between 0 and 1, not {self.damp}")
        if self.samples < 1:
            raise UserError(f"option 'samples' of pass quantize must be at least 1, not {self.samples}")
        if not 50 < self.percentile <= 100:
            raise UserError(f"option 'percentile' of pass quantize must be in (50, 100], not {self.percentile}")
        for key in ("nodes", "exclude_nodes"):
            try:
                re.compile(getattr(self, key))
            except re.error as exc:
                raise UserError(f"option '{key}' of pass quantize is not a regular expression: {exc}") from None
        for key in ("ops", "exclude_ops"):
            for op in getattr(self, key):
                if op not in QUANTIZABLE_OPS:
                    raise UserError(f"option '{key}' of pass quantize names '{op}', which is not one of {', '.join(QUANTIZABLE_OPS)}")
        if self.tables == "row" and (self.method != "codebook" or self.granularity != "block"):
            raise UserError(f"option 'tables=row' of pass quantize needs method=codebook and granularity=block, not "
                            f"method={self.method}, granularity={self.granularity} (granularity=channel already has one "
                            f"table per row, without block scales)")
        if self.scales == "byte" and (self.method == "codebook" or self.granularity != "block"):
            raise UserError(f"option 'scales=byte' of pass quantize needs uniform block weights (method=rtn or gptq, "
                            f"granularity=block), not method={self.method}, granularity={self.granularity}")
        if self.weights == "auto" and not self.budget:
            raise UserError("quantize(weights=auto) needs a budget, e.g. budget=bits:4.5")
        if self.weights == "auto":
            from lowbit.analysis.sensitivity import parse_budget

            parse_budget(self.budget, [])
        bad = [b for b in self.candidates if b not in (2, 3, 4, 8)]
        if bad or not self.candidates:
            raise UserError(f"option 'candidates' of pass quantize takes bit widths among 2, 3, 4, 8, not {bad or 'nothing'}")
        if self.weights == "none" and self.activations == "none":
            raise UserError("quantize(weights=none) needs activations=8 or 16, else there is nothing to quantize")
        if self.format == "matmulnbits" and self.granularity != "block":
            raise UserError("quantize(format=matmulnbits) needs granularity=block")
        for name, table in self.overrides.items():
            if not isinstance(table, dict):
                raise UserError(f"override for node '{name}' of pass quantize must be a table of options")
            unknown = set(table) - {"bits", "block", "granularity", "method", "symmetric", "skip"}
            if unknown:
                raise UserError(f"override for node '{name}' of pass quantize has unknown key '{sorted(unknown)[0]}'")
            if "bits" in table and table["bits"] not in (2, 3, 4, 8):
                raise UserError(f"override for node '{name}' of pass quantize: bits must be 2, 3, 4 or 8, not {table['bits']!r}")
            if "block" in table and table["block"] not in BLOCKS:
                raise UserError(f"override for node '{name}' of pass quantize: block must be one of {BLOCKS}, not {table['block']!r}")
            if "method" in table and table["method"] not in ("rtn", "gptq", "codebook"):
                raise UserError(f"override for node '{name}' of pass quantize: method must be rtn, gptq or codebook")
            if "granularity" in table and table["granularity"] not in ("block", "channel", "tensor"):
                raise UserError(f"override for node '{name}' of pass quantize: granularity must be block, channel or tensor")


class Quantize(Pass):
    """Quantize weights to 8/4/3/2 bits (RTN, GPTQ, codebook) and optionally activations (lossy)."""

    name = "quantize"
    Options = QuantizeOptions
    preserves = "lossy"

    def run(self, model: ir.Model, ctx) -> bool:
        from lowbit.quant import plan as planning

        o = self.options
        auto_bits = self._auto_bits(model, ctx) if o.weights == "auto" else None
        sites, skipped, plans = self._plan(model, ctx, auto_bits)
        if planning.ensure_opset(model, plans, o):  # the graph was rebuilt: plan on the new one
            sites, skipped, plans = self._plan(model, ctx, auto_bits)
        ctx.note("skipped", [{"node": n, "reason": r} for n, r in skipped])
        if not plans and o.activations == "none":
            ctx.warn("the model has no quantizable weights" + (" selected" if sites else "") + "; it is unchanged")
            ctx.note("layers", [])
            return False
        needs_calib = o.activations != "none" or any(p.method == "gptq" for p in plans)
        if needs_calib and ctx.calib is None:
            what = "activation ranges" if o.activations != "none" else "GPTQ"
            raise UserError(f"{what} need{'' if o.activations != 'none' else 's'} calibration data; pass --calib FILE.npz (or random:N for a quick try)")
        for p in plans:
            planning.check_finite(p.site)
        tracing = tracemalloc.is_tracing()  # a caller may be measuring memory itself
        if not tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        started = time.perf_counter()
        try:
            layers = planning.quantize_weights(model, plans, o, ctx)
            act = planning.quantize_activations(model, o, ctx) if o.activations != "none" else {}
        finally:
            _, peak = tracemalloc.get_traced_memory()
            if not tracing:
                tracemalloc.stop()
        ctx.note("layers", layers)
        ctx.note("activations", act)
        ctx.note("calibration_seconds", time.perf_counter() - started)
        ctx.note("peak_python_bytes", peak)
        if any(p.bits == 3 for p in plans):
            ctx.warn("3-bit weights are stored as int4/uint4 holding 3-bit values (no 3-bit ONNX type); the file "
                     "saves 4 bits per weight, the accuracy is that of 3 bits")
        return bool(layers) or bool(act)

    def _plan(self, model: ir.Model, ctx, auto_bits: dict[str, int] | None = None):
        from lowbit.quant import plan as planning

        sites, skipped = find_sites(model.graph)
        chosen, reasons = planning.select(sites, self.options)
        plans = planning.plans(chosen, self.options, ctx, auto_bits) if self.options.weights != "none" else []
        return sites, skipped + reasons, plans

    def _auto_bits(self, model: ir.Model, ctx) -> dict[str, int]:
        """weights=auto: measure each layer's sensitivity, then choose bits under the budget."""
        from lowbit.analysis.sensitivity import allocate, parse_budget, sensitivity
        from lowbit.quant import plan as planning

        o = self.options
        if ctx.calib is None:
            raise UserError("quantize(weights=auto) measures sensitivity on calibration data; pass --calib")
        sites, _ = find_sites(model.graph)
        chosen, _ = planning.select(sites, o)
        chosen = [s for s in chosen if "bits" not in o.overrides.get(s.name, {})]
        if not chosen:
            return {}
        feed = ctx.calib.first(min(o.samples, 32))
        result = sensitivity(model, feed, bits=tuple(o.candidates), granularity=o.granularity, block=o.block,
                             symmetric=o.symmetric, only={s.name for s in chosen}, progress=ctx.track)
        budget = parse_budget(o.budget, result["layers"])
        bits = allocate(result, budget)
        spent = sum(layer["bytes"][str(bits[layer["node"]])] for layer in result["layers"])
        params = sum(layer["params"] for layer in result["layers"])
        ctx.note("mixed_precision", {
            "budget_bytes": budget, "bytes": spent,
            "mean_bits": sum(layer["params"] * bits[layer["node"]] for layer in result["layers"]) / params,
            "bits": bits, "sensitivity": result["layers"],
        })
        return bits
