"""Post-training quantization of all-MiniLM-L6-v2: granularities, sensitivity.

The study of the real pretrained sentence encoder of `examples/minilm.py`:

1. Float against W8A8 at each granularity pairing (activation-weight, see
   DESIGN.md): T-T and T-C with static per-tensor activation ranges
   calibrated on the sentences (max; the attention mask keeps padding
   out), K-C with dynamic per-token activations, G-G with groups of 128
   along the contraction axis (hidden 384 = 3 x 128, feed-forward 1536 =
   12 x 128), and MX (fp8 e4m3 elements sharing an e8m0 scale per 32).
   Embedding tables are weight-only int8 with one scale per row in every
   configuration. Each model is calibrated
   with `jaxq.calibrate`, converted with `jaxq.convert` and run in serve
   mode (the low-bit matmuls). The table gives the cosine similarity of each
   sentence's embedding to its float embedding (mean and min over the
   sentences) and the model's bytes from the convert report.
2. `jaxq.sensitivity` of one configuration (eval metric: the mean cosine to
   the float embeddings), `jaxq.partial_quantize` to a target, and
   `jaxq.report`'s per-layer table; with ``--plots DIR``, the activation
   histograms and the sensitivity bar chart as PNGs.

3. The PTQ algorithms (`jaxq.awq`, `jaxq.gptq`, `jaxq.smoothquant`) and
   weight calibration: W4 weight-only on the 36 Dense layers (per channel,
   per group of 128 and of 32: RTN with abs-max and with the "mse" range
   search, AWQ with its clipping search, GPTQ, GPTQ with "mse" ranges) and
   W8A8 with static per-tensor activations on all 36 Dense layers (ranges
   by max, entropy, percentile 99.99, and SmoothQuant alpha 0.8 with max).
   SmoothQuant and AWQ fold attention/output's factors into value's output
   columns; the other layers scale their inputs themselves (MiniLM is
   post-LayerNorm: a LayerNorm's output also feeds the residual sum, so it
   cannot absorb them).
   Calibration batches carry the attention mask (`jaxq.flax.Batch`), so
   padding enters no statistic (of `jaxq.calibrate` either, as in
   section 1).

Sections 1 and 2 calibrate and evaluate on the same sentences
(examples/data/sentences.txt): the point is the error each quantizer adds,
not generalisation. Section 3 calibrates on those 32 sentences and evaluates
on 48 others (examples/data/sentences_eval.txt), since GPTQ and AWQ fit
their calibration data.

Run: python examples/minilm_ptq.py [--quick] [--plots DIR] [--algorithms]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import pathlib
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import jaxq
from jaxq import MX, PerChannel, PerGroup, PerTensor, PerToken, QuantSpec
from jaxq.convert import tree_bytes

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import minilm  # noqa: E402  pylint: disable=wrong-import-position

Rules = tuple[jaxq.Rule, ...]

EMBED = QuantSpec("int8", PerChannel(axis=0))  # weight-only, a scale per row
# Dense kernels are (in, out): the contraction axis is 0 for weights and the
# last axis for activations.
PAIRINGS: dict[str, tuple[QuantSpec, QuantSpec]] = {
    "W8A8 T-T": (QuantSpec("int8", PerTensor()),
                 QuantSpec("int8", PerTensor(), dynamic=False)),
    "W8A8 T-C": (QuantSpec("int8", PerChannel(axis=-1)),
                 QuantSpec("int8", PerTensor(), dynamic=False)),
    "W8A8 K-C": (QuantSpec("int8", PerChannel(axis=-1)),
                 QuantSpec("int8", PerToken())),
    "W8A8 G-G": (QuantSpec("int8", PerGroup(axis=0, size=128)),
                 QuantSpec("int8", PerGroup(axis=-1, size=128))),
    "MX fp8 e4m3": (QuantSpec("float8_e4m3fn", MX(axis=0, size=32)),
                    QuantSpec("float8_e4m3fn", MX(axis=-1, size=32))),
}
# The sensitivity study's configuration, and partial_quantize's target: the
# mean cosine within this fraction of float's (1.0).
SENSITIVITY_CONFIG = "W8A8 T-C"
MAX_DROP = 0.005
# --quick: these sentences and layers only (a smoke run in seconds).
QUICK_SENTENCES = 6
QUICK_LAYERS = r"embeddings/token_type|layers_0/attention/output"


def study_rules(weight: QuantSpec, act: QuantSpec, layers: str = r".*"
                ) -> Rules:
  """Embeddings weight-only per row, every other layer ``weight``/``act``;
  only the layers whose path matches ``layers``."""
  return (jaxq.Rule(layers, module_types=("Embed",), weight=EMBED),
          jaxq.Rule(layers, weight=weight, act=act))


def batches(pretrained: minilm.Pretrained, sentences: Sequence[str],
            batch_size: int = 64) -> list[minilm.Batch]:
  """The sentences tokenized in batches of ``batch_size``."""
  return [minilm.tokenize(pretrained.tokenizer,
                          sentences[i:i + batch_size])
          for i in range(0, len(sentences), batch_size)]


def serve_embeddings(pretrained: minilm.Pretrained, rules: Rules,
                     sentences: Sequence[str]
                     ) -> tuple[np.ndarray, jaxq.ConvertReport]:
  """Calibrates, converts and embeds with the serve-mode model: (N, H)."""
  calibrate = jaxq.quantize_model(pretrained.model, rules, mode="calibrate")
  result = jaxq.calibrate(calibrate, pretrained.variables,
                          masked_batches(pretrained, sentences),
                          progress=False)
  serving, convert_report = jaxq.convert(calibrate, pretrained.variables,
                                         result.stats)
  serve = jaxq.quantize_model(pretrained.model, rules, mode="serve")
  embeddings = minilm.embed(pretrained, sentences, variables=serving,
                            apply_fn=serve.apply)
  return embeddings, convert_report


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Cosine similarity of each row of ``a`` with the same row of ``b``."""
  return np.diagonal(np.asarray(minilm.cosine_similarity(a, b)))


