"""Autoregressive sampling: logits processors and one compiled decode loop.

Shapes: B batch, T time (a model window, T <= max_len), L token buffer,
V vocab (padded), C channels.

Each step processes the (B, V) logits of every row's last token in this order:

  1. padding mask: ids >= valid_vocab (the padded tail of V) become -inf;
  2. temperature: logits / t; t = 0 is greedy (only the argmax survives);
  3. top-k: keep the k most likely ids (exactly k, ties broken towards lower ids);
  4. top-p: keep the smallest prefix of the sorted distribution (renormalised
     after top-k) whose mass reaches p; the top id always survives;
  5. sample from the softmax of what is left (argmax when greedy).

This is the order of HF transformers (temperature, top-k, top-p). `top_k=0`
and `top_p=1.0` switch those filters off. Every setting is a traced value, a
scalar or one per row, so changing it never recompiles.

`generate` runs the whole generation as one `lax.while_loop` over a
fixed-size buffer; it compiles once per (B, L, model), the model being a
`Transformer` (its architecture `model.cfg` and execution `model.ex`).
"""

import functools
import statistics
import time
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jaxformer import metrics
from jaxformer.config import round_up
from jaxformer import model as model_lib
from jaxformer import tokenizer as tokenizer_lib
from jaxformer.tokenizer import EOT


class SamplingError(ValueError):
  """A sampling setting or prompt that cannot be used; the message says what to change."""

# Cumulative masses within this of p count as reaching p: float32 rounding of
# e.g. 0.5 + 0.3 must not let a third token into a p = 0.8 nucleus.
TOP_P_TOLERANCE = 1e-6
BUFFER_MULTIPLE = 64


def _per_row(x, B: int, dtype) -> jax.Array:
  """A scalar or (B,) setting as a (B, 1) column that broadcasts over V."""
  return jnp.broadcast_to(jnp.asarray(x, dtype), (B,))[:, None]


def mask_padding(logits: jax.Array, valid_vocab) -> jax.Array:
  """(B, V) -> (B, V) with ids >= valid_vocab at -inf, so nothing samples them."""
  ids = jnp.arange(logits.shape[-1])
  return jnp.where(ids[None, :] < _per_row(valid_vocab, logits.shape[0], jnp.int32),
                   logits, -jnp.inf)


def apply_temperature(logits: jax.Array, temperature) -> jax.Array:
  """logits / t per row; t = 0 keeps only the argmax, without dividing by zero."""
  t = _per_row(temperature, logits.shape[0], jnp.float32)
  scaled = logits / jnp.where(t > 0, t, 1.0)
  ids = jnp.arange(logits.shape[-1])
  greedy = jnp.where(ids[None, :] == jnp.argmax(logits, axis=-1)[:, None], logits, -jnp.inf)
  return jnp.where(t > 0, scaled, greedy)


def _sorted_keep(logits: jax.Array, top_k, top_p) -> jax.Array:
  """(B, V) bool: the ids top-k then top-p keep, from a single sort.

  Working on sorted positions (not a threshold on values) keeps exactly k ids
  even when logits tie at the k-th place.
  """
  B, V = logits.shape
  iota = jnp.broadcast_to(jnp.arange(V, dtype=jnp.int32), (B, V))
  # Stable ascending sort of -logits: descending logits, ties in id order.
  neg_sorted, order = lax.sort((-logits, iota), dimension=1, num_keys=1, is_stable=True)
  sorted_logits = -neg_sorted  # (B, V)
  rank = jnp.arange(V)[None, :]

  k = _per_row(top_k, B, jnp.int32)
  keep = (k <= 0) | (rank < k)  # (B, V) in sorted order

  p = _per_row(top_p, B, jnp.float32)
  probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
  cum = jnp.cumsum(probs, axis=-1)
  mass_before = jnp.concatenate([jnp.zeros((B, 1), cum.dtype), cum[:, :-1]], axis=-1)
  keep &= (p >= 1.0) | (mass_before < p - TOP_P_TOLERANCE)
  keep = keep.at[:, 0].set(True)  # never an empty set

  # Scatter the sorted keep-mask back to id order through the permutation.
  rows = jnp.arange(B)[:, None]
  return jnp.zeros((B, V), bool).at[rows, order].set(keep)


