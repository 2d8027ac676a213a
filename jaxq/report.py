"""Per-layer quantization report and plots.

``rep = jaxq.report(qmodel, variables, data)`` (or ``jaxq.report(model,
variables, data, rules=rules)``) measures, for every layer the rules reach:

* ``weight_sqnr_db``: ``10 log10(sum w^2 / sum (w - dequantize(quantize(w,
  spec)))^2)`` of the weight under its spec (embeddings under their per-row
  spec, `jaxq.flax.core.embed_spec`);
* ``act_sqnr_db``: the same for the layer's input activation under its act
  spec, summed over every call on every calibration batch, with the
  calibrated static range (``dynamic=False``) or each batch's own range;
* ``act_amax``: the calibrated static range (its largest entry, for
  per-channel ranges), None for dynamic or float inputs; ``input_absmax``:
  the largest |x| seen;
* ``float_bytes`` / ``quantized_bytes``: the weight's bytes in float and as
  a `QArray` (values packed, scales, zero points; `QArray.nbytes`).

Inputs are captured from the FLOAT model (`jaxq.flax.capture`, through the
model's `jaxq.flax.ModelAdapter`), so
each layer's numbers are its own error, not its predecessors'. The same pass
fills a per-tensor |x| histogram of each layer's input (``num_bins`` bins,
`jaxq.calibration.HistogramState`) and finalizes it with the max,
percentile, entropy and mse observers: the ranges each method would choose
(``rep.histograms[path].ranges``), for the act format of the layer (int8
when the layer's input stays in float or its spec is affine).

Plots (matplotlib is imported inside the plotting functions only, and draws
on the Agg canvas, so no display is needed):

* ``jaxq.report.plot_histograms(rep, "hist.png")``: one panel per layer,
  the |x| histogram (log counts) with the four ranges as vertical lines;
* ``jaxq.report.plot_sensitivity(table, "sens.png")``: the metric drop of
  each layer quantized alone, and its output SQNR, from `jaxq.sensitivity`.

Models: flax.linen and flax.nnx, with the conventions of `jaxq.sensitivity`
(nnx ``variables``: an ``nnx.State`` or None; rows in the order the model
first calls its layers). A linen `QuantizedLinen` may stand for its float
model and rules; an nnx model from `jaxq.quantize_model` cannot (its float
layers are gone), so pass the float nnx model with ``rules=``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import analysis
from jaxq import flax as jaxq_flax
from jaxq import granularity as granularity_lib
from jaxq import observers
from jaxq.analysis import error_sums
from jaxq.analysis import sqnr_db
from jaxq.flax import rules as rules_lib
from jaxq.flax.batch import check_batches
from jaxq.flax.rules import Rule
from jaxq.quantize import dequantize
from jaxq.quantize import fake_quant
from jaxq.quantize import quantize
from jaxq.spec import QArray
from jaxq.spec import QuantSpec

PathLike = str | os.PathLike


def granularity_label(g: granularity_lib.Granularity) -> str:
  """Short name in the T/C/K/G/B vocabulary: ``"C(-1)"``, ``"G(0,128)"``."""
  if isinstance(g, granularity_lib.PerTensor):
    return "T"
  if isinstance(g, granularity_lib.PerChannel):
    return f"C({g.axis})"
  if isinstance(g, granularity_lib.PerToken):
    return "K"
  if isinstance(g, granularity_lib.PerGroup):
    return f"G({g.axis},{g.size})"
  if isinstance(g, granularity_lib.PerBlock):
    return f"B({'x'.join(map(str, g.shape))})"
  if isinstance(g, granularity_lib.MX):
    return f"MX({g.axis},{g.size})"
  return type(g).__name__


def spec_label(spec: QuantSpec | None) -> str:
  """``"int8 C(-1)"``; ``"int8 T static"`` for static act specs; ``"-"``."""
  if spec is None:
    return "-"
  static = "" if spec.dynamic else " static"
  return f"{spec.format} {granularity_label(spec.granularity)}{static}"


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """One layer's row; see the module docstring for each number.

  Float inputs, weights and layers give None for the quantities they lack;
  a float weight has ``quantized_bytes == float_bytes``.
  """

  path: str
  module_type: str
  weight_spec: QuantSpec | None
  act_spec: QuantSpec | None
  weight_sqnr_db: float | None
  act_sqnr_db: float | None
  act_amax: float | None
  input_absmax: float | None
  float_bytes: int
  quantized_bytes: int

  @property
  def weight_format(self) -> str:
    """The weight spec's short label (`spec_label`)."""
    return spec_label(self.weight_spec)

  @property
  def act_format(self) -> str:
    """The act spec's short label (`spec_label`)."""
    return spec_label(self.act_spec)


