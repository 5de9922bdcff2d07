"""Which leaves are projected, and how an N-D leaf is seen as a batch of matrices.

Everything here is static: it runs in Python on shapes, at `init` and again
while tracing `update`, and never touches array values.
"""

from __future__ import annotations

import inspect
import math
import re
import sys
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np


class MatrixDims(NamedTuple):
  """Which axes of a leaf form the rows and the columns of its matrices.

  Every axis that is neither a row nor a column axis is a batch axis: each
  index along it is a separate matrix with its own projector (a scanned
  model's kernel of shape ``(layers, in, out)`` is ``MatrixDims(rows=1,
  cols=2)``, a batch of ``layers`` matrices). Several axes on one side are
  flattened together in the order given (an attention kernel of shape
  ``(embed, heads, head_dim)`` is ``MatrixDims(rows=0, cols=(1, 2))``).

  For a Flax kernel, stored ``(in, out)``, rows are the input side. By
  default the projector spans the smaller side, and the rows when both are
  equal, which is the input side of a square layer, as in the GaLore
  authors' code; `project_subspace`'s `side` can fix it to the rows or the
  columns instead.

  Attributes:
    rows: axis or axes forming the matrix rows (the input side of a kernel).
    cols: axis or axes forming the matrix columns (the output side).
  """

  rows: Union[int, Sequence[int]] = 0
  cols: Union[int, Sequence[int]] = 1


DimsSpec = Union[None, MatrixDims, Callable[[str, Any], Optional[MatrixDims]], Any]
# A regex on leaf paths, `leaf_predicate(fn)`, a callable of the params tree
# returning a tree of bools (optax's convention), or such a tree.
MaskSpec = Union[None, str, "LeafPredicate", Callable[[Any], Any], Any]
# Which side of each matrix the projector spans: the smaller one (GaLore;
# ties go to the rows), always the rows (the input side of a Flax kernel:
# RSO's P acts on the layer input), or always the columns.
SIDES = ("smaller", "rows", "cols")


class LeafPlan(NamedTuple):
  """How one parameter leaf is projected: static, hashable, no arrays.

  Attributes:
    path: the leaf's key path joined by "/" (what `mask` matches).
    shape: the leaf's shape.
    projected: whether the leaf is projected; the other fields are only
      meaningful if so.
    perm: the transpose to (batch axes, row axes, column axes).
    batch_shape: lengths of the batch axes (one matrix per index).
    rows, cols: the matrix's row and column counts (row or column axes
      flattened together).
    axis: 0 when P spans the rows, 1 when it spans the columns.
    rank: r, the requested rank clamped to the projected side.
    row_axes, col_axes: the leaf's axes that form the rows and the columns
      (`MatrixDims`); every other axis is a batch axis.
  """

  path: str
  shape: tuple[int, ...]
  projected: bool
  perm: tuple[int, ...] = ()
  batch_shape: tuple[int, ...] = ()
  rows: int = 0
  cols: int = 0
  axis: int = 0
  rank: int = 0
  row_axes: tuple[int, ...] = ()
  col_axes: tuple[int, ...] = ()

  @property
  def batch_axes(self) -> tuple[int, ...]:
    """The leaf's axes that index its matrices (leading in `perm`)."""
    return self.perm[: len(self.batch_shape)]

  @property
  def side(self) -> int:
    """Length of the projected side (s)."""
    return self.rows if self.axis == 0 else self.cols

  @property
  def other(self) -> int:
    """Length of the side that is kept (l)."""
    return self.cols if self.axis == 0 else self.rows

  @property
  def num_matrices(self) -> int:
    return math.prod(self.batch_shape)

  @property
  def low_rank_shape(self) -> tuple[int, ...]:
    """Shape of the projected gradient as the inner transformation sees it."""
    if self.axis == 0:
      return self.batch_shape + (self.rank, self.cols)
    return self.batch_shape + (self.rows, self.rank)

  @property
  def bucket(self) -> tuple[int, int, int]:
    """(s, l, r): leaves of one bucket are refreshed as one batch."""
    return (self.side, self.other, self.rank)

  @property
  def kept_side_is_last(self) -> bool:
    """Whether the oriented (s, l) matrix is the leaf in its own layout.

    P spans the rows and no axis moves, so l is the leaf's last axis, the
    row stride of the products with G (what `PRODUCT_ALIGNMENT` pads).
    """
    return self.axis == 0 and self.perm == tuple(range(len(self.shape)))


