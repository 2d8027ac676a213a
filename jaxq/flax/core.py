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
                                                records its statistics
``"serve"``    a `QArray` (converted, or        ``quantize(x, act)``: a QArray
               quantized on the fly)            with dynamic or static range
=============  ===============================  ==============================

In serve mode the layer's matmul or convolution receives QArrays and runs
through `jaxq.dot_general`, `jaxq.einsum` or `jaxq.conv` (`serve_dot_general`
and friends below; `serve_conv_transpose` computes a whole ConvTranspose
layer, whose ``lax.conv_transpose`` takes no op), so it multiplies the
stored low-bit values. QAT computes
the float op on the fake-quantized operands, which is what serve computes up
to float32 accumulation order.

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

The int8 forward (``quantize_model(..., "qat", int8_forward=True)``): the
matmul layers (Dense, DenseGeneral, Einsum; nnx Linear, LinearGeneral,
Einsum) compute the QAT forward with `int8_qat_dot_general` /
`int8_qat_einsum`: both operands are quantized (`quantize`, the very scales
fake-quant uses) and multiplied by `jaxq.dot_general` / `jaxq.einsum`, int8 x
int8 -> int32, which equals the fake-quant forward up to float32
accumulation order. The backward is the fake-quant layer's: the float op's
gradient through `fake_quant`'s straight-through estimator. It needs integer
weight and act specs without ``learn`` (any other spec on a matmul layer
raises a ValueError naming the layer). Scales constant along the
contraction (T/C weights, T/K activations) take one int8 matmul; scales
that vary along it take `jaxq.dot_general`'s grouped int8 path, still equal
to fake-quant: groups, or a `PerToken` that reduces fewer axes than the
layer contracts (an attention output projection contracts (heads,
head_dim) of its (batch, seq, heads, head_dim) input: give it
``PerToken(contraction_axis=(-2, -1))`` for one matmul). Convolutions and embeddings have no int8 forward and keep
fake-quant.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
from flax.linen import linear as linen_linear
from jax import lax

from jaxq import calibration
from jaxq import granularity as granularity_lib
from jaxq import learned
from jaxq import ops
from jaxq.granularity import PerChannel
from jaxq.quantize import compute_range
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
      int8 values (see the module docstring).
  """

  path: str
  module_type: str
  weight: QuantSpec | None
  act: QuantSpec | None
  mode: Mode
  on_nonfinite: OnNonfinite = "raise"
  observer_for: ObserverFor = calibration.observer_for
  int8_forward: bool = False

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
  return (shape[-1] // blocks[-1],)


def check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"quantize_model: unknown mode {mode!r}; expected one of "
                     f"{MODES}.")


def check_on_nonfinite(on_nonfinite: str) -> None:
  if on_nonfinite not in ("raise", "count"):
    raise ValueError(f"quantize_model: on_nonfinite must be 'raise' or "
                     f"'count', got {on_nonfinite!r}.")


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
                int8_forward: bool = False) -> LayerQuant | None:
  """The `LayerQuant` of a layer that ``rule`` (a `jaxq.Rule`) matched.

  Returns None for float layers (no rule, or a skip rule). Embedding tables
  get `embed_spec` and no act spec (lookups are weight-only). Raises a
  ValueError naming the layer when the weight spec cannot apply.
  """
  if rule is None or rule.skip:
    return None
  weight = rule.weight
  if weight is not None and is_embed:
    weight = embed_spec(weight, weight_shape)
  quant = LayerQuant(path=path, module_type=type(module).__name__,
                     weight=weight, act=None if is_embed else rule.act,
                     mode=mode, on_nonfinite=on_nonfinite,
                     observer_for=observer_for,
                     int8_forward=int8_forward and mode == "qat")
  if weight is not None:
    check_spec(quant, weight, weight_shape, "weight")
  return quant


# Weights.


def transform_weight(layer: LayerQuant, w: jax.Array | QArray
                     ) -> jax.Array | QArray:
  """The weight as the layer's op sees it in ``layer.mode`` (see the table)."""
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
  if layer.mode == "qat":
    return fake_quant(w, spec)
  return quantize(w, spec)


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


