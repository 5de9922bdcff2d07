"""What every benchmark result records (provenance), and how its JSON and PNG are written."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import platform
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = "OPTAX_SUBSPACE_COMMIT"


def commit() -> str:
  """$OPTAX_SUBSPACE_COMMIT if set, else git's short HEAD, else "unknown".

  The variable is for trees copied without their git metadata (or with stale metadata, as on
  the GPU machines' copies of a working tree): the command that runs the benchmark names the
  commit it was copied from. From git, a tree whose tracked files differ from HEAD's gets
  "-dirty" after the hash: the code that ran is not that commit's (uncommitted edits, or a
  copy whose git metadata is older than its files, which once recorded a stale commit).
  """
  if os.environ.get(ENV):
    return os.environ[ENV]
  head = _git("rev-parse", "--short", "HEAD")
  if head is None or not head.stdout.strip():
    return "unknown"
  changed = _git("diff", "--quiet", "HEAD", "--")
  return head.stdout.strip() + ("-dirty" if changed is not None and changed.returncode == 1 else "")


def _git(*args):
  """`git ARGS` run in the repository root (the completed process), None without git."""
  try:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=False)
  except OSError:
    return None


def command(suite: str, argv) -> str:
  """The harness command that runs script suite `suite` with its flags `argv` (see suites.py)."""
  return " ".join(["python -m benchmarks run --suite", suite, "--", *(argv or [])])


def provenance(benchmark: str, argv=None, command_line: str | None = None) -> dict:
  """The head of a result's JSON: benchmark, command, commit, device, platform, versions,
  XLA flags.

  The command is `command_line`, else the harness command of script suite `benchmark` with
  its flags `argv`. `xla_flags` is $XLA_FLAGS as the run saw it: a flag such as
  `--xla_gpu_enable_triton_gemm=false` moves a 1B step by 1.8x, so it is part of the result.
  """
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import optax_subspace  # pylint: disable=g-import-not-at-top

  dev = jax.devices()[0]
  return {
    "benchmark": benchmark,
    "command": command(benchmark, argv) if command_line is None else command_line,
    "commit": commit(),
    "device": dev.device_kind,
    "platform": dev.platform,
    "versions": {
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
      "numpy": np.__version__,
      "optax_subspace": optax_subspace.__version__,
    },
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def write_hlo(path, text: str) -> pathlib.Path:
  """Writes HLO `text` gzipped to `path` (…/NAME.hlo.txt.gz; making its folder)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with gzip.open(path, "wt") as f:
    f.write(text)
  return path


def write_json(path, result: dict) -> pathlib.Path:
  """Writes `result` to `path` (making its folder), one space per indent level."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1) + "\n")
  return path


def subplots(*grid, figsize, **kwargs):
  """(figure, axes) of a `matplotlib.figure.Figure` (no pyplot, so no GUI backend)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=figsize)
  return fig, fig.subplots(*grid, **kwargs)


def bars(ax, names, groups: dict, heading: str, ylabel: str = "", legend_title=None) -> list:
  """Grouped bars on `ax`: for each label -> values (one per name) of `groups`, one bar per name;
  the names under the groups' middle. Returns each group's bars."""
  width = 0.8 / max(1, len(groups))
  drawn = [
    ax.bar([i + j * width for i in range(len(names))], values, width, label=label)
    for j, (label, values) in enumerate(groups.items())
  ]
  ax.set_xticks(
    [i + width * (len(groups) - 1) / 2 for i in range(len(names))],
    names,
    rotation=30,
    ha="right",
    fontsize=8,
  )
  ax.set(title=heading, ylabel=ylabel)
  ax.title.set_fontsize(9)
  ax.legend(fontsize=8, title=legend_title, title_fontsize=8)
  return drawn


def save(fig, path, dpi: int = 120) -> None:
  """Lays `fig` out and writes it as a PNG at `path`."""
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
