"""Bytes each method communicates per LLaMA train step, from the compiled HLO of the whole step.

What `communication.py` counts for the update alone, for everything a train step of the LLaMA
example runs on a mesh: forward, backward, the gradients' reduction, update and apply, and, at
the model level, RSO's merge and GRASS's selection pass (`lax.cond`s in the step). Each step is
compiled for simulated CPU devices from abstract arguments (nothing executed or timed) and its
collectives counted per device (`hlo_collectives`), the steady path apart from the conditionals'
branches. Methods: the optimizer level (the example's functional step, `state_shardings`) and
rso_model, grass_model (`nn` layers and optimizers). Meshes: "data" (2 × 1: weights replicated,
the gradients' all-reduce differs) and "fsdp" (1 × 2: matrices split on the hidden axis, weights
gathered, gradients reduce-scattered); the batch split over both axes, activations pinned to it.
B (r, out) keeps the kernel's out-axis sharding, P and D (in, r) its in-axis one. Fewer tokens per
device than the hidden size make XLA move activations instead of some weight gradients (compare
`--seq 2048`; `by_shape` lists every collective's shapes). With `--layers L` ≥ 2 the step is also
compiled with L − 1 layers: the difference is one block's bytes, extrapolated to 24 layers.
docs/scaling.md, "Bytes per train step, measured", has the command and results.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

import optax_subspace as osub  # pylint: disable=g-import-not-at-top
from benchmarks import record  # pylint: disable=g-import-not-at-top
from benchmarks import suites  # pylint: disable=g-import-not-at-top
from benchmarks.train_setups import cross_entropy  # pylint: disable=g-import-not-at-top
from benchmarks import methods as registry  # pylint: disable=g-import-not-at-top
from benchmarks.hlo_collectives import by_shape  # pylint: disable=g-import-not-at-top
from benchmarks.hlo_collectives import collective_bytes  # pylint: disable=g-import-not-at-top
from benchmarks.hlo_collectives import summarize  # pylint: disable=g-import-not-at-top
from examples.llama import mesh as llama_mesh  # pylint: disable=g-import-not-at-top
from examples.llama.config import ModelConfig  # pylint: disable=g-import-not-at-top
from examples.llama.model import Llama  # pylint: disable=g-import-not-at-top
from optax_subspace import nn as osnn  # pylint: disable=g-import-not-at-top
from optax_subspace.nn.grass import D_NAME  # pylint: disable=g-import-not-at-top
from optax_subspace.nn.rso import B_NAME  # pylint: disable=g-import-not-at-top

METHODS = registry.OPTIMIZER_LEVEL + registry.MODEL_LEVEL
MODEL_LEVEL = registry.MODEL_LEVEL
MESHES = {"data": (2, 1), "fsdp": (1, 2)}  # ("data", "fsdp") sizes
PROJECTED = r"(attention|mlp)/.*kernel"  # as examples/llama/optimizers.py
LAYERS = r"(attention|mlp)/"  # the same kernels, as module paths for the surgery
UPDATE_EVERY = 200
LR = 1e-3
FULL_LAYERS = 24  # the 350M model's depth, for the extrapolation


def _parser():
  return suites.script_parser(
    __doc__,
    "benchmarks/results/communication_train_step_cpu_hlo.json",
    hidden=1024,
    ffn=2736,
    heads=16,
    vocab=32000,
    layers=2,
    rank=256,
    batch_per_device=2,
    seq=128,
    methods=",".join(METHODS),
    meshes=",".join(MESHES),
  )


def _path(key_path) -> str:
  """A state path as "layers/0/attention/q_proj/kernel" (Variables' ".value" dropped)."""
  names = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in key_path]
  return "/".join(str(n) for n in names if n is not None and n != "value")


def _optimizer(method: str, rank: int) -> optax.GradientTransformation:
  if method == "adamw":
    return optax.adamw(LR)
  if method == "galore":
    return osub.galore(LR, rank, UPDATE_EVERY, mask=PROJECTED)
  if method == "osd":
    return osub.online_subspace_descent(LR, rank, update_every=UPDATE_EVERY, mask=PROJECTED)
  if method == "rso":
    return osub.rso(LR, rank, inner_steps=UPDATE_EVERY, mask=PROJECTED)
  if method == "grass":
    return osub.grass(LR, rank, UPDATE_EVERY, mask=PROJECTED)
  if method == "rso_model":
    return osnn.rso_optimizer(LR, inner_steps=UPDATE_EVERY)
  return osnn.grass_optimizer(LR)


# ------------------------------------------------------------------ train steps


