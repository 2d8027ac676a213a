"""Decoder serving speed and memory: SmolLM2-135M prefill and decode.

``python benchmarks/decode.py`` prefills 256 tokens and decodes 128 at batch
1 and 8, side by side in one run, for each weight configuration

==========  ================================================================
weights     what the Dense layers and the tied embedding / LM head hold
==========  ================================================================
float32     the float model
bf16        the float model in bfloat16 (weights and compute)
w8a8        jaxq int8 weights per channel x int8 activations per token
            (int8 x int8 -> int32 dots); embedding int8 per row
w4          jaxq int4 weights in groups of 32 along the input, weight-only;
            embedding int8 per row
==========  ================================================================

each with a float KV cache (the model's dtype) and jaxq's int8 (per token
per head) and int4 (KIVI: keys per channel in groups of 32 tokens, values
per token, the unfinished last group in float, keys and values
Hadamard-rotated) caches. Per row: decode tokens/s (batch x 128 / the decode
loop's median time), prefill tokens/s, the bytes of the weights and of the
cache at the benchmark's length, XLA's peak-memory estimate of the decode
program (arguments + temporaries + outputs, from
``compiled.memory_analysis()``) and `jaxq.inspect`'s int8 share of the
decode program's matmul FLOPs (attention's activation-by-activation einsums
are float in every configuration). ``ratio`` is the decode time over the
batch's first configuration (the float32 model with a float cache, unless
``--weights``/``--caches`` leave it out), measured in the same run.

``--quick`` keeps the first 2 of the 30 blocks, prefill 24 and decode 8
tokens at batch 1 (seconds per configuration; the test suite runs it).
The CPU's int8 instruction sets (AVX512-VNNI, AMX) are printed and stored in
the JSON's ``device``: XLA:CPU's int8 dots are only fast with them.
"""

from __future__ import annotations

import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxq
from jaxq import PerChannel, PerGroup, PerToken, QuantSpec, kvcache
from jaxq.convert import tree_bytes

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] /
                       "examples"))
import smollm  # noqa: E402

import _harness  # noqa: E402

WEIGHTS = ("float32", "bf16", "w8a8", "w4")
CACHES = {
    "float": None,
    "int8": kvcache.KVCacheSpec("int8"),
    "int4": kvcache.KVCacheSpec("int4", key_granularity="channel",
                                group_size=32, float_residual=True,
                                hadamard=True, value_hadamard=True),
}
EMBED_RULE = jaxq.Rule(r"embed_tokens", weight=QuantSpec("int8",
                                                         PerChannel(0)))


def cpu_int8_features() -> str:
  """The CPU's int8 dot-product instruction sets, from /proc/cpuinfo."""
  try:
    flags = set(pathlib.Path("/proc/cpuinfo").read_text().split())
  except OSError:
    return "unknown"
  found = [name for name, flag in (("AVX512-VNNI", "avx512_vnni"),
                                   ("AVX-VNNI", "avx_vnni"),
                                   ("AMX-INT8", "amx_int8")) if flag in flags]
  return ", ".join(found) or "no VNNI/AMX"


def build(pretrained: smollm.Pretrained, weights: str
          ) -> tuple[Any, Any, Any, int]:
  """(apply_fn, variables, model dtype, weight bytes) for a configuration."""
  model, variables = pretrained.model, pretrained.variables
  if weights == "float32":
    return model.apply, variables, jnp.float32, tree_bytes(variables)
  if weights == "bf16":
    model = smollm.SmolLM(model.config, jnp.bfloat16)
    variables = jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables)
    return model.apply, variables, jnp.bfloat16, tree_bytes(variables)
  if weights == "w8a8":
    rule = jaxq.Rule(r".*_proj", weight=QuantSpec("int8", PerChannel(-1)),
                     act=QuantSpec("int8", PerToken()))
  elif weights == "w4":
    rule = jaxq.Rule(r".*_proj", weight=QuantSpec("int4", PerGroup(0, 32)))
  else:
    raise ValueError(f"unknown weights {weights!r}; expected one of "
                     f"{WEIGHTS}.")
  serve = jaxq.quantize_model(model, [EMBED_RULE, rule], mode="serve")
  jax.eval_shape(serve.apply, variables, jnp.zeros((1, 1), jnp.int32))
  serving, report = jaxq.convert(serve, variables)
  return serve.apply, serving, jnp.float32, report.quantized_bytes


