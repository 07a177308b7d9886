"""Source -> tokenizer -> flat token arrays on disk (cached) -> `Data`.

The cache lives in `data.cache_dir` (default ~/.cache/jaxformer):
  tokenizers/KEY/tokenizer.json   trained tokenizers, KEY = hash(source, tokenizer settings)
  tokens/KEY/                     KEY = hash(source description, tokenizer fingerprint)
    train.npy valid.npy           flat token ids, an EOT after every document (uint16 or uint32)
    valid_doc_starts.npy          int64 offset of each validation document's first token
    valid_doc_logps.npy           log p(document) in nats (stories only)
    manifest.json                 what was tokenized, with what, and the counts
    progress.json                 the preparation's shards (prepare.py)
The text is streamed, never held whole: tokenizers train on one pass (char) or
a bounded sample (bpe), and `prepare.write_tokens` tokenizes into
tokens/.partial-KEY-HOST/ in shards it can resume from. The finished directory
is renamed into place, so a cache either is complete or is not there.
"""

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import socket
from typing import NamedTuple

import numpy as np
import tokenizers

from jaxformer import runs
from jaxformer import tokenizer as tokenizer_lib
from jaxformer.data import batches as batches_lib
from jaxformer.data import prepare
from jaxformer.data import sources
from jaxformer.data.sources import DataError

MANIFEST_VERSION = 2  # 2: streamed; documents held out by index (sources.holdout_rule)


class Data(NamedTuple):
  tokenizer: tokenizers.Tokenizer
  train: np.ndarray                 # flat token ids (memmap)
  valid: np.ndarray                 # flat token ids (memmap)
  valid_doc_starts: np.ndarray      # int64 offsets of each validation document's first token in `valid`
  entropy_floor: float | None       # nats per token over all validation docs (stories only)
  manifest: dict
  valid_doc_logps: np.ndarray | None = None   # log p(doc) in nats per validation doc (stories only)


class ValidSet(NamedTuple):
  batches: list[dict]               # the fixed validation batches, each (B, T)
  entropy_floor: float | None       # nats per token over exactly the scored docs (stories only)
  num_docs: int | None              # validation documents scored (document-aligned only)


def _hash(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _train_tokenizer(data_config, source: sources.Source) -> tokenizers.Tokenizer:
  kind = data_config.tokenizer
  if kind == "char":
    # Every character of both splits (validation text may hold one training lacks): one streaming
    # pass, cheap next to tokenizing, and no character of the corpus is unknown to its own tokenizer.
    texts = (text for _, text, _ in source.stream())
  elif kind == "bpe":
    # Merges are learnt from a bounded sample spread over all the training text (all of a small corpus).
    texts = prepare.systematic_sample((text for split, text, _ in source.stream() if split == "train"),
                                      int(data_config.tokenizer_sample_chars))
  else:
    texts = []  # byte: nothing to learn
  return tokenizer_lib.train_tokenizer(kind, texts, int(data_config.bpe_vocab_size))


def get_tokenizer(data_config, workdir: str | None, description: dict, get_source,
                  save: bool = True) -> tokenizers.Tokenizer:
  """The run's tokenizer: the workdir's if it has one, else a cached or freshly trained one.

  A new tokenizer is saved to `workdir/tokenizer.json` (when `save`: process 0 of
  many), so a resumed run keeps it. `get_source()` opens the source; it is
  only called when training is needed.
  """
  kind = data_config.tokenizer  # config.validate checked it and bpe_vocab_size
  workdir_path = runs.tokenizer_path(workdir) if workdir else None
  if workdir_path and runs.exists(workdir_path):
    tok = tokenizer_lib.load_tokenizer(workdir_path)
    if tokenizer_lib.kind(tok) != kind:
      raise DataError(
          f"{workdir_path} is a {tokenizer_lib.kind(tok)} tokenizer but data.tokenizer={kind}; "
          "use a fresh --workdir or set data.tokenizer to match the run.")
    return tok
  settings = {"kind": kind, "bpe_vocab_size": int(data_config.bpe_vocab_size) if kind == "bpe" else None,
              "version": tokenizer_lib.VERSION}
  if kind == "bpe":
    settings["sample_chars"] = int(data_config.tokenizer_sample_chars)
  key = _hash({"source": description, "tokenizer": settings})
  cached_path = os.path.join(sources.cache_root(data_config), "tokenizers", key, "tokenizer.json")
  with host_lock(data_config, f"tokenizer-{key}"):  # one process per host trains it; the others wait and read it
    if os.path.exists(cached_path):
      tok = tokenizer_lib.load_tokenizer(cached_path)
    else:
      tok = _train_tokenizer(data_config, get_source())
      runs.atomic_write(cached_path, tok.to_str())
  if workdir_path and save:
    runs.atomic_write(workdir_path, tok.to_str())
  return tok


@contextlib.contextmanager
def host_lock(data_config, name: str):
  """An exclusive lock among this host's processes on the cache entry `name` (flock: freed if one dies)."""
  directory = os.path.join(sources.cache_root(data_config), "locks")
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, name + ".lock"), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _check_chars(tok: tokenizers.Tokenizer, source: sources.Source, unknown: str) -> int:
  """Characters of this text that a char tokenizer from an earlier run lacks: refused, or counted for <|unk|>."""
  if tokenizer_lib.kind(tok) != "char":
    return 0
  chars = set()
  for _, text, _ in source.stream():
    chars.update(text)
  missing = tokenizer_lib.unseen_chars(tok, "".join(sorted(chars)))
  try:
    tokenizer_lib.check_unknown(tok, missing, unknown, "the text")
  except tokenizer_lib.TokenizerError as err:
    raise DataError(str(err)) from None
  if not missing:
    return 0
  return sum(text.count(ch) for _, text, _ in source.stream() for ch in missing)


