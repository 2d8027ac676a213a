"""A small depthwise-separable CNN on scikit-learn's bundled digits, in float,
after post-training quantization (PTQ) and after quantization-aware training
(QAT).

Data, model, a deterministic training loop and an evaluation that accepts any
apply function, so the quantized variants of the same model are scored the
same way and appended as rows to the same table.

Data: the 1797 8x8 grayscale digits of `sklearn.datasets.load_digits`, split
stratified and seeded into 1437 train / 360 test images. Images are NHWC
float32 of shape (n, 8, 8, 1) scaled from [0, 16] to [0, 1]; labels are int32
of shape (n,) in [0, 10).

Model (`DigitsCNN`, every module named so rules and folding can address it):

  conv1  3x3 conv, 1 -> 16        bn1  relu
  dw2    3x3 depthwise, 16        bn2  relu
  pw3    1x1 conv, 16 -> 32       bn3  relu   max-pool 2x2 -> (4, 4, 32)
  dw4    3x3 depthwise, 32        bn4  relu
  pw5    1x1 conv, 32 -> 64       bn5  relu   global average pool -> (64,)
  head   dense 64 -> 10 (logits)

Convolutions that feed a BatchNorm have no bias (the folded BatchNorm
supplies it); `CONV_BN_PAIRS` maps each such conv to its BatchNorm.

Training: Adam with cosine decay, softmax cross-entropy, a jit-compiled step
over the batches of a seeded shuffle each epoch. BatchNorm statistics (and any other
non-"params" collection a wrapped model adds) are mutable during training.
XLA on CPU is deterministic, so one seed gives the same parameters and the
same accuracy on every run on the same machine.

Quantization (`quantized_rows`), after folding each BatchNorm into its conv
with `jaxq.fold_batchnorm` (the folded model keeps identity BatchNorms, run
in inference mode):

* PTQ: `jaxq.calibrate` records static per-tensor int8 input ranges (max
  calibration) on training images, `jaxq.convert` quantizes the weights, and
  the serve-mode model runs the int8 convolutions and matmuls. Rows for int8
  and 4-bit (W4A8) weights, per tensor and per output channel (folding puts
  the BatchNorm scales into the weights, so their channels differ widely:
  4-bit per-tensor weights lose the most).
* QAT: the W4A8 per-tensor model, starting from its PTQ calibration,
  fine-tuned in QAT mode with `jaxq.qat.recipe` (Adam, cosine decay from a
  fraction of the float learning rate over a fraction of the float
  schedule), then converted and served like PTQ: the served accuracy is the
  QAT model's, as serving reproduces QAT up to float accumulation order.
  Once with the weights' own ranges, once with learned (LSQ) weight scales
  (``QuantSpec(..., learn="lsq")``, started from the weights' max by
  `jaxq.qat.init_learned`).

The bytes column counts what serving stores (`jaxq.convert`'s report: int4
packed two per byte, scales, the float biases and the identity BatchNorms).

Run: python examples/digits_cnn.py [--epochs N] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from sklearn import datasets, model_selection

import jaxq
import jaxq.qat
from jaxq import PerChannel, PerTensor, QuantSpec

Variables = Mapping[str, Any]
ApplyFn = Callable[[Variables, jax.Array], jax.Array]

NUM_CLASSES = 10
TEST_SIZE = 360
# Conv module path -> the BatchNorm module path that normalises its output,
# "/"-joined like the keys of the model's variable collections.
CONV_BN_PAIRS: dict[str, str] = {
    "conv1": "bn1",
    "dw2": "bn2",
    "pw3": "bn3",
    "dw4": "bn4",
    "pw5": "bn5",
}


class Digits(NamedTuple):
  """The split data set: images (n, 8, 8, 1) float32, labels (n,) int32."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def load_digits(seed: int = 0, test_size: int = TEST_SIZE) -> Digits:
  """Loads the bundled digits as a seeded, stratified train/test split."""
  images, labels = datasets.load_digits(return_X_y=True)
  if not 0 < test_size < len(labels):
    raise ValueError(f"test_size must be in (0, {len(labels)}) for the "
                     f"{len(labels)} digits images, got {test_size}.")
  # The pixels are integer counts in [0, 16].
  images = (images / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
  labels = labels.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      images, labels, test_size=test_size, stratify=labels, random_state=seed)
  return Digits(x_train, y_train, x_test, y_test)


