"""The method registry the benchmarks share with the LLaMA example (examples/llama/config.py).

The benchmarks name optax.contrib.galore `optax_contrib_galore` (the example: `optax_galore`);
variants that only a suite measures (`rso_model_shared`, `galore_refresh`, ...) are that suite's.
"""

from examples.llama.config import OPTIMIZERS, SCAN_UNSUPPORTED

# The example's --optimizer name of each benchmark name.
EXAMPLE_NAME = {("optax_contrib_galore" if m == "optax_galore" else m): m for m in OPTIMIZERS}
# Gradient transformations of the full gradients: adamw, galore, osd, rso, grass, fira, frugal,
# apollo, apollo_mini.
OPTIMIZER_LEVEL = tuple(m for m in OPTIMIZERS if m not in SCAN_UNSUPPORTED)
# Methods that replace the model's layers (optax_subspace.nn): rso_model, grass_model.
MODEL_LEVEL = tuple(m for m in OPTIMIZERS if m.endswith("_model"))
