"""Tests of the float half of `examples/digits_cnn.py`.

Training runs a couple of epochs on the real digits (one compiled step,
shared by every test here through the jit cache): an accuracy floor far below
what the run reaches, bit-identical parameters across runs with one seed, and
the structure that BatchNorm folding and quantization rules rely on.

examples/ptq.ipynb runs last, in this process: its quick mode trains with
the same configuration, so it reuses the compiled training step.
"""

from __future__ import annotations

import pathlib
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import datasets

import jaxq

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
import digits_cnn  # noqa: E402
import notebook_runner  # noqa: E402

QUICK = digits_cnn.TrainConfig(epochs=2, seed=0)


@pytest.fixture(scope="module")
def data() -> digits_cnn.Digits:
  return digits_cnn.load_digits(seed=0)


@pytest.fixture(scope="module")
def trained(data) -> tuple[dict, float]:
  return digits_cnn.train(data, QUICK, progress=False)


def test_split_shapes_dtypes_and_range(data):
  x_train, y_train, x_test, y_test = data
  assert x_train.shape == (1437, 8, 8, 1) and x_test.shape == (360, 8, 8, 1)
  assert y_train.shape == (1437,) and y_test.shape == (360,)
  assert x_train.dtype == np.float32 and y_train.dtype == np.int32
  assert x_train.min() == 0.0 and x_train.max() == 1.0
  assert set(np.unique(y_test)) == set(range(10))


def test_split_is_stratified_and_partitions_the_data(data):
  x_train, y_train, x_test, y_test = data
  counts = np.bincount(np.concatenate([y_train, y_test]), minlength=10)
  expected_test = counts * len(y_test) / counts.sum()
  np.testing.assert_array_less(
      np.abs(np.bincount(y_test, minlength=10) - expected_test), 1.0 + 1e-9)
  # Every image lands in exactly one side: the union is the whole data set.
  images = datasets.load_digits().images.reshape(-1, 64) / 16.0
  ours = np.concatenate([x_train, x_test]).reshape(-1, 64)
  # Compared as multisets of rows: duplicates must keep their counts.
  for got, want in zip(np.unique(ours, axis=0, return_counts=True),
                       np.unique(images.astype(np.float32), axis=0,
                                 return_counts=True)):
    np.testing.assert_array_equal(got, want)


def test_split_depends_on_seed(data):
  other = digits_cnn.load_digits(seed=1)
  assert not np.array_equal(other.y_test, data.y_test)
  np.testing.assert_array_equal(digits_cnn.load_digits(seed=0).x_test,
                                data.x_test)


def test_load_digits_rejects_bad_test_size():
  with pytest.raises(ValueError, match="test_size"):
    digits_cnn.load_digits(test_size=1797)


def test_conv_bn_pairs_name_real_modules(trained):
  variables, _ = trained
  params, stats = variables["params"], variables["batch_stats"]
  assert set(params) == set(digits_cnn.CONV_BN_PAIRS) | set(
      digits_cnn.CONV_BN_PAIRS.values()) | {"head"}
  for conv, bn in digits_cnn.CONV_BN_PAIRS.items():
    kernel = params[conv]["kernel"]
    assert "bias" not in params[conv]  # the folded BatchNorm supplies it
    for leaf in (params[bn]["scale"], params[bn]["bias"], stats[bn]["mean"],
                 stats[bn]["var"]):
      assert leaf.shape == (kernel.shape[-1],)
  # Depthwise kernels (h, w, in / groups = 1, out = in): one filter a channel.
  assert params["dw2"]["kernel"].shape == (3, 3, 1, 16)
  assert params["dw4"]["kernel"].shape == (3, 3, 1, 32)


def test_short_training_clears_accuracy_floor(trained, data):
  variables, accuracy = trained
  # Two epochs reach about 95%; chance is 10%.
  assert accuracy > 0.85
  logits = digits_cnn.predict(variables, data.x_test,
                              model=digits_cnn.DigitsCNN())
  reference = np.argmax(np.asarray(logits), axis=-1)
  assert accuracy == pytest.approx(np.mean(reference == data.y_test))


