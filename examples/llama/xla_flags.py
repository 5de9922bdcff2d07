"""XLA flags the example runs with unless the caller's XLA_FLAGS names them.

JAX reads XLA_FLAGS once, when it creates its backend (the first device query), not at
`import jax`: `python -m examples.llama` and `python -m benchmarks` call `set_defaults()`
before anything else. A caller who names a flag keeps their value, e.g.
`XLA_FLAGS=--xla_gpu_enable_triton_gemm=true` for XLA's own choice.
"""

from __future__ import annotations

import os
from typing import MutableMapping

# cuBLAS, not XLA's Triton GEMM fusions, for the model's products on a GPU. On an H100 (jax
# 0.11.2) XLA ran the 1B model's MLP products as Triton fusions: their width 5461 (GaLore's
# configuration) is no multiple of 8, and the costliest of those kernels took 2.0 ms a call; off,
# XLA zero-pads the operands and cuBLAS runs them: the step's products took 184.55 ms instead of
# 375.00, and AdamW's whole 1B step (batch 64 x 256) 246.69 ms instead of 446.15. At 60M and
# 350M (widths 1376 and 2736) the step is 2.5% and 0.7% faster without them
# (benchmarks/results/train_step_1b_adamw_galore*_h100_ee2e591.json, *_adamw*_h100_2324c63.json).
# The flag concerns GPUs only: XLA's CPU backend accepts it and runs as before.
DEFAULTS = {"--xla_gpu_enable_triton_gemm": "false"}


def set_defaults(environ: MutableMapping[str, str] = os.environ) -> list[str]:
  """Appends to environ["XLA_FLAGS"] each of `DEFAULTS` it does not name.

  Returns the flags added (none when the caller named them all, or on a second call).
  """
  current = environ.get("XLA_FLAGS", "")
  named = {token.split("=", 1)[0] for token in current.split()}
  added = [f"{name}={value}" for name, value in DEFAULTS.items() if name not in named]
  if added:
    environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added
