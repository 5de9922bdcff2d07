"""The rate (TFLOP/s) of the dense products a subspace step runs, separate and batched.

Each product kind of a GaLore step (two per projected matrix) and an OSD step (three, and its
r×r products) on its real shapes, for every matrix of that kind in the tree in one jitted call:
as separate products on separate arrays (as `project_subspace` runs separate leaves) and as one
batched product (a scanned model's stacked kernels), in float32 at JAX's default precision and in
bfloat16 with float32 accumulation. Summed per method: the products' floor of one step over the
tree, what the steady-step target (≤ 1.5× AdamW's update) leaves for the rest. JSON and a PNG.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

from benchmarks import optimizer_step
from benchmarks import record
from benchmarks import suites


# (name, A as stored, B, A read transposed, count in the tree) for s = d_model, l = the kept
# side, r = rank, in the layouts `project_subspace` runs them: rows projected (q, k, v, o, gate,
# up; l padded to a multiple of 8): R = PᵀG, back P·N, OSD's G·Rᵀ; columns projected
# (down, an (l, s) kernel) in the leaf's own layout: R = G·P, back N·Pᵀ, OSD's Gᵀ·R. Then OSD's
# per-matrix r×r work (`online_pca_gradient`, A = G·Rᵀ): PᵀP, Pᵀ·A and two products of an s×r
# matrix with an r×r one.
def product_kinds(d, ffn, layers, rank, **_):
  s, r, lf = d, rank, ffn + (-ffn % 8)
  square, wide, every = 4 * layers, 2 * layers, 7 * layers
  return [
    ("project PᵀG, square", (s, r), (s, s), True, square),
    ("back P·N, square", (s, r), (r, s), False, square),
    ("osd G·Rᵀ, square", (s, s), (s, r), False, square),
    ("project PᵀG, gate/up", (s, r), (s, lf), True, wide),
    ("back P·N, gate/up", (s, r), (r, lf), False, wide),
    ("osd G·Rᵀ, gate/up", (s, lf), (lf, r), False, wide),
    ("project G·P, down", (ffn, s), (s, r), False, layers),
    ("back N·Pᵀ, down", (ffn, r), (r, s), False, layers),
    ("osd Gᵀ·R, down", (ffn, s), (ffn, r), True, layers),
    ("osd PᵀP and Pᵀ·A", (s, r), (s, r), True, 2 * every),
    ("osd P·(r×r), twice", (s, r), (r, r), False, 2 * every),
  ]


def time_product(a_shape, b_shape, transpose_a, count, batched, dtype, reps):
  """ms per call and TFLOP/s of `count` matmuls A·B (Aᵀ·B), float32 accumulation.

  `batched`: one batched matmul on (count, …) operands; else `count` separate matmuls on
  separate arrays in one jitted call (back to back on the device, as an update runs them).
  """
  key = jax.random.PRNGKey(0)
  draw = lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(dtype)
  dot = lambda a, b: jnp.matmul(
    jnp.swapaxes(a, -1, -2) if transpose_a else a, b, preferred_element_type=jnp.float32
  )
  if batched:
    a = draw(key, (count,) + a_shape)
    b = draw(jax.random.fold_in(key, 1), (count,) + b_shape)
    fn = jax.jit(dot)
  else:
    a = [draw(jax.random.fold_in(key, 2 * i), a_shape) for i in range(count)]
    b = [draw(jax.random.fold_in(key, 2 * i + 1), b_shape) for i in range(count)]
    fn = jax.jit(lambda a, b: [dot(x, y) for x, y in zip(a, b)])
  jax.block_until_ready(fn(a, b))  # compiled and warm
  ms = optimizer_step.time_pipelined(lambda a, b, _: (a, b, fn(a, b)), (a, b, None), reps)[0]
  flop = 2 * count * a_shape[0] * a_shape[1] * b_shape[1]
  del a, b
  return ms, flop / (ms * 1e-3) / 1e12


def main(argv=None) -> dict:
  args = suites.script_parser(
    __doc__, size=["1b", *optimizer_step.SIZES], reps=20, dtypes="float32,bfloat16"
  ).parse_args(argv)
  cfg = optimizer_step.SIZES[args.size]
  result = {
    **record.provenance("product_rates", argv),
    "size": args.size,
    "config": cfg,
    "reps": args.reps,
    "timing": "ms per call of `reps` calls in a row with one sync, median of 3 rounds;"
    " float32 at JAX's default matmul precision",
    "rows": [],
    "floor_ms": {},
  }
  out = pathlib.Path(args.out)
  for dtype_name in args.dtypes.split(","):
    dtype = jnp.dtype(dtype_name)
    for name, a_shape, b_shape, transpose_a, count in product_kinds(**cfg):
      row = {
        "product": name,
        "a": list(a_shape),
        "b": list(b_shape),
        "transpose_a": transpose_a,
        "count": count,
        "dtype": dtype_name,
      }
      row["separate_ms"], row["separate_tflops"] = time_product(
        a_shape, b_shape, transpose_a, count, False, dtype, max(2, args.reps // 4)
      )
      row["batched_ms"], row["batched_tflops"] = time_product(
        a_shape, b_shape, transpose_a, count, True, dtype, max(2, args.reps // 4)
      )
      result["rows"].append(row)
      print(
        f"{dtype_name:<9} {name:<24} separate {row['separate_ms']:8.3f} ms"
        f" {row['separate_tflops']:6.1f}"
        f" TFLOP/s   batched {row['batched_ms']:8.3f} ms {row['batched_tflops']:6.1f}"
        f" TFLOP/s",
        flush=True,
      )
      record.write_json(out, result)
    rows = [r for r in result["rows"] if r["dtype"] == dtype_name]
    galore = [r for r in rows if r["product"].startswith(("project", "back"))]
    for layout, key in (("separate", "separate_ms"), ("batched", "batched_ms")):
      result["floor_ms"][f"galore_{dtype_name}_{layout}"] = sum(r[key] for r in galore)
      result["floor_ms"][f"osd_{dtype_name}_{layout}"] = sum(r[key] for r in rows)
  record.write_json(out, result)
  _plot(result, out.with_suffix(".png"))
  return result


def _plot(result, path):
  fig, ax = record.subplots(figsize=(11, 5))
  dtypes = sorted({r["dtype"] for r in result["rows"]})
  names = [r["product"] for r in result["rows"] if r["dtype"] == dtypes[0]]
  record.bars(
    ax,
    names,
    {
      f"{dtype}, {layout}": [r[f"{layout}_tflops"] for r in result["rows"] if r["dtype"] == dtype]
      for dtype in dtypes
      for layout in ("separate", "batched")
    },
    f"Subspace-step products, LLaMA-{result['size']} shapes ({result['device']})",
    "TFLOP/s",
  )
  record.save(fig, path, dpi=110)