@dataclasses.dataclass(frozen=True)
class ActHistogram:
  """A layer input's |x| histogram and the ranges each method picks.

  Attributes:
    counts: int (num_bins,); bin ``i`` holds ``(i w, (i + 1) w]``.
    bin_width: ``w``.
    format: the element format the entropy and mse ranges were chosen for.
    ranges: method name (``"max"``, ``"percentile(99.99)"``, ``"entropy"``,
      ``"mse"``) -> the amax it chooses.
  """

  counts: np.ndarray
  bin_width: float
  format: str
  ranges: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class Report:
  """The per-layer table (``rows``, in model order) and the histograms."""

  rows: tuple[LayerReport, ...]
  histograms: Mapping[str, ActHistogram]

  @property
  def float_bytes(self) -> int:
    """Bytes of all the layers' weights in float."""
    return sum(r.float_bytes for r in self.rows)

  @property
  def quantized_bytes(self) -> int:
    """Bytes of all the layers' weights as served (float ones unchanged)."""
    return sum(r.quantized_bytes for r in self.rows)

  def as_dicts(self) -> list[dict[str, Any]]:
    """The rows as plain dicts (specs as their short labels)."""
    out = []
    for r in self.rows:
      row = dataclasses.asdict(r)
      row["weight_spec"], row["act_spec"] = r.weight_format, r.act_format
      out.append(row)
    return out

  def __str__(self) -> str:
    def num(x: float | None, fmt: str) -> str:
      return "-" if x is None else format(x, fmt)

    header = ("layer", "type", "weight", "act", "W SQNR", "A SQNR",
              "act amax", "max |x|", "bytes", "q bytes")
    table = [header] + [
        (r.path, r.module_type, r.weight_format, r.act_format,
         num(r.weight_sqnr_db, ".1f"), num(r.act_sqnr_db, ".1f"),
         num(r.act_amax, ".4g"), num(r.input_absmax, ".4g"),
         str(r.float_bytes), str(r.quantized_bytes)) for r in self.rows]
    table.append(("total", "", "", "", "", "", "", "", str(self.float_bytes),
                  str(self.quantized_bytes)))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 4 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


def _weight_numbers(info: rules_lib.LayerInfo, w: jax.Array
                    ) -> tuple[float | None, int, int]:
  """(weight SQNR dB, float bytes, quantized bytes) of one layer's weight."""
  float_bytes = int(np.prod(np.shape(w))) * np.dtype(w.dtype).itemsize
  if info.weight is None:
    return None, float_bytes, float_bytes
  error = functools.partial(_weight_error, spec=info.weight)
  if info.stacked:  # Scan over layers: each layer's slice on its own.
    error = jax.vmap(error)
  signal, noise, qa = error(w)
  return (sqnr_db(float(jnp.sum(signal)), float(jnp.sum(noise))),
          float_bytes, qa.nbytes)


@functools.partial(jax.jit, static_argnames="spec")
def _weight_error(w: jax.Array, *, spec: QuantSpec
                  ) -> tuple[jax.Array, jax.Array, QArray]:
  """``(sum w^2, sum (w - w_q)^2, quantize(w, spec))``."""
  qa = quantize(w, spec)
  signal, noise, _ = error_sums((w,), (dequantize(qa),))
  return signal, noise, qa


def _histogram_spec(act: QuantSpec | None) -> QuantSpec:
  fmt = act.format if act is not None and act.symmetric else "int8"
  return QuantSpec(fmt, granularity_lib.PerTensor(), dynamic=False)


def _range_methods(num_bins: int, percentile: float
                   ) -> dict[str, observers.Observer]:
  return {"max": observers.max(),
          f"percentile({percentile:g})": observers.percentile(percentile,
                                                              num_bins),
          "entropy": observers.entropy(num_bins),
          "mse": observers.mse(num_bins)}


@functools.partial(jax.jit, static_argnames="spec")
def _act_error(x: jax.Array, amin: jax.Array | None, amax: jax.Array | None,
               *, spec: QuantSpec) -> tuple[jax.Array, ...]:
  """`error_sums` of ``x`` and its fake-quant (static range when given)."""
  return error_sums(
      (x,), (fake_quant(x, spec, amax=amax, amin=amin,
                        range_from_data=True),))


