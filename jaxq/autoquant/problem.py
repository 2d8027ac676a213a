"""The search problem: which layers, in which groups, at what cost.

`make_problem` turns a model's layers, the candidates and the budget into a
`Problem`: the groups (`jaxq.autoquant.layers.group_layers`), each group's
candidates checked against every kernel shape, the ``(G, C)`` cost table
(bytes as `jaxq.convert` stores them, or a latency per weight from a
table) and the budget in those units. Everything that can be refused
before any model runs is refused here, naming the layer, candidate or
budget.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from jaxq.autoquant import candidates as cand_lib
from jaxq.autoquant import layers as layers_lib
from jaxq.autoquant.candidates import Candidate
from jaxq.flax.rules import LayerInfo

WHAT = "auto_quantize"


@dataclasses.dataclass(frozen=True)
class Problem:
  """A multiple-choice knapsack over groups of layers.

  Attributes:
    infos: searched layer path -> `LayerInfo`, in model order.
    per_layer: path -> its candidates.
    groups: ``(name, paths)`` per group, in model order (``G`` groups).
    group_cands: each group's candidates (shared by its layers).
    nbytes: ``(path, candidate name) -> bytes`` of that layer's weight.
    cost: ``(G, C)`` cost of each group's candidate (bytes or latency;
      ``inf`` past a group's own candidates).
    budget: the budget in the cost's units.
    weights: the number of weights in the searched layers.
    latency: whether costs are latencies (else bytes).
  """

  infos: Mapping[str, LayerInfo]
  per_layer: Mapping[str, tuple[Candidate, ...]]
  groups: tuple[tuple[str, tuple[str, ...]], ...]
  group_cands: tuple[tuple[Candidate, ...], ...]
  nbytes: Mapping[tuple[str, str], int]
  cost: np.ndarray
  budget: float
  weights: int
  latency: bool

  @property
  def least(self) -> float:
    """The least total cost of any configuration."""
    return float(np.sum(np.min(self.cost, axis=1)))

  def candidate(self, g: int, c: int) -> Candidate:
    return self.group_cands[g][int(c)]

  def bytes_of(self, choice: Sequence[int]) -> int:
    """``(G,)`` choice -> weight bytes of the searched layers."""
    return int(sum(self.nbytes[(p, self.candidate(g, choice[g]).name)]
                   for g, (_, paths) in enumerate(self.groups)
                   for p in paths))

  def cost_of(self, choice: Sequence[int]) -> float:
    return float(sum(self.cost[g, int(c)] for g, c in enumerate(choice)))

  def uniform(self) -> dict[str, list[int]]:
    """Candidate name -> the choice giving every group that candidate, for
    the names every group has."""
    out = {}
    for name in [c.name for c in self.group_cands[0]]:
      names = [[c.name for c in cs] for cs in self.group_cands]
      if all(name in n for n in names):
        out[name] = [n.index(name) for n in names]
    return out


def make_problem(every: Mapping[str, LayerInfo],
                 candidates: layers_lib.Candidates,
                 groups: Sequence[str], *,
                 budget_bytes: float | None = None,
                 bits_per_weight: float | None = None,
                 latency: float | None = None,
                 latency_table: Mapping[str, float] | None = None) -> Problem:
  """The `Problem` of the layers ``every`` (path -> info, model order).

  Raises:
    ValueError: no layer with candidates; layers of one group with
      different candidates; a candidate that does not fit a layer's kernel
      (`candidates.check_fits`: layer, axis, size); a latency table without
      a candidate; a budget no configuration meets (naming the budget and
      the least achievable, in bits per weight too).
  """
  given = [b is not None for b in (budget_bytes, bits_per_weight, latency)]
  if sum(given) != 1:
    raise ValueError(f"{WHAT}: give exactly one of budget_bytes, "
                     f"bits_per_weight and latency.")
  if latency is not None and latency_table is None:
    raise ValueError(f"{WHAT}: a latency budget needs latency_table "
                     f"(candidate name -> cost per weight).")
  per_layer: dict[str, tuple[Candidate, ...]] = {}
  for path in every:
    cands = layers_lib.candidates_of(candidates, path)
    if cands is not None:
      layers_lib.check_candidates(cands, repr(path))
      per_layer[path] = cands
  if not per_layer:
    raise ValueError(f"{WHAT}: no layer has candidates; the searched layers "
                     f"are {sorted(every)}.")
  infos = {p: i for p, i in every.items() if p in per_layer}
  group_list = layers_lib.group_layers(infos, groups)
  group_cands = []
  for name, paths in group_list:
    cands = per_layer[paths[0]]
    for p in paths[1:]:
      if per_layer[p] != cands:
        raise ValueError(f"{WHAT}: the layers of group {name!r} must share "
                         f"their candidates; {paths[0]!r} and {p!r} differ.")
    group_cands.append(cands)
  for path, cands in per_layer.items():
    conv = infos[path].module_type.endswith(layers_lib.CONV_TYPES)
    for c in cands:
      cand_lib.check_fits(c, path, tuple(infos[path].weight_shape))
      if conv and c.algorithm != "rtn":
        raise ValueError(f"{WHAT}: candidate {c.name!r} does not fit layer "
                         f"{path!r}: {c.algorithm} takes matmul layers, not "
                         f"a {infos[path].module_type} (use round to "
                         f"nearest there).")
  numel = {p: math.prod(i.weight_shape) * (i.stacked or 1)
           for p, i in infos.items()}
  weights = sum(numel.values())
  nbytes = {(p, c.name): cand_lib.nbytes(c, tuple(infos[p].weight_shape),
                                         infos[p].stacked)
            for p, cands in per_layer.items() for c in cands}
  if latency is not None:
    missing = sorted({c.name for cs in per_layer.values() for c in cs}
                     - set(latency_table))
    if missing:
      raise ValueError(f"{WHAT}: latency_table has no entry for candidates "
                       f"{missing}.")
    cost_of = {(p, c.name): latency_table[c.name] * numel[p]
               for p, cands in per_layer.items() for c in cands}
    budget = float(latency)
  else:
    cost_of = {k: float(v) for k, v in nbytes.items()}
    budget = float(budget_bytes if budget_bytes is not None
                   else bits_per_weight * weights / 8.0)
  if not math.isfinite(budget) or budget < 0:
    raise ValueError(f"{WHAT}: the budget must be a finite number >= 0, got "
                     f"{budget!r}.")
  width = max(len(c) for c in group_cands)
  cost = np.full((len(group_list), width), np.inf)
  for g, ((_, paths), cands) in enumerate(zip(group_list, group_cands)):
    for j, c in enumerate(cands):
      cost[g, j] = sum(cost_of[(p, c.name)] for p in paths)
  problem = Problem(infos, per_layer, tuple(group_list), tuple(group_cands),
                    nbytes, cost, budget, weights, latency is not None)
  least = problem.least
  if least > budget:
    unit = "latency units" if problem.latency else "bytes"
    bits = ("" if problem.latency else
            f" ({8.0 * budget / weights:.3f} bits per weight; the least is "
            f"{8.0 * least / weights:.3f})")
    raise ValueError(f"{WHAT}: no choice of candidates meets the budget "
                     f"{budget:,.6g} {unit}; the least achievable is "
                     f"{least:,.6g} {unit}{bits}.")
  return problem
