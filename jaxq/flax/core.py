"""The framework-neutral core: what one quantized layer computes in each mode.

Linen and nnx only differ in how they find layers and where they keep
variables; given a layer's `LayerQuant` (its path, specs and the mode), the
functions here transform the layer's weight and input activation:

=============  ===============================  ==============================
mode           weight ``w``                     input activation ``x``
=============  ===============================  ==============================
``"qat"``      ``fake_quant(w, weight)``        ``fake_quant(x, act)``, with
               (straight-through gradient)      the batch's range when
                                                ``act.dynamic`` else the
                                                calibrated static range
``"calibrate"``  unchanged; a max observer      unchanged; for a static act
               records its range                spec, ``observer_for(act)``
                                                records its statistics; for
                                                an ``"mse"`` weight, its
                                                `InputMoment` (see below)
``"serve"``    a `QArray` (converted, or        ``quantize(x, act)``: a QArray
               quantized on the fly)            with dynamic or static range
=============  ===============================  ==============================

In serve mode the layer's matmul or convolution receives QArrays and runs
through `jaxq.dot_general`, `jaxq.einsum` or `jaxq.conv`
(`jaxq.flax.serve_ops`, whose `serve_conv_transpose` computes a whole
ConvTranspose layer, whose ``lax.conv_transpose`` takes no op), so it
multiplies the stored low-bit values. QAT computes the float op on the
fake-quantized operands, which is what serve computes up to float32
accumulation order.

Static activation ranges are dicts ``{"amax": a}`` (``{"amin": a, "amax": b}``
for affine specs) in the keepdims scale shape of the act spec for the
layer's input, produced by `finalize_range` from an observer state.

Learned ranges (specs with ``learn="lsq"`` or ``"pact"``, see
`jaxq.learned`) are trainable parameters of the quantized layer, named by
`learned_name`: ``"weight_scale"`` / ``"act_scale"`` for LSQ,
``"weight_clip"`` / ``"act_clip"`` for PACT. A weight's has the keepdims
scale shape of the weight and starts from the weight's own max; an
activation's has shape ``(k,)``, ``k`` the number of scales along the
input's last axis (1 for `PerTensor`, the features for
`PerChannel(axis=-1)`; scales that vary per token cannot be learned), and
starts from the calibrated range when one is loaded, else from the first
batch's. In qat mode the layer fake-quantizes with them (`jaxq.learned`,
whose gradients train them); in serve mode it quantizes with them, and
`jaxq.convert` builds the serving weights from them.

Weight ranges honour the weight spec's ``calibration`` (`weight_range`):
``"max"`` (the default: abs-max), ``"percentile"`` or ``"mse"`` (a jitted
clipping search), which `jaxq.quantize` and `jaxq.fake_quant` compute
themselves (`jaxq.compute_range`, `jaxq.range_search`), in
every mode that quantizes the weight: serve (on the fly), `jaxq.convert`,
the starting value of a learned weight scale, and qat, which recomputes the
range on every step from the current weight (a jitted grid; its gradient is
stopped, so the range is a constant of each step, as abs-max is): the
fake-quant model equals the served one, which scoring in qat mode
(`jaxq.sensitivity`) needs. For training it costs a grid of fake-quants per
step (see the README's numerics); ``learn="lsq"`` starts its scale from the
range once instead. Any other
calibration on a weight raises, naming the layer, when the model is built.

The ``"mse"`` search with calibration data (`jaxq.convert` given the
statistics of `jaxq.calibrate`) minimises the layer's *output* error rather
than the weight's. An LLM's input channels differ in size by orders of
magnitude (outlier channels: in 16 layers of SmolLM2-135M, the largest
``E[x_j^2]`` is 24 to 5,700 times the median's), and the output error
``E||x (W - Q(W))||^2`` is, in its diagonal approximation,
``sum_jk E[x_j^2] (W_jk - Q(W)_jk)^2``: the plain weight MSE counts every
weight alike, so it clips exactly the large weights that multiply the large
inputs, lowering the weight error while raising the output error up to 4x
(W4 per channel: perplexity +379% against abs-max's +125%). So calibrate
mode records, for each layer whose weight spec has ``calibration="mse"``
and whose kernel contracts its input's last axis (`INPUT_MOMENT_TYPES`:
Dense, Linear, Conv), the running per-channel sum of ``x^2`` and the row
count (an `jaxq.algorithms.InputMoment` under `INPUT_MOMENT`: a
``(d_in,)`` statistic, masked rows excluded as in the act observers), and
`weight_range` given it weights each squared weight error by its input
channel's ``E[x^2]`` (`input_error_weight`). Where no data is at hand (qat,
serve quantizing on the fly, other layer types, embeddings, whose lookup's
output error *is* the weight error) the search keeps the plain weight MSE.
``"percentile"`` is a fixed quantile with no error to weight: it stays
data-free.

Fixed per-layer variables (`FIXED_NAMES`), written by the PTQ algorithms
(`jaxq.smoothquant`, `jaxq.awq`, `jaxq.gptq`) and never trained:

* ``"weight_range"``: ``{"amax"[, "amin"]}`` in the weight spec's keepdims
  scale shape; when present it is the weight's range in every mode (GPTQ's
  kernel lies on that grid, an abs-max recomputed from it need not).
* ``"act_smooth"``: per-input-channel factors ``s``, shaped like the
  kernel's contraction axes (``(d_in,)`` for a Dense); the layer divides
  its input by them before anything else (calibrate mode observes
  ``x / s``; qat and serve quantize ``x / s``, an elementwise scale that
  XLA fuses into the activation quantization), its kernel having been
  multiplied by them (SmoothQuant, AWQ without a preceding op to fold into).

The serve-mode ops (`jaxq.flax.serve_ops`) and the int8 forward of qat
mode (`jaxq.flax.int8_qat`) live in modules of their own; this one holds
what every layer shares.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import calibration
from jaxq import granularity as granularity_lib
from jaxq import learned
from jaxq import range_search
from jaxq.algorithms import stats as stats_lib
from jaxq.algorithms.weight_range import weight_range as search_weight_range
from jaxq.calibration import histogram
from jaxq.granularity import PerChannel
from jaxq.quantize import dequantize
from jaxq.quantize import fake_quant
from jaxq.quantize import quantize
from jaxq.spec import QArray
from jaxq.spec import QuantSpec

Mode = Literal["qat", "calibrate", "serve"]
MODES: tuple[str, ...] = ("qat", "calibrate", "serve")
OnNonfinite = Literal["raise", "count"]
ObserverFor = Callable[[QuantSpec], calibration.Observer]
ActRange = dict[str, jax.Array]

# Names of the per-layer variables, shared by linen (inside the collections
# below) and nnx (as attributes of the quantized module, prefixed "jaxq_").
WEIGHT_STATS = "weight"
ACT_STATS = "act"
# An "mse" weight's input statistic (see the module docstring).
INPUT_MOMENT = "input_moment"
ENABLED = "enabled"  # A switchable layer's on/off flag.
# The fixed variables of the PTQ algorithms (see the module docstring).
WEIGHT_RANGE = "weight_range"
ACT_SMOOTH = "act_smooth"
FIXED_NAMES = (WEIGHT_RANGE, ACT_SMOOTH)
# The calibrations a weight's range (and a dynamic act's) supports: those
# one array's values decide.
WEIGHT_CALIBRATIONS = range_search.ARRAY_CALIBRATIONS
# Module types whose kernel, (..., d_in, d_out), contracts the input's last
# axis (d_in) along its axis -2; a subclass's name ending so counts too.
INPUT_MOMENT_TYPES = ("Dense", "Linear", "Conv")


@dataclasses.dataclass(frozen=True)
class LayerQuant:
  """Everything one layer needs to quantize itself; static and hashable.

  Attributes:
    path: the "/"-joined module path, used in every error message.
    module_type: the module's class name.
    weight: the weight quantizer, or None for a float weight.
    act: the input activation quantizer, or None for a float input.
    mode: ``"qat"``, ``"calibrate"`` or ``"serve"``.
    on_nonfinite: in calibrate mode, ``"raise"`` an error naming the layer
      when a batch holds NaN or inf, or ``"count"`` them (the observers skip
      them and `jaxq.calibration.nonfinite_count` reads the count).
    observer_for: picks the activation observer from the act spec.
    int8_forward: in qat mode, whether a matmul layer runs its forward on
      int8 values (see `jaxq.flax.int8_qat`).
    backward: in qat mode, the matmul layers' backward: ``"ste"``,
      ``"float"`` or ``"int8"`` (see `jaxq.flax.int8_qat`).
    switchable: whether the layer reads an on/off flag
      (`LayerVariables.get_enabled`), so one compiled model runs any subset
      of its layers quantized (`jaxq.sensitivity`). In qat mode a layer that
      is off hands its op the float operands
      (`jaxq.flax.layer_variables.switch`); in serve mode the flag selects,
      by ``lax.cond`` (one branch runs), the low-bit op on the quantized
      operands or the float op on the float ones
      (`LayerVariables.switched_op`; the weights must be float, quantized
      on the fly in the low-bit branch).
  """

  path: str
  module_type: str
  weight: QuantSpec | None
  act: QuantSpec | None
  mode: Mode
  on_nonfinite: OnNonfinite = "raise"
  observer_for: ObserverFor = calibration.observer_for
  int8_forward: bool = False
  backward: str = "ste"
  switchable: bool = False

  @property
  def static_act(self) -> bool:
    """Whether the input's range is calibrated beforehand: a static range,
    or the starting point of a learned one."""
    return self.act is not None and (not self.act.dynamic or
                                     self.act.learn is not None)


def learned_name(what: str, spec: QuantSpec) -> str:
  """The name of a learned parameter: ``"weight_scale"``, ``"act_clip"``..."""
  return f"{what}_{'scale' if spec.learn == 'lsq' else 'clip'}"


def learned_act_shape(layer: LayerQuant, shape: tuple[int, ...]
                      ) -> tuple[int]:
  """``(k,)``, the shape of a learned act parameter for inputs of ``shape``.

  Raises a ValueError naming the layer when the act spec's scales vary along
  an axis other than the last (per token, per group of a token), since a
  parameter cannot follow the batch.
  """
  spec = layer.act
  check_spec(layer, spec, shape, "activation")
  blocks = spec.granularity.block_shape(tuple(shape))
  if tuple(blocks[:-1]) != tuple(shape[:-1]):
    raise ValueError(
        f"jaxq: the learned (learn={spec.learn!r}) act spec of {layer.path!r} "
        f"({layer.module_type}) must share its scales across tokens (scales "
        f"may vary along the last axis only: PerTensor or "
        f"PerChannel(axis=-1)), but {spec.granularity} on the input of shape "
        f"{tuple(shape)} has blocks {tuple(blocks)}.")
  return (granularity_lib.scale_shape(spec.granularity, tuple(shape))[-1],)


def check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"quantize_model: unknown mode {mode!r}; expected one of "
                     f"{MODES}.")


def check_on_nonfinite(on_nonfinite: str) -> None:
  if on_nonfinite not in ("raise", "count"):
    raise ValueError(f"quantize_model: on_nonfinite must be 'raise' or "
                     f"'count', got {on_nonfinite!r}.")


def check_switchable(switchable: bool, mode: str, int8_forward: bool
                     ) -> None:
  """Raises unless a per-layer on/off switch applies: qat mode without the
  int8 forward, or serve mode (see `LayerQuant.switchable`)."""
  if switchable and (mode not in ("qat", "serve") or
                     (mode == "qat" and int8_forward)):
    raise ValueError(
        f"quantize_model: switchable layers need mode='qat' without "
        f"int8_forward (the switch selects fake-quantized or float operands "
        f"of the float op) or mode='serve' (it selects the low-bit op or the "
        f"float op), got mode={mode!r}, int8_forward={int8_forward}.")


def check_spec(layer: LayerQuant, spec: QuantSpec, shape: tuple[int, ...],
               what: str) -> None:
  """Raises a ValueError naming the layer if ``spec`` cannot apply to ``shape``."""
  try:
    spec.granularity.block_shape(tuple(shape))
  except ValueError as e:
    raise ValueError(
        f"jaxq: the {what} spec of {layer.path!r} ({layer.module_type}) "
        f"cannot apply to its {what} of shape {tuple(shape)}: {e}") from None


def layer_quant(path: str, module: object, rule: Any | None,
                weight_shape: tuple[int, ...], *, is_embed: bool, mode: Mode,
                on_nonfinite: OnNonfinite, observer_for: ObserverFor,
                int8_forward: bool = False, backward: str = "ste",
                switchable: bool = False
                ) -> LayerQuant | None:
  """The `LayerQuant` of a layer that ``rule`` (a `jaxq.Rule`) matched.

  Returns None for float layers (no rule, or a skip rule). Embedding tables
  get `embed_spec` and no act spec (lookups are weight-only). Raises a
  ValueError naming the layer and the field when a spec cannot apply: a
  weight spec that does not fit the weight, whose calibration needs
  calibration data (``"entropy"``) or that says ``dynamic=False`` (a
  weight's range is always its own), a dynamic act spec whose calibration
  needs it too (its range comes from each batch alone), or
  ``rounding="stochastic"``, which needs a key per call that layers do not
  draw.
  """
  check_switchable(switchable, mode, int8_forward)
  if rule is None or rule.skip:
    return None
  weight = rule.weight
  if weight is not None and is_embed:
    weight = embed_spec(weight, weight_shape)
  quant = LayerQuant(path=path, module_type=type(module).__name__,
                     weight=weight, act=None if is_embed else rule.act,
                     mode=mode, on_nonfinite=on_nonfinite,
                     observer_for=observer_for,
                     int8_forward=int8_forward and mode == "qat",
                     backward=backward if mode == "qat" else "ste",
                     switchable=switchable)
  if weight is not None:
    check_spec(quant, weight, weight_shape, "weight")
    if weight.calibration not in WEIGHT_CALIBRATIONS:
      raise ValueError(
          f"jaxq: the weight spec of {path!r} ({quant.module_type}) has "
          f"calibration={weight.calibration!r}, which describes activations; "
          f"a weight's range supports {WEIGHT_CALIBRATIONS}.")
  if weight is not None and not weight.dynamic:
    raise ValueError(
        f"jaxq: the weight spec of {path!r} ({quant.module_type}) has "
        f"dynamic=False, which applies to activations: a weight always uses "
        f"its own range (or the one GPTQ/AWQ stored). Drop it from the "
        f"weight spec.")
  act = quant.act
  if (act is not None and act.dynamic and act.learn is None and
      act.calibration not in WEIGHT_CALIBRATIONS):
    raise ValueError(
        f"jaxq: the act spec of {path!r} ({quant.module_type}) is dynamic "
        f"(its range comes from each batch alone) with "
        f"calibration={act.calibration!r}, which chooses a static range from "
        f"a histogram of calibration batches: pass dynamic=False for a "
        f"calibrated range, or a calibration in {WEIGHT_CALIBRATIONS}.")
  for what, spec in (("weight", weight), ("act", act)):
    if spec is not None and spec.rounding != "nearest":
      raise ValueError(
          f"jaxq: the {what} spec of {path!r} ({quant.module_type}) has "
          f"rounding={spec.rounding!r}; quantized layers round to nearest "
          f"(stochastic rounding needs a PRNG key per call: use "
          f"jaxq.quantize(..., key=) directly).")
  return quant


# Weights.


def records_input_moment(layer: LayerQuant) -> bool:
  """Whether calibrate mode records the layer's `InputMoment`: an ``"mse"``
  weight spec (not a learned one) on a layer of `INPUT_MOMENT_TYPES`."""
  spec = layer.weight
  return (spec is not None and spec.calibration == "mse" and
          spec.learn is None and
          layer.module_type.endswith(INPUT_MOMENT_TYPES))


def observe_input_moment(layer: LayerQuant,
                         moment: stats_lib.InputMoment | None, x: jax.Array,
                         mask: jax.Array | None = None
                         ) -> stats_lib.InputMoment:
  """Adds the input ``x`` (..., d_in) to the layer's `InputMoment`;
  ``mask`` (over ``x``'s leading axes, False at padding, broadcast over
  the others: a convolution's spatial axes) keeps padding out of it."""
  if moment is None:
    moment = stats_lib.init_input_moment(x.shape[-1])
  if mask is not None:
    mask = jnp.broadcast_to(
        jnp.reshape(mask, mask.shape + (1,) * (x.ndim - 1 - mask.ndim)),
        x.shape[:-1])
  return stats_lib.update_input_moment(moment, x, mask)


def input_error_weight(layer: LayerQuant, kernel_shape: tuple[int, ...],
                       moment: stats_lib.InputMoment) -> jax.Array:
  """``E[x^2]`` of each kernel element's input channel, the ``error_weight``
  of the data-aware ``"mse"`` search, broadcastable to ``kernel_shape``.

  A kernel ``(..., d_in, d_out)`` gets ``(1, ..., d_in, 1)``; a grouped
  convolution's ``(..., d_in / g, d_out)`` (``g`` groups, each its own
  slice of the input channels and of the outputs) ``(1, ..., d_in / g,
  d_out)``. Raises a ValueError naming the layer when the moment's channels
  fit no such kernel.
  """
  # No real row seen (all masked): every channel alike, the plain search.
  mean_square = jnp.where(moment.count[..., None] > 0, moment.mean_square,
                          1.0)
  d_in = mean_square.shape[-1]
  shape = tuple(kernel_shape)
  if len(shape) >= 2 and shape[-2] == d_in:
    return jnp.reshape(mean_square, (1,) * (len(shape) - 2) + (d_in, 1))
  if len(shape) >= 2 and d_in % shape[-2] == 0 and (
      shape[-1] % (d_in // shape[-2]) == 0):
    groups = d_in // shape[-2]
    per_group = jnp.reshape(mean_square, (groups, shape[-2])).T
    weight = jnp.repeat(per_group, shape[-1] // groups, axis=1)
    return jnp.reshape(weight, (1,) * (len(shape) - 2) + shape[-2:])
  raise ValueError(
      f"jaxq: the input statistic of {layer.path!r} ({layer.module_type}) "
      f"has {d_in} channels, which do not map onto its kernel of shape "
      f"{shape} (input channels on axis -2).")


def weight_range(layer: LayerQuant, w: jax.Array,
                 stored: ActRange | None = None,
                 moment: stats_lib.InputMoment | None = None
                 ) -> tuple[jax.Array | None, jax.Array | None]:
  """``(amin, amax)`` of the layer's weight: the ``stored`` range when given
  (checked against the scale shape); else, for an ``"mse"`` spec given the
  layer's input ``moment``, the range minimising the output error (each
  squared weight error weighted by `input_error_weight`); else ``(None,
  None)``: `jaxq.quantize` and `jaxq.fake_quant` compute it from the weight
  as the spec's ``calibration`` asks (an ``"mse"`` search then minimises the
  weight's own squared error)."""
  spec = layer.weight
  if stored is not None:
    shape = granularity_lib.scale_shape(spec.granularity, tuple(w.shape))
    amax, amin = stored["amax"], stored.get("amin")
    if tuple(jnp.shape(amax)) != tuple(shape) or (
        (amin is None) != spec.symmetric):
      raise ValueError(
          f"jaxq: the stored weight range of {layer.path!r} has amax of shape "
          f"{tuple(jnp.shape(amax))}{'' if amin is None else ' and an amin'}, "
          f"but its weight spec {spec} on shape {tuple(w.shape)} needs "
          f"{tuple(shape)}{'' if spec.symmetric else ' and an amin'}.")
    return amin, amax
  if moment is None or spec.calibration != "mse":
    return None, None
  error_weight = input_error_weight(layer, tuple(w.shape), moment)
  return search_weight_range(jax.lax.stop_gradient(w), spec,
                             error_weight=error_weight)


def transform_weight(layer: LayerQuant, w: jax.Array | QArray,
                     stored_range: ActRange | None = None
                     ) -> jax.Array | QArray:
  """The weight as the layer's op sees it in ``layer.mode`` (see the table),
  with the range `weight_range` gives."""
  spec = layer.weight
  if spec is None or layer.mode == "calibrate":
    return w
  if isinstance(w, QArray):
    if layer.mode != "serve":
      raise ValueError(f"jaxq: {layer.path!r} holds a quantized (QArray) "
                       f"weight; {layer.mode} mode needs the float parameters.")
    if w.spec != spec:
      raise ValueError(f"jaxq: the QArray weight of {layer.path!r} was made "
                       f"with {w.spec}, but the rule asks for {spec}.")
    return w
  check_spec(layer, spec, w.shape, "weight")
  amin, amax = weight_range(layer, w, stored_range)
  # The weight's own range (stored by GPTQ/AWQ or searched now): zero
  # where the weight is.
  if layer.mode == "qat":
    return fake_quant(w, spec, amax=amax, amin=amin, range_from_data=True)
  return quantize(w, spec, amax=amax, amin=amin, range_from_data=True)


def observe_weight(layer: LayerQuant, state: Any | None, w: jax.Array) -> Any:
  """Folds ``w`` into a max-observer state (weights use their own range)."""
  check_spec(layer, layer.weight, w.shape, "weight")
  observer = calibration.max()
  if state is None:
    state = observer.init(w, layer.weight)
  return observer.update(state, w)


def learned_scale_shape(layer: LayerQuant, spec: QuantSpec,
                        shape: tuple[int, ...]) -> tuple[int, ...]:
  """The keepdims scale shape of a learned weight parameter."""
  check_spec(layer, spec, shape, "weight")
  return granularity_lib.scale_shape(spec.granularity, tuple(shape))


# Activations.


def static_range(layer: LayerQuant, act_range: ActRange | None, shape
                  ) -> tuple[jax.Array | None, jax.Array | None]:
  if layer.act.dynamic:
    return None, None
  if not act_range:
    raise ValueError(
        f"jaxq: {layer.path!r} ({layer.module_type}) has a static activation "
        f"spec (dynamic=False) but no calibrated range: run the model in "
        f"calibrate mode and pass the ranges from jaxq.flax.act_ranges or "
        f"jaxq.convert (input shape {tuple(shape)}).")
  return act_range.get("amin"), act_range["amax"]


def transform_act(layer: LayerQuant, x: jax.Array,
                  act_range: ActRange | None) -> jax.Array | QArray:
  """The input as the layer's op sees it in ``layer.mode`` (see the table)."""
  spec = layer.act
  if spec is None or layer.mode == "calibrate":
    return x
  check_spec(layer, spec, x.shape, "activation")
  amin, amax = static_range(layer, act_range, x.shape)
  if layer.mode == "qat":
    return fake_quant(x, spec, amax=amax, amin=amin)
  return quantize(x, spec, amax=amax, amin=amin)


def _raise_nonfinite(path: str, what: str, count: jax.Array) -> None:
  if int(count) > 0:
    raise ValueError(
        f"jaxq calibrate: {int(count)} non-finite value(s) (NaN or inf) in "
        f"the {what} of {path!r}. Fix the data, or pass "
        f"on_nonfinite='count' to quantize_model to skip and count them.")


def check_finite(layer: LayerQuant, what: str, old: Any | None, new: Any
                 ) -> None:
  """Raises (eagerly, or from inside ``jit`` by a host callback) on new NaN/inf."""
  if layer.on_nonfinite == "count":
    return
  seen = calibration.nonfinite_count(new)
  if old is not None:
    seen = seen - calibration.nonfinite_count(old)
  report = functools.partial(_raise_nonfinite, layer.path, what)
  if isinstance(seen, jax.core.Tracer):
    jax.debug.callback(report, seen)
  else:
    report(seen)


def observe_act(layer: LayerQuant, state: Any | None, x: jax.Array,
                mask: jax.Array | None = None) -> Any:
  """Folds ``x`` into the act observer's state (static act specs only);
  ``mask`` (over ``x``'s leading axes, False at padding), if given, keeps
  the masked positions out of it."""
  check_spec(layer, layer.act, x.shape, "activation")
  observer = layer.observer_for(layer.act)
  state = observer.init(x, layer.act) if state is None else state
  if mask is None:
    new = observer.update(state, x)
  else:
    try:
      inspect.signature(observer.update).bind(state, x, mask)
    except (TypeError, ValueError):
      raise ValueError(
          f"jaxq calibrate: the act observer of {layer.path!r} takes no mask "
          f"(its update is not (state, x, mask=None)), but the batch has a "
          f"padding mask; build observers with jaxq.observers.") from None
    new = observer.update(state, x, mask)
  check_finite(layer, "input activation", state, new)
  return new


def _warn_unresolved(path: str, state: Any, chosen: Any) -> None:
  """Warns, naming the layer, when a histogram range was chosen inside the
  histogram's first bin: its bins, grown to hold an outlier far beyond the
  other values, cannot tell those values apart, so the range (and every
  ordinary input's quantized value) is off by up to its own size."""
  if not isinstance(state, histogram.HistogramState) or (
      isinstance(chosen, tuple) or isinstance(chosen, jax.core.Tracer)):
    return
  chosen = np.asarray(chosen, np.float32)
  width = np.asarray(state.bin_width, np.float32)
  unresolved = (chosen > 0) & (chosen < np.asarray(state.amax)) & (
      chosen <= width)
  if np.any(unresolved):
    i = np.flatnonzero(unresolved.ravel())[0]
    warnings.warn(
        f"jaxq: the static range of {path!r} ({chosen.ravel()[i]:.3g}) lies "
        f"in the first bin of its histogram, whose bins are "
        f"{width.ravel()[i]:.3g} wide to reach the largest input seen "
        f"({float(np.asarray(state.amax).ravel()[i]):.3g}): the histogram "
        f"cannot resolve the range asked for, and inputs below one bin "
        f"width may all quantize to 0. Calibrate on batches without such "
        f"outliers, or use calibration='max' for this layer.",
        UserWarning, stacklevel=3)


def finalize_range(observer: calibration.Observer, state: Any,
                   path: str = "") -> ActRange:
  """The static range ``{"amax"[, "amin"]}`` an observer state picks for
  the layer at ``path``.

  A state stacked by ``nn.scan`` over layers (its scalar non-finite count
  gained leading axes, one per stack) is finalized per layer, giving
  ranges with the same leading axes, ``(L, *scale_shape)``. A histogram
  range chosen inside the histogram's first bin warns naming the layer
  (`_warn_unresolved`).
  """
  if jnp.ndim(getattr(state, "nonfinite", 0)) > 0:
    return jax.vmap(lambda one: finalize_range(observer, one))(state)
  chosen = observer.finalize(state)
  _warn_unresolved(path, state, chosen)
  if isinstance(chosen, tuple):
    amin, amax = chosen
    return {"amin": jnp.asarray(amin, jnp.float32),
            "amax": jnp.asarray(amax, jnp.float32)}
  return {"amax": jnp.asarray(chosen, jnp.float32)}


def embed_spec(spec: QuantSpec, table_shape: tuple[int, ...]) -> QuantSpec:
  """The spec of an embedding table: scales that never span two rows.

  A lookup reads rows, so the table keeps its rule's granularity when each
  block lies within one row (per-row channels, groups or MX along the
  features) and otherwise gets one scale per row, ``PerChannel(axis=0)``.
  A one-row table (``V == 1``) is decided as a two-row one: every block of
  it lies in its row, yet a per-tensor scale gathered per looked-up row
  would be ``(N, 1)`` under a spec that needs ``(1, 1)``.
  """
  shape = tuple(table_shape)
  if shape and shape[0] == 1:
    shape = (2, *shape[1:])
  try:
    row_local = spec.granularity.block_shape(shape)[0] == 1
  except ValueError:
    row_local = False
  return spec if row_local else spec.replace(granularity=PerChannel(axis=0))


def embed_lookup(layer: LayerQuant, table: jax.Array | QArray,
                 ids: jax.Array, learned_param: jax.Array | None = None
                 ) -> jax.Array:
  """``take(table, ids, axis=0)`` with the table quantized row by row.

  ``layer.weight`` must already be the table's `embed_spec`. QAT
  fake-quantizes only the looked-up rows (their scales depend on their own
  row alone, so this equals a lookup in the fake-quantized table), with the
  rows of ``learned_param`` for a learned spec; serve gathers the rows of
  the stored values and of their scales. Returns ``ids.shape + (features,)``.
  """
  features = table.shape[-1]
  flat_ids = jnp.reshape(ids, (-1,))
  if layer.mode == "serve":
    qa = transform_weight(layer, table)
    take = lambda a: None if a is None else jnp.take(a, flat_ids, axis=0)
    rows = dequantize(QArray(values=take(qa.values), scale=take(qa.scale),
                             zero_point=take(qa.zero_point), spec=qa.spec,
                             dtype=qa.dtype))
  else:
    check_spec(layer, layer.weight, table.shape, "weight")
    rows = jnp.take(table, flat_ids, axis=0)
    if layer.mode == "qat" and learned_param is not None:
      rows = learned.learned_fake_quant(
          rows, jnp.take(learned_param, flat_ids, axis=0), layer.weight)
    elif layer.mode == "qat":
      # Row-local scales: the rows' own ranges are the table's rows' ranges.
      amin, amax = weight_range(layer, rows)
      rows = fake_quant(rows, layer.weight, amax=amax, amin=amin,
                        range_from_data=True)
  return rows.reshape(tuple(ids.shape) + (features,))

