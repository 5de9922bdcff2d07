"""Device mesh ("data", "fsdp") and the shardings of parameters, optimizer state and batches.

FSDP, as MaxText and Levanter default to: every weight matrix is split along its hidden-size
(embed) axis over "fsdp", so each device holds 1/F of every matrix and of its optimizer state;
the batch is split over both axes ("data" × "fsdp" devices). Under jit, XLA all-gathers each
weight where it is used and reduce-scatters its gradient. The optimizer state follows the
parameters through `optax_subspace.state_shardings`.
"""

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")


def make_mesh(data: int, fsdp: int) -> jax.sharding.Mesh | None:
  """The ("data", "fsdp") mesh over the first data·fsdp devices; None for one device."""
  if data * fsdp == 1:
    return None
  if data * fsdp > jax.device_count():
    raise ValueError(
        f"--data-parallel {data} × --fsdp {fsdp} needs {data * fsdp} devices, "
        f"{jax.device_count()} are visible"
    )
  devices = np.array(jax.devices()[: data * fsdp]).reshape(data, fsdp)
  # Auto axes: jit's in/out shardings drive XLA's partitioner (docs/scaling.md).
  return jax.sharding.Mesh(devices, AXES, axis_types=(AxisType.Auto,) * 2)


def param_spec(leaf, hidden: int, fsdp: int) -> PartitionSpec:
  """Splits the hidden-size axis of a matrix over "fsdp"; vectors (norm scales) are replicated."""
  shape = np.shape(leaf)
  if len(shape) < 2:
    return PartitionSpec()
  for axis, size in enumerate(shape):
    if size == hidden and size % fsdp == 0:
      return PartitionSpec(*([None] * axis + ["fsdp"]))
  return PartitionSpec()


def shardings(mesh, params, tx, hidden: int):
  """(param, optimizer-state, batch) shardings for `jax.jit`, or Nones without a mesh."""
  if mesh is None:
    return None, None, None
  fsdp = mesh.shape["fsdp"]
  psh = jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x, hidden, fsdp)), params)
  import optax_subspace  # the state rules cover any optax chain, subspace or not

  ssh = optax_subspace.state_shardings(tx, params, psh, mesh=mesh)
  bsh = NamedSharding(mesh, PartitionSpec(AXES))
  return psh, ssh, bsh


def place(tree, sharding_tree):
  """Moves a tree onto its shardings (identity without a mesh)."""
  if sharding_tree is None:
    return tree
  return jax.tree.map(jax.device_put, tree, sharding_tree)

