"""Adapter checkpoints (jaxq/lora/checkpoint.py): the adapters alone in a
small file, checked against the model on load; and with the base."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
from flax import nnx

import jaxq
from jaxq import lora

QUANTIZED = (jaxq.QArray, jaxq.PackedQArray)


class Tiny(nn.Module):
  width: int = 16

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(self.width, name="up_proj")(x))
    return nn.Dense(32, name="down_proj")(h)


class NnxTiny(nnx.Module):

  def __init__(self, rngs):
    self.up_proj = nnx.Linear(32, 16, rngs=rngs)
    self.down_proj = nnx.Linear(16, 32, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(nnx.relu(self.up_proj(x)))


X = jax.random.normal(jax.random.key(0), (3, 32))


def _trained(lo, variables=None, seed=5):
  """Adapters with B != 0, as after training."""
  new = {p: {n: v + jax.random.normal(jax.random.fold_in(
      jax.random.key(seed), i), v.shape) for n, v in pair.items()}
         for i, (p, pair) in enumerate(lora.adapters(lo, variables).items())}
  return lora.set_adapters(lo, new, variables)


def _linen(rank=4, alpha=8.0, width=16, rules=None, base=lora.NF4_DQ):
  model = Tiny(width)
  variables = model.init(jax.random.key(1), X)
  rules = rules or [lora.LoraRule(r".*_proj", rank=rank, alpha=alpha,
                                  base=base)]
  return lora.attach(model, variables, rules, key=jax.random.key(2))


def test_linen_adapters_alone_round_trip(tmp_path):
  lo = _linen()
  variables = _trained(lo)
  path = tmp_path / "adapters.safetensors"
  size = lora.save_adapters(path, lo, variables)
  assert size == path.stat().st_size
  # The file holds the four adapter matrices and their metadata, no base.
  with safetensors.safe_open(str(path), framework="numpy") as f:
    assert sorted(f.keys()) == ["down_proj/lora_a", "down_proj/lora_b",
                                "up_proj/lora_a", "up_proj/lora_b"]
    meta = json.loads(f.metadata()["jaxq_lora"])
  assert meta["layers"]["up_proj"] == {"rank": 4, "alpha": 8.0}
  assert size < 4 * lora.adapter_bytes(lo, variables)
  # Into a fresh attach of the same model: the same outputs.
  fresh = _linen()
  loaded = lora.load_adapters(path, fresh)
  np.testing.assert_array_equal(fresh.model.apply(loaded, X),
                                lo.model.apply(variables, X))


def test_nnx_adapters_alone_round_trip_and_across_apis(tmp_path):
  rules = [lora.LoraRule(r".*_proj", rank=4, alpha=8.0, base=lora.NF4_DQ)]
  lo = lora.attach(NnxTiny(nnx.Rngs(1)), None, rules, key=jax.random.key(2))
  _trained(lo)
  path = tmp_path / "adapters.safetensors"
  lora.save_adapters(path, lo)
  fresh = lora.attach(NnxTiny(nnx.Rngs(1)), None, rules,
                      key=jax.random.key(3))
  assert not np.allclose(fresh.model(X), lo.model(X))
  lora.load_adapters(path, fresh)
  np.testing.assert_array_equal(fresh.model(X), lo.model(X))
  # The same paths and shapes in linen: the file loads there too.
  linen = _linen()
  loaded = lora.load_adapters(path, linen)
  np.testing.assert_array_equal(
      loaded["params"]["up_proj"]["lora_a"],
      lo.model.up_proj.lora_a[...])


def test_adapters_that_do_not_fit_raise_naming_the_layer(tmp_path):
  lo = _linen()
  path = tmp_path / "adapters.safetensors"
  lora.save_adapters(path, lo)
  with pytest.raises(ValueError, match=r"'up_proj' was saved with rank 4 "
                     r"and alpha 8.0, the model's has rank 2"):
    lora.load_adapters(path, _linen(rank=2))
  with pytest.raises(ValueError, match=r"lora_a of layer 'up_proj'|"
                     r"lora_b of layer 'up_proj' has shape \(4, 16\).*"
                     r"needs \(4, 24\)"):
    lora.load_adapters(path, _linen(width=24))
  only_up = _linen(rules=[lora.LoraRule(r"up_proj", rank=4, alpha=8.0)])
  with pytest.raises(ValueError, match=r"the file's layers \['down_proj'\] "
                     r"are not LoRA layers of the model"):
    lora.load_adapters(path, only_up)
  lora.save_adapters(path, only_up)
  with pytest.raises(ValueError, match=r"the model's LoRA layers "
                     r"\['down_proj'\] have no adapters in the file"):
    lora.load_adapters(path, lo)
  with pytest.raises(FileNotFoundError, match="no file"):
    lora.load_adapters(tmp_path / "missing.safetensors", lo)
  safetensors.numpy.save_file({"w": np.zeros(3, np.float32)},
                              str(tmp_path / "other.safetensors"))
  with pytest.raises(ValueError, match="not a jaxq adapter file"):
    lora.load_adapters(tmp_path / "other.safetensors", lo)


def test_set_adapters_checks_paths_and_shapes():
  lo = _linen()
  with pytest.raises(ValueError, match=r"'head' is not a LoRA layer"):
    lora.set_adapters(lo, {"head": {"lora_a": jnp.zeros((1, 1)),
                                    "lora_b": jnp.zeros((1, 1))}})
  pair = dict(lora.adapters(lo)["up_proj"])
  pair["lora_a"] = jnp.zeros((31, 4))
  with pytest.raises(ValueError, match=r"lora_a of layer 'up_proj' has "
                     r"shape \(31, 4\).*needs \(32, 4\)"):
    lora.set_adapters(lo, {"up_proj": pair})


def test_linen_base_and_adapters_together_with_jaxq_save(tmp_path):
  lo = _linen(width=256)
  variables = _trained(lo)
  report = jaxq.save(tmp_path / "all.safetensors", variables)
  loaded = jaxq.load(tmp_path / "all.safetensors").variables
  kernel = loaded["params"]["up_proj"]["kernel"]
  assert isinstance(kernel, jaxq.QArray) and kernel.spec == lora.NF4_DQ
  np.testing.assert_array_equal(lo.model.apply(loaded, X),
                                lo.model.apply(variables, X))
  # NF4 values packed, DQ scales as one-byte codes: against the same
  # variables with float32 bases, the file saves the bases' bytes but for
  # their manifest entries (under 4 kB).
  float_bases = jax.tree.map(
      lambda a: jaxq.dequantize(a) if isinstance(a, QUANTIZED) else a,
      variables, is_leaf=lambda a: isinstance(a, QUANTIZED))
  floats = jaxq.save(tmp_path / "float.safetensors", float_bases)
  base_float_bytes = 4 * 2 * 32 * 256
  # up (32, 256): one group of 32 rows, 256 scales; down (256, 32): 4 x 32.
  assert lora.base_bytes(lo, variables) == (4096 + 256 + 1) + (4096 + 128 + 1)
  assert (floats.file_bytes - report.file_bytes >
          base_float_bytes - lora.base_bytes(lo, variables) - 4096)
