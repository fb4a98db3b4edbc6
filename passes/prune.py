"""``prune``: structured channel pruning on the ONNX graph, with least-squares reconstruction — lossy.

Which channels go together comes from ``lowbit.analysis.channels`` (a group: the output channels
of a layer with everything they couple to — BatchNormalization, the next layers' input columns,
the other branch of a residual Add, Concat offsets, Split sizes …); ``passes.channel_edit``
removes them. This pass decides *how many* channels each group keeps and *which*.

Importance of group channel j (``importance``), aggregated over the group's members — each
member's scores divided by their mean over the group, so that a member with large weights does
not outvote the others, then summed:

* ``l1`` / ``l2``: Σ|w| / ‖w‖₂ of the channel's slice of every weight reading or producing it
  (the "in" and "out" members);
* ``bn``: |γ| of the BatchNormalization scales in the group (Liu et al. 2017, network slimming);
  groups without one fall back to ``l2`` (listed in the report);
* ``activation``: mean |a| over calibration data of every activation the channel flows through;
* ``reconstruction``: ThiNet-style (Luo et al. 2017; He et al. 2017) — a channel matters as much
  as the output error of the layers reading it grows when it is gone. For a reading layer
  y = Σ_c W_c·x_c (x_c the channel's im2col patch), removing a set S adds e = Σ_{c∈S} W_c·x_c, and
  E‖e‖² = Σ_{c,c'∈S} G_cc' with G_cc' = tr(W_cᵀ W_c' Σ_c'c) (Σ the patches' second moment on
  calibration data, the readers' G summed after dividing each by its trace). Channels are removed
  greedily, each time the one adding the least error to those already removed, so the order
  itself is the importance (last removed = most important).

How many (one of): ``ratio`` — every prunable group loses that fraction of its channels;
``ratios`` (recipes) — per node whose output channels form a group; ``budget=macs:F`` — until the
model's MACs reach F of their value. With ``importance=reconstruction`` the budget is global:
each step removes the next chunk (``round`` channels) of the group whose chunk adds the least
reader error per MAC saved — those errors share one unit, the readers' relative output energy.
The other importances rank channels within a group but mean nothing across groups (weight norms
of different layers have different scales), so their budget uses one ratio for every group, the
least (by bisection) that reaches the target. MACs of a layer scale with the fractions of its
input and output channels kept (a depthwise Conv with its one fraction), so the count is exact
for Conv/Gemm/MatMul. (Ranking per-group-normalised scores globally, tried first, put the whole
cut on the one group with the most MACs per channel.)
Every group keeps at least ``min_channels`` and a multiple of ``round`` channels (or all of
them); a grouped convolution's divisions lose equally.

Reconstruction (``reconstruct``, default with calibration data): afterwards every layer whose
input lost channels (a Conv with group 1, Gemm or MatMul with a constant weight) is refitted, in
graph order, by ridge least squares: its weight and bias solve
min ‖X·W + b − Y‖² + λ‖W‖² with X its (im2col) input in the pruned model as refitted so far and Y
its output in the original model (the kept output channels) — the closed-form stand-in for
fine-tuning, as ThiNet's and He et al.'s channel-pruning reconstruction. Layers none of which is
upstream of another share one calibration sweep (``_waves``). X must come from the pruned model:
fitting every layer from one sweep of the unrefitted pruned model (each then over-corrects for
errors its refitted predecessors no longer make), or from the original model's kept channels
(ThiNet's choice), dropped Lite0's agreement from 0.935 to 0.16 and 0.77. One calibration
batch in four is held out: it picks the damping and the refit is kept only when it lowers
the held-out error.
"""

from __future__ import annotations

import dataclasses
import heapq
import math

import numpy as np
import onnx_ir as ir

from lowbit.core.errors import UserError
from lowbit.passes.base import Pass, macs_budget, option
from lowbit.passes.edit import attribute, const_array

