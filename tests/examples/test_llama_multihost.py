"""The LLaMA example on 2 processes (tests/_multiprocess.py): --num-processes, --process-id,
--coordinator-address; each process loads its own rows of the global batch; exact resume;
one-line errors for processes that cannot meet."""

import json
import pathlib
import shutil
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the examples are run from the repository root
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import _multiprocess  # noqa: E402
from examples.llama import data, train  # noqa: E402
from test_llama import _c4_corpus, _flags, _train_records  # noqa: E402

MULTIHOST = (
  "--num-processes",
  "{num_processes}",
  "--process-id",
  "{process_id}",
  "--coordinator-address",
  "{coordinator}",
  "--distributed-timeout",
  "60",
)
# GaLore refreshes at step 0 only (the resumed run compiles the other step program);
# 2 processes × 2 devices, batch 4: each process holds 2 rows of every batch.
RUN = (
  "--optimizer",
  "galore",
  "--rank",
  "8",
  "--update-every",
  "100",
  "--steps",
  "2",
  "--compute-dtype",
  "float32",
  "--eval-every",
  "0",
  "--data-parallel",
  "2",
  "--fsdp",
  "2",
)


def _two_processes(tmp_path, run, *extra, timeout_s=300):
  flags = _flags(tmp_path, run, *RUN, *MULTIHOST, *extra)
  return _multiprocess.run(
    _multiprocess.python("-m", "examples.llama", "train", *flags),
    num_processes=2,
    local_devices=2,
    timeout_s=timeout_s,
    cwd=ROOT,
  )


def _losses(run_dir):
  return [
    json.loads(line)["loss"]
    for line in _train_records(run_dir).splitlines()
    if json.loads(line)["kind"] == "train"
  ]


def _cut_after_step_1(run_dir, to):
  """A copy of `run_dir` as a run preempted after its checkpoint of step 1 would leave it."""
  shutil.copytree(run_dir, to)
  shutil.rmtree(to / "checkpoints" / "2")
  (to / "summary.json").unlink()


@pytest.mark.slow
def test_two_processes_train_like_one_device_each_on_its_rows_and_resume_exactly(tmp_path):
  _c4_corpus(tmp_path / "c4")
  whole = _two_processes(tmp_path, "whole", "--checkpoint-every", "1")
  # Each process loaded its own rows of every global batch of 4: together all of them, once.
  rows = []
  for process in whole:
    line = next(l for l in process.stdout.splitlines() if l.startswith("data: process "))
    first, last = (int(x) for x in line.split(" loads rows ")[1].split(" of ")[0].split(".."))
    rows.append(range(first, last + 1))
  assert sorted(r for rs in rows for r in rs) == [0, 1, 2, 3] and all(len(r) == 2 for r in rows)
  # Process 0 alone writes the run's files; both saved their shards of steps 1 and 2.
  assert "final eval perplexity" in whole[0].stdout
  summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
  assert summary["steps"] == 2 and np.isfinite(summary["final_eval_loss"])
  assert sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir()) == ["1", "2"]
  # The same global batches, so the one-device trajectory up to float32 rounding: a process
  # that loaded another's rows (or none) would train on another batch.
  assert train.main(_flags(tmp_path, "one", *RUN[:-4])) == 0
  np.testing.assert_allclose(_losses(tmp_path / "whole"), _losses(tmp_path / "one"), rtol=2e-4)
  # Resumed from step 1 on 2 processes: the records of the uninterrupted run, bit for bit.
  _cut_after_step_1(tmp_path / "whole", tmp_path / "cut")
  resumed = _two_processes(tmp_path, "cut", "--resume")
  assert all("resumed from step 1" in p.stdout for p in resumed)
  assert _train_records(tmp_path / "cut") == _train_records(tmp_path / "whole")
  # The same checkpoint resumed by one process on one device (the multi-host flags are not
  # inherited from the run's config.json, the mesh flags are given anew): its trajectory again.
  _cut_after_step_1(tmp_path / "whole", tmp_path / "cut-on-one")
  assert (
    train.main(
      ["--resume", "--run-dir", str(tmp_path / "cut-on-one"), "--data-parallel", "1", "--fsdp", "1"]
    )
    == 0
  )
  np.testing.assert_allclose(_losses(tmp_path / "cut-on-one"), _losses(tmp_path / "one"), rtol=2e-4)


