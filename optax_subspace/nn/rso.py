"""RSO at the model level: linear layers that train only B in x·W + (x·P)·B.

Randomized Subspace Optimization (Chen, Zhang, Liu, Yuan, Wen, ICML 2025,
arXiv:2502.07222) solves, for k = 0, 1, …, the subproblem
min_B f(W_k + P_k·B) + ‖B‖²/(2η) from B = 0 with a fresh inner optimizer, then
merges W_{k+1} = W_k + P_k·B and draws a new P_{k+1}. With W frozen inside a
subproblem, a layer z = x·(W + P·B) = x·W + (x·P)·B has ∂L/∂B = (x·P)ᵀ·∂L/∂z,
so its backward pass keeps x·P (b×r) instead of x (b×m) and never forms the
m×n weight gradient (the paper's activation-memory argument; docs/methods.md, RSO).

How it plugs into an unmodified Flax NNX model: module surgery
(`optax_subspace.nn._surgery`). `rso_layers` swaps each selected `nnx.Linear`
for an `RsoLinear` in place; the model's code and `__call__` are untouched.
`RsoLinear` keeps W in a `FrozenKernel` (an `nnx.Variable` that is not an
`nnx.Param`, so `nnx.Optimizer(..., wrt=nnx.Param)` and `nnx.grad` never see
it) and P in an `RsoBasis`; its one `nnx.Param` is B, named ``rso_b``: the name
is what `rso_optimizer` labels by, since `nnx.Optimizer.update` hands optax
plain arrays (variable types are gone by then, paths are not).

The training protocol, one subproblem per K = `inner_steps` updates:

    rso_layers(model, rank)                       # P_0 drawn, B = 0
    opt = nnx.Optimizer(model, rso_optimizer(lr, inner_steps=K), wrt=nnx.Param)
    for t in range(steps):
      grads = nnx.grad(loss_fn)(model, batch)      # of B and the dense Params
      opt.update(model, grads)                     # update t (0-based)
      merge_if_due(model, opt.step[...], K)        # after updates K, 2K, …

The optimizer restarts its state for B at its updates 0, K, 2K, …, which is
right after each merge, so every subproblem starts from B = 0 with a fresh
inner state, as the paper's outer loop does.

The layer's product is one `jax.custom_vjp` (`_rso_product`), not JAX's autodiff of
x·W + (x·P)·B, because what the compiled step keeps and computes is then fixed by the
library, not left to the compiler:

- Forward: y = x·(W + P·B), one product with the effective kernel, formed in the step from W
  (float32), P and B: P·B (r-deep, from P and B in the compute dtype) summed with W in float32
  and rounded once to the compute dtype, as the full-weight layer rounds its W (and as the
  optimizer-level RSO's model computes with W_k + P_k·B). Plus x·P, in the compute dtype
  (bf16 when the model computes in bf16): the only activation kept for the backward.
- Backward: ∂L/∂x = ∂L/∂y·(W + P·B)ᵀ, one product, and ∂L/∂B = (x·P)ᵀ·∂L/∂y, accumulated
  and returned in float32. W and P get no cotangent, so no m×n weight gradient is formed.
  W + P·B is formed again (2·m·n·r flops, r/b of a b-row product) instead of being kept.

Why: per layer and b tokens, autodiff of the split form runs x·W, x·P, (x·P)·B forward and
∂L/∂y·Wᵀ, ∂L/∂y·Bᵀ, its product with Pᵀ, and (x·P)ᵀ·∂L/∂y backward:
2·b·m·n + b·r·(2m + 3n) multiply-adds, five of the seven products thin and bandwidth-bound;
at r = 256 that is more than the full layer's 3·b·m·n for a 1024×1024 layer. The
effective-kernel form needs 2·b·m·n + b·r·(m + n) + 2·m·n·r: fewer than the split form once
b > 2·m·n/(m + 2n) (700–1200 tokens for the LLaMA example's layers) and than the full layer
once b > 2·m·n·r/(m·n − r·(m + n)) (about 800–1000 at r = 256); at 16K tokens 2.53·b·m·n
for a 1024×1024 layer against the full layer's 3 and the split form's 3.25. Its two large
products are the full layer's. Memory: autodiff kept the bf16 copy of W next to x·P for
∂L/∂x (as the full layer keeps its own); here W, P and B are arguments of the step, and nothing
of size m×n lives from the forward to the backward. Two `optimization_barrier`s hold the
compiler to this: x·P is materialised on its own (a compiler that merges x·(W + P·B) and x·P
into one product must not keep the b×(n + r) result alive for its b×r slice), and the
backward's W + P·B depends on ∂L/∂y (so it is neither merged with the forward's by CSE nor
scheduled early). XLA's GPU compiler removes barriers only after scheduling; its CPU compiler
removes them before its copy insertion, later CSE and scheduling, so a CPU compile keeps the
forward's W + P·B (one m×n array per layer; measured with `benchmarks/rso_memory.py`). A third
barrier, tying ∂L/∂B to ∂L/∂x so that the backward's read of B comes before the update writes
B's donated buffer (a CPU compile copies every B otherwise), was tried and taken out: on an H200
it raised the step's temp memory by 90 MB at 12 blocks (`benchmarks/results/rso_memory_h200.json`,
972ca93: 0.835× AdamW's against 0.822× without it, d4397cd).

Activation checkpointing (`nnx.remat` per block, the LLaMA example's
``remat``) works as is under `nnx.grad` and `nnx.jit`. With the functional
API inside `jax.grad`, merge with ``nnx.merge(graphdef, params, rest,
copy=True)``: `nnx.remat` writes every Variable of the block back after it,
and without the copy W and P are the Variables of `rest` from the enclosing
`jax.jit`, which NNX refuses to update from the gradient's trace (a
TraceContextError, the same for any non-Param Variable).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import NamedSharding

from optax_subspace import _chunks
from optax_subspace import _leaves
from optax_subspace import _presets
from optax_subspace._restart import restart_every
from optax_subspace.nn import _surgery
from optax_subspace.projectors import _base
from optax_subspace.projectors.random import DISTRIBUTIONS
from optax_subspace.projectors.random import random_basis

# The attribute name of B in an RsoLinear: `rso_optimizer` selects by it.
B_NAME = "rso_b"
# `rso_layers(share_basis=...)` for the LLaMA example's layer names: q/k/v share one P, gate/up
# another (each group reads one input).
SHARE_QKV_GATE_UP = r"[qkv]_proj|gate_proj|up_proj"
_NOT_2D_LINEAR = (nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.ConvTranspose)


class FrozenKernel(nnx.Variable):
  """The weight W of an `RsoLinear`: constant within a subproblem, changed only by a merge."""


class RsoBasis(nnx.Variable):
  """The random basis P (in, r) of an `RsoLinear` and its subproblem index k."""


def _layer_key(leaf_index: int, seed: int, subproblem) -> jax.Array:
  """The key of P_k for the kernel that is leaf `leaf_index` of the model's Params.

  The same chain as the optimizer-level `projectors.random`: the combinator's
  key of that leaf (`_base.matrix_keys`), the seed folded in, then k.
  """
  key = jax.random.fold_in(_base.matrix_keys(leaf_index, 1)[0], seed)
  return jax.random.fold_in(key, subproblem)


class RsoLinear(nnx.Module):
  r"""An `nnx.Linear` that trains only B: y = x·W + (x·P)·B (+ bias).

  W (in, out) is held constant (a `FrozenKernel`, with no cotangent),
  P (in, r) is a random basis on the input side (float32, an `RsoBasis`,
  redrawn only by `merge_and_redraw`) and B (r, out) is the layer's
  `nnx.Param`, zero at the start of each subproblem. So
  ∂L/∂B = (x·P)ᵀ·∂L/∂y = Pᵀ·∂L/∂W, and the backward pass saves x·P (b×r),
  not x (b×in); ∂L/∂x = ∂L/∂y·(W + P·B)ᵀ needs only W, P and B
  (arXiv:2502.07222). The product is a custom VJP (the module docstring
  says what it computes and keeps, and why): y = x·(W + P·B) with W + P·B
  rounded once to the compute dtype, x·P kept in the compute dtype, ∂L/∂B
  accumulated in float32, and no m×n gradient. The bias, if the layer has
  one, stays an `nnx.Param` trained in full. Dtype promotion, `precision`,
  `dot_general` and `preferred_element_type` are the replaced layer's (its
  `dot_general` runs the forward products; the backward's are
  `jax.lax.dot_general` with its `precision`).

  References:
    Chen, Zhang, Liu, Yuan, Wen, "A Memory Efficient Randomized Subspace
    Optimization Method for Training Large Language Models", ICML 2025,
    arXiv:2502.07222.

  Args:
    linear: the `nnx.Linear` to replace; its kernel (and bias) arrays are
      reused, with their shardings.
    rank: r, with 1 ≤ r < in_features.
    leaf_index: the kernel's position in
      ``jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))`` before any
      surgery; with `seed` it fixes the layer's P_k (the optimizer-level
      `optax_subspace.rso` draws the same P_k for that leaf).
    distribution: "haar" (orthonormal columns) or "gaussian" (N(0, 1/r)).
    seed: folded into the layer's key.
    share_basis_of: another `RsoLinear` with the same in_features, rank,
      distribution and seed whose P (and subproblem index) this layer uses:
      the two hold one `RsoBasis` variable, drawn from that layer's key
      (`rso_layers`'s ``share_basis``). None: the layer draws its own.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from optax_subspace import nn as osnn
    >>> layer = osnn.RsoLinear(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), rank=4)
    >>> layer(jnp.ones((2, 16))).shape
    (2, 8)
  """

  def __init__(
    self,
    linear: nnx.Linear,
    rank: int,
    *,
    leaf_index: int = 0,
    distribution: str = "haar",
    seed: int = 0,
    share_basis_of: Optional["RsoLinear"] = None,
  ):
    kernel = _surgery.adopt_linear(self, linear, "RsoLinear")
    m, n = kernel.shape
    _base.check_rank(rank)
    if rank >= m:
      raise ValueError(
        f"rank must be below the input side in_features={m} (P is in×r and"
        f" r = in would not save anything), got {rank}."
      )
    if distribution not in DISTRIBUTIONS:
      raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")
    self.rank = rank
    self.leaf_index = leaf_index
    self.distribution = distribution
    self.seed = seed
    w = kernel[...]
    self.kernel = _surgery.frozen(FrozenKernel, kernel)
    self.rso_b = _surgery.factor_param(jnp.zeros((rank, n), w.dtype), kernel, 1)
    if share_basis_of is not None:
      other = share_basis_of
      if not isinstance(other, RsoLinear):
        raise TypeError(f"share_basis_of must be an RsoLinear, got {type(other).__name__}.")
      theirs = (other.in_features, other.rank, other.distribution, other.seed)
      if theirs != (m, rank, distribution, seed):
        raise ValueError(
          "a shared basis needs equal (in_features, rank, distribution, seed):"
          f" this layer has {(m, rank, distribution, seed)}, the other {theirs}."
        )
      # One Variable in both modules: NNX keeps it one leaf of the state, so the layers read the
      # same array, and a merge redraws it once.
      self.basis_index = other.basis_index
      self.rso_basis = other.rso_basis
      self.rso_subproblem = other.rso_subproblem
      return
    # The leaf whose key draws this layer's P_k (its own unless shared).
    self.basis_index = leaf_index
    basis = random_basis(_layer_key(leaf_index, seed, 0), m, rank, distribution)
    self.rso_basis = RsoBasis(_surgery.placed(basis, w, 0), **_surgery.split_metadata(kernel, 0))
    self.rso_subproblem = RsoBasis(jnp.zeros([], jnp.int32))

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    """y = x·(W + P·B) (+ bias), differentiable in x and B only (`_rso_product`)."""
    # W and P need no stop_gradient: `_rso_product` gives them no cotangent.
    kernel, basis = self.kernel[...], self.rso_basis[...]
    bias = self.bias[...] if self.bias is not None else None
    # The compute dtype is the replaced layer's (its promote_dtype). W, P and B enter the product
    # in their stored dtypes, so that W + P·B is summed before it is rounded to the compute dtype
    # (the promoted W is unused; the compiler drops it).
    inputs, _, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    spec = _ProductSpec(
      dtype=inputs.dtype,
      precision=self.precision,
      dot_general=self.dot_general,
      preferred_element_type=self.preferred_element_type,
      out_sharding=out_sharding,
    )
    y = _rso_product(inputs, kernel, basis, self.rso_b[...], spec)
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


class _ProductSpec(NamedTuple):
  """The static part of `_rso_product`: the replaced layer's compute dtype and products."""

  dtype: jnp.dtype
  precision: Any
  dot_general: Callable
  preferred_element_type: Any
  out_sharding: Any