def report(model: Any, variables: Any,
           data: Iterable[Any], *,
           rules: Sequence[Rule] | Rule | None = None, stats: Any | None = None,
           num_bins: int = 2048, percentile: float = 99.99) -> Report:
  """The per-layer quantization report of a linen or nnx model.

  Args:
    model: a float linen or nnx module with ``rules``, or a linen
      `QuantizedLinen` from `jaxq.quantize_model` (its rules are used).
    variables: the float variables: linen ``{"params": ...}``, ...; nnx an
      ``nnx.State`` (e.g. ``nnx.state(model)``) or None for the model's own.
    data: calibration batches, as for `jaxq.sensitivity`.
    rules: the rules, when ``model`` is a float module.
    stats: calibration stats with these rules (linen: the
      ``"quant_stats"`` collection; nnx: a ``State`` of `QuantStat`s, e.g.
      ``jaxq.calibrate(...).stats`` or a sensitivity table's); calibrated
      here on ``data`` when None.
    num_bins: bins of the per-layer |x| histograms.
    percentile: the percentile marked in the histograms.

  Returns:
    A `Report`: print it for the table; ``rows`` and ``histograms`` hold
    the numbers.

  Raises:
    ValueError: for a model that is not a linen or nnx Module (or is an nnx
      model from `jaxq.quantize_model`), variables or stats of the wrong
      kind, missing or unexpected rules, no batches, or params that lack a
      layer's weight.
  """
  what = "jaxq.report"
  adapter = jaxq_flax.adapt(model, variables, what=what)
  if adapter.quantized:
    model, own_rules = adapter.float_model(what)
    if rules is not None:
      raise ValueError(f"{what}: the quantized model carries its rules; do "
                       f"not pass rules too.")
    rules = own_rules
  analysed = analysis.analysed(model, variables, what)
  if rules is None:
    raise ValueError(f"{what}: pass rules= with a float model (or a model "
                     f"from jaxq.quantize_model).")
  rules = rules_lib.check_rules(rules)
  batches = check_batches(data, what)
  calibrated = analysis.calibrate_layers(analysed, rules, batches, stats,
                                         what=what)
  layers = calibrated.layers
  # Histograms of the quantized layers' inputs; embedding lookups take ids,
  # not activations, so they have none.
  act_paths = [p for p, info in layers.items()
               if info.quantized and info.module_type != "Embed"]
  capture = analysed.capture(act_paths)
  methods = _range_methods(num_bins, percentile)
  hist_observer = methods["entropy"]  # Any histogram observer: same state.
  update = jax.jit(hist_observer.update)

  states: dict[str, Any] = {}
  sums = {p: np.zeros(3) for p in act_paths}
  for batch in batches:
    captured = capture(analysed.variables, batch)
    for path in act_paths:
      info = layers[path]
      act_range = calibrated.act_ranges.get(path, {})
      for call, (arrays, _) in zip(capture.calls.get(path, ()),
                                   captured.get(path, ())):
        x = call.arguments(arrays)[0][0]  # The layer's input activation.
        if path not in states:
          states[path] = hist_observer.init(x, _histogram_spec(info.act))
        states[path] = update(states[path], x)
        if info.act is not None:
          error = functools.partial(_act_error, spec=info.act)
          if info.stacked:  # Each layer's inputs with its own range.
            error = jax.vmap(error)
          sums[path] += np.sum(np.asarray(error(
              x, act_range.get("amin"), act_range.get("amax"))).reshape(
                  3, -1), axis=1)

  histograms = {}
  for path, state in states.items():
    histograms[path] = ActHistogram(
        counts=np.asarray(state.counts).reshape(-1),
        bin_width=float(np.asarray(state.bin_width).reshape(-1)[0]),
        format=state.spec.format,
        ranges={name: float(np.max(obs.finalize(state)))
                for name, obs in methods.items()})

  rows = []
  for path, info in layers.items():
    weight = analysed.read(path, info.weight_name)
    if weight is None:
      raise ValueError(f"{what}: the params lack {path}/{info.weight_name} "
                       f"of shape {info.weight_shape}.")
    weight_sqnr, float_bytes, quantized_bytes = _weight_numbers(info, weight)
    act_sqnr = act_amax = None
    if info.act is not None and path in states:
      act_sqnr = sqnr_db(sums[path][0], sums[path][1])
      if not info.act.dynamic:
        act_amax = float(np.max(calibrated.act_ranges[path]["amax"]))
    rows.append(LayerReport(
        path=path, module_type=info.module_type, weight_spec=info.weight,
        act_spec=info.act, weight_sqnr_db=weight_sqnr, act_sqnr_db=act_sqnr,
        act_amax=act_amax,
        input_absmax=(float(np.max(states[path].amax)) if path in states
                      else None),
        float_bytes=float_bytes, quantized_bytes=quantized_bytes))
  return Report(rows=tuple(rows), histograms=histograms)


# --------------------------------------------------------------------------
# Plots.


def _figure(width: float, height: float) -> Any:
  """A matplotlib Figure on the Agg canvas (no pyplot state, no display)."""
  # Imported here so that jaxq imports without matplotlib.
  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(figure)
  return figure


