"""Fine-tuning SmolLM2-135M on a quantized base: LoRA and QLoRA, measured.

The decoder of `examples/smollm.py` (linen, float32 on CPU) is fine-tuned
on one domain, the standard library's docstrings: training windows from
`smollm.CALIBRATION_MODULES`' docstrings, held-out perplexity on
`smollm.EVALUATION_MODULES`' docstrings (disjoint modules; a docstring that
appears in both is dropped from the evaluation text). Four ways, the same
data, batches and number of steps, side by side in one run:

* ``full``: every parameter trained in float32 (Adam), the reference;
* ``lora``: rank-8 adapters (alpha 16) on the 210 Dense layers (q, k, v, o,
  gate, up, down of 30 blocks), float32 base frozen;
* ``qlora-nf4-dq``: the same adapters on a base stored in NF4, blocks of 64
  along the input axis, scales double-quantized (8-bit codes, a
  power-of-two step per 256 scales): ``jaxq.lora.NF4_DQ``;
* ``qlora-int4-g64``: the base in int4, per group of 64: ``INT4_G64``.

For each: held-out perplexity before and after; the bytes of the frozen
LoRA-layer bases, stored (packed) and in memory, against the same kernels
in bf16; optimizer state bytes; the median step time during training and,
since the machine may be shared, the median of the runs' compiled steps
timed in turn at the end (`interleaved_step_times`, what the ratios use).
Then, per adapter run, what merging costs: ``W + A B alpha / r`` merged
into float kernels and, for the quantized bases, quantized again with the
base's own spec (RTN, the serve mode) or by GPTQ on a few training windows
(`gptq_ppl`), and the adapters merged onto the original float kernels
instead, each against base + adapters. The issue's goals are printed met
or not met.

Run: python examples/smollm_lora.py [--quick] [--steps N] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import smollm  # noqa: E402  pylint: disable=g-import-not-at-top

import jaxq  # noqa: E402  pylint: disable=g-import-not-at-top

TARGETS = r".*/(q|k|v|o|gate|up|down)_proj"
RANK, ALPHA = 8, 16.0
BASES: dict[str, Any] = {"lora": None, "qlora-nf4-dq": jaxq.lora.NF4_DQ,
                         "qlora-int4-g64": jaxq.lora.INT4_G64,
                         "qlora-nf4": jaxq.lora.NF4}  # The last: --runs only.
LEARNING_RATES = {"full": 3e-5, "adapters": 1e-3}
# Run name -> one more training step, for `interleaved_step_times`.
TIMERS: dict[str, Callable[[], None]] = {}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Sizes of one run."""
  num_layers: int | None = None  # None: all 30 blocks.
  window: int = 64
  batch_size: int = 2
  steps: int = 30
  eval_windows: int = 16
  calibration_windows: int = 4  # GPTQ's, from the training text.
  timed_from: int = 3  # Steps before this one are warm-up, not timed.
  timing_rounds: int = 5  # Of `interleaved_step_times`.


QUICK = Settings(num_layers=1, window=32, batch_size=2, steps=4,
                 eval_windows=2, calibration_windows=2, timed_from=1,
                 timing_rounds=3)


def train_windows(tokenizer: Any, window: int) -> np.ndarray:
  """Every window of the training text (`smollm.CALIBRATION_MODULES`)."""
  return smollm.token_windows(tokenizer, smollm.calibration_text(), window)


def batches(windows: np.ndarray, settings: Settings) -> list[np.ndarray]:
  """``settings.steps`` batches, the windows in one fixed shuffled order."""
  order = np.random.default_rng(0).permutation(len(windows))
  count = settings.steps * settings.batch_size
  picks = np.resize(order, count)
  return [windows[picks[i:i + settings.batch_size]]
          for i in range(0, count, settings.batch_size)]


