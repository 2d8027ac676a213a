"""Shared plumbing for the scripts in ``benchmarks/``.

Every benchmark follows the convention in DESIGN.md: it runs with no
arguments on a CPU in a few minutes, accepts ``--quick`` and ``--json PATH``,
prints a table, and writes ``{"benchmark", "device", "rows"}`` where each row
has at least ``case``, ``impl``, ``median_s`` and ``ratio``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np


def parser(description: str) -> argparse.ArgumentParser:
  """An argument parser with the convention's ``--quick`` and ``--json``."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--quick", action="store_true",
                 help="small sizes and few repeats (seconds)")
  p.add_argument("--json", metavar="PATH", default=None,
                 help="also write the rows as JSON to PATH")
  return p


def device_name() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"


def median_time(fn: Callable[..., Any], *args: Any, warmup: int = 2,
                repeats: int = 10) -> float:
  """Median wall time of ``fn(*args)`` in seconds, synchronised.

  ``fn`` should already be jitted; the warm-up calls absorb compilation.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def interleaved_times(fns: dict[str, Callable[[], Any]], *, warmup: int = 2,
                      repeats: int = 10, shuffle_seed: int | None = None,
                      clock: Callable[[], float] = time.perf_counter
                      ) -> dict[str, np.ndarray]:
  """Times (seconds) of several zero-argument callables, round-robin.

  Returns one array of ``repeats`` times per name; entry ``i`` of every
  array comes from round ``i``, so that ratios can be taken round by round.
  Interleaving spreads machine noise evenly over the implementations; with
  ``shuffle_seed`` each round also runs them in a new random order, so that
  none always runs first or after the same neighbour. ``clock`` is
  ``time.perf_counter`` (wall time) or ``time.process_time`` (this
  process's CPU time over all its threads: steadier on a machine shared
  with other jobs, where waiting for a core adds to wall time alone).
  """
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times: dict[str, list[float]] = {name: [] for name in fns}
  order = list(fns)
  rng = np.random.default_rng(shuffle_seed)
  for _ in range(repeats):
    if shuffle_seed is not None:
      rng.shuffle(order)
    for name in order:
      start = clock()
      jax.block_until_ready(fns[name]())
      times[name].append(clock() - start)
  return {name: np.asarray(t) for name, t in times.items()}


def interleaved_median_times(fns: dict[str, Callable[[], Any]], *,
                             warmup: int = 2, repeats: int = 10
                             ) -> dict[str, float]:
  """Median times of `interleaved_times`."""
  return {name: float(np.median(t)) for name, t in
          interleaved_times(fns, warmup=warmup, repeats=repeats).items()}


def ratio_with_interval(times: np.ndarray, baseline: np.ndarray, *,
                        confidence: float = 0.95, resamples: int = 2000,
                        seed: int = 0) -> tuple[float, float, float]:
  """Median of the per-round ratios ``times / baseline`` and a bootstrap
  ``confidence`` interval for it: ``(ratio, low, high)``.

  Two implementations whose intervals overlap are not distinguishable on
  this machine at this number of rounds.
  """
  ratios = np.asarray(times) / np.asarray(baseline)
  rng = np.random.default_rng(seed)
  resampled = np.median(
      rng.choice(ratios, size=(resamples, ratios.size), replace=True), axis=1)
  tail = (1 - confidence) / 2 * 100
  low, high = np.percentile(resampled, [tail, 100 - tail])
  return float(np.median(ratios)), float(low), float(high)


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def emit(benchmark: str, rows: Sequence[dict[str, Any]],
         json_path: str | None, *, note: str = "") -> None:
  """Prints ``rows`` as a table and writes the JSON file if asked."""
  columns: list[str] = []
  for row in rows:
    for key in row:
      if key not in columns:
        columns.append(key)
  cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
  widths = [max([len(c)] + [len(r[i]) for r in cells])
            for i, c in enumerate(columns)]
  print(f"# {benchmark} on {device_name()}" + (f" ({note})" if note else ""))
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  print("  ".join("-" * w for w in widths))
  for r in cells:
    print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
  if json_path:
    with open(json_path, "w") as f:
      json.dump({"benchmark": benchmark, "device": device_name(),
                 "rows": list(rows)}, f, indent=2)
    print(f"wrote {json_path}")
