"""Presets: GaLore and Online Subspace Descent as their authors run them.

Fira, FRUGAL and APOLLO, which add a residual or an output stage, are in
`_full_rank_presets`.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optax_subspace import _adam
from optax_subspace import _combinator
from optax_subspace import _leaves
from optax_subspace import projectors as projectors_lib
from optax_subspace.projectors import _base

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


class DecayAfterUpdateState(NamedTuple):
  """Step count of `add_decayed_weights_after_update`."""

  count: jax.Array


def add_decayed_weights_after_update(
  learning_rate: ScalarOrSchedule,
  weight_decay: float,
  mask=None,
) -> optax.GradientTransformation:
  r"""Decoupled weight decay applied to the already-updated weights.

  Placed after the learning rate, it turns an update u into
  u − lr·wd·(W + u), i.e. W ← (W + u)(1 − lr·wd): HF AdamW and the GaLore
  authors decay the weights after the Adam step, with the plain learning
  rate (not Adam's step size, not GaLore's scale), in full space.

  References:
    Loshchilov and Hutter, "Decoupled Weight Decay Regularization",
    arXiv:1711.05101.

  Args:
    learning_rate: the plain learning rate, a float or an optax schedule.
    weight_decay: wd.
    mask: optional pytree of bools or callable, as `optax.masked`.

  Returns:
    An `optax.GradientTransformation` (needs `params` in `update`).

  Example:
    >>> import optax, optax_subspace as osub
    >>> tx = optax.chain(optax.sgd(0.1),
    ...                  osub.add_decayed_weights_after_update(0.1, 1e-2))
  """

  def init_fn(params):
    del params
    return DecayAfterUpdateState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("add_decayed_weights_after_update needs `params`.")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    new = jax.tree_util.tree_map(
      lambda u, w: (u - lr * weight_decay * (w + u)).astype(u.dtype),
      updates,
      params,
    )
    return new, DecayAfterUpdateState(optax.safe_increment(state.count))

  tx = optax.GradientTransformation(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)


def is_zero(x) -> bool:
  """Whether `x` is a Python number equal to 0 (a weight decay left out)."""
  return isinstance(x, (int, float)) and x == 0


def hf_or_optax_adam(b1, b2, eps, eps_placement, per_matrix_count=False):
  """The presets' Adam direction: HF eps placement ("hf") or optax's ("optax")."""
  if eps_placement == "hf":
    return _adam.scale_by_hf_adam(b1, b2, eps, per_matrix_count=per_matrix_count)
  if eps_placement == "optax" and per_matrix_count:
    return _adam.scale_by_precise_adam(b1, b2, eps, None, False, True)
  if eps_placement == "optax":
    return optax.scale_by_adam(b1, b2, eps)
  raise ValueError(f"eps_placement must be 'hf' or 'optax', got {eps_placement!r}.")


PROJECTED, UNPROJECTED = "projected", "unprojected"


def by_group(make, learning_rate, unprojected_learning_rate, mask):
  """``make(lr)`` for every leaf, or per group with its own learning rate.

  With `unprojected_learning_rate` None, ``make(learning_rate)``; otherwise
  ``make(learning_rate)`` on the leaves `mask` selects (the projected ones)
  and ``make(unprojected_learning_rate)`` on the others, through
  `optax.partition`.
  """
  if unprojected_learning_rate is None:
    return make(learning_rate)

  def labels(tree):
    return jax.tree_util.tree_map(
      lambda chosen: PROJECTED if chosen else UNPROJECTED, _leaves.selected(tree, mask)
    )

  return optax.partition(
    {PROJECTED: make(learning_rate), UNPROJECTED: make(unprojected_learning_rate)}, labels
  )


# One check for every preset and the combinator (which takes the rates).
check_learning_rate = _combinator.check_learning_rate


# The keyword arguments every subspace-Adam preset takes and hands on as they
# are (each preset's signature spells them out for its users).
ADAMW_OPTIONS = (
  "b1",
  "b2",
  "eps",
  "eps_placement",
  "weight_decay",
  "mask",
  "dims",
  "on_change",
  "projection_dtype",
  "refresh_chunk_bytes",
  "unprojected_learning_rate",
)


def adamw_options(arguments: dict) -> dict:
  """The `ADAMW_OPTIONS` among a preset's arguments (its ``locals()``)."""
  return {name: arguments[name] for name in ADAMW_OPTIONS if name in arguments}


def svd_projector(projector, rank: int, update_every: int, seed: int, name: str):
  """ "svd", "randomized_svd" or a `Projector`, as `galore` takes it."""
  if isinstance(projector, _base.Projector):
    return projector
  if projector == "svd":
    return projectors_lib.svd(rank, update_every)
  if projector == "randomized_svd":
    return projectors_lib.randomized_svd(rank, update_every, seed=seed)
  raise ValueError(
    f"{name}: projector must be 'svd', 'randomized_svd' or a Projector, got {projector!r}."
  )


