"""Tests for jaxformer.sampling: processors against numpy, the decode loop, sample_text."""

import dataclasses
import functools
import string

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from jaxformer import config as config_lib
from jaxformer import metrics
from jaxformer import model as model_lib
from jaxformer import sampling

V, VALID, MAX_LEN = 64, 60, 16
B, L = 3, 32  # the one (B, L) most loop tests share, so `generate` compiles once for them


# --- numpy references ---------------------------------------------------------

def ref_process(logits, temperature, top_k, top_p, valid_vocab):
  """One row, float64: padding mask, temperature, top-k, top-p, written out plainly."""
  x = np.asarray(logits, np.float64).copy()
  n = x.shape[-1]
  x[valid_vocab:] = -np.inf
  if temperature == 0:
    best = int(np.argmax(x))
    x = np.where(np.arange(n) == best, x, -np.inf)
  else:
    x = x / temperature
  order = np.argsort(-x, kind="stable")  # descending, ties by lower id
  if top_k > 0:
    drop = order[min(top_k, n):]
    x[drop] = -np.inf
  if top_p < 1.0:
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    sorted_probs = probs[order]
    before = np.cumsum(sorted_probs) - sorted_probs
    keep_sorted = before < top_p
    keep_sorted[0] = True
    keep = np.zeros(n, bool)
    keep[order[keep_sorted]] = True
    x = np.where(keep, x, -np.inf)
  return x


def softmax(x):
  e = np.exp(x - np.max(x))
  return e / e.sum()


# Every setting traced: one compile per shape, much faster than op-by-op.
_process = jax.jit(sampling.process_logits)
_sample = jax.jit(sampling.sample_logits)


def process(logits, **kw):
  kw.setdefault("valid_vocab", logits.shape[-1])
  return np.asarray(_process(jnp.asarray(logits, jnp.float32), **kw))


def kept(row):
  return set(np.flatnonzero(np.isfinite(row)).tolist())


# --- fixtures -----------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
  """The tiny model with the default execution (the CPU kernels)."""
  c = config_lib.base_config()
  c.model.update(dict(num_layers=2, num_heads=2, embed_dim=32, max_len=MAX_LEN, vocab_size=V))
  return model_lib.Transformer(config_lib.model_config(c), config_lib.execution(c))


@pytest.fixture(scope="module")
def params(model):
  p = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, MAX_LEN), jnp.int32))["params"])
  # A larger (tied) embedding makes the logits decisive, so greedy never rests on a near tie.
  return {**p, "embed": {"embedding": p["embed"]["embedding"] * 10.0}}


@pytest.fixture(scope="module")
def char_tok():
  """59 characters + EOT = 60 ids, the VALID of the tiny model."""
  chars = sorted(string.ascii_letters + " .,!?'\n")
  vocab = {ch: i for i, ch in enumerate(chars)}
  vocab[sampling.EOT] = len(vocab)
  tok = Tokenizer(models.WordLevel(vocab, unk_token=sampling.EOT))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens([sampling.EOT])
  assert tok.get_vocab_size() == VALID
  return tok


@functools.lru_cache
def _forward(model):
  # jit per window length: eager op-by-op Flax is far slower for this many steps.
  return jax.jit(lambda params, x: model.apply({"params": params}, x))


def python_greedy(params, model, prompt, num_new, valid_vocab):
  """The guide's loop: crop to the last max_len ids, full forward, argmax, append."""
  seq = list(prompt)
  for _ in range(num_new):
    window = jnp.asarray([seq[-model.cfg.max_len:]], jnp.int32)
    logits = np.array(_forward(model)(params, window))[0, -1]
    logits[valid_vocab:] = -np.inf
    seq.append(int(np.argmax(logits)))
  return seq


def buffer_of(prompts, length=L):
  buf = np.zeros((len(prompts), length), np.int32)
  for b, p in enumerate(prompts):
    buf[b, :len(p)] = p
  return buf, np.array([len(p) for p in prompts], np.int32)


# --- processors ---------------------------------------------------------------

def test_padding_ids_masked_even_for_greedy():
  logits = np.zeros((2, V), np.float32)
  logits[:, VALID:] = 100.0  # the padded tail would win every contest
  logits[0, 5] = 1.0
  out = process(logits, temperature=0.0, top_k=0, top_p=1.0, valid_vocab=VALID)
  assert kept(out[0]) == {5}
  out = process(logits, temperature=1.0, top_k=0, top_p=1.0, valid_vocab=VALID)
  assert kept(out[1]) == set(range(VALID))
  ids = _sample(jax.random.split(jax.random.key(0), 2), jnp.asarray(logits),
                               temperature=0.0, top_k=0, top_p=1.0, valid_vocab=VALID)
  assert np.asarray(ids).tolist() == [5, 0]


