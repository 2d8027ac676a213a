"""Mixed precision under a budget on real models: `jaxq.auto_quantize`.

Two pretrained models, each searched over five candidates per Dense layer
(bf16, W8 per channel by round to nearest, W4 per group of 32, per group of
64 and per channel, each W4 by GPTQ on the layer's float inputs), at a
budget of 4.5 bits per weight (exactly uniform W4 g64's bytes: 4 bits and a
float32 scale per 64 weights), then verified on held-out data against the
uniform configurations (and the mixture at each one's bytes):

* all-MiniLM-L6-v2 (`examples/minilm.py`): the 36 Dense layers, q/k/v of a
  block sharing one format; scored by the measured calibration loss
  ``1 - cosine`` to the float embeddings (32 sentences of
  ``data/sentences.txt``), one group at a time on one compiled program;
  metric: mean cosine to float on the 48 held-out sentences of
  ``data/sentences_eval.txt``.
* SmolLM2-135M-Instruct (`examples/smollm.py`): the 210 ``*_proj`` layers
  (q/k/v of a block, and gate/up, sharing one format: 120 groups), scored
  by the Fisher proxy from the next-token NLL on ``--windows`` (8)
  calibration windows of 256 tokens; metric: perplexity on as many
  held-out windows. The Fisher proxy needs one backward pass per window
  for all 120 x 5 scores, where the measured loss would need 600 forward
  passes over the calibration windows.
  The tied embedding / LM head stays float in every configuration.

Bytes and bits are those of the searched layers' weights as `jaxq.convert`
stores them (int4 packed, float32 scales). Each model's Pareto plot
(``--plots DIR``) puts the mixtures beside the uniform configurations.

``--affine`` adds three candidates: W4 g32, g64 and per channel with a
zero point per group (int8) and each group's range by the "mse" search,
by GPTQ.

Run: python examples/auto_quantize.py [--model minilm|smollm|all]
     [--bits 4.5] [--plots DIR] [--windows 8] [--quick] [--affine]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

import jaxq
from jaxq import autoquant

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import minilm  # noqa: E402  pylint: disable=wrong-import-position
import smollm  # noqa: E402  pylint: disable=wrong-import-position

EVAL_SENTENCES_FILE = minilm.SENTENCES_FILE.parent / "sentences_eval.txt"
MINILM_GROUPS = (r"(layers_\d+)/attention/(?:query|key|value)",)
SMOLLM_LAYERS = r"layers_\d+/(self_attn|mlp)/\w+_proj"
SMOLLM_GROUPS = (r"(layers_\d+)/self_attn/[qkv]_proj",
                 r"(layers_\d+)/mlp/(?:gate|up)_proj")


def candidates(quick: bool, affine: bool = False
               ) -> tuple[autoquant.Candidate, ...]:
  """The five candidates (round to nearest only with ``quick``); with
  ``affine`` also W4 g32, g64 and per channel with zero points and the
  "mse" range search."""
  algorithm = "rtn" if quick else "gptq"
  extra = tuple(autoquant.w4(group, algorithm, affine_mse=True)
                for group in (32, 64, None)) if affine else ()
  return autoquant.default_candidates(algorithm) + extra


def minilm_search(bits: float, quick: bool, progress: bool, windows: int = 8,
                  proxy: str = "loss", affine: bool = False
                  ) -> autoquant.AutoQuantResult:
  """MiniLM: measured cosine-loss scores, mean cosine on held-out sentences
  (``windows`` and ``proxy`` are SmolLM2's)."""
  del windows, proxy
  pretrained = minilm.load_pretrained()
  calibration = minilm.read_sentences(minilm.SENTENCES_FILE)
  evaluation = minilm.read_sentences(EVAL_SENTENCES_FILE)
  layers = None
  if quick:
    calibration, evaluation, layers = (calibration[:8], evaluation[:8],
                                       r"layers_0/.*")
  tokens = minilm.tokenize(pretrained.tokenizer, calibration)
  batches = [jaxq.flax.Batch(tuple(tokens), {},
                             np.asarray(tokens.attention_mask, bool))]
  reference = minilm.embed(pretrained, evaluation)

  def eval_fn(apply_fn: Any, variables: Any) -> float:
    embeddings = minilm.embed(pretrained, evaluation, variables=variables,
                              apply_fn=apply_fn)
    return float(np.mean(np.sum(embeddings * reference, axis=-1)))

  return jaxq.auto_quantize(
      pretrained.model, pretrained.variables, batches,
      autoquant.cosine_loss, candidates=candidates(quick, affine),
      layers=layers,
      groups=MINILM_GROUPS, bits_per_weight=bits, proxy="loss",
      eval_fn=eval_fn, progress=progress)


def smollm_search(bits: float, quick: bool, progress: bool, windows: int = 8,
                  proxy: str = "fisher", affine: bool = False
                  ) -> autoquant.AutoQuantResult:
  """SmolLM2: Fisher scores from the NLL on ``windows`` calibration
  windows of 256 tokens, perplexity on as many held-out ones."""
  pretrained = smollm.load_pretrained()
  window, count = (64, 2) if quick else (256, windows)
  if quick:
    pretrained = pretrained.truncated(2)
  calibration = smollm.calibration_windows(window, count)
  evaluation = smollm.evaluation_windows(window, count)
  batches = [calibration[i:i + 1] for i in range(len(calibration))]

  def eval_fn(apply_fn: Any, variables: Any) -> float:
    return smollm.perplexity(apply_fn, variables, evaluation)

  if proxy == "fisher":
    loss_fn, score_data = autoquant.nll_loss, None
  else:  # Measured: the KL to float on the first window's first half.
    loss_fn, score_data = autoquant.kl_loss, [calibration[:1, :window // 2]]
  return jaxq.auto_quantize(
      pretrained.model, pretrained.variables, batches, loss_fn,
      candidates=candidates(quick, affine), layers=SMOLLM_LAYERS,
      groups=SMOLLM_GROUPS, bits_per_weight=bits, proxy=proxy,
      score_data=score_data, eval_fn=eval_fn, higher_is_better=False,
      progress=progress)


def summary(name: str, result: autoquant.AutoQuantResult) -> str:
  """The result, its mixture-vs-uniform comparison and the timings."""
  counts: dict[str, int] = {}
  for choice in result.choices:
    counts[choice.candidate.name] = counts.get(choice.candidate.name, 0) + 1
  seconds = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
  lines = [f"## {name}", str(result),
           f"chosen formats (groups): {counts}",
           f"time: {seconds}",
           f"scoring compilations: {result.compilations}"]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("minilm", "smollm", "all"),
                      default="all")
  parser.add_argument("--bits", type=float, default=4.5,
                      help="budget in bits per weight of the searched layers")
  parser.add_argument("--plots", type=pathlib.Path, default=None,
                      help="directory for the Pareto plots (PNG)")
  parser.add_argument("--quick", action="store_true",
                      help="one block of each model, a few sentences/"
                           "windows, round-to-nearest candidates: seconds")
  parser.add_argument("--windows", type=int, default=8,
                      help="SmolLM2: calibration and held-out windows of "
                           "256 tokens (each)")
  parser.add_argument("--proxy", choices=("fisher", "loss"),
                      default="fisher",
                      help="SmolLM2's proxy: Fisher from the NLL, or the "
                           "measured KL to float on 128 calibration tokens")
  parser.add_argument("--affine", action="store_true",
                      help="three more candidates: W4 g32, g64 and per "
                           "channel affine (int8 zero points), mse ranges")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  searches = {"minilm": ("all-MiniLM-L6-v2 (mean cosine, higher is better)",
                         minilm_search),
              "smollm": ("SmolLM2-135M (perplexity, lower is better)",
                         smollm_search)}
  chosen = list(searches) if args.model == "all" else [args.model]
  results = {}
  for key in chosen:
    title, search = searches[key]
    start, cpu = time.perf_counter(), time.process_time()
    result = search(args.bits, args.quick, not args.no_progress,
                    args.windows, args.proxy, args.affine)
    results[key] = result
    print(summary(title, result))
    print(f"total {time.perf_counter() - start:.0f} s wall, "
          f"{time.process_time() - cpu:.0f} s CPU (both cores' time "
          f"summed; loading the model included)\n")
    if args.plots is not None:
      args.plots.mkdir(parents=True, exist_ok=True)
      path = args.plots / f"auto_quantize_{key}.png"
      result.plot(str(path), title=f"{title}: auto_quantize")
      print(f"plot: {path}\n")
  return results


if __name__ == "__main__":
  main()
