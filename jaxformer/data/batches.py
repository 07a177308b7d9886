"""Batches: pure functions from flat token arrays to {inputs, targets, weights}.

Every batch is a dict of numpy arrays of shape (B, T):
  inputs   int32   the tokens the model reads
  targets  int32   the next token at each position (inputs shifted by one)
  weights  float32 1 where the target is scored, 0 for padding and overlap
so a batch's loss is sum(weights * ce) / sum(weights).

Training windows are drawn at random, but where each one starts is a pure
function of (seed, step, row): the stream's whole state is (seed, step), a
resumed run sees exactly the batches an uninterrupted one would.

Validation batches are fixed. Real corpora get evenly spaced windows; story
corpora get document-aligned windows (see `valid_batches`).
"""

import numpy as np


def train_starts(num_tokens: int, *, seed: int, step: int, batch_size: int, seq_len: int) -> np.ndarray:
  """(B,) int64 start offsets of the global batch at `step`: a function of (seed, step) only."""
  if num_tokens < seq_len + 1:
    raise ValueError(f"need at least seq_len+1 = {seq_len + 1} tokens for a window, got {num_tokens}.")
  rng = np.random.default_rng([seed, step])
  # A window holds T+1 tokens, so the last possible start is N - T - 1.
  return rng.integers(0, num_tokens - seq_len, size=batch_size, dtype=np.int64)


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> dict:
  idx = starts[:, None] + np.arange(seq_len + 1)        # (B, T+1)
  window = np.array(tokens[idx], dtype=np.int32)        # one gather, even on a memmap
  return {"inputs": window[:, :-1], "targets": window[:, 1:],
          "weights": np.ones((len(starts), seq_len), np.float32)}


def train_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int, seq_len: int,
                rows: np.ndarray | None = None) -> dict:
  """Rows `rows` (default: all) of the global training batch at `step`, in that order.

  `batch_size` is the global B; each process reads only the rows its devices
  hold (`sharding.batch_rows`), and every row is the same on every process.
  """
  starts = train_starts(len(tokens), seed=seed, step=step, batch_size=batch_size, seq_len=seq_len)
  return _windows(tokens, starts if rows is None else starts[rows], seq_len)


def _pad_rows(batch: dict, num_rows: int, pad_id: int) -> dict:
  """Appends zero-weight rows so the last batch keeps the shape (B, T)."""
  missing = num_rows - len(batch["inputs"])
  if missing <= 0:
    return batch
  t = batch["inputs"].shape[1]
  return {"inputs": np.concatenate([batch["inputs"], np.full((missing, t), pad_id, np.int32)]),
          "targets": np.concatenate([batch["targets"], np.full((missing, t), pad_id, np.int32)]),
          "weights": np.concatenate([batch["weights"], np.zeros((missing, t), np.float32)])}


def _to_batches(rows: dict, batch_size: int, pad_id: int) -> list[dict]:
  n = len(rows["inputs"])
  return [_pad_rows({k: v[i:i + batch_size] for k, v in rows.items()}, batch_size, pad_id)
          for i in range(0, n, batch_size)]


def spread_starts(num_tokens: int, num_windows: int, seq_len: int) -> np.ndarray:
  """Starts of non-overlapping windows: consecutive from 0, evenly spaced if the array is long."""
  fit = (num_tokens - 1) // seq_len
  if fit < num_windows or num_windows == 1:
    return np.arange(min(fit, num_windows), dtype=np.int64) * seq_len
  # Spacing (N-T-1)/(n-1) >= T because N-1 >= n*T: the windows never overlap.
  return np.arange(num_windows, dtype=np.int64) * (num_tokens - seq_len - 1) // (num_windows - 1)


