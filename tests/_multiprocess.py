"""A multi-process test harness: one program run as N JAX processes on this machine.

`run(argv, num_processes=2, local_devices=4)` starts `num_processes` copies of a command, each
a JAX process with `local_devices` simulated CPU devices, as a multi-host job runs one process
per host: a coordinator on localhost at a free port, CPU collectives through gloo. In `argv`,
"{coordinator}", "{num_processes}" and "{process_id}" are replaced per process; a program of
the tests calls `initialize(...)` with them first. Every process runs in its own process group,
its output goes to files (no pipe to fill), and one deadline bounds them all: at the deadline,
or a few seconds after one process fails (the others would wait on it in a collective), every
group still running is killed. A hung or crashed process fails the test within its timeout.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

# After one process has failed, how long the others may take to end on their own.
GRACE_S = 10.0


def free_port() -> int:
  """A TCP port that was free a moment ago on localhost."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def with_device_count(xla_flags: str, count: int) -> str:
  """`xla_flags` with the simulated host device count set to `count`."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", xla_flags).split()
  return " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])


def use_gloo() -> None:
  """CPU collectives across processes through gloo (the option's name varies with JAX)."""
  import jax  # pylint: disable=g-import-not-at-top

  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:  # JAX < 0.4.29 named it differently
    jax.config.update("jax_cpu_enable_gloo_collectives", True)


def initialize(coordinator: str, num_processes: int, process_id: int, timeout_s: int = 60):
  """jax.distributed.initialize for a process started by `run`, with gloo collectives."""
  import jax  # pylint: disable=g-import-not-at-top

  use_gloo()
  jax.distributed.initialize(
    coordinator, int(num_processes), int(process_id), initialization_timeout=timeout_s
  )


@dataclasses.dataclass
class Process:
  """How one process ended: `returncode` (negative: killed by that signal), its output."""

  process_id: int
  pid: int  # also its process group's id
  returncode: int | None
  stdout: str
  stderr: str
  killed: bool  # killed by the harness (deadline, or after another process failed)


class ProcessesFailed(AssertionError):
  pass


def _kill_group(popen) -> None:
  try:
    os.killpg(popen.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def run(
  argv,
  num_processes: int = 2,
  local_devices: int = 4,
  timeout_s: float = 300,
  env: dict | None = None,
  cwd=None,
  check: bool = True,
  grace_s: float = GRACE_S,
) -> list[Process]:
  """Runs `argv` (a list, or a function of the process id giving one; placeholders filled per
  process) as `num_processes` JAX processes.

  Returns each process's `Process`; with `check`, raises `ProcessesFailed` (with every
  process's last output) unless all of them exited 0 within `timeout_s`. Once one has failed,
  the others get `grace_s` more seconds.
  """
  coordinator = f"localhost:{free_port()}"
  base = dict(os.environ, **(env or {}))
  base["XLA_FLAGS"] = with_device_count(base.get("XLA_FLAGS", ""), local_devices)
  base["JAX_PLATFORMS"] = "cpu"
  base.setdefault("PYTHONUNBUFFERED", "1")
  with tempfile.TemporaryDirectory(prefix="multiprocess-") as logs:
    started = []
    try:
      for i in range(num_processes):
        fill = dict(coordinator=coordinator, num_processes=num_processes, process_id=i)
        args = [str(a).format(**fill) for a in (argv(i) if callable(argv) else argv)]
        out = open(os.path.join(logs, f"{i}.out"), "w+")
        err = open(os.path.join(logs, f"{i}.err"), "w+")
        popen = subprocess.Popen(
          args,
          env=base,
          cwd=cwd,
          stdout=out,
          stderr=err,
          stdin=subprocess.DEVNULL,
          start_new_session=True,
        )
        started.append((popen, out, err))
      deadline = time.monotonic() + timeout_s
      killed = set()
      while True:
        codes = [p.poll() for p, _, _ in started]
        if all(c is not None for c in codes):
          break
        now = time.monotonic()
        if any(c not in (None, 0) for c in codes):
          deadline = min(deadline, now + grace_s)
        if now >= deadline:
          for i, (p, _, _) in enumerate(started):
            if p.poll() is None:
              _kill_group(p)
              killed.add(i)
          for p, _, _ in started:
            p.wait()
          break
        time.sleep(0.05)
    finally:
      # Leave nothing behind: what the processes started, and (after an exception here,
      # e.g. KeyboardInterrupt) the processes themselves.
      for p, _, _ in started:
        _kill_group(p)
        p.wait()
    results = []
    for i, (p, out, err) in enumerate(started):
      out.seek(0)
      err.seek(0)
      results.append(Process(i, p.pid, p.returncode, out.read(), err.read(), i in killed))
      out.close()
      err.close()
  if check and any(r.returncode != 0 for r in results):
    raise ProcessesFailed(describe(results))
  return results


def describe(results: list[Process], tail: int = 3000) -> str:
  lines = []
  for r in results:
    how = "killed by the harness" if r.killed else f"exit code {r.returncode}"
    lines.append(
      f"--- process {r.process_id}: {how}\nstdout: ...{r.stdout[-tail:]}\n"
      f"stderr: ...{r.stderr[-tail:]}"
    )
  return "\n".join(lines)


def python(*args) -> list[str]:
  """A command running this interpreter."""
  return [sys.executable, *map(str, args)]
