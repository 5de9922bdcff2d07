"""`python -m benchmarks run --suite train_step | largest_model --quick` on the CPU.

The workers compile unoptimised CPU code (--xla_backend_optimization_level=0, as
tests/test_notebooks.py): these runs check what the suites record, not how fast the CPU is.
"""

import gzip
import json
import math
import re
import subprocess
import sys
import time

import pytest

from benchmarks import largest_model
from benchmarks import record
from benchmarks import suites
from benchmarks import train_setups
from benchmarks import train_step

PNG = b"\x89PNG\r\n\x1a\n"
# The worker imports this file by this name to run `run_job` below.
THIS_MODULE = "tests.test_benchmarks_suites_train"


def run_job(job: dict) -> dict:
  """A worker job for the tests below: reports progress, floods both pipes, sleeps."""
  train_setups.progress("about to flood")
  print("x" * 1000 * job.get("flood_kb", 0))  # stdout: must not reach the protocol pipe
  sys.stderr.write("y" * 1000 * job.get("flood_kb", 0) + "\n")
  train_setups.progress(f"sleeping {job['sleep_s']} s")
  time.sleep(job["sleep_s"])
  return {"slept": job["sleep_s"]}


@pytest.mark.slow
def test_train_step_quick_times_every_method_and_writes_json_and_png(tmp_path):
  out = tmp_path / "train_step.json"
  result = suites.main(["run", "--suite", "train_step", "--quick", "--out", str(out)])
  assert json.loads(out.read_text()) == result
  assert out.with_suffix(".png").read_bytes()[:8] == PNG
  assert result["benchmark"] == "train_step" and result["platform"] == "cpu"
  assert result["config"]["param_dtype"] == "float32"
  (size,) = result["results"]["sizes"]
  assert size["size"] == "tiny" and size["tokens_per_step"] == size["batch"] * size["seq"]
  rows = {r["method"]: r for r in size["rows"]}
  assert set(rows) == set(train_setups.METHODS)
  for name, r in rows.items():
    assert "error" not in r, (name, r.get("error"))
    assert math.isfinite(r["step_ms"]) and r["step_ms"] > 0, name
    assert r["losses_finite"], name
    assert r["tokens_per_s_amortised_over_200_ratio_to_adamw"] > 0, name
    assert r["step_ms_pipelined"] > 0, name  # steps back to back, one sync
    assert r["tokens_per_s_amortised_over_200_pipelined_ratio_to_adamw"] > 0, name
    assert r["memory_analysis"]["step"]["need_bytes"] > 0, name
    assert r["peak_bytes_in_use"] is None  # the CPU has no peak counter
    if r["level"] == "optimizer":  # issue 7: state bytes within 2% of the method's formula
      assert abs(r["state_over_analytic"] - 1) < 0.02, (name, r["state_over_analytic"])
  # Refreshes: a step at count T (GaLore, GRASS), a program between steps (model level).
  for name, kind in train_setups.REFRESH_KIND.items():
    assert rows[name]["refresh_kind"] == kind and rows[name]["refresh_ms"] > 0, name
    assert "refresh" in rows[name]["memory_analysis"] or kind == "count"
  # The model level trains B / D only: W rides along frozen.
  for name in train_setups.MODEL_LEVEL:
    assert rows[name]["frozen_bytes"] > 0
    assert rows[name]["trainable_param_bytes"] < rows["adamw"]["trainable_param_bytes"]
  # One P for q/k/v and one for gate/up: fewer frozen bytes than a P per layer.
  assert rows["rso_model_shared"]["frozen_bytes"] < rows["rso_model"]["frozen_bytes"]
  assert set(size["targets"]) >= {"osd", "grass"}
  assert "ratio_pipelined" in size["targets"]["osd"]


