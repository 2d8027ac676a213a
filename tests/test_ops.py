"""Tests for `jaxq.dot_general`, `jaxq.einsum` and `jaxq.conv`.

Every case compares the low-bit op with an independent float64 numpy
reference on the dequantized operands (values, scales and zero points
expanded with ``np.repeat``, not with jaxq's helpers), and inspects the
jaxpr to prove the matmul or convolution ran on int8 (or fp8) operands with
an int32 (or float32) result.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import hypothesis
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import strategies as st

import jaxq
from jaxq import MX, PerBlock, PerChannel, PerGroup, PerTensor, PerToken
from jaxq import QArray, QuantSpec

INT8 = np.dtype(np.int8)
INT32 = np.dtype(np.int32)
FLOAT32 = np.dtype(np.float32)
FP8 = {np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)}
MATMUL = (((1,), (0,)), ((), ()))
CONV_PRIMITIVES = ("dot_general", "conv_general_dilated")


def _random(seed: int, shape: tuple[int, ...]) -> jax.Array:
  """Normal float32 data with uneven magnitudes across rows and columns."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape)
  x *= np.exp(rng.standard_normal(shape[:1] + (1,) * (len(shape) - 1)))
  x *= np.exp(0.5 * rng.standard_normal(shape[-1:]))
  return jnp.asarray(x, jnp.float32)


# One compilation per (shape, spec) instead of one per eager primitive.
_quantize = jax.jit(jaxq.quantize, static_argnums=1)
# The plain matmul, one jitted function for every test that runs it with
# the default MAX_GROUPED_ELEMENTS: a pairing compiles once, not once per
# test. (Tests that change the constant trace fresh functions.)
_matmul = jax.jit(functools.partial(jaxq.dot_general,
                                    dimension_numbers=MATMUL))


def _dequantize64(x: QArray | jax.Array) -> np.ndarray:
  """(values - zero_point) * scale in float64, scales expanded by repeat
  (each entry over its block of the spec's block shape)."""
  if not isinstance(x, QArray):
    return np.asarray(x).astype(np.float64)
  values = np.asarray(x.values).astype(np.float64)
  blocks = x.spec.granularity.block_shape(values.shape)

  def expand(t: np.ndarray) -> np.ndarray:
    # Each entry covers its block; a ragged last block is cut at the end.
    for axis, (size, b) in enumerate(zip(t.shape, blocks)):
      t = np.repeat(t, b, axis=axis)[(slice(None),) * axis +
                                     (slice(0, values.shape[axis]),)]
    return t

  scale = expand(np.asarray(x.scale).astype(np.float64))
  if x.zero_point is None:
    return values * scale
  return (values - expand(np.asarray(x.zero_point).astype(np.float64))) * scale


def _assert_close(actual: jax.Array, expected: np.ndarray,
                  rtol: float = 1e-5) -> None:
  actual = np.asarray(actual).astype(np.float64)
  assert actual.shape == expected.shape
  error = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
  assert error < rtol, f"relative error {error:.3g} >= {rtol}"
  np.testing.assert_allclose(actual, expected, rtol=10 * rtol,
                             atol=10 * rtol * np.abs(expected).max())


def _equations(jaxpr: Any):
  """Every equation of a jaxpr, sub-jaxprs (jit, custom_vjp, ...) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _equations(inner)


def _assert_low_bit(fn: Callable[..., Any], *args: Any,
                    operand_dtypes: set[np.dtype], result_dtype: np.dtype,
                    count: int = 1) -> None:
  """Asserts that ``fn``'s matmuls/convs all ran on low-bit operands."""
  calls = [eqn for eqn in _equations(jax.make_jaxpr(fn)(*args).jaxpr)
           if eqn.primitive.name in CONV_PRIMITIVES]
  assert len(calls) == count, [str(eqn) for eqn in calls]
  for eqn in calls:
    dtypes = {np.dtype(v.aval.dtype) for v in eqn.invars}
    assert dtypes <= operand_dtypes, (eqn.primitive.name, dtypes)
    assert np.dtype(eqn.outvars[0].aval.dtype) == result_dtype, str(eqn)


