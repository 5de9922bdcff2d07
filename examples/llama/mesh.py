"""Device mesh ("data", "fsdp") and the shardings of parameters, optimizer state and batches.

FSDP, as MaxText and Levanter default to: every weight matrix is split along its hidden-size
(embed) axis over "fsdp", so each device holds 1/F of every matrix and of its optimizer state;
the batch is split over both axes ("data" × "fsdp" devices). Under jit, XLA all-gathers each
weight where it is used and reduce-scatters its gradient. The optimizer state follows the
parameters through `optax_subspace.state_shardings`.

The model-level methods (`rso_model`, `grass_model`) split the model's state in two: the
trainable Params and the frozen rest (each replaced layer's kernel W, RSO's P and subproblem
index, GRASS's selection). A frozen W is split like the kernel it was; each factor shares one
axis with that kernel and takes that axis' split (`factor_spec`), as `optax_subspace.nn.rso_layers`
derives B's and P's shardings from a sharded kernel.

ZeRO-1 (`--shard-optimizer`, Rajbhandari et al., arXiv:1910.02054) on a mesh with fsdp 1: the
weights stay replicated for the forward and backward passes, but the optimizer state is placed as
if every matrix were split over "data" on its hidden axis (the same rule, `param_spec` with
axis "data"), and the gradients are split that way before the update (`update_shardings`). XLA
then reduce-scatters the gradient instead of all-reducing it, each device updates its share,
and the new weights are all-gathered: the bytes of one all-reduce, 1/D of the state per device.
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


def param_spec(leaf, hidden: int, fsdp: int, mesh_axis: str = "fsdp") -> PartitionSpec:
  """Splits the hidden-size axis of a matrix over `mesh_axis` (`fsdp` devices); vectors (norm
  scales) are replicated."""
  shape = np.shape(leaf)
  if len(shape) < 2:
    return PartitionSpec()
  for axis, size in enumerate(shape):
    if size == hidden and size % fsdp == 0:
      return PartitionSpec(*([None] * axis + [mesh_axis]))
  return PartitionSpec()


def factor_spec(leaf, kernel_spec: PartitionSpec, kernel_shape) -> PartitionSpec:
  """The split of a factor of a replaced layer whose kernel (in, out) is split by `kernel_spec`.

  A factor shares one axis with the kernel: RSO's P and GRASS's D are (in, r) and keep the
  kernel's split of in; RSO's B is (r, out) and keeps its split of out (B cannot be (in, out):
  RSO needs r < in). Anything else of the layer (vectors, scalars, keys) is replicated.
  """
  shape = np.shape(leaf)
  if len(shape) != 2:
    return PartitionSpec()
  spec = tuple(kernel_spec) + (None,) * (2 - len(kernel_spec))
  if shape[0] == kernel_shape[0]:
    return PartitionSpec(spec[0], None)
  if shape[1] == kernel_shape[1]:
    return PartitionSpec(None, spec[1])
  return PartitionSpec()


def _path(key_path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in key_path)


def model_level_specs(params, frozen, hidden: int, fsdp: int, mesh_axis: str = "fsdp"):
  """(params, frozen) trees of PartitionSpecs for a model with RsoLinear or GrassLinear layers.

  A layer is replaced where `frozen` holds a "kernel" (its W): W gets `param_spec`, the layer's
  other leaves in either tree `factor_spec` of W's; every other leaf (embedding, head, norm
  scales) gets `param_spec`, as on the unmodified model.
  """
  kernels = {}
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(frozen):
    path = _path(key_path)
    if path[-1] == "kernel":
      kernels[path[:-1]] = (param_spec(leaf, hidden, fsdp, mesh_axis), np.shape(leaf))

  def spec(key_path, leaf):
    path = _path(key_path)
    if path[-1] == "kernel" or path[:-1] not in kernels:
      return param_spec(leaf, hidden, fsdp, mesh_axis)
    return factor_spec(leaf, *kernels[path[:-1]])

  return (
    jax.tree_util.tree_map_with_path(spec, params),
    jax.tree_util.tree_map_with_path(spec, frozen),
  )


def _named(mesh, specs):
  return jax.tree.map(
    lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )


def _split_on(mesh, mesh_axis: str, params, hidden: int, frozen=None):
  """(params, frozen) shardings with every matrix split over `mesh_axis` (frozen: None if None)."""
  size = mesh.shape[mesh_axis]
  if frozen is None:
    specs = jax.tree.map(lambda x: param_spec(x, hidden, size, mesh_axis), params)
    return _named(mesh, specs), None
  pspecs, fspecs = model_level_specs(params, frozen, hidden, size, mesh_axis)
  return _named(mesh, pspecs), _named(mesh, fspecs)


def update_shardings(mesh, params, hidden: int, frozen=None, tx=None, dims=None):
  """ZeRO-1: the parameters' shardings as if every matrix were split over "data" on its hidden
  axis. The optimizer state is placed from them, and the gradient split by them before the
  update, so that each device updates only its share. With `tx` (an optimizer-level subspace
  method), each projected matrix is split on its kept side instead
  (`optax_subspace.update_shardings`): its projection, low-rank update and back-projection are
  then local to each device, with no partial sums of R nor gathers of the low-rank factors.
  `dims`: the method's dimension numbers, where kernels have more than two axes (scanned)."""
  if mesh.shape["fsdp"] > 1:
    raise ValueError("ZeRO-1 needs fsdp 1: the fsdp axis already splits the optimizer state")
  split = _split_on(mesh, "data", params, hidden, frozen)[0]
  if tx is None or frozen is not None:
    return split
  import optax_subspace  # the rule covers any optax chain, subspace or not

  return optax_subspace.update_shardings(tx, params, split, dims=dims)


def shardings(mesh, params, tx, hidden: int, frozen=None, shard_optimizer: bool = False, dims=None):
  """(param, optimizer-state, batch) shardings for `jax.jit`, or Nones without a mesh.

  With `frozen` (the model-level methods' non-Param state), a fourth: the frozen state's
  shardings, and the parameters' follow `model_level_specs`. With `shard_optimizer` (ZeRO-1),
  the state is placed from `update_shardings` rather than from the parameters' shardings.
  `dims`: the method's dimension numbers, where kernels have more than two axes (scanned).
  """
  if mesh is None:
    return (None,) * (3 if frozen is None else 4)
  psh, fsh = _split_on(mesh, "fsdp", params, hidden, frozen)
  state_from = update_shardings(mesh, params, hidden, frozen, tx, dims) if shard_optimizer else psh
  import optax_subspace  # the state rules cover any optax chain, subspace or not

  ssh = optax_subspace.state_shardings(tx, params, state_from, mesh=mesh, dims=dims)
  bsh = NamedSharding(mesh, PartitionSpec(AXES))
  return (psh, ssh, bsh) if frozen is None else (psh, ssh, bsh, fsh)


def place(tree, sharding_tree):
  """Moves a tree onto its shardings (identity without a mesh)."""
  if sharding_tree is None:
    return tree
  return jax.tree.map(jax.device_put, tree, sharding_tree)
