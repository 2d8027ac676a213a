"""BatchNorm folding in the Flax containers: where the folded values go.

`jaxq.fold` holds the arithmetic (`jaxq.fold.fold_parameters`) and the
public `jaxq.fold_batchnorm`; this module reads a layer's kernel and bias
and the BatchNorm's statistics from the API's own containers and writes the
folded values back: linen from and to a (flattened) variables dict, nnx into
the modules in place. The arithmetic comes in as ``fold``, ``(kernel, bias,
mean, var, scale, offset, epsilon) -> (kernel, bias)``, all per output
channel (the kernel's last axis).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Mapping, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax import traverse_util
from flax.core import frozen_dict

from jaxq.flax import batch as batch_lib

Path = Union[str, tuple[str, ...]]
Fold = Callable[..., tuple[jax.Array, jax.Array]]
DEFAULT_EPSILON = 1e-5  # flax.linen.BatchNorm's default.


@dataclasses.dataclass(frozen=True)
class BatchNormSettings:
  """What a BatchNorm module says about its own inference arithmetic.

  Attributes:
    epsilon: added to the running variance.
    use_scale, use_bias: whether it has ``gamma`` / ``beta``.
    last_axis: whether it normalises the last axis (the only one a Flax
      kernel's output channel can be).
  """

  epsilon: float
  use_scale: bool
  use_bias: bool
  last_axis: bool


def linen_batchnorm_settings(model: nn.Module, variables: Mapping[str, Any],
                             batch: Any) -> dict[tuple[str, ...],
                                                 BatchNormSettings]:
  """Path -> settings of every ``nn.BatchNorm`` the model calls on ``batch``.

  A linen module only exists while the model runs, so the model is traced
  abstractly (``jax.eval_shape``, nothing computed) on ``batch`` (the
  `jaxq.flax.batch` convention) with a method interceptor that reads each
  BatchNorm's fields.
  """
  found: dict[tuple[str, ...], BatchNormSettings] = {}

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
      x = args[0] if args else next(iter(kwargs.values()))
      axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
      ndim = jnp.ndim(x)
      found[tuple(module.path)] = BatchNormSettings(
          epsilon=float(module.epsilon), use_scale=bool(module.use_scale),
          use_bias=bool(module.use_bias),
          last_axis=tuple(a % ndim for a in axes) == (ndim - 1,))
    return next_fun(*args, **kwargs)

  def run(variables):
    with nn.intercept_methods(intercept):
      return batch_lib.call_model(
          lambda *a, **k: model.apply(variables, *a, mutable=True, **k), batch)

  jax.eval_shape(run, variables)
  return found


def _as_path(path: Path) -> tuple[str, ...]:
  return tuple(path.split("/")) if isinstance(path, str) else tuple(path)


def _name(path: tuple[str, ...]) -> str:
  return "/".join(path)


def _module_names(flat: Mapping[tuple[str, ...], Any], collection: str
                  ) -> list[str]:
  return sorted({_name(key[1:-1]) for key in flat if key[0] == collection})


def _epsilons(pairs: Mapping[Path, Path],
              epsilon: float | Mapping[Path, float] | None,
              settings: Mapping[tuple[str, ...], BatchNormSettings] | None
              ) -> dict[tuple[str, ...], float]:
  """BatchNorm path -> the epsilon to fold with.

  With the modules' ``settings``, each BatchNorm's own epsilon; an explicit
  ``epsilon`` that disagrees with it raises (it would change the model).
  Without them, ``epsilon`` (a float, or per BatchNorm), defaulting to
  flax's 1e-5 with a warning, since a model may use another.
  """
  given = ({_as_path(k): float(v) for k, v in epsilon.items()}
           if isinstance(epsilon, Mapping) else None)
  out: dict[tuple[str, ...], float] = {}
  for bn_path in map(_as_path, pairs.values()):
    wanted = given.get(bn_path) if given is not None else (
        None if epsilon is None else float(epsilon))
    if settings is not None:
      if bn_path not in settings:
        raise ValueError(
            f"fold_batchnorm: the model called no nn.BatchNorm at "
            f"{_name(bn_path)!r} on this batch; its BatchNorms are "
            f"{sorted(map(_name, settings))}.")
      own = settings[bn_path].epsilon
      if wanted is not None and wanted != own:
        raise ValueError(
            f"fold_batchnorm: epsilon {wanted} was given for BatchNorm "
            f"{_name(bn_path)!r}, but the module says epsilon={own}; folding "
            f"with another epsilon changes the model. Drop the epsilon "
            f"argument (the module's is read).")
      out[bn_path] = own
    elif given is not None and wanted is None:
      raise ValueError(f"fold_batchnorm: no epsilon given for BatchNorm "
                       f"{_name(bn_path)!r}.")
    else:
      out[bn_path] = DEFAULT_EPSILON if wanted is None else wanted
  if settings is None and epsilon is None:
    warnings.warn(
        f"fold_batchnorm: folding with flax's default epsilon "
        f"{DEFAULT_EPSILON}; a BatchNorm built with another epsilon folds "
        f"into a different model. Pass model= and batch= to read each "
        f"BatchNorm's own epsilon, or epsilon= explicitly.", UserWarning,
        stacklevel=5)
  return out


def fold_linen(variables: Mapping[str, Any], pairs: Mapping[Path, Path],
               fold: Fold, *,
               epsilon: float | Mapping[Path, float] | None = None,
               model: nn.Module | None = None, batch: Any = None
               ) -> Mapping[str, Any]:
  """Folds BatchNorms into the preceding Conv/Dense of a linen model.

  Args:
    variables: the model's variables, with ``"params"`` and
      ``"batch_stats"`` collections.
    pairs: maps each conv (or dense) module path to the path of the
      BatchNorm that follows it; paths are tuples of names or ``"/"``-joined
      strings, e.g. ``{"block1/conv": "block1/bn"}``.
    fold: `jaxq.fold.fold_parameters`, the arithmetic.
    epsilon: the BatchNorms' epsilon, or a mapping from BatchNorm path to
      epsilon. With ``model``, each BatchNorm's own epsilon is read from
      the module and an explicit one must agree with it (else ValueError);
      without, it defaults to flax's 1e-5 with a `UserWarning`.
    model, batch: the linen module and one batch it runs on (the
      `jaxq.flax.batch` convention; traced abstractly, see
      `linen_batchnorm_settings`): each BatchNorm's epsilon,
      ``use_scale``/``use_bias`` and axis are read from the module. Pass
      both or neither.

  Returns:
    New variables (the input is not modified) for the same model
    definition: folded kernels and biases, identity BatchNorms (see the
    module docstring). A FrozenDict input gives a FrozenDict.

  Raises:
    ValueError: naming the path, when a module or variable is missing, the
      channel counts differ, or a conv without bias is followed by a
      BatchNorm without bias (nowhere to put the folded bias).
  """
  if (model is None) != (batch is None):
    raise ValueError("fold_batchnorm: pass model= and batch= together (the "
                     "BatchNorms' settings are read by tracing the model on "
                     "the batch).")
  settings = (None if model is None else
              linen_batchnorm_settings(model, variables, batch))
  epsilons = _epsilons(pairs, epsilon, settings)
  flat = dict(traverse_util.flatten_dict(variables))

  def get(collection: str, path: tuple[str, ...], leaf: str, required: bool):
    key = (collection, *path, leaf)
    if key not in flat:
      if required:
        raise ValueError(
            f"fold_batchnorm: no {collection!r} variable {leaf!r} in module "
            f"{_name(path)!r}; modules with {collection}: "
            f"{_module_names(flat, collection)}.")
      return None
    return flat[key]

  for conv_path, bn_path in pairs.items():
    conv_path, bn_path = _as_path(conv_path), _as_path(bn_path)
    kernel = get("params", conv_path, "kernel", True)
    bias = get("params", conv_path, "bias", False)
    mean = get("batch_stats", bn_path, "mean", True)
    var = get("batch_stats", bn_path, "var", True)
    gamma = get("params", bn_path, "scale", False)
    beta = get("params", bn_path, "bias", False)
    eps = epsilons[bn_path]
    if settings is not None:
      _check_settings(_name(bn_path), settings[bn_path], gamma, beta)
    if kernel.shape[-1:] != mean.shape:
      raise ValueError(
          f"fold_batchnorm: {_name(conv_path)!r} has kernel shape "
          f"{tuple(kernel.shape)} ({kernel.shape[-1]} output channels) but "
          f"BatchNorm {_name(bn_path)!r} has statistics of shape "
          f"{tuple(mean.shape)}; the BatchNorm must normalise the last axis "
          f"of the layer's output.")
    if bias is None and beta is None:
      raise ValueError(
          f"fold_batchnorm: {_name(conv_path)!r} has no bias and BatchNorm "
          f"{_name(bn_path)!r} has use_bias=False, so the folded bias has "
          f"nowhere to go; build one of them with a bias.")
    new_kernel, new_bias = fold(kernel, bias, mean, var, gamma, beta, eps)
    flat[("params", *conv_path, "kernel")] = new_kernel
    if bias is not None:
      flat[("params", *conv_path, "bias")] = new_bias
      new_bias = jnp.zeros_like(beta) if beta is not None else None
    # The BatchNorm keeps the same variables and becomes y -> y + new_bias.
    flat[("batch_stats", *bn_path, "mean")] = jnp.zeros_like(mean)
    flat[("batch_stats", *bn_path, "var")] = jnp.full_like(var, 1.0 - eps)
    if gamma is not None:
      flat[("params", *bn_path, "scale")] = jnp.ones_like(gamma)
    if beta is not None:
      flat[("params", *bn_path, "bias")] = new_bias.astype(beta.dtype)
  folded = traverse_util.unflatten_dict(flat)
  if isinstance(variables, frozen_dict.FrozenDict):
    return frozen_dict.freeze(folded)
  return folded


def _check_settings(name: str, settings: BatchNormSettings,
                    gamma: Any | None, beta: Any | None) -> None:
  """Raises when the variables or the axis disagree with the module."""
  if not settings.last_axis:
    raise ValueError(f"fold_batchnorm: BatchNorm {name!r} does not normalise "
                     f"the last axis; only the last axis (a kernel's output "
                     f"channel) can be folded.")
  for what, flag, value in (("scale", settings.use_scale, gamma),
                            ("bias", settings.use_bias, beta)):
    if flag != (value is not None):
      raise ValueError(
          f"fold_batchnorm: BatchNorm {name!r} has use_{what}={flag} but "
          f"its params {'lack' if flag else 'hold'} a {what!r}; were the "
          f"variables made by another model?")


def fold_nnx(layer: nnx.Module, batchnorm: nnx.BatchNorm, fold: Fold) -> None:
  """Folds an nnx BatchNorm into the preceding ``nnx.Conv`` / ``nnx.Linear``.

  In place, like every nnx state update: ``layer`` gets the folded kernel
  and bias (a new bias parameter if it had none) and ``batchnorm`` becomes
  an identity. Fold a copy (``nnx.clone(model)``) to keep the original.
  The epsilon is read from ``batchnorm.epsilon``; ``fold`` is
  `jaxq.fold.fold_parameters`.

  Raises:
    ValueError: when ``layer`` has no kernel, ``batchnorm`` is not an
      ``nnx.BatchNorm``, or their channel counts differ.
  """
  if not isinstance(batchnorm, nnx.BatchNorm):
    raise ValueError(f"fold_batchnorm: expected an nnx.BatchNorm after "
                     f"{type(layer).__name__}, got "
                     f"{type(batchnorm).__name__}.")
  if not isinstance(getattr(layer, "kernel", None), nnx.Param):
    raise ValueError(f"fold_batchnorm: {type(layer).__name__} has no kernel "
                     f"parameter; expected an nnx.Conv, nnx.Linear or a "
                     f"layer with a (..., out) kernel.")
  kernel = layer.kernel[...]
  mean = batchnorm.mean[...]
  if kernel.shape[-1:] != mean.shape:
    raise ValueError(
        f"fold_batchnorm: {type(layer).__name__} has kernel shape "
        f"{tuple(kernel.shape)} ({kernel.shape[-1]} output channels) but the "
        f"BatchNorm has statistics of shape {tuple(mean.shape)}.")
  bias = None if layer.bias is None else layer.bias[...]
  gamma = (batchnorm.scale[...] if batchnorm.use_scale and
           batchnorm.scale is not None else None)
  beta = (batchnorm.bias[...] if batchnorm.use_bias and
          batchnorm.bias is not None else None)
  axes = (batchnorm.axis if isinstance(batchnorm.axis, tuple)
          else (batchnorm.axis,))
  if tuple(axes) != (-1,) and tuple(axes) != (kernel.ndim - 1,):
    raise ValueError(f"fold_batchnorm: the BatchNorm normalises axes "
                     f"{axes}; only the last axis (a kernel's output "
                     f"channel) can be folded.")
  eps = float(batchnorm.epsilon)
  new_kernel, new_bias = fold(kernel, bias, mean, batchnorm.var[...], gamma,
                              beta, eps)
  layer.kernel[...] = new_kernel
  if bias is None:
    layer.bias = nnx.Param(new_bias)
    layer.use_bias = True
  else:
    layer.bias[...] = new_bias
  batchnorm.mean[...] = jnp.zeros_like(mean)
  batchnorm.var[...] = jnp.full_like(batchnorm.var[...], 1.0 - eps)
  if gamma is not None:
    batchnorm.scale[...] = jnp.ones_like(gamma)
  if beta is not None:
    batchnorm.bias[...] = jnp.zeros_like(beta)


def fold_batchnorm(target: Mapping[str, Any] | nnx.Module,
                   pairs_or_batchnorm: Mapping[Path, Path] | nnx.BatchNorm,
                   fold: Fold, **kwargs: Any) -> Mapping[str, Any] | None:
  """`fold_linen` on linen variables, `fold_nnx` on an nnx layer."""
  if isinstance(target, nnx.Module):
    if kwargs:
      raise ValueError(f"fold_batchnorm: the nnx form takes no options (the "
                       f"epsilon comes from the BatchNorm), got "
                       f"{sorted(kwargs)}.")
    return fold_nnx(target, pairs_or_batchnorm, fold)
  if isinstance(target, Mapping):
    return fold_linen(target, pairs_or_batchnorm, fold, **kwargs)
  raise ValueError(f"fold_batchnorm: expected linen variables (a mapping) or "
                   f"an nnx module, got {type(target).__name__}.")