def subspace_adamw(
  learning_rate,
  projector,
  scale,
  *,
  b1,
  b2,
  eps,
  eps_placement,
  weight_decay,
  mask,
  dims,
  on_change,
  projection_dtype,
  side="smaller",
  refresh_chunk_bytes=None,
  unprojected_learning_rate=None,
  per_matrix_count=False,
  stages=None,
):
  """`project_subspace` of Adam with the learning rates by group, then weight decay.

  `stages` ({"residual": ..., "output": ..., ...}) go to `project_subspace`
  as they are (Fira, FRUGAL, APOLLO); None: GaLore's back-projection.
  """
  # The learning rates go into the combinator rather than a
  # `scale_by_learning_rate` after it: it applies the projected leaves' rate
  # to N before the back-projection, so each weight's add folds into that
  # product on a GPU (`project_subspace`'s `learning_rate`).
  parts = [
    _combinator.project_subspace(
      hf_or_optax_adam(b1, b2, eps, eps_placement, per_matrix_count),
      projector,
      scale=scale,
      learning_rate=learning_rate,
      unprojected_learning_rate=unprojected_learning_rate,
      mask=mask,
      dims=dims,
      on_change=on_change,
      projection_dtype=projection_dtype,
      side=side,
      refresh_chunk_bytes=refresh_chunk_bytes,
      **(stages or {}),
    ),
  ]
  if not is_zero(weight_decay):
    parts.append(
      by_group(
        lambda lr: add_decayed_weights_after_update(lr, weight_decay),
        learning_rate,
        unprojected_learning_rate,
        mask,
      )
    )
  return optax.chain(*parts)


def galore(
  learning_rate: ScalarOrSchedule,
  rank: int = 128,
  update_every: int = 200,
  scale: float = 0.25,
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  eps_placement: str = "hf",
  weight_decay: float = 0.0,
  mask: _leaves.MaskSpec = None,
  dims: _leaves.DimsSpec = None,
  projector: Union[str, _base.Projector] = "svd",
  on_change: str = "keep",
  seed: int = 0,
  projection_dtype=None,
  refresh_chunk_bytes: Optional[int] = None,
  unprojected_learning_rate: Optional[ScalarOrSchedule] = None,
) -> optax.GradientTransformation:
  r"""GaLore: AdamW whose moments live in a periodically refreshed SVD subspace.

  Selected matrices G are projected on the top-r singular vectors of the
  gradient on their smaller side, refreshed at steps 0, T, 2T, …; Adam runs on
  R = PᵀG (HF eps placement by default); the update is
  −lr·α·P·N, then decoupled weight decay on the updated weights. Moments are
  kept across refreshes, as in the authors' code. Other leaves run the same
  Adam at full size, without α.

  References:
    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection", ICML 2024, arXiv:2403.03507.

  Args:
    learning_rate: float or optax schedule.
    rank: r (128 of 512 at LLaMA-60M, 256 at 130M/350M, 512 at 1B).
    update_every: T, steps between refreshes (authors: 200).
    scale: α (authors: 0.25).
    b1, b2, eps: Adam's constants (authors: 0.9, 0.999, 1e-6).
    eps_placement: "hf" (eps on the un-bias-corrected √v, as the authors) or
      "optax" (`optax.scale_by_adam`).
    weight_decay: decoupled, applied after the update with the plain lr.
    mask, dims: which leaves are projected and how; see `project_subspace`.
      For a Flax LLaMA: ``mask=r"(attention|mlp)/.*kernel"``.
    projector: "svd" (exact), "randomized_svd", or any `Projector`.
    on_change: "keep" (authors), "reset" or "transport"; see
      `project_subspace`.
    seed: seed of the "randomized_svd" projector.
    projection_dtype: operand dtype of the products with G (default float32;
      ``jnp.bfloat16`` for speed); see `project_subspace`.
    refresh_chunk_bytes: gradient bytes per batched refresh (default 4 GiB):
      fewer, larger chunks refresh faster, smaller ones need less memory;
      see `project_subspace`.
    unprojected_learning_rate: learning rate (float or schedule) of the
      leaves `mask` leaves out (embeddings, head, norms), which run full-size
      Adam without α; default None: `learning_rate`, as the authors run them.
      The projected kernels keep `learning_rate` (times α).

  Returns:
    An `optax.GradientTransformationExtraArgs`. A loop that counts steps
    passes ``update(..., subspace_refresh=osub.refresh_due(state, step))``
    (step 0, 1, …: here ``step % update_every == 0``; static under jit): no
    refresh `lax.cond`, so no host sync at it on a GPU (`project_subspace`).

  Example:
    >>> import optax, optax_subspace as osub
    >>> sched = optax.warmup_cosine_decay_schedule(0, 1e-2, 100, 1000, 1e-3)
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
    ...                  osub.galore(sched, rank=128, mask=r"kernel"))
  """
  return subspace_adamw(
    learning_rate,
    svd_projector(projector, rank, update_every, seed, "galore"),
    scale,
    **adamw_options(locals()),
  )


