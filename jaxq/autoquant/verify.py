"""The models a choice runs in: the scored model, the chosen rules and
variables, and the served end-to-end check.

* `scored_model`: the model every configuration is scored and verified on
  (float, or quantized by act-only switchable rules for W8A8 candidates and
  by ``base_rules`` for the layers not searched).
* `materialize`: the rules of a choice (a `Rule` per group: the group's
  layers as one alternation regex; float groups skip) and the variables of
  the model they quantize in calibrate mode (GPTQ/AWQ kernels and their
  fixed ``weight_range`` / ``act_smooth``, as `jaxq.gptq` returns them).
* `served_metric`: ``eval_fn`` of those rules as a user serves them:
  `jaxq.calibrate` (static act ranges), `jaxq.convert`, serve mode.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

from jaxq import analysis
from jaxq.ptq import calibration_pass
from jaxq import flax as jaxq_flax
from jaxq.autoquant import candidates as cand_lib
from jaxq.autoquant import scoring
from jaxq.autoquant.candidates import Candidate
from jaxq.autoquant.candidates import LayerWeight
from jaxq.convert import convert
from jaxq.flax.adapter import ModelAdapter
from jaxq.flax.rules import LayerInfo
from jaxq.flax.rules import Rule

EvalFn = Callable[[Callable[..., Any], Any], float]
WHAT = "auto_quantize"


def scored_model(adapter: ModelAdapter, batches: Sequence[Any],
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


def materialize(adapter: ModelAdapter,
                 group_list: Sequence[tuple[str, tuple[str, ...]]],
                 chosen: Sequence[Candidate],
                 built: Mapping[tuple[str, str], LayerWeight],
                 infos: Mapping[str, LayerInfo], base_rules: tuple[Rule, ...],
                 batch: Any) -> tuple[tuple[Rule, ...], Any, Any]:
  """The rules of a choice, the model they quantize in calibrate mode
  (linen: traced abstractly on ``batch``, so `jaxq.convert` knows its
  layers) and its variables (GPTQ/AWQ kernels and fixed variables
  written; bf16 kernels rounded to bf16)."""
  rules = []
  for (_, paths), c in zip(group_list, chosen):
    regex = "|".join(re.escape(p) for p in paths)
    regex = regex if len(paths) == 1 else f"(?:{regex})"
    rules.append(Rule(regex, skip=True) if c.weight is None
                 else Rule(regex, weight=c.weight, act=c.act))
  rules = tuple(rules) + base_rules
  calibrating = adapter.quantize(rules, "calibrate")
  calibrating.ordered_layers(batch)
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


def served_metric(adapter: ModelAdapter, rules: Sequence[Rule],
                   variables: Any, batches: Sequence[Any],
                   eval_fn: EvalFn) -> float:
  """``eval_fn`` of the model quantized by ``rules``, as a user serves it:
  calibrated (static act ranges), converted, in serve mode."""
  calibrating = adapter.quantize(rules, "calibrate").with_variables(variables)
  static = any(r.act is not None and not r.act.dynamic for r in rules)
  stats = (calibration_pass.calibrate_adapter(calibrating, batches,
                                              progress=False).stats
           if static else None)
  serve = adapter.quantize(rules, "serve")
  serve.ordered_layers(batches[0])  # Traced (abstractly): its layers known.
  serving, _ = convert(serve.handle, variables, stats)
  served = jaxq_flax.adapt(serve.handle, serving)
  return scoring.evaluate(eval_fn, served.apply_fn(), served.variables)