@pytest.mark.slow
def test_train_step_host_refresh_times_steady_and_refresh_programs(tmp_path):
  # --host-refresh: the example's loop; GaLore's refresh step is a program of its own (kind
  # "count", amortised), OSD's steady step starts past its step-0 SVD; finite losses (a step
  # told the wrong refresh would have NaN updates).
  result = suites.main(
    [
      "run",
      "--suite",
      "train_step",
      "--quick",
      "--host-refresh",
      "--methods",
      "galore,osd,galore_warm_bf16_products",
      "--out",
      str(tmp_path / "t.json"),
    ]
  )
  assert result["config"]["host_refresh"]
  rows = {r["method"]: r for r in result["results"]["sizes"][0]["rows"]}
  assert set(rows) == {"adamw", "galore", "osd", "galore_warm_bf16_products"}
  for name, r in rows.items():
    assert "error" not in r and r["losses_finite"], (name, r.get("error"))
    assert r["host_refresh"] == (name != "adamw")
  for name in ("galore", "galore_warm_bf16_products"):
    assert rows[name]["refresh_kind"] == "count" and rows[name]["refresh_ms"] > 0, name
  # The variant holds GaLore's state (its formula's), and takes other steps than GaLore's own.
  assert abs(rows["galore_warm_bf16_products"]["state_over_analytic"] - 1) < 0.02
  assert rows["galore_warm_bf16_products"]["loss_last"] != rows["galore"]["loss_last"]
  assert "refresh" in rows["galore"]["memory_analysis"] and "refresh_kind" not in rows["osd"]


@pytest.mark.slow
def test_train_step_scan_layers_runs_the_optimizer_level_on_a_scanned_model(tmp_path):
  out = tmp_path / "train_step_scan.json"
  result = suites.main(
    [
      "run",
      "--suite",
      "train_step",
      "--quick",
      "--scan-layers",
      "--methods",
      "osd,rso_model",
      "--profile-top",
      "5",
      "--out",
      str(out),
    ]
  )
  assert result["config"]["scan_layers"]
  (size,) = result["results"]["sizes"]
  assert size["model"]["scan_layers"]
  rows = {r["method"]: r for r in size["rows"]}
  assert set(rows) == {"adamw", "osd"}  # rso_model needs one module per layer: left out
  for name, r in rows.items():
    assert "error" not in r and r["losses_finite"], (name, r.get("error"))
    # --profile-top: a kernel summary per row (the CPU trace has no device kernels: zeros).
    assert r["kernels"]["kernel_ms"] == sum(r["kernels"]["by_kind_ms"].values()), name
  for flag in ("--scan-layers", "--profile-top=3"):
    with pytest.raises(SystemExit, match="train_step only"):
      suites.main(["run", "--suite", "largest_model", "--quick", flag])


@pytest.mark.slow
def test_largest_model_quick_runs_the_ladder_and_writes_json_and_png(tmp_path):
  out = tmp_path / "largest_model.json"
  result = suites.main(
    [
      "run",
      "--suite",
      "largest_model",
      "--quick",
      "--out",
      str(out),
      "--methods",
      "adamw,rso_model",
    ]
  )
  assert json.loads(out.read_text()) == result
  assert out.with_suffix(".png").read_bytes()[:8] == PNG
  assert result["config"]["param_dtype"] == "bfloat16"
  assert result["config"]["state_dtype"] == "float32"
  res = result["results"]
  for method in ("adamw", "rso_model"):
    rows = res["rows"][method]
    assert [r["size"] for r in rows] == list(largest_model.QUICK_SIZES)
    for r in rows:  # a 1 GB budget holds every quick rung
      assert r["ran"] and r["need_bytes"] <= r["limit_bytes"], (method, r)
      assert all(math.isfinite(x) for x in r["step_ms"] + r["losses"])
      # bf16 weights, float32 optimizer state (the only floats in it).
      assert set(r["opt_state_bytes_by_dtype"]) - {"int32", "uint32"} == {"float32"}
    assert res["summary"]["methods"][method]["largest_that_ran"] == "d64"
    assert res["summary"]["methods"][method]["d64_basis"] == "predicted"  # no CPU peak