class DigitsCNN(nn.Module):
  """conv -> depthwise-separable x2 -> global pool -> dense; see module doc."""
  num_classes: int = NUM_CLASSES
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps images (n, 8, 8, 1) to logits (n, num_classes)."""

    def conv_bn_relu(x: jax.Array, features: int, kernel: int, conv: str,
                     bn: str, depthwise: bool = False) -> jax.Array:
      groups = x.shape[-1] if depthwise else 1
      x = nn.Conv(features, (kernel, kernel), feature_group_count=groups,
                  use_bias=False, name=conv)(x)
      x = nn.BatchNorm(use_running_average=not train,
                       momentum=self.bn_momentum, name=bn)(x)
      return nn.relu(x)

    x = conv_bn_relu(x, 16, 3, "conv1", "bn1")
    x = conv_bn_relu(x, 16, 3, "dw2", "bn2", depthwise=True)
    x = conv_bn_relu(x, 32, 1, "pw3", "bn3")
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = conv_bn_relu(x, 32, 3, "dw4", "bn4", depthwise=True)
    x = conv_bn_relu(x, 64, 1, "pw5", "bn5")
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyper-parameters of `train`; the defaults reach about 99% test accuracy."""
  epochs: int = 15
  batch_size: int = 32
  learning_rate: float = 1e-2
  seed: int = 0

  def __post_init__(self) -> None:
    for name in ("epochs", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1, got "
                         f"{getattr(self, name)}.")
    if not self.learning_rate > 0:
      raise ValueError(f"TrainConfig.learning_rate must be > 0, got "
                       f"{self.learning_rate}.")


class TrainState(NamedTuple):
  """What one training step carries: params, the mutable collections (e.g.
  batch_stats) and the optimizer state."""
  params: Any
  model_state: Any
  opt_state: optax.OptState


@functools.partial(jax.jit, static_argnames="model")
def init_variables(key: jax.Array, x: jax.Array, *,
                   model: nn.Module) -> dict[str, Any]:
  """Seeded initial variables; one compiled init instead of op-by-op."""
  return model.init(key, x, train=False)


@functools.partial(jax.jit, static_argnames="model")
def predict(variables: Variables, x: jax.Array, *,
            model: nn.Module) -> jax.Array:
  """Inference-mode logits (n, classes) of `model` for images (n, 8, 8, 1)."""
  return model.apply(variables, x, train=False)


def make_apply_fn(model: nn.Module) -> ApplyFn:
  """`predict` bound to `model`: the `(variables, images) -> logits` form."""
  return functools.partial(predict, model=model)


def evaluate(apply_fn: ApplyFn, variables: Variables, x: np.ndarray,
             y: np.ndarray) -> float:
  """Top-1 accuracy in [0, 1] of `apply_fn(variables, x)` logits against `y`.

  `apply_fn` is any `(variables, images (n, ...)) -> logits (n, classes)`
  function: the float model's, or a quantized model's.
  """
  logits = apply_fn(variables, jnp.asarray(x))
  if logits.ndim != 2 or logits.shape[0] != len(y):
    raise ValueError(f"apply_fn must return logits of shape ({len(y)}, "
                     f"classes) for {len(y)} images, got {logits.shape}.")
  return float(jnp.mean(jnp.argmax(logits, axis=-1) == jnp.asarray(y)))


