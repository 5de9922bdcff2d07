"""Train-step memory and time of model-level RSO vs AdamW and GaLore on a stack of LLaMA blocks.

Each method in its own subprocess (the device's peak counter is then that method's): a stack of
the example's blocks (default the 350M shapes, 24 blocks, bf16 compute, fp32 parameters), one
jitted train step (parameters and state donated) on random input activations, its
`memory_analysis()` and the residuals a block keeps for its backward; on a GPU, timed steps,
`peak_bytes_in_use` and RSO's merge. Methods: adamw; galore (rank r, T = 200, the attention and
MLP kernels); rso (`nn.rso_layers` + `rso_optimizer`, K = 200); rso_shared (`share_basis=
nn.SHARE_QKV_GATE_UP`: one P for q/k/v, one for gate/up). Targets (issue 4): RSO's temp bytes
≤ 0.8× AdamW's, its step time ≤ 1.1×. docs/rso.md, "Memory and time on the GPU", defines the
columns and gives the commands.

Attention: the example's XLA attention keeps b×heads×s×s tensors for the backward (5.5 GiB per
block at 8 × 2048, 16 heads); `--attention cudnn` (the GPU default) calls cuDNN's flash attention
instead; `--attention recompute` (for the CPU) keeps what cuDNN's keeps and recomputes the
probabilities, so a CPU compile's activation memory has the GPU's proportions. The CPU's ratios
are guides only: its compiler computes bf16 products in float32 and removes optimisation barriers
early (`XLA_FLAGS=--xla_disable_hlo_passes=cse,cse_barrier_expander` keeps them).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import pathlib
import re
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

import optax_subspace as osub
from benchmarks import record
from benchmarks import suites
from benchmarks import train_setups
from optax_subspace import nn as osnn

METHODS = ("adamw", "galore", "rso", "rso_shared")
PROJECTED = r"(attention|mlp)/.*kernel"
RSO_LAYERS = r"(attention|mlp)/"
UPDATE_EVERY = 200  # GaLore's T and RSO's K: neither refresh nor merge is in the timed steps


def _parser() -> argparse.ArgumentParser:
  ap = suites.script_parser(
    __doc__,
    layers=(24, "blocks in the stack"),
    hidden=1024,
    ffn=2736,
    heads=16,
    batch=8,
    seq=2048,
    rank=(256, "rank of GaLore and RSO"),
    lr=1e-3,
    remat=(False, "recompute each block in the backward"),
    attention=(
      ["auto", "xla", "cudnn", "recompute"],
      "auto: cudnn on GPU, xla elsewhere; recompute: keeps what cuDNN keeps",
    ),
    steps=(10, "timed steps (GPU only)"),
    warmup=3,
    methods=",".join(METHODS),
  )
  ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
  return ap


def _block_residual_bytes(block, x) -> dict:
  """Bytes one block keeps for its backward (jax's saved residuals, arguments excluded).

  Platform-independent (read from the traced VJP, before XLA): "activations" are the residuals
  with a batch and a sequence axis (attention's included), "weights" the 2-D ones (the kernels
  cast to the compute dtype). Arguments and constants (the parameters, RSO's W, P and B) are
  left out: the step holds them anyway.
  """
  graphdef, params, rest = nnx.split(block, nnx.Param, ...)
  f = lambda params, x: jnp.sum(nnx.merge(graphdef, params, rest)(x).astype(jnp.float32))
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    print_saved_residuals(f, params, x)
  out = {"activations": 0, "weights": 0}
  for line in text.getvalue().splitlines():
    m = re.match(r"(\w+)\[([0-9,]*)\] (.*)", line)
    if m is None or "from the argument" in m.group(3) or "from a constant" in m.group(3):
      continue
    shape = [int(d) for d in m.group(2).split(",") if d]
    itemsize = jnp.dtype(
      {"bf16": "bfloat16", "f32": "float32", "f16": "float16", "i32": "int32"}.get(
        m.group(1), m.group(1)
      )
    ).itemsize
    out["activations" if len(shape) >= 3 else "weights"] += itemsize * math.prod(shape)
  return out


def _recomputing_attention(
  query, key, value, bias=None, mask=None, *, scale=None, is_causal=False, **unused
):
  """Softmax attention that keeps q, k, v, the output and the log-sum-exp for its backward.

  What a flash-attention kernel (cuDNN's) keeps, so that a CPU compile's activation memory
  resembles the GPU's: the backward recomputes the probabilities P = exp(S − lse) and applies
  FlashAttention's backward (Dao et al., "FlashAttention", arXiv 2205.14135, Algorithm 4):
  dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P∘(dP − rowsum(dO∘O)), dQ = dS·K·scale, dK = dSᵀ·Q·scale.
  The forward still forms the b×heads×s×s scores, but only for one layer at a time.
  q, k, v: (batch, seq, heads, head_dim), as `jax.nn.dot_product_attention` takes them.
  """
  if bias is not None or mask is not None or unused:
    raise NotImplementedError("--attention recompute takes q, k, v, scale and is_causal only")
  scale = query.shape[-1] ** -0.5 if scale is None else scale

  def causal(s_qk):
    return jnp.where(jnp.tril(jnp.ones(s_qk.shape[-2:], bool)), s_qk, -jnp.inf)

  def forward(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    s = causal(s) if is_causal else s
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v).astype(q.dtype), lse

  @jax.custom_vjp
  def attention(q, k, v):
    return forward(q, k, v)[0]

  def attention_fwd(q, k, v):
    o, lse = forward(q, k, v)
    return o, (q, k, v, o, lse)

  def attention_bwd(res, do):
    # FlashAttention's backward over blocks of queries, in a scan: each block's probabilities
    # are recomputed inside the loop body, from that block's q and dO, so XLA can neither merge
    # them with the forward's nor schedule them into the forward (it did both to a plain
    # recomputation on the CPU, keeping b×heads×s×s per layer until the backward).
    q, k, v, o, lse = res
    batch, seq, heads, dim = q.shape
    block = math.gcd(seq, 128)
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), o.astype(jnp.float32))

    def blocks(x, axis):  # (…, seq, …) -> (seq/block, …, block, …)
      shape = x.shape[:axis] + (seq // block, block) + x.shape[axis + 1 :]
      return jnp.moveaxis(x.reshape(shape), axis, 0)

    def body(carry, xs):
      dk, dv = carry
      start, q_b, do_b, lse_b, delta_b = xs
      s_b = jnp.einsum("bqhd,bkhd->bhqk", q_b, k, preferred_element_type=jnp.float32) * scale
      if is_causal:
        rows = start + jnp.arange(block)[:, None]
        s_b = jnp.where(rows >= jnp.arange(seq)[None, :], s_b, -jnp.inf)
      p_b = jnp.exp(s_b - lse_b[..., None])
      dv = dv + jnp.einsum(
        "bhqk,bqhd->bkhd", p_b.astype(do.dtype), do_b, preferred_element_type=jnp.float32
      )
      dp_b = jnp.einsum("bqhd,bkhd->bhqk", do_b, v, preferred_element_type=jnp.float32)
      ds_b = (p_b * (dp_b - delta_b[..., None])).astype(q.dtype)
      dq_b = jnp.einsum("bhqk,bkhd->bqhd", ds_b, k, preferred_element_type=jnp.float32)
      dk = dk + jnp.einsum("bhqk,bqhd->bkhd", ds_b, q_b, preferred_element_type=jnp.float32)
      return (dk, dv), dq_b * scale

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(
      body,
      (zeros, zeros),
      (jnp.arange(0, seq, block), blocks(q, 1), blocks(do, 1), blocks(lse, 2), blocks(delta, 2)),
    )
    dq = jnp.moveaxis(dq, 0, 1).reshape(q.shape)
    return dq.astype(q.dtype), (dk * scale).astype(k.dtype), dv.astype(v.dtype)

  attention.defvjp(attention_fwd, attention_bwd)
  return attention(query, key, value)


def _worker(args) -> dict:
  """One method's numbers; runs in its own process.

  The example's model calls `jax.nn.dot_product_attention`: for --attention cudnn or recompute
  that name is rebound while the worker runs, and restored after (tests call it in-process).
  """
  train_setups.use_attention(
    _recomputing_attention if args.attention == "recompute" else args.attention
  )
  try:
    return _measure(args)
  finally:
    train_setups.use_attention("xla")


def _measure(args) -> dict:
  model = train_setups.block_stack(args.hidden, args.ffn, args.heads, args.layers, args.remat)
  x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, args.seq, args.hidden), jnp.bfloat16)
  if args.worker in ("rso", "rso_shared"):
    share = osnn.SHARE_QKV_GATE_UP if args.worker == "rso_shared" else None
    osnn.rso_layers(model, args.rank, mask=RSO_LAYERS, share_basis=share)
    tx = osnn.rso_optimizer(args.lr, inner_steps=UPDATE_EVERY)
  elif args.worker == "galore":
    tx = osub.galore(args.lr, args.rank, UPDATE_EVERY, mask=PROJECTED)
  else:
    tx = optax.adamw(args.lr)
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(params)

  def loss_fn(params, frozen, x):
    # copy=True: fresh Variables at this trace level. Without it the merged model holds the
    # jit-level Variables of `frozen` (RSO's W and P), and nnx.remat, which writes every
    # Variable back after the block, refuses to update them under value_and_grad's trace.
    y = nnx.merge(graphdef, params, frozen, copy=True)(x)
    return jnp.mean(jnp.square(y.astype(jnp.float32)))

  def train_step(params, opt_state, frozen, x):
    loss, grads = jax.value_and_grad(loss_fn)(params, frozen, x)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(train_step, donate_argnums=(0, 1))
  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, frozen, x).compile()
  compile_s = time.perf_counter() - t0
  out = {
    "compile_s": round(compile_s, 2),
    "memory_analysis": train_setups.memory_analysis(compiled),
    "trainable_param_bytes": train_setups.nbytes(params),
    "frozen_bytes": train_setups.nbytes(frozen),
    "opt_state_bytes": train_setups.nbytes(opt_state),
    "block_residual_bytes": _block_residual_bytes(model.layers[0], x),
  }
  dev = jax.devices()[0]
  if dev.platform != "gpu":
    return out
  times = []
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, frozen, x)
    loss.block_until_ready()
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  out["step_ms"] = round(1e3 * statistics.median(times), 3)
  out["peak_bytes_in_use"] = int(dev.memory_stats()["peak_bytes_in_use"])
  out["loss_after"] = float(loss)
  if args.worker in ("rso", "rso_shared"):
    nnx.update(model, params)
    merge = nnx.jit(osnn.merge_and_redraw)
    merge(model)
    jax.block_until_ready(nnx.state(model))
    t0 = time.perf_counter()
    merge(model)
    jax.block_until_ready(nnx.state(model))
    out["merge_ms"] = round(1e3 * (time.perf_counter() - t0), 3)
    out["merge_ms_per_step"] = round(out["merge_ms"] / UPDATE_EVERY, 4)
  return out


def _run_method(method: str, argv: list[str]) -> dict:
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.rso_memory", *argv, "--worker", method],
    capture_output=True,
    text=True,
    cwd=record.ROOT,
  )
  if proc.returncode != 0:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
    return {"error": "\n".join(tail)}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratios(methods: dict) -> dict:
  base = methods.get("adamw", {})
  if "memory_analysis" not in base:
    return {}
  ratios = {}
  for name, m in methods.items():
    if name == "adamw" or "memory_analysis" not in m:
      continue
    r = {
      "temp_bytes": m["memory_analysis"]["temp_size_in_bytes"]
      / base["memory_analysis"]["temp_size_in_bytes"]
    }
    if "peak_bytes_in_use" in m and "peak_bytes_in_use" in base:
      r["peak_bytes"] = m["peak_bytes_in_use"] / base["peak_bytes_in_use"]
      r["step_time"] = m["step_ms"] / base["step_ms"]
    ratios[name] = {k: round(v, 4) for k, v in r.items()}
  return ratios


def _plot(result: dict, path: pathlib.Path) -> None:
  names = [n for n, m in result["methods"].items() if "memory_analysis" in m]
  panels = [
    ("temp (activations + gradients)", lambda m: m["memory_analysis"]["temp_size_in_bytes"]),
    ("arguments", lambda m: m["memory_analysis"]["argument_size_in_bytes"]),
    ("measured peak", lambda m: m.get("peak_bytes_in_use", 0)),
  ]
  timed = all("step_ms" in result["methods"][n] for n in names)
  fig, axes = record.subplots(1, 2 if timed else 1, figsize=(11 if timed else 6, 4), squeeze=False)
  record.bars(
    axes[0][0],
    names,
    {label: [get(result["methods"][n]) / 2**30 for n in names] for label, get in panels},
    f"train step memory, {result['device']}",
    "GiB",
  )
  if timed:
    ax = axes[0][1]
    ax.bar(names, [result["methods"][n]["step_ms"] for n in names], color="gray")
    ax.set_ylabel("ms (median)")
    ax.set_title("train step time", fontsize=9)
  c = result["config"]
  fig.suptitle(
    f"{c['layers']} LLaMA blocks, d {c['hidden']}, ffn {c['ffn']}, "
    f"{c['batch']}×{c['seq']} tokens, rank {c['rank']}, attention {c['attention']}"
    f"{', remat' if c['remat'] else ''}",
    fontsize=10,
  )
  record.save(fig, path)


def main(argv=None) -> dict:
  """Runs every method in a subprocess and writes the JSON and the plot; returns the JSON."""
  argv = list(sys.argv[1:] if argv is None else argv)
  args = _parser().parse_args(argv)
  if args.worker:
    print(json.dumps(_worker(args)))
    return {}
  if args.attention == "auto":
    args.attention = "cudnn" if jax.devices()[0].platform == "gpu" else "xla"
    argv += ["--attention", args.attention]
  methods = suites.chosen(args.methods, METHODS)
  result = {
    **record.provenance("rso_memory", argv),
    "config": {
      k: getattr(args, k)
      for k in (
        "layers",
        "hidden",
        "ffn",
        "heads",
        "batch",
        "seq",
        "rank",
        "lr",
        "remat",
        "attention",
        "steps",
        "warmup",
      )
    }
    | {"update_every": UPDATE_EVERY, "compute_dtype": "bfloat16", "param_dtype": "float32"},
    "definitions": {
      "temp_size_in_bytes": "activation+gradient memory: what the compiled train step"
      " allocates besides its arguments and outputs (activations kept for the backward,"
      " gradients, update temporaries)",
      "argument_size_in_bytes": "parameters (RSO: also the constant W and P), optimizer"
      " state and input",
      "peak_bytes_in_use": "device allocator's peak over compile-free warm-up + timed steps"
      " (the process holds only this method)",
      "block_residual_bytes": "what one block keeps for its backward, from jax's saved"
      " residuals (traced, before XLA): activations (batch × seq × …) and 2-D weights",
      "step_ms": f"median of {args.steps} synced steps after {args.warmup} warm-up steps",
    },
    "methods": {m: _run_method(m, argv) for m in methods},
  }
  result["ratios_vs_adamw"] = _ratios(result["methods"])
  result["targets"] = {"temp_bytes_ratio_max": 0.8, "step_time_ratio_max": 1.1}
  for method in ("rso", "rso_shared"):
    ratios = result["ratios_vs_adamw"].get(method, {})
    suffix = "" if method == "rso" else "_" + method
    result["targets"]["temp_bytes_met" + suffix] = (
      ratios["temp_bytes"] <= 0.8 if "temp_bytes" in ratios else None
    )
    result["targets"]["step_time_met" + suffix] = (
      ratios["step_time"] <= 1.1 if "step_time" in ratios else None
    )
  out = record.write_json(args.out, result)
  _plot(result, out.with_suffix(".png"))
  print(
    json.dumps(
      {
        "methods": {
          m: {k: v for k, v in r.items() if k != "memory_analysis"} | r.get("memory_analysis", {})
          for m, r in result["methods"].items()
        },
        "ratios_vs_adamw": result["ratios_vs_adamw"],
      },
      indent=1,
    )
  )
  print("wrote", out, "and", out.with_suffix(".png"))
  return result


if __name__ == "__main__":
  main()
