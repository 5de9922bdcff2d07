"""The benchmark suites behind ``python -m benchmarks run``: one JSON and one PNG per run.

    python -m benchmarks run --suite projector_cost                      # all five shapes
    python -m benchmarks run --suite optimizer_update --size 60m,350m,1b
    python -m benchmarks run --suite optimizer_update --size 7b          # where memory allows
    python -m benchmarks run --suite projector_cost --quick --out /tmp/p.json   # CPU smoke run

Each JSON holds the device, the versions, the commit, the configuration (sizes, shapes,
repetitions, dtype), the medians and the ratios to AdamW; the plot goes next to it (.png).
`run_suite` is the same as a Python function (the notebook calls it).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SUITES = ("projector_cost", "optimizer_update")
QUICK_REPS = 3
DEFAULT_REPS = 20


def _suite_module(name: str):
  if name not in SUITES:
    raise ValueError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}")
  if name == "projector_cost":
    from benchmarks import projector_cost as module  # pylint: disable=g-import-not-at-top
  else:
    from benchmarks import optimizer_update as module  # pylint: disable=g-import-not-at-top
  return module


def _sizes(size, quick: bool, module) -> list[str]:
  from benchmarks import optimizer_step  # pylint: disable=g-import-not-at-top

  if quick:
    return ["tiny"]
  if size is None:
    return list(module.DEFAULT_SIZES)
  sizes = [s for s in (size.split(",") if isinstance(size, str) else size) if s]
  unknown = [s for s in sizes if s not in optimizer_step.SIZES]
  if unknown:
    raise ValueError(f"unknown size {unknown}; choose from {', '.join(optimizer_step.SIZES)}")
  return sizes


def _device_slug(device_kind: str, platform_name: str) -> str:
  """"NVIDIA H100 80GB HBM3" -> "h100"; otherwise the kind (or platform) in snake case."""
  match = re.search(r"\b[a-z]\d{2,3}\b", device_kind.lower())
  if match:
    return match.group(0)
  return re.sub(r"[^a-z0-9]+", "_", (device_kind or platform_name).lower()).strip("_")


def output_path(suite: str, out_dir=None) -> pathlib.Path:
  """<out_dir>/<suite>_<device>.json; out_dir defaults to benchmarks/results."""
  import jax  # pylint: disable=g-import-not-at-top

  dev = jax.devices()[0]
  out_dir = pathlib.Path(out_dir) if out_dir is not None else ROOT / "benchmarks" / "results"
  return out_dir / f"{suite}_{_device_slug(dev.device_kind, dev.platform)}.json"


def _commit() -> str:
  proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                        cwd=ROOT, check=False)
  return proc.stdout.strip() or "unknown"


def _metadata(suite: str, argv) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import optax_subspace  # pylint: disable=g-import-not-at-top

  dev = jax.devices()[0]
  return {
      "benchmark": suite,
      "command": " ".join(["python", "-m", "benchmarks", *argv]) if argv is not None else None,
      "commit": _commit(),
      "device": dev.device_kind, "platform": dev.platform, "device_count": jax.device_count(),
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "jaxlib": jaxlib.__version__, "optax": optax.__version__,
                   "numpy": np.__version__, "optax_subspace": optax_subspace.__version__},
      "dtype": "float32",
      "matmul_precision": "JAX default (TF32 on H100/H200) except the refreshes, which use"
                          " HIGHEST",
      "timing": "median of the repetitions after 2 warm-up calls, each synced with"
                " block_until_ready; gradients synthetic (power-law spectrum)",
  }


def run_suite(suite: str, size=None, out=None, quick: bool = False, reps: int | None = None,
              methods=None, argv=None, log=print) -> dict:
  """Runs one suite, writes its JSON (and the PNG next to it), returns the JSON's content.

  Args:
    suite: "projector_cost" or "optimizer_update".
    size: a size of `optimizer_step.SIZES` ("60m", "130m", "350m", "1b", "7b", "tiny"), a
      comma-separated string or a list of them; None: the suite's `DEFAULT_SIZES`.
    out: JSON path; None: benchmarks/results/<suite>_<device>.json.
    quick: the "tiny" size and 3 repetitions (a CPU smoke run, under a minute).
    reps: timed calls per measurement (refresh steps: a tenth, at least 3); default 20.
    methods: optimizer_update only: a subset of `optimizer_update.METHODS`.
    argv: the command line, recorded in the JSON.
    log: where progress lines go.

  Returns:
    The dict written to `out`; `result["png"]` is the plot's path.
  """
  import jax  # pylint: disable=g-import-not-at-top

  module = _suite_module(suite)
  sizes = _sizes(size, quick, module)
  reps = reps or (QUICK_REPS if quick else DEFAULT_REPS)
  dev = jax.devices()[0]
  out = pathlib.Path(out) if out is not None else output_path(suite)
  out.parent.mkdir(parents=True, exist_ok=True)
  result = _metadata(suite, argv)
  result["config"] = {"sizes": sizes, "reps": reps, "quick": quick}
  write = lambda: out.write_text(json.dumps(result, indent=1) + "\n")
  log(f"{suite} on {dev.device_kind} ({dev.platform}), sizes {', '.join(sizes)}, {reps} reps")
  if suite == "optimizer_update":
    chosen = [m for m in module.METHODS if not methods or m in methods or m == "adamw"]
    unknown = set(methods or ()) - set(module.METHODS)
    if unknown:
      raise ValueError(f"unknown methods {sorted(unknown)}; choose from {module.METHODS}")
    result["config"]["trees"] = {s: module.optimizer_step.SIZES[s] for s in sizes}
    result["config"]["projected"] = module.optimizer_step.PROJECTED
    result["config"]["methods"] = list(chosen)
    result["config"]["update_every_amortised"] = module.UPDATE_EVERY

    def checkpoint(results):  # rewritten after each size: a cut run keeps what finished
      result["results"] = results
      write()

    result["results"] = module.run(sizes, reps, chosen, log=log, checkpoint=checkpoint)
  else:
    result["config"]["shapes"] = {s: sorted(module.SHAPES[s]) for s in sizes}
    result["config"]["rank"] = "smaller side / 4"
    result["results"] = module.run(sizes, reps, log=log)
  png = out.with_suffix(".png")
  module.plot(result, png)
  result["png"] = str(png)
  write()
  log(f"wrote {out} and {png}")
  return result


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m benchmarks",
                               description=__doc__.splitlines()[0])
  commands = ap.add_subparsers(dest="command", required=True)
  run = commands.add_parser("run", help="run one suite, write its JSON and PNG")
  run.add_argument("--suite", required=True, choices=SUITES)
  run.add_argument("--size", default=None,
                   help="comma-separated LLaMA sizes (60m,130m,350m,1b,7b,tiny); default: the"
                   " suite's (projector_cost: 60m..7b; optimizer_update: 60m,350m,1b)")
  run.add_argument("--out", default=None,
                   help="JSON path, the PNG goes next to it; default"
                   " benchmarks/results/<suite>_<device>.json")
  run.add_argument("--quick", action="store_true",
                   help="the tiny size and 3 repetitions: a CPU smoke run (under a minute)")
  run.add_argument("--reps", type=int, default=None,
                   help=f"timed calls per measurement (default {DEFAULT_REPS}, --quick"
                   f" {QUICK_REPS})")
  run.add_argument("--methods", default=None,
                   help="optimizer_update: comma-separated subset of adamw,"
                   "optax_contrib_galore,galore,galore_refresh,osd,rso,grass,grass_refresh")
  return ap


def main(argv=None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = _parser().parse_args(argv)
  methods = args.methods.split(",") if args.methods else None
  try:
    return run_suite(args.suite, args.size, args.out, args.quick, args.reps, methods, argv)
  except ValueError as e:
    raise SystemExit(f"python -m benchmarks: {e}") from None
