"""Calibration cost: one jitted calibration step against the float forward.

The model is a linen MLP of ``layers`` Dense(width) layers with ReLUs and
a Dense(16) head (default 4 x 1024 on a batch of 256; ``--quick``: 4 x 256
on 64). For each observer (``max``, ``percentile`` (99.99), ``entropy``,
``mse``), every layer gets an int8 per-channel weight and a static int8
per-tensor input activation calibrated by that observer, and the benchmark
times the step `jaxq.calibrate` runs
(`jaxq.ptq.calibration_pass.calibration_step`: the float forward plus
every observer update, jitted) against ``jax.jit(model.apply)`` on the same
batch. All variants are measured round-robin in one run; ``ratio`` is the
step's median time over the float forward's. The targets are the issue's:
max <= 1.2x and the histogram observers <= 2x.

A second table times choosing the entropy (KL) threshold from one 2048-bin
per-tensor histogram of Laplace data (``finalize``, jitted, after warm-up)
against a plain numpy loop over the 1920 candidate thresholds, written
here; ``ratio`` is jaxq's time over numpy's, and both must pick the same
bin. A per-channel row (64 channels) shows the per-channel cost.

``python benchmarks/calibration.py [--quick] [--json PATH]``
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import _harness  # noqa: E402
import jaxq  # noqa: E402
from jaxq import PerChannel, PerTensor, QuantSpec  # noqa: E402

OBSERVERS = ("max", "percentile", "entropy", "mse")
TARGETS = {"max": 1.2, "percentile": 2.0, "entropy": 2.0, "mse": 2.0}
NUM_BINS, START_BIN = 2048, 128
HEAD = 16


class MLP(nn.Module):
  """``layers`` Dense(width) layers with ReLUs, and a Dense(HEAD) head.

  The calibration step has no use for the model's output, so jit drops the
  last quantized layer's matmul; the small head keeps all the large ones.
  """

  width: int
  layers: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for _ in range(self.layers):
      x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(HEAD)(x)


def _rules(observer: str) -> tuple[jaxq.Rule, ...]:
  act = QuantSpec("int8", PerTensor(), calibration=observer, dynamic=False)
  return (jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(axis=-1)),
                    act=act),)


def step_rows(width: int, layers: int, batch: int, repeats: int
              ) -> list[dict]:
  """Calibration step vs float forward, one row per observer."""
  model = MLP(width=width, layers=layers)
  x = jax.random.normal(jax.random.key(0), (batch, width), jnp.float32)
  variables = model.init(jax.random.key(1), x)
  forward = jax.jit(model.apply)
  timed = {"float": lambda: forward(variables, x)}
  for observer in OBSERVERS:
    qmodel = jaxq.quantize_model(model, _rules(observer), "calibrate")
    step, stats = jaxq.ptq.calibration_pass.calibration_step(qmodel,
                                                             variables, x)
    stats, _ = step(stats, x)  # Histogram ranges set, as after batch one.
    timed[observer] = (lambda step, stats: lambda: step(stats, x))(step,
                                                                   stats)
  times = _harness.interleaved_median_times(timed, repeats=repeats)
  case = f"MLP {layers}x{width} + head, batch {batch}"
  rows = [{"case": case, "impl": "float", "observer": "-",
           "median_s": times["float"], "ratio": 1.0, "target": "-"}]
  for observer in OBSERVERS:
    ratio = times[observer] / times["float"]
    rows.append({"case": case, "impl": "jaxq", "observer": observer,
                 "median_s": times[observer], "ratio": ratio,
                 "target": f"<= {TARGETS[observer]}x "
                           f"({'met' if ratio <= TARGETS[observer] else 'MISSED'})"})
  return rows


def numpy_entropy_bin(counts: np.ndarray, num_levels: int,
                      start_bin: int) -> int:
  """TensorRT's KL threshold search, one candidate at a time (float64).

  Returns the threshold as a bin count ``i`` (amax = ``i * width``); ties
  go to the larger threshold, as in jaxq.
  """
  counts = counts.astype(np.float64)
  counts[0] = counts[1]  # the spike of exact zeros, as pytorch-quantization
  best_bin, best_kl = start_bin, np.inf
  for i in range(start_bin, counts.size + 1):
    p = counts[:i].copy()
    p[-1] += counts[i:].sum()
    level = (np.arange(i) * num_levels) // i
    level_sum = np.bincount(level, weights=counts[:i], minlength=num_levels)
    level_nonzero = np.bincount(level, weights=counts[:i] > 0,
                                minlength=num_levels)
    q = np.where(counts[:i] > 0,
                 level_sum[level] / np.maximum(level_nonzero[level], 1), 0.0)
    p, q = p / p.sum(), q / q.sum()
    support = p > 0
    if np.any(q[support] == 0):
      kl = np.inf
    else:
      kl = np.sum(p[support] * np.log(p[support] / q[support]))
    if kl <= best_kl:
      best_bin, best_kl = i, kl
  return best_bin


def finalize_rows(channels: int, repeats: int) -> list[dict]:
  """Entropy finalize from one 2048-bin histogram, jaxq vs numpy."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.laplace(size=(65536,)), jnp.float32)
  spec = QuantSpec("int8", PerTensor(), calibration="entropy", dynamic=False)
  observer = jaxq.observers.entropy(num_bins=NUM_BINS, start_bin=START_BIN)
  state = jax.jit(observer.update)(observer.init(x, spec), x)
  counts = np.asarray(state.counts).reshape(-1)
  width = float(state.bin_width.reshape(-1)[0])

  chosen = {}
  times = _harness.interleaved_median_times(
      {"jaxq": lambda: observer.finalize(state),
       "numpy": lambda: chosen.setdefault(
           "numpy", numpy_entropy_bin(counts, 128, START_BIN))},
      warmup=1, repeats=repeats)
  agrees = bool(np.isclose(float(np.ravel(observer.finalize(state))[0]),
                           chosen["numpy"] * width, rtol=1e-6))
  case = f"entropy finalize, {NUM_BINS} bins, per-tensor"
  rows = [{"case": case, "impl": "numpy", "median_s": times["numpy"],
           "ratio": 1.0, "agrees": True},
          {"case": case, "impl": "jaxq", "median_s": times["jaxq"],
           "ratio": times["jaxq"] / times["numpy"], "agrees": agrees}]

  spec = spec.replace(granularity=PerChannel(axis=-1))
  xc = jnp.asarray(rng.laplace(size=(1024, channels)), jnp.float32)
  state = jax.jit(observer.update)(observer.init(xc, spec), xc)
  per_channel = _harness.median_time(observer.finalize, state, warmup=1,
                                     repeats=max(repeats // 2, 1))
  rows.append({"case": f"entropy finalize, {NUM_BINS} bins, {channels} "
                       f"channels", "impl": "jaxq", "median_s": per_channel,
               "ratio": per_channel / (channels * times["numpy"]),
               "agrees": "-"})
  return rows


def main() -> None:
  args = _harness.parser(__doc__.splitlines()[0]).parse_args()
  if args.quick:
    width, layers, batch, repeats, channels = 256, 4, 64, 10, 8
  else:
    width, layers, batch, repeats, channels = 1024, 4, 256, 20, 64
  rows = step_rows(width, layers, batch, repeats)
  rows += finalize_rows(channels, max(repeats // 4, 3))
  _harness.emit("calibration", rows, args.json,
                note="step rows: ratio to the float forward; finalize rows: "
                     "ratio to numpy (per-channel row: to numpy x channels)")


if __name__ == "__main__":
  main()
