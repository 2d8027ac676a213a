"""`auto_quantize`: the most accurate per-layer formats under a budget.

``result = jaxq.auto_quantize(model, variables, batches, loss_fn,
bits_per_weight=4.5, eval_fn=eval_fn)``:

1. Layers and groups (`jaxq.autoquant.layers`, `problem`). The searched
   layers are the model's matmul layers (Dense, DenseGeneral, Einsum; nnx
   Linear, LinearGeneral, Einsum) and convolutions (round to nearest and
   float candidates) whose path matches ``layers``; ``groups`` (regexes) tie layers that must share
   a format: layers matching one regex with the same captured groups form
   one group (``r"(layers_\\d+)/self_attn/[qkv]_proj"``: q, k and v of each
   block). A scanned stack (linen ``nn.scan``, nnx ``nnx.scan``) is one
   path, so one choice for the whole stack.
2. Candidates (`jaxq.autoquant.candidates`): per layer, every candidate is
   checked against its kernel shape and costed in bytes (or by a latency
   table); GPTQ and AWQ ones are built from the layer's float input
   statistics (one capture pass per calibration batch).
3. Scores (`jaxq.autoquant.scoring`): the loss increase of each (group,
   candidate), every configuration a value of the variables of ONE
   compiled program (``result.compilations`` counts its traces).
4. Solve (`jaxq.autoquant.knapsack`): the multiple-choice knapsack by
   dynamic programming, exact for the discretised costs, which also gives
   the predicted Pareto front.
5. Verify (`jaxq.autoquant.verify`): ``eval_fn(apply_fn, variables)`` (the
   real metric, on held-out data: perplexity, mean cosine...) of the
   ``verify_top`` best solved configurations within the budget, of the
   mixture at each uniform configuration's bytes and of the uniform
   configurations themselves, all on the same compiled program; the best
   measured within the budget is returned; then its rules end to end as any rules are used (`jaxq.calibrate` for
   static act ranges, `jaxq.convert`, the serve-mode model).

The result's ``rules`` (a `jaxq.Rule` per group, float groups as skip rules,
then ``base_rules``) and ``variables`` (for the model quantized by them in
calibrate mode, as `jaxq.gptq` returns: GPTQ/AWQ kernels and their fixed
``weight_range`` / ``act_smooth``; bf16 groups' kernels rounded to bf16) go
to `jaxq.calibrate`, `jaxq.convert`, `jaxq.save`/`load` like any others.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
import tqdm

from jaxq import analysis
from jaxq.autoquant import candidates as cand_lib
from jaxq.autoquant import knapsack
from jaxq.autoquant import layers as layers_lib
from jaxq.autoquant import scoring
from jaxq.autoquant import verify as verify_lib
from jaxq.autoquant.candidates import LayerWeight
from jaxq.autoquant.layers import Candidates
from jaxq.autoquant.problem import Problem
from jaxq.autoquant.problem import make_problem
from jaxq.autoquant.results import AutoQuantResult
from jaxq.autoquant.results import FrontPoint
from jaxq.autoquant.results import GroupChoice
from jaxq.autoquant.results import TRIED
from jaxq.flax import batch as batch_lib
from jaxq.flax.adapter import ModelAdapter
from jaxq.flax.rules import Rule

ApplyFn = Callable[..., Any]
EvalFn = Callable[[ApplyFn, Any], float]
Proxy = Literal["loss", "fisher"]
WHAT = "auto_quantize"


def auto_quantize(model: Any, variables: Any, data: Iterable[Any],
                  loss_fn: scoring.LossFn, *,
                  candidates: Candidates | None = None,
                  layers: str | None = None,
                  groups: Sequence[str] = (),
                  budget_bytes: float | None = None,
                  bits_per_weight: float | None = None,
                  latency: float | None = None,
                  latency_table: Mapping[str, float] | None = None,
                  proxy: Proxy = "loss",
                  eval_fn: EvalFn | None = None,
                  higher_is_better: bool = True,
                  base_rules: Sequence[Rule] = (),
                  verify: bool = True,
                  verify_uniform: bool = True,
                  verify_top: int = 3,
                  score_data: Iterable[Any] | None = None,
                  units: int = 20000,
                  progress: bool = True) -> AutoQuantResult:
  """Chooses a format per layer (group) to minimise the loss under a budget.

  Args:
    model: the float linen or nnx model.
    variables: linen: ``{"params": ...}``; nnx: an ``nnx.State`` or None.
    data: calibration batches (`jaxq.flax.batch` convention), for the input
      statistics of GPTQ/AWQ, the scores and static activation ranges.
    loss_fn: ``(output, reference, batch) -> scalar``, lower is better:
      ``output`` the scored model's on ``batch``, ``reference`` the float
      model's (e.g. a KL divergence or ``1 - cosine`` to it, or a
      next-token NLL that ignores it; `kl_loss`, `cosine_loss`,
      `nll_loss`). Summed over the batches.
    candidates: the candidates of every searched layer, or regex ->
      candidates (first match; layers matching none stay float and are not
      searched). Default: `default_candidates()` (bf16, W8, W4 g32/g64/
      per-channel with GPTQ).
    layers: a regex restricting the searched matmul and convolution layers
      (None: all).
    groups: regexes of layers that must share a format (see the module
      docstring); other layers are groups of one.
    budget_bytes, bits_per_weight, latency: the budget, exactly one: the
      weight bytes of the searched layers, the same as bits per weight
      (``8 * bytes / weights``), or a latency in ``latency_table``'s units.
    latency_table: candidate name -> cost per weight (e.g. seconds per
      million weights measured on the device); required with ``latency``.
    proxy: ``"loss"`` (measured, the default) or ``"fisher"`` (second
      order, one backward pass per batch); see `jaxq.autoquant.scoring`.
    eval_fn: ``(apply_fn, variables) -> float``, the real metric on
      held-out data (as `jaxq.sensitivity`'s); default: the calibration
      loss (lower is better).
    higher_is_better: ``eval_fn``'s direction.
    base_rules: rules for the layers not searched (e.g. an int8 embedding),
      appended after the chosen ones.
    verify: run the chosen rules end to end (`jaxq.convert`, serve mode).
    verify_uniform: evaluate every uniform configuration, and the mixture
      at its bytes; a uniform configuration within the budget whose metric
      beats the mixtures' is then the one returned (its label says so).
    verify_top: the number of solved configurations within the budget (the
      front's best by the proxy, from the budget down) whose real metric
      is measured; the best measured is returned. The proxy's optimum is
      exact for the proxy, not for the metric: this is where the metric
      decides among the few best.
    score_data: the batches the scores (and, without ``eval_fn``, the
      metric) are computed on, when fewer than ``data`` (whose statistics
      GPTQ and AWQ candidates are built from) are enough; default ``data``.
    units: cost units of the knapsack (see `jaxq.autoquant.knapsack`).
    progress: progress bars.

  Returns:
    An `AutoQuantResult`.

  Raises:
    ValueError: a budget no configuration meets (naming the least
      achievable), a candidate that does not fit a layer's kernel (naming
      layer, axis and size), a NaN/inf loss or metric (naming what gave
      it), bad arguments.
  """
  started = time.perf_counter()
  seconds: dict[str, float] = {}
  adapter = analysis.analysed(model, variables, WHAT)
  batches = batch_lib.check_batches(data, WHAT)
  if proxy not in ("loss", "fisher"):
    raise ValueError(f"{WHAT}: proxy must be 'loss' or 'fisher', got "
                     f"{proxy!r}.")
  if verify_top < 1:
    raise ValueError(f"{WHAT}: verify_top must be >= 1, got {verify_top}.")
  if candidates is None:
    candidates = cand_lib.default_candidates()
  problem = make_problem(
      layers_lib.searched_layers(adapter, batches[0], layers), candidates,
      groups, budget_bytes=budget_bytes, bits_per_weight=bits_per_weight,
      latency=latency, latency_table=latency_table)
  act_paths = tuple(p for p, cs in problem.per_layer.items()
                    if any(c.act is not None for c in cs))
  if act_paths and proxy == "fisher":
    raise ValueError(f"{WHAT}: proxy='fisher' scores weights only; the "
                     f"candidates of {act_paths[0]!r} quantize activations "
                     f"(use proxy='loss').")

  t0 = time.perf_counter()
  kernels = {p: adapter.get_weight(p)[0] for p in problem.infos}
  built = _build(adapter, batches, problem, kernels, progress)
  seconds["candidates"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  scored = (batches if score_data is None
            else batch_lib.check_batches(score_data, WHAT))
  scorer = scoring.Scorer.create(
      verify_lib.scored_model(adapter, batches, problem.per_layer, act_paths,
                              tuple(base_rules)),
      loss_fn, scored, scoring.outputs(adapter, scored), act_paths)
  # The measured proxy's zero (and the metric without an eval_fn).
  base_loss = (scoring.check_finite(scorer.measure(scorer.base),
                                    "calibration loss of the float model")
               if proxy == "loss" or eval_fn is None else math.nan)
  fisher_counter = [0]
  fisher = (scoring.fisher_diagonals(scorer, loss_fn, list(problem.infos),
                                     fisher_counter)
            if proxy == "fisher" else None)
  score = _scores(problem, scorer, built, kernels, fisher, base_loss,
                  progress)
  seconds["scores"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  cost = problem.cost
  capacity = max(problem.budget, float(np.sum(np.max(
      np.where(np.isfinite(cost), cost, 0), axis=1))))
  # The front from one table up to the largest cost; the choice from one
  # up to the budget (finer units).
  table = knapsack.solve_table(cost, score, capacity, units=units)
  picks = knapsack.solve(cost, score, problem.budget, units=units)
  solved = knapsack.front(table)
  predicted_front = tuple(
      (problem.bytes_of(choice), _total(score, choice))
      for _, choice in solved)
  seconds["solve"] = time.perf_counter() - t0
  seconds["search"] = time.perf_counter() - started

  t0 = time.perf_counter()
  if eval_fn is None:
    float_metric, higher_is_better = base_loss, False
  else:
    float_metric = scoring.check_finite(
        scoring.evaluate(eval_fn, adapter.apply_fn(), adapter.variables),
        "metric of the float model")
  sign = -1.0 if higher_is_better else 1.0

  def point(label: str, choice: Sequence[int]) -> FrontPoint:
    size = problem.bytes_of(choice)
    counts: dict[str, int] = {}
    for g in range(len(problem.groups)):
      n = problem.candidate(g, choice[g]).name
      counts[n] = counts.get(n, 0) + 1
    variables_c = _configuration(problem, scorer, built, choice)
    value = (scorer.measure(variables_c) if eval_fn is None else
             scoring.evaluate(eval_fn, scorer.apply_fn, variables_c))
    value = scoring.check_finite(value, f"metric of {label} ({size:,d} "
                                        f"bytes, {8.0 * size / problem.weights:.3f}"
                                        f" bits per weight)")
    return FrontPoint(label, size, 8.0 * size / problem.weights,
                      _total(score, choice), value, counts,
                      tuple(int(c) for c in choice))

  # The best few solved configurations within the budget, by the metric.
  within = [c for b, c in solved if b <= problem.budget + 1e-9]
  tried = [picks] + [c for c in reversed(within)
                     if not np.array_equal(c, picks)][:verify_top - 1]
  options = [point("mixture", c) for c in tried]
  front = list(options)
  if verify_uniform:
    for name, choice in problem.uniform().items():
      uniform = point(name, choice)
      front.append(uniform)
      if problem.cost_of(choice) <= problem.budget + 1e-9:
        options.append(uniform)
      size = problem.cost_of(choice)
      if size >= problem.least and not math.isclose(size, problem.budget):
        try:
          front.append(point("mixture", table.backtrack(size)))
        except ValueError:
          pass
  chosen = min(options, key=lambda p: (sign * p.metric, p.nbytes))
  # The other configurations tried at the budget stay in the table, named.
  front = [dataclasses.replace(p, label=TRIED) if p.label == "mixture"
           and p is not chosen and any(p is o for o in options) else p
           for p in front]
  picks = np.asarray(chosen.choice)
  front.sort(key=lambda p: (p.nbytes, p.label))
  chosen_cands = [problem.candidate(g, picks[g])
                  for g in range(len(problem.groups))]
  rules, result_model, result_variables = verify_lib.materialize(
      adapter, problem.groups, chosen_cands, built, problem.infos,
      tuple(base_rules), batches[0])
  served = None
  if verify and eval_fn is not None:
    served = scoring.check_finite(
        verify_lib.served_metric(adapter, rules, result_variables, batches,
                                 eval_fn),
        "metric of the chosen rules, served")
  seconds["verify"] = time.perf_counter() - t0
  choices = tuple(
      GroupChoice(name=name, paths=paths, candidate=c,
                  nbytes=int(sum(problem.nbytes[(p, c.name)] for p in paths)),
                  score=float(score[g, int(picks[g])]),
                  scores={k.name: float(score[g, j])
                          for j, k in enumerate(problem.group_cands[g])},
                  costs={k.name: float(cost[g, j])
                         for j, k in enumerate(problem.group_cands[g])})
      for g, ((name, paths), c) in enumerate(zip(problem.groups,
                                                  chosen_cands)))
  return AutoQuantResult(
      rules=rules, variables=result_variables, model=result_model,
      choices=choices, budget=problem.budget, nbytes=chosen.nbytes,
      weights=problem.weights, predicted=chosen.predicted,
      metric=chosen.metric, served_metric=served, float_metric=float_metric,
      higher_is_better=higher_is_better, front=tuple(front),
      predicted_front=predicted_front, label=chosen.label,
      compilations=(scorer.compilations if proxy == "loss"
                    else fisher_counter[0]),
      seconds=seconds, proxy=proxy)


def _total(score: np.ndarray, choice: Sequence[int]) -> float:
  return float(sum(score[g, int(c)] for g, c in enumerate(choice)))


def _build(adapter: ModelAdapter, batches: Sequence[Any], problem: Problem,
           kernels: Mapping[str, Any], progress: bool
           ) -> dict[tuple[str, str], LayerWeight]:
  """``(path, candidate name) -> LayerWeight`` of every layer's candidates
  (GPTQ/AWQ from the layer's float input statistics)."""
  need = [p for p, cs in problem.per_layer.items()
          if cand_lib.needs_stats(cs)]
  stats, shapes = (layers_lib.input_stats(adapter, batches, problem.infos,
                                          need) if need else ({}, {}))
  built = {}
  for path in tqdm.tqdm(problem.infos, desc=f"{WHAT}: candidates",
                        unit="layer", disable=not progress):
    for c in problem.per_layer[path]:
      try:
        built[(path, c.name)] = cand_lib.build(
            c, problem.infos[path], kernels[path], stats.get(path),
            shapes.get(path))
      except ValueError as e:
        raise ValueError(f"{WHAT}: layer {path!r}, candidate {c.name!r}: {e}"
                         ) from None
  return built


def _scores(problem: Problem, scorer: scoring.Scorer,
            built: Mapping[tuple[str, str], LayerWeight],
            kernels: Mapping[str, Any], fisher: Mapping[str, Any] | None,
            base_loss: float, progress: bool) -> np.ndarray:
  """``(G, C)`` the proxy's loss increase of each group's candidate, the
  group alone in that format (0 for float32 and past a group's own
  candidates)."""
  score = np.zeros_like(problem.cost)
  bar = tqdm.tqdm(total=sum(len(c) for c in problem.group_cands),
                  desc=f"{WHAT}: scores", unit="score",
                  disable=not progress)
  for g, ((name, paths), cands) in enumerate(zip(problem.groups,
                                                 problem.group_cands)):
    for j, c in enumerate(cands):
      bar.update()
      if c.exact:
        continue
      if fisher is not None:
        value = sum(float(scoring.fisher_score(
            fisher[p], kernels[p], built[(p, c.name)].effective()))
                    for p in paths)
      else:
        variables_c = scorer.variables(
            {p: built[(p, c.name)].effective() for p in paths},
            paths if c.act is not None else ())
        value = scorer.measure(variables_c) - base_loss
      score[g, j] = scoring.check_finite(
          value, f"score of group {name!r} as {c.name!r}")
  bar.close()
  return score


def _configuration(problem: Problem, scorer: scoring.Scorer,
                   built: Mapping[tuple[str, str], LayerWeight],
                   choice: Sequence[int]) -> Any:
  """The scored model's variables with every group in its chosen format."""
  kernels, act_on = {}, []
  for g, (_, paths) in enumerate(problem.groups):
    c = problem.candidate(g, choice[g])
    for p in paths:
      if not c.exact:
        kernels[p] = built[(p, c.name)].effective()
      if c.act is not None:
        act_on.append(p)
  return scorer.variables(kernels, act_on)