def process_logits(logits: jax.Array, *, temperature, top_k, top_p, valid_vocab) -> jax.Array:
  """(B, V) -> (B, V): padding mask, temperature, top-k, top-p; removed ids are -inf."""
  logits = mask_padding(logits.astype(jnp.float32), valid_vocab)
  logits = apply_temperature(logits, temperature)
  # Temperature is a positive scale, so one sort serves both top-k and top-p.
  return jnp.where(_sorted_keep(logits, top_k, top_p), logits, -jnp.inf)


def sample_logits(keys: jax.Array, logits: jax.Array, *, temperature, top_k, top_p,
                  valid_vocab) -> jax.Array:
  """(B,) keys, (B, V) logits -> (B,) int32 ids, one draw per row with that row's key."""
  processed = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                             valid_vocab=valid_vocab)
  sampled = jax.vmap(jax.random.categorical)(keys, processed)
  B = logits.shape[0]
  greedy = (_per_row(temperature, B, jnp.float32) <= 0) | (_per_row(top_k, B, jnp.int32) == 1)
  return jnp.where(greedy[:, 0], jnp.argmax(processed, axis=-1), sampled).astype(jnp.int32)


def window_buckets(window: int, smallest: int = 32) -> tuple[int, ...]:
  """Static window lengths below `window` for texts still shorter than it: 32, 64, 128, ..."""
  out, b = [], smallest
  while b < window:
    out.append(b)
    b *= 2
  return tuple(out)


def step_lengths(buckets: Sequence[int], window: int) -> tuple[int, ...]:
  """The static lengths a decoding step may run: the buckets below `window`, then the window."""
  return tuple(sorted(b for b in set(buckets) if 0 < b < window)) + (window,)


def decode_loop(logits_fn: Callable[..., jax.Array], tokens: jax.Array,
                prompt_lens: jax.Array, keys: jax.Array, *, window: int, max_new_tokens,
                temperature, top_k, top_p, eos_id, valid_vocab, logits_at: bool = False,
                buckets: Sequence[int] = ()):
  """The generation loop for any causal `logits_fn`: (B, T) ids -> (B, T, V) logits.

  tokens: (B, L) with row b's prompt in [0, prompt_lens[b]). Each step feeds
  the last `window` tokens of every row (the first `window` while the row is
  shorter) and writes the next id at position lengths[b]. A row finishes after
  writing `eos_id` (-1: never), after `max_new_tokens` new ids, or when the
  buffer is full. The id at position i is drawn with fold_in(keys[b], i), so a
  row's ids never depend on the other rows.

  With `logits_at`, logits_fn(ids, positions) returns only the (B, V) logits at
  positions (B,). `buckets` (static lengths below the window) let a step whose
  rows are all shorter than a bucket run only that bucket's first positions:
  by causality those logits do not depend on the ids after them.

  Returns (tokens (B, L), lengths (B,)).
  """
  B, L = tokens.shape
  W = min(window, L)
  buckets = step_lengths(buckets, W)
  rows = jnp.arange(B)
  prompt_lens = prompt_lens.astype(jnp.int32)

  def last_logits(windows, last):  # (B, T) ids, (B,) positions -> (B, V)
    if logits_at:
      return logits_fn(windows, last)
    logits = logits_fn(windows)  # (B, T, V); causal, so ids after the last one don't matter
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]

  def cond(state):
    _, _, done = state
    return ~jnp.all(done)

  def body(state):
    tokens, lengths, done = state
    starts = jnp.maximum(lengths - W, 0)  # (B,); the window slides once a row outgrows it
    windows = jax.vmap(lambda row, s: lax.dynamic_slice(row, (s,), (W,)))(tokens, starts)
    last = lengths - 1 - starts
    if len(buckets) == 1:
      logits = last_logits(windows, last)
    else:
      # The smallest bucket holding every unfinished row's last position. A row shorter
      # than the window starts at 0, so the window's first n ids are its text so far.
      need = jnp.max(jnp.where(done, 0, last + 1))
      index = jnp.sum(need > jnp.asarray(buckets[:-1]))
      # Finished rows may sit past a bucket: clamp them (their ids are never written).
      branches = [functools.partial(lambda n, w, p: last_logits(w[:, :n], jnp.minimum(p, n - 1)), n)
                  for n in buckets]
      logits = lax.switch(index, branches, windows, last)
    step_keys = jax.vmap(jax.random.fold_in)(keys, lengths)
    next_ids = sample_logits(step_keys, logits, temperature=temperature, top_k=top_k,
                             top_p=top_p, valid_vocab=valid_vocab)  # (B,)
    write = ~done
    # Finished rows aim at index L, which mode="drop" ignores.
    tokens = tokens.at[rows, jnp.where(write, lengths, L)].set(next_ids, mode="drop")
    lengths = lengths + write.astype(jnp.int32)
    done = done | (next_ids == eos_id) | (lengths - prompt_lens >= max_new_tokens) | (lengths >= L)
    return tokens, lengths, done

  done = (prompt_lens >= L) | (max_new_tokens <= 0)
  tokens, lengths, _ = lax.while_loop(cond, body, (tokens, prompt_lens, done))
  return tokens, lengths


