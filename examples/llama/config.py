"""Typed configs for the LLaMA example: model sizes and the training run.

`TrainConfig`'s fields are the command-line flags (``model_size`` is ``--model-size``);
each field's ``help`` metadata is its flag's help text.
"""

import dataclasses
import math
import typing

# hidden / ffn / heads / layers of the LLaMA models in the GaLore (arXiv 2403.03507, Table 5)
# and Online Subspace Descent (arXiv 2408.12857) experiments; "tiny" is for tests and smoke runs.
MODEL_SIZES = {
  "tiny": (64, 176, 4, 2),
  "9m": (128, 352, 4, 4),
  "20m": (256, 688, 4, 4),
  "60m": (512, 1376, 8, 8),
  "130m": (768, 2048, 12, 12),
  "350m": (1024, 2736, 16, 24),
  "1b": (2048, 5461, 32, 24),
  "7b": (4096, 11008, 32, 32),
}

# rso_model and grass_model are the model-level RSO and GRASS (optax_subspace.nn).
OPTIMIZERS = (
  "adamw",
  "galore",
  "osd",
  "rso",
  "grass",
  "rso_model",
  "grass_model",
  "optax_galore",
  "fira",
  "frugal",
  "apollo",
  "apollo_mini",
)
# Methods that need one module per layer: the model-level ones replace each layer's nnx.Linear,
# and optax.contrib.galore's dimension numbers name no batch axis.
SCAN_UNSUPPORTED = ("rso_model", "grass_model", "optax_galore")
# The optimizer-level methods built on optax_subspace.project_subspace (--projection-dtype).
PROJECTED_METHODS = tuple(m for m in OPTIMIZERS if m not in SCAN_UNSUPPORTED + ("adamw",))
CORPORA = ("sotu", "offline-large", "c4")
TOKENIZERS = ("auto", "mistral", "byte", "t5")
DTYPES = ("bfloat16", "float32")
GRASS_SELECTIONS = ("topk", "multinomial", "uniform")
GRASS_ON_CHANGE = ("reset", "remap")
RSO_DISTRIBUTIONS = ("haar", "gaussian")


class ConfigError(ValueError):
  """A bad flag or input; its message is one line that says what to do."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a LLaMA decoder (pre-norm, RMSNorm, RoPE, SwiGLU, untied head)."""

  hidden: int
  ffn: int
  heads: int
  layers: int
  vocab_size: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  compute_dtype: str = "bfloat16"
  param_dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = False

  @property
  def head_dim(self) -> int:
    return self.hidden // self.heads


