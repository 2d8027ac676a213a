"""QAT overhead: the train step with W8A8 fake-quant over the float step.

W8A8 everywhere a layer has a weight: int8 weights per output channel and
int8 activations per token, with ranges from the data of each step (dynamic)
and a straight-through gradient. Two linen models (``--quick``: smaller):

==========  =========================================  ====================
case        model                                      batch
==========  =========================================  ====================
mlp         4 x Dense(1024), ReLU between              256 x 1024
block       transformer block, d=512, 8 heads, MLP     8 x 256 tokens
            4d, pre-LayerNorm (q/k/v/out, up, down
            quantized)
block-2048  the same block, d=2048, 16 heads           8 x 1024 tokens
            (``--large``; by default on a GPU/TPU)
==========  =========================================  ====================

Activations (and so every matmul) run in ``--dtype``: bfloat16 by default on
an accelerator, where the ``float`` row is then the bf16 step, float32 on a
CPU. Parameters stay float32.

Implementations (``impl``), each timing one jitted SGD step (forward,
backward, update) on the same data, interleaved round by round (each round
runs every implementation once, in a new random order) so that machine
noise hits them alike; ``--clock cpu`` times this process's CPU time
instead of wall time, steadier on a machine shared with other jobs:

* ``float``: the model as is (the baseline of ``ratio``);
* ``jaxq``: ``jaxq.quantize_model(model, rules, "qat")`` (fake-quant, the
  exact straight-through backward, ``backward="ste"``);
* ``jaxq-float``: the same with ``backward="float"``: the backward matmuls
  take the float operands, as the peers' do;
* ``qwix``: ``qwix.quantize_model(model, qwix.QtProvider(rules))`` with
  ``QtRule``s on the same layers (int8 weights channelwise, int8 ``absmax``
  activations per token), when ``qwix`` is importable;
* ``aqt``: the same model with ``aqt.jax.v2.flax.aqt_flax.AqtDotGeneral``
  (``config_v4(fwd_bits=8, dlhs_bits=None, drhs_bits=None)``: int8 forward,
  float backward; per-token and per-channel scales along the contraction
  axes) as the layers' ``dot_general_cls``, when ``aqt`` is importable.

The attention's activation-by-activation einsums (scores, weighted values)
stay in float in every implementation.

Columns:

* ``ratio``: the median over rounds of (step time / float step time of the
  same round); ``ratio_ci95`` a bootstrap 95% interval for it. Two rows
  whose intervals overlap are not distinguishable on this machine.
* ``grad_err``: ``|g - g_jaxq| / |g_jaxq|`` over all parameters, ``g`` the
  loss gradient of the row's implementation and ``g_jaxq`` the fake-quant
  straight-through gradient (the gradient of ``loss(fake_quant(x) @
  fake_quant(w))`` with identity estimators), at the same parameters and
  data. ``jaxq-float`` isolates what the float backward alone changes
  (the same forward, the backward matmuls on the float operands): under
  1% here. The peers' backward also multiplies the float operands, but
  their ``grad_err`` comes out about as large as the float model's own:
  it holds their forward's differences from jaxq's too (other rounding of
  the scales and values), so it does not measure their backward alone.

In bfloat16, fake-quant's dequantized values are rounded to bfloat16 while
the int8 path accumulates the exact products, so there ``jaxq-int8``'s
``grad_err`` is of the order of bfloat16 rounding, not float32's.

``--int8-forward`` adds ``jaxq-int8``: the same W8A8 QAT step with
``jaxq.quantize_model(model, rules, "qat", int8_forward=True)``, so the
forward matmuls multiply int8 values (int32 accumulation) and the backward
is the same straight-through gradient, its matmuls taking the int8 operands
converted to float with the scales moved onto the cotangent: the path for
accelerators with fast int8 matmuls (on a GPU, compare it with the float
step at d >= 2048). With it come ``jaxq-int8-float`` (``backward="float"``)
and ``jaxq-int8-int8`` (``backward="int8"``: the backward matmuls int8 x
int8 -> int32 too, on the gradient rounded stochastically; one fixed
``rngs={"jaxq": key}`` for every step, which costs the same as a new one).

``--backward MODE [MODE ...]`` (``ste``, ``float``, ``int8``; default all)
picks the backward modes of the jaxq rows (``ste`` is always run: it is the
``grad_err`` reference); ``int8`` needs ``--int8-forward``.

The header names the CPU and its int8 matmul instructions (``amx_int8``,
``avx512_vnni``, ``avx_vnni`` from ``/proc/cpuinfo``): XLA's CPU backend
(oneDNN) runs int8 x int8 -> int32 dots fast only where they exist. After
the table, one line per case checks the goals: jaxq's fastest row against
the fastest peer (compared directly, the median of their per-round time
ratio with its 95% interval), ``jaxq-int8`` (exact STE) against the float
step, and ``jaxq`` (fake-quant STE) within 1.15x of it.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import _harness  # noqa: E402
import jaxq  # noqa: E402
from jaxq import PerChannel, PerToken, QuantSpec  # noqa: E402
from jaxq.flax.int8_qat import BACKWARDS  # noqa: E402

# --clock: what one round measures (see _harness.interleaved_times).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

WEIGHT = QuantSpec("int8", PerChannel(axis=-1))
ACT = QuantSpec("int8", PerToken())
# q/k/v kernels are (d, heads, head_dim): one scale per (head, head_dim).
QKV_WEIGHT = QuantSpec("int8", PerChannel(axis=(1, 2)))
MLP_RULES = (jaxq.Rule(r".*", weight=WEIGHT, act=ACT),)
# The output projection contracts (heads, head_dim): one act scale per token
# over both (qwix's act_batch_axes give the same).
OUT_ACT = QuantSpec("int8", PerToken(contraction_axis=(-2, -1)))
BLOCK_RULES = (jaxq.Rule(r".*/(query|key|value)", weight=QKV_WEIGHT, act=ACT),
               jaxq.Rule(r".*/out", weight=WEIGHT, act=OUT_ACT),
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
# (params, x) -> output: a model's apply function.
Apply = Callable[[Any, jax.Array], jax.Array]
# (params, x, y) -> (params, opt_state, loss): one train step.
Step = Callable[[Any, jax.Array, jax.Array], Any]
Case = tuple[Callable[..., nn.Module], tuple[int, ...], tuple[int, ...],
             tuple[jaxq.Rule, ...]]


def _cases(quick: bool, large: bool) -> dict[str, Case]:
  """case -> (model factory taking dot_general_cls, input shape, qwix's act
  batch axes (the per-token axes), jaxq rules)."""
  if quick:
    return {"mlp": (functools.partial(MLP, 256), (64, 256), (0,), MLP_RULES),
            "block": (functools.partial(Block, 128, 4), (2, 64, 128),
                      (0, 1), BLOCK_RULES)}
  cases = {"mlp": (functools.partial(MLP, 1024), (256, 1024), (0,),
                   MLP_RULES),
           "block": (functools.partial(Block, 512, 8), (8, 256, 512),
                     (0, 1), BLOCK_RULES)}
  if large:
    cases["block-2048"] = (functools.partial(Block, 2048, 16),
                           (8, 1024, 2048), (0, 1), BLOCK_RULES)
  return cases


def _loss(apply: Apply, params: Any, x: jax.Array, y: jax.Array
          ) -> jax.Array:
  return jnp.mean((apply(params, x).astype(jnp.float32) - y) ** 2)


def _train_step(apply: Apply, learning_rate: float = 1e-3) -> Step:
  """A jitted SGD step on the mean squared error of ``apply(params, x)``."""
  tx = optax.sgd(learning_rate)

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(functools.partial(_loss, apply))(
        params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return lambda params, x, y: step(params, tx.init(params), x, y)


def _grads(apply: Apply, params: Any, x: jax.Array, y: jax.Array) -> Any:
  """The loss gradient of ``apply`` with respect to ``params``."""
  return jax.jit(jax.grad(functools.partial(_loss, apply)))(params, x, y)


def _gradient_error(grads: Any, reference: Any) -> float:
  """``|g - g_ref| / |g_ref|`` over all parameters (every implementation
  here has the float model's params, so the trees match)."""
  diff = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), grads, reference)
  norm = jax.tree.map(lambda b: jnp.sum(b ** 2), reference)
  return float(jnp.sqrt(sum(jax.tree.leaves(diff)) /
                        sum(jax.tree.leaves(norm))))


