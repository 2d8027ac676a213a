"""examples/smollm_lora.py --quick end to end on the real SmolLM2-135M
weights (1 block, short windows, 4 steps): every run and column is made,
and the numbers that must hold at any size do. examples/smollm_lora.ipynb
runs after it in this process, on the same quick settings, so it reuses the
run's loaded weights and compiled programs."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))
import notebook_runner  # noqa: E402
import smollm  # noqa: E402
import smollm_lora  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[list[smollm_lora.Run], str,
                                         pathlib.Path]:
  """``smollm_lora.main(["--quick"])``: its runs, its stdout and its JSON
  (shared with the notebook's test, which must run after it)."""
  try:
    smollm.load_pretrained()  # cached: the run below reuses it
  except ModuleNotFoundError as error:
    message = str(error)
  else:
    message = None
  if message:
    pytest.fail(message, pytrace=False)
  out = tmp_path_factory.mktemp("lora") / "r.json"
  # The run's table goes to stdout, shown by pytest on failure as well.
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    runs = smollm_lora.main(["--quick", "--json", str(out)])
  print(printed.getvalue())
  return runs, printed.getvalue(), out


@pytest.mark.slow
def test_quick_path_runs_every_configuration(quick_run):
  runs, out, saved_path = quick_run
  by = {r.name: r for r in runs}
  assert list(by) == ["full", "lora", "qlora-nf4-dq", "qlora-int4-g64"]
  full, lora, nf4 = by["full"], by["lora"], by["qlora-nf4-dq"]
  # B = 0: LoRA on the float base starts at the float model's perplexity.
  np.testing.assert_allclose(lora.ppl_before, full.ppl_before, rtol=1e-5)
  assert nf4.ppl_before != lora.ppl_before  # the NF4 base is another model
  for r in runs:
    assert len(r.losses) == smollm_lora.QUICK.steps
    assert np.isfinite(r.ppl_after) and r.step_interleaved_s > 0
  # Adapters only: a small fraction of the parameters and of Adam's state.
  assert lora.trainable == nf4.trainable < full.trainable / 100
  assert nf4.optimizer_bytes < full.optimizer_bytes / 100
  # Frozen bases: NF4 + DQ packed 4.127 bits per weight, float32 32.
  assert 0.25 < nf4.base_bytes / nf4.base_bf16_bytes < 0.26
  # In memory: codes two per byte (PackedQArray), scales float32: 4.5 bits.
  assert 0.28 < nf4.base_memory_bytes / nf4.base_bf16_bytes < 0.29
  assert lora.base_bytes == 2 * lora.base_bf16_bytes
  # Merging onto a float base computes what base + adapters computed.
  np.testing.assert_allclose(lora.merged["ppl"], lora.ppl_after, rtol=1e-3)
  for r in (nf4, by["qlora-int4-g64"]):
    assert {"ppl", "ppl_gptq", "ppl_onto_float"} <= set(r.merged)
    assert r.merged["adapter_file_bytes"] < 4 * r.trainable + 16384
  saved = json.loads(saved_path.read_text())
  assert set(saved["goals"]) >= {"nf4_dq_ppl_vs_lora", "nf4_dq_base_vs_bf16",
                                 "nf4_dq_step_vs_lora"}
  assert "| qlora-nf4-dq |" in out and "goal <= 1.3x" in out


@pytest.mark.slow
def test_notebook_runs_the_example_runs(quick_run):
  # The notebook's side-by-side runs are the example's lora and QLoRA NF4+DQ
  # runs on the same settings and data: the same numbers.
  runs, _, _ = quick_run
  notebook = notebook_runner.run_notebook("smollm_lora.ipynb")
  assert notebook["settings"] == smollm_lora.QUICK
  by = {r.name: r for r in runs}
  assert [r.name for r in notebook["runs"]] == ["lora", "qlora-nf4-dq"]
  for run in notebook["runs"]:
    np.testing.assert_allclose(run.ppl_before, by[run.name].ppl_before,
                               rtol=1e-6)
    np.testing.assert_allclose(run.losses, by[run.name].losses, rtol=1e-5)
    np.testing.assert_allclose(run.ppl_after, by[run.name].ppl_after,
                               rtol=1e-5)
    assert run.base_bytes == by[run.name].base_bytes
  # Its step-by-step QLoRA: adapters trained on the NF4+DQ base, saved,
  # reloaded and merged.
  assert len(notebook["losses"]) == smollm_lora.QUICK.steps
  assert np.isfinite(notebook["losses"]).all()