def _int8(g, **kw) -> QuantSpec:
  return QuantSpec("int8", g, **kw)


# (name, lhs spec, rhs spec, low-bit operand dtypes, accumulation dtype) for
# a (8, 256) x (256, 16) matmul.
PAIRINGS = [
    ("T-T", _int8(PerTensor()), _int8(PerTensor()), {INT8}, INT32),
    ("T-C", _int8(PerTensor()), _int8(PerChannel(-1)), {INT8}, INT32),
    ("K-C", _int8(PerToken()), _int8(PerChannel(-1)), {INT8}, INT32),
    ("K-G", _int8(PerToken()), _int8(PerGroup(0, 32)), {INT8}, INT32),
    ("K-G int4", _int8(PerToken()), QuantSpec("int4", PerGroup(0, 32)),
     {INT8}, INT32),
    ("G-G", _int8(PerGroup(-1, 32)), _int8(PerGroup(0, 32)), {INT8}, INT32),
    ("G-B", _int8(PerGroup(-1, 32)), _int8(PerBlock((128, 8))), {INT8},
     INT32),
    ("B-B", _int8(PerBlock((4, 64))), _int8(PerBlock((128, 8))), {INT8},
     INT32),
    ("T-CG", _int8(PerTensor()), _int8(PerGroup(0, 64)), {INT8}, INT32),
    ("G-G coarse lhs", _int8(PerGroup(-1, 128)), _int8(PerGroup(0, 32)),
     {INT8}, INT32),
    ("MX fp8", QuantSpec("float8_e4m3fn", MX(-1)),
     QuantSpec("float8_e4m3fn", MX(0)), FP8, FLOAT32),
    ("MX fp4", QuantSpec("float4_e2m1fn", MX(-1)),
     QuantSpec("float4_e2m1fn", MX(0)), FP8, FLOAT32),
    ("MX int8", _int8(MX(-1)), _int8(MX(0)), {INT8}, INT32),
    ("MX fp8 x fp4", QuantSpec("float8_e4m3fn", MX(-1)),
     QuantSpec("float4_e2m1fn", MX(0)), FP8, FLOAT32),
    ("fp8 e4m3 x e5m2 K-C", QuantSpec("float8_e4m3fn", PerToken()),
     QuantSpec("float8_e5m2", PerChannel(-1)), FP8, FLOAT32),
    ("affine uint8 K x C", QuantSpec("uint8", PerToken(), symmetric=False),
     _int8(PerChannel(-1)), {INT8}, INT32),
    ("affine uint8 G x G", QuantSpec("uint8", PerGroup(-1, 64),
                                     symmetric=False),
     _int8(PerGroup(0, 32)), {INT8}, INT32),
    ("affine x affine", QuantSpec("uint8", PerTensor(), symmetric=False),
     QuantSpec("uint8", PerGroup(0, 128), symmetric=False), {INT8}, INT32),
]


@pytest.mark.parametrize(
    "lhs_spec, rhs_spec, operand_dtypes, result_dtype",
    [p[1:] for p in PAIRINGS], ids=[p[0] for p in PAIRINGS])
def test_dot_general_pairings(lhs_spec, rhs_spec, operand_dtypes,
                              result_dtype):
  lhs = _quantize(_random(0, (8, 256)), lhs_spec)
  rhs = _quantize(_random(1, (256, 16)), rhs_spec)
  matmul = functools.partial(jaxq.dot_general, dimension_numbers=MATMUL)
  out = _matmul(lhs, rhs)
  assert out.dtype == jnp.float32
  _assert_close(out, _dequantize64(lhs) @ _dequantize64(rhs))
  _assert_low_bit(matmul, lhs, rhs, operand_dtypes=operand_dtypes,
                  result_dtype=result_dtype)


