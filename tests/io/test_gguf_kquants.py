"""Tests for GGUF K-quants and file checks: `jaxq.io.gguf_kquants`,
`jaxq.io.gguf_file` and `jaxq.io.gguf.read`.

K-quant blocks are random bytes with finite float16 super-block scales
(every other byte pattern is a valid block), checked against the ``gguf``
package's own dequantization; files are written with ``gguf.GGUFWriter``.
"""

from __future__ import annotations

import numpy as np
import pytest

import jaxq
from jaxq.io import gguf as jg
from jaxq.io import gguf_file
from jaxq.io.tensors import CheckpointError

gguf = pytest.importorskip("gguf")

ROWS, COLS = 4, 512
_HALVES = {"Q6_K": (208,), "Q4_K": (0, 2), "Q5_K": (0, 2)}


def _kquant(kind: str, seed: int = 0) -> np.ndarray:
  """Random (ROWS, COLS) K-quant bytes with finite d (and dmin)."""
  rng = np.random.default_rng(seed)
  n = ROWS * COLS // 256
  size = {"Q6_K": 210, "Q4_K": 144, "Q5_K": 176}[kind]
  blocks = rng.integers(0, 256, (n, size)).astype(np.uint8)
  for at in _HALVES[kind]:
    half = rng.uniform(0.001, 0.01, n).astype(np.float16)
    blocks[:, at:at + 2] = half.view(np.uint8).reshape(n, 2)
  return blocks.reshape(-1)


def _reference(data: np.ndarray, kind: str) -> np.ndarray:
  return gguf.quants.dequantize(data.reshape(ROWS, -1),
                                gguf.GGMLQuantizationType[kind])


@pytest.mark.parametrize("kind, fmt, group", [
    ("Q6_K", "int8", 16), ("Q4_K", "int4", 32), ("Q5_K", "int8", 32)])