@pytest.mark.slow
def test_a_small_budget_makes_a_smaller_model_the_answer():
  # d32's step needs about 0.9 MB, d64's about 2 MB: a 1.2 MB budget runs d32 only; d64, the
  # reported size, is still compiled; d128 past it is skipped.
  logs = []
  result = largest_model.run(
    ["d32", "d64", "d128"], 2, ["adamw"], {"budget_gb": 1.2e-3}, quick=True, log=logs.append
  )
  rows = {r["size"]: r for r in result["rows"]["adamw"]}
  assert rows["d32"]["ran"] and rows["d32"]["need_bytes"] <= 1.2e6
  assert not rows["d64"]["fits"] and not rows["d64"]["ran"]
  assert rows["d64"]["need_bytes"] > rows["d64"]["limit_bytes"] == 1_200_000
  assert "skipped" in rows["d128"]
  assert result["summary"]["methods"]["adamw"]["largest_that_ran"] == "d32"


@pytest.mark.slow
@pytest.mark.parametrize("isolate", [False, True])
def test_a_job_past_its_timeout_is_killed_and_recorded_with_its_last_progress(isolate, capsys):
  logs = []
  with train_setups.Workers(isolate, timeout_s=8, log=logs.append) as workers:
    slow = workers.run({"module": THIS_MODULE, "method": "slow", "sleep_s": 60})
    fast = workers.run({"module": THIS_MODULE, "method": "fast", "sleep_s": 0})
  assert slow["timed_out"] and slow["last_progress"] == "sleeping 60 s"
  assert "sleeping 60 s" in slow["error"] and 8 <= slow["elapsed_s"] < 8 + 30
  assert fast == {"slept": 0, "elapsed_s": fast["elapsed_s"]}  # a fresh worker took it
  assert logs[0] == "  [slow] started" and logs[1].startswith("  [slow] timed out after ")
  assert logs[2] == "  [fast] started" and logs[3].startswith("  [fast] done after ")
  # The worker's progress reached the parent's stderr as it came, with the job's name.
  assert "    [slow] sleeping 60 s  (" in capsys.readouterr().err


@pytest.mark.slow
def test_a_worker_that_floods_stdout_and_stderr_still_answers():
  # 1 MB on each pipe, 16 times a pipe's buffer: the parent drains both as they come.
  with train_setups.Workers(True, timeout_s=60, log=lambda line: None) as workers:
    result = workers.run({"module": THIS_MODULE, "method": "flood", "sleep_s": 0, "flood_kb": 1000})
  assert result["slept"] == 0, result


def test_a_worker_on_another_platform_than_the_parent_refuses_the_job():
  # JAX falls back to the CPU where the GPU backend fails to start; the job must not run there.
  with train_setups.Workers(True, timeout_s=60, log=lambda line: None, platform="gpu") as workers:
    result = workers.run({"module": THIS_MODULE, "method": "any", "sleep_s": 0})
  assert "slept" not in result and "runs on cpu, the parent on gpu" in result["error"]


def test_train_step_writes_its_json_before_the_first_job_and_records_a_timeout():
  snapshots, logs = [], []
  result = train_step.run(
    ["tiny"],
    1,
    ["adamw"],
    {"job_timeout_s": 0.5},
    quick=True,
    log=logs.append,
    checkpoint=lambda r: snapshots.append(json.loads(json.dumps(r))),
  )
  # Written before any job ran (its config), then as adamw started ("running")...
  assert snapshots[0]["sizes"][0]["rows"] == [] and snapshots[0]["job_timeout_s"] == 0.5
  assert snapshots[1]["sizes"][0]["rows"] == [{"method": "adamw", "status": "running"}]
  # ... and after it: killed at its limit (a worker needs more than 0.5 s to import JAX).
  (row,) = result["sizes"][0]["rows"]
  assert row["method"] == "adamw" and row["timed_out"] and "status" not in row
  assert snapshots[-1]["sizes"][0]["rows"] == [row]
  assert "  [adamw tiny] started" in logs
  assert any(line.startswith("  [adamw tiny] timed out after ") for line in logs)


