"""The `--optimizer` factory: clip -> method (warm-up + cosine schedule).

Projected leaves are the attention and MLP kernels; embeddings, the head and the norms run
full-rank Adam, as in the GaLore and Online Subspace Descent experiments.

Two methods also change the model: `rso_model` and `grass_model` (`MODEL_LEVEL`) swap the same
kernels' layers for `optax_subspace.nn`'s `RsoLinear` / `GrassLinear` (`apply_layers`), whose only
trainable Param is a small factor (RSO's B, r × out; GRASS's D, in × r) beside the frozen kernel,
so the backward pass never forms a full weight gradient and the optimizer sees only the factors.
"""

import importlib
import re

import jax
import numpy as np
import optax
from optax.contrib import GaLoreDimensionNumbers

from examples.llama.config import ConfigError, TrainConfig

# Parameter paths ("layers/0/attention/q_proj/kernel") of the leaves the subspace methods project.
PROJECTED = r"(attention|mlp)/.*kernel"
# The module paths ("layers/0/attention/q_proj") of the layers that hold those kernels: what the
# model-level methods replace.
LAYERS = r"(attention|mlp)/"
MODEL_LEVEL = ("rso_model", "grass_model")


def schedule(cfg: TrainConfig, peak: float | None = None) -> optax.Schedule:
  """Linear warm-up from 0 to the peak (default --lr), then cosine decay to 10% of it (the
  GaLore setting)."""
  peak = cfg.effective_lr() if peak is None else peak
  return optax.warmup_cosine_decay_schedule(
    0.0, peak, cfg.effective_warmup(), cfg.steps, end_value=0.1 * peak
  )


def _key_name(key) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  return str(key)


def path_string(path) -> str:
  """A tree path as "layers/0/attention/q_proj/kernel"."""
  return "/".join(_key_name(key) for key in path)


def _optax_galore_dims(params):
  # optax.contrib.galore projects every leaf whose dimension numbers are not None (its `mask`
  # only selects weight decay), so the projected set is given here, leaf by leaf.
  def dims(path, leaf):
    return GaLoreDimensionNumbers(0, 1) if re.search(PROJECTED, path_string(path)) else None

  return jax.tree_util.tree_map_with_path(dims, params)


def _subspace_method(flag: str, function: str, module: str = "optax_subspace"):
  """<module>.<function>, imported only when asked for, so adamw runs without the library."""
  try:
    library = importlib.import_module(module)
  except ImportError:
    raise ConfigError(
      f"--optimizer {flag} needs the optax_subspace library: pip install -e ."
    ) from None
  if not hasattr(library, function):
    raise ConfigError(f"--optimizer {flag}: this optax_subspace has no {function}(); update it")
  return getattr(library, function)


def model_level_function(flag: str, function: str):
  """optax_subspace.nn.<function>, for the model-level methods' steps in the train loop."""
  return _subspace_method(flag, function, "optax_subspace.nn")


def matrix_dims(cfg: TrainConfig):
  """The presets' `dims`: None (2-D kernels), or with --scan-layers a callable giving each
  stacked kernel (layers, in, out) `MatrixDims(rows=1, cols=2)`, a batch of matrices."""
  if not cfg.scan_layers or cfg.optimizer == "adamw":
    return None
  matrix = _subspace_method(cfg.optimizer, "MatrixDims")
  return lambda path, leaf: matrix(rows=1, cols=2) if len(leaf.shape) == 3 else None


def _not_factors(factor_name: str):
  """A mask callable: True for every Param but the model-level factors named `factor_name`."""

  def mask(params):
    return jax.tree_util.tree_map_with_path(
      lambda path, _: path_string(path).rpartition("/")[2] != factor_name, params
    )

  return mask


