"""Tests for `jaxq.save` / `jaxq.load` (`jaxq.io.checkpoint`).

Round trips are compared on raw bits (every array viewed as uint8), plus
dtype, shape, spec and tree structure. The on-disk layout is checked with an
independent reader: the safetensors container is parsed here from its
definition (8-byte little-endian header length, JSON header, data), and the
int4 packing against hand-written bytes. Corrupt files are made by flipping
bits and by rewriting the manifest with a correct digest, so that the checks
behind the digest (version, spec against arrays) are reached too.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from flax import nnx

import jaxq
from jaxq import MX, PerBlock, PerChannel, PerGroup, PerTensor, PerToken
from jaxq import QuantSpec
from jaxq.io.checkpoint import CheckpointError, CheckpointNotFoundError


def _bits(x: Any) -> np.ndarray:
  return np.asarray(x).reshape(-1).view(np.uint8)


def _assert_same(saved: Any, loaded: Any) -> None:
  """Same tree (keys, order, None leaves), same bits, dtypes and specs."""
  assert jax.tree.structure(saved) == jax.tree.structure(loaded)
  flat_saved = jax.tree_util.tree_flatten_with_path(saved)[0]
  flat_loaded = jax.tree_util.tree_flatten_with_path(loaded)[0]
  for (path, a), (path_b, b) in zip(flat_saved, flat_loaded):
    assert path == path_b
    assert isinstance(b, type(a) if isinstance(a, np.ndarray)
                      else jax.Array), path
    assert np.dtype(a.dtype) == np.dtype(b.dtype), path
    assert a.shape == b.shape, path
    np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=str(path))
  # Key order is part of "exactly": compare the dicts' key sequences.
  def keys(tree):
    if isinstance(tree, dict):
      return [(k, keys(v)) for k, v in tree.items()]
    return None
  assert keys(saved) == keys(loaded)


def _round_trip(tmp_path, variables, rules=None, **kwargs):
  path = tmp_path / "model.safetensors"
  report = jaxq.save(path, variables, rules, **kwargs)
  return report, jaxq.load(path)


def _weight(shape, seed=0, dtype=jnp.float32):
  x = np.random.default_rng(seed).standard_normal(shape, np.float32)
  return jnp.asarray(x, dtype)


# One compilation per spec and shape (eager quantize compiles op by op).
_quantize = jax.jit(jaxq.quantize, static_argnums=1)


# ------------------------------------------------------------- round trips

CASES = {
    "int8-tensor": ((8, 6), QuantSpec("int8")),
    "int8-channel": ((8, 6), QuantSpec("int8", PerChannel(-1))),
    "int8-channel-tuple": ((3, 4, 5), QuantSpec("int8", PerChannel((1, 2)))),
    "int8-token": ((2, 3, 8), QuantSpec("int8", PerToken())),
    "int8-token-tuple": ((2, 3, 4, 8),
                         QuantSpec("int8", PerToken(contraction_axis=(2, 3)))),
    "int8-group": ((16, 6), QuantSpec("int8", PerGroup(0, 4))),
    "int8-block": ((8, 12), QuantSpec("int8", PerBlock((4, 4)))),
    # Ragged: the last group (block) is shorter; scales ceil(d / size).
    "int4-ragged-group": ((20, 3), QuantSpec("int4", PerGroup(0, 8))),
    "int8-ragged-block": ((10, 7), QuantSpec("int8", PerBlock((4, 3)))),
    "int8-affine": ((8, 6), QuantSpec("int8", PerChannel(0), symmetric=False)),
    "uint8-affine": ((8, 6), QuantSpec("uint8", PerGroup(-1, 3),
                                       symmetric=False)),
    "int4-odd": ((5, 7), QuantSpec("int4", PerChannel(-1))),
    "int4-full-group": ((9, 8), QuantSpec("int4", PerGroup(-1, 4),
                                          narrow_range=False)),
    "int4-single": ((1,), QuantSpec("int4")),
    "e4m3-channel": ((8, 6), QuantSpec("float8_e4m3fn", PerChannel(-1))),
    "e5m2-tensor": ((7, 3), QuantSpec("float8_e5m2")),
    "e2m1-odd": ((5, 7), QuantSpec("float4_e2m1fn", PerChannel(-1))),
    "e2m1-mx": ((3, 32), QuantSpec("float4_e2m1fn", MX(-1))),
    "e4m3-mx": ((64, 4), QuantSpec("float8_e4m3fn", MX(0))),
    "int8-mx": ((2, 64), QuantSpec("int8", MX(-1, 32))),
    "int8-stochastic-static": ((4, 4), QuantSpec(
        "int8", calibration="percentile", percentile=99.5,
        rounding="stochastic", ste="identity", dynamic=False)),
}


def _random_qarray(shape, spec, dtype, seed=0) -> jaxq.QArray:
  """A QArray of random bits: every code of the format, NaNs included."""
  rng = np.random.default_rng(seed)
  def random_bits(shape, dtype):
    dtype = np.dtype(dtype)
    high = 16 if dtype in (np.dtype(ml_dtypes.int4),
                           np.dtype(ml_dtypes.float4_e2m1fn)) else 256
    codes = rng.integers(0, high, (*shape, dtype.itemsize), dtype=np.uint8)
    return jnp.asarray(codes.view(dtype).reshape(shape))
  scale_shape = jaxq.granularity.scale_shape(spec.granularity, shape)
  scale_dtype = ml_dtypes.float8_e8m0fnu if spec.is_mx else np.float32
  zero_point = None if spec.symmetric else jnp.asarray(
      rng.integers(-2**31, 2**31, scale_shape, dtype=np.int32))
  return jaxq.QArray(values=random_bits(shape, spec.fmt.dtype),
                     scale=random_bits(scale_shape, scale_dtype),
                     zero_point=zero_point, spec=spec, dtype=np.dtype(dtype))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_qarray_round_trip_is_bit_exact(tmp_path, case, dtype):
  shape, spec = CASES[case]
  qa = _random_qarray(shape, spec, dtype)
  bias = _weight(shape[-1:], dtype=dtype)
  variables = {"params": {"layer": {"kernel": qa, "bias": bias}}}
  _, loaded = _round_trip(tmp_path, variables)
  out = loaded.variables["params"]["layer"]["kernel"]
  assert isinstance(out, jaxq.QArray)
  assert out.spec == spec
  assert out.dtype == np.dtype(dtype)
  assert (out.zero_point is None) == spec.symmetric
  _assert_same(variables, loaded.variables)


@pytest.mark.parametrize("case", ["int4-odd", "uint8-affine", "e2m1-mx"])
def test_loaded_qarray_dequantizes_like_the_original(tmp_path, case):
  shape, spec = CASES[case]
  qa = _quantize(_weight(shape) * 3.0, spec)
  _, loaded = _round_trip(tmp_path, {"w": qa})
  np.testing.assert_array_equal(_bits(jaxq.dequantize(loaded.variables["w"])),
                                _bits(jaxq.dequantize(qa)))


def test_every_4bit_code_survives_packing(tmp_path):
  # 17 elements: every code once, plus one, so the last byte is half full.
  int4 = np.arange(-8, 9).clip(-8, 7).astype(ml_dtypes.int4)
  uint4 = np.arange(17).clip(0, 15).astype(ml_dtypes.uint4)
  fp4 = np.concatenate([np.arange(16, dtype=np.uint8),
                        np.array([7], np.uint8)]).view(ml_dtypes.float4_e2m1fn)
  variables = {"int4": jnp.asarray(int4), "uint4": jnp.asarray(uint4),
               "fp4": jnp.asarray(fp4)}
  _, loaded = _round_trip(tmp_path, variables)
  _assert_same(variables, loaded.variables)


def _read_container(path) -> tuple[dict[str, Any], bytes]:
  """The JSON header and data section of a safetensors file, by hand."""
  data = open(path, "rb").read()
  (length,) = struct.unpack("<Q", data[:8])
  return json.loads(data[8:8 + length]), data[8 + length:]


def test_int4_packing_layout(tmp_path):
  path = tmp_path / "packed.safetensors"
  values = jnp.asarray(np.array([1, -1, 7, -8, 3], ml_dtypes.int4))
  jaxq.save(path, {"w": values})
  header, data = _read_container(path)
  entry = header["w"]
  assert entry["dtype"] == "U8" and entry["shape"] == [3]
  start, end = entry["data_offsets"]
  # Element 2i in the low nibble, 2i + 1 in the high one, two's complement.
  assert list(data[start:end]) == [0xF1, 0x87, 0x03]


def test_plain_float_variables(tmp_path):
  special = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 1e-45],
                     np.float32)
  payload_nan = np.array([0x7FC00001, 0xFFBFFFFF], np.uint32).view(np.float32)
  variables = {
      "params": {
          "f32": jnp.asarray(np.concatenate([special, payload_nan])),
          "bf16": _weight((3, 5), dtype=jnp.bfloat16),
          "f16": _weight((4,), dtype=jnp.float16),
      },
      "batch_stats": {"mean": jnp.zeros((0, 3)), "count": jnp.int32(7)},
      "flags": {"on": jnp.array([True, False]), "bytes": jnp.arange(
          5, dtype=jnp.uint8), "i64": np.arange(3, dtype=np.int64)},
  }
  report, loaded = _round_trip(tmp_path, variables)
  _assert_same(variables, loaded.variables)
  assert report.num_qarrays == 0 and report.num_arrays == 8
  assert loaded.rules is None and loaded.metadata == {}


def test_fp8_and_e8m0_plain_arrays(tmp_path):
  codes = np.arange(256, dtype=np.uint8)
  variables = {name: jnp.asarray(codes.view(dtype)) for name, dtype in (
      ("e4m3", ml_dtypes.float8_e4m3fn), ("e5m2", ml_dtypes.float8_e5m2),
      ("e8m0", ml_dtypes.float8_e8m0fnu))}
  _, loaded = _round_trip(tmp_path, variables)
  _assert_same(variables, loaded.variables)


def test_dtypes_safetensors_lacks_are_stored_as_bits(tmp_path):
  codes = np.arange(256, dtype=np.uint8)
  variables = {"e3m4": codes.view(ml_dtypes.float8_e3m4),
               "b11": codes.view(ml_dtypes.float8_e4m3b11fnuz),
               "int2": np.array([-2, -1, 0, 1] * 3, ml_dtypes.int2)}
  _, loaded = _round_trip(tmp_path, variables)
  _assert_same(variables, loaded.variables)
  manifest = jaxq.io.checkpoint.read_manifest(tmp_path / "model.safetensors")
  assert {e["encoding"] for e in manifest["tensors"].values()} == {"bits"}
  header, _ = _read_container(tmp_path / "model.safetensors")
  assert header["e3m4"]["dtype"] == "U8"


def test_mixed_tree_keeps_structure(tmp_path):
  qa = _quantize(_weight((8, 4)), QuantSpec("int8", PerChannel(-1)))
  variables = {
      "params": {"layers": {1: {"kernel": qa}, 0: {"kernel": _weight((4,))}},
                 "empty": {}, "head": {"kernel": _weight((4, 2)),
                                       "scale": None}},
      "cache": {},
  }
  _, loaded = _round_trip(tmp_path, variables)
  _assert_same(variables, loaded.variables)
  assert list(loaded.variables["params"]["layers"]) == [1, 0]
  assert loaded.variables["params"]["empty"] == {}
  assert loaded.variables["params"]["head"]["scale"] is None


def test_loaded_qarrays_work_under_jit(tmp_path):
  x = _weight((16, 8))
  spec = QuantSpec("int4", PerGroup(0, 4))
  variables = {"params": {"w": _quantize(x, spec)}}
  _, loaded = _round_trip(tmp_path, variables)
  qa = loaded.variables["params"]["w"]
  assert qa.values.dtype == jnp.int4 and qa.scale.dtype == jnp.float32
  forward = jax.jit(lambda v, a: a @ jaxq.dequantize(v["params"]["w"]))
  a = _weight((3, 16), seed=2)
  np.testing.assert_array_equal(
      forward(loaded.variables, a), forward(variables, a))


def test_nnx_state_round_trip(tmp_path):
  model = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
  model.kernel.set_value(_quantize(model.kernel[...],
                                   QuantSpec("int8", PerChannel(-1))))
  state = nnx.state(model)
  _, loaded = _round_trip(tmp_path, state)
  _assert_same(nnx.to_pure_dict(state), loaded.variables)
  fresh = nnx.state(nnx.Linear(6, 4, rngs=nnx.Rngs(1)))
  nnx.replace_by_pure_dict(fresh, loaded.variables)
  np.testing.assert_array_equal(_bits(fresh["bias"].get_value()),
                                _bits(model.bias[...]))


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(4, name="head")(x)


def test_linen_serve_from_loaded_variables_and_rules(tmp_path):
  model, x = _MLP(), _weight((3, 8))
  variables = model.init(jax.random.key(0), x)
  rules = [jaxq.Rule(r".*head", skip=True),
           jaxq.Rule(r".*", module_types=(nn.Dense,),
                     weight=QuantSpec("int4", PerChannel(-1)),
                     act=QuantSpec("int8", PerToken()))]
  serve = jaxq.quantize_model(model, rules, mode="serve")
  jax.eval_shape(serve.apply, variables, x)
  serving, _ = jaxq.convert(serve, variables)
  _, loaded = _round_trip(tmp_path, serving, rules)
  # The rules come back with "Dense" for nn.Dense and still match.
  reloaded = jaxq.quantize_model(model, loaded.rules, mode="serve")
  np.testing.assert_array_equal(
      jax.jit(reloaded.apply)(loaded.variables, x), serve.apply(serving, x))


def test_save_overwrites_atomically(tmp_path):
  path = tmp_path / "model.safetensors"
  jaxq.save(path, {"w": jnp.zeros(3)})
  jaxq.save(str(path), {"w": jnp.ones(3)})
  assert os.listdir(tmp_path) == ["model.safetensors"]
  np.testing.assert_array_equal(jaxq.load(path).variables["w"], np.ones(3))


# ------------------------------------------------------ rules and metadata


def test_rules_round_trip_with_types_as_names(tmp_path):
  w_spec = QuantSpec("int4", PerGroup(0, 32), calibration="mse")
  a_spec = QuantSpec("int8", PerToken(), calibration="entropy", dynamic=False)
  rules = [
      jaxq.Rule(r".*head.*", skip=True),
      jaxq.Rule(r".*", module_types=(nn.Embed, "Embed"),
                weight=QuantSpec("int8", PerChannel(axis=0))),
      jaxq.Rule(r"encoder/.*", module_types=nnx.Linear, weight=w_spec,
                act=a_spec),
      jaxq.Rule(r".*", weight=QuantSpec("float8_e4m3fn",
                                        PerBlock((16, 16)))),
      jaxq.Rule(r".*", act=QuantSpec("float4_e2m1fn", MX(-1, 32))),
  ]
  expected = (
      rules[0],
      jaxq.Rule(r".*", module_types=("Embed", "Embed"),
                weight=QuantSpec("int8", PerChannel(axis=0))),
      jaxq.Rule(r"encoder/.*", module_types=("Linear",), weight=w_spec,
                act=a_spec),
      rules[3],
      rules[4],
  )
  _, loaded = _round_trip(tmp_path, {"w": jnp.zeros(2)}, rules,
                          metadata={"accuracy": 0.97, "steps": [1, 2]})
  assert loaded.rules == expected
  assert loaded.metadata == {"accuracy": 0.97, "steps": [1, 2]}


def test_single_rule_is_stored_as_a_tuple(tmp_path):
  rule = jaxq.Rule(r".*", weight=QuantSpec("int8"))
  _, loaded = _round_trip(tmp_path, {"w": jnp.zeros(2)}, rule)
  assert loaded.rules == (rule,)


@pytest.mark.parametrize("metadata", [{"bad": object()}, {"t": (1, 2)},
                                      {1: "int key"}, {"nan": float("nan")}])
def test_metadata_must_survive_json(tmp_path, metadata):
  with pytest.raises(ValueError, match="metadata"):
    jaxq.save(tmp_path / "m.safetensors", {"w": jnp.zeros(2)},
              metadata=metadata)


# ------------------------------------------------------------------ sizes


def test_report_sizes_int4_is_an_eighth_of_float32(tmp_path):
  x = _weight((1024, 1024))
  int4 = {"params": {"w": _quantize(x, QuantSpec("int4",
                                                     PerChannel(-1)))}}
  report = jaxq.save(tmp_path / "int4.safetensors", int4)
  assert report.file_bytes == os.path.getsize(tmp_path / "int4.safetensors")
  assert report.float_bytes == 1024 * 1024 * 4
  # Packed values (512 KiB) plus 1024 scales and a small header.
  assert 512 * 1024 + 4096 < report.file_bytes < 512 * 1024 + 4096 + 8192
  assert 7.8 < report.ratio < 8.0
  assert str(report).endswith("on disk, 4.00 MiB in float (7.9x smaller)")

  int8 = jaxq.save(tmp_path / "int8.safetensors",
                   {"params": {"w": _quantize(x, QuantSpec("int8"))}})
  assert 3.95 < int8.ratio < 4.0
  plain = jaxq.save(tmp_path / "f32.safetensors", {"params": {"w": x}})
  assert 0.99 < plain.ratio <= 1.0


# ----------------------------------------------------------- save errors


def test_save_rejects_bad_trees(tmp_path):
  path = tmp_path / "m.safetensors"
  qa = _quantize(_weight((4, 4)), QuantSpec("int8"))
  with pytest.raises(ValueError, match=r"'a/b'.*separator"):
    jaxq.save(path, {"params": {"a/b": jnp.zeros(2)}})
  with pytest.raises(ValueError, match="'w.values'"):
    jaxq.save(path, {"w": qa, "w.values": jnp.zeros(2)})
  with pytest.raises(ValueError, match="'params/name' is a str"):
    jaxq.save(path, {"params": {"name": "dense"}})
  with pytest.raises(ValueError, match="key .* must be a str or an int"):
    jaxq.save(path, {(1, 2): jnp.zeros(2)})
  with pytest.raises(ValueError, match="cannot store the <U1 array at 'n'"):
    jaxq.save(path, {"n": np.array(["a"])})
  with pytest.raises(ValueError, match="cannot store the .* array at 'rec'"):
    jaxq.save(path, {"rec": np.zeros(2, [("a", np.float32)])})
  with pytest.raises(ValueError, match="must be a mapping"):
    jaxq.save(path, [jnp.zeros(2)])
  with pytest.raises(ValueError, match=r"rules\[1\] must be a jaxq.Rule"):
    jaxq.save(path, {"w": jnp.zeros(2)}, [jaxq.Rule(".*", skip=True), "x"])
  assert not path.exists()


def test_save_rejects_qarray_that_does_not_fit_its_spec(tmp_path):
  qa = _quantize(_weight((8, 4)), QuantSpec("int8", PerChannel(-1)))
  wrong_scale = jaxq.QArray(qa.values, qa.scale[:, :2], None, qa.spec,
                            qa.dtype)
  with pytest.raises(ValueError, match=r"QArray at 'w'.*scale has shape"):
    jaxq.save(tmp_path / "m.safetensors", {"w": wrong_scale})
  wrong_dtype = jaxq.QArray(qa.values.astype(jnp.int4), qa.scale, None,
                            qa.spec, qa.dtype)
  with pytest.raises(ValueError, match="values are int4 but the spec's "
                     "format is int8"):
    jaxq.save(tmp_path / "m.safetensors", {"w": wrong_dtype})


# ----------------------------------------------------------- load errors


@pytest.fixture
def saved(tmp_path):
  """A small checkpoint mixing formats, and its path."""
  x = _weight((8, 6))
  variables = {"params": {
      "a": _quantize(x, QuantSpec("int8", PerChannel(-1))),
      "b": _quantize(x, QuantSpec("uint8", PerTensor(), symmetric=False)),
      "c": _quantize(x[:, :5], QuantSpec("int4", PerGroup(0, 4))),
      "bias": x[0]}}
  path = tmp_path / "model.safetensors"
  jaxq.save(path, variables, [jaxq.Rule(r".*", weight=QuantSpec("int8"))])
  return path


def _rewrite_manifest(path, edit: Callable[[dict[str, Any]], None]) -> None:
  """Edits the manifest and writes a matching digest, keeping the data."""
  header, data = _read_container(path)
  manifest = json.loads(header["__metadata__"]["jaxq.manifest"])
  edit(manifest)
  text = json.dumps(manifest)
  header["__metadata__"] = {"jaxq.manifest": text,
                            "jaxq.manifest_sha256":
                                hashlib.sha256(text.encode()).hexdigest()}
  raw = json.dumps(header).encode()
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw + data)


def test_load_after_rewrite_without_edit_still_works(saved):
  _rewrite_manifest(saved, lambda manifest: None)
  assert set(jaxq.load(saved).variables["params"]) == {"a", "b", "c", "bias"}


def test_missing_file(tmp_path):
  with pytest.raises(CheckpointNotFoundError, match="no checkpoint at"):
    jaxq.load(tmp_path / "nope.safetensors")
  with pytest.raises(FileNotFoundError):
    jaxq.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1, -200])
def test_truncated_file(saved, keep):
  data = saved.read_bytes()
  saved.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
  with pytest.raises(CheckpointError, match="truncated"):
    jaxq.load(saved)


def test_every_flipped_bit_is_detected(saved):
  data = bytearray(saved.read_bytes())
  (header_length,) = struct.unpack("<Q", data[:8])
  # A stride through the length, the header and the data, all bit positions.
  positions = list(range(0, 8 + header_length, 5)) + list(
      range(8 + header_length, len(data), 11))
  for position in positions:
    for bit in (1 << (position % 8), 0x80 >> (position % 8)):
      corrupted = data.copy()
      corrupted[position] ^= bit
      saved.write_bytes(bytes(corrupted))
      with pytest.raises(CheckpointError):
        jaxq.load(saved)
        pytest.fail(f"flipping bit {bit:#x} of byte {position} went "
                    f"undetected")


def test_corrupted_data_names_the_tensor(saved):
  header, _ = _read_container(saved)
  start, _ = header["params/a.values"]["data_offsets"]
  data = bytearray(saved.read_bytes())
  (header_length,) = struct.unpack("<Q", data[:8])
  data[8 + header_length + start] ^= 0xFF
  saved.write_bytes(bytes(data))
  with pytest.raises(CheckpointError,
                     match=r"'params/a.values': checksum mismatch"):
    jaxq.load(saved)


def test_corrupted_manifest_fails_its_digest(saved):
  data = saved.read_bytes()
  # The manifest is a JSON string inside the JSON header: quotes escaped.
  tampered = data.replace(b'symmetric\\": true', b'symmetric\\": fals', 1)
  assert tampered != data
  saved.write_bytes(tampered)
  with pytest.raises(CheckpointError, match="does not match its checksum"):
    jaxq.load(saved)


def test_newer_format_version(saved):
  def bump(manifest):
    manifest["format_version"] = jaxq.io.checkpoint.FORMAT_VERSION + 1
  _rewrite_manifest(saved, bump)
  with pytest.raises(CheckpointError,
                     match="format version 2.*reads up to version 1.*Upgrade"):
    jaxq.load(saved)


def test_not_a_jaxq_checkpoint(tmp_path):
  path = tmp_path / "plain.safetensors"
  safetensors.numpy.save_file({"w": np.zeros(3, np.float32)}, path)
  with pytest.raises(CheckpointError, match="no jaxq manifest"):
    jaxq.load(path)


def _set_spec(name: str, **fields) -> Callable[[dict[str, Any]], None]:
  def edit(manifest):
    for _, node in manifest["tree"]["items"][0][1]["items"]:
      if node.get("name") == name:
        node["spec"].update(fields)
  return edit


@pytest.mark.parametrize("name, fields, message", [
    ("params/a", {"granularity": {"type": "PerTensor"}},
     r"scale has shape \(1, 6\) but PerTensor\(\) .* needs \(1, 1\)"),
    # A group of 3 on 8 rows is ragged (scales (3, 6)); an MX block is not.
    ("params/a", {"granularity": {"type": "PerGroup", "axis": 0,
                                  "size": 3}},
     r"scale has shape \(1, 6\) .* needs \(3, 6\)"),
    ("params/a", {"granularity": {"type": "MX", "axis": 0, "size": 3}},
     "the granularity does not fit values of shape"),
    ("params/a", {"format": "float8_e4m3fn"},
     "values are int8 but the spec's format is float8_e4m3fn"),
    ("params/a", {"symmetric": False}, "affine but the zero point is missing"),
    ("params/b", {"symmetric": True, "format": "int8"},
     "values are uint8 but the spec's format is int8"),
    ("params/c", {"granularity": {"type": "PerGroup", "axis": 0, "size": 2}},
     r"scale has shape \(2, 5\) .* needs \(4, 5\)"),
])
def test_spec_that_does_not_match_the_arrays(saved, name, fields, message):
  _rewrite_manifest(saved, _set_spec(name, **fields))
  with pytest.raises(CheckpointError,
                     match=rf"QArray at '{name}' does not match its spec"):
    jaxq.load(saved)
  with pytest.raises(CheckpointError, match=message):
    jaxq.load(saved)


def test_unknown_granularity_in_manifest(saved):
  _rewrite_manifest(saved, _set_spec("params/a",
                                     granularity={"type": "PerHeads"}))
  with pytest.raises(CheckpointError, match="unknown granularity 'PerHeads'"):
    jaxq.load(saved)


@pytest.mark.parametrize("field, value, message", [
    ("dtype", "int16", r"holds I8 \[8, 6\], the manifest expects I16"),
    ("shape", [6, 8], r"the file holds I8 \[8, 6\]"),
    ("encoding", "bits", "encoding 'bits' for int8, which is stored as 'raw'"),
])
def test_tensor_entry_that_does_not_match_the_file(saved, field, value,
                                                   message):
  def edit(manifest):
    manifest["tensors"]["params/a.values"][field] = value
  _rewrite_manifest(saved, edit)
  with pytest.raises(CheckpointError, match=message):
    jaxq.load(saved)


def test_missing_tensor_in_manifest(saved):
  def edit(manifest):
    del manifest["tensors"]["params/bias"]
  _rewrite_manifest(saved, edit)
  with pytest.raises(CheckpointError, match=r"unexpected \['params/bias'\]"):
    jaxq.load(saved)


def test_tensor_in_no_leaf_of_the_tree(saved):
  def edit(manifest):
    del manifest["tree"]["items"][0][1]["items"][-1]  # params/bias
  _rewrite_manifest(saved, edit)
  with pytest.raises(CheckpointError,
                     match=r"tensors \['params/bias'\] are in no leaf"):
    jaxq.load(saved)


def test_saved_file_has_default_permissions(tmp_path):
  """The atomic write must not leave the checkpoint readable by its owner only."""
  umask = os.umask(0o022)
  try:
    path = tmp_path / "w.safetensors"
    jaxq.save(path, {"w": np.ones((2, 2), np.float32)})
  finally:
    os.umask(umask)
  assert (path.stat().st_mode & 0o777) == 0o644
