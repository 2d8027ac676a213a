"""The multiple-choice knapsack: one candidate per group, least total score
under a cost budget, solved exactly by dynamic programming.

Given ``G`` groups with ``C`` candidates each, costs ``cost[g, c] >= 0``
(bytes, or a latency) and scores ``score[g, c]`` (the predicted loss
increase; `jaxq.autoquant.scoring`), pick ``choice[g]`` to minimise
``sum_g score[g, choice[g]]`` subject to ``sum_g cost[g, choice[g]] <=
budget``. The scores are additive over groups by construction (each is
measured with only that group quantized), so this is the problem the search
must solve, and a greedy order (most sensitive first) can miss its optimum.

Dynamic programming over the cost discretised into ``units`` of size
``unit``: each cost is rounded UP to whole units, so every solution found
fits the true budget, and the solution is optimal among all configurations
whose rounded costs fit, which includes every configuration whose true cost
is at most ``budget - G * unit`` (the rounding adds less than one unit per
group). With integer costs and ``unit=1`` the solution is exactly optimal
(the property tests compare it with brute force): integer costs up to
``EXACT_UNITS`` are solved so by default, and a budget that the rounding
alone makes infeasible is solved again with finer units. Time and memory are
``O(G * C * units)`` and ``O(G * units)``: 120 groups, 5 candidates and
20,000 units take a fraction of a second in numpy.

One pass also gives the whole Pareto front (`Solution.front`): the table's
last row is the least score for every budget up to the largest, so any
other budget's configuration is a backtrack, not a new solve.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Integer costs up to this capacity are solved with unit 1 (exactly).
EXACT_UNITS = 1 << 20


@dataclasses.dataclass(frozen=True)
class Table:
  """The solved dynamic program (a pure value; see `solve_table`).

  Attributes:
    best: ``(units + 1,)`` least total score with total rounded cost at most
      ``b`` units (inf where no configuration fits).
    choice: ``(G, units + 1)`` int16: the candidate group ``g`` takes in
      that optimum for the first ``g + 1`` groups and ``b`` units.
    weights: ``(G, C)`` the rounded costs in units.
    unit: the cost of one unit.
  """

  best: np.ndarray
  choice: np.ndarray
  weights: np.ndarray
  unit: float

  @property
  def units(self) -> int:
    return self.best.shape[0] - 1

  def backtrack(self, budget: float) -> np.ndarray:
    """``(G,)`` the optimal choice for a budget (its cost, not more)."""
    b = min(int(math.floor(budget / self.unit + 1e-9)), self.units)
    if b < 0 or not np.isfinite(self.best[b]):
      raise ValueError("no configuration fits")
    picks = np.zeros(self.choice.shape[0], np.int64)
    for g in range(self.choice.shape[0] - 1, -1, -1):
      c = int(self.choice[g, b])
      picks[g] = c
      b -= int(self.weights[g, c])
    return picks


def solve_table(cost: np.ndarray, score: np.ndarray, capacity: float,
                units: int = 20000, unit: float | None = None) -> Table:
  """The dynamic program of the multiple-choice knapsack up to ``capacity``.

  Args:
    cost: ``(G, C)`` non-negative costs; ``inf`` marks a candidate a group
      may not take.
    score: ``(G, C)`` finite scores (lower is better; any sign).
    capacity: the largest budget the table answers for.
    units: the number of cost units ``capacity`` is divided into.
    unit: the unit size instead (``units`` then follows); 1 with integer
      costs makes the solution exact.

  Returns:
    The `Table`.
  """
  cost = np.asarray(cost, np.float64)
  score = np.asarray(score, np.float64)
  if cost.shape != score.shape or cost.ndim != 2:
    raise ValueError(f"knapsack: cost {cost.shape} and score {score.shape} "
                     f"must both be (groups, candidates).")
  if np.any(cost < 0) or np.any(np.isnan(cost)):
    raise ValueError("knapsack: costs must be >= 0.")
  if not np.all(np.isfinite(score)):
    raise ValueError("knapsack: scores must be finite.")
  if unit is None:
    integral = np.all(np.where(np.isfinite(cost), cost == np.round(cost),
                               True))
    # Integer costs (bytes) of a small problem: unit 1, exact.
    unit = 1.0 if integral and capacity <= EXACT_UNITS else (
        max(capacity, 1e-300) / units)
  units = int(math.floor(capacity / unit + 1e-9))
  groups, options = cost.shape
  with np.errstate(over="ignore", invalid="ignore"):
    rounded = np.ceil(cost / unit - 1e-9)
  # Costs beyond the capacity (or inf) can never be taken: units + 1.
  weights = np.where(np.isfinite(rounded) & (rounded <= units),
                     np.maximum(rounded, 0), units + 1).astype(np.int64)
  best = np.zeros(units + 1)
  choice = np.zeros((groups, units + 1), np.int16)
  for g in range(groups):
    new = np.full(units + 1, np.inf)
    pick = np.zeros(units + 1, np.int16)
    for c in range(options):
      w = int(weights[g, c])
      if w > units:
        continue
      shifted = np.full(units + 1, np.inf)
      shifted[w:] = best[:units + 1 - w] + score[g, c]
      better = shifted < new
      new = np.where(better, shifted, new)
      pick = np.where(better, c, pick)
    best, choice[g] = new, pick
  return Table(best=best, choice=choice, weights=weights, unit=unit)


def solve(cost: np.ndarray, score: np.ndarray, budget: float,
          units: int = 20000, unit: float | None = None) -> np.ndarray:
  """``(G,)`` the candidate of each group minimising the total score with
  total cost at most ``budget`` (see the module docstring for exactness).

  Raises:
    ValueError: when no configuration fits, naming the least total cost.
  """
  cost = np.asarray(cost, np.float64)
  least = float(np.sum(np.min(cost, axis=1)))
  if least > budget:
    raise ValueError(f"knapsack: no configuration fits the budget {budget:g};"
                     f" the least total cost is {least:g}.")
  table = solve_table(cost, score, budget, units=units, unit=unit)
  try:
    return table.backtrack(budget)
  except ValueError:
    if unit is None and units < EXACT_UNITS:  # Rounding: finer units.
      return solve(cost, score, budget, units=min(4 * units, EXACT_UNITS))
    raise ValueError(
        f"knapsack: no configuration fits the budget {budget:g} once costs "
        f"are rounded up to units of {table.unit:g} (the least total cost is "
        f"{least:g}); raise the budget or the number of units.") from None


def front(table: Table) -> list[tuple[float, np.ndarray]]:
  """The Pareto front of a solved table: ``(budget, choice)`` at every
  budget (in units) where the least score strictly drops, cheapest first."""
  points = []
  last = np.inf
  for b in range(table.units + 1):
    if table.best[b] < last:
      last = table.best[b]
      points.append((b * table.unit, table.backtrack(b * table.unit)))
  return points
