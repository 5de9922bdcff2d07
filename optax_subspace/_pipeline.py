"""The stages of one `project_subspace` update, each a function of the plan.

    refresh (when due) → project → inner → back-project → advance

The gradient keeps the names of the method through them (docs/design.md):
`g` is G as it comes (one array per leaf), `r` its projection R = PᵀG,
`n` the inner transformation's update N of R, `u` the outgoing update
α·P·N. The products are the generic ones of every projector (R = PᵀG and
α·P·N with the basis P, or the projector's own `project` and `back`); what
a basis is (GaLore's singular vectors, OSD's online-PCA step, a random draw,
a row selection) is the projector's, in `projectors/`.

Issue 23's stages go in at two seams: a residual stage (`Pipeline.residual`)
takes g, r and n after the inner update (G − P·R, which FRUGAL and Fira
update on their own) and its term joins `Pipeline.back_project` before α;
an output mode that scales the full gradient by factors computed in the
subspace (APOLLO, `Pipeline.scale_output`) replaces `Pipeline.back_project`.
The per-matrix functions of both are `_stages.Stages`'.

Everything here runs while `update` is traced: Python loops over the plan's
leaves and buckets build one program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_subspace import _chunks
from optax_subspace import _leaves
from optax_subspace import _plan
from optax_subspace.projectors import _base


def over_batch(fn, leaf: _leaves.LeafPlan, *args, in_axes):
  """Applies a one-matrix function to every matrix of a leaf.

  Mapped arguments have the leaf's batch axes leading; they are flattened to
  one axis, vmapped, and the outputs get the batch axes back. A plain matrix
  (no batch axes) is passed straight through: no size-1 batch dimension for
  XLA to carry into every product.
  """
  if not leaf.batch_shape:
    return fn(*args)
  b = leaf.num_matrices
  flat = [
    jax.tree_util.tree_map(lambda x: x.reshape((b,) + x.shape[len(leaf.batch_shape) :]), a)
    if ax == 0
    else a
    for a, ax in zip(args, in_axes)
  ]
  out = jax.vmap(fn, in_axes=in_axes)(*flat)
  return jax.tree_util.tree_map(lambda x: x.reshape(leaf.batch_shape + x.shape[1:]), out)


def stacked(fn, plan: _plan.SubspacePlan, leaves, group, *trees, hold=False):
  """Applies a one-matrix function to the matrices of many leaves, batched.

  `trees` are dicts {leaf: pytree with the leaf's batch axes leading}; the
  leaves whose `group(leaf plan)` agree are concatenated along one batch
  axis and go through one vmapped `fn`, so a tree of 170 matrices compiles
  to a few batched calls, not 170. Returns {leaf: output, batch axes
  restored}. `hold`: each batched output passes an optimization barrier
  before it is cut, so the cuts read one stored array.
  """
  groups: dict[Any, list[int]] = {}
  for i in leaves:
    groups.setdefault(group(plan[i]), []).append(i)
  results = {}
  for members in groups.values():
    flat = lambda x, i: x.reshape((plan[i].num_matrices,) + x.shape[len(plan[i].batch_shape) :])
    cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=0)
    stacks = [
      jax.tree_util.tree_map(
        lambda *xs: cat([flat(x, i) for x, i in zip(xs, members)]), *[tree[i] for i in members]
      )
      for tree in trees
    ]
    out = jax.vmap(fn)(*stacks)
    if hold:
      out = jax.lax.optimization_barrier(out)
    start = 0
    for i in members:
      leaf, stop = plan[i], start + plan[i].num_matrices
      results[i] = jax.tree_util.tree_map(
        lambda x: x[start:stop].reshape(leaf.batch_shape + x.shape[1:]), out
      )
      start = stop
  return results


def _pad(x, extra):
  return x if not extra else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def _cut(x, extra):
  return x if not extra else x[..., : x.shape[-1] - extra]


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """The projector's side of one update: its stages, over the plan's leaves.

  Attributes:
    projector: the `Projector`.
    plan: the `SubspacePlan` of the tree being updated.
    dtype: operand dtype of the products with G (`projection_dtype`).
    alignment: `PRODUCT_ALIGNMENT`, read while the update is traced.
    own_batch: `OWN_BATCH_MATRICES`, read while the update is traced.
    hold_bases: the projector's `hold_basis`, or `HOLD_COMPUTED_BASES` where set, read
      while the update is traced.
    stack_elements: `STACKED_PRODUCT_ELEMENTS`, read while the update is traced (0: every
      product with G and with N per leaf).
    stack_steps: `STACK_SMALL_PROJECTOR_STEPS`, read while the update is traced: whether the
      projector steps of the leaves whose products run stacked run stacked too.
    bases_as_product_stacks: `BASES_AS_PRODUCT_STACKS`, read while the update is traced.
    columns_stacked_as_stored: `COLUMNS_STACKED_AS_STORED`, read while the update is traced.
  """

  projector: _base.Projector
  plan: _plan.SubspacePlan
  dtype: Any
  alignment: int
  own_batch: int
  hold_bases: bool = False
  stack_elements: int = 0
  stack_steps: bool = False
  bases_as_product_stacks: bool = False
  columns_stacked_as_stored: bool = False

  @property
  def dense(self) -> bool:
    """Whether a product uses P (no own `project` or `back`)."""
    return self.projector.project is None or self.projector.back is None

  def orient(self, i, x):
    """Leaf i's array as its oriented (…, s, l) matrices, in `dtype`."""
    return _leaves.to_oriented(x, self.plan[i]).astype(self.dtype)

  def refresh(self, pstates, g, count, due, chunk_bytes):
    """Refreshes every projected matrix when due: by bucket, chunk by chunk.

    `g` are the gradients as they come; each is oriented and cast inside
    its chunk's refresh. Each chunk (`chunk_bytes` of float32 gradients at
    most; a leaf is never split) is one `lax.cond` on
    `needs_refresh(count)` whose refresh branch is one vmapped call on the
    chunk's stacked gradients; an optimization barrier orders the chunks,
    so chunk k + 1's gradients are read only once chunk k's bases exist. A
    cond's operands must all exist before it runs: one cond over every
    gradient kept every gradient (and any elementwise producer of it, a
    cast, a clipping scale) materialised at once, and its stacked float32
    copies made GaLore's 7B step need more memory than AdamW's. And the
    conds take the gradients as they come: an oriented (transposed, cast)
    gradient passed in would be materialised every step, refresh or not,
    where outside the cond XLA folds the transpose into the products that
    read it. `due`: the caller's static answer to `needs_refresh(count)` (a
    Python bool, or None), which replaces the conds: False returns the
    states as they are, True refreshes every chunk. Returns ({leaf: state},
    {leaf: changed}).
    """
    plan, projector = self.plan, self.projector
    unchanged = lambda i: jnp.zeros(plan[i].batch_shape, bool)
    if due is False or not plan.projected:
      return dict(pstates), {i: unchanged(i) for i in plan.projected}
    states, changed, previous = dict(pstates), {}, None
    predicate = None if due else projector.needs_refresh(count)
    size = lambda i: 4 * plan[i].num_matrices * plan[i].side * plan[i].other
    for _, chunk in _chunks.chunks(plan.projected, lambda i: plan[i].bucket, size, chunk_bytes):
      sub, raw = _chunks.after(previous, ({i: pstates[i] for i in chunk}, {i: g[i] for i in chunk}))

      def refreshed(sub, raw, chunk=chunk):
        out = stacked(
          lambda state, x: projector.refresh(state, x, count),
          plan,
          chunk,
          _bucket,
          sub,
          {i: self.orient(i, x) for i, x in raw.items()},
          hold=projector.hold_basis,
        )
        return {i: tuple(out[i]) for i in out}

      def kept(sub, raw, chunk=chunk):
        del raw
        return {i: (sub[i], unchanged(i)) for i in chunk}

      out = refreshed(sub, raw) if due else jax.lax.cond(predicate, refreshed, kept, sub, raw)
      for i, (state, moved) in out.items():
        states[i], changed[i] = state, moved
      previous = out
    return states, changed

  def bases(self, pstates):
    """{leaf: P} of every projected matrix in its current state.

    A computed basis (`batch_basis`: a random draw and its QR) is one
    vmapped call per (s, r); a stored one is read per leaf, so no P is
    stacked and unstacked.
    """
    projected = self.plan.projected
    if self.projector.batch_basis:
      # With `bases_as_product_stacks`, the leaves whose products run stacked draw their
      # bases in the stacks of those products, (s, l, r) in the same leaf order, and their
      # cuts are not held one by one: the product's concatenation of the cuts is then the
      # stack itself, which XLA folds back into it (no copy per leaf, no second stacking).
      together = set()
      if self.bases_as_product_stacks:
        together = set(self._stacked_products(self.projector.project))
      paths = {self.plan[i].path for i in together}
      bases = stacked(
        self.projector.basis,
        self.plan,
        projected,
        lambda leaf: (
          ("product", self._product_group(leaf)) if leaf.path in paths else (leaf.side, leaf.rank)
        ),
        pstates,
        hold=self.hold_bases,
      )
      # Held, each leaf's cut of the stacked bases is an array of its own, not a slice that
      # XLA folds into the GEMM reading it (`Projector.hold_basis`). The stack is held before
      # it is cut as well: with only the cuts held, APOLLO's update of the 1B tree (a Gaussian
      # draw, no QR between it and the cuts) finished XLA's HLO passes in 12 s and was still in
      # code generation ~85 s later on an H100; with the stack held it compiles in 9 s
      # (benchmarks/results/profile_update_1b_h100_50e0858_apollo_passes.log.gz).
      if not self.hold_bases:
        return bases
      held = jax.lax.optimization_barrier({i: b for i, b in bases.items() if i not in together})
      return {**bases, **held}
    return {
      i: over_batch(self.projector.basis, self.plan[i], pstates[i], in_axes=(0,)) for i in projected
    }

  def _padding(self, i, own, stacked=False):
    """Zero columns to add to leaf i's (…, l) operands of the dense products.

    Only where l is the GEMM's row stride: the leaf's last axis
    (`kept_side_is_last`), or any leaf whose products run `stacked`
    (`_stacked_products`: its operands are concatenated as oriented (s, l)
    matrices). Otherwise a leaf projected on its columns is read in its own
    layout, rows of s.
    """
    if own is not None or not (stacked or self.plan[i].kept_side_is_last):
      return 0
    return -self.plan[i].other % self.alignment

  def _product(self, own, dense, i, pstates, bases, x):
    """own(state, x) where the projector has it, else dense(P, x)."""
    if own is not None:
      return over_batch(own, self.plan[i], pstates[i], x, in_axes=(0, 0))
    return over_batch(dense, self.plan[i], bases[i], x, in_axes=(0, 0))

  def _aligned_product(self, own, dense, i, pstates, bases, x, hold=False):
    """`_product` on x zero-padded to the alignment (`_padding`), the padding cut off again:
    the same values, an aligned operand for the GEMM. `hold`: a padded product goes through
    an optimization barrier before its cut (`back_project` says why)."""
    extra = self._padding(i, own)
    out = self._product(own, dense, i, pstates, bases, _pad(x, extra))
    if extra and hold:
      out = jax.lax.optimization_barrier(out)
    return _cut(out, extra)

  def project(self, pstates, bases, g):
    """R = PᵀG of every projected leaf, oriented (…, r, l), and the advance's
    inputs.

    A stepped projector's `Advance.inputs` take what they need from G now,
    while the (padded) G is at hand, so no copy of it stays alive across
    the inner update; stacked like the products (`_stacked_products`: one
    batched G·GᵀP and ‖G‖² of OSD's for LLaMA-60M's 56 matrices, not 56 of
    each). Returns ({leaf: R}, {leaf: inputs}).
    """
    advance = _base.Advance.of(self.projector.advance)
    own, projected = self.projector.project, self.plan.projected
    together = self._stacked_products(own)
    as_stored = self._stacked_as_stored(together)
    extra = {i: self._padding(i, own, i in together and i not in as_stored) for i in projected}
    padded = {
      i: _leaves.to_stored(g[i], self.plan[i]).astype(self.dtype)
      if i in as_stored
      else _pad(self.orient(i, g[i]), extra[i])
      for i in projected
    }
    r_padded, x = {}, {}
    if together:
      r_padded = self._stacked_by_layout(_base.dense_project, together, as_stored, bases, padded)
      if advance is not None:
        x = self._stacked_by_layout(advance.inputs, together, as_stored, pstates, padded, r_padded)
    r = {}
    for i in projected:
      if i not in r_padded:
        r_padded[i] = self._product(own, _base.dense_project, i, pstates, bases, padded[i])
      r[i] = _cut(r_padded[i], extra[i])
      if advance is not None and i not in x:
        x[i] = over_batch(
          advance.inputs, self.plan[i], pstates[i], padded[i], r_padded[i], in_axes=(0, 0, 0)
        )
    return r, x

  def _stacked_products(self, own) -> list:
    """The leaves whose dense products run stacked (`stack_elements`): matrices of
    fewer than that many elements that share their (s, l, r) with another. On a GPU
    each product of a small matrix is a GEMM of a few µs whatever its size
    (LLaMA-60M's 112 per update); one batched GEMM per (s, l, r) replaces them, for
    one concatenation of the operands as oriented (s, l) matrices: a leaf projected
    on its columns (LLaMA's MLP down projections, stored (l, s)) joins its bucket
    transposed by that copy, which it makes anyway. A leaf that is a batch of
    `own_batch` matrices or more (a scanned model's kernel) runs its own batched
    products already.
    """
    if own is not None or not self.stack_elements:
      return []
    groups: dict[Any, list[int]] = {}
    for i in self.plan.projected:
      leaf = self.plan[i]
      small = leaf.side * leaf.other < self.stack_elements
      if small and leaf.num_matrices < self.own_batch:
        groups.setdefault(leaf.bucket, []).append(i)
    return [
      i
      for members in groups.values()
      if sum(self.plan[j].num_matrices for j in members) > 1
      for i in members
    ]

  def _stacked_as_stored(self, together) -> set:
    """The leaves of `together` projected on their columns that are stacked in their stored
    (…, l, s) layout, a stack of their own per (s, l, r) (`columns_stacked_as_stored`), not
    transposed into their bucket's (s, l) stack."""
    if not self.columns_stacked_as_stored:
      return set()
    return {i for i in together if self.plan[i].axis == 1}

  def _product_group(self, leaf: _leaves.LeafPlan):
    """The stacking key of the stacked products: (s, l, r), and whether the stack holds
    matrices in their stored layout (`_stacked_as_stored`)."""
    return (leaf.bucket, self.columns_stacked_as_stored and leaf.axis == 1)

  def _stacked_by_layout(self, fn, together, as_stored, first, g, *rest):
    """`stacked` `fn(first, G oriented (s, l), *rest)` over `together`, one call per
    `_product_group`: the stacks of `as_stored` leaves hold G as stored (l, s) and swap each
    matrix inside the vmapped call, which XLA folds into the products (no transpose of G)."""
    swapped = lambda a, x, *more: fn(a, jnp.swapaxes(x, -1, -2), *more)
    rows = [i for i in together if i not in as_stored]
    columns = [i for i in together if i in as_stored]
    group = self._product_group
    out = stacked(fn, self.plan, rows, group, first, g, *rest) if rows else {}
    if columns:
      out.update(stacked(swapped, self.plan, columns, group, first, g, *rest))
    return out

  def project_params(self, pstates, bases, w):
    """PᵀW of every projected leaf (what the inner transformation sees as
    its `params`), in the inner layout and the parameter's dtype."""
    out = {}
    for i in self.plan.projected:
      r = self._aligned_product(
        self.projector.project, _base.dense_project, i, pstates, bases, self.orient(i, w[i])
      )
      out[i] = _leaves.low_rank_layout(r, self.plan[i]).astype(jnp.result_type(w[i]))
    return out

  def back_project(self, pstates, bases, n, alpha, g, terms=None, hold_term=False):
    """ΔW = α·P·N of every projected leaf, in the leaf's layout and G's dtype.

    `n` holds the inner update N of each projected leaf in the inner
    layout. GaLore's Algorithm 1: G̃ = α·P·N (Zhao et al. 2024). With
    `terms` ({leaf: float32 in the stored layout}, from `residual`), ΔW = α·(P·N + S):
    the residual term is added before α (Fira's Algorithm 1; FRUGAL's α is 1).
    `alpha` is α, times −lr when the transformation has a learning rate.
    `hold_term`: a padded product that a term joins is held too (below), not
    only one without a term.
    """
    together = [] if terms is not None else self._stacked_products(self.projector.back)
    out = self._back_stacked(together, bases, n, alpha, g) if together else {}
    for i in self.plan.projected:
      if i in out:
        continue
      leaf, dtype = self.plan[i], jnp.result_type(g[i])
      term = None if terms is None else terms[i]
      # Without a term α multiplies N, not P·N: the product is then the
      # whole update, and XLA folds the weight's add W + P·N' into it (one
      # cuBLAS GEMM with β = 1), where a scalar between the two (α traced, or a
      # learning rate) left a separate pass over W and the update.
      after, n_i = (alpha, n[i]) if term is not None else (None, n[i].astype(jnp.float32) * alpha)
      if self.projector.back is None and leaf.axis == 1:
        out[i] = self._back_on_columns(i, bases, n_i, after, dtype, term)
        continue
      # Held: a padded P·N' cut to W's width would let XLA fold the weight's add into the GEMM
      # on a zero-padded copy of W whose result it then cuts (two more passes over W: GaLore's
      # 1B update on an H100 with Triton GEMM off went from 23.50 to 21.29 ms without them,
      # profile_update_1b_h100_c140bf9.json). The barrier keeps the padded product as the
      # GEMM's output, so that the cut and the add are one pass (with `hold_term`, the cut,
      # the term and the add).
      pn = self._aligned_product(
        self.projector.back,
        _base.dense_back,
        i,
        pstates,
        bases,
        _leaves.low_rank_layout(n_i, leaf).astype(self.dtype),
        hold=term is None or hold_term,
      )
      if term is not None:  # stored (l, s) for a leaf projected on its columns
        pn = pn + (jnp.swapaxes(term, -1, -2) if leaf.axis == 1 else term)
      out[i] = _leaves.from_oriented(_times(pn, after), leaf).astype(dtype)
    return out

  def _back_stacked(self, leaves, bases, n, alpha, g):
    """α·P·N of `leaves` (`_stacked_products`'), one batched product per (s, l, r), in
    each leaf's layout and G's dtype. No weight's add folds into a batched GEMM: the
    add is a pass of its own, as cheap as such a small matrix is."""
    as_stored = self._stacked_as_stored(leaves)
    extra = {i: self._padding(i, None, stacked=i not in as_stored) for i in leaves}
    x = {}
    for i in leaves:
      n_i = n[i].astype(jnp.float32) * alpha
      if i in as_stored:  # N in the inner layout (l, r): the product lands as stored, (l, s)
        x[i] = n_i.astype(self.dtype)
        continue
      x[i] = _pad(_leaves.low_rank_layout(n_i, self.plan[i]).astype(self.dtype), extra[i])
    rows = [i for i in leaves if i not in as_stored]
    group = self._product_group
    pn = stacked(_base.dense_back, self.plan, rows, group, bases, x) if rows else {}
    columns = [i for i in leaves if i in as_stored]
    stored = stacked(_transposed_back, self.plan, columns, group, bases, x) if columns else {}
    out = {i: _leaves.from_stored(y, self.plan[i]) for i, y in stored.items()}
    out.update({i: _leaves.from_oriented(_cut(pn[i], extra[i]), self.plan[i]) for i in rows})
    return {i: out[i].astype(jnp.result_type(g[i])) for i in leaves}

  def _float32_operands(self, i, g, r, n):
    """Leaf i's G as stored (…, rows, cols), R and N oriented (…, r, l), in float32.

    The stored matrix is the oriented G (s, l) when P spans the rows and its
    transpose (l, s) when P spans the columns; the residual and output
    stages read either (`transposed`), so G is never copied into the other
    layout. Oriented, Fira's and FRUGAL's 1B steps transposed the 24 MLP
    down projections' gradients and terms (3.7 ms of copies per update on
    an H100, profile_update_1b_h100_bec3eb6_new_methods.json).
    """
    leaf = self.plan[i]
    return (
      _leaves.to_stored(g[i], leaf).astype(jnp.float32),
      r[i].astype(jnp.float32),
      _leaves.low_rank_layout(n[i], leaf).astype(jnp.float32),
    )

  def _back_stored(self, i, pstates, bases, r32):
    """P·R of leaf i in its stored layout (float32): as `_float32_operands`' G.

    With a dense P and the columns projected, (P·R)ᵀ = Rᵀ·Pᵀ lands in the
    stored layout directly; otherwise the projector's oriented P·R is
    swapped.
    """
    leaf = self.plan[i]
    if self.projector.back is None and leaf.axis == 1:
      return self._product_on_columns(i, bases, _leaves.low_rank_layout(r32, leaf))
    # Padded as `back_project`'s N: R as cut from its padded product was an unaligned operand of
    # P·R, which XLA ran as a Triton GEMM fusion (48 gate/up products at ~187 µs each on an H100);
    # padded, FRUGAL's 1B update went from 38.12 to 34.90 ms (profile_update_1b_h100_9f250f3.json).
    back_r = self._aligned_product(self.projector.back, _base.dense_back, i, pstates, bases, r32)
    return jnp.swapaxes(back_r, -1, -2) if leaf.axis == 1 else back_r

  def residual(self, stages, pstates, bases, g, r, n, previous, released=None):
    """The residual stage: a term from G − P·R for every projected matrix.

    P·R is the projector's back-projection of R (`back`, or the dense P·R);
    `stages.residual_term` (FRUGAL's state-free step, Fira's scaled and
    limited residual) makes the term from G, P·R, R and N, with the
    limiter's previous norm of each matrix in `previous` ({leaf: float32
    array of the leaf's batch shape}). Fira's term folds into N instead
    (`_fira.fused_fira_terms`: c·G·D + P·(N − c·R·D), one product with P,
    for an orthonormal P). Returns ({leaf: term, float32, in the stored
    layout of `_float32_operands`' G}, the inner updates N to back-project
    (Fira's adjusted), {leaf: previous norm}), for `back_project`.
    `released`: Fira's (bias correction, α) for the released code's step,
    or None (`_stages.Stages.fused_terms`).
    """
    terms, norms, n = {}, {}, dict(enumerate(n))
    for i in self.plan.projected:
      leaf = self.plan[i]
      transposed = leaf.axis == 1
      g32, r32, n32 = self._float32_operands(i, g, r, n)
      if stages.fused:
        fused = functools.partial(stages.fused_terms, transposed=transposed, released=released)
        terms[i], n_i, norms[i] = over_batch(
          fused, leaf, g32, r32, n32, previous.get(i), in_axes=(0, 0, 0, 0)
        )
        n[i] = _leaves.low_rank_layout(n_i, leaf).astype(n[i].dtype)
        continue
      back_r = self._back_stored(i, pstates, bases, r32)
      term = functools.partial(stages.residual_term, transposed=transposed)
      terms[i], norms[i] = over_batch(
        term, leaf, g32, back_r, r32, n32, previous.get(i), in_axes=(0, 0, 0, 0, 0)
      )
    return terms, n, norms

  def scale_output(self, stages, g, r, n, alpha, previous, correction=None):
    """The "scale" output mode, in place of `back_project`: ΔW = α·G̃.

    G̃ is the full G scaled by factors from R and N, then limited
    (`stages.scaled_output`: APOLLO's Algorithm 1 with the norm-growth
    limiter of its Eq. 4; with `correction`, the limiter sees N before
    Adam's bias correction, `stages.scaled_output`). Returns ({leaf: ΔW in
    the leaf's layout and G's dtype}, {leaf: the limiter's previous norm}).
    """
    out, norms = {}, {}
    for i in self.plan.projected:
      leaf = self.plan[i]
      g32, r32, n32 = self._float32_operands(i, g, r, n)
      scaled_output = functools.partial(
        stages.scaled_output, transposed=leaf.axis == 1, correction=correction
      )
      scaled, norms[i] = over_batch(
        scaled_output, leaf, g32, r32, n32, previous[i], in_axes=(0, 0, 0, 0)
      )
      out[i] = _leaves.from_stored(scaled * alpha, leaf).astype(jnp.result_type(g[i]))
    return out, norms

  def _back_on_columns(self, i, bases, n, alpha, dtype, term=None):
    """α·(P·N + S) of a leaf projected on its columns, as (P N)ᵀ = Nᵀ Pᵀ.

    Nᵀ is the inner layout (l, r) of such a leaf: the product lands in the
    leaf's layout, with no transpose of an s×l result. `term` S (a residual
    stage's, in the stored layout (l, s)) is added before α, or None; α
    None: already applied to N.
    """
    leaf = self.plan[i]
    flipped = self._product_on_columns(i, bases, n.astype(self.dtype))
    if term is not None:
      flipped = flipped + term
    if leaf.perm == tuple(range(len(leaf.shape))):
      # Already the leaf's layout: returned as it is. Swapped to (s, l) and
      # back, XLA folded the outer transpose into the product (computing
      # P·N again) and copied the s×l result into the leaf's layout: 1.3 ms
      # of LLaMA-1B's GaLore step (H200, profile_update_h200_b210501.json).
      return _times(flipped, alpha).reshape(leaf.shape).astype(dtype)
    return _leaves.from_stored(_times(flipped, alpha), leaf).astype(dtype)

  def _product_on_columns(self, i, bases, x):
    """(P·X)ᵀ = Xᵀ·Pᵀ of a leaf projected on its columns, float32: X given in the
    inner layout (…, l, r), the product in the stored one (…, l, s)."""
    return over_batch(
      _transposed_back,
      self.plan[i],
      bases[i],
      x,
      in_axes=(0, 0),
    )

  def _step_group(self, leaf: _leaves.LeafPlan):
    """The stacking key of a leaf's `Advance.direction`: (s, r), or the leaf
    alone when it is a batch of `own_batch` matrices or more (a scanned
    model's kernel), which stacking would only copy."""
    if leaf.num_matrices >= self.own_batch:
      return (leaf.side, leaf.rank, leaf)
    return (leaf.side, leaf.rank)

  def advance(self, pstates, bases, x, count):
    """The projector's step after the update (OSD: P_{t+1} by online PCA).

    `x` are the `Advance.inputs` taken while projecting. The direction
    (OSD: ∇P, a few small products) runs stacked by (s, r) from P and those
    inputs, one call for all matrices; `apply` (the step on P) per leaf, so
    the projector's optimizer state is read and written in place, never
    stacked (2 ms less than stacking it too at LLaMA-1B:
    profile_update_h200_f125423.json; at LLaMA-60M the whole step was 2–3%
    faster per leaf too, train_step_60m_b64_h100_523014e*.json). With
    `stack_steps` (off by default, kept for that comparison) the small
    matrices whose products run stacked (`_stacked_products`) step stacked.
    Returns ({leaf: state}, {leaf: changed}).
    """
    advance = _base.Advance.of(self.projector.advance)
    projected = self.plan.projected
    d = (
      {i: None for i in projected}
      if advance.direction is None
      else stacked(advance.direction, self.plan, projected, self._step_group, bases, x)
    )
    step = lambda st, xi, di: advance.apply(st, xi, di, count)
    small = self._stacked_products(self.projector.project) if self.stack_steps else []
    out = stacked(step, self.plan, small, self._step_group, pstates, x, d) if small else {}
    states, changed = dict(pstates), {}
    for i in projected:
      if i in out:
        states[i], changed[i] = out[i]
        continue
      states[i], changed[i] = over_batch(
        step,
        self.plan[i],
        pstates[i],
        x[i],
        d[i],
        in_axes=(0, 0, 0),
      )
    return states, changed


def _bucket(leaf: _leaves.LeafPlan):
  """(s, l, r): the stacking key of the refresh's chunks and of `Pipeline._stacked_products`."""
  return leaf.bucket


def _transposed_back(p, nt):
  """(P·N)ᵀ = Nᵀ·Pᵀ (l, s) of one matrix projected on its columns, from N in the inner layout
  (l, r), in nt's dtype accumulated in float32: the product lands in the stored layout."""
  return jnp.matmul(nt, p.T.astype(nt.dtype), preferred_element_type=jnp.float32)


def _times(x, alpha):
  """x·α, or x when α is None (already applied to N)."""
  return x if alpha is None else x * alpha


def inner_update(inner, plan, treedef, g, r, w_r, inner_state, params, extra_args):
  """N = inner(R): `inner` on the mixed tree, low-rank where projected.

  `g` is every leaf's gradient as it comes (unprojected leaves go in as
  they are), `r` the projected ones' R (oriented), `w_r` their PᵀW (or
  None without `params`). Returns ({leaf: the inner's update}, its state).
  """
  mixed = list(g)
  for i in plan.projected:
    mixed[i] = _leaves.low_rank_layout(r[i], plan[i]).astype(jnp.result_type(g[i]))
  inner_params = None
  if params is not None:
    inner_params = list(params)
    for i in plan.projected:
      inner_params[i] = w_r[i]
    inner_params = treedef.unflatten(inner_params)
  n, inner_state = optax.with_extra_args_support(inner).update(
    treedef.unflatten(mixed), inner_state, inner_params, **extra_args
  )
  return treedef.flatten_up_to(n), inner_state
