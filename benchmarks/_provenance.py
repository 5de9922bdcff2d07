"""The commit a benchmark result belongs to."""

from __future__ import annotations

import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = "OPTAX_SUBSPACE_COMMIT"


def commit() -> str:
  """$OPTAX_SUBSPACE_COMMIT if set, else `git rev-parse --short HEAD`, else "unknown".

  The variable is for trees copied without their git metadata (or with stale metadata, as on
  the GPU machines' copies of a working tree): the command that runs the benchmark names the
  commit it was copied from.
  """
  if os.environ.get(ENV):
    return os.environ[ENV]
  try:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=ROOT, check=False)
  except OSError:
    return "unknown"
  return proc.stdout.strip() or "unknown"


def command(suite: str, argv) -> str:
  """The harness command that runs script suite `suite` with its flags `argv` (see suites.py)."""
  return " ".join(["python -m benchmarks run --suite", suite, "--", *(argv or [])])
