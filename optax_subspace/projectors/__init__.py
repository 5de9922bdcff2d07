"""Projector families for `optax_subspace.project_subspace`.

Each projector is a `Projector`: pure functions on the state of one matrix
(init, basis, refresh before projecting, advance after). See
`optax_subspace/projectors/_base.py` for the contract.
"""

from optax_subspace.projectors._base import Advance
from optax_subspace.projectors._base import Projector
from optax_subspace.projectors._base import RefreshSchedule
from optax_subspace.projectors.online_pca import OnlinePcaState
from optax_subspace.projectors.online_pca import online_pca
from optax_subspace.projectors.online_pca import online_pca_gradient
from optax_subspace.projectors.sparse_rows import SparseRowsState
from optax_subspace.projectors.sparse_rows import sparse_rows
from optax_subspace.projectors.random import RandomState
from optax_subspace.projectors.random import StoredRandomState
from optax_subspace.projectors.random import random
from optax_subspace.projectors.random import random_basis
from optax_subspace.projectors.svd import RandomizedSvdState
from optax_subspace.projectors.svd import SvdState
from optax_subspace.projectors.svd import randomized_svd
from optax_subspace.projectors.svd import svd

__all__ = [
  "Advance",
  "OnlinePcaState",
  "Projector",
  "RandomState",
  "RandomizedSvdState",
  "RefreshSchedule",
  "SparseRowsState",
  "StoredRandomState",
  "SvdState",
  "online_pca",
  "online_pca_gradient",
  "random",
  "random_basis",
  "randomized_svd",
  "sparse_rows",
  "svd",
]