@hypothesis.settings(max_examples=6)
@hypothesis.given(
    lhs_group=st.sampled_from([8, 16, 24, 32, 48, 96]),
    rhs_group=st.sampled_from([8, 16, 24, 32, 48, 96]),
    seed=st.integers(0, 2**16))
def test_dot_general_any_group_sizes(lhs_group, rhs_group, seed):
  # One shape: the groups are along the contraction, and every other shape
  # would compile each program again.
  lhs = _quantize(_random(seed, (3, 96)), _int8(PerGroup(-1, lhs_group)))
  rhs = _quantize(_random(seed + 1, (96, 5)), _int8(PerGroup(0, rhs_group)))
  if max(lhs_group, rhs_group) % min(lhs_group, rhs_group):
    with pytest.raises(ValueError, match=f"groups of {lhs_group} "):
      _matmul(lhs, rhs)
  else:
    _assert_close(_matmul(lhs, rhs), _dequantize64(lhs) @ _dequantize64(rhs))


# (name, lhs spec, rhs spec) for a (5, 20) x (20, 7) matmul whose groups
# (and blocks) do not divide the axes: the last one is shorter.
RAGGED = [
    ("K-G", _int8(PerToken()), _int8(PerGroup(0, 8))),
    ("K-G int4", _int8(PerToken()), QuantSpec("int4", PerGroup(0, 8))),
    ("G-G", _int8(PerGroup(-1, 8)), _int8(PerGroup(0, 8))),
    ("G-G finer lhs", _int8(PerGroup(-1, 4)), _int8(PerGroup(0, 8))),
    ("G-G finer rhs", _int8(PerGroup(-1, 16)), _int8(PerGroup(0, 8))),
    ("G-B", _int8(PerGroup(-1, 8)), _int8(PerBlock((8, 3)))),
    ("B-B", _int8(PerBlock((2, 8))), _int8(PerBlock((16, 3)))),
    ("T-CG", _int8(PerTensor()), _int8(PerGroup(0, 6))),
    ("affine uint8 G x G", QuantSpec("uint8", PerGroup(-1, 8),
                                     symmetric=False),
     _int8(PerGroup(0, 4))),
    ("affine x affine", QuantSpec("uint8", PerTensor(), symmetric=False),
     QuantSpec("uint8", PerGroup(0, 8), symmetric=False)),
    ("fp8 G-G", QuantSpec("float8_e4m3fn", PerGroup(-1, 8)),
     QuantSpec("float8_e4m3fn", PerGroup(0, 8))),
]


@pytest.mark.parametrize("chunked", [False, True], ids=["batched", "chunked"])
@pytest.mark.parametrize("lhs_spec, rhs_spec", [p[1:] for p in RAGGED],
                         ids=[p[0] for p in RAGGED])
def test_dot_general_ragged_groups(monkeypatch, lhs_spec, rhs_spec, chunked):
  """Groups of 8 on a contraction of 20 (8 + 8 + 4): the low-bit matmul
  equals the float matmul of the dequantized operands, batched or in a loop
  over chunks of groups."""
  lhs = _quantize(_random(14, (5, 20)), lhs_spec)
  rhs = _quantize(_random(15, (20, 7)), rhs_spec)
  if chunked:
    monkeypatch.setattr(jaxq.grouped_dot, "MAX_GROUPED_ELEMENTS", 5 * 7)
  matmul = lambda a, b: jaxq.dot_general(a, b, MATMUL)
  assert _loops(matmul, lhs, rhs) == chunked
  _assert_close(jax.jit(matmul)(lhs, rhs),
                _dequantize64(lhs) @ _dequantize64(rhs))
  fp8 = lhs_spec.fmt.kind == "float"
  _assert_low_bit(matmul, lhs, rhs, operand_dtypes=FP8 if fp8 else {INT8},
                  result_dtype=FLOAT32 if fp8 else INT32)


