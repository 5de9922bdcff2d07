"""The example's run summary: GRASS's rows ever selected; a finished run resumed again."""

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the examples are run from the repository root


from examples.llama import train  # noqa: E402


@pytest.mark.slow
def test_summary_holds_the_fraction_of_rows_ever_selected(tmp_path):
  # tiny: 2 blocks of 7 kernels, the smaller side 64; rank 16 = 1/4; selections at steps 0, 2, 4.
  code = train.main(["--model-size", "tiny", "--optimizer", "grass", "--rank", "16",
                     "--update-every", "2", "--steps", "6", "--batch-size", "4", "--seq-len",
                     "32", "--eval-every", "0", "--checkpoint-every", "0", "--run-dir",
                     str(tmp_path / "run")])
  assert code == 0
  rows = json.loads((tmp_path / "run" / "summary.json").read_text())["grass_rows_ever_selected"]
  assert rows["matrices"] == 14
  # Each selection trains 16 of 64 rows; three of them at most 48.
  assert 0.25 <= rows["min"] <= rows["mean"] <= rows["max"] <= 0.75


@pytest.mark.slow
def test_resuming_a_finished_run_evaluates_and_exits_cleanly(tmp_path):
  argv = ["--model-size", "tiny", "--steps", "2", "--batch-size", "4", "--seq-len", "32",
          "--eval-every", "0", "--checkpoint-every", "0", "--run-dir", str(tmp_path / "run")]
  assert train.main(argv) == 0
  first = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert train.main([*argv, "--resume"]) == 0
  again = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert again["steps"] == first["steps"] == 2
  assert again["final_eval_ppl"] == pytest.approx(first["final_eval_ppl"], rel=1e-6)
