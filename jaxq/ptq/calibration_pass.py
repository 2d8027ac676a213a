"""`calibrate`: the jit-compiled post-training calibration pass.

```python
cal = jaxq.quantize_model(model, rules, mode="calibrate")
result = jaxq.calibrate(cal, variables, batches)     # linen or nnx
serving, report = jaxq.convert(serve, variables, result.stats)

# One histogram pass, several ways to pick the ranges (keep the best):
result = jaxq.calibrate(cal, variables, batches,
                        methods=("max", "entropy", "percentile:99.99",
                                 "percentile:99.999", "mse"))
for method in result.methods:
  serving, _ = jaxq.convert(serve, variables, ranges=result.ranges(method))
  ...  # evaluate, keep the best method
```

What one pass does: each batch goes through the calibrate-mode model in one
jitted step ``(stats, batch) -> stats`` that runs the float forward and
folds every matched layer's weight into a max observer and, for static act
specs (``dynamic=False``), its input activation into the act observer; for a
weight spec with ``calibration="mse"``, its input's per-channel sum of
squares (an `InputMoment`, for `jaxq.convert`'s output-error range search,
see `jaxq.flax.core`).
Dynamic act specs record nothing: their ranges are taken per batch when
serving, so one model can mix static and dynamic layers rule by rule. The
step is compiled once for all batches of one shape: the stats start from
empty observer states with the shapes of the first batch's (found with
``jax.eval_shape``, which traces but compiles nothing), so their pytree is
the same before and after every step. A batch sharded over devices needs
nothing more: the observers' reductions inside the jitted step are global.

Padding: a `jaxq.flax.Batch` with a ``mask`` (True at real positions, the
shape of the layer inputs' leading axes, e.g. a ``(batch, seq)`` attention
mask) keeps its padding out of every act statistic: the step hands the
mask to each static act layer's observer (`jaxq.flax.calibration_mask`),
so max ranges, histograms and the ranges every method picks from them are
those of the real positions alone, and NaN/inf at padding are not counted.
A layer whose input does not start with the mask's axes (after pooling)
raises, naming it. Batches without a mask run the unmasked observers.

``stats`` is what the model itself records: linen's ``"quant_stats"``
collection (``{path...: {"weight": state, "act": state}}``) or the nnx
``State`` of `jaxq.flax.QuantStat` variables; `jaxq.act_ranges` and
`jaxq.convert` consume it as they consume stats recorded by hand.

Several methods from one pass (``methods``): every static act layer then
records the state of the first histogram method (a `HistogramState`; a
``max``-only list records max states), and `CalibrationResult.ranges`
finalizes that same state with each method's ``finalize``. The histogram
keeps the exact running max and per-bin counts whose range grows without
losing counts (`jaxq.calibration.histogram`), so every method sees exactly
what a pass of its own would have recorded: the ranges are identical.

Non-finite values: the observers skip NaN/inf and count them. After every
batch the host reads the per-layer counts of the act observers (one small
transfer, one batch behind so the device keeps working) and, unless the
user asked to count them, raises a ValueError naming the batch and each
layer whose input held NaN or inf.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import (Any, Callable, Iterable, Iterator, Mapping, Sequence,
                    Sized)

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from jaxq import calibration
from jaxq import flax as jaxq_flax
from jaxq.algorithms.stats import InputMoment
from jaxq.flax import checks
from jaxq.flax import core
from jaxq.flax.adapter import CalibrationPass
from jaxq.flax.adapter import ModelAdapter
from jaxq.flax.batch import call_model
from jaxq.granularity import PerChannel
from jaxq.granularity import PerTensor
from jaxq.spec import QuantSpec

Forward = Callable[[Any, Any], Any]
# A model from `jaxq.quantize_model`: a `QuantizedLinen` or an nnx module.
QuantizedModel = Any
Methods = Sequence[str] | Mapping[str, calibration.Observer]

# A stand-in spec and input that every jaxq observer can initialise from, to
# learn which kind of state an observer keeps (see `_recording_observer`).
_PROBE_SPEC = QuantSpec("int8", dynamic=False)
_PROBE_INPUT = jax.ShapeDtypeStruct((1,), jnp.float32)


# Methods.


def _named_observer(name: str, num_bins: int) -> calibration.Observer:
  """The observer a method name (see `calibrate`) stands for."""
  kind, _, arg = name.partition(":")
  if kind == "max" and not arg:
    return calibration.max()
  if kind == "entropy" and not arg:
    return calibration.entropy(num_bins=num_bins)
  if kind == "mse" and not arg:
    return calibration.mse(num_bins=num_bins)
  if kind == "percentile":
    try:
      q = float(arg) if arg else QuantSpec.percentile
    except ValueError:
      q = None
    if q is not None:
      return calibration.percentile(q, num_bins=num_bins)
  raise ValueError(
      f"calibrate: unknown method {name!r}; expected 'max', 'entropy', "
      f"'mse', 'percentile' or 'percentile:Q' (e.g. 'percentile:99.99'), or "
      f"pass a dict of name -> jaxq.observers.Observer.")


def _observers(methods: Methods, num_bins: int
               ) -> dict[str, calibration.Observer]:
  if isinstance(methods, str):
    raise ValueError(f"calibrate: methods must be a sequence of names or a "
                     f"dict of observers, got the string {methods!r} (write "
                     f"({methods!r},)).")
  if isinstance(methods, Mapping):
    observers = dict(methods)
    bad = [n for n, o in observers.items()
           if not isinstance(o, calibration.Observer)]
    if bad:
      raise ValueError(f"calibrate: methods {bad} are not observers; build "
                       f"them with jaxq.observers (max, percentile, entropy, "
                       f"mse).")
  else:
    observers = {name: _named_observer(name, num_bins) for name in methods}
  if not observers:
    raise ValueError("calibrate: methods is empty; pass None to use each "
                     "rule's own calibration, or name at least one method.")
  return observers


def _recording_observer(observers: Mapping[str, calibration.Observer]
                        ) -> calibration.Observer:
  """The observer whose state every method in ``observers`` finalizes.

  The first histogram observer's, when there is one (`max` finalizes a
  histogram state too); otherwise the first observer's. Histogram methods
  must agree on the number of bins.
  """
  probes = {name: obs.init(_PROBE_INPUT, _PROBE_SPEC)
            for name, obs in observers.items()}
  bins = {name: state.num_bins for name, state in probes.items()
          if isinstance(state, calibration.HistogramState)}
  if len(set(bins.values())) > 1:
    raise ValueError(
        f"calibrate: the histogram methods must share one histogram to be "
        f"finalized from one pass, but their bin counts differ: {bins}.")
  return observers[next(iter(bins), next(iter(observers)))]


# Observer states.


def _empty_state(state: Any) -> Any:
  """The state of ``state``'s observer before any data, with its shapes.

  Histograms and input moments start all zero (counts, range, max,
  non-finite count; row count, sums of squares); max
  states start from 0 (symmetric) or from the identities of max and min,
  ``-inf`` and ``+inf`` (affine), as `jaxq.calibration` documents.
  """
  zeros = lambda a: jnp.zeros(a.shape, a.dtype)
  if isinstance(state, (calibration.HistogramState, InputMoment)):
    return jax.tree.map(zeros, state)
  if isinstance(state, calibration.MaxState):
    if state.amin is None:
      return jax.tree.map(zeros, state)
    return dataclasses.replace(
        state, amax=jnp.full(state.amax.shape, -jnp.inf, state.amax.dtype),
        amin=jnp.full(state.amin.shape, jnp.inf, state.amin.dtype),
        nonfinite=zeros(state.nonfinite))
  raise ValueError(
      f"calibrate: cannot start an observer state of type "
      f"{type(state).__name__} empty; observers must keep a MaxState or a "
      f"HistogramState (build them with jaxq.observers).")


def _placed_like(stats: Any, batch: Any) -> Any:
  """``stats`` replicated over the mesh of a sharded ``batch``.

  The jitted step returns the stats replicated over the batch's devices; the
  first step must get them placed that way too, or it compiles twice.
  """
  for leaf in jax.tree.leaves(batch):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return jax.device_put(stats, NamedSharding(sharding.mesh,
                                                 PartitionSpec()))
  return stats


def _is_state(x: Any) -> bool:
  return isinstance(x, (calibration.MaxState, calibration.HistogramState,
                        InputMoment))


def _check_recorded(act_states: Mapping[str, Any],
                    recorder: calibration.Observer,
                    observers: Mapping[str, calibration.Observer]) -> None:
  """Raises, naming the layers, where the methods' shared state is impossible."""
  wanted = type(recorder.init(_PROBE_INPUT, _PROBE_SPEC))
  bad = {p: s.spec for p, s in act_states.items()
         if not isinstance(s, wanted)}
  if bad:
    raise ValueError(
        f"calibrate: methods {tuple(observers)} share one {wanted.__name__} "
        f"per layer, which these layers' act specs cannot have: {bad}. "
        f"Histograms need a symmetric per-tensor or per-channel spec; "
        f"calibrate the other layers with rules of their own (e.g. "
        f"calibration='max') and methods=None.")


