"""Smoke test of the communication_train_step suite at a tiny size (compile only, 2 CPU devices)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from _multiprocess import with_device_count

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = [
  "--hidden",
  "64",
  "--ffn",
  "176",
  "--heads",
  "4",
  "--vocab",
  "256",
  "--rank",
  "8",
  "--seq",
  "16",
  "--layers",
  "1",
  "--methods",
  "adamw,rso_model",
  "--meshes",
  "data",
]


@pytest.mark.slow
def test_model_level_rso_all_reduces_less_than_adamw_whose_all_reduce_is_the_full_gradient(
  tmp_path,
):
  # A subprocess, so the simulated devices exist whatever this process's jax already started.
  out = tmp_path / "communication_train_step.json"
  env = {**os.environ, "XLA_FLAGS": with_device_count(os.environ["XLA_FLAGS"], 8)}
  subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks",
      "run",
      "--suite",
      "communication_train_step",
      "--",
      *TINY,
      "--out",
      str(out),
    ],
    cwd=ROOT,
    env=env,
    check=True,
    capture_output=True,
  )
  runs = json.loads(out.read_text())["runs"]["data"]
  adamw, rso = runs["adamw"], runs["rso_model"]
  assert "error" not in rso, rso.get("error")
  # Data parallel: weights replicated, so the step all-reduces the gradient and nothing else
  # of weight size: AdamW's is the full gradient, Σ params × 4 bytes, give or take scalars
  # (the loss) and 1% for whatever XLA adds.
  full_gradient = adamw["analytic"]["reduce"]
  measured = adamw["steady"]["all-reduce"]["operand_bytes"]
  assert abs(measured - full_gradient) <= 0.01 * full_gradient, (measured, full_gradient)
  # Model-level RSO reduces only B's gradients (r × out) and the unprojected Params.
  rso_measured = rso["steady"]["all-reduce"]["operand_bytes"]
  assert abs(rso_measured - rso["analytic"]["reduce"]) <= 0.01 * rso["analytic"]["reduce"]
  assert rso_measured < measured
  assert rso["ratio_vs_adamw"]["reduce"] < 1