def test_temperature_matches_reference_and_zero_is_greedy():
  logits = np.random.default_rng(0).normal(size=(4, V)).astype(np.float32)
  for t in (0.5, 1.0, 2.0):
    out = process(logits, temperature=t, top_k=0, top_p=1.0)
    np.testing.assert_allclose(out, logits / t, rtol=1e-6)
  out = process(logits, temperature=0.0, top_k=0, top_p=1.0)
  assert np.all(np.isfinite(out).sum(-1) == 1)
  np.testing.assert_array_equal(np.argmax(out, -1), np.argmax(logits, -1))
  assert not np.any(np.isnan(out))


def test_top_k_keeps_exactly_k_with_ties():
  rng = np.random.default_rng(1)
  logits = rng.integers(0, 4, size=(8, V)).astype(np.float32)  # heavy ties
  for k in (1, 2, 3, 7, 20, 63):
    out = process(logits, temperature=1.0, top_k=k, top_p=1.0)
    assert np.all(np.isfinite(out).sum(-1) == k), k
    for row, ref_row in zip(out, logits):
      assert kept(row) == kept(ref_process(ref_row, 1.0, k, 1.0, V))


def test_top_k_edge_cases():
  logits = np.random.default_rng(2).normal(size=(3, V)).astype(np.float32)
  for k in (0, V, V + 10):  # off, and k >= V is a no-op
    np.testing.assert_array_equal(process(logits, temperature=1.0, top_k=k, top_p=1.0), logits)
  out = process(logits, temperature=1.0, top_k=1, top_p=1.0)
  for row, ref_row in zip(out, logits):
    assert kept(row) == {int(np.argmax(ref_row))}
  ids = _sample(jax.random.split(jax.random.key(3), 3), jnp.asarray(logits),
                               temperature=5.0, top_k=1, top_p=1.0, valid_vocab=V)
  np.testing.assert_array_equal(ids, np.argmax(logits, -1))


def test_top_p_random_logits_match_reference():
  logits = np.random.default_rng(3).normal(size=(16, V)).astype(np.float32) * 2.0
  for p in (0.05, 0.3, 0.5, 0.9, 0.99):
    out = process(logits, temperature=1.0, top_k=0, top_p=p)
    for row, ref_row in zip(out, logits):
      ref = ref_process(ref_row, 1.0, 0, p, V)
      assert kept(row) == kept(ref), p
      np.testing.assert_allclose(row[np.isfinite(row)], ref[np.isfinite(ref)], rtol=1e-6)


def test_top_p_exact_crossing():
  logits = np.full((1, 8), -np.inf, np.float32)
  logits[0, :3] = np.log([0.5, 0.3, 0.2])
  keeps = lambda p: kept(process(logits, temperature=1.0, top_k=0, top_p=p)[0])
  assert keeps(0.8) == {0, 1}  # 0.5 + 0.3 reaches 0.8 exactly: the third is not needed
  assert keeps(0.80001) == {0, 1, 2}
  assert keeps(0.5) == {0}
  assert keeps(0.50001) == {0, 1}
  assert keeps(1e-9) == {0}  # never empty
  assert keeps(1.0) == {0, 1, 2}
  # Masses that reach p exactly in real numbers; float32 lands some a hair below p
  # (the first two do on CPU), which must still count as reaching it.
  for weights, p, n in [([19, 18, 14, 13, 10, 6], 0.8, 4), ([18, 18, 14, 4, 4, 2], 0.3, 1),
                        ([6, 3, 1], 0.9, 2), ([7, 2, 1], 0.9, 2), ([1] * 10, 0.7, 7)]:
    row = np.full((1, 16), -np.inf, np.float32)
    row[0, :len(weights)] = np.log(np.array(weights) / sum(weights))
    assert kept(process(row, temperature=1.0, top_k=0, top_p=p)[0]) == set(range(n)), weights
    assert kept(process(row, temperature=1.0, top_k=0, top_p=p + 1e-5)[0]) == set(range(n + 1))


