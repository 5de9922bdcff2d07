"""RSO: a sequence of randomized low-rank subproblems (optimizer level)."""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_subspace import _combinator
from optax_subspace import _leaves
from optax_subspace import _presets
from optax_subspace import _restart
from optax_subspace import projectors as projectors_lib
from optax_subspace.projectors import _base

SUBSPACE, FULL = "subspace", "full"  # labels of the two kinds of leaves


class RsoSubproblemState(NamedTuple):
  """State of the transformation that solves RSO's subproblems.

  It is held, inside `rso`'s `project_subspace` state, for the projected
  leaves only, all at their low-rank shapes (r × n per matrix).

  Attributes:
    count: steps taken since the start of training (int32): the learning
      rate schedule follows it, and a subproblem starts when it is a
      multiple of K.
    displacement: B, float32, the sum of the updates emitted in the current
      subproblem (the weights are W_k + P_k·B); None without the proximal
      term.
    inner: the inner transformation's `RestartEveryState`.
  """

  count: jax.Array
  displacement: Any
  inner: optax.OptState


def _check_proximal(proximal) -> Optional[float]:
  """η as a float, or None; raises on anything else."""
  if proximal is None:
    return None
  if isinstance(proximal, bool) or not isinstance(proximal, (int, float)):
    raise TypeError(
      "proximal must be None or a Python number, got"
      f" {type(proximal).__name__}. Under optax.inject_hyperparams, list"
      " 'proximal' in static_args."
    )
  if not math.isfinite(proximal) or proximal <= 0:
    raise ValueError(
      "proximal must be None (no proximal term) or η, a positive finite"
      f" number (the subproblem adds ‖B‖²/(2η)), got {proximal!r}."
    )
  return float(proximal)