def _accumulation_dtype(w: jax.Array) -> jnp.dtype:
  return jnp.promote_types(w.dtype, jnp.float32)


def _effective_kernel(w: jax.Array, p: jax.Array, b: jax.Array, spec: _ProductSpec) -> jax.Array:
  """W + P·B in the compute dtype: P·B from P and B in the compute dtype, summed with W in (at
  least) float32, rounded once, as the full-weight layer rounds its W."""
  acc = _accumulation_dtype(w)
  pb = jnp.matmul(
    p.astype(spec.dtype), b.astype(spec.dtype), precision=spec.precision, preferred_element_type=acc
  )
  return (w.astype(acc) + pb).astype(spec.dtype)


def _last_axis_product(x: jax.Array, k: jax.Array, spec: _ProductSpec, **kwargs) -> jax.Array:
  """x (…, in) · k (in, out) with the layer's dot_general, precision and preferred type."""
  if spec.preferred_element_type is not None:
    kwargs["preferred_element_type"] = spec.preferred_element_type
  return spec.dot_general(
    x, k, (((x.ndim - 1,), (0,)), ((), ())), precision=spec.precision, **kwargs
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _rso_product(
  x: jax.Array, w: jax.Array, p: jax.Array, b: jax.Array, spec: _ProductSpec
) -> jax.Array:
  r"""y = x·(W + P·B), whose backward keeps x·P and forms no weight gradient but ∂L/∂B.

  Forward: one product with the effective kernel W + P·B (in the compute dtype) and the thin
  x·P (b×r, the compute dtype), the only activation kept. Backward, from ∂L/∂y:
  ∂L/∂x = ∂L/∂y·(W + P·B)ᵀ and ∂L/∂B = (x·P)ᵀ·∂L/∂y (accumulated and returned in B's dtype);
  W and P get no cotangent (they are constants of the subproblem), so no m×n gradient is formed.
  W + P·B is formed again in the backward rather than kept (W, P and B are arguments of the
  step, so nothing of size m×n stays alive between the two passes).
  Chen, Zhang, Liu, Yuan, Wen, arXiv:2502.07222: the model-level memory argument.
  """
  return _last_axis_product(
    x, _effective_kernel(w, p, b, spec), spec, out_sharding=spec.out_sharding
  )


def _rso_product_fwd(x, w, p, b, spec):
  y = _last_axis_product(x, _effective_kernel(w, p, b, spec), spec, out_sharding=spec.out_sharding)
  xp = _last_axis_product(x, p.astype(spec.dtype), spec).astype(spec.dtype)
  # A materialised x·P: the compiler may compute x·P inside one product with x·(W + P·B)
  # (dot merging); the barrier keeps the saved b×r slice from pinning that b×(out + r) output.
  xp = jax.lax.optimization_barrier(xp)
  return y, (xp, w, p, b)


def _rso_product_bwd(spec, residuals, dy):
  # The barrier ties the recomputation of W + P·B to the backward (its inputs include ∂L/∂y):
  # without it the compiler may reuse, or schedule early, the forward's, and keep an m×n array
  # per layer alive between the passes.
  (xp, w, p, b), dy = jax.lax.optimization_barrier((residuals, dy))
  dy = dy.astype(spec.dtype)
  kernel = _effective_kernel(w, p, b, spec)
  dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())), precision=spec.precision)
  batch_axes = tuple(range(dy.ndim - 1))
  db = jax.lax.dot_general(
    xp,
    dy,
    ((batch_axes, batch_axes), ((), ())),
    precision=spec.precision,
    preferred_element_type=_accumulation_dtype(b),
  )
  return dx.astype(spec.dtype), None, None, db.astype(b.dtype)


