"""The example's run summary: GRASS's rows ever selected; a finished run resumed again."""

import json
import math
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the examples are run from the repository root


from examples.llama import train  # noqa: E402
from test_llama import _c4_corpus, _flags  # noqa: E402

# The runs below train on test_llama's small local c4 corpus with the byte tokenizer (vocab
# 257, 4 evaluation windows), not the default corpus (tokenized into the user's cache folder,
# vocab 32000): what they check does not depend on the data.


@pytest.mark.slow
def test_summary_holds_the_fraction_of_rows_ever_selected(tmp_path):
  # tiny: 2 blocks of 7 kernels, the smaller side 64; rank 16 = 1/4; selections at steps 0, 2, 4.
  _c4_corpus(tmp_path / "c4")
  code = train.main(
    _flags(
      tmp_path,
      "run",
      "--optimizer",
      "grass",
      "--rank",
      "16",
      "--update-every",
      "2",
      "--steps",
      "6",
      "--eval-every",
      "0",
    )
  )
  assert code == 0
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert math.isfinite(summary["final_eval_loss"])
  rows = summary["grass_rows_ever_selected"]
  assert rows["matrices"] == 14
  # Each selection trains 16 of 64 rows; three of them at most 48.
  assert 0.25 <= rows["min"] <= rows["mean"] <= rows["max"] <= 0.75


@pytest.mark.slow
def test_resuming_a_finished_run_evaluates_and_exits_cleanly(tmp_path):
  _c4_corpus(tmp_path / "c4")
  argv = _flags(tmp_path, "run", "--steps", "2", "--eval-every", "0")
  assert train.main(argv) == 0
  first = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert train.main([*argv, "--resume"]) == 0
  again = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert again["steps"] == first["steps"] == 2
  assert again["final_eval_ppl"] == pytest.approx(first["final_eval_ppl"], rel=1e-6)