def test_order_temperature_then_top_k_then_top_p():
  # top-p sees the distribution renormalised after top-k: [.4, .3] -> [.57, .43], so p=0.5
  # keeps one id (top-p first would have kept two).
  logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1]], np.float32))
  assert kept(process(logits, temperature=1.0, top_k=2, top_p=0.5)[0]) == {0}
  # top-p sees the tempered distribution: at t=3, 0.6 flattens to 0.43 < 0.55, so two ids.
  logits = np.log(np.array([[0.6, 0.3, 0.1]], np.float32))
  assert kept(process(logits, temperature=1.0, top_k=0, top_p=0.55)[0]) == {0}
  assert kept(process(logits, temperature=3.0, top_k=0, top_p=0.55)[0]) == {0, 1}
  # The whole chain against the reference on random rows.
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(12, V)).astype(np.float32) * 3.0
  for t, k, p in [(0.7, 10, 0.9), (1.5, 5, 0.6), (1.0, 0, 0.8), (0.0, 4, 0.5), (2.0, 40, 1.0)]:
    out = process(logits, temperature=t, top_k=k, top_p=p, valid_vocab=VALID)
    for row, ref_row in zip(out, logits):
      ref = ref_process(ref_row, t, k, p, VALID)
      assert kept(row) == kept(ref), (t, k, p)
      np.testing.assert_allclose(row[np.isfinite(row)], ref[np.isfinite(ref)], rtol=1e-5)


def test_per_row_settings_equal_scalar_calls():
  logits = np.random.default_rng(5).normal(size=(4, V)).astype(np.float32)
  t, k, p = [0.0, 0.5, 1.0, 2.0], [0, 3, 10, 1], [0.9, 1.0, 0.5, 0.7]
  out = process(logits, temperature=np.array(t), top_k=np.array(k), top_p=np.array(p),
                valid_vocab=VALID)
  for b in range(4):
    np.testing.assert_array_equal(
        out[b], process(logits[b:b + 1], temperature=t[b], top_k=k[b], top_p=p[b],
                        valid_vocab=VALID)[0])


@pytest.mark.parametrize("t,k,p", [(1.0, 0, 1.0), (0.7, 6, 1.0), (1.3, 0, 0.8)])
def test_sampled_frequencies_match_processed_distribution(t, k, p):
  n = 40000
  logits = np.random.default_rng(6).normal(size=(16,)).astype(np.float32)
  logits[12:] += 3.0  # padding ids 12.. are the likeliest and must never appear
  keys = jax.random.split(jax.random.key(7), n)
  draw = jax.jit(functools.partial(sampling.sample_logits, valid_vocab=12))
  ids = np.asarray(draw(keys, jnp.broadcast_to(jnp.asarray(logits), (n, 16)),
                        temperature=t, top_k=k, top_p=p))
  freq = np.bincount(ids, minlength=16) / n
  expected = softmax(ref_process(logits, t, k, p, 12))
  # One binomial sd is at most sqrt(0.25 / 40000) = 0.0025; allow 4 of them.
  assert np.max(np.abs(freq - expected)) < 0.01
  assert np.all(freq[expected == 0] == 0)


# --- the loop -----------------------------------------------------------------

def test_greedy_matches_python_loop_past_max_len(params, model):
  # Prompts of 10+ ids keep the reference's per-length compilations few; the growing
  # window from one id is covered by the stub-model test below.
  prompts = [list(range(1, 11)), list(range(5, 17)), list(range(20, 33))]
  buf, lens = buffer_of(prompts)
  tokens, lengths = sampling.generate(
      params, model, buf, lens, sampling.row_keys(0, B), max_new_tokens=21, temperature=0.0,
      eos_id=-1, valid_vocab=VALID)
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  # Row 0 stops after 21 new ids; rows 1 and 2 stop when the buffer of 32 is full.
  np.testing.assert_array_equal(lengths, [31, 32, 32])
  assert lengths.min() > MAX_LEN  # every row ran past the context, so the window slid
  for b, prompt in enumerate(prompts):
    ref = python_greedy(params, model, prompt, lengths[b] - len(prompt), VALID)
    np.testing.assert_array_equal(tokens[b, :lengths[b]], ref)


