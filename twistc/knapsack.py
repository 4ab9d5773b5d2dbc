"""Multiple-choice knapsack: one option per group, total weight within a budget, least total cost.

The latency planner uses it with groups = layers, options = candidate forms, weight = latency (or
parameters) and cost = approximation error. Weights are real numbers; they are rounded up onto a
grid of `resolution` steps of the budget, so a solution found here never exceeds the budget.
"""
from __future__ import annotations

import math

import numpy as np


class Unreachable(ValueError):
    """No choice fits the budget; `least` is the smallest total weight any choice reaches."""

    def __init__(self, least: float, budget: float):
        super().__init__(f"the smallest reachable total is {least:.6g}, above the budget {budget:.6g}")
        self.least, self.budget = least, budget


def choose(groups: list[list[tuple[float, float]]], budget: float, resolution: int = 4000) -> list[int]:
    """For each group of (weight, cost) options, the index of the one chosen, minimising the summed cost
    with the summed weight <= budget (dynamic programming over the rounded weights)."""
    least = sum(min(w for w, _ in g) for g in groups)
    if least > budget:
        raise Unreachable(least, budget)
    unit, size = budget / resolution, resolution + 1

    def units(w: float) -> int:  # a weight on the grid, rounded up (with no budget, only weight 0 fits)
        return 0 if w <= 0 else size if unit <= 0 or math.isinf(w) else math.ceil(w / unit - 1e-9)
    best = np.zeros(size)  # best[b]: least cost of the groups so far with rounded weight <= b units
    picks = []
    for group in groups:
        new = np.full(size, np.inf)
        pick = np.full(size, -1, dtype=np.int64)
        for i, (w, c) in enumerate(group):
            u = units(w)
            if u >= size:
                continue
            shifted = np.full(size, np.inf)
            shifted[u:] = best[:size - u] + c
            better = shifted < new
            new[better], pick[better] = shifted[better], i
        best = new
        picks.append(pick)
    if not np.isfinite(best[-1]):  # rounding up made the tightest choices overshoot: the lightest ones fit
        return [min(range(len(g)), key=lambda i: g[i][0]) for g in groups]
    chosen, b = [], resolution
    for group, pick in zip(reversed(groups), reversed(picks)):
        i = int(pick[b])
        chosen.append(i)
        b -= units(group[i][0])
    return chosen[::-1]