# The pass.


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
  """What `calibrate` recorded, and the ranges each method picks from it.

  Attributes:
    model: the calibrated model (from `jaxq.quantize_model`).
    stats: linen: the ``"quant_stats"`` collection; nnx: a ``State`` of
      `jaxq.flax.QuantStat` variables. `jaxq.convert` and `jaxq.act_ranges`
      take it and finalize every static act state with its rule's own
      calibration method (``spec.calibration``).
    observers: method name -> observer, for the methods `calibrate` was
      asked for (empty when ``methods=None``).
    nonfinite: module path -> the number of NaN/inf input values each
      static act layer skipped (all zero unless ``on_nonfinite="count"``).
    num_batches: how many batches the pass saw.
  """

  model: Any
  stats: Any
  observers: Mapping[str, calibration.Observer]
  nonfinite: Mapping[str, int]
  num_batches: int

  @property
  def methods(self) -> tuple[str, ...]:
    """The method names, in the order they were given."""
    return tuple(self.observers)

  def ranges(self, method: str | None = None) -> Any:
    """The static activation ranges that ``method`` picks from the stats.

    Args:
      method: one of `methods`, or None for each rule's own calibration
        (the same as ``jaxq.act_ranges(model, stats)``).

    Returns:
      What `jaxq.act_ranges` returns: linen, a ``"quant_ranges"`` collection;
      nnx, a ``State`` of `jaxq.flax.QuantRange` variables (for
      ``nnx.update``). Pass it to ``jaxq.convert(..., ranges=...)``. Static
      KV cache ranges (`jaxq.flax.kv_cache`) are there too, by max for
      every method.
    """
    if method is None:
      return jaxq_flax.act_ranges(self.model, self.stats)
    if method not in self.observers:
      raise ValueError(f"CalibrationResult.ranges: unknown method {method!r}; "
                       f"this pass has {self.methods}.")
    observer = self.observers[method]
    adapter = jaxq_flax.adapt(self.model, what="CalibrationResult.ranges")
    return adapter.with_kv_ranges(adapter.ranges_from({
        path: core.finalize_range(observer, state, path)
        for path, state in adapter.act_states(self.stats).items()}),
                                  self.stats)


