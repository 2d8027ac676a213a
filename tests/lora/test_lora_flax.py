"""LoRA on linen and nnx models (jaxq/flax/lora.py through jaxq.lora):
attach, train the adapters only with optax, dropout, merge, requantize."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxq
from jaxq import lora

QUANTIZED = (jaxq.QArray, jaxq.PackedQArray)

TARGETS = r".*(q|down)_proj"


class LinenBlock(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16, name="q_proj")(x))
    return x + nn.Dense(32, use_bias=False, name="down_proj")(h)


class LinenTiny(nn.Module):

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = LinenBlock(name=f"blocks_{i}")(x)
    return nn.Dense(8, name="head")(x)


class NnxBlock(nnx.Module):

  def __init__(self, rngs):
    self.q_proj = nnx.Linear(32, 16, rngs=rngs)
    self.down_proj = nnx.Linear(16, 32, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return x + self.down_proj(nnx.relu(self.q_proj(x)))


class NnxTiny(nnx.Module):

  def __init__(self, rngs):
    self.blocks = nnx.List([NnxBlock(rngs) for _ in range(2)]) if hasattr(
        nnx, "List") else [NnxBlock(rngs) for _ in range(2)]
    self.head = nnx.Linear(32, 8, rngs=rngs)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.head(x)


X = jax.random.normal(jax.random.key(0), (4, 32))


def _dequantized(tree):
  return jax.tree.map(
      lambda a: jaxq.dequantize(a) if isinstance(a, QUANTIZED) else a,
      tree, is_leaf=lambda a: isinstance(a, QUANTIZED))


def _linen(base=None, rank=4, dropout=0.0):
  model = LinenTiny()
  variables = model.init(jax.random.key(1), X)
  rules = [lora.LoraRule(TARGETS, rank=rank, alpha=8, base=base,
                         dropout=dropout)]
  return model, variables, lora.attach(model, variables, rules,
                                       key=jax.random.key(2))


def _nnx(base=None, rank=4, dropout=0.0):
  model = NnxTiny(nnx.Rngs(1))
  rules = [lora.LoraRule(TARGETS, rank=rank, alpha=8, base=base,
                         dropout=dropout)]
  return model, lora.attach(model, None, rules, key=jax.random.key(2))


def _randomize_b(adapters, key):
  return {p: {"lora_a": pair["lora_a"],
              "lora_b": 0.1 * jax.random.normal(
                  jax.random.fold_in(key, i), pair["lora_b"].shape)}
          for i, (p, pair) in enumerate(adapters.items())}


@pytest.mark.parametrize("base", [None, lora.NF4_DQ])
def test_linen_fresh_adapters_compute_the_base_model(base):
  model, variables, lo = _linen(base)
  assert sorted(lo.layers) == ["blocks_0/down_proj", "blocks_0/q_proj",
                               "blocks_1/down_proj", "blocks_1/q_proj"]
  kernel = lo.variables["params"]["blocks_0"]["q_proj"]["kernel"]
  # NF4 codes held two per byte: (in, out) -> (in, out / 2) uint8.
  assert isinstance(kernel, jaxq.PackedQArray) == (base is not None)
  if base is not None:
    assert kernel.packed.dtype == jnp.uint8
    assert kernel.packed.shape[-1] * 2 == kernel.shape[-1]
  # The caller's variables are untouched, the head is not a LoRA layer.
  assert not isinstance(variables["params"]["blocks_0"]["q_proj"]["kernel"],
                        jaxq.QArray)
  assert "lora_a" not in lo.variables["params"]["head"]
  y = lo.model.apply(lo.variables, X)
  frozen = lora.partition(lo.variables["params"])[1]
  np.testing.assert_allclose(
      y, model.apply({"params": _dequantized(frozen)}, X), rtol=1e-6,
      atol=1e-6)


@pytest.mark.parametrize("base", [None, lora.INT4_G64])
def test_linen_optax_trains_the_adapters_only(base):
  _, _, lo = _linen(base)
  adapters, frozen = lora.partition(lo.variables["params"])
  assert {k for path in jax.tree_util.tree_leaves_with_path(adapters)
          for k in [path[0][-1].key]} == {"lora_a", "lora_b"}
  tx = optax.adam(1e-2)
  opt_state = tx.init(adapters)
  # The optimizer state holds the adapters' moments, nothing of the base.
  adapter_size = sum(x.size for x in jax.tree.leaves(adapters))
  assert sum(x.size for x in jax.tree.leaves(opt_state)) == 2 * adapter_size + 1
  target = jnp.ones((4, 8))

  def loss(t, f):
    y = lo.model.apply({"params": lora.combine(t, f)}, X)
    return jnp.mean((y - target) ** 2)

  # Through the whole tree: the bases' (and head's) gradient is exactly 0.
  params = lo.variables["params"]
  full = jax.grad(lambda p: loss(*lora.partition(p)), allow_int=True)(params)
  base_grad = full["blocks_0"]["q_proj"]["kernel"]
  base_grad = base_grad.scale if base is not None else base_grad
  assert not jnp.any(base_grad)
  assert jnp.any(full["blocks_0"]["q_proj"]["lora_a"]) or jnp.any(
      full["blocks_0"]["q_proj"]["lora_b"])

  @jax.jit  # One program instead of one per eager op of each step.
  def step(adapters, opt_state, frozen):
    value, grads = jax.value_and_grad(loss)(adapters, frozen)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, value

  losses = []
  for _ in range(5):
    adapters, opt_state, value = step(adapters, opt_state, frozen)
    losses.append(float(value))
  assert losses[-1] < losses[0]
  # trainable_mask labels the full tree for optax.multi_transform: the
  # frozen side set to zero (optax.masked alone would pass its raw
  # gradients through as updates). A float tree only: integer base values
  # take float0 gradients, which optax cannot add (partition instead).
  if base is not None:
    return
  mask = lora.trainable_mask(params)
  tx = optax.multi_transform({True: optax.sgd(1.0),
                              False: optax.set_to_zero()}, mask)
  updates, _ = tx.update(full, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["head"]["kernel"],
                                params["head"]["kernel"])
  assert not np.array_equal(new["blocks_0"]["q_proj"]["lora_b"],
                            params["blocks_0"]["q_proj"]["lora_b"])


def test_linen_dropout_only_with_a_dropout_rng():
  _, _, lo = _linen(dropout=0.5)
  variables = lora.set_adapters(
      lo, _randomize_b(lora.adapters(lo), jax.random.key(3)))
  plain = lo.model.apply(variables, X)
  np.testing.assert_array_equal(plain, lo.model.apply(variables, X))
  dropped = lo.model.apply(variables, X, rngs={"dropout": jax.random.key(4)})
  assert not np.allclose(dropped, plain)


@pytest.mark.parametrize("base", [None, lora.NF4_DQ])
def test_linen_merge_equals_base_plus_adapters_then_requantizes(base):
  model, _, lo = _linen(base)
  variables = lora.set_adapters(
      lo, _randomize_b(lora.adapters(lo), jax.random.key(3)))
  y = lo.model.apply(variables, X)
  merged = lora.merge(lo, variables)
  assert "lora_a" not in merged["params"]["blocks_0"]["q_proj"]
  np.testing.assert_allclose(model.apply(merged, X), y, rtol=1e-5, atol=1e-5)
  # Quantize the merged kernels again (RTN, serve mode).
  serve = jaxq.quantize_model(model, [jaxq.Rule(TARGETS, weight=lora.NF4)],
                              mode="serve")
  requantized = serve.apply(merged, X)
  assert requantized.shape == y.shape and not np.array_equal(requantized, y)


@pytest.mark.parametrize("base", [None, lora.NF4_DQ])
def test_nnx_optimizer_and_grad_see_only_the_adapters(base):
  original, lo = _nnx(base)
  model = lo.model
  assert sorted(lo.layers) == ["blocks/0/down_proj", "blocks/0/q_proj",
                               "blocks/1/down_proj", "blocks/1/q_proj"]
  assert isinstance(original.blocks[0].q_proj, nnx.Linear)  # untouched
  assert isinstance(model.head, nnx.Linear)
  base_before = model.blocks[0].q_proj.base.get_value()
  head_before = model.head.kernel[...]
  dequantized = _dequantized(base_before)
  np.testing.assert_allclose(
      model(X), original(X) if base is None else model(X), rtol=1e-6)
  h = model.blocks[0].q_proj(X)  # B = 0: the base layer's output
  np.testing.assert_allclose(
      h, X @ dequantized + model.blocks[0].q_proj.bias[...], rtol=1e-6,
      atol=1e-6)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=lora.LoraParam)
  opt_leaves = jax.tree.leaves(nnx.state(optimizer))
  adapter_size = sum(x.size for x in jax.tree.leaves(lora.adapters(lo)))
  # Adam's two moments of each adapter, its count and the optimizer's step.
  assert sum(x.size for x in opt_leaves) == 2 * adapter_size + 2
  loss = lambda m: jnp.mean((m(X) - 1.0) ** 2)
  diff = nnx.DiffState(0, lora.LoraParam)
  losses = []
  for _ in range(5):
    value, grads = nnx.value_and_grad(loss, argnums=diff)(model)
    assert {type(v) for v in jax.tree.leaves(
        nnx.state(grads), is_leaf=lambda v: isinstance(v, nnx.Variable))
            } == {lora.LoraParam}
    optimizer.update(model, grads)
    losses.append(float(value))
  assert losses[-1] < losses[0]
  after = model.blocks[0].q_proj.base.get_value()
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                   after, base_before))
  np.testing.assert_array_equal(model.head.kernel[...], head_before)
  # Merge: nnx.Linear layers back, computing base + adapters.
  merged = lora.merge(lo)
  assert isinstance(merged.blocks[0].q_proj, nnx.Linear)
  np.testing.assert_allclose(merged(X), model(X), rtol=1e-5, atol=1e-5)


def test_nnx_dropout_follows_train_and_eval():
  _, lo = _nnx(dropout=0.5)
  lora.set_adapters(lo, _randomize_b(lora.adapters(lo), jax.random.key(3)))
  model = lo.model
  model.eval()
  np.testing.assert_array_equal(model(X), model(X))
  evaluated = model(X)
  model.train()
  assert not np.allclose(model(X), evaluated)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_attach_errors_name_the_rule_and_layer(api):
  make = (lambda rules: lora.attach(LinenTiny(), LinenTiny().init(
      jax.random.key(1), X), rules, key=jax.random.key(0))) if api == "linen" \
      else (lambda rules: lora.attach(NnxTiny(nnx.Rngs(1)), None, rules,
                                      key=jax.random.key(0)))
  with pytest.raises(ValueError, match=r"LoraRule\('.*gate_proj'\) matches "
                     r"no layer"):
    make([lora.LoraRule(r".*q_proj"), lora.LoraRule(r".*gate_proj")])
  with pytest.raises(ValueError, match=r"rank 17 .*q_proj' \(kernel 32 x "
                     r"16\)"):
    make([lora.LoraRule(r".*q_proj", rank=17)])
  with pytest.raises(TypeError, match="linen or flax.nnx"):
    lora.attach(object(), None, [lora.LoraRule(".*")], key=jax.random.key(0))
