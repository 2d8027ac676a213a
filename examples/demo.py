"""jaxq demo: quantize sample tensors at every format and granularity.

Prints, for a Gaussian weight matrix with a few outlier channels (the shape
of real trained weights), the reconstruction SQNR and the bytes of every
format x granularity pairing. Later issues grow this into the full
train -> PTQ -> QAT -> serve demo.

Run: python examples/demo.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxq
from jaxq import MX, PerBlock, PerChannel, PerGroup, PerTensor, PerToken, QuantSpec


def sqnr_db(x: jax.Array, x_hat: jax.Array) -> float:
  """Signal-to-quantization-noise ratio in decibels."""
  noise = jnp.sum((x - x_hat) ** 2)
  return float(10 * jnp.log10(jnp.sum(x ** 2) / jnp.maximum(noise, 1e-30)))


def sample_weight(key: jax.Array, shape=(512, 512)) -> jax.Array:
  """Gaussian weights whose output channels have very different ranges."""
  k1, k2 = jax.random.split(key)
  channel_scale = jnp.exp(jax.random.normal(k2, (1, shape[1])))
  return jax.random.normal(k1, shape) * 0.02 * channel_scale


def main() -> None:
  w = sample_weight(jax.random.key(0))
  granularities = {
      "T  per-tensor": PerTensor(),
      "C  per-channel": PerChannel(axis=-1),
      "K  per-token (rows)": PerToken(),
      "G  per-group 128": PerGroup(axis=0, size=128),
      "B  per-block 128x128": PerBlock((128, 128)),
      "MX groups of 32": MX(axis=0, size=32),
  }
  formats = ["int8", "int4", "float8_e4m3fn", "float8_e5m2", "float4_e2m1fn"]
  float_bytes = w.size * 4
  print(f"weight {w.shape} float32, {float_bytes / 1024:.0f} KiB")
  print(f"{'granularity':24s} {'format':15s} {'SQNR dB':>8s} {'KiB':>7s} "
        f"{'x smaller':>9s}")
  for gname, granularity in granularities.items():
    for fmt in formats:
      spec = QuantSpec(fmt, granularity)
      qa = jax.jit(jaxq.quantize, static_argnums=1)(w, spec)
      err = sqnr_db(w, jaxq.dequantize(qa))
      print(f"{gname:24s} {fmt:15s} {err:8.2f} {qa.nbytes / 1024:7.1f} "
            f"{float_bytes / qa.nbytes:9.2f}")
  affine = QuantSpec("uint8", PerChannel(axis=-1), symmetric=False)
  relu_act = jax.nn.relu(jax.random.normal(jax.random.key(1), (256, 512)))
  print(f"\naffine uint8 on ReLU activations: SQNR "
        f"{sqnr_db(relu_act, jaxq.fake_quant(relu_act, affine)):.2f} dB vs "
        f"symmetric int8 "
        f"{sqnr_db(relu_act, jaxq.fake_quant(relu_act, QuantSpec('int8', PerChannel(-1)))):.2f} dB")


if __name__ == "__main__":
  np.set_printoptions(precision=4)
  main()