@dataclasses.dataclass(frozen=True)
class Row:
  """One configuration of the comparison table."""
  name: str
  mean_cosine: float
  min_cosine: float
  nbytes: int
  seconds: float


def compare(pretrained: minilm.Pretrained, sentences: Sequence[str],
            reference: np.ndarray, pairings: Sequence[str],
            layers: str = r".*") -> list[Row]:
  """A `Row` per pairing of `PAIRINGS`, after the float row."""
  rows = [Row("float32", 1.0, 1.0, tree_bytes(pretrained.variables), 0.0)]
  for name in pairings:
    start = time.perf_counter()
    embeddings, convert_report = serve_embeddings(
        pretrained, study_rules(*PAIRINGS[name], layers=layers), sentences)
    cosines = row_cosines(embeddings, reference)
    rows.append(Row(name, float(cosines.mean()), float(cosines.min()),
                    convert_report.quantized_bytes,
                    time.perf_counter() - start))
  return rows


# Section 3: the PTQ algorithms.

EVAL_SENTENCES_FILE = minilm.SENTENCES_FILE.parent / "sentences_eval.txt"
W4_CONFIGS: dict[str, QuantSpec] = {
    "W4 per-channel": QuantSpec("int4", PerChannel(axis=-1)),
    "W4 g128": QuantSpec("int4", PerGroup(axis=0, size=128)),
    "W4 g32": QuantSpec("int4", PerGroup(axis=0, size=32)),
}
W4_METHODS = ("RTN max", "RTN mse", "AWQ", "GPTQ", "GPTQ + mse")
W8A8_WEIGHT = QuantSpec("int8", PerChannel(axis=-1))
W8A8_ACT = QuantSpec("int8", PerTensor(), dynamic=False)
W8A8_METHODS = ("max", "entropy", "percentile", "SmoothQuant")
SMOOTHQUANT_ALPHA = 0.8
QUICK_ALGORITHM_LAYERS = r"layers_0/.*"


def fold_map(num_layers: int) -> dict[str, str]:
  """The Dense layers whose input factors fold into a preceding op.

  Only attention/output: its input is value's output mixed over tokens,
  channel by channel, so value's output columns absorb ``1 / s``. MiniLM is
  post-LayerNorm: each LayerNorm's output also feeds the residual sum, so
  folding into it would change the model; query, key, value, ffn_in and
  ffn_out scale their inputs themselves (``act_smooth``).
  """
  return {f"layers_{i}/attention/output": f"layers_{i}/attention/value"
          for i in range(num_layers)}


def masked_batches(pretrained: minilm.Pretrained, sentences: Sequence[str]
                   ) -> list[jaxq.flax.Batch]:
  """`batches` with the attention mask as the padding mask."""
  return [jaxq.flax.Batch(tuple(b), {}, np.asarray(b.attention_mask, bool))
          for b in batches(pretrained, sentences)]