def test_no_recompilation_across_prompts_and_settings(params, model):
  buf, lens = buffer_of([[1, 2], [3], [4, 5, 6]])
  sampling.generate(params, model, buf, lens, sampling.row_keys(0, B), max_new_tokens=3)
  size = sampling._generate._cache_size()
  settings = [
      dict(max_new_tokens=5, temperature=0.0, top_k=0, top_p=1.0, eos_id=-1, valid_vocab=VALID),
      dict(max_new_tokens=np.int32(9), temperature=0.7, top_k=5, top_p=0.9, eos_id=3,
           valid_vocab=V),
      dict(max_new_tokens=jnp.int32(2), temperature=jnp.float32(1.3), top_k=np.int64(1),
           top_p=0.5, eos_id=7, valid_vocab=VALID),
      dict(max_new_tokens=20, temperature=np.array([0.0, 1.0, 2.0]), top_k=np.array([0, 3, 9]),
           top_p=np.array([1.0, 0.8, 0.3]), eos_id=0, valid_vocab=VALID),
  ]
  prompt_sets = [[[9] * 7, [1], [2, 3]], [[1] * 20, list(range(30)), [5]], [[4], [4], [4]]]
  for seed, (kw, prompts) in enumerate(zip(settings, prompt_sets + [prompt_sets[0]])):
    buf, lens = buffer_of(prompts)
    jax.block_until_ready(sampling.generate(params, model, buf, lens,
                                            sampling.row_keys(seed, B), **kw))
  assert sampling._generate._cache_size() == size


def test_mixed_length_batch_equals_rows_alone(params, model):
  prompts = [[1, 2], list(range(3, 12)), [20, 21, 22, 23, 24]]
  keys = sampling.row_keys(11, B)
  kw = dict(max_new_tokens=25, temperature=1.0, top_k=20, top_p=0.9, eos_id=-1,
            valid_vocab=VALID)
  buf, lens = buffer_of(prompts)
  tokens, lengths = map(np.asarray, sampling.generate(params, model, buf, lens, keys, **kw))
  for b, prompt in enumerate(prompts):
    one_buf, one_len = buffer_of([prompt])
    alone, alone_len = map(np.asarray, sampling.generate(params, model, one_buf, one_len,
                                                        keys[b:b + 1], **kw))
    assert alone_len[0] == lengths[b]
    np.testing.assert_array_equal(alone[0, :alone_len[0]], tokens[b, :lengths[b]])
  assert np.all(tokens[:, :lengths.min()].max() < VALID)
  # Different keys give different samples (the loop is really sampling).
  other, _ = sampling.generate(params, model, buf, lens, sampling.row_keys(12, B), **kw)
  assert not np.array_equal(np.asarray(other), tokens)


def _stub_loop(logits_fn, window):
  return jax.jit(functools.partial(sampling.decode_loop, logits_fn, window=window))


def test_eos_stopping_and_buffer_end_with_stub_model():
  # next id = last id + 1; the padded ids carry the largest logits and must still never win.
  def logits_fn(w):  # (B, T) -> (B, T, V)
    ids = jnp.arange(V)
    big = 30.0 * jax.nn.one_hot((w + 1) % VALID, V)
    return big + 100.0 * (ids >= VALID)
  loop = _stub_loop(logits_fn, window=8)
  eos = 7
  buf, lens = buffer_of([[3], [10, 11], list(range(20, 20 + L - 2))])
  for t in (0.0, 1.0):
    tokens, lengths = map(np.asarray, loop(
        jnp.asarray(buf), jnp.asarray(lens), sampling.row_keys(0, B), max_new_tokens=5,
        temperature=t, top_k=0, top_p=1.0, eos_id=eos, valid_vocab=VALID))
    np.testing.assert_array_equal(tokens[0, :6], [3, 4, 5, 6, 7, 0])  # EOS written, then stop
    np.testing.assert_array_equal(tokens[1, :8], [10, 11, 12, 13, 14, 15, 16, 0])  # 5 new ids
    np.testing.assert_array_equal(tokens[2, L - 3:], [49, 50, 51])  # two ids fill the buffer
    np.testing.assert_array_equal(lengths, [5, 7, L])
  # eos_id=-1 never stops early.
  _, lengths = loop(jnp.asarray(buf), jnp.asarray(lens), sampling.row_keys(0, B),
                    max_new_tokens=5, temperature=0.0, top_k=0, top_p=1.0, eos_id=-1,
                    valid_vocab=VALID)
  np.testing.assert_array_equal(lengths, [6, 7, L])


