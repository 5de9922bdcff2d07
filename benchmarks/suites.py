"""The benchmark harness, ``python -m benchmarks run --suite NAME``: one JSON and one PNG per run.

`SUITES` take the harness's flags (--size, --methods, --quick, ...; `run_suite` is the same as a
Python function, the notebook calls it): projector_cost, optimizer_update, train_step,
largest_model, quality. Each JSON holds the device, the versions, the commit, the configuration,
the medians and the ratios to AdamW; without --out it goes to benchmarks/results/
<suite>_<device>.json. `SCRIPT_SUITES` are each one module's `main(argv)`, given the flags after
`--` (`-- --help` lists them). docs/benchmarks.md, "Running the suites", lists every suite with
its command.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import re
import sys

from benchmarks import record

SUITES = ("projector_cost", "optimizer_update", "train_step", "largest_model", "quality")
# Suites that are one module's `main(argv)`: `python -m benchmarks run --suite NAME -- FLAGS`
# passes FLAGS to it (`-- --help` lists them). Each writes the JSON its --out names.
SCRIPT_SUITES = (
  "multi_gpu",
  "profile_update",
  "gpu_program",
  "product_rates",
  "projection_layouts",
  "grass_cost",
  "rso_memory",
  "communication",
  "communication_train_step",
  "optimizer_step",
  "scaling_plot",
  "update_identity",
  "refresh_energy",
)
# Suites whose methods run in worker processes (benchmarks/train_setups.py).
WORKER_SUITES = ("train_step", "largest_model")
QUICK_REPS = 3
DEFAULT_REPS = 20


def _sizes(size, quick: bool, module) -> list[str]:
  from benchmarks import optimizer_step  # pylint: disable=g-import-not-at-top

  known = getattr(module, "SIZES", optimizer_step.SIZES)
  if quick:
    return list(getattr(module, "QUICK_SIZES", ["tiny"]))
  if size is None:
    return list(module.DEFAULT_SIZES)
  sizes = [s for s in (size.split(",") if isinstance(size, str) else size) if s]
  unknown = [s for s in sizes if s not in known]
  if unknown:
    raise ValueError(f"unknown size {unknown}; choose from {', '.join(known)}")
  return sizes


def _device_slug(device_kind: str, platform_name: str) -> str:
  """ "NVIDIA H100 80GB HBM3" -> "h100"; otherwise the kind (or platform) in snake case."""
  match = re.search(r"\b[a-z]\d{2,3}\b", device_kind.lower())
  if match:
    return match.group(0)
  return re.sub(r"[^a-z0-9]+", "_", (device_kind or platform_name).lower()).strip("_")


def output_path(suite: str, out_dir=None) -> pathlib.Path:
  """<out_dir>/<suite>_<device>.json; out_dir defaults to benchmarks/results."""
  import jax  # pylint: disable=g-import-not-at-top

  dev = jax.devices()[0]
  out_dir = pathlib.Path(out_dir) if out_dir is not None else record.ROOT / "benchmarks" / "results"
  return out_dir / f"{suite}_{_device_slug(dev.device_kind, dev.platform)}.json"


def _metadata(suite: str, argv) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  command = " ".join(["python", "-m", "benchmarks", *argv]) if argv is not None else None
  return {
    **record.provenance(suite, command_line=command),
    "device_count": jax.device_count(),
    "dtype": "float32",
    "matmul_precision": "JAX default (TF32 on H100/H200) except the refreshes, which use HIGHEST",
    "timing": "median of the repetitions after 2 warm-up calls, each synced with"
    " block_until_ready; gradients synthetic (power-law spectrum)",
  }


def run_suite(
  suite: str,
  size=None,
  out=None,
  quick: bool = False,
  reps: int | None = None,
  methods=None,
  argv=None,
  log=print,
  options=None,
) -> dict:
  """Runs one of `SUITES`, writes its JSON (and the PNG next to it), returns the JSON's content.

  The arguments are the command line's (`_FLAGS`): `size` a list or a comma-separated string of
  the suite's sizes (None: its `DEFAULT_SIZES`), `methods` a subset of its methods, `argv` the
  command line to record, `options` the quality, train_step or largest_model flags as a dict of
  their `run`'s keywords. `result["png"]` is the plot's path.
  """
  if suite in WORKER_SUITES or suite == "quality":
    from benchmarks import train_setups  # pylint: disable=g-import-not-at-top

    train_setups.prepare_parent()  # before JAX starts: the GPU is the workers'
  import jax  # pylint: disable=g-import-not-at-top

  if suite not in SUITES:
    raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
  module = importlib.import_module(f"benchmarks.{suite}")
  sizes = _sizes(size, quick, module)
  reps = reps or (QUICK_REPS if quick else getattr(module, "DEFAULT_REPS", DEFAULT_REPS))
  dev = jax.devices()[0]
  if out is None and suite == "quality":
    out = output_path(suite).with_name(
      f"{output_path(suite).stem.replace('quality_', f'quality_{sizes[-1]}_')}"
      f"_{record.commit()}.json"
    )
  out = pathlib.Path(out) if out is not None else output_path(suite)
  result = _metadata(suite, argv)
  result["config"] = {"sizes": sizes, "reps": reps, "quick": quick}
  log(f"{suite} on {dev.device_kind} ({dev.platform}), sizes {', '.join(sizes)}, {reps} reps")

  def checkpoint(results):  # rewritten as the suite goes: a cut run keeps what finished
    result["runs" if suite == "quality" else "results"] = results
    if suite == "quality":
      result["best"] = module.best_of_sweeps(results)
    record.write_json(out, result)

  if suite == "optimizer_update":
    chosen_methods = chosen(methods or module.METHODS, module.METHODS, adamw=True)
    result["config"]["trees"] = {s: module.optimizer_step.SIZES[s] for s in sizes}
    result["config"]["projected"] = module.optimizer_step.PROJECTED
    result["config"]["methods"] = chosen_methods
    result["config"]["update_every_amortised"] = module.UPDATE_EVERY
    checkpoint(module.run(sizes, reps, chosen_methods, log=log, checkpoint=checkpoint))
  elif suite == "quality":
    result["config"].pop("reps")  # no timed repetitions: each run is one training
    result["config"].update(module.describe(quick, dict(options or {})))
    checkpoint(
      module.run(sizes, methods, quick=quick, log=log, checkpoint=checkpoint, **dict(options or {}))
    )
    log(module.markdown_table(result))
  elif suite in WORKER_SUITES:
    description = module.describe(options or {}, quick)
    result["config"].update(description.pop("config"))
    result.update(description)
    checkpoint(
      module.run(sizes, reps, methods, options, quick=quick, log=log, checkpoint=checkpoint)
    )
  else:
    result["config"]["shapes"] = {s: sorted(module.SHAPES[s]) for s in sizes}
    result["config"]["rank"] = "smaller side / 4"
    result["results"] = module.run(sizes, reps, log=log)
  png = out.with_suffix(".png")
  record.save(module.figure(result), png)
  result["png"] = str(png)
  record.write_json(out, result)
  log(f"wrote {out} and {png}")
  return result


_BOOL = argparse.BooleanOptionalAction
# The flags of `SUITES` beyond --suite, by the suites they apply to: (flag, type, default, help).
_FLAGS = {
  "all": [
    (
      "--size",
      str,
      None,
      "comma-separated sizes of the suite (default: its DEFAULT_SIZES;"
      " projector_cost, optimizer_update: 60m,130m,350m,1b,7b,tiny; train_step: the example's"
      " sizes; largest_model: 1b,3b,7b,13b,30b)",
    ),
    (
      "--out",
      str,
      None,
      "JSON path, the PNG goes next to it (default benchmarks/results/<suite>_<device>.json)",
    ),
    ("--quick", "store_true", False, "the tiny size(s), 3 repetitions: a CPU smoke run"),
    (
      "--reps",
      int,
      None,
      f"timed calls per measurement (default {DEFAULT_REPS}, train_step"
      f" 10, --quick {QUICK_REPS}); largest_model: steps per fitting size (3)",
    ),
    ("--methods", str, None, "comma-separated subset of the suite's methods (AdamW always runs)"),
  ],
  "quality": [
    (
      "--lrs",
      str,
      None,
      "comma-separated peak learning rates of the kernels, replacing each method's sweep",
    ),
    ("--lr-unprojected", float, None, "peak learning rate of the unprojected leaves"),
    ("--ablations", "store_true", None, "also quality.ABLATIONS"),
    ("--parallel", int, None, "runs at once, each a process sharing the GPU (default 1)"),
    ("--data-dir", str, None, "the example's token cache (offline-large tokenized there)"),
    ("--steps", int, None, "optimizer steps per run (1000)"),
    ("--runs", str, None, "explicit runs label:lr[:lr_unprojected],... instead of the sweep"),
    ("--work-dir", str, None, "where the run directories go (default: a temporary one)"),
  ],
  "train_step and largest_model": [
    ("--batch", int, None, "sequences per step (train_step: 350m 128, 1b 64; largest: 1)"),
    ("--seq", int, None, "tokens per sequence (train_step 256, largest_model 2048)"),
    ("--rank", int, None, "subspace rank (default hidden/4)"),
    ("--remat", _BOOL, None, "recompute each block in the backward (largest_model: on)"),
    (
      "--scan-layers",
      _BOOL,
      None,
      "train_step: the example's --scan-layers (the methods"
      " that need one module per layer are left out)",
    ),
    (
      "--host-refresh",
      _BOOL,
      None,
      "train_step: refreshes decided on the host, as the"
      " example's loop does (a steady and a refresh program, no refresh cond)",
    ),
    (
      "--profile-top",
      int,
      None,
      "train_step: also trace --reps steps per method and record"
      " the device kernels' time by kind and the top N kernels",
    ),
    (
      "--hlo-dir",
      str,
      None,
      "train_step: write each method's compiled programs (step, refresh) there as"
      " METHOD_SIZE_PROGRAM.hlo.txt.gz: the kernel names of --profile-top are its fusions'",
    ),
    (
      "--param-dtype",
      ("float32", "bfloat16"),
      None,
      "parameter dtype (train_step float32, largest_model bfloat16)",
    ),
    (
      "--state-dtype",
      ("float32", "bfloat16", "native"),
      None,
      "optimizer-state dtype; native: the method's own (train_step's default)",
    ),
    (
      "--attention",
      ("auto", "xla", "cudnn"),
      None,
      "auto (default): cuDNN's flash attention on a GPU where the head size allows",
    ),
    (
      "--budget-gb",
      float,
      None,
      "largest_model: the memory a step may need, in GB (default"
      " the GPU's bytes_limit; needed on the CPU)",
    ),
    ("--compilation-cache", str, None, "a directory for JAX's persistent compilation cache"),
    (
      "--job-timeout-s",
      float,
      None,
      "kill and record a job that runs longer (train_step"
      " 300 s, largest_model 600 s, --quick 120 s)",
    ),
  ],
}
# The suites each group applies to (and the flags that apply to train_step alone).
_APPLIES = {"quality": ("quality",), "train_step and largest_model": WORKER_SUITES}
_TRAIN_STEP_ONLY = ("scan_layers", "profile_top", "host_refresh", "hlo_dir")


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
  commands = ap.add_subparsers(dest="command", required=True)
  run = commands.add_parser("run", help="run one suite, write its JSON and PNG")
  run.add_argument(
    "--suite",
    required=True,
    choices=SUITES + SCRIPT_SUITES,
    help="a suite; the flags of a script suite (" + ", ".join(SCRIPT_SUITES) + ") follow `--`",
  )
  for group, flags in _FLAGS.items():
    arguments = run if group == "all" else run.add_argument_group(group)
    for flag, kind, default, text in flags:
      if kind in ("store_true", _BOOL):
        arguments.add_argument(flag, action=kind, default=default, help=text)
      elif isinstance(kind, tuple):
        arguments.add_argument(flag, choices=kind, default=default, help=text)
      else:
        arguments.add_argument(flag, type=kind, default=default, help=text)
  return ap


def script_parser(doc: str, out: str | None = None, **flags) -> argparse.ArgumentParser:
  """A script suite's flags: --out (required unless `out` is its default), then one --NAME per
  keyword (underscores written as dashes) of its default's type, or (default, help); False
  makes a switch, a list the choices (its first the default)."""
  ap = argparse.ArgumentParser(description=doc.splitlines()[0])
  ap.add_argument(
    "--out", required=out is None, default=out, help="the JSON path (a suite's PNG goes next to it)"
  )
  for name, default in flags.items():
    default, text = default if isinstance(default, tuple) else (default, None)
    flag = "--" + name.replace("_", "-")
    if default is False:
      ap.add_argument(flag, action="store_true", help=text)
    elif isinstance(default, list):
      ap.add_argument(flag, choices=default, default=default[0], help=text)
    else:
      ap.add_argument(flag, type=type(default), default=default, help=text)
  return ap


def chosen(names, known, adamw: bool = False) -> list[str]:
  """The `known` methods in `names` (a list or a comma-separated string), and AdamW with
  `adamw`, in `known`'s order; a ValueError if a name is not known."""
  names = [n for n in (names.split(",") if isinstance(names, str) else names) if n]
  unknown = sorted(set(names) - set(known))
  if unknown:
    raise ValueError(f"unknown methods {unknown}; choose from {', '.join(known)}")
  return [m for m in known if m in names or adamw and m == "adamw"]


