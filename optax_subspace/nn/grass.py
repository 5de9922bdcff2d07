"""GRASS at the model level: linear layers whose backward forms only r columns of dW.

GRASS (Muhamed, Li, Woodruff, Diab, Smith, EMNLP 2024, arXiv:2406.17660)
trains r selected rows σ of each weight (torch layout, out × in) with scales
ρ. For y = x·Wᵀ those rows of the gradient are ρ·dY[:, σ]ᵀ·X, a b×r×n product
in place of the b×m×n one, so the full gradient is never formed (docs/methods.md,
GRASS). In Flax's (in, out) kernel layout the rows of the torch weight are
the kernel's output columns: GRASS selects output features.

How it plugs into an unmodified Flax NNX model: module surgery
(`optax_subspace.nn._surgery`). `grass_layers` swaps each selected
`nnx.Linear` for a `GrassLinear` in place. A `GrassLinear` keeps W in a
`GrassKernel` (an `nnx.Variable` that is not an `nnx.Param`) and trains
D (in, r), its one `nnx.Param`, named ``grass_d``:

    y = x·W + scatter_cols(x·(D·diag ρ), σ)

so the effective kernel is W + scatter_cols(D·diag ρ, σ) and autodiff gives
∂L/∂D = ρ ⊙ (Xᵀ·dY[:, σ]), the compressed gradient ρ·G[σ] of the optimizer
level in the kernel's column layout: a b×in×r product; W is under
`stop_gradient` and its gradient is never formed. The optimizer's moments
live on D (in × r).

Every K steps `grass_refresh` (a) folds D into W (W ← W + scatter(D·ρ), D ← 0:
the effective weights do not move), (b) runs one forward and backward pass on
the current batch in which each layer's backward computes the column norms
‖dW[:, j]‖ of its own gradient and drops it (the gradient of a probe
variable; only one layer's dW exists at a time), (c) picks the new σ, ρ with
the optimizer level's rule (`projectors.sparse_rows.reselect`) and (d) zeros
D's moments in the optimizer where the selection changed (GRASS's reset).

The training protocol:

    grass_layers(model, rank, update_every=K)
    opt = nnx.Optimizer(model, grass_optimizer(lr), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt, batch):
      grass_refresh(model, opt, loss_fn, batch)    # acts at steps 0, K, 2K, …
      loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
      opt.update(model, grads)
      return loss

Under `nnx.remat` per block the same holds as for `optax_subspace.nn.rso`:
with the functional API inside `jax.grad`, merge the non-Param state (W, σ,
ρ, the probe) with ``nnx.merge(..., copy=True)``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from optax_subspace import _chunks
from optax_subspace import _leaves
from optax_subspace import _presets
from optax_subspace.nn import _surgery
from optax_subspace.projectors import _base
from optax_subspace.projectors.sparse_rows import row_norms
from optax_subspace.projectors.sparse_rows import reselect
from optax_subspace.projectors.sparse_rows import sparse_rows

# The attribute name of D in a GrassLinear: `grass_optimizer` and the reset
# select by it, since `nnx.Optimizer.update` hands optax plain arrays.
D_NAME = "grass_d"


class GrassKernel(nnx.Variable):
  """The weight W of a `GrassLinear`: changed only by `grass_refresh`'s merge."""


class GrassSelection(nnx.Variable):
  """σ (int32, r), ρ (r) and the PRNG key of a `GrassLinear`'s selection."""


class GrassProbe(nnx.Variable):
  """Zeros (out,): its gradient in `grass_refresh` is ‖dW[:, j]‖ per column."""


def _layer_key(leaf_index: int, seed: int) -> jax.Array:
  """The key of the kernel that is leaf `leaf_index` of the model's Params.

  The same chain as the optimizer-level `sparse_rows`: the combinator's key
  of that leaf (`_base.matrix_keys`), then the seed folded in.
  """
  return jax.random.fold_in(_base.matrix_keys(leaf_index, 1)[0], seed)


