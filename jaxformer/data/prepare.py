"""Streaming tokenization: text pieces -> flat token files, in bounded memory, resumable.

`write_tokens(pieces, tok, directory)` tokenizes a stream of (split, text, end)
pieces (`sources.Source.stream()`), an EOT after every document, into
  train.npy valid.npy      flat token ids (uint16, or uint32 when V > 65535)
  valid_doc_starts.npy     int64 offset of each validation document's first token
  progress.json            what is committed: pieces read, tokens and counts per split
Each .npy grows by appending and gets its final length written into its
header at the end (numpy leaves room in the header for a growing shape), so
the result is a plain .npy for `np.load(mmap_mode="r")` with no final copy.
Every SHARD_TOKENS tokens the files are synced and progress.json replaced:
that is a shard. A killed preparation resumes at its last shard: files are cut
back to the committed lengths and the stream's first `pieces` are read again
but not tokenized.

Tokenizing runs in `num_proc` worker processes (spawned, so safe beside JAX's
threads), each encoding chunks of ~CHUNK_CHARS with one thread. The parent
reads the text, hands out chunks in order with at most two per worker in
flight, and appends the results: memory holds a few chunks whatever the size
of the corpus. With num_proc=1 the calling process tokenizes, with the
tokenizer's own threads.
"""

import collections
from collections.abc import Iterable, Iterator
import concurrent.futures
import io
import itertools
import json
import multiprocessing
import os
import signal

import numpy as np
import tokenizers
import tqdm

from jaxformer import tokenizer as tokenizer_lib

SHARD_TOKENS = 1 << 26   # commit every ~64M tokens (128 MB of uint16): the most work a crash can cost
CHUNK_CHARS = 1 << 18    # text per task handed to a worker (its encodings take ~100 bytes a token)
SPLITS = ("train", "valid")
FILES = {"train": "train.npy", "valid": "valid.npy", "starts": "valid_doc_starts.npy"}
PROGRESS = "progress.json"


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def npy_header(dtype, length: int) -> bytes:
  """The .npy header of a 1-D array; 128 bytes whatever `length`, so it can be rewritten in place."""
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (length,)})
  return buf.getvalue()


def chunks(pieces: Iterable, size: int | None = None) -> Iterator[list]:
  """Consecutive pieces grouped into lists of at least `size` (CHUNK_CHARS) characters."""
  size = size or CHUNK_CHARS
  chunk, chars = [], 0
  for piece in pieces:
    chunk.append(piece)
    chars += len(piece[1])
    if chars >= size:
      yield chunk
      chunk, chars = [], 0
  if chunk:
    yield chunk


def encode_chunk(tok: tokenizers.Tokenizer, chunk: list) -> tuple[dict, np.ndarray]:
  """({split: flat ids}, (pieces,) int64 tokens per piece): an EOT after each document's last piece."""
  dtype = token_dtype(tokenizer_lib.vocab_size(tok))
  eot = tokenizer_lib.eot_id(tok)
  encodings = tok.encode_batch([text for _, text, _ in chunk], add_special_tokens=False)
  ids = {split: [] for split in SPLITS}
  lengths = np.empty(len(chunk), np.int64)
  for k, ((split, _, end), encoding) in enumerate(zip(chunk, encodings)):
    piece = encoding.ids + [eot] if end else encoding.ids
    ids[split].append(piece)
    lengths[k] = len(piece)
  flat = {split: np.fromiter(itertools.chain.from_iterable(v), dtype) for split, v in ids.items()}
  return flat, lengths


def systematic_sample(texts: Iterable[str], max_chars: int) -> list[str]:
  """Every k-th text of the stream, k doubling whenever the kept ones pass `max_chars` characters.

  A sample spread evenly over the whole stream (whose length is not known in
  advance) in at most ~max_chars of memory; all of a stream shorter than that.
  """
  kept, size, stride = [], 0, 1
  for i, text in enumerate(texts):
    if i % stride:
      continue
    kept.append(text)
    size += len(text)
    while size > max_chars and len(kept) > 1:  # keep indices that are multiples of 2 * stride
      kept, stride = kept[::2], stride * 2
      size = sum(map(len, kept))
  return kept


_WORKER_TOK = None  # a worker process's tokenizer


def _start_worker(tok_json: str) -> None:
  global _WORKER_TOK
  os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: num_proc processes = num_proc cores
  signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C reaches the parent, which stops the pool
  _WORKER_TOK = tokenizers.Tokenizer.from_str(tok_json)


def _encode_in_worker(chunk: list):
  return encode_chunk(_WORKER_TOK, chunk)


def _meta(chunk: list) -> list:
  return [(split, len(text), end) for split, text, end in chunk]


