"""GRASS's costs: its model-level backward vs the dense one, its update vs AdamW, GaLore, OSD.

Part 1, a stack of the LLaMA example's blocks (default: the 1B shapes, 8 of the 24 blocks, batch
4 × 2048 tokens, bf16 compute, fp32 parameters), dense and with `nn.grass_layers` (rank 512) on
the attention and MLP projections, loss the output's mean square: FLOPs of the compiled forward,
forward+backward and weight gradient (`cost_analysis` of the gradient w.r.t. Params and input
minus that w.r.t. the input alone) against the analytic 2·T·Σ in·r; gradient and temp bytes;
median times of forward+backward, of a train step (AdamW dense, `grass_optimizer` for GRASS) and
of GRASS's refresh, amortised over K = 200 steps. cuDNN's attention (--attention auto on a GPU)
counts 0 FLOPs in both stacks; the weight-gradient FLOPs, a difference, hold none of it.

Part 2, the update alone on a LLaMA tree (`optimizer_step.update_rows`): AdamW, GaLore, OSD and
`grass` (steady and refresh), and `grass_optimizer` on the tree the model level trains (each
projected kernel replaced by D, in × r). Commands and results: docs/grass.md, "Measured costs".
"""

from __future__ import annotations

import gc
import pathlib
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks import optimizer_step
from benchmarks import optimizer_update
from benchmarks import record
from benchmarks import suites
from benchmarks import train_setups
from optax_subspace import nn as osnn
from optax_subspace.nn import _surgery

GRASS_LAYERS = r"(attention|mlp)/"
UPDATE_EVERY = 200  # K: the refresh is timed apart and amortised over K steps
TREE_METHODS = (
  "adamw",
  "galore_steady",
  "osd_steady",
  "grass_steady",
  "grass_refresh_topk",
  "grass_model_level",
)


def _parser():
  return suites.script_parser(
    __doc__,
    layers=(8, "blocks in the stack"),
    hidden=2048,
    ffn=5461,
    heads=32,
    batch=4,
    seq=2048,
    rank=(512, "GRASS's r (and GaLore's, OSD's)"),
    selection=["topk", "multinomial", "uniform"],
    lr=1e-3,
    attention=["auto", "xla", "cudnn"],
    reps=(20, "timed calls per measurement"),
    tree_size=(["1b", *optimizer_step.SIZES], "part 2's tree"),
    skip_tree=(False, "part 1 only"),
    tree_methods=",".join(TREE_METHODS),
  )


def _stack(args):
  return train_setups.block_stack(args.hidden, args.ffn, args.heads, args.layers)


def _loss(model, x):
  return jnp.mean(jnp.square(model(x).astype(jnp.float32)))


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def _temp_bytes(compiled) -> int | None:
  analysis = compiled.memory_analysis()
  return None if analysis is None else int(analysis.temp_size_in_bytes)


def _median_ms(compiled, carry, const, reps):
  """Median ms of synced calls (`optimizer_step.time_calls`) of compiled(*carry, *const), which
  returns the next carry (donated buffers), or without a `carry` of compiled(*const)."""
  wrap = lambda out: out if isinstance(out, tuple) else (out,)
  run = (lambda *c: wrap(compiled(*c, *const))) if carry else (lambda _: (compiled(*const),))
  return optimizer_step.time_calls(run, carry or (None,), reps)[0]


def _compile_grads(model, x):
  """Compiled forward, value_and_grad (Params), grad (Params, input), grad (input)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss = lambda p, r, x: _loss(nnx.merge(graphdef, p, r), x)
  fns = {
    "forward": loss,
    "value_and_grad": jax.value_and_grad(loss),
    "grad_params_and_input": jax.grad(loss, argnums=(0, 2)),
    "grad_input": jax.grad(loss, argnums=2),
  }
  compiled = {}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    compiled[name] = jax.jit(fn).lower(params, rest, x).compile()
    print(f"    compiled {name} in {time.perf_counter() - t0:.1f} s", flush=True)
  grad_shapes = jax.eval_shape(jax.grad(loss), params, rest, x)
  return compiled, (params, rest, x), train_setups.nbytes(grad_shapes)


def _train_step(model, tx, x):
  """Compiled train step (params, opt_state, rest, x) -> (params, opt_state), state donated."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.tree_util.tree_map(jnp.copy, params)  # donated: the model keeps its own
  opt_state = tx.init(params)

  def step(params, opt_state, rest, x):
    grads = jax.grad(lambda p: _loss(nnx.merge(graphdef, p, rest), x))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, rest, x).compile()
  return compiled, (params, opt_state), (rest, x)


