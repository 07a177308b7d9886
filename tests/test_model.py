"""The model against the guide: shapes, causality, positions, attention, dropout, counts."""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import config as config_lib
from jaxformer import model as M

V, T = 64, 24
PES = ("learned", "sinusoidal", "rope")
ATTS = ("plain", "dot_product")


def small_cfg(**overrides) -> M.ModelConfig:
  m = config_lib.base_config().model
  m.update(dict(vocab_size=V, num_layers=2, num_heads=4, embed_dim=32, max_len=32))
  m.update(overrides)
  return M.model_config(m)


def init(cfg, seed=0):
  return M.init_params(cfg, jax.random.key(seed))


def tokens(seed, B=2):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


@pytest.mark.parametrize("pe", PES)
@pytest.mark.parametrize("att", ATTS)
def test_shape_and_causality(pe, att):
  cfg = small_cfg(pos_encoding=pe, attention=att)
  params = init(cfg)
  apply = jax.jit(lambda p, x: M.Transformer(cfg).apply({"params": p}, x))
  x = tokens(1)
  logits = apply(params, x)
  assert logits.shape == (2, T, V) and logits.dtype == jnp.float32
  t = 10
  x2 = x.at[:, t + 1:].set((x[:, t + 1:] + 7) % V)
  logits2 = apply(params, x2)
  np.testing.assert_allclose(logits[:, :t + 1], logits2[:, :t + 1], atol=1e-5, rtol=1e-5)
  # The change must be visible after t, or the test would pass for a constant model.
  assert float(jnp.max(jnp.abs(logits[:, t + 1:] - logits2[:, t + 1:]))) > 1e-3


@pytest.mark.parametrize("att", ATTS)
def test_sliding_window_sees_only_last_w_tokens(att):
  W = 4
  cfg = small_cfg(attention=att, sliding_window=W, num_layers=1)
  params = init(cfg)
  apply = jax.jit(lambda p, x: M.Transformer(cfg).apply({"params": p}, x))
  x = tokens(2)
  t = 15
  # With one layer, position t depends on tokens t-W+1..t only.
  x2 = x.at[:, : t - W + 1].set((x[:, : t - W + 1] + 3) % V)
  l1, l2 = apply(params, x), apply(params, x2)
  np.testing.assert_allclose(l1[:, t:], l2[:, t:], atol=1e-5)
  assert float(jnp.max(jnp.abs(l1[:, t - 1] - l2[:, t - 1]))) > 1e-3
  # And still causal.
  x3 = x.at[:, t + 1:].set((x[:, t + 1:] + 5) % V)
  np.testing.assert_allclose(apply(params, x3)[:, : t + 1], l1[:, : t + 1], atol=1e-5)


def test_sinusoidal_table_matches_formula():
  C, L = 16, 50
  table = M.sinusoidal_table(L, C)
  ref = np.zeros((L, C))
  for pos in range(L):
    for i in range(C // 2):
      ref[pos, 2 * i] = math.sin(pos / 10000 ** (2 * i / C))
      ref[pos, 2 * i + 1] = math.cos(pos / 10000 ** (2 * i / C))
  np.testing.assert_allclose(table, ref, atol=1e-6)
  np.testing.assert_allclose(table[1, :4], [0.84147, 0.54030, 0.31098, 0.95042], atol=1e-4)


def test_rope_preserves_norm_and_is_relative():
  D, L = 8, 20
  rng = np.random.default_rng(0)
  q = rng.normal(size=(D,)).astype(np.float32)
  k = rng.normal(size=(D,)).astype(np.float32)
  # Same q at every position and same k at every position: q_m . k_n must depend on m - n only.
  qs = M.apply_rope(jnp.broadcast_to(q, (1, L, 1, D)), 10000.0)[0, :, 0]
  ks = M.apply_rope(jnp.broadcast_to(k, (1, L, 1, D)), 10000.0)[0, :, 0]
  np.testing.assert_allclose(jnp.linalg.norm(qs, axis=-1), np.linalg.norm(q), rtol=1e-5)
  dots = np.asarray(qs @ ks.T)
  for offset in (0, 1, 5):
    diag = np.diagonal(dots, offset=-offset)
    np.testing.assert_allclose(diag, diag[0], rtol=1e-4, atol=1e-5)
  assert abs(dots[3, 0] - dots[3, 3]) > 1e-3  # position does matter


@pytest.mark.parametrize("pe", PES)
def test_attention_implementations_agree(pe):
  params = init(small_cfg(pos_encoding=pe))
  x = tokens(3)
  outs = [M.Transformer(small_cfg(pos_encoding=pe, attention=a)).apply({"params": params}, x) for a in ATTS]
  np.testing.assert_allclose(outs[0], outs[1], atol=2e-5, rtol=2e-5)


def test_sliding_window_implementations_agree():
  params = init(small_cfg())
  x = tokens(4)
  outs = [M.Transformer(small_cfg(attention=a, sliding_window=5)).apply({"params": params}, x) for a in ATTS]
  np.testing.assert_allclose(outs[0], outs[1], atol=2e-5, rtol=2e-5)


def test_dropout_only_in_training():
  cfg = small_cfg(dropout=0.2, attn_dropout=0.1)
  params = init(cfg)
  net = M.Transformer(cfg)
  x = tokens(5)
  a = net.apply({"params": params}, x)
  b = net.apply({"params": params}, x)
  np.testing.assert_array_equal(a, b)
  t1 = net.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})
  t2 = net.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(2)})
  t1b = net.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})
  assert float(jnp.max(jnp.abs(t1 - t2))) > 1e-3
  assert float(jnp.max(jnp.abs(t1 - a))) > 1e-3
  np.testing.assert_array_equal(t1, t1b)