def _probed_matmul(dot: Callable[[jax.Array, jax.Array], jax.Array]):
  """y = dot(x, w), whose backward gives the probe ‖dW[:, j]‖ and no dW.

  The cotangent of the probe (out,) is the column norms of dW = Xᵀ·dY (the
  row norms of GRASS's out × in gradient), computed like
  `sparse_rows`'s on the float32 product; NaN when dW is not finite. dW lives
  only inside this backward. W gets no cotangent.
  """

  @jax.custom_vjp
  def matmul(x, w, probe):
    del probe
    return dot(x, w)

  def fwd(x, w, probe):
    del probe
    return dot(x, w), (x, w)

  def bwd(res, dy):
    x, w = res
    dx = jax.vjp(lambda x: dot(x, w), x)[1](dy)[0]
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dw = jax.lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    finite = jnp.all(jnp.isfinite(dw))
    norms = jnp.where(finite, row_norms(jnp.where(finite, dw, 0.0).T), jnp.nan)
    # ∂L/∂x, which the backward of the layers before needs, is released only once this layer's
    # dW is reduced: the compiler kept every dW of a block alive at once otherwise (CPU compile of
    # the LLaMA-7B block with barriers kept: three 4096×11008 float32 dW, each with two copies).
    dx, norms = jax.lax.optimization_barrier((dx, norms))
    return dx, None, norms

  matmul.defvjp(fwd, bwd)
  return matmul


class GrassLinear(nnx.Module):
  r"""An `nnx.Linear` that trains r output columns: y = x·W + scatter_σ(x·D·ρ).

  W (in, out) is held constant (a `GrassKernel`, under `stop_gradient`);
  D (in, r), zero after each refresh, is the layer's `nnx.Param`
  (``grass_d``); σ (int32, r) and ρ (r) select and scale the output columns
  it trains. The effective kernel is W + scatter_cols(D·diag ρ, σ)
  (duplicate columns add up), and autodiff gives

      ∂L/∂D = ρ ⊙ (Xᵀ·dY[:, σ])      (in × r, a b×in×r product)

  the selected rows ρ·dY[:, σ]ᵀ·X of GRASS's gradient, transposed
  (arXiv:2406.17660; docs/methods.md, GRASS); ∂L/∂W is never formed. The
  price is one b×in×r product more in the forward (x·D) and one in the
  backward (∂L/∂x gains dY[:, σ]·(Dρ)ᵀ). The bias, if any, stays an
  `nnx.Param` trained in full. Dtype promotion, `precision`, `dot_general` and
  `preferred_element_type` are the replaced layer's. A `GrassLinear` must be
  called once per forward pass (its probe's gradient is one layer's norms).

  References:
    Muhamed, Li, Woodruff, Diab, Smith, "Grass: Compute Efficient Low-Memory
    LLM Training with Structured Sparse Gradients", EMNLP 2024,
    arXiv:2406.17660.

  Args:
    linear: the `nnx.Linear` to replace; its kernel and bias arrays are
      reused.
    rank: r, with 1 ≤ r ≤ out_features.
    update_every: K, steps between selections (`grass_refresh`).
    leaf_index: the kernel's position in
      ``jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))`` before any
      surgery; with `seed` it fixes the layer's draws (the optimizer-level
      `grass` draws the same for that leaf).
    selection: "topk", "multinomial" or "uniform" (`projectors.sparse_rows`).
    replacement: for the sampled selections, as in `projectors.sparse_rows`.
    seed: folded into the layer's key.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from optax_subspace import nn as osnn
    >>> layer = osnn.GrassLinear(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), rank=4)
    >>> layer(jnp.ones((2, 16))).shape
    (2, 8)
  """

  def __init__(
    self,
    linear: nnx.Linear,
    rank: int,
    *,
    update_every: int = 200,
    leaf_index: int = 0,
    selection: str = "topk",
    replacement: Optional[bool] = None,
    seed: int = 0,
  ):
    kernel = _surgery.adopt_linear(self, linear, "GrassLinear")
    m, n = kernel.shape
    _base.check_rank(rank)
    if rank > n:
      raise ValueError(
        f"rank must be at most the output side out_features={n} (GRASS"
        f" selects output columns), got {rank}."
      )
    self.update_every = _base.check_every(update_every)
    # Validates selection/replacement exactly as the optimizer level does.
    sparse_rows(rank, update_every, selection=selection, replacement=replacement)
    if replacement is None:
      replacement = selection == "multinomial"
    self.rank = rank
    self.selection = selection
    self.replacement = replacement
    self.leaf_index = leaf_index
    self.seed = seed
    w = kernel[...]
    self.kernel = _surgery.frozen(GrassKernel, kernel)
    # D (in, r) shares the kernel's input axis: its split and metadata.
    setattr(self, D_NAME, _surgery.factor_param(jnp.zeros((m, rank), w.dtype), kernel, 0))
    self.grass_indices = GrassSelection(jnp.arange(rank, dtype=jnp.int32))
    self.grass_scales = GrassSelection(jnp.ones((rank,), jnp.float32))
    self.grass_key = GrassSelection(_layer_key(leaf_index, seed))
    self.grass_probe = GrassProbe(jnp.zeros((n,), jnp.float32))
    self.probing = False

  def _dot(self, x, w, out_sharding=None):
    extra = {}
    if self.preferred_element_type is not None:
      extra["preferred_element_type"] = self.preferred_element_type
    return self.dot_general(
      x,
      w,
      (((x.ndim - 1,), (0,)), ((), ())),
      precision=self.precision,
      out_sharding=out_sharding,
      **extra,
    )

  def effective_kernel(self) -> jax.Array:
    """W + scatter_cols(D·diag ρ, σ), in W's dtype: the kernel the layer applies."""
    d = getattr(self, D_NAME)[...].astype(jnp.float32)
    upd = d * self.grass_scales[...][None, :]
    w = self.kernel[...]
    return w.at[:, self.grass_indices[...]].add(upd.astype(w.dtype))

  def merge(self) -> None:
    """W ← W + scatter_cols(D·ρ, σ), D ← 0: the effective kernel is unchanged."""
    self.kernel[...] = self.effective_kernel()
    d = getattr(self, D_NAME)
    d[...] = jnp.zeros_like(d[...])

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    """y = x·W + scatter_cols(x·(D·diag ρ), σ) (+ bias); W under stop_gradient."""
    kernel = jax.lax.stop_gradient(self.kernel[...])
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    if self.probing:  # grass_refresh's norms pass: D = 0 after the merge
      dot = lambda x, w: self._dot(x, w, out_sharding)
      y = _probed_matmul(dot)(inputs, kernel, self.grass_probe[...])
    else:
      y = self._dot(inputs, kernel, out_sharding)
      scales = self.grass_scales[...].astype(jnp.float32)
      d = getattr(self, D_NAME)[...].astype(jnp.float32) * scales[None, :]
      z = self._dot(inputs, d.astype(inputs.dtype))
      y = y.at[..., self.grass_indices[...]].add(z.astype(y.dtype))
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


