"""Orbax checkpoints of parameters and subspace-optimizer state, checked on restore.

`save_checkpoint` writes three items under one step of an Orbax
`CheckpointManager`: the parameters, the optimizer state (projector bases,
PRNG keys, counts, the inner optimizer's low-rank state) and a small JSON
signature of both. `restore_checkpoint` reads the signature first and refuses
a checkpoint made by another method, at another rank or for another
parameter tree, naming what differs; then it restores the arrays onto the
shardings of the target (any mesh: Orbax reshards). Orbax writes each step
into a temporary directory and renames it when complete, so a save killed
midway is never listed as a step, and the latest complete one is restored.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from optax_subspace import _combinator
from optax_subspace import _leaves
from optax_subspace.projectors.random import RandomState
from optax_subspace.projectors.random import subproblem_factor

_FORMAT = 1
_ITEMS = ("params", "opt_state")
_SIGNATURE = "optax_subspace"


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the parameters or optimizer it is restored into.

  The message names each difference: the parameter tree (paths, shapes,
  dtypes), the method (projector state type) of each projected leaf, its
  rank, and any other optimizer-state buffer.
  """


def _describe(x) -> dict:
  return {"shape": [int(n) for n in np.shape(x)], "dtype": str(jax.numpy.result_type(x))}


def _leaf_table(tree) -> dict:
  return {
    _leaves.path_str(kp): _describe(x) for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _rank(node, i, pstate) -> int:
  """Leaf i's rank: from the state's plan, or (a state made without one) its
  projector state's basis shape."""
  if node.plan is not None:
    return node.plan[i].rank
  if hasattr(pstate, "basis_shape"):  # a state that stores no basis
    return pstate.basis_shape[1]
  arrays = jax.tree_util.tree_leaves(pstate)
  return int(np.shape(arrays[0])[-1]) if arrays else 0


def _subspaces(params, opt_state) -> dict:
  """{state path: {param path: projector type and rank}} per subspace state."""
  treedef = _combinator.projector_treedef(params)
  paths = _leaves.leaf_paths(params)
  nodes = jax.tree_util.tree_flatten_with_path(
    opt_state, is_leaf=lambda x: isinstance(x, _combinator.ProjectSubspaceState)
  )[0]
  out = {}
  for kp, node in nodes:
    if not isinstance(node, _combinator.ProjectSubspaceState):
      continue
    try:
      pstates = treedef.flatten_up_to(node.projectors)
    except (ValueError, TypeError):
      continue  # another parameter tree: reported from the parameters
    leaves = {}
    for i, (path, p) in enumerate(zip(paths, pstates)):
      if isinstance(p, optax.MaskedNode):
        continue
      leaves[path] = {
        "projector": type(p).__name__,
        "fields": list(
          getattr(p, "_fields", ())
          or ([f.name for f in dataclasses.fields(p)] if dataclasses.is_dataclass(p) else ())
        ),
        "rank": _rank(node, i, p),
      }
    out[_leaves.path_str(kp)] = leaves
  return out


def _signature(params, opt_state) -> dict:
  return {
    "format": _FORMAT,
    "params": _leaf_table(params),
    "subspaces": _subspaces(params, opt_state),
    "opt_state": _leaf_table(opt_state),
  }


def _table_diff(what, saved, target) -> list[str]:
  only_saved = sorted(set(saved) - set(target))
  only_target = sorted(set(target) - set(saved))
  changed = [
    f"'{p}': checkpoint {tuple(saved[p]['shape'])} {saved[p]['dtype']},"
    f" target {tuple(target[p]['shape'])} {target[p]['dtype']}"
    for p in sorted(set(saved) & set(target))
    if saved[p] != target[p]
  ]
  lines = []
  short = lambda xs: ", ".join(f"'{x}'" for x in xs[:6]) + (" ..." if len(xs) > 6 else "")
  if only_saved:
    lines.append(f"{what}: only in the checkpoint: {short(only_saved)}")
  if only_target:
    lines.append(f"{what}: only in the target: {short(only_target)}")
  if changed:
    lines.append(
      f"{what}: shape or dtype differs: {'; '.join(changed[:6])}"
      + (" ..." if len(changed) > 6 else "")
    )
  return lines


def _differences(saved: dict, target: dict) -> list[str]:
  """What differs between two signatures, most telling first."""
  if saved.get("format") != _FORMAT:
    return [f"checkpoint signature format {saved.get('format')!r}, this version reads {_FORMAT}"]
  lines = _table_diff("parameter tree", saved["params"], target["params"])
  s_sub, t_sub = saved["subspaces"], target["subspaces"]
  if sorted(s_sub) != sorted(t_sub):
    lines.append(
      f"optimizer: subspace states at {sorted(s_sub) or 'none'} in the"
      f" checkpoint, at {sorted(t_sub) or 'none'} in the target (a"
      " different method or chain)"
    )
  for node in sorted(set(s_sub) & set(t_sub)):
    s, t = s_sub[node], t_sub[node]
    where = f" (state '{node}')" if node else ""
    if sorted(s) != sorted(t):
      lines.append(
        f"projected leaves differ{where}: checkpoint {sorted(s)}, target"
        f" {sorted(t)} (a different mask)"
      )
    common = sorted(set(s) & set(t))
    methods = sorted(
      {
        f"checkpoint {s[p]['projector']}{tuple(s[p]['fields'])}"
        f", target {t[p]['projector']}{tuple(t[p]['fields'])}"
        for p in common
        if (s[p]["projector"], s[p]["fields"]) != (t[p]["projector"], t[p]["fields"])
      }
    )
    for m in methods:
      lines.append(f"method differs{where}: projector state {m}")
    ranks = [
      f"'{p}': checkpoint {s[p]['rank']}, target {t[p]['rank']}"
      for p in common
      if s[p]["rank"] != t[p]["rank"]
    ]
    if ranks:
      lines.append(
        f"rank differs{where}: {'; '.join(ranks[:6])}" + (" ..." if len(ranks) > 6 else "")
      )
  if not lines:  # e.g. another chain around the same subspace state
    lines = _table_diff("optimizer state", saved["opt_state"], target["opt_state"])
  return lines


def _abstract(tree):
  """ShapeDtypeStructs with shardings, as Orbax restores onto."""
  # This process's first device: jax.devices()[0] is another process's on all but process 0.
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def one(x):
    sharding = getattr(x, "sharding", None) or default
    return jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x), sharding=sharding)

  return jax.tree_util.tree_map(one, tree)


