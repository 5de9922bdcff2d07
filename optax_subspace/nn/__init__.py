"""Model-level pieces (Flax NNX): layers that also save activation and gradient memory.

They plug into an unmodified model by module surgery (`rso_layers`).
"""

from optax_subspace.nn.grass import GrassKernel
from optax_subspace.nn.grass import GrassLinear
from optax_subspace.nn.grass import GrassProbe
from optax_subspace.nn.grass import GrassSelection
from optax_subspace.nn.grass import grass_layers
from optax_subspace.nn.grass import grass_optimizer
from optax_subspace.nn.grass import grass_refresh
from optax_subspace.nn.rso import SHARE_QKV_GATE_UP
from optax_subspace.nn.rso import FrozenKernel
from optax_subspace.nn.rso import RsoBasis
from optax_subspace.nn.rso import RsoLinear
from optax_subspace.nn.rso import merge_and_redraw
from optax_subspace.nn.rso import merge_if_due
from optax_subspace.nn.rso import rso_layers
from optax_subspace.nn.rso import rso_optimizer

__all__ = [
  "FrozenKernel",
  "GrassKernel",
  "GrassLinear",
  "GrassProbe",
  "GrassSelection",
  "RsoBasis",
  "RsoLinear",
  "grass_layers",
  "grass_optimizer",
  "grass_refresh",
  "merge_and_redraw",
  "merge_if_due",
  "rso_layers",
  "rso_optimizer",
]
