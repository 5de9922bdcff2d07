"""How much of GaLore's exact refresh a warm-started one keeps, on the gradients of a real run.

    python -m benchmarks run --suite refresh_energy -- --size 9m --steps 1001 --out X.json

The LLaMA example trains with `galore` (exact refreshes every --update-every steps; the example's
schedule, rank hidden/4, seed 0) on --corpus. At each refresh step t = T, 2T, … every projected
kernel's gradient G_t, oriented with its smaller side first as GaLore projects it, is compared
with the bases a refresh could give it, each scored by the fraction of the exact top-r energy it
captures, ‖PᵀG_t‖² / ‖U_tᵀG_t‖² (U_t: the top-r left singular vectors, what the exact refresh
stores):
- ``stale``: U_{t−T}, the basis kept without a refresh;
- ``warm<k>``: `projectors.svd(..., warm_iterations=k)`'s refresh, k rounds of subspace iteration
  from the basis its own previous refresh left (the exact one at step 0, then its own chain), as
  a warm-started run would hold it;
- ``warm<k>_p<p>`` (--oversample p > 0): the same with ``warm_oversample=p``, k rounds on r + p
  columns (p from a Gaussian sketch of G, drawn from the step as the projector draws it) and the
  top r of them kept.
The run itself follows the exact refreshes, so every basis is scored on the same gradients.
JSON: one record per refresh and kernel, and per refresh and basis the smallest and the mean
fraction over the kernels; the PNG plots both against the step.
"""

from __future__ import annotations

import importlib
import pathlib
import re

import jax
import numpy as np
from flax import nnx

from benchmarks import optimizer_step
from benchmarks import record
from benchmarks import suites
from examples.llama import config
from examples.llama import data
from examples.llama import model
from examples.llama import optimizers
from examples.llama import train

# `optax_subspace.projectors.svd` is the projector function; the module holds the refreshes.
svd_refreshes = importlib.import_module("optax_subspace.projectors.svd")


def _parser():
  return suites.script_parser(
    __doc__,
    size=("9m", "the example's --model-size"),
    steps=(1001, "training steps; refreshes at T, 2T, … below it are scored"),
    update_every=(200, "T, steps between refreshes"),
    batch=16,
    seq=128,
    corpus=("sotu", "the example's --corpus"),
    data_dir=("", "the example's --data-dir (its token cache)"),
    iterations=("1,2,3", "the warm refreshes' rounds k, comma-separated"),
    oversample=("0", "the warm refreshes' extra columns p, comma-separated (0: none)"),
  )