def _traced(pretrained: minilm.Pretrained, rules: Rules,
            data: Sequence[Any]) -> Any:
  """The calibrate-mode model, traced once so its layers are known."""
  cal = jaxq.quantize_model(pretrained.model, rules, mode="calibrate")
  jax.eval_shape(lambda v: cal.apply(v, *data[0].args,
                                     mutable=["quant_stats"]),
                 pretrained.variables)
  return cal


def _evaluate(pretrained: minilm.Pretrained, cal: Any, serving: Any,
              sentences: Sequence[str], reference: np.ndarray, name: str,
              nbytes: int, start: float) -> Row:
  embeddings = minilm.embed(pretrained, sentences, variables=serving,
                            apply_fn=cal.with_mode("serve").apply)
  cosines = row_cosines(embeddings, reference)
  return Row(name, float(cosines.mean()), float(cosines.min()), nbytes,
             time.perf_counter() - start)


def algorithm_rows(pretrained: minilm.Pretrained, calibration: Sequence[str],
                   evaluation: Sequence[str], reference: np.ndarray,
                   configs: Sequence[str], layers: str = r".*",
                   w8a8: Sequence[str] = W8A8_METHODS,
                   methods: Sequence[str] = W4_METHODS,
                   progress: bool = False) -> list[Row]:
  """One `Row` per (config, method): calibrated on ``calibration``,
  evaluated on ``evaluation`` (``reference``: their float embeddings)."""
  data = masked_batches(pretrained, calibration)
  folds = {k: v for k, v in fold_map(pretrained.model.config.num_layers
                                     ).items() if re.fullmatch(layers, k)}
  rows = []
  for config in configs:
    for method in methods:
      start = time.perf_counter()
      spec = W4_CONFIGS[config]
      if method.endswith("mse"):
        spec = spec.replace(calibration="mse")
      rules = (jaxq.Rule(layers, module_types=("Dense",), weight=spec),)
      cal = _traced(pretrained, rules, data)
      variables = pretrained.variables
      if method == "AWQ":
        variables = jaxq.awq(cal, variables, data, fold_into=folds,
                             progress=progress)
      elif method.startswith("GPTQ"):
        variables = jaxq.gptq(cal, variables, data, progress=progress)
      serving, report = jaxq.convert(cal, variables)
      rows.append(_evaluate(pretrained, cal, serving, evaluation, reference,
                            f"{config} {method}", report.quantized_bytes,
                            start))
      if progress:
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
  if w8a8:
    rules = (jaxq.Rule(layers, module_types=("Dense",), weight=W8A8_WEIGHT,
                       act=W8A8_ACT),)
    cal = _traced(pretrained, rules, data)
    start = time.perf_counter()
    methods = {"max": "max", "entropy": "entropy",
               "percentile": "percentile:99.99"}
    # One pass for the rows asked for (histograms only when a row needs them).
    methods = {k: v for k, v in methods.items() if k in w8a8}
    if methods:
      result = jaxq.calibrate(cal, pretrained.variables, data,
                              methods=tuple(methods.values()),
                              progress=progress)
    for method in w8a8:
      if method == "SmoothQuant":
        start = time.perf_counter()
        variables = jaxq.smoothquant(cal, pretrained.variables, data,
                                     alpha=SMOOTHQUANT_ALPHA,
                                     fold_into=folds, progress=progress)
        # The ranges of the smoothed inputs X / s, masked like the others.
        ranges = jaxq.calibrate(cal, variables, data,
                                progress=progress).ranges()
        name = f"W8A8 static SmoothQuant a={SMOOTHQUANT_ALPHA} (max)"
      else:
        variables, ranges = pretrained.variables, result.ranges(
            methods[method])
        name = f"W8A8 static {method}"
      serving, report = jaxq.convert(cal, variables, ranges=ranges)
      rows.append(_evaluate(pretrained, cal, serving, evaluation, reference,
                            name, report.quantized_bytes, start))
      if progress:
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
  return rows


QWIX_LAYERS = r"layers_\d+/(attention/(query|key|value|output)|ffn_in|ffn_out)"
QWIX_METHODS = ("RTN", "AWQ", "GPTQ")
QWIX_TILES = {"W4 per-channel": None, "W4 g128": 128, "W4 g32": 32}