@functools.partial(jax.jit, static_argnums=(1,))
def _generate(params, model, tokens, prompt_lens, keys, max_new_tokens, temperature, top_k,
              top_p, eos_id, valid_vocab):
  # Only the last position's logits, and only the bucket of positions the text fills.
  logits_fn = lambda x, at: model.apply({"params": params}, x, logits_at=at)
  return decode_loop(logits_fn, tokens, prompt_lens, keys, window=model.cfg.max_len,
                     max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, eos_id=eos_id, valid_vocab=valid_vocab, logits_at=True,
                     buckets=window_buckets(model.cfg.max_len))


def _generate_args(params, model, prompts, prompt_lens, keys, max_new_tokens, temperature,
                   top_k, top_p, eos_id, valid_vocab):
  """Fixes every traced argument's dtype and shape, so Python ints, numpy and jax values
  (scalars or per-row) all hit the same compiled program."""
  tokens = jnp.asarray(prompts, jnp.int32)
  if tokens.ndim != 2:
    raise ValueError(f"prompts must be a (B, L) array of token ids, got shape {tokens.shape}.")
  B, L = tokens.shape
  lens = np.asarray(prompt_lens)
  if lens.shape != (B,):
    raise ValueError(f"prompt_lens must have shape ({B},), got {lens.shape}.")
  if lens.min() < 1 or lens.max() > L:
    raise ValueError(
        f"prompt lengths must be in [1, {L}] (the buffer length), got {lens.tolist()}; "
        "start an empty prompt from the end-of-text token.")
  V = model.cfg.vocab_size
  valid = None if valid_vocab is None else int(valid_vocab)
  if valid is not None and not 1 <= valid <= V:
    raise ValueError(f"valid_vocab must be in [1, {V}], got {valid}.")
  vec = lambda x, dtype: jnp.broadcast_to(jnp.asarray(x, dtype), (B,))
  return (params, model, tokens, jnp.asarray(lens, jnp.int32), keys,
          jnp.asarray(max_new_tokens, jnp.int32), vec(temperature, jnp.float32),
          vec(top_k, jnp.int32), vec(top_p, jnp.float32), jnp.asarray(eos_id, jnp.int32),
          jnp.asarray(V if valid is None else valid, jnp.int32))