IMPORTANCES = ("l1", "l2", "bn", "activation", "reconstruction")
#: ridge dampings tried by the reconstruction (with ``damp``), chosen on the held-out batches
_DAMPS = (1e-3, 1e-2, 1e-1, 1.0)
_LINEAR = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass
class PruneOptions:
    ratio: float = option(0.0, "fraction of every prunable group's channels to remove, 0 ≤ ratio < 1")
    ratios: dict = option({}, "per-node fractions (recipe only): the name of a Conv/Gemm/MatMul whose output "
                              "channels form a prunable group → the fraction of them to remove")
    budget: str = option("", "'macs:F': prune until the model's MACs fall to F of their value (0 < F ≤ 1): one ratio "
                             "for every group, or with importance=reconstruction the least reader error per MAC "
                             "over all groups")
    importance: str = option("l2", "channel importance: l1, l2 (weight norms), bn (BatchNormalization |γ|), "
                                   "activation (mean |activation|, needs --calib) or reconstruction "
                                   "(greedy least output error of the reading layers, needs --calib)")
    round: int = option(1, "keep a multiple of this many channels in every group (or all of them)")
    min_channels: int = option(1, "never keep fewer channels than this in a group")
    reconstruct: bool | None = option(None, "refit the layers reading pruned channels by least squares on "
                                            "calibration data (default: true when --calib is given)")
    samples: int = option(64, "calibration samples used for importance and reconstruction, at most")
    damp: float = option(1e-4, "ridge damping of the reconstruction, as a fraction of the mean diagonal of XᵀX")
    latency: bool = option(False, "measure onnxruntime latency before and after (2 threads) for the report")

    def validate(self) -> None:
        if not 0 <= self.ratio < 1:
            raise UserError(f"option 'ratio' of pass prune must be in [0, 1), not {self.ratio}")
        for name, value in self.ratios.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise UserError(f"option 'ratios' of pass prune: node '{name}' needs a fraction in [0, 1), not {value!r}")
        self.budget_fraction()
        if self.importance not in IMPORTANCES:
            raise UserError(f"option 'importance' of pass prune must be one of {', '.join(IMPORTANCES)}, "
                            f"not {self.importance!r}")
        for key in ("round", "min_channels", "samples"):
            if getattr(self, key) < 1:
                raise UserError(f"option '{key}' of pass prune must be at least 1, not {getattr(self, key)}")
        if not 0 <= self.damp < 1:
            raise UserError(f"option 'damp' of pass prune must be in [0, 1), not {self.damp}")
        if self.budget and (self.ratio or self.ratios):
            raise UserError("pass prune takes either 'budget' or 'ratio'/'ratios', not both")

    def budget_fraction(self) -> float | None:
        return macs_budget(self.budget, "prune")


@dataclasses.dataclass(eq=False)
class _Layer:
    """A weighted node and the channel axes of its weight that groups cut."""

    node: ir.Node
    macs: int
    out_size: int = 0  # entries of the weight's output axis tracked by groups
    in_size: int = 0
    out_cut: int = 0  # entries removed so far (planning)
    in_cut: int = 0

    def kept_macs(self) -> float:
        f_out = 1 - self.out_cut / self.out_size if self.out_size else 1.0
        f_in = 1 - self.in_cut / self.in_size if self.in_size else 1.0
        return self.macs * f_out * f_in