def model_config(size: str, vocab_size: int, **overrides) -> ModelConfig:
  """The `ModelConfig` named `size` ("9m" ... "7b") with the tokenizer's vocabulary."""
  if size not in MODEL_SIZES:
    raise ConfigError(f"unknown model size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
  hidden, ffn, heads, layers = MODEL_SIZES[size]
  return ModelConfig(hidden, ffn, heads, layers, vocab_size, **overrides)


def _flag(default, help_text, **extra):
  return dataclasses.field(default=default, metadata={"help": help_text, **extra})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run. Defaults train "9m" on the sotu corpus in minutes on a 2-core CPU."""

  # model
  model_size: str = _flag("9m", f"one of {', '.join(MODEL_SIZES)}")
  compute_dtype: str = _flag("bfloat16", "dtype of activations and matmuls: bfloat16 or float32")
  pure_bf16: bool = _flag(False, "keep the parameters (and so the optimizer state) in bfloat16")
  remat: bool = _flag(False, "activation checkpointing: recompute each block in the backward pass")
  scan_layers: bool = _flag(
    False,
    "stack the blocks' parameters over the layers and run them with nnx.scan: one block to "
    "compile, and each kernel a (layers, in, out) batch of matrices whose subspace products "
    "run batched (optimizer-level methods other than optax_galore)",
  )
  # data
  corpus: str = _flag("sotu", f"one of {', '.join(CORPORA)}")
  tokenizer: str = _flag(
    "auto", "mistral (32k SentencePiece), byte, or t5; auto: t5 for c4, mistral otherwise"
  )
  tokenizer_path: str = _flag("", "a local SentencePiece .model file to use for --tokenizer t5")
  c4_path: str = _flag("", "a local folder of c4-{train,validation}.*.json.gz files (else stream)")
  data_dir: str = _flag(
    "",
    "cache folder for tokenized corpora; default $OPTAX_SUBSPACE_DATA or ~/.cache/optax_subspace",
  )
  seq_len: int = _flag(256, "tokens per training window")
  batch_size: int = _flag(16, "windows per optimizer step (the global batch)")
  grad_accum: int = _flag(1, "micro-batches per optimizer step; must divide --batch-size")
  eval_windows: int = _flag(64, "held-out windows scored at each evaluation")
  # optimization
  optimizer: str = _flag("adamw", f"one of {', '.join(OPTIMIZERS)}")
  steps: int = _flag(250, "optimizer steps")
  lr: float = _flag(0.0, "peak learning rate; 0: 3e-3 for adamw, 1e-2 for the subspace methods")
  lr_unprojected: float = _flag(
    0.0,
    "peak learning rate of the leaves the subspace methods do not project (embeddings, head,"
    " norms); the kernels keep --lr. adamw takes the same split. 0: --lr",
  )
  warmup_steps: int = _flag(-1, "linear warm-up steps before the cosine decay; -1: 10% of --steps")
  weight_decay: float = _flag(0.0, "decoupled weight decay")
  b1: float = _flag(0.9, "Adam beta1 of adamw and optax_galore")
  b2: float = _flag(0.999, "Adam beta2 of adamw and optax_galore")
  eps: float = _flag(1e-8, "Adam epsilon of adamw and optax_galore")
  clip_norm: float = _flag(1.0, "clip the gradient to this global norm; 0 disables")
  rank: int = _flag(0, "projection rank of the subspace methods; 0: hidden size / 4")
  update_every: int = _flag(
    200, "steps between subspace refreshes (GaLore's T; RSO's subproblem length K)"
  )
  galore_scale: float = _flag(0.25, "scale alpha of the back-projected update")
  projection_dtype: str = _flag(
    "float32",
    "operand dtype of the subspace methods' products with the gradient: float32 (at JAX's"
    " default precision: TF32 on an NVIDIA GPU) or bfloat16 (opt-in: faster, less exact)",
  )
  galore_warm_iterations: int = _flag(
    0,
    "galore: the refreshes after step 0 as k rounds of subspace iteration from the previous"
    " basis (no eigh; an approximation); 0: exact",
  )
  galore_warm_oversample: int = _flag(
    0,
    "galore: extra columns p of those rounds (a Gaussian sketch of G), the top r kept by a"
    " Rayleigh-Ritz eigh of (r + p)^2; 0: none",
  )
  limiter_gamma: float = _flag(
    0.0,
    "fira, apollo, apollo_mini: gamma of the norm-growth limiter (> 1); 0: the papers' 1.01;"
    " inf: no limiter",
  )
  released_order: bool = _flag(
    False,
    "fira, apollo, apollo_mini: step as the authors' released code (the factors and the limiter"
    " see Adam's direction before its bias correction; Fira's residual G - alpha P R, no alpha on"
    " it); default: the papers' form",
  )
  grass_selection: str = _flag(
    "topk", "grass: how rows are chosen at each refresh: topk, multinomial or uniform"
  )
  grass_shared_count: bool = _flag(
    False,
    "grass, grass_model: one Adam step count for all leaves, so a reset keeps the old bias"
    " correction (the behaviour before per-matrix counts; for comparisons)",
  )
  grass_on_change: str = _flag(
    "reset",
    "grass: the moments at a new selection: reset (zeroed, as reported for GRASS) or remap (a"
    " row kept keeps its moments)",
  )
  rso_proximal: float = _flag(
    0.0, "rso: eta of the proximal term |B|^2/(2 eta) of each subproblem; 0: none (eta = inf)"
  )
  rso_distribution: str = _flag(
    "haar", "rso: the random basis, haar (orthonormal columns) or gaussian (N(0, 1/r) entries)"
  )
  rso_share_basis: bool = _flag(
    False,
    "rso_model: q/k/v share one random basis and gate/up another, so x·P is kept once per "
    "input (less activation memory; the paper draws one basis per weight)",
  )
  rso_store_basis: bool = _flag(
    False,
    "rso: keep each subproblem's random basis in the optimizer state (s x r floats per matrix)"
    " instead of regenerating it from its key and r x r QR factor at every step (the same"
    " updates; the step a draw and a product faster)",
  )
  # devices
  data_parallel: int = _flag(1, "devices on the mesh's data axis (batch split, weights replicated)")
  fsdp: int = _flag(1, "devices on the mesh's fsdp axis (batch and every matrix split: FSDP)")
  shard_optimizer: bool = _flag(
    False,
    "ZeRO-1 with --data-parallel > 1: weights replicated, optimizer state and update split "
    "over the data axis (not with --fsdp > 1, which splits them already)",
  )
  # several hosts: examples/llama/distributed.py, docs/scaling.md
  num_processes: int = _flag(
    1,
    "processes in the run, one per host (or per GPU), each running this command with its own "
    "--process-id; 0: all three from the launcher's environment (SLURM, Open MPI, TPU pods)",
  )
  process_id: int = _flag(0, "this process's index, 0 .. --num-processes - 1 (0 coordinates)")
  coordinator_address: str = _flag(
    "", "HOST:PORT of process 0, reachable from every process; default $JAX_COORDINATOR_ADDRESS"
  )
  distributed_timeout: int = _flag(
    300, "seconds for all processes to join the run; past them each one ends with an error"
  )
  # run
  seed: int = _flag(0, "seeds the initialisation and the data order")
  run_dir: str = _flag(
    "",
    "where config, metrics, checkpoints and loss.png go; default runs/<size>-<optimizer>, or"
    " runs/<size>-<optimizer>-2, -3, ... (the first free one) when that folder holds a run",
  )
  resume: bool = _flag(
    False,
    "continue the run in --run-dir (default runs/<size>-<optimizer>) from its latest checkpoint",
  )
  log_every: int = _flag(10, "steps between metric lines")
  eval_every: int = _flag(50, "steps between evaluations (and one at the end); 0: only at the end")
  checkpoint_every: int = _flag(
    100, "steps between checkpoints (and one at the end); 0: only at the end"
  )
  stop_at_step: int = _flag(
    0, "save a checkpoint and exit at this step, as a preemption would; 0: never"
  )
  compilation_cache: str = _flag(
    "",
    "a folder for JAX's persistent compilation cache: a resumed or repeated run loads the"
    " programs compiled before from it instead of compiling them again; empty: no cache",
  )
  profile_steps: int = _flag(
    0,
    "trace this many training steps with jax.profiler into <run-dir>/profile (TensorBoard,"
    " Perfetto), from the first whose program this process has compiled already; 0: none",
  )

  @property
  def micro_batch_size(self) -> int:
    return self.batch_size // self.grad_accum

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len

  def resolved_tokenizer(self) -> str:
    if self.tokenizer != "auto":
      return self.tokenizer
    return "t5" if self.corpus == "c4" else "mistral"

  def default_run_dir(self) -> str:
    return f"runs/{self.model_size}-{self.optimizer}"

  def resolved_run_dir(self) -> str:
    return self.run_dir or self.default_run_dir()

  def validate(self) -> None:
    """Raises `ConfigError` for any flag value that cannot run."""
    choices = {
      "model_size": tuple(MODEL_SIZES),
      "optimizer": OPTIMIZERS,
      "corpus": CORPORA,
      "tokenizer": TOKENIZERS,
      "compute_dtype": DTYPES,
      "projection_dtype": DTYPES,
    }
    for name, allowed in choices.items():
      value = getattr(self, name)
      if value not in allowed:
        flag = "--" + name.replace("_", "-")
        raise ConfigError(
          f"unknown {flag.lstrip('-').replace('-', ' ')} {value!r}; "
          f"choose one of {', '.join(allowed)} ({flag})"
        )
    hidden = MODEL_SIZES[self.model_size][0]
    if self.rank < 0 or self.rank > hidden:
      raise ConfigError(
        f"--rank {self.rank} does not fit model {self.model_size} (hidden size {hidden}); "
        f"pick 1..{hidden}, or 0 for {hidden // 4}"
      )
    positive = (
        "seq_len", "batch_size", "grad_accum", "steps", "eval_windows", "update_every",
        "data_parallel", "fsdp", "distributed_timeout",
    )  # fmt: skip
    for name in positive:
      if getattr(self, name) <= 0:
        raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    # 0 is "the default learning rate"; a negative one trains uphill (perplexity 5e21).
    for name in ("lr", "lr_unprojected"):
      value = getattr(self, name)
      if not (math.isfinite(value) and value >= 0):
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} {value:g} must be positive (or 0: the default)")
    if not (self.limiter_gamma == 0 or self.limiter_gamma > 1):
      raise ConfigError(
        f"--limiter-gamma {self.limiter_gamma:g} must be above 1 (or 0: the papers' 1.01)"
      )
    if self.grass_selection not in GRASS_SELECTIONS:
      raise ConfigError(
        f"unknown --grass-selection {self.grass_selection!r}; choose one of"
        f" {', '.join(GRASS_SELECTIONS)}"
      )
    for flag, value, allowed in (
      ("--grass-on-change", self.grass_on_change, GRASS_ON_CHANGE),
      ("--rso-distribution", self.rso_distribution, RSO_DISTRIBUTIONS),
    ):
      if value not in allowed:
        raise ConfigError(f"unknown {flag} {value!r}; choose one of {', '.join(allowed)}")
    if self.galore_warm_iterations < 0:
      raise ConfigError(f"--galore-warm-iterations {self.galore_warm_iterations} must be 0 or more")
    if self.galore_warm_oversample < 0:
      raise ConfigError(f"--galore-warm-oversample {self.galore_warm_oversample} must be 0 or more")
    if self.galore_warm_oversample and not self.galore_warm_iterations:
      raise ConfigError("--galore-warm-oversample needs --galore-warm-iterations (≥ 1)")
    if not (math.isfinite(self.rso_proximal) and self.rso_proximal >= 0):
      raise ConfigError(f"--rso-proximal {self.rso_proximal:g} must be positive (or 0: none)")
    if self.num_processes < 0:
      raise ConfigError("--num-processes must be positive, or 0 to read it from the launcher")
    if self.num_processes == 1 and (self.process_id or self.coordinator_address):
      flag = "--process-id" if self.process_id else "--coordinator-address"
      raise ConfigError(f"{flag} is for a run of several processes: give --num-processes too")
    if self.num_processes > 1 and not 0 <= self.process_id < self.num_processes:
      raise ConfigError(
        f"--process-id {self.process_id} must be 0 .. {self.num_processes - 1} "
        f"(--num-processes {self.num_processes})"
      )
    if self.profile_steps < 0:
      raise ConfigError("--profile-steps must be 0 (no trace) or positive")
    if self.batch_size % self.grad_accum:
      raise ConfigError(
        f"--grad-accum {self.grad_accum} must divide --batch-size {self.batch_size}"
      )
    devices = self.data_parallel * self.fsdp
    if self.micro_batch_size % devices:
      raise ConfigError(
        f"the micro-batch of {self.micro_batch_size} windows does not split over "
        f"--data-parallel {self.data_parallel} × --fsdp {self.fsdp} = {devices} devices"
      )
    if self.rso_share_basis and self.optimizer != "rso_model":
      raise ConfigError(
        f"--rso-share-basis is an option of --optimizer rso_model, not {self.optimizer}"
      )
    only = {
      "--rso-store-basis": ("rso", self.rso_store_basis),
      "--rso-proximal": ("rso", self.rso_proximal != 0),
      "--rso-distribution": ("rso", self.rso_distribution != "haar"),
      "--grass-on-change": ("grass", self.grass_on_change != "reset"),
      "--galore-warm-iterations": ("galore", self.galore_warm_iterations != 0),
      "--galore-warm-oversample": ("galore", self.galore_warm_oversample != 0),
    }
    for flag, (optimizer, given) in only.items():
      if given and self.optimizer != optimizer:
        raise ConfigError(f"{flag} is an option of --optimizer {optimizer}, not {self.optimizer}")
    if self.projection_dtype != "float32" and self.optimizer not in PROJECTED_METHODS:
      raise ConfigError(
        f"--projection-dtype is an option of --optimizer {', '.join(PROJECTED_METHODS)}, not"
        f" {self.optimizer}"
      )
    if self.scan_layers and self.optimizer in SCAN_UNSUPPORTED:
      raise ConfigError(
        f"--scan-layers works with the optimizer-level methods; --optimizer {self.optimizer}"
        " needs the unstacked layers (drop --scan-layers)"
      )
    if self.shard_optimizer and self.fsdp > 1:
      raise ConfigError(
        f"--shard-optimizer needs --fsdp 1: --fsdp {self.fsdp} already shards the optimizer state"
      )
    if self.warmup_steps >= self.steps:
      raise ConfigError(f"--warmup-steps {self.warmup_steps} must be below --steps {self.steps}")
    if self.tokenizer == "t5" and self.corpus != "c4" and not self.tokenizer_path:
      raise ConfigError("--tokenizer t5 needs --tokenizer-path (a local spiece.model) off C4")

  def effective_rank(self) -> int:
    return self.rank or MODEL_SIZES[self.model_size][0] // 4

  def effective_lr(self) -> float:
    # AdamW: 3e-3 was the best of 1e-3/2e-3/3e-3/6e-3/1e-2 for the default run (README). The
    # subspace methods: GaLore's 0.01, used with scale 0.25 (arXiv 2403.03507, Sec. 5.1).
    if self.lr:
      return self.lr
    return 3e-3 if self.optimizer == "adamw" else 1e-2

  def effective_lr_unprojected(self) -> float:
    return self.lr_unprojected or self.effective_lr()

  def effective_warmup(self) -> int:
    return self.warmup_steps if self.warmup_steps >= 0 else self.steps // 10

  def flags(self) -> dict[str, typing.Any]:
    return dataclasses.asdict(self)
