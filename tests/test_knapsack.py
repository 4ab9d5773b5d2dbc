import itertools

import numpy as np
import pytest

from twistc.knapsack import Unreachable, choose


def _brute(groups, budget):
    best = None
    for pick in itertools.product(*(range(len(g)) for g in groups)):
        w = sum(g[i][0] for g, i in zip(groups, pick))
        c = sum(g[i][1] for g, i in zip(groups, pick))
        if w <= budget and (best is None or c < best[0] - 1e-12):
            best = (c, pick)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    groups = [[(float(w), float(c)) for w, c in zip(rng.uniform(1, 10, k), rng.uniform(0, 1, k))]
              for k in rng.integers(1, 5, size=4)]
    least = sum(min(w for w, _ in g) for g in groups)
    budget = least + rng.uniform(0, 15)
    pick = choose(groups, budget, resolution=20000)
    cost = sum(g[i][1] for g, i in zip(groups, pick))
    assert sum(g[i][0] for g, i in zip(groups, pick)) <= budget
    assert cost <= _brute(groups, budget)[0] + 0.02  # rounding the weights up costs at most a little


def test_unreachable_names_the_least_total():
    with pytest.raises(Unreachable) as e:
        choose([[(3.0, 0.0), (2.0, 1.0)], [(5.0, 0.0)]], budget=6.0)
    assert e.value.least == 7.0


def test_a_budget_only_the_lightest_choices_fit_takes_them_although_rounding_overshoots():
    groups = [[(1.0, 0.0), (0.5, 1.0)], [(1.0, 0.0), (0.4, 1.0)]]  # 0.9 fits 1.0; on a grid of thirds, 4/3
    assert choose(groups, budget=1.0, resolution=3) == [1, 1]


def test_equal_weights_take_the_lower_cost():
    assert choose([[(4.0, 0.0), (2.0, 0.5), (2.0, 0.2)]], budget=3.0) == [2]


def test_a_zero_budget_takes_only_options_of_zero_weight_and_infinite_weights_never_fit():
    groups = [[(0.0, 5.0), (0.001, 1.0)], [(0.0, 3.0), (0.0, 2.0), (2.0, 0.0)]]
    assert choose(groups, 0.0) == [0, 1]
    assert choose([[(0.0, 1.0), (float("inf"), 0.0)]], 5.0) == [0]