def _first(batches: Iterable[Any]) -> tuple[Any, Iterator[Any]]:
  iterator = iter(batches)
  try:
    first = next(iterator)
  except StopIteration:
    raise ValueError("calibrate: the batch iterator is empty; calibration "
                     "needs at least one batch of representative data.") from None
  return first, itertools.chain([first], iterator)


def _raise_nonfinite(index: int, new: np.ndarray,
                     paths: Sequence[str]) -> None:
  where = ", ".join(f"{p!r} ({int(n)})"
                    for p, n in zip(paths, new) if n > 0)
  raise ValueError(
      f"calibrate: batch {index} holds non-finite values (NaN or inf); "
      f"count per layer input: {where}. Fix the data, or pass "
      f"on_nonfinite='count' to skip and count them.")


def _check_weights(adapter: ModelAdapter, what: str) -> None:
  """Raises naming the layer and parameter if a weight that a rule quantizes
  holds NaN or inf (quantized, it would become finite numbers)."""
  if adapter.variables is None:
    return
  for info in adapter.layers().values():
    if info.weight is not None:
      checks.check_finite_weight(what, info.path, info.weight_name,
                                 adapter.read(info.path, info.weight_name))


def _build(adapter: ModelAdapter, batch: Any,
           observers: Mapping[str, calibration.Observer],
           forward: Forward) -> CalibrationPass:
  """The calibration pass of ``adapter``'s model, its stats empty and placed
  like ``batch``."""
  settings = adapter.settings()
  if settings.mode != "calibrate":
    raise ValueError(f"calibrate: expected a model from jaxq.quantize_model("
                     f"..., mode='calibrate'), got mode {settings.mode!r}.")
  observer_for: core.ObserverFor = settings.observer_for
  if observers:
    recorder = _recording_observer(observers)
    histogram = isinstance(recorder.init(_PROBE_INPUT, _PROBE_SPEC),
                           calibration.HistogramState)

    def shared_observer(spec: QuantSpec) -> calibration.Observer:
      # Layers that cannot keep the shared state record a max state for
      # now, so that `_check_recorded` can name them.
      if histogram and (not spec.symmetric or not isinstance(
          spec.granularity, (PerTensor, PerChannel))):
        return calibration.max()
      return recorder

    observer_for = shared_observer

  calibration_pass = adapter.calibration_pass(batch, forward, observer_for)
  _check_weights(adapter, "calibrate")  # The layers are known now (linen).
  stats = jax.tree.map(_empty_state, calibration_pass.stats, is_leaf=_is_state)
  if observers:
    _check_recorded(adapter.act_states(stats), recorder, observers)
  return dataclasses.replace(calibration_pass,
                             stats=_placed_like(stats, batch))


