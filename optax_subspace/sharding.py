"""Shardings of a subspace optimizer's state, derived from the parameters'.

`state_shardings(tx, params, param_shardings)` gives a `NamedSharding` for
every leaf of ``tx.init(params)``, so that one
``jax.jit(train_step, in_shardings=..., out_shardings=...)`` runs the whole
step sharded (FSDP / ZeRO-3 when the parameters are sharded on an "fsdp"
axis). The rules, per projected matrix seen as s × l (s the projected,
smaller side; see `optax_subspace.MatrixDims`):

- batch axes (stacked layers) keep the parameter's sharding;
- the basis P (s × r) and every projector buffer of that shape (online PCA's
  AdamW moments) keep the sharding of the parameter's s side on their first
  dimension, and are replicated along r;
- a low-rank inner buffer (r × l, or l × r in the leaf's own orientation)
  keeps the sharding of the parameter's l side; when only the s side is
  sharded, that sharding moves to the l side (ZeRO: each device holds 1/F of
  every moment), if l divides evenly;
- full-size buffers (moments of unprojected leaves, `optax.MultiSteps`
  accumulators, any other transformation in the chain) take the parameter's
  own sharding, matched by key path and shape;
- PRNG keys, counts, hyperparameters and anything unmatched are replicated;
  an unmatched buffer as large as a sharded parameter gets a warning.

Which leaves are projected, which of their axes are rows, columns and
batch, on which side and at what rank is read from the plan
(`optax_subspace.subspace_plan`) that `tx.init` keeps in its state.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from optax_subspace import _combinator
from optax_subspace import _leaves
from optax_subspace import _plan


def _is_state(x) -> bool:
  return isinstance(x, _combinator.ProjectSubspaceState)


def _as_named(s, mesh):
  if isinstance(s, NamedSharding):
    return s
  if isinstance(s, PartitionSpec):
    if mesh is None:
      raise ValueError("param_shardings holds PartitionSpecs: pass the mesh as `mesh=`.")
    return NamedSharding(mesh, s)
  raise TypeError(
    f"param_shardings must hold NamedSharding or PartitionSpec leaves, got {type(s).__name__}."
  )


def _named_per_leaf(params, param_shardings, mesh):
  """(params' treedef, a NamedSharding per parameter, their one mesh)."""
  treedef = jax.tree_util.tree_structure(params)
  named = [_as_named(s, mesh) for s in treedef.flatten_up_to(param_shardings)]
  meshes = {s.mesh for s in named}
  if not named and mesh is None:
    raise ValueError("params has no leaves: pass `mesh=`.")
  if len(meshes) > 1:
    raise ValueError("param_shardings use more than one mesh.")
  return treedef, named, next(iter(meshes)) if named else mesh


def _padded(spec: PartitionSpec, ndim: int) -> tuple:
  entries = tuple(spec)
  return entries + (None,) * (ndim - len(entries))


def _mesh_size(mesh, entry) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  return math.prod(mesh.shape[n] for n in names)


def _merged_entry(entries, sizes):
  """Sharding of the dimension formed by flattening axes (major first).

  Flattening keeps a block sharding only when the one sharded axis is the
  most major of the axes longer than 1; otherwise the merged dimension is
  replicated (correct, at the cost of memory).
  """
  live = [(e, n) for e, n in zip(entries, sizes) if n > 1 or e is not None]
  sharded = [i for i, (e, _) in enumerate(live) if e is not None]
  if not sharded:
    return None
  if sharded == [0]:
    return live[0][0]
  return None


class _LeafSpecs:
  """Partition specs of the state buffers that belong to one parameter."""

  def __init__(self, plan: _leaves.LeafPlan, sharding: NamedSharding):
    self.plan = plan
    self.mesh = sharding.mesh
    self.full = _padded(sharding.spec, len(plan.shape))
    if not plan.projected:
      return
    batch, rows, cols = plan.batch_axes, plan.row_axes, plan.col_axes
    merged = lambda axes: _merged_entry([self.full[a] for a in axes], [plan.shape[a] for a in axes])
    self.batch = tuple(self.full[a] for a in batch)
    row_e, col_e = merged(rows), merged(cols)
    side_e, other_e = (row_e, col_e) if plan.axis == 0 else (col_e, row_e)
    self.side = side_e
    if other_e is None and side_e is not None and plan.other % _mesh_size(self.mesh, side_e) == 0:
      other_e = side_e  # ZeRO: the moments are split along the kept side
    self.other = other_e

  def low_rank(self):
    if self.plan.axis == 0:
      return self.batch + (None, self.other)
    return self.batch + (self.other, None)

  def basis(self):
    return self.batch + (self.side, None)

  def projector_leaf(self, shape):
    nb = len(self.plan.batch_shape)
    if tuple(shape[nb:]) == (self.plan.side, self.plan.rank):
      return self.basis()
    return self.batch + (None,) * (len(shape) - nb)


def _match(path, by_path):
  """The parameter whose key path is the longest suffix of `path`."""
  for cut in range(len(path) + 1):
    i = by_path.get(tuple(path[cut:]))
    if i is not None:
      return i
  return None


def _state_plan(node, params, dims):
  """The plan a `project_subspace` state was made with (`node.plan`).

  `dims`, when given, must be the optimizer's: a leaf whose matrix axes it
  would choose differently raises ValueError.
  """
  plan = node.plan
  if plan is None:
    raise ValueError(
      "this project_subspace state has no plan (not made by its `init`):"
      " take the state from `tx.init` or `jax.eval_shape(tx.init, params)`."
    )
  if dims is not None:
    mask = _combinator.projector_treedef(params).unflatten([leaf.projected for leaf in plan])
    try:
      given = _plan.make_plan(params, plan.rank, mask, dims, plan.side, quiet=True)
    except ValueError as e:
      raise ValueError(f"{e}\nstate_shardings needs the same `dims` as the optimizer.") from e
    differ = [a.path for a, b in zip(plan, given) if a != b]
    if differ:
      raise ValueError(
        f"dims {dims!r} give leaves {differ[:4]} other matrix axes than the"
        " optimizer's plan: state_shardings needs the same `dims` as the"
        " optimizer (or none: the plan has them)."
      )
  return plan


def state_shardings(
  tx: optax.GradientTransformation,
  params: Any,
  param_shardings: Any,
  *,
  dims: _leaves.DimsSpec = None,
  mesh: Optional[jax.sharding.Mesh] = None,
) -> Any:
  r"""`NamedSharding`s for the state of `tx`, derived from the parameters'.

  For every leaf of ``tx.init(params)`` (computed with `jax.eval_shape`, no
  memory used), a sharding on the parameters' mesh: low-rank moments
  (r × l) keep the sharding of the parameter's kept side l, or take the
  projected side's when only that one is sharded (ZeRO); the basis P (s × r)
  keeps the sharding of the projected side s; batch axes keep theirs;
  full-size buffers take the parameter's own sharding (matched by key-path
  suffix and shape, in any `optax.chain`, `optax.MultiSteps` or
  `optax.inject_hyperparams`); keys, counts and scalars are replicated. No
  buffer of a parameter's full size is replicated unless the parameter is.
  The result goes straight into `jax.jit`'s `in_shardings` and
  `out_shardings` (and ``jax.jit(tx.init, out_shardings=...)`` creates the
  state already sharded). What each method then communicates per step is in
  docs/scaling.md. The mesh's axes may be `AxisType.Auto` or `Explicit`
  (`jax.make_mesh`'s default); under Explicit axes the update itself runs
  them as Auto and keeps the inputs' shardings.

  References:
    Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
    Parameter Models", SC 2020, arXiv:1910.02054.
    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection", ICML 2024, arXiv:2403.03507.

  Args:
    tx: the optimizer (any chain containing `project_subspace` presets).
    params: the parameters, as arrays or `jax.ShapeDtypeStruct`s.
    param_shardings: a tree like `params` of `NamedSharding`s, or of
      `PartitionSpec`s together with `mesh`.
    dims: not needed (the state's plan records each leaf's matrix axes);
      when given, checked against the optimizer's (ValueError if a leaf's
      axes differ).
    mesh: the mesh, when `param_shardings` holds `PartitionSpec`s.

  Returns:
    A tree like ``tx.init(params)`` of `NamedSharding`s.

  Example:
    >>> import jax, jax.numpy as jnp, optax_subspace as osub
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))
    >>> params = {"w": jnp.ones((16, 32))}
    >>> tx = osub.galore(1e-3, rank=4)
    >>> shardings = osub.state_shardings(tx, params, {"w": P("fsdp")},
    ...                                  mesh=mesh)
    >>> state = jax.jit(tx.init, out_shardings=shardings)(params)
  """
  treedef, named, mesh = _named_per_leaf(params, param_shardings, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  key_paths = [tuple(kp) for kp, _ in flat_params]
  shapes = [tuple(np.shape(x)) for _, x in flat_params]
  by_path = {kp: i for i, kp in enumerate(key_paths)}
  sharded_sizes = [
    math.prod(shape) for shape, s in zip(shapes, named) if any(e is not None for e in s.spec)
  ]
  warn_above = min(sharded_sizes) if sharded_sizes else math.inf

  abstract = jax.eval_shape(tx.init, params)
  out = []
  unmatched = []

  def full_or_replicated(path, x):
    i = _match(path, by_path)
    if i is not None and tuple(x.shape) == shapes[i]:
      return named[i]
    if math.prod(x.shape) >= warn_above:
      unmatched.append(_leaves.path_str(path))
    return replicated

  def visit(node, path):
    if _is_state(node):
      plans = _state_plan(node, params, dims)
      specs = [_LeafSpecs(p, s) for p, s in zip(plans, named)]
      out.append(replicated)  # count
      visit_projectors(node.projectors, specs)
      visit_inner(node.inner, plans, specs, path + (jax.tree_util.GetAttrKey("inner"),))
      # The schedule has no leaves; the mismatch step is a scalar; the
      # limiter (Fira, APOLLO) one float per matrix.
      out.extend(
        replicated
        for _ in jax.tree_util.tree_leaves((node.schedule, node.refresh_mismatch, node.limiter))
      )
      return
    children = jax.tree_util.tree_flatten_with_path(
      node, is_leaf=lambda x: x is not node and _is_state(x)
    )[0]
    for sub, x in children:
      if _is_state(x):
        visit(x, path + tuple(sub))
      else:
        out.append(full_or_replicated(path + tuple(sub), x))

  def visit_projectors(tree, specs):
    pdef = _combinator.projector_treedef(params)
    for i, sub in enumerate(pdef.flatten_up_to(tree)):
      for _, x in jax.tree_util.tree_flatten_with_path(sub)[0]:
        spec = specs[i].projector_leaf(x.shape)
        out.append(NamedSharding(mesh, PartitionSpec(*spec)))

  def visit_inner(tree, plans, specs, path):
    for sub, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      full_path = path + tuple(sub)
      i = _match(full_path, by_path)
      if i is not None and plans[i].projected and (tuple(x.shape) == plans[i].low_rank_shape):
        out.append(NamedSharding(mesh, PartitionSpec(*specs[i].low_rank())))
      else:
        out.append(full_or_replicated(full_path, x))

  visit(abstract, ())
  if unmatched:
    warnings.warn(
      "state_shardings replicates optimizer-state buffers it could not"
      " match to a parameter (by key path and shape):"
      f" {', '.join(repr(u) for u in unmatched[:4])}"
      f"{' ...' if len(unmatched) > 4 else ''}.",
      stacklevel=2,
    )
  state_def = jax.tree_util.tree_structure(abstract)
  return jax.tree_util.tree_unflatten(state_def, out)


def _kept_side_spec(plan: _leaves.LeafPlan, sharding: NamedSharding) -> tuple:
  """`sharding`'s spec with a split of the projected side moved to the kept side.

  Only when the projected side is split and the kept side is not, and the
  most major kept axis longer than 1 divides evenly; otherwise unchanged.
  """
  full = list(_padded(sharding.spec, len(plan.shape)))
  rows, cols = plan.row_axes, plan.col_axes
  side, kept = (rows, cols) if plan.axis == 0 else (cols, rows)
  split = [a for a in side if full[a] is not None]
  if len(split) != 1 or any(full[a] is not None for a in kept):
    return tuple(full)
  target = next((a for a in kept if plan.shape[a] > 1), None)
  entry = full[split[0]]
  if target is None or plan.shape[target] % _mesh_size(sharding.mesh, entry):
    return tuple(full)
  full[split[0]], full[target] = None, entry
  return tuple(full)


def update_shardings(
  tx: optax.GradientTransformation,
  params: Any,
  param_shardings: Any,
  *,
  dims: _leaves.DimsSpec = None,
  mesh: Optional[jax.sharding.Mesh] = None,
) -> Any:
  r"""Where a sharded update (ZeRO-1) should split each gradient: projected ones on their kept side.

  ZeRO-1 keeps the weights replicated and splits the optimizer state and
  the update over the data axis: the gradient is reduce-scattered to these
  shardings, each device updates its share, the new weights are gathered.
  For a projected matrix seen as s × l (s the projected side), a split of s
  cuts the contraction of R = PᵀG: every step then moves partial sums of R
  and gathers of the update's low-rank factors (r × l each, a quarter of the
  matrix at r = s/4) besides the weights. Split along l, the projection, the
  inner update on R (r × l, split the same way by `state_shardings`) and the
  back-projection P·N are all local, with P (s × r) whole on every device;
  Online Subspace Descent's step on P then needs one all-reduce of
  G·(GᵀP) (s × r) and of two scalars per matrix, and a refresh (every T
  steps) one of the Gram matrix G·Gᵀ. So this returns `param_shardings` with
  every projected matrix's split moved from its projected side to its kept
  side (where that side is unsplit and divides evenly), other leaves as
  given. Place the state with ``state_shardings(tx, params, <this>)``.

  References:
    Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
    Parameter Models", SC 2020, arXiv:1910.02054.
    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection", ICML 2024, arXiv:2403.03507.

  Args:
    tx, params, dims, mesh: as in `state_shardings`.
    param_shardings: a tree like `params` of `NamedSharding`s (or
      `PartitionSpec`s with `mesh`): the split to start from, e.g. every
      matrix on its hidden axis over "data".

  Returns:
    A tree like `params` of `NamedSharding`s.

  Example:
    >>> import jax, jax.numpy as jnp, optax_subspace as osub
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> params = {"w": jnp.ones((16, 32))}
    >>> tx = osub.galore(1e-3, rank=4)
    >>> split = osub.update_shardings(tx, params, {"w": P("data")}, mesh=mesh)
    >>> split["w"].spec  # P spans the 16 rows: the update splits the 32 columns
    PartitionSpec(None, 'data')
  """
  treedef, named, _ = _named_per_leaf(params, param_shardings, mesh)
  abstract = jax.eval_shape(tx.init, params)
  plans = {}
  for node in jax.tree_util.tree_leaves(abstract, is_leaf=_is_state):
    if _is_state(node):
      for i, plan in enumerate(_state_plan(node, params, dims)):
        if plan.projected:
          plans.setdefault(i, plan)
  out = [
    NamedSharding(s.mesh, PartitionSpec(*_kept_side_spec(plans[i], s))) if i in plans else s
    for i, s in enumerate(named)
  ]
  return treedef.unflatten(out)