def _refresh(model, x):
  """Compiled `grass_refresh` at a refresh step (optimizer step 0), state donated."""
  optimizer = nnx.Optimizer(model, osnn.grass_optimizer(1e-3), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  state = jax.tree_util.tree_map(jnp.copy, state)  # donated: the model keeps its own

  def refresh(state, x):
    model, optimizer = nnx.merge(graphdef, state)
    osnn.grass_refresh(model, optimizer, _loss, x)
    return nnx.state((model, optimizer))

  compiled = jax.jit(refresh, donate_argnums=0).lower(state, x).compile()
  return compiled, (state,), (x,)


def bench_blocks(args) -> dict:
  x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, args.seq, args.hidden), jnp.bfloat16)
  tokens = args.batch * args.seq
  out = {"tokens": tokens}
  # (in, out) of every layer GRASS replaces.
  shapes = [
    tuple(layer.kernel.shape) for _, layer in _surgery.find_linears(_stack(args), GRASS_LAYERS)
  ]
  sum_in_out = sum(m * n for m, n in shapes)
  sum_in_r = sum(m * min(args.rank, n) for m, n in shapes)
  out["analytic"] = {
    "dense_dw_flops": 2 * tokens * sum_in_out,
    "grass_dd_flops": 2 * tokens * sum_in_r,
    # x·D in the forward and dY[:, σ]·(Dρ)ᵀ in ∂L/∂x: GRASS's extra products.
    "grass_extra_forward_flops": 2 * tokens * sum_in_r,
    "grass_extra_input_grad_flops": 2 * tokens * sum_in_r,
    "target_weight_grad_cut": 1 - sum_in_r / sum_in_out,
    "target_cut_per_layer": {f"{m}x{n}": 1 - min(args.rank, n) / n for m, n in sorted(set(shapes))},
  }
  for name in ("dense", "grass"):
    print(f"  {name} stack:", flush=True)
    model = _stack(args)
    if name == "grass":
      osnn.grass_layers(
        model, args.rank, update_every=UPDATE_EVERY, mask=GRASS_LAYERS, selection=args.selection
      )
    compiled, call_args, grad_bytes = _compile_grads(model, x)
    row = {f"{k}_flops": _flops(c) for k, c in compiled.items()}
    row["backward_flops"] = row["value_and_grad_flops"] - row["forward_flops"]
    row["weight_grad_flops"] = row["grad_params_and_input_flops"] - row["grad_input_flops"]
    row["gradient_bytes"] = grad_bytes
    row["value_and_grad_temp_bytes"] = _temp_bytes(compiled["value_and_grad"])
    row["value_and_grad_ms"] = _median_ms(compiled["value_and_grad"], (), call_args, args.reps)
    del compiled, call_args
    tx = optax.adamw(args.lr) if name == "dense" else osnn.grass_optimizer(args.lr)
    step, carry, const = _train_step(model, tx, x)
    row["train_step_temp_bytes"] = _temp_bytes(step)
    row["train_step_ms"] = _median_ms(step, carry, const, args.reps)
    del step, carry, const
    if name == "grass":
      refresh, carry, const = _refresh(model, x)
      row["refresh_flops"] = _flops(refresh)
      row["refresh_temp_bytes"] = _temp_bytes(refresh)
      row["refresh_ms"] = _median_ms(refresh, carry, const, max(3, args.reps // 4))
      row["train_step_with_amortised_refresh_ms"] = (
        row["train_step_ms"] + row["refresh_ms"] / UPDATE_EVERY
      )
      del refresh, carry, const
    out[name] = row
    print("   ", {k: v for k, v in row.items() if k.endswith(("_ms", "bytes"))}, flush=True)
    del model
    gc.collect()
  d, g = out["dense"], out["grass"]
  out["measured"] = {
    "weight_grad_cut": 1 - g["weight_grad_flops"] / d["weight_grad_flops"],
    "backward_flops_ratio": g["backward_flops"] / d["backward_flops"],
    "forward_flops_ratio": g["forward_flops"] / d["forward_flops"],
    "gradient_bytes_ratio": g["gradient_bytes"] / d["gradient_bytes"],
    "value_and_grad_time_ratio": g["value_and_grad_ms"] / d["value_and_grad_ms"],
    "train_step_time_ratio": g["train_step_ms"] / d["train_step_ms"],
    "train_step_with_amortised_refresh_ratio": (
      g["train_step_with_amortised_refresh_ms"] / d["train_step_ms"]
    ),
  }
  # dD's products are exactly 2·T·Σ in·r; what the measured weight-gradient FLOPs add to them
  # is elementwise (ρ's scaling, the norm scales' gradients), of relative size ~1/T.
  out["measured"]["weight_grad_cut_minus_target"] = (
    out["measured"]["weight_grad_cut"] - out["analytic"]["target_weight_grad_cut"]
  )
  return out


def _model_level_shapes(shapes, rank):
  """optimizer_step's tree with every projected kernel (in, out) replaced by D (in, r)."""

  def convert(path, shape):
    names = [str(getattr(k, "key", k)) for k in path]
    if ("attention" in names or "mlp" in names) and names[-1] == "kernel":
      return {osnn.grass.D_NAME: (shape[0], min(rank, shape[1]))}
    return shape

  return jax.tree_util.tree_map_with_path(convert, shapes, is_leaf=lambda x: isinstance(x, tuple))


def bench_tree(args) -> dict:
  cfg = optimizer_step.SIZES[args.tree_size]
  rank, lr = cfg["rank"], args.lr
  projected = optimizer_step.PROJECTED
  shapes = optimizer_step.llama_shapes(**cfg)
  init = lambda k, s: 0.02 * jax.random.normal(k, s)
  params = optimizer_step.make_tree(shapes, 0, init)
  grads = optimizer_step.make_tree(shapes, 1, optimizer_step.synthetic_gradient)
  table = optimizer_step.variants(rank, lr=lr)
  wanted = set(args.tree_methods.split(",")) | {"adamw"}
  rows = optimizer_step.update_rows(
    [(m, *table[m]) for m in TREE_METHODS[:-1] if m in wanted], params, grads, args.reps
  )
  del params, grads
  gc.collect()
  if "grass_model_level" in wanted:
    d_shapes = _model_level_shapes(shapes, rank)
    d_params = optimizer_step.make_tree(d_shapes, 0, lambda k, s: jnp.zeros(s))
    d_grads = optimizer_step.make_tree(d_shapes, 1, optimizer_step.synthetic_gradient)
    (row,) = optimizer_update.bench_method(
      "grass_model_level", osnn.grass_optimizer(lr), d_params, d_grads, args.reps, None, None
    )
    rows.append(
      {
        **row,
        "ratio_to_adamw": row["median_ms"] / rows[0]["median_ms"],
        "state_ratio_to_adamw": row["state_bytes"] / rows[0]["state_bytes"],
      }
    )
  return {
    "size": args.tree_size,
    "config": cfg,
    "projected": projected,
    "rows": rows,
    "grass_model_level_tree": "projected kernels (in, out) replaced by D (in, r)",
  }


def _plot(result: dict, path: pathlib.Path) -> None:
  blocks = result["blocks"]
  d, g = blocks["dense"], blocks["grass"]
  panels = [
    ("weight-gradient GFLOPs", [d["weight_grad_flops"] / 1e9, g["weight_grad_flops"] / 1e9]),
    ("backward GFLOPs", [d["backward_flops"] / 1e9, g["backward_flops"] / 1e9]),
    ("gradient MiB", [d["gradient_bytes"] / 2**20, g["gradient_bytes"] / 2**20]),
    (
      "train step ms (GRASS: + refresh / K)",
      [d["train_step_ms"], g["train_step_with_amortised_refresh_ms"]],
    ),
  ]
  n = len(panels) + ("tree" in result)
  fig, axes = record.subplots(1, n, figsize=(3.4 * n, 3.4))
  for ax, (title, values) in zip(axes, panels):
    ax.bar(["dense", "GRASS"], values, color=["tab:gray", "tab:blue"])
    ax.set_title(title, fontsize=9)
  if "tree" in result:
    rows = result["tree"]["rows"]
    ax = axes[-1]
    ax.barh([r["method"] for r in rows], [r["ratio_to_adamw"] for r in rows])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_title(f"optimizer update / AdamW ({result['tree']['size']} tree)", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
  fig.suptitle(f"GRASS r={result['config']['rank']}, {result['device']}", fontsize=10)
  record.save(fig, path)


def main(argv=None) -> dict:
  args = _parser().parse_args(argv)
  attention = train_setups.attention_for(
    args.attention, jax.devices()[0].platform, args.hidden // args.heads
  )
  train_setups.use_attention(attention)
  result = {
    **record.provenance("grass_cost", argv),
    "config": {k: v for k, v in vars(args).items() if k != "out"}
    | {
      "attention": attention,
      "update_every": UPDATE_EVERY,
      "compute_dtype": "bfloat16",
      "param_dtype": "float32",
    },
    "timing": "median of --reps calls after 2 warm-up calls, each synced; train steps and"
    " refreshes donate their state",
  }
  out = pathlib.Path(args.out)
  print(
    f"block stack: {args.layers} blocks, d {args.hidden}, ffn {args.ffn}, {args.heads} heads,"
    f" {args.batch}x{args.seq} tokens, rank {args.rank}, {attention} attention",
    flush=True,
  )
  result["blocks"] = bench_blocks(args)
  print("  measured:", result["blocks"]["measured"], flush=True)
  record.write_json(out, result)
  if not args.skip_tree:
    print(f"optimizer update, {args.tree_size} tree:", flush=True)
    result["tree"] = bench_tree(args)
    record.write_json(out, result)
  _plot(result, out.with_suffix(".png"))
  print("wrote", out, "and", out.with_suffix(".png"))
  return result