def test_training_is_deterministic(trained, data):
  variables, accuracy = trained
  again, again_accuracy = digits_cnn.train(data, QUICK, progress=False)
  chex.assert_trees_all_equal(variables, again)
  assert accuracy == again_accuracy


def test_evaluate_scores_any_apply_fn():
  # A classifier that predicts the first pixel's value: right on 7 of 10.
  predictions = np.arange(10)
  labels = np.where(np.arange(10) < 7, predictions, (predictions + 1) % 10)
  x = np.zeros((10, 8, 8, 1), np.float32)
  x[:, 0, 0, 0] = predictions

  def apply_fn(variables, x):
    return variables["gain"] * jax.nn.one_hot(x[:, 0, 0, 0].astype(int), 10)

  assert digits_cnn.evaluate(apply_fn, {"gain": 2.0}, x, labels) == (
      pytest.approx(np.mean(predictions == labels)))
  assert digits_cnn.evaluate(apply_fn, {"gain": 2.0}, x, predictions) == 1.0


def test_evaluate_rejects_misshaped_logits():
  with pytest.raises(ValueError, match=r"logits of shape \(4, classes\)"):
    digits_cnn.evaluate(lambda v, x: jnp.zeros((3, 10)), {},
                        np.zeros((4, 8, 8, 1)), np.zeros(4, np.int32))


@pytest.mark.parametrize("field, value", [("epochs", 0), ("batch_size", 0),
                                          ("learning_rate", 0.0)])
def test_train_config_rejects_bad_values(field, value):
  with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
    digits_cnn.TrainConfig(**{field: value})


def test_train_rejects_batch_larger_than_data(data):
  with pytest.raises(ValueError, match="batch_size 5000 exceeds the 1437"):
    digits_cnn.train(data, digits_cnn.TrainConfig(batch_size=5000),
                     progress=False)


def test_tree_bytes_counts_every_leaf(trained):
  variables, _ = trained
  leaves = jax.tree.leaves(variables)
  assert digits_cnn.tree_bytes(variables) == 4 * sum(x.size for x in leaves)


def test_format_table_rows_relative_to_first():
  rows = [digits_cnn.Row("float32", 0.99, 4000, 1.0),
          digits_cnn.Row("int8 per-channel", 0.985, 1000, 2.0)]
  lines = digits_cnn.format_table(rows).splitlines()
  assert len(lines) == 3
  assert lines[1].split() == ["float32", "99.00%", "4000", "1.00", "1.0"]
  assert lines[2].split()[-4:] == ["98.50%", "1000", "4.00", "2.0"]
  with pytest.raises(ValueError, match="at least one row"):
    digits_cnn.format_table([])


def test_main_quick_prints_float_row(trained, quantized, data, capsys,
                                     monkeypatch):
  variables, accuracy = trained
  # main's training and quantization are the fixtures' calls (training is
  # deterministic, see test_training_is_deterministic): answered from them,
  # once each, after checking that main asks for exactly those.
  calls = []

  def train(main_data, config, progress):
    calls.append("train")
    np.testing.assert_array_equal(main_data.x_train, data.x_train)
    np.testing.assert_array_equal(main_data.y_test, data.y_test)
    assert config == QUICK and progress is False
    return trained

  def quantized_rows(main_variables, main_data, config, qat_config,
                     progress):
    calls.append("quantized_rows")
    assert main_variables is variables
    np.testing.assert_array_equal(main_data.x_test, data.x_test)
    assert config == QUICK and qat_config == digits_cnn.QUICK_QAT
    assert progress is False
    return list(quantized.values())

  monkeypatch.setattr(digits_cnn, "train", train)
  monkeypatch.setattr(digits_cnn, "quantized_rows", quantized_rows)
  digits_cnn.main(["--quick", "--no-progress"])
  assert calls == ["train", "quantized_rows"]
  out, err = capsys.readouterr()
  float_row = next(line for line in out.splitlines()
                   if line.startswith("float32"))
  assert float_row.split()[1] == f"{100 * accuracy:.2f}%"
  # The quantized rows too, as quantized_rows computed them.
  for name, row in quantized.items():
    line = next(line for line in out.splitlines() if line.startswith(name))
    assert line[len(name):].split()[:2] == [f"{100 * row.accuracy:.2f}%",
                                             str(row.nbytes)]
  assert err == ""  # no progress bar when asked for none