class Prune(Pass):
    """Structured channel pruning with dependency groups (DepGraph-style) and least-squares reconstruction (lossy)."""

    name = "prune"
    Options = PruneOptions
    preserves = "lossy"

    def run(self, model: ir.Model, ctx) -> bool:
        from lowbit.analysis.channels import channel_groups
        from lowbit.analysis.stats import model_stats
        from lowbit.passes.channel_edit import remove_channels

        o = self.options
        needs_data = o.importance in ("activation", "reconstruction")
        if needs_data and ctx.calib is None:
            raise UserError(f"option 'importance={o.importance}' of pass prune needs calibration data (--calib)")
        reconstruct = o.reconstruct if o.reconstruct is not None else ctx.calib is not None
        if reconstruct and ctx.calib is None:
            raise UserError("option 'reconstruct' of pass prune needs calibration data (--calib)")
        cg = channel_groups(model)
        groups = cg.prunable()
        blocked = [g for g in cg.groups if not g.prunable]
        ctx.note("unprunable", _reasons(blocked))
        if not groups:
            ctx.note("pruned_groups", 0)
            ctx.note("reason", "no prunable channel group: the model is unchanged")
            return False
        ratio_of = self._group_ratios(model, cg, groups)
        before = model_stats(model)
        layers = _layers(model, cg, groups, {row["node"]: row["macs"] or 0 for row in before.layers})
        scores, costs, fallback = self._importance(model, cg, groups, ctx)
        counts = self._plan(groups, layers, ratio_of, costs, before.macs, ctx)
        keep, rows = {}, []
        for g in groups:
            cut = counts[g.id]
            if not cut:
                continue
            keep[g.id] = _choose(g, scores[g.id], cut)
            s = scores[g.id]
            rows.append({"group": g.id, "members": _describe(g), "channels_before": g.size,
                         "channels_after": g.size - cut,
                         "importance_spread": round(float(np.max(s) / max(np.min(s), 1e-12)), 3) if s.size else None})
        if not keep:
            ctx.note("pruned_groups", 0)
            ctx.note("reason", "the ratios and budget remove no channel: the model is unchanged")
            return False
        original = model.clone() if reconstruct else None
        latency_before = _latency(model, ctx) if o.latency else None
        consumers = _consumers(model, cg, keep)
        remove_channels(model, cg, keep)
        refits, sweeps = self._reconstruct(model, original, consumers, cg, keep, ctx) if reconstruct else ([], 0)
        after = model_stats(model)
        ctx.note("importance", o.importance if not fallback else
                 f"{o.importance} (l2 for {len(fallback)} groups without BatchNormalization)")
        ctx.note("groups", rows)
        ctx.note("pruned_groups", len(rows))
        ctx.note("reconstructed", refits)
        if reconstruct:
            ctx.note("reconstruction_sweeps", sweeps)
        ctx.note("model", {"macs_before": before.macs, "macs_after": after.macs,
                           "macs_ratio": round(after.macs / max(before.macs, 1), 4),
                           "params_before": before.params, "params_after": after.params,
                           "params_ratio": round(after.params / max(before.params, 1), 4)})
        if latency_before is not None:
            latency_after = _latency(model, ctx)
            ctx.note("latency_ms", {"before": latency_before, "after": latency_after,
                                    "speedup": round(latency_before / max(latency_after, 1e-9), 3)})
        return True

    # ---- how many ------------------------------------------------------------------------

    def _group_ratios(self, model: ir.Model, cg, groups) -> dict[int, float]:
        """The ``ratios`` of the groups their nodes produce; every node named must produce the
        output channels of a prunable group."""
        ratio_of: dict[int, float] = {}
        prunable = {g.id for g in groups}
        by_node = {n.name: n for n in model.graph}
        for name in self.options.ratios:
            node = by_node.get(name)
            if node is None:
                raise UserError(f"option 'ratios' of pass prune names node '{name}', which is not in the graph")
            owner = [g for g in cg.groups if any(m.role == "out" and m.node == name for m in g.members)]
            if not owner:
                raise UserError(f"option 'ratios' of pass prune names node '{name}' ({node.op_type}), whose output "
                                f"channels no group tracks: it is not a Conv, Gemm or MatMul with a constant weight")
            bad = [g for g in owner if g.id not in prunable]
            if bad:
                raise UserError(f"option 'ratios' of pass prune names node '{name}', whose output channels cannot be "
                                f"pruned: {bad[0].reason}")
            for g in owner:
                ratio_of[g.id] = self.options.ratios[name]
        return ratio_of

    def _plan(self, groups, layers: dict[str, _Layer], ratio_of: dict[int, float], costs, model_macs: int,
              ctx) -> dict[int, int]:
        """Channels to remove per group id."""
        o = self.options
        fraction = o.budget_fraction()
        if fraction is None:
            return {g.id: self._feasible(g, g.size - math.floor(ratio_of.get(g.id, o.ratio) * g.size)) for g in groups}
        if costs and all(g.id in costs for g in groups):
            return self._budget(groups, layers, costs, model_macs, fraction, ctx)
        return self._uniform(groups, layers, model_macs, fraction, ctx)

    def _feasible(self, g, keep: int) -> int:
        """Channels to remove so the group keeps at least ``keep``, rounded and bounded."""
        o = self.options
        step = math.lcm(o.round, g.divisions)
        keep = max(keep, o.min_channels, 1)
        keep = min(g.size, math.ceil(keep / step) * step)
        return g.size - keep

    def _uniform(self, groups, layers: dict[str, _Layer], model_macs: int, fraction: float, ctx) -> dict[int, int]:
        """One ratio for every group — the least (by bisection) whose pruning reaches the MACs
        target: l1/l2/bn/activation scores rank channels within a group but mean nothing across
        groups, so they cannot say which group should give more."""
        target = fraction * model_macs
        touched = [_touch(g, layers) for g in groups]

        def plan(ratio: float) -> tuple[dict[int, int], float]:
            counts = {g.id: self._feasible(g, g.size - math.floor(ratio * g.size)) for g in groups}
            for g, t in zip(groups, touched):
                t.cut(counts[g.id])
            macs = model_macs - sum(layer.macs - layer.kept_macs() for layer in layers.values())
            for g, t in zip(groups, touched):
                t.cut(-counts[g.id])
            return counts, macs

        lo, hi = 0.0, 1.0 - 1e-9
        counts, macs = plan(hi)
        if macs <= target:
            for _ in range(40):
                mid = (lo + hi) / 2
                if plan(mid)[1] <= target:
                    hi = mid
                else:
                    lo = mid
            counts, macs = plan(hi)
        return self._note_budget(counts, macs, target, model_macs, ctx, ratio=hi)

    def _note_budget(self, counts, macs: float, target: float, model_macs: int, ctx, **extra) -> dict[int, int]:
        ctx.note("budget", {"target_macs": int(target), "planned_macs": int(macs), "reached": bool(macs <= target),
                            **{k: round(v, 4) for k, v in extra.items()}})
        if macs > target:
            ctx.warn(f"budget {self.options.budget} not reached: pruning every group to its minimum leaves "
                     f"{macs / model_macs:.3f} of the MACs")
        return counts

    def _budget(self, groups, layers: dict[str, _Layer], costs, model_macs: int, fraction: float, ctx) -> dict[int, int]:
        """Greedy over all groups: each step removes the next chunk of the group whose chunk adds
        the least reader error per MAC saved, until the MACs reach the target."""
        target = fraction * model_macs
        counts = {g.id: 0 for g in groups}
        touched = {g.id: _touch(g, layers) for g in groups}
        total = float(model_macs)

        def step(g) -> tuple[int, float] | None:
            """(channels, MACs saved) of the group's next chunk, None when it cannot shrink."""
            done = counts[g.id]
            nxt = self._feasible(g, g.size - done - 1)
            if nxt <= done:
                return None
            chunk = nxt - done
            return chunk, touched[g.id].saving(chunk)

        heap: list[tuple[float, int, int]] = []

        def push(g) -> None:
            """Queue the group's next chunk at its reader error per MAC saved."""
            s = step(g)
            if s is not None and s[1] > 0:
                done = counts[g.id]
                heapq.heappush(heap, (float(np.sum(costs[g.id][done:done + s[0]])) / s[1], g.id, s[0]))

        by_id = {g.id: g for g in groups}
        for g in groups:
            push(g)
        while total > target and heap:
            _, gid, chunk = heapq.heappop(heap)
            before = touched[gid].macs()
            touched[gid].cut(chunk)
            total -= before - touched[gid].macs()
            counts[gid] += chunk
            push(by_id[gid])
        return self._note_budget(counts, total, target, model_macs, ctx)

    # ---- which ---------------------------------------------------------------------------

    def _importance(self, model: ir.Model, cg, groups, ctx):
        """(scores per group id, reader-error costs per group id — importance=reconstruction
        only, else empty —, ids of the groups that fell back to l2 under importance=bn)."""
        kind = self.options.importance
        if kind == "activation":
            return _activation_scores(model, cg, groups, ctx, self.options.samples), {}, []
        if kind == "reconstruction":
            return (*_reconstruction_scores(model, cg, groups, ctx, self.options.samples), [])
        out, fallback = {}, []
        values = ir.convenience.create_value_mapping(model.graph)
        nodes = {n.name: n for n in model.graph}
        for g in groups:
            s = _bn_scores(nodes, g) if kind == "bn" else None
            if s is None:
                if kind == "bn":
                    fallback.append(g.id)
                s = _weight_scores(values, cg, g, 1 if kind == "l1" else 2)
            out[g.id] = s
        return out, {}, fallback

    # ---- reconstruction ------------------------------------------------------------------

    def _reconstruct(self, model: ir.Model, original: ir.Model, consumers: list[str], cg, keep,
                     ctx) -> tuple[list[dict], int]:
        """Refit every consumer, wave by wave; (report rows, number of calibration sweeps)."""
        from lowbit.decomp.data import paired_many

        by_name = {n.name: n for n in model.graph}
        refits = [_Refit(by_name[name], cg, keep) for name in consumers]
        waves = _waves(model, refits)
        for wave in ctx.track(waves, "prune: reconstruction"):
            rngs = [ctx.rng(f"prune:reconstruct:{r.node.name}") for r in wave]
            pairs = paired_many(model, original, [r.spec for r in wave], ctx.calib,
                                max_samples=self.options.samples, rngs=rngs)
            for i, batch in enumerate(pairs):
                for r, pair in zip(wave, batch):
                    r.update(i, *pair)
            for r in wave:
                r.finish(model, self.options.damp)
        return [r.row for r in refits], len(waves)


