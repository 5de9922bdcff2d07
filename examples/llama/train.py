"""`python -m examples.llama train`: the training loop, evaluation, metrics and checkpoints.

Every flag is a `TrainConfig` field. A run directory holds config.json, metrics.jsonl,
tensorboard/ (when tensorboardX or tensorboard is installed), checkpoints/ (Orbax) and summary.json.
"""

import argparse
import dataclasses
import json
import math
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

from examples.llama import data, mesh, metrics, model, optimizers
from examples.llama.config import ConfigError, TrainConfig, model_config

# Flags that may differ from the saved config.json when resuming: none changes the trajectory.
RESUMABLE_FLAGS = (
    "resume", "run_dir", "data_dir", "c4_path", "tokenizer_path",
    "log_every", "eval_every", "checkpoint_every", "stop_at_step", "data_parallel", "fsdp",
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


def resolve_config(given: dict) -> tuple[TrainConfig, dict | None]:
  """The run's config, and the saved config.json when resuming (its flags fill the rest)."""
  cfg = TrainConfig(**given)
  if not cfg.resume:
    cfg.validate()
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
  inherited = {k: v for k, v in saved["flags"].items() if k != "stop_at_step"}
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


def _loss(params, graphdef, batch):
  logits = nnx.merge(graphdef, params)(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def make_train_step(graphdef, tx, shardings=(None, None, None)):
  """(params, opt_state, batch) -> (params, opt_state, loss), jitted with donated state.

  `shardings` (params, opt_state, batch) place the step on a mesh; Nones: one device.
  """

  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(_loss)(params, graphdef, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  psh, ssh, bsh = shardings
  if psh is None:
    return jax.jit(train_step, donate_argnums=(0, 1))
  step = jax.jit(
      train_step,
      in_shardings=(psh, ssh, bsh),
      out_shardings=(psh, ssh, None),
      donate_argnums=(0, 1),
  )

  def on_mesh(params, opt_state, batch):
    # Traced under the mesh, so the model can pin its activations to the batch axes.
    with jax.set_mesh(bsh.mesh):
      return step(params, opt_state, batch)

  return on_mesh


def make_eval(graphdef, windows: np.ndarray, batch_size: int):
  """params -> mean next-token loss over the held-out windows (padded to whole batches)."""
  n = windows.shape[0]
  padded = -(-n // batch_size) * batch_size
  rows = np.concatenate([windows, np.zeros((padded - n, windows.shape[1]), windows.dtype)])
  weights = (np.arange(padded) < n).astype(np.float32)

  @jax.jit
  def summed_loss(params, batch, weight):
    logits = nnx.merge(graphdef, params)(batch[:, :-1])
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(axis=1)
    return jnp.sum(per_row * weight)

  def evaluate(params) -> float:
    total = sum(
        summed_loss(params, rows[i : i + batch_size], weights[i : i + batch_size])
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
  leaves, treedef = jax.tree.flatten(template)
  stored = jax.tree.flatten(restored, is_leaf=lambda leaf: leaf is None)[0]
  return treedef.unflatten([t if s is None else s for t, s in zip(leaves, stored)])


def _save(manager, step, params, opt_state, meta) -> None:
  manager.save(
      step,
      args=ocp.args.Composite(
          params=ocp.args.StandardSave(params),
          opt_state=ocp.args.StandardSave(_without_empty(opt_state)),
          meta=ocp.args.JsonSave(meta),
      ),
      force=True,
  )
  manager.wait_until_finished()


def _restore(manager, params, opt_state):
  """(params, opt_state, meta) of the latest checkpoint, in the structure of the given templates."""
  restored = manager.restore(
      manager.latest_step(),
      args=ocp.args.Composite(
          params=ocp.args.StandardRestore(params),
          opt_state=ocp.args.StandardRestore(_without_empty(opt_state)),
          meta=ocp.args.JsonRestore(),
      ),
  )
  return (restored.params, _with_empty(opt_state, restored.opt_state), restored.meta)


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


def _print_config(cfg, mcfg, dataset, n_params, sizes, run_dir) -> None:
  flags = " ".join(f"{key}={value}" for key, value in cfg.flags().items())
  print(f"config ({run_dir / 'config.json'}):")
  print(textwrap.fill(flags, width=100, initial_indent="  ", subsequent_indent="  "))
  print(f"data: {dataset.description}")
  print(
      f"model: {cfg.model_size} ({mcfg.hidden}/{mcfg.ffn}/{mcfg.heads}/{mcfg.layers}), "
      f"{n_params:,} parameters, "
      f"compute {mcfg.compute_dtype}, parameters {mcfg.param_dtype}, remat {mcfg.remat}"
  )
  print(
      f"optimizer: {cfg.optimizer}, peak lr {cfg.effective_lr():g}, "
      f"warm-up {cfg.effective_warmup()} steps, "
      f"state {sizes['opt_state_bytes']:,} bytes; device {jax.devices()[0].device_kind}"
      f" × {cfg.data_parallel * cfg.fsdp} (data {cfg.data_parallel}, fsdp {cfg.fsdp})"
  )


def _write_steps(log, pending) -> float:
  """Writes the per-step records of `pending` (fetching their losses); returns the last loss."""
  loss = float("nan")
  for step, tokens, lr, losses in pending:
    loss = float(np.mean(jax.device_get(losses)))
    log.write({"kind": "train", "step": step, "tokens": tokens, "loss": loss, "lr": lr})
  pending.clear()
  return loss


def train(cfg: TrainConfig, saved: dict | None) -> dict:
  """Runs (or resumes) the training run of `cfg`; returns its summary."""
  dataset = data.load_dataset(cfg)
  tokenizer = dataset.tokenizer
  _check_run_dir(cfg, saved, tokenizer)
  mcfg = model_config(
      cfg.model_size,
      tokenizer.vocab_size,
      compute_dtype=cfg.compute_dtype,
      param_dtype="bfloat16" if cfg.pure_bf16 else "float32",
      remat=cfg.remat,
  )
  tx = optimizers.build(cfg)  # raises ConfigError for rso/grass or a missing library
  graphdef, state = nnx.split(model.Llama(mcfg, nnx.Rngs(cfg.seed)))
  params = nnx.to_pure_dict(state)
  try:
    device_mesh = mesh.make_mesh(cfg.data_parallel, cfg.fsdp)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  try:
    opt_state = tx.init(params)
    shardings = mesh.shardings(device_mesh, params, tx, mcfg.hidden)
  except ValueError as error:  # an optimizer's own check of its settings against the shapes
    raise ConfigError(f"--optimizer {cfg.optimizer}: {error}") from None
  params, opt_state = mesh.place(params, shardings[0]), mesh.place(opt_state, shardings[1])
  n_params = model.count_params(params)
  sizes = optimizers.state_bytes(opt_state)

  # Every input has been checked: from here on the run directory is written.
  run_dir = pathlib.Path(cfg.resolved_run_dir())
  run_dir.mkdir(parents=True, exist_ok=True)
  if saved is None:
    record = {
        "flags": cfg.flags(),
        "model": dataclasses.asdict(mcfg),
        "tokenizer": _tokenizer_record(tokenizer),
        "data": dataset.description,
        "params": n_params,
        "rank": cfg.effective_rank(),
        "lr": cfg.effective_lr(),
        "warmup_steps": cfg.effective_warmup(),
        **sizes,
    }
    (run_dir / "config.json").write_text(json.dumps(record, indent=1) + "\n")
  _print_config(cfg, mcfg, dataset, n_params, sizes, run_dir)

  manager = _checkpoint_manager(run_dir)
  step, position, tokens = 0, 0, 0
  if saved is not None:
    params, opt_state, meta = _restore(manager, params, opt_state)
    step, position, tokens = meta["step"], meta["data_position"], meta["tokens"]
    print(f"resumed from step {step} (data position {position})")

  train_step = make_train_step(graphdef, tx, shardings)
  evaluate = make_eval(graphdef, dataset.eval_windows, cfg.micro_batch_size)
  batches = dataset.train_batches(cfg.micro_batch_size, position)
  lr_at = optimizers.schedule(cfg)
  flops_per_token = model_flops_per_token(mcfg, cfg.seq_len, n_params)
  log = metrics.MetricsLog(run_dir, step if saved is not None else None)
  progress = metrics.Progress(cfg.steps, step)
  clock = _Clock()
  pending = []
  last_eval = None

  def run_eval():
    eval_loss = evaluate(params)
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

  exit_code = 0
  with _Interrupts() as interrupts:
    while step < cfg.steps:
      losses = []
      for _ in range(cfg.grad_accum):
        params, opt_state, loss = train_step(params, opt_state, next(batches))
        losses.append(loss)
      step += 1
      tokens += cfg.tokens_per_step
      pending.append((step, tokens, float(lr_at(step - 1)), losses))
      if clock.since is None:  # this process's first step compiled: time from its end
        _write_steps(log, pending)
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
      wants_eval = cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.steps
      wants_checkpoint = (
          cfg.checkpoint_every and step % cfg.checkpoint_every == 0 or step == cfg.steps
      )
      if wants_eval or wants_checkpoint or stop:
        _write_steps(log, pending)
        clock.stop()
        if wants_eval:
          last_eval = run_eval()
        if wants_checkpoint or stop:
          meta = {"step": step, "data_position": batches.position, "tokens": tokens}
          _save(manager, step, params, opt_state, meta)
        clock.start()
      if stop:
        why = "interrupted" if interrupts.requested else f"stopped at --stop-at-step {step}"
        progress.say(
            f"{why}: checkpoint saved at step {step}; continue with --resume --run-dir {run_dir}"
        )
        exit_code = EXIT_INTERRUPTED if interrupts.requested else 0
        break
  progress.close()
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
      "tokens_per_s": timed / clock.total_seconds if clock.total_seconds else None,
      **sizes,
      "exit_code": exit_code,
  }
  if step == cfg.steps:
    if last_eval is None or last_eval["step"] != step:
      last_eval = run_eval()
    summary.update(final_eval_loss=last_eval["eval_loss"], final_eval_ppl=last_eval["eval_ppl"])
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"final eval perplexity: {last_eval['eval_ppl']:.2f} (loss {last_eval['eval_loss']:.4f}) "
        f"after {step} steps, {tokens:,} tokens"
    )
  return summary


def main(argv=None) -> int:
  """Parses flags and trains; a bad input prints one line to stderr and returns 2."""
  given = vars(parser().parse_args(argv))
  try:
    cfg, saved = resolve_config(given)
    summary = train(cfg, saved)
  except ConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted before a checkpoint could be saved", file=sys.stderr)
    return EXIT_INTERRUPTED
  return summary["exit_code"]