# Quantization rows.

@pytest.fixture(scope="module")
def quantized(trained, data) -> dict[str, digits_cnn.Row]:
  variables, _ = trained
  rows = digits_cnn.quantized_rows(variables, data, QUICK,
                                   digits_cnn.QUICK_QAT)
  return {row.name: row for row in rows}


def test_quantized_rows_names_and_bytes(quantized, trained):
  assert list(quantized) == [
      "PTQ int8 per-tensor", "PTQ int8 per-channel", "PTQ W4A8 per-channel",
      "PTQ W4A8 per-tensor", "QAT W4A8 per-tensor",
      "QAT W4A8 per-tensor LSQ"]
  float_bytes = digits_cnn.tree_bytes(trained[0])
  int8, int4 = quantized["PTQ int8 per-channel"], quantized[
      "PTQ W4A8 per-channel"]
  assert int4.nbytes < int8.nbytes < 0.5 * float_bytes
  # Per-channel weights store one float32 scale per output channel more.
  assert quantized["PTQ int8 per-tensor"].nbytes < int8.nbytes
  assert (quantized["QAT W4A8 per-tensor"].nbytes ==
          quantized["PTQ W4A8 per-tensor"].nbytes)


def test_int8_ptq_keeps_accuracy(quantized, trained):
  _, float_accuracy = trained
  for name in ("PTQ int8 per-tensor", "PTQ int8 per-channel"):
    assert quantized[name].accuracy > float_accuracy - 0.02, name


def test_folded_kernels_need_a_4_bit_scale_per_channel(trained, data):
  # Folding puts the BatchNorm scales into the weights, so the kernels'
  # output channels differ in range: per tensor, a conv kernel's int4 error
  # is well above its per-channel error. (On this small CNN, trained two
  # epochs, the int4 accuracies of the two are within a point since int4
  # uses the full [-8, 7] range.)
  variables, _ = trained
  folded = jaxq.fold_batchnorm(variables, digits_cnn.CONV_BN_PAIRS,
                               model=digits_cnn.DigitsCNN(),
                               batch=data.x_train[:1])
  for conv in digits_cnn.CONV_BN_PAIRS:
    kernel = folded["params"][conv]["kernel"]
    error = {name: float(jnp.mean((jaxq.fake_quant(kernel, spec) - kernel)
                                  ** 2))
             for name, spec in digits_cnn.WEIGHTS.items() if "W4A8" in name}
    assert error["W4A8 per-tensor"] > 1.5 * error["W4A8 per-channel"], conv


def test_qat_recovers_what_4_bit_ptq_loses(quantized, trained):
  _, float_accuracy = trained
  ptq = quantized["PTQ W4A8 per-tensor"].accuracy
  assert ptq < float_accuracy - 0.03  # PTQ clearly loses accuracy...
  for name in ("QAT W4A8 per-tensor", "QAT W4A8 per-tensor LSQ"):
    qat = quantized[name].accuracy
    # ...and QAT wins most of it back.
    assert qat - ptq > 0.5 * (float_accuracy - ptq), name


@pytest.mark.parametrize("field, value", [("lr_fraction", 0.0),
                                          ("steps_fraction", 1.5),
                                          ("calibration_images", 0)])
def test_qat_config_rejects_bad_values(field, value):
  with pytest.raises(ValueError, match=f"QatConfig.{field}"):
    digits_cnn.QatConfig(**{field: value})


# Last: the notebook reuses what the tests above compiled.
def test_ptq_notebook_quick_run(trained):
  notebook = notebook_runner.run_notebook("ptq.ipynb")
  variables, accuracy = trained
  # Its float model is this module's, trained deterministically (QUICK).
  assert digits_cnn.TrainConfig(epochs=notebook["EPOCHS"]) == QUICK
  assert notebook["float_accuracy"] == accuracy
  chex.assert_trees_all_equal(notebook["variables"], variables)
  # Every calibration method served, at the histograms' and the
  # sensitivity table's end.
  assert notebook["result"].methods == notebook["METHODS"]
  assert (notebook["PLOTS"] / "histograms.png").stat().st_size > 0
  assert (notebook["PLOTS"] / "sensitivity.png").stat().st_size > 0