def calibration_step(qmodel: QuantizedModel,
                     variables: Any, batch: Any,
                     methods: Methods | None = None, *,
                     forward: Forward | None = None,
                     num_bins: int = calibration.observers.DEFAULT_NUM_BINS
                     ) -> tuple[Callable[[Any, Any], tuple[Any, jax.Array]],
                                Any]:
  """The jitted step `calibrate` runs, for loops of one's own.

  Arguments as for `calibrate`; ``batch`` is an example batch (only its
  shapes are used).

  Returns:
    ``(step, stats)``: the empty stats, and ``step(stats, batch) -> (stats,
    nonfinite)``, jitted (compiled once per batch shape), ``nonfinite`` the
    int32 running NaN/inf counts of the static act layers. NaN/inf are
    always skipped and counted here; nothing is raised.
  """
  observers = {} if methods is None else _observers(methods, num_bins)
  calibration_pass = _build(
      jaxq_flax.adapt(qmodel, variables, what="calibrate"), batch, observers,
      forward or call_model)
  return calibration_pass.step, calibration_pass.stats


def calibrate(qmodel: QuantizedModel, variables: Any,
              batches: Iterable[Any], methods: Methods | None = None,
              progress: bool = True, *, forward: Forward | None = None,
              on_nonfinite: core.OnNonfinite | None = None,
              num_bins: int = calibration.observers.DEFAULT_NUM_BINS
              ) -> CalibrationResult:
  """Runs the jit-compiled calibration pass over ``batches``.

  Args:
    qmodel: a model from ``jaxq.quantize_model(..., mode="calibrate")``.
    variables: linen: the model's variables ``{"params": ...}``; nnx: an
      ``nnx.State`` to load into (a copy of) the model, or None to use its
      own.
    batches: an iterable of batches (arrays, tuples, mappings or
      `jaxq.flax.Batch`es of arrays, sharded or not; see ``forward``);
      every batch of one shape runs the same compiled step.
    methods: None to record each static act layer with its rule's own
      calibration (``spec.calibration``). Or method names, ``"max"``,
      ``"entropy"``, ``"mse"``, ``"percentile:Q"`` (``"percentile"`` is
      ``q=99.99``), or a dict name -> observer: one pass then records a
      state that every method finalizes, see `CalibrationResult.ranges`.
    progress: show a tqdm progress bar (on a terminal; tqdm stays silent
      when stderr is not one). False: print nothing.
    forward: ``(model, batch) -> output``, how a batch runs through the
      model: for linen ``model`` is ``apply`` with the variables bound (call
      it as ``model(x, method=..., train=False)``), for nnx the module.
      Default: `jaxq.flax.batch.call_model`, the batch convention of every
      workflow (an array is the one positional argument, a tuple the
      positional arguments, a mapping the keyword arguments, a
      `jaxq.flax.Batch` both). A `jaxq.flax.Batch`'s mask keeps padding
      out of the statistics with either (see the module docstring).
    on_nonfinite: ``"raise"`` a ValueError naming the batch and the layers
      whose input holds NaN or inf, or ``"count"`` them (skipped; see
      `CalibrationResult.nonfinite`). Default: the model's setting.
    num_bins: the histogram size of the named histogram methods.

  Returns:
    A `CalibrationResult`: ``stats`` for `jaxq.convert`, and ``ranges(m)``
    for each method ``m``.

  Raises:
    ValueError: for an empty ``batches``, a model not in calibrate mode,
      unknown methods, methods whose shared state a layer's spec cannot
      have (naming the layers), a batch mask that does not match a layer's
      input (naming the layer and both shapes), or non-finite inputs
      (naming the batch and the layers) unless they are counted.
  """
  return calibrate_adapter(
      jaxq_flax.adapt(qmodel, variables, what="calibrate"), batches, methods,
      progress, forward=forward, on_nonfinite=on_nonfinite,
      num_bins=num_bins, model=qmodel)