_rso_product.defvjp(_rso_product_fwd, _rso_product_bwd)


def _rso_linears(model: nnx.Module) -> list[RsoLinear]:
  return [node for _, node in nnx.iter_graph(model) if isinstance(node, RsoLinear)]


def rso_layers(
  model: nnx.Module,
  rank: int,
  *,
  mask: _surgery.LayerMask = r"(attention|mlp)/",
  distribution: str = "haar",
  seed: int = 0,
  share_basis: Optional[str] = None,
) -> list[str]:
  r"""Turns the selected `nnx.Linear` layers of `model` into `RsoLinear`, in place.

  Each selected layer computes y = x·W + (x·P_k)·B afterwards, with B = 0,
  so the model's outputs are unchanged until B is trained. The layer whose
  kernel is leaf i of ``jax.tree_util.tree_leaves(nnx.state(model,
  nnx.Param))`` (this call's flatten order, before the surgery) gets, for
  subproblem k, P_k = ``projectors.random_basis(fold_in(fold_in(
  matrix_keys(i, 1)[0], seed), k), in_features, rank, distribution)``: the
  basis the optimizer-level ``optax_subspace.rso`` (same rank, seed and
  distribution) draws for that leaf, so both levels take the same steps.

  ``share_basis`` (off by default) lets sibling layers that read the same
  input use one P: the selected layers whose name (last path element) the
  regex matches in full and that have the same parent module share the P of
  the first of them (by leaf index). The LLaMA example's q/k/v and gate/up
  projections each read one input, so with ``share_basis=SHARE_QKV_GATE_UP``
  the backward keeps x·P once per input instead of once per layer (at rank
  256 and 1024-wide inputs, 256 values per token instead of 768 for
  q/k/v, and 256 instead of 512 for gate/up), and stores P once. Each
  layer's P is still a draw of the chosen distribution, so E[P·Pᵀ] per layer is
  unchanged; what departs from the paper's per-weight draws is that the
  layers of a group move in the same random subspace of their common input.
  The optimizer-level ``optax_subspace.rso`` draws per leaf and has no such
  option, so the two levels take the same steps only without it.

  References:
    Chen, Zhang, Liu, Yuan, Wen, "A Memory Efficient Randomized Subspace
    Optimization Method for Training Large Language Models", ICML 2025,
    arXiv:2502.07222.

  Args:
    model: an NNX module, e.g. the LLaMA example's `Llama`; not yet
      containing `RsoLinear` layers.
    rank: r, 1 ≤ r < in_features of every selected layer.
    mask: a regex searched in the "/"-joined module path (default: the
      attention and MLP projections of the LLaMA example) or a callable
      ``(path, layer) -> bool``.
    distribution: "haar" or "gaussian" (`projectors.random_basis`).
    seed: folded into every layer's key.
    share_basis: None (one P per layer, the paper's) or a regex for the
      layer names whose same-parent siblings share one P (above).

  Returns:
    The "/"-joined paths of the replaced layers.

  Example:
    >>> from flax import nnx
    >>> from optax_subspace import nn as osnn
    >>> class Mlp(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.up = nnx.Linear(16, 32, rngs=rngs)
    ...     self.down = nnx.Linear(32, 16, rngs=rngs)
    >>> osnn.rso_layers(Mlp(nnx.Rngs(0)), rank=4, mask="up|down")
    ['down', 'up']
  """
  _base.check_rank(rank)
  if _rso_linears(model):
    raise ValueError(
      "model already has RsoLinear layers; call rso_layers once, on the"
      " unmodified model (its Param flatten order fixes every layer's P)."
    )
  found = _surgery.find_linears(model, mask, kinds=(nnx.Linear,) + _NOT_2D_LINEAR)
  for path, layer in found:
    if not isinstance(layer, nnx.Linear):
      raise ValueError(
        f"{_leaves.path_str(path)} is an nnx.{type(layer).__name__}, not a"
        " 2-D linear map (nnx.Linear); narrow `mask` to leave it out."
      )
  index = _surgery.param_leaf_indices(model)
  sharing = None if share_basis is None else re.compile(share_basis)
  owners: dict[tuple, RsoLinear] = {}
  new = []
  for path, layer in sorted(found, key=lambda item: index[item[0] + ("kernel",)]):
    parent = path[:-1] if sharing and sharing.fullmatch(str(path[-1])) else None
    owner = owners.get(parent) if parent is not None else None
    if owner is not None and owner.in_features != layer.in_features:
      raise ValueError(
        f"share_basis {share_basis!r} groups {_leaves.path_str(path)} (in_features"
        f" {layer.in_features}) with a sibling of in_features {owner.in_features};"
        " only layers reading the same input can share P."
      )
    replacement = RsoLinear(
      layer,
      rank,
      leaf_index=index[path + ("kernel",)],
      distribution=distribution,
      seed=seed,
      share_basis_of=owner,
    )
    if parent is not None and owner is None:
      owners[parent] = replacement
    new.append((path, replacement))
  replaced = dict(new)
  new = [(path, replaced[path]) for path, _ in found]
  for path, layer in new:
    _surgery.replace(model, path, layer)
  return [_leaves.path_str(path) for path, _ in new]


