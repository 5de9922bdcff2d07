"""The LLaMA train step of every method, built in one place, and the worker processes that run them.

`build(method, model_config, batch=..., seq=...)` returns a `TrainSetup`: a jitted train step
``(params, opt_state, frozen, tokens) -> (params, opt_state, loss)`` (next-token cross-entropy on
random tokens, params and state donated), its eager initialisation, its arguments' abstract
shapes (a step compiles, and its memory is read, before anything is allocated) and the periodic
refresh where a method has one: kind "count" (galore, grass), the step itself at count 0 mod T;
kind "program" (rso_model: `merge_and_redraw`; grass_model: `grass_refresh`), a program run
between steps. Methods (`METHODS`): the optimizer level, the LLaMA example's `--optimizer`
builds (``frozen`` empty; optax_contrib_galore's SVD refresh is not timed: its steps run from
count 1 with P zero), and the model level of `optax_subspace.nn`: rso_model, rso_model_shared
(one P for q/k/v, one for gate/up) and grass_model, whose W (and P, σ, ρ) are frozen arguments
and whose optimizer state is an `nnx.Optimizer`'s.

`Workers` runs job dicts (``{"module": ..., ...}``: that module's ``run_job(job)``) in
``python -m benchmarks.train_setups --worker`` processes: with ``isolate=True`` (a GPU) one per
job, so `peak_bytes_in_use` is that job's and an out-of-memory crash takes only it down; with
``isolate=False`` (the CPU, no peak counter) one for all, saving the start-ups.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib
import json
import os
import pathlib
import select
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional
from unittest import mock

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks import methods as registry
from benchmarks import record
from benchmarks.optimizer_update import _count_setter
from examples.llama import optimizers as llama_optimizers
from examples.llama.config import ModelConfig, TrainConfig
from examples.llama.model import Block, Llama
import optax_subspace as osub
from optax_subspace import _chunks
from optax_subspace import _combinator
from optax_subspace import nn as osnn

ROOT = pathlib.Path(__file__).resolve().parent.parent
HAS_OPTAX_GALORE = hasattr(getattr(optax, "contrib", None), "galore")
METHODS = tuple(
  m
  for m in (
    "adamw",
    "optax_contrib_galore",
    *registry.OPTIMIZER_LEVEL[1:],
    "rso_model",
    "rso_model_shared",
    "grass_model",
  )
  if m != "optax_contrib_galore" or HAS_OPTAX_GALORE
)
# Variants a run names explicitly (--methods), left out of the default list: each is a method
# run with the example's options given here. RSO with each subproblem's basis kept in the state
# (`rso(..., store_basis=True)`); GaLore whose refreshes after step 0 are two rounds of subspace
# iteration (`projectors.svd(..., warm_iterations=2)`); GaLore and OSD with their products with G
# in bfloat16 (`projection_dtype=jnp.bfloat16`, the example's --projection-dtype); GaLore with
# both (whether its two opt-ins together reach issue 22's 0.97 at 1B: each alone did not).
VARIANT_OF = {
  "rso_stored_basis": ("rso", {"rso_store_basis": True}),
  "galore_warm": ("galore", {"galore_warm_iterations": 2}),
  "galore_bf16_products": ("galore", {"projection_dtype": "bfloat16"}),
  "galore_warm_bf16_products": (
    "galore",
    {"galore_warm_iterations": 2, "projection_dtype": "bfloat16"},
  ),
  "osd_bf16_products": ("osd", {"projection_dtype": "bfloat16"}),
  # The method compiled with one of the combinator's choices changed (COMPILE_SETTINGS).
  "osd_per_leaf_steps": ("osd", {}),
  "rso_bases_as_product_stacks": ("rso", {}),
  "galore_stacked_under_2m": ("galore", {}),
  "osd_stacked_under_2m": ("osd", {}),
  "rso_stacked_under_2m": ("rso", {}),
  "galore_columns_stacked_as_stored": ("galore", {}),
  "galore_columns_joined_transposed": ("galore", {}),
  "osd_columns_joined_transposed": ("osd", {}),
  "osd_columns_stacked_as_stored": ("osd", {}),
}
VARIANTS = tuple(VARIANT_OF)
# Library settings read while an update is traced, each changed around the compile of a method
# whose name holds its suffix (`compile_settings`): the program the library would run with that
# choice flipped, timed beside the default's in one run (train_step's and profile_update's
# variants).
COMPILE_SETTINGS = {
  "_unpadded": (_combinator, "PRODUCT_ALIGNMENT", 1),
  "_unchunked": (_chunks, "OPTIMIZER_REFRESH_CHUNK_BYTES", 1 << 62),
  "_held_bases": (_combinator, "HOLD_COMPUTED_BASES", True),
  "_unheld_bases": (_combinator, "HOLD_COMPUTED_BASES", False),
  "_stacked_products": (_combinator, "STACKED_PRODUCT_ELEMENTS", 1 << 20),
  "_unstacked_direction": (_combinator, "OWN_BATCH_MATRICES", 1),
  "_per_leaf_steps": (_combinator, "STACK_SMALL_PROJECTOR_STEPS", False),
  "_stacked_under_2m": (_combinator, "STACKED_PRODUCT_ELEMENTS", 1 << 21),
  "_bases_as_product_stacks": (_combinator, "BASES_AS_PRODUCT_STACKS", True),
  "_bases_cut_per_leaf": (_combinator, "BASES_AS_PRODUCT_STACKS", False),
  "_columns_stacked_as_stored": (_combinator, "COLUMNS_STACKED_AS_STORED", True),
  "_columns_joined_transposed": (_combinator, "COLUMNS_STACKED_AS_STORED", False),
}
MODEL_LEVEL = ("rso_model", "rso_model_shared", "grass_model")
# What a scanned model (`ModelConfig.scan_layers`) cannot run: the example's SCAN_UNSUPPORTED.
NEEDS_LAYER_MODULES = MODEL_LEVEL + ("optax_contrib_galore",)
RSO_MODEL = ("rso_model", "rso_model_shared")
# The LLaMA example's --optimizer name of each optimizer-level method.
EXAMPLE_OPTIMIZER = {
  m: n for m, n in registry.EXAMPLE_NAME.items() if n not in registry.MODEL_LEVEL
} | {variant: base for variant, (base, _) in VARIANT_OF.items()}
REFRESH_KIND = {
  "galore": "count",
  "grass": "count",
  "rso_model": "program",
  "rso_model_shared": "program",
  "grass_model": "program",
}
UPDATE_EVERY = 200
# The layers the model level replaces: those whose kernels the optimizer level projects
# (examples/llama/optimizers.py's PROJECTED, r"(attention|mlp)/.*kernel").
MODEL_LEVEL_LAYERS = r"(attention|mlp)/"
# Steps of the example's schedule (warm-up 10%, then cosine): long enough that a benchmark's
# few steps stay in the warm-up, where the learning rate is small.
SCHEDULE_STEPS = 10_000
MEMORY_FIELDS = (
  "argument_size_in_bytes",
  "output_size_in_bytes",
  "alias_size_in_bytes",
  "temp_size_in_bytes",
  "generated_code_size_in_bytes",
)
_XLA_ATTENTION = jax.nn.dot_product_attention


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """One method's train step on one model, ready to compile; see the module docstring.

  `step` and `abstract` as there; `init` runs eagerly, each parameter drawn on the device in its
  own dtype (a jitted whole-model init took XLA over two minutes to compile at 1B and 7B);
  `tokens(seed)`: int32 (batch, seq + 1) ids. `refresh`: kind "program", the jitted
  ``(params, opt_state, frozen, tokens) -> (params, opt_state, frozen)``, all donated; kind
  "count" with `build`'s ``host_refresh``, the refresh step's own program. `set_count(opt_state,
  count)` sets the count a refresh is due at; `steady_count`: the count the timed steps start
  from (past the step-0 refresh), None for init's.
  """

  method: str
  level: str
  model: ModelConfig
  batch: int
  seq: int
  rank: int
  update_every: int
  state_dtype: Optional[str]
  step: Callable
  init: Callable
  abstract: tuple
  tokens: Callable[[int], jax.Array]
  refresh_kind: Optional[str]
  refresh: Optional[Callable]
  set_count: Optional[Callable]
  steady_count: Optional[int]
  host_refresh: bool = False


def with_state_dtype(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
  """`tx` run on gradients and parameters cast to `dtype`; updates cast back to the params'.

  The state of `tx` is its own (no wrapper state), so paths into it (`grass_refresh`'s reset of
  D's moments) are unchanged. With bfloat16 parameters and ``dtype=float32`` Adam's moments are
  float32 (mixed precision; the update is rounded to bfloat16 when applied).
  """
  dtype = jnp.dtype(dtype)
  cast = lambda tree: jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )

  # Jitted, so the float32 cast of the parameters is folded into the state it shapes: run
  # eagerly it is a float32 copy of the whole model (27 GB at 7B) in the device's peak memory.
  init = jax.jit(lambda params: tx.init(cast(params)))

  def update(updates, state, params=None):
    new, state = tx.update(cast(updates), state, None if params is None else cast(params))
    return jax.tree.map(lambda n, u: n.astype(u.dtype), new, updates), state

  return optax.GradientTransformation(init, update)


def optimizer(
  method: str,
  rank: int,
  update_every: int = UPDATE_EVERY,
  state_dtype=None,
  scan_layers: bool = False,
) -> optax.GradientTransformation:
  """The update rule of `method`: the example's for the optimizer level, `optax_subspace.nn`'s
  for the model level; both with the example's warm-up + cosine schedule, no clipping.
  `scan_layers`: for a scanned model's stacked kernels (the example's `matrix_dims`)."""
  if method not in METHODS + VARIANTS:
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS + VARIANTS)}")
  if scan_layers and method in NEEDS_LAYER_MODULES:
    raise ValueError(f"{method} needs one module per layer: no scanned model")
  cfg = TrainConfig(
    optimizer=EXAMPLE_OPTIMIZER.get(method, method.removesuffix("_model")),
    **VARIANT_OF.get(method, (None, {}))[1],
    rank=rank,
    update_every=update_every,
    steps=SCHEDULE_STEPS,
    scan_layers=scan_layers,
  )
  if method in RSO_MODEL:
    tx = osnn.rso_optimizer(llama_optimizers.schedule(cfg), inner_steps=update_every)
  elif method == "grass_model":
    tx = osnn.grass_optimizer(llama_optimizers.schedule(cfg))
  else:
    tx = llama_optimizers.method(cfg)
  return tx if state_dtype is None else with_state_dtype(tx, state_dtype)


def cross_entropy(model, tokens):
  """Next-token cross-entropy, as examples/llama/train.py's `_loss`."""
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _set_nnx_step(opt_state, count):
  """An `nnx.Optimizer` state with its step count set to `count` (a new array: it is donated)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(opt_state)
  leaves = [
    jnp.asarray(count, leaf.dtype) if path[0] == jax.tree_util.DictKey("step") else leaf
    for path, leaf in flat
  ]
  return treedef.unflatten(leaves)


def _optimizer_level(method, cfg, tx, seed, refresh=None):
  """(step, init, abstract params/opt_state/frozen) of the example's train step; `refresh`:
  its static `subspace_refresh` (None: decided on the device)."""
  extra = {} if refresh is None else {"subspace_refresh": refresh}

  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(seed))))

  def init():
    params = nnx.to_pure_dict(nnx.state(Llama(cfg, nnx.Rngs(seed))))
    return params, tx.init(params), {}

  def train_step(params, opt_state, frozen, tokens):
    del frozen  # the optimizer level trains every parameter
    loss, grads = jax.value_and_grad(lambda p: cross_entropy(nnx.merge(graphdef, p), tokens))(
      params
    )
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step, init, jax.eval_shape(init), None


def _model_level(method, cfg, tx, rank, update_every, seed):
  """(step, init, abstract params/opt_state/frozen, refresh) of a model-level train step."""

  def build():
    model = Llama(cfg, nnx.Rngs(seed))
    if method in RSO_MODEL:
      share = osnn.SHARE_QKV_GATE_UP if method == "rso_model_shared" else None
      osnn.rso_layers(model, rank, mask=MODEL_LEVEL_LAYERS, share_basis=share)
    else:
      osnn.grass_layers(model, rank, update_every=update_every, mask=MODEL_LEVEL_LAYERS)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  model, opt = nnx.eval_shape(build)
  graphdef = nnx.graphdef(model)
  opt_graphdef = nnx.graphdef(opt)

  def init():
    model, opt = build()
    _, params, frozen = nnx.split(model, nnx.Param, ...)
    return params, nnx.state(opt), frozen

  def loss_fn(params, frozen, tokens):
    # copy=True: Variables of this trace (nnx.remat writes every Variable of a block back).
    return cross_entropy(nnx.merge(graphdef, params, frozen, copy=True), tokens)

  def train_step(params, opt_state, frozen, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, frozen, tokens)
    model = nnx.merge(graphdef, params, frozen)
    opt = nnx.merge(opt_graphdef, opt_state)
    opt.update(model, grads)
    return nnx.state(model, nnx.Param), nnx.state(opt), loss

  def refresh(params, opt_state, frozen, tokens):
    model = nnx.merge(graphdef, params, frozen)
    opt = nnx.merge(opt_graphdef, opt_state)
    if method in RSO_MODEL:
      osnn.merge_and_redraw(model)  # W ← W + P·B, B ← 0, the next P
    else:
      osnn.grass_refresh(model, opt, cross_entropy, tokens)  # acts at a step count 0 mod K
    _, params, frozen = nnx.split(model, nnx.Param, ...)
    return params, nnx.state(opt), frozen

  return train_step, init, jax.eval_shape(init), refresh


def build(
  method: str,
  model: ModelConfig,
  *,
  batch: int,
  seq: int,
  rank: Optional[int] = None,
  update_every: int = UPDATE_EVERY,
  state_dtype=None,
  seed: int = 0,
  host_refresh: bool = False,
) -> TrainSetup:
  """The `TrainSetup` of `method` on the LLaMA `model` (remat and dtypes: the config's), rank
  None: hidden / 4, `update_every` T (RSO's K), `state_dtype` None: the method's own.

  `host_refresh`: as the example's loop (`optimizers.refresh_due`), methods whose state holds a
  refresh schedule (`osub.refresh_schedule`) get two programs, the steady step
  (``subspace_refresh=False``: no refresh cond, so no host sync at it on a GPU) and the refresh
  step (kind "count"; OSD's step-0-only refresh is not amortised). Else one program, the refresh
  decided on the device by a `lax.cond`.
  """
  rank = rank or model.hidden // 4
  tx = optimizer(method, rank, update_every, state_dtype, model.scan_layers)
  schedule = None
  if method in MODEL_LEVEL:
    train_step, init, carry, refresh = _model_level(method, model, tx, rank, update_every, seed)
  else:
    train_step, init, carry, refresh = _optimizer_level(method, model, tx, seed)
    # The projector's schedule, read from the (abstract) state as the example's loop reads it.
    schedule = osub.refresh_schedule(carry[1]) if host_refresh else None
  host = schedule is not None
  if host:
    train_step = _optimizer_level(method, model, tx, seed, False)[0]
  tokens_shape = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
  base = VARIANT_OF[method][0] if method in VARIANTS else method
  kind = REFRESH_KIND.get(base)
  set_count, steady_count = None, None
  if method == "grass_model":
    set_count = _set_nnx_step
  elif base in ("galore", "grass", "optax_contrib_galore") or host:
    set_count, steady_count = _count_setter(carry[1]), 1
  if host:
    kind = None if schedule.every is None else "count"
    refresh = None if kind is None else _optimizer_level(method, model, tx, seed, True)[0]
  return TrainSetup(
    method=method,
    level="model" if method in MODEL_LEVEL else "optimizer",
    model=model,
    batch=batch,
    seq=seq,
    rank=rank,
    update_every=update_every,
    state_dtype=None if state_dtype is None else jnp.dtype(state_dtype).name,
    step=jax.jit(train_step, donate_argnums=(0, 1)),
    init=init,
    abstract=(*jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), carry), tokens_shape),
    tokens=lambda s: jax.random.randint(
      jax.random.PRNGKey(s), tokens_shape.shape, 0, model.vocab_size, jnp.int32
    ),
    refresh_kind=kind,
    refresh=(
      jax.jit(refresh, donate_argnums=(0, 1, 2))
      if kind == "program"
      else jax.jit(refresh, donate_argnums=(0, 1))
      if refresh is not None
      else None
    ),
    set_count=set_count,
    steady_count=steady_count,
    host_refresh=host,
  )


# ------------------------------------------------------------------ compiling and running


@dataclasses.dataclass
class Compiled:
  """The compiled programs of a `TrainSetup` and what compiling them took."""

  step: Any
  refresh: Any
  compile_s: dict


@contextlib.contextmanager
def compile_settings(method: str):
  """`COMPILE_SETTINGS` whose suffix `method` holds, set until the block ends (wrap a compile)."""
  with contextlib.ExitStack() as settings:
    for suffix, (module, attr, value) in COMPILE_SETTINGS.items():
      if suffix in method:
        settings.enter_context(mock.patch.object(module, attr, value))
    yield


def compile_setup(setup: TrainSetup) -> Compiled:
  """Compiles the step (and a "program" refresh) from the abstract arguments: nothing is
  allocated on the device. A variant's `COMPILE_SETTINGS` hold while both are traced."""
  programs, times = {}, {}
  with compile_settings(setup.method):
    for name, jitted in (("step", setup.step), ("refresh", setup.refresh)):
      if jitted is not None:
        t0 = time.perf_counter()
        programs[name] = jitted.lower(*setup.abstract).compile()
        times[name] = time.perf_counter() - t0
  return Compiled(programs["step"], programs.get("refresh"), times)


def write_hlo(compiled: Compiled, folder, stem: str) -> None:
  """Each compiled program's optimised HLO text as FOLDER/STEM_PROGRAM.hlo.txt.gz (PROGRAM: step,
  refresh): what the device runs, fusions named as the profiler's kernels."""
  for name, program in (("step", compiled.step), ("refresh", compiled.refresh)):
    if program is not None:
      record.write_hlo(pathlib.Path(folder) / f"{stem}_{name}.hlo.txt.gz", program.as_text())


def memory_analysis(compiled) -> Optional[dict]:
  """`compiled.memory_analysis()` as a dict, with ``need_bytes`` = arguments + outputs −
  aliased outputs + temporaries: what running the program needs at once."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  fields = {f: int(getattr(analysis, f)) for f in MEMORY_FIELDS if hasattr(analysis, f)}
  fields["need_bytes"] = (
    fields["argument_size_in_bytes"]
    + fields["output_size_in_bytes"]
    - fields["alias_size_in_bytes"]
    + fields["temp_size_in_bytes"]
  )
  return fields


def run_step(compiled: Compiled, carry, tokens, set_count=None):
  """One step: ``(params, opt_state, frozen) -> ((params, opt_state, frozen), loss)``."""
  params, opt_state, frozen = carry
  if set_count is not None:
    opt_state = set_count(opt_state)
  params, opt_state, loss = compiled.step(params, opt_state, frozen, tokens)
  return (params, opt_state, frozen), loss


def run_refresh(setup: TrainSetup, compiled: Compiled, carry, tokens):
  """One refresh as it runs at a due step; returns the new carry. A refresh step runs with the
  count set to T (a refresh after step 0's, which a warm-started refresh does differently), a
  refresh program with it set to 0."""
  if setup.refresh_kind == "count":  # with host refreshes, the refresh step's own program
    program = compiled if compiled.refresh is None else Compiled(compiled.refresh, None, {})
    return run_step(program, carry, tokens, lambda s: setup.set_count(s, setup.update_every))[0]
  params, opt_state, frozen = carry
  if setup.set_count is not None:
    opt_state = setup.set_count(opt_state, 0)
  return compiled.refresh(params, opt_state, frozen, tokens)


def bytes_by_dtype(tree) -> dict:
  """{dtype name: bytes} of the leaves of `tree` (arrays or ShapeDtypeStructs)."""
  out = collections.Counter()
  for x in jax.tree.leaves(tree):
    out[jnp.dtype(x.dtype).name] += int(x.size * jnp.dtype(x.dtype).itemsize)
  return dict(out)


def nbytes(tree) -> int:
  return sum(bytes_by_dtype(tree).values())


def model_fields(
  shape, vocab: int, remat: bool, param_dtype: str, scan_layers: bool = False
) -> dict:
  """A `ModelConfig`'s fields (as a JSON-able dict) of the LLaMA `shape` (hidden, ffn, heads,
  layers) with bf16 compute."""
  hidden, ffn, heads, layers = shape
  return {
    "hidden": hidden,
    "ffn": ffn,
    "heads": heads,
    "layers": layers,
    "vocab_size": vocab,
    "remat": remat,
    "param_dtype": param_dtype,
    "compute_dtype": "bfloat16",
    "scan_layers": scan_layers,
  }


def n_params(fields: dict) -> int:
  """The parameter count of the LLaMA of `model_fields` (from abstract shapes)."""
  from examples.llama.model import count_params  # pylint: disable=g-import-not-at-top

  return count_params(nnx.state(nnx.eval_shape(lambda: Llama(ModelConfig(**fields), nnx.Rngs(0)))))


def start_job(job: dict):
  """A worker's first part of a train-step job: (setup, compiled, row).

  Sets the job's compilation cache and attention, builds and compiles the `TrainSetup` (its
  progress reported); the row holds the attention, rank, compile times and memory analyses.
  """
  if job.get("compilation_cache"):
    jax.config.update("jax_compilation_cache_dir", job["compilation_cache"])
  cfg = ModelConfig(**job["model"])
  attention = attention_for(job["attention"], jax.devices()[0].platform, cfg.head_dim)
  use_attention(attention)
  setup = build(
    job["method"],
    cfg,
    batch=job["batch"],
    seq=job["seq"],
    rank=job["rank"],
    update_every=job.get("update_every", UPDATE_EVERY),
    state_dtype=job["state_dtype"],
    host_refresh=bool(job.get("host_refresh")),
  )
  progress(f"built ({attention} attention), compiling")
  compiled = compile_setup(setup)
  compile_s = {k: round(v, 2) for k, v in compiled.compile_s.items()}
  progress("compiled (" + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()) + ")")
  if job.get("hlo_dir"):
    write_hlo(compiled, job["hlo_dir"], f"{job['method']}_{job.get('size', 'model')}")
  analyses = {"step": memory_analysis(compiled.step)}
  if compiled.refresh is not None:
    analyses["refresh"] = memory_analysis(compiled.refresh)
  return (
    setup,
    compiled,
    {
      "attention": attention,
      "rank": setup.rank,
      "compile_s": compile_s,
      "memory_analysis": analyses,
    },
  )


def state_bytes(params, opt_state, frozen) -> dict:
  """The bytes of the trainable parameters, the frozen state and the optimizer state."""
  return {
    "trainable_param_bytes": nbytes(params),
    "frozen_bytes": nbytes(frozen),
    "opt_state_bytes": nbytes(opt_state),
    "opt_state_bytes_by_dtype": bytes_by_dtype(opt_state),
  }


def attention_for(requested: str, platform: str, head_dim: int) -> str:
  """ "cudnn" or "xla": auto picks cuDNN's flash attention on a GPU where it takes the head size.

  XLA's attention keeps b×heads×s×s tensors for the backward (benchmarks/rso_memory.py);
  cuDNN's does not, but needs a head dimension that is a multiple of 8 and at most 128 (the 3B
  ladder model's is 100).
  """
  if requested != "auto":
    return requested
  cudnn_ok = head_dim % 8 == 0 and head_dim <= 128
  return "cudnn" if platform == "gpu" and cudnn_ok else "xla"


def use_attention(implementation) -> None:
  """Makes the model's `jax.nn.dot_product_attention` calls use `implementation` (this
  process): "xla", "cudnn", or a function taking that function's arguments."""
  jax.nn.dot_product_attention = (
    implementation
    if callable(implementation)
    else functools.partial(_XLA_ATTENTION, implementation="cudnn")
    if implementation == "cudnn"
    else _XLA_ATTENTION
  )


def block_stack(
  hidden: int, ffn: int, heads: int, layers: int, remat: bool = False, seed: int = 0
) -> nnx.Module:
  """`layers` of the LLaMA example's `Block`s applied in sequence, as `Llama.__call__` does
  (bf16 compute, float32 parameters; `remat`: each block recomputed in the backward)."""
  cfg = ModelConfig(
    hidden=hidden,
    ffn=ffn,
    heads=heads,
    layers=layers,
    vocab_size=1,
    compute_dtype="bfloat16",
    param_dtype="float32",
    remat=remat,
  )

  class BlockStack(nnx.Module):
    def __init__(self, rngs):
      layer_list = getattr(nnx, "List", list)  # as examples/llama/model.py
      self.layers = layer_list([Block(cfg, rngs) for _ in range(layers)])

    def __call__(self, x):
      run = nnx.remat(lambda block, x: block(x)) if remat else (lambda block, x: block(x))
      for block in self.layers:
        x = run(block, x)
      return x

  return BlockStack(nnx.Rngs(seed))


def device_memory() -> dict:
  """{"bytes_limit", "peak_bytes_in_use"} of the default device; Nones where not reported."""
  stats = jax.devices()[0].memory_stats() or {}
  return {
    "bytes_limit": stats.get("bytes_limit"),
    "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
  }


def is_out_of_memory(error: BaseException) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


# ------------------------------------------------------------------ worker processes

_RESULT = "@@train_setups result "
_PROGRESS = "@@train_setups progress "
# A job's limit unless the caller gives one, on every platform: a 1B train step compiles and
# runs in about a minute on an H100/H200, so a worker past this is stuck (or on the wrong
# device) and is killed and recorded rather than holding the run and every job after it.
JOB_TIMEOUT_S = 300
# Lines of a worker's own output (stderr) kept for the record of a job that fails.
TAIL_LINES = 20
# After its last job a worker gets this long to exit (and the parent to drain its pipes).
EXIT_GRACE_S = 60
# Within a worker: the pipe its protocol lines go to (`_worker_main`); None elsewhere.
_channel = None


def progress(message: str) -> None:
  """Reports a phase of the running job ("compiled the step in 31.2 s").

  In a worker it goes to the parent at once, which echoes it (with the job's elapsed time) to
  its stderr and keeps the last one for a job that times out; elsewhere, to stderr.
  """
  if _channel is None:
    print(message, file=sys.stderr, flush=True)
    return
  _channel.write(_PROGRESS + " ".join(message.splitlines()) + "\n")
  _channel.flush()


def worker_env() -> dict:
  """The environment of a worker: the caller's, as the user set it before `prepare_parent`, and
  XLA_PYTHON_CLIENT_MEM_FRACTION 0.95 unless the user set one (JAX's default 0.75 would hide a
  quarter of the GPU from the step)."""
  env = dict(os.environ)
  original = env.pop("_TRAIN_SETUPS_PREALLOCATE", None)
  if original is not None:
    env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
    if original != "<unset>":
      env["XLA_PYTHON_CLIENT_PREALLOCATE"] = original
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  return env


def prepare_parent() -> None:
  """Keeps the calling (parent) process from preallocating GPU memory: call before JAX starts
  its backend. Workers get the user's setting back (`worker_env`)."""
  if "_TRAIN_SETUPS_PREALLOCATE" not in os.environ:
    os.environ["_TRAIN_SETUPS_PREALLOCATE"] = os.environ.get(
      "XLA_PYTHON_CLIENT_PREALLOCATE", "<unset>"
    )
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"


class Workers:
  """Runs jobs in ``python -m benchmarks.train_setups --worker`` processes; see the module doc.

  A job's ``run_job`` exception comes back as {"error", "out_of_memory"}, a dead worker as
  {"error", "returncode"}, a job past `timeout_s` as {"error", "timed_out", "last_progress"}
  (its worker killed, the next job gets a fresh one); failures carry ``output_tail`` (the last
  stderr lines), every result ``elapsed_s``. A worker's stdout carries only result and
  `progress` lines, the rest goes to its stderr; the parent drains both as they come (nothing
  waits in a pipe) and echoes them to its stderr; `log` gets a line as each job starts and ends.
  A worker runs on the parent's platform or not at all (JAX falls back to the CPU, with only a
  warning, where the GPU backend fails to start).
  """

  def __init__(
    self,
    isolate: bool,
    timeout_s: Optional[float] = JOB_TIMEOUT_S,
    log=print,
    platform: Optional[str] = None,
  ):
    self.isolate = isolate
    self.timeout_s = timeout_s
    self.log = log
    self.platform = platform or jax.devices()[0].platform
    self._cmd = [sys.executable, "-m", "benchmarks.train_setups", "--worker"]
    self._proc = None
    self._proc_returncode = None
    self._buffers = {}  # the worker's open pipes (fd) and their unfinished lines
    # The running job's: name, start, progress callback, last progress line, last stderr lines.
    self._label = ""
    self._start = 0.0
    self._on_progress = None
    self._last_progress = None
    self._tail = collections.deque(maxlen=TAIL_LINES)

  def run(self, job: dict, on_progress: Optional[Callable[[str], None]] = None) -> dict:
    """Runs `job` in a worker; `on_progress(message)` for each of its `progress` lines."""
    self._label = " ".join(str(job[k]) for k in ("method", "size") if k in job) or job["module"]
    self._on_progress = on_progress
    self._last_progress = None
    self._tail = collections.deque(maxlen=TAIL_LINES)
    self._start = time.monotonic()
    self._say(f"  [{self._label}] started")
    if self._proc is None or self._proc.poll() is not None:
      self._spawn()
    self._proc.stdin.write((json.dumps({**job, "platform": self.platform}) + "\n").encode())
    self._proc.stdin.flush()
    if self.isolate:
      self._proc.stdin.close()  # one job per process: it exits after this one
    deadline = None if self.timeout_s is None else self._start + self.timeout_s
    result = self._read(deadline)
    if result is None:  # the deadline
      self._proc.kill()
      self._finish()
      result = {
        "error": f"timed out after {self.timeout_s} s (worker killed); last progress:"
        f" {self._last_progress or 'none'}",
        "timed_out": True,
        "last_progress": self._last_progress,
      }
    elif self.isolate or "returncode" in result:
      self._finish()
    if "error" in result:
      result.setdefault("output_tail", list(self._tail))
    elapsed = time.monotonic() - self._start
    result["elapsed_s"] = round(elapsed, 1)
    status = "timed out" if result.get("timed_out") else "failed" if "error" in result else "done"
    self._say(f"  [{self._label}] {status} after {elapsed:.1f} s")
    return result

  def _say(self, line: str) -> None:
    self.log(line)
    sys.stdout.flush()

  def _spawn(self) -> None:
    self._proc = subprocess.Popen(
      self._cmd,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      cwd=ROOT,
      env=worker_env(),
    )
    self._buffers = {self._proc.stdout.fileno(): b"", self._proc.stderr.fileno(): b""}

  def _read(self, deadline) -> Optional[dict]:
    """Drains the worker's pipes until its result (returned), its exit (an error result) or
    the deadline (None)."""
    out = self._proc.stdout.fileno()
    while out in self._buffers:
      wait = None if deadline is None else max(0.0, deadline - time.monotonic())
      ready = select.select(list(self._buffers), [], [], wait)[0]
      if not ready:
        return None
      for fd in ready:
        result = self._take(fd)
        if result is not None:
          return result
    self._finish()  # stdout closed: the worker died; its stderr says why
    tail = "\n".join(list(self._tail)[-12:])
    return {
      "error": f"worker exited with status {self._proc_returncode}: {tail}",
      "returncode": self._proc_returncode,
      "out_of_memory": "RESOURCE_EXHAUSTED" in tail,
    }

  def _take(self, fd) -> Optional[dict]:
    """Reads what `fd` has, handles its complete lines; the result, if one came."""
    chunk = os.read(fd, 1 << 16)
    if not chunk:  # closed: the rest of its buffer is a last, unterminated line
      lines, rest = [self._buffers.pop(fd)], None
    else:
      *lines, rest = (self._buffers[fd] + chunk).split(b"\n")
      self._buffers[fd] = rest
    result = None
    is_stdout = self._proc is not None and fd == self._proc.stdout.fileno()
    for raw in filter(None, lines):
      text = raw.decode(errors="replace")
      if is_stdout and text.startswith(_RESULT):
        result = json.loads(text[len(_RESULT) :])
      elif is_stdout and text.startswith(_PROGRESS):
        self._last_progress = text[len(_PROGRESS) :]
        print(
          f"    [{self._label}] {self._last_progress}  ({time.monotonic() - self._start:.1f} s)",
          file=sys.stderr,
          flush=True,
        )
        if self._on_progress is not None:
          self._on_progress(self._last_progress)
      else:
        self._tail.append(text)
        print(f"    [{self._label}] {text}", file=sys.stderr, flush=True)
    return result

  def _finish(self) -> None:
    """Lets the worker exit (killing it after `EXIT_GRACE_S`), draining its pipes meanwhile."""
    proc = self._proc
    try:
      proc.stdin.close()
    except OSError:
      pass
    deadline = time.monotonic() + EXIT_GRACE_S
    while self._buffers:
      ready = select.select(list(self._buffers), [], [], max(0.0, deadline - time.monotonic()))
      if not ready[0]:
        break
      for fd in ready[0]:
        self._take(fd)
    if proc.poll() is None:
      proc.kill()
    self._proc_returncode = proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    self._buffers = {}
    self._proc = None

  def close(self) -> None:
    if self._proc is not None:
      self._finish()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _exit_with_parent(parent: int) -> None:
  """Ends this worker when its parent is gone (a worker left behind would hold the GPU)."""
  while os.getppid() == parent:
    time.sleep(2)
  os._exit(1)  # pylint: disable=protected-access


def _check_platform(expected: Optional[str]) -> None:
  """Raises unless this process runs on `expected`; reports the device it runs on."""
  device = jax.devices()[0]
  if expected and device.platform != expected:
    raise RuntimeError(
      f"the worker runs on {device.platform}, the parent on {expected}: JAX fell back after"
      f" its {expected} backend failed to start (the worker's stderr says why; a memory"
      f" fraction too large for what is free on the device is one cause)"
    )
  limit = device_memory()["bytes_limit"]
  progress(
    f"worker on {device.device_kind} ({device.platform})"
    + ("" if limit is None else f", bytes_limit {limit / 2**30:.1f} GiB")
  )


def _worker_main() -> None:
  """Reads one job per stdin line, answers one result line each (prefixed) on stdout."""
  global _channel
  # Only protocol lines go to the pipe the parent parses for them; whatever else is written to
  # fd 1 (print, C++ logging) joins stderr, which the parent echoes.
  _channel = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)
  sys.stdout.reconfigure(line_buffering=True)
  threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
  for line in sys.stdin:
    if not line.strip():
      continue
    job = json.loads(line)
    try:
      _check_platform(job.get("platform"))
      result = importlib.import_module(job["module"]).run_job(job)
    except Exception as e:  # pylint: disable=broad-except
      result = {
        "error": f"{type(e).__name__}: {str(e).splitlines()[0][:500] if str(e) else ''}",
        "out_of_memory": is_out_of_memory(e),
        "traceback": traceback.format_exc()[-3000:],
      }
    jax.clear_caches()
    _channel.write(_RESULT + json.dumps(result) + "\n")
    _channel.flush()


if __name__ == "__main__":
  if sys.argv[1:] != ["--worker"]:
    raise SystemExit("usage: python -m benchmarks.train_setups --worker  (jobs on stdin)")
  # Run as the importable module, not as __main__: the jobs' `progress` calls reach the
  # `_channel` of `benchmarks.train_setups`, the module they import.
  importlib.import_module("benchmarks.train_setups")._worker_main()