def _optimizer_level_step(cfg, tx, mesh, tokens):
  """The example's train step (examples/llama/train.py `make_train_step`), jitted, with its args."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0))))
  params = nnx.to_pure_dict(state)
  psh, ssh, bsh = llama_mesh.shardings(mesh, params, tx, cfg.hidden)
  opt_state = jax.eval_shape(tx.init, params)

  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(lambda p: cross_entropy(nnx.merge(graphdef, p), batch))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(
    train_step, in_shardings=(psh, ssh, bsh), out_shardings=(psh, ssh, None), donate_argnums=(0, 1)
  )
  return step, (params, opt_state, tokens)


def _model_level_shardings(state, mesh, hidden):
  """Shardings of the (model, optimizer) state of a model with RsoLinear or GrassLinear layers.

  Kernels, embedding and norm scales: the example's `param_spec`. B (r, out): the kernel's
  sharding of out; P (in, r) and D (in, r): the kernel's sharding of in (as `rso_layers` places
  B and P on a sharded kernel). Optimizer buffers the shape of a Param whose path ends theirs:
  that Param's; the rest (counts, keys, selections, probes, subproblem index) replicated.
  """
  fsdp = mesh.shape["fsdp"]
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  paths = [_path(p) for p, _ in flat]
  kernels = {
    path[: -len("/kernel")]: llama_mesh.param_spec(leaf, hidden, fsdp)
    for path, (_, leaf) in zip(paths, flat)
    if path.endswith("/kernel")
  }

  def model_spec(path, leaf):
    layer, _, name = path.rpartition("/")
    spec = tuple(kernels.get(layer, ())) + (None, None)
    if name == B_NAME:
      return P(None, spec[1])
    if name in ("rso_basis", D_NAME):
      return P(spec[0], None)
    if name in ("kernel", "embedding", "scale"):
      return llama_mesh.param_spec(leaf, hidden, fsdp)
    return P()

  specs, model_leaves = [], {}
  for path, (_, leaf) in zip(paths, flat):
    if path.startswith("0/"):
      spec = model_spec(path[2:], leaf)
      model_leaves[path[2:]] = (leaf.shape, spec)
    else:
      spec = next(
        (
          s
          for p, (shape, s) in model_leaves.items()
          if path.endswith("/" + p) and leaf.shape == shape
        ),
        P(),
      )
    specs.append(NamedSharding(mesh, spec))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state), specs)


def _model_level_step(cfg, method, rank, mesh, tokens):
  """RSO's or GRASS's model-level train step (their modules' protocols), jitted, with its args."""

  def build():
    model = Llama(cfg, nnx.Rngs(0))
    if method == "rso_model":
      osnn.rso_layers(model, rank, mask=LAYERS)
    else:
      osnn.grass_layers(model, rank, update_every=UPDATE_EVERY, mask=LAYERS)
    return model, nnx.Optimizer(model, _optimizer(method, rank), wrt=nnx.Param)

  graphdef, state = nnx.split(nnx.eval_shape(build))
  ssh = _model_level_shardings(state, mesh, cfg.hidden)
  bsh = NamedSharding(mesh, P(llama_mesh.AXES))

  def train_step(state, batch):
    model, opt = nnx.merge(graphdef, state)
    if method == "grass_model":
      osnn.grass_refresh(model, opt, cross_entropy, batch)  # a lax.cond: acts at steps 0, K, 2K, …
    loss, grads = nnx.value_and_grad(cross_entropy)(model, batch)
    opt.update(model, grads)
    if method == "rso_model":
      osnn.merge_if_due(model, opt.step[...], UPDATE_EVERY)  # a lax.cond: after K, 2K, …
    return nnx.state((model, opt)), loss

  step = jax.jit(
    train_step, in_shardings=(ssh, bsh), out_shardings=(ssh, None), donate_argnums=(0,)
  )
  return step, (state, tokens)


def compile_train_step(cfg, method, rank, mesh, tokens):
  """(compiled HLO text, lower s, compile s) of one train step on `mesh`."""
  t0 = time.perf_counter()
  # Built outside the mesh: under one, nnx.eval_shape gives every Variable a sharding, and
  # fails on the surgery's Variables that have no sharding metadata.
  if method in MODEL_LEVEL:
    step, args = _model_level_step(cfg, method, rank, mesh, tokens)
  else:
    step, args = _optimizer_level_step(cfg, _optimizer(method, rank), mesh, tokens)
  with jax.set_mesh(mesh):  # traced under the mesh: the model pins activations to the batch
    lowered = step.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return compiled.as_text(), t1 - t0, time.perf_counter() - t1


# ------------------------------------------------------------------ analytic figures


def _sizes(cfg, rank):
  """Element counts of the model: per block and outside the blocks."""
  d, f = cfg.hidden, cfg.ffn
  kernels = [(d, d)] * 4 + [(d, f), (d, f), (f, d)]  # q k v o, gate up (in, out), down
  return {
    "block_params": sum(i * o for i, o in kernels) + 2 * d,
    "block_kernels": sum(i * o for i, o in kernels),
    "block_norms": 2 * d,
    "block_rso_b": sum(rank * o for _, o in kernels),  # B: r × out
    "block_rso_p_sharded": sum(i * rank for i, _ in kernels if i == d),  # P: in × r
    "block_grass_d": sum(i * rank for i, _ in kernels),  # D: in × r
    "block_grass_d_sharded": sum(i * rank for i, _ in kernels if i == d),
    "block_update_rl": sum(rank * max(i, o) for i, o in kernels),  # r × l, l the larger side
    "block_update_r2": len(kernels) * rank * rank,
    "block_refresh_sl_s2": sum(i * o + min(i, o) ** 2 for i, o in kernels),
    "outside_matrices": 2 * cfg.vocab_size * d,  # embedding and head, both split on d
    "outside_norm": d,
  }


def analytic(cfg, rank, method, mesh_name):
  """The collective bytes the method's train step needs, float32, per device (array sizes).

  {"gather": all-gathered bytes (the gathered arrays), "reduce": all-reduced or
  reduce-scattered bytes (the reduced arrays), "refresh": per refresh, "formula": text}.
  """
  s, n = _sizes(cfg, rank), cfg.layers
  dense = s["outside_matrices"] + s["outside_norm"] + n * s["block_norms"]  # never projected
  full = n * s["block_params"] + s["outside_matrices"] + s["outside_norm"]
  trainable = {
    "rso_model": n * s["block_rso_b"] + dense,
    "grass_model": n * s["block_grass_d"] + dense,
  }.get(method, full)
  if mesh_name == "data":
    out = {"gather": 0, "reduce": 4 * trainable, "refresh": 0}
    formula = {
      "rso_model": "all-reduce of the gradients of B and the unprojected Params:"
      " Σ r·out + unprojected",
      "grass_model": "all-reduce of the gradients of D and the unprojected Params:"
      " Σ in·r + unprojected; per refresh: all-reduce of every layer's"
      " dW (Σ in·out) in the norms pass",
    }.get(method, "all-reduce of the full gradient: Σ params")
    if method == "grass_model":
      out["refresh"] = 4 * n * s["block_kernels"]
    return {**out, "formula": formula}
  sharded = n * s["block_kernels"] + s["outside_matrices"]  # all-gathered for the forward
  update = {
    "galore": 2 * s["block_update_rl"],
    "rso": 2 * s["block_update_rl"],
    "osd": 2 * s["block_update_rl"] + s["block_update_r2"],
    "grass": s["block_update_rl"],
  }.get(method, 0) * n
  refresh = {"galore": n * s["block_refresh_sl_s2"], "osd": n * s["block_refresh_sl_s2"]}
  out = {
    "gather": 4 * sharded,
    "reduce": 4 * trainable,
    "update": 4 * update,
    "refresh": 4 * refresh.get(method, 0),
  }
  if method == "rso_model":
    out["gather"] += 4 * n * s["block_rso_p_sharded"]
  if method == "grass_model":
    out["gather"] += 4 * n * s["block_grass_d_sharded"]
    out["refresh"] = 4 * (sharded + n * s["block_kernels"])
  formula = {
    "adamw": "all-gather of the split params + reduce-scatter of the gradients",
    "galore": "as adamw, plus the update (docs: case A): reduce R = PᵀG and gather N, 2·Σ r·l;"
    " per refresh: gather of G and its Gram matrix, Σ s·l + s²",
    "osd": "as galore, plus Σ r² every step; its refresh runs at step 0 only",
    "rso": "as adamw, plus the update: reduce PᵀG and gather N, 2·Σ r·l; a new P is local",
    "grass": "as adamw, plus the update: the selected rows, Σ r·l",
    "rso_model": "all-gather of the frozen W, P (in·r where in is split) and the unprojected"
    " Params + reduction of the gradients of B (Σ r·out) and the unprojected;"
    " the merge W + P·B is local",
    "grass_model": "all-gather of the frozen W, D (in·r where in is split) and the unprojected"
    " Params + reduction of the gradients of D (Σ in·r) and the unprojected;"
    " per refresh: a second forward (gathers again) and every dW reduced",
  }[method]
  return {**out, "formula": formula}


# ------------------------------------------------------------------ measured totals


def _measure(cfg, method, rank, mesh, tokens):
  hlo, lower_s, compile_s = compile_train_step(cfg, method, rank, mesh, tokens)
  counted = collective_bytes(hlo)
  counted["by_shape"] = by_shape(hlo)
  return counted, summarize(counted), round(lower_s, 1), round(compile_s, 1)


def main(argv=None) -> dict:
  args = _parser().parse_args(argv)
  methods = suites.chosen(args.methods, METHODS)
  if jax.device_count() < 2:
    raise SystemExit("needs 2 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
  cfg = ModelConfig(args.hidden, args.ffn, args.heads, args.layers, args.vocab)
  result = {
    **record.provenance("communication_train_step", argv),
    "what": "CPU HLO: sizes of the collectives in the compiled HLO of one whole train step"
    " (forward, backward, update, apply), compiled for simulated CPU devices, never"
    " executed or timed; per device; array sizes (all-gather: the gathered result;"
    " all-reduce, reduce-scatter, all-to-all, collective-permute: the operand), not"
    " wire traffic. A GPU compile may choose other collectives.",
    "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}), simulated,"
    f" {jax.device_count()} visible, 2 used per mesh",
    "host": platform.platform(),
    "config": {
      k: getattr(args, k)
      for k in ("hidden", "ffn", "heads", "vocab", "layers", "rank", "batch_per_device", "seq")
    }
    | {
      "update_every": UPDATE_EVERY,
      "projected": PROJECTED,
      "compute_dtype": cfg.compute_dtype,
      "param_dtype": cfg.param_dtype,
      "meshes": {m: dict(zip(llama_mesh.AXES, MESHES[m])) for m in MESHES},
    },
    "shapes": {
      "params": int(
        sum(
          math.prod(x.shape)
          for x in jax.tree.leaves(
            nnx.state(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0))), nnx.Param)
          )
        )
      ),
      **{k: v for k, v in _sizes(cfg, args.rank).items()},
    },
    "note": "Activations are split over the batch axes and pinned there. Batch and sequence"
    " length do not change the sizes of the weights' collectives, but XLA replaces"
    " some of them by moving activations when those are smaller (fewer tokens per"
    " device than the hidden size); by_shape lists every collective's shapes.",
    "runs": {},
  }
  for mesh_name in args.meshes.split(","):
    mesh = llama_mesh.make_mesh(*MESHES[mesh_name])
    devices = math.prod(MESHES[mesh_name])
    tokens = jax.ShapeDtypeStruct((args.batch_per_device * devices, args.seq + 1), jnp.int32)
    runs = result["runs"].setdefault(mesh_name, {})
    for method in methods:
      try:
        counted, totals, lower_s, compile_s = _measure(cfg, method, args.rank, mesh, tokens)
      except Exception as e:  # pylint: disable=broad-except
        runs[method] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        print(
          json.dumps({"mesh": mesh_name, "method": method, "error": runs[method]["error"]}),
          flush=True,
        )
        continue
      run = {
        "totals": totals,
        **counted,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "analytic": analytic(cfg, args.rank, method, mesh_name),
      }
      if args.layers >= 2:
        fewer = ModelConfig(args.hidden, args.ffn, args.heads, args.layers - 1, args.vocab)
        _, totals_fewer, _, _ = _measure(fewer, method, args.rank, mesh, tokens)
        per_layer = {k: totals[k] - totals_fewer[k] for k in totals}
        run["per_layer"] = per_layer
        run["extrapolated_to_24_layers"] = {
          k: totals[k] + (FULL_LAYERS - args.layers) * per_layer[k] for k in totals
        }
      runs[method] = run
      print(
        json.dumps(
          {
            "mesh": mesh_name,
            "method": method,
            **totals,
            "per_layer_total": run.get("per_layer", {}).get("total"),
            "lower_s": lower_s,
            "compile_s": compile_s,
          }
        ),
        flush=True,
      )
    base = runs.get("adamw", {}).get("totals")
    for run in runs.values():
      if base and "totals" in run:
        run["ratio_vs_adamw"] = {
          k: round(run["totals"][k] / base[k], 4) if base[k] else None
          for k in ("total", "reduce", "gather")
        }
  record.write_json(args.out, result)
  print(markdown_table(result))
  return result


def markdown_table(result) -> str:
  """Rows per mesh and method: measured MB (10⁶ bytes) per device next to the analytic ones."""
  mb = lambda b: f"{b / 1e6:,.1f}"
  lines = [
    "| mesh | method | gathered | reduced | other | per refresh | total / AdamW |"
    " analytic gathered | analytic reduced | per layer (total) |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for mesh_name, runs in result["runs"].items():
    for method, run in runs.items():
      if "error" in run:
        lines.append(f"| {mesh_name} | {method} | error: {run['error'][:120]} |||||||||")
        continue
      t, a = run["totals"], run["analytic"]
      lines.append(
        f"| {mesh_name} | {method} | {mb(t['gather'])} | {mb(t['reduce'])} | {mb(t['moved'])}"
        f" | {mb(t['largest_branch_total'])} | {run.get('ratio_vs_adamw', {}).get('total')}"
        f" | {mb(a['gather'])} | {mb(a['reduce'] + a.get('update', 0))}"
        f" | {mb(run['per_layer']['total']) if 'per_layer' in run else ''} |"
      )
  return "\n".join(lines)