def _static_range(layer: LayerQuant, act_range: ActRange | None, shape
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
  amin, amax = _static_range(layer, act_range, x.shape)
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


def observe_act(layer: LayerQuant, state: Any | None, x: jax.Array) -> Any:
  """Folds ``x`` into the act observer's state (static act specs only)."""
  check_spec(layer, layer.act, x.shape, "activation")
  observer = layer.observer_for(layer.act)
  new = observer.update(observer.init(x, layer.act) if state is None
                        else state, x)
  check_finite(layer, "input activation", state, new)
  return new


def finalize_range(observer: calibration.Observer, state: Any) -> ActRange:
  """The static range ``{"amax"[, "amin"]}`` an observer state picks."""
  chosen = observer.finalize(state)
  if isinstance(chosen, tuple):
    amin, amax = chosen
    return {"amin": jnp.asarray(amin, jnp.float32),
            "amax": jnp.asarray(amax, jnp.float32)}
  return {"amax": jnp.asarray(chosen, jnp.float32)}


class LayerVariables(abc.ABC):
  """A layer's quantization step on its operands, over some variable store.

  Linen keeps the variables in collections of the module's scope, nnx as
  attributes of the module; subclasses say how to read and write them and
  this class does the rest (the table in the module docstring).
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
    return self._learned(
        "weight", spec, learned_scale_shape(self.quant, spec, w.shape),
        lambda: learned.init_param(spec, compute_range(w, spec)[1]))

  def act_param(self, x: jax.Array) -> jax.Array:
    """The learned act parameter, created from the calibrated range when one
    is loaded, else from ``x``'s."""
    spec = self.quant.act
    shape = learned_act_shape(self.quant, tuple(x.shape))

    def initial() -> jax.Array:
      act_range = self.get_range()
      amax = (act_range["amax"] if act_range else compute_range(x, spec)[1])
      return learned.init_param(spec, jnp.reshape(amax, shape))

    return self._learned("act", spec, shape, initial)

  def recording(self) -> bool:
    """Whether calibrate mode records now (not while initialising)."""
    return True

  def weight(self, w: jax.Array | QArray) -> jax.Array | QArray:
    """The weight for the layer's op; records its range in calibrate mode."""
    if self.quant.weight is None:
      return w
    if self.quant.mode == "calibrate" and self.recording():
      self.put_stats(WEIGHT_STATS, observe_weight(
          self.quant, self.get_stats(WEIGHT_STATS), w))
    if self.quant.weight.learn is not None and self.quant.mode != "calibrate":
      return self._learned_weight(w)
    return transform_weight(self.quant, w)

  def _learned_weight(self, w: jax.Array | QArray) -> jax.Array | QArray:
    spec = self.quant.weight
    if isinstance(w, QArray):  # Converted with the learned scale already.
      return transform_weight(self.quant, w)
    param = self.weight_param(w)
    if self.quant.mode == "qat":
      return learned.learned_fake_quant(w, param, spec)
    return learned.quantize_with_scale(w, learned.scale_of(param, spec), spec)

  def act(self, x: jax.Array) -> jax.Array | QArray:
    """The input for the layer's op; records its statistics in calibrate."""
    if self.quant.act is None:
      return x
    if self.quant.mode == "calibrate":
      if self.quant.static_act and self.recording():
        self.put_stats(ACT_STATS, observe_act(
            self.quant, self.get_stats(ACT_STATS), x))
      return x
    spec = self.quant.act
    if spec.learn is not None:
      param = self.act_param(x)
      if self.quant.mode == "qat":
        return learned.learned_fake_quant(x, param, spec)
      return learned.quantize_with_scale(x, learned.scale_of(param, spec),
                                         spec)
    return transform_act(self.quant, x,
                         self.get_range() if self.quant.static_act else None)

  def embed(self, table: jax.Array | QArray, ids: jax.Array) -> jax.Array:
    """An embedding lookup (weight-only); records the table's range."""
    if self.quant.mode == "calibrate" and self.recording():
      self.put_stats(WEIGHT_STATS, observe_weight(
          self.quant, self.get_stats(WEIGHT_STATS), table))
    if self.quant.weight.learn is None or self.quant.mode == "calibrate":
      return embed_lookup(self.quant, table, ids)
    if self.quant.mode == "serve":
      return embed_lookup(self.quant, self._learned_weight(table), ids)
    return embed_lookup(self.quant, table, ids,
                        learned_param=self.weight_param(table))


# The ops of serve mode: the layer's own op when both operands are float,
# jaxq's low-bit op as soon as one is a QArray.


def _is_quantized(*operands: Any) -> bool:
  return any(isinstance(x, QArray) for x in operands)


def serve_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None, **kwargs) -> jax.Array:
  """``lax.dot_general``'s signature; `jaxq.dot_general` on QArrays.

  ``precision`` does not apply to the integer path and is ignored there.
  """
  if not _is_quantized(lhs, rhs):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type,
                           **kwargs)
  return ops.dot_general(lhs, rhs, dimension_numbers,
                         preferred_element_type=preferred_element_type)


