"""Per-layer refresh work run chunk after chunk, so its temporaries stay a chunk's.

A jitted refresh that computes every layer in one go (a vmapped draw over every
layer of a shape, every layer's merge) leaves the compiler free to keep all
layers' float32 temporaries alive together: at LLaMA-7B the model-level RSO and
GRASS refresh programs needed 11 GB of temporaries against their steps' 8.3 and
2.8 GB (H200, compile-only). Split into chunks of at most `REFRESH_CHUNK_BYTES`
and ordered by optimization barriers, a chunk's work starts only once the last
chunk's results exist, so the temporaries alive at once are one chunk's. The
optimizer-level combinator's refresh (`_pipeline.Pipeline.refresh`) runs
its chunks the same way, each under its own `lax.cond`.
"""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, TypeVar

import jax

T = TypeVar("T")

# The float32 bytes one chunk of a model-level refresh handles (LLaMA-7B: one
# MLP projection or three attention projections). A layer larger than this is
# a chunk of its own (never split).
REFRESH_CHUNK_BYTES = 1 << 28
# The same for the optimizer-level refresh (`_pipeline.Pipeline.refresh`):
# its stacked float32 gradients. Larger, because each chunk is one batched
# eigh of the chunk's Gram matrices, and cuSOLVER's batched eigh costs about
# the same ~2,000 kernel launches whatever the batch: LLaMA-1B's refresh of
# 168 matrices took 1.48 s as 2 batched calls and 4.19 s as 19 chunks of 256
# MiB (H200, benchmarks/results/profile_update_h200_d2be5c0_refresh.json). 4 GiB is
# one chunk per shape at 1B (1.6 and 3.2 GB) and 3 + 5 chunks at 7B.
OPTIMIZER_REFRESH_CHUNK_BYTES = 1 << 32


def chunks(
  items: Iterable[T],
  group: Callable[[T], Hashable],
  nbytes: Callable[[T], int],
  budget: int | None = None,
) -> list[tuple[Hashable, list[T]]]:
  """(group key, items) for runs of `items` of one group, each at most `budget` bytes.

  Items keep their order within a group; groups come in the order of their
  first item. A chunk's items can be one vmapped computation (same group).
  `budget` defaults to `REFRESH_CHUNK_BYTES` (read at the call).
  """
  budget = REFRESH_CHUNK_BYTES if budget is None else budget
  groups: dict[Hashable, list[T]] = {}
  for item in items:
    groups.setdefault(group(item), []).append(item)
  out = []
  for key, members in groups.items():
    chunk, size = [], 0
    for item in members:
      if chunk and size + nbytes(item) > budget:
        out.append((key, chunk))
        chunk, size = [], 0
      chunk.append(item)
      size += nbytes(item)
    out.append((key, chunk))
  return out


def after(previous, inputs):
  """`inputs`, usable only once `previous` (the last chunk's results) exist.

  An optimization barrier over both: without it the compiler may start every
  chunk at once (nothing else orders them) and keep all their temporaries
  alive together. No value changes. `previous` None: the first chunk.
  Eagerly (no tracer among `inputs`) the chunks already run in call order,
  and a barrier would only copy the arrays, so there is none.
  """
  traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(inputs))
  if previous is None or not traced:
    return inputs
  return jax.lax.optimization_barrier((previous, inputs))[1]