def encode_stream(chunk_iter: Iterable[list], tok: tokenizers.Tokenizer, num_proc: int) -> Iterator:
  """(meta, ids, lengths) per chunk, in order; meta = [(split, characters, end)] of its pieces."""
  if num_proc <= 1:
    for chunk in chunk_iter:
      yield (_meta(chunk), *encode_chunk(tok, chunk))
    return
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=_start_worker,
                                              initargs=(tok.to_str(),)) as pool:
    pending = collections.deque()
    try:
      for chunk in chunk_iter:
        pending.append((_meta(chunk), pool.submit(_encode_in_worker, chunk)))
        del chunk
        if len(pending) >= 2 * num_proc:  # bounded: the reader never runs ahead of the workers
          meta, future = pending.popleft()
          yield (meta, *future.result())
      while pending:
        meta, future = pending.popleft()
        yield (meta, *future.result())
    finally:
      pool.shutdown(wait=True, cancel_futures=True)


def _fresh_state(key: dict) -> dict:
  counts = {"documents": 0, "characters": 0, "tokens": 0, "pieces": 0}
  return {"key": key, "pieces": 0, "shards": 0, "complete": False, "valid_docs": 0, "valid_open": False,
          "splits": {split: dict(counts) for split in SPLITS}}


def read_progress(directory: str) -> dict | None:
  path = os.path.join(directory, PROGRESS)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _lengths(state: dict) -> dict:
  return {"train": state["splits"]["train"]["tokens"], "valid": state["splits"]["valid"]["tokens"],
          "starts": state["valid_docs"]}


def _open_files(directory: str, state: dict, dtype) -> dict:
  """The three growing .npy files, cut back to the committed lengths (whatever came after is redone)."""
  files = {}
  for name, length in _lengths(state).items():
    path = os.path.join(directory, FILES[name])
    file_dtype = np.dtype(np.int64) if name == "starts" else dtype
    committed = len(npy_header(file_dtype, 0)) + length * file_dtype.itemsize
    if length and os.path.getsize(path) < committed:
      raise OSError(f"{path} is shorter than its committed {length} entries")
    f = open(path, "r+b" if length else "w+b")
    if not length:
      f.write(npy_header(file_dtype, 0))
    f.truncate(committed)
    f.seek(committed)
    files[name] = f
  return files


def _commit(directory: str, files: dict, state: dict) -> None:
  """Makes everything written so far durable, then records it: a shard."""
  for f in files.values():
    f.flush()
    os.fsync(f.fileno())
  state["shards"] += 1
  tmp = os.path.join(directory, PROGRESS + ".tmp")
  with open(tmp, "w") as f:
    json.dump(state, f, indent=1)
  os.replace(tmp, os.path.join(directory, PROGRESS))


def write_tokens(pieces: Iterable, tok: tokenizers.Tokenizer, directory: str, *, key: dict, num_proc: int = 1,
                 desc: str = "tokenizing") -> dict:
  """Tokenizes `pieces` into `directory` (see the module doc), resuming a run cut short; returns the state.

  `key` says what is being written (source, tokenizer, stream settings): a
  progress.json with another key is not resumed but started over.
  """
  os.makedirs(directory, exist_ok=True)
  dtype = token_dtype(tokenizer_lib.vocab_size(tok))
  state = read_progress(directory)
  try:
    if state is None or state["key"] != key:
      raise OSError("nothing to resume")
    files = _open_files(directory, state, dtype)
  except (OSError, KeyError, ValueError):
    state = _fresh_state(key)
    files = _open_files(directory, state, dtype)
  try:
    if not state["complete"]:
      _append(pieces, tok, directory, files, state, num_proc, desc)
      state["complete"] = True
      _commit(directory, files, state)
    for name, length in _lengths(state).items():  # the final shapes, into the headers
      files[name].seek(0)
      files[name].write(npy_header(np.int64 if name == "starts" else dtype, length))
      files[name].flush()
      os.fsync(files[name].fileno())
  finally:
    for f in files.values():
      f.close()
  return state


def _append(pieces, tok, directory: str, files: dict, state: dict, num_proc: int, desc: str) -> None:
  stream = itertools.islice(pieces, state["pieces"], None)  # a resumed run reads, but does not tokenize, what it has
  since_commit = 0
  splits = state["splits"]
  # disable=None: a bar on a terminal only, so a log or a one-line error never carries it.
  with tqdm.tqdm(desc=desc, unit=" chars", unit_scale=True, mininterval=5, disable=None) as bar:
    for meta, ids, lengths in encode_stream(chunks(stream), tok, num_proc):
      starts = []
      valid_pos = splits["valid"]["tokens"]
      for (split, chars, end), n in zip(meta, lengths.tolist()):
        counts = splits[split]
        counts["characters"] += chars
        counts["documents"] += end
        counts["pieces"] += 1
        if split == "valid":
          if not state["valid_open"]:
            starts.append(valid_pos)
          state["valid_open"] = not end
          valid_pos += n
      for split in SPLITS:
        files[split].write(ids[split].tobytes())
        splits[split]["tokens"] += len(ids[split])
        since_commit += len(ids[split])
      files["starts"].write(np.asarray(starts, np.int64).tobytes())
      for f in files.values():
        f.flush()  # to the OS: only a crash of the machine, not of this process, loses what follows a shard
      state["valid_docs"] += len(starts)
      state["pieces"] += len(meta)
      bar.update(sum(chars for _, chars, _ in meta))
      if since_commit >= SHARD_TOKENS:
        _commit(directory, files, state)
        since_commit = 0
