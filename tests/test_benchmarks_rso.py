"""Smoke test of benchmarks/rso_memory.py at a tiny size on the CPU (compile only)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import rso_memory

TINY = [
  "--layers",
  "1",
  "--batch",
  "1",
  "--seq",
  "32",
  "--hidden",
  "32",
  "--ffn",
  "64",
  "--heads",
  "2",
  "--rank",
  "8",
]


@pytest.mark.slow
def test_rso_memory_writes_json_and_plot_for_every_method(tmp_path):
  out = tmp_path / "rso_memory.json"
  result = rso_memory.main(TINY + ["--out", str(out)])
  assert json.loads(out.read_text()) == result
  assert out.with_suffix(".png").stat().st_size > 0
  for method in rso_memory.METHODS:
    numbers = result["methods"][method]
    assert "error" not in numbers, numbers.get("error")
    assert numbers["memory_analysis"]["temp_size_in_bytes"] > 0
  # RSO trains B (r×out) and the norms; W and P ride along as constants.
  rso, adamw = result["methods"]["rso"], result["methods"]["adamw"]
  assert rso["trainable_param_bytes"] < adamw["trainable_param_bytes"]
  assert rso["frozen_bytes"] > 0
  # A block keeps x·P (b×r) for its linear layers' backward instead of their inputs.
  assert rso["block_residual_bytes"]["activations"] < adamw["block_residual_bytes"]["activations"]
  assert set(result["ratios_vs_adamw"]) == {"galore", "rso", "rso_shared"}
  # Sharing P among q/k/v and gate/up keeps fewer x·P and stores fewer P.
  shared = result["methods"]["rso_shared"]
  assert shared["frozen_bytes"] < rso["frozen_bytes"]
  assert (
    shared["memory_analysis"]["temp_size_in_bytes"] < rso["memory_analysis"]["temp_size_in_bytes"]
  )
  assert result["config"]["attention"] == "xla"


@pytest.mark.slow
def test_rso_step_compiles_under_remat(tmp_path):
  # nnx.remat per block writes W and P back after each block: the step must merge them as
  # Variables of its own trace (regression: TraceContextError on FrozenKernel).
  args = rso_memory._parser().parse_args(  # pylint: disable=protected-access
    TINY + ["--out", str(tmp_path / "x.json"), "--remat", "--attention", "xla", "--worker", "rso"]
  )
  numbers = rso_memory._worker(args)  # pylint: disable=protected-access
  assert numbers["memory_analysis"]["temp_size_in_bytes"] > 0
  assert numbers["frozen_bytes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("seq", [12, 384])  # one block of queries; three blocks of 128
@pytest.mark.parametrize("is_causal", [False, True])
def test_recomputing_attention_equals_xla_attention_and_its_gradients(seq, is_causal):
  keys = jax.random.split(jax.random.PRNGKey(seq), 4)
  q, k, v = (jax.random.normal(key, (2, seq, 3, 8)) for key in keys[:3])
  cot = jax.random.normal(keys[3], q.shape)
  attention = rso_memory._recomputing_attention  # pylint: disable=protected-access

  def loss(attention):
    return lambda q, k, v: jnp.sum(attention(q, k, v, is_causal=is_causal) * cot)

  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(
      attention(q, k, v, is_causal=is_causal),
      jax.nn.dot_product_attention(q, k, v, is_causal=is_causal),
      rtol=1e-5,
      atol=1e-6,
    )
    got = jax.grad(loss(attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_recomputing_attention_keeps_no_scores_for_the_backward(tmp_path):
  # Its residuals are q, k, v, the output (batch, seq, heads, dim) and the log-sum-exp; XLA's
  # attention keeps batch × heads × seq × seq tensors.
  args = rso_memory._parser().parse_args(  # pylint: disable=protected-access
    TINY + ["--out", str(tmp_path / "x.json"), "--attention", "recompute", "--worker", "adamw"]
  )
  numbers = rso_memory._worker(args)  # pylint: disable=protected-access
  xla = rso_memory._worker(
    rso_memory._parser().parse_args(  # pylint: disable=protected-access
      TINY + ["--out", str(tmp_path / "x.json"), "--attention", "xla", "--worker", "adamw"]
    )
  )
  assert numbers["block_residual_bytes"]["activations"] < xla["block_residual_bytes"]["activations"]