def _float_impl(make: Make, x: jax.Array) -> tuple[Apply, Any]:
  model = make()
  params = model.init(jax.random.key(0), x)["params"]
  return lambda p, x: model.apply({"params": p}, x), params


def _jaxq_impl(make: Make, x: jax.Array, rules: tuple[jaxq.Rule, ...],
               int8_forward: bool = False, backward: str = "ste"
               ) -> tuple[Apply, Any]:
  qmodel = jaxq.quantize_model(make(), rules, "qat", int8_forward=int8_forward,
                               backward=backward)
  params = qmodel.init(jax.random.key(0), x)["params"]
  # backward="int8"'s rounding key: one for every step (costs the same).
  rngs = {"jaxq": jax.random.key(2)}
  return lambda p, x: qmodel.apply({"params": p}, x, rngs=rngs), params


def _jaxq_name(int8_forward: bool, backward: str) -> str:
  """``jaxq``, ``jaxq-float``, ``jaxq-int8``, ``jaxq-int8-float``..."""
  return "-".join(["jaxq"] + ["int8"] * int8_forward +
                  [backward] * (backward != "ste"))


def cpu_int8() -> str:
  """The CPU's model name and its int8 matmul instructions, from
  ``/proc/cpuinfo`` (``"unknown"`` where there is none)."""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return "unknown CPU"
  model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                if line.startswith("model name")), "unknown CPU")
  flags = set(next((line.split(":", 1)[1].split() for line in
                    info.splitlines() if line.startswith("flags")), ()))
  fast = [f for f in ("amx_int8", "avx512_vnni", "avx_vnni") if f in flags]
  return (f"{model}, int8: {' '.join(fast)}" if fast
          else f"{model}, int8: no VNNI/AMX")


