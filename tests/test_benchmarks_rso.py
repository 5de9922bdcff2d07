"""Smoke test of benchmarks/rso_memory.py at a tiny size on the CPU (compile only)."""

import json

from benchmarks import rso_memory

TINY = ["--layers", "1", "--batch", "1", "--seq", "32", "--hidden", "32", "--ffn", "64",
        "--heads", "2", "--rank", "8"]


def test_rso_memory_writes_json_and_plot_for_every_method(tmp_path):
  out = tmp_path / "rso_memory.json"
  result = rso_memory.main(TINY + ["--out", str(out)])
  assert json.loads(out.read_text()) == result
  assert out.with_suffix(".png").stat().st_size > 0
  for method in rso_memory.METHODS:
    numbers = result["methods"][method]
    assert "error" not in numbers, numbers.get("error")
    assert numbers["memory_analysis"]["temp_size_in_bytes"] > 0
  # RSO trains B (r×out) and the norms; W and P ride along as constants.
  rso, adamw = result["methods"]["rso"], result["methods"]["adamw"]
  assert rso["trainable_param_bytes"] < adamw["trainable_param_bytes"]
  assert rso["frozen_bytes"] > 0
  # A block keeps x·P (b×r) for its linear layers' backward instead of their inputs.
  assert (rso["block_residual_bytes"]["activations"]
          < adamw["block_residual_bytes"]["activations"])
  assert set(result["ratios_vs_adamw"]) == {"galore", "rso"}
  assert result["config"]["attention"] == "xla"


def test_rso_step_compiles_under_remat(tmp_path):
  # nnx.remat per block writes W and P back after each block: the step must merge them as
  # Variables of its own trace (regression: TraceContextError on FrozenKernel).
  args = rso_memory._parser().parse_args(  # pylint: disable=protected-access
      TINY + ["--out", str(tmp_path / "x.json"), "--remat", "--attention", "xla",
              "--worker", "rso"])
  numbers = rso_memory._worker(args)  # pylint: disable=protected-access
  assert numbers["memory_analysis"]["temp_size_in_bytes"] > 0
  assert numbers["frozen_bytes"] > 0