def _grass_modules(model: nnx.Module) -> list[tuple[tuple, GrassLinear]]:
  found = [(tuple(p), m) for p, m in nnx.iter_graph(model) if isinstance(m, GrassLinear)]
  if not found:
    raise ValueError("the model has no GrassLinear layer: call grass_layers first.")
  return found


def grass_layers(
  model: nnx.Module,
  rank: int,
  *,
  update_every: int = 200,
  mask: _surgery.LayerMask = r"(attention|mlp)/",
  selection: str = "topk",
  replacement: Optional[bool] = None,
  seed: int = 0,
) -> list[str]:
  r"""Replaces the selected `nnx.Linear` layers of `model` by `GrassLinear`, in place.

  The model's code is untouched (module surgery). Each replaced layer keeps
  its kernel as the frozen W and trains D (in, r) = 0; its outputs are
  unchanged. Every layer gets the key the optimizer-level `grass` gives that
  kernel (by its position among the model's Params), so both levels draw the
  same selections.

  References:
    Muhamed, Li, Woodruff, Diab, Smith, "Grass: Compute Efficient Low-Memory
    LLM Training with Structured Sparse Gradients", EMNLP 2024,
    arXiv:2406.17660.

  Args:
    model: a Flax NNX model.
    rank: r, output columns trained per layer (1 ≤ r ≤ out_features).
    update_every: K, steps between selections.
    mask: regex searched in the "/"-joined module path, or a callable
      ``(path, layer) -> bool``; for the LLaMA example the default selects the
      attention and MLP projections.
    selection: "topk", "multinomial" or "uniform".
    replacement: for the sampled selections; see `projectors.sparse_rows`.
    seed: folded into every layer's key.

  Returns:
    The "/"-joined paths of the replaced layers.

  Example:
    >>> from flax import nnx
    >>> from optax_subspace import nn as osnn
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.mlp = nnx.Linear(8, 8, rngs=rngs)
    >>> osnn.grass_layers(Net(nnx.Rngs(0)), 2, mask="mlp")
    ['mlp']
  """
  _base.check_rank(rank)
  _base.check_every(update_every)
  sparse_rows(rank, update_every, selection=selection, replacement=replacement)
  index = _surgery.param_leaf_indices(model)
  replaced = []
  for path, layer in _surgery.find_linears(model, mask):
    _surgery.replace(
      model,
      path,
      GrassLinear(
        layer,
        rank,
        update_every=update_every,
        leaf_index=index[tuple(path) + ("kernel",)],
        selection=selection,
        replacement=replacement,
        seed=seed,
      ),
    )
    replaced.append(_leaves.path_str(path))
  return replaced


