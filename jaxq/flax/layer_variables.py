"""`LayerVariables`: one call of one quantized layer, over a variable store.

The per-mode transform of `jaxq.flax.core` needs a layer's variables: its
observer states (calibrate mode), its static activation range, the PTQ
algorithms' fixed variables (weight range, smoothing factors), its learned
ranges and a switchable layer's on/off flag. Linen keeps them in
collections of the module's scope (`jaxq.flax.linen_variables`), nnx as
attributes of the module (`jaxq.flax.nnx_variables`); a subclass says how to read and
write them, and this class applies the layer's `LayerQuant` to its operands
(``weight``, ``act``, ``embed``) with them.

A switchable layer's flag acts on its operands in qat mode (`switch`: the
fake-quantized or the float operand of the float op) and on its op in serve
mode (`LayerVariables.switched_op`, wrapped as flax's op by `SwitchedOp`:
``lax.cond`` between the low-bit op on the QArrays and the float op, whose
operands have other types and cannot be selected elementwise).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jaxq import learned
from jaxq.flax import calibration_mask
from jaxq.flax import serve_ops
from jaxq.flax.core import ACT_SMOOTH
from jaxq.flax.core import ACT_STATS
from jaxq.flax.core import INPUT_MOMENT
from jaxq.flax.core import WEIGHT_RANGE
from jaxq.flax.core import WEIGHT_STATS
from jaxq.flax.core import ActRange
from jaxq.flax.core import LayerQuant
from jaxq.flax.core import embed_lookup
from jaxq.flax.core import learned_act_shape
from jaxq.flax.core import learned_name
from jaxq.flax.core import learned_scale_shape
from jaxq.flax.core import observe_act
from jaxq.flax.core import observe_input_moment
from jaxq.flax.core import observe_weight
from jaxq.flax.core import records_input_moment
from jaxq.flax.core import transform_act
from jaxq.flax.core import transform_weight
from jaxq.flax.core import weight_range
from jaxq.quantize import compute_range
from jaxq.range_search import ARRAY_CALIBRATIONS
from jaxq.spec import QArray
from jaxq.spec import QuantSpec


def switch(enabled: jax.Array | None, quantized: jax.Array,
           original: jax.Array) -> jax.Array:
  """``quantized`` where the layer's flag is on, else ``original``.

  ``enabled`` is a boolean scalar read from the variables (so flipping it
  needs no recompilation), or None (no flag given: the layer is on).
  """
  if enabled is None:
    return quantized
  return jnp.where(enabled, quantized, original.astype(quantized.dtype))


class LayerVariables(abc.ABC):
  """A layer's quantization step on its operands, over some variable store.

  Linen keeps the variables in collections of the module's scope, nnx as
  attributes of the module; subclasses say how to read and write them and
  this class does the rest (the table in `jaxq.flax.core`'s docstring).
  """

  def __init__(self, quant: LayerQuant):
    self.quant = quant

  @abc.abstractmethod
  def get_stats(self, name: str) -> Any | None:
    """The observer state ``name`` (``WEIGHT_STATS`` or ``ACT_STATS``)."""

  @abc.abstractmethod
  def put_stats(self, name: str, state: Any) -> None:
    """Stores the observer state ``name``."""

  @abc.abstractmethod
  def get_range(self) -> ActRange | None:
    """The static activation range, if one was loaded."""

  def range_for(self, x: jax.Array) -> ActRange | None:
    """The static range to quantize ``x`` with: the loaded one (linen's
    ``init`` falls back to ``x``'s own, see `jaxq.flax.linen_variables`)."""
    del x
    return self.get_range()

  @abc.abstractmethod
  def get_fixed(self, name: str) -> Any | None:
    """The fixed variable ``name`` (one of `FIXED_NAMES`), if it exists."""

  @abc.abstractmethod
  def get_learned(self, name: str) -> jax.Array | None:
    """The learned parameter ``name`` (see `learned_name`), if it exists."""

  @abc.abstractmethod
  def put_learned(self, name: str, value: jax.Array) -> None:
    """Creates the learned parameter ``name``, or raises a ValueError naming
    the layer when parameters cannot be created now."""

  def _learned(self, what: str, spec: QuantSpec, shape: tuple[int, ...],
               initial: Callable[[], jax.Array]) -> jax.Array:
    name = learned_name(what, spec)
    param = self.get_learned(name)
    if param is None:
      param = jax.lax.stop_gradient(initial())
      self.put_learned(name, param)
    if tuple(param.shape) != tuple(shape):
      raise ValueError(
          f"jaxq: the learned {name!r} of {self.quant.path!r} has shape "
          f"{tuple(param.shape)}, but the layer needs {tuple(shape)}.")
    return param

  def weight_param(self, w: jax.Array | QArray) -> jax.Array:
    """The learned weight parameter, created from ``w``'s own range."""
    spec = self.quant.weight

    def initial() -> jax.Array:
      _, amax = weight_range(self.quant, w, self.get_fixed(WEIGHT_RANGE))
      return learned.init_param(
          spec, compute_range(w, spec)[1] if amax is None else amax)

    return self._learned(
        "weight", spec, learned_scale_shape(self.quant, spec, w.shape),
        initial)

  def act_param(self, x: jax.Array) -> jax.Array:
    """The learned act parameter, created from the calibrated range when one
    is loaded, else from ``x``'s (as the spec's calibration asks, abs-max
    for ``"entropy"``, which needs calibration batches)."""
    spec = self.quant.act
    shape = learned_act_shape(self.quant, tuple(x.shape))
    first_batch = (spec if spec.calibration in ARRAY_CALIBRATIONS else
                   spec.replace(calibration="max"))

    def initial() -> jax.Array:
      act_range = self.get_range()
      amax = (act_range["amax"] if act_range else
              compute_range(x, first_batch)[1])
      return learned.init_param(spec, jnp.reshape(amax, shape))

    return self._learned("act", spec, shape, initial)

  def recording(self) -> bool:
    """Whether calibrate mode records now (not while initialising)."""
    return True

  def get_enabled(self) -> jax.Array | None:
    """A switchable layer's on/off flag (a boolean scalar), or None."""
    return None

  def _switched(self, quantized: Any, original: jax.Array) -> Any:
    # Qat mode switches operands; serve mode switches ops (`switched_op`).
    if not self.quant.switchable or self.quant.mode != "qat":
      return quantized
    return switch(self.get_enabled(), quantized, original)

  def _check_float_weight(self, w: Any) -> None:
    if isinstance(w, QArray):
      raise ValueError(
          f"jaxq serve: the switchable layer {self.quant.path!r} holds a "
          f"QArray weight (from jaxq.convert); a switchable serve model "
          f"needs the float weights, which it quantizes when the layer is "
          f"on.")

  def switched_op(self, low_bit_op: Callable[[Any, Any], jax.Array],
                  float_op: Callable[[jax.Array, jax.Array], jax.Array],
                  x: jax.Array, w: jax.Array) -> jax.Array:
    """A switchable serve layer's op on its float input ``x`` and weight ``w``.

    On: ``low_bit_op(act(x), weight(w))``, the QArrays serve mode makes (the
    weight quantized on the fly). Off: ``float_op(smoothed(x), w)``, what
    the layer computes when no rule quantizes it (its smoothing factors, if
    any, still divide the input, as the qat switch does). ``lax.cond`` on
    the flag runs one of the two, and the result has the float op's dtype.
    Without a flag (``init``) the layer is on.
    """
    self._check_float_weight(w)
    low_bit = lambda: low_bit_op(self.act(x), self.weight(w))
    enabled = self.get_enabled()
    if enabled is None:
      return low_bit()
    unquantized = lambda: float_op(self.smoothed(x), w)
    dtype = jax.eval_shape(unquantized).dtype
    return jax.lax.cond(enabled, lambda: low_bit().astype(dtype),
                        unquantized)

  def weight(self, w: jax.Array | QArray) -> jax.Array | QArray:
    """The weight for the layer's op; records its range in calibrate mode."""
    if self.quant.weight is None:
      return w
    if self.quant.mode == "calibrate" and self.recording():
      self.put_stats(WEIGHT_STATS, observe_weight(
          self.quant, self.get_stats(WEIGHT_STATS), w))
    if self.quant.weight.learn is not None and self.quant.mode != "calibrate":
      return self._switched(self._learned_weight(w), w)
    return self._switched(
        transform_weight(self.quant, w, self.get_fixed(WEIGHT_RANGE)), w)

  def smoothed(self, x: jax.Array) -> jax.Array:
    """``x`` divided by the layer's ``"act_smooth"`` factors, if any."""
    factors = self.get_fixed(ACT_SMOOTH)
    if factors is None:
      return x
    shape = tuple(jnp.shape(factors))
    if tuple(x.shape[x.ndim - len(shape):]) != shape:
      raise ValueError(
          f"jaxq: the smoothing factors of {self.quant.path!r} have shape "
          f"{shape}, which does not match the trailing axes of its input of "
          f"shape {tuple(x.shape)}.")
    return (x / factors.astype(x.dtype)).astype(x.dtype)

  def check_int8_forward(self) -> None:
    """Raises when the int8 qat forward would skip a stored weight range."""
    if self.get_fixed(WEIGHT_RANGE) is not None:
      raise ValueError(
          f"jaxq: {self.quant.path!r} has a stored weight range (from GPTQ or "
          f"AWQ), which the int8 qat forward does not use; build the model "
          f"with int8_forward=False.")

  def _learned_weight(self, w: jax.Array | QArray) -> jax.Array | QArray:
    spec = self.quant.weight
    if isinstance(w, QArray):  # Converted with the learned scale already.
      return transform_weight(self.quant, w)
    param = self.weight_param(w)
    if self.quant.mode == "qat":
      return learned.learned_fake_quant(w, param, spec)
    return learned.quantize_with_scale(w, learned.scale_of(param, spec), spec)

  def act(self, x: jax.Array) -> jax.Array | QArray:
    """The input for the layer's op (divided by its smoothing factors, if
    any); records its statistics in calibrate mode (an ``"mse"`` weight's
    `InputMoment` too, see `jaxq.flax.core`)."""
    x = self.smoothed(x)
    calibrating = self.quant.mode == "calibrate" and self.recording()
    if calibrating and records_input_moment(self.quant):
      self.put_stats(INPUT_MOMENT, observe_input_moment(
          self.quant, self.get_stats(INPUT_MOMENT), x,
          self._moment_mask(x.shape)))
    if self.quant.act is None:
      return x
    if self.quant.mode == "calibrate":
      if self.quant.static_act and self.recording():
        self.put_stats(ACT_STATS, observe_act(
            self.quant, self.get_stats(ACT_STATS), x,
            calibration_mask.layer_mask(self.quant.path, x.shape)))
      return x
    spec = self.quant.act
    if spec.learn is not None:
      param = self.act_param(x)
      if self.quant.mode == "qat":
        return self._switched(learned.learned_fake_quant(x, param, spec), x)
      return learned.quantize_with_scale(x, learned.scale_of(param, spec),
                                         spec)
    return self._switched(transform_act(
        self.quant, x, self.get_range() if self.quant.static_act else None), x)

  def _moment_mask(self, shape: tuple[int, ...]) -> jax.Array | None:
    try:
      return calibration_mask.layer_mask(self.quant.path, shape)
    except ValueError as e:
      raise ValueError(
          f"{e} (It records its input's E[x^2] for its weight's "
          f"calibration='mse' range: give it calibration='max', or "
          f"calibrate without the mask.)") from None

  def embed(self, table: jax.Array | QArray, ids: jax.Array) -> jax.Array:
    """An embedding lookup (weight-only); records the table's range."""
    if self.quant.switchable:
      self._check_float_weight(table)
    if self.quant.mode == "calibrate" and self.recording():
      self.put_stats(WEIGHT_STATS, observe_weight(
          self.quant, self.get_stats(WEIGHT_STATS), table))
    if self.quant.weight.learn is None or self.quant.mode == "calibrate":
      rows = embed_lookup(self.quant, table, ids)
    elif self.quant.mode == "serve":
      return embed_lookup(self.quant, self._learned_weight(table), ids)
    else:
      rows = embed_lookup(self.quant, table, ids,
                          learned_param=self.weight_param(table))
    enabled = self.get_enabled() if self.quant.switchable else None
    if enabled is None:
      return rows
    return switch(enabled, rows, embed_lookup(
        dataclasses.replace(self.quant, mode="calibrate"), table, ids))

  def attend(self, query: jax.Array, table: jax.Array | QArray,
             dtype: Any) -> jax.Array:
    """``query @ table.T`` (an embedding's ``attend``) with the table
    quantized as the layer's weight; ``query`` is in ``dtype``."""
    query = query.astype(dtype)
    dims = (((query.ndim - 1,), (1,)), ((), ()))
    if self.quant.mode == "serve" and self.quant.switchable:
      return self.switched_op(
          lambda q, t: serve_ops.serve_dot_general(
              q, serve_ops.computing_in(t, dtype), dims),
          lambda q, t: jax.lax.dot_general(q, t.astype(dtype), dims),
          query, table)
    table = self.weight(table)
    if isinstance(table, QArray):
      return serve_ops.serve_dot_general(
          query, serve_ops.computing_in(table, dtype), dims)
    return jax.lax.dot_general(query, table.astype(dtype), dims)


@dataclasses.dataclass(frozen=True, eq=False)
class SwitchedOp:
  """A switchable serve layer's op: flax's op signature, `switched_op` inside.

  ``layer`` holds the call's `LayerVariables` once the layer is matched (an
  empty sequence for a float layer, which runs ``float_op``). The operands
  are the first two positional arguments, after the subscripts for an
  einsum (``subscripts=True``); the input first, unless ``weight_first``.
  """

  layer: Sequence[LayerVariables]
  low_bit_op: Callable[..., jax.Array]
  float_op: Callable[..., jax.Array]
  subscripts: bool = False
  weight_first: bool = False

  def __call__(self, *args, **kwargs) -> jax.Array:
    if not self.layer:
      return self.float_op(*args, **kwargs)
    split = 1 if self.subscripts else 0
    head, (lhs, rhs), rest = (args[:split], args[split:split + 2],
                              args[split + 2:])

    def bound(op: Callable[..., jax.Array]) -> Callable[[Any, Any], Any]:
      def run(x: Any, w: Any) -> jax.Array:
        pair = (w, x) if self.weight_first else (x, w)
        return op(*head, *pair, *rest, **kwargs)
      return run

    x, w = (rhs, lhs) if self.weight_first else (lhs, rhs)
    return self.layer[0].switched_op(bound(self.low_bit_op),
                                     bound(self.float_op), x, w)

