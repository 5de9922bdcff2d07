"""Bytes each optimizer's update communicates, read from the compiled HLO.

Builds the LLaMA-1B parameter tree of `optimizer_step.py` (non-scanned Flax
layout) as `jax.ShapeDtypeStruct`s, shards it FSDP-style (every kernel and
the embedding on their model ("embed", d) axis over "fsdp"; norm scales
replicated) on simulated CPU devices, derives the optimizer state's
shardings with `osub.state_shardings`, and lowers and compiles (never runs:
no array is allocated) one optimizer step, update + `optax.apply_updates`,
with the gradients given the parameters' shardings, as a train step hands
them over after its data-parallel reduction. From the compiled HLO text it
counts every collective (all-gather, all-reduce, reduce-scatter, all-to-all,
collective-permute) with its operand and result sizes in bytes, per device,
split into the steady path (run every step) and the branches of the
conditional that holds the projector refresh. Nothing is timed: these are
the sizes XLA's CPU partitioner chose; a GPU compile may choose differently.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m benchmarks run --suite communication -- --out $OUT/communication_cpu_hlo.json
    # smaller: --layers 2, or --size tiny for a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import resource
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top
from jax.sharding import AxisType  # pylint: disable=g-import-not-at-top
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

import optax_subspace as osub  # pylint: disable=g-import-not-at-top
from benchmarks import _provenance  # pylint: disable=g-import-not-at-top
from benchmarks.hlo_collectives import KINDS  # pylint: disable=g-import-not-at-top
from benchmarks.hlo_collectives import collective_bytes  # pylint: disable=g-import-not-at-top
from benchmarks.optimizer_step import PROJECTED  # pylint: disable=g-import-not-at-top
from benchmarks.optimizer_step import SIZES  # pylint: disable=g-import-not-at-top
from benchmarks.optimizer_step import llama_shapes  # pylint: disable=g-import-not-at-top

MESHES = {"8": ((8,), ("fsdp",)), "4x2": ((4, 2), ("data", "fsdp"))}
UPDATE_EVERY = 200


def methods(rank):
  return {
      "adamw": optax.adamw(1e-3),
      "galore": osub.galore(1e-3, rank, UPDATE_EVERY, mask=PROJECTED),
      "galore_randomized_svd": osub.galore(
          1e-3, rank, UPDATE_EVERY, mask=PROJECTED,
          projector="randomized_svd"),
      "online_subspace_descent": osub.online_subspace_descent(
          1e-3, rank, update_every=UPDATE_EVERY, mask=PROJECTED),
  }


def fsdp_spec(path, shape):
  """FSDP: the model axis d ("embed") of every matrix on "fsdp"."""
  name = "/".join(str(getattr(k, "key", k)) for k in path)
  if len(shape) < 2:
    return P()
  if name.endswith("embed/embedding") or name.endswith("mlp/down/kernel"):
    return P(None, "fsdp")  # (vocab, d), (ffn, d)
  return P("fsdp", None)  # (d, d), (d, ffn), lm_head (d, vocab)


def markdown_table(results):
  """One row per method and mesh: MB (10^6 bytes) per device, by kind; the
  result size for all-gathers, the operand size for the others."""
  short = {"all-gather": "AG", "all-reduce": "AR", "reduce-scatter": "RS",
           "all-to-all": "A2A", "collective-permute": "CP"}

  def cell(totals):
    parts = []
    for kind in KINDS:
      if kind in totals:
        key = "result_bytes" if kind == "all-gather" else "operand_bytes"
        parts.append(f"{short[kind]} {totals[kind][key] / 1e6:,.1f}")
    return ", ".join(parts) or "none"

  lines = ["| method | mesh | every step (steady path) | per refresh"
           " (conditional branch) |", "|---|---|---|---|"]
  for run in results["runs"]:
    branches = [cell(b["collectives"]) for c in run["conditional_branches"]
                for b in c["branches"] if b["collectives"]]
    mesh = " × ".join(f"{n} {k}" for n, k in run["mesh"].items())
    lines.append(f"| {run['method']} | {mesh} | {cell(run['steady'])} |"
                 f" {'; '.join(branches) or 'none'} |")
  return "\n".join(lines)


# ------------------------------------------------------------------- driver

def compile_step(tx, params, psh, ssh):
  state = jax.eval_shape(tx.init, params)

  def step(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jitted = jax.jit(step, in_shardings=(psh, psh, ssh),
                   out_shardings=(psh, ssh), donate_argnums=(0, 2))
  t0 = time.perf_counter()
  lowered = jitted.lower(params, params, state)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled.as_text(), t1 - t0, t2 - t1


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--size", default="1b", choices=sorted(SIZES))
  parser.add_argument("--layers", type=int, default=None,
                      help="fewer layers than the size's (a smaller tree)")
  parser.add_argument("--meshes", default="8,4x2")
  parser.add_argument("--methods", default=None,
                      help="comma-separated subset of the methods")
  parser.add_argument("--hlo_dir", default=None,
                      help="also write each compiled HLO text here")
  args = parser.parse_args(argv)
  if jax.device_count() < 8:
    sys.exit("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")

  cfg = dict(SIZES[args.size])
  if args.layers is not None:
    cfg["layers"] = args.layers
  shapes = llama_shapes(**cfg)
  is_shape = lambda x: isinstance(x, tuple)
  params = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s, jax.numpy.float32), shapes,
      is_leaf=is_shape)
  specs = jax.tree_util.tree_map_with_path(fsdp_spec, shapes,
                                           is_leaf=is_shape)
  all_methods = methods(cfg["rank"])
  names = args.methods.split(",") if args.methods else list(all_methods)
  results = {
      "method": (
          "bytes = operand and result sizes of the collectives in the"
          " compiled CPU HLO (jax.jit(...).lower(abstract args).compile(),"
          " nothing executed), per device, not timed; steady = outside any"
          " conditional (every step), branches = the conditional's branch"
          " computations (the projector refresh); while-loop bodies counted"
          " times their known trip count. Parameters FSDP-sharded on"
          " 'fsdp' (model axis d), gradients with the parameters'"
          " shardings, optimizer state with osub.state_shardings. A GPU"
          " compile may choose other collectives."),
      "tree": cfg, "projected": PROJECTED, "update_every": UPDATE_EVERY,
      "param_bytes": sum(4 * math.prod(s) for s in jax.tree_util.tree_leaves(
          shapes, is_leaf=is_shape)),
      "jax": jax.__version__, "optax": optax.__version__,
      "backend": jax.default_backend(), "devices": jax.device_count(),
      "host": platform.platform(), "command": _provenance.command("communication", argv),
      "runs": [],
  }
  for mesh_name in args.meshes.split(","):
    shape, axes = MESHES[mesh_name]
    mesh = jax.make_mesh(shape, axes, (AxisType.Auto,) * len(axes))
    psh = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                 is_leaf=lambda x: isinstance(x, P))
    for name in names:
      tx = all_methods[name]
      ssh = osub.state_shardings(tx, params, psh)
      hlo, lower_s, compile_s = compile_step(tx, params, psh, ssh)
      if args.hlo_dir:
        pathlib.Path(args.hlo_dir).mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.hlo_dir, f"{name}_{mesh_name}.hlo.txt").write_text(
            hlo)
      run = {"method": name, "mesh": dict(zip(axes, shape)),
             "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1),
             "peak_rss_gb_so_far": round(resource.getrusage(
                 resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
             **collective_bytes(hlo)}
      results["runs"].append(run)
      print(json.dumps({k: run[k] for k in (
          "method", "mesh", "lower_s", "compile_s", "peak_rss_gb_so_far")}),
            flush=True)
      pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
      pathlib.Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
  print(markdown_table(results))