def apply_layers(cfg: TrainConfig, llama) -> list[str]:
  """Module surgery of `rso_model` / `grass_model` on the unmodified `llama`, in place.

  rso_model: `optax_subspace.nn.rso_layers` (rank r, a Haar P_0 per layer on its input side,
  seeded by --seed; Chen et al., arXiv:2502.07222). grass_model: `nn.grass_layers` (r output
  columns per layer, top-r by gradient norm every --update-every steps; Muhamed et al.,
  arXiv:2406.17660). Both select the layers of the kernels the optimizer-level presets project.
  --rso-share-basis gives q/k/v one P and gate/up another (`rso_layers(share_basis=...)`).
  Returns the replaced layers' paths; raises ValueError for a rank the layers cannot take.
  """
  if cfg.optimizer == "rso_model":
    rso_layers = model_level_function(cfg.optimizer, "rso_layers")
    share = (
      model_level_function(cfg.optimizer, "SHARE_QKV_GATE_UP") if cfg.rso_share_basis else None
    )
    return rso_layers(llama, cfg.effective_rank(), mask=LAYERS, seed=cfg.seed, share_basis=share)
  if cfg.optimizer == "grass_model":
    grass_layers = model_level_function(cfg.optimizer, "grass_layers")
    return grass_layers(
      llama,
      cfg.effective_rank(),
      update_every=cfg.update_every,
      mask=LAYERS,
      selection=cfg.grass_selection,
      seed=cfg.seed,
    )
  raise ConfigError(f"--optimizer {cfg.optimizer} changes no layer; it is not model-level")


def unprojected_schedule(cfg: TrainConfig) -> optax.Schedule | None:
  """The schedule of the unprojected leaves with --lr-unprojected; None without it."""
  return schedule(cfg, cfg.lr_unprojected) if cfg.lr_unprojected else None


def _adamw_by_group(cfg: TrainConfig) -> optax.GradientTransformation:
  """AdamW, with --lr-unprojected on the leaves the subspace methods leave full-size."""

  def adamw(lr):
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)

  if not cfg.lr_unprojected:
    return adamw(schedule(cfg))

  def labels(params):
    return jax.tree_util.tree_map_with_path(
      lambda path, _: "kernels" if re.search(PROJECTED, path_string(path)) else "rest", params
    )

  return optax.partition(
    {"kernels": adamw(schedule(cfg)), "rest": adamw(unprojected_schedule(cfg))}, labels
  )


def _full_rank_method(cfg: TrainConfig, lr, lr_rest) -> optax.GradientTransformation:
  """Fira, FRUGAL, APOLLO, APOLLO-Mini: full-rank updates from low-rank state (docs/methods.md).

  Each with its paper's defaults, on the kernels GaLore projects: Fira's α is GaLore's
  (--galore-scale); FRUGAL has none (signSGD on the rest at the same learning rate); APOLLO's
  α is 1, APOLLO-Mini's √128 at rank 1 (--rank is not read). --limiter-gamma sets the γ of
  Fira's and APOLLO's norm-growth limiter (inf: none).
  """
  common = dict(
    weight_decay=cfg.weight_decay,
    mask=PROJECTED,
    dims=matrix_dims(cfg),
    unprojected_learning_rate=lr_rest,
    projection_dtype=projection_dtype(cfg),
  )
  preset = _subspace_method(cfg.optimizer, cfg.optimizer)
  if cfg.limiter_gamma and cfg.optimizer != "frugal":
    common["gamma"] = cfg.limiter_gamma
  if cfg.optimizer != "frugal":
    common["released_order"] = cfg.released_order
  if cfg.optimizer == "fira":
    return preset(
      lr, rank=cfg.effective_rank(), update_every=cfg.update_every, scale=cfg.galore_scale, **common
    )
  if cfg.optimizer == "frugal":
    return preset(lr, rank=cfg.effective_rank(), update_every=cfg.update_every, **common)
  if cfg.optimizer == "apollo":
    return preset(
      lr, rank=cfg.effective_rank(), update_every=cfg.update_every, seed=cfg.seed, **common
    )
  return preset(lr, update_every=cfg.update_every, seed=cfg.seed, **common)


def projection_dtype(cfg: TrainConfig):
  """--projection-dtype as the presets take it: None (their float32 default) or bfloat16."""
  return None if cfg.projection_dtype == "float32" else jax.numpy.dtype(cfg.projection_dtype)