def _kept(new: jax.Array, variable: nnx.Variable) -> jax.Array:
  """`new` with `variable`'s sharding, where it is known.

  Eagerly: the current array's NamedSharding. Under a trace: the variable's
  `out_sharding` metadata (`nnx.with_partitioning`), given a mesh (in the
  metadata or `jax.set_mesh`), as Flax shards a new variable; without
  metadata the compiler's propagation decides.
  """
  old = variable[...]
  if not isinstance(old, jax.core.Tracer):
    sharding = getattr(old, "sharding", None)
    return jax.device_put(new, sharding) if isinstance(sharding, NamedSharding) else new
  metadata = variable.get_metadata()
  names = metadata.get("out_sharding")
  if not names or (metadata.get("mesh") is None and jax.sharding.get_abstract_mesh().empty):
    return new
  return flax_spmd.shard_value(new, names, metadata.get("sharding_rules"), metadata.get("mesh"))


def merge_and_redraw(model: nnx.Module) -> None:
  r"""Ends the current RSO subproblem of every `RsoLinear` of `model`, in place.

  W_{k+1} = W_k + P_k·B (float32 arithmetic at full precision, stored in W's
  dtype), B ← 0, k ← k + 1 and P ← P_{k+1}, the layer's next draw
  (arXiv:2502.07222, the outer loop). The layers go in chunks of at most
  `optax_subspace._chunks.REFRESH_CHUNK_BYTES` (256 MiB) of float32 temporaries (W + P·B
  and the draw), a chunk's draws of one (in_features, rank, distribution) one
  vmapped computation, chunk after chunk under optimization barriers: so a
  jitted merge holds one chunk's temporaries, not every layer's (LLaMA-7B's
  all-at-once merge needed 11.3 GB of them, its step 8.3, on an H200). The
  values are those of one chunk per shape, but for float32 rounding of the
  Haar draw's products where XLA picks other kernels for another batch size
  (jitted on the CPU: a batch of one). Call it
  after every K-th optimizer update (`merge_if_due` does the bookkeeping).
  Shardings: eagerly the arrays keep theirs; under `nnx.jit`, variables with
  `out_sharding` metadata (`nnx.with_partitioning`, as `rso_layers` derives
  for B and P) are constrained to it, and the others follow the compiler's
  propagation (inside a jitted train step, from the update: tested).

  References:
    Chen, Zhang, Liu, Yuan, Wen, "A Memory Efficient Randomized Subspace
    Optimization Method for Training Large Language Models", ICML 2025,
    arXiv:2502.07222.

  Args:
    model: a module containing `RsoLinear` layers (see `rso_layers`).

  Returns:
    None; `model` is updated in place.

  Example:
    >>> from flax import nnx
    >>> from optax_subspace import nn as osnn
    >>> model = osnn.RsoLinear(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), rank=4)
    >>> osnn.merge_and_redraw(model)
    >>> int(model.rso_subproblem[...])
    1
  """
  layers = _rso_linears(model)
  if not layers:
    raise ValueError("model has no RsoLinear layers; call rso_layers first.")
  # Layers holding one RsoBasis (`rso_layers(share_basis=...)`) are one unit: all merge with the
  # old P, then P is redrawn once, from the key of the leaf it was first drawn for.
  units: dict[int, list[RsoLinear]] = {}
  for layer in layers:
    units.setdefault(id(layer.rso_basis), []).append(layer)
  # A unit's float32 temporaries: each member's W + P·B (m×n) and the Gaussian draw (m×r).
  previous = None
  for (m, r, distribution), chunk in _chunks.chunks(
    list(units.values()),
    lambda unit: (unit[0].in_features, unit[0].rank, unit[0].distribution),
    lambda unit: (
      4 * unit[0].in_features * (sum(layer.out_features for layer in unit) + unit[0].rank)
    ),
  ):
    inputs = _chunks.after(
      previous,
      [
        (
          unit[0].rso_subproblem[...],
          unit[0].rso_basis[...],
          [(layer.kernel[...], layer.rso_b[...]) for layer in unit],
        )
        for unit in chunk
      ],
    )
    kernels = []
    for unit, (_, p, members) in zip(chunk, inputs):
      for layer, (w, b) in zip(unit, members):
        merged = w.astype(jnp.float32) + jnp.matmul(
          p, b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
        )
        kernels.append(_kept(merged.astype(w.dtype), layer.kernel))
    # The new P and B = 0 go where the old ones were (donated under jit): made after the merges
    # read the old ones, or the compiler copies every P and B first to keep them.
    keys, zeros = _chunks.after(
      kernels,
      (
        jnp.stack(
          [
            _layer_key(unit[0].basis_index, unit[0].seed, k + 1)
            for unit, (k, _, _) in zip(chunk, inputs)
          ]
        ),
        [jnp.zeros_like(b) for _, _, members in inputs for _, b in members],
      ),
    )
    bases = jax.vmap(lambda key: random_basis(key, m, r, distribution))(keys)
    previous = []
    merged_kernels, new_zeros = iter(kernels), iter(zeros)
    for unit, (k, _, _), basis in zip(chunk, inputs, bases):
      for layer in unit:
        layer.kernel.value = next(merged_kernels)
        layer.rso_b.value = _kept(next(new_zeros), layer.rso_b)
        previous.append(layer.kernel[...])
      unit[0].rso_basis.value = _kept(basis, unit[0].rso_basis)
      unit[0].rso_subproblem.value = k + 1
      previous.append(unit[0].rso_basis[...])


