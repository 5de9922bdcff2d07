"""`refresh_due`: the host's answer to "does this step refresh the subspace?".

The schedule belongs to the projector (`projectors.RefreshSchedule`, its
`needs_refresh`) and `project_subspace` keeps it in its state, as a static
pytree with no leaves. The state is what every caller holds and what every
wrapper carries (`optax.chain`, `optax.masked`, `optax.partition`,
`optax.MultiSteps`, `optax.inject_hyperparams`, `nnx.Optimizer`), so the
schedule is found there, by type, whatever wraps the transformation.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np

from optax_subspace import _combinator
from optax_subspace import _leaves
from optax_subspace.projectors import _base


class RefreshScheduleError(RuntimeError):
  """A step's ``subspace_refresh`` disagreed with the projector's schedule,
  or the step given to `refresh_due` is not the optimizer state's."""


def _is_state(x) -> bool:
  return isinstance(x, _combinator.ProjectSubspaceState)


def _states(opt_state) -> list:
  return [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_state) if _is_state(x)]


def refresh_schedule(opt_state: Any) -> Optional[_base.RefreshSchedule]:
  """The refresh schedule of the `project_subspace` states in `opt_state`.

  Reads no array (an abstract state from ``jax.eval_shape(tx.init, params)``
  will do), so it is free to call once, before the loop.

  References:
    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection", ICML 2024, arXiv:2403.03507 (the refresh every T steps).

  Args:
    opt_state: an optimizer state, or a tree holding one (an
      `nnx.Optimizer`'s ``opt_state``), in any chain or wrapper.

  Returns:
    The `projectors.RefreshSchedule` (call it on a step: a bool), or None
    when the state holds no `project_subspace` state. Raises ValueError when
    a projector declares no schedule (a custom ``needs_refresh``) or when the
    states' schedules differ: one ``subspace_refresh`` goes to all of them.

  Example:
    >>> import jax, jax.numpy as jnp, optax_subspace as osub
    >>> tx = osub.galore(1e-3, rank=2, update_every=50)
    >>> state = jax.eval_shape(tx.init, {"w": jnp.ones((4, 8))})
    >>> osub.refresh_schedule(state)(100)
    True
  """
  states = _states(opt_state)
  if not states:
    return None
  schedules = {s.schedule for s in states}
  if None in schedules:
    raise ValueError(
      "a projector of this optimizer declares no RefreshSchedule (its"
      " needs_refresh is a plain function): the host cannot tell its"
      " refresh steps. Pass no subspace_refresh (the device decides), or"
      " give the projector needs_refresh=projectors.RefreshSchedule(T)."
    )
  if len(schedules) > 1:
    raise ValueError(
      f"the optimizer's projectors refresh on different schedules"
      f" ({', '.join(sorted(map(repr, schedules)))}); one subspace_refresh"
      " flag reaches all of them, so pass none (the device decides)."
    )
  return schedules.pop()


def _computed_int(x) -> Optional[int]:
  """`x` as a Python int when its value is already on hand; never waits."""
  x = _leaves.unwrap_variables(x)
  if isinstance(x, jax.core.Tracer):
    raise TypeError(
      "refresh_due runs on the host, before the step: pass the concrete"
      " optimizer state, not a traced one."
    )
  if x is None or isinstance(x, jax.ShapeDtypeStruct):
    return None
  if isinstance(x, jax.Array):
    if x.is_deleted() or not x.is_ready():
      return None
    return int(np.asarray(x.addressable_data(0)))
  return int(np.asarray(x))


def refresh_due(opt_state: Any, step: int) -> Optional[bool]:
  r"""Whether optimizer step `step` refreshes the subspace: the update's ``subspace_refresh``.

  The answer is the projector's own schedule (`refresh_schedule`), so a
  train loop passes ``tx.update(g, opt_state, params,
  subspace_refresh=osub.refresh_due(opt_state, step))`` (static under jit:
  one program for refresh steps, one for the others, neither with a
  refresh `lax.cond`, so no host sync at it on a GPU) without knowing the
  method. Before answering it checks, on arrays the device has already
  computed (it never waits for one: no sync), that the state's step count
  is `step` and that no earlier step's ``subspace_refresh`` disagreed with
  the schedule; so a wrong flag is reported at the latest at the first
  call after the host next reads a result of that step (a logged loss).

  References:
    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection", ICML 2024, arXiv:2403.03507 (the refresh every T steps).

  Args:
    opt_state: the optimizer state that goes into this step's update (any
      chain or wrapper around `project_subspace`; an `nnx.Optimizer`'s
      ``opt_state``).
    step: the optimizer step, 0 for the first update: the count the
      projector's schedule reads (optimizer updates, not micro-batches).

  Returns:
    A Python bool, or None when the state holds no `project_subspace` state
    (pass no ``subspace_refresh`` then). Raises `RefreshScheduleError` when
    the state records a disagreeing flag, or its count is not `step`.

  Example:
    >>> import jax.numpy as jnp, optax_subspace as osub
    >>> params = {"w": jnp.ones((4, 8))}
    >>> tx = osub.galore(1e-3, rank=2, update_every=2)
    >>> state = tx.init(params)
    >>> for step in range(3):
    ...   due = osub.refresh_due(state, step)
    ...   _, state = tx.update(params, state, params, subspace_refresh=due)
  """
  schedule = refresh_schedule(opt_state)
  if schedule is None:
    return None
  for state in _states(opt_state):
    mismatch = _computed_int(state.refresh_mismatch)
    if mismatch is not None and mismatch >= 0:
      raise RefreshScheduleError(
        f"step {mismatch} got subspace_refresh={not schedule(mismatch)},"
        f" but the projector's schedule ({schedule}) says"
        f" {schedule(mismatch)}: that step's projected updates are NaN."
        " Pass subspace_refresh=osub.refresh_due(opt_state, step), or"
        " none (the device then decides)."
      )
    count = _computed_int(state.count)
    if count is not None and count != step:
      raise RefreshScheduleError(
        f"refresh_due was asked about step {step}, but the optimizer state"
        f" has taken {count} steps: the schedule reads the state's count"
        " (optimizer updates, from 0)."
      )
  return bool(schedule(step))