def doc_windows(doc_starts: np.ndarray, num_tokens: int, *, seq_len: int, stride: int | None = None) -> list:
  """Document-aligned windows of every validation document, as (doc, first, start, score_from, score_to).

  Positions are in the EOT-prefixed stream s = [EOT] + tokens, so s[p] = tokens[p-1]
  and document d (tokens[a:b], its EOT last) is targets s[a+1 .. b]. A window
  reads inputs s[start : start+T] and predicts s[start+1 : start+T+1]; it
  scores targets score_from..score_to (inclusive). The first window of a
  document starts at its preceding EOT; a longer document continues in windows
  that each score the next `stride` (default T // 2) unscored targets and end
  at the last one, so every scored token sees at least T - stride tokens of
  its document, and every target is scored exactly once.
  """
  stride = min(max(1, stride or seq_len // 2), seq_len)
  ends = np.append(np.asarray(doc_starts[1:], np.int64), num_tokens)
  windows = []
  for d, (a, b) in enumerate(zip(np.asarray(doc_starts, np.int64).tolist(), ends.tolist())):
    first_end = min(a + seq_len, b)
    windows.append((d, True, a, a + 1, first_end))
    scored = first_end
    while scored < b:
      end = min(b, scored + stride)
      windows.append((d, False, end - seq_len, scored + 1, end))
      scored = end
  return windows


def num_scored_docs(doc_starts: np.ndarray, num_tokens: int, *, num_batches: int, batch_size: int,
                    seq_len: int, stride: int | None = None) -> int:
  """How many leading documents document-aligned `valid_batches` score (all of each, or none)."""
  capacity = num_batches * batch_size
  windows = doc_windows(doc_starts, num_tokens, seq_len=seq_len, stride=stride)
  if len(windows) <= capacity:
    return len(doc_starts)
  # The document of the first window that does not fit is cut off, with all after it.
  return windows[capacity][0]


def _aligned_rows(tokens: np.ndarray, doc_starts: np.ndarray, windows: list, seq_len: int, eot: int) -> dict:
  ends = np.append(np.asarray(doc_starts[1:], np.int64), len(tokens))
  start = np.array([w[2] for w in windows], np.int64)
  doc_end = ends[[w[0] for w in windows]]
  lo = np.array([w[3] for w in windows], np.int64)
  hi = np.array([w[4] for w in windows], np.int64)
  pos = start[:, None] + np.arange(seq_len + 1)            # (R, T+1) positions in s
  inside = pos <= doc_end[:, None]                           # s[b] is the document's EOT
  # s[0] is the prepended EOT; s[p] = tokens[p-1] otherwise.
  gathered = np.asarray(tokens[np.clip(pos - 1, 0, len(tokens) - 1)], np.int32)
  window = np.where((pos == 0) | ~inside, np.int32(eot), gathered)
  target_pos = pos[:, 1:]
  weights = (target_pos >= lo[:, None]) & (target_pos <= hi[:, None])
  return {"inputs": window[:, :-1], "targets": window[:, 1:], "weights": weights.astype(np.float32)}


def valid_batches(tokens: np.ndarray, doc_starts: np.ndarray | None, *, num_batches: int, batch_size: int,
                  seq_len: int, document_aligned: bool, eot_id: int | None = None,
                  stride: int | None = None) -> list[dict]:
  """The fixed validation batches: the same list for the same arguments, every time.

  Not aligned (real corpora): up to num_batches*B non-overlapping windows
  (`spread_starts`), weights 1; a short array gives fewer windows.

  Document-aligned (stories; `doc_starts` are the documents' first tokens, each
  document ends with its EOT): one document per row, scored from its own start
  with the EOT before it as the first input (as in training, where a story
  follows an EOT), so the first story token is predicted too; after the
  document's EOT the row is padded with EOT at weight 0; long documents continue
  in further rows (`doc_windows`). Every token of the first
  `num_scored_docs(...)` documents, EOT included, is scored exactly once; the
  documents that do not fit in num_batches*B rows are left out whole.

  The last batch is padded with zero-weight rows, so every batch is (B, T);
  there may be fewer than num_batches batches.
  """
  if len(tokens) < seq_len + 1:
    raise ValueError(f"need at least seq_len+1 = {seq_len + 1} validation tokens, got {len(tokens)}.")
  eot = int(tokens[-1]) if eot_id is None else int(eot_id)  # the pipeline ends every document with EOT
  capacity = num_batches * batch_size
  if not document_aligned:
    rows = _windows(tokens, spread_starts(len(tokens), capacity, seq_len), seq_len)
    return _to_batches(rows, batch_size, eot)
  windows = doc_windows(doc_starts, len(tokens), seq_len=seq_len, stride=stride)
  num_docs = num_scored_docs(doc_starts, len(tokens), num_batches=num_batches, batch_size=batch_size,
                             seq_len=seq_len, stride=stride)
  if num_docs == 0:
    raise ValueError(f"the first validation document needs more than num_batches*batch_size = {capacity} "
                     "windows; raise data.num_valid_batches.")
  windows = [w for w in windows if w[0] < num_docs]
  return _to_batches(_aligned_rows(tokens, doc_starts, windows, seq_len, eot), batch_size, eot)


def doc_lengths(doc_starts: np.ndarray, num_tokens: int) -> np.ndarray:
  """Tokens per document, its EOT included."""
  return np.diff(np.append(np.asarray(doc_starts, np.int64), num_tokens))


def entropy_floor(doc_logps: np.ndarray, doc_token_counts: np.ndarray) -> float:
  """Σ −log p(doc) / Σ tokens(doc), in nats per token: the lowest loss any model can reach.

  `doc_token_counts` count each document's tokens including its EOT.
  """
  return float(-np.sum(np.asarray(doc_logps, np.float64)) / np.sum(doc_token_counts))