def goals(rows: list[dict[str, Any]],
          times: dict[str, dict[str, np.ndarray]]) -> list[str]:
  """One line per case: the benchmark's goals, measured (see docstring).

  ``times[case][impl]`` are the per-round times: jaxq's fastest row and the
  fastest peer are compared round by round (the median of their per-round
  ratio, with its bootstrap 95% interval), not through the float step.
  """
  lines = []
  for case in dict.fromkeys(r["case"] for r in rows):
    ratio = {r["impl"]: r["ratio"] for r in rows if r["case"] == case}
    ours = {k: v for k, v in ratio.items() if k.startswith("jaxq")}
    peers = {k: v for k, v in ratio.items() if k in ("qwix", "aqt")}
    parts = []
    best = min(ours, key=ours.get)
    if peers:
      peer = min(peers, key=peers.get)
      paired, low, high = _harness.ratio_with_interval(times[case][best],
                                                       times[case][peer])
      parts.append(f"fastest jaxq {best} {ours[best]:.3f} vs fastest peer "
                   f"{peer} {peers[peer]:.3f}, {best}/{peer} per round "
                   f"{paired:.3f} [{low:.3f}, {high:.3f}]: "
                   f"{'met' if paired <= 1.0 else 'MISSED'}")
    if "jaxq-int8" in ratio:
      parts.append(f"jaxq-int8 (exact STE) {ratio['jaxq-int8']:.3f} <= 1.0: "
                   f"{'met' if ratio['jaxq-int8'] <= 1.0 else 'MISSED'}")
    parts.append(f"jaxq (fake-quant STE) {ratio['jaxq']:.3f} <= 1.15: "
                 f"{'met' if ratio['jaxq'] <= 1.15 else 'MISSED'}")
    lines.append(f"goals {case}: " + "; ".join(parts))
  return lines


def _qwix_impl(make: Make, x: jax.Array,
               act_batch_axes: tuple[int, ...]) -> tuple[Apply, Any]:
  import qwix
  rules = [qwix.QtRule(module_path=QUANTIZED_PATHS, weight_qtype="int8",
                       act_qtype="int8", act_calibration_method="absmax",
                       act_batch_axes=act_batch_axes)]
  qmodel = qwix.quantize_model(make(), qwix.QtProvider(rules))
  params = qmodel.init(jax.random.key(0), x)["params"]
  return lambda p, x: qmodel.apply({"params": p}, x), params


def _aqt_impl(make: Make, x: jax.Array) -> tuple[Apply, Any]:
  # Imported here: the peers are optional (the "bench" extra).
  from aqt.jax.v2 import config as aqt_config
  from aqt.jax.v2.flax import aqt_flax
  cfg = aqt_config.config_v4(fwd_bits=8, dlhs_bits=None, drhs_bits=None)
  model = make(dot_general_cls=functools.partial(
      aqt_flax.AqtDotGeneral, cfg, prng_name=None))
  params = model.init(jax.random.key(0), x)["params"]
  return lambda p, x: model.apply({"params": p}, x), params


