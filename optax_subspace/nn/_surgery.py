"""Finding and replacing linear layers of an unmodified Flax NNX model.

NNX modules are mutable Python objects, so a layer can be swapped for a
wrapper in place ("model surgery", as the Flax NNX guide calls it): the
model's code and its `__call__` stay as written, and calling the parent
module calls the wrapper.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Union

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from optax_subspace._leaves import path_str

LayerMask = Union[str, Callable[[str, nnx.Module], bool]]


def find_linears(
  model: nnx.Module, mask: LayerMask, kinds=(nnx.Linear,)
) -> list[tuple[tuple, nnx.Module]]:
  """(path, layer) of every layer of type `kinds` whose path `mask` selects.

  `mask` is a regex searched (`re.search`) in the "/"-joined module path
  (e.g. ``r"(attention|mlp)/"``) or a callable ``(path, layer) -> bool``.
  Raises ValueError when nothing is selected, naming the paths there are.
  """
  if isinstance(mask, str):
    pattern = re.compile(mask)
    select = lambda p, m: bool(pattern.search(p))
  elif callable(mask):
    select = mask
  else:
    raise TypeError(f"mask must be a regex string or a callable, got {mask!r}.")
  found, seen = [], []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, kinds) and path:
      seen.append(path_str(path))
      if select(path_str(path), node):
        found.append((tuple(path), node))
  if not found:
    kinds_names = ", ".join(k.__name__ for k in kinds)
    raise ValueError(
      f"mask {mask!r} selects no layer of type {kinds_names}; the model has:"
      f" {seen[:8]}{' ...' if len(seen) > 8 else ''}"
    )
  return found


def replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
  """Puts `new` where the submodule at `path` is (attribute or list item)."""
  parent = model
  for p in path[:-1]:
    parent = parent[p] if isinstance(p, int) else getattr(parent, p)
  last = path[-1]
  if isinstance(last, int):
    parent[last] = new
  else:
    setattr(parent, last, new)


def param_leaf_indices(model: nnx.Module) -> dict[tuple, int]:
  """Graph path of every `nnx.Param` -> its position in the flattened Param state.

  A layer at module path ``path`` has its kernel at ``path + ("kernel",)``;
  that position is the leaf index the optimizer level gives the same kernel
  (`projectors._base.matrix_keys`), so both levels draw the same keys. Read
  it before any surgery: replacing layers changes the Param state.
  """
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  return {
    tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey)): i
    for i, (key_path, _) in enumerate(flat)
  }


# What a layer that replaces an `nnx.Linear` keeps of it, besides its arrays.
LINEAR_SETTINGS = (
  "use_bias",
  "dtype",
  "param_dtype",
  "precision",
  "dot_general",
  "promote_dtype",
  "preferred_element_type",
)


def adopt_linear(module: nnx.Module, linear: nnx.Module, wrapper: str) -> nnx.Variable:
  """Checks that `linear` is an `nnx.Linear` with a 2-D kernel and gives
  `module` (its replacement, named `wrapper` in errors) its sizes
  (`in_features`, `out_features`), `LINEAR_SETTINGS` and its bias (the same
  `nnx.Param`). Returns the kernel Variable, for the replacement's own
  frozen copy (`frozen`) and factor (`factor_param`).
  """
  if not isinstance(linear, nnx.Linear):
    raise TypeError(f"{wrapper} replaces an nnx.Linear, got {type(linear).__name__}.")
  kernel = linear.kernel
  if kernel.ndim != 2:
    raise ValueError(f"{wrapper} needs a 2-D kernel (in, out), got shape {kernel.shape}.")
  module.in_features, module.out_features = kernel.shape
  for name in LINEAR_SETTINGS:
    setattr(module, name, getattr(linear, name))
  module.bias = linear.bias
  return kernel


def frozen(variable_type, kernel: nnx.Variable) -> nnx.Variable:
  """The kernel's array as a `variable_type` (not a Param: no gradient, no
  optimizer state), with the kernel's metadata; already placed, so not
  resharded on creation."""
  return variable_type(kernel[...], **{**kernel.get_metadata(), "eager_sharding": False})


def split_sharding(kernel: jax.Array, keep_axis: int) -> Optional[NamedSharding]:
  """A NamedSharding for an array that shares axis `keep_axis` with the kernel, if it has one."""
  sharding = getattr(kernel, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return None
  spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
  kept = [None, None]
  kept[keep_axis] = spec[keep_axis]
  return NamedSharding(sharding.mesh, PartitionSpec(*kept))


def split_metadata(kernel: nnx.Variable, keep_axis: int) -> dict:
  """Sharding metadata (`out_sharding`) for an array sharing the kernel's axis `keep_axis`."""
  names = kernel.get_metadata().get("out_sharding")
  if not names:
    return {}
  names = tuple(names) + (None,) * (2 - len(names))
  kept = [None, None]
  kept[keep_axis] = names[keep_axis]
  return {"out_sharding": tuple(kept), "eager_sharding": False}


def placed(value: jax.Array, kernel: jax.Array, keep_axis: int) -> jax.Array:
  """`value` with the kernel's split of axis `keep_axis` (as it is, if none)."""
  sharding = split_sharding(kernel, keep_axis)
  return value if sharding is None else jax.device_put(value, sharding)


def factor_param(value: jax.Array, kernel: nnx.Variable, keep_axis: int) -> nnx.Param:
  """The trainable factor of a replacement layer as an `nnx.Param` that
  shares axis `keep_axis` with `kernel` (RSO's B, r × out: 1; GRASS's D,
  in × r: 0): placed with the kernel array's split of that axis, and with
  the matching `out_sharding` metadata (`nnx.get_partition_spec`, and the
  sharding `nnx.Optimizer` gives its moments)."""
  return nnx.Param(placed(value, kernel[...], keep_axis), **split_metadata(kernel, keep_axis))
