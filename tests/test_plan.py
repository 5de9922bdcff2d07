"""The plan: made once at init, read by the update, the shardings and the checkpoints."""

import json
import pathlib
import warnings
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

import optax_subspace as osub
from optax_subspace import checkpoint
from optax_subspace import projectors

# Tall, wide and square matrices, a scanned stack (batch axis 0) and an attention kernel
# (embed, heads, head_dim) whose columns are two axes.
PARAMS = {
  "tall": jnp.zeros((24, 8)),
  "wide": jnp.zeros((8, 24)),
  "square": jnp.zeros((12, 12)),
  "stack": jnp.zeros((3, 8, 16)),
  "attn": jnp.zeros((16, 2, 4)),
  "bias": jnp.zeros(24),
}
DIMS = {
  "tall": None,
  "wide": None,
  "square": None,
  "bias": None,
  "stack": osub.MatrixDims(rows=1, cols=2),
  "attn": osub.MatrixDims(rows=0, cols=(1, 2)),
}
SPECS = {
  "tall": P("fsdp", None),
  "wide": P(None, "fsdp"),
  "square": P("fsdp"),
  "stack": P(None, "fsdp", None),
  "attn": P("fsdp", None, None),
  "bias": P("fsdp"),
}

CONFIGS = {
  "galore": lambda: osub.galore(1e-2, 4, 2, dims=DIMS),
  # rank 12: the square matrix and the attention kernel are projected at full rank.
  "galore_full_rank": lambda: osub.galore(1e-2, 12, 2, dims=DIMS, on_change="transport"),
  "osd": lambda: osub.online_subspace_descent(1e-2, 4, dims=DIMS),
  "rso": lambda: osub.rso(1e-2, 4, 2, dims=DIMS),
  "grass": lambda: osub.grass(1e-2, 4, 2, dims=DIMS),
  "rows": lambda: osub.project_subspace(
    optax.adam(1e-2), projectors.svd(4, 2), dims=DIMS, side="rows"
  ),
  "cols": lambda: osub.project_subspace(
    optax.adam(1e-2), projectors.random(4, 2), dims=DIMS, side="cols"
  ),
}
# What the shardings and the checkpoint signature were before the plan (commit 21cd102, when
# sharding.py read each leaf's side off its buffers' shapes and checkpoint.py its rank), plus
# the one state field added since: `RandomState.factor` (replicated; in the signature's fields).
GOLDEN = pathlib.Path(__file__).with_name("plan_golden.json")


def _mesh():
  return jax.make_mesh((2, 4), ("data", "fsdp"))


def facts(tx) -> dict:
  """{"state": {state path: spec}, "update": {param path: spec}, "subspaces": signature}."""
  mesh = _mesh()
  as_text = lambda tree: {
    jax.tree_util.keystr(kp): str(s.spec) for kp, s in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
  return {
    "state": as_text(osub.state_shardings(tx, PARAMS, SPECS, dims=DIMS, mesh=mesh)),
    "update": as_text(osub.update_shardings(tx, PARAMS, SPECS, dims=DIMS, mesh=mesh)),
    "subspaces": checkpoint._signature(PARAMS, tx.init(PARAMS))["subspaces"],  # pylint: disable=protected-access
  }


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shardings_and_checkpoint_signature_read_from_the_plan_are_unchanged(name):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # ranks clamped to a side
    got = json.loads(json.dumps(facts(CONFIGS[name]())))
  assert got == json.loads(GOLDEN.read_text())[name]


def test_the_plan_says_how_each_leaf_is_projected():
  with pytest.warns(UserWarning, match="rank 12"):
    state = jax.eval_shape(osub.galore(1e-2, 12, 2, dims=DIMS).init, PARAMS)
  plan = osub.subspace_plan(state)
  leaves = dict(zip(["attn", "bias", "square", "stack", "tall", "wide"], plan.leaves))
  assert not leaves["bias"].projected
  assert leaves["tall"].axis == 1 and leaves["tall"].rank == 8  # columns, clamped to 8
  assert leaves["wide"].axis == 0 and leaves["wide"].low_rank_shape == (8, 24)
  assert leaves["square"].axis == 0  # ties go to the rows
  assert leaves["stack"].batch_axes == (0,) and leaves["stack"].low_rank_shape == (3, 8, 16)
  assert (leaves["attn"].row_axes, leaves["attn"].col_axes) == ((0,), (1, 2))
  assert leaves["attn"].side == 8 and leaves["attn"].other == 16
  # Buckets: matrices of one oriented (s, l, r) refresh as one batch: the tall one (seen
  # transposed) with the wide one, the stack's three with the attention kernel.
  assert plan.buckets[(8, 24, 8)] == (4, 5)
  assert plan.buckets[(8, 16, 8)] == (0, 3)
  assert plan.projected == (0, 2, 3, 4, 5)


def test_the_plan_is_static_and_keeps_the_state_arrays_as_they_were():
  tx = osub.galore(1e-2, 4, 2, dims=DIMS)
  state = tx.init(PARAMS)
  # No arrays of its own: the state's leaves (what a checkpoint holds) are those without it.
  chex.assert_trees_all_equal(
    jax.tree_util.tree_leaves(state),
    jax.tree_util.tree_leaves((state[0]._replace(plan=None),) + tuple(state[1:])),
  )
  # It travels through jit in the state's structure, unchanged.
  _, after = jax.jit(tx.update)(PARAMS, state, PARAMS)
  assert after[0].plan is state[0].plan or after[0].plan == state[0].plan
  assert hash(after[0].plan) == hash(state[0].plan)


class _StateBeforeThePlan(NamedTuple):
  """`ProjectSubspaceState` as checkpoints written before the plan hold it."""

  count: Any
  projectors: Any
  inner: Any
  schedule: Any = None
  refresh_mismatch: Any = None


def test_a_checkpoint_written_before_the_plan_restores_into_a_state_with_it(tmp_path):
  tx = osub.galore(1e-2, 4, 2, dims=DIMS)
  state = tx.update(PARAMS, tx.init(PARAMS), PARAMS)[1]
  old = (_StateBeforeThePlan(*state[0][:5]),) + tuple(state[1:])
  manager = ocp.CheckpointManager(tmp_path)
  manager.save(1, args=ocp.args.Composite(opt_state=ocp.args.StandardSave(old)))
  manager.wait_until_finished()
  target = jax.eval_shape(tx.init, PARAMS)
  restored = manager.restore(
    1, args=ocp.args.Composite(opt_state=ocp.args.StandardRestore(checkpoint._abstract(target)))
  )["opt_state"]  # pylint: disable=protected-access
  chex.assert_trees_all_equal(restored, state)
  assert restored[0].plan == state[0].plan


def test_an_update_of_a_state_without_a_plan_plans_from_the_gradients():
  # A state built without `init`'s plan (plan=None) is planned from the update's tree, the
  # same decisions: the same update.
  tx = osub.galore(1e-2, 4, 2, dims=DIMS)
  g = jax.tree_util.tree_map(
    lambda x: jnp.ones_like(x) + jnp.arange(x.size).reshape(x.shape) % 7, PARAMS
  )
  state = tx.init(PARAMS)
  planless = (state[0]._replace(plan=None),) + tuple(state[1:])
  chex.assert_trees_all_close(
    tx.update(g, state, PARAMS)[0], tx.update(g, planless, PARAMS)[0], rtol=1e-6
  )


def test_subspace_plan_of_a_state_without_subspaces_is_none():
  assert osub.subspace_plan(optax.adam(1e-3).init(PARAMS)) is None