def merge_if_due(model: nnx.Module, step, inner_steps: int) -> None:
  r"""Runs `merge_and_redraw` when `step` (updates done) is a positive multiple of K.

  Call it right after each optimizer update with the number of updates done
  so far (``nnx.Optimizer.step`` after `update`): the merges then fall after
  updates K, 2K, …, and `rso_optimizer` restarts B's inner state at the very
  next update (arXiv:2502.07222, the outer loop). `step` may be a Python int
  (checked on the host) or a traced array inside `nnx.jit` (then an
  `nnx.cond`, so one compiled train step serves every step).

  References:
    Chen, Zhang, Liu, Yuan, Wen, "A Memory Efficient Randomized Subspace
    Optimization Method for Training Large Language Models", ICML 2025,
    arXiv:2502.07222.

  Args:
    model: a module containing `RsoLinear` layers.
    step: the number of optimizer updates done, ≥ 1 after the first update.
    inner_steps: K, the updates per subproblem (as given to `rso_optimizer`).

  Returns:
    None; `model` is updated in place when a merge is due.

  Example:
    >>> from flax import nnx
    >>> from optax_subspace import nn as osnn
    >>> model = osnn.RsoLinear(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), rank=4)
    >>> osnn.merge_if_due(model, 3, inner_steps=3)
    >>> int(model.rso_subproblem[...])
    1
  """
  inner_steps = _base.check_every(inner_steps, "inner_steps")
  if isinstance(step, jax.core.Tracer):
    due = (step > 0) & (step % inner_steps == 0)
    nnx.cond(due, merge_and_redraw, lambda m: None, model)
    return
  step = int(step)
  if step > 0 and step % inner_steps == 0:
    merge_and_redraw(model)


