"""Global rank allocation under a MAC budget: greedy descent along each layer's convex hull.

Each layer offers candidates (MACs, error, choice), the first being "keep the layer as it is"
(its original MACs, error 0). The model starts with every layer kept; while its MACs exceed the
target, the move with the smallest error increase per MAC saved is taken. Restricting each layer
to the lower convex hull of its (MACs, error) points makes those moves the hull's successive
edges, whose slopes increase, so a heap of the next edge per layer gives the greedy order in
O(n log n) — the discrete counterpart of a Lagrangian split (every layer ends at the hull point
where the common price λ = Δerror/ΔMACs is reached). When the last move overshoots the target,
that layer takes instead the least-error candidate of its own (on the hull or not) that still
reaches it.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any


@dataclasses.dataclass(frozen=True)
class Candidate:
    macs: int
    error: float
    choice: Any = None


def lower_hull(points: list[Candidate]) -> list[Candidate]:
    """The candidates on the lower convex hull of (MACs, error), from most MACs to fewest, with
    error rising; points that save nothing or cost more error for fewer savings are dropped."""
    ordered = sorted(points, key=lambda c: (-c.macs, c.error))
    hull: list[Candidate] = []
    for c in ordered:
        if hull and c.macs == hull[-1].macs:
            continue  # same MACs, more error
        if hull and c.error < hull[-1].error:
            # fewer MACs *and* less error than the last hull point: it dominates it
            while hull and c.error <= hull[-1].error:
                hull.pop()
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-2], c):
            hull.pop()
        hull.append(c)
    return hull


def _slope(a: Candidate, b: Candidate) -> float:
    """Error added per MAC saved going from a to b (b has fewer MACs)."""
    return (b.error - a.error) / max(a.macs - b.macs, 1)


def allocate(layers: list[list[Candidate]], total_macs: int, target_macs: int) -> tuple[list[Candidate], int]:
    """One candidate per layer so the model's MACs fall to ``target_macs`` at least error.

    ``layers[i][0]`` must be layer i's "keep" candidate; ``total_macs`` is the whole model's
    MACs with every layer kept (layers not offered count in it unchanged). Returns the chosen
    candidates and the resulting model MACs (above the target when it cannot be reached).
    """
    hulls = [lower_hull(options) for options in layers]
    for options, hull in zip(layers, hulls):
        if hull[0] is not options[0]:
            hull.insert(0, options[0])  # keeping must stay possible even if dominated
    position = [0] * len(hulls)
    heap = [(_slope(h[0], h[1]), i) for i, h in enumerate(hulls) if len(h) > 1]
    heapq.heapify(heap)
    total = total_macs
    last = None
    while total > target_macs and heap:
        _, i = heapq.heappop(heap)
        hull, j = hulls[i], position[i]
        last = (i, total)
        total -= hull[j].macs - hull[j + 1].macs
        position[i] = j + 1
        if j + 2 < len(hull):
            heapq.heappush(heap, (_slope(hull[j + 1], hull[j + 2]), i))
    picks = [hull[p] for hull, p in zip(hulls, position)]
    if last is not None and total < target_macs:
        # the last move overshot: any of that layer's candidates (hull or not) between its
        # previous point and the hull's next one that still reaches the target, at least error
        i, before = last
        start = hulls[i][position[i] - 1]
        enough = [c for c in layers[i] if before - (start.macs - c.macs) <= target_macs and c.macs >= picks[i].macs]
        best = min(enough, key=lambda c: (c.error, -c.macs))
        total += best.macs - picks[i].macs
        picks[i] = best
    return picks, total
