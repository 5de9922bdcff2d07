"""Where the time of a subspace step goes: projection layouts on the 1B tree.

The bare round trip W ← W + P·(PᵀG) on the 168 attention/MLP matrices of LLaMA-1B (rank 512,
float32) in the layouts `project_subspace` could batch its work in: per_matrix (a product pair
each), per_matrix_highest (at Precision.HIGHEST: is TF32 in use?), stacked_inputs (one shape's
matrices already stacked: a scanned model), stack_then_batch (concatenated by shape each step),
per_matrix_with_cond (plus a never-taken lax.cond refresh).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from benchmarks import optimizer_step
from benchmarks import record
from benchmarks import suites

SHAPES = [(2048, 2048)] * 96 + [(2048, 5461)] * 72  # (s, l): q,k,v,o; gate,up,down
RANK = 512


def main(argv=None):
  args = suites.script_parser(__doc__, scale=1).parse_args(argv)  # --scale: sizes divided by it
  shapes = [(s // args.scale, l // args.scale) for s, l in SHAPES]
  r = RANK // args.scale
  key = jax.random.PRNGKey(0)
  mk = lambda i, shape: jax.random.normal(jax.random.fold_in(key, i), shape)
  g = [mk(i, sh) for i, sh in enumerate(shapes)]
  w = [mk(1000 + i, sh) for i, sh in enumerate(shapes)]
  p = [jnp.linalg.qr(mk(2000 + i, (sh[0], r)))[0] for i, sh in enumerate(shapes)]

  def round_trip(p, g, precision=None):
    low = jnp.einsum("sr,sl->rl", p, g, precision=precision)
    return jnp.einsum("sr,rl->sl", p, low, precision=precision)

  def per_matrix(w, p, g, precision=None):
    return [wi + round_trip(pi, gi, precision) for wi, pi, gi in zip(w, p, g)]

  def with_cond(w, p, g):
    def refresh(p):
      return [jnp.linalg.eigh(gi @ gi.T)[1][:, :r] for gi in g]

    p = jax.lax.cond(jnp.int32(1) == 0, refresh, lambda p: p, p)
    return per_matrix(w, p, g)

  index = {}
  for i, sh in enumerate(shapes):  # matrices grouped by their (s, l)
    index.setdefault(sh, []).append(i)

  def groups(xs):
    return [[xs[i] for i in members] for members in index.values()]

  def stacked(ws, ps, gs):
    out = []
    for wb, pb, gb in zip(ws, ps, gs):
      low = jnp.einsum("bsr,bsl->brl", pb, gb)
      out.append(wb + jnp.einsum("bsr,brl->bsl", pb, low))
    return out

  def stack_then_batch(w, p, g):
    ws, ps, gs = (groups(x) for x in (w, p, g))
    out = stacked(
      [jnp.stack(x) for x in ws], [jnp.stack(x) for x in ps], [jnp.stack(x) for x in gs]
    )
    return [x for block in out for x in block]

  results = {
    **record.provenance("projection_layouts", argv),
    "jax": jax.__version__,
    "rank": r,
    "n_matrices": len(shapes),
    "dtype": "float32",
  }
  donate = dict(donate_argnums=(0,))
  cases = {
    "per_matrix": (jax.jit(per_matrix, **donate), (w, p, g)),
    "per_matrix_highest": (
      jax.jit(lambda w, p, g: per_matrix(w, p, g, jax.lax.Precision.HIGHEST), **donate),
      (w, p, g),
    ),
    "per_matrix_with_cond": (jax.jit(with_cond, **donate), (w, p, g)),
    "stack_then_batch": (jax.jit(stack_then_batch, **donate), (w, p, g)),
    "stacked_inputs": (
      jax.jit(stacked, **donate),
      tuple([jnp.stack(x) for x in groups(t)] for t in (w, p, g)),
    ),
  }
  for name, (fn, a) in cases.items():
    a = jax.tree_util.tree_map(jnp.copy, a)
    # w ← fn(w, p, g), w donated and threaded through, 30 synced calls after a warm-up call.
    ms = optimizer_step.time_calls(lambda w, *pg: (fn(w, *pg), *pg), a, 30, warmup=1)[0]
    results[f"{name}_ms"] = ms
    print(f"{name:<24} {ms:8.2f} ms", flush=True)
  flops = sum(4 * s * l * r for s, l in shapes)
  results["tflops_per_round_trip"] = flops / 1e12
  record.write_json(args.out, results)
  return results
