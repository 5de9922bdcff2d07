"""The plan: how every leaf is projected, decided once from the parameters.

`project_subspace` makes it at `init` from (params, mask, dims, rank, side)
and keeps it in its state as static metadata (no arrays, part of the tree
structure), so every part reads the same facts: the update (orientation,
padding, which matrices refresh or step together), `state_shardings` and
`update_shardings` (each leaf's side and rank) and the checkpoint signature
(each leaf's rank). None of them re-derives a leaf's side or rank from the
shapes of its buffers.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax

from optax_subspace import _leaves


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class SubspacePlan:
  """How each leaf of a parameter tree is projected (static, hashable).

  Attributes:
    leaves: one `LeafPlan` per parameter leaf, in `jax.tree_util` flatten
      order: its path, whether it is projected, its matrix axes
      (`row_axes`, `col_axes`) and batch axes, the transpose `perm` that
      orients it, the projected `side` (`axis`), the clamped `rank` and the
      inner state's `low_rank_shape`.
    rank: the rank asked for (each leaf's is clamped to its side).
    side: `project_subspace`'s ``side``: "smaller", "rows" or "cols".
  """

  leaves: tuple[_leaves.LeafPlan, ...]
  rank: int
  side: str

  def __hash__(self):  # a state's tree structure is hashed at every jit call
    return self._hash

  @functools.cached_property
  def _hash(self) -> int:
    return hash((self.leaves, self.rank, self.side))

  def __eq__(self, other):
    return self is other or (
      isinstance(other, SubspacePlan)
      and (self.leaves, self.rank, self.side) == (other.leaves, other.rank, other.side)
    )

  @functools.cached_property
  def projected(self) -> tuple[int, ...]:
    """Indices (flatten order) of the projected leaves."""
    return tuple(i for i, p in enumerate(self.leaves) if p.projected)

  @functools.cached_property
  def buckets(self) -> dict[tuple[int, int, int], tuple[int, ...]]:
    """{(s, l, r): projected leaves of that oriented shape and rank}.

    A bucket's matrices are refreshed by one batched call (the leaves'
    batch axes and the leaves stacked together), chunk by chunk.
    """
    out: dict[tuple[int, int, int], list[int]] = {}
    for i in self.projected:
      out.setdefault(self.leaves[i].bucket, []).append(i)
    return {k: tuple(v) for k, v in out.items()}

  def __getitem__(self, i: int) -> _leaves.LeafPlan:
    return self.leaves[i]

  def __len__(self) -> int:
    return len(self.leaves)

  def __iter__(self):
    return iter(self.leaves)


def make_plan(
  params: Any,
  rank: int,
  mask: _leaves.MaskSpec = None,
  dims: _leaves.DimsSpec = None,
  side: str = "smaller",
  *,
  quiet: bool = False,
) -> SubspacePlan:
  """The plan of `params` (see `_leaves.plan_leaves` for the rules).

  `quiet` drops the warning about ranks clamped to a matrix's side (given
  once, at `init`).
  """
  with warnings.catch_warnings():
    if quiet:
      warnings.simplefilter("ignore")
    leaves, _ = _leaves.plan_leaves(params, rank, mask, dims, side)
  return SubspacePlan(tuple(leaves), rank, side)