def test_dot_general_g128_on_576_inputs():
  """SmolLM2's "g128": 576 inputs are four groups of 128 and one of 64, for
  a weight and for a grouped activation (G-G), and weight-only."""
  x = _random(16, (3, 576))
  w = _quantize(_random(17, (576, 24)), QuantSpec("int4", PerGroup(0, 128)))
  assert w.scale.shape == (5, 24)
  for lhs in (_quantize(x, _int8(PerToken())),
              _quantize(x, _int8(PerGroup(-1, 128))), x):
    _assert_close(jax.jit(jaxq.dot_general, static_argnums=2)(lhs, w, MATMUL),
                  _dequantize64(lhs) @ _dequantize64(w))


def test_einsum_ragged_groups_with_batch_axes():
  # Attention scores grouped along a head_dim of 20 in groups of 8.
  q = _quantize(_random(18, (2, 3, 5, 20)), _int8(PerGroup(-1, 8)))
  k = _quantize(_random(19, (2, 3, 4, 20)), _int8(PerGroup(-1, 16)))
  out = jax.jit(functools.partial(jaxq.einsum, "bhtd,bhsd->bhts"))(q, k)
  _assert_close(out, np.einsum("bhtd,bhsd->bhts", _dequantize64(q),
                               _dequantize64(k)))


GROUPED = [p for p in PAIRINGS if p[0] in (
    "K-G", "K-G int4", "G-G", "G-B", "B-B", "T-CG", "G-G coarse lhs",
    "MX fp8", "MX fp4", "MX int8", "affine uint8 G x G", "affine x affine")]


def _loops(fn: Callable[..., Any], *args: Any) -> bool:
  """Whether ``fn``'s jaxpr loops (``fori_loop`` traces as a scan); traced
  afresh, past JAX's trace cache, as the tests change a module constant."""
  jaxpr = jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr
  return bool({"scan", "while"} &
              {eqn.primitive.name for eqn in _equations(jaxpr)})


@pytest.mark.parametrize(
    "lhs_spec, rhs_spec, operand_dtypes, result_dtype",
    [p[1:] for p in GROUPED], ids=[p[0] for p in GROUPED])
def test_dot_general_grouped_in_chunks(monkeypatch, lhs_spec, rhs_spec,
                                       operand_dtypes, result_dtype):
  """Past MAX_GROUPED_ELEMENTS the groups run in a loop, one low-bit matmul
  per chunk, with the same result."""
  lhs = _quantize(_random(0, (8, 256)), lhs_spec)
  rhs = _quantize(_random(1, (256, 16)), rhs_spec)
  # Fresh functions once the constant changes: JAX caches traces by
  # function. Before, the shared `_matmul` (compiled by the pairings test).
  matmul = lambda a, b: jaxq.dot_general(a, b, MATMUL)
  batched = _matmul(lhs, rhs)
  assert not _loops(matmul, lhs, rhs)
  monkeypatch.setattr(jaxq.grouped_dot, "MAX_GROUPED_ELEMENTS", 8 * 16)
  assert _loops(matmul, lhs, rhs)
  chunked = jax.jit(lambda a, b: jaxq.dot_general(a, b, MATMUL))(lhs, rhs)
  _assert_close(chunked, _dequantize64(lhs) @ _dequantize64(rhs))
  np.testing.assert_allclose(chunked, batched, rtol=1e-5, atol=1e-5)
  _assert_low_bit(matmul, lhs, rhs, operand_dtypes=operand_dtypes,
                  result_dtype=result_dtype)


