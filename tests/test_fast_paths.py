"""The fast paths against their references: blocked attention vs plain, gelu vs jax.nn.gelu.

Forward outputs and gradients must agree to float32 tolerance on every positional
encoding, with and without a sliding window, and for blocks that do not divide T.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import config as config_lib
from jaxformer import model as M

V, T = 64, 24


def small_cfg(**overrides) -> M.ModelConfig:
  m = config_lib.base_config().model
  m.update(dict(vocab_size=V, num_layers=2, num_heads=4, embed_dim=32, max_len=32))
  m.update(overrides)
  return M.model_config(m)


def tokens(seed, B=2, length=T):
  return jax.random.randint(jax.random.key(seed), (B, length), 0, V)


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def plain(q, k, v, window):
  return M.plain_attention(q, k, v, window=window, dropout_rate=0.0, dropout_rng=None,
                           deterministic=True)


@pytest.mark.parametrize("T_,block,window,rows", [
    (24, 8, 0, None), (23, 5, 6, 2), (24, 64, 0, None), (17, 4, 1, 1), (24, 8, 30, 2)])
def test_blocked_attention_matches_plain(T_, block, window, rows):
  B, H, D = 4, 3, 8
  q, k, v, g = (jax.random.normal(key, (B, T_, H, D)) for key in jax.random.split(jax.random.key(0), 4))
  ours = lambda q, k, v: M.blocked_attention(q, k, v, window=window, block=block, chunk_rows=rows)
  ref = lambda q, k, v: plain(q, k, v, window)
  np.testing.assert_allclose(jax.jit(ours)(q, k, v), ref(q, k, v), rtol=1e-5, atol=2e-6)
  grads = lambda f: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * g), argnums=(0, 1, 2))(q, k, v)
  assert_trees_close(jax.jit(lambda: grads(ours))(), grads(ref))


def _model_loss_and_grads(cfg, params, x):
  def loss(p):
    logits = M.Transformer(cfg).apply({"params": p}, x)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("pe,window", [("learned", 0), ("sinusoidal", 5), ("rope", 5), ("rope", 0)])
def test_blocked_model_matches_plain_model(pe, window, monkeypatch):
  monkeypatch.setattr(M, "ATTENTION_BLOCK", 8)  # T=24: three query blocks, two skipped ones
  ref_cfg = small_cfg(pos_encoding=pe, sliding_window=window, attention="plain", num_layers=1)
  cfg = small_cfg(pos_encoding=pe, sliding_window=window, attention="blocked", num_layers=1)
  params = M.init_params(ref_cfg, jax.random.key(1))
  x = tokens(2)
  np.testing.assert_allclose(M.Transformer(cfg).apply({"params": params}, x),
                             M.Transformer(ref_cfg).apply({"params": params}, x), rtol=1e-5, atol=1e-5)
  (l1, g1), (l2, g2) = _model_loss_and_grads(cfg, params, x), _model_loss_and_grads(ref_cfg, params, x)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  assert_trees_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_blocked_is_the_default_and_plain_stays_selectable():
  assert config_lib.base_config().model.attention == "blocked"
  assert small_cfg(attention="plain").attention == "plain"


def test_blocked_with_weight_dropout_falls_back_to_plain():
  cfg = small_cfg(attn_dropout=0.1)  # the default attention, "blocked"
  ref_cfg = small_cfg(attn_dropout=0.1, attention="plain")
  params = M.init_params(cfg, jax.random.key(0))
  x, rngs = tokens(3), {"dropout": jax.random.key(4)}
  np.testing.assert_array_equal(
      M.Transformer(cfg).apply({"params": params}, x, train=True, rngs=rngs),
      M.Transformer(ref_cfg).apply({"params": params}, x, train=True, rngs=rngs))


def test_blocked_bfloat16_is_close_to_plain():
  cfg, ref_cfg = small_cfg(dtype="bfloat16"), small_cfg(dtype="bfloat16", attention="plain")
  params = M.init_params(cfg, jax.random.key(0))
  out = M.Transformer(cfg).apply({"params": params}, tokens(5))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, M.Transformer(ref_cfg).apply({"params": params}, tokens(5)), atol=0.05)


def test_gelu_matches_jax_exact_gelu():
  x = jnp.linspace(-12.0, 12.0, 200_001, dtype=jnp.float32)
  ref = lambda x: jax.nn.gelu(x, approximate=False)
  # 1 + erf(x/√2) loses relative accuracy where GELU itself is below 1e-6 (x < -4.7).
  np.testing.assert_allclose(jax.jit(M.gelu)(x), ref(x), rtol=1e-6, atol=1e-6)
  dx = lambda f: jax.jit(jax.vmap(jax.grad(f)))(x)
  np.testing.assert_allclose(dx(M.gelu), dx(ref), rtol=1e-6, atol=1e-6)
  # The textbook values, in float64 through math.erf.
  for v in (-3.0, -1.0, -0.1, 0.0, 0.5, 2.0):
    assert float(M.gelu(jnp.float32(v))) == pytest.approx(0.5 * v * (1 + math.erf(v / math.sqrt(2))), abs=2e-7)


@pytest.mark.parametrize("use_bias", [True, False])
def test_layer_norm_matches_flax(use_bias):
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(0), (3, 7, 16)) * 3 + 1
  g = jax.random.normal(jax.random.key(1), (3, 7, 16))
  ref = nn.LayerNorm(epsilon=1e-5, use_bias=use_bias, dtype=jnp.float32)
  ours = M.LayerNorm(epsilon=1e-5, use_bias=use_bias)
  params = ref.init(jax.random.key(2), x)["params"]
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      nn.meta.unbox(ours.init(jax.random.key(2), x)["params"]))
  params = jax.tree_util.tree_map(lambda p: p + 0.3, params)
  grads = lambda m: jax.grad(lambda p, x: jnp.sum(m.apply({"params": p}, x) * g), argnums=(0, 1))(params, x)
  np.testing.assert_allclose(ours.apply({"params": params}, x), ref.apply({"params": params}, x),
                             rtol=1e-5, atol=1e-6)
  assert_trees_close(grads(ours), grads(ref), rtol=1e-5, atol=1e-5)


def test_bfloat16_matmuls_stay_close_to_float32():
  cfg, mixed = small_cfg(), small_cfg(matmul_dtype="bfloat16")
  params = M.init_params(cfg, jax.random.key(3))
  x = tokens(4)
  (l1, g1), (l2, g2) = _model_loss_and_grads(cfg, params, x), _model_loss_and_grads(mixed, params, x)
  np.testing.assert_allclose(l1, l2, rtol=1e-3)
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(g2))
  assert_trees_close(g1, g2, rtol=0.1, atol=2e-3)
  with pytest.raises(config_lib.ConfigError, match="model.matmul_dtype must be"):
    small_cfg(matmul_dtype="int8")


def test_gelu_model_matches_jax_gelu_model(monkeypatch):
  cfg = small_cfg()
  params = M.init_params(cfg, jax.random.key(0))
  x = tokens(6)
  ours = _model_loss_and_grads(cfg, params, x)
  monkeypatch.setattr(M, "gelu", lambda x: jax.nn.gelu(x, approximate=False))
  ref = _model_loss_and_grads(cfg, params, x)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6)
  assert_trees_close(ours[1], ref[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pe,window", [("learned", 0), ("sinusoidal", 5), ("rope", 3)])
def test_logits_at_equals_full_logits(pe, window):
  cfg = small_cfg(pos_encoding=pe, sliding_window=window)
  params = M.init_params(cfg, jax.random.key(7))
  x = tokens(8, B=4)
  at = jnp.array([0, 23, 11, 5])
  full = M.Transformer(cfg).apply({"params": params}, x)
  last = jax.jit(lambda p, x, a: M.Transformer(cfg).apply({"params": p}, x, logits_at=a))(params, x, at)
  assert last.shape == (4, V)
  np.testing.assert_allclose(last, full[jnp.arange(4), at], rtol=1e-5, atol=1e-5)


def test_row_groups_give_the_whole_batch_gradient():
  from jaxformer import optim, train
  cfg = small_cfg(num_layers=1, micro_batch_rows=2)
  assert M.train_row_groups(cfg, 8) == 4
  assert M.train_row_groups(small_cfg(micro_batch_rows=3), 8) == 2  # the count divides B
  params = M.init_params(cfg, jax.random.key(12))
  x = tokens(11, B=8, length=T + 1)
  weights = jnp.ones((8, T)).at[5, 3:].set(0.0)  # unequal weights: groups count by their share
  micro = {"inputs": x[:, :-1], "targets": x[:, 1:], "weights": weights}
  grad_fn = jax.value_and_grad(
      lambda p, m, r: train.cross_entropy(M.Transformer(cfg).apply({"params": p}, m["inputs"]), m)[0])
  whole = jax.jit(grad_fn)(params, micro, jax.random.key(0))
  grouped = jax.jit(train.row_groups(grad_fn, 4))(params, micro, jax.random.key(0))
  np.testing.assert_allclose(whole[0], grouped[0], rtol=1e-6)
  assert_trees_close(whole[1], grouped[1], rtol=1e-4, atol=1e-7)
  # The train step runs them: its loss is the whole batch's.
  c = config_lib.base_config()
  tx, schedule = optim.make_optimizer(c.optim, 10), optim.schedule(c.optim, 10)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                           rng=jax.random.PRNGKey(0))
  _, metrics = jax.jit(lambda s, b: train.train_step(s, b, model=M.Transformer(cfg), tx=tx,
                                                     schedule=schedule))(
      state, jax.tree_util.tree_map(lambda a: a[None], micro))
  np.testing.assert_allclose(metrics["train/loss"], whole[0], rtol=1e-6)


def test_bucketed_loop_equals_full_window_loop():
  """A causal stub that reads its whole window: buckets must not change one id."""
  from jaxformer import sampling
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


def test_gpt2_cudnn_bfloat16_path_up_to_the_kernel(monkeypatch):
  """GPT-2 at T=1024, bfloat16, cuDNN attention: everything but the GPU kernel, on CPU."""
  import importlib
  c = importlib.import_module("configs.gpt2").get_config()
  c.model.update(dict(attention="cudnn", dtype="bfloat16"))
  config_lib.validate(c)
  cfg = M.model_config(c.model)
  params = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))  # no cuDNN needed
  assert M.count_params(params) == M.num_params(cfg) == 124_439_808
  calls = []
  real = jax.nn.dot_product_attention

  def recording(q, k, v, **kw):  # the XLA kernel stands in for cuDNN, which needs a GPU
    calls.append((q.shape, q.dtype, kw["implementation"], kw["is_causal"]))
    return real(q, k, v, **{**kw, "implementation": None})

  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  x = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
  out = jax.eval_shape(lambda p, x: M.Transformer(cfg).apply({"params": p}, x), params, x)
  assert out.shape == (1, 1024, 50257) and out.dtype == jnp.float32
  assert calls == [((1, 1024, 12, 64), jnp.bfloat16, "cudnn", True)] * 12
  with pytest.raises(config_lib.ConfigError, match="bfloat16 or float16"):
    M.model_config(_with(c.model, dtype="float32"))


def _with(model_cfg, **overrides):
  m = model_cfg.copy_and_resolve_references()
  m.update(overrides)
  return m