def test_sliding_window_with_stub_model():
  W = 8

  def logits_fn(w):  # position t sees its own id and the window's first id (still causal)
    nxt = (w + 3 * w[:, :1] + 1) % 50
    return 10.0 * jax.nn.one_hot(nxt, V)

  def reference(prompt, n):
    seq = list(prompt)
    for _ in range(n):
      win = seq[-W:]
      seq.append((win[-1] + 3 * win[0] + 1) % 50)
    return seq

  prompts = [[1], [2, 9, 4], list(range(30, 42))]  # the last starts longer than the window
  buf, lens = buffer_of(prompts)
  tokens, lengths = map(np.asarray, _stub_loop(logits_fn, W)(
      jnp.asarray(buf), jnp.asarray(lens), sampling.row_keys(0, B), max_new_tokens=17,
      temperature=0.0, top_k=0, top_p=1.0, eos_id=-1, valid_vocab=VALID))
  for b, prompt in enumerate(prompts):
    np.testing.assert_array_equal(tokens[b, :lengths[b]], reference(prompt, lengths[b] - len(prompt)))
  np.testing.assert_array_equal(lengths, [18, 20, 29])


def test_bucketed_loop_equals_full_window_loop():
  """A causal stub that reads its whole window: buckets must not change one id."""
  Vs, W = 16, 20

  def logits_fn(w):  # position t: (sum of ids up to t + t) mod V, so every earlier id matters
    nxt = (jnp.cumsum(w, axis=1) + jnp.arange(w.shape[1])) % Vs
    return 10.0 * jax.nn.one_hot(nxt, Vs)

  buf = np.zeros((3, 48), np.int32)
  buf[0, :1], buf[1, :3], buf[2, :25] = [4], [1, 2, 3], np.arange(25) % Vs
  lens = np.array([1, 3, 25], np.int32)
  kw = dict(window=W, max_new_tokens=30, temperature=0.0, top_k=0, top_p=1.0, eos_id=-1,
            valid_vocab=Vs)
  run = lambda b: jax.jit(lambda t, l, k: sampling.decode_loop(logits_fn, t, l, k, buckets=b, **kw))(
      jnp.asarray(buf), jnp.asarray(lens), sampling.row_keys(0, 3))
  (t1, l1), (t2, l2) = run(()), run((4, 8, 16))
  np.testing.assert_array_equal(l1, l2)
  np.testing.assert_array_equal(t1, t2)
  assert sampling.window_buckets(256) == (32, 64, 128) and sampling.window_buckets(32) == ()


def test_decode_flops_follow_the_buckets_and_kernels(model):
  # max_len 16: no buckets below it, so every step runs the window (up to the buffer's 16).
  f = lambda T, kernels: metrics.forward_flops(model.cfg, T, last_only=True, kernels=kernels)
  assert sampling.decode_flops(model, 3, 4, 64) == 4 * f(16, "cpu")
  assert sampling.decode_flops(model, 3, 4, 8) == 4 * f(8, "cpu")
  reference = model_lib.Transformer(model.cfg, model_lib.Execution(kernels="reference"))
  assert sampling.decode_flops(reference, 3, 4, 64) == 4 * f(16, "reference")


def test_generate_rejects_bad_prompt_lengths(params, model):
  buf, _ = buffer_of([[1], [2], [3]])
  with pytest.raises(ValueError, match="prompt lengths"):
    sampling.generate(params, model, buf, np.array([1, 0, 2]), sampling.row_keys(0, B),
                      max_new_tokens=3)
  with pytest.raises(ValueError, match="prompt lengths"):
    sampling.generate(params, model, buf, np.array([1, L + 1, 2]), sampling.row_keys(0, B),
                      max_new_tokens=3)


# --- sample_text ----------------------------------------------------------------

def test_sample_text_matches_generate(params, model, char_tok):
  eos = char_tok.token_to_id(sampling.EOT)
  prompts = ["Hello", ""]  # "" starts from EOT
  kw = dict(temperature=0.9, top_k=12, top_p=0.95)
  out = sampling.sample_text(params, model, char_tok, prompts, max_new_tokens=12, seed=4, **kw)
  # The same ids by hand: buffer 64 (5 + 12 rounded up), sample i keyed by fold_in(seed, i).
  buf, lens = buffer_of([char_tok.encode("Hello").ids, [eos]], length=64)
  tokens, lengths = map(np.asarray, sampling.generate(
      params, model, buf, lens, sampling.row_keys(4, 2), max_new_tokens=12, eos_id=eos,
      valid_vocab=VALID, **kw))
  for b, text in enumerate(out):
    new = tokens[b, lens[b]:lengths[b]].tolist()
    if eos in new:
      assert new.index(eos) == len(new) - 1  # EOS is the last id written
      new = new[:-1]
    assert text == char_tok.decode(new)
    assert sampling.EOT not in text


