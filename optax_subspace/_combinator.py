"""`project_subspace`: run any Optax transformation in a low-rank subspace.

The transformation is a short pipeline (`_pipeline`) over a plan
(`_plan`): `init` makes the plan and the projector states; each `update`
runs refresh (when due) → project → inner → back-project → advance, with
`on_change` (`_transport`) applied to the inner state wherever a basis moved.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_subspace import _chunks
from optax_subspace import _leaves
from optax_subspace import _pipeline
from optax_subspace import _plan
from optax_subspace import _stages
from optax_subspace import _transport
from optax_subspace._transport import FIRST_MOMENT_FIELDS  # noqa: F401 (public)
from optax_subspace._transport import SECOND_MOMENT_FIELDS  # noqa: F401 (public)
from optax_subspace.projectors import _base

ON_CHANGE = ("keep", "reset", "transport")
# The dense products with G run on rows padded with zeros to a multiple of
# this many elements. GPU tensor-core GEMMs need 16-byte-aligned rows: an
# (s, l) float32 gradient with l % 4 != 0 (bf16: l % 8) gets an align-1
# kernel; at LLaMA-1B's ffn 5461 those ran at ~80 TFLOP/s against ~120-300
# for aligned shapes on an H200 (benchmarks/results/profile_update_h200.json).
# Zero columns project to zero columns and are cut off after the
# back-projection, so no value changes; the cost is one copy of such a
# gradient. 1 turns the padding off. Read (with the one below) each time
# `update` is traced and handed to its `_pipeline.Pipeline`.
PRODUCT_ALIGNMENT = 8
# The per-step r×r work of a stepped projector (OSD's ∇P) runs stacked over the
# leaves of one (s, r), so that 168 separate LLaMA-1B matrices make one batch
# and not 168 calls of a few tiles each. A leaf that is already a batch of at
# least this many matrices (a scanned model's stacked kernel) runs its own:
# stacking it would only copy its P and inputs.
OWN_BATCH_MATRICES = 8
# The dense products with G and with N (R = PᵀG, P·N) of the matrices of fewer
# than this many elements (s·l) run as one batched product per (s, l, r), their
# operands concatenated, rather than one per leaf: on a GPU a small matrix's
# product is a GEMM of a few µs whatever its size, and LLaMA-60M's update ran 112
# of them, launch-bound. Stacked, LLaMA-60M's whole train step on an H100 ran at 0.965×
# AdamW's tokens/s for GaLore (0.940 per leaf) and 0.967× for RSO (0.941), back to back
# (benchmarks/results/train_step_60m_b64_h100_a2ce464_stacked_products.json). Larger
# matrices (every one of LLaMA-350M's and 1B's) keep their own products: stacked, LLaMA-1B's
# update was 8.5 ms slower for the copies (docs/benchmarks.md, "R = PᵀG stacked per
# bucket"). 0: every product per leaf. Read each time `update` is traced.
STACKED_PRODUCT_ELEMENTS = 1 << 20
# Whether those small matrices' projector steps (OSD's Adam step on P, `Advance.apply`) also
# run stacked, one call per (s, r), rather than one per leaf; their inputs (G·GᵀP and ‖G‖²) run
# stacked either way, with the products. Stacked (80697b9), LLaMA-60M's update cuts the stacked
# P and moments back per leaf every step (225 copies on an H100, 0.35 ms); per leaf, its whole
# OSD step ran at 0.949 and 0.956× AdamW's tokens/s back to back against 0.929 and 0.927
# stacked, side by side on one H100 (benchmarks/results/train_step_60m_b64_h100_523014e*.json,
# "osd_per_leaf_steps"). Off since af9fd14; True runs 80697b9's program, for comparison.
STACK_SMALL_PROJECTOR_STEPS = False
# Whether the bases a projector computes in one vmapped call per (s, r) (`batch_basis`: RSO's
# regenerated P, APOLLO's Gaussian draw) are held by an optimization barrier once cut per leaf.
# Unheld, XLA on a GPU folds each leaf's slice of the stacked bases into the product that reads
# it (a dynamic-slice fusion), and it does not autotune the cuBLAS GEMM inside such a fusion:
# all 168 of APOLLO's products on the 1B tree ran on cuBLAS's heuristic choice, Ampere
# kernels (benchmarks/results/hlo/profile_update_1b_h100_e556ac1_apollo_steady.hlo.txt.gz),
# as did RSO's. None: each projector's `hold_basis` (`projectors.random` holds its Haar and
# its Gaussian P); True or False: every computed basis, for measurements. Read, as the
# settings above, each time `update` is traced.
HOLD_COMPUTED_BASES = None
# Whether the computed bases (RSO's, APOLLO's) of the matrices whose products run stacked
# (STACKED_PRODUCT_ELEMENTS) are drawn in those products' stacks and left uncut, so that the
# products read the drawn stack itself, rather than cut and held per leaf (58 copies per update
# of LLaMA-60M on an H100) and concatenated again for the stacked products. On: LLaMA-60M's RSO
# update 0.995 ms of kernels in 168 launches against 1.080 ms in 222 (profile_update_60m_h100_
# dbef545.json); its whole step 0.970 and 0.969× AdamW's tokens/s back to back against 0.958
# and 0.967, side by side on one H100 (train_step_60m_b64_h100_523014e*.json, a gain inside
# the run-to-run spread of ~0.01). On since af9fd14.
BASES_AS_PRODUCT_STACKS = True
# Whether the leaves projected on their columns (stored (l, s): LLaMA's MLP down projections)
# whose products run stacked form stacks of their own per (s, l, r) in that stored layout, the
# products reading each matrix swapped (which XLA folds into the GEMM) and landing as stored,
# rather than joining their bucket's (s, l) stack transposed (since a83aa76). Joined, LLaMA-60M's
# GaLore and OSD updates transpose the 8 down projections' G into the stack, their inner moments
# back to the stored (1376, 128) and P·N into W's layout, and copy those adds into the donated W:
# 40 launches of 178 (GaLore) and 254 (OSD), counted without a GPU (docs/benchmarks.md,
# "Kernels counted without a GPU"). On: GaLore's 60M update 0.963 ms of kernels in 170
# launches against 1.031 ms in 179 on an H100 (profile_update_60m_h100_04c3fd3.json); its whole
# 60M step 0.963 and 0.972× AdamW's tokens/s back to back against 0.960 and 0.961, side by side
# in two runs (train_step_60m_b64_h100_04c3fd3*.json); OSD's within the runs' spread. LLaMA-350M
# and 1B have no such stacks: their programs are the same either way. On since 04c3fd3's runs.
COLUMNS_STACKED_AS_STORED = True


class ProjectSubspaceState(NamedTuple):
  """State of `project_subspace`.

  Attributes:
    count: steps taken (int32); projectors refresh on it.
    projectors: a tree like the parameters: each projected leaf holds its
      projector's state with the leaf's batch axes leading; other leaves hold
      `optax.MaskedNode()`.
    inner: the inner transformation's state, allocated on the low-rank
      shapes of the projected leaves and the full shapes of the others.
    schedule: the projector's `projectors.RefreshSchedule` (a static pytree:
      no leaves), or None for a projector that declares none; what
      `refresh_due` answers from.
    refresh_mismatch: int32, -1, or the first step at which a
      ``subspace_refresh`` passed to `update` disagreed with the projector's
      schedule (`refresh_due` raises on it).
    plan: the `SubspacePlan` made at `init`, what the update,
      `state_shardings`, `update_shardings` and the checkpoint signature
      read. Static: part of the tree structure, not a child of it, so the
      state flattens to the five fields above, keyed as before the plan
      existed, and checkpoints written before it restore.
    limiter: a tree like the parameters: each projected leaf holds the
      norm-growth limiter's previous norm of each of its matrices (float32,
      the leaf's batch shape), for a `residual` or `output` that limits
      (Fira, APOLLO); None otherwise. A None limiter is no child of the
      tree: such a state flattens to the same five fields as before the
      limiter existed, so every checkpoint written before it restores.
  """

  count: jax.Array
  projectors: Any
  inner: optax.OptState
  schedule: Any = None
  refresh_mismatch: Any = None
  limiter: Any = None
  plan: Any = None


def _state_children(s):
  """The fields a state flattens to: the limiter only where it has one."""
  fields = ProjectSubspaceState._fields[:-1]
  return fields if s.limiter is not None else fields[:-1]


jax.tree_util.register_pytree_with_keys(
  ProjectSubspaceState,
  lambda s: (
    tuple((jax.tree_util.GetAttrKey(f), getattr(s, f)) for f in _state_children(s)),
    s.plan,
  ),
  lambda plan, children: ProjectSubspaceState(*children, plan=plan),
  flatten_func=lambda s: (tuple(getattr(s, f) for f in _state_children(s)), s.plan),
)


def _restore_structure(pstate, template):
  """Gives a projector state back the container types `init` made.

  A state whose containers were rebuilt on the way back in (a NamedTuple as
  a dict keyed by field name, as a restore without a target or
  `nnx.state` makes it) is matched by key-path names. Under `nnx.Optimizer`
  this no longer happens (`projector_treedef`), so no step traces twice.
  """
  want, treedef = jax.tree_util.tree_flatten_with_path(template)
  if jax.tree_util.tree_structure(pstate) == treedef:
    return pstate
  got = {_leaves.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(pstate)[0]}
  names = [_leaves.path_str(p) for p, _ in want]
  if sorted(got) != sorted(names):
    raise ValueError(
      f"projector state has fields {sorted(got)}, expected {sorted(names)}:"
      " was the state made by another projector?"
    )
  return jax.tree_util.tree_unflatten(treedef, [got[n] for n in names])


def projector_treedef(tree):
  """The structure `ProjectSubspaceState.projectors` follows: `tree`'s, with
  no Flax NNX `Variable` around a leaf.

  A projector state placed inside the parameter's `nnx.Param` would be a
  container inside a Variable, which `nnx.Optimizer` hands back as an
  `nnx.State` after the first update (it rebuilds every container inside a
  Variable): the state's structure would change once, and a jitted train
  step would compile twice. Outside any Variable, only its arrays are
  wrapped (`nnx.Optimizer` gives each its own `OptArray`) and every
  container keeps its type.
  """
  return jax.tree_util.tree_structure(_leaves.unwrap_variables(tree))


@functools.lru_cache(maxsize=None)
def _constant_keys(i: int, num_matrices: int) -> jax.Array:
  """`matrix_keys(i, num_matrices)` as a constant, derived once per process.

  Derived inside the jitted `init`, the keys compiled as one threefry program per leaf (RSO's
  and APOLLO's init on the LLaMA-1B tree: 15-17 s of CPU compile). Cached, because every
  update's trace reads the states' structure through `_init_projector` (`eval_shape`).
  """
  with jax.ensure_compile_time_eval():
    return _base.matrix_keys(i, num_matrices)


def _init_projector(projector, i, leaf: _leaves.LeafPlan):
  """States of leaf i's matrices, batch axes leading; keys from i."""
  keys = _constant_keys(i, leaf.num_matrices)
  one = lambda key: projector.init(leaf.side, leaf.other, leaf.rank, key)
  return jax.tree_util.tree_map(
    lambda y: y.reshape(leaf.batch_shape + y.shape[1:]), jax.vmap(one)(keys)
  )


def _projector_states(projector, plan, updates, tree) -> dict:
  """{leaf: projector state} of the projected leaves, in `init`'s containers."""
  flat = projector_treedef(updates).flatten_up_to(tree)
  return {
    i: _restore_structure(
      flat[i], jax.eval_shape(functools.partial(_init_projector, projector, i, plan[i]))
    )
    for i in plan.projected
  }


def _limiter_states(plan, updates, state) -> dict:
  """{leaf: the limiter's previous norms} of the projected leaves, or {}."""
  if state.limiter is None:
    return {}
  flat = projector_treedef(updates).flatten_up_to(state.limiter)
  return {i: flat[i] for i in plan.projected}


def _key_paths(tree) -> list:
  return [kp for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _static_refresh(subspace_refresh):
  """`update`'s ``subspace_refresh`` as None or a Python bool."""
  if subspace_refresh is not None and not isinstance(subspace_refresh, (bool, np.bool_)):
    raise TypeError(
      "subspace_refresh must be None, True or False (a Python bool the"
      " caller computes from its step count; under jit a static argument),"
      f" got {type(subspace_refresh).__name__}."
    )
  return None if subspace_refresh is None else bool(subspace_refresh)


def _guarded_scale(projector, plan, count, due, scale, mismatch):
  """(α, the state's refresh_mismatch) for this step.

  A static `subspace_refresh` (`due`) that disagrees with the projector's
  schedule makes every projected update NaN (the run stops where it went
  wrong rather than training with stale or extra refreshes) and records the
  step in the state, where `refresh_due` finds it and raises. Both are a
  scalar compare on the device, read by the multiply by α: no host sync.
  """
  if due is None or not plan.projected:
    return scale, mismatch
  agrees = projector.needs_refresh(count) == due
  alpha = jnp.where(agrees, scale, jnp.nan).astype(jnp.float32)
  if mismatch is not None:
    mismatch = jnp.where((mismatch < 0) & ~agrees, count, mismatch)
  return alpha, mismatch


def _unprojected_steps(plan, n, learning_rate, count):
  """{leaf: update} of every leaf: the inner's, times −lr on the unprojected
  ones when the transformation has a learning rate (as optax's
  `scale_by_learning_rate`, in the update's dtype); the projected leaves'
  entries are replaced by their back-projections."""
  rate = _negative_rate(learning_rate, count)
  if rate is None:
    return dict(enumerate(n))
  projected = set(plan.projected)
  return {
    i: x if i in projected else jnp.asarray(rate, jnp.result_type(x)) * x for i, x in enumerate(n)
  }


def check_learning_rate(value, name: str):
  """Returns `value`, a learning rate: a schedule, an array (as
  `optax.inject_hyperparams` passes it) or a number > 0; raises TypeError or
  ValueError otherwise (None passes: no rate)."""
  if value is None or callable(value):
    return value
  numeric = (int, float, np.number, np.ndarray, jax.Array)
  if isinstance(value, bool) or not isinstance(value, numeric):
    raise TypeError(f"{name} must be None, a float or an optax schedule, got {value!r}.")
  if isinstance(value, (int, float, np.number)) and not value > 0:
    raise ValueError(f"{name} must be positive (or a schedule), got {value!r}.")
  return value


def _check_learning_rates(learning_rate, unprojected_learning_rate):
  check_learning_rate(learning_rate, "learning_rate")
  check_learning_rate(unprojected_learning_rate, "unprojected_learning_rate")
  if learning_rate is None and unprojected_learning_rate is not None:
    raise ValueError(
      "unprojected_learning_rate needs learning_rate: without it this transformation"
      " applies no learning rate (chain one after)."
    )


def _negative_rate(learning_rate, count):
  """−lr at `count` (optax's `scale_by_learning_rate`: a descent step), or None."""
  if learning_rate is None:
    return None
  return -(learning_rate(count) if callable(learning_rate) else learning_rate)


def _check_arguments(on_change, side, refresh_chunk_bytes):
  if on_change not in ON_CHANGE:
    raise ValueError(f"on_change must be one of {ON_CHANGE}, got {on_change!r}.")
  if side not in _leaves.SIDES:
    raise ValueError(f"side must be one of {_leaves.SIDES}, got {side!r}.")
  if refresh_chunk_bytes is not None and (
    isinstance(refresh_chunk_bytes, bool)
    or not isinstance(refresh_chunk_bytes, (int, np.integer))
    or refresh_chunk_bytes <= 0
  ):
    raise ValueError(
      f"refresh_chunk_bytes must be None or a positive int (bytes), got {refresh_chunk_bytes!r}."
    )


def _on_explicit_mesh(update, updates, state, params, extra_args):
  """`update(updates, state, params, **extra_args)`, run with Explicit mesh
  axes switched to Auto.

  Under Explicit mesh axes (jax.make_mesh's default in current JAX) every
  array's type carries its sharding, and the projectors' products (e.g.
  the Gram matrix G·Gᵀ of a gradient sharded on its rows) raise
  ShardingTypeError when traced there. So the update runs with those axes
  switched to Auto, where XLA's partitioner places the products as under
  jit's in/out shardings, and its outputs are given back the inputs'
  shardings, so the state's types are the same every step. Inputs on no
  Explicit axis (Auto meshes, one device, numpy arrays outside a
  `jax.set_mesh`), and JAX versions without explicit sharding, take the
  plain path.
  """
  sharding = jax.sharding
  if not hasattr(jax, "typeof") or not all(
    hasattr(sharding, n)
    for n in ("AxisType", "auto_axes", "use_abstract_mesh", "get_abstract_mesh")
  ):
    return update(updates, state, params, **extra_args)
  typed = lambda x: (
    isinstance(x, jax.Array) and hasattr(getattr(jax.typeof(x), "sharding", None), "mesh")
  )
  leaves = jax.tree_util.tree_leaves((updates, state, params, extra_args))
  meshes = [jax.typeof(x).sharding.mesh for x in leaves if typed(x)]
  mesh = next(
    (
      m
      for m in meshes + [sharding.get_abstract_mesh()]
      if sharding.AxisType.Explicit in tuple(m.axis_types)
    ),
    None,
  )
  if mesh is None:
    return update(updates, state, params, **extra_args)
  # Outside jit (no tracers), moving arrays onto the mesh needs its devices:
  # the concrete mesh of an input, when one is on it.
  concrete = None
  tracer = getattr(jax.core, "Tracer", None)
  if (
    hasattr(sharding, "set_mesh")
    and tracer is not None
    and not any(isinstance(x, tracer) for x in leaves)
  ):
    concrete = next(
      (
        x.sharding.mesh
        for x in leaves
        if isinstance(getattr(x, "sharding", None), sharding.NamedSharding)
        and isinstance(x.sharding.mesh, sharding.Mesh)
        and x.sharding.mesh.abstract_mesh == mesh
      ),
      None,
    )
  explicit = tuple(
    n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == sharding.AxisType.Explicit
  )
  spec = lambda x: jax.typeof(x).sharding.spec if typed(x) else sharding.PartitionSpec()
  out_specs = jax.tree_util.tree_map(spec, (updates, state))
  # Array-valued extra arguments go through auto_axes with the rest; any
  # other value is closed over as it is.
  e_leaves, e_def = jax.tree_util.tree_flatten(extra_args)
  e_arrays = [i for i, x in enumerate(e_leaves) if isinstance(x, jax.Array)]

  def auto(u, s, p, arrays):
    leaves = list(e_leaves)
    for i, x in zip(e_arrays, arrays):
      leaves[i] = x
    return update(u, s, p, **e_def.unflatten(leaves))

  with sharding.use_abstract_mesh(mesh) if concrete is None else sharding.set_mesh(concrete):
    return sharding.auto_axes(auto, axes=explicit, out_sharding=out_specs)(
      updates, state, params, [e_leaves[i] for i in e_arrays]
    )


def project_subspace(
  inner: optax.GradientTransformation,
  projector: _base.Projector,
  *,
  scale: float = 1.0,
  learning_rate: Any = None,
  unprojected_learning_rate: Any = None,
  mask: _leaves.MaskSpec = None,
  dims: _leaves.DimsSpec = None,
  on_change: str = "keep",
  projection_dtype=None,
  side: str = "smaller",
  refresh_chunk_bytes: int | None = None,
  residual: Any = None,
  residual_scale: float = 1.0,
  output: str = "back_project",
  gamma: float = 1.01,
  released_order: tuple[float, float] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs `inner` on low-rank projections of the selected gradients.

  For each leaf selected by `mask`, seen as a batch of matrices G (s×l after
  orienting the projected side s first, by default the smaller side; `dims`
  says which axes are which), the update is

      R = Pᵀ G,   N = inner(R),   ΔW = scale · P N,

  with P (s×r) from `projector`, whose state lives here, one per matrix. The
  inner transformation sees one tree: low-rank R for projected leaves, the
  full gradient for the others; so its state is allocated at the low-rank
  shapes (r × l per matrix: never an s×l buffer). `scale` applies to projected
  leaves only, as GaLore's α. Projector math is float32 whatever the dtype.

  Why a wrapper rather than ``optax.chain(project, optax.adam(...))``: in a
  chain every transformation allocates its state from the full parameter
  shapes, so Adam's moments would be full size. Wrapping, like `optax.masked`
  or `optax.MultiSteps`, lets the inner state live at the low-rank shapes.
  The result goes into `optax.chain` like any other transformation.

  When a matrix's basis changes, `on_change` says what happens to the inner
  state's buffers of that matrix (those with the low-rank shape, found by key
  path, in any chain): "keep" (GaLore and OSD: moments stay, untouched);
  "reset" (set to zero; a shared step count such as Adam's runs on, but a
  per-matrix one, `scale_by_hf_adam(per_matrix_count=True)`, restarts with
  the moments, so the bias correction restarts too); "transport" (re-expressed in the new
  basis through M = P_newᵀ P_old: first moments, `FIRST_MOMENT_FIELDS`, as
  M·m, second-moment statistics in `SECOND_MOMENT_FIELDS` as (M⊙M)·v, the
  variance of M·x for uncorrelated coordinates, which keeps them
  non-negative; `STATE_MOMENT_FIELDS` names the fields of states whose
  names mislead, optax.adan's). "transport" raises at `init` on inner state
  it cannot move: a low-rank buffer of another field, or a factored or
  per-axis statistic of a projected leaf (Adafactor's factored v_row/v_col,
  SM3).

  Steps without a refresh, without a host sync: by default the refresh is a
  `lax.cond` on the step count, and XLA's GPU runtime reads a conditional's
  predicate on the host (it waits for the device to reach it), so every step
  then launches its update's kernels while the device waits (LLaMA-350M, 2
  H200s: GaLore's step idles ~20-35 ms, OSD's ~57 ms, AdamW's ~3-8 ms). A
  caller that counts steps on the host can say whether this step refreshes:
  ``tx.update(g, state, params, subspace_refresh=step % T == 0)`` (GaLore,
  GRASS, RSO: every `update_every` steps from 0; OSD: step 0 only), a Python
  bool, static under jit (two compiled programs); the conds are then not
  traced. The schedule belongs to the projector (`projectors.RefreshSchedule`)
  and is kept in the state: ``osub.refresh_due(opt_state, step)`` gives the
  flag, so no caller writes a method's schedule again. A value that
  disagrees with the schedule makes that step's projected updates NaN, not
  another method's, and is recorded in the state: the next `refresh_due`
  call that finds the state computed raises `RefreshScheduleError` naming
  the step (no host sync: it never waits for the device). `optax.chain`,
  `optax.masked` and `optax.MultiSteps` pass the flag through as an extra
  argument.

  References:
    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection", ICML 2024, arXiv:2403.03507.

  Args:
    inner: any optax transformation (`optax.adam(lr)`, `optax.scale_by_adam()`,
      `optax.lion(...)`, a chain). For projected leaves its `params` argument
      receives the projected parameters Pᵀ W.
    projector: a `Projector`, e.g. `projectors.svd(rank, update_every)`.
    scale: α, multiplies the back-projected update of projected leaves.
    learning_rate: None (the update is as above: chain a learning rate
      after, ``optax.scale_by_learning_rate``), or a float or an optax
      schedule of this transformation's step count: the projected leaves'
      update is then −lr·α·P·N, the rate applied to the low-rank N before
      the back-projection, so the product P·(−lr·α·N) is the whole update
      and `optax.apply_updates`' W + ΔW folds into the GEMM (on a GPU one
      cuBLAS call with β = 1 instead of the product and a separate pass
      over W). The same values as the chain, rounded differently.
    unprojected_learning_rate: with `learning_rate`, the rate of the
      leaves that are not projected (their update −lr·inner(G)); default
      None: `learning_rate`. Ignored without `learning_rate`.
    mask: which leaves are projected, one of: a regex matched (`re.search`)
      against the key path joined by "/" (e.g. ``r"(attention|mlp)/.*kernel"``);
      a pytree of bools with the params' structure or a prefix of it; a
      callable ``mask(params) -> pytree of bools`` (optax's convention, as
      `optax.masked` and `optax.contrib.galore` take it); or a per-leaf
      predicate ``leaf_predicate(lambda path, leaf: ...)``. (A bare callable
      that needs two arguments is still read as a per-leaf predicate, with a
      DeprecationWarning.) Flax NNX Variables are looked through: the kernel
      of ``nnx.state(model, nnx.Param)`` has the path "layers/0/kernel", not
      "layers/0/kernel/value", as in the plain arrays `nnx.Optimizer` passes
      to `update`, and a callable mask receives the params without Variables.
      Default: every floating-point leaf with 2 or more axes (those with
      more need `dims`). Unselected leaves go through `inner` at full size.
    dims: `MatrixDims` for every selected leaf, a callable
      ``(path, leaf) -> MatrixDims | None``, or a pytree of them. Needed for
      selected leaves that are not 2-D.
    on_change: "keep", "reset" or "transport" (above).
    projection_dtype: dtype of the operands of the products with G (R = PᵀG,
      P·N, and OSD's G·(GᵀP)); they accumulate in float32 either way.
      Default float32 (TF32 on recent NVIDIA GPUs at JAX's default
      precision). ``jnp.bfloat16`` runs them on the bf16 tensor cores, as the
      authors' code does for bf16 models (P cast to the gradient's dtype);
      refreshes and the online-PCA step stay float32.
    side: which side of each matrix P spans: "smaller" (GaLore, OSD; ties
      go to the rows), "rows" (always the rows, the input side of a Flax
      ``(in, out)`` kernel: RSO, whose P must act on the layer's input) or
      "cols" (always the columns, the output side). The rank is clamped to
      the projected side's length, with a warning.
    refresh_chunk_bytes: the float32 gradient bytes one refresh chunk stacks
      (a leaf is never split; default
      `optax_subspace._chunks.OPTIMIZER_REFRESH_CHUNK_BYTES`, 4 GiB). Each
      chunk is one batched refresh under its own `lax.cond`: fewer chunks
      refresh faster (GaLore's eigh costs about as much for a batch of 5 as
      of 96: LLaMA-1B 1.48 s in one chunk per shape, 4.19 s in 256 MiB
      chunks, H200), smaller ones need less memory (LLaMA-7B GaLore step:
      60.6 GB at 4 GiB, 48.6 GB at 256 MiB).
    residual: what happens to the part of each gradient outside the
      subspace, G − P·R (`_stages`): None drops it (GaLore); "sign_sgd" or
      "sgd" adds ``residual_scale``·sign(G − P·R) or ``residual_scale``·(G −
      P·R) (FRUGAL's state-free step), and any state-free optax
      transformation applied to G − P·R does the same with its direction;
      "fira" adds (G − P·R)·diag(k), k_j = ‖N_{:,j}‖/‖R_{:,j}‖, limited by
      the norm-growth limiter ("fira_matrix": one k per matrix); computed
      as c·G·D + P·(N − c·R·D), one product with P, which needs PᵀP = I
      (an SVD basis). The term
      joins P·N before α: ΔW = α·(P·N + S) (Fira's Algorithm 1). At full
      rank (r = s) there is no complement and the term is exactly zero.
    residual_scale: the state-free term's learning rate relative to the
      subspace's (FRUGAL's λ; 1.0 in pre-training, 0.1 in fine-tuning),
      i.e. to `learning_rate` (as the presets run it) or to a rate
      chained after this transformation. An `inner` with its own learning rate
      (``optax.adam(lr)``) does not scale this term: pass lr·λ then. (Fira's
      and APOLLO's factors come from N, so they carry its learning rate.)
    output: "back_project" (ΔW = α·P·N), or, in its place, the full G
      scaled by factors from R and N, then limited: "scale" (APOLLO,
      ΔW = α·G·diag(s), s_j = ‖N_{:,j}‖/‖R_{:,j}‖ over the l columns of the
      oriented G) or "scale_tensor" (APOLLO-Mini, ΔW = α·s·G, s = ‖N‖/‖R‖).
    gamma: γ of the norm-growth limiter of "fira" and the "scale" outputs
      (‖S_t‖ ≤ γ·‖S_{t−1}‖; 1.01 in both papers). Its state is one float per
      matrix, `ProjectSubspaceState.limiter`.
    released_order: None (the "scale" outputs' factors and Fira's k, and
      their limiters, see N as `inner` gives it), or the (b1, b2) of
      `inner`'s bias-corrected Adam, for the step as the authors' released
      code orders it: they see N before its correction c_t = √(1 − b2ᵗ)/(1 −
      b1ᵗ), t = this transformation's step, which multiplies the limited
      update afterwards; Fira's residual is then G − scale·P·R and its term
      is not multiplied by scale (APOLLO's and Fira's released code).
      `inner`'s step count must be this transformation's (one shared count,
      not restarted).

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_subspace as osub
    >>> params = {"w": jnp.ones((8, 16)), "b": jnp.zeros(16)}
    >>> tx = osub.project_subspace(optax.adam(1e-2), osub.projectors.svd(2, 10))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
  """
  _check_arguments(on_change, side, refresh_chunk_bytes)
  _check_learning_rates(learning_rate, unprojected_learning_rate)
  if unprojected_learning_rate is None:
    unprojected_learning_rate = learning_rate
  stages = _stages.Stages(residual, residual_scale, output, gamma, released_order)
  if released_order is not None and stages.fused and not scale > 0:
    raise ValueError(f"Fira's released order divides by the scale: it must be > 0, got {scale!r}.")
  schedule = (
    projector.needs_refresh if isinstance(projector.needs_refresh, _base.RefreshSchedule) else None
  )
  make_plan = functools.partial(
    _plan.make_plan, rank=projector.rank, mask=mask, dims=dims, side=side
  )

  def init_fn(params):
    plan = make_plan(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    pstates = [
      _init_projector(projector, i, leaf) if leaf.projected else optax.MaskedNode()
      for i, leaf in enumerate(plan)
    ]
    low_rank = [
      jnp.zeros(leaf.low_rank_shape, jnp.result_type(x)) if leaf.projected else x
      for leaf, x in zip(plan, leaves)
    ]
    inner_state = inner.init(treedef.unflatten(low_rank))
    if on_change == "transport":
      _transport.check_transport(inner_state, plan, _key_paths(params))
    for i in plan.projected:
      stages.check_state_free((plan[i].side, plan[i].other))
    return ProjectSubspaceState(
      count=jnp.zeros([], jnp.int32),
      projectors=projector_treedef(params).unflatten(pstates),
      inner=inner_state,
      schedule=schedule,
      refresh_mismatch=jnp.full([], -1, jnp.int32),
      limiter=projector_treedef(params).unflatten(
        [
          jnp.zeros(leaf.batch_shape, jnp.float32) if leaf.projected else optax.MaskedNode()
          for leaf in plan
        ]
      )
      if stages.limited
      else None,
      plan=plan,
    )

  def update(updates, state, params=None, *, subspace_refresh=None, **extra_args):
    due = _static_refresh(subspace_refresh)
    plan = make_plan(updates, quiet=True) if state.plan is None else state.plan
    g, treedef = jax.tree_util.tree_flatten(updates)
    w = None if params is None else treedef.flatten_up_to(params)
    count, transport = state.count, on_change == "transport"
    pipe = _pipeline.Pipeline(
      projector,
      plan,
      projection_dtype or jnp.float32,
      PRODUCT_ALIGNMENT,
      OWN_BATCH_MATRICES,
      projector.hold_basis if HOLD_COMPUTED_BASES is None else HOLD_COMPUTED_BASES,
      STACKED_PRODUCT_ELEMENTS,
      STACK_SMALL_PROJECTOR_STEPS,
      BASES_AS_PRODUCT_STACKS,
      COLUMNS_STACKED_AS_STORED,
    )
    pstates = _projector_states(projector, plan, updates, state.projectors)
    moved = lambda inner_state, old, new, changed: _transport.on_change(
      on_change, inner_state, plan, _key_paths(updates), old, new, changed
    )

    # 1. Refresh when due (GaLore: steps 0, T, 2T, ...; OSD: step 0). This
    # step's bases are then evaluated once, shared by every product and by
    # "transport" (a random projector regenerates P, a draw, at each `basis`
    # call); projectors with their own `project` and `back` (row
    # selections) form them only for "transport".
    old = pipe.bases(pstates) if transport else None
    pstates, changed = pipe.refresh(
      pstates,
      g,
      count,
      due,
      _chunks.OPTIMIZER_REFRESH_CHUNK_BYTES if refresh_chunk_bytes is None else refresh_chunk_bytes,
    )
    bases = pipe.bases(pstates) if pipe.dense or transport else None
    inner_state = moved(state.inner, old, bases, changed)
    # 2. Project: R = PᵀG (and what the projector's advance reads of G).
    r, x = pipe.project(pstates, bases, g)
    # 3. Inner: N = inner(R), on the low-rank tree.
    n, inner_state = _pipeline.inner_update(
      inner,
      plan,
      treedef,
      g,
      r,
      None if w is None else pipe.project_params(pstates, bases, w),
      inner_state,
      w,
      extra_args,
    )
    # 4. Back-project: ΔW = α·P·N; with a residual stage α·(P·N + S), S
    # from G − P·R (FRUGAL, Fira); or the output mode's α·G·diag(s) (APOLLO).
    alpha, mismatch = _guarded_scale(projector, plan, count, due, scale, state.refresh_mismatch)
    u = _unprojected_steps(plan, n, unprojected_learning_rate, count)
    norms = _limiter_states(plan, updates, state)
    if learning_rate is not None:  # −lr joins α: it reaches N before the product
      alpha = alpha * _negative_rate(learning_rate, count)
    correction = stages.bias_correction(count)  # None but for `released_order`
    if stages.scales_output:
      projected, norms = pipe.scale_output(stages, g, r, n, alpha, norms, correction)
    else:
      terms = None
      if stages.has_residual:
        released = None if correction is None else (correction, scale)
        terms, n, norms = pipe.residual(stages, pstates, bases, g, r, n, norms, released)
      # Fira's folded term joins a held padded product; FRUGAL's sign term does not: on an
      # H100 (1B update, Triton GEMM off) the hold took Fira from 34.25 to 32.53 ms and
      # FRUGAL from 34.26 to 36.05 (profile_update_1b_h100_73a30f5_issue23.json).
      projected = pipe.back_project(pstates, bases, n, alpha, g, terms, hold_term=stages.fused)
    u.update(projected)
    # 5. Advance (OSD: one online-PCA step gives P_{t+1} for the next step).
    if projector.advance is not None and plan.projected:
      pstates, changed = pipe.advance(pstates, bases, x, count)
      inner_state = moved(inner_state, bases, pipe.bases(pstates) if transport else None, changed)

    return treedef.unflatten([u[i] for i in range(len(g))]), state._replace(
      count=optax.safe_increment(count),
      projectors=projector_treedef(updates).unflatten(
        [pstates.get(i, optax.MaskedNode()) for i in range(len(g))]
      ),
      inner=inner_state,
      refresh_mismatch=mismatch,
      limiter=None
      if state.limiter is None
      else projector_treedef(updates).unflatten(
        [norms.get(i, optax.MaskedNode()) for i in range(len(g))]
      ),
    )

  def update_fn(updates, state, params=None, **extra_args):
    return _on_explicit_mesh(update, updates, state, params, extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def subspace_plan(opt_state: Any) -> _plan.SubspacePlan | None:
  """The plan of the `project_subspace` state in `opt_state`.

  Per parameter leaf (flatten order): whether it is projected, its matrix
  and batch axes, the transpose that orients it, the side P spans, the
  clamped rank and the inner state's low-rank shape; and its bucket of
  same-shaped matrices (`SubspacePlan.buckets`), refreshed as one batch.
  Made once at `init` and kept in the state as static metadata (no
  arrays): the update, `state_shardings`, `update_shardings` and the
  checkpoint signature all read it. Reads no array, so an abstract state
  from ``jax.eval_shape(tx.init, params)`` will do.

  References:
    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection", ICML 2024, arXiv:2403.03507 (the smaller side, as here).

  Args:
    opt_state: an optimizer state, or a tree holding one, in any chain or
      wrapper.

  Returns:
    The `SubspacePlan`, or None when the state holds no `project_subspace`
    state. Raises ValueError when it holds several with different plans
    (read each state's ``plan`` then).

  Example:
    >>> import jax, jax.numpy as jnp, optax_subspace as osub
    >>> tx = osub.galore(1e-3, rank=2)
    >>> plan = osub.subspace_plan(jax.eval_shape(tx.init, {"w": jnp.ones((4, 8))}))
    >>> plan.leaves[0].side, plan.leaves[0].rank, plan.leaves[0].low_rank_shape
    (4, 2, (2, 8))
  """
  is_state = lambda x: isinstance(x, ProjectSubspaceState)
  plans = {x.plan for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_state) if is_state(x)}
  if len(plans) > 1:
    raise ValueError(
      f"opt_state holds {len(plans)} project_subspace states with different"
      " plans: read each state's `plan`."
    )
  return plans.pop() if plans else None
