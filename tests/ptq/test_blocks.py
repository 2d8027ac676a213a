"""Tests of the block-by-block walk of the PTQ algorithms (jaxq/ptq/blocks.py).

``blocks=True`` (the default) must give what the whole-model path
(``blocks=False``) gives, for GPTQ, AWQ and SmoothQuant, on linen and nnx
decoders whose blocks take extra arguments (positions, keyword scales),
with layers outside the blocks, and when something between blocks breaks
the chain; each block runs alone instead of the whole model.
"""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
from jaxq import PerChannel, PerTensor, QuantSpec
from jaxq.ptq import blocks as ptq_blocks
from jaxq.flax import Batch
from jaxq.flax import linen_adapter
from jaxq.flax import nnx_adapter

# The MLP's hidden width is the model's: every kernel in the blocks is
# (D, D), so each algorithm compiles its per-layer programs for one shape.
D, H, L = 8, 8, 2
RULES = (jaxq.Rule(".*", weight=QuantSpec("int4", PerChannel(-1)),
                   act=QuantSpec("int8", PerTensor(), dynamic=False)),)
FOLD = {f"layers_{i}/{n}": f"layers_{i}/norm" for i in range(L)
        for n in ("q", "k", "v")}


def _attend(q, k, v, pos):
  scores = jnp.einsum("btd,bsd->bts", q * pos, k)
  return jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores, axis=-1), v)


class Block(nn.Module):
  """q, k and v on one normed input, attention with positions, o, an MLP."""

  @nn.compact
  def __call__(self, x, pos, *, scale=1.0):
    h = nn.RMSNorm(name="norm")(x)
    q, k = nn.Dense(D, name="q")(h), nn.Dense(D, name="k")(h)
    v = nn.Dense(D, name="v")(h)
    x = x + nn.Dense(D, name="o")(_attend(q, k, v, pos))
    return x + scale * nn.Dense(D, name="down")(
        nn.silu(nn.Dense(H, name="up")(x)))


class Decoder(nn.Module):
  """inp -> layers_0 .. layers_<L-1> (x, pos, scale=) -> head; ``between``
  puts an op between the blocks (no chain: each block's arguments come
  from a whole-model pass)."""

  between: bool = False

  @nn.compact
  def __call__(self, x):
    pos = jnp.cos(jnp.arange(x.shape[1]))[None, :, None]
    x = nn.Dense(D, name="inp")(x)
    for i in range(L):
      x = Block(name=f"layers_{i}")(x, pos, scale=0.5)
      if self.between:
        x = 2.0 * x
    return nn.Dense(4, name="head")(x)


class NnxBlock(nnx.Module):

  def __init__(self, rngs):
    self.norm = nnx.RMSNorm(D, rngs=rngs)
    self.q = nnx.Linear(D, D, rngs=rngs)
    self.k = nnx.Linear(D, D, rngs=rngs)
    self.v = nnx.Linear(D, D, rngs=rngs)
    self.o = nnx.Linear(D, D, rngs=rngs)
    self.up = nnx.Linear(D, H, rngs=rngs)
    self.down = nnx.Linear(H, D, rngs=rngs)

  def __call__(self, x, pos, *, scale=1.0):
    h = self.norm(x)
    x = x + self.o(_attend(self.q(h), self.k(h), self.v(h), pos))
    return x + scale * self.down(nnx.silu(self.up(x)))


class NnxDecoder(nnx.Module):

  def __init__(self, rngs):
    self.inp = nnx.Linear(D, D, rngs=rngs)
    self.layers = nnx.List([NnxBlock(rngs) for _ in range(L)])
    self.head = nnx.Linear(D, 4, rngs=rngs)

  def __call__(self, x):
    pos = jnp.cos(jnp.arange(x.shape[1]))[None, :, None]
    x = self.inp(x)
    for block in self.layers:
      x = block(x, pos, scale=0.5)
    return self.head(x)


def _x(seed=0):
  outliers = jnp.ones(D).at[2].set(10.0)
  return jax.random.normal(jax.random.key(seed), (2, 5, D)) * outliers


BATCHES = (Batch((_x(),), {}, jnp.ones((2, 5), bool).at[1, 3:].set(False)),
           Batch((0.5 * _x(1),), {}, None))


@functools.lru_cache(maxsize=None)
def _linen(between: bool = False):
  model = Decoder(between)
  variables = model.init(jax.random.key(1), _x())
  cal = jaxq.quantize_model(model, RULES, mode="calibrate")
  jax.eval_shape(lambda v: cal.apply(v, _x(), mutable=["quant_stats"]),
                 variables)
  return cal, variables


def _run(algorithm, cal, variables, blocks, fold=FOLD):
  batches = list(BATCHES)
  if algorithm == "gptq":
    return jaxq.gptq(cal, variables, batches, blocks=blocks, progress=False)
  if algorithm == "awq":
    return jaxq.awq(cal, variables, batches, blocks=blocks, fold_into=fold,
                    num_exponents=3, clip_ratios=2, progress=False)
  return jaxq.smoothquant(cal, variables, batches, alpha=0.5, blocks=blocks,
                          fold_into=fold, act_ranges=True, progress=False)