def test_sample_text_reuses_compilation_and_seeds(params, model, char_tok):
  kw = dict(max_new_tokens=10, temperature=1.0, top_k=10, top_p=0.9)
  a = sampling.sample_text(params, model, char_tok, ["ab", "c"], seed=1, **kw)
  size = sampling._generate._cache_size()
  b = sampling.sample_text(params, model, char_tok, ["ab", "c"], seed=1, **kw)
  c = sampling.sample_text(params, model, char_tok, ["A longer prompt.", "x"], seed=2,
                           max_new_tokens=30, temperature=0.5, top_k=0, top_p=1.0)
  assert sampling._generate._cache_size() == size
  assert a == b
  assert all(isinstance(s, str) and len(s) <= 30 for s in a + c)


def test_decode_rows_strips_prompt_and_eos(char_tok):
  eos = char_tok.token_to_id(sampling.EOT)
  enc = lambda s: char_tok.encode(s).ids
  row0 = enc("hi") + enc("abc") + [eos] + enc("zz")
  row1 = enc("x") + enc("yes")
  tokens = np.zeros((2, 12), np.int32)
  tokens[0, :len(row0)], tokens[1, :len(row1)] = row0, row1
  out = sampling.decode_rows(char_tok, tokens, [2, 1], [len(row0), len(row1)], eos)
  assert out == ["abc", "yes"]


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(buffer_len=4), "prompt 1 is 5 tokens"),
])
def test_sample_text_validation(params, model, char_tok, kw, match):
  kw = {"max_new_tokens": 4, **kw}
  with pytest.raises(ValueError, match=match):
    sampling.sample_text(params, model, char_tok, ["ab", "hello"], **kw)


def test_sample_text_rejects_larger_tokenizer(params, model, char_tok):
  small = model_lib.Transformer(dataclasses.replace(model.cfg, vocab_size=32), model.ex)
  with pytest.raises(ValueError, match="tokenizer has 60 ids"):
    sampling.sample_text(params, small, char_tok, ["a"], max_new_tokens=2)


def test_benchmark_generation_reports(model):
  stats = sampling.benchmark_generation(model, batch_size=2, prompt_len=3, new_tokens=6, repeats=2)
  assert stats["buffer_len"] == 64 and stats["window"] == MAX_LEN
  assert stats["compile_s"] > 0 and len(stats["run_s"]) == 2
  assert stats["tokens_per_s"] == pytest.approx(2 * 6 / stats["median_s"])


def test_tie_rules_against_hf_warpers_on_one_tied_row():
  """Where ties make our top-k/top-p keep other ids than HF transformers' warpers (README, Sampling).

  HF's sets are what transformers 5.25's TopKLogitsWarper(2) and TopPLogitsWarper(0.5)
  returned on these rows (run once beside the tests: torch is not a dependency);
  the one-line rules below are theirs: top-k keeps every score >= the k-th largest,
  top-p drops the ascending-sorted ids whose cumulative mass is <= 1 - p.
  """
  row = np.array([2.0, 1.0, 3.0, 3.0, 3.0, 0.0], np.float32)
  hf_top_k = set(np.flatnonzero(row >= np.sort(row)[-2]).tolist())
  assert hf_top_k == {2, 3, 4}  # every id tied at the 2nd value
  ours = process(np.pad(row, (0, V - 6), constant_values=-9.0)[None], temperature=1.0, top_k=2, top_p=1.0)[0]
  assert kept(ours) == {2, 3}  # exactly k, lower ids first

  probs = np.array([0.3, 0.3, 0.3, 0.1])
  ascending = np.argsort(probs, kind="stable")
  hf_top_p = set(ascending[np.cumsum(probs[ascending]) > 1 - 0.5].tolist())
  assert hf_top_p == {1, 2}  # the ids that come last in its ascending sort: the higher tied ids
  logits = np.pad(np.log(probs).astype(np.float32), (0, V - 4), constant_values=-np.inf)[None]
  ours = process(logits, temperature=1.0, top_k=0, top_p=0.5)[0]
  assert kept(ours) == {0, 1}  # the same count, the lower tied ids
