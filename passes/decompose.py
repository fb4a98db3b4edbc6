"""What ``tucker`` and ``lowrank`` share: options, layer selection, rank choice, refit, report.

Per layer (in graph order):

1. *Ranks.* From ``ranks`` (per node), else from ``budget`` (global allocation, below), else from
   the ``rank`` policy: ``vbmf`` (empirical VBMF of the weight — for Tucker-2 of the mode-0 and
   mode-1 unfoldings separately, as Kim et al. 2015), ``energy:F`` (smallest rank keeping a
   fraction F of the spectrum: the unfoldings' squared singular values for Tucker-2; for SVD the
   eigenvalues of the output covariance Wᵀ Σ W when calibration data is given, else the squared
   singular values), ``ratio:F`` or an integer. Ranks are rounded up to a multiple of ``round``.
   A layer is decomposed only when its MACs *and* parameters both fall (``only_smaller``).
2. *Factors.* Tucker-2 by HOSVD + HOOI (``lowbit.decomp.tucker``); SVD data-aware when calibration
   data is given — W ≈ (W·V_R)·V_Rᵀ with V_R the top eigenvectors of Wᵀ Σ W, Σ = E[x xᵀ] of the
   layer's inputs on the *original* model, the rank-R map with least expected output error.
3. *Refit* (``refit``, on by default with calibration data): the last factor (1×1 Conv or the
   second matrix) and the bias are re-solved by ridge least squares so that, on the calibration
   inputs, Z·B + b matches Y, where Z is the input of the last factor in the model as decomposed
   so far (earlier layers already decomposed and refitted) and Y the layer's output in the
   original model — the closed-form stand-in for fine-tuning. λ = ``damp``·mean diag(Zᵀ Z)/n.
   The refit is kept only when it lowers the output error.

Budget ``macs:F``: the whole model's MACs (``lowbit.analysis.stats``) must fall to F times their
value. Every eligible layer offers candidate ranks (Tucker-2: both ranks at the same fraction of
their bounds, 24 steps; SVD: every rank, thinned to at most 64), each costed in MACs and in
relative output error² = tr(ΔWᵀ Σ ΔW)/tr(Wᵀ Σ W) (Σ = I without calibration data). That error
is the layer's own; it is put in the model's units by a measured sensitivity — the relative
error² of the model's outputs per unit of the layer's, probed at three points of its curve
(``_sensitivities``) — and ``lowbit.decomp.budget.allocate`` picks the ranks with the least
summed model error. (Summing the layers' own relative errors instead cut Lite0's output error
half as well at the same MACs: relative logit error² 0.19 against 0.09.)
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import onnx_ir as ir

from lowbit.core.errors import UserError
from lowbit.decomp import budget as budget_mod
from lowbit.decomp import data
from lowbit.decomp.layers import Layer, Skip, read_layer, write_first, write_last, write_lowrank, write_tucker
from lowbit.decomp.lstsq import HeldOut, RidgeAccumulator
from lowbit.decomp.ranks import parse_rank, round_rank
from lowbit.decomp.svd import LowRank, energy_curve, low_rank, psd_sqrt
from lowbit.decomp.tucker import Tucker2, partial_tucker, unfold
from lowbit.decomp.vbmf import evbmf
from lowbit.passes.base import Pass, macs_budget, option
from lowbit.passes.edit import Names

#: candidate rank fractions of a Tucker-2 layer under a budget
_TUCKER_STEPS = 24
#: at most this many candidate ranks of an SVD layer under a budget
_SVD_STEPS = 64
#: ridge dampings tried by the refit (with the ``damp`` option), chosen on the held-out batches
_DAMPS = (1e-3, 1e-2, 1e-1, 1.0)
#: HOOI sweeps for the candidates of a budget curve (the chosen ranks get ``iterations``)
_CURVE_ITERS = 2
#: a layer's sensitivity is probed at its first candidates with at least these relative errors²
_PROBES = (0.01, 0.1, 0.5)
#: calibration samples (random inputs without calibration data) of a sensitivity probe
_PROBE_SAMPLES = 16


@dataclasses.dataclass
class DecomposeOptions:
    rank: str = option("vbmf", "rank policy: vbmf, energy:F (keep a fraction F of the spectrum), ratio:F (F of the "
                               "full rank) or an integer; unused with `budget` and for nodes in `ranks`")
    ranks: dict = option({}, "per-node ranks (recipe only): node name → integer, or [R_out, R_in] for a Tucker-2 Conv")
    budget: str = option("", "'macs:F': choose every layer's ranks so the whole model's MACs fall to F of their value "
                             "(0 < F ≤ 1) at the least output error")
    round: int = option(1, "round ranks up to a multiple of this (8 suits onnxruntime's kernels)")
    refit: bool | None = option(None, "refit the last factor and bias by least squares on calibration data "
                                      "(default: true when --calib is given)")
    samples: int = option(64, "calibration samples used for moments and refits, at most")
    damp: float = option(1e-4, "ridge damping of the refit, as a fraction of the mean diagonal of ZᵀZ")
    iterations: int = option(20, "HOOI sweeps after the HOSVD initialisation (tucker)")
    only_smaller: bool = option(True, "decompose a layer only when its MACs and parameters both fall "
                                      "(false: also at full rank, e.g. to check exactness)")
    nodes: str = option("", "decompose only nodes whose name matches this regular expression")
    exclude_nodes: str = option("", "never decompose nodes whose name matches this regular expression")
    latency: bool = option(False, "measure onnxruntime latency before and after (2 threads) for the report")

    def validate(self) -> None:
        where = f"of pass {self._pass}"
        try:
            parse_rank(self.rank)
        except ValueError as exc:
            raise UserError(f"option 'rank' {where}: {exc}") from None
        self.budget_fraction()
        if self.round < 1:
            raise UserError(f"option 'round' {where} must be at least 1, not {self.round}")
        if self.samples < 1:
            raise UserError(f"option 'samples' {where} must be at least 1, not {self.samples}")
        if not 0 <= self.damp < 1:
            raise UserError(f"option 'damp' {where} must be in [0, 1), not {self.damp}")
        if self.iterations < 0:
            raise UserError(f"option 'iterations' {where} must be at least 0, not {self.iterations}")
        for key in ("nodes", "exclude_nodes"):
            try:
                re.compile(getattr(self, key))
            except re.error as exc:
                raise UserError(f"option '{key}' {where} is not a regular expression: {exc}") from None

    @property
    def _pass(self) -> str:
        return "tucker" if isinstance(self, TuckerOptions) else "lowrank"

    def budget_fraction(self) -> float | None:
        return macs_budget(self.budget, self._pass)


@dataclasses.dataclass
class TuckerOptions(DecomposeOptions):
    linear: bool = option(False, "also split 1×1 Convs, Gemm and MatMul by truncated SVD (as `lowrank` does), "
                                 "under the same rank policy and budget")


@dataclasses.dataclass(eq=False)
class _Plan:
    layer: Layer
    ranks: tuple[int, ...]
    row: dict
    #: the last factor's input (set when the layer is rewritten), the SVD's first factor and the
    #: last factor's weight in x·W layout
    middle: ir.Value | None = None
    first: np.ndarray | None = None
    last: np.ndarray | None = None


class Decompose(Pass):
    """Base of ``tucker`` and ``lowrank`` (not a pass by itself)."""

    preserves = "lossy"

    def eligible(self, layer: Layer) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, model: ir.Model, ctx) -> bool:
        from lowbit.analysis.stats import _static, infer_shapes, model_stats

        o = self.options
        self._svds: dict[int, LowRank] = {}
        shaped = infer_shapes(model)
        shapes = {name: _static(v.shape) for name, v in ir.convenience.create_value_mapping(shaped.graph).items()}
        layers, skipped = self._select(model.graph, shapes)
        self._check_explicit(layers, skipped)
        refit = o.refit if o.refit is not None else ctx.calib is not None
        if refit and ctx.calib is None:
            raise UserError(f"option 'refit' of pass {self.name} needs calibration data (--calib)")
        if not layers:
            ctx.note("skipped", [f"{name}: {why}" for name, why in skipped.items()])
            ctx.note("decomposed", 0)
            ctx.note("reason", "nothing to decompose: no eligible layer; the model is unchanged")
            return False
        before = model_stats(model)
        moments = self._moments(model, layers, ctx) if ctx.calib is not None else {}
        plans = self._plan(model, layers, moments, before.macs, ctx, skipped)
        original = model.clone() if refit else None
        latency_before = _latency(model, ctx) if o.latency else None
        names = Names(model.graph)
        names.used.update(n.name for n in model.graph.all_nodes() if n.name)
        for plan in ctx.track(plans, f"{self.name}: layers", total=len(plans)):
            self._decompose(model, plan, moments.get(id(plan.layer)), names)
            if refit:
                self._refit(model, original, plan, names, ctx)
        after = model_stats(model)
        ctx.note("skipped", [f"{name}: {why}" for name, why in skipped.items()])
        ctx.note("layers", [p.row for p in plans])
        ctx.note("decomposed", len(plans))
        ctx.note("refit", refit)
        ctx.note("model", {"macs_before": before.macs, "macs_after": after.macs,
                           "macs_ratio": round(after.macs / max(before.macs, 1), 4),
                           "params_before": before.params, "params_after": after.params})
        if latency_before is not None:
            latency_after = _latency(model, ctx)
            ctx.note("latency_ms", {"before": latency_before, "after": latency_after,
                                    "speedup": round(latency_before / max(latency_after, 1e-9), 3)})
        return bool(plans)

    # ---- selection -----------------------------------------------------------------------

    def _select(self, graph: ir.Graph, shapes) -> tuple[list[Layer], dict[str, str]]:
        o = self.options
        layers, skipped = [], {}
        for node in graph:
            if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                continue
            label = node.name or node.outputs[0].name
            if (o.nodes and not re.search(o.nodes, label)) or (o.exclude_nodes and re.search(o.exclude_nodes, label)):
                continue
            if node.op_type == "ConvTranspose":
                skipped[label] = "ConvTranspose is not decomposed (documented limitation)"
                continue
            try:
                layer = read_layer(node, shapes)
            except Skip as why:
                skipped[label] = str(why)
                continue
            why = self.eligible(layer)
            if why:
                skipped[label] = why
            else:
                layers.append(layer)
        return layers, skipped

    def _check_explicit(self, layers: list[Layer], skipped: dict[str, str]) -> None:
        by_name = {layer.name: layer for layer in layers}
        for name, value in self.options.ranks.items():
            if name in skipped:
                raise UserError(f"option 'ranks' of pass {self.name} names node '{name}', which cannot be decomposed: "
                                f"{skipped[name]}")
            if name not in by_name:
                raise UserError(f"option 'ranks' of pass {self.name} names node '{name}', which is not a "
                                f"{'Conv' if self.name == 'tucker' else 'Gemm/MatMul/1×1 Conv'} of the graph")
            layer = by_name[name]
            ranks = _as_ranks(value, layer, self.name)
            bounds = layer.full_ranks()
            for r, bound in zip(ranks, bounds):
                if not 1 <= r <= bound:
                    raise UserError(f"option 'ranks' of pass {self.name}: rank {r} for node '{name}' is outside "
                                    f"1…{bound} (the layer's bound{'s' if len(bounds) > 1 else ''} {list(bounds)})")

    # ---- moments and ranks ---------------------------------------------------------------

    def _moments(self, model: ir.Model, layers: list[Layer], ctx) -> dict[int, np.ndarray]:
        """Σ = E[x xᵀ] of every layer's reduction input on the original model (one sweep)."""
        from lowbit.quant.capture import capture
        from lowbit.quant.gptq import HessianAccumulator

        accs = {id(layer): HessianAccumulator(layer.in_features * math.prod(layer.kernel), f"input of '{layer.name}'")
                for layer in layers}
        rng = ctx.rng(f"{self.name}:moments")
        names = [layer.node.inputs[0].name for layer in layers]
        sweep = capture(model, names, ctx.calib, max_samples=self.options.samples)
        for batch in ctx.track(sweep, f"{self.name}: input moments"):
            for layer in layers:
                accs[id(layer)].update(data.layer_rows(layer, batch[layer.node.inputs[0].name], rng))
        return {key: acc.H() for key, acc in accs.items()}

    def _plan(self, model: ir.Model, layers: list[Layer], moments, model_macs: int, ctx,
              skipped: dict[str, str]) -> list[_Plan]:
        o = self.options
        fraction = o.budget_fraction()
        explicit = {layer.name: _as_ranks(o.ranks[layer.name], layer, self.name) for layer in layers if layer.name in o.ranks}
        chosen: dict[int, tuple[int, ...]] = {}
        free = [layer for layer in layers if layer.name not in explicit]
        if fraction is not None:
            fixed = sum(layer.macs() - layer.cost(explicit[layer.name])[0] for layer in layers if layer.name in explicit)
            curves = [self._curve(layer, moments.get(id(layer))) for layer in free]
            weights = self._sensitivities(model, free, curves, moments, ctx)
            curves = [[dataclasses.replace(c, error=c.error * w(c.error)) for c in curve] for curve, w in zip(curves, weights)]
            picks, macs = budget_mod.allocate(curves, model_macs - fixed, fraction * model_macs)
            for layer, pick in zip(free, picks):
                if pick.choice is None:
                    skipped[layer.name] = "kept whole by the budget allocation"
                else:
                    chosen[id(layer)] = pick.choice
            ctx.note("budget", {"target_macs": int(fraction * model_macs), "planned_macs": int(macs),
                                "reached": bool(macs <= fraction * model_macs)})
            if macs > fraction * model_macs:
                ctx.warn(f"budget {o.budget} not reached: decomposing every eligible layer as far as it pays leaves "
                         f"{macs / model_macs:.3f} of the MACs")
        else:
            policy = parse_rank(o.rank)
            for layer in free:
                try:
                    chosen[id(layer)] = self._policy_ranks(layer, policy, moments.get(id(layer)))
                except Skip as why:
                    skipped[layer.name] = str(why)
        for layer in layers:
            if layer.name in explicit:
                chosen[id(layer)] = explicit[layer.name]
        plans = []
        for layer in layers:
            ranks = chosen.get(id(layer))
            if ranks is None:
                continue
            why = layer.pays(ranks) if o.only_smaller else None
            if why:
                skipped[layer.name] = why
                continue
            macs, params = layer.cost(ranks)
            plans.append(_Plan(layer, ranks, {
                "node": layer.name, "op": layer.op, "method": "tucker2" if layer.spatial else "svd",
                "ranks": list(ranks), "full_ranks": list(layer.full_ranks()),
                "macs_before": layer.macs(), "macs_after": macs,
                "params_before": layer.params(), "params_after": params}))
        return plans

    def _policy_ranks(self, layer: Layer, policy, cov) -> tuple[int, ...]:
        o = self.options
        if policy.kind == "fixed":
            bound = min(layer.full_ranks())
            if policy.value > bound:
                raise Skip(f"rank {policy.value} exceeds the layer's bound {bound}")
        if layer.spatial:
            unfoldings = _weighted_unfoldings(layer, cov)
            ranks = []
            for m, full in zip(unfoldings, (layer.out_features, layer.in_features)):
                energy = np.linalg.svd(m, compute_uv=False) ** 2 if policy.kind == "energy" else None
                vbmf = max(evbmf(m).rank, 1) if policy.kind == "vbmf" else None
                ranks.append(round_rank(policy.choose(full, energy=energy, vbmf=vbmf), o.round, full))
            return tuple(ranks)
        full = layer.full_ranks()[0]
        energy = self._svd(layer, cov).energy if policy.kind == "energy" else None
        vbmf = None
        if policy.kind == "vbmf":
            vbmf = max(evbmf(layer.matrix() if cov is None else psd_sqrt(cov) @ layer.matrix()).rank, 1)
        return (round_rank(policy.choose(full, energy=energy, vbmf=vbmf), o.round, full),)

    def _curve(self, layer: Layer, cov) -> list[budget_mod.Candidate]:
        """(MACs, relative output error²) of the candidate ranks of one layer, "keep" first."""
        o = self.options
        options = [budget_mod.Candidate(layer.macs(), 0.0, None)]
        if layer.spatial:
            n, c = layer.out_features, layer.in_features
            m = layer.w.reshape(n, -1)
            sigma = cov if cov is not None else None
            total = _energy(m, sigma)
            seen = set()
            for step in range(1, _TUCKER_STEPS):
                t = step / _TUCKER_STEPS
                ranks = (round_rank(math.ceil(t * n), o.round, n), round_rank(math.ceil(t * c), o.round, c))
                if ranks in seen or layer.pays(ranks):
                    continue
                seen.add(ranks)
                approx = _tucker(layer, ranks, cov, _CURVE_ITERS).reconstruct().reshape(n, -1)
                options.append(budget_mod.Candidate(layer.cost(ranks)[0], _energy(m - approx, sigma) / total, ranks))
        else:
            errors = energy_curve(self._svd(layer, cov).energy)
            full = layer.full_ranks()[0]
            step = max(o.round, math.ceil(full / _SVD_STEPS))
            for r in range(step, full + 1, step):
                if not layer.pays((r,)):
                    options.append(budget_mod.Candidate(layer.cost((r,))[0], float(errors[r]) ** 2, (r,)))
        return options

    def _approximation(self, layer: Layer, ranks: tuple[int, ...], cov, iters: int) -> np.ndarray:
        """The layer's weight at ``ranks``, dense, in ``layer.w``'s layout."""
        if layer.spatial:
            return _tucker(layer, ranks, cov, iters).reconstruct()
        (r,) = ranks
        svd = self._svd(layer, cov)
        m = svd.first[:, :r] @ svd.second[:r]
        return m.T.reshape(layer.w.shape) if layer.is_conv else m

    def _sensitivities(self, model: ir.Model, layers: list[Layer], curves, moments, ctx) -> list:
        """Model output error² per unit of each layer's relative output error², measured.

        A layer's curve is in its own units (relative error² of that layer's output); what the
        budget must minimise is the error at the model's outputs, and layers differ in how much
        of theirs reaches them (a normalisation or a residual path damps it, a narrow bottleneck
        feeds it into everything after), and not linearly: a layer harmless at 1 % error can
        wreck the model at 50 %. Each layer is probed at its first candidates reaching the
        relative errors² in ``_PROBES``: its weight is replaced by that approximation (the
        weights are fed as inputs of one onnxruntime session) and the summed relative error² of
        the model outputs on ``_PROBE_SAMPLES`` calibration samples — random inputs without
        calibration data — is divided by the layer's own. Returns, per layer, that ratio as a
        function of the layer's error (``_sensitivity_curve``); errors of different layers are
        taken to add."""
        from lowbit.core.calib import input_specs, random_feed
        from lowbit.runtime.session import session

        probe = model.clone()
        values = ir.convenience.create_value_mapping(probe.graph)
        weights = []
        for layer in layers:
            value = values[layer.node.inputs[1].name]
            if value.is_initializer() and not value.is_graph_input():
                probe.graph.inputs.append(value)
            weights.append(value.name if value.is_graph_input() else None)  # a Constant node: not probed
        feed = (ctx.calib.first(_PROBE_SAMPLES) if ctx.calib is not None
                else random_feed(input_specs(model), _PROBE_SAMPLES, ctx.rng(f"{self.name}:probe")))
        sess = session(probe, threads=None, optimization="basic")
        reference = sess.run(None, feed)
        scale = [max(float(np.sum(np.square(y, dtype=np.float64))), 1e-30) for y in reference]
        out = []
        for layer, name, curve in ctx.track(list(zip(layers, weights, curves)), f"{self.name}: layer sensitivities"):
            points = sorted((c for c in curve[1:] if c.error > 0), key=lambda c: c.error)
            if not points or name is None:
                out.append(None)
                continue
            measured = {}
            for level in _PROBES:
                pick = next((c for c in points if c.error >= level), points[-1])
                if pick.error in measured:
                    continue
                dense = layer.dense(self._approximation(layer, pick.choice, moments.get(id(layer)), _CURVE_ITERS))
                outputs = sess.run(None, {**feed, name: dense})
                err = sum(float(np.sum(np.square(y.astype(np.float64) - r))) / s for y, r, s in zip(outputs, reference, scale))
                measured[pick.error] = err / pick.error
            out.append(measured)
        known = [s for m in out if m for s in m.values()]
        typical = {1.0: float(np.median(known)) if known else 1.0}
        ctx.note("sensitivity", {layer.name: {f"{e:.3g}": round(v, 4) for e, v in sorted(m.items())}
                                 for layer, m in zip(layers, out) if m})
        return [_sensitivity_curve(typical if m is None else m) for m in out]

    # ---- rewriting -------------------------------------------------------------------------

    def _decompose(self, model: ir.Model, plan: _Plan, cov, names: Names) -> None:
        layer, graph = plan.layer, model.graph
        if layer.spatial:
            t = _tucker(layer, plan.ranks, cov, self.options.iterations)
            plan.middle = write_tucker(graph, layer, t.core, t.u_out, t.u_in, names)
            plan.last = t.u_out.T  # [R_out, N] in x·W layout
            plan.row["weight_error"] = round(float(np.linalg.norm(layer.w - t.reconstruct()) / max(np.linalg.norm(layer.w), 1e-300)), 6)
            plan.row["hooi_iterations"] = t.iterations
            plan.row["data_aware"] = cov is not None
        else:
            r = plan.ranks[0]
            full = self._svd(layer, cov)
            first, second = full.first[:, :r], full.second[:r]
            plan.middle = write_lowrank(graph, layer, first, second, names)
            plan.first, plan.last = first, second
            w = layer.matrix()
            plan.row["weight_error"] = round(float(np.linalg.norm(w - first @ second) / max(np.linalg.norm(w), 1e-300)), 6)
            plan.row["data_aware"] = cov is not None

    def _refit(self, model: ir.Model, original: ir.Model, plan: _Plan, names: Names, ctx) -> None:
        """Least-squares refit on the current model's inputs against the original's outputs:
        both factors by reduced-rank regression for an SVD layer whose first factor keeps the
        positions (x·W₁·W₂ + b on the layer's input x), else the last factor and bias (Z·B + b on
        the last factor's input Z). Kept only when it lowers the output error."""
        layer, rank = plan.layer, plan.last.shape[0]
        joint = not layer.spatial and not (layer.is_conv and _moves_positions(plan.middle.producer()))
        reader = plan.middle.producer() if joint else layer.node  # a 1×1 Conv when a Conv: rows are positions
        z = reader.inputs[0]
        y = (layer.bias_add or layer.node).outputs[0].name
        width = layer.in_features if joint else rank
        split = HeldOut(width, layer.out_features, bias=layer.bias is not None, name=f"refit of '{layer.name}'")
        rng = ctx.rng(f"{self.name}:refit:{layer.name}")
        kernel = (1,) * len(layer.kernel) if layer.is_conv else None
        for i, (zs, target) in enumerate(data.paired_patches(model, z.name, original, y, ctx.calib, node=reader,
                                                             kernel=kernel, max_samples=self.options.samples, rng=rng)):
            split.update(i, zs, target)
        fit, held, every = split.parts()

        def solve(acc: RidgeAccumulator, damp: float):
            if joint:
                first, last, bias = acc.reduced_rank(rank, damp)
                return first, last, bias, first @ last
            last, bias = acc.solve(damp)
            return None, last, bias, last

        before = held.residual(plan.first @ plan.last if joint else plan.last, layer.bias)
        damps = sorted({self.options.damp, *_DAMPS})
        damp = damps[int(np.argmin([held.residual(*fit.solve(d)) for d in damps]))]  # by the unconstrained fit
        after = _held_error(held, solve(fit, damp))
        first, last, bias, _ = solve(every, damp)
        plan.row["refit_damp"] = damp
        plan.row["refit_method"] = "reduced-rank regression" if joint else "last factor"
        plan.row["output_error_before_refit"] = round(float(before), 6)  # on held-out batches
        if after < before:
            if first is not None:
                write_first(model.graph, layer, plan.middle, first, names)
            write_last(model.graph, layer, last, bias, names)
            plan.row["output_error"] = round(float(after), 6)
        else:
            plan.row["output_error"] = round(float(before), 6)
            plan.row["refit"] = "kept the decomposition: the refit did not lower the error"

    def _svd(self, layer: Layer, cov) -> LowRank:
        """The full (data-aware when ``cov`` is given) SVD of a layer, computed once per run."""
        if id(layer) not in self._svds:
            self._svds[id(layer)] = low_rank(layer.matrix(), layer.full_ranks()[0], cov=cov)
        return self._svds[id(layer)]


