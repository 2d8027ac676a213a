"""Tests for `jaxq.io.exported`: a served model through ``jax.export``,
lowered for cpu, cuda and tpu, serialized, reloaded and run on this CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
from jaxq.io import exported as je

pytest.importorskip("flatbuffers")  # jax.export's serialization needs it


def test_exported_program_reloads_and_equals_the_live_model(quantized,
                                                             tmp_path):
  q = quantized
  program = je.export(q.serve.apply, q.serving, q.x,
                      platforms=("cpu", "cuda", "tpu"))
  assert program.platforms == ("cpu", "cuda", "tpu")
  text = program.mlir_module()
  # The int8 x int8 layer (w8a8) stays an integer dot in the program.
  assert "xi8>" in text and "-> tensor<4x256xi32>" in text
  size = je.save(tmp_path / "mlp.jaxexport", program)
  assert size == (tmp_path / "mlp.jaxexport").stat().st_size
  loaded = je.load(tmp_path / "mlp.jaxexport")
  got = je.call(loaded, q.serving, q.x)
  live = jax.jit(q.serve.apply)(q.serving, q.x)
  np.testing.assert_array_equal(got, live)  # Same program, same compiler.
  np.testing.assert_allclose(got, q.serve.apply(q.serving, q.x), rtol=1e-5,
                             atol=1e-5)
  # Other weights of the same tree run through the same program.
  halved = jax.tree.map(lambda a: a, q.serving)
  halved["params"]["head"]["kernel"] = q.serving["params"]["head"][
      "kernel"] * 0.5
  np.testing.assert_array_equal(je.call(loaded, halved, q.x),
                                jax.jit(q.serve.apply)(halved, q.x))


def test_baked_weights_and_errors(quantized, tmp_path):
  q = quantized
  baked = je.export(q.serve.apply, q.serving, q.x, platforms="cpu",
                    bake_weights=True)
  je.save(tmp_path / "baked.jaxexport", baked)
  got = je.call(je.load(tmp_path / "baked.jaxexport"), None, q.x)
  np.testing.assert_array_equal(got, jax.jit(q.serve.apply)(q.serving, q.x))
  program = je.export(q.serve.apply, q.serving, q.x, platforms=["cpu"])
  with pytest.raises(ValueError, match="weight arrays, the variables have"):
    je.call(program, {"params": {"head": q.serving["params"]["head"]}}, q.x)
  with pytest.raises(ValueError, match=r"unknown platform.*'gpu'"):
    je.export(q.serve.apply, q.serving, q.x, platforms=("cpu", "gpu"))


def test_nnx_served_model(tmp_path):
  """An nnx model: its split state is the weights argument."""
  class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.up = nnx.Linear(64, 128, rngs=rngs)
      self.down = nnx.Linear(128, 8, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
      return self.down(jax.nn.relu(self.up(x)))

  model = MLP(nnx.Rngs(0))
  rules = [jaxq.Rule(".*", weight=jaxq.QuantSpec("int4", jaxq.PerGroup(
      axis=0, size=32)), act=None)]
  serve = jaxq.quantize_model(model, rules, "serve")
  state, _ = jaxq.convert(serve, nnx.state(model))
  nnx.update(serve, state)
  graph, state = nnx.split(serve)
  assert any(leaf.dtype == jnp.int4 for leaf in jax.tree.leaves(state))
  apply = lambda s, x: nnx.merge(graph, s)(x)
  x = jax.random.normal(jax.random.key(1), (2, 64))
  program = je.export(apply, state, x, platforms=("cpu", "cuda", "tpu"))
  je.save(tmp_path / "nnx.jaxexport", program)
  got = je.call(je.load(tmp_path / "nnx.jaxexport"), state, x)
  np.testing.assert_array_equal(got, jax.jit(apply)(state, x))
