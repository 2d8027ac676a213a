"""Calibration and QAT across two processes on this machine.

`jax.distributed.initialize` on localhost with two processes (CPU
collectives over gloo), each feeding its own rows of every calibration batch
(see `multihost_worker.py`): the ranges `jaxq.calibrate` merges must equal the
single-process ones exactly, for every method, and one QAT step must match
the single-process step up to the float32 rounding of a cross-process sum.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
ROOT = WORKER.parent.parent
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(num_processes: int, out: pathlib.Path) -> None:
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  procs = [subprocess.Popen(
      [sys.executable, str(WORKER), str(port), str(i), str(num_processes),
       str(out)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(num_processes)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=TIMEOUT_S)[0])
  finally:
    for p in procs:
      p.kill()
  for i, (p, log) in enumerate(zip(procs, logs)):
    if p.returncode != 0:
      pytest.fail(f"process {i} of {num_processes} exited {p.returncode}:\n"
                  f"{log[-4000:]}")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multihost")
  _run(1, tmp / "one.npz")
  _run(2, tmp / "two.npz")
  with np.load(tmp / "one.npz") as one, np.load(tmp / "two.npz") as two:
    return dict(one), dict(two)


def test_two_processes_merge_ranges_exactly(results):
  one, two = results
  ranges = sorted(k for k in one if k.startswith("ranges/"))
  # Two layers times four methods, each range a positive finite number.
  assert len(ranges) == 8 and set(ranges) == {
      k for k in two if k.startswith("ranges/")}
  for key in ranges:
    assert np.all(np.isfinite(one[key])) and np.all(one[key] > 0), key
    np.testing.assert_array_equal(two[key], one[key], err_msg=key)
  # The methods disagree on this heavy-tailed data: the test sees them all.
  first = [one[k] for k in ranges if "Dense_0" in k]
  assert len({float(v.ravel()[0]) for v in first}) == 4


def test_two_processes_qat_step_matches(results):
  one, two = results
  params = sorted(k for k in one if k.startswith("params"))
  assert len(params) == 4 and set(params) == {
      k for k in two if k.startswith("params")}
  np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-6)
  for key in params:
    np.testing.assert_allclose(two[key], one[key], rtol=1e-6, atol=1e-7,
                               err_msg=key)