def calibrate_adapter(adapter: ModelAdapter, batches: Iterable[Any],
                      methods: Methods | None = None, progress: bool = True,
                      *, forward: Forward | None = None,
                      on_nonfinite: core.OnNonfinite | None = None,
                      num_bins: int = calibration.observers.DEFAULT_NUM_BINS,
                      model: Any | None = None) -> CalibrationResult:
  """`calibrate` of a `jaxq.flax.ModelAdapter` (its model and variables);
  ``model`` is the result's model (default: ``adapter.handle``)."""
  on_nonfinite = on_nonfinite or adapter.settings().on_nonfinite
  core.check_on_nonfinite(on_nonfinite)
  observers = {} if methods is None else _observers(methods, num_bins)
  total = len(batches) if isinstance(batches, Sized) else None
  first, batches = _first(batches)
  calibration_pass = _build(adapter, first, observers, forward or call_model)

  stats = calibration_pass.stats
  paths = calibration_pass.act_paths
  seen = np.zeros(len(paths), np.int64)
  pending: tuple[int, jax.Array] | None = None

  def check(index: int, counts: jax.Array) -> None:
    nonlocal seen
    counts = np.asarray(jax.device_get(counts), np.int64)
    if on_nonfinite == "raise" and np.any(counts > seen):
      _raise_nonfinite(index, counts - seen, paths)
    seen = counts

  num_batches = 0
  with tqdm.tqdm(total=total, desc="jaxq calibrate", unit="batch",
                 disable=None if progress else True) as bar:
    for index, batch in enumerate(batches):
      stats, counts = calibration_pass.step(stats, batch)
      # Read the previous batch's counts while this one computes.
      if pending is not None:
        check(*pending)
      pending = (index, counts)
      num_batches += 1
      bar.update(1)
    check(*pending)

  return CalibrationResult(
      model=adapter.handle if model is None else model, stats=stats,
      observers=observers,
      nonfinite={p: int(n) for p, n in zip(paths, seen)},
      num_batches=num_batches)