def qwix_rows(pretrained: minilm.Pretrained, calibration: Sequence[str],
              evaluation: Sequence[str], reference: np.ndarray,
              configs: Sequence[str], methods: Sequence[str] = (
                  "RTN", "AWQ", "GPTQ"), layers: str = QWIX_LAYERS,
              progress: bool = False) -> list[Row]:
  """Qwix's own RTN, AWQ and GPTQ (its providers and ``quantize_params``)
  on the same Dense layers, W4 weight-only, same sentences (needs the
  ``bench`` extra). Qwix's calibration sees the padding tokens; its bytes
  count int4 values one per byte (unpacked), unlike `jaxq.convert`'s."""
  # pylint: disable=import-outside-toplevel
  import qwix
  from qwix.contrib import awq as qwix_awq
  from qwix.contrib import gptq as qwix_gptq
  # pylint: enable=import-outside-toplevel
  params = pretrained.variables["params"]
  data = batches(pretrained, calibration)
  algorithms = {
      "AWQ": (qwix_awq.AwqRule, qwix_awq.AwqCalibrationProvider,
              qwix_awq.quantize_params, qwix_awq.AwqInferenceProvider),
      "GPTQ": (qwix_gptq.GptqRule, qwix_gptq.GptqCalibrationProvider,
               qwix_gptq.quantize_params, qwix.PtqProvider)}
  rows = []
  for config in configs:
    for method in methods:
      start = time.perf_counter()
      options = dict(module_path=layers, weight_qtype="int4",
                     tile_size=QWIX_TILES[config])
      ptq = qwix.quantize_model(
          pretrained.model,
          qwix.PtqProvider([qwix.QuantizationRule(**options)]))
      abstract = jax.eval_shape(ptq.init, jax.random.key(0),
                                *data[0])["params"]
      if method == "RTN":
        quantized, served = qwix.quantize_params(params, abstract), ptq
      else:
        rule_type, calibrate, quantize, infer = algorithms[method]
        rule = rule_type(**options)
        recorder = qwix.quantize_model(pretrained.model, calibrate([rule]))
        stats: Any = {}
        for batch in data:
          _, new = recorder.apply({"params": params, "quant_stats": stats},
                                  *batch, mutable="quant_stats")
          stats = new["quant_stats"]
        quantized = quantize(params, abstract, stats)
        served = qwix.quantize_model(pretrained.model, infer([rule]))
      embeddings = minilm.embed(pretrained, evaluation,
                                variables={"params": quantized},
                                apply_fn=served.apply)
      cosines = row_cosines(embeddings, reference)
      rows.append(Row(f"{config} Qwix {method}", float(cosines.mean()),
                      float(cosines.min()), tree_bytes({"params": quantized}),
                      time.perf_counter() - start))
      if progress:
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
  return rows