_METHOD_STYLES = {"max": ("tab:red", "-"), "entropy": ("tab:green", "--"),
                  "mse": ("tab:purple", ":")}


def plot_histograms(rep: Report, path: PathLike, *,
                    layers: Sequence[str] | None = None, columns: int = 3,
                    display_bins: int = 128) -> str:
  """Saves a PNG of each layer input's |x| histogram with the chosen ranges.

  Args:
    rep: a `Report`.
    path: the PNG file to write.
    layers: the layer paths to plot (default: every layer with a histogram,
      in model order).
    columns: panels per row.
    display_bins: adjacent bins are summed down to at most this many.

  Returns:
    ``path`` as a string.
  """
  names = list(rep.histograms) if layers is None else list(layers)
  unknown = [n for n in names if n not in rep.histograms]
  if unknown or not names:
    raise ValueError(f"plot_histograms: no histogram for {unknown or 'any'} "
                     f"layer; the report has {sorted(rep.histograms)}.")
  if columns < 1 or display_bins < 1:
    raise ValueError(f"plot_histograms: columns and display_bins must be "
                     f">= 1, got {columns} and {display_bins}.")
  columns = min(columns, len(names))
  rows = math.ceil(len(names) / columns)
  figure = _figure(4.2 * columns, 3.0 * rows)
  axes = np.asarray(figure.subplots(rows, columns, squeeze=False)).reshape(-1)
  for ax, name in zip(axes, names):
    hist = rep.histograms[name]
    # Merge adjacent bins to at most `display_bins`, so sparse 2048-bin
    # histograms stay readable; zero-pad to a multiple of the merge factor.
    factor = max(1, -(-len(hist.counts) // display_bins))
    counts = np.pad(hist.counts, (0, -len(hist.counts) % factor))
    counts = counts.reshape(-1, factor).sum(axis=1)
    edges = np.arange(len(counts) + 1) * hist.bin_width * factor
    ax.stairs(counts, edges, fill=True, color="0.6")
    ax.set_yscale("symlog", linthresh=1.0)
    data_max = edges[np.flatnonzero(counts).max() + 1] if counts.any() else 1.0
    ax.set_xlim(0.0, 1.08 * max(data_max, *hist.ranges.values()))
    for method, amax in hist.ranges.items():
      color, style = _METHOD_STYLES.get(method, ("tab:blue", "-."))
      ax.axvline(amax, color=color, linestyle=style, linewidth=1.3,
                 label=f"{method} {amax:.3g}")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel(f"|x| (ranges for {hist.format})", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper right")
  for ax in axes[len(names):]:
    ax.set_visible(False)
  figure.suptitle("input activation histograms and calibrated ranges")
  figure.tight_layout()
  figure.savefig(os.fspath(path))
  return os.fspath(path)


def plot_sensitivity(table: Any, path: PathLike
                     ) -> str:
  """Saves a PNG bar chart of each layer's metric drop and output SQNR.

  ``table`` is a `jaxq.sensitivity.SensitivityTable`; layers are listed
  most sensitive first (the table's order). Returns
  ``path`` as a string.
  """
  if not table.rows:
    raise ValueError("plot_sensitivity: the table has no rows.")
  names = [r.path for r in table.rows]
  drops = np.array([r.drop for r in table.rows])
  sqnrs = np.array([r.sqnr_db for r in table.rows])
  positions = np.arange(len(names))
  figure = _figure(11.0, 1.2 + 0.28 * len(names))
  drop_ax, sqnr_ax = figure.subplots(1, 2, sharey=True)
  drop_ax.barh(positions, drops, color=np.where(drops > 0, "tab:red",
                                                "tab:gray"))
  drop_ax.set_yticks(positions, names, fontsize=8)
  drop_ax.set_ylim(len(names) - 0.5, -0.5)  # Most sensitive on top.
  drop_ax.set_xlabel(f"metric drop (float {table.float_metric:.4g})")
  drop_ax.axvline(0.0, color="black", linewidth=0.8)
  drop_ax.set_title("one layer quantized, the rest float")
  finite = np.where(np.isfinite(sqnrs), sqnrs, np.nan)
  sqnr_ax.barh(positions, finite, color="tab:blue")
  sqnr_ax.set_xlabel("output SQNR (dB), higher is better")
  sqnr_ax.set_title("that layer's output vs float")
  figure.tight_layout()
  figure.savefig(os.fspath(path))
  return os.fspath(path)


# `jaxq.report` is this module's `report` function (the package exports it);
# the plots hang off it too, so `jaxq.report.plot_histograms(...)` works.
report.plot_histograms = plot_histograms
report.plot_sensitivity = plot_sensitivity
