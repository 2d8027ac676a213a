"""`auto_quantize`: the most accurate per-layer formats under a budget.

``result = jaxq.auto_quantize(model, variables, batches, loss_fn,
bits_per_weight=4.5, eval_fn=eval_fn)``:

1. Layers and groups. The searched layers are the model's matmul layers
   (Dense, DenseGeneral, Einsum; nnx Linear, LinearGeneral, Einsum) whose
   path matches ``layers``; ``groups`` (regexes) tie layers that must share
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
5. Verify: ``eval_fn(apply_fn, variables)`` (the real metric, on held-out
   data: perplexity, mean cosine...) of the chosen configuration, of the
   mixture at each uniform configuration's bytes and of the uniform
   configurations themselves, all on the same compiled program; then the
   chosen rules end to end as any rules are used (`jaxq.calibrate` for
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
import re
import time
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxq import algorithms
from jaxq import analysis
from jaxq import ptq
from jaxq import ptq_layers
from jaxq import flax as jaxq_flax
from jaxq.autoquant import candidates as cand_lib
from jaxq.autoquant import knapsack
from jaxq.autoquant import scoring
from jaxq.autoquant.candidates import Candidate
from jaxq.autoquant.candidates import LayerWeight
from jaxq.convert import convert
from jaxq.flax import adapter as adapter_lib
from jaxq.flax import batch as batch_lib
from jaxq.flax.adapter import ModelAdapter
from jaxq.flax.rules import LayerInfo
from jaxq.flax.rules import Rule
from jaxq.spec import QuantSpec
from jaxq.granularity import PerToken

ApplyFn = Callable[..., Any]
EvalFn = Callable[[ApplyFn, Any], float]
Proxy = Literal["loss", "fisher"]
Candidates = Sequence[Candidate] | Mapping[str, Sequence[Candidate]]
WHAT = "auto_quantize"


# --------------------------------------------------------------------------
# Results.


@dataclasses.dataclass(frozen=True)
class GroupChoice:
  """One group's row of the report.

  Attributes:
    name: the group's name (its layer path, or the regex's captured groups).
    paths: its layers, in model order.
    candidate: the chosen candidate.
    nbytes: the group's weight bytes in that format.
    score: its predicted loss increase (the proxy).
    scores: candidate name -> score, for every candidate of the group.
    costs: candidate name -> bytes (or latency).
  """

  name: str
  paths: tuple[str, ...]
  candidate: Candidate
  nbytes: int
  score: float
  scores: Mapping[str, float]
  costs: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class FrontPoint:
  """One configuration on the bytes-vs-metric plane.

  Attributes:
    label: ``"mixture"`` or the uniform candidate's name (or ``"float"``).
    nbytes: weight bytes of the searched layers.
    bits_per_weight: ``8 * nbytes / weights``.
    predicted: the summed proxy score.
    metric: ``eval_fn`` of the configuration (None when not verified).
    counts: candidate name -> number of groups in it.
  """

  label: str
  nbytes: int
  bits_per_weight: float
  predicted: float
  metric: float | None
  counts: Mapping[str, int]


@dataclasses.dataclass(frozen=True)
class AutoQuantResult:
  """What `auto_quantize` chose, and the evidence.

  Attributes:
    rules: a `jaxq.Rule` per group (skip rules for float groups), then the
      ``base_rules``.
    variables: the variables of the model quantized by ``rules`` in
      calibrate mode (`model`), as `jaxq.gptq` returns them.
    model: that calibrate-mode model (`jaxq.quantize_model(model, rules,
      mode="calibrate")`; nnx: the copy ``variables`` belong to).
    choices: one `GroupChoice` per group, in model order.
    budget: the budget in cost units (bytes, or the latency table's units).
    nbytes: the chosen configuration's weight bytes (searched layers).
    weights: the number of weights in the searched layers.
    predicted: the summed score of the choice.
    metric: ``eval_fn`` of the choice on the one compiled program (the
      calibration loss when no ``eval_fn`` was given).
    served_metric: ``eval_fn`` of the chosen rules run end to end
      (`jaxq.convert`, serve mode), or None when not verified.
    float_metric: ``eval_fn`` of the float model.
    higher_is_better: the metric's direction.
    front: the verified points: uniform configurations and the mixture at
      each one's bytes (and at the budget), by bytes.
    predicted_front: ``(nbytes, predicted score)`` of the whole solved
      front (unverified).
    compilations: traces of the scoring program: the loss pass
      (``"loss"``) or the gradient pass (``"fisher"``); 1 for same-shaped
      batches, the count a test asserts.
    seconds: time per phase (``"candidates"``, ``"scores"``, ``"solve"``,
      ``"verify"``, ``"search"`` = candidates + scores + solve).
    proxy: ``"loss"`` or ``"fisher"``.
  """

  rules: tuple[Rule, ...]
  variables: Any
  model: Any
  choices: tuple[GroupChoice, ...]
  budget: float
  nbytes: int
  weights: int
  predicted: float
  metric: float
  served_metric: float | None
  float_metric: float
  higher_is_better: bool
  front: tuple[FrontPoint, ...]
  predicted_front: tuple[tuple[int, float], ...]
  compilations: int
  seconds: Mapping[str, float]
  proxy: str

  @property
  def bits_per_weight(self) -> float:
    return 8.0 * self.nbytes / self.weights

  def report(self) -> str:
    """The per-group table: format, bytes, score."""
    width = max([5] + [len(c.name) for c in self.choices])
    fmt = max([6] + [len(c.candidate.name) for c in self.choices])
    lines = [f"{'group':{width}s}  {'format':{fmt}s}  {'bytes':>11s}  "
             f"{'score':>10s}  layers"]
    for c in self.choices:
      lines.append(f"{c.name:{width}s}  {c.candidate.name:{fmt}s}  "
                   f"{c.nbytes:11,d}  {c.score:10.3g}  {len(c.paths)}")
    return "\n".join(lines)

  def front_table(self) -> str:
    """The verified Pareto points as a markdown table."""
    lines = ["| configuration | bytes | bits/weight | predicted | metric |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for p in self.front:
      metric = "" if p.metric is None else f"{p.metric:.4f}"
      lines.append(f"| {p.label} | {p.nbytes:,d} | {p.bits_per_weight:.3f} "
                   f"| {p.predicted:.4g} | {metric} |")
    return "\n".join(lines)

  def __str__(self) -> str:
    served = ("" if self.served_metric is None
              else f", served end to end {self.served_metric:.6g}")
    return (f"auto_quantize: {len(self.choices)} groups, "
            f"{self.nbytes:,d} bytes ({self.bits_per_weight:.3f} bits per "
            f"weight) within {self.budget:,.0f}; metric {self.metric:.6g} "
            f"(float {self.float_metric:.6g}){served}; "
            f"{self.compilations} compilation(s) for scoring, search "
            f"{self.seconds.get('search', 0.0):.1f} s\n{self.front_table()}")

  def plot(self, path: str | None = None, title: str = "", ax: Any = None
           ) -> Any:
    """Bytes (bits per weight) against the metric: the uniform
    configurations, the mixtures and the chosen one. Saved to ``path``
    when given; returns the matplotlib figure."""
    import matplotlib
    if path is not None and ax is None:
      matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = None
    if ax is None:
      fig, ax = plt.subplots(figsize=(6, 4))
    uniform = [p for p in self.front if p.label != "mixture"
               and p.metric is not None]
    mixed = sorted((p for p in self.front if p.label == "mixture"
                    and p.metric is not None), key=lambda p: p.nbytes)
    ax.plot([p.bits_per_weight for p in mixed], [p.metric for p in mixed],
            "o-", label="auto_quantize mixture")
    for p in uniform:
      ax.plot(p.bits_per_weight, p.metric, "s")
      ax.annotate(p.label, (p.bits_per_weight, p.metric), fontsize=7,
                  textcoords="offset points", xytext=(4, 4))
    ax.plot([self.bits_per_weight], [self.metric], "*", markersize=14,
            label="chosen")
    ax.axhline(self.float_metric, color="gray", linestyle="--",
               linewidth=0.8, label="float")
    ax.set_xlabel("bits per weight (searched layers)")
    ax.set_ylabel("metric")
    ax.set_title(title or "auto_quantize: Pareto front")
    ax.legend(fontsize=7)
    if fig is not None:
      fig.tight_layout()
      if path is not None:
        fig.savefig(path, dpi=120)
    return fig if fig is not None else ax.figure


# --------------------------------------------------------------------------
# Layers, groups and candidates.


def _layers(adapter: ModelAdapter, batch: Any, layers: str | None
            ) -> dict[str, LayerInfo]:
  """The searched layers, in model order: matmul layers matching
  ``layers`` (their LayerInfo from an act-only probe, which changes no
  weight)."""
  probe = adapter.quantize([Rule(r".*", act=QuantSpec("int8", PerToken()))],
                           "calibrate")
  every = probe.ordered_layers(batch)
  chosen = {}
  for path, info in every.items():
    if layers is not None and re.fullmatch(layers, path) is None:
      continue
    matmul = info.module_type in ptq_layers.MATMUL_TYPES or any(
        info.module_type.endswith(t) for t in ptq_layers.MATMUL_TYPES)
    if matmul:
      chosen[path] = info
  if not chosen:
    raise ValueError(f"{WHAT}: no matmul layer (Dense, DenseGeneral, Einsum, "
                     f"Linear, LinearGeneral) matches layers={layers!r}; the "
                     f"model's layers are {sorted(every)}.")
  return chosen


def _candidates_of(candidates: Candidates, path: str
                   ) -> tuple[Candidate, ...] | None:
  if isinstance(candidates, Mapping):
    for regex, cands in candidates.items():
      if re.fullmatch(regex, path):
        return tuple(cands)
    return None
  return tuple(candidates)


def _check_candidates(cands: Sequence[Candidate], where: str) -> None:
  if not cands:
    raise ValueError(f"{WHAT}: no candidates for {where}.")
  for c in cands:
    if not isinstance(c, Candidate):
      raise ValueError(f"{WHAT}: candidates must be "
                       f"jaxq.autoquant.Candidate, got {c!r} for {where}.")
  names = [c.name for c in cands]
  if len(set(names)) != len(names):
    raise ValueError(f"{WHAT}: candidate names must be unique, got {names} "
                     f"for {where}.")


def _groups(layers: Mapping[str, LayerInfo], groups: Sequence[str]
            ) -> list[tuple[str, tuple[str, ...]]]:
  """``(name, paths)`` per group, in the order of each group's first layer."""
  compiled = [re.compile(g) for g in groups]
  keyed: dict[Any, list[str]] = {}
  names: dict[Any, str] = {}
  for path in layers:
    key, name = ("layer", path), path
    for i, regex in enumerate(compiled):
      m = regex.fullmatch(path)
      if m is not None:
        key = ("group", i, m.groups())
        name = ("/".join(str(x) for x in m.groups()) + f" ({regex.pattern})"
                if m.groups() else regex.pattern)
        break
    keyed.setdefault(key, []).append(path)
    names[key] = name
  return [(names[k], tuple(v)) for k, v in keyed.items()]


def _input_stats(adapter: ModelAdapter, batches: Sequence[Any],
                 layers: Mapping[str, LayerInfo], paths: Sequence[str]
                 ) -> tuple[dict[str, tuple[algorithms.InputStats, ...]],
                            dict[str, tuple[int, ...]]]:
  """Per layer: float input statistics per stack slice, and one input's
  shape; one capture pass per batch (nothing held across batches)."""
  capture = adapter.capture(paths)
  stats: dict[str, list[algorithms.InputStats]] = {}
  shapes: dict[str, tuple[int, ...]] = {}
  for batch in batches:
    captured = capture(adapter.variables, batch)
    one = adapter_lib.collect_inputs(capture.calls, [captured], paths,
                                     (batch_lib.batch_mask(batch),))
    for path in paths:
      info = layers[path]
      kernel_shape = tuple(info.weight_shape)
      for call in one.inputs[path]:
        x = call[0]
        xs = list(x) if info.stacked else [x]
        shapes.setdefault(path, tuple(xs[0].shape))
        num_in = ptq_layers.num_in_axes(info, kernel_shape,
                                        tuple(xs[0].shape), WHAT)
        d_in = math.prod(kernel_shape[:num_in])
        per = stats.setdefault(path, [algorithms.init_input_stats(d_in)
                                      for _ in xs])
        for i, xi in enumerate(xs):
          lead = tuple(xi.shape[:xi.ndim - num_in])
          rows = jnp.reshape(xi, lead + (d_in,))
          mask = one.masks[0]
          if mask is not None:
            mask = jnp.asarray(mask, bool)
            if mask.shape != lead:
              mask = jnp.broadcast_to(jnp.reshape(
                  mask, mask.shape + (1,) * (len(lead) - mask.ndim)), lead)
          if not bool(jnp.all(jnp.isfinite(
              rows if mask is None else jnp.where(mask[..., None], rows,
                                                  0.0)))):
            raise ValueError(f"{WHAT}: the calibration inputs of {path!r} "
                             f"hold NaN or inf.")
          per[i] = algorithms.update_input_stats(per[i], rows, mask)
  return {p: tuple(s) for p, s in stats.items()}, shapes


# --------------------------------------------------------------------------
# The search.


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
    layers: a regex restricting the searched matmul layers (None: all).
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
      at its bytes.
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
  given = [b is not None for b in (budget_bytes, bits_per_weight, latency)]
  if sum(given) != 1:
    raise ValueError(f"{WHAT}: give exactly one of budget_bytes, "
                     f"bits_per_weight and latency.")
  if latency is not None and latency_table is None:
    raise ValueError(f"{WHAT}: a latency budget needs latency_table "
                     f"(candidate name -> cost per weight).")
  if candidates is None:
    candidates = cand_lib.default_candidates()

  # Layers, groups, candidates, costs.
  infos = _layers(adapter, batches[0], layers)
  per_layer: dict[str, tuple[Candidate, ...]] = {}
  for path in infos:
    cands = _candidates_of(candidates, path)
    if cands is not None:
      _check_candidates(cands, repr(path))
      per_layer[path] = cands
  if not per_layer:
    raise ValueError(f"{WHAT}: no layer has candidates; the searched layers "
                     f"are {sorted(infos)}.")
  infos = {p: i for p, i in infos.items() if p in per_layer}
  group_list = _groups(infos, groups)
  group_cands: list[tuple[Candidate, ...]] = []
  for name, paths in group_list:
    cands = per_layer[paths[0]]
    for p in paths[1:]:
      if per_layer[p] != cands:
        raise ValueError(f"{WHAT}: the layers of group {name!r} must share "
                         f"their candidates; {paths[0]!r} and {p!r} differ.")
    group_cands.append(cands)
  for path, cands in per_layer.items():
    for c in cands:
      cand_lib.check_fits(c, path, tuple(infos[path].weight_shape))
  numel = {p: math.prod(i.weight_shape) * (i.stacked or 1)
           for p, i in infos.items()}
  weights_total = sum(numel.values())
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
                   else bits_per_weight * weights_total / 8.0)
  width = max(len(c) for c in group_cands)
  cost = np.full((len(group_list), width), np.inf)
  for g, ((_, paths), cands) in enumerate(zip(group_list, group_cands)):
    for j, c in enumerate(cands):
      cost[g, j] = sum(cost_of[(p, c.name)] for p in paths)
  least = float(np.sum(np.min(cost, axis=1)))
  if least > budget:
    unit = "bytes" if latency is None else "latency units"
    bits = (f" ({8.0 * least / weights_total:.3f} bits per weight)"
            if latency is None else "")
    raise ValueError(f"{WHAT}: no choice of candidates meets the budget "
                     f"{budget:,.6g} {unit}; the least achievable is "
                     f"{least:,.6g} {unit}{bits}.")

  # Candidate weights.
  t0 = time.perf_counter()
  need = [p for p, cs in per_layer.items() if cand_lib.needs_stats(cs)]
  stats, shapes = (_input_stats(adapter, batches, infos, need) if need
                   else ({}, {}))
  built: dict[tuple[str, str], LayerWeight] = {}
  kernels = {p: adapter.get_weight(p)[0] for p in infos}
  for path in tqdm.tqdm(infos, desc=f"{WHAT}: candidates", unit="layer",
                        disable=not progress):
    for c in per_layer[path]:
      try:
        built[(path, c.name)] = cand_lib.build(
            c, infos[path], kernels[path], stats.get(path), shapes.get(path))
      except ValueError as e:
        raise ValueError(f"{WHAT}: layer {path!r}, candidate {c.name!r}: {e}"
                         ) from None
  seconds["candidates"] = time.perf_counter() - t0

  # Scores.
  t0 = time.perf_counter()
  act_paths = tuple(p for p, cs in per_layer.items()
                    if any(c.act is not None for c in cs))
  if act_paths and proxy == "fisher":
    raise ValueError(f"{WHAT}: proxy='fisher' scores weights only; the "
                     f"candidates of {act_paths[0]!r} quantize activations "
                     f"(use proxy='loss').")
  scored_adapter = _scored_model(adapter, batches, per_layer,
                                 act_paths, tuple(base_rules))
  references = scoring.outputs(adapter, batches)
  scorer = scoring.Scorer.create(scored_adapter, loss_fn, batches,
                                 references, act_paths)
  # The measured proxy's zero (and the metric without an eval_fn); the
  # Fisher proxy needs no forward-only pass.
  base_loss = (scoring.check_finite(scorer.measure(scorer.base),
                                    "calibration loss of the float model")
               if proxy == "loss" or eval_fn is None else math.nan)
  score = np.zeros_like(cost)
  fisher = None
  fisher_counter = [0]
  if proxy == "fisher":
    fisher = scoring.fisher_diagonals(scorer, loss_fn, list(infos),
                                      fisher_counter)
  bar = tqdm.tqdm(total=sum(len(c) for c in group_cands),
                  desc=f"{WHAT}: scores", unit="score",
                  disable=not progress)
  for g, ((name, paths), cands) in enumerate(zip(group_list, group_cands)):
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
  seconds["scores"] = time.perf_counter() - t0

  # Solve.
  t0 = time.perf_counter()
  capacity = max(budget, float(np.sum(np.max(np.where(np.isfinite(cost),
                                                      cost, 0), axis=1))))
  # The front from one table up to the largest cost; the choice from one
  # up to the budget (finer units).
  table = knapsack.solve_table(cost, score, capacity, units=units)
  picks = knapsack.solve(cost, score, budget, units=units)
  predicted_front = tuple(
      (int(sum(nbytes[(p, group_cands[g][int(choice[g])].name)]
               for g, (_, paths) in enumerate(group_list) for p in paths)),
       float(sum(score[g, int(choice[g])] for g in range(len(group_list)))))
      for _, choice in knapsack.front(table))
  seconds["solve"] = time.perf_counter() - t0
  seconds["search"] = time.perf_counter() - started

  # Verify.
  t0 = time.perf_counter()
  apply_fn = scorer.apply_fn

  def configuration(choice: Sequence[int]) -> Any:
    kernels_c, act_on = {}, []
    for g, (_, paths) in enumerate(group_list):
      c = group_cands[g][int(choice[g])]
      for p in paths:
        if not c.exact:
          kernels_c[p] = built[(p, c.name)].effective()
        if c.act is not None:
          act_on.append(p)
    return scorer.variables(kernels_c, act_on)

  def metric_of(choice: Sequence[int], label: str) -> float:
    variables_c = configuration(choice)
    if eval_fn is None:
      value = scorer.measure(variables_c)
    else:
      value = scoring._evaluate(eval_fn, apply_fn, variables_c)
    return scoring.check_finite(value, f"metric of {label}")

  def point(label: str, choice: Sequence[int]) -> FrontPoint:
    size = sum(nbytes[(p, group_cands[g][int(choice[g])].name)]
               for g, (_, paths) in enumerate(group_list) for p in paths)
    counts: dict[str, int] = {}
    for g in range(len(group_list)):
      n = group_cands[g][int(choice[g])].name
      counts[n] = counts.get(n, 0) + 1
    return FrontPoint(label, int(size), 8.0 * size / weights_total,
                      float(sum(score[g, int(choice[g])]
                                for g in range(len(group_list)))),
                      metric_of(choice, label), counts)

  if eval_fn is None:
    float_metric, higher_is_better = base_loss, False
  else:
    float_metric = scoring.check_finite(
        scoring._evaluate(eval_fn, adapter.apply_fn(), adapter.variables),
        "metric of the float model")
  chosen = point("mixture", picks)
  front = [chosen]
  if verify_uniform:
    names = [c.name for c in group_cands[0]]
    shared = [n for n in names
              if all(n in [c.name for c in cs] for cs in group_cands)]
    for n in shared:
      choice = [[c.name for c in cs].index(n) for cs in group_cands]
      front.append(point(n, choice))
      size = front[-1].nbytes if latency is None else sum(
          cost[g, choice[g]] for g in range(len(group_list)))
      if size >= least and not math.isclose(size, budget):
        try:
          front.append(point("mixture", table.backtrack(size)))
        except ValueError:
          pass
  front.sort(key=lambda p: (p.nbytes, p.label))
  rules, result_model, result_variables = _materialize(
      adapter, group_list, [group_cands[g][int(picks[g])]
                            for g in range(len(group_list))],
      built, infos, tuple(base_rules))
  served = None
  if verify and eval_fn is not None:
    served = scoring.check_finite(
        _served_metric(adapter, rules, result_variables, batches, eval_fn),
        "metric of the chosen rules, served")
  seconds["verify"] = time.perf_counter() - t0
  choices = []
  for g, (name, paths) in enumerate(group_list):
    c = group_cands[g][int(picks[g])]
    choices.append(GroupChoice(
        name=name, paths=paths, candidate=c,
        nbytes=int(sum(nbytes[(p, c.name)] for p in paths)),
        score=float(score[g, int(picks[g])]),
        scores={k.name: float(score[g, j])
                for j, k in enumerate(group_cands[g])},
        costs={k.name: float(cost[g, j])
               for j, k in enumerate(group_cands[g])}))
  return AutoQuantResult(
      rules=rules, variables=result_variables, model=result_model,
      choices=tuple(choices), budget=budget, nbytes=chosen.nbytes,
      weights=weights_total, predicted=chosen.predicted,
      metric=chosen.metric, served_metric=served, float_metric=float_metric,
      higher_is_better=higher_is_better, front=tuple(front),
      predicted_front=predicted_front,
      compilations=(scorer.compilations if proxy == "loss"
                    else fisher_counter[0]),
      seconds=seconds, proxy=proxy)