def _sensitivity_curve(measured: dict[float, float]):
    """Sensitivity as a function of a layer's relative error²: the measured points joined
    linearly in log error, constant beyond the first and the last."""
    xs = np.log(sorted(measured))
    ys = np.array([measured[k] for k in sorted(measured)])
    return lambda e: float(np.interp(np.log(max(e, 1e-30)), xs, ys))


def _channel_moment(layer: Layer, cov: np.ndarray) -> np.ndarray:
    """Σ_c: the input channels' second moment, Σ's diagonal blocks averaged over kernel offsets."""
    c, k = layer.in_features, math.prod(layer.kernel)
    return np.trace(cov.reshape(c, k, c, k), axis1=1, axis2=3) / k


def _tucker(layer: Layer, ranks: tuple[int, int], cov: np.ndarray | None, iters: int) -> Tucker2:
    """Tucker-2 of the layer's kernel; data-aware when ``cov`` is given: HOOI of K ×₁ A with
    A = (Σ_c + λI)^½ (input channels whitened, λ = 1e-3·mean diag Σ_c), then u_in = A⁻¹·u_in′,
    so K̂ = core ×₀ u_out ×₁ u_in approximates K in the metric of the layer's inputs."""
    if cov is None:
        return partial_tucker(layer.w, ranks, iters=iters)
    channels = _channel_moment(layer, cov)
    a = psd_sqrt(channels + 1e-3 * max(float(np.mean(np.diag(channels))), 1e-30) * np.eye(len(channels)))
    t = partial_tucker(np.einsum("nc...,cd->nd...", layer.w, a), ranks, iters=iters)
    return Tucker2(t.core, t.u_out, np.linalg.solve(a, t.u_in), t.rel_error, t.iterations)


