"""Matmul throughput: float32 and bfloat16 against jaxq's low-bit dot_general.

For M = N = K in {1024, 4096} (``--quick``: 256 only, a smoke run;
``--large`` adds 8192), times ``(M, K) x (K, N)`` for:

=================  =========================  ===============================
variant            activation (lhs)           weight (rhs)
=================  =========================  ===============================
float32            float32                    float32
bf16 (baseline)    bfloat16                   bfloat16
int8 T-C           int8 per tensor            int8 per output channel
int8 K-C           int8 per token             int8 per output channel
int8 G-G           int8 groups of 128 on K    int8 groups of 128 on K
MX fp8             e4m3, MX (32 on K, e8m0)   e4m3, MX (32 on K, e8m0)
=================  =========================  ===============================

Each quantized variant has two rows: ``act=offline``, both operands already
quantized (weights are always quantized offline), and ``act=dynamic``, which
also quantizes the bfloat16 activation inside the timed, jitted function
(dynamic range). Rows report the median of device-synchronised runs after
warm-up (all variants of one size interleaved), TFLOP/s counting 2·M·N·K
operations (TOPS for integers), the ratio to bf16 from the same run, and
the weight's bytes (values and scales) against float32.

Runs on whatever device JAX picks: ``python benchmarks/matmul.py`` on a CPU
takes a few minutes; on a GPU the same command measures the GPU.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import _harness  # noqa: E402
import jaxq  # noqa: E402
from jaxq import MX, PerChannel, PerGroup, PerTensor, PerToken  # noqa: E402
from jaxq import QuantSpec  # noqa: E402

MATMUL = (((1,), (0,)), ((), ()))

# variant -> (activation spec, weight spec); None means a float matmul.
VARIANTS: dict[str, tuple[QuantSpec, QuantSpec] | None] = {
    "float32": None,
    "bf16": None,
    "int8 T-C": (QuantSpec("int8", PerTensor()),
                 QuantSpec("int8", PerChannel(-1))),
    "int8 K-C": (QuantSpec("int8", PerToken()),
                 QuantSpec("int8", PerChannel(-1))),
    "int8 G-G": (QuantSpec("int8", PerGroup(-1, 128)),
                 QuantSpec("int8", PerGroup(0, 128))),
    "MX fp8": (QuantSpec("float8_e4m3fn", MX(-1)),
               QuantSpec("float8_e4m3fn", MX(0))),
}


def _float_matmul(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  return jax.lax.dot_general(lhs, rhs, MATMUL)


def _dynamic_matmul(act_spec: QuantSpec, x: jax.Array, w: jaxq.QArray
                    ) -> jax.Array:
  return jaxq.dot_general(jaxq.quantize(x, act_spec), w, MATMUL)


def _cases(size: int, key: jax.Array
           ) -> tuple[dict[str, Callable[[], Any]], dict[str, int]]:
  """Zero-argument timed callables and weight bytes for one size."""
  kx, kw = jax.random.split(key)
  x = jax.random.normal(kx, (size, size), jnp.float32)
  w = jax.random.normal(kw, (size, size), jnp.float32) / size**0.5
  x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  float_matmul = jax.jit(_float_matmul)
  fns: dict[str, Callable[[], Any]] = {
      "float32": functools.partial(float_matmul, x, w),
      "bf16": functools.partial(float_matmul, x16, w16),
  }
  weight_bytes = {"float32": w.nbytes, "bf16": w16.nbytes}
  quantize = jax.jit(jaxq.quantize, static_argnums=1)
  quantized_matmul = jax.jit(functools.partial(jaxq.dot_general,
                                               dimension_numbers=MATMUL))
  for name, specs in VARIANTS.items():
    if specs is None:
      continue
    act_spec, weight_spec = specs
    qw = jax.block_until_ready(quantize(w16, weight_spec))
    qx = jax.block_until_ready(quantize(x16, act_spec))
    dynamic = jax.jit(functools.partial(_dynamic_matmul, act_spec))
    fns[f"{name}|offline"] = functools.partial(quantized_matmul, qx, qw)
    fns[f"{name}|dynamic"] = functools.partial(dynamic, x16, qw)
    weight_bytes[name] = qw.nbytes
  return fns, weight_bytes


def run(sizes: list[int], repeats: int) -> list[dict[str, Any]]:
  rows = []
  for size in sizes:
    fns, weight_bytes = _cases(size, jax.random.key(size))
    # The grouped variants take seconds per call from 4096 on, on a CPU.
    large = size >= 4096
    times = _harness.interleaved_median_times(
        fns, warmup=1 if large else 2, repeats=3 if large else repeats)
    flops = 2.0 * size**3
    for key, seconds in times.items():
      variant, _, act = key.partition("|")
      rows.append({
          "case": f"M=N=K={size}",
          "impl": "jaxq" if act else variant,
          "variant": variant,
          "act": act or "float",
          "median_s": seconds,
          "tflops": flops / seconds / 1e12,
          "ratio": seconds / times["bf16"],
          "weight_bytes": weight_bytes[variant],
          "weight_vs_f32": weight_bytes[variant] / weight_bytes["float32"],
      })
  return rows


def main() -> None:
  p = _harness.parser(__doc__.splitlines()[0])
  p.add_argument("--large", action="store_true",
                 help="also run M = N = K = 8192 (minutes on a CPU)")
  p.add_argument("--repeats", type=int, default=10)
  args = p.parse_args()
  sizes = [256] if args.quick else [1024, 4096]
  if args.large and not args.quick:
    sizes.append(8192)
  rows = run(sizes, 5 if args.quick else args.repeats)
  _harness.emit("matmul", rows, args.json,
                note="ratio = median_s / bf16 median_s in the same run; "
                     "tflops counts 2*M*N*K")


if __name__ == "__main__":
  main()
