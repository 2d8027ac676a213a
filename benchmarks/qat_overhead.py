"""QAT overhead: the train step with W8A8 fake-quant over the float step.

W8A8 everywhere a layer has a weight: int8 weights per output channel and
int8 activations per token, with ranges from the data of each step (dynamic)
and a straight-through gradient. Two linen models (``--quick``: smaller):

====  ===============================================  ======================
case  model                                            batch
====  ===============================================  ======================
mlp   4 x Dense(1024), ReLU between                    256 x 1024
block transformer block, d=512, 8 heads, MLP 4d,       8 x 256 tokens
      pre-LayerNorm (q/k/v/out, up, down quantized)
====  ===============================================  ======================

Implementations (``impl``), each timing one jitted SGD step (forward,
backward, update) on the same data, interleaved so that machine noise hits
them alike:

* ``float``: the model as is (the baseline of ``ratio``);
* ``jaxq``: ``jaxq.quantize_model(model, rules, "qat")``;
* ``qwix``: ``qwix.quantize_model(model, qwix.QtProvider(rules))`` with
  ``QtRule``s on the same layers (int8 weights channelwise, int8 ``absmax``
  activations per token), when ``qwix`` is importable;
* ``aqt``: the same model with ``aqt.jax.v2.flax.aqt_flax.AqtDotGeneral``
  (``config_v4(fwd_bits=8, dlhs_bits=None, drhs_bits=None)``: int8 forward,
  float backward; per-token and per-channel scales along the contraction
  axes) as the layers' ``dot_general_cls``, when ``aqt`` is importable.

The attention's activation-by-activation einsums (scores, weighted values)
stay in float in every implementation. ``ratio`` is the median step time
over the float step of the same model in the same run.

``--int8-forward`` adds ``jaxq-int8``: the same W8A8 QAT step with
``jaxq.quantize_model(model, rules, "qat", int8_forward=True)``, so the
forward matmuls multiply int8 values (int32 accumulation) and the backward
is the straight-through estimator in float: the path for accelerators with fast
int8 matmuls (on a GPU, compare it with the float step at d >= 2048).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import _harness  # noqa: E402
import jaxq  # noqa: E402
from jaxq import PerChannel, PerToken, QuantSpec  # noqa: E402

WEIGHT = QuantSpec("int8", PerChannel(axis=-1))
ACT = QuantSpec("int8", PerToken())
# q/k/v kernels are (d, heads, head_dim): one scale per (head, head_dim).
QKV_WEIGHT = QuantSpec("int8", PerChannel(axis=(1, 2)))
MLP_RULES = (jaxq.Rule(r".*", weight=WEIGHT, act=ACT),)
BLOCK_RULES = (jaxq.Rule(r".*/(query|key|value)", weight=QKV_WEIGHT, act=ACT),
               jaxq.Rule(r".*", weight=WEIGHT, act=ACT))
# The layers with weights; qwix would otherwise also quantize the attention
# einsums, which run inside the "attn" module itself.
QUANTIZED_PATHS = r"(dense_\d+|attn/(query|key|value|out)|up|down)"


class MLP(nn.Module):
  """``depth`` Dense layers of ``width`` with ReLU between."""

  width: int
  depth: int = 4
  dot_general_cls: Any = None
  dot_general: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.depth):
      x = nn.Dense(self.width, dot_general_cls=self.dot_general_cls,
                   dot_general=self.dot_general, dtype=x.dtype,
                   name=f"dense_{i}")(x)
      if i < self.depth - 1:
        x = nn.relu(x)
    return x


class Block(nn.Module):
  """A pre-LayerNorm transformer block with a 4x MLP."""

  d: int
  heads: int
  dot_general_cls: Any = None
  dot_general: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.LayerNorm(dtype=x.dtype)(x)
    x = x + nn.MultiHeadDotProductAttention(
        self.heads, dtype=x.dtype, qkv_dot_general_cls=self.dot_general_cls,
        out_dot_general_cls=self.dot_general_cls,
        qkv_dot_general=self.dot_general, out_dot_general=self.dot_general,
        name="attn")(h)
    h = nn.LayerNorm(dtype=x.dtype)(x)
    dense = functools.partial(nn.Dense, dot_general_cls=self.dot_general_cls,
                              dot_general=self.dot_general, dtype=x.dtype)
    h = nn.gelu(dense(4 * self.d, name="up")(h))
    return x + dense(self.d, name="down")(h)


Make = Callable[..., nn.Module]
# (params, x, y) -> (params, opt_state, loss): one train step.
Step = Callable[[Any, jax.Array, jax.Array], Any]
Case = tuple[Callable[..., nn.Module], tuple[int, ...], tuple[int, ...],
             tuple[jaxq.Rule, ...]]


def _cases(quick: bool) -> dict[str, Case]:
  """case -> (model factory taking dot_general_cls, input shape, qwix's act
  batch axes (the per-token axes), jaxq rules)."""
  if quick:
    return {"mlp": (functools.partial(MLP, 256), (64, 256), (0,), MLP_RULES),
            "block": (functools.partial(Block, 128, 4), (2, 64, 128),
                      (0, 1), BLOCK_RULES)}
  return {"mlp": (functools.partial(MLP, 1024), (256, 1024), (0,),
                  MLP_RULES),
          "block": (functools.partial(Block, 512, 8), (8, 256, 512),
                    (0, 1), BLOCK_RULES)}


def _train_step(apply: Callable[..., jax.Array], learning_rate: float = 1e-3
                ) -> Step:
  """A jitted SGD step on the mean squared error of ``apply(params, x)``."""
  tx = optax.sgd(learning_rate)

  def loss_fn(params, x, y):
    return jnp.mean((apply(params, x).astype(jnp.float32) - y) ** 2)

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return lambda params, x, y: step(params, tx.init(params), x, y)


def _float_impl(make: Make, x: jax.Array) -> tuple[Step, Any]:
  model = make()
  params = model.init(jax.random.key(0), x)["params"]
  return _train_step(lambda p, x: model.apply({"params": p}, x)), params


def _jaxq_impl(make: Make, x: jax.Array, rules: tuple[jaxq.Rule, ...],
               int8_forward: bool = False) -> tuple[Step, Any]:
  model = make()
  qmodel = jaxq.quantize_model(model, rules, "qat", int8_forward=int8_forward)
  params = qmodel.init(jax.random.key(0), x)["params"]
  return _train_step(lambda p, x: qmodel.apply({"params": p}, x)), params


def _qwix_impl(make: Make, x: jax.Array,
               act_batch_axes: tuple[int, ...]) -> tuple[Step, Any]:
  import qwix
  rules = [qwix.QtRule(module_path=QUANTIZED_PATHS, weight_qtype="int8",
                       act_qtype="int8", act_calibration_method="absmax",
                       act_batch_axes=act_batch_axes)]
  qmodel = qwix.quantize_model(make(), qwix.QtProvider(rules))
  params = qmodel.init(jax.random.key(0), x)["params"]
  return _train_step(lambda p, x: qmodel.apply({"params": p}, x)), params


def _aqt_impl(make: Make, x: jax.Array) -> tuple[Step, Any]:
  # Imported here: the peers are optional (the "bench" extra).
  from aqt.jax.v2 import config as aqt_config
  from aqt.jax.v2.flax import aqt_flax
  cfg = aqt_config.config_v4(fwd_bits=8, dlhs_bits=None, drhs_bits=None)
  model = make(dot_general_cls=functools.partial(
      aqt_flax.AqtDotGeneral, cfg, prng_name=None))
  params = model.init(jax.random.key(0), x)["params"]
  return _train_step(lambda p, x: model.apply({"params": p}, x)), params


def _importable(name: str) -> bool:
  try:
    __import__(name)
  except ImportError:
    return False
  return True


def main() -> None:
  p = _harness.parser(__doc__.splitlines()[0])
  p.add_argument("--int8-forward", action="store_true",
                 help="add jaxq-int8: QAT with the forward on int8 matmuls")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed steps per implementation (default 10; 3 quick)")
  args = p.parse_args()
  repeats = args.repeats or (3 if args.quick else 10)
  peers = [name for name in ("qwix", "aqt") if _importable(name)]
  rows = []
  for case, (make, shape, act_batch_axes, rules) in _cases(
      args.quick).items():
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, shape)
    y = jax.random.normal(ky, shape)
    impls = {"float": _float_impl(make, x),
             "jaxq": _jaxq_impl(make, x, rules)}
    if args.int8_forward:
      impls["jaxq-int8"] = _jaxq_impl(make, x, rules, int8_forward=True)
    if "qwix" in peers:
      impls["qwix"] = _qwix_impl(make, x, act_batch_axes)
    if "aqt" in peers:
      impls["aqt"] = _aqt_impl(make, x)
    fns = {name: functools.partial(step, params, x, y)
           for name, (step, params) in impls.items()}
    times = _harness.interleaved_median_times(fns, repeats=repeats)
    for name, t in times.items():
      rows.append({"case": case, "impl": name, "median_s": t,
                   "ratio": t / times["float"]})
  _harness.emit("qat_overhead", rows, args.json,
                note="train step over the float step; W8A8 per-channel "
                     "weights, per-token activations")


if __name__ == "__main__":
  main()
