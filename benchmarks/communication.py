"""Bytes each optimizer's update communicates, read from the compiled HLO.

The LLaMA-1B tree of `optimizer_step.py` as `jax.ShapeDtypeStruct`s, FSDP-sharded on simulated
CPU devices (every kernel and the embedding on their model axis d over "fsdp", norm scales
replicated), the state's shardings from `osub.state_shardings`; one update + `apply_updates`
(gradients sharded as the parameters) is compiled, never run, and every collective of its HLO
counted per device (`hlo_collectives`), the steady path apart from the refresh's conditional
branches. These are the sizes XLA's CPU partitioner chose; a GPU compile may choose others.
docs/scaling.md, "Measured communication, LLaMA-1B tree", has the command and results.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top
from jax.sharding import AxisType  # pylint: disable=g-import-not-at-top
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

import optax_subspace as osub  # pylint: disable=g-import-not-at-top
from benchmarks import record  # pylint: disable=g-import-not-at-top
from benchmarks import suites  # pylint: disable=g-import-not-at-top
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
      1e-3, rank, UPDATE_EVERY, mask=PROJECTED, projector="randomized_svd"
    ),
    "online_subspace_descent": osub.online_subspace_descent(
      1e-3, rank, update_every=UPDATE_EVERY, mask=PROJECTED
    ),
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
  """One row per method and mesh: MB (10^6 bytes) per device by kind (all-gathers: the result
  size; the others: the operand size)."""
  short = {
    "all-gather": "AG",
    "all-reduce": "AR",
    "reduce-scatter": "RS",
    "all-to-all": "A2A",
    "collective-permute": "CP",
  }

  def cell(totals):
    size = lambda k: totals[k]["result_bytes" if k == "all-gather" else "operand_bytes"]
    return ", ".join(f"{short[k]} {size(k) / 1e6:,.1f}" for k in KINDS if k in totals) or "none"

  lines = [
    "| method | mesh | every step (steady path) | per refresh (conditional branch) |",
    "|---|---|---|---|",
  ]
  for run in results["runs"]:
    branches = [
      cell(b["collectives"])
      for c in run["conditional_branches"]
      for b in c["branches"]
      if b["collectives"]
    ]
    mesh = " × ".join(f"{n} {k}" for n, k in run["mesh"].items())
    lines.append(
      f"| {run['method']} | {mesh} | {cell(run['steady'])} | {'; '.join(branches) or 'none'} |"
    )
  return "\n".join(lines)


def compiled_text(jitted, *args) -> tuple[str, float, float]:
  """(compiled HLO text, lowering s, compile s) of `jitted` on (abstract) `args`."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  return lowered.compile().as_text(), t1 - t0, time.perf_counter() - t1


def compile_step(tx, params, psh, ssh):
  def step(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jitted = jax.jit(
    step, in_shardings=(psh, psh, ssh), out_shardings=(psh, ssh), donate_argnums=(0, 2)
  )
  return compiled_text(jitted, params, params, jax.eval_shape(tx.init, params))


def main(argv=None):
  # --layers: fewer layers than the size's (0: its own); --methods: a subset (default all).
  args = suites.script_parser(
    __doc__, size=["1b", *SIZES], layers=0, meshes="8,4x2", methods=""
  ).parse_args(argv)
  if jax.device_count() < 8:
    raise SystemExit("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
  cfg = dict(SIZES[args.size])
  cfg["layers"] = args.layers or cfg["layers"]
  shapes = llama_shapes(**cfg)
  is_shape = lambda x: isinstance(x, tuple)
  params = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s, jax.numpy.float32), shapes, is_leaf=is_shape
  )
  specs = jax.tree_util.tree_map_with_path(fsdp_spec, shapes, is_leaf=is_shape)
  all_methods = methods(cfg["rank"])
  names = suites.chosen(args.methods or list(all_methods), all_methods)
  results = {
    "method": "bytes = operand and result sizes of the collectives in the compiled CPU HLO"
    " (jax.jit(...).lower(abstract args).compile(), nothing executed), per device,"
    " not timed; steady = outside any conditional (every step), branches = the"
    " conditional's branch computations (the projector refresh); while-loop bodies"
    " counted times their known trip count. Parameters FSDP-sharded on 'fsdp'"
    " (model axis d), gradients with the parameters' shardings, optimizer state"
    " with osub.state_shardings. A GPU compile may choose other collectives.",
    "tree": cfg,
    "projected": PROJECTED,
    "update_every": UPDATE_EVERY,
    "param_bytes": sum(4 * math.prod(s) for s in jax.tree.leaves(shapes, is_leaf=is_shape)),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "backend": jax.default_backend(),
    "devices": jax.device_count(),
    "host": platform.platform(),
    **record.provenance("communication", argv),
    "runs": [],
  }
  for mesh_name in args.meshes.split(","):
    shape, axes = MESHES[mesh_name]
    mesh = jax.make_mesh(shape, axes, (AxisType.Auto,) * len(axes))
    psh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    for name in names:
      tx = all_methods[name]
      hlo, lower_s, compile_s = compile_step(tx, params, psh, osub.state_shardings(tx, params, psh))
      run = {
        "method": name,
        "mesh": dict(zip(axes, shape)),
        "lower_s": round(lower_s, 1),
        "compile_s": round(compile_s, 1),
        "peak_rss_gb_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        **collective_bytes(hlo),
      }
      results["runs"].append(run)
      print(
        json.dumps(
          {k: run[k] for k in ("method", "mesh", "lower_s", "compile_s", "peak_rss_gb_so_far")}
        ),
        flush=True,
      )
      record.write_json(args.out, results)
  print(markdown_table(results))
  return results
