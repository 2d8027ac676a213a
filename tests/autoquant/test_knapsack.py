"""`jaxq.autoquant.knapsack`: the exact multiple-choice knapsack, against
brute force on small cases."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxq.autoquant import knapsack


def brute_force(cost, score, budget):
  """The least total score over every configuration fitting ``budget``
  (None when none fits)."""
  best = None
  for choice in itertools.product(*(range(c.shape[0]) for c in cost)):
    total = sum(cost[g][c] for g, c in enumerate(choice))
    if total <= budget:
      value = sum(score[g][c] for g, c in enumerate(choice))
      best = value if best is None else min(best, value)
  return best


@st.composite
def problems(draw, integer=True):
  groups = draw(st.integers(1, 4))
  options = draw(st.integers(1, 4))
  cost_values = (st.integers(0, 30) if integer
                 else st.floats(0.0, 30.0, allow_nan=False))
  cost = np.array(draw(st.lists(st.lists(cost_values, min_size=options,
                                         max_size=options),
                                min_size=groups, max_size=groups)), float)
  score = np.array(draw(st.lists(st.lists(
      st.floats(-5.0, 5.0, allow_nan=False), min_size=options,
      max_size=options), min_size=groups, max_size=groups)), float)
  budget = draw(st.integers(0, 100)) if integer else draw(
      st.floats(0.0, 100.0))
  return cost, score, budget


@given(problems())
def test_integer_costs_are_solved_exactly(problem):
  cost, score, budget = problem
  best = brute_force(cost, score, budget)
  if best is None:
    with pytest.raises(ValueError, match="least total cost"):
      knapsack.solve(cost, score, budget)
    return
  choice = knapsack.solve(cost, score, budget)
  assert cost[np.arange(len(choice)), choice].sum() <= budget
  np.testing.assert_allclose(score[np.arange(len(choice)), choice].sum(),
                             best, atol=1e-9)


@given(problems(integer=False))
def test_discretised_costs_fit_and_beat_every_config_a_unit_per_group_below(
    problem):
  cost, score, budget = problem
  units = 50
  unit = budget / units if budget > 0 else 1.0
  try:
    choice = knapsack.solve(cost, score, budget, units=units,
                            unit=unit if budget > 0 else None)
  except ValueError:
    # Only when nothing fits once rounded: nothing fits a unit per group
    # below the budget either.
    assert brute_force(cost, score, budget - cost.shape[0] * unit) is None
    return
  rows = np.arange(len(choice))
  assert cost[rows, choice].sum() <= budget + 1e-9
  lower = brute_force(cost, score, budget - cost.shape[0] * unit)
  if lower is not None:
    assert score[rows, choice].sum() <= lower + 1e-9


@given(problems())
def test_the_front_is_optimal_at_each_of_its_budgets(problem):
  cost, score, _ = problem
  capacity = float(cost.max(axis=1).sum())
  table = knapsack.solve_table(cost, score, capacity, unit=1.0)
  points = knapsack.front(table)
  assert points
  previous = np.inf
  rows = np.arange(cost.shape[0])
  for budget, choice in points:
    value = score[rows, choice].sum()
    assert cost[rows, choice].sum() <= budget
    np.testing.assert_allclose(value, brute_force(cost, score, budget),
                               atol=1e-9)
    assert value < previous
    previous = value


def test_infinite_cost_is_never_chosen_and_bad_input_raises():
  cost = np.array([[1.0, np.inf], [2.0, 1.0]])
  score = np.array([[1.0, -10.0], [0.0, 1.0]])
  choice = knapsack.solve(cost, score, 10)
  assert choice[0] == 0
  with pytest.raises(ValueError, match="finite"):
    knapsack.solve(cost, np.array([[np.nan, 0], [0, 0]]), 10)
  with pytest.raises(ValueError, match=">= 0"):
    knapsack.solve(-cost, score, 10)
