"""Tests for examples/minilm_ptq.py on the real all-MiniLM-L6-v2 (reduced).

A few sentences and, for the sensitivity study, two layers. The cosine
floors leave a margin under what the full run measures on the 32 sentences
of examples/data/sentences.txt (README table): W8A8 K-C min 0.996, and for
the two layers of the quick study (the token-type embedding and
layers_0/attention/output, int8 per-channel weights and static per-tensor
activations: drops of 5e-5 and 1.5e-5 on their own) a mean cosine above
0.9995.

examples/minilm_ptq.ipynb runs here too (in this process: the notebook's
quick mode uses the same sentences, so it reuses this module's compiled
programs), and its PTQ algorithms table is the one checked below.
"""

from __future__ import annotations

import pathlib
import re
import sys

import jax
import pytest

import jaxq

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import minilm  # noqa: E402
import minilm_ptq  # noqa: E402
import notebook_runner  # noqa: E402

SENTENCES = 4  # the notebook's NUM_SENTENCES in quick mode


@pytest.fixture(scope="module")
def setup():
  try:
    pretrained = minilm.load_pretrained()
  except ModuleNotFoundError as error:
    message = str(error)
  else:
    sentences = minilm.read_sentences(minilm.SENTENCES_FILE)[:SENTENCES]
    return pretrained, sentences, minilm.embed(pretrained, sentences)
  pytest.fail(message, pytrace=False)


def test_rules_cover_every_layer_with_the_pairing(setup):
  pretrained, sentences, _ = setup
  weight, act = minilm_ptq.PAIRINGS["W8A8 G-G"]
  qmodel = jaxq.quantize_model(pretrained.model,
                               minilm_ptq.study_rules(weight, act))
  batch = minilm_ptq.batches(pretrained, sentences)[0]
  jax.eval_shape(qmodel.apply, pretrained.variables, *batch)  # traces only
  layers = jaxq.layers(qmodel)
  assert len(layers) == 3 + 6 * 6  # 3 embeddings, 6 Dense per block
  for path, info in layers.items():
    if info.module_type == "Embed":  # weight-only, one scale per row
      assert info.weight == minilm_ptq.EMBED and info.act is None, path
    else:
      assert (info.weight, info.act) == (weight, act), path


@pytest.mark.slow
def test_w8a8_per_channel_embeddings_stay_close_to_float(setup):
  pretrained, sentences, reference = setup
  rows = minilm_ptq.compare(pretrained, sentences, reference, ["W8A8 K-C"])
  float_row, kc = rows
  assert float_row.nbytes == 90_261_504  # 22.6M float32 parameters
  assert kc.min_cosine > 0.99
  assert kc.mean_cosine >= kc.min_cosine
  # int8 weights and per-row int8 embeddings: about 4x smaller.
  assert 3.8 < float_row.nbytes / kc.nbytes < 4.0
  assert "W8A8 K-C" in minilm_ptq.format_table(rows)


@pytest.mark.slow
def test_quick_study_runs_end_to_end(tmp_path, capsys):
  # The comparison rows are covered above: only the float row here.
  minilm_ptq.main(["--quick", "--no-progress", "--pairings", "--plots",
                   str(tmp_path)])
  out = capsys.readouterr().out
  for needle in ("| float32", "sensitivity of W8A8 T-C",
                 "embeddings/token_type", "layers_0/attention/output",
                 "partial quantization", "per-layer report", "total"):
    assert needle in out
  for name in ("minilm_histograms.png", "minilm_sensitivity.png"):
    assert (tmp_path / name).stat().st_size > 5000
  # Both layers quantized (no skip needed): the partial model's cosine.
  reached = re.search(r"0 of 2 layers left in float, metric ([\d.]+)", out)
  assert float(reached.group(1)) > 0.9995


@pytest.fixture(scope="module")
def notebook(setup) -> dict:
  """examples/minilm_ptq.ipynb, run once in quick mode: its namespace."""
  del setup  # without the wheel, that fixture fails with the pip command
  return notebook_runner.run_notebook("minilm_ptq.ipynb")


@pytest.mark.slow
def test_notebook_runs_on_the_tested_sentences(notebook, setup):
  _, sentences, reference = setup
  assert notebook["QUICK"] and notebook["sentences"] == sentences
  assert notebook["calibration"] == sentences
  kc = {row.name: row for row in notebook["rows"]}["W8A8 K-C"]
  assert kc.min_cosine > 0.99
  assert (notebook["reference"] == reference).all()


@pytest.mark.slow
def test_ptq_algorithms_quick_table(notebook):
  # Section 3 on the first block only, 4 calibration and 4 other held-out
  # sentences (the notebook's quick run): every row runs, stays close to
  # float, and SmoothQuant beats the plain static per-tensor W8A8 (quick
  # run: 0.9967 against 0.9941).
  calibration, evaluation = notebook["calibration"], notebook["evaluation"]
  assert len(calibration) == len(evaluation) == SENTENCES
  assert not set(evaluation) & set(
      minilm.read_sentences(minilm.SENTENCES_FILE))
  assert notebook["methods"] == ("RTN max", "AWQ", "GPTQ")
  assert notebook["layers"] == minilm_ptq.QUICK_ALGORITHM_LAYERS
  float_row, *rows = notebook["algorithm_rows"]
  assert float_row.name == "float32"
  by_name = {row.name: row for row in rows}
  assert len(by_name) == 5
  assert all(row.min_cosine > 0.98 for row in rows), rows
  smooth = next(r for n, r in by_name.items() if "SmoothQuant" in n)
  assert smooth.mean_cosine > by_name["W8A8 static max"].mean_cosine