def run_script(suite: str, argv=()):
  """Runs one of `SCRIPT_SUITES` with its own flags `argv`; returns what its `main` returns."""
  if suite not in SCRIPT_SUITES:
    raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SCRIPT_SUITES)}")
  try:
    return importlib.import_module(f"benchmarks.{suite}").main(list(argv))
  except ValueError as e:
    raise SystemExit(f"python -m benchmarks: {e}") from None


def _script_argv(argv):
  """(suite, its flags) if `argv` is `run --suite NAME [--] FLAGS` of a script suite, else None."""
  if not argv or argv[0] != "run":
    return None
  for i, arg in enumerate(argv[1:], 1):
    name, rest = (
      (arg.split("=", 1)[1], i + 1)
      if arg.startswith("--suite=")
      else ((argv[i + 1], i + 2) if arg == "--suite" and i + 1 < len(argv) else (None, None))
    )
    if name is not None:
      if name not in SCRIPT_SUITES:
        return None
      flags = argv[1:i] + argv[rest:]
      return name, [f for j, f in enumerate(flags) if not (f == "--" and j == flags.index("--"))]
  return None


def main(argv=None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  script = _script_argv(argv)
  if script is not None:
    return run_script(*script)
  args = _parser().parse_args(argv)
  methods = args.methods.split(",") if args.methods else None
  options = {}
  for group, suites in _APPLIES.items():
    for flag, *_ in _FLAGS[group]:
      name = flag[2:].replace("-", "_")
      if getattr(args, name) is None:
        continue
      only = "train_step" if name in _TRAIN_STEP_ONLY else " and ".join(suites)
      if args.suite not in only.split(" and "):
        raise SystemExit(f"python -m benchmarks: {flag} applies to {only} only")
      options[name] = getattr(args, name)
  if args.suite == "quality":
    from benchmarks import quality  # pylint: disable=g-import-not-at-top

    try:  # before anything runs or is written
      options = quality.checked(options, methods)
    except ValueError as e:
      raise SystemExit(f"python -m benchmarks: {e}") from None
  try:
    return run_suite(
      args.suite, args.size, args.out, args.quick, args.reps, methods, argv, options=options
    )
  except ValueError as e:
    raise SystemExit(f"python -m benchmarks: {e}") from None
