"""Throughput of ``dequantize(quantize(x))`` at each granularity.

Workload: a float32 array of shape (n, n) (n = 4096, or 1024 with
``--quick``), quantized and dequantized in one jitted function per case, so
XLA sees the whole round trip (range reduction, scale, rounding, storage cast
and rescale), as `jaxq.fake_quant` runs it in a QAT step.

Baseline: a plain elementwise pass over the same array, ``x * 2 + 1``,
jitted, measured in the same run with the repeats interleaved round-robin.
``ratio`` is each case's median time over the baseline's; ``gb_per_s``
counts one read and one write of the float32 array.

Cases use the granularity names of DESIGN.md: T (per-tensor), C (per-channel),
K (per-token), G128 (groups of 128 along the last axis), B128x128 (128x128
tiles) and MX32 (OCP Microscaling, e8m0 scales over 32 elements).

Run: ``python benchmarks/primitives.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness  # noqa: E402
import jaxq  # noqa: E402
from jaxq import MX, PerBlock, PerChannel, PerGroup, PerTensor  # noqa: E402
from jaxq import PerToken, QuantSpec  # noqa: E402

BASELINE = "elementwise x*2+1"

CASES: dict[str, QuantSpec] = {
    "T int8": QuantSpec("int8", PerTensor()),
    "C int8": QuantSpec("int8", PerChannel(axis=-1)),
    "K int8": QuantSpec("int8", PerToken()),
    "G128 int8": QuantSpec("int8", PerGroup(axis=-1, size=128)),
    "B128x128 int8": QuantSpec("int8", PerBlock(shape=(128, 128))),
    "MX32 int8": QuantSpec("int8", MX(axis=-1, size=32)),
    "MX32 float8_e4m3fn": QuantSpec("float8_e4m3fn", MX(axis=-1, size=32)),
}


def _round_trip(spec: QuantSpec) -> Callable[[jax.Array], jax.Array]:
  return jax.jit(lambda x: jaxq.dequantize(jaxq.quantize(x, spec)))


def run(n: int, repeats: int) -> list[dict[str, Any]]:
  """Times every case against the elementwise baseline on an (n, n) array."""
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  fns = {BASELINE: jax.jit(lambda x: x * 2 + 1)}
  fns.update({case: _round_trip(spec) for case, spec in CASES.items()})
  times = _harness.interleaved_median_times(
      {case: (lambda fn=fn: fn(x)) for case, fn in fns.items()},
      repeats=repeats)
  moved_bytes = 2 * x.size * x.dtype.itemsize  # read x, write the result
  return [{"case": case,
           "impl": "float" if case == BASELINE else "jaxq",
           "median_s": seconds,
           "ratio": seconds / times[BASELINE],
           "gb_per_s": moved_bytes / seconds / 1e9,
           "shape": f"{n}x{n}"}
          for case, seconds in times.items()]


def main() -> None:
  args = _harness.parser(__doc__.splitlines()[0]).parse_args()
  n, repeats = (1024, 5) if args.quick else (4096, 10)
  _harness.emit("primitives", run(n, repeats), args.json,
                note=f"float32 {n}x{n}, ratio = time / ({BASELINE})")


if __name__ == "__main__":
  main()
