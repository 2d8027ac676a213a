"""`jaxq.gptq`, `jaxq.awq` and `jaxq.smoothquant` (jaxq/ptq/algorithms.py)
under hostile input: NaN/inf in the calibration data (at real positions: a
ValueError naming the layer; at padding only: valid), all-zero data (GPTQ
rounds to nearest, warning), a per-tensor AWQ group, and folds that do not
fit the data flow (a ValueError naming the op)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import PerTensor, QuantSpec
from jaxq.flax import Batch
from test_algorithms import (A8, FOLD, MASK, RULES, W4, _inputs, _linen,
                                 _nnx_result, _nnx_twin, _read_all)

ALGORITHMS = ("gptq", "awq", "smoothquant")


def _cheap(algorithm: str, cal, variables, batches, **options):
  """``algorithm`` with small search grids."""
  if algorithm == "gptq":
    return jaxq.gptq(cal, variables, batches, progress=False, **options)
  if algorithm == "awq":
    return jaxq.awq(cal, variables, batches, num_exponents=3, clip_ratios=0,
                    progress=False, **options)
  return jaxq.smoothquant(cal, variables, batches, alpha=0.5, progress=False,
                          **options)


# NaN and inf in the calibration data.


@pytest.mark.parametrize("algorithm, api, bad", [
    *[(a, api, jnp.nan) for a in ALGORITHMS for api in ("linen", "nnx")],
    ("gptq", "linen", jnp.inf)])
def test_nonfinite_data_at_real_positions_names_the_layer(algorithm, api,
                                                          bad):
  cal, variables = (_linen()[1:] if api == "linen" else (_nnx_twin()[1], None))
  x = _inputs(0).at[1, 2, 5].set(bad)  # A real position (MASK keeps [:, :4]).
  with pytest.raises(ValueError,
                     match=rf"{algorithm}: .*'q'.*NaN or inf at unmasked"):
    _cheap(algorithm, cal, variables, [Batch((x,), {}, MASK)])


# NaN at padding only is valid input, the same variables as on clean data:
# for linen, test_algorithms.py's test_masked_rows_change_nothing (its
# padding holds NaN and huge values, for each algorithm).


def test_nnx_nan_at_padding_only_is_valid_input():
  ncal, clean = _nnx_result("gptq")
  x = _inputs(0).at[:, 4:].set(jnp.nan)
  got = jaxq.gptq(ncal, None, [Batch((x,), {}, MASK)], progress=False)
  read = lambda v: _read_all(jaxq.flax.adapt(ncal, v), v)
  jax.tree.map(np.testing.assert_array_equal, read(got), read(clean))


# All-zero calibration data.


def test_gptq_on_all_zero_data_warns_and_rounds_to_nearest():
  _, cal, params = _linen()
  zeros = jnp.zeros_like(_inputs(0))
  # LayerNorm(0) = its bias = 0: every layer sees only zeros.
  with pytest.warns(UserWarning, match=r"gptq: every calibration input of "
                                       r"'(q|k|down)' is zero") as caught:
    got = jaxq.gptq(cal, params, [zeros], progress=False)
  assert len(caught) == 3
  for path in ("q", "k", "down"):
    kernel = params["params"][path]["kernel"]
    amax = got["quant_fixed"][path]["weight_range"]["amax"]
    # Not zeroed: the kernel rounded to nearest on its stored grid.
    np.testing.assert_allclose(
        got["params"][path]["kernel"],
        jaxq.fake_quant(kernel, W4, amax=amax, range_from_data=True),
        rtol=1e-6, atol=1e-7)
    error = np.linalg.norm(got["params"][path]["kernel"] - kernel)
    assert error < 0.2 * np.linalg.norm(kernel), path


# AWQ with a per-tensor weight spec on a group folded into one op.


def test_awq_per_tensor_group_shares_one_range():
  model, _, params = _linen()
  rules = (jaxq.Rule(".*", weight=QuantSpec("int4", PerTensor()), act=A8),)
  cal = jaxq.quantize_model(model, rules, mode="calibrate")
  x = _inputs(0)
  jax.eval_shape(lambda v: cal.apply(v, x, mutable=["quant_stats"]), params)
  got = jaxq.awq(cal, params, [Batch((x,), {}, MASK)], fold_into=FOLD,
                 num_exponents=3, clip_ratios=3, progress=False)
  q_range = got["quant_fixed"]["q"]["weight_range"]["amax"]
  k_range = got["quant_fixed"]["k"]["weight_range"]["amax"]
  # One scale over the group's concatenated kernels, as the search used.
  assert q_range.shape == k_range.shape == (1, 1)
  np.testing.assert_array_equal(q_range, k_range)
  both = jnp.concatenate([got["params"]["q"]["kernel"],
                          got["params"]["k"]["kernel"]], axis=1)
  assert float(q_range[0, 0]) <= float(jnp.max(jnp.abs(both))) + 1e-6
  out, _ = cal.apply(got, x, mutable=["quant_stats"])
  np.testing.assert_allclose(out, model.apply(params, x), rtol=1e-4,
                             atol=1e-4)


# Folds checked against the data flow.


class _Residual(nn.Module):
  """x -> ln -> up -> relu -> down, plus the residual ln(x) (post-LN)."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln")(x)
    up = nn.Dense(32, name="up")(h)
    return h + nn.Dense(16, name="down")(nn.relu(up))


@pytest.mark.parametrize("algorithm", ["smoothquant", "awq"])
@pytest.mark.parametrize("fold_into, op", [
    ({"k": "q"}, "q"),  # A sibling: q's output is not k's input.
    ({"q": "ln"}, "ln"),  # k reads the LayerNorm too.
])
def test_fold_that_changes_the_float_model_names_the_op(algorithm, fold_into,
                                                        op):
  _, cal, params = _linen()
  with pytest.raises(ValueError, match=rf"{algorithm}: folding into {op!r} "
                                       r"changes the float model"):
    _cheap(algorithm, cal, params, [Batch((_inputs(0),), {}, MASK)],
           fold_into=fold_into)


def test_fold_into_a_norm_feeding_a_residual_names_the_op():
  model = _Residual()
  x = _inputs(0)
  params = model.init(jax.random.key(0), x)
  cal = jaxq.quantize_model(model, RULES, mode="calibrate")
  with pytest.raises(ValueError, match=r"folding into 'ln' changes"):
    jaxq.smoothquant(cal, params, [x], alpha=0.5, fold_into={"up": "ln"},
                     progress=False)
  # Without the fold, up smooths its own input and the function stays.
  smoothed = jaxq.smoothquant(cal, params, [x], alpha=0.5, progress=False)
  out, _ = cal.apply(smoothed, x, mutable=["quant_stats"])
  np.testing.assert_allclose(out, model.apply(params, x), rtol=1e-4,
                             atol=1e-4)


def test_nnx_fold_into_a_sibling_names_the_op():
  _, ncal = _nnx_twin()
  with pytest.raises(ValueError, match=r"smoothquant: folding into 'q'"):
    _cheap("smoothquant", ncal, None, [Batch((_inputs(0),), {}, MASK)],
           fold_into={"k": "q"})