def save_checkpoint(
  manager: ocp.CheckpointManager,
  step: int,
  params: Any,
  opt_state: Any,
  *,
  force: bool = False,
) -> bool:
  r"""Saves parameters, optimizer state and their signature at `step`.

  Writes, under `step` of the Orbax `manager`, the items "params" and
  "opt_state" (every array of the state: projector bases and PRNG keys,
  step counts, the inner optimizer's low-rank moments) and "optax_subspace",
  a JSON signature (parameter paths, shapes and dtypes; per projected leaf
  its projector state type and rank) that `restore_checkpoint` checks. With
  an async manager (Orbax's default) the call returns once the arrays are
  copied off the devices; call ``manager.wait_until_finished()`` before
  exiting. Sharded arrays are written shard by shard, by every host.

  References:
    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection", ICML 2024, arXiv:2403.03507 (its optimizer and projector
    could not be resumed: GaLore issue #35).

  Args:
    manager: an `orbax.checkpoint.CheckpointManager`.
    step: the training step (the number of updates applied).
    params: the parameters.
    opt_state: the optimizer state, ``tx.init(params)`` after `step` updates.
    force: save even if the manager's save policy would skip this step.

  Returns:
    Whether a checkpoint was saved (as ``CheckpointManager.save``).

  Example:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> import optax_subspace as osub
    >>> params = {"w": jnp.ones((8, 16))}
    >>> tx = osub.galore(1e-3, rank=2)
    >>> manager = ocp.CheckpointManager(tempfile.mkdtemp())
    >>> osub.save_checkpoint(manager, 0, params, tx.init(params))
    True
    >>> manager.wait_until_finished()
  """
  return manager.save(
    step,
    args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      opt_state=ocp.args.StandardSave(opt_state),
      **{_SIGNATURE: ocp.args.JsonSave(_signature(params, opt_state))},
    ),
    force=force,
  )


