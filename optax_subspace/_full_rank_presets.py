"""Presets whose update has full rank from low-rank state: Fira, FRUGAL, APOLLO.

Each is `project_subspace` of subspace Adam with a residual stage (Fira,
FRUGAL: a term from G − P·R added to P·N) or an output mode (APOLLO,
APOLLO-Mini: the full G scaled by factors from the subspace), with its
paper's defaults. The per-matrix mathematics is in `_fira`, `_frugal` and
`_apollo`; the stages in `_stages`.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import optax

from optax_subspace import _apollo
from optax_subspace import _fira
from optax_subspace import _frugal
from optax_subspace import _leaves
from optax_subspace import _presets
from optax_subspace import projectors as projectors_lib
from optax_subspace.projectors import _base

ScalarOrSchedule = _presets.ScalarOrSchedule
FIRA_GRANULARITIES = {"column": "fira", "matrix": "fira_matrix"}
APOLLO_GRANULARITIES = {"channel": "scale", "tensor": "scale_tensor"}


def fira(
  learning_rate: ScalarOrSchedule,
  rank: int = 128,
  update_every: int = _fira.UPDATE_EVERY,
  scale: float = _fira.SCALE,
  *,
  gamma: float = _fira.GAMMA,
  granularity: str = "column",
  released_order: bool = False,
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
  projection_dtype: Any = None,
  refresh_chunk_bytes: Optional[int] = None,
  unprojected_learning_rate: Optional[ScalarOrSchedule] = None,
) -> optax.GradientTransformation:
  r"""Fira: GaLore plus the residual G − P·R, scaled by Adam's norm ratios and limited.

  GaLore's subspace Adam (SVD basis refreshed every T steps, moments kept),
  and the part of the gradient GaLore drops added back, scaled column by
  column by how much Adam scaled the projected gradient (Eqn. 11), with the
  norm-growth limiter (Eqn. 12):

      N = Adam(R),  k_j = ‖N_{:,j}‖/‖R_{:,j}‖,  S_t = (G − P·R)·diag(k)
      S_t ← S_t·γ/max(‖S_t‖/‖S_{t−1}‖, γ),     ΔW = −lr·α·(P·N + S_t)

  (Algorithm 1). Columns are the l entries of the side that is not
  projected. The state is GaLore's plus one float per matrix, the
  limiter's ‖S_{t−1}‖. The authors' released code differs from Algorithm 1
  (its residual is G − α·P·R, its update α·P·N + S_t, and the factors see
  Adam's direction before bias correction); this follows the paper by
  default, the released code with ``released_order=True``
  (docs/methods.md). Other leaves run the same Adam at full size, without α.

  References:
    Chen, Feng, Li, Lai, Yue, Yuan, Wang, "Fira: Can We Achieve Full-rank
    Training of LLMs Under Low-rank Constraint?", arXiv:2410.01623.

  Args:
    learning_rate: float or optax schedule (pre-training: 0.01, GaLore's).
    rank: r (as GaLore: 128 at LLaMA-60M, 256 at 130M/350M, 512 at 1B).
    update_every: T, steps between SVD refreshes (200).
    scale: α (0.25, GaLore's).
    gamma: γ of the norm-growth limiter (1.01 in all the paper's runs; inf: none).
    granularity: "column" (Fira) or "matrix" (one ratio per matrix,
      Fira-matrix, Eqn. 10).
    released_order: the step of the authors' released code: k and the
      limiter from Adam's direction before its bias correction, the
      residual G − α·P·R, ΔW = α·P·N + S_t, all times the bias correction
      √(1 − β2ᵗ)/(1 − β1ᵗ).
    b1: as in `galore`.
    b2: as in `galore`.
    eps: as in `galore`.
    eps_placement: as in `galore`.
    weight_decay: as in `galore`.
    mask: as in `galore`.
    dims: as in `galore`.
    on_change: as in `galore`.
    seed: as in `galore`.
    projection_dtype: as in `galore`.
    refresh_chunk_bytes: as in `galore`.
    unprojected_learning_rate: as in `galore`.
    projector: "svd" (the paper's), "randomized_svd", or any `Projector`
      whose P has orthonormal columns.

  Returns:
    An `optax.GradientTransformationExtraArgs`; ``subspace_refresh`` as in
    `galore`.

  Example:
    >>> import optax_subspace as osub
    >>> tx = osub.fira(1e-2, rank=128, mask=r"kernel")
  """
  if granularity not in FIRA_GRANULARITIES:
    raise ValueError(
      f"granularity must be one of {tuple(FIRA_GRANULARITIES)}, got {granularity!r}."
    )
  stages = dict(residual=FIRA_GRANULARITIES[granularity], gamma=gamma)
  if released_order:
    stages["released_order"] = (b1, b2)
  return _presets.subspace_adamw(
    learning_rate,
    _presets.svd_projector(projector, rank, update_every, seed, "fira"),
    scale,
    **_presets.adamw_options(locals()),
    stages=stages,
  )


def _frugal_projector(projector, rank, update_every, seed):
  """FRUGAL's state-full subspace: SVD, a random orthonormal P, or rows."""
  if isinstance(projector, _base.Projector):
    return projector
  if projector == "svd":
    return projectors_lib.svd(rank, update_every)
  if projector == "random":
    return projectors_lib.random(rank, update_every, distribution="haar", seed=seed)
  if projector == "rows":
    return projectors_lib.sparse_rows(rank, update_every, selection="topk", seed=seed)
  raise ValueError(
    f"frugal: projector must be 'svd', 'random', 'rows' or a Projector, got {projector!r}."
  )


def frugal(
  learning_rate: ScalarOrSchedule,
  rank: int = 128,
  update_every: int = _frugal.UPDATE_EVERY,
  *,
  rule: Union[str, optax.GradientTransformation] = _frugal.RULE,
  free_scale: float = _frugal.FREE_SCALE,
  projector: Union[str, _base.Projector] = "svd",
  on_change: str = _frugal.ON_CHANGE,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  eps_placement: str = "hf",
  weight_decay: float = 0.0,
  mask: _leaves.MaskSpec = None,
  dims: _leaves.DimsSpec = None,
  seed: int = 0,
  projection_dtype: Any = None,
  refresh_chunk_bytes: Optional[int] = None,
  unprojected_learning_rate: Optional[ScalarOrSchedule] = None,
) -> optax.GradientTransformation:
  r"""FRUGAL: Adam in a subspace, a state-free signSGD (or SGD) on the rest.

  Each selected gradient is split into its projection, which Adam updates,
  and the rest, which a state-free optimizer updates at its own learning
  rate, λ = `free_scale` times the subspace's:

      N = Adam(PᵀG),  U = sign(G − P·PᵀG)  (rule "sgd": G − P·PᵀG)
      ΔW = −lr·(P·N + λ·U)

  (the paper's Algorithm 1 with Adam and signSGD; no GaLore-style α). The
  subspace is chosen anew every T steps and the state-full Adam restarts
  there, moments and step count (``on_change="reset"`` with a per-matrix
  count), as the authors' code does. The state is the subspace's
  (s·r + 2·r·l floats per matrix with an SVD basis, less with "random" or
  "rows"); the state-free part has none.

  References:
    Zmushko, Beznosikov, Takáč, Horváth, "FRUGAL: Memory-Efficient
    Optimization by Reducing State Overhead for Scalable Training", ICML
    2025, arXiv:2411.07837.

  Args:
    learning_rate: float or optax schedule, the state-full learning rate.
    rank: r; the authors' state-full density ρ = 0.25 is r = s/4 (128 at
      LLaMA-60M).
    update_every: T, steps between choices of the subspace (200).
    rule: "sign_sgd" (default), "sgd", or any state-free optax
      transformation, applied to G − P·PᵀG (its direction is then scaled by
      `free_scale` and the learning rate).
    free_scale: λ, the state-free learning rate over the state-full one
      (1.0 in the authors' pre-training, 0.1 in fine-tuning).
    projector: "svd" (top-r singular vectors, as GaLore), "random" (a Haar
      P, orthonormal, regenerated from a key), "rows" (the r rows of
      largest norm with unit weights, `projectors.sparse_rows` "topk"), or
      any `Projector` for which back∘project is an orthogonal projection
      (otherwise G − P·R is not the complement).
    on_change: "reset" (the authors'), "keep" or "transport".
    b1: as in `galore`.
    b2: as in `galore`.
    eps: as in `galore`.
    eps_placement: as in `galore`.
    weight_decay: as in `galore`.
    mask: as in `galore`.
    dims: as in `galore`.
    seed: as in `galore`.
    projection_dtype: as in `galore`.
    refresh_chunk_bytes: as in `galore`.
    unprojected_learning_rate: as in `galore`.

  Returns:
    An `optax.GradientTransformationExtraArgs`; ``subspace_refresh`` as in
    `galore`.

  Example:
    >>> import optax_subspace as osub
    >>> tx = osub.frugal(1e-3, rank=128, mask=r"kernel")
  """
  return _presets.subspace_adamw(
    learning_rate,
    _frugal_projector(projector, rank, update_every, seed),
    _frugal.SCALE,
    **_presets.adamw_options(locals()),
    per_matrix_count=on_change == "reset",
    stages=dict(residual=rule, residual_scale=free_scale),
  )


def _apollo_preset(learning_rate, rank, update_every, scale, granularity, gamma, seed, arguments):
  stages = dict(output=APOLLO_GRANULARITIES[granularity], gamma=gamma)
  if arguments["released_order"]:
    stages["released_order"] = (arguments["b1"], arguments["b2"])
  return _presets.subspace_adamw(
    learning_rate,
    projectors_lib.random(
      rank,
      update_every,
      distribution="gaussian",
      seed=seed,
      store_basis=arguments["store_basis"],
    ),
    scale,
    **_presets.adamw_options(arguments),
    stages=stages,
  )


def apollo(
  learning_rate: ScalarOrSchedule,
  rank: int = 128,
  update_every: int = _apollo.UPDATE_EVERY,
  scale: float = _apollo.SCALE,
  *,
  gamma: float = _apollo.GAMMA,
  released_order: bool = False,
  seed: int = 0,
  store_basis: bool = False,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  eps_placement: str = "hf",
  weight_decay: float = 0.0,
  mask: _leaves.MaskSpec = None,
  dims: _leaves.DimsSpec = None,
  on_change: str = "keep",
  projection_dtype: Any = None,
  refresh_chunk_bytes: Optional[int] = None,
  unprojected_learning_rate: Optional[ScalarOrSchedule] = None,
) -> optax.GradientTransformation:
  r"""APOLLO: the full gradient scaled channel-wise by factors from Adam on a random projection.

  Adam runs on R = PᵀG with a random Gaussian P (i.i.d. N(0, 1/r), redrawn
  from a new key every T steps, never stored) only to estimate how much
  AdamW would scale each channel; the update is the full gradient scaled by
  those factors, then limited:

      Ñ = Adam(R),  s_j = ‖Ñ_{:,j}‖/‖R_{:,j}‖,  G̃ = G·diag(s)
      G̃ ← G̃·γ/max(‖G̃‖/‖G̃_{t−1}‖, γ),          ΔW = −lr·α·G̃

  (Algorithm 1 and Eqs. 3–5; channels are the l entries of the larger
  side). The state per s × l matrix is R's two moments and one norm,
  2·r·l + 1 floats, and a key. The paper's form (scale the full G); a
  variant that scales R and maps it back through P with α^1.5, found in a
  reimplementation, is not offered (docs/methods.md).

  References:
    Zhu, Zhang, Cong, Liu, Park, Chandra, Long, Pan, Wang, Lee, "APOLLO:
    SGD-like Memory, AdamW-level Performance", MLSys 2025,
    arXiv:2412.05270.

  Args:
    learning_rate: float or optax schedule (pre-training: 0.01).
    rank: r (a quarter of the model width in pre-training: 128 at
      LLaMA-60M, 256 at 7B).
    update_every: T, steps between fresh random projections (200).
    scale: α (1; 1/2 at 1B).
    gamma: γ of the norm-growth limiter (1.01; inf: none).
    released_order: the factors s and the limiter see Adam's
      direction before its bias correction √(1 − β2ᵗ)/(1 − β1ᵗ), which
      then multiplies the limited update, as the authors' released code
      orders them; False (default): they see the corrected direction (the
      paper's Algorithm 1 does not say; docs/methods.md).
    seed: folded into every matrix's key.
    store_basis: keep each P (s × r floats per matrix) in the state
      instead of drawing it again from its key at every step
      (`projectors.random`): the same updates, more state, no draw per
      step. On an H100 the 1B update with it did not finish (a known
      issue: docs/methods.md, APOLLO).
    b1: as in `galore`.
    b2: as in `galore`.
    eps: as in `galore`.
    eps_placement: as in `galore`.
    weight_decay: as in `galore`.
    mask: as in `galore`.
    dims: as in `galore`.
    on_change: as in `galore`.
    projection_dtype: as in `galore`.
    refresh_chunk_bytes: as in `galore`.
    unprojected_learning_rate: as in `galore`.

  Returns:
    An `optax.GradientTransformationExtraArgs`; ``subspace_refresh`` as in
    `galore`.

  Example:
    >>> import optax_subspace as osub
    >>> tx = osub.apollo(1e-2, rank=128, mask=r"kernel")
  """
  return _apollo_preset(learning_rate, rank, update_every, scale, "channel", gamma, seed, locals())


def apollo_mini(
  learning_rate: ScalarOrSchedule,
  update_every: int = _apollo.UPDATE_EVERY,
  scale: float = _apollo.MINI_SCALE,
  *,
  gamma: float = _apollo.GAMMA,
  released_order: bool = False,
  seed: int = 0,
  store_basis: bool = False,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  eps_placement: str = "hf",
  weight_decay: float = 0.0,
  mask: _leaves.MaskSpec = None,
  dims: _leaves.DimsSpec = None,
  on_change: str = "keep",
  projection_dtype: Any = None,
  refresh_chunk_bytes: Optional[int] = None,
  unprojected_learning_rate: Optional[ScalarOrSchedule] = None,
) -> optax.GradientTransformation:
  r"""APOLLO-Mini: rank 1, one scaling factor per matrix: SGD-like memory.

  `apollo` at rank 1 with a tensor-wise factor:

      Ñ = Adam(R),  s = ‖Ñ‖/‖R‖,  G̃ ← limit(s·G),  ΔW = −lr·α·G̃

  with α = √128 (Sec. 4.2). The state per s × l matrix is 2·l + 1 floats
  and a key: no s × l buffer, O(s + l).

  References:
    Zhu, Zhang, Cong, Liu, Park, Chandra, Long, Pan, Wang, Lee, "APOLLO:
    SGD-like Memory, AdamW-level Performance", MLSys 2025,
    arXiv:2412.05270.

  Args:
    learning_rate: float or optax schedule (0.01; 0.02 in the paper's
      better APOLLO-Mini runs).
    update_every: T (200).
    scale: α (√128).
    gamma: as in `apollo`.
    released_order: as in `apollo`.
    seed: as in `apollo`.
    store_basis: as in `apollo` (P is then an s-vector per matrix).
    b1: as in `apollo`.
    b2: as in `apollo`.
    eps: as in `apollo`.
    eps_placement: as in `apollo`.
    weight_decay: as in `apollo`.
    mask: as in `apollo`.
    dims: as in `apollo`.
    on_change: as in `apollo`.
    projection_dtype: as in `apollo`.
    refresh_chunk_bytes: as in `apollo`.
    unprojected_learning_rate: as in `apollo`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import optax_subspace as osub
    >>> tx = osub.apollo_mini(1e-2, mask=r"kernel")
  """
  return _apollo_preset(
    learning_rate, _apollo.MINI_RANK, update_every, scale, "tensor", gamma, seed, locals()
  )
