"""Sensitivity analysis, partial quantization and the report on the digits CNN.

Trains the float `DigitsCNN` of `examples/digits_cnn.py`, folds its
BatchNorms into the convolutions (`jaxq.fold_batchnorm`) and quantizes it
post-training with static per-tensor activation ranges calibrated on 1024
training images:

* W8A8 (int8 per-channel weights, int8 activations) loses no test accuracy:
  there is nothing to rank.
* W4A4 (int4 per-channel weights, int4 activations) does lose accuracy, so
  `jaxq.sensitivity` ranks the layers by the test accuracy each loses when
  quantized alone (and by its output SQNR on the calibration images),
  `jaxq.partial_quantize` leaves the worst in float until the model is within
  1% of float, and `jaxq.report` prints the per-layer table.

Run: python examples/digits_sensitivity.py [--quick] [--plots DIR]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax

import jaxq
from jaxq import PerChannel, PerTensor, QuantSpec

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import digits_cnn  # noqa: E402  pylint: disable=wrong-import-position

Rules = tuple[jaxq.Rule, ...]

CONFIGS: dict[str, Rules] = {
    "W8A8": (jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(axis=-1)),
                       act=QuantSpec("int8", PerTensor(), dynamic=False)),),
    "W4A4": (jaxq.Rule(r".*", weight=QuantSpec("int4", PerChannel(axis=-1)),
                       act=QuantSpec("int4", PerTensor(), dynamic=False)),),
}
STUDY = "W4A4"
MAX_DROP = 0.01  # partial_quantize: within 1% of the float accuracy
CALIBRATION_IMAGES = 1024
CALIBRATION_BATCH = 256


def calibration_batches(data: digits_cnn.Digits, images: int
                        ) -> list[jax.Array]:
  """The first ``images`` training images in batches of 256."""
  return [data.x_train[i:i + CALIBRATION_BATCH]
          for i in range(0, images, CALIBRATION_BATCH)]


def study(model: digits_cnn.DigitsCNN, variables: digits_cnn.Variables,
          data: digits_cnn.Digits, calib: Sequence[jax.Array], *,
          progress: bool = True, plots: pathlib.Path | None = None
          ) -> tuple[Any, Any, Any]:
  """Prints the accuracies, the sensitivity, the partial quantization and
  the report of `STUDY` for trained ``variables`` (BatchNorm folded here);
  returns the sensitivity table, the partial quantization and the report."""
  folded = jaxq.fold_batchnorm(variables, digits_cnn.CONV_BN_PAIRS,
                               model=model, batch=data.x_train[:1])

  def eval_fn(apply_fn, v) -> float:  # Test accuracy: higher is better.
    return digits_cnn.evaluate(apply_fn, v, data.x_test, data.y_test)

  print(f"float (BatchNorm folded): "
        f"{100 * eval_fn(jax.jit(model.apply), folded):.2f}% test accuracy")
  for name, rules in CONFIGS.items():
    calibrate = jaxq.quantize_model(model, rules, mode="calibrate")
    ranges = jaxq.calibrate(calibrate, folded, calib, progress=False).ranges()
    qmodel = jaxq.quantize_model(model, rules, mode="qat")
    accuracy = eval_fn(jax.jit(qmodel.apply),
                       {**folded, "quant_ranges": ranges})
    print(f"{name} (every layer): {100 * accuracy:.2f}% test accuracy")

  rules = CONFIGS[STUDY]
  print(f"\nsensitivity of {STUDY} (metric: test accuracy):")
  table = jaxq.sensitivity(model, folded, rules, eval_fn, calib,
                           progress=progress)
  print(table)
  partial = jaxq.partial_quantize(model, folded, rules, eval_fn, calib,
                                  max_drop=MAX_DROP, table=table,
                                  progress=progress)
  print(f"\npartial quantization of {STUDY} to within "
        f"{100 * MAX_DROP:g}% of float:\n{partial}")
  report = jaxq.report(model, folded, calib, rules=rules, stats=table.stats)
  print(f"\nper-layer report of {STUDY}:\n{report}")
  if plots is not None:
    plots.mkdir(parents=True, exist_ok=True)
    print("\nplots:",
          jaxq.report.plot_histograms(report, plots / "digits_histograms.png"),
          jaxq.report.plot_sensitivity(table, plots / "digits_sensitivity.png"))
  return table, partial, report


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="2 training epochs, 256 calibration images")
  parser.add_argument("--plots", type=pathlib.Path, default=None,
                      help="directory for the PNG plots (none if omitted)")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  config = digits_cnn.TrainConfig(epochs=2) if args.quick else (
      digits_cnn.TrainConfig())
  data = digits_cnn.load_digits(seed=config.seed)
  variables, _ = digits_cnn.train(data, config,
                                  progress=not args.no_progress)
  calib = calibration_batches(
      data, CALIBRATION_BATCH if args.quick else CALIBRATION_IMAGES)
  study(digits_cnn.DigitsCNN(), variables, data, calib,
        progress=not args.no_progress, plots=args.plots)


if __name__ == "__main__":
  main()