def path_str(path) -> str:
  """`("layers", 0, "kernel")`-style key path as ``"layers/0/kernel"``."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(str(k.name))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts)


def _variable_type():
  """Flax NNX's `Variable` class if Flax NNX is loaded, else None.

  Read from `sys.modules`, never imported: when `flax.nnx` is not loaded no
  Variable can exist, and the library does not depend on Flax.
  """
  return getattr(sys.modules.get("flax.nnx"), "Variable", None)


def is_variable(x) -> bool:
  """Whether `x` is a Flax NNX `Variable` (an `nnx.Param`, an `OptState`, ...)."""
  variable = _variable_type()
  return variable is not None and isinstance(x, variable)


def unwrap_variables(tree):
  """`tree` with every Flax NNX `Variable` replaced by its value.

  What `nnx.as_pure` does, without importing Flax: `nnx.Optimizer` hands
  `update` the parameters this way, while `init` gets them wrapped
  (``nnx.state(model, nnx.Param)``). Trees without Variables come back as
  they are.
  """
  if _variable_type() is None:
    return tree

  def value(x):
    if not is_variable(x):
      return x
    return x.get_value() if hasattr(x, "get_value") else x.value

  return jax.tree_util.tree_map(value, tree, is_leaf=is_variable)


def leaf_paths(tree) -> list[str]:
  """The `path_str` of every leaf of `tree`, in flatten order.

  A Flax NNX `Variable` adds no name of its own: the kernel of
  ``nnx.state(model, nnx.Param)`` is ``"layers/0/kernel"``, not
  ``"layers/0/kernel/value"``, the path the same leaf has in the plain arrays
  `nnx.Optimizer` passes to `update`. So `mask` and `dims` see one path per
  leaf whichever form the tree comes in.
  """
  paths = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)[0]:
    if is_variable(x):
      paths.extend(
        path_str(tuple(path) + tuple(sub))
        for sub, _ in jax.tree_util.tree_flatten_with_path(unwrap_variables(x))[0]
      )
    else:
      paths.append(path_str(path))
  return paths


def _as_axes(spec, ndim: int, what: str, path: str) -> tuple[int, ...]:
  axes = (spec,) if isinstance(spec, (int, np.integer)) else tuple(spec)
  if not axes:
    raise ValueError(f"MatrixDims.{what} of leaf '{path}' is empty.")
  out = []
  for a in axes:
    if not -ndim <= int(a) < ndim:
      raise ValueError(f"MatrixDims.{what}={spec} does not fit leaf '{path}' of rank {ndim}.")
    out.append(int(a) % ndim)
  return tuple(out)


class LeafPredicate:
  """A per-leaf `mask`: ``fn(path, leaf) -> bool``; made by `leaf_predicate`."""

  def __init__(self, fn: Callable[[str, Any], bool]):
    if not callable(fn):
      raise TypeError(f"leaf_predicate takes a callable, got {fn!r}.")
    self.fn = fn

  def __repr__(self):
    return f"leaf_predicate({self.fn!r})"


def leaf_predicate(fn: Callable[[str, Any], bool]) -> LeafPredicate:
  """Marks `fn` as a per-leaf `mask`: ``fn(path, leaf) -> bool``.

  `path` is the leaf's key path as a string (``"layers/0/attention/kernel"``;
  a Flax NNX Variable adds no "/value"), `leaf` the array (or
  `jax.ShapeDtypeStruct`). A bare callable given as `mask` is optax's
  convention instead: ``mask(params)`` returns a tree of bools, as
  `optax.masked` takes it.

  References:
    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection", ICML 2024, arXiv:2403.03507 (projects the attention and MLP
    matrices: the leaves a mask selects).

  Args:
    fn: ``(path: str, leaf) -> bool``, True for a leaf to project.

  Returns:
    A `LeafPredicate`, for the `mask` of `project_subspace` and the presets.

  Example:
    >>> import jax.numpy as jnp, optax, optax_subspace as osub
    >>> mask = osub.leaf_predicate(lambda path, x: "kernel" in path)
    >>> tx = osub.galore(1e-3, rank=2, mask=mask)
    >>> state = tx.init({"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)})
  """
  return LeafPredicate(fn)


def _takes_path_and_leaf(fn) -> bool:
  """Whether `fn` needs two positional arguments (the per-leaf predicates
  `mask` took before it followed optax's convention)."""
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):  # no signature: taken as optax's form
    return False
  try:
    signature.bind(None)
    return False
  except TypeError:
    pass
  try:
    signature.bind(None, None)
    return True
  except TypeError:
    return False


def _spread(mask_tree, params, what: str) -> list[bool]:
  """One bool per leaf of `params` from a tree of bools with `params`'
  structure or a prefix of it (a bool for a whole subtree), as
  `optax.masked` takes it. Flax NNX Variables are looked through on both."""
  mask_tree, pure = unwrap_variables(mask_tree), unwrap_variables(params)
  try:
    spread = jax.tree_util.tree_map(
      lambda m, sub: [bool(m)] * len(jax.tree_util.tree_leaves(sub)), mask_tree, pure
    )
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(
      f"{what} is a pytree whose structure does not match the parameters"
      " (it must be their structure or a prefix of it):"
      f"\n  mask:   {jax.tree_util.tree_structure(mask_tree)}"
      f"\n  params: {jax.tree_util.tree_structure(pure)}"
    ) from e
  return jax.tree_util.tree_leaves(spread)


def _leaf_mask(mask: MaskSpec, paths, leaves, params) -> list[bool]:
  """Resolves `mask` to one bool per leaf."""
  if mask is None:  # every floating-point matrix or batch of matrices
    return [
      len(np.shape(x)) >= 2 and jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves
    ]
  if isinstance(mask, str):
    pattern = re.compile(mask)
    selected = [bool(pattern.search(p)) for p in paths]
    if not any(selected):
      raise ValueError(
        f"mask {mask!r} matches no parameter path. Paths are matched with"
        f" re.search against: {paths[:8]}{' ...' if len(paths) > 8 else ''}"
      )
    return selected
  if isinstance(mask, LeafPredicate):
    return [bool(mask.fn(p, x)) for p, x in zip(paths, leaves)]
  if callable(mask):
    if _takes_path_and_leaf(mask):
      warnings.warn(
        "mask: a callable of (path, leaf) is read as a per-leaf predicate;"
        " wrap it as optax_subspace.leaf_predicate(fn). A bare callable mask"
        " follows optax's convention, mask(params) -> tree of bools.",
        DeprecationWarning,
        stacklevel=5,
      )
      return [bool(mask(p, x)) for p, x in zip(paths, leaves)]
    return _spread(mask(unwrap_variables(params)), params, "mask(params) returned a tree that")
  return _spread(mask, params, "mask")


def selected(params, mask: MaskSpec = None):
  """The tree of bools `mask` selects in `params` (see `plan_leaves`)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  chosen = _leaf_mask(mask, leaf_paths(params), leaves, params)
  return treedef.unflatten(chosen)


def _leaf_dims(dims: DimsSpec, paths, leaves, treedef) -> list:
  if dims is None or isinstance(dims, MatrixDims):
    return [dims] * len(leaves)
  if callable(dims):
    return [dims(p, x) for p, x in zip(paths, leaves)]
  dims_leaves, dims_def = jax.tree_util.tree_flatten(
    dims, is_leaf=lambda d: d is None or isinstance(d, MatrixDims)
  )
  if dims_def != treedef:
    raise ValueError(
      "dims is a pytree whose structure does not match the parameters:"
      f"\n  dims:   {dims_def}\n  params: {treedef}"
    )
  return dims_leaves


def plan_leaves(
  params,
  rank: int,
  mask: MaskSpec = None,
  dims: DimsSpec = None,
  side: str = "smaller",
) -> tuple[list[LeafPlan], Any]:
  """Decides, for each leaf of `params`, whether and how it is projected.

  `side` is one of `SIDES`; the rank of each matrix is clamped to the length
  of its projected side, with a warning. Returns the plans in
  `jax.tree_util.tree_flatten` order and the treedef. Raises `ValueError` on
  a mask, dims or side that does not fit the parameters, and `TypeError` on
  a selected leaf that is not floating point.
  """
  if side not in SIDES:
    raise ValueError(f"side must be one of {SIDES}, got {side!r}.")
  leaves, treedef = jax.tree_util.tree_flatten(params)
  paths = leaf_paths(params)
  selected = _leaf_mask(mask, paths, leaves, params)
  leaf_dims = _leaf_dims(dims, paths, leaves, treedef)
  plans, clamped = [], []
  for path, x, sel, d in zip(paths, leaves, selected, leaf_dims):
    shape = tuple(int(n) for n in np.shape(x))
    if not sel:
      plans.append(LeafPlan(path, shape, False))
      continue
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise TypeError(
        f"Leaf '{path}' is selected for projection but has dtype"
        f" {jnp.result_type(x)}; only floating-point leaves can be projected."
        " Exclude it with `mask`."
      )
    ndim = len(shape)
    if d is None:
      if ndim != 2:
        raise ValueError(
          f"Leaf '{path}' of shape {shape} is selected for projection but is"
          " not 2-D: say which axes form the matrix with"
          " `dims=MatrixDims(rows=..., cols=...)` (other axes are batch"
          " axes), or exclude it with `mask`."
        )
      d = MatrixDims(0, 1)
    rows = _as_axes(d.rows, ndim, "rows", path)
    cols = _as_axes(d.cols, ndim, "cols", path)
    if len(set(rows + cols)) != len(rows) + len(cols):
      raise ValueError(f"MatrixDims {d} of leaf '{path}' repeats an axis.")
    batch = tuple(a for a in range(ndim) if a not in rows + cols)
    m = math.prod(shape[a] for a in rows)
    n = math.prod(shape[a] for a in cols)
    if side == "smaller":
      axis = 0 if m <= n else 1  # ties: the input side, as the authors' code
    else:
      axis = 0 if side == "rows" else 1
    s = m if axis == 0 else n
    if rank >= s:
      clamped.append(path)
    plans.append(
      LeafPlan(
        path=path,
        shape=shape,
        projected=True,
        perm=batch + rows + cols,
        batch_shape=tuple(shape[a] for a in batch),
        rows=m,
        cols=n,
        axis=axis,
        rank=min(rank, s),
        row_axes=rows,
        col_axes=cols,
      )
    )
  if clamped:
    what = {"smaller": "smaller side", "rows": "row (input) side", "cols": "column (output) side"}[
      side
    ]
    warnings.warn(
      f"rank {rank} is not below the {what} of {len(clamped)} leaves"
      f" ({', '.join(clamped[:4])}{', ...' if len(clamped) > 4 else ''}):"
      f" they are projected on their full {what} (an exact rotation for an"
      " orthonormal basis, which saves no memory). Lower the rank or"
      " exclude them with `mask`.",
      stacklevel=4,
    )
  return plans, treedef


def to_stored(x, plan: LeafPlan):
  """Leaf -> (*batch, rows, cols): its matrices as the leaf stores them.

  No data moves when the batch axes lead and each side is one axis (a
  kernel (in, out), a scanned (layers, in, out)). It is the oriented
  (s, l) matrix when P spans the rows, its transpose (l, s) otherwise.
  """
  return jnp.transpose(x, plan.perm).reshape(plan.batch_shape + (plan.rows, plan.cols))


def from_stored(y, plan: LeafPlan):
  """(*batch, rows, cols) -> the leaf's own shape and axis order."""
  permuted = tuple(plan.shape[a] for a in plan.perm)
  return jnp.transpose(y.reshape(permuted), np.argsort(plan.perm))


def to_oriented(x, plan: LeafPlan):
  """Leaf -> (*batch, s, l): the projected side first, as projectors see it."""
  x = to_stored(x, plan)
  return x if plan.axis == 0 else jnp.swapaxes(x, -1, -2)


def from_oriented(y, plan: LeafPlan):
  """(*batch, s, l) -> the leaf's own shape and axis order."""
  return from_stored(y if plan.axis == 0 else jnp.swapaxes(y, -1, -2), plan)


def low_rank_layout(r, plan: LeafPlan):
  """(*batch, r, l) <-> the inner transformation's layout for this leaf.

  The low-rank gradient keeps the leaf's orientation (rows x r when the
  columns are projected), so the inner state looks like the authors' moments
  (larger side x r). The map swaps the last two axes or not, so it is its own
  inverse.
  """
  return r if plan.axis == 0 else jnp.swapaxes(r, -1, -2)