def _weighted_unfoldings(layer: Layer, cov: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Mode-0 and mode-1 unfoldings of a kernel, weighted by its inputs when ``cov`` is given:
    unfold₀(K)·Σ^½ (Σ over im2col patches) and unfold₁(K ×₁ Σ_c^½) (Σ_c the input channels'
    moment, Σ's diagonal blocks averaged over kernel offsets) — their spectra measure output
    energy rather than weight energy."""
    if cov is None:
        return unfold(layer.w, 0), unfold(layer.w, 1)
    channels = _channel_moment(layer, cov)
    mode0 = layer.w.reshape(layer.out_features, -1) @ psd_sqrt(cov)
    mode1 = unfold(np.einsum("nc...,dc->nd...", layer.w, psd_sqrt(channels)), 1)
    return mode0, mode1


def _held_error(held: RidgeAccumulator, solution) -> float:
    """Output error of a refit solution (first, last, bias, effective map) on held-out samples."""
    return held.residual(solution[3], solution[2])


def _moves_positions(node: ir.Node) -> bool:
    """A 1×1 Conv whose output positions are not its input positions (strides or padding)."""
    strides = node.attributes.get("strides")
    pads = node.attributes.get("pads")
    auto = node.attributes.get("auto_pad")
    return (strides is not None and any(s != 1 for s in strides.value)) or \
        (pads is not None and any(p != 0 for p in pads.value)) or (auto is not None and auto.value not in ("NOTSET", "VALID"))


def _energy(m: np.ndarray, sigma: np.ndarray | None) -> float:
    """tr(M Σ Mᵀ) (‖M‖² when Σ is None)."""
    if sigma is None:
        return float(np.sum(m * m))
    return float(np.einsum("ij,jk,ik->", m, sigma, m))


def _as_ranks(value, layer: Layer, pass_name: str) -> tuple[int, ...]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    want = 2 if layer.spatial else 1
    if len(values) == 1 and want == 2:
        values = values * 2
    if len(values) != want or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        shape = "an integer or [R_out, R_in]" if want == 2 else "an integer"
        raise UserError(f"option 'ranks' of pass {pass_name}: node '{layer.name}' needs {shape}, not {value!r}")
    return tuple(values)


def _latency(model: ir.Model, ctx) -> float:
    from lowbit.analysis.compare import random_input_latency_ms

    return random_input_latency_ms(model, ctx.rng("decompose:latency"))