def _is_d(params) -> Any:
  return jax.tree_util.tree_map_with_path(
    lambda p, _: _leaves.path_str(p).split("/")[-1] == D_NAME, params
  )


def grass_optimizer(
  learning_rate: _presets.ScalarOrSchedule,
  *,
  scale: float = 1.0,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  eps_placement: str = "hf",
  weight_decay: float = 0.0,
  restart_bias_correction: bool = True,
  unprojected_learning_rate: Optional[_presets.ScalarOrSchedule] = None,
) -> optax.GradientTransformation:
  r"""The optimizer of a model with `GrassLinear` layers, for ``nnx.Optimizer(..., wrt=nnx.Param)``.

  The optimizer-level `grass`'s update, on the model level's parameters:
  Adam (HF eps placement by default) on every Param, the D of each
  `GrassLinear` (whose gradient is already the compressed ρ·G[σ]) and the
  layers left dense (embeddings, norms, head) at full size; D's update is
  multiplied by `scale` α; then the learning rate. ρ enters through the
  layer's forward, so the effective kernel moves by
  −lr·α·scatter(ρ·Adam(ρ·G[σ])), as under `grass`. `grass_refresh` resets
  D's moments when a layer's selection changes.

  Decoupled weight decay applies to the dense Params only: decaying a
  GRASS layer's W would touch every entry of it each step, which the
  compressed step avoids (the optimizer-level `grass` decays the whole W).

  References:
    Muhamed, Li, Woodruff, Diab, Smith, "Grass: Compute Efficient Low-Memory
    LLM Training with Structured Sparse Gradients", EMNLP 2024,
    arXiv:2406.17660.

  Args:
    learning_rate: float or optax schedule.
    scale: α, multiplies D's updates.
    b1, b2, eps, eps_placement: Adam's constants, as in `grass`.
    weight_decay: decoupled, on the dense Params, after the update.
    restart_bias_correction: one Adam step count per Param, so that
      `grass_refresh`'s reset restarts D's bias correction with its moments
      (default; as `grass`'s argument of that name). False: one shared count
      that runs on through resets.
    unprojected_learning_rate: learning rate of the dense Params (every
      Param but the D factors); default `learning_rate`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> from optax_subspace import nn as osnn
    >>> tx = osnn.grass_optimizer(1e-3)
  """
  learning_rate = _presets.check_learning_rate(learning_rate, "learning_rate")
  _presets.check_learning_rate(unprojected_learning_rate, "unprojected_learning_rate")
  parts = [_presets.hf_or_optax_adam(b1, b2, eps, eps_placement, restart_bias_correction)]
  if scale != 1.0:
    parts.append(optax.masked(optax.scale(scale), _is_d))
  parts.append(
    _presets.by_group(optax.scale_by_learning_rate, learning_rate, unprojected_learning_rate, _is_d)
  )
  if weight_decay:
    not_d = lambda params: jax.tree_util.tree_map(lambda x: not x, _is_d(params))
    dense_lr = learning_rate if unprojected_learning_rate is None else unprojected_learning_rate
    parts.append(_presets.add_decayed_weights_after_update(dense_lr, weight_decay, mask=not_d))
  return optax.chain(*parts)


