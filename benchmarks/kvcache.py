"""KV cache: attention error and decode cost of each cache format.

Synthetic keys shaped like a real LLM's (SmolLM2-135M: 3 KV heads, 9 query
heads, head_dim 64): unit-normal, except 4 channels per head that are 10x
larger (the outlier channels of real keys); values and queries are
unit-normal. For each `jaxq.kvcache.KVCacheSpec` (format x key
granularity, with and without the Hadamard rotation) the benchmark fills a
cache of ``T`` tokens (2048; ``--quick``: 128) with one prefill and reports
(``int-qk``: ``integer_qk=True``, logits as int8 x int8 -> int32):

* ``attn_rel_err``: the relative L2 error of causal attention for all ``T``
  queries against `jaxq.kvcache.reference_attention` on the float keys and
  values;
* ``key_rel_err``: the relative error of the dequantized keys;
* ``bytes_vs_bf16``: `jaxq.kvcache.nbytes` over a bf16 cache's;
* ``median_s``: one jitted decode step's attention (``S = 1`` at position
  ``T - 1``, the whole cache visible), timed round-robin with the others;
  ``ratio`` is that over the float32 cache's (``impl="float"``).

``python benchmarks/kvcache.py [--quick] [--json PATH]``
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import _harness  # noqa: E402
from jaxq import kvcache  # noqa: E402

KV_HEADS, QUERY_HEADS, HEAD_DIM = 3, 9, 64
OUTLIER_CHANNELS = 4
GROUP_SIZE = 32


def synthetic_qkv(batch: int, length: int, seed: int = 0
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Queries, keys with 10x outlier channels, and values."""
  rng = np.random.default_rng(seed)
  query = rng.normal(size=(batch, length, QUERY_HEADS, HEAD_DIM))
  key = rng.normal(size=(batch, length, KV_HEADS, HEAD_DIM))
  for head in range(KV_HEADS):
    channels = rng.choice(HEAD_DIM, OUTLIER_CHANNELS, replace=False)
    key[:, :, head, channels] *= 10.0
  value = rng.normal(size=(batch, length, KV_HEADS, HEAD_DIM))
  return tuple(jnp.asarray(a, jnp.float32) for a in (query, key, value))


def specs(quick: bool) -> dict[str, kvcache.KVCacheSpec]:
  """The cases; ``quick`` keeps float32, int8 and int4 (per token, KIVI,
  Hadamard)."""
  cases = {"float32": kvcache.KVCacheSpec(None)}
  for fmt in ("int8", "float8_e4m3fn", "int4"):
    for hadamard in (False, True):
      suffix = "+hadamard" if hadamard else ""
      if not quick or (fmt != "float8_e4m3fn" and
                       (fmt, hadamard) != ("int8", True)):
        cases[f"{fmt} token{suffix}"] = kvcache.KVCacheSpec(
            fmt, hadamard=hadamard)
      if fmt == "int4" and not (quick and hadamard):
        cases[f"{fmt} kivi-g{GROUP_SIZE}{suffix}"] = kvcache.KVCacheSpec(
            fmt, key_granularity="channel", group_size=GROUP_SIZE,
            hadamard=hadamard)
  if not quick:
    cases["int8 static-head"] = kvcache.KVCacheSpec(
        "int8", key_granularity="head", value_granularity="head")
    for fmt in ("int8", "int4"):  # q . k as int8 x int8 -> int32.
      cases[f"{fmt} token int-qk"] = kvcache.KVCacheSpec(fmt,
                                                         integer_qk=True)
  return cases


def _rel(a: jax.Array, b: jax.Array) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run(length: int, repeats: int, quick: bool) -> list[dict]:
  batch = 1
  query, key, value = synthetic_qkv(batch, length)
  start = jnp.zeros((batch,), jnp.int32)
  reference = kvcache.reference_attention(query, key, value, start)
  bf16_bytes = kvcache.nbytes(kvcache.init(
      kvcache.KVCacheSpec(None), batch=batch, max_length=length,
      num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=jnp.bfloat16))
  static = dict(key_amax=jnp.max(jnp.abs(key), axis=(0, 1, 3)),
                value_amax=jnp.max(jnp.abs(value), axis=(0, 1, 3)))
  fill = jax.jit(kvcache.update)
  prefill_attend = jax.jit(kvcache.attend)
  decode_attend = jax.jit(kvcache.attend)
  last = jnp.full((batch,), length - 1, jnp.int32)
  rows, decode = [], {}
  for name, spec in specs(quick).items():
    init_kwargs = static if spec.key_granularity == "head" else {}
    cache = kvcache.init(spec, batch=batch, max_length=length,
                         num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                         **init_kwargs)
    cache = fill(cache, key, value, start)
    rows.append({
        "case": name, "impl": "float" if spec.format is None else "jaxq",
        "format": str(spec.format), "key_granularity": spec.key_granularity,
        "hadamard": spec.hadamard, "integer_qk": spec.integer_qk,
        "attn_rel_err": _rel(prefill_attend(cache, query, start), reference),
        "key_rel_err": _rel(kvcache.read(cache)[0], key),
        "bytes_vs_bf16": kvcache.nbytes(cache) / bf16_bytes})
    decode[name] = (lambda c=cache: decode_attend(c, query[:, -1:], last))
  times = _harness.interleaved_median_times(decode, repeats=repeats)
  for row in rows:
    row["median_s"] = times[row["case"]]
    row["ratio"] = times[row["case"]] / times["float32"]
  return rows


def main() -> None:
  args = _harness.parser(__doc__.splitlines()[0]).parse_args()
  length, repeats = (128, 3) if args.quick else (2048, 20)
  rows = run(length, repeats, args.quick)
  _harness.emit("kvcache", rows, args.json,
                note=f"T={length}, {KV_HEADS} KV / {QUERY_HEADS} query heads "
                f"of {HEAD_DIM}, {OUTLIER_CHANNELS} outlier channels per head "
                f"at 10x; ratio: decode attention time over float32's")


if __name__ == "__main__":
  main()
