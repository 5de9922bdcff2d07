"""Suite `update_identity`: does this tree give the same updates as another commit?

    python -m benchmarks run --suite update_identity -- --baseline 21cd102 --size 60m --out X.json

A refactor of the library that should not change its arithmetic is checked here: each method
runs the same steps (same parameters, same synthetic gradients, a refresh at steps 0 and 2) in
two worker processes on this machine, one importing `optax_subspace` from this working tree, one
from a checkout of `--baseline` (a temporary `git worktree`). Per method, step and leaf the JSON
records whether the updates are bitwise identical (SHA-256 of their bytes) and, where not, the
largest difference over a strided sample of the leaf, relative to the sample's largest value.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks import record, suites

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 3
UPDATE_EVERY = 2  # refreshes at steps 0 and 2
SAMPLE = 4096  # entries compared per leaf where the bytes differ
METHODS = ("galore", "galore_transport_bf16", "osd", "rso", "grass")


def _transformations(rank: int) -> dict:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  (the worker's own import)
  import optax_subspace as osub  # pylint: disable=g-import-not-at-top

  from benchmarks.optimizer_step import PROJECTED  # pylint: disable=g-import-not-at-top

  lr = 1e-3
  return {
    "galore": osub.galore(lr, rank, UPDATE_EVERY, mask=PROJECTED),
    "galore_transport_bf16": osub.galore(
      lr, rank, UPDATE_EVERY, mask=PROJECTED, on_change="transport", projection_dtype=jnp.bfloat16
    ),
    "osd": osub.online_subspace_descent(lr, rank, mask=PROJECTED),
    "rso": osub.rso(lr, rank, UPDATE_EVERY, mask=PROJECTED),
    "grass": osub.grass(lr, rank, UPDATE_EVERY, mask=PROJECTED),
  }


def worker(size: str, out: str) -> None:
  """Runs every method's steps with the `optax_subspace` on sys.path; writes hashes + samples."""
  import jax  # pylint: disable=g-import-not-at-top

  from benchmarks import optimizer_step  # pylint: disable=g-import-not-at-top

  shapes = optimizer_step.llama_shapes(**optimizer_step.SIZES[size])
  params = optimizer_step.make_tree(shapes, 0, optimizer_step.synthetic_gradient)
  grads = [
    optimizer_step.make_tree(shapes, 1 + t, optimizer_step.synthetic_gradient) for t in range(STEPS)
  ]
  hashes, samples = {}, {}
  for name, tx in _transformations(optimizer_step.SIZES[size]["rank"]).items():
    state, update = tx.init(params), jax.jit(tx.update)
    for t in range(STEPS):
      updates, state = update(grads[t], state, params)
      for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        key = f"{name}/{t}/{jax.tree_util.keystr(path)}"
        u = np.asarray(u)
        hashes[key] = hashlib.sha256(u.tobytes()).hexdigest()
        samples[key] = u.reshape(-1)[:: max(1, u.size // SAMPLE)].astype(np.float64)
  np.savez(out, **samples)
  pathlib.Path(out + ".json").write_text(json.dumps(hashes))


def _run_worker(tree: pathlib.Path, size: str, out: pathlib.Path) -> str:
  """Runs `worker` with `optax_subspace` imported from `tree` and everything else from here.

  Only the package is linked into a directory of its own ahead of this repository on the path,
  so the baseline needs none of this suite's code. Returns the package's file, as imported.
  """
  link = out.parent / f"{out.stem}_path"
  link.mkdir()
  (link / "optax_subspace").symlink_to(tree / "optax_subspace", target_is_directory=True)
  env = dict(os.environ, PYTHONPATH=f"{link}{os.pathsep}{ROOT}")
  code = (
    "import os, sys, optax_subspace; from benchmarks import update_identity as u; "
    "u.worker(sys.argv[1], sys.argv[2]); print(os.path.realpath(optax_subspace.__file__))"
  )
  done = subprocess.run(
    [sys.executable, "-c", code, size, str(out)],
    check=True,
    env=env,
    cwd=out.parent,
    capture_output=True,
    text=True,
  )
  return done.stdout.strip().splitlines()[-1]


def compare(current: tuple[dict, dict], baseline: tuple[dict, dict]) -> dict:
  """Per method: leaves bitwise identical, and the largest relative sample difference."""
  (hashes, samples), (base_hashes, base_samples) = current, baseline
  if hashes.keys() != base_hashes.keys():
    raise ValueError("the two trees' updates have different leaves or methods")
  out = {}
  for key in hashes:
    method = key.split("/", 1)[0]
    row = out.setdefault(method, {"leaves": 0, "bitwise_identical": 0, "max_rel_diff": 0.0})
    row["leaves"] += 1
    if hashes[key] == base_hashes[key]:
      row["bitwise_identical"] += 1
      continue
    a, b = samples[key], base_samples[key]
    scale = max(np.max(np.abs(b)), np.finfo(np.float32).tiny)
    row["max_rel_diff"] = max(row["max_rel_diff"], float(np.max(np.abs(a - b)) / scale))
  return out


def main(argv=None):
  args = suites.script_parser(
    __doc__,
    baseline=("HEAD", "the commit to compare against (any git revision)"),
    size=("60m", "the LLaMA tree (benchmarks/optimizer_step.py SIZES)"),
    rtol=(1e-6, "largest relative sample difference still called the same"),
  ).parse_args(argv)
  from benchmarks import optimizer_step  # pylint: disable=g-import-not-at-top

  if args.size not in optimizer_step.SIZES:
    raise ValueError(f"unknown size {args.size!r}; choose from {', '.join(optimizer_step.SIZES)}")
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    base = tmp / "baseline"
    subprocess.run(
      ["git", "worktree", "add", "--detach", "-q", str(base), args.baseline], check=True, cwd=ROOT
    )
    try:
      runs, imported = [], {}
      for tree, name in ((ROOT, "current"), (base, "baseline")):
        imported[name] = _run_worker(tree, args.size, tmp / f"{name}.npz")
        if not imported[name].startswith(str(tree.resolve())):
          raise RuntimeError(f"the {name} worker imported {imported[name]}, not its tree's")
        runs.append(
          (json.loads((tmp / f"{name}.npz.json").read_text()), dict(np.load(tmp / f"{name}.npz")))
        )
    finally:
      subprocess.run(["git", "worktree", "remove", "--force", str(base)], check=True, cwd=ROOT)
    baseline_commit = subprocess.run(
      ["git", "rev-parse", "--short", args.baseline],
      check=True,
      cwd=ROOT,
      capture_output=True,
      text=True,
    ).stdout.strip()
  methods = compare(*runs)
  for row in methods.values():
    row["same"] = row["bitwise_identical"] == row["leaves"] or row["max_rel_diff"] <= args.rtol
  result = {
    **record.provenance("update_identity", argv),
    "baseline": baseline_commit,
    "size": args.size,
    "steps": STEPS,
    "update_every": UPDATE_EVERY,
    "rtol": args.rtol,
    "methods": methods,
    "all_same": all(r["same"] for r in methods.values()),
  }
  record.write_json(args.out, result)
  for name, row in methods.items():
    print(
      f"{name:24s} {row['bitwise_identical']}/{row['leaves']} leaf updates bitwise identical,"
      f" max relative difference {row['max_rel_diff']:.2e}"
    )
  return result
