"""What `jaxq.auto_quantize` returns: the choice per group, the verified
bytes-vs-metric points, and their table and plot (matplotlib).

Bytes are those of the searched layers' weights as `jaxq.convert` stores
them; bits per weight are ``8 * bytes / weights`` over those layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxq.autoquant.candidates import Candidate
from jaxq.flax.rules import Rule

# The label of a configuration tried at the budget and not chosen.
TRIED = "mixture (tried)"

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
    label: ``"mixture"`` (the solved configuration at these bytes),
      `TRIED` (one of the few best at the budget, measured and not
      chosen) or the uniform candidate's name.
    nbytes: weight bytes of the searched layers.
    bits_per_weight: ``8 * nbytes / weights``.
    predicted: the summed proxy score.
    metric: ``eval_fn`` of the configuration (None when not verified).
    counts: candidate name -> number of groups in it.
    choice: the candidate index of each group (``(G,)``).
  """

  label: str
  nbytes: int
  bits_per_weight: float
  predicted: float
  metric: float | None
  counts: Mapping[str, int]
  choice: tuple[int, ...] = ()


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
    label: ``"mixture"``, or the uniform candidate's name when a uniform
      configuration within the budget measured better than every mixture
      tried.
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
  label: str
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
    return (f"auto_quantize: {len(self.choices)} groups, {self.label}, "
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
    uniform = [p for p in self.front if p.label not in ("mixture", TRIED)
               and p.metric is not None]
    mixed = sorted((p for p in self.front if p.label == "mixture"
                    and p.metric is not None), key=lambda p: p.nbytes)
    tried = [p for p in self.front if p.label == TRIED]
    ax.plot([p.bits_per_weight for p in mixed], [p.metric for p in mixed],
            "o-", label="auto_quantize mixture")
    if tried:
      ax.plot([p.bits_per_weight for p in tried], [p.metric for p in tried],
              ".", color="gray", label="tried at the budget")
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