def restore_checkpoint(
  manager: ocp.CheckpointManager,
  params: Any,
  opt_state: Any,
  *,
  step: Optional[int] = None,
) -> tuple[int, Any, Any]:
  r"""Restores parameters and optimizer state, after checking they fit.

  `params` and `opt_state` are targets: arrays, or `jax.ShapeDtypeStruct`s
  with a `sharding` (e.g. from `jax.eval_shape` and `state_shardings`);
  leaves without one go to this process's first device (with several
  processes, each gets a copy). The checkpoint's signature is
  compared with theirs first: a checkpoint of another method (projector
  state type), rank, mask or parameter tree raises `CheckpointMismatchError`
  naming every difference, before any array is read (a checkpoint without
  a signature, e.g. written by plain Orbax, is restored with a warning).
  Arrays are then restored onto the targets' shardings, on any mesh (saved
  on 8 devices, restored on 4 or 1). Restoring step N and taking M more
  steps gives, bit for bit, the state of N + M uninterrupted steps (same
  program, same devices). A `projectors.random` state saved before it kept
  its QR factor (`RandomState.factor`) is restored without it, and each
  factor is computed again from the restored key and subproblem index.

  References:
    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection", ICML 2024, arXiv:2403.03507 (GaLore issue #35: no resume).
    Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
    Parameter Models", arXiv:1910.02054 (sharded optimizer state).

  Args:
    manager: the `orbax.checkpoint.CheckpointManager` saved into.
    params: target parameters (arrays or ShapeDtypeStructs).
    opt_state: target optimizer state, e.g. ``jax.eval_shape(tx.init,
      params)`` with shardings.
    step: the step to restore; default: the latest complete one.

  Returns:
    ``(step, params, opt_state)``.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> import optax_subspace as osub
    >>> params = {"w": jnp.ones((8, 16))}
    >>> tx = osub.galore(1e-3, rank=2)
    >>> manager = ocp.CheckpointManager(tempfile.mkdtemp())
    >>> _ = osub.save_checkpoint(manager, 0, params, tx.init(params))
    >>> manager.wait_until_finished()
    >>> step, params, opt_state = osub.restore_checkpoint(
    ...     manager, params, jax.eval_shape(tx.init, params))
    >>> step
    0
  """
  if step is None:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {manager.directory}")
  try:
    saved = manager.restore(step, args=ocp.args.Composite(**{_SIGNATURE: ocp.args.JsonRestore()}))[
      _SIGNATURE
    ]
  except KeyError as e:
    if _SIGNATURE not in str(e):
      raise
    saved = None
    warnings.warn(
      f"checkpoint step {step} in {manager.directory} has no"
      f" '{_SIGNATURE}' signature (not written by save_checkpoint): it is"
      " restored without checking method, rank or parameter tree.",
      stacklevel=2,
    )
  differences = [] if saved is None else _differences(saved, _signature(params, opt_state))
  # A random projector's state written before it kept its QR factor (`RandomState.factor`):
  # restored without it, the factor is then computed from the key and subproblem it belongs to.
  legacy = None
  if differences and saved is not None:
    legacy = _without_random_factors(opt_state)
    if legacy is opt_state or _differences(_with_factor_fields(saved), _signature(params, legacy)):
      legacy = None
  if differences and legacy is None:
    raise CheckpointMismatchError(
      f"checkpoint step {step} in {manager.directory} does not fit the"
      " target:\n  " + "\n  ".join(differences)
    )
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      params=ocp.args.StandardRestore(_abstract(params)),
      opt_state=ocp.args.StandardRestore(_abstract(opt_state if legacy is None else legacy)),
    ),
  )
  restored_state = restored["opt_state"]
  if legacy is not None:
    restored_state = _restore_random_factors(restored_state, opt_state)
  return step, restored["params"], restored_state


_LEGACY_RANDOM_FIELDS = ["key", "subproblem", "basis_shape"]


def _is_random_state(x) -> bool:
  return isinstance(x, RandomState)


def _without_random_factors(opt_state):
  """`opt_state` with every `RandomState.factor` None (the state before the factor existed);
  `opt_state` itself if it has none."""
  found = []

  def strip(x):
    if _is_random_state(x) and x.factor is not None:
      found.append(x)
      return dataclasses.replace(x, factor=None)
    return x

  stripped = jax.tree_util.tree_map(strip, opt_state, is_leaf=_is_random_state)
  return stripped if found else opt_state


def _with_factor_fields(saved: dict) -> dict:
  """The saved signature with the field lists of a `RandomState` written before `factor`
  existed given it, so that it compares with a target whose factors are set aside."""
  subspaces = {
    node: {
      path: (
        {**entry, "fields": [f.name for f in dataclasses.fields(RandomState)]}
        if entry["projector"] == "RandomState" and entry["fields"] == _LEGACY_RANDOM_FIELDS
        else entry
      )
      for path, entry in leaves.items()
    }
    for node, leaves in saved["subspaces"].items()
  }
  return {**saved, "subspaces": subspaces}


def _restore_random_factors(restored, target):
  """`restored` (factors None) with each `RandomState.factor` the target has computed from the
  restored key and subproblem (`projectors.random`'s refresh: the same function), batched over
  the leaf's matrices and placed on the target's sharding."""

  def fill(state, like):
    if not _is_random_state(state) or like.factor is None:
      return state
    s, r = state.basis_shape
    batch = np.shape(state.subproblem)
    factors = jax.jit(jax.vmap(lambda k, j: subproblem_factor(k, j, s, r)))(
      state.key.reshape((-1,) + np.shape(state.key)[len(batch) :]),
      state.subproblem.reshape(-1),
    ).reshape(batch + (r, r))
    sharding = getattr(like.factor, "sharding", None)
    return dataclasses.replace(
      state, factor=factors if sharding is None else jax.device_put(factors, sharding)
    )

  return jax.tree_util.tree_map(fill, restored, target, is_leaf=_is_random_state)