def test_tied_head_is_one_matrix_and_untied_adds_one():
  tied, untied = small_cfg(tie_embeddings=True), small_cfg(tie_embeddings=False)
  p_tied, p_untied = init(tied), init(untied)
  assert "head" not in p_tied and p_untied["head"]["kernel"].shape == (32, V)
  assert M.count_params(p_untied) - M.count_params(p_tied) == 32 * V


def test_bias_free_and_relu_and_remat_variants():
  for over in (dict(use_bias=False), dict(activation="relu"), dict(activation="gelu_tanh"), dict(remat=True)):
    cfg = small_cfg(**over)
    params = init(cfg)
    assert M.count_params(params) == M.num_params(cfg), over
    assert M.Transformer(cfg).apply({"params": params}, tokens(6)).shape == (2, T, V)
  assert not any("bias" in "/".join(map(str, k)) for k, _ in
                 jax.tree_util.tree_flatten_with_path(init(small_cfg(use_bias=False)))[0])


def test_remat_gives_same_gradients():
  cfg, cfg_r = small_cfg(), small_cfg(remat=True)
  params = init(cfg)
  x = tokens(7)

  def loss(p, c):
    return jnp.mean(M.Transformer(c).apply({"params": p}, x) ** 2)

  g1, g2 = jax.grad(loss)(params, cfg), jax.grad(loss)(params, cfg_r)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


def test_bfloat16_compute_keeps_float32_params():
  cfg = small_cfg(dtype="bfloat16")
  params = init(cfg)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  logits = M.Transformer(cfg).apply({"params": params}, tokens(8))
  assert logits.dtype == jnp.float32
  ref = M.Transformer(small_cfg()).apply({"params": params}, tokens(8))
  np.testing.assert_allclose(logits, ref, atol=0.1)


def test_init_statistics():
  cfg = small_cfg(embed_dim=128, num_heads=4)
  params = init(cfg)
  assert abs(float(jnp.std(params["embed"]["embedding"])) - 0.02) < 0.002
  assert abs(float(jnp.std(params["block_0"]["mlp"]["fc"]["kernel"])) - 0.02) < 0.002
  assert float(jnp.max(jnp.abs(params["block_0"]["mlp"]["fc"]["bias"]))) == 0.0
  np.testing.assert_array_equal(params["ln_f"]["scale"], 1.0)


def test_loss_at_init_is_near_log_v():
  cfg = small_cfg()
  params = init(cfg)
  x = tokens(9, B=8)
  y = jax.random.randint(jax.random.key(10), x.shape, 0, V)
  logits = jax.jit(lambda p, x: M.Transformer(cfg).apply({"params": p}, x))(params, x)
  loss = float(jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[..., None], -1)[..., 0]))
  assert abs(loss - math.log(V)) < 0.05, loss


@pytest.mark.parametrize("preset,expected", [
    ("tiny", 834_304), ("small", 2_731_008), ("medium", 21_417_216), ("large", 170_356_224),
    ("gpt2", 124_439_808)])
def test_param_counts_of_presets(preset, expected):
  c = importlib.import_module(f"configs.{preset}").get_config()
  vocab = c.model.vocab_size or 64  # stories presets: a 64-id char vocabulary
  cfg = M.model_config(c.model, vocab)
  shapes = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
  assert M.count_params(shapes) == M.num_params(cfg) == expected


def test_gpt2_preset_is_gpt2_small():
  cfg = M.model_config(importlib.import_module("configs.gpt2").get_config().model)
  assert (cfg.num_layers, cfg.num_heads, cfg.embed_dim, cfg.vocab_size, cfg.max_len) == (12, 12, 768, 50257, 1024)
  assert cfg.pos_encoding == "learned" and cfg.tie_embeddings and cfg.use_bias
  assert cfg.activation == "gelu_tanh" and cfg.ln_eps == 1e-5


@pytest.mark.parametrize("overrides,message", [
    (dict(embed_dim=30, num_heads=4), "must be divisible by model.num_heads"),
    (dict(embed_dim=33, num_heads=1, pos_encoding="sinusoidal"), "must be even for sinusoidal"),
    (dict(embed_dim=36, num_heads=4, pos_encoding="rope"), "must be even for rope"),
    (dict(num_layers=0), "model.num_layers must be positive"),
    (dict(embed_dim=-8), "model.embed_dim must be positive"),
    (dict(dropout=1.0), "model.dropout must be in [0, 1)"),
    (dict(attn_dropout=-0.1), "model.attn_dropout must be in [0, 1)"),
    (dict(pos_encoding="alibi"), "model.pos_encoding must be one of"),
    (dict(attention="flash"), "model.attention must be one of"),
    (dict(attention="dot_product", attn_dropout=0.1), "has no attention-weight dropout"),
    (dict(activation="swish"), "model.activation must be one of"),
])
def test_model_validation_errors(overrides, message):
  m = config_lib.base_config().model
  m.update(overrides)
  with pytest.raises(config_lib.ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")
                     .replace(")", r"\)").replace(".", r"\.")):
    M.model_config(m, V)


def test_sequence_longer_than_max_len_is_refused():
  c = config_lib.base_config()
  c.train.seq_len = 512
  with pytest.raises(config_lib.ConfigError, match=r"train\.seq_len \(512\) is longer than model\.max_len"):
    config_lib.validate(c)
  cfg = small_cfg()
  with pytest.raises(ValueError, match="exceeds model.max_len"):
    M.Transformer(cfg).apply({"params": init(cfg)}, jnp.zeros((1, 40), jnp.int32))
