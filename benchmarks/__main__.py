"""``python -m benchmarks run --suite NAME [--size ...] [--out ...] [--quick]``: see suites.py."""

from examples.llama import xla_flags

# The LLaMA example's XLA flags (unless XLA_FLAGS names them), before JAX creates its backend: the
# suites time the example's steps as it runs them; each result records its `xla_flags`.
xla_flags.set_defaults()

from benchmarks.suites import main  # noqa: E402

main()
