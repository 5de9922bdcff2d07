"""Session set-up: 8 simulated CPU devices, and one persistent XLA compilation cache for the tests
and the processes they start.

The sharding, mesh and ZeRO-1 tests need 8 devices. On a machine without them (a CPU), XLA
simulates them when XLA_FLAGS holds --xla_force_host_platform_device_count=8; that flag is read
when JAX starts its backend, so it is set here, before any test module imports JAX, and
appended to XLA_FLAGS the caller set (a count the caller chose is kept). The processes the tests
start inherit it. So `python -m pytest tests` runs every test, with none skipped for want of
devices.

XLA compiles the tests' programs unoptimised (`_TEST_XLA_FLAGS` below says why and how to
undo it).

Many tests run the same small programs again: a resumed run in a fresh process, the same step
on one device and on a mesh, each preset through the same checks. JAX's persistent cache
(keyed by the program, the compile options, the backend and the jax/jaxlib versions) lets the
second compile of a program load the first one's executable; on the 2-core CI machine that is
minutes of the suite. The cache lives in `.pytest_cache/` (git-ignored); a clean clone starts
it empty, and one run of the suite writes ~80 MB. It is not size-bounded (JAX's bound,
`jax_compilation_cache_max_size`, needs the `filelock` package, which nothing here installs):
delete the folder when it has grown. Set `JAX_COMPILATION_CACHE_DIR` yourself to put it
elsewhere, or `JAX_ENABLE_COMPILATION_CACHE=false` to compile everything afresh. Code that reads
XLA's dump folder turns the cache off for its own process (a cache hit compiles nothing, so dumps
nothing).
"""

import os
import pathlib

# XLA flags the tests add unless the caller's XLA_FLAGS sets them. Read when JAX first creates
# its CPU backend (not at `import jax`), which no test has done yet.
_TEST_XLA_FLAGS = {
  "--xla_force_host_platform_device_count": "8",
  # The suite is compile-bound (two thirds of its CPU time is XLA compiling small programs that
  # then run for milliseconds). LLVM at -O0 and the classic elemental emitter for fusions compile
  # a tiny LLaMA train step ~4x faster (4.9 s -> 1.1 s of backend compile). The programs the
  # library builds are the same; XLA's CPU code for them differs, so results move by float32
  # rounding, and a test comparing two differently built programs allows a few ulps instead of
  # asking for the same bits. XLA_FLAGS="--xla_backend_optimization_level=2
  # --xla_cpu_use_fusion_emitters=true" restores XLA's defaults (CI runs the fast subset so too).
  "--xla_backend_optimization_level": "0",
  "--xla_cpu_use_fusion_emitters": "false",
}
_caller_flags = os.environ.get("XLA_FLAGS", "")
_added = [f"{name}={value}" for name, value in _TEST_XLA_FLAGS.items() if name not in _caller_flags]
os.environ["XLA_FLAGS"] = " ".join([_caller_flags, *_added]).strip()

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax_compilation_cache"
# Environment, not jax.config: the example and benchmark subprocesses inherit it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
# Small programs too: most of the suite's compiles take well under the default 1 s.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_collection_modifyitems(items):
  """Runs the slow-marked tests (the long ones: subprocesses, whole example runs) first.

  pytest-xdist's worksteal gives each worker a contiguous share of the tests and lets an idle
  worker take from the end of a busy one's: with the long tests first, the run ends on short
  tests spread over the workers, not on one long test while the others wait. Cold on 2 cores,
  `-n 2`: 586 s against 599 s in collection order (`-n 3`: 612 s against 651 s).
  """
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
