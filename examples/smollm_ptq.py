"""Quantizing SmolLM2-135M: a quantized KV cache and every PTQ tool, measured.

The decoder of `examples/smollm.py`, scored by held-out perplexity (windows
of 256 tokens of `smollm.EVALUATION_MODULES`' docstrings; calibration on
`smollm.CALIBRATION_MODULES`' docstrings, a disjoint text). Each row gives
the perplexity and its change relative to the float model in the same run:

* KV cache (float weights; perplexity through the jitted decode loop, each
  token written to and read from the cache as in generation): int8 and fp8
  e4m3 per token per head, int4 per token per head, int4 KIVI (keys per
  channel in groups of 32 tokens, values per token), with and without a
  Hadamard rotation of keys and queries, and `INT4_KV`: KIVI with the
  unfinished last group of 32 tokens kept in float and keys and values
  rotated; int8 and fp8 with one static range per KV head, calibrated on
  the calibration windows (`smollm.static_kv_ranges`).
* Weights and activations on the 210 Dense layers (q, k, v, o, gate, up,
  down of 30 blocks), served (`jaxq.convert`, serve mode), the tied
  embedding / LM head int8 per row in every row: W8 weight-only; W8A8 with
  dynamic per-token activations, alone and after SmoothQuant (alpha 0.5,
  and each layer's alpha searched), and with int8 weights per group of 64
  inputs after SmoothQuant (0.8, searched); W8A8 with static per-tensor
  activation ranges (max) and with SmoothQuant (alpha 0.8) first; W4
  weight-only per channel, per group of 128 (576 = 4 x 128 + 64: a ragged
  last group), 64 and 32, each by RTN (abs-max, and the "mse" range search
  weighted by the calibration inputs), AWQ and GPTQ.

SmoothQuant and AWQ fold the factors of q/k/v into ``input_layernorm`` and
of gate/up into ``post_attention_layernorm`` (pre-norm: a norm's output
feeds only those layers); o_proj and down_proj scale their own inputs.

Run: python examples/smollm_ptq.py [--quick] [--windows N] [--rows REGEX]
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import jaxq
import smollm
from jaxq import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec, kvcache
from jaxq.convert import tree_bytes

EMBED = jaxq.Rule(r"embed_tokens", weight=QuantSpec("int8", PerChannel(0)))
DENSE = r"layers_\d+/(self_attn|mlp)/\w+_proj"
SMOOTHQUANT_ALPHA = 0.8

# The int4 cache of choice: keys per channel in groups of 32 tokens, the
# unfinished last group in float, keys and values Hadamard-rotated.
INT4_KV = kvcache.KVCacheSpec("int4", key_granularity="channel",
                              group_size=32, float_residual=True,
                              hadamard=True, value_hadamard=True)

KV_CACHES = {
    "KV int8 per token-head": kvcache.KVCacheSpec("int8"),
    "KV fp8 e4m3 per token-head": kvcache.KVCacheSpec("float8_e4m3fn"),
    "KV int4 per token-head": kvcache.KVCacheSpec("int4"),
    "KV int4 per token-head + Hadamard": kvcache.KVCacheSpec(
        "int4", hadamard=True),
    "KV int4 KIVI (keys per channel, g32)": kvcache.KVCacheSpec(
        "int4", key_granularity="channel", group_size=32),
    "KV int4 KIVI + Hadamard": kvcache.KVCacheSpec(
        "int4", key_granularity="channel", group_size=32, hadamard=True),
    "KV int4 KIVI + float residual + Hadamard K and V": INT4_KV,
    # One range per KV head for every token, calibrated (`static_kv_ranges`).
    "KV int8 static per head": kvcache.KVCacheSpec(
        "int8", key_granularity="head", value_granularity="head"),
    "KV int8 static per head + Hadamard K and V": kvcache.KVCacheSpec(
        "int8", key_granularity="head", value_granularity="head",
        hadamard=True, value_hadamard=True),
    "KV fp8 e4m3 static per head": kvcache.KVCacheSpec(
        "float8_e4m3fn", key_granularity="head", value_granularity="head"),
}

W4 = {"per-channel": PerChannel(-1), "g128": PerGroup(0, 128),
      "g64": PerGroup(0, 64), "g32": PerGroup(0, 32)}


def fold_map(num_layers: int) -> dict[str, str]:
  """Each layer whose input a pre-norm's output is, mapped to that norm."""
  fold = {}
  for i in range(num_layers):
    for name in ("q_proj", "k_proj", "v_proj"):
      fold[f"layers_{i}/self_attn/{name}"] = f"layers_{i}/input_layernorm"
    for name in ("gate_proj", "up_proj"):
      fold[f"layers_{i}/mlp/{name}"] = f"layers_{i}/post_attention_layernorm"
  return fold


