"""Choose one option per expert under a byte budget: a multiple-choice knapsack.

Each expert ``i`` has a weight ``w[i]`` (its share of its layer's routed tokens) and
options ``j`` with a byte cost ``bytes[i][j]`` and an error ``err[i][j]``. The plan
minimises the expected error of a routed token::

    minimise   sum_i w[i] * err[i][choice[i]]
    subject to sum_i bytes[i][choice[i]] <= capacity

:func:`solve_budget` solves it **exactly**: a 0/1 integer program (one binary per
expert and option, one "exactly one option" row per expert, one capacity row) solved by
HiGHS through ``scipy.optimize.milp`` with a relative optimality gap of 0. Among plans of
the optimal error a second solve takes the one with the fewest bytes (so experts no token
reached stay at their cheapest option). :func:`random_fill` spends the same capacity on
experts taken in random order (the baseline a plan is compared with).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sglang.srt.enhanced.errors import EnhancedError

__all__ = ["Option", "expected_error", "random_fill", "solve_budget", "total_bytes"]


@dataclass(frozen=True)
class Option:
    """One way to store an expert: its label, bytes and error."""

    label: str
    nbytes: int
    error: float


def _check(weights: Sequence[float], options: Sequence[Sequence[Option]]) -> None:
    if len(weights) != len(options):
        raise EnhancedError(f"{len(weights)} weights for {len(options)} experts", culprit="weights")
    for i, opts in enumerate(options):
        if not opts:
            raise EnhancedError("an expert has no storage option", culprit=i)


def cheapest(options: Sequence[Sequence[Option]]) -> list[int]:
    """Per expert, the option with the fewest bytes (ties: the lower error)."""
    return [min(range(len(opts)), key=lambda j, o=opts: (o[j].nbytes, o[j].error)) for opts in options]


def total_bytes(options: Sequence[Sequence[Option]], choice: Sequence[int]) -> int:
    return sum(opts[j].nbytes for opts, j in zip(options, choice, strict=True))


def expected_error(weights: Sequence[float], options: Sequence[Sequence[Option]], choice: Sequence[int]) -> float:
    """``sum_i weights[i] * error of the chosen option``."""
    return float(sum(w * opts[j].error for w, opts, j in zip(weights, options, choice, strict=True)))


def solve_budget(weights: Sequence[float], options: Sequence[Sequence[Option]], capacity: int) -> list[int]:
    """The exact optimum: per expert the index of its chosen option.

    Raises ``EnhancedError`` when even the cheapest options exceed ``capacity``.
    """
    _check(weights, options)
    base = cheapest(options)
    minimum = total_bytes(options, base)
    if minimum > capacity:
        raise EnhancedError(f"the budget is below the smallest size {minimum} B", culprit="budget")
    if not options:
        return []
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    cols = [(i, j) for i, opts in enumerate(options) for j in range(len(opts))]
    cost = np.array([weights[i] * options[i][j].error for i, j in cols], dtype=np.float64)
    size = np.array([options[i][j].nbytes for i, j in cols], dtype=np.float64)
    # Bytes above each expert's cheapest option, in units of the largest such step: the
    # capacity row stays well scaled whatever the model size.
    extra = size - np.array([options[i][base[i]].nbytes for i, _ in cols], dtype=np.float64)
    unit = max(float(extra.max()), 1.0)
    one_each = csr_array(
        (np.ones(len(cols)), ([i for i, _ in cols], np.arange(len(cols)))), shape=(len(options), len(cols))
    )

    def solve(objective: np.ndarray, spare: float, max_error: float | None) -> list[int]:
        rows = [LinearConstraint(one_each, 1, 1), LinearConstraint((extra / unit).reshape(1, -1), -np.inf, spare)]
        if max_error is not None:
            rows.append(LinearConstraint(cost.reshape(1, -1), -np.inf, max_error))
        result = milp(objective, constraints=rows, integrality=np.ones(len(cols)), bounds=Bounds(0, 1),
                      options={"mip_rel_gap": 0.0})
        if result.status != 0 or result.x is None:
            raise EnhancedError(f"the budget solver failed: {result.message}", culprit="budget")
        choice = [0] * len(options)
        for k in np.flatnonzero(result.x > 0.5):
            choice[cols[k][0]] = cols[k][1]
        return choice

    spare = (capacity - minimum) / unit
    for _ in range(8):
        best = solve(cost, spare, None)
        best_error = expected_error(weights, options, best)
        choice = solve(extra / unit, spare, best_error * (1 + 1e-9) + 1e-15)
        if expected_error(weights, options, choice) > best_error * (1 + 1e-9) + 1e-15:
            choice = best
        if total_bytes(options, choice) <= capacity:
            return choice
        # Within the solver's feasibility tolerance but over by a few bytes: tighten and retry.
        spare -= (total_bytes(options, choice) - capacity) / unit + 1e-6
    raise EnhancedError("the budget solver could not meet the budget exactly", culprit="budget")


def random_fill(options: Sequence[Sequence[Option]], capacity: int, seed: int = 0) -> list[int]:
    """The same capacity spent on experts in random order.

    Every expert starts at its cheapest option; then, in a random order, each expert takes
    its lowest-error option that still fits what is left.
    """
    choice = cheapest(options)
    left = capacity - total_bytes(options, choice)
    if left < 0:
        raise EnhancedError("the budget is below the smallest size", culprit="budget")
    order = list(range(len(options)))
    random.Random(seed).shuffle(order)
    for i in order:
        opts = options[i]
        now = opts[choice[i]]
        fitting = [j for j, o in enumerate(opts) if o.nbytes - now.nbytes <= left]
        best = min(fitting, key=lambda j: (opts[j].error, opts[j].nbytes))
        left -= opts[best].nbytes - now.nbytes
        choice[i] = best
    return choice
