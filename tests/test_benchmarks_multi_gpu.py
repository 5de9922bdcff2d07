"""Smoke test of the multi_gpu suite at a tiny size on 2 simulated CPU devices."""

import gzip
import json
import os
import pathlib
import subprocess
import sys

import pytest
from _multiprocess import with_device_count

ROOT = pathlib.Path(__file__).resolve().parent.parent
SUITE = [sys.executable, "-m", "benchmarks", "run", "--suite", "multi_gpu", "--"]
TINY = [
  "--model-size",
  "tiny",
  "--tokenizer",
  "byte",
  "--batch-size",
  "4",
  "--seq-len",
  "32",
  "--steps",
  "3",
  "--eval-windows",
  "4",
  "--data-parallel",
  "2",
  "--fsdp",
  "1",
  "--methods",
  "adamw",
  "--weak",
  "--commit",
  "abc1234",
  "--shard-optimizer",
  "--train-args",
  "--seed 0",
]


@pytest.mark.slow
def test_mesh_run_matches_one_device_and_weak_run_doubles_the_global_batch(tmp_path):
  # A subprocess, so the simulated devices exist whatever this process's jax already started.
  out = tmp_path / "multi_gpu.json"
  env = {**os.environ, "XLA_FLAGS": with_device_count(os.environ["XLA_FLAGS"], 2)}
  subprocess.run(
    [*SUITE, *TINY, "--out", str(out), "--hlo-dir", str(tmp_path / "hlo")],
    cwd=ROOT,
    env=env,
    check=True,
    capture_output=True,
  )
  result = json.loads(out.read_text())
  assert result["commit"] == "abc1234"
  assert result["config"]["weak_global_batch"] == 8
  assert result["config"]["train_args"] == "--seed 0"
  assert result["config"]["shard_optimizer"]  # the mesh runs: ZeRO-1 over the data axis
  adamw = result["methods"]["adamw"]
  for layout in ("one", "mesh", "mesh_weak"):
    assert "error" not in adamw[layout], adamw[layout].get("error")
    assert len(adamw[layout]["losses"]) == 3
    assert adamw[layout]["seconds"]["compiling_steps"] > 0  # the example's summary, carried over
  # Same global batch, same data: the 2-device run follows the one-device run (bf16 compute).
  assert adamw["max_rel_loss_diff"] < 1e-3
  assert adamw["speedup"] == adamw["mesh"]["tokens_per_s"] / adamw["one"]["tokens_per_s"]
  assert adamw["weak_speedup"] == adamw["mesh_weak"]["tokens_per_s"] / adamw["one"]["tokens_per_s"]
  assert out.with_suffix(".png").exists()
  # --replot redraws the PNG from the JSON alone (what a run cut by a time limit leaves).
  out.with_suffix(".png").unlink()
  written = out.read_text()
  subprocess.run(
    [*SUITE, "--out", str(out), "--replot"], cwd=ROOT, env=env, check=True, capture_output=True
  )
  assert out.with_suffix(".png").exists() and out.read_text() == written
  # --hlo-dir: each run's compiled step; only the mesh runs communicate.
  collectives = ("all-reduce(", "reduce-scatter(", "all-gather(")
  for layout in ("one", "mesh", "mesh_weak"):
    with gzip.open(tmp_path / "hlo" / f"adamw-{layout}.hlo.txt.gz", "rt") as f:
      text = f.read()
    assert "ENTRY" in text
    assert any(c in text for c in collectives) == (layout != "one"), layout
    # ... and their bytes are counted from it into the JSON (AdamW: one program, no refresh).
    counted = adamw[layout]["collectives"]
    assert set(counted) == {"steady"}
    assert (counted["steady"]["total"] > 0) == (layout != "one"), layout
  # Each run's metrics stay; its final checkpoint is deleted (no --keep-checkpoints).
  runs = tmp_path / "multi_gpu_runs"
  assert sorted(p.name for p in runs.iterdir()) == ["adamw-mesh", "adamw-mesh_weak", "adamw-one"]
  for run in runs.iterdir():
    assert (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


@pytest.mark.slow
def test_a_profiled_mesh_only_run_keeps_its_trace_and_its_hlo_and_counts_the_bytes(tmp_path):
  # One run checks two flags: --profile-steps and --hlo-dir (a steady and a refresh program).
  out = tmp_path / "hlo.json"
  env = {**os.environ, "XLA_FLAGS": with_device_count(os.environ["XLA_FLAGS"], 2)}
  flags = [f for f in TINY if f != "--weak"]
  flags[flags.index("adamw")] = "adamw,galore"
  subprocess.run(
    [
      *SUITE,
      *flags,
      "--out",
      str(out),
      "--layouts",
      "mesh",
      "--update-every",
      "2",
      "--hlo-dir",
      str(tmp_path / "hlo"),
      "--profile-steps",
      "1",
    ],
    cwd=ROOT,
    env=env,
    check=True,
    capture_output=True,
  )
  result = json.loads(out.read_text())
  methods = result["methods"]
  assert set(methods["adamw"]) == {"mesh"} and result["config"]["profile_steps"] == 1
  assert len(methods["adamw"]["mesh"]["losses"]) == 3
  # The trace of step 2 is written; a CPU trace has no device tracks, so no timeline rows.
  traced = list((tmp_path / "hlo_runs" / "adamw-mesh" / "profile").rglob("*.json.gz"))
  assert traced and methods["adamw"]["mesh"]["profile"] == {}
  assert sorted(p.name for p in (tmp_path / "hlo").iterdir()) == [
    "adamw-mesh.hlo.txt.gz",
    "galore-mesh.hlo.txt.gz",
    "galore-mesh.refresh.hlo.txt.gz",
  ]
  adamw, galore = methods["adamw"]["mesh"]["collectives"], methods["galore"]["mesh"]["collectives"]
  # ZeRO-1 over the data axis: GaLore projects each device's share of the reduce-scattered
  # gradient locally, so its steady step moves AdamW's bytes; its refresh program also sums
  # the refresh's partial products over the shares, so it reduces more.
  assert galore["steady"] == adamw["steady"]
  assert galore["refresh"]["reduce"] > galore["steady"]["reduce"]
  assert galore["refresh"]["gather"] == galore["steady"]["gather"]