def format_table(rows: Sequence[Row]) -> str:
  """Markdown table; "x smaller" is against the first (float) row."""
  lines = ["| model | mean cosine | min cosine | bytes | x smaller | time s |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for row in rows:
    lines.append(f"| {row.name} | {row.mean_cosine:.5f} | "
                 f"{row.min_cosine:.5f} | {row.nbytes:,} | "
                 f"{rows[0].nbytes / row.nbytes:.2f} | {row.seconds:.1f} |")
  return "\n".join(lines)


def cosine_eval_fn(pretrained: minilm.Pretrained, sentences: Sequence[str],
                   reference: np.ndarray):
  """``eval_fn`` for `jaxq.sensitivity`: mean cosine to the float
  embeddings (higher is better)."""

  def eval_fn(apply_fn, variables) -> float:
    embeddings = minilm.embed(pretrained, sentences, variables=variables,
                              apply_fn=apply_fn)
    return float(row_cosines(embeddings, reference).mean())

  return eval_fn


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help=f"{QUICK_SENTENCES} sentences, sensitivity of "
                           f"{QUICK_LAYERS!r} only")
  parser.add_argument("--sentences", type=pathlib.Path,
                      default=minilm.SENTENCES_FILE)
  parser.add_argument("--pairings", nargs="*", default=list(PAIRINGS),
                      choices=list(PAIRINGS), metavar="NAME",
                      help=f"the rows of the comparison, from {list(PAIRINGS)}")
  parser.add_argument("--config", default=SENSITIVITY_CONFIG,
                      choices=sorted(PAIRINGS),
                      help="the configuration of the sensitivity study")
  parser.add_argument("--plots", type=pathlib.Path, default=None,
                      help="directory for the PNG plots (none if omitted)")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--algorithms", action="store_true",
                      help="run only section 3, the PTQ algorithms")
  parser.add_argument("--no-qwix", action="store_true",
                      help="section 3 without Qwix's rows")
  parser.add_argument("--configs", nargs="*", default=list(W4_CONFIGS),
                      choices=list(W4_CONFIGS), metavar="NAME",
                      help=f"section 3's W4 configs, from {list(W4_CONFIGS)}")
  methods = [*W4_METHODS, *(f"W8A8 {m}" for m in W8A8_METHODS),
             *(f"Qwix {m}" for m in QWIX_METHODS)]
  parser.add_argument("--methods", nargs="*", default=None, choices=methods,
                      metavar="NAME",
                      help=f"section 3's methods (default: all), from "
                           f"{methods}")
  args = parser.parse_args(argv)
  progress = not args.no_progress
  if args.algorithms:
    algorithms_section(args)
    return

  pretrained = minilm.load_pretrained()
  sentences = minilm.read_sentences(args.sentences)
  layers = r".*"
  if args.quick:
    sentences, layers = sentences[:QUICK_SENTENCES], QUICK_LAYERS
  reference = minilm.embed(pretrained, sentences)
  print(f"all-MiniLM-L6-v2, {len(sentences)} sentences; cosine similarity "
        f"of the quantized (serve-mode) embeddings to float\n")
  rows = compare(pretrained, sentences, reference, args.pairings, layers)
  print(format_table(rows))

  rules = study_rules(*PAIRINGS[args.config], layers=layers)
  eval_fn = cosine_eval_fn(pretrained, sentences, reference)
  data = batches(pretrained, sentences)
  print(f"\nsensitivity of {args.config} (metric: mean cosine to float):")
  table = jaxq.sensitivity(pretrained.model, pretrained.variables, rules,
                           eval_fn, data, progress=progress)
  print(table)
  partial = jaxq.partial_quantize(
      pretrained.model, pretrained.variables, rules, eval_fn, data,
      max_drop=MAX_DROP, table=table, progress=progress)
  print(f"\npartial quantization of {args.config} to within "
        f"{100 * MAX_DROP:g}% of float:\n{partial}")

  report = jaxq.report(pretrained.model, pretrained.variables, data,
                       rules=rules, stats=table.stats)
  print(f"\nper-layer report of {args.config}:\n{report}")
  if args.plots is not None:
    args.plots.mkdir(parents=True, exist_ok=True)
    shown = [p for p in report.histograms if "layers_0/" in p or
             "ffn_out" in p] or list(report.histograms)
    print("\nplots:",
          jaxq.report.plot_histograms(report, args.plots /
                                      "minilm_histograms.png", layers=shown),
          jaxq.report.plot_sensitivity(table, args.plots /
                                       "minilm_sensitivity.png"))


def algorithms_section(args: argparse.Namespace) -> list[Row]:
  """Section 3: prints and returns the PTQ algorithms' table."""
  pretrained = minilm.load_pretrained()
  calibration = minilm.read_sentences(args.sentences)
  evaluation = minilm.read_sentences(EVAL_SENTENCES_FILE)
  layers, configs, w8a8 = r".*", args.configs, W8A8_METHODS
  if args.quick:
    calibration, evaluation = (calibration[:QUICK_SENTENCES],
                               evaluation[:QUICK_SENTENCES])
    layers, configs, w8a8 = (QUICK_ALGORITHM_LAYERS, configs[:1],
                             ("max", "SmoothQuant"))
  w4, qwix_methods = W4_METHODS, (("RTN", "AWQ") if args.quick
                                   else QWIX_METHODS)
  if args.methods is not None:
    w4 = [m for m in w4 if m in args.methods]
    w8a8 = [m for m in w8a8 if f"W8A8 {m}" in args.methods]
    qwix_methods = [m for m in qwix_methods if f"Qwix {m}" in args.methods]
  reference = minilm.embed(pretrained, evaluation)
  print(f"\nPTQ algorithms: calibrated on {len(calibration)} sentences, "
        f"evaluated on {len(evaluation)} others (cosine to float)\n")
  rows = algorithm_rows(pretrained, calibration, evaluation, reference,
                        configs, layers, w8a8, w4,
                        progress=not args.no_progress)
  if (importlib.util.find_spec("qwix") is not None and not args.no_qwix and
      qwix_methods):
    rows += qwix_rows(pretrained, calibration, evaluation, reference,
                      configs, qwix_methods,
                      QWIX_LAYERS.replace(r"\d+", "0") if args.quick
                      else QWIX_LAYERS, progress=not args.no_progress)
  rows = [Row("float32", 1.0, 1.0, tree_bytes(pretrained.variables), 0.0)
          ] + rows
  print(format_table(rows))
  return rows


if __name__ == "__main__":
  main()