def _waves(model: ir.Model, refits: list["_Refit"]) -> list[list["_Refit"]]:
    """The refits in waves: a layer joins the first wave after every refitted layer upstream of
    its input, so the layers of one wave share one calibration sweep and each still sees its
    predecessors refitted."""
    import networkx as nx

    dag = nx.DiGraph()
    for node in model.graph:
        for value in node.inputs:
            if value is not None and value.producer() is not None:
                dag.add_edge(value.producer().name, node.name)
    level: dict[str, int] = {}
    names = {r.node.name for r in refits}
    for r in refits:  # graph order: every upstream refit already has its level
        upstream = nx.ancestors(dag, r.node.name) & names if r.node.name in dag else set()
        level[r.node.name] = 1 + max((level[u] for u in upstream), default=-1)
    waves: list[list[_Refit]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for r in refits:
        waves[level[r.node.name]].append(r)
    return waves


class _Refit:
    """Least-squares refit of one layer reading pruned channels (see the module docstring)."""

    def __init__(self, node: ir.Node, cg, keep):
        from lowbit.decomp.lstsq import HeldOut

        self.node = node
        self.w = const_array(node.inputs[1])
        self.weight = _as_matrix(node, self.w)  # [D, N] in x·W layout
        self.bias = _bias(node, self.weight.shape[1])
        self.kept_out = _kept_outputs(cg, keep, node)
        kernel = tuple(self.w.shape[2:]) if node.op_type == "Conv" else None
        self.spec = (node, node.inputs[0].name, node.outputs[0].name, kernel)
        with_bias = node.op_type != "MatMul"  # a MatMul has no bias input to refit
        d, n = self.weight.shape
        self.split = HeldOut(d, n, bias=with_bias, name=f"reconstruction of '{node.name}'")
        self.row: dict = {"node": node.name}

    def update(self, index: int, x: np.ndarray, y: np.ndarray) -> None:
        self.split.update(index, x, y[:, self.kept_out] if self.kept_out is not None else y)

    def finish(self, model: ir.Model, damp: float) -> None:
        fit, held, every = self.split.parts()
        before = held.residual(self.weight, self.bias)
        damps = sorted({damp, *_DAMPS})
        errors = [held.residual(*fit.solve(d)) for d in damps]
        best = damps[int(np.argmin(errors))]
        self.row.update(output_error_before=round(float(before), 6), damp=best)
        if min(errors) < before:
            _write(model, self.node, self.w, *every.solve(best))
            self.row["output_error"] = round(float(min(errors)), 6)
        else:
            self.row["output_error"] = round(float(before), 6)
            self.row["kept"] = "the pruned weights: the refit did not lower the error"


# ------------------------------------------------------------------------------------------------
# Helpers


def _reasons(blocked) -> list[str]:
    """One line per distinct reason, with how many groups and channels it blocks."""
    counts: dict[str, list[int]] = {}
    for g in blocked:
        entry = counts.setdefault(g.reason or "?", [0, 0])
        entry[0] += 1
        entry[1] += g.size
    return [f"{reason} ({n} group{'s' if n > 1 else ''}, {c} channels)" for reason, (n, c) in counts.items()]


def _describe(g) -> list[str]:
    return sorted({f"{m.role} {m.node}" for m in g.members if m.role != "act"})


def _layers(model: ir.Model, cg, groups, macs: dict[str, int]) -> dict[str, _Layer]:
    """The weighted nodes of the prunable groups, with their MACs (``macs``: node name → MACs,
    from the model's statistics) and tracked weight axes."""
    by_name = {n.name: n for n in model.graph}
    layers: dict[str, _Layer] = {}
    for g in groups:
        for m in g.members:
            if m.role not in ("out", "in") or m.node not in by_name:
                continue
            layer = layers.setdefault(m.node, _Layer(by_name[m.node], macs.get(m.node, 0)))
            size = cg.dims[(m.tensor, m.axis)].size if (m.tensor, m.axis) in cg.dims else 0  # entries, blocks included
            if m.role == "out":
                layer.out_size = size
            else:
                layer.in_size = size
    return layers


@dataclasses.dataclass
class _Touch:
    """The weighted members of one group: (layer, role, entries per channel)."""

    parts: list[tuple[_Layer, str, int]]

    @property
    def layers(self) -> list[_Layer]:
        return list({id(p[0]): p[0] for p in self.parts}.values())

    def cut(self, chunk: int) -> None:
        for layer, role, block in self.parts:
            if role == "out":
                layer.out_cut += chunk * block
            else:
                layer.in_cut += chunk * block

    def macs(self) -> float:
        return sum(layer.kept_macs() for layer in self.layers)

    def saving(self, chunk: int) -> float:
        """MACs the next ``chunk`` channels save (every layer's product recomputed)."""
        before = self.macs()
        self.cut(chunk)
        after = self.macs()
        self.cut(-chunk)
        return before - after


def _touch(g, layers: dict[str, _Layer]) -> _Touch:
    return _Touch([(layers[m.node], m.role, max(m.block, 1)) for m in g.members
                   if m.role in ("out", "in") and m.node in layers])


def _choose(g, scores: np.ndarray, cut: int) -> list[int]:
    """The group channels to keep: the most important, the same count in every division."""
    per = g.size // g.divisions
    drop = cut // g.divisions
    keep = []
    for d in range(g.divisions):
        block = np.arange(d * per, (d + 1) * per)
        order = block[np.argsort(scores[block], kind="stable")]
        keep.extend(sorted(order[drop:].tolist()))
    return sorted(keep)


def _member_norms(cg, g, m, array: np.ndarray, p: int) -> np.ndarray:
    """‖·‖_p of each group channel's entries in a constant member."""
    out = np.empty(g.size)
    if not m.fold:
        moved = np.moveaxis(np.abs(array.astype(np.float64)), m.axis, 0)
        flat = moved.reshape(moved.shape[0], -1)
        for j in range(g.size):
            part = flat[cg.positions(g, m, [j])]
            out[j] = np.sum(part) if p == 1 else np.sqrt(np.sum(part * part))
        return out
    a = np.abs(array.astype(np.float64))
    for j in range(g.size):
        part = a[cg.mask(g, m, [j], array.shape)]
        out[j] = np.sum(part) if p == 1 else np.sqrt(np.sum(part * part))
    return out


def _normalised_sum(parts: list[np.ndarray], size: int) -> np.ndarray:
    total = np.zeros(size)
    for s in parts:
        total += s / max(float(np.mean(s)), 1e-30)
    return total


def _weight_scores(values: dict[str, ir.Value], cg, g, p: int) -> np.ndarray:
    """l1 / l2 scores of a group (``values``: the graph's name → value mapping)."""
    parts = []
    for m in g.members:
        if m.role in ("out", "in"):
            array = const_array(values.get(m.tensor))
            if array is not None and np.issubdtype(array.dtype, np.floating):
                parts.append(_member_norms(cg, g, m, array, p))
    return _normalised_sum(parts, g.size) if parts else np.ones(g.size)


def _bn_scores(nodes: dict[str, ir.Node], g) -> np.ndarray | None:
    """|γ| of the group's BatchNormalization scales (summed over several), None without one."""
    parts = []
    for m in g.members:
        node = nodes.get(m.node)
        if m.role == "param" and node is not None and node.op_type == "BatchNormalization" \
                and node.inputs[1] is not None and node.inputs[1].name == m.tensor:
            gamma = np.abs(const_array(node.inputs[1]).astype(np.float64).reshape(-1))
            parts.append(gamma[list(m.indices)])
    return _normalised_sum(parts, g.size) if parts else None


def _activation_scores(model: ir.Model, cg, groups, ctx, samples: int) -> dict[int, np.ndarray]:
    """Mean |a| per channel of every activation member, over the calibration samples."""
    from lowbit.quant.capture import capture

    wanted = {}
    for g in groups:
        for m in g.members:
            if m.role == "act" and m.block == 1 and not m.fold:
                wanted.setdefault((m.tensor, m.axis), None)
    names = sorted({t for t, _ in wanted})
    sums = {key: None for key in wanted}
    for batch in ctx.track(capture(model, names, ctx.calib, max_samples=samples), "prune: activations"):
        for (tensor, axis) in wanted:
            a = np.abs(batch[tensor].astype(np.float64))
            s = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1).mean(axis=1)
            sums[(tensor, axis)] = s if sums[(tensor, axis)] is None else sums[(tensor, axis)] + s
    out = {}
    values = ir.convenience.create_value_mapping(model.graph)
    for g in groups:
        parts = [sums[(m.tensor, m.axis)][list(m.indices)] for m in g.members
                 if (m.tensor, m.axis) in sums and m.role == "act" and m.block == 1 and not m.fold]
        parts = [p for p in parts if np.mean(p) > 0]
        out[g.id] = _normalised_sum(parts, g.size) if parts else _weight_scores(values, cg, g, 2)
    return out


