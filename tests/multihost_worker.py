"""One process of the two-process calibration and QAT run of
`tests/test_multihost.py` (not a test module: pytest collects ``test_*``).

Usage: ``python multihost_worker.py PORT PROCESS_ID NUM_PROCESSES OUT.npz``
with ``NUM_PROCESSES`` of 1 (the single-process reference, no
`jax.distributed`) or 2. Every process holds the rows of each calibration
batch that belong to it (a contiguous slice of the global batch), makes the
global array with `jax.make_array_from_process_local_data` over a mesh of all
processes' devices, and runs `jaxq.calibrate` and one jitted QAT step on the
global arrays. Process 0 writes the ranges, the loss and the updated params.
"""

from __future__ import annotations

import os
import sys

# Four devices in all, whatever the number of processes: the same mesh, so
# the same reduction order.
_NUM_PROCESSES = int(sys.argv[3]) if len(sys.argv) > 3 else 1
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count="
                           f"{4 // _NUM_PROCESSES}")

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxq  # noqa: E402
from jaxq import PerChannel, PerTensor, QuantSpec  # noqa: E402

METHODS = ("max", "entropy", "percentile:99.9", "mse")
NUM_BATCHES, GLOBAL_ROWS, FEATURES = 4, 16, 12
RULES = [jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(axis=-1)),
                   act=QuantSpec("int8", PerTensor(), dynamic=False))]


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(4)(x)


def global_batches() -> list[np.ndarray]:
  """The calibration data, heavy-tailed so that the methods disagree."""
  rng = np.random.default_rng(0)
  return [rng.standard_t(3, (GLOBAL_ROWS, FEATURES)).astype(np.float32)
          for _ in range(NUM_BATCHES)]


def main(port: int, process_id: int, num_processes: int, out: str) -> None:
  if num_processes > 1:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id)
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  rows = NamedSharding(mesh, P("data"))
  local = slice(process_id * GLOBAL_ROWS // num_processes,
                (process_id + 1) * GLOBAL_ROWS // num_processes)

  def as_global(batch: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(rows, batch[local])

  batches = [as_global(b) for b in global_batches()]
  model = MLP()
  variables = model.init(jax.random.key(0), jnp.zeros((1, FEATURES)))
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(variables["params"], replicated)

  calibrating = jaxq.quantize_model(model, RULES, mode="calibrate")
  result = jaxq.calibrate(calibrating, {"params": params}, batches,
                          methods=METHODS, progress=False)
  ranges = {m: result.ranges(m) for m in METHODS}

  qat = calibrating.with_mode("qat")
  optimizer = optax.adam(1e-2)
  target = as_global(np.cos(np.arange(GLOBAL_ROWS * 4, dtype=np.float32))
                     .reshape(GLOBAL_ROWS, 4))

  @jax.jit
  def train_step(params, opt_state, x, y):
    def loss_fn(p):
      out = qat.apply({"params": p, "quant_ranges": ranges["entropy"]}, x)
      return jnp.mean((out - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), loss

  new_params, loss = train_step(params, optimizer.init(params), batches[0],
                                target)
  flat = {"loss": loss}
  for name, tree in [("params", new_params)] + [
      (f"ranges/{m}", r) for m, r in ranges.items()]:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      flat[name + jax.tree_util.keystr(path)] = leaf
  # Every leaf is replicated: each process holds all of it.
  values = {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}
  if process_id == 0:
    np.savez(out, **values)
  if num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