def make_optimizer(config: TrainConfig,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam whose learning rate decays to zero over the run (cosine)."""
  schedule = optax.cosine_decay_schedule(
      config.learning_rate, decay_steps=config.epochs * steps_per_epoch)
  return optax.adam(schedule)


def _loss(params: Any, model_state: Any, x: jax.Array, y: jax.Array, *,
          model: nn.Module) -> tuple[jax.Array, Any]:
  logits, model_state = model.apply(
      {"params": params, **model_state}, x, train=True,
      mutable=list(model_state))
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, model_state


@functools.partial(jax.jit, static_argnames="batch_size")
def shuffled_batches(key: jax.Array, x: jax.Array, y: jax.Array, *,
                     batch_size: int) -> tuple[jax.Array, jax.Array]:
  """A `key`-seeded shuffle of (x, y) cut into (steps, batch_size, ...).

  The remainder that does not fill a batch is dropped: one static batch shape,
  and each epoch's shuffle drops different images.
  """
  steps = x.shape[0] // batch_size
  order = jax.random.permutation(key, x.shape[0])[:steps * batch_size]
  return (x[order].reshape(steps, batch_size, *x.shape[1:]),
          y[order].reshape(steps, batch_size))


# `model` and `config` are static and hashable, so every `train` call with the
# same model, config and data shapes reuses one compiled step. The epoch is a
# Python loop over it: on XLA:CPU a `lax.scan` of this step runs ~2x slower.
@functools.partial(jax.jit, static_argnames=("model", "config",
                                             "steps_per_epoch"))
def train_step(state: TrainState, x: jax.Array, y: jax.Array, *,
               model: nn.Module, config: TrainConfig,
               steps_per_epoch: int) -> tuple[TrainState, jax.Array]:
  """One optimizer step on a batch (batch, 8, 8, 1); returns the batch loss."""
  grad_fn = jax.value_and_grad(functools.partial(_loss, model=model),
                               has_aux=True)
  (loss, model_state), grads = grad_fn(state.params, state.model_state, x, y)
  tx = make_optimizer(config, steps_per_epoch)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(params, model_state, opt_state), loss


def train(data: Digits, config: TrainConfig = TrainConfig(), *,
          model: nn.Module | None = None,
          variables: Variables | None = None,
          progress: bool = True,
          desc: str = "float training") -> tuple[dict[str, Any], float]:
  """Trains `model` on `data.x_train` and scores it on `data.x_test`.

  Args:
    data: the split from `load_digits`.
    config: hyper-parameters and the seed (which drives init and shuffling).
    model: a hashable module called as `model(x, train=...)`; `DigitsCNN()` if
      None. Collections other than "params" are mutable while training.
    variables: where to start (fine-tuning); a fresh seeded init if None.
    progress: show a tqdm bar over epochs.
    desc: the progress bar's label.

  Returns:
    The trained variables and the test accuracy in [0, 1].
  """
  model = DigitsCNN() if model is None else model
  x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  if config.batch_size > x_train.shape[0]:
    raise ValueError(f"TrainConfig.batch_size {config.batch_size} exceeds the "
                     f"{x_train.shape[0]} training images.")
  init_key, shuffle_key = jax.random.split(jax.random.key(config.seed))
  if variables is None:
    variables = init_variables(init_key, x_train[:1], model=model)
  model_state = dict(variables)
  params = model_state.pop("params")
  steps_per_epoch = x_train.shape[0] // config.batch_size
  tx = make_optimizer(config, steps_per_epoch)
  state = TrainState(params, model_state, tx.init(params))
  step = functools.partial(train_step, model=model, config=config,
                           steps_per_epoch=steps_per_epoch)

  with tqdm.trange(config.epochs, desc=desc, unit="epoch",
                   disable=not progress) as epochs:
    for epoch in epochs:
      x_batches, y_batches = shuffled_batches(
          jax.random.fold_in(shuffle_key, epoch), x_train, y_train,
          batch_size=config.batch_size)
      losses = []
      for x, y in zip(x_batches, y_batches):
        state, loss = step(state, x, y)
        losses.append(loss)
      if progress:
        epochs.set_postfix(loss=f"{float(jnp.mean(jnp.stack(losses))):.4f}")
  trained = {"params": state.params, **state.model_state}
  accuracy = evaluate(make_apply_fn(model), trained, data.x_test, data.y_test)
  return trained, accuracy


def tree_bytes(tree: Any) -> int:
  """Bytes of every array leaf: what serving the tree would store.

  For the float model that includes the BatchNorm statistics, which folding
  later removes.
  """
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the results table."""
  name: str
  accuracy: float
  nbytes: int
  seconds: float


def format_table(rows: Sequence[Row]) -> str:
  """The results table; "x smaller" is relative to the first (float) row."""
  if not rows:
    raise ValueError("format_table needs at least one row.")
  width = max(len("model"), *(len(row.name) for row in rows))
  lines = [f"{'model':{width}s} {'accuracy':>9s} {'bytes':>8s} "
           f"{'x smaller':>9s} {'time s':>7s}"]
  for row in rows:
    lines.append(f"{row.name:{width}s} {100 * row.accuracy:8.2f}% "
                 f"{row.nbytes:8d} {rows[0].nbytes / row.nbytes:9.2f} "
                 f"{row.seconds:7.1f}")
  return "\n".join(lines)


# Quantization.

# Static (calibrated) per-tensor int8 inputs for every conv and the head.
ACT_INT8 = QuantSpec("int8", PerTensor(), dynamic=False)
# Name -> weight spec of the quantized rows.
WEIGHTS: dict[str, QuantSpec] = {
    "int8 per-tensor": QuantSpec("int8", PerTensor()),
    "int8 per-channel": QuantSpec("int8", PerChannel(axis=-1)),
    "W4A8 per-channel": QuantSpec("int4", PerChannel(axis=-1)),
    "W4A8 per-tensor": QuantSpec("int4", PerTensor()),
}
LOW_BIT = "W4A8 per-tensor"  # Where PTQ loses most: the setting QAT recovers.


@dataclasses.dataclass(frozen=True)
class QatConfig:
  """The QAT fine-tuning schedule, relative to the float `TrainConfig`.

  The literature's recipe is about 1% of the learning rate over about 10% of
  the schedule; this small model trained for few epochs gets the most from a
  larger share of both (the defaults).
  """
  lr_fraction: float = 0.1
  steps_fraction: float = 0.2
  calibration_images: int = 512

  def __post_init__(self) -> None:
    for name in ("lr_fraction", "steps_fraction"):
      if not 0.0 < getattr(self, name) <= 1.0:
        raise ValueError(f"QatConfig.{name} must be in (0, 1], got "
                         f"{getattr(self, name)}.")
    if self.calibration_images < 1:
      raise ValueError(f"QatConfig.calibration_images must be >= 1, got "
                       f"{self.calibration_images}.")


# --quick: QAT over the whole (short) float schedule at a tenth of its rate.
QUICK_QAT = QatConfig(lr_fraction=0.1, steps_fraction=1.0,
                      calibration_images=256)


def rules_for(weight: QuantSpec) -> tuple[jaxq.Rule, ...]:
  """Every conv and the head: ``weight`` weights, static int8 inputs."""
  return (jaxq.Rule(r".*", weight=weight, act=ACT_INT8),)


def ptq(folded: Variables, rules: Sequence[jaxq.Rule], data: Digits,
        images: int) -> tuple[jaxq.flax.QuantizedLinen, dict[str, Any]]:
  """Calibrates the folded model on the first ``images`` training images.

  Returns the QAT-mode model and the folded variables with the calibrated
  ``quant_ranges``: what QAT starts from and what `serve` converts.
  """
  calibrating = jaxq.quantize_model(DigitsCNN(), rules, "calibrate")
  x = jnp.asarray(data.x_train[:images])
  result = jaxq.calibrate(calibrating, folded, [x], progress=False,
                          forward=lambda model, x: model(x, train=False))
  return (calibrating.with_mode("qat"),
          {**folded, "quant_ranges": result.ranges()})


def serve(qat: jaxq.flax.QuantizedLinen, variables: Variables, data: Digits
          ) -> tuple[float, int]:
  """Converts, runs the serve-mode (integer) model on the test set, and
  returns its accuracy and the serving bytes."""
  serving, report = jaxq.convert(qat, variables,
                                 ranges=variables["quant_ranges"])
  accuracy = evaluate(make_apply_fn(qat.with_mode("serve")), serving,
                      data.x_test, data.y_test)
  return accuracy, report.quantized_bytes


def make_qat_optimizer(config: TrainConfig, qat_config: QatConfig,
                       original_steps: int) -> optax.GradientTransformation:
  """`jaxq.qat.recipe` relative to the float run's rate and length."""
  return jaxq.qat.recipe(config.learning_rate, original_steps,
                         lr_fraction=qat_config.lr_fraction,
                         steps_fraction=qat_config.steps_fraction)


@functools.partial(jax.jit, static_argnames=("qat", "config", "qat_config",
                                             "original_steps"))
def qat_step(params: Any, frozen: Variables, opt_state: optax.OptState,
             x: jax.Array, y: jax.Array, *, qat: jaxq.flax.QuantizedLinen,
             config: TrainConfig, qat_config: QatConfig,
             original_steps: int) -> tuple[Any, optax.OptState]:
  """One QAT step; the folded BatchNorms run in inference mode."""

  def loss_fn(params):
    logits = qat.apply({"params": params, **frozen}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  tx = make_qat_optimizer(config, qat_config, original_steps)
  updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def finetune_qat(qat: jaxq.flax.QuantizedLinen, variables: Variables,
                 data: Digits, config: TrainConfig, qat_config: QatConfig,
                 progress: bool = False) -> dict[str, Any]:
  """Fine-tunes the params of a QAT-mode model with `jaxq.qat.recipe`.

  The folded BatchNorms stay in inference mode (``train=False``); the
  calibrated ``quant_ranges`` stay fixed. The shuffle is seeded by
  ``config.seed``.
  """
  x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  steps_per_epoch = x_train.shape[0] // config.batch_size
  original_steps = config.epochs * steps_per_epoch
  num_steps = jaxq.qat.finetune_steps(original_steps,
                                      qat_config.steps_fraction)
  frozen = {k: v for k, v in variables.items() if k != "params"}
  step = functools.partial(qat_step, qat=qat, config=config,
                           qat_config=qat_config,
                           original_steps=original_steps)
  params = variables["params"]
  opt_state = make_qat_optimizer(config, qat_config,
                                 original_steps).init(params)
  shuffle_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  epochs = -(-num_steps // steps_per_epoch)
  done = 0
  for epoch in tqdm.trange(epochs, desc="QAT", unit="epoch",
                           disable=not progress):
    x_batches, y_batches = shuffled_batches(
        jax.random.fold_in(shuffle_key, epoch), x_train, y_train,
        batch_size=config.batch_size)
    for x, y in zip(x_batches[:num_steps - done], y_batches[:num_steps - done]):
      params, opt_state = step(params, frozen, opt_state, x, y)
    done = min(num_steps, done + steps_per_epoch)
  return {**variables, "params": params}


def quantized_rows(variables: Variables, data: Digits, config: TrainConfig,
                   qat_config: QatConfig = QatConfig(),
                   progress: bool = False) -> list[Row]:
  """The PTQ rows of `WEIGHTS` after BatchNorm folding, then QAT at `LOW_BIT`
  (fixed weight ranges, then learned LSQ weight scales).

  Args:
    variables: the trained float variables.
    data: the split.
    config: the float training config (QAT's schedule is relative to it).
    qat_config: the QAT schedule and the calibration set size.
    progress: show a progress bar while fine-tuning.

  Returns:
    A `Row` per PTQ setting, named ``"PTQ <setting>"``, then
    ``"QAT <LOW_BIT>"`` and ``"QAT <LOW_BIT> LSQ"``; accuracies are the
    serve-mode model's.
  """
  # model= and batch=: each BatchNorm's own epsilon is read from the model.
  folded = jaxq.fold_batchnorm(variables, CONV_BN_PAIRS, model=DigitsCNN(),
                               batch=data.x_train[:1])
  rows = []
  for name, weight in WEIGHTS.items():
    start = time.perf_counter()
    qat, calibrated = ptq(folded, rules_for(weight), data,
                          qat_config.calibration_images)
    accuracy, nbytes = serve(qat, calibrated, data)
    rows.append(Row(f"PTQ {name}", accuracy, nbytes,
                    time.perf_counter() - start))
  for suffix, weight in (("", WEIGHTS[LOW_BIT]),
                         (" LSQ", WEIGHTS[LOW_BIT].replace(learn="lsq"))):
    start = time.perf_counter()
    qat, calibrated = ptq(folded, rules_for(weight), data,
                          qat_config.calibration_images)
    if weight.learn is not None:
      calibrated = jaxq.qat.init_learned(
          qat, calibrated, jnp.asarray(data.x_train[:1]), train=False)
    tuned = finetune_qat(qat, calibrated, data, config, qat_config, progress)
    accuracy, nbytes = serve(qat, tuned, data)
    rows.append(Row(f"QAT {LOW_BIT}{suffix}", accuracy, nbytes,
                    time.perf_counter() - start))
  return rows


def main(argv: Sequence[str] | None = None) -> None:
  """Trains the float model, quantizes it and prints the results table."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=TrainConfig.epochs,
                      help="float training epochs")
  parser.add_argument("--quick", action="store_true",
                      help="a few epochs: a smoke run in seconds")
  parser.add_argument("--seed", type=int, default=TrainConfig.seed)
  parser.add_argument("--no-progress", action="store_true",
                      help="hide the progress bars")
  args = parser.parse_args(argv)
  config = TrainConfig(epochs=2 if args.quick else args.epochs, seed=args.seed)

  data = load_digits(seed=config.seed)
  # One Row per model variant; the first is the float baseline that
  # "x smaller" is measured against.
  rows: list[Row] = []
  start = time.perf_counter()
  variables, accuracy = train(data, config, progress=not args.no_progress)
  rows.append(Row("float32", accuracy, tree_bytes(variables),
                  time.perf_counter() - start))
  rows += quantized_rows(variables, data, config,
                         QUICK_QAT if args.quick else QatConfig(),
                         progress=not args.no_progress)

  num_params = sum(p.size for p in jax.tree.leaves(variables["params"]))
  print(f"DigitsCNN: {num_params} params; {len(data.y_train)} train / "
        f"{len(data.y_test)} test images; {config.epochs} epochs, "
        f"seed {config.seed}")
  print(format_table(rows))


if __name__ == "__main__":
  main()