def _assert_same(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
  for (key, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5,
                               atol=1e-6, err_msg=jax.tree_util.keystr(key))


def _counting(monkeypatch, cls):
  """Counts the blocks run alone through ``cls.run_module``."""
  ran = []
  original = cls.run_module

  def run_module(self, path, call, paths):
    ran.append(path)
    return original(self, path, call, paths)

  monkeypatch.setattr(cls, "run_module", run_module)
  return ran


@pytest.mark.parametrize("algorithm", ["gptq", "awq", "smoothquant"])
def test_linen_blocks_equal_the_whole_model_path(algorithm, monkeypatch):
  cal, variables = _linen()
  whole = _run(algorithm, cal, variables, blocks=False)
  ran = _counting(monkeypatch, linen_adapter.LinenAdapter)
  walked = _run(algorithm, cal, variables, blocks=True)
  assert ran == [f"layers_{i}" for i in range(L)]
  _assert_same(walked, whole)
  # The algorithm reached the blocks and the layers outside them.
  assert not all(jax.tree.leaves(jax.tree.map(
      np.allclose, walked["params"]["layers_1"],
      variables["params"]["layers_1"])))
  assert {"inp", "layers_0", "layers_1", "head"} <= set(walked["quant_fixed"])


@pytest.mark.parametrize("algorithm", ["gptq", "smoothquant"])
def test_nnx_blocks_equal_the_whole_model_path(algorithm, monkeypatch):
  model = NnxDecoder(nnx.Rngs(0))
  cal = jaxq.quantize_model(model, RULES, mode="calibrate")
  fold = {f"layers/{i}/{n}": f"layers/{i}/norm" for i in range(L)
          for n in ("q", "k", "v")}
  whole = _run(algorithm, cal, None, blocks=False, fold=fold)
  ran = _counting(monkeypatch, nnx_adapter.NnxAdapter)
  walked = _run(algorithm, cal, None, blocks=True, fold=fold)
  assert ran == [f"layers/{i}" for i in range(L)]
  _assert_same(walked, whole)


def test_unchained_blocks_take_their_arguments_from_the_model():
  # An op between blocks: block 1's input is not block 0's output, so each
  # block's arguments come from a whole-model pass; the result is the same.
  cal, variables = _linen(between=True)
  adapter = jaxq.flax.adapt(cal, variables)
  targets = [adapter.layers()[p] for p in adapter.ordered_layers(BATCHES[0])]
  plan = ptq_blocks.plan(adapter, BATCHES, targets, True, "test")
  assert [u.linked for u in plan.units if u.block] == [False] * L
  assert plan.chains == L
  _assert_same(_run("smoothquant", cal, variables, blocks=True),
               _run("smoothquant", cal, variables, blocks=False))


def test_plan_links_blocks_through_the_trace():
  cal, variables = _linen()
  adapter = jaxq.flax.adapt(cal, variables)
  targets = [adapter.layers()[p] for p in adapter.ordered_layers(BATCHES[0])]
  plan = ptq_blocks.plan(adapter, BATCHES, targets, True, "test")
  assert [(u.block, u.linked) for u in plan.units] == [
      (None, False), ("layers_0", False), ("layers_1", True), (None, False)]
  assert [i.path for i in plan.units[0].layers] == ["inp"]
  # Block 1 takes block 0's output and block 0's positions argument.
  sources = plan.units[2].call.sources
  assert [(s.path, s.kind, s.index) for s in sources] == [
      ("layers_0", "out", 0), ("layers_0", "arg", 1)]
  assert plan.chains == 1


def test_block_paths():
  linen = ["inp", "layers_0/attn/q", "layers_0/mlp/up", "layers_1/attn/q",
           "Dense_0", "Dense_1", "Encoder_0/Dense_0", "head"]
  assert ptq_blocks.block_paths(linen, True) == {
      "layers_0/attn/q": "layers_0", "layers_0/mlp/up": "layers_0",
      "layers_1/attn/q": "layers_1"}
  nnx_paths = ["model/layers/0/q", "model/layers/1/q", "model/head"]
  assert ptq_blocks.block_paths(nnx_paths, True) == {
      "model/layers/0/q": "model/layers/0",
      "model/layers/1/q": "model/layers/1"}
  assert ptq_blocks.block_paths(linen, r"layers_\d+/attn") == {
      "layers_0/attn/q": "layers_0/attn", "layers_1/attn/q": "layers_1/attn"}
  assert ptq_blocks.block_paths(["Dense_0", "Dense_1"], True) == {}


def test_bad_blocks_argument_names_the_problem():
  cal, variables = _linen()
  with pytest.raises(ValueError,
                     match=r"blocks='nothing_.*' matches no module"):
    jaxq.gptq(cal, variables, list(BATCHES), blocks=r"nothing_\d+",
              progress=False)
  with pytest.raises(ValueError, match="blocks must be True, False or a"):
    jaxq.gptq(cal, variables, list(BATCHES), blocks=3, progress=False)


class _Twice(nn.Module):
  """One block called twice: no block-by-block walk."""

  @nn.compact
  def __call__(self, x):
    pos = jnp.ones((1, x.shape[1], 1))
    first, second = Block(name="layers_0"), Block(name="layers_1")
    return second(first(first(x, pos), pos), pos)


def test_block_called_twice_warns_and_takes_the_whole_model_path():
  model = _Twice()
  variables = model.init(jax.random.key(0), _x())
  cal = jaxq.quantize_model(model, RULES, mode="calibrate")
  jax.eval_shape(lambda v: cal.apply(v, _x(), mutable=["quant_stats"]),
                 variables)
  with pytest.warns(UserWarning, match=r"'layers_0' is called 2 times"):
    out = jaxq.smoothquant(cal, variables, [_x()], progress=False)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _assert_same(out, jaxq.smoothquant(cal, variables, [_x()], blocks=False,
                                       progress=False))
