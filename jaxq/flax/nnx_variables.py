"""The variables of quantized nnx layers, kept as the layers' attributes.

The nnx counterpart of `jaxq.flax.linen_variables`: the `nnx.Variable`
types jaxq adds to a quantized model (`QuantStat`, `QuantRange`,
`QuantFixed`, `QuantEnabled`), and `ModuleVariables`, which reads and writes
them for one call of one layer (`jaxq.flax.layer_variables.LayerVariables`
over a module's attributes).

Each quantized layer (`jaxq.flax.nnx_layers`) carries, as attributes:

* ``jaxq_layer``: its `LayerQuant` (static), or None when a skip rule or no
  rule applies; ``jaxq_info``: its `LayerInfo`, whose ``serve_fallback`` is
  decided at quantize time from the specs and the kernel shape, as linen
  decides it (`jaxq.flax.serve_ops.layer_fallback_reason`).
* ``jaxq_rngs``: with ``backward="int8"``, the ``nnx.Rngs`` given to
  `quantize_model` (one object shared by the layers), whose key rounds the
  gradient.
* ``jaxq_weight_stats``, ``jaxq_act_stats``, ``jaxq_input_moment_stats``:
  `QuantStat` variables holding observer states (the last an "mse"
  weight's `InputMoment`, see `jaxq.flax.core`), created by the first
  calibrate-mode call (``nnx.state(qmodel, QuantStat)`` collects them).
* ``jaxq_act_range``: a `QuantRange` variable ``{"amax": ...}`` for a static
  act spec, loaded with ``nnx.update(qmodel, jaxq.flax.act_ranges(...))`` or
  from `jaxq.convert`'s state.
* ``jaxq_weight_range``, ``jaxq_act_smooth``: `QuantFixed` variables, what
  the PTQ algorithms (`jaxq.gptq`, `jaxq.awq`, `jaxq.smoothquant`) fixed
  (see `jaxq.flax.core.FIXED_NAMES`), never trained.
* ``jaxq_weight_scale``, ``jaxq_act_scale`` (``jaxq_weight_clip``,
  ``jaxq_act_clip`` for PACT): ``nnx.Param`` learned ranges of specs with
  ``learn`` set (see `jaxq.flax.core`), created by the first qat-mode call
  (run the model once, e.g. `jaxq.qat.init_learned`, before building the
  optimizer so that it sees them), an activation's from ``jaxq_act_range``
  when loaded. `jaxq.convert`'s state carries them to the serve model.
* ``jaxq_enabled``: a switchable layer's `QuantEnabled` flag (on), read on
  every call.

Attention modules with a KV cache rule whose spec has static per-head
ranges carry ``jaxq_kv_stats`` (a `QuantStat`, calibrate mode) and
``jaxq_kv_range`` (a `QuantKVRange`), see `jaxq.flax.kv_cache`.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jaxq.flax import checks
from jaxq.flax import core
from jaxq.flax import int8_qat
from jaxq.flax import layer_variables

ENABLED_ATTR = "jaxq_enabled"  # A `QuantEnabled` of switchable layers.


class QuantStat(nnx.Variable):
  """An observer state recorded by calibrate mode."""


class QuantRange(nnx.Variable):
  """A static activation range ``{"amax": ...[, "amin": ...]}``."""


class QuantKVRange(nnx.Variable):
  """A KV cache's static per-head ranges ``{"key": amax, "value": amax}``
  (`jaxq.flax.kv_cache`), each ``(1, 1, H, 1)``."""


class QuantEnabled(nnx.Variable):
  """A switchable layer's on/off flag, a boolean scalar (``switchable``)."""


class QuantFixed(nnx.Variable):
  """A PTQ algorithm's fixed per-layer variable: a weight range
  ``{"amax": ...[, "amin": ...]}`` or input smoothing factors."""


class ModuleVariables(layer_variables.LayerVariables):
  """One call of one quantized nnx layer; variables kept as its attributes."""

  def __init__(self, module: nnx.Module):
    super().__init__(module.jaxq_layer)
    self.module = module

  def get_stats(self, name: str) -> Any | None:
    stat = getattr(self.module, f"jaxq_{name}_stats", None)
    return None if stat is None else stat.get_value()

  def put_stats(self, name: str, state: Any) -> None:
    attr = f"jaxq_{name}_stats"
    if getattr(self.module, attr, None) is None:
      setattr(self.module, attr, QuantStat(state))
    else:
      getattr(self.module, attr).set_value(state)

  def get_range(self) -> core.ActRange | None:
    held = getattr(self.module, "jaxq_act_range", None)
    if held is None:
      return None
    act_range = held.get_value()
    # Concrete (an eager call) ranges are checked here; under jit they are
    # traced and were checked where they were made (act_ranges, convert).
    checks.check_act_range("jaxq", self.quant.path, act_range,
                           self.quant.act)
    return act_range

  def get_enabled(self) -> jax.Array | None:
    flag = getattr(self.module, ENABLED_ATTR, None)
    return None if flag is None else flag.get_value()

  def get_fixed(self, name: str) -> Any | None:
    held = getattr(self.module, f"jaxq_{name}", None)
    return None if held is None else held.get_value()

  def get_learned(self, name: str) -> jax.Array | None:
    param = getattr(self.module, f"jaxq_{name}", None)
    return None if param is None else param.get_value()

  def backward_key(self) -> jax.Array | None:
    """backward="int8"'s key: the next from the layer's ``jaxq_rngs`` (the
    ``rngs`` given to `quantize_model`), its ``"jaxq"`` stream or default;
    None without one (a forward needs none)."""
    rngs = getattr(self.module, "jaxq_rngs", None)
    return None if rngs is None else rngs.jaxq()

  def missing_key_error(self) -> ValueError:
    """What a gradient through the layer raises without a key."""
    return ValueError(
        f"jaxq qat backward='int8': {self.quant.path!r} "
        f"({self.quant.module_type}) rounds its gradient stochastically "
        f"and needs a PRNG key; pass rngs=nnx.Rngs({int8_qat.RNG_NAME}=seed)"
        f" to quantize_model.")

  def put_learned(self, name: str, value: jax.Array) -> None:
    if self.quant.mode != "qat":
      raise ValueError(
          f"jaxq {self.quant.mode}: {self.quant.path!r} has a learned range "
          f"but no 'jaxq_{name}' parameter; load the trained state from "
          f"jaxq.convert (nnx.update(qmodel, serving)).")
    setattr(self.module, f"jaxq_{name}", nnx.Param(value))