def _is_rso_b(path) -> bool:
  return any(isinstance(k, jax.tree_util.DictKey) and k.key == B_NAME for k in path)


def rso_optimizer(
  learning_rate: optax.ScalarOrSchedule,
  *,
  inner_steps: int,
  proximal: Optional[float] = None,
  inner: Optional[optax.GradientTransformation] = None,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  eps_placement: str = "hf",
  unprojected_learning_rate: Optional[optax.ScalarOrSchedule] = None,
) -> optax.GradientTransformation:
  r"""The optimizer of a model with `RsoLinear` layers, for ``nnx.Optimizer(..., wrt=nnx.Param)``.

  Within subproblem k every B (the ``rso_b`` parameters) runs the inner
  optimizer on min_B f(W_k + P_k·B) + ‖B‖²/(2η) from B = 0:

      G_B = ∂f/∂B + B/η,   B ← B − lr(t)·direction(G_B)

  with the direction's state restarted at updates 0, K, 2K, …
  (`restart_every`) and the learning rate following the global update count
  t. B is exactly the displacement W − W_k of the current subproblem, so
  B/η is the proximal gradient (arXiv:2502.07222, the subproblem).
  Every other parameter (embeddings, norms, head, biases) runs the same
  direction at full size, never restarted. The train loop merges after every
  K-th update (`merge_if_due`), so each restart meets a freshly zeroed B.
  These are the steps of the optimizer-level ``optax_subspace.rso`` (same
  arguments) on the unmodified model.

  Decoupled weight decay is not offered here: it would change the frozen W
  at every step.

  References:
    Chen, Zhang, Liu, Yuan, Wen, "A Memory Efficient Randomized Subspace
    Optimization Method for Training Large Language Models", ICML 2025,
    arXiv:2502.07222.

  Args:
    learning_rate: float or optax schedule (of the global update count).
    inner_steps: K, optimizer updates per subproblem, a Python int ≥ 1.
    proximal: η > 0 of the proximal term ‖B‖²/(2η); None: no proximal term.
    inner: the update direction without the learning rate (an optax
      ``scale_by_*`` transformation; `optax.identity()` is SGD); default
      Adam with `b1`, `b2`, `eps`, `eps_placement` ("hf": eps on the
      un-bias-corrected √v, as `galore`; "optax": `optax.scale_by_adam`).
    b1, b2, eps, eps_placement: the default direction's constants.
    unprojected_learning_rate: learning rate of every Param but the B
      factors (embeddings, norms, head); default `learning_rate`.

  Returns:
    An `optax.GradientTransformation` (an `optax.multi_transform`).

  Example:
    >>> from flax import nnx
    >>> from optax_subspace import nn as osnn
    >>> model = osnn.RsoLinear(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), rank=4)
    >>> tx = osnn.rso_optimizer(1e-3, inner_steps=100, proximal=1.0)
    >>> opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  """
  inner_steps = _base.check_every(inner_steps, "inner_steps")
  if proximal is not None and (
    isinstance(proximal, bool) or not proximal > 0 or not math.isfinite(proximal)
  ):
    raise ValueError(f"proximal (η) must be None or a positive finite number, got {proximal!r}.")
  direction = inner if inner is not None else _presets.hf_or_optax_adam(b1, b2, eps, eps_placement)
  subproblem = direction
  if proximal is not None:
    # ∇_B ‖B‖²/(2η) = B/η, the proximal term of RSO's subproblem (arXiv:2502.07222).
    add_proximal = optax.stateless(
      lambda g, b: jax.tree_util.tree_map(
        lambda g, b: (g + b / proximal).astype(jnp.result_type(g)), g, b
      )
    )
    subproblem = optax.chain(add_proximal, direction)
  learning_rate = _presets.check_learning_rate(learning_rate, "learning_rate")
  full_lr = (
    learning_rate
    if unprojected_learning_rate is None
    else _presets.check_learning_rate(unprojected_learning_rate, "unprojected_learning_rate")
  )

  def labels(params):
    return jax.tree_util.tree_map_with_path(
      lambda path, _: "rso" if _is_rso_b(path) else "full", params
    )

  return optax.multi_transform(
    {
      "rso": optax.chain(
        restart_every(subproblem, inner_steps), optax.scale_by_learning_rate(learning_rate)
      ),
      "full": optax.chain(direction, optax.scale_by_learning_rate(full_lr)),
    },
    labels,
  )
