"""A LLaMA decoder in Flax NNX: RMSNorm, rotary position embeddings, SwiGLU, causal attention.

Kernels are `nnx.Linear` kernels in Flax's (in, out) layout, and the attention kernels stay 2-D
(hidden, hidden), so parameter paths read ``layers/0/attention/q_proj/kernel``,
``layers/0/mlp/gate_proj/kernel``, ``embed/embedding``, ``lm_head/kernel`` and ``.../scale``.
With ``scan_layers`` the blocks are one module whose parameters are stacked over the layers
(``layers/attention/q_proj/kernel`` of shape (layers, in, out)), run by `nnx.scan`: the compiler
sees one block, and an optimizer sees each kernel as a batch of matrices.
Follows Touvron et al., "LLaMA: Open and Efficient Foundation Language Models" (arXiv 2302.13971).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from examples.llama.config import ModelConfig

# LLaMA initialises every weight from N(0, 0.02²), as the GaLore authors' code does.
_INIT = nnx.initializers.normal(stddev=0.02)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotates each (x_i, x_{i+d/2}) pair of the head dimension by angle position·θ^(-2i/d).

  Su et al., "RoFormer" (arXiv 2104.09864), eq. 34, in the half-split layout of LLaMA's
  Hugging Face port. x: (batch, seq, heads, head_dim); positions: (seq,).
  """
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def _linear(cfg: ModelConfig, n_in: int, n_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
    n_in,
    n_out,
    use_bias=False,
    kernel_init=_INIT,
    dtype=cfg.compute_dtype,
    param_dtype=cfg.param_dtype,
    rngs=rngs,
  )


def _rms_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
  return nnx.RMSNorm(
    cfg.hidden,
    epsilon=cfg.norm_eps,
    dtype=cfg.compute_dtype,
    param_dtype=cfg.param_dtype,
    rngs=rngs,
  )


class Attention(nnx.Module):
  """Multi-head causal self-attention with rotary embeddings on queries and keys."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.q_proj = _linear(cfg, cfg.hidden, cfg.hidden, rngs)
    self.k_proj = _linear(cfg, cfg.hidden, cfg.hidden, rngs)
    self.v_proj = _linear(cfg, cfg.hidden, cfg.hidden, rngs)
    self.o_proj = _linear(cfg, cfg.hidden, cfg.hidden, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, seq, _ = x.shape
    heads = (batch, seq, self.cfg.heads, self.cfg.head_dim)
    positions = jnp.arange(seq)
    q = rope(self.q_proj(x).reshape(heads), positions, self.cfg.rope_theta)
    k = rope(self.k_proj(x).reshape(heads), positions, self.cfg.rope_theta)
    v = self.v_proj(x).reshape(heads)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.o_proj(out.reshape(batch, seq, self.cfg.hidden))


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) · up(x)) (Shazeer, arXiv 2002.05202)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.gate_proj = _linear(cfg, cfg.hidden, cfg.ffn, rngs)
    self.up_proj = _linear(cfg, cfg.hidden, cfg.ffn, rngs)
    self.down_proj = _linear(cfg, cfg.ffn, cfg.hidden, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm residual block: x + attention(norm(x)), then + mlp(norm(·))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attention_norm = _rms_norm(cfg, rngs)
    self.attention = Attention(cfg, rngs)
    self.mlp_norm = _rms_norm(cfg, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attention(self.attention_norm(x))
    return x + self.mlp(self.mlp_norm(x))


def _run_block(block: Block, x: jax.Array) -> jax.Array:
  return block(x)


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
  """`cfg.layers` blocks as one Block whose every parameter has a leading layer axis."""

  @nnx.split_rngs(splits=cfg.layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs: nnx.Rngs) -> Block:
    return Block(cfg, rngs)

  return make(rngs)


# The mesh axes the batch is split over when the model runs under `jax.set_mesh` (the example's
# ("data", "fsdp") mesh). Activations are pinned there, so XLA's partitioner does not carry the
# parameters' FSDP sharding of the hidden axis into them (MaxText constrains them the same way).
BATCH_AXES = ("data", "fsdp")


def constrain_batch(x: jax.Array) -> jax.Array:
  """x (batch, ...) split over BATCH_AXES of the current mesh; x itself outside a mesh."""
  get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)  # JAX >= 0.6
  mesh = get_mesh() if get_mesh is not None else None
  if mesh is None or mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  spec = jax.sharding.PartitionSpec(BATCH_AXES, *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, spec)


class Llama(nnx.Module):
  """Token ids (batch, seq) -> next-token logits (batch, seq, vocab) in float32."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(
      cfg.vocab_size,
      cfg.hidden,
      embedding_init=_INIT,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.param_dtype,
      rngs=rngs,
    )
    if cfg.scan_layers:
      self.layers = _stacked_blocks(cfg, rngs)
    else:
      # nnx.List (Flax >= 0.12) registers the blocks as children; a list did before.
      layer_list = getattr(nnx, "List", list)
      self.layers = layer_list([Block(cfg, rngs) for _ in range(cfg.layers)])
    self.norm = _rms_norm(cfg, rngs)
    self.lm_head = _linear(cfg, cfg.hidden, cfg.vocab_size, rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = constrain_batch(self.embed(tokens))
    run_block = nnx.remat(_run_block) if self.cfg.remat else _run_block
    if self.cfg.scan_layers:

      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def run_layers(x, block):
        return constrain_batch(run_block(block, x))

      x = run_layers(x, self.layers)
    else:
      for block in self.layers:
        x = constrain_batch(run_block(block, x))
    return self.lm_head(self.norm(x)).astype(jnp.float32)


def count_params(params) -> int:
  """Number of parameters of a tree of arrays or of jax.ShapeDtypeStructs."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
