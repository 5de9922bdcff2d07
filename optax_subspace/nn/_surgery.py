"""Finding and replacing linear layers of an unmodified Flax NNX model.

NNX modules are mutable Python objects, so a layer can be swapped for a
wrapper in place ("model surgery", as the Flax NNX guide calls it): the
model's code and its `__call__` stay as written, and calling the parent
module calls the wrapper.
"""

from __future__ import annotations

import re
from typing import Callable, Union

import jax
from flax import nnx

LayerMask = Union[str, Callable[[str, nnx.Module], bool]]


def path_str(path) -> str:
  """An NNX graph path ``("layers", 0, "mlp", "up_proj")`` as ``"layers/0/mlp/up_proj"``."""
  return "/".join(str(p) for p in path)


def find_linears(model: nnx.Module, mask: LayerMask,
                 kinds=(nnx.Linear,)) -> list[tuple[tuple, nnx.Module]]:
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
        f" {seen[:8]}{' ...' if len(seen) > 8 else ''}")
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