def serve_einsum(subscripts: str, lhs, rhs, precision=None,
                 preferred_element_type=None, **kwargs) -> jax.Array:
  """``jnp.einsum``'s two-operand signature; `jaxq.einsum` on QArrays."""
  if not _is_quantized(lhs, rhs):
    return jnp.einsum(subscripts, lhs, rhs, precision=precision,
                      preferred_element_type=preferred_element_type, **kwargs)
  return ops.einsum(subscripts, lhs, rhs,
                    preferred_element_type=preferred_element_type)


def serve_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
               rhs_dilation=None, dimension_numbers=None,
               feature_group_count=1, batch_group_count=1, precision=None,
               preferred_element_type=None, **kwargs) -> jax.Array:
  """``lax.conv_general_dilated``'s signature; `jaxq.conv` on QArrays."""
  if not _is_quantized(lhs, rhs):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type, **kwargs)
  if batch_group_count != 1:
    raise ValueError("jaxq.conv: batch_group_count != 1 is not supported on "
                     "quantized operands.")
  return ops.conv(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                  rhs_dilation=rhs_dilation,
                  dimension_numbers=dimension_numbers,
                  feature_group_count=feature_group_count,
                  preferred_element_type=preferred_element_type)


# Transposed convolutions: flax's ConvTranspose calls lax.conv_transpose,
# which takes no injectable op, so serve mode computes the layer itself.


def _per_dim(value: int | Sequence[int] | None, rank: int) -> tuple[int, ...]:
  """Flax's broadcast of a stride or dilation (None means 1)."""
  if value is None:
    value = 1
  if isinstance(value, int):
    return (value,) * rank
  return tuple(value)