def _reconstruction_scores(model: ir.Model, cg, groups, ctx, samples: int):
    """ThiNet-style greedy order (see the module docstring): per group, the score of a channel
    is its position in the removal order (1 = removed first), and the error each successive
    removal adds. Groups no reading layer measures fall back to ``l2`` (no costs)."""
    from lowbit.decomp.data import reduction_rows
    from lowbit.quant.capture import capture
    from lowbit.quant.gptq import HessianAccumulator

    by_name = {n.name: n for n in model.graph}
    readers = {}  # node name → (node, weight [D, N])
    for g in groups:
        for m in g.members:
            node = by_name.get(m.node)
            if m.role == "in" and not m.fold and m.node not in readers and node is not None and _refittable(node):
                readers[m.node] = (node, _as_matrix(node, const_array(node.inputs[1])))
    accs = {name: HessianAccumulator(w.shape[0], f"input of '{name}'") for name, (_, w) in readers.items()}
    rng = ctx.rng("prune:reconstruction-importance")
    inputs = {name: node.inputs[0].name for name, (node, _) in readers.items()}
    for batch in ctx.track(capture(model, sorted(set(inputs.values())), ctx.calib, max_samples=samples),
                           "prune: reader moments"):
        for name, (node, w) in readers.items():
            kernel = tuple(const_array(node.inputs[1]).shape[2:]) if node.op_type == "Conv" else None
            accs[name].update(reduction_rows(node, batch[inputs[name]], kernel, rng)[0])
    sigma = {name: acc.H() for name, acc in accs.items()}
    values = ir.convenience.create_value_mapping(model.graph)
    out, costs = {}, {}
    for g in groups:
        gram = np.zeros((g.size, g.size))
        for m in g.members:
            if m.role != "in" or m.fold or m.node not in readers:
                continue
            node, w = readers[m.node]
            per = math.prod(const_array(node.inputs[1]).shape[2:]) if node.op_type == "Conv" else 1
            rows, owner = [], []
            for j in range(g.size):
                for i in cg.positions(g, m, [j]):
                    rows.extend(range(i * per, (i + 1) * per))
                    owner.extend([j] * per)
            rows_a = np.asarray(rows)
            wj = w[rows_a]
            s = sigma[m.node]
            contribution = (wj @ wj.T) * s[np.ix_(rows_a, rows_a)]
            onehot = np.zeros((len(rows), g.size))
            onehot[np.arange(len(rows)), owner] = 1.0
            energy = max(float(np.einsum("ij,jk,ik->", w.T, s, w.T)), 1e-30)
            gram += onehot.T @ contribution @ onehot / energy
        if not np.any(gram):
            out[g.id] = _weight_scores(values, cg, g, 2)
            continue
        out[g.id], costs[g.id] = _greedy_order(gram)
    return out, costs