def _subproblem(direction, learning_rate, proximal, inner_steps):
  """Solves min_B f(W_k + P_k B) + ‖B‖²/(2η) from B = 0, K steps per k.

  Per step: G_B = R + B/η (R = P_kᵀ∇f, the projected gradient, is ∇_B f);
  u = −lr(t)·direction(G_B), with t the global step; B ← B + u. Every K
  steps B is zeroed and `direction` restarts (`restart_every`).
  """
  restarted = _restart.restart_every(direction, inner_steps)

  def init_fn(params):
    displacement = (
      None
      if proximal is None
      else jax.tree_util.tree_map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)
    )
    return RsoSubproblemState(jnp.zeros([], jnp.int32), displacement, restarted.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    displacement = state.displacement
    if proximal is not None:
      # Each subproblem starts from B = 0 (docs/methods.md, RSO).
      starts = state.count % inner_steps == 0
      displacement = jax.tree_util.tree_map(lambda b: jnp.where(starts, 0.0, b), displacement)
      # ∇_B [f(W_k + P_k B) + ‖B‖²/(2η)] = P_kᵀ∇f(W_k + P_k B) + B/η.
      updates = jax.tree_util.tree_map(
        lambda g, b: (g + b / proximal).astype(jnp.result_type(g)), updates, displacement
      )
    directions, inner = restarted.update(updates, state.inner, params, **extra_args)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    steps = jax.tree_util.tree_map(lambda d: (-lr * d).astype(jnp.result_type(d)), directions)
    if proximal is not None:
      displacement = jax.tree_util.tree_map(
        lambda b, u: b + u.astype(jnp.float32), displacement, steps
      )
    return steps, RsoSubproblemState(optax.safe_increment(state.count), displacement, inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rso(
  learning_rate: _presets.ScalarOrSchedule,
  rank: int = 128,
  inner_steps: int = 200,
  proximal: Optional[float] = None,
  *,
  inner: Optional[optax.GradientTransformation] = None,
  distribution: str = "haar",
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  eps_placement: str = "hf",
  weight_decay: float = 0.0,
  mask: _leaves.MaskSpec = None,
  dims: _leaves.DimsSpec = None,
  seed: int = 0,
  projection_dtype=None,
  unprojected_learning_rate: Optional[_presets.ScalarOrSchedule] = None,
  store_basis: bool = False,
) -> optax.GradientTransformation:
  r"""RSO: each block of K steps solves one randomized low-rank subproblem.

  Every selected matrix W (m × n, m the input side: the rows of a Flax
  ``(in, out)`` kernel) gets, for subproblem k = step // K, a random
  P_k (m × r) (`projectors.random`), and the K steps of the block run
  the inner optimizer on

      min_B  f(W_k + P_k B) + ‖B‖²/(2η)          (B: r × n, from B = 0)

  so that after each step the weights are W_k + P_k·B. The inner state
  (Adam's moments and its bias correction) and B restart at each
  subproblem; the learning rate (a float or a schedule) follows the global
  step. By default P_k is never stored: a key per matrix (and the r × r
  factor of P_k's QR), from which P_k is regenerated (``store_basis=True``
  keeps it instead). Leaves that
  are not selected (embeddings, norms, biases) run the same inner optimizer
  at full size, never restarted. Decoupled weight decay, if any, acts in
  full space after the update, as in `galore`; with it the weights leave
  W_k + P_k·B by the decay.

  See docs/rso.md for what the paper leaves open (P's scale, η, K) and
  what is chosen here. This is the optimizer level: the full gradient is
  still formed; `optax_subspace.nn` holds the model level, which also saves
  activation memory.

  References:
    Chen, Zhang, Liu, Yuan, Wen, "A Memory Efficient Randomized Subspace
    Optimization Method for Training Large Language Models", ICML 2025,
    arXiv:2502.07222.

  Args:
    learning_rate: float or optax schedule (of the global step).
    rank: r, below the input side m of every selected matrix.
    inner_steps: K, steps per subproblem.
    proximal: η of the proximal term ‖B‖²/(2η), a positive number; None
      (default) leaves it out (η = ∞).
    inner: the inner optimizer's update direction, without the learning
      rate (an optax ``scale_by_*`` transformation: `optax.identity()` is
      SGD, ``optax.trace(0.9)`` momentum); default Adam with `b1`, `b2`,
      `eps`, `eps_placement`. Its state restarts at every subproblem on the
      projected leaves.
    distribution: "haar" (orthonormal P, default) or "gaussian"
      (N(0, 1/r) entries).
    b1, b2, eps, eps_placement: the default inner Adam's constants, as in
      `galore`.
    weight_decay: decoupled, applied after the update with the plain lr.
    mask, dims: which leaves are projected and how; see `project_subspace`.
      For a Flax LLaMA: ``mask=r"(attention|mlp)/.*kernel"``.
    seed: folded into every matrix's key (`projectors.random`).
    projection_dtype: operand dtype of the products with G; see
      `project_subspace`.
    unprojected_learning_rate: learning rate of the leaves `mask` leaves
      out (run full size, never restarted); default `learning_rate`.
    store_basis: keep each P_k (m × r floats per matrix) in the state
      instead of regenerating it, a draw and a product, at every step
      (`projectors.random`); the same updates.

  Returns:
    An `optax.GradientTransformationExtraArgs` (its `update` takes
    ``subspace_refresh=step % inner_steps == 0``, a new subspace with each
    subproblem; see `project_subspace`). `init` raises `ValueError` if a
    selected matrix has rank ≥ its input side, and on selected leaves that
    are not 2-D without `dims`.

  Example:
    >>> import optax, optax_subspace as osub
    >>> sched = optax.warmup_cosine_decay_schedule(0, 1e-3, 100, 1000, 1e-4)
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
    ...                  osub.rso(sched, rank=64, inner_steps=200,
    ...                           mask=r"kernel"))
  """
  rank = _base.check_rank(rank)
  inner_steps = _base.check_every(inner_steps, "inner_steps")
  proximal = _check_proximal(proximal)
  projector = projectors_lib.random(
    rank, inner_steps, distribution=distribution, seed=seed, store_basis=store_basis
  )
  learning_rate = _presets.check_learning_rate(learning_rate, "learning_rate")
  full_lr = (
    learning_rate
    if unprojected_learning_rate is None
    else _presets.check_learning_rate(unprojected_learning_rate, "unprojected_learning_rate")
  )
  direction = inner if inner is not None else _presets.hf_or_optax_adam(b1, b2, eps, eps_placement)
  transforms = {
    SUBSPACE: _subproblem(direction, learning_rate, proximal, inner_steps),
    FULL: optax.chain(direction, optax.scale_by_learning_rate(full_lr)),
  }

  def plan(tree):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # rank ≥ m is an error, raised below
      return _leaves.plan_leaves(tree, rank, mask, dims, side="rows")

  def subspace_tx(tree):
    """`project_subspace` with P on the input side, routing by the plan."""
    plans, treedef = plan(tree)
    labels = treedef.unflatten([SUBSPACE if p.projected else FULL for p in plans])
    return _combinator.project_subspace(
      optax.partition(transforms, labels),
      projector,
      mask=mask,
      dims=dims,
      projection_dtype=projection_dtype,
      side="rows",
    )

  def init_fn(params):
    too_large = [
      f"'{p.path}' ({p.rows})" for p in plan(params)[0] if p.projected and rank >= p.rows
    ]
    if too_large:
      raise ValueError(
        f"rso: rank {rank} is not below the input side (rows) of"
        f" {', '.join(too_large[:4])}{' ...' if len(too_large) > 4 else ''}:"
        " RSO's subspace must be smaller than the layer input. Lower the"
        " rank or exclude these leaves with `mask` (for r = m, use"
        " project_subspace(..., projectors.random(m, K), side='rows'))."
      )
    return subspace_tx(params).init(params)

  def update_fn(updates, state, params=None, **extra_args):
    return subspace_tx(updates).update(updates, state, params, **extra_args)

  parts = [optax.GradientTransformationExtraArgs(init_fn, update_fn)]
  if not _presets.is_zero(weight_decay):
    parts.append(
      _presets.by_group(
        lambda lr: _presets.add_decayed_weights_after_update(lr, weight_decay),
        learning_rate,
        unprojected_learning_rate,
        mask,
      )
    )
  return optax.chain(*parts)