def test_dot_general_chunks_with_batch_dims_and_two_contractions(
    monkeypatch):
  monkeypatch.setattr(jaxq.grouped_dot, "MAX_GROUPED_ELEMENTS", 1)
  # Scales vary along the batch axes and along both contracted axes.
  lhs = _quantize(_random(8, (2, 3, 4, 64)), _int8(PerBlock((2, 16))))
  rhs = _quantize(_random(9, (2, 4, 64, 5)), _int8(PerGroup(2, 32)))
  dimension_numbers = (((2, 3), (1, 2)), ((0,), (0,)))
  dot = functools.partial(jaxq.dot_general,
                          dimension_numbers=dimension_numbers)
  assert _loops(dot, lhs, rhs)
  _assert_close(jax.jit(dot)(lhs, rhs),
                np.einsum("bmhd,bhdn->bmn", _dequantize64(lhs),
                          _dequantize64(rhs)))


def test_grouped_dot_memory_stays_of_the_output_size():
  # (256, 4096) x (4096, 256) in groups of 32: all 128 partial products at
  # once would take 128 x 256 x 256 x 4 bytes = 32 MiB of int32.
  lhs = _quantize(_random(10, (256, 4096)), _int8(PerGroup(-1, 32)))
  rhs = _quantize(_random(11, (4096, 256)), _int8(PerGroup(0, 32)))
  compiled = jax.jit(functools.partial(
      jaxq.dot_general, dimension_numbers=MATMUL)).lower(lhs, rhs).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 4 * 2**20, temp
  _assert_close(compiled(lhs, rhs), _dequantize64(lhs) @ _dequantize64(rhs))


def test_dot_general_batch_dims_with_groups():
  # Attention scores q.k^T per (batch, head), scales grouped along head_dim
  # and varying along the batch axes.
  q = _quantize(_random(2, (2, 3, 5, 32)), _int8(PerGroup(-1, 8)))
  k = _quantize(_random(3, (2, 3, 7, 32)), _int8(PerGroup(-1, 16)))
  dimension_numbers = (((3,), (3,)), ((0, 1), (0, 1)))
  scores = functools.partial(jaxq.dot_general,
                             dimension_numbers=dimension_numbers)
  _assert_close(jax.jit(scores)(q, k),
                np.einsum("bhtd,bhsd->bhts", _dequantize64(q),
                          _dequantize64(k)))
  _assert_low_bit(scores, q, k, operand_dtypes={INT8}, result_dtype=INT32)


def test_dot_general_two_contractions_and_negative_axes():
  lhs = _quantize(_random(4, (6, 4, 64)), _int8(PerGroup(-1, 32)))
  rhs = _quantize(_random(5, (4, 64, 10)), _int8(PerChannel(-1)))
  out = jax.jit(functools.partial(
      jaxq.dot_general, dimension_numbers=(((-2, -1), (0, 1)), ((), ())),
      preferred_element_type=jnp.bfloat16))(lhs, rhs)
  assert out.dtype == jnp.bfloat16
  _assert_close(out, np.einsum("mab,abn->mn", _dequantize64(lhs),
                               _dequantize64(rhs)), rtol=5e-3)


def test_dot_general_per_token_over_two_contracted_axes():
  # An attention output projection: (batch, seq, heads, head_dim) x
  # (heads, head_dim, features), one activation scale per token.
  lhs = _quantize(_random(6, (2, 3, 4, 16)),
                  _int8(PerToken(contraction_axis=(-2, -1))))
  rhs = _quantize(_random(7, (4, 16, 10)), _int8(PerChannel(-1)))
  assert lhs.scale.shape == (2, 3, 1, 1)
  dot = functools.partial(jaxq.dot_general,
                          dimension_numbers=(((2, 3), (0, 1)), ((), ())))
  _assert_close(jax.jit(dot)(lhs, rhs),
                np.einsum("bshd,hdn->bsn", _dequantize64(lhs),
                          _dequantize64(rhs)))
  # Constant along the whole contraction: one int8 matmul, no group axis.
  calls = [eqn for eqn in _equations(jax.make_jaxpr(dot)(lhs, rhs).jaxpr)
           if eqn.primitive.name == "dot_general"]
  assert len(calls) == 1
  assert calls[0].outvars[0].aval.shape == (2, 3, 10)
  assert calls[0].outvars[0].aval.dtype == INT32


