"""optax_subspace: memory-efficient subspace optimizers as Optax transformations.

Every method is `project_subspace(inner, projector, ...)`: the gradient of each
selected matrix is projected onto a low-rank subspace, any Optax
transformation runs there (so its state is low-rank), and the result is
projected back. Presets give the methods as their authors run them.
"""

from optax_subspace import projectors
from optax_subspace._adam import ScaleByHfAdamState
from optax_subspace._adam import scale_by_hf_adam
from optax_subspace._adam import torch_adamw
from optax_subspace._combinator import FIRST_MOMENT_FIELDS
from optax_subspace._combinator import ProjectSubspaceState
from optax_subspace._combinator import SECOND_MOMENT_FIELDS
from optax_subspace._combinator import project_subspace
from optax_subspace._combinator import subspace_plan
from optax_subspace._full_rank_presets import apollo
from optax_subspace._full_rank_presets import apollo_mini
from optax_subspace._full_rank_presets import fira
from optax_subspace._full_rank_presets import frugal
from optax_subspace._grass import grass
from optax_subspace._leaves import LeafPlan
from optax_subspace._leaves import LeafPredicate
from optax_subspace._leaves import MatrixDims
from optax_subspace._leaves import leaf_predicate
from optax_subspace._presets import DecayAfterUpdateState
from optax_subspace._presets import add_decayed_weights_after_update
from optax_subspace._presets import galore
from optax_subspace._plan import SubspacePlan
from optax_subspace._presets import online_subspace_descent
from optax_subspace._refresh import RefreshScheduleError
from optax_subspace._refresh import refresh_due
from optax_subspace._refresh import refresh_schedule
from optax_subspace._restart import RestartEveryState
from optax_subspace._restart import restart_every
from optax_subspace._rso import RsoSubproblemState
from optax_subspace._rso import rso
from optax_subspace.checkpoint import CheckpointMismatchError
from optax_subspace.checkpoint import restore_checkpoint
from optax_subspace.checkpoint import save_checkpoint
from optax_subspace.sharding import state_shardings
from optax_subspace.sharding import update_shardings

__version__ = "0.1.0"

__all__ = [
  "CheckpointMismatchError",
  "DecayAfterUpdateState",
  "FIRST_MOMENT_FIELDS",
  "LeafPlan",
  "LeafPredicate",
  "MatrixDims",
  "ProjectSubspaceState",
  "RefreshScheduleError",
  "SECOND_MOMENT_FIELDS",
  "SubspacePlan",
  "ScaleByHfAdamState",
  "add_decayed_weights_after_update",
  "apollo",
  "apollo_mini",
  "fira",
  "frugal",
  "galore",
  "grass",
  "leaf_predicate",
  "online_subspace_descent",
  "project_subspace",
  "projectors",
  "refresh_due",
  "refresh_schedule",
  "RestartEveryState",
  "RsoSubproblemState",
  "restart_every",
  "restore_checkpoint",
  "rso",
  "save_checkpoint",
  "scale_by_hf_adam",
  "state_shardings",
  "subspace_plan",
  "update_shardings",
  "torch_adamw",
]
