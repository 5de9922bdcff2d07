"""`project_subspace`: run any Optax transformation in a low-rank subspace."""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_subspace import _chunks
from optax_subspace import _leaves
from optax_subspace.projectors import _base

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
        " with M separately need not keep nu ≥ mu² (NaN)"),
}
# Per-matrix step counts of the inner state (shape: the leaf's batch shape),
# restarted by on_change="reset" with the matrix's moments.
MATRIX_COUNT_FIELDS = frozenset({"count"})
ON_CHANGE = ("keep", "reset", "transport")
# The dense products with G run on rows padded with zeros to a multiple of
# this many elements. GPU tensor-core GEMMs need 16-byte-aligned rows: an
# (s, l) float32 gradient with l % 4 != 0 (bf16: l % 8) gets an align-1
# kernel; at LLaMA-1B's ffn 5461 those ran at ~80 TFLOP/s against ~120-300
# for aligned shapes on an H200 (benchmarks/results/profile_update_h200.json).
# Zero columns project to zero columns and are cut off after the
# back-projection, so no value changes; the cost is one copy of such a
# gradient. 1 turns the padding off.
PRODUCT_ALIGNMENT = 8
# The per-step r×r work of a stepped projector (OSD's ∇P) runs stacked over the
# leaves of one (s, r), so that 168 separate LLaMA-1B matrices make one batch
# and not 168 calls of a few tiles each. A leaf that is already a batch of at
# least this many matrices (a scanned model's stacked kernel) runs its own:
# stacking it would only copy its P and inputs.
OWN_BATCH_MATRICES = 8


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
  """

  count: jax.Array
  projectors: Any
  inner: optax.OptState
  schedule: Any = None
  refresh_mismatch: Any = None


def _over_batch(fn, plan: _leaves.LeafPlan, *args, in_axes):
  """Applies a one-matrix function to every matrix of a leaf.

  Mapped arguments have the leaf's batch axes leading; they are flattened to
  one axis, vmapped, and the outputs get the batch axes back. A plain matrix
  (no batch axes) is passed straight through: no size-1 batch dimension for
  XLA to carry into every product.
  """
  if not plan.batch_shape:
    return fn(*args)
  b = plan.num_matrices
  flat = [
      jax.tree_util.tree_map(lambda x: x.reshape((b,) + x.shape[
          len(plan.batch_shape):]), a) if ax == 0 else a
      for a, ax in zip(args, in_axes)
  ]
  out = jax.vmap(fn, in_axes=in_axes)(*flat)
  return jax.tree_util.tree_map(
      lambda x: x.reshape(plan.batch_shape + x.shape[1:]), out
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
  got = {_leaves.path_str(p): x
         for p, x in jax.tree_util.tree_flatten_with_path(pstate)[0]}
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


def _by_shape(fn, plans, leaves, group, *trees):
  """Applies a one-matrix function to the matrices of many leaves, batched.

  `trees` are dicts {leaf: pytree with the leaf's batch axes leading}; the
  leaves whose `group(plan)` agree are concatenated along one batch axis and
  go through one vmapped `fn`, so a tree of 170 matrices compiles to a few
  batched calls, not 170. Returns {leaf: output, batch axes restored}.
  """
  groups: dict[Any, list[int]] = {}
  for i in leaves:
    groups.setdefault(group(plans[i]), []).append(i)
  results = {}
  for members in groups.values():
    flat = lambda x, i: x.reshape((plans[i].num_matrices,) + x.shape[
        len(plans[i].batch_shape):])
    cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=0)
    stacked = [
        jax.tree_util.tree_map(
            lambda *xs: cat([flat(x, i) for x, i in zip(xs, members)]),
            *[tree[i] for i in members])
        for tree in trees
    ]
    out = jax.vmap(fn)(*stacked)
    start = 0
    for i in members:
      plan, stop = plans[i], start + plans[i].num_matrices
      results[i] = jax.tree_util.tree_map(
          lambda x: x[start:stop].reshape(plan.batch_shape + x.shape[1:]), out)
      start = stop
  return results


def _refresh_by_shape(projector, plans, pstates, grads, count, prepare,
                      chunk_bytes, due=None):
  """Refreshes every projected matrix when due: by (s, l, r), chunk by chunk.

  `grads` are the gradients as they come; `prepare(i, g)` orients and casts
  one inside its chunk's refresh. Each chunk (`chunk_bytes` of float32
  gradients at most; a leaf is never split) is one `lax.cond` on
  `needs_refresh(count)` whose refresh branch is one vmapped call on the
  chunk's stacked gradients;
  an optimization barrier orders the chunks, so chunk k + 1's gradients are
  read only once chunk k's bases exist. A cond's operands must all exist
  before it runs: one cond over every gradient kept every gradient (and any
  elementwise producer of it, a cast, a clipping scale) materialised at once,
  and its stacked float32 copies made GaLore's 7B step need more memory than
  AdamW's. `due`: the caller's static answer to `needs_refresh(count)` (a
  Python bool), which replaces the conds: False returns the states as they
  are, True refreshes every chunk. Returns ({leaf: state}, {leaf: changed}).
  """
  if due is False:
    return dict(pstates), {i: jnp.zeros(plans[i].batch_shape, bool) for i in pstates}
  static = due is True
  states, changed, previous = {}, {}, None
  due = projector.needs_refresh(count)
  shape = lambda i: (plans[i].side, plans[i].other, plans[i].rank)
  size = lambda i: 4 * plans[i].num_matrices * plans[i].side * plans[i].other
  for _, chunk in _chunks.chunks(list(pstates), shape, size, chunk_bytes):
    sub, raw = _chunks.after(previous, ({i: pstates[i] for i in chunk},
                                        {i: grads[i] for i in chunk}))
    no_change = {i: jnp.zeros(plans[i].batch_shape, bool) for i in chunk}
    refreshed = lambda s, raw, chunk=chunk: _by_shape(
        lambda state, g: projector.refresh(state, g, count), plans, chunk,
        lambda p: (p.side, p.other, p.rank), s,
        {i: prepare(i, g) for i, g in raw.items()})
    branches = (
        lambda s, raw, f=refreshed: {i: (st, ok) for i, (st, ok) in f(s, raw).items()},
        lambda s, raw, nc=no_change: {i: (s[i], nc[i]) for i in s})
    out = branches[0](sub, raw) if static else jax.lax.cond(due, *branches, sub, raw)
    for i, (state, ok) in out.items():
      states[i], changed[i] = state, ok
    previous = out
  return states, changed


def _step_group(plan: _leaves.LeafPlan):
  """The stacking key of a leaf's per-step projector work: (s, r), or the leaf
  alone when it is a batch of `OWN_BATCH_MATRICES` matrices or more."""
  if plan.num_matrices >= OWN_BATCH_MATRICES:
    return (plan.side, plan.rank, plan)
  return (plan.side, plan.rank)


def _bases_by_shape(projector, plans, pstates):
  """P of every projected matrix, one vmapped `basis` call per (s, r)."""
  return _by_shape(projector.basis, plans, list(pstates),
                   lambda p: (p.side, p.rank), pstates)


def _namedtuple_types(tree) -> dict:
  """{key path: type name} of every NamedTuple node of `tree` (the states)."""
  found = {}

  def walk(node, path):
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      found[path] = type(node).__name__
    for sub, child in jax.tree_util.tree_flatten_with_path(
        node, is_leaf=lambda x: x is not node)[0]:
      if sub:
        walk(child, path + tuple(sub))

  walk(tree, ())
  return found


def _moment_kind(owner, name):
  """"first", "second" or None (unknown) for inner-state field `name` of a
  state of type `owner`."""
  first, second = STATE_MOMENT_FIELDS.get(
      owner, (FIRST_MOMENT_FIELDS, SECOND_MOMENT_FIELDS))
  if name in second:
    return "second"
  return "first" if name in first else None


def _low_rank_buffers(state_tree, plans, key_paths):
  """Finds the inner-state buffers that mirror a projected leaf.

  A buffer mirrors leaf i when its key path ends with the leaf's key path and
  it has the leaf's low-rank shape (so `mu` of `scale_by_adam`, inside any
  chain or `inject_hyperparams`, is found; factored statistics are not), or
  it is a per-matrix step count (a field in `MATRIX_COUNT_FIELDS` with the
  leaf's batch shape: `scale_by_hf_adam(per_matrix_count=True)`).
  Returns {state leaf index: (param leaf index, field name, moment kind)},
  the kind from `_moment_kind` ("first", "second" or None).
  """
  by_path = {
      tuple(kp): i for i, (kp, p) in enumerate(zip(key_paths, plans))
      if p.projected
  }
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
          name in MATRIX_COUNT_FIELDS
          and np.shape(x) == plans[i].batch_shape):
        if owners is None:
          owners = _namedtuple_types(state_tree)
        owner = owners.get(tuple(path[:max(cut - 1, 0)]))
        found[j] = (i, name, _moment_kind(owner, name))
        break
  return found


def _check_transport(state_tree, plans, key_paths):
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
  known = _low_rank_buffers(state_tree, plans, key_paths)
  by_path = {tuple(kp): i for i, (kp, p) in enumerate(zip(key_paths, plans))
             if p.projected and len(kp)}
  flat, _ = jax.tree_util.tree_flatten_with_path(state_tree)
  owners = _namedtuple_types(state_tree)
  for j, (path, x) in enumerate(flat):
    where = f"inner-state buffer '{_leaves.path_str(path)}'"
    if j in known:
      i, name, kind = known[j]
      owner = next((owners[tuple(path[:k])] for k in range(len(path), -1, -1)
                    if owners.get(tuple(path[:k])) in TRANSPORT_REFUSED), None)
      if owner is not None:
        raise ValueError(
            f"on_change='transport' cannot move {where} ({owner}):"
            f" {TRANSPORT_REFUSED[owner]}. Use on_change='keep' or 'reset'.")
      if kind is None and name not in MATRIX_COUNT_FIELDS:
        raise ValueError(
            f"on_change='transport' cannot move {where} (field {name!r},"
            f" the low-rank shape of leaf '{plans[i].path}'): it is neither a"
            " first moment (FIRST_MOMENT_FIELDS) nor a second moment"
            " (SECOND_MOMENT_FIELDS), so there is no known way to express it"
            " in a new basis. Use on_change='keep' or 'reset'.")
      continue
    owner = next((by_path[tuple(path[cut:end])]
                  for end in range(len(path), 0, -1) for cut in range(end)
                  if tuple(path[cut:end]) in by_path), None)
    if owner is not None and np.size(x) > 1 and np.shape(x) != (
        plans[owner].batch_shape):
      raise ValueError(
          f"on_change='transport' cannot move {where} of shape"
          f" {np.shape(x)}: it belongs to leaf '{plans[owner].path}' but is"
          f" not of its low-rank shape {plans[owner].low_rank_shape} (a"
          " factored or per-axis statistic, such as Adafactor's v_row and"
          " v_col or SM3's accumulators, has no image in a new basis). Use"
          " on_change='keep' or 'reset'.")


def _on_change(mode, inner_state, plans, key_paths, old_bases, new_bases,
               changed):
  """Applies `on_change` to the inner state for matrices whose basis moved."""
  if mode == "keep" or not changed:
    return inner_state
  flat, treedef = jax.tree_util.tree_flatten(inner_state)
  for j, (i, name, kind) in _low_rank_buffers(inner_state, plans,
                                              key_paths).items():
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
      new = jnp.where(moved, jnp.einsum("...rq,...ql->...rl", m, oriented),
                      oriented)
    flat[j] = _leaves.low_rank_layout(new, plan).astype(buf.dtype)
  return jax.tree_util.tree_unflatten(treedef, flat)


def project_subspace(
    inner: optax.GradientTransformation,
    projector: _base.Projector,
    *,
    scale: float = 1.0,
    mask: _leaves.MaskSpec = None,
    dims: _leaves.DimsSpec = None,
    on_change: str = "keep",
    projection_dtype=None,
    side: str = "smaller",
    refresh_chunk_bytes: int | None = None,
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

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_subspace as osub
    >>> params = {"w": jnp.ones((8, 16)), "b": jnp.zeros(16)}
    >>> tx = osub.project_subspace(optax.adam(1e-2), osub.projectors.svd(2, 10))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
  """
  if on_change not in ON_CHANGE:
    raise ValueError(f"on_change must be one of {ON_CHANGE}, got {on_change!r}.")
  if side not in _leaves.SIDES:
    raise ValueError(f"side must be one of {_leaves.SIDES}, got {side!r}.")
  if refresh_chunk_bytes is not None and (
      isinstance(refresh_chunk_bytes, bool)
      or not isinstance(refresh_chunk_bytes, (int, np.integer))
      or refresh_chunk_bytes <= 0):
    raise ValueError(
        "refresh_chunk_bytes must be None or a positive int (bytes),"
        f" got {refresh_chunk_bytes!r}.")
  rank = projector.rank
  schedule = (projector.needs_refresh if isinstance(
      projector.needs_refresh, _base.RefreshSchedule) else None)

  def plan(tree, quiet):
    with warnings.catch_warnings():
      if quiet:
        warnings.simplefilter("ignore")
      plans, treedef = _leaves.plan_leaves(tree, rank, mask, dims, side)
    key_paths = [kp for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return plans, treedef, key_paths

  def init_projector(i, p: _leaves.LeafPlan):
    """States of leaf i's matrices, batch axes leading; keys from i."""
    keys = _base.matrix_keys(i, p.num_matrices)
    one = lambda key: projector.init(p.side, p.other, p.rank, key)
    return jax.tree_util.tree_map(
        lambda y: y.reshape(p.batch_shape + y.shape[1:]), jax.vmap(one)(keys)
    )

  def init_fn(params):
    plans, treedef, key_paths = plan(params, quiet=False)
    leaves = treedef.flatten_up_to(params)
    pstates, low_rank = [], []
    for i, (p, x) in enumerate(zip(plans, leaves)):
      if not p.projected:
        pstates.append(optax.MaskedNode())
        low_rank.append(x)
        continue
      pstates.append(init_projector(i, p))
      low_rank.append(jnp.zeros(p.low_rank_shape, jnp.result_type(x)))
    inner_state = inner.init(treedef.unflatten(low_rank))
    if on_change == "transport":
      _check_transport(inner_state, plans, key_paths)
    return ProjectSubspaceState(
        count=jnp.zeros([], jnp.int32),
        projectors=projector_treedef(params).unflatten(pstates),
        inner=inner_state,
        schedule=schedule,
        refresh_mismatch=jnp.full([], -1, jnp.int32),
    )

  def _update(updates, state, params=None, *, subspace_refresh=None,
              **extra_args):
    if subspace_refresh is not None and not isinstance(subspace_refresh,
                                                       (bool, np.bool_)):
      raise TypeError(
          "subspace_refresh must be None, True or False (a Python bool the"
          " caller computes from its step count; under jit a static argument),"
          f" got {type(subspace_refresh).__name__}.")
    plans, treedef, key_paths = plan(updates, quiet=True)
    g_leaves = treedef.flatten_up_to(updates)
    p_leaves = None if params is None else treedef.flatten_up_to(params)
    pstates = dict(enumerate(
        projector_treedef(updates).flatten_up_to(state.projectors)))
    projected = [i for i, p in enumerate(plans) if p.projected]
    for i in projected:
      template = jax.eval_shape(lambda i=i: init_projector(i, plans[i]))
      pstates[i] = _restore_structure(pstates[i], template)
    count = state.count
    inner_state = state.inner
    compute_dtype = projection_dtype or jnp.float32
    orient = lambda i, g: _leaves.to_oriented(g, plans[i]).astype(compute_dtype)
    grads = {i: orient(i, g_leaves[i]) for i in projected}

    def bases():
      """P of every projected matrix in its current state."""
      if projector.batch_basis:
        return _bases_by_shape(projector, plans,
                               {i: pstates[i] for i in projected})
      return {i: _over_batch(projector.basis, plans[i], pstates[i], in_axes=(0,))
              for i in projected}

    # 1. Refresh (GaLore: steps 0, T, 2T, ...; OSD: step 0), under a cond
    # per chunk of matrices. The conds take the gradients as they come and
    # orient them inside the refresh branch: an oriented (transposed, cast)
    # gradient passed in as an operand would be materialised every step,
    # refresh or not, where outside the cond XLA folds the transpose into the
    # products that read it.
    transport = on_change == "transport"
    old = bases() if transport else None
    if projected:
      sub, changed = _refresh_by_shape(
          projector, plans, {i: pstates[i] for i in projected},
          {i: g_leaves[i] for i in projected}, count, orient,
          _chunks.OPTIMIZER_REFRESH_CHUNK_BYTES if refresh_chunk_bytes is None
          else refresh_chunk_bytes,
          None if subspace_refresh is None else bool(subspace_refresh))
      pstates.update(sub)
    # This step's basis, evaluated once and shared by every product below
    # and by "transport" (a random projector regenerates P, a QR, at each
    # `basis` call). Projectors with their own `project` and `back` (row
    # selections) never form it unless "transport" needs it.
    dense = projector.project is None or projector.back is None
    current = bases() if dense or transport else None
    if projected:
      inner_state = _on_change(on_change, inner_state, plans, key_paths, old,
                               current, changed)

    def product(own, dense_product, i, x):
      """own(state, x) where the projector has it, else dense_product(P, x)."""
      if own is not None:
        return _over_batch(own, plans[i], pstates[i], x, in_axes=(0, 0))
      return _over_batch(dense_product, plans[i], current[i], x, in_axes=(0, 0))

    project = functools.partial(product, projector.project, _base.dense_project)
    back = functools.partial(product, projector.back, _base.dense_back)

    def padding(i, own):
      """Columns to add to leaf i's (…, l) operands of the dense products.

      Only where the kept side is the leaf's last axis (rows projected, no
      axis permutation), the axis whose length is the GEMM's row stride; a
      leaf projected on its columns is read in its own layout, rows of s.
      """
      plan = plans[i]
      if own is not None or plan.axis != 0 or plan.perm != tuple(
          range(len(plan.shape))):
        return 0
      return -plan.other % PRODUCT_ALIGNMENT

    def pad(x, extra):
      return x if not extra else jnp.pad(
          x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])

    def cut(x, extra):
      return x if not extra else x[..., :x.shape[-1] - extra]

    # 2. Project, run the inner transformation on the mixed tree. A split
    # `advance` (OSD) takes what it needs from G now, while the (padded) G is
    # at hand, so no copy of it stays alive across the inner update.
    low, inputs = {}, {}
    for i in projected:
      extra = padding(i, projector.project)
      g = pad(grads[i], extra)
      r = project(i, g)
      low[i] = cut(r, extra)
      if projector.advance is not None and projector.advance_inputs is not None:
        inputs[i] = _over_batch(projector.advance_inputs, plans[i], pstates[i],
                                g, r, in_axes=(0, 0, 0))
    inner_grads = list(g_leaves)
    inner_params = None if p_leaves is None else list(p_leaves)
    for i in projected:
      dtype = jnp.result_type(g_leaves[i])
      inner_grads[i] = _leaves.low_rank_layout(low[i], plans[i]).astype(dtype)
      if inner_params is not None:
        w = _leaves.to_oriented(p_leaves[i], plans[i]).astype(compute_dtype)
        extra = padding(i, projector.project)
        inner_params[i] = _leaves.low_rank_layout(
            cut(project(i, pad(w, extra)), extra), plans[i]).astype(
                jnp.result_type(p_leaves[i]))
    inner_updates, inner_state = optax.with_extra_args_support(inner).update(
        treedef.unflatten(inner_grads),
        inner_state,
        None if inner_params is None else treedef.unflatten(inner_params),
        **extra_args,
    )

    # 3. Back-project with the same basis, scale. A static `subspace_refresh`
    # that disagrees with the projector's schedule makes every projected
    # update NaN (the run stops where it went wrong rather than training
    # with stale or extra refreshes) and records the step in the state,
    # where `refresh_due` finds it and raises. Both are a scalar compare on
    # the device, read by the multiply by α: no host sync.
    alpha = scale
    mismatch = state.refresh_mismatch
    if subspace_refresh is not None and projected:
      agrees = projector.needs_refresh(count) == bool(subspace_refresh)
      alpha = jnp.where(agrees, scale, jnp.nan).astype(jnp.float32)
      if mismatch is not None:
        mismatch = jnp.where((mismatch < 0) & ~agrees, count, mismatch)
    out = treedef.flatten_up_to(inner_updates)
    for i in projected:
      if projector.back is None and plans[i].axis == 1:
        # (P N)ᵀ = Nᵀ Pᵀ, and Nᵀ is the inner layout (l, r) of a leaf
        # projected on its columns: the product lands in the leaf's layout,
        # with no transpose of an s×l result.
        n_t = out[i].astype(compute_dtype)
        flipped = _over_batch(
            lambda p, x: jnp.matmul(x, p.T.astype(x.dtype),
                                    preferred_element_type=jnp.float32),
            plans[i], current[i], n_t, in_axes=(0, 0))
        if plans[i].perm == tuple(range(len(plans[i].shape))):
          # Already the leaf's layout: returned as it is. Swapped to (s, l) and
          # back, XLA folded the outer transpose into the product (computing
          # P·N again) and copied the s×l result into the leaf's layout: 1.3 ms
          # of LLaMA-1B's GaLore step (H200, profile_update_h200_b210501.json).
          out[i] = (flipped * alpha).reshape(plans[i].shape).astype(
              jnp.result_type(g_leaves[i]))
          continue
        oriented = jnp.swapaxes(flipped, -1, -2)
      else:
        n = _leaves.low_rank_layout(out[i], plans[i]).astype(compute_dtype)
        extra = padding(i, projector.back)
        oriented = cut(back(i, pad(n, extra)), extra)
      out[i] = _leaves.from_oriented(oriented * alpha, plans[i]).astype(
          jnp.result_type(g_leaves[i]))

    # 4. Advance (OSD: one online-PCA step gives P_{t+1} for the next step).
    if projector.advance is not None and projected:
      changed = {}
      if projector.advance_direction is not None:
        # What read G was taken in step 2; the direction (OSD: ∇P, a few
        # small products) stacked by (s, r) from P and those inputs only, one
        # call for all matrices; the step on P per leaf, so the projector's
        # optimizer state is read and written in place, never stacked (2 ms
        # less than stacking it too: profile_update_h200_f125423.json).
        directions = _by_shape(projector.advance_direction, plans, projected,
                               _step_group, current, inputs)
        for i in projected:
          pstates[i], changed[i] = _over_batch(
              lambda st, x, d: projector.advance_apply(st, x, d, count),
              plans[i], pstates[i], inputs[i], directions[i],
              in_axes=(0, 0, 0))
      elif projector.advance_inputs is not None:
        # What read G was taken in step 2; the rest stacked by (s, r), one
        # call for all matrices.
        advanced = _by_shape(
            lambda st, x: projector.advance_update(st, x, count), plans,
            projected, _step_group,
            {i: pstates[i] for i in projected}, inputs)
        for i in projected:
          pstates[i], changed[i] = advanced[i]
      else:
        for i in projected:
          pstates[i], changed[i] = _over_batch(
              lambda st, g, r: projector.advance(st, g, r, count),
              plans[i], pstates[i], grads[i], low[i], in_axes=(0, 0, 0),
          )
      inner_state = _on_change(on_change, inner_state, plans, key_paths,
                               current, bases() if transport else None,
                               changed)

    new_state = ProjectSubspaceState(
        count=optax.safe_increment(count),
        projectors=projector_treedef(updates).unflatten(
            [pstates[i] for i in range(len(plans))]),
        inner=inner_state,
        schedule=state.schedule,
        refresh_mismatch=mismatch,
    )
    return treedef.unflatten(out), new_state

  def update_fn(updates, state, params=None, **extra_args):
    # Under Explicit mesh axes (jax.make_mesh's default in current JAX) every
    # array's type carries its sharding, and the projectors' products (e.g.
    # the Gram matrix G·Gᵀ of a gradient sharded on its rows) raise
    # ShardingTypeError when traced there. So the update runs with those
    # axes switched to Auto, where XLA's partitioner places the products as
    # under jit's in/out shardings, and its outputs are given back the
    # inputs' shardings, so the state's types are the same every step.
    # Inputs on no Explicit axis (Auto meshes, one device, numpy arrays
    # outside a `jax.set_mesh`), and JAX versions without explicit sharding,
    # take the plain path.
    sharding = jax.sharding
    if not hasattr(jax, "typeof") or not all(hasattr(sharding, n) for n in (
        "AxisType", "auto_axes", "use_abstract_mesh", "get_abstract_mesh")):
      return _update(updates, state, params, **extra_args)
    typed = lambda x: isinstance(x, jax.Array) and hasattr(
        getattr(jax.typeof(x), "sharding", None), "mesh")
    leaves = jax.tree_util.tree_leaves((updates, state, params, extra_args))
    meshes = [jax.typeof(x).sharding.mesh for x in leaves if typed(x)]
    mesh = next((m for m in meshes + [sharding.get_abstract_mesh()]
                 if sharding.AxisType.Explicit in tuple(m.axis_types)), None)
    if mesh is None:
      return _update(updates, state, params, **extra_args)
    # Outside jit (no tracers), moving arrays onto the mesh needs its devices:
    # the concrete mesh of an input, when one is on it.
    concrete = None
    tracer = getattr(jax.core, "Tracer", None)
    if hasattr(sharding, "set_mesh") and tracer is not None and not any(
        isinstance(x, tracer) for x in leaves):
      concrete = next((
          x.sharding.mesh for x in leaves
          if isinstance(getattr(x, "sharding", None), sharding.NamedSharding)
          and isinstance(x.sharding.mesh, sharding.Mesh)
          and x.sharding.mesh.abstract_mesh == mesh), None)
    explicit = tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types)
                     if t == sharding.AxisType.Explicit)
    spec = lambda x: (jax.typeof(x).sharding.spec if typed(x)
                      else sharding.PartitionSpec())
    out_specs = jax.tree_util.tree_map(spec, (updates, state))
    # Array-valued extra arguments go through auto_axes with the rest; any
    # other value is closed over as it is.
    e_leaves, e_def = jax.tree_util.tree_flatten(extra_args)
    e_arrays = [i for i, x in enumerate(e_leaves) if isinstance(x, jax.Array)]

    def auto(u, s, p, arrays):
      leaves = list(e_leaves)
      for i, x in zip(e_arrays, arrays):
        leaves[i] = x
      return _update(u, s, p, **e_def.unflatten(leaves))

    with (sharding.use_abstract_mesh(mesh) if concrete is None
          else sharding.set_mesh(concrete)):
      return sharding.auto_axes(auto, axes=explicit, out_sharding=out_specs)(
          updates, state, params, [e_leaves[i] for i in e_arrays])

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