def _greedy_order(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score, cost): score = position in the greedy removal order, where each step removes the
    channel whose removal, together with those already removed, adds the least error 1ᵀ G_SS 1;
    cost[k] = the error the (k+1)-th removal adds (in the readers' relative output energy)."""
    n = len(gram)
    added = np.diag(gram).copy()  # error increase of removing c next: G_cc + 2 Σ_{s∈S} G_cs
    score, cost = np.zeros(n), np.zeros(n)
    free = np.ones(n, dtype=bool)
    for position in range(n):
        c = int(np.argmin(np.where(free, added, np.inf)))
        score[c], cost[position] = position + 1, max(float(added[c]), 0.0)
        free[c] = False
        added += 2 * gram[:, c]
    return score, cost


def _refittable(node: ir.Node) -> bool:
    """A group-1 Conv, Gemm (transA 0) or MatMul reading a constant float weight (its second input)."""
    if node.op_type not in _LINEAR or len(node.inputs) < 2 or node.inputs[0] is None:
        return False
    if node.op_type == "Conv" and int(attribute(node, "group", 1)) != 1:
        return False
    if node.op_type == "Gemm" and int(attribute(node, "transA", 0)):
        return False
    w = const_array(node.inputs[1])
    if w is None or const_array(node.inputs[0]) is not None or not np.issubdtype(w.dtype, np.floating):
        return False
    return node.op_type == "Conv" or w.ndim == 2


def _consumers(model: ir.Model, cg, keep) -> list[str]:
    """Nodes, in graph order, reading pruned channels through a refittable weight."""
    names = {m.node for gid in keep for m in cg.groups[gid].members if m.role == "in" and not m.fold}
    return [node.name for node in model.graph if node.name in names and _refittable(node)]


def _as_matrix(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """The weight as [D, N] in x·W layout (Conv: D = C·∏k in ``K.reshape(N, -1)`` order)."""
    w = w.astype(np.float64)
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1).T
    if node.op_type == "Gemm":
        w = w * float(attribute(node, "alpha", 1.0))
        return w.T if int(attribute(node, "transB", 0)) else w
    return w


def _bias(node: ir.Node, n: int) -> np.ndarray:
    if node.op_type == "MatMul" or len(node.inputs) < 3 or node.inputs[2] is None:
        return np.zeros(n)
    b = const_array(node.inputs[2]).astype(np.float64).reshape(-1)
    if node.op_type == "Gemm":
        b = b * float(attribute(node, "beta", 1.0))
    return np.broadcast_to(b, (n,)).copy()


def _kept_outputs(cg, keep, node: ir.Node) -> np.ndarray | None:
    """Indices of the original output channels of a node that pruning keeps; None when none of
    them was removed."""
    removed, full = set(), None
    for gid, kept in keep.items():
        g = cg.groups[gid]
        gone = sorted(set(range(g.size)) - set(kept))
        for m in g.members:
            if m.role == "out" and m.node == node.name:
                removed.update(cg.positions(g, m, gone))
                full = cg.dims[(m.tensor, m.axis)].size
    if not removed:
        return None
    return np.array(sorted(set(range(full)) - removed), dtype=np.int64)


def _write(model: ir.Model, node: ir.Node, w: np.ndarray, new_w: np.ndarray, new_b: np.ndarray) -> None:
    """Put a refitted [D, N] weight and bias back in the node's own layout (a Conv or Gemm
    without a bias gets one; a MatMul is refitted without)."""
    from lowbit.passes.edit import Names, new_const, set_const

    names = Names(model.graph)
    if node.op_type == "Conv":
        array = new_w.T.reshape(w.shape)
    elif node.op_type == "Gemm":
        array = new_w / float(attribute(node, "alpha", 1.0))
        array = array.T if int(attribute(node, "transB", 0)) else array
    else:
        array = new_w
    set_const(model.graph, node, 1, np.ascontiguousarray(array, dtype=w.dtype), names, node.inputs[1].name)
    if node.op_type == "MatMul":
        return
    b = new_b.astype(w.dtype)
    if node.op_type == "Gemm":
        beta = float(attribute(node, "beta", 1.0))
        if beta == 0:
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        else:
            b = (new_b / beta).astype(w.dtype)
    if len(node.inputs) >= 3 and node.inputs[2] is not None:
        set_const(model.graph, node, 2, b, names, node.inputs[2].name)
    else:
        node.resize_inputs(3)
        node.replace_input_with(2, new_const(model.graph, names, f"{node.name}.bias", b))


def _latency(model: ir.Model, ctx) -> float:
    from lowbit.analysis.compare import random_input_latency_ms

    return random_input_latency_ms(model, ctx.rng("prune:latency"))