@pytest.mark.parametrize("granularity", [PerChannel(-1), PerGroup(0, 32)],
                         ids=["C", "G"])
@pytest.mark.parametrize("fmt", ["int8", "int4", "float8_e4m3fn"])
def test_weight_only(granularity, fmt):
  x = _random(6, (8, 128))
  w = _quantize(_random(7, (128, 16)), QuantSpec(fmt, granularity))
  matmul = functools.partial(jaxq.dot_general, dimension_numbers=MATMUL)
  out = jax.jit(matmul)(x, w)
  assert out.dtype == jnp.float32
  _assert_close(out, _dequantize64(x) @ _dequantize64(w))
  _assert_low_bit(matmul, x, w, operand_dtypes={FLOAT32},
                  result_dtype=FLOAT32)


def test_weight_only_affine_and_bfloat16():
  x = _random(8, (8, 128)).astype(jnp.bfloat16)
  w = _quantize(_random(9, (128, 16)),
                    QuantSpec("uint8", PerChannel(-1), symmetric=False))
  matmul = jax.jit(jaxq.dot_general, static_argnums=(2, 3))
  out = matmul(x, w, MATMUL)
  assert out.dtype == jnp.bfloat16
  # The bf16 products are exact and accumulate in float32; only the output
  # is rounded to bfloat16.
  precise = matmul(x, w, MATMUL, jnp.float32)
  _assert_close(precise, _dequantize64(x) @ _dequantize64(w))
  _assert_close(out, _dequantize64(x) @ _dequantize64(w), rtol=5e-3)


def test_activation_quantized_weight_float():
  x = _quantize(_random(10, (8, 64)), _int8(PerToken()))
  w = _random(11, (64, 16))
  _assert_close(jax.jit(jaxq.dot_general, static_argnums=2)(x, w, MATMUL),
                _dequantize64(x) @ _dequantize64(w))


@pytest.mark.parametrize("subscripts, lhs_shape, rhs_shape, lhs_spec, rhs_spec",
                         [
                             ("btd,df->btf", (2, 5, 64), (64, 24),
                              _int8(PerToken()), _int8(PerChannel(-1))),
                             ("bthd,bshd->bhts", (2, 5, 3, 16), (2, 7, 3, 16),
                              _int8(PerToken()), _int8(PerToken())),
                             ("bhts,bshd->bthd", (2, 3, 5, 7), (2, 7, 3, 16),
                              QuantSpec("uint8", PerToken(), symmetric=False),
                              _int8(PerChannel((0, 2, 3)))),
                             ("td,df", (5, 64), (64, 8),
                              _int8(PerGroup(-1, 32)), _int8(PerGroup(0, 16))),
                         ], ids=["dense", "scores", "context", "implicit"])
def test_einsum(subscripts, lhs_shape, rhs_shape, lhs_spec, rhs_spec):
  lhs = _quantize(_random(12, lhs_shape), lhs_spec)
  rhs = _quantize(_random(13, rhs_shape), rhs_spec)
  out = jax.jit(functools.partial(jaxq.einsum, subscripts))(lhs, rhs)
  _assert_close(out, np.einsum(subscripts, _dequantize64(lhs),
                               _dequantize64(rhs)))
  _assert_low_bit(functools.partial(jaxq.einsum, subscripts), lhs, rhs,
                  operand_dtypes={INT8}, result_dtype=INT32)