def measure(pretrained: smollm.Pretrained, weights: str, cache: str,
            batch: int, prompt_length: int, new_tokens: int, repeats: int
            ) -> dict[str, Any]:
  apply_fn, variables, dtype, weight_bytes = build(pretrained, weights)
  config = pretrained.config
  rng = np.random.default_rng(0)
  prompts = jnp.asarray(rng.integers(0, config.vocab_size,
                                     (batch, prompt_length)), jnp.int32)
  lengths = jnp.full((batch,), prompt_length, jnp.int32)
  caches = smollm.init_caches(config, CACHES[cache], batch,
                              prompt_length + new_tokens, dtype)
  prefill = jax.jit(lambda v, p, l, c: smollm.prefill(apply_fn, v, p, l, c))
  decode = jax.jit(lambda v, x, l, c, r: smollm.decode(
      apply_fn, v, x, l, c, r, max_new_tokens=new_tokens))
  key = jax.random.key(0)
  prefill_s = _harness.median_time(prefill, variables, prompts, lengths,
                                   caches, warmup=1, repeats=repeats)
  logits, filled = prefill(variables, prompts, lengths, caches)
  decode_s = _harness.median_time(decode, variables, logits, lengths, filled,
                                  key, warmup=1, repeats=repeats)
  compiled = decode.lower(variables, logits, lengths, filled, key).compile()
  memory = compiled.memory_analysis()
  peak = None if memory is None else (
      memory.argument_size_in_bytes + memory.temp_size_in_bytes +
      memory.output_size_in_bytes - memory.alias_size_in_bytes)
  summary = jaxq.inspect(decode, variables, logits, lengths, filled,
                         key).summary()
  row = {
      "case": f"{weights} + {cache} cache, batch {batch}",
      "impl": "float" if weights in ("float32", "bf16") and cache == "float"
              else "jaxq",
      "weights": weights, "cache": cache, "batch": batch,
      "median_s": decode_s, "prefill_s": prefill_s,
      "decode_tokens_per_s": batch * new_tokens / decode_s,
      "prefill_tokens_per_s": batch * prompt_length / prefill_s,
      "weight_bytes": int(weight_bytes),
      "cache_bytes": int(sum(kvcache.nbytes(c) for c in filled)),
      "peak_bytes": peak,
      "int8_share": float(summary.shares.get("int8", 0.0)),
  }
  if jax.default_backend() == "cpu":
    row["cpu_int8"] = cpu_int8_features()
  return row


def main() -> None:
  parser = _harness.parser(__doc__.splitlines()[0])
  parser.add_argument("--weights", nargs="*", default=list(WEIGHTS),
                      choices=WEIGHTS)
  parser.add_argument("--caches", nargs="*", default=list(CACHES),
                      choices=list(CACHES))
  parser.add_argument("--batches", nargs="*", type=int, default=None,
                      help="batch sizes (default 1 and 8; --quick: 1)")
  args = parser.parse_args()
  pretrained = smollm.load_pretrained()
  if args.quick:
    pretrained = pretrained.truncated(2)
    batches, prompt_length, new_tokens, repeats = (1,), 24, 8, 2
  else:
    batches, prompt_length, new_tokens, repeats = (1, 8), 256, 128, 3
  if args.batches:
    batches = tuple(args.batches)
  features = cpu_int8_features()
  print(f"device: {_harness.device_name()} ({features}); "
        f"{pretrained.config.num_layers} blocks, prefill {prompt_length}, "
        f"decode {new_tokens}")
  rows = []
  for batch in batches:
    baseline = None
    for weights in args.weights:
      for cache in args.caches:
        start = time.perf_counter()
        row = measure(pretrained, weights, cache, batch, prompt_length,
                      new_tokens, repeats)
        if baseline is None:  # The batch's first configuration.
          baseline = row["median_s"]
        row["ratio"] = row["median_s"] / baseline
        rows.append(row)
        print(f"  {row['case']}: {row['decode_tokens_per_s']:.1f} decode "
              f"tokens/s ({time.perf_counter() - start:.0f} s)", flush=True)
  print()
  _harness.emit("decode", rows, args.json, note=f"CPU int8: {features}"
                if jax.default_backend() == "cpu" else "")


if __name__ == "__main__":
  main()