def method(cfg: TrainConfig) -> optax.GradientTransformation:
  """The update rule of `cfg.optimizer` with the learning-rate schedule, unclipped."""
  lr = schedule(cfg)
  lr_rest = unprojected_schedule(cfg)
  if cfg.optimizer == "adamw":
    return _adamw_by_group(cfg)
  if cfg.optimizer == "optax_galore":
    return optax.contrib.galore(
      lr,
      rank=cfg.effective_rank(),
      update_proj_gap=cfg.update_every,
      scale=cfg.galore_scale,
      base_optimizer=optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
      weight_decay=cfg.weight_decay,
      weight_dimension_numbers=_optax_galore_dims,
    )
  if cfg.optimizer == "galore":
    projector = "svd"
    if cfg.galore_warm_iterations:
      projector = _subspace_method("galore", "projectors").svd(
        cfg.effective_rank(),
        cfg.update_every,
        warm_iterations=cfg.galore_warm_iterations,
        warm_oversample=cfg.galore_warm_oversample,
      )
    return _subspace_method("galore", "galore")(
      lr,
      rank=cfg.effective_rank(),
      update_every=cfg.update_every,
      projector=projector,
      scale=cfg.galore_scale,
      weight_decay=cfg.weight_decay,
      mask=PROJECTED,
      dims=matrix_dims(cfg),
      unprojected_learning_rate=lr_rest,
      projection_dtype=projection_dtype(cfg),
    )
  if cfg.optimizer == "osd":
    return _subspace_method("osd", "online_subspace_descent")(
      lr,
      rank=cfg.effective_rank(),
      scale=cfg.galore_scale,
      update_every=cfg.update_every,
      peak_learning_rate=cfg.effective_lr(),
      weight_decay=cfg.weight_decay,
      mask=PROJECTED,
      dims=matrix_dims(cfg),
      unprojected_learning_rate=lr_rest,
      projection_dtype=projection_dtype(cfg),
    )
  if cfg.optimizer == "grass":
    # Top-r rows by norm, moments reset at a new selection (as reported for GRASS; or
    # --grass-on-change remap); no α: GRASS has none (--galore-scale is GaLore's and OSD's).
    return _subspace_method("grass", "grass")(
      lr,
      rank=cfg.effective_rank(),
      selection=cfg.grass_selection,
      on_change=cfg.grass_on_change,
      restart_bias_correction=not cfg.grass_shared_count,
      update_every=cfg.update_every,
      weight_decay=cfg.weight_decay,
      mask=PROJECTED,
      dims=matrix_dims(cfg),
      unprojected_learning_rate=lr_rest,
      projection_dtype=projection_dtype(cfg),
    )
  if cfg.optimizer == "rso":
    # One RSO subproblem per --update-every steps: a fresh random P (Haar by default) on the
    # input side of every projected kernel, Adam restarted on B; by default no proximal term;
    # no α (docs/rso.md).
    return _subspace_method("rso", "rso")(
      lr,
      rank=cfg.effective_rank(),
      inner_steps=cfg.update_every,
      weight_decay=cfg.weight_decay,
      mask=PROJECTED,
      dims=matrix_dims(cfg),
      unprojected_learning_rate=lr_rest,
      projection_dtype=projection_dtype(cfg),
      seed=cfg.seed,
      store_basis=cfg.rso_store_basis,
      proximal=cfg.rso_proximal or None,
      distribution=cfg.rso_distribution,
    )
  if cfg.optimizer in ("fira", "frugal", "apollo", "apollo_mini"):
    return _full_rank_method(cfg, lr, lr_rest)
  if cfg.optimizer == "rso_model":
    # The optimizer of the RsoLinear layers: Adam on B restarted with every subproblem (the merge
    # after every --update-every updates runs in the train loop), Adam on the dense Params. Its
    # decoupled weight decay would move the frozen W every step, so it decays the dense Params.
    tx = model_level_function("rso_model", "rso_optimizer")(
      lr, inner_steps=cfg.update_every, unprojected_learning_rate=lr_rest
    )
    if not cfg.weight_decay:
      return tx
    decay = _subspace_method("rso_model", "add_decayed_weights_after_update")
    return optax.chain(tx, decay(lr_rest or lr, cfg.weight_decay, mask=_not_factors("rso_b")))
  if cfg.optimizer == "grass_model":
    # Adam on D (its gradient is already GRASS's compressed one) and the dense Params; weight
    # decay on the dense Params only; the refresh every --update-every steps runs in the loop.
    return model_level_function("grass_model", "grass_optimizer")(
      lr,
      weight_decay=cfg.weight_decay,
      restart_bias_correction=not cfg.grass_shared_count,
      unprojected_learning_rate=lr_rest,
    )
  raise ConfigError(
    f"unknown optimizer {cfg.optimizer!r}; choose one of adamw, galore, osd, rso, grass,"
    " rso_model, grass_model, optax_galore, fira, frugal, apollo, apollo_mini"
  )


