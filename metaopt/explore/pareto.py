"""Pareto dominance for minimization: every objective lower is better."""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["dominates", "non_dominated_ranks", "pareto_front", "hypervolume"]

Point = Sequence[float]


def dominates(a: Point, b: Point) -> bool:
    """a is no worse than b in every objective and better in at least one (NaN counts as worst)."""
    a_, b_ = [math.inf if math.isnan(x) else x for x in a], [math.inf if math.isnan(x) else x for x in b]
    return all(x <= y for x, y in zip(a_, b_)) and any(x < y for x, y in zip(a_, b_))


def non_dominated_ranks(points: Sequence[Point]) -> list[int]:
    """Each point's front index (0: non-dominated; 1: non-dominated once front 0 is removed; ...). O(n^2) per front."""
    ranks = [-1] * len(points)
    remaining = set(range(len(points)))
    rank = 0
    while remaining:
        front = {i for i in remaining if not any(dominates(points[j], points[i]) for j in remaining if j != i)}
        for i in front:
            ranks[i] = rank
        remaining -= front
        rank += 1
    return ranks


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the non-dominated points."""
    return [i for i, r in enumerate(non_dominated_ranks(points)) if r == 0]


def hypervolume(points: Sequence[Point], reference: Point) -> float:
    """The volume dominated by `points` and bounded by `reference` (points not below the reference in every
    objective add nothing). Exact, by recursive slicing over the first objective: fine for the tens to
    hundreds of points of a search in 2 or 3 objectives."""
    inside = [tuple(p) for p in points if all(x < r for x, r in zip(p, reference))]
    if not inside:
        return 0.0
    if len(reference) == 1:
        return reference[0] - min(p[0] for p in inside)
    inside.sort(key=lambda p: p[0])
    volume = 0.0
    for i, point in enumerate(inside):
        upper = inside[i + 1][0] if i + 1 < len(inside) else reference[0]
        if upper > point[0]:
            volume += (upper - point[0]) * hypervolume([p[1:] for p in inside[: i + 1]], reference[1:])
    return volume