def _merge_in_chunks(layers: list[GrassLinear]) -> None:
  """`GrassLinear.merge` of every layer, in chunks of at most `_chunks.REFRESH_CHUNK_BYTES`.

  A chunk's merges start once the previous chunk's merged kernels exist, so
  the temporaries of a chunk's scatters (a float32 copy of each W on the CPU)
  are all that is alive at once, not every layer's (`_chunks`). D ← 0 comes
  after the chunk's merges have read D: the zeros then take D's own (donated)
  buffer, where zeros made earlier were a copy of every D kept to the end.
  """
  previous = None
  for _, chunk in _chunks.chunks(
    layers, lambda layer: None, lambda layer: 4 * layer.in_features * layer.out_features
  ):
    inputs = _chunks.after(
      previous, [(layer.kernel[...], getattr(layer, D_NAME)[...]) for layer in chunk]
    )
    for layer, (w, d) in zip(chunk, inputs):  # the merge reads W and D as the barrier gives them
      layer.kernel[...] = w
      getattr(layer, D_NAME)[...] = d
      layer.kernel[...] = layer.effective_kernel()
    previous = [layer.kernel[...] for layer in chunk]
    zeros = _chunks.after(previous, [jnp.zeros_like(d) for _, d in inputs])
    for layer, zero in zip(chunk, zeros):
      getattr(layer, D_NAME)[...] = zero


def _probe_norms(model, layers, loss_fn, args, kwargs):
  """‖dW[:, j]‖ of every GRASS layer on this batch, from one backward pass."""
  for _, layer in layers:
    layer.probing = True
  try:
    grads = nnx.grad(lambda m: loss_fn(m, *args, **kwargs), argnums=nnx.DiffState(0, GrassProbe))(
      model
    )
  finally:
    for _, layer in layers:
      layer.probing = False
  flat = {tuple(p): v for p, v in nnx.to_flat_state(grads)}
  return [flat[path + ("grass_probe",)][...] for path, _ in layers]


def _reselect_all(layers, norms, step):
  """New σ, ρ for every layer, one vmapped selection per (out, r, rule)."""
  groups: dict[tuple, list[int]] = {}
  for i, (_, layer) in enumerate(layers):
    groups.setdefault(
      (layer.out_features, layer.rank, layer.selection, layer.replacement), []
    ).append(i)
  moved = [None] * len(layers)
  for (_, _, selection, replacement), members in groups.items():
    sampled = selection != "topk"

    def one(indices, scales, key, cotangent):
      finite = jnp.all(jnp.isfinite(cotangent))
      key = jax.random.fold_in(key, step) if sampled else None
      return reselect(
        selection, replacement, indices, scales, jnp.where(finite, cotangent, 0.0), finite, key
      )

    stack = lambda xs: jnp.stack(xs)
    new = jax.vmap(one)(
      stack([layers[i][1].grass_indices[...] for i in members]),
      stack([layers[i][1].grass_scales[...] for i in members]),
      stack([layers[i][1].grass_key[...] for i in members]),
      stack([norms[i] for i in members]),
    )
    for k, i in enumerate(members):
      layer = layers[i][1]
      layer.grass_indices[...] = new[0][k]
      layer.grass_scales[...] = new[1][k]
      moved[i] = new[2][k]
  return moved


def _reset_moments(optimizer, layers, moved):
  """Zeros the optimizer buffers of D (by path and shape) where σ or ρ moved."""
  targets = {
    _leaves.path_str(path + (D_NAME,)): (getattr(layer, D_NAME).shape, flag)
    for (path, layer), flag in zip(layers, moved)
  }
  leaves = jax.tree_util.tree_flatten_with_path(
    optimizer.opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )[0]
  for key_path, var in leaves:
    if not isinstance(var, nnx.Variable):
      continue
    name = _leaves.path_str(key_path)
    for d_path, (shape, flag) in targets.items():
      # D's moments have D's shape; a () buffer under D's path is D's own
      # step count (grass_optimizer(restart_bias_correction=True)).
      if (name == d_path or name.endswith("/" + d_path)) and var.shape in (shape, ()):
        var[...] = jnp.where(flag, jnp.zeros_like(var[...]), var[...])
        break