@dataclasses.dataclass(frozen=True)
class ConvTransposeConfig:
  """The settings of a linen or nnx ``ConvTranspose`` (they share them).

  Attributes:
    kernel_size: the window, ``(*window,)``; the kernel is ``(*window, in,
      out)``, or ``(*window, out, in)`` with ``transpose_kernel``.
    strides: the fractional strides (the input's dilation), per window axis.
    padding: ``"SAME"``, ``"VALID"`` or ``"CIRCULAR"`` (the forward
      convolution's), or ``(low, high)`` pairs of the transposed one.
    kernel_dilation: the kernel's dilation, per window axis.
    transpose_kernel: flip the window and swap the kernel's channel axes
      (TensorFlow's ``Conv2DTranspose``).
    precision: for float operands only (the low-bit ops ignore it).
    preferred_element_type: the output dtype, if not the promoted one.
    mask: multiplies the float kernel before it is quantized, or None (a
      `QArray` kernel from `jaxq.convert` holds ``kernel * mask`` already).
  """

  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: str | tuple[tuple[int, int], ...]
  kernel_dilation: tuple[int, ...]
  transpose_kernel: bool
  precision: Any = None
  preferred_element_type: Any = None
  mask: jax.Array | None = dataclasses.field(default=None, compare=False)

  @classmethod
  def of(cls, layer: Any) -> "ConvTransposeConfig":
    """The settings of a linen or an nnx ``ConvTranspose``."""
    kernel_size = _per_dim(layer.kernel_size, 1)
    rank = len(kernel_size)
    padding = linen_linear.canonicalize_padding(layer.padding, rank)
    if not isinstance(padding, str):
      padding = tuple(tuple(pair) for pair in padding)
    return cls(kernel_size=kernel_size,
               strides=_per_dim(layer.strides, rank),
               padding=padding,
               kernel_dilation=_per_dim(layer.kernel_dilation, rank),
               transpose_kernel=bool(layer.transpose_kernel),
               precision=layer.precision,
               preferred_element_type=layer.preferred_element_type,
               mask=layer.mask)

  def kernel_shape(self, in_features: int, features: int) -> tuple[int, ...]:
    """The kernel's shape for ``in_features`` in, ``features`` out."""
    channels = ((features, in_features) if self.transpose_kernel
                else (in_features, features))
    return self.kernel_size + channels

  def dimension_numbers(self) -> lax.ConvDimensionNumbers:
    """Channels-last input and output; the kernel's output channel is its
    last axis, or its second to last with ``transpose_kernel`` (the swap of
    ``lax.conv_transpose``, read in place instead of transposing)."""
    rank = len(self.kernel_size)
    window = tuple(range(rank))
    out_axis, in_axis = ((rank, rank + 1) if self.transpose_kernel
                         else (rank + 1, rank))
    activations = (0, rank + 1) + tuple(range(1, rank + 1))
    return lax.ConvDimensionNumbers(lhs_spec=activations,
                                    rhs_spec=(out_axis, in_axis) + window,
                                    out_spec=activations)

  def conv_padding(self) -> str | tuple[tuple[int, int], ...]:
    """The padding of the ``conv_general_dilated`` that ``lax.conv_transpose``
    runs: ``"SAME"``/``"VALID"`` name the forward convolution's, whose
    transpose pads each side of the dilated input (jax's
    ``_conv_transpose_padding``); explicit pairs pass through."""
    padding = "VALID" if self.padding == "CIRCULAR" else self.padding
    if padding not in ("SAME", "VALID"):
      return padding
    pads = []
    for size, stride, dilation in zip(self.kernel_size, self.strides,
                                      self.kernel_dilation):
      k = (size - 1) * dilation + 1  # The dilated window.
      if padding == "SAME":
        total = k + stride - 2
        low = k - 1 if stride > k - 1 else -(-total // 2)
      else:
        total = k + stride - 2 + max(k - stride, 0)
        low = k - 1
      pads.append((low, total - low))
    return tuple(pads)


def _flip_window(w: jax.Array | QArray, rank: int) -> jax.Array | QArray:
  """Reverses the window axes of a kernel, its scales and zero points too
  (blocks stay whole: each block size divides its axis)."""
  window = tuple(range(rank))
  if not isinstance(w, QArray):
    return jnp.flip(w, window)
  flip = lambda a: None if a is None else jnp.flip(a, window)
  return dataclasses.replace(w, values=flip(w.values), scale=flip(w.scale),
                             zero_point=flip(w.zero_point))


def _wrap_circular(y: jax.Array, periods: Sequence[int],
                   transpose_kernel: bool) -> jax.Array:
  """Flax's CIRCULAR padding: pads each window axis of ``y`` (N, *window, C)
  to whole periods and sums the periods (the output wraps around)."""
  rank = len(periods)
  size_diffs = [-(size - period) % (2 * period)
                for size, period in zip(y.shape[1:-1], periods)]
  # Flax puts the odd element on the right for transposed kernels.
  pads = [(d // 2, (d + 1) // 2) if transpose_kernel else ((d + 1) // 2, d // 2)
          for d in size_diffs]
  y = jnp.pad(y, [(0, 0)] + pads + [(0, 0)])
  split = [n for size, period in zip(y.shape[1:-1], periods)
           for n in (size // period, period)]
  y = y.reshape((y.shape[0], *split, y.shape[-1]))
  return jnp.sum(y, axis=tuple(range(1, 2 * rank, 2)))


def serve_conv_transpose(
    path: str, config: ConvTransposeConfig, inputs: jax.Array,
    kernel: jax.Array | QArray, bias: jax.Array | None,
    promote: Callable[[jax.Array, jax.Array | QArray, jax.Array | None],
                      tuple[Any, Any, Any]]) -> jax.Array:
  """A ``ConvTranspose`` layer's ``__call__`` with `jaxq.conv` (serve mode).

  ``lax.conv_transpose`` is ``lax.conv_general_dilated`` with the input
  dilated by the strides, unit window strides, the padding of
  `ConvTransposeConfig.conv_padding` and, with ``transpose_kernel``, the
  window flipped and the channel axes swapped. The swap is read from the
  dimension numbers, so a kernel keeps its layout and scales: its output
  channel is axis -1, or -2 with ``transpose_kernel``, which is where an
  integer kernel's per-channel scales must lie (``PerChannel(axis=-2)`` for
  transposed kernels). A masked layer's float kernel is masked before it is
  quantized, as in QAT; its `QArray` from `jaxq.convert` is masked already.

  Args:
    path: the layer's path (for error messages).
    config: the layer's settings.
    inputs: ``(*batch, *window, in)``; extra batch axes are flattened into
      one around the convolution, as flax does.
    kernel: the float kernel (multiplied by ``config.mask`` here, before
      ``promote`` quantizes it), or its `QArray` from `jaxq.convert`, which
      holds the masked kernel already.
    bias: ``(out,)``, or None.
    promote: ``(inputs, kernel, bias) -> (x, w, bias)``, the layer's dtype
      promotion that also quantizes ``x`` and ``w`` (as for every layer).

  Returns:
    ``(*batch, *out_window, out)``, as the float layer returns.

  Raises:
    ValueError: naming the layer, for integer operands whose kernel scale
      varies along a summed axis.
  """
  rank = len(config.kernel_size)
  batch_shape = inputs.shape[:inputs.ndim - rank - 1]
  inputs = jnp.reshape(inputs, (-1, *inputs.shape[len(batch_shape):]))
  if config.mask is not None and not isinstance(kernel, QArray):
    # A QArray kernel is jaxq.convert's, which quantized kernel * mask.
    kernel = kernel * config.mask
  x, w, bias = promote(inputs, kernel, bias)
  dimension_numbers = config.dimension_numbers()
  out_axis = dimension_numbers.rhs_spec[0]
  if isinstance(x, QArray) and isinstance(w, QArray) and any(
      size != 1 for axis, size in enumerate(w.scale.shape) if axis != out_axis):
    raise ValueError(
        f"jaxq serve: the kernel of {path!r} (ConvTranspose, "
        f"shape {w.shape}, transpose_kernel={config.transpose_kernel}) has "
        f"scales of shape {tuple(w.scale.shape)}; a low-bit convolution needs "
        f"them per tensor or per output channel, axis {out_axis - w.ndim} "
        f"(PerChannel(axis={out_axis - w.ndim})), or a float input "
        f"(weight-only).")
  if config.transpose_kernel:
    w = _flip_window(w, rank)
  y = serve_conv(x, w, (1,) * rank, config.conv_padding(),
                 lhs_dilation=config.strides,
                 rhs_dilation=config.kernel_dilation,
                 dimension_numbers=dimension_numbers,
                 precision=config.precision,
                 preferred_element_type=config.preferred_element_type)
  if config.padding == "CIRCULAR":
    periods = [size * stride for size, stride in
               zip(inputs.shape[1:-1], config.strides)]
    y = _wrap_circular(y, periods, config.transpose_kernel)
  if bias is not None:
    y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return jnp.reshape(y, (*batch_shape, *y.shape[1:]))


# Embedding lookups: weight-only, reading only the looked-up rows.


def embed_spec(spec: QuantSpec, table_shape: tuple[int, ...]) -> QuantSpec:
  """The spec of an embedding table: scales that never span two rows.

  A lookup reads rows, so the table keeps its rule's granularity when each
  block lies within one row (per-row channels, groups or MX along the
  features) and otherwise gets one scale per row, ``PerChannel(axis=0)``.
  """
  try:
    row_local = spec.granularity.block_shape(tuple(table_shape))[0] == 1
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
      rows = fake_quant(rows, layer.weight)
  return rows.reshape(tuple(ids.shape) + (features,))


# The int8 forward of qat mode: the low-bit op forward, the fake-quant
# layer's straight-through backward.


def uses_int8_forward(layer: LayerQuant | None) -> bool:
  """Whether ``layer``'s matmul runs on the int8 path (raising a ValueError
  naming the layer when its specs cannot)."""
  if layer is None or not layer.int8_forward:
    return False
  for what, spec in (("weight", layer.weight), ("activation", layer.act)):
    if spec is None or spec.fmt.kind != "int" or spec.learn is not None:
      raise ValueError(
          f"jaxq qat int8_forward: {layer.path!r} ({layer.module_type}) needs "
          f"an integer {what} spec without learn=..., got {spec}; quantize "
          f"this layer with another rule or drop int8_forward.")
  return True


def _int8_qat(quant_op: Callable[[QArray | jax.Array, QArray | jax.Array],
                                 jax.Array],
              layer: LayerQuant, x: jax.Array, w: jax.Array,
              act_range: ActRange | None) -> jax.Array:
  """``quant_op(quantize(x), quantize(w))``, a bilinear low-bit op, with the
  gradient of the same op on ``fake_quant(x)`` and ``fake_quant(w)``."""
  amin, amax = _static_range(layer, act_range, x.shape)

  # The range is an argument, not a closure, so that custom_vjp sees it.
  @jax.custom_vjp
  def op(x, w, amin, amax):
    return fwd(x, w, amin, amax)[0]

  def fwd(x, w, amin, amax):
    qx = quantize(x, layer.act, amax=amax, amin=amin)
    qw = quantize(w, layer.weight)
    # The int values and scales are the residuals, plus x when its range is
    # static (the clipped estimator's mask needs it).
    return quant_op(qx, qw), (qx, qw, None if amax is None else x, amin,
                              amax)

  def bwd(residuals, g):
    qx, qw, x, amin, amax = residuals
    # The float op's gradients at the dequantized operands, as the
    # transposes of quant_op with one operand kept quantized: a scale that
    # is constant along the contraction then multiplies g (the output), not
    # a float copy of the operand, and the int values convert on the fly.
    x_like = jax.ShapeDtypeStruct(qx.shape, qx.dtype)
    w_like = jax.ShapeDtypeStruct(qw.shape, qw.dtype)
    dx_hat, = jax.linear_transpose(lambda a: quant_op(a, qw), x_like)(g)
    dw, = jax.linear_transpose(lambda b: quant_op(qx, b), w_like)(g)
    # fake_quant's estimator: the identity for a range of the operand's own
    # (the weight's; a dynamic act's), else its clipped vjp at x.
    if x is None:
      dx = dx_hat
    else:
      dx = jax.vjp(lambda x: fake_quant(x, layer.act, amax=amax, amin=amin),
                   x)[1](dx_hat)[0]
    return dx, dw, *jax.tree.map(jnp.zeros_like, (amin, amax))

  op.defvjp(fwd, bwd)
  return op(x, w, amin, amax)


def _int8_qat_layer_op(layer: LayerQuant, act_range: ActRange | None,
                       x: jax.Array, w: jax.Array, preferred_element_type,
                       quant_op: Callable[..., jax.Array]) -> jax.Array:
  """`_int8_qat` of ``quant_op(a, b, preferred_element_type=...)`` after
  checking the layer's specs against the operands."""
  check_spec(layer, layer.act, x.shape, "activation")
  check_spec(layer, layer.weight, w.shape, "weight")
  out_dtype = preferred_element_type or jnp.result_type(x.dtype, w.dtype)
  return _int8_qat(
      functools.partial(quant_op, preferred_element_type=out_dtype),
      layer, x, w, act_range)


def int8_qat_dot_general(layer: LayerQuant, act_range: ActRange | None,
                         x: jax.Array, w: jax.Array, dimension_numbers,
                         precision=None, preferred_element_type=None,
                         **kwargs) -> jax.Array:
  """``lax.dot_general(x, w, ...)`` of a qat layer on the int8 path.

  ``x`` is the float input and ``w`` the float weight, as the layer hands
  them to its op; ``precision`` and ``kwargs`` (``out_sharding``) do not
  apply to the integer matmul and are ignored. The output has ``x``'s dtype
  (or ``preferred_element_type``).
  """
  del precision, kwargs
  return _int8_qat_layer_op(
      layer, act_range, x, w, preferred_element_type,
      functools.partial(ops.dot_general,
                        dimension_numbers=dimension_numbers))


def int8_qat_einsum(layer: LayerQuant, act_range: ActRange | None,
                    subscripts: str, x: jax.Array, w: jax.Array,
                    precision=None, preferred_element_type=None,
                    **kwargs) -> jax.Array:
  """``jnp.einsum(subscripts, x, w)`` of a qat layer on the int8 path (as
  `int8_qat_dot_general`)."""
  del precision, kwargs
  return _int8_qat_layer_op(layer, act_range, x, w, preferred_element_type,
                            functools.partial(ops.einsum, subscripts))