@dataclasses.dataclass(frozen=True)
class Row:
  """One configuration's held-out perplexity, and its cost."""
  config: str
  perplexity: float
  relative: float  # perplexity / float perplexity - 1
  weight_bytes: int | None
  seconds: float  # calibration, algorithm and conversion time


Prepare = Callable[[smollm.Pretrained, list[np.ndarray]],
                   tuple[Any, Any, int]]


def rtn(weight: QuantSpec, act: QuantSpec | None = None, *,
        algorithm: str | None = None,
        alpha: float | None = SMOOTHQUANT_ALPHA) -> Prepare:
  """A configuration: rules for every Dense, an optional PTQ algorithm,
  then `jaxq.calibrate` (each rule's own calibration) and `jaxq.convert`."""

  def prepare(pretrained: smollm.Pretrained, batches: list[np.ndarray]
              ) -> tuple[Any, Any, int]:
    rules = [EMBED, jaxq.Rule(DENSE, weight=weight, act=act)]
    cal = jaxq.quantize_model(pretrained.model, rules, mode="calibrate")
    variables = pretrained.variables
    fold = fold_map(pretrained.config.num_layers)
    if algorithm == "smoothquant":
      variables = jaxq.smoothquant(cal, variables, batches,
                                   alpha=alpha, fold_into=fold,
                                   progress=False)
    elif algorithm == "awq":
      variables = jaxq.awq(cal, variables, batches, fold_into=fold,
                           progress=False)
    elif algorithm == "gptq":
      variables = jaxq.gptq(cal, variables, batches, progress=False)
    elif algorithm is not None:
      raise ValueError(f"unknown algorithm {algorithm!r}.")
    result = jaxq.calibrate(cal, variables, batches)
    serve = cal.with_mode("serve")
    serving, report = jaxq.convert(serve, variables, result.stats)
    return serve.apply, serving, report.quantized_bytes

  return prepare


def weight_configs() -> dict[str, Prepare]:
  """The weight/activation rows, in table order."""
  int8 = QuantSpec("int8", PerChannel(-1))
  configs = {
      "W8 per channel, weight-only": rtn(int8),
      "W8A8 dynamic per token": rtn(int8, QuantSpec("int8", PerToken())),
      # Outlier input channels moved into the weights, then per token.
      "W8A8 dynamic per token, SmoothQuant 0.5": rtn(
          int8, QuantSpec("int8", PerToken()), algorithm="smoothquant",
          alpha=0.5),
      # Each layer's alpha by its W8A8 output error on calibration data.
      "W8A8 dynamic per token, SmoothQuant searched": rtn(
          int8, QuantSpec("int8", PerToken()), algorithm="smoothquant",
          alpha=None),
      # Weights per group of 64 inputs: SmoothQuant's larger input
      # factors widen one group's step, not a whole output channel's.
      "W8 g64 A8 dynamic per token, SmoothQuant 0.8": rtn(
          QuantSpec("int8", PerGroup(0, 64)), QuantSpec("int8", PerToken()),
          algorithm="smoothquant", alpha=0.8),
      "W8 g64 A8 dynamic per token, SmoothQuant searched": rtn(
          QuantSpec("int8", PerGroup(0, 64)), QuantSpec("int8", PerToken()),
          algorithm="smoothquant", alpha=None),
      "W8A8 static per-tensor (max)": rtn(
          int8, QuantSpec("int8", PerTensor(), dynamic=False)),
      "W8A8 static per-tensor, SmoothQuant 0.8": rtn(
          int8, QuantSpec("int8", PerTensor(), dynamic=False),
          algorithm="smoothquant"),
  }
  for name, granularity in W4.items():
    spec = QuantSpec("int4", granularity)
    mse = QuantSpec("int4", granularity, calibration="mse")
    configs[f"W4 {name}, RTN max"] = rtn(spec)
    configs[f"W4 {name}, RTN mse"] = rtn(mse)
    configs[f"W4 {name}, AWQ"] = rtn(spec, algorithm="awq")
    configs[f"W4 {name}, GPTQ"] = rtn(spec, algorithm="gptq")
    configs[f"W4 {name}, GPTQ mse"] = rtn(mse, algorithm="gptq")
    # Scale and zero point per group: the GPTQ paper's own default.
    affine = QuantSpec("int4", granularity, symmetric=False)
    configs[f"W4 {name} affine, RTN max"] = rtn(affine)
    configs[f"W4 {name} affine, GPTQ"] = rtn(affine, algorithm="gptq")
    configs[f"W4 {name} affine, GPTQ mse"] = rtn(
        QuantSpec("int4", granularity, symmetric=False, calibration="mse"),
        algorithm="gptq")
  return configs


