"""Multi-GPU scaling of the LLaMA example: every method on 1 GPU and on all GPUs of the host.

Per method, ``python -m examples.llama train`` at one global batch on one device (the first GPU)
and on a mesh of all (``--data-parallel`` / ``--fsdp``); from each run's metrics.jsonl and
summary.json (tokens/s of the training steps alone; the host fetches the losses every
``--log-every`` steps) one JSON, rewritten after every run: both runs' losses, their largest
relative difference, the final evaluation losses and ``speedup`` (mesh / one device tokens/s,
strong scaling); with ``--weak`` also ``weak_speedup`` (a "mesh_weak" run at the one-device batch
on each device); with ``--hlo-dir`` each run's compiled train steps and their collectives' bytes
(`hlo_collectives`); with ``--profile-steps`` per-device timelines (`traces`). A PNG draws both
runs' losses per method. docs/benchmarks.md has the commands ("Several GPUs"); a CPU smoke run:
XLA_FLAGS=--xla_force_host_platform_device_count=4, ``--model-size tiny --tokenizer byte``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

from benchmarks import methods as registry
from benchmarks import record
from benchmarks import suites

METHODS = registry.OPTIMIZER_LEVEL


def _devices() -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  return {
    "platform": jax.devices()[0].platform,
    "kind": jax.devices()[0].device_kind,
    "count": jax.device_count(),
  }


def _run(
  args, method: str, layout: str, mesh_flags: list[str], batch: int, run_dir: pathlib.Path
) -> dict:
  env = dict(os.environ)
  if layout == "one" and _devices()["platform"] == "gpu":
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
  flags = [
      "--model-size", args.model_size, "--batch-size", str(batch),
      "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--optimizer", method,
      "--log-every", str(args.log_every), "--eval-every", "0",
      "--eval-windows", str(args.eval_windows),
      "--checkpoint-every", str(args.steps), "--run-dir", str(run_dir),
      "--tokenizer", args.tokenizer, *mesh_flags,
  ]  # fmt: skip
  flags += args.train_args.split() + [
    word
    for flag, value in (
      ("--data-dir", args.data_dir),
      ("--rank", args.rank),
      ("--update-every", args.update_every),
      ("--profile-steps", args.profile_steps),
    )
    if value
    for word in (flag, str(value))
  ]
  dump = run_dir / "xla_dump"
  if args.hlo_dir:  # the compiled train step, to read its collectives' schedule
    env["XLA_FLAGS"] = " ".join(
      [
        env.get("XLA_FLAGS", ""),
        f"--xla_dump_to={dump}",
        "--xla_dump_hlo_as_text",
        "--xla_dump_hlo_module_re=jit_train_step",
      ]
    ).strip()
    # A persistent-cache hit loads the executable without compiling it: nothing is dumped.
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  started = time.perf_counter()
  proc = subprocess.run(
    [sys.executable, "-m", "examples.llama", "train", *flags],
    cwd=record.ROOT,
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )
  wall = time.perf_counter() - started
  collectives = _keep_hlo(dump, pathlib.Path(args.hlo_dir), run_dir.name) if args.hlo_dir else None
  if proc.returncode != 0:
    return {"error": (proc.stdout + proc.stderr)[-2000:], "wall_s": wall}
  records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
  summary = json.loads((run_dir / "summary.json").read_text())
  if not args.keep_checkpoints:
    # The final checkpoint (weights and optimizer state: ~5 GB at 350M) is not read here; a
    # device call's copy-back of the output folder choked on six of them.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
  profile = None
  if args.profile_steps:
    from benchmarks import traces  # pylint: disable=g-import-not-at-top

    first, last = summary.get("profiled_steps") or (1, 0)
    profile = {
      device: traces.timeline(kernels, max(last - first + 1, 1))
      for device, kernels in sorted(traces.device_events(run_dir / "profile").items())
    }
  return {
    "profile": profile,
    "losses": [r["loss"] for r in records if r["kind"] == "train"],
    "final_eval_loss": summary.get("final_eval_loss"),
    "tokens_per_s": summary["tokens_per_s"],
    "timed_steps": summary.get("timed_steps"),
    "profiled_steps": summary.get("profiled_steps"),
    "opt_state_bytes": summary["opt_state_bytes"],
    "seconds": summary.get("seconds"),  # the run's wall time by part: where device time goes
    "collectives": collectives,
    "wall_s": wall,
  }


def _keep_hlo(dump: pathlib.Path, hlo_dir: pathlib.Path, name: str) -> dict:
  """Gzips the train step's optimized HLO from an XLA dump folder into `hlo_dir`, drops the folder.

  The example compiles a train step per refresh decision (`optimizers.refresh_due`): the
  refresh program at step 0, then the steady one that the other steps run (one program for
  AdamW). In compile order, the last is kept as `<name>.hlo.txt.gz` and, where there are two,
  the first as `<name>.refresh.hlo.txt.gz`. Returns each kept program's collectives per device
  (`hlo_collectives.summarize`: bytes gathered, reduced, moved, total) by program.
  """
  from benchmarks import hlo_collectives  # pylint: disable=g-import-not-at-top

  found = sorted(
    dump.glob("module_*.jit_train_step.*after_optimizations.txt"),
    key=lambda f: int(f.name.split(".")[0].removeprefix("module_")),
  )
  programs = {"steady": found[-1]} if found else {}
  if len(found) > 1:
    programs["refresh"] = found[0]
  counted = {}
  for program, source in programs.items():
    text = source.read_text()
    suffix = "" if program == "steady" else ".refresh"
    record.write_hlo(hlo_dir / f"{name}{suffix}.hlo.txt.gz", text)
    counted[program] = hlo_collectives.summarize(hlo_collectives.collective_bytes(text))
  shutil.rmtree(dump, ignore_errors=True)
  return counted


def _plot(result: dict, path: pathlib.Path) -> None:
  methods = [m for m in result["methods"] if "one" in result["methods"][m]]
  fig, axes = record.subplots(
    1, max(len(methods), 1), figsize=(3.2 * max(len(methods), 1), 3), squeeze=False
  )
  axes = axes[0]
  for ax, method in zip(axes, methods):
    for layout, style in (("one", "-"), ("mesh", "--"), ("mesh_weak", ":")):
      run = result["methods"][method].get(layout, {})
      if "losses" in run:
        label = f"{layout} ({run['tokens_per_s'] / 1e3:.0f}K tok/s)"
        ax.plot(range(1, len(run["losses"]) + 1), run["losses"], style, label=label)
    ax.set_title(method)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
  axes[0].set_ylabel("training loss")
  fig.suptitle(
    f"{result['config']['model_size']}, {result['devices']['kind']}: one device vs "
    f"{result['config']['mesh']}",
    fontsize=9,
  )
  record.save(fig, path)


def main(argv=None) -> dict:
  args = suites.script_parser(
    __doc__,
    data_dir="",
    model_size="350m",
    tokenizer="mistral",
    batch_size=128,
    seq_len=256,
    steps=30,
    eval_windows=64,
    rank=(0, "0: the example's"),
    update_every=(0, "0: the example's"),
    data_parallel=1,
    fsdp=2,
    methods=",".join(METHODS),
    log_every=(10, "the example's: the host fetches the losses (a sync) every N steps"),
    weak=(False, "also run the mesh at batch-size × device count (weak scaling)"),
    train_args=("", "more `examples.llama train` flags for every run, one string"),
    mesh_args=("", 'more flags for the mesh runs only (write --mesh-args="--flag value")'),
    shard_optimizer=(False, "the mesh runs shard the optimizer state (ZeRO-1)"),
    layouts=("one,mesh", "which runs of each method: one (1 device), mesh"),
    profile_steps=(
      0,
      "trace N steps of each run and record per device what a step's time is"
      " made of (benchmarks/traces.py)",
    ),
    hlo_dir=(
      "",
      "keep each run's compiled train steps there (<method>-<layout>[.refresh]"
      ".hlo.txt.gz) and count their collectives' bytes",
    ),
    keep_checkpoints=(False, "keep each run's final checkpoint under <out>_runs"),
    commit=("", "the commit to record (default: $OPTAX_SUBSPACE_COMMIT, else git HEAD[-dirty])"),
    replot=(False, "run nothing: redraw <out>.png from the JSON at --out"),
  ).parse_args(argv)
  out = pathlib.Path(args.out)
  if args.replot:
    result = json.loads(out.read_text())
    _plot(result, out.with_suffix(".png"))
    return result
  out.parent.mkdir(parents=True, exist_ok=True)
  runs = out.parent / (out.stem + "_runs")
  mesh_flags = [
    "--data-parallel",
    str(args.data_parallel),
    "--fsdp",
    str(args.fsdp),
    *(["--shard-optimizer"] if args.shard_optimizer else []),
    *args.mesh_args.split(),
  ]
  n_devices = _devices()["count"]
  result = {
    **record.provenance("multi_gpu", argv),
    "devices": _devices(),
    "config": {
      "model_size": args.model_size,
      "global_batch": args.batch_size,
      "seq_len": args.seq_len,
      "steps": args.steps,
      "log_every": args.log_every,
      "tokenizer": args.tokenizer,
      "rank": args.rank or "hidden/4",
      "update_every": args.update_every or 200,
      "mesh": f"data {args.data_parallel} x fsdp {args.fsdp}",
      "train_args": args.train_args,
      "mesh_args": args.mesh_args,
      "shard_optimizer": args.shard_optimizer,
      "profile_steps": args.profile_steps,
      "weak_global_batch": args.batch_size * n_devices if args.weak else None,
      "compute": "bfloat16, float32 parameters and states (the example's default)",
    },
    "methods": {},
  }
  result["commit"] = args.commit or result["commit"]
  for method in args.methods.split(","):
    entry = result["methods"].setdefault(method, {})
    layouts = [
      (name, flags, args.batch_size)
      for name, flags in (("one", []), ("mesh", mesh_flags))
      if name in args.layouts.split(",")
    ]
    if args.weak:
      layouts.append(("mesh_weak", mesh_flags, args.batch_size * n_devices))
    for layout, flags, batch in layouts:
      entry[layout] = _run(args, method, layout, flags, batch, runs / f"{method}-{layout}")
      one, mesh, weak = (entry.get(k, {}) for k in ("one", "mesh", "mesh_weak"))
      if "losses" in one and "losses" in mesh:
        entry["max_rel_loss_diff"] = max(
          abs(a - b) / abs(a) for a, b in zip(one["losses"], mesh["losses"])
        )
        entry["speedup"] = mesh["tokens_per_s"] / one["tokens_per_s"]
      if "tokens_per_s" in one and "tokens_per_s" in weak:
        entry["weak_speedup"] = weak["tokens_per_s"] / one["tokens_per_s"]
      record.write_json(out, result)
      print(
        method,
        layout,
        {k: v for k, v in entry[layout].items() if k not in ("losses", "profile", "collectives")},
        flush=True,
      )
      for device, t in (entry[layout].get("profile") or {}).items():
        print(
          f"  {device}: ms per step: span {t['span_ms']:.1f} compute {t['compute_ms']:.1f}"
          f" exposed collectives {t['exposed_collective_ms']:.1f} idle {t['idle_ms']:.1f}",
          flush=True,
        )
  _plot(result, out.with_suffix(".png"))
  return result
