"""Quick start: AdamW, GaLore and Online Subspace Descent on a small MLP.

Run from the repository root: `python examples/quickstart.py` (CPU, seconds).
Prints each method's final loss and optimizer-state size.
"""

import jax
import jax.numpy as jnp
import optax

import optax_subspace as osub


def main(steps: int = 300):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(k1, (256, 64))
  y = jnp.tanh(x @ jax.random.normal(k2, (64, 32)) / 8)
  params = {
    "hidden": {"kernel": jax.random.normal(k3, (64, 256)) / 8, "bias": jnp.zeros(256)},
    "out": {"kernel": jnp.zeros((256, 32)), "bias": jnp.zeros(32)},
  }

  def loss_fn(p):
    h = jax.nn.gelu(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    return jnp.mean((h @ p["out"]["kernel"] + p["out"]["bias"] - y) ** 2)

  methods = {
    "adamw": optax.adamw(3e-3, weight_decay=0.0),
    # Project the kernels (not the biases) on rank 16, refresh every 50.
    "galore": osub.galore(3e-3, rank=16, update_every=50, mask="kernel"),
    "online_subspace_descent": osub.online_subspace_descent(3e-3, rank=16, mask="kernel"),
  }
  print(f"{'method':<26}{'loss':>10}{'state bytes':>14}")
  for name, tx in methods.items():
    state = tx.init(params)

    @jax.jit
    def step(p, state, tx=tx):
      loss, grads = jax.value_and_grad(loss_fn)(p)
      updates, state = tx.update(grads, state, p)
      return optax.apply_updates(p, updates), state, loss

    p = params
    for _ in range(steps):
      p, state, loss = step(p, state)
    nbytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(state))
    print(f"{name:<26}{float(loss_fn(p)):>10.5f}{nbytes:>14,}")


if __name__ == "__main__":
  main()