def generate(params, model: model_lib.Transformer, prompts, prompt_lens, keys, *,
             max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_id=-1,
             valid_vocab: Optional[int] = None):
  """Samples continuations of left-aligned prompts in a (B, L) buffer.

  prompts: (B, L) int ids, row b's prompt in [0, prompt_lens[b]) (rest ignored).
  keys: (B,) PRNG keys, one per row (e.g. fold_in(key(seed), sample_index)).
  temperature, top_k, top_p: scalars or (B,) per row. eos_id: -1 never stops
  early. valid_vocab: the tokenizer's size; ids from it up to V are never drawn.

  Only B, L and the model (a `Transformer`) are compile-time; the rest are traced.
  Returns (tokens (B, L) int32, lengths (B,) int32); new ids lie in
  [prompt_lens[b], lengths[b]).
  """
  return _generate(*_generate_args(params, model, prompts, prompt_lens, keys, max_new_tokens,
                                   temperature, top_k, top_p, eos_id, valid_vocab))


def row_keys(seed: int, num_rows: int, first_index: int = 0) -> jax.Array:
  """(num_rows,) keys: sample i gets fold_in(key(seed), i) whatever the batch it is in."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(
      jnp.arange(first_index, first_index + num_rows))


def check_settings(*, max_new_tokens, temperature, top_k, top_p) -> None:
  """Raises ValueError with one sentence for a sampling setting out of range."""
  if max_new_tokens < 1:
    raise SamplingError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
  if temperature < 0:
    raise SamplingError(f"temperature must be >= 0 (0 is greedy), got {temperature}.")
  if top_k < 0:
    raise SamplingError(f"top_k must be >= 0 (0 turns it off), got {top_k}.")
  if not 0.0 < top_p <= 1.0:
    raise SamplingError(f"top_p must be in (0, 1] (1 turns it off), got {top_p}.")


def decode_rows(tokenizer, tokens, prompt_lens, lengths, eos_id: Optional[int]) -> list[str]:
  """The text each row generated after its prompt, cut before the first EOS."""
  tokens, prompt_lens, lengths = np.asarray(tokens), np.asarray(prompt_lens), np.asarray(lengths)
  texts = []
  for row, start, end in zip(tokens, prompt_lens, lengths):
    ids = row[start:end].tolist()
    if eos_id is not None and eos_id in ids:
      ids = ids[:ids.index(eos_id)]
    texts.append(tokenizer.decode(ids))
  return texts


def sample_text(params, model: model_lib.Transformer, tokenizer, prompts: Sequence[str], *,
                max_new_tokens: int, temperature: float = 0.8, top_k: int = 0, top_p: float = 0.95,
                seed: int = 0, buffer_len: Optional[int] = None, unknown_chars: str = "error") -> list[str]:
  """Continues each prompt; returns the new text only, without the prompt or EOS.

  `tokenizer` is an HF `tokenizers.Tokenizer`; characters a char tokenizer has
  never seen are refused, or with unknown_chars="unk" read as <|unk|>. An empty prompt starts from the
  end-of-text token, as a document start does in training. Sample i uses the
  key fold_in(key(seed), i). The buffer is (max prompt + max_new_tokens)
  rounded up to a multiple of 64, so most prompt lengths share one compilation;
  a smaller `buffer_len` given here caps prompt plus continuation.
  """
  check_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
  if isinstance(prompts, str):
    raise SamplingError("prompts must be a list of strings, not one string; wrap it in a list.")
  if not prompts:
    raise SamplingError("prompts is empty; pass at least one prompt (\"\" starts from end-of-text).")
  eos_id = tokenizer.token_to_id(EOT)
  valid_vocab = tokenizer.get_vocab_size()
  if valid_vocab > model.cfg.vocab_size:
    raise SamplingError(
        f"the tokenizer has {valid_vocab} ids but the model only {model.cfg.vocab_size}; "
        "use the tokenizer the model was trained with.")
  encoded = []
  for i, text in enumerate(prompts):
    what = f"prompt {i}" if len(set(prompts)) > 1 else "the prompt"  # one prompt repeated for every sample
    ids = tokenizer_lib.encode(tokenizer, text, unknown_chars, what=what)
    if not ids:
      if eos_id is None:
        raise SamplingError(f"prompt {i} is empty and the tokenizer has no {EOT} token to start from; "
                         "give a non-empty prompt.")
      ids = [eos_id]
    encoded.append(ids)
  longest = max(len(ids) for ids in encoded)
  L = buffer_len or round_up(longest + max_new_tokens, BUFFER_MULTIPLE)
  for i, ids in enumerate(encoded):
    if len(ids) >= L:
      raise SamplingError(
          f"prompt {i} is {len(ids)} tokens, which leaves no room in a buffer of {L}; "
          "shorten the prompt or raise buffer_len.")
  B = len(encoded)
  buffer = np.zeros((B, L), np.int32)
  for b, ids in enumerate(encoded):
    buffer[b, :len(ids)] = ids
  prompt_lens = np.array([len(ids) for ids in encoded], np.int32)
  tokens, lengths = generate(
      params, model, buffer, prompt_lens, row_keys(seed, B), max_new_tokens=max_new_tokens,
      temperature=temperature, top_k=top_k, top_p=top_p,
      eos_id=-1 if eos_id is None else eos_id, valid_vocab=valid_vocab)
  return decode_rows(tokenizer, tokens, prompt_lens, lengths, eos_id)


def decode_flops(model: model_lib.Transformer, prompt_len: int, new_tokens: int,
                 buffer_len: int) -> float:
  """Matmul FLOPs per row of `_generate` writing `new_tokens` after `prompt_len`.

  Each step runs the smallest bucket holding the text (the window once it is full),
  the last position's logits only.
  """
  cfg = model.cfg
  W = min(cfg.max_len, buffer_len)
  buckets = step_lengths(window_buckets(cfg.max_len), W)
  total = 0.0
  for n in range(prompt_len, prompt_len + new_tokens):  # n ids so far
    positions = next(b for b in buckets if b >= min(n, W))
    total += metrics.forward_flops(cfg, positions, last_only=True, kernels=model.ex.kernels)
  return total


def benchmark_generation(model: model_lib.Transformer, batch_size: int, prompt_len: int,
                         new_tokens: int, repeats: int = 3, seed: int = 0) -> dict:
  """Times `generate` on random weights: compile seconds apart from run tokens/s.

  EOS is off, so every row writes exactly `new_tokens` ids.
  tokens_per_s = batch_size * new_tokens / median run seconds.
  """
  B = batch_size
  L = round_up(prompt_len + new_tokens, BUFFER_MULTIPLE)
  init_len = min(L, model.cfg.max_len)
  params = nn.unbox(jax.jit(model.init)(
      jax.random.key(seed), jnp.zeros((1, init_len), jnp.int32))["params"])
  prompts = jax.random.randint(jax.random.key(seed + 1), (B, L), 0, model.cfg.vocab_size)
  args = _generate_args(params, model, prompts, np.full((B,), prompt_len), row_keys(seed, B),
                        new_tokens, 1.0, 0, 1.0, -1, None)
  t0 = time.perf_counter()
  compiled = _generate.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  dynamic = args[:1] + args[2:]  # the compiled program takes no static model
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(*dynamic))  # the first run also allocates; not timed
  first_run_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    tokens, lengths = compiled(*dynamic)
    jax.block_until_ready((tokens, lengths))
    times.append(time.perf_counter() - t0)
  if not np.all(np.asarray(lengths) == prompt_len + new_tokens):
    raise RuntimeError(f"benchmark rows stopped early: lengths {np.asarray(lengths).tolist()}.")
  median = statistics.median(times)
  flops = decode_flops(model, prompt_len, new_tokens, L)
  return {
      "batch_size": B, "prompt_len": prompt_len, "new_tokens": new_tokens, "buffer_len": L,
      "window": min(L, model.cfg.max_len), "compile_s": compile_s, "first_run_s": first_run_s,
      "run_s": times,
      "median_s": median, "tokens_per_s": B * new_tokens / median,
      "ms_per_step": 1000.0 * median / new_tokens, "device": str(jax.devices()[0].platform),
      # The work the loop must do per new token (see decode_flops), and at what rate.
      "flops_per_token": flops / new_tokens, "flops_per_s": B * flops / median,
  }