def projected_kernels(grads: dict, rank: int) -> dict:
  """path -> gradient of each kernel the example's galore projects (rank below its sides)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
    name = optimizers.path_string(path)
    if re.search(optimizers.PROJECTED, name) and leaf.ndim == 2 and min(leaf.shape) > rank:
      out[name] = leaf
  return out


def chain_name(k: int, p: int) -> str:
  """The basis name of the warm chain with k rounds and p extra columns."""
  return f"warm{k}" if not p else f"warm{k}_p{p}"


def _scorer(rank: int, chains: tuple[tuple[int, int], ...]):
  @jax.jit
  def score(g, exact_before, warm_before, step):
    """(fractions, the exact basis, each warm chain's new basis) for one gradient."""
    g = optimizer_step.oriented(g)
    exact = svd_refreshes.top_left_singular_vectors(g, rank)
    best = optimizer_step.captured(exact, g)
    fractions = {"stale": optimizer_step.captured(exact_before, g) / best}
    key = svd_refreshes.warm_sketch_key(step)  # the Ω `projectors.svd` draws at this step
    warm = {}
    for k, p in chains:
      warm[k, p] = svd_refreshes.warm_left_singular_vectors(g, warm_before[k, p], k, p, key)
      fractions[chain_name(k, p)] = optimizer_step.captured(warm[k, p], g) / best
    return fractions, exact, warm

  return score


def summary(rows: list[dict], bases: list[str]) -> list[dict]:
  """Per refresh step, each basis' smallest and mean fraction over the kernels."""
  out = []
  for step in sorted({r["step"] for r in rows}):
    at = [r for r in rows if r["step"] == step]
    entry = {"step": step, "kernels": len(at)}
    for b in bases:
      values = [r[b] for r in at]
      entry[b] = {"min": min(values), "mean": float(np.mean(values))}
    out.append(entry)
  return out


def _plot(result: dict, path) -> None:
  fig, ax = record.subplots(1, 1, figsize=(7, 4))
  for b in result["bases"]:
    steps = [e["step"] for e in result["summary"]]
    line = ax.plot(steps, [e[b]["mean"] for e in result["summary"]], marker="o", label=f"{b} mean")
    ax.plot(steps, [e[b]["min"] for e in result["summary"]], ls="--", color=line[0].get_color())
  ax.set_xlabel("refresh step")
  ax.set_ylabel("fraction of the exact top-r energy")
  ax.set_title(f"LLaMA-{result['config']['size']}: refreshes vs the exact one (dashed: min)")
  ax.legend(fontsize=8)
  record.save(fig, path)


def main(argv=None):
  args = _parser().parse_args(argv)
  iterations = tuple(int(k) for k in args.iterations.split(",") if k)
  if not iterations or min(iterations) < 1:
    raise SystemExit("--iterations: want positive integers, e.g. 1,2,3")
  try:
    oversample = tuple(int(p) for p in args.oversample.split(",") if p)
  except ValueError:
    oversample = (-1,)
  if not oversample or min(oversample) < 0:
    raise SystemExit("--oversample: want integers ≥ 0, e.g. 0,64")
  chains = tuple((k, p) for p in oversample for k in iterations)
  if args.update_every < 1 or args.steps <= args.update_every:
    raise SystemExit("--steps must exceed --update-every (≥ 1): no refresh after step 0 to score")
  cfg = config.TrainConfig(
    model_size=args.size,
    optimizer="galore",
    steps=args.steps,
    update_every=args.update_every,
    batch_size=args.batch,
    seq_len=args.seq,
    corpus=args.corpus,
    data_dir=args.data_dir,
    run_dir="unused",  # nothing is written: this loop is not the example's `train`
  )
  try:
    cfg.validate()
  except config.ConfigError as error:
    raise SystemExit(f"refresh_energy: {error}") from None
  dataset = data.load_dataset(cfg)
  mcfg = config.model_config(cfg.model_size, dataset.tokenizer.vocab_size)
  tx = optimizers.build(cfg)
  graphdef, state = nnx.split(model.Llama(mcfg, nnx.Rngs(cfg.seed)))
  params = nnx.to_pure_dict(state)
  opt_state = tx.init(params)
  train_step = train.make_train_step(graphdef, tx)
  loss_of = lambda p, batch: train._loss(p, graphdef, batch)  # pylint: disable=protected-access
  gradient = jax.jit(jax.grad(loss_of))
  rank = cfg.effective_rank()
  bases = ["stale"] + [chain_name(k, p) for k, p in chains]
  score = _scorer(rank, chains)
  exact_basis = jax.jit(
    lambda g: svd_refreshes.top_left_singular_vectors(optimizer_step.oriented(g), rank)
  )

  batches = dataset.train_batches(cfg.batch_size, 0)
  exact, warm, rows = {}, {}, []
  for step in range(cfg.steps):
    batch = next(batches)
    if step % cfg.update_every == 0:
      for name, g in projected_kernels(gradient(params, batch), rank).items():
        if step == 0:  # every chain starts from the exact refresh of step 0
          exact[name] = exact_basis(g)
          warm[name] = {chain: exact[name] for chain in chains}
          continue
        fractions, exact[name], warm[name] = score(g, exact[name], warm[name], step)
        rows.append({"step": step, "kernel": name, **{b: float(v) for b, v in fractions.items()}})
      if step:
        print(summary([r for r in rows if r["step"] == step], bases)[0], flush=True)
    due = optimizers.refresh_due(cfg, opt_state, step)
    params, opt_state, loss = train_step(params, opt_state, batch, None, due)

  result = {
    **record.provenance("refresh_energy", argv),
    "config": {
      "size": args.size,
      "steps": args.steps,
      "update_every": args.update_every,
      "batch": args.batch,
      "seq": args.seq,
      "corpus": args.corpus,
      "rank": rank,
      "iterations": list(iterations),
      "oversample": list(oversample),
    },
    "final_loss": float(loss),
    "bases": bases,
    "summary": summary(rows, bases),
    "rows": rows,
  }
  png = pathlib.Path(args.out).with_suffix(".png")
  result["png"] = png.name
  record.write_json(args.out, result)
  _plot(result, png)
  print("wrote", args.out, "and", png)
  return result