def _conv_reference(x: np.ndarray, w: np.ndarray, strides, padding,
                    rhs_dilation, groups: int) -> np.ndarray:
  """NHWC x HWIO convolution in float64, one kernel tap at a time."""
  x = np.pad(x, ((0, 0), *padding, (0, 0)))
  kh, kw, cin, cout = w.shape
  (sh, sw), (dh, dw) = strides, rhs_dilation
  out_h = (x.shape[1] - (kh - 1) * dh - 1) // sh + 1
  out_w = (x.shape[2] - (kw - 1) * dw - 1) // sw + 1
  out = np.zeros((x.shape[0], out_h, out_w, cout))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i * dh:i * dh + sh * (out_h - 1) + 1:sh,
                j * dw:j * dw + sw * (out_w - 1) + 1:sw]
      patch = patch.reshape(patch.shape[:3] + (groups, cin))
      tap = w[i, j].reshape(cin, groups, cout // groups)
      out += np.einsum("nhwgc,cgo->nhwgo", patch, tap).reshape(out.shape)
  return out


CONVS = [
    ("int8", _int8(PerTensor()), 4, 8, 1, {INT8}, INT32),
    ("affine uint8", QuantSpec("uint8", PerTensor(), symmetric=False), 4, 8,
     1, {INT8}, INT32),
    ("depthwise", _int8(PerTensor()), 6, 12, 6, {INT8}, INT32),
    ("depthwise affine", QuantSpec("uint8", PerTensor(), symmetric=False), 6,
     6, 6, {INT8}, INT32),
    ("grouped", _int8(PerTensor()), 4, 6, 2, {INT8}, INT32),
    ("fp8", QuantSpec("float8_e4m3fn"), 4, 8, 1, FP8, FLOAT32),
]


@pytest.mark.parametrize(
    "lhs_spec, cin, cout, groups, operand_dtypes, result_dtype",
    [c[1:] for c in CONVS], ids=[c[0] for c in CONVS])
def test_conv(lhs_spec, cin, cout, groups, operand_dtypes, result_dtype):
  rhs_format = "float8_e4m3fn" if FP8 == operand_dtypes else "int8"
  x = _quantize(_random(14, (2, 9, 8, cin)), lhs_spec)
  w = _quantize(_random(15, (3, 3, cin // groups, cout)),
                    QuantSpec(rhs_format, PerChannel(-1)))
  strides, padding, rhs_dilation = (2, 1), ((1, 2), (0, 1)), (1, 2)
  convolve = functools.partial(
      jaxq.conv, window_strides=strides, padding=padding,
      rhs_dilation=rhs_dilation,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
  out = jax.jit(convolve)(x, w)
  _assert_close(out, _conv_reference(_dequantize64(x), _dequantize64(w),
                                     strides, padding, rhs_dilation, groups))
  # A zero point costs one more (one-example) convolution, also int8.
  count = 1 if x.zero_point is None else 2
  _assert_low_bit(convolve, x, w, operand_dtypes=operand_dtypes,
                  result_dtype=result_dtype, count=count)


def test_conv_nchw_weight_only_and_per_example_scale():
  x = _random(16, (3, 4, 7, 7))
  w = _quantize(_random(17, (8, 4, 3, 3)), _int8(PerChannel(0)))
  dimension_numbers = ("NCHW", "OIHW", "NCHW")
  convolve = jax.jit(functools.partial(jaxq.conv, window_strides=(1, 1),
                                       padding="SAME",
                                       dimension_numbers=dimension_numbers))
  out = convolve(x, w)
  to_nhwc, to_hwio = (0, 2, 3, 1), (2, 3, 1, 0)
  reference = _conv_reference(
      _dequantize64(x).transpose(to_nhwc), _dequantize64(w).transpose(to_hwio),
      (1, 1), ((1, 1), (1, 1)), (1, 1), 1).transpose(0, 3, 1, 2)
  _assert_close(out, reference)
  _assert_low_bit(convolve, x, w, operand_dtypes={FLOAT32},
                  result_dtype=FLOAT32)
  # An int8 input with one scale per example (a PerChannel over the batch).
  qx = _quantize(x, _int8(PerChannel(0)))
  _assert_close(
      convolve(qx, w),
      _conv_reference(
          _dequantize64(qx).transpose(to_nhwc),
          _dequantize64(w).transpose(to_hwio), (1, 1), ((1, 1), (1, 1)),
          (1, 1), 1).transpose(0, 3, 1, 2))


# Errors.


def test_error_group_sizes_do_not_nest():
  lhs = _quantize(_random(0, (4, 96)), _int8(PerGroup(-1, 32)))
  rhs = _quantize(_random(1, (96, 8)), _int8(PerGroup(0, 48)))
  with pytest.raises(ValueError, match=r"groups of 32 .* of 48 \(rhs"):
    jaxq.dot_general(lhs, rhs, MATMUL)


def test_error_contraction_sizes_differ():
  lhs = _quantize(_random(0, (4, 64)), _int8(PerTensor()))
  rhs = _quantize(_random(1, (32, 8)), _int8(PerChannel(-1)))
  with pytest.raises(ValueError, match=r"lhs axis 1 has size 64.*size 32"):
    jaxq.dot_general(lhs, rhs, MATMUL)


def test_error_integer_times_float_format():
  lhs = _quantize(_random(0, (4, 64)), _int8(PerTensor()))
  rhs = _quantize(_random(1, (64, 8)), QuantSpec("float8_e4m3fn"))
  with pytest.raises(ValueError, match="int8 .* float8_e4m3fn"):
    jaxq.dot_general(lhs, rhs, MATMUL)


def test_error_scale_does_not_fit_values():
  good = _quantize(_random(0, (4, 64)), _int8(PerGroup(-1, 32)))
  bad = QArray(good.values, jnp.ones((4, 3)), None, good.spec, good.dtype)
  with pytest.raises(ValueError, match=r"scale of shape \(4, 3\), but .* "
                     r"values of shape \(4, 64\)"):
    jaxq.dot_general(bad, good, (((1,), (1,)), ((), ())))


def test_error_bad_operands_and_output_dtype():
  x = _random(0, (4, 8))
  with pytest.raises(ValueError, match="QArray or a floating-point array"):
    jaxq.dot_general(x.astype(jnp.int8), x, (((1,), (1,)), ((), ())))
  with pytest.raises(ValueError, match="must be a float dtype"):
    jaxq.dot_general(x, x, (((1,), (1,)), ((), ())),
                     preferred_element_type=jnp.int32)
  with pytest.raises(ValueError, match="axis 2 is out of range"):
    jaxq.dot_general(x, x, (((2,), (1,)), ((), ())))


@pytest.mark.parametrize("subscripts, match", [
    ("...d,df->...f", "no ellipsis"),
    ("ii,ij->j", "repeat an index"),
    ("ab,bc->ax", "distinct indices of the operands"),
    ("ab,bc->c", r"\['a'\] appear in one operand only"),
    ("abc,bc->a", "rank 2"),
])
def test_error_einsum(subscripts, match):
  x = _random(0, (4, 4))
  with pytest.raises(ValueError, match=match):
    jaxq.einsum(subscripts, x, x)


def test_error_conv_scales():
  x = _random(0, (2, 6, 6, 4))
  w = _random(1, (3, 3, 4, 8))
  conv = functools.partial(jaxq.conv, window_strides=(1, 1), padding="SAME",
                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
  qw = _quantize(w, _int8(PerChannel(-1)))
  with pytest.raises(ValueError, match=r"lhs scale has shape \(2, 6, 6, 1\)"):
    conv(_quantize(x, _int8(PerToken())), qw)
  with pytest.raises(ValueError, match=r"rhs scale .* per output channel"):
    conv(_quantize(x, _int8(PerTensor())),
         _quantize(w, _int8(PerGroup(2, 2))))
  with pytest.raises(ValueError, match="kernel .* must be symmetric"):
    conv(_quantize(x, _int8(PerTensor())),
         _quantize(w, QuantSpec("uint8", PerChannel(-1), symmetric=False)))
