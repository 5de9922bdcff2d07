"""`python -m examples.llama train`: the training loop, evaluation, metrics and checkpoints.

Every flag is a `TrainConfig` field. A run directory holds config.json, metrics.jsonl,
tensorboard/ (when tensorboardX or tensorboard is installed), checkpoints/ (Orbax), loss.png
(when matplotlib is installed) and summary.json. Without --run-dir a new run goes to
runs/<size>-<optimizer>, or to the first of runs/<size>-<optimizer>-2, -3, ... that is free.
"""

import argparse
import dataclasses
import json
import math
import os
import pathlib
import signal
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from examples.llama import compare, data, distributed, mesh, metrics, model, optimizers
from examples.llama.config import ConfigError, TrainConfig, model_config

# Flags that may differ from the saved config.json when resuming: none changes the trajectory.
RESUMABLE_FLAGS = (
    "resume", "run_dir", "data_dir", "c4_path", "tokenizer_path",
    "log_every", "eval_every", "checkpoint_every", "stop_at_step", "data_parallel", "fsdp",
    "shard_optimizer", "profile_steps", "compilation_cache",
    "num_processes", "process_id", "coordinator_address", "distributed_timeout",
)  # fmt: skip
EXIT_INTERRUPTED = 130


class _OneLineParser(argparse.ArgumentParser):
  """Reports a bad flag in one line, not usage + error."""

  def error(self, message):
    self.exit(2, f"error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
  """One flag per TrainConfig field; flags not given stay absent so --resume can tell them apart."""
  p = _OneLineParser(
    prog="python -m examples.llama train",
    description="Pretrain a LLaMA with AdamW or a subspace optimizer.",
    argument_default=argparse.SUPPRESS,
  )
  for field in dataclasses.fields(TrainConfig):
    flag = "--" + field.name.replace("_", "-")
    help_text = f"{field.metadata['help']} (default: {field.default})".replace("%", "%%")
    if field.type is bool:
      p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
    else:
      p.add_argument(flag, type=field.type, help=help_text, metavar=field.type.__name__.upper())
  return p


def free_run_dir(base: str) -> str:
  """`base`, or the first of base-2, base-3, ... that does not exist or is an empty folder."""
  candidate, number = pathlib.Path(base), 1
  while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
    number += 1
    candidate = pathlib.Path(f"{base}-{number}")
  return str(candidate)


def resolve_config(given: dict) -> tuple[TrainConfig, dict | None]:
  """The run's config, and the saved config.json when resuming (its flags fill the rest).

  A new run without --run-dir gets a free folder (`free_run_dir`), so the default command can
  run again and again; an explicit --run-dir that holds a run is refused without --resume.
  """
  cfg = TrainConfig(**given)
  if not cfg.resume:
    cfg.validate()
    if not cfg.run_dir:
      cfg = dataclasses.replace(cfg, run_dir=free_run_dir(cfg.default_run_dir()))
    return cfg, None
  config_file = pathlib.Path(cfg.resolved_run_dir()) / "config.json"
  if not config_file.exists():
    raise ConfigError(f"nothing to resume: no {config_file}; drop --resume to start a new run")
  saved = json.loads(config_file.read_text())
  for name, value in given.items():
    if name not in RESUMABLE_FLAGS and saved["flags"].get(name) != value:
      flag = "--" + name.replace("_", "-")
      raise ConfigError(
        f"{flag} {value} differs from {saved['flags'].get(name)} in {config_file}; "
        f"drop {flag} to resume, or start a new --run-dir"
      )
  # What one process (or one launch of the processes) asked for, not the run; and where the run
  # is: the folder resumed from.
  once = (
    "stop_at_step",
    "profile_steps",
    "num_processes",
    "process_id",
    "coordinator_address",
    "distributed_timeout",
    "run_dir",
  )
  inherited = {k: v for k, v in saved["flags"].items() if k not in once}
  cfg = TrainConfig(**{**inherited, **given})
  cfg.validate()
  return cfg, saved


def model_flops_per_token(mcfg, seq_len: int, n_params: int) -> float:
  """6·N for the matmuls (embedding lookups excluded) + 12·layers·hidden·seq for attention
  (Kaplan et al., arXiv 2001.08361, Table 1; counted without causal halving, as MaxText does).
  """
  matmul_params = n_params - mcfg.vocab_size * mcfg.hidden
  return 6 * matmul_params + 12 * mcfg.layers * mcfg.hidden * seq_len


class _Clock:
  """Times training steps only: compilation, evaluation and checkpoints are left out."""

  def __init__(self):
    self.since, self.steps, self.seconds = None, 0, 0.0
    self.total_steps, self.total_seconds = 0, 0.0

  def start(self):
    self.since = time.perf_counter()

  def stop(self):
    if self.since is not None:
      self.seconds += time.perf_counter() - self.since
      self.since = None

  def tick(self):
    self.steps += 1

  def lap(self) -> tuple[int, float]:
    """(steps, seconds) since the last lap; call after the device has caught up."""
    self.stop()
    lap = (self.steps, self.seconds)
    self.total_steps += self.steps
    self.total_seconds += self.seconds
    self.steps, self.seconds = 0, 0.0
    self.start()
    return lap


def _model_loss(llama, batch):
  """Mean next-token cross-entropy of `llama` on windows (batch, seq + 1)."""
  logits = llama(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def _merged(graphdef, params, frozen=None):
  if frozen is None:
    return nnx.merge(graphdef, params)
  # copy=True: under nnx.remat the blocks write their Variables back, and without a copy the
  # frozen ones would be the enclosing jit's, which NNX refuses to update from the gradient's
  # trace (optax_subspace.nn.rso's docstring).
  return nnx.merge(graphdef, params, frozen, copy=True)


def _loss(params, graphdef, batch, frozen=None):
  return _model_loss(_merged(graphdef, params, frozen), batch)


def _on_mesh(jitted, mesh):
  """`jitted`, traced under `mesh` so the model can pin its activations to the batch axes."""
  if mesh is None:
    return jitted

  def call(*args):
    with jax.set_mesh(mesh):
      return jitted(*args)

  return call


def jit_train_step(
  graphdef,
  tx,
  shardings=(None, None, None),
  frozen_shardings=None,
  update_shardings=None,
  grad_accum=1,
):
  """The jitted step of `make_train_step`, to call or `.lower` under `jax.set_mesh(mesh)`.

  ``(params, opt_state, batch, frozen, refresh[, accumulated])``; `refresh` is static.
  `update_shardings` (ZeRO-1, `mesh.update_shardings`): the gradient is split by them before the
  update, so XLA reduce-scatters it (rather than all-reducing it whole) and each device runs the
  update on its share of the state; the new weights leave the step replicated (`shardings`' own),
  which all-gathers them. `grad_accum` > 1: the step takes `accumulated`, the float32 sum of the
  other micro-batches' gradients (`make_accumulate`), and updates with the mean of all of them.
  """

  def train_step(params, opt_state, batch, frozen, refresh=None, accumulated=None):
    loss, grads = jax.value_and_grad(_loss)(params, graphdef, batch, frozen)
    if accumulated is not None:
      grads = jax.tree.map(
        lambda a, g: ((a + g.astype(jnp.float32)) / grad_accum).astype(g.dtype),
        accumulated,
        grads,
      )
    if update_shardings is not None:
      grads = jax.lax.with_sharding_constraint(grads, update_shardings)
    extra = {} if refresh is None else {"subspace_refresh": refresh}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  psh, ssh, bsh = shardings
  if psh is None:
    return jax.jit(train_step, donate_argnums=(0, 1), static_argnums=4)
  in_shardings = (psh, ssh, bsh, frozen_shardings)
  if grad_accum > 1:
    in_shardings += (update_shardings or psh,)
  return jax.jit(
    train_step,
    in_shardings=in_shardings,
    out_shardings=(psh, ssh, None),
    donate_argnums=(0, 1),  # not `accumulated`: no output has its shapes and dtypes left
    static_argnums=4,
  )


def make_train_step(
  graphdef,
  tx,
  shardings=(None, None, None),
  frozen_shardings=None,
  update_shardings=None,
  grad_accum=1,
):
  """(params, opt_state, batch[, frozen, refresh, accumulated]) -> (params, opt_state, loss),
  jitted, state donated: one optimizer step.

  `shardings` (params, opt_state, batch) place the step on a mesh; Nones: one device. `frozen`,
  the model-level methods' non-Param state (`frozen_shardings` on a mesh), is an input only: the
  step differentiates the Params alone, so no weight gradient of a replaced layer exists.
  `update_shardings`: ZeRO-1 (`jit_train_step`). `refresh` (static: one program per value):
  `optimizers.refresh_due` of the step, the subspace methods' `subspace_refresh`; None: decided
  on the device. `grad_accum` > 1: `accumulated` is `make_accumulate`'s sum over the step's
  other micro-batches, and `batch` its last micro-batch.
  """
  step = jit_train_step(graphdef, tx, shardings, frozen_shardings, update_shardings, grad_accum)
  step = _on_mesh(step, None if shardings[2] is None else shardings[2].mesh)
  if grad_accum > 1:
    return lambda params, opt_state, batch, frozen=None, refresh=None, accumulated=None: step(
      params, opt_state, batch, frozen, refresh, accumulated
    )
  return lambda params, opt_state, batch, frozen=None, refresh=None: step(
    params, opt_state, batch, frozen, refresh
  )


def make_accumulate(
  graphdef, shardings=(None, None, None), frozen_shardings=None, update_shardings=None
):
  """(params, accumulated, batch[, frozen]) -> (accumulated + this batch's gradient, loss).

  The micro-batches of a step but its last (`--grad-accum`): their gradients summed in float32,
  `accumulated` None for the first (its own program), donated after. The optimizer runs once per
  step, in the train step of the last micro-batch; `optax.MultiSteps`, used before, runs the
  whole update on every micro-batch and keeps the last one's result (a `jnp.where`, optax
  0.2.8). On a mesh the sum is kept as ZeRO-1 splits the gradient (`update_shardings`), else
  like the parameters.
  """

  def accumulate(params, accumulated, batch, frozen):
    loss, grads = jax.value_and_grad(_loss)(params, graphdef, batch, frozen)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    if accumulated is not None:
      grads = jax.tree.map(jnp.add, accumulated, grads)
    return grads, loss

  psh, _, bsh = shardings
  if psh is None:
    first = jax.jit(lambda params, batch, frozen: accumulate(params, None, batch, frozen))
    more = jax.jit(accumulate, donate_argnums=1)
  else:
    ash = update_shardings or psh
    first = jax.jit(
      lambda params, batch, frozen: accumulate(params, None, batch, frozen),
      in_shardings=(psh, bsh, frozen_shardings),
      out_shardings=(ash, None),
    )
    more = jax.jit(
      accumulate,
      in_shardings=(psh, ash, bsh, frozen_shardings),
      out_shardings=(ash, None),
      donate_argnums=1,
    )
  mesh = None if shardings[2] is None else shardings[2].mesh
  first, more = _on_mesh(first, mesh), _on_mesh(more, mesh)

  def call(params, accumulated, batch, frozen=None):
    if accumulated is None:
      return first(params, batch, frozen)
    return more(params, accumulated, batch, frozen)

  return call


def _compiled(function, mesh, donate, in_shardings, out_shardings, *args):
  """`function` jitted and compiled for `args` ahead of the loop (traced under `mesh`).

  The merge and the refresh run every K steps between train steps, and the loop times them
  with the steps; compiling them here keeps their first compilation out of that time.
  """
  if mesh is None:
    return jax.jit(function, donate_argnums=donate).lower(*args).compile()
  jitted = jax.jit(
    function, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate
  )
  with jax.set_mesh(mesh):
    return jitted.lower(*args).compile()


def make_rso_merge(graphdef, params, frozen, shardings=(None, None, None, None)):
  """(params, frozen) -> (params, frozen) after `optax_subspace.nn.merge_and_redraw`, compiled.

  Every RsoLinear ends its subproblem: W <- W + P·B, B <- 0, k <- k + 1 and P <- P_{k+1} (Chen
  et al., arXiv:2502.07222, the outer loop). The loop calls it after updates K, 2K, … (as
  `nn.merge_if_due` does), and `nn.rso_optimizer` restarts B's Adam at the very next update.
  """
  merge_and_redraw = optimizers.model_level_function("rso_model", "merge_and_redraw")
  psh, _, bsh, fsh = shardings

  def merge(params, frozen):
    llama = _merged(graphdef, params, frozen)
    merge_and_redraw(llama)
    _, params, frozen = nnx.split(llama, nnx.Param, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)

  mesh = None if bsh is None else bsh.mesh
  return _compiled(merge, mesh, (0, 1), (psh, fsh), (psh, fsh), params, frozen)


def make_grass_refresh(
  graphdef, tx, params, opt_state, frozen, batch_shape, shardings=(None, None, None, None)
):
  """(params, opt_state, frozen, step, batch) -> (params, opt_state, frozen), compiled.

  `optax_subspace.nn.grass_refresh` for an optimizer step that is a multiple of K, before that
  step's update and on its batch (Muhamed et al., arXiv:2406.17660): D folded into W, one forward
  and backward pass that keeps only each layer's column norms of dW, the new top-r selection,
  and D's Adam moments zeroed where it moved. grass_refresh works on an `nnx.Optimizer`: one is
  built around the model here and given this run's optax state and step count.
  """
  grass_refresh = optimizers.model_level_function("grass_model", "grass_refresh")
  psh, ssh, bsh, fsh = shardings
  treedef = jax.tree.structure(opt_state)

  def refresh(params, opt_state, frozen, step, batch):
    llama = _merged(graphdef, params, frozen)
    optimizer = nnx.Optimizer(llama, tx, wrt=nnx.Param)
    nnx.update(optimizer.opt_state, nnx.state(opt_state))
    optimizer.step[...] = step
    grass_refresh(llama, optimizer, _model_loss, batch)
    _, params, frozen = nnx.split(llama, nnx.Param, ...)
    # The optimizer keeps the state in NNX containers; the loop's is plain optax, same leaves.
    opt_state = treedef.unflatten(jax.tree.leaves(nnx.as_pure(optimizer.opt_state)))
    return nnx.to_pure_dict(params), opt_state, nnx.to_pure_dict(frozen)

  mesh = None if bsh is None else bsh.mesh
  step = jax.ShapeDtypeStruct((), jnp.uint32)
  batch = jax.ShapeDtypeStruct(batch_shape, jnp.int32)
  replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
  compiled = _compiled(
      refresh, mesh, (0, 1, 2), (psh, ssh, fsh, replicated, bsh), (psh, ssh, fsh),
      params, opt_state, frozen, step, batch,
  )  # fmt: skip

  def call(params, opt_state, frozen, step, batch):
    if not isinstance(batch, jax.Array):  # with several processes, already the global batch
      batch = np.asarray(batch, np.int32)
      if mesh is not None:
        batch = jax.device_put(batch, bsh)
    return compiled(params, opt_state, frozen, jnp.asarray(step, jnp.uint32), batch)

  return call


def make_eval(graphdef, windows: np.ndarray, batch_size: int):
  """(params[, frozen]) -> mean next-token loss over the held-out windows (padded to batches)."""
  n = windows.shape[0]
  padded = -(-n // batch_size) * batch_size
  rows = np.concatenate([windows, np.zeros((padded - n, windows.shape[1]), windows.dtype)])
  weights = (np.arange(padded) < n).astype(np.float32)

  @jax.jit
  def summed_loss(params, frozen, batch, weight):
    logits = _merged(graphdef, params, frozen)(batch[:, :-1])
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(axis=1)
    return jnp.sum(per_row * weight)

  def evaluate(params, frozen=None) -> float:
    total = sum(
      summed_loss(params, frozen, rows[i : i + batch_size], weights[i : i + batch_size])
      for i in range(0, padded, batch_size)
    )
    return float(total) / n

  return evaluate


class _Interrupts:
  """The first Ctrl-C asks the loop to checkpoint and stop after the current step; a second one
  stops at once."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      if self.requested:
        raise KeyboardInterrupt
      self.requested = True

    self._previous = signal.signal(signal.SIGINT, handler)
    return self

  def __exit__(self, *exc):
    signal.signal(signal.SIGINT, self._previous)


def _checkpoint_manager(run_dir: pathlib.Path) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  return ocp.CheckpointManager(run_dir.absolute() / "checkpoints", options=options)


def _without_empty(tree):
  # Orbax refuses zero-size arrays (optax.contrib.galore keeps (0, 0) projectors for the leaves
  # it does not project): they are stored as None and rebuilt from the template on restore.
  return jax.tree.map(lambda leaf: None if leaf.size == 0 else leaf, tree)


def _with_empty(template, restored):
  # None nodes of the template (RSO's and GRASS's states hold some) count as leaves on both
  # sides, or every leaf after one would take its neighbour's place.
  is_none = lambda leaf: leaf is None
  leaves, treedef = jax.tree.flatten(template, is_leaf=is_none)
  stored = jax.tree.flatten(restored, is_leaf=is_none)[0]
  return treedef.unflatten([t if s is None else s for t, s in zip(leaves, stored)])


def _save(manager, step, params, opt_state, meta, frozen=None) -> None:
  """Saves the run's state; `frozen` is the model-level methods' non-Param state (frozen W,
  RSO's P and subproblem index, GRASS's selection and key), which a resume needs as well."""
  items = dict(
    params=ocp.args.StandardSave(params),
    opt_state=ocp.args.StandardSave(_without_empty(opt_state)),
    meta=ocp.args.JsonSave(meta),
  )
  if frozen is not None:
    items["frozen"] = ocp.args.StandardSave(frozen)
  manager.save(step, args=ocp.args.Composite(**items), force=True)
  manager.wait_until_finished()


def _restore(manager, params, opt_state, frozen=None):
  """(params, opt_state, meta, frozen) of the latest checkpoint, in the templates' structure."""
  items = dict(
    params=ocp.args.StandardRestore(params),
    opt_state=ocp.args.StandardRestore(_without_empty(opt_state)),
    meta=ocp.args.JsonRestore(),
  )
  if frozen is not None:
    items["frozen"] = ocp.args.StandardRestore(frozen)
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(**items))
  return (
    restored.params,
    _with_empty(opt_state, restored.opt_state),
    restored.meta,
    None if frozen is None else restored.frozen,
  )


def _tokenizer_record(tokenizer) -> dict:
  return {
    "name": tokenizer.name,
    "vocab_size": tokenizer.vocab_size,
    "fingerprint": tokenizer.fingerprint,
  }


def _check_run_dir(cfg: TrainConfig, saved: dict | None, tokenizer) -> None:
  run_dir = pathlib.Path(cfg.resolved_run_dir())
  checkpoints = run_dir / "checkpoints"
  has_checkpoint = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
  if saved is None:
    if has_checkpoint:
      raise ConfigError(
        f"{run_dir} already holds a run; pass --resume to continue it, or pick another --run-dir"
      )
    return
  if not has_checkpoint:
    raise ConfigError(
      f"no checkpoint in {checkpoints} to resume; drop --resume to start the run again"
    )
  if saved["tokenizer"] != _tokenizer_record(tokenizer):
    raise ConfigError(
      f"tokenizer {_tokenizer_record(tokenizer)} does not match the checkpoint's "
      f"{saved['tokenizer']} in {run_dir}; restore that tokenizer, or start a new --run-dir"
    )


def _print_config(cfg, mcfg, dataset, n_params, n_trainable, sizes, run_dir) -> None:
  flags = " ".join(f"{key}={value}" for key, value in cfg.flags().items())
  print(f"config ({run_dir / 'config.json'}):")
  print(textwrap.fill(flags, width=100, initial_indent="  ", subsequent_indent="  "))
  print(f"data: {dataset.description}")
  print(
    f"model: {cfg.model_size} ({mcfg.hidden}/{mcfg.ffn}/{mcfg.heads}/{mcfg.layers}), "
    f"{n_params:,} parameters"
    f"{f' ({n_trainable:,} trainable)' if n_trainable != n_params else ''}, "
    f"compute {mcfg.compute_dtype}, parameters {mcfg.param_dtype}, remat {mcfg.remat}"
  )
  print(
    f"optimizer: {cfg.optimizer}, peak lr {cfg.effective_lr():g}"
    + (f" (unprojected leaves {cfg.lr_unprojected:g})" if cfg.lr_unprojected else "")
    + ", "
    f"warm-up {cfg.effective_warmup()} steps, "
    f"state {sizes['opt_state_bytes']:,} bytes; device {jax.devices()[0].device_kind}"
    f" × {cfg.data_parallel * cfg.fsdp} (data {cfg.data_parallel}, fsdp {cfg.fsdp}"
    f"{', optimizer state split over data' if cfg.shard_optimizer else ''})"
  )
  print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS') or '(none)'}")


class _NoLog:
  """The metrics log of a process other than 0: process 0 writes the run's records."""

  def write(self, record):
    pass

  def close(self):
    pass


def _write_steps(log, pending) -> float:
  """Writes the records of `pending` (fetching their losses and learning rates); the last loss."""
  loss = float("nan")
  for step, tokens, lr, losses in pending:
    losses, lr = jax.device_get((losses, lr))
    loss = float(np.mean(losses))
    log.write({"kind": "train", "step": step, "tokens": tokens, "loss": loss, "lr": float(lr)})
  pending.clear()
  return loss


def train(cfg: TrainConfig, saved: dict | None) -> dict:
  """Runs (or resumes) the training run of `cfg`; returns its summary."""
  started = time.perf_counter()
  if cfg.compilation_cache:
    # Read when JAX first compiles with the cache, so before anything here compiles; programs
    # compiling in under a second are not worth a file (JAX's default threshold).
    jax.config.update("jax_compilation_cache_dir", cfg.compilation_cache)
  dataset = data.load_dataset(cfg)
  tokenizer = dataset.tokenizer
  _check_run_dir(cfg, saved, tokenizer)
  mcfg = model_config(
    cfg.model_size,
    tokenizer.vocab_size,
    compute_dtype=cfg.compute_dtype,
    param_dtype="bfloat16" if cfg.pure_bf16 else "float32",
    remat=cfg.remat,
    scan_layers=cfg.scan_layers,
  )
  tx = optimizers.build(cfg)  # raises ConfigError for a missing library
  model_level = cfg.optimizer in optimizers.MODEL_LEVEL
  llama = model.Llama(mcfg, nnx.Rngs(cfg.seed))
  # The unmodified model's size: what the FLOPs per token are counted from, for every method.
  model_params = model.count_params(nnx.state(llama, nnx.Param))
  frozen = None
  distributed.check_mesh(cfg)
  try:
    device_mesh = mesh.make_mesh(cfg.data_parallel, cfg.fsdp)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  try:
    if model_level:
      # Module surgery: the selected layers now train a small factor beside a frozen kernel.
      optimizers.apply_layers(cfg, llama)
      graphdef, state, rest = nnx.split(llama, nnx.Param, ...)
      frozen = nnx.to_pure_dict(rest)
    else:
      graphdef, state = nnx.split(llama)
    params = nnx.to_pure_dict(state)
    opt_state = tx.init(params)
    shard_optimizer = cfg.shard_optimizer and device_mesh is not None
    dims = optimizers.matrix_dims(cfg)
    shardings = mesh.shardings(device_mesh, params, tx, mcfg.hidden, frozen, shard_optimizer, dims)
    update_shardings = (
      mesh.update_shardings(device_mesh, params, mcfg.hidden, frozen, tx, dims)
      if shard_optimizer
      else None
    )
  except ValueError as error:  # an optimizer's own check of its settings against the shapes
    raise ConfigError(f"--optimizer {cfg.optimizer}: {error}") from None
  del llama  # its arrays live on in params and frozen until `place` moves them
  params, opt_state = mesh.place(params, shardings[0]), mesh.place(opt_state, shardings[1])
  if model_level:
    frozen = mesh.place(frozen, shardings[3])
  # Every weight once: the trainable Params (for the model-level methods: the factors B or D and
  # the dense Params) and each replaced layer's frozen kernel W; not P, σ, ρ or keys.
  n_trainable = model.count_params(params)
  n_params = n_trainable + optimizers.frozen_weight_count(frozen)
  # The gradient accumulator of --grad-accum (float32, like the Params) lives within a step.
  sizes = {
    **optimizers.state_bytes(opt_state),
    "grad_accum_bytes": 4 * n_trainable if cfg.grad_accum > 1 else 0,
  }

  # Every input has been checked: from here on the run directory is written.
  run_dir = pathlib.Path(cfg.resolved_run_dir())
  run_dir.mkdir(parents=True, exist_ok=True)
  primary = jax.process_index() == 0  # the one process that writes the run's files
  if saved is None and primary:
    record = {
      "flags": cfg.flags(),
      "model": dataclasses.asdict(mcfg),
      "tokenizer": _tokenizer_record(tokenizer),
      "data": dataset.description,
      "params": n_params,
      "trainable_params": n_trainable,
      "rank": cfg.effective_rank(),
      "lr": cfg.effective_lr(),
      "warmup_steps": cfg.effective_warmup(),
      **sizes,
    }
    (run_dir / "config.json").write_text(json.dumps(record, indent=1) + "\n")
  _print_config(cfg, mcfg, dataset, n_params, n_trainable, sizes, run_dir)

  manager = _checkpoint_manager(run_dir)
  step, position, tokens = 0, 0, 0
  if saved is not None:
    params, opt_state, meta, frozen = _restore(manager, params, opt_state, frozen)
    step, position, tokens = meta["step"], meta["data_position"], meta["tokens"]
    print(f"resumed from step {step} (data position {position})")

  frozen_shardings = shardings[3] if model_level else None
  train_step = make_train_step(
    graphdef, tx, shardings[:3], frozen_shardings, update_shardings, cfg.grad_accum
  )
  accumulate = (
    make_accumulate(graphdef, shardings[:3], frozen_shardings, update_shardings)
    if cfg.grad_accum > 1
    else None
  )
  merge = refresh = None
  if cfg.optimizer == "rso_model":
    merge = make_rso_merge(graphdef, params, frozen, shardings)
  if cfg.optimizer == "grass_model":
    batch_shape = (cfg.micro_batch_size, cfg.seq_len + 1)
    refresh = make_grass_refresh(graphdef, tx, params, opt_state, frozen, batch_shape, shardings)
  evaluate = make_eval(graphdef, dataset.eval_windows, cfg.micro_batch_size)
  rows = None  # several processes: each loads only its devices' rows of every batch
  if jax.process_count() > 1:
    batch_shape = (cfg.micro_batch_size, cfg.seq_len + 1)
    rows = distributed.local_rows(shardings[2], batch_shape)
    print(
      f"data: process {jax.process_index()} of {jax.process_count()} loads rows "
      f"{rows.start}..{rows.stop - 1} of each batch of {cfg.micro_batch_size}"
    )
  batches = dataset.train_batches(cfg.micro_batch_size, position, rows)
  # Jitted, and its value fetched with the step's loss at the next log: a float() of it here
  # would wait for the step queued before it on the device, a sync per step that leaves the
  # host's dispatch of the next step (its ~1,000 state arrays, per device) out of the overlap.
  lr_at = jax.jit(optimizers.schedule(cfg))
  flops_per_token = model_flops_per_token(mcfg, cfg.seq_len, model_params)
  log = metrics.MetricsLog(run_dir, step if saved is not None else None) if primary else _NoLog()
  progress = metrics.Progress(cfg.steps, step)
  clock = _Clock()
  pending = []
  last_eval = None
  profile_until = 0  # the step after which the trace of --profile-steps stops (0: none running)
  profiled = None  # (first, last) step the trace holds
  compiled = set()  # the train-step programs (`refresh` values) this process has run
  # Where this process's wall time goes (summary.json "seconds"): the training steps that
  # tokens/s counts are the clock's; the rest is set-up, compiling steps, evaluations, saves.
  spent = {
    "setup": time.perf_counter() - started,
    "compiling_steps": 0.0,
    "eval": 0.0,
    "checkpoint": 0.0,
  }

  def run_eval():
    eval_loss = evaluate(params, frozen)
    entry = {
      "kind": "eval",
      "step": step,
      "tokens": tokens,
      "eval_loss": eval_loss,
      "eval_ppl": math.exp(min(eval_loss, 50.0)),
    }
    log.write(entry)
    progress.say(f"eval step {step} | loss {eval_loss:.4f} | perplexity {entry['eval_ppl']:.2f}")
    return entry

  selected_rows = {}  # grass: per projected leaf, the rows any selection of this process trained
  exit_code = 0
  with _Interrupts() as interrupts:
    while step < cfg.steps:
      # Refresh steps and steady steps are two programs (`make_train_step`'s `refresh`); the first
      # call of each in this process compiles, so it is left out of the timed steps.
      due = optimizers.refresh_due(cfg, opt_state, step)
      compiles = due not in compiled
      if compiles and clock.since is not None:
        _write_steps(log, pending)  # the device has caught up: the steps before it are timed
        clock.stop()
      step_started = time.perf_counter()
      if cfg.profile_steps and not (compiles or profiled or profile_until):
        jax.block_until_ready((params, opt_state))  # the trace holds the traced steps' kernels
        jax.profiler.start_trace(str(run_dir / "profile"), create_perfetto_trace=True)
        profile_until, profiled = step + cfg.profile_steps, (step + 1, step + cfg.profile_steps)
      losses, accumulated = [], None
      for micro in range(cfg.grad_accum):
        batch = next(batches)
        if rows is not None:  # this process's rows, as a part of the global batch
          batch = jax.make_array_from_process_local_data(shardings[2], batch, batch_shape)
        if refresh is not None and micro == 0 and step % cfg.update_every == 0:
          # GRASS selects before updates 0, K, 2K, … from that step's (first) batch.
          params, opt_state, frozen = refresh(params, opt_state, frozen, step, batch)
        if micro < cfg.grad_accum - 1:
          accumulated, loss = accumulate(params, accumulated, batch, frozen)
        elif accumulated is None:
          params, opt_state, loss = train_step(params, opt_state, batch, frozen, due)
        else:
          params, opt_state, loss = train_step(params, opt_state, batch, frozen, due, accumulated)
        losses.append(loss)
      compiled.add(due)
      if due and cfg.optimizer == "grass":  # a new selection: which rows it trains (host read)
        optimizers.mark_selected_rows(opt_state, selected_rows)
      step += 1
      if merge is not None and step % cfg.update_every == 0:
        # RSO's subproblem ends after updates K, 2K, …: merge and draw the next P.
        params, frozen = merge(params, frozen)
      tokens += cfg.tokens_per_step
      pending.append((step, tokens, lr_at(step - 1), losses))
      if compiles:  # time from its end
        _write_steps(log, pending)
        spent["compiling_steps"] += time.perf_counter() - step_started
        clock.start()
      else:
        clock.tick()
      progress.bar(step)
      if step % cfg.log_every == 0 or step == cfg.steps:
        loss = _write_steps(log, pending)
        counted, seconds = clock.lap()
        if counted:
          tps = counted * cfg.tokens_per_step / seconds
          progress.log(step, loss, tps, tps * flops_per_token / 1e12, seconds / counted)
      stop = interrupts.requested or step == cfg.stop_at_step
      if profile_until and (step >= profile_until or step == cfg.steps or stop):
        jax.block_until_ready((params, opt_state))  # the traced steps' kernels, whole
        jax.profiler.stop_trace()
        profile_until, profiled = 0, (profiled[0], step)
      wants_eval = cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.steps
      wants_checkpoint = (
        cfg.checkpoint_every and step % cfg.checkpoint_every == 0 or step == cfg.steps
      )
      if wants_eval or wants_checkpoint or stop:
        _write_steps(log, pending)
        clock.stop()
        if wants_eval:
          eval_started = time.perf_counter()
          last_eval = run_eval()
          spent["eval"] += time.perf_counter() - eval_started
        if wants_checkpoint or stop:
          meta = {"step": step, "data_position": batches.position, "tokens": tokens}
          save_started = time.perf_counter()
          _save(manager, step, params, opt_state, meta, frozen)
          spent["checkpoint"] += time.perf_counter() - save_started
        clock.start()
      if stop:
        why = "interrupted" if interrupts.requested else f"stopped at --stop-at-step {step}"
        progress.say(
          f"{why}: checkpoint saved at step {step}; continue with --resume --run-dir {run_dir}"
        )
        exit_code = EXIT_INTERRUPTED if interrupts.requested else 0
        break
  if step == cfg.steps and (last_eval is None or last_eval["step"] != step):
    last_eval = run_eval()  # before the log closes: a resumed, finished run evaluates here
  progress.close()
  has_tensorboard = getattr(log, "tensorboard", None) is not None
  log.close()
  manager.close()

  timed = clock.total_steps * cfg.tokens_per_step
  summary = {
    "run": str(run_dir),
    "optimizer": cfg.optimizer,
    "rank": None if cfg.optimizer == "adamw" else cfg.effective_rank(),
    "model_size": cfg.model_size,
    "steps": step,
    "tokens": tokens,
    "params": n_params,
    "trainable_params": n_trainable,
    "tokens_per_s": timed / clock.total_seconds if clock.total_seconds else None,
    "timed_steps": clock.total_steps,
    "profiled_steps": profiled,
    **optimizers.selected_rows_summary(selected_rows),
    **sizes,
    "exit_code": exit_code,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "seconds": {
      **{k: round(v, 6) for k, v in spent.items()},
      "timed_steps": round(clock.total_seconds, 6),
      "total": round(time.perf_counter() - started, 6),
    },
  }
  if step == cfg.steps:
    summary.update(final_eval_loss=last_eval["eval_loss"], final_eval_ppl=last_eval["eval_ppl"])
    if primary:
      (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(
      f"final eval perplexity: {last_eval['eval_ppl']:.2f} (loss {last_eval['eval_loss']:.4f}) "
      f"after {step} steps, {tokens:,} tokens"
    )
  if primary:
    _report_outputs(run_dir, step, has_tensorboard, finished=step == cfg.steps)
  return summary


def _report_outputs(run_dir: pathlib.Path, step: int, has_tensorboard: bool, finished: bool):
  """Draws run_dir/loss.png and prints where the run's files are."""
  plot = run_dir / "loss.png"
  drew = compare.plot([compare.load_run(run_dir)], plot)
  print(f"run directory: {run_dir}")
  tensorboard = f" (TensorBoard: {run_dir / 'tensorboard'})" if has_tensorboard else ""
  print(f"  metrics: {run_dir / 'metrics.jsonl'}{tensorboard}")
  print(f"  checkpoints: {run_dir / 'checkpoints'} (latest: step {step})")
  if drew:
    print(f"  loss plot: {plot}")
  else:
    print("  loss plot: none, matplotlib is not installed (pip install matplotlib)")
  if finished:
    print(f"  summary: {run_dir / 'summary.json'}")


def main(argv=None) -> int:
  """Parses flags and trains; a bad input prints one line to stderr and returns 2."""
  given = vars(parser().parse_args(argv))
  try:
    cfg, saved = resolve_config(given)
    if not cfg.resume and "run_dir" not in given and cfg.run_dir != cfg.default_run_dir():
      print(f"{cfg.default_run_dir()} holds a run: this run goes to {cfg.run_dir}")
    distributed.initialize(cfg)  # before anything asks JAX for devices
    summary = train(cfg, saved)
  except ConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted before a checkpoint could be saved", file=sys.stderr)
    return EXIT_INTERRUPTED
  return summary["exit_code"]