def _tiny_job(method: str, **extra) -> dict:
  """A train-step job for `method` on the tiny LLaMA, 2 × 16 tokens, refreshes on the host."""
  return {
    "size": "tiny",
    "method": method,
    "model": train_setups.model_fields(train_step.SIZES["tiny"], 512, False, "float32"),
    "batch": 2,
    "seq": 16,
    "rank": None,
    "state_dtype": None,
    "attention": "xla",
    "host_refresh": True,
    **extra,
  }


def test_hlo_dir_keeps_each_compiled_program_as_the_job_compiled_it(tmp_path):
  # --hlo-dir: the step's and the refresh's compiled HLO text, gzipped, named for method,
  # size and program.
  _, compiled, _ = train_setups.start_job(_tiny_job("galore", hlo_dir=str(tmp_path)))
  with gzip.open(tmp_path / "galore_tiny_step.hlo.txt.gz", "rt") as f:
    assert f.read() == compiled.step.as_text()
  with gzip.open(tmp_path / "galore_tiny_refresh.hlo.txt.gz", "rt") as f:
    assert f.read() == compiled.refresh.as_text()


def test_results_record_the_xla_flags_they_ran_under(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=false")
  assert record.provenance("train_step")["xla_flags"] == "--xla_gpu_enable_triton_gemm=false"
  monkeypatch.delenv("XLA_FLAGS")
  assert record.provenance("train_step")["xla_flags"] == ""


def test_results_record_the_commit_and_whether_the_tree_differs_from_it(
  tmp_path, tmp_path_factory, monkeypatch
):
  git = lambda *args: subprocess.run(
    ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
    cwd=tmp_path,
    check=True,
    capture_output=True,
    text=True,
  )
  git("init", "-q")
  (tmp_path / "a.py").write_text("x = 1\n")
  git("add", "a.py")
  git("commit", "-q", "-m", "one")
  head = git("rev-parse", "--short", "HEAD").stdout.strip()
  monkeypatch.setattr(record, "ROOT", tmp_path)
  monkeypatch.delenv(record.ENV, raising=False)
  assert record.commit() == head
  (tmp_path / "b.py").write_text("untracked: not the code of any commit, not counted\n")
  assert record.commit() == head
  (tmp_path / "a.py").write_text("x = 2\n")  # an edit, or files newer than a stale .git
  assert record.commit() == f"{head}-dirty"
  monkeypatch.setenv(record.ENV, "abc1234")  # the command names the commit: that wins
  assert record.commit() == "abc1234"
  monkeypatch.setattr(record, "ROOT", tmp_path_factory.mktemp("not_a_repository"))
  monkeypatch.delenv(record.ENV)
  assert record.commit() == "unknown"


def test_a_settings_variant_is_its_method_compiled_with_the_setting_changed(monkeypatch):
  # osd_per_leaf_steps: OSD's train step as compiled with the combinator's
  # STACK_SMALL_PROJECTOR_STEPS off (the default since af9fd14; set on here, so that the variant
  # differs from its method), and the setting restored after the compile.
  from optax_subspace import _combinator  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(_combinator, "STACK_SMALL_PROJECTOR_STEPS", True)

  def step_text(method):
    text = train_setups.start_job(_tiny_job(method))[1].step.as_text()
    # The computations without their source metadata (the header's file and stack-frame tables,
    # the ops' metadata), which differ between a fresh compile and one loaded from the tests'
    # compilation cache.
    body = text[re.search(r"^(%|ENTRY)", text, re.M).start() :]
    return re.sub(r", metadata=\{[^}]*\}", "", body)

  variant = step_text("osd_per_leaf_steps")
  assert _combinator.STACK_SMALL_PROJECTOR_STEPS is True
  assert variant != step_text("osd")
  monkeypatch.setattr(_combinator, "STACK_SMALL_PROJECTOR_STEPS", False)
  assert variant == step_text("osd")