def study(pretrained: smollm.Pretrained, calibration: np.ndarray,
          evaluation: np.ndarray, *, rows: str = ".*", batch_size: int = 4,
          log: Callable[[str], None] = print) -> list[Row]:
  """The float row, then every KV-cache and weight row matching ``rows``."""
  select = re.compile(rows)
  config = pretrained.config
  batches = [calibration[i:i + batch_size]
             for i in range(0, len(calibration), batch_size)]
  float_ppl = smollm.perplexity(pretrained.model.apply, pretrained.variables,
                                evaluation)
  table = [Row("float32", float_ppl, 0.0, tree_bytes(pretrained.variables),
               0.0)]
  log(f"float32: {float_ppl:.3f}")
  for name, spec in KV_CACHES.items():
    if not select.search(name):
      continue
    ranges = None
    if spec.static_parts:
      ranges = smollm.static_kv_ranges(pretrained.model, pretrained.variables,
                                       calibration, spec, batch_size)
    ppl = smollm.perplexity(pretrained.model.apply, pretrained.variables,
                            evaluation, cache_spec=spec, config=config,
                            static_ranges=ranges)
    table.append(Row(name, ppl, ppl / float_ppl - 1, None, 0.0))
    log(f"{name}: {ppl:.3f} ({100 * table[-1].relative:+.2f}%)")
  for name, prepare in weight_configs().items():
    if not select.search(name):
      continue
    start = time.perf_counter()
    apply_fn, serving, nbytes = prepare(pretrained, batches)
    seconds = time.perf_counter() - start
    ppl = smollm.perplexity(apply_fn, serving, evaluation)
    table.append(Row(name, ppl, ppl / float_ppl - 1, nbytes, seconds))
    log(f"{name}: {ppl:.3f} ({100 * table[-1].relative:+.2f}%), "
        f"{seconds:.0f} s")
  return table


def format_table(rows: Sequence[Row]) -> str:
  lines = ["| config | perplexity | vs float | weight MB | PTQ s |",
           "| --- | --- | --- | --- | --- |"]
  for row in rows:
    mb = "" if row.weight_bytes is None else f"{row.weight_bytes / 1e6:.1f}"
    lines.append(f"| {row.config} | {row.perplexity:.3f} | "
                 f"{100 * row.relative:+.2f}% | {mb} | {row.seconds:.0f} |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="the first 2 blocks, 2 short windows, few rows")
  parser.add_argument("--windows", type=int, default=32,
                      help="held-out windows of 256 tokens")
  parser.add_argument("--calibration-windows", type=int, default=16)
  parser.add_argument("--rows", default=".*",
                      help="regex choosing the KV-cache and weight rows")
  args = parser.parse_args(argv)
  pretrained = smollm.load_pretrained()
  calibration = smollm.calibration_windows(256, args.calibration_windows)
  evaluation = smollm.evaluation_windows(256, args.windows)
  rows = args.rows
  if args.quick:
    pretrained = pretrained.truncated(2)
    calibration, evaluation = calibration[:2, :64], evaluation[:2, :64]
    # GPTQ on these 2 blocks runs in tests/io's io_formats --quick.
    rows = r"KV int8 per|W8A8 dynamic per token$|W4 g128, RTN max$"
  print(f"SmolLM2-135M: {pretrained.config.num_layers} blocks; calibration "
        f"{calibration.shape[0]} x {calibration.shape[1]} tokens, evaluation "
        f"{evaluation.shape[0]} x {evaluation.shape[1]} (held out)")
  table = study(pretrained, calibration, evaluation, rows=rows)
  print()
  print(format_table(table))


if __name__ == "__main__":
  main()