def refresh_due(cfg: TrainConfig, opt_state, step: int) -> bool | None:
  """Whether optimizer step `step` (0, 1, …) refreshes the subspace; None for methods without a
  `project_subspace` state (adamw, optax_galore, the model-level methods).

  The projector's own schedule, read from the optimizer state (`optax_subspace.refresh_due`):
  GaLore's SVD and GRASS's selection every --update-every steps from 0, RSO's new subspace with
  each subproblem, OSD's SVD start. Passed to the update as `subspace_refresh`, it replaces the
  refresh's `lax.cond`, which XLA's GPU runtime evaluates on the host (a sync in every step).
  `optax_subspace.refresh_due` also raises if the state's count is not `step` or an earlier
  step's flag disagreed with the schedule (checked on arrays already computed: no sync).
  """
  del cfg  # the state says which method it is
  try:
    library = importlib.import_module("optax_subspace")
  except ImportError:
    return None  # adamw and optax_galore run without the library: no subspace state
  return library.refresh_due(opt_state, step)


def build(cfg: TrainConfig) -> optax.GradientTransformation:
  """clip_by_global_norm -> method. It steps once per global batch: with --grad-accum the train
  loop averages the micro-batches' gradients first (`train.make_accumulate`), so the clip, the
  schedule and the method all count optimizer steps."""
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  return optax.chain(*parts, method(cfg))


def frozen_weight_count(frozen) -> int:
  """Entries of the frozen kernels W ("kernel" leaves) of a model-level method's non-Param state."""
  if frozen is None:
    return 0
  leaves = jax.tree_util.tree_leaves_with_path(frozen)
  return sum(leaf.size for path, leaf in leaves if path_string(path).rpartition("/")[2] == "kernel")


def state_bytes(opt_state) -> dict[str, int]:
  """Bytes of the optimizer state."""
  return {"opt_state_bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(opt_state))}


def mark_selected_rows(opt_state, seen: dict) -> None:
  """ORs into `seen` the rows each GRASS selection in `opt_state` trains (`SparseRowsState`
  counts > 0), per matrix: {leaf number: bool array (matrices, s)}. A host read: call it on
  refresh steps only."""
  sparse_rows = _subspace_method("grass", "projectors").SparseRowsState
  states = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, sparse_rows))
  for i, state in enumerate(s for s in states if isinstance(s, sparse_rows)):
    counts = np.asarray(jax.device_get(state.counts))
    chosen = (counts > 0).reshape(-1, counts.shape[-1])
    seen[i] = chosen if i not in seen else seen[i] | chosen


def selected_rows_summary(seen: dict) -> dict:
  """{"grass_rows_ever_selected": the fraction of each matrix's rows that any selection trained
  (mean, min, max over the matrices)}; {} when nothing was recorded."""
  if not seen:
    return {}
  fractions = np.concatenate([rows.mean(axis=-1) for rows in seen.values()])
  return {
    "grass_rows_ever_selected": {
      "mean": float(fractions.mean()),
      "min": float(fractions.min()),
      "max": float(fractions.max()),
      "matrices": int(fractions.size),
    }
  }