def _projector_learning_rate(learning_rate, peak_learning_rate, update_every):
  """The authors' P learning rate: (1/T)·lr_W(t)/lr_W,max.

  P's optimizer takes its first step at the weights' step 1, so its own count
  c corresponds to the weights' step c + 1.
  """
  if callable(learning_rate):
    if peak_learning_rate is None:
      raise ValueError(
        "online_subspace_descent with a learning-rate schedule needs"
        " peak_learning_rate: the projector's learning rate follows"
        " lr(t)/peak/update_every, as in the authors' code."
      )
    return lambda c: learning_rate(c + 1) / (peak_learning_rate * update_every)
  peak = learning_rate if peak_learning_rate is None else peak_learning_rate
  return learning_rate / (peak * update_every)


def online_subspace_descent(
  learning_rate: ScalarOrSchedule,
  rank: int = 128,
  scale: float = 0.25,
  *,
  update_every: int = 200,
  peak_learning_rate: Optional[float] = None,
  projector_optimizer: Optional[optax.GradientTransformation] = None,
  projector_weight_decay: float = 0.01,
  orthogonality_weight: float = 0.0,
  step_before_projection: bool = False,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  eps_placement: str = "hf",
  weight_decay: float = 0.0,
  mask: _leaves.MaskSpec = None,
  dims: _leaves.DimsSpec = None,
  on_change: str = "keep",
  projection_dtype=None,
  refresh_chunk_bytes: Optional[int] = None,
  unprojected_learning_rate: Optional[ScalarOrSchedule] = None,
) -> optax.GradientTransformation:
  r"""Online Subspace Descent: GaLore's subspace Adam with an online-PCA P.

  Same update as `galore`, but P comes from an SVD of the first gradient
  only, then moves every step by one optimizer step on the online-PCA loss
  ‖P Pᵀ G̃ − G̃‖² (see `projectors.online_pca`), after the weights have been
  updated through P_t. Defaults follow the authors' code: P's optimizer is
  AdamW (β 0.9/0.999, eps 1e-8, weight decay 0.01) with learning rate
  lr_W(t)/lr_W,max/T, T = `update_every`, and no orthogonality term. The
  paper's variant is ``orthogonality_weight=0.1`` with
  ``projector_optimizer=optax.adamw(lambda t: 5 * lr(t + 1))``.

  References:
    Liang, Liu, Chen, Liu, "Memory-Efficient LLM Training with Online
    Subspace Descent", NeurIPS 2024, arXiv:2408.12857.

  Args:
    learning_rate: float or optax schedule.
    rank: r.
    scale: α (authors: 0.25).
    update_every: T, which only sets P's learning rate here (authors: 200).
    peak_learning_rate: lr_W,max; needed when `learning_rate` is a schedule.
    projector_optimizer: any optax transformation for P; overrides the
      default AdamW and `projector_weight_decay`.
    projector_weight_decay: weight decay of the default AdamW on P.
    orthogonality_weight: λ of the online-PCA loss (paper 0.1, code 0).
    step_before_projection: step P with G_t before projecting G_t, as the
      stored copy of the authors' code does (see `projectors.online_pca`);
      default False, docs/methods.md's order.
    b1, b2, eps, eps_placement, weight_decay, mask, dims, on_change,
      projection_dtype, refresh_chunk_bytes, unprojected_learning_rate: as
      in `galore` (OSD refreshes
      at step 0 only).

  Returns:
    An `optax.GradientTransformationExtraArgs`; its refresh is the SVD of
    step 0, so a loop that counts steps passes
    ``update(..., subspace_refresh=osub.refresh_due(state, step))``, here
    ``step == 0`` (`project_subspace`).

  Example:
    >>> import optax_subspace as osub
    >>> tx = osub.online_subspace_descent(1e-3, rank=64, mask=r"kernel")
  """
  update_every = _base.check_every(update_every)
  # Checked here, not only by the combinator: P's learning rate is derived from it first.
  learning_rate = check_learning_rate(learning_rate, "learning_rate")
  peak = peak_learning_rate
  if peak is not None and (
    isinstance(peak, bool) or not isinstance(peak, numbers.Real) or not peak > 0
  ):
    raise ValueError(f"peak_learning_rate must be a number > 0, got {peak_learning_rate!r}.")
  if projector_optimizer is None:
    projector_optimizer = _adam.torch_adamw(
      _projector_learning_rate(learning_rate, peak_learning_rate, update_every),
      weight_decay=projector_weight_decay,
    )
  projector = projectors_lib.online_pca(
    rank,
    projector_optimizer,
    orthogonality_weight=orthogonality_weight,
    step_before_projection=step_before_projection,
  )
  return subspace_adamw(learning_rate, projector, scale, **adamw_options(locals()))
