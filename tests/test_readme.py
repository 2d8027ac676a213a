"""The README's Python snippets run as written (on a tiny linen model)."""

from __future__ import annotations

import pathlib
import re

import flax.linen as nn
import jax
import numpy as np

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10, name="head")(nn.relu(nn.Dense(64)(x)))


def test_readme_snippets_run(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # the snippets save a checkpoint
  blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(),
                                  re.S)
            if "test_readme does not" not in b.split("\n", 1)[0]]
  assert len(blocks) >= 3
  model = _MLP()
  x = jax.random.normal(jax.random.key(0), (8, 256))
  namespace = dict(
      model=model, x=x, variables=model.init(jax.random.key(1), x),
      batches=[x, 2 * x], w=jax.random.normal(jax.random.key(2), (256, 128)),
      a=jax.random.normal(jax.random.key(3), (8, 256)))
  exec(blocks[0], namespace)  # pylint: disable=exec-used
  # The quickstart's integer model reproduces its fake-quant model.
  np.testing.assert_allclose(namespace["y_int8"], namespace["y"], atol=1e-5)
  for block in blocks[1:]:
    exec(block, namespace)  # pylint: disable=exec-used
  assert (tmp_path / "model.safetensors").stat().st_size > 0
  assert namespace["out"].shape == (8, 128)