def mean_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean next-token negative log-likelihood over the batch."""
  log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  picked = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)
  return -jnp.mean(picked)


def tree_bytes(tree: Any) -> int:
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, "dtype"))


@dataclasses.dataclass
class Run:
  """One fine-tuning run's numbers."""
  name: str
  ppl_before: float
  ppl_after: float = float("nan")
  trainable: int = 0
  optimizer_bytes: int = 0
  base_bytes: int = 0  # LoRA layers' bases, packed as stored (QArray.nbytes).
  base_memory_bytes: int = 0  # The same arrays' buffers in memory.
  base_bf16_bytes: int = 0  # The same kernels in bf16.
  frozen_memory_bytes: int = 0  # Every frozen array in memory (embedding...).
  model_bf16_bytes: int = 0  # The whole model's parameters in bf16.
  step_s: float = float("nan")  # Median over the training steps.
  step_interleaved_s: float = float("nan")  # Median of runs timed in turn.
  losses: list[float] = dataclasses.field(default_factory=list)
  merged: dict[str, float] = dataclasses.field(default_factory=dict)


def fit(apply: Callable[[Any, Any, jax.Array], jax.Array], trainable: Any,
        frozen: Any, tx: optax.GradientTransformation,
        data: list[np.ndarray], timed_from: int, progress: bool = True
        ) -> tuple[Any, Any, list[float], float, Callable[[], None]]:
  """Adam steps on ``trainable`` only (``frozen`` takes no gradient).

  Returns: trained params, optimizer state, losses, median step seconds,
  and a timer that runs one more (compiled) step on the last batch.
  """
  opt_state = tx.init(trainable)

  # The frozen tree is an argument, not a closed-over constant: XLA would
  # fold the model into the program.
  @jax.jit
  def step(trainable, frozen, opt_state, tokens):
    loss, grads = jax.value_and_grad(
        lambda t: mean_nll(apply(t, frozen, tokens), tokens))(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  losses, times = [], []
  for i, tokens in enumerate(data):
    start = time.perf_counter()
    trainable, opt_state, loss = step(trainable, frozen, opt_state,
                                      jnp.asarray(tokens))
    losses.append(float(loss))  # Synchronises.
    if i >= timed_from:
      times.append(time.perf_counter() - start)
    if progress and (i + 1) % 10 == 0:
      print(f"    step {i + 1}: loss {losses[-1]:.3f} "
            f"({time.perf_counter() - start:.2f} s)", flush=True)
  last = (trainable, frozen, opt_state, jnp.asarray(data[-1]))
  timer = lambda: jax.block_until_ready(step(*last))
  return trainable, opt_state, losses, float(np.median(times)), timer


def interleaved_step_times(timers: dict[str, Callable[[], None]],
                           rounds: int) -> dict[str, float]:
  """Median seconds of one step of each run, timed in turn ``rounds``
  times (round-robin), so that load from other processes on a shared
  machine falls on every run alike."""
  times: dict[str, list[float]] = {name: [] for name in timers}
  for _ in range(rounds):
    for name, timer in timers.items():
      start = time.perf_counter()
      timer()
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def perplexity(apply_fn: Callable[..., jax.Array], variables: Any,
               windows: np.ndarray) -> float:
  return smollm.perplexity(apply_fn, variables, windows, batch_size=8)


def run_full(pretrained: smollm.Pretrained, data: list[np.ndarray],
             evaluation: np.ndarray, settings: Settings, ppl_float: float
             ) -> Run:
  model = pretrained.model
  run = Run("full", ppl_float)
  tx = optax.adam(LEARNING_RATES["full"])
  params = pretrained.variables["params"]
  apply = lambda t, _, tokens: model.apply({"params": t}, tokens)
  params, opt_state, run.losses, run.step_s, TIMERS[run.name] = fit(
      apply, params, {}, tx, data, settings.timed_from)
  run.trainable = sum(x.size for x in jax.tree.leaves(params))
  run.optimizer_bytes = tree_bytes(opt_state)
  run.model_bf16_bytes = 2 * run.trainable
  run.ppl_after = perplexity(model.apply, {"params": params}, evaluation)
  return run


def requantized_ppl(pretrained: smollm.Pretrained, merged: Any,
                    spec: jaxq.QuantSpec, evaluation: np.ndarray) -> float:
  """Perplexity of merged float kernels quantized again by ``spec`` (RTN,
  jaxq's serve mode: weight-only, the same layers)."""
  served = jaxq.quantize_model(pretrained.model,
                               [jaxq.Rule(TARGETS, weight=spec)],
                               mode="serve")
  return perplexity(served.apply, merged, evaluation)


def gptq_ppl(pretrained: smollm.Pretrained, merged: Any,
             spec: jaxq.QuantSpec, calibration: np.ndarray,
             evaluation: np.ndarray) -> float:
  """Perplexity of merged float kernels quantized again by GPTQ
  (`jaxq.gptq`, block by block, on ``calibration`` windows), served
  weight-only. GPTQ sets each scale row by row, so a double-quantized spec
  is run without its double quantization (``double_quant=None``)."""
  rules = [jaxq.Rule(TARGETS, weight=spec.replace(double_quant=None))]
  cal = jaxq.quantize_model(pretrained.model, rules, mode="calibrate")
  variables = jaxq.gptq(cal, merged, list(calibration[:, None]),
                        progress=False)
  return perplexity(cal.with_mode("serve").apply, variables, evaluation)


def run_lora(name: str, pretrained: smollm.Pretrained,
             data: list[np.ndarray], evaluation: np.ndarray,
             settings: Settings, calibration: np.ndarray) -> Run:
  spec = BASES[name]
  rules = [jaxq.lora.LoraRule(TARGETS, rank=RANK, alpha=ALPHA, base=spec)]
  lora = jaxq.lora.attach(pretrained.model, pretrained.variables, rules,
                          key=jax.random.key(0))
  apply_lora = lora.model.apply
  run = Run(name, perplexity(apply_lora, lora.variables, evaluation))
  run.base_bytes = jaxq.lora.base_bytes(lora)
  run.base_memory_bytes = tree_bytes(jaxq.lora.bases(lora))
  run.base_bf16_bytes = sum(2 * layer.in_features * layer.out_features
                            for layer in lora.layers.values())
  adapters, frozen = jaxq.lora.partition(lora.variables["params"])
  run.frozen_memory_bytes = tree_bytes(frozen)
  run.model_bf16_bytes = 2 * sum(
      x.size for x in jax.tree.leaves(pretrained.variables["params"]))
  apply = lambda t, f, tokens: apply_lora(
      {"params": jaxq.lora.combine(t, f)}, tokens)
  tx = optax.adam(LEARNING_RATES["adapters"])
  adapters, opt_state, run.losses, run.step_s, TIMERS[run.name] = fit(
      apply, adapters, frozen, tx, data, settings.timed_from)
  run.trainable = sum(x.size for x in jax.tree.leaves(adapters))
  run.optimizer_bytes = tree_bytes(opt_state)
  variables = {"params": jaxq.lora.combine(adapters, frozen)}
  run.ppl_after = perplexity(apply_lora, variables, evaluation)
  # Adapters alone on disk.
  with tempfile.TemporaryDirectory() as tmp:
    run.merged["adapter_file_bytes"] = jaxq.lora.save_adapters(
        os.path.join(tmp, "adapters.safetensors"), lora, variables)
  # Merge W + A B alpha / r (and quantize again with the base's spec).
  start = time.perf_counter()
  merged = jax.block_until_ready(jaxq.lora.merge(lora, variables))
  run.merged["merge_s"] = time.perf_counter() - start
  if spec is None:
    run.merged["ppl"] = perplexity(pretrained.model.apply, merged, evaluation)
  else:
    run.merged["ppl"] = requantized_ppl(pretrained, merged, spec, evaluation)
    # The same adapters merged onto the original float kernels (when one
    # still has them), then quantized.
    onto_float = jaxq.lora.merge(lora, {"params": jaxq.lora.combine(
        adapters, pretrained.variables["params"])})
    run.merged["ppl_onto_float"] = requantized_ppl(pretrained, onto_float,
                                                   spec, evaluation)
    start = time.perf_counter()
    run.merged["ppl_gptq"] = gptq_ppl(pretrained, merged, spec, calibration,
                                      evaluation)
    run.merged["gptq_s"] = time.perf_counter() - start
  return run


def _vs(ppl: float | None, after: float) -> str:
  if ppl is None:
    return "-"
  return f"{ppl:.3f} ({100 * (ppl / after - 1):+.2f}%)"


def table(runs: list[Run]) -> str:
  """The runs side by side (markdown); merged columns against each run's
  own base + adapters ("ppl after")."""
  lines = [
      "| run | ppl before | ppl after | trainable | frozen base (x bf16) | "
      "optimizer state | step s (training) | step s (in turn) | step / lora |"
      " merged, RTN requantized | "
      "merged, GPTQ requantized | adapters onto float W, RTN |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
      " ---: | ---: |"]
  lora_step = next((r.step_interleaved_s for r in runs if r.name == "lora"),
                   float("nan"))
  for r in runs:
    base = ("-" if not r.base_bf16_bytes else
            f"{r.base_bytes / 2**20:.1f} MiB "
            f"({r.base_bytes / r.base_bf16_bytes:.3f}x)")
    lines.append(
        f"| {r.name} | {r.ppl_before:.3f} | {r.ppl_after:.3f} | "
        f"{r.trainable:,} | {base} | {r.optimizer_bytes / 2**20:.1f} MiB | "
        f"{r.step_s:.3f} | {r.step_interleaved_s:.3f} | "
        f"{r.step_interleaved_s / lora_step:.2f}x | "
        f"{_vs(r.merged.get('ppl'), r.ppl_after)} | "
        f"{_vs(r.merged.get('ppl_gptq'), r.ppl_after)} | "
        f"{_vs(r.merged.get('ppl_onto_float'), r.ppl_after)} |")
  return "\n".join(lines)


def memory_table(runs: list[Run]) -> str:
  """Bytes of what each adapter run keeps frozen (markdown): the LoRA
  layers' bases packed as stored (sub-byte values two per byte, DQ scales
  one byte each: `QArray.nbytes`, what `jaxq.save` writes) and as buffers
  in memory (4-bit values two per byte, `jaxq.PackedQArray`; DQ scales as
  float32), against the same kernels in bf16; and every frozen array
  (embedding and norms included, float32) against the whole model in
  bf16."""
  lines = ["| run | bases stored | x bf16 | bases in memory | x bf16 | "
           "all frozen in memory | x bf16 model | adapter file |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  mib = lambda n: f"{n / 2**20:.1f} MiB"
  for r in runs:
    if not r.base_bf16_bytes:
      continue
    lines.append(
        f"| {r.name} | {mib(r.base_bytes)} | "
        f"{r.base_bytes / r.base_bf16_bytes:.3f} | "
        f"{mib(r.base_memory_bytes)} | "
        f"{r.base_memory_bytes / r.base_bf16_bytes:.3f} | "
        f"{mib(r.frozen_memory_bytes)} | "
        f"{r.frozen_memory_bytes / r.model_bf16_bytes:.3f} | "
        f"{mib(r.merged.get('adapter_file_bytes', 0))} |")
  return "\n".join(lines)


GOALS = {"nf4_dq_ppl_vs_lora": ("QLoRA NF4+DQ perplexity vs LoRA on float",
                                lambda v: v <= 0.01, "<= +1%"),
         "nf4_dq_base_vs_bf16": ("frozen NF4+DQ bases, stored, vs bf16",
                                 lambda v: v <= 0.3, "<= 0.3x"),
         "nf4_dq_step_vs_lora": ("QLoRA NF4+DQ step vs LoRA step",
                                 lambda v: v <= 1.3, "<= 1.3x")}


def goals(runs: list[Run]) -> dict[str, Any]:
  """The issue's goals, measured."""
  by = {r.name: r for r in runs}
  out: dict[str, Any] = {}
  if "lora" in by and "qlora-nf4-dq" in by:
    lora, qlora = by["lora"], by["qlora-nf4-dq"]
    out["nf4_dq_ppl_vs_lora"] = qlora.ppl_after / lora.ppl_after - 1
    out["nf4_dq_base_vs_bf16"] = qlora.base_bytes / qlora.base_bf16_bytes
    out["nf4_dq_base_memory_vs_bf16"] = (qlora.base_memory_bytes /
                                         qlora.base_bf16_bytes)
    out["nf4_dq_frozen_memory_vs_bf16_model"] = (qlora.frozen_memory_bytes /
                                                 qlora.model_bf16_bytes)
    out["nf4_dq_step_vs_lora"] = (qlora.step_interleaved_s /
                                  lora.step_interleaved_s)
    out["nf4_dq_step_vs_lora_training"] = qlora.step_s / lora.step_s
  return out


def main(argv: list[str] | None = None) -> list[Run]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="1 block, short windows, a few steps")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--runs", default="full,lora,qlora-nf4-dq,"
                      "qlora-int4-g64", help="comma-separated runs")
  parser.add_argument("--json", default=None, help="write the rows here")
  args = parser.parse_args(argv)
  settings = QUICK if args.quick else Settings()
  if args.steps is not None:
    settings = dataclasses.replace(settings, steps=args.steps)
  pretrained = smollm.load_pretrained()
  if settings.num_layers is not None:
    pretrained = pretrained.truncated(settings.num_layers)
  evaluation = smollm.evaluation_windows(settings.window,
                                         settings.eval_windows)
  training = train_windows(pretrained.tokenizer, settings.window)
  data = batches(training, settings)
  calibration = training[:settings.calibration_windows]
  print(f"SmolLM2-135M, {pretrained.config.num_layers} blocks; "
        f"{settings.steps} steps of {settings.batch_size} x "
        f"{settings.window} tokens (train: {len(smollm.CALIBRATION_MODULES)} "
        f"modules' docstrings, {', '.join(smollm.CALIBRATION_MODULES[:3])}, "
        f"...); held-out perplexity on {settings.eval_windows} windows "
        f"({', '.join(smollm.EVALUATION_MODULES[:3])}, ...); "
        f"rank {RANK}, alpha {ALPHA:g}; backend {jax.default_backend()}",
        flush=True)
  ppl_float = perplexity(pretrained.model.apply, pretrained.variables,
                         evaluation)
  runs = []
  for name in args.runs.split(","):
    start = time.perf_counter()
    if name == "full":
      runs.append(run_full(pretrained, data, evaluation, settings, ppl_float))
    else:
      runs.append(run_lora(name, pretrained, data, evaluation, settings,
                           calibration))
    print(f"  {name}: {runs[-1].ppl_before:.3f} -> {runs[-1].ppl_after:.3f} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
  step_times = interleaved_step_times(TIMERS, settings.timing_rounds)
  for r in runs:
    r.step_interleaved_s = step_times[r.name]
  TIMERS.clear()
  print(table(runs))
  print(memory_table(runs))
  for key, value in goals(runs).items():
    text = f"{value:+.2%}" if "ppl" in key else f"{value:.3f}x"
    if key in GOALS:
      what, met, goal = GOALS[key]
      text += f" ({what}; goal {goal}: {'met' if met(value) else 'not met'})"
    print(f"{key}: {text}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"benchmark": "smollm_lora", "device": jax.default_backend(),
                 "settings": dataclasses.asdict(settings),
                 "rows": [dataclasses.asdict(r) for r in runs],
                 "goals": goals(runs)}, f, indent=1)
  return runs


if __name__ == "__main__":
  main()
