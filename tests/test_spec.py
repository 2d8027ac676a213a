"""Tests for `jaxq.spec`: `QuantSpec` validation and the `QArray` pytree."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxq
from jaxq import MX, PerChannel, PerGroup, PerTensor, QArray, QuantSpec


def test_spec_is_a_hashable_value():
  a = QuantSpec("int8", PerChannel(axis=-1))
  b = QuantSpec(jnp.int8, PerChannel(axis=-1))
  assert a == b and hash(a) == hash(b)
  assert a.format == "int8"
  assert a != a.replace(narrow_range=False)
  with pytest.raises(AttributeError):
    a.symmetric = False  # frozen


def test_spec_as_a_static_jit_argument_retraces_only_on_change():
  traces = []

  def run(x, spec):
    traces.append(spec)
    return jaxq.fake_quant(x, spec)

  jitted = jax.jit(run, static_argnums=1)
  x = jnp.ones((4, 8))
  jitted(x, QuantSpec("int8"))
  jitted(x, QuantSpec("int8"))
  jitted(x, QuantSpec("int4"))
  assert traces == [QuantSpec("int8"), QuantSpec("int4")]


@pytest.mark.parametrize("narrow_range,qmin", [(True, -127), (False, -128)])
def test_spec_fmt_follows_narrow_range(narrow_range, qmin):
  fmt = QuantSpec("int8", narrow_range=narrow_range).fmt
  assert (fmt.qmin, fmt.qmax) == (qmin, 127)


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(format="float8_e4m3fn", symmetric=False), "affine"),
     (dict(format="uint8"), "unsigned"),
     (dict(format="int8", granularity=MX(), symmetric=False), "MX"),
     (dict(calibration="minmax"), "calibration 'minmax'"),
     (dict(calibration="percentile", percentile=0.0), "percentile"),
     (dict(percentile=100.5), "percentile"),
     (dict(rounding="up"), "rounding 'up'"),
     (dict(ste="tanh"), "ste 'tanh'"),
     (dict(granularity="per-channel"), "granularity"),
     (dict(format="int7"), "Unknown quantization format 'int7'")])
def test_spec_rejects_bad_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    QuantSpec(**kwargs)


def test_replace_validates_again():
  with pytest.raises(ValueError, match="unsigned"):
    QuantSpec("uint8", symmetric=False).replace(symmetric=True)


def test_is_mx():
  assert QuantSpec("float8_e4m3fn", MX()).is_mx
  assert not QuantSpec("int8", PerGroup(size=32)).is_mx


def test_qarray_is_a_pytree_with_static_spec_and_dtype():
  spec = QuantSpec("uint8", PerChannel(), symmetric=False)
  qa = jaxq.quantize(jnp.linspace(-1.0, 3.0, 32).reshape(8, 4), spec)
  leaves, treedef = jax.tree_util.tree_flatten(qa)
  # The zero point in the format's zero_point_dtype: uint8 for uint8.
  assert [leaf.dtype for leaf in leaves] == [jnp.uint8, jnp.float32, jnp.uint8]
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert rebuilt.spec == spec and rebuilt.dtype == jnp.float32
  # Symmetric QArrays carry no zero point leaf.
  sym = jaxq.quantize(jnp.ones((8, 4)), QuantSpec("int8"))
  assert len(jax.tree_util.tree_leaves(sym)) == 2
  # Through jit as an argument and a result.
  doubled = jax.jit(lambda q: QArray(q.values, q.scale * 2, q.zero_point,
                                     q.spec, q.dtype))(qa)
  np.testing.assert_array_equal(np.asarray(jaxq.dequantize(doubled)),
                                2 * np.asarray(jaxq.dequantize(qa)))


def test_qarray_shape_and_nbytes():
  x = jnp.ones((64, 32), jnp.bfloat16)
  qa = jaxq.quantize(x, QuantSpec("int4", PerChannel()))
  assert qa.shape == (64, 32) and qa.ndim == 2 and qa.dtype == jnp.bfloat16
  assert qa.nbytes == 64 * 32 // 2 + 32 * 4  # packed nibbles + f32 scales
  mx = jaxq.quantize(x, QuantSpec("float4_e2m1fn", MX()))
  assert mx.scale.dtype == ml_dtypes.float8_e8m0fnu
  assert mx.nbytes == 64 * 32 // 2 + 64 * 1  # one e8m0 byte per 32 elements
  affine = jaxq.quantize(x, QuantSpec("uint8", PerTensor(), symmetric=False))
  assert affine.nbytes == 64 * 32 + 4 + 1  # f32 scale, uint8 zero point
  affine4 = jaxq.quantize(x, QuantSpec("int4", PerGroup(axis=0, size=32),
                                       symmetric=False))
  # Per group of 32: a f32 scale and an int8 zero point, 2 x 32 of each.
  assert affine4.zero_point.dtype == jnp.int8
  assert affine4.nbytes == 64 * 32 // 2 + 2 * 32 * (4 + 1)


@pytest.mark.parametrize("name,narrow", [("int8", True), ("int4", False),
                                         ("uint8", True),
                                         ("float8_e4m3fn", True)])
def test_spec_narrow_range_defaults_per_format(name, narrow):
  spec = QuantSpec(name, symmetric=name != "uint8")
  assert spec.narrow_range is narrow
  # The resolved default is the same value as the explicit one.
  explicit = QuantSpec(name, symmetric=name != "uint8", narrow_range=narrow)
  assert spec == explicit and hash(spec) == hash(explicit)
  assert spec.fmt == explicit.fmt


def test_spec_explicit_narrow_range_is_kept():
  assert QuantSpec("int4", narrow_range=True).fmt.qmin == -7
  assert QuantSpec("int8", narrow_range=False).fmt.qmin == -128
  with pytest.raises(ValueError, match="narrow_range must be"):
    QuantSpec("int4", narrow_range="full")


def test_spec_replace_format_resolves_a_default_range_again():
  # A defaulted range follows the format, through any number of replaces.
  w8 = QuantSpec("int8", PerChannel(-1))
  w4 = w8.replace(granularity=PerGroup(size=32)).replace(format="int4")
  assert not w4.narrow_range and w4.fmt.qmin == -8
  assert w4.replace(format="int8").narrow_range
  # An explicit range stays, whatever the format.
  narrow = QuantSpec("int8", narrow_range=True)
  assert narrow.replace(format="int4").narrow_range
  assert not QuantSpec("int4", narrow_range=False).replace(
      format="int8").narrow_range
  assert w8.replace(format="int4", narrow_range=True).fmt.qmin == -7


@pytest.mark.parametrize("spec", [
    QuantSpec("int4", PerChannel(axis=-1)),
    QuantSpec("nf4", PerGroup(axis=0, size=8), double_quant=4),
    QuantSpec("float4_e2m1fn", PerGroup(axis=-1, size=4))],
                         ids=["int4", "nf4-dq", "fp4"])
def test_packed_qarray_holds_two_values_per_byte(spec, tmp_path):
  w = jax.random.normal(jax.random.key(0), (16, 8))
  qa = jaxq.quantize(w, spec)
  packed = jaxq.PackedQArray.of(qa)
  assert packed.packed.dtype == jnp.uint8 and packed.packed.shape == (16, 4)
  assert packed.shape == qa.shape and packed.nbytes == qa.nbytes
  chex.assert_trees_all_equal(packed.unpack(), qa)
  np.testing.assert_array_equal(jaxq.dequantize(packed), jaxq.dequantize(qa))
  # Saved as its QArray, loaded as that QArray.
  jaxq.save(tmp_path / "p.safetensors", {"w": packed})
  chex.assert_trees_all_equal(
      jaxq.load(tmp_path / "p.safetensors").variables["w"], qa)


def test_packed_qarray_refuses_what_it_cannot_pack():
  w = jax.random.normal(jax.random.key(0), (4, 6))
  with pytest.raises(ValueError, match="4-bit values with an even last axis"):
    jaxq.PackedQArray.of(jaxq.quantize(w, QuantSpec("int8")))
  with pytest.raises(ValueError, match=r"shape \(4, 5\)"):
    jaxq.PackedQArray.of(jaxq.quantize(w[:, :5], QuantSpec("int4")))
