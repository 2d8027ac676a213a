"""Cost of the accuracy tools: `jaxq.sensitivity` and `jaxq.partial_quantize`
on a CNN with many layers, compiled once versus once per layer.

The model: ``--layers`` (default 24; ``--quick``: 6) 3x3 ``nn.Conv`` layers
of 8 channels with ReLU on 16 x 16 x 3 images, then a ``Dense`` head. The
rules quantize every layer: int4 weights per output channel, int8 static
activations per tensor (max calibration). ``eval_fn`` is the cosine
similarity of the model's outputs to the float model's on two evaluation
batches; two calibration batches.

``--mode serve`` runs both tools in serve mode (the low-bit ops; case
names end in "(serve)") instead of qat mode.

Cases (``case``), each timed end to end (calibration, captures, every
evaluation and every compilation; a new call compiles again, so every
repeat pays it):

* ``sensitivity N convs``: ``jaxq.sensitivity`` (qat mode);
* ``partial N convs``: ``jaxq.partial_quantize`` with the table made once
  beforehand and ``max_drop=0``, so the greedy loop evaluates the model with
  0, 1, ..., N layers left in float (N + 1 configurations, the last the
  float model).

Implementations (``impl``):

* ``jaxq``: as shipped: every configuration scored by one switchable model
  (`jaxq.flax.ModelAdapter.quantize(..., switchable=True)`, qat or serve),
  one compiled ``apply_fn`` for all of them;
* ``jaxq-recompile`` (the baseline of ``ratio``): the path jaxq took before:
  a model quantized by its own rules per configuration, compiled per
  configuration, and each layer compiled alone for its SQNR. Forced here by
  replacing the private ``jaxq.sensitivity._switched`` with a function
  returning None.

Columns besides the convention's: ``model_traces``, how many times the
model's ``__call__`` was traced (each trace of the whole model is one
compilation of it; calibration, captures and the float model included);
``compiles``, every XLA compilation in the call (the recompiling path also
compiles each layer alone for its SQNR); ``same``, whether the result
(every row's metric, drop, SQNR and MSE, or the skipped layers and
history) equals the other implementation's exactly (in serve mode SQNR
and MSE to 1e-4 relative: the old path measures them on each layer compiled
alone, whose float sums XLA may order differently).

Measured on 2 shared CPU cores, one call per row (``--layers 48 --repeats
1``): sensitivity 74.4 s and 101 compilations per-configuration against
10.9 s and 5 compilations switchable; partial_quantize's loop 71.4 s and 49
compilations against 4.6 s and 1; every result the same. Serve mode
(``--mode serve --layers 24 --repeats 1``, on a more loaded machine):
sensitivity 176 s and 53 compilations against 56 s and 5; the loop 229 s
and 25 against 16 s and 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import pathlib
import sys
import time
import warnings
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import monitoring

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
# This checkout's jaxq (the benchmark reaches into jaxq.sensitivity), not an
# installed one.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import _harness  # pylint: disable=g-import-not-at-top
import jaxq  # pylint: disable=g-import-not-at-top

# The module (``jaxq.sensitivity`` the name is the function).
sensitivity_lib = importlib.import_module("jaxq.sensitivity")

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_counts = {"traces": 0, "compiles": 0}


def _on_event(name: str, duration: float, **kwargs: Any) -> None:
  del duration, kwargs
  if name == _COMPILE_EVENT:
    _counts["compiles"] += 1


monitoring.register_event_duration_secs_listener(_on_event)


class DeepCNN(nn.Module):
  """``layers`` 3x3 convolutions of ``features`` channels, then a head."""

  layers: int
  features: int = 8

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _counts["traces"] += 1  # Python runs once per trace of the model.
    for _ in range(self.layers):
      x = nn.relu(nn.Conv(self.features, (3, 3))(x))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


@dataclasses.dataclass(frozen=True)
class Workload:
  model: DeepCNN
  variables: Any
  rules: tuple[jaxq.Rule, ...]
  eval_fn: Callable[..., float]
  data: tuple[jax.Array, ...]


def workload(layers: int) -> Workload:
  model = DeepCNN(layers)
  key = jax.random.key(0)
  images = jax.random.normal(key, (4, 8, 16, 16, 3))
  variables = model.init(jax.random.key(1), images[0])
  evaluation = images[:2]
  reference = [model.apply(variables, x) for x in evaluation]

  def eval_fn(apply_fn, v) -> float:
    cosines = []
    for x, r in zip(evaluation, reference):
      y = apply_fn(v, x)
      cosines.append(jnp.sum(y * r) / (jnp.linalg.norm(y) *
                                       jnp.linalg.norm(r)))
    return float(np.mean(cosines))

  rules = (jaxq.Rule(r".*",
                     weight=jaxq.QuantSpec("int4", jaxq.PerChannel(axis=-1)),
                     act=jaxq.QuantSpec("int8", jaxq.PerTensor(),
                                        dynamic=False)),)
  return Workload(model, variables, rules, eval_fn, tuple(images[2:]))


@contextlib.contextmanager
def _per_layer_recompile(enabled: bool) -> Iterator[None]:
  """Forces the compile-per-configuration path while ``enabled``."""
  original = sensitivity_lib._switched  # pylint: disable=protected-access
  if enabled:
    # pylint: disable-next=protected-access
    sensitivity_lib._switched = lambda *args, **kwargs: None
  try:
    yield
  finally:
    sensitivity_lib._switched = original  # pylint: disable=protected-access


def measure(fn: Callable[[], Any], repeats: int, recompile: bool
            ) -> tuple[float, int, int, Any]:
  """Median seconds, model traces and compiles of one call, and its result."""
  times = []
  result = None
  for _ in range(repeats):
    with _per_layer_recompile(recompile), warnings.catch_warnings():
      warnings.simplefilter("ignore")
      _counts.update(traces=0, compiles=0)
      start = time.perf_counter()
      result = fn()
      times.append(time.perf_counter() - start)
  return float(np.median(times)), _counts["traces"], _counts["compiles"], result


def _same_table(a, b, mode: str) -> bool:
  """Same layers, metrics and drops exactly; SQNR and MSE exactly in qat
  mode, to 1e-4 relative in serve mode (its per-configuration path
  measures them on each layer compiled alone, a program whose float sums
  XLA may order differently)."""
  exact = lambda t: tuple((r.path, r.metric, r.drop) for r in t.rows)
  errors = lambda t: np.array([(r.sqnr_db, r.mse) for r in t.rows])
  return exact(a) == exact(b) and np.allclose(
      errors(a), errors(b), rtol=0.0 if mode == "qat" else 1e-4, atol=0.0)


def _same_partial(a, b, mode: str) -> bool:
  del mode
  return (a.skipped, a.history) == (b.skipped, b.history)


def main(argv: list[str] | None = None) -> None:
  p = _harness.parser(__doc__.split("\n\n")[0])
  p.add_argument("--layers", type=int, default=None,
                 help="conv layers (default 24; --quick: 6)")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed calls per row (default 3; --quick: 1)")
  p.add_argument("--mode", choices=("qat", "serve"), default="qat",
                 help="the tools' mode: fake-quant (qat) or the low-bit "
                      "ops (serve)")
  args = p.parse_args(argv)
  layers = args.layers or (6 if args.quick else 24)
  repeats = args.repeats or (1 if args.quick else 3)
  w = workload(layers)

  def sensitivity():
    return jaxq.sensitivity(w.model, w.variables, w.rules, w.eval_fn, w.data,
                            mode=args.mode, progress=False)

  # partial_quantize's table: the measured switchable sensitivity call's
  # (the same as a call of its own, as "same" checks), set below.
  table = None

  def partial():
    return jaxq.partial_quantize(w.model, w.variables, w.rules, w.eval_fn,
                                 w.data, max_drop=0.0, table=table,
                                 mode=args.mode, progress=False)

  rows = []
  suffix = "" if args.mode == "qat" else f" ({args.mode})"
  for case, fn, same_fn in ((f"sensitivity {layers} convs{suffix}",
                             sensitivity, _same_table),
                            (f"partial {layers} convs{suffix}", partial,
                             _same_partial)):
    measured = {impl: measure(fn, repeats, recompile)
                for impl, recompile in (("jaxq-recompile", True),
                                        ("jaxq", False))}
    if fn is sensitivity:
      table = measured["jaxq"][3]
    baseline = measured["jaxq-recompile"][0]
    same = same_fn(measured["jaxq"][3], measured["jaxq-recompile"][3],
                   args.mode)
    for impl, (median_s, traces, compiles, _) in measured.items():
      rows.append({"case": case, "impl": impl, "median_s": median_s,
                   "ratio": median_s / baseline, "model_traces": traces,
                   "compiles": compiles, "layers": layers + 1,
                   "mode": args.mode, "same": bool(same)})
  _harness.emit("sensitivity", rows, args.json,
                note=f"{repeats} call(s) per row, end to end")


if __name__ == "__main__":
  sys.exit(main())
