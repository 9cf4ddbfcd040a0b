"""The per-expert budget solver against brute force over every combination."""

from __future__ import annotations

import itertools
import random

import pytest

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.expert_budget import (
    Option,
    expected_error,
    random_fill,
    solve_budget,
    total_bytes,
)


def _instance(rng: random.Random, n: int) -> tuple[list[float], list[list[Option]]]:
    weights = [rng.choice([0.0, rng.random()]) for _ in range(n)]
    options = []
    for _ in range(n):
        size = rng.randint(50, 200)
        # bf16 > fp8 > int4 in bytes, the reverse in error; sizes differ per expert.
        options.append([
            Option("bf16", 4 * size, 0.0),
            Option("fp8", 2 * size + rng.randint(0, 9), rng.uniform(0.01, 0.05)),
            Option("int4", size + rng.randint(0, 9), rng.uniform(0.06, 0.2)),
        ])
    return weights, options


def _brute_force(weights, options, capacity) -> tuple[float, int]:
    best = None
    for choice in itertools.product(*(range(len(o)) for o in options)):
        nbytes = total_bytes(options, choice)
        if nbytes <= capacity:
            key = (round(expected_error(weights, options, choice), 12), nbytes)
            best = key if best is None or key < best else best
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(12))
def test_solver_finds_the_brute_force_optimum(seed: int) -> None:
    rng = random.Random(seed)
    weights, options = _instance(rng, rng.randint(1, 6))
    smallest = sum(min(o.nbytes for o in opts) for opts in options)
    largest = sum(max(o.nbytes for o in opts) for opts in options)
    capacity = rng.randint(smallest, largest)
    choice = solve_budget(weights, options, capacity)
    assert total_bytes(options, choice) <= capacity
    best_error, best_bytes = _brute_force(weights, options, capacity)
    assert expected_error(weights, options, choice) == pytest.approx(best_error, rel=1e-9, abs=1e-12)
    # Among plans of the optimal error the solver takes one of the fewest bytes.
    assert total_bytes(options, choice) == best_bytes


def test_hand_made_optimum() -> None:
    # Two experts of equal size: the busy one gets the budget's one upgrade to fp8, the idle one
    # stays int4 even though a bf16 upgrade of it would fit in an unspent budget.
    options = [[Option("fp8", 20, 0.02), Option("int4", 10, 0.1)]] * 2 + [[Option("bf16", 40, 0.0), Option("int4", 10, 0.1)]]
    weights = [0.9, 0.1, 0.0]
    assert solve_budget(weights, options, 40) == [0, 1, 1]
    assert solve_budget(weights, options, 30) == [1, 1, 1]
    assert solve_budget(weights, options, 1000) == [0, 0, 1]


def test_budget_below_the_minimum_is_refused() -> None:
    options = [[Option("fp8", 20, 0.02), Option("int4", 10, 0.1)]]
    with pytest.raises(EnhancedError) as e:
        solve_budget([1.0], options, 9)
    assert e.value.culprit == "budget" and "10" in str(e.value)


def test_random_fill_spends_within_the_budget() -> None:
    rng = random.Random(3)
    weights, options = _instance(rng, 40)
    smallest = sum(min(o.nbytes for o in opts) for opts in options)
    for capacity in (smallest, smallest + 500, smallest * 3):
        choice = random_fill(options, capacity, seed=1)
        assert total_bytes(options, choice) <= capacity
        assert choice == random_fill(options, capacity, seed=1)
        assert expected_error(weights, options, solve_budget(weights, options, capacity)) <= (
            expected_error(weights, options, choice) + 1e-12
        )