def test_each_process_reads_only_its_rows_of_a_batch(tmp_path):
  stream = np.arange(4000, dtype=np.uint16)
  whole = data.WindowBatches(stream, 16, 6, seed=1)
  parts = [data.WindowBatches(stream, 16, 6, seed=1, rows=r) for r in (range(0, 3), range(3, 6))]
  for _ in range(3):
    np.testing.assert_array_equal(np.concatenate([next(p) for p in parts]), next(whole))
  assert [p.position for p in parts] == [whole.position] * 2


def _errors(results):
  return [p.stderr.strip() for p in results]


@pytest.mark.slow  # three pairs of processes of the example's CLI, each importing JAX
def test_processes_that_cannot_meet_end_with_one_line_naming_the_flag(tmp_path):
  # None of these processes gets as far as JAX's own initialization.
  _c4_corpus(tmp_path / "c4")
  base = _flags(tmp_path, "bad", *RUN)
  # Process 1 looks for process 0 at a port where nothing listens: process 1 cannot reach it,
  # process 0 waits for process 1 in vain; both give up after --distributed-timeout.
  elsewhere = f"localhost:{_multiprocess.free_port()}"
  start = time.monotonic()
  results = _multiprocess.run(
    lambda i: _multiprocess.python(
      "-m",
      "examples.llama",
      "train",
      *base,
      "--num-processes",
      "2",
      "--process-id",
      str(i),
      "--coordinator-address",
      "{coordinator}" if i == 0 else elsewhere,
      "--distributed-timeout",
      "3",
    ),
    num_processes=2,
    timeout_s=120,
    cwd=ROOT,
    check=False,
  )
  assert time.monotonic() - start < 60
  assert [p.returncode for p in results] == [2, 2], _multiprocess.describe(results)
  waited, unreachable = _errors(results)
  assert "\n" not in waited and "\n" not in unreachable
  assert waited.startswith(
    "error: --num-processes 2: process(es) [1] did not reach --coordinator-address localhost:"
  )
  assert unreachable == (
    f"error: process 1 cannot reach process 0 at --coordinator-address {elsewhere} within "
    "--distributed-timeout 3 s; start process 0 on that host, or fix the address"
  )
  # Process counts that disagree: every process says so, at once.
  results = _multiprocess.run(
    lambda i: _multiprocess.python(
      "-m",
      "examples.llama",
      "train",
      *base,
      "--num-processes",
      str(2 + i),
      "--process-id",
      str(i),
      "--coordinator-address",
      "{coordinator}",
      "--distributed-timeout",
      "60",
    ),
    num_processes=2,
    timeout_s=120,
    cwd=ROOT,
    check=False,
  )
  assert [p.returncode for p in results] == [2, 2], _multiprocess.describe(results)
  assert (
    _errors(results)
    == ["error: --num-processes differs between processes: 2 on process 0, 3 on process 1"] * 2
  )
  # Two processes given the same id.
  results = _multiprocess.run(
    lambda i: _multiprocess.python(
      "-m",
      "examples.llama",
      "train",
      *base,
      "--num-processes",
      "3",
      "--process-id",
      str(min(i, 1)),
      "--coordinator-address",
      "{coordinator}",
      "--distributed-timeout",
      "60",
    ),
    num_processes=3,
    timeout_s=120,
    cwd=ROOT,
    check=False,
  )
  assert [p.returncode for p in results] == [2, 2, 2], _multiprocess.describe(results)
  assert _errors(results) == ["error: --process-id 1 is given to two processes"] * 3
  assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--num-processes", "2", "--process-id", "2"], "--process-id 2 must be 0 .. 1"),
    (["--num-processes", "-1"], "--num-processes must be positive"),
    (["--process-id", "1"], "--process-id is for a run of several processes"),
    (["--coordinator-address", "h:1"], "--coordinator-address is for a run of several"),
    (["--num-processes", "2", "--coordinator-address", "h"], "'h' is not HOST:PORT"),
    (["--num-processes", "2"], "--num-processes 2 needs --coordinator-address HOST:PORT"),
    (["--num-processes", "2", "--distributed-timeout", "0"], "--distributed-timeout must be"),
  ],
  ids=["id", "count", "id alone", "address alone", "address", "no address", "timeout"],
)
def test_bad_multihost_flags_end_with_one_line(tmp_path, capsys, monkeypatch, flags, message):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  assert train.main(_flags(tmp_path, "bad", *flags)) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err, err
  assert not (tmp_path / "bad").exists()