def _scored_model(adapter: ModelAdapter, batches: Sequence[Any],
                  per_layer: Mapping[str, Sequence[Candidate]],
                  act_paths: Sequence[str], base_rules: tuple[Rule, ...]
                  ) -> ModelAdapter:
  """The model every configuration runs in: float, or quantized (qat mode)
  by act-only switchable rules for the layers with act candidates and by
  ``base_rules`` for the layers not searched (searched layers skip them:
  their kernels are the candidates')."""
  if not act_paths and not base_rules:
    return adapter
  rules = []
  for p in per_layer:
    if p in act_paths:
      specs = {c.act for c in per_layer[p] if c.act is not None}
      if len(specs) != 1:
        raise ValueError(f"{WHAT}: the candidates of {p!r} have "
                         f"{len(specs)} different act specs; one per layer "
                         f"is supported.")
      rules.append(Rule(re.escape(p), act=specs.pop()))
    else:
      rules.append(Rule(re.escape(p), skip=True))
  rules = tuple(rules) + base_rules
  calibrated = analysis.calibrate_layers(adapter, rules, batches, what=WHAT)
  return analysis.switched(adapter, rules, calibrated, "qat").adapter


def _materialize(adapter: ModelAdapter,
                 group_list: Sequence[tuple[str, tuple[str, ...]]],
                 chosen: Sequence[Candidate],
                 built: Mapping[tuple[str, str], LayerWeight],
                 infos: Mapping[str, LayerInfo], base_rules: tuple[Rule, ...]
                 ) -> tuple[tuple[Rule, ...], Any, Any]:
  """The rules of a choice, and the variables of the model they quantize in
  calibrate mode (GPTQ/AWQ kernels and fixed variables written)."""
  rules = []
  for (_, paths), c in zip(group_list, chosen):
    regex = "|".join(re.escape(p) for p in paths)
    regex = regex if len(paths) == 1 else f"(?:{regex})"
    rules.append(Rule(regex, skip=True) if c.weight is None
                 else Rule(regex, weight=c.weight, act=c.act))
  rules = tuple(rules) + base_rules
  calibrating = adapter.quantize(rules, "calibrate")
  variables = calibrating.variables
  for (_, paths), c in zip(group_list, chosen):
    for p in paths:
      weight = built[(p, c.name)]
      if c.exact or (c.weight is not None and c.algorithm == "rtn"):
        continue  # The float kernel: the layer quantizes it itself.
      values = {(p, infos[p].weight_name): weight.stored()}
      values.update({(p, k): v for k, v in cand_lib.fixed(weight).items()})
      variables = calibrating.write(values, variables)
  return rules, calibrating.handle, variables


def _served_metric(adapter: ModelAdapter, rules: Sequence[Rule],
                   variables: Any, batches: Sequence[Any],
                   eval_fn: EvalFn) -> float:
  """``eval_fn`` of the model quantized by ``rules``, as a user serves it:
  calibrated (static act ranges), converted, in serve mode."""
  calibrating = adapter.quantize(rules, "calibrate").with_variables(variables)
  static = any(r.act is not None and not r.act.dynamic for r in rules)
  stats = (ptq.calibrate_adapter(calibrating, batches, progress=False).stats
           if static else None)
  serve = adapter.quantize(rules, "serve")
  serve.ordered_layers(batches[0])  # Traced (abstractly): its layers known.
  serving, _ = convert(serve.handle, variables, stats)
  served = jaxq_flax.adapt(serve.handle, serving)
  return scoring._evaluate(eval_fn, served.apply_fn(), served.variables)
