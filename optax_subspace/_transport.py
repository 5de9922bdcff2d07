"""What `on_change` does to the inner state when a matrix's basis moves.

The inner state mirrors the low-rank gradient tree (`mu` of Adam has each
projected leaf's low-rank shape, inside any chain or wrapper): its buffers
of a projected leaf are found by key path and the plan's low-rank shape,
then kept, zeroed ("reset") or re-expressed in the new basis ("transport").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from optax_subspace import _leaves

# Inner-state buffers holding non-negative statistics of squared gradients
# (optax's Adam/AdaBelief/AMSGrad/Yogi `nu`, RMSProp `nu`, Adagrad
# `sum_of_squares`, Adafactor's unfactored `v`, Adadelta's `e_g` and `e_x`):
# "transport" moves them with M⊙M instead of M.
SECOND_MOMENT_FIELDS = frozenset(
  {"nu", "nu_max", "sum_of_squares", "v", "exp_avg_sq", "e_g", "e_x"}
)
# Inner-state buffers linear in the gradient (Adam's and Lion's `mu`, SGD
# momentum's `trace`, `m`, `exp_avg`): "transport" moves them with M. A
# low-rank buffer in neither set (a step size, Rprop's `step_sizes`) has no
# known way into a new basis, and "transport" refuses it at `init`.
FIRST_MOMENT_FIELDS = frozenset({"mu", "trace", "m", "exp_avg"})
# State types whose field names would mislead the two sets above, with their
# own (first, second) moment fields: optax.adan's `v` averages gradient
# differences (linear), `n` is its second moment, `g` the last gradient.
STATE_MOMENT_FIELDS = {
  "ScaleByAdanState": (frozenset({"m", "v", "g"}), frozenset({"n"})),
}
# State types "transport" refuses whatever their fields, and why.
TRANSPORT_REFUSED = {
  "ScaleByRStdDevState": (
    "centered RMSProp takes √(nu − mu²), and nu moved with M⊙M and mu"
    " with M separately need not keep nu ≥ mu² (NaN)"
  ),
}
# Per-matrix step counts of the inner state (shape: the leaf's batch shape),
# restarted by on_change="reset" with the matrix's moments.
MATRIX_COUNT_FIELDS = frozenset({"count"})


def _namedtuple_types(tree) -> dict:
  """{key path: type name} of every NamedTuple node of `tree` (the states)."""
  found = {}

  def walk(node, path):
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      found[path] = type(node).__name__
    for sub, child in jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[
      0
    ]:
      if sub:
        walk(child, path + tuple(sub))

  walk(tree, ())
  return found


def _moment_kind(owner, name):
  """ "first", "second" or None (unknown) for inner-state field `name` of a
  state of type `owner`."""
  first, second = STATE_MOMENT_FIELDS.get(owner, (FIRST_MOMENT_FIELDS, SECOND_MOMENT_FIELDS))
  if name in second:
    return "second"
  return "first" if name in first else None


def low_rank_buffers(state_tree, plans, key_paths):
  """Finds the inner-state buffers that mirror a projected leaf.

  A buffer mirrors leaf i when its key path ends with the leaf's key path and
  it has the leaf's low-rank shape (so `mu` of `scale_by_adam`, inside any
  chain or `inject_hyperparams`, is found; factored statistics are not), or
  it is a per-matrix step count (a field in `MATRIX_COUNT_FIELDS` with the
  leaf's batch shape: `scale_by_hf_adam(per_matrix_count=True)`).
  Returns {state leaf index: (param leaf index, field name, moment kind)},
  the kind from `_moment_kind` ("first", "second" or None).
  """
  by_path = {tuple(kp): i for i, (kp, p) in enumerate(zip(key_paths, plans)) if p.projected}
  flat, _ = jax.tree_util.tree_flatten_with_path(state_tree)
  owners = None
  found = {}
  for j, (path, x) in enumerate(flat):
    for cut in range(len(path) + 1):
      i = by_path.get(tuple(path[cut:]))
      if i is None:
        continue
      field = path[cut - 1] if cut > 0 else None
      name = getattr(field, "name", getattr(field, "key", None))
      if np.shape(x) == plans[i].low_rank_shape or (
        name in MATRIX_COUNT_FIELDS and np.shape(x) == plans[i].batch_shape
      ):
        if owners is None:
          owners = _namedtuple_types(state_tree)
        owner = owners.get(tuple(path[: max(cut - 1, 0)]))
        found[j] = (i, name, _moment_kind(owner, name))
        break
  return found


def check_transport(state_tree, plans, key_paths):
  """Raises ValueError, naming the buffer, for inner state that "transport"
  cannot carry into a new basis.

  Carried: buffers of a projected leaf's low-rank shape whose field is a
  known first or second moment (`FIRST_MOMENT_FIELDS`,
  `SECOND_MOMENT_FIELDS`, `STATE_MOMENT_FIELDS`), per-matrix counts, and a
  leaf's scalars (Novograd's per-layer ‖R‖² average, kept: a change of
  basis within the subspace preserves it). Refused: a low-rank buffer of
  another field (Rprop's step sizes), and a buffer of a projected leaf with
  another shape (factored or per-axis statistics: Adafactor's v_row and
  v_col, SM3's accumulators), found by the leaf's key path anywhere in its
  key path.
  """
  known = low_rank_buffers(state_tree, plans, key_paths)
  by_path = {
    tuple(kp): i for i, (kp, p) in enumerate(zip(key_paths, plans)) if p.projected and len(kp)
  }
  flat, _ = jax.tree_util.tree_flatten_with_path(state_tree)
  owners = _namedtuple_types(state_tree)
  for j, (path, x) in enumerate(flat):
    where = f"inner-state buffer '{_leaves.path_str(path)}'"
    if j in known:
      i, name, kind = known[j]
      owner = next(
        (
          owners[tuple(path[:k])]
          for k in range(len(path), -1, -1)
          if owners.get(tuple(path[:k])) in TRANSPORT_REFUSED
        ),
        None,
      )
      if owner is not None:
        raise ValueError(
          f"on_change='transport' cannot move {where} ({owner}):"
          f" {TRANSPORT_REFUSED[owner]}. Use on_change='keep' or 'reset'."
        )
      if kind is None and name not in MATRIX_COUNT_FIELDS:
        raise ValueError(
          f"on_change='transport' cannot move {where} (field {name!r},"
          f" the low-rank shape of leaf '{plans[i].path}'): it is neither a"
          " first moment (FIRST_MOMENT_FIELDS) nor a second moment"
          " (SECOND_MOMENT_FIELDS), so there is no known way to express it"
          " in a new basis. Use on_change='keep' or 'reset'."
        )
      continue
    owner = next(
      (
        by_path[tuple(path[cut:end])]
        for end in range(len(path), 0, -1)
        for cut in range(end)
        if tuple(path[cut:end]) in by_path
      ),
      None,
    )
    if owner is not None and np.size(x) > 1 and np.shape(x) != (plans[owner].batch_shape):
      raise ValueError(
        f"on_change='transport' cannot move {where} of shape"
        f" {np.shape(x)}: it belongs to leaf '{plans[owner].path}' but is"
        f" not of its low-rank shape {plans[owner].low_rank_shape} (a"
        " factored or per-axis statistic, such as Adafactor's v_row and"
        " v_col or SM3's accumulators, has no image in a new basis). Use"
        " on_change='keep' or 'reset'."
      )


def on_change(mode, inner_state, plans, key_paths, old_bases, new_bases, changed):
  """Applies `on_change` to the inner state for matrices whose basis moved."""
  if mode == "keep" or not changed:
    return inner_state
  flat, treedef = jax.tree_util.tree_flatten(inner_state)
  for j, (i, name, kind) in low_rank_buffers(inner_state, plans, key_paths).items():
    if i not in changed:
      continue
    plan, buf = plans[i], flat[j]
    if name in MATRIX_COUNT_FIELDS and np.shape(buf) == plan.batch_shape:
      if mode == "reset":  # restart the matrix's bias correction with it
        flat[j] = jnp.where(changed[i], jnp.zeros_like(buf), buf)
      continue
    moved = changed[i][..., None, None]
    oriented = _leaves.low_rank_layout(buf, plan).astype(jnp.float32)
    if mode == "reset":
      new = jnp.where(moved, 0.0, oriented)
    else:  # transport: express the buffer in the new basis, M = P_newᵀ P_old
      m = jnp.einsum("...sr,...sq->...rq", new_bases[i], old_bases[i])
      if kind == "second":
        m = m * m  # variances of uncorrelated coordinates: Σ_q M_rq² v_q
      new = jnp.where(moved, jnp.einsum("...rq,...ql->...rl", m, oriented), oriented)
    flat[j] = _leaves.low_rank_layout(new, plan).astype(buf.dtype)
  return jax.tree_util.tree_unflatten(treedef, flat)