def build_cache(cache_dir: str, source: sources.Source, tok: tokenizers.Tokenizer, *, num_proc: int = 1,
                unknown: str = "error") -> None:
  """Tokenizes the source into `cache_dir`: resumably in a partial directory, then renamed into place."""
  num_unknown = _check_chars(tok, source, unknown)
  parent = os.path.dirname(cache_dir)
  # Per host: hosts that share the cache folder but not its locks never write into one directory.
  partial = os.path.join(parent, f".partial-{os.path.basename(cache_dir)}-{socket.gethostname()}")
  key = {"cache": os.path.basename(cache_dir), "piece_chars": sources.PIECE_CHARS,
         "block_chars": sources.BLOCK_CHARS, "lookahead_chars": sources.LOOKAHEAD_CHARS}
  try:
    state = prepare.write_tokens(source.stream(), tok, partial, key=key, num_proc=num_proc)
    splits = state["splits"]
    if not splits["valid"]["documents"]:
      raise DataError(f"no document was held out for validation: the source has {splits['train']['documents']} "
                      "long documents; raise data.valid_fraction, or split the text into more documents.")
  except DataError:  # bad input: fixing it changes the cache key, so there is nothing to resume
    shutil.rmtree(partial, ignore_errors=True)
    raise
  vocab = tokenizer_lib.vocab_size(tok)
  manifest = {
      "version": MANIFEST_VERSION,
      "source": source.description,
      "tokenizer": {"kind": tokenizer_lib.kind(tok), "fingerprint": tokenizer_lib.fingerprint(tok),
                    "vocab_size": vocab, "eot_id": tokenizer_lib.eot_id(tok)},
      "dtype": prepare.token_dtype(vocab).name,
      "unknown_chars": num_unknown,  # characters written as <|unk|> (data.unknown_chars=unk)
      "splits": {name: {k: splits[name][k] for k in ("documents", "characters", "tokens")}
                 for name in prepare.SPLITS},
      "shards": state["shards"],
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  if source.valid_logps is not None:
    np.save(os.path.join(partial, "valid_doc_logps.npy"), np.asarray(source.valid_logps, np.float64))
    starts = np.load(os.path.join(partial, prepare.FILES["starts"]))
    lengths = batches_lib.doc_lengths(starts, splits["valid"]["tokens"])
    manifest["entropy_floor"] = {
        "nats_per_token": batches_lib.entropy_floor(source.valid_logps, lengths),
        "nats": float(-np.sum(source.valid_logps)), "tokens": int(lengths.sum()), "documents": len(lengths)}
  # The manifest goes last: a directory with one is complete (progress.json stays, a record of the shards).
  with open(os.path.join(partial, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2)
  try:
    if read_manifest(cache_dir) is not None:
      return  # another process (host) finished the same cache first; keep theirs
    if os.path.exists(cache_dir):  # incomplete (a copy cut short by hand); ours replaces it
      shutil.rmtree(cache_dir)
    try:
      os.rename(partial, cache_dir)
    except OSError:
      if read_manifest(cache_dir) is None:  # lost a rename race to an identical copy: fine
        raise
  finally:
    if os.path.exists(partial):
      shutil.rmtree(partial, ignore_errors=True)


def read_manifest(cache_dir: str) -> dict | None:
  path = os.path.join(cache_dir, "manifest.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_manifest(manifest: dict, fingerprint: str, cache_dir: str) -> None:
  """Refuses a cache whose tokens were written by another tokenizer."""
  written_by = manifest.get("tokenizer", {}).get("fingerprint")
  if written_by != fingerprint:
    raise DataError(
        f"the token cache {cache_dir} was written by tokenizer {written_by}, but this run's tokenizer is "
        f"{fingerprint}; delete {cache_dir} to rebuild it.")


def token_cache_dir(data_config, description: dict, fingerprint: str) -> str:
  key = _hash({"source": description, "tokenizer": fingerprint, "version": MANIFEST_VERSION})
  return os.path.join(sources.cache_root(data_config), "tokens", key)


def load_data(data_config, workdir: str | None, seq_len: int, save_tokenizer: bool = True) -> Data:
  """Everything a training run eats: tokenizer, memmapped token arrays, validation layout.

  A second call with the same source and tokenizer reads the cache without
  loading or tokenizing any text. Processes of one host that start together
  build the cache once: the first holds the lock, the others then read its work.
  """
  description = sources.describe_source(data_config)
  loaded = []

  def get_source():  # nothing is read until a tokenizer or a cache has to be built
    if not loaded:
      loaded.append(sources.load_source(data_config, description))
    return loaded[0]

  tok = get_tokenizer(data_config, workdir, description, get_source, save=save_tokenizer)
  fingerprint = tokenizer_lib.fingerprint(tok)
  cache_dir = token_cache_dir(data_config, description, fingerprint)
  manifest = read_manifest(cache_dir)
  if manifest is None:
    with host_lock(data_config, f"tokens-{os.path.basename(cache_dir)}"):
      manifest = read_manifest(cache_dir)
      if manifest is None:
        build_cache(cache_dir, get_source(), tok, num_proc=int(data_config.num_proc),
                    unknown=data_config.unknown_chars)
        manifest = read_manifest(cache_dir)
  check_manifest(manifest, fingerprint, cache_dir)
  if manifest.get("unknown_chars", 0) and data_config.unknown_chars != "unk":  # a cache built under unk
    raise DataError(f"the text holds {manifest['unknown_chars']} characters the run's char tokenizer has never "
                    "seen; pass --config.data.unknown_chars=unk to map them to <|unk|>, or train with "
                    "data.tokenizer=byte or bpe.")

  for name, split, fix in (("training", "train", "use more text"),
                           ("validation", "valid", "use more text or a larger data.valid_fraction")):
    num_tokens = manifest["splits"][split]["tokens"]
    if num_tokens < seq_len + 1:
      raise DataError(
          f"the {name} split has {num_tokens} tokens, fewer than seq_len+1 = {seq_len + 1} for one window; "
          f"{fix}, or lower train.seq_len.")
  train = np.load(os.path.join(cache_dir, "train.npy"), mmap_mode="r")
  valid = np.load(os.path.join(cache_dir, "valid.npy"), mmap_mode="r")
  logps_path = os.path.join(cache_dir, "valid_doc_logps.npy")
  logps = np.load(logps_path) if os.path.exists(logps_path) else None
  floor = manifest["entropy_floor"]["nats_per_token"] if "entropy_floor" in manifest else None
  manifest = dict(manifest, cache_dir=cache_dir)
  return Data(tok, train, valid, np.load(os.path.join(cache_dir, "valid_doc_starts.npy")), floor, manifest, logps)


def validation_set(data: Data, *, num_batches: int, batch_size: int, seq_len: int) -> ValidSet:
  """The run's fixed validation batches, and the entropy floor over exactly what they score.

  Story corpora (those with log-probs) are scored document-aligned; others by
  evenly spaced windows.
  """
  aligned = data.valid_doc_logps is not None
  batches = batches_lib.valid_batches(
      data.valid, data.valid_doc_starts, num_batches=num_batches, batch_size=batch_size, seq_len=seq_len,
      document_aligned=aligned, eot_id=tokenizer_lib.eot_id(data.tokenizer))
  if not aligned:
    return ValidSet(batches, None, None)
  num_docs = batches_lib.num_scored_docs(data.valid_doc_starts, len(data.valid), num_batches=num_batches,
                                         batch_size=batch_size, seq_len=seq_len)
  lengths = batches_lib.doc_lengths(data.valid_doc_starts, len(data.valid))[:num_docs]
  return ValidSet(batches, batches_lib.entropy_floor(data.valid_doc_logps[:num_docs], lengths), num_docs)