def _importable(name: str) -> bool:
  try:
    __import__(name)
  except ImportError:
    return False
  return True


def parse_args(argv: list[str] | None = None
               ) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
  """The parser and the command line, checked (``argv``: sys.argv[1:] when
  None). Without ``--backward``, every mode of `BACKWARDS`."""
  p = _harness.parser(__doc__.splitlines()[0])
  p.add_argument("--int8-forward", action="store_true",
                 help="add jaxq-int8: QAT with the forward on int8 matmuls")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed rounds per implementation (default 30; 3 quick)")
  p.add_argument("--case", action="append", default=None,
                 help="run only this case (repeatable; default: all)")
  p.add_argument("--no-peers", action="store_true",
                 help="leave Qwix and AQT out even when they are installed")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="activation dtype of every model (default: bfloat16 "
                      "on an accelerator, float32 on a CPU)")
  p.add_argument("--backward", nargs="+", choices=BACKWARDS,
                 default=list(BACKWARDS),
                 help="the backward modes of the jaxq rows (default: all; "
                      "'ste' always runs, 'int8' needs --int8-forward)")
  p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                 help="wall time (default) or this process's CPU time "
                      "(steadier on a machine shared with other jobs)")
  p.add_argument("--large", action="store_true", default=None,
                 help="add block-2048 (d=2048, 16 heads, 8 x 1024 tokens); "
                      "on by default on an accelerator")
  args = p.parse_args(argv)
  if "int8" in args.backward and not args.int8_forward and (
      args.backward != list(BACKWARDS)):
    p.error("--backward int8 multiplies the int8 forward's values; add "
            "--int8-forward")
  return p, args


def main(argv: list[str] | None = None) -> None:
  p, args = parse_args(argv)
  backwards = ["ste"] + [b for b in BACKWARDS
                         if b in args.backward and b != "ste"]
  on_cpu = jax.default_backend() == "cpu"
  dtype = jnp.dtype(args.dtype or ("float32" if on_cpu else "bfloat16"))
  large = (not on_cpu) if args.large is None else args.large
  repeats = args.repeats or (3 if args.quick else 30)
  peers = [name for name in ("qwix", "aqt")
           if not args.no_peers and _importable(name)]
  rows = []
  case_times = {}
  cases = _cases(args.quick, large)
  unknown = set(args.case or ()) - set(cases)
  if unknown:
    p.error(f"unknown --case {sorted(unknown)}; this run has {list(cases)}")
  for case, (make, shape, act_batch_axes, rules) in cases.items():
    if args.case and case not in args.case:
      continue
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, shape, dtype)
    y = jax.random.normal(ky, shape)
    impls = {"float": _float_impl(make, x)}
    for int8_forward in (False, True) if args.int8_forward else (False,):
      for backward in backwards:
        if backward != "int8" or int8_forward:
          impls[_jaxq_name(int8_forward, backward)] = _jaxq_impl(
              make, x, rules, int8_forward, backward)
    if "qwix" in peers:
      impls["qwix"] = _qwix_impl(make, x, act_batch_axes)
    if "aqt" in peers:
      impls["aqt"] = _aqt_impl(make, x)
    fns = {name: functools.partial(_train_step(apply), params, x, y)
           for name, (apply, params) in impls.items()}
    times = _harness.interleaved_times(fns, repeats=repeats, shuffle_seed=0,
                                       clock=CLOCKS[args.clock])
    case_times[case] = times
    reference = _grads(*impls["jaxq"], x, y)
    for name, (apply, params) in impls.items():
      ratio, low, high = _harness.ratio_with_interval(times[name],
                                                      times["float"])
      rows.append({"case": case, "impl": name,
                   "median_s": float(np.median(times[name])),
                   "ratio": ratio, "ratio_ci95": f"{low:.3f}-{high:.3f}",
                   "grad_err": _gradient_error(_grads(apply, params, x, y),
                                               reference)})
  _harness.emit("qat_overhead", rows, args.json,
                note=f"{cpu_int8()}; {dtype.name} activations; {args.clock} "
                     f"time; train step over the float step, median of "
                     f"{repeats} per-round ratios (shuffled rounds); W8A8 "
                     f"per-channel weights, per-token activations; grad_err "
                     f"vs jaxq's fake-quant gradient")
  for line in goals(rows, case_times):
    print(line)


if __name__ == "__main__":
  main()