def grass_refresh(
  model: nnx.Module, optimizer: nnx.Optimizer, loss_fn: Callable[..., jax.Array], *args, **kwargs
) -> dict[str, jax.Array]:
  r"""GRASS's selection step for every `GrassLinear`, at steps 0, K, 2K, ….

  When ``optimizer.step % K == 0`` (K: the layers' `update_every`), in the
  optimizer level's order (selection from the current step's gradient, then
  the step on the same batch):

  1. merge: W ← W + scatter_cols(D·diag ρ, σ), D ← 0 (effective weights
     unchanged), in chunks of layers of at most
     `optax_subspace._chunks.REFRESH_CHUNK_BYTES` (256 MiB) of float32 W, chunk after
     chunk under optimization barriers, so that one chunk's temporaries are
     alive at once, not every layer's (the LLaMA-7B refresh needed 11.1 GB of
     temporaries against the step's 2.8 on an H200); the same values;
  2. one forward and backward pass of ``loss_fn(model, *args, **kwargs)`` in
     which each layer's backward forms its dW = Xᵀ·dY, reduces it to the
     column norms ‖dW[:, j]‖ and drops it, no weight gradient kept; its
     ∂L/∂x is released only once the norms exist (an optimization barrier),
     so the layers before it wait: the dW of layers in sequence are never
     alive together (side by side ones, q, k, v or gate, up, may be);
  3. σ, ρ from those norms by the layer's rule ("topk": r largest, ρ = 1;
     "multinomial": q ∝ ‖·‖, ρ = 1/√(r·q); "uniform": ρ = √(out/r)), with
     the key folded with the step: `projectors.sparse_rows`'s rule and
     draws. A non-finite gradient keeps the selection; an all-zero one keeps
     it for "topk" and samples uniformly otherwise;
  4. where σ or ρ changed, D's moments in `optimizer` are zeroed (GRASS's
     reset), and D's own step count with them when `grass_optimizer` keeps
     one (its default), as under `grass`.

  Otherwise nothing runs (a `lax.cond`: under `jit` the extra pass costs
  only on refresh steps). On a refresh step the pass costs one forward and
  one backward with dense dW products (transient), on top of the step.

  References:
    Muhamed, Li, Woodruff, Diab, Smith, "Grass: Compute Efficient Low-Memory
    LLM Training with Structured Sparse Gradients", EMNLP 2024,
    arXiv:2406.17660.

  Args:
    model: a model with `GrassLinear` layers (`grass_layers`).
    optimizer: its `nnx.Optimizer` (the step count and D's moments).
    loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar``, the training
      loss, a plain (not separately jitted) function.
    *args, **kwargs: the current batch, as passed to `loss_fn`.

  Returns:
    {layer path: bool scalar}: whether the layer's selection changed.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> from optax_subspace import nn as osnn
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.mlp = nnx.Linear(8, 8, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.mlp(x)
    >>> net = Net(nnx.Rngs(0))
    >>> _ = osnn.grass_layers(net, 2, update_every=10, mask="mlp")
    >>> opt = nnx.Optimizer(net, osnn.grass_optimizer(1e-3), wrt=nnx.Param)
    >>> loss_fn = lambda m, x: jnp.sum(m(x) ** 2)
    >>> changed = osnn.grass_refresh(net, opt, loss_fn, jnp.ones((4, 8)))
  """
  layers = _grass_modules(model)
  every = {layer.update_every for _, layer in layers}
  if len(every) != 1:
    raise ValueError(f"GrassLinear layers disagree on update_every: {every}.")
  every = every.pop()
  step = optimizer.step[...]
  graphdef, state = nnx.split((model, optimizer))
  paths = [_leaves.path_str(p) for p, _ in layers]

  def refresh(state):
    model, optimizer = nnx.merge(graphdef, state)
    layers = _grass_modules(model)
    _merge_in_chunks([layer for _, layer in layers])
    norms = _probe_norms(model, layers, loss_fn, args, kwargs)
    moved = _reselect_all(layers, norms, step)
    _reset_moments(optimizer, layers, moved)
    return nnx.state((model, optimizer)), jnp.stack(moved)

  def skip(state):
    return state, jnp.zeros((len(layers),), bool)

  state, moved = jax.lax.cond(step % every == 0, refresh, skip, state)
  nnx.update((model, optimizer), state)
  return dict(zip(paths, moved))