def test_kquants_load_as_one_level_groups(kind, fmt, group):
  data = _kquant(kind)
  qa = jg.from_blocks(data, kind, (ROWS, COLS), "blk.0.ffn_down.weight")
  assert qa.spec.format == fmt
  assert qa.spec.granularity == jaxq.PerGroup(axis=1, size=group)
  assert qa.scale.shape == (ROWS, COLS // group)
  got = np.asarray(jaxq.dequantize(qa))
  ref = _reference(data, kind)
  if kind == "Q6_K":
    # Exact: one float32 product d * scales[i] (exact), times the code.
    assert qa.zero_point is None and np.all(np.asarray(qa.scale) >= 0)
    np.testing.assert_array_equal(got, ref)
  else:
    step = np.repeat(np.asarray(qa.scale), group, axis=1)
    assert np.max(np.abs(got - ref) / np.maximum(step, 1e-30)) < 1e-4
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
  # Served weight-only, it multiplies as its dequantized weight does.
  kernel = jg.to_kernel(qa)
  x = np.random.default_rng(1).normal(size=(3, COLS)).astype(np.float32)
  y = jaxq.dot_general(x, kernel, (((1,), (0,)), ((), ())))
  np.testing.assert_allclose(y, x @ got.T, rtol=1e-5, atol=1e-5)


def test_kquant_sizes_raise_naming_the_tensor():
  data = _kquant("Q4_K")
  with pytest.raises(CheckpointError, match="tensor w: .*truncated"):
    jg.from_blocks(data[:-1], "Q4_K", (ROWS, COLS), "w")
  with pytest.raises(CheckpointError, match="tensor w: .*expected 1680 for "
                     "Q6_K"):
    jg.from_blocks(data, "Q6_K", (ROWS * 2, COLS // 2), "w")
  with pytest.raises(CheckpointError, match="tensor w: .*super-blocks"):
    jg.from_blocks(data, "Q4_K", (ROWS * 4, COLS // 4), "w")


def _write(path, tensors):
  writer = gguf.GGUFWriter(str(path), "llama")
  for name, (array, kind) in tensors.items():
    writer.add_tensor(name, array, raw_dtype=None if kind is None else
                      gguf.GGMLQuantizationType[kind])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.fixture(scope="module")
def gguf_file_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  q2k = np.random.default_rng(3).integers(0, 256, (ROWS, 2 * 84)).astype(
      np.uint8)
  for block in range(2):  # d and dmin: the last 4 bytes of each block
    at = block * 84 + 80
    q2k[:, at:at + 4] = np.array([0.01, 0.002], np.float16).view(np.uint8)
  _write(path, {
      "blk.0.attn_q.weight": (_kquant("Q4_K").reshape(ROWS, -1), "Q4_K"),
      "blk.0.ffn_down.weight": (_kquant("Q6_K").reshape(ROWS, -1), "Q6_K"),
      "blk.0.ffn_up.weight": (q2k, "Q2_K"),
      "blk.0.attn_norm.weight": (np.ones(COLS, np.float32), None),
  })
  return path


def test_read_checks_the_index_and_loads_kquants(gguf_file_path):
  index = gguf_file.read_index(gguf_file_path)
  assert [(t.name, t.kind, t.shape) for t in index] == [
      ("blk.0.attn_q.weight", "Q4_K", (ROWS, COLS)),
      ("blk.0.ffn_down.weight", "Q6_K", (ROWS, COLS)),
      ("blk.0.ffn_up.weight", "Q2_K", (ROWS, COLS)),
      ("blk.0.attn_norm.weight", "F32", (COLS,))]
  reader = jg.read(gguf_file_path)
  tensors = {t.name: t for t in reader.tensors}
  for info in index:  # The index agrees with the gguf package's reader.
    assert tensors[info.name].data_offset == info.offset
    assert tensors[info.name].n_bytes == info.nbytes
  q6 = jg.qarray(tensors["blk.0.ffn_down.weight"])
  np.testing.assert_array_equal(jaxq.dequantize(q6),
                                _reference(_kquant("Q6_K"), "Q6_K"))
  assert jg.qarray(tensors["blk.0.attn_q.weight"]).spec.format == "int4"
  # Q2_K: dequantized and quantized again, loudly; or refused.
  with pytest.warns(jg.RequantizedWarning, match="blk.0.ffn_up.weight: Q2_K"):
    q2 = jg.qarray(tensors["blk.0.ffn_up.weight"])
  assert q2.spec == jg.REQUANTIZE
  dense = gguf.quants.dequantize(tensors["blk.0.ffn_up.weight"].data,
                                 gguf.GGMLQuantizationType.Q2_K)
  step = np.repeat(np.asarray(q2.scale), 32, axis=1)
  assert np.all(np.abs(np.asarray(jaxq.dequantize(q2)) - dense)
                <= 0.5 * step + 1e-7)
  with pytest.raises(CheckpointError, match="blk.0.ffn_up.weight: Q2_K has "
                     "no exact"):
    jg.qarray(tensors["blk.0.ffn_up.weight"], requantize=None)


def test_truncated_and_inconsistent_files_name_the_tensor(gguf_file_path,
                                                          tmp_path):
  data = gguf_file_path.read_bytes()
  index = gguf_file.read_index(gguf_file_path)
  last = max(index, key=lambda t: t.offset)
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[:last.offset + 10])
  with pytest.raises(CheckpointError, match=f"tensor {last.name}: .*"
                     "truncated"):
    jg.read(cut)
  cut.write_bytes(data[:60])
  with pytest.raises(CheckpointError, match="truncated in"):
    jg.read(cut)
  # The Q4_K tensor's first dimension (fastest) changed from 512 to 768:
  # its bytes now run into the next tensor.
  name = b"blk.0.attn_q.weight"
  at = data.index(name) + len(name) + 4
  bad = bytearray(data)
  bad[at:at + 8] = np.uint64(768).tobytes()
  (tmp_path / "bad.gguf").write_bytes(bytes(bad))
  with pytest.raises(CheckpointError, match="tensor blk.0.attn_q.weight: .*"
                     "overlap"):
    jg.read(tmp_path / "bad.gguf")
  bad[at:at + 8] = np.uint64(500).tobytes()  # not whole super-blocks
  (tmp_path / "bad.gguf").write_bytes(bytes(bad))
  with pytest.raises(CheckpointError, match="tensor blk.0.attn_q.weight: .*"
                     "whole Q4_K blocks"):
    jg.read(tmp_path / "bad.gguf")
  with pytest.raises(CheckpointError, match="not a GGUF file"):
    (tmp_path / "x.gguf").write_bytes(b"GGML" + data[4:])
    jg.read(tmp_path / "x.gguf")
