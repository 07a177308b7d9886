"""The kernels against the reference model: outputs and gradients to float32 rounding, same parameters.

Covers blocked attention (every positional encoding, sliding windows, blocks
that do not divide T, chunked rows), the fused XLA kernel, GELU through erf,
LayerNorm's VJP, ActivationDense and the mixed-precision matmul.
"""

import importlib
import math

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import config as config_lib
from jaxformer import metrics
from jaxformer import model as M
from jaxformer.kernels import attention
from jaxformer.kernels import layers
from jaxformer.kernels import matmul

V, T = 64, 24
REFERENCE = M.Execution(kernels="reference")


def small_cfg(**overrides) -> M.ModelConfig:
  c = config_lib.base_config()
  c.model.update(dict(vocab_size=V, num_layers=2, num_heads=4, embed_dim=32, max_len=32))
  c.model.update(overrides)
  return config_lib.model_config(c)


def tokens(seed, B=2, length=T):
  return jax.random.randint(jax.random.key(seed), (B, length), 0, V)


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def plain(q, k, v, window):
  return M.plain_attention(q, k, v, window=window)[0]


@pytest.mark.parametrize("T_,block,window,rows", [
    (24, 8, 0, None), (23, 5, 6, 2), (24, 64, 0, None), (17, 4, 1, 1), (24, 8, 30, 2)])
def test_blocked_attention_matches_plain(T_, block, window, rows):
  B, H, D = 4, 3, 8
  q, k, v, g = (jax.random.normal(key, (B, T_, H, D)) for key in jax.random.split(jax.random.key(0), 4))
  ours = lambda q, k, v: attention.blocked_attention_qkv(jnp.stack([q, k, v], axis=2), window=window,
                                                        block=block, chunk_rows=rows)
  ref = lambda q, k, v: plain(q, k, v, window)
  np.testing.assert_allclose(jax.jit(ours)(q, k, v), ref(q, k, v), rtol=1e-5, atol=2e-6)
  grads = lambda f: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * g), argnums=(0, 1, 2))(q, k, v)
  assert_trees_close(jax.jit(lambda: grads(ours))(), grads(ref))


def _logits_loss_and_grads(cfg, ex, params, x):
  def loss(p):
    logits = M.Transformer(cfg, ex).apply({"params": p}, x)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits
  (loss, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, loss, grads


@pytest.mark.parametrize("kernels,pe,window,overrides", [
    ("cpu", "learned", 0, {}),
    ("cpu", "sinusoidal", 5, dict(use_bias=False)),
    ("cpu", "rope", 5, dict(activation="gelu_tanh")),
    ("cpu", "rope", 0, dict(tie_embeddings=False, activation="relu")),
    ("xla", "rope", 5, {}),
    ("xla", "learned", 0, dict(use_bias=False)),
])
def test_kernels_match_reference_logits_and_gradients(kernels, pe, window, overrides, monkeypatch):
  """Same parameters, same logits and gradients: only the way they are computed differs."""
  monkeypatch.setattr(attention, "ATTENTION_BLOCK", 8)  # T=24: three query blocks, two skipped ones
  cfg = small_cfg(pos_encoding=pe, sliding_window=window, num_layers=1, **overrides)
  params = M.init_params(cfg, jax.random.key(1))
  x = tokens(2)
  logits, loss, grads = _logits_loss_and_grads(cfg, M.Execution(kernels=kernels), params, x)
  ref_logits, ref_loss, ref_grads = _logits_loss_and_grads(cfg, REFERENCE, params, x)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert_trees_close(grads, ref_grads, rtol=1e-4, atol=1e-6)


def test_every_kernels_value_gives_the_same_parameters():
  """Names, shapes, dtypes, logical axes and initial values do not depend on the kernels."""
  for cfg in (small_cfg(), small_cfg(use_bias=False, tie_embeddings=False, pos_encoding="rope")):
    ref_axes = M.param_axes(cfg)
    ref = M.init_params(cfg, jax.random.key(3))
    for kernels in ("reference", *attention.ATTENTION):
      ex = M.Execution(kernels=kernels)
      boxed = jax.eval_shape(lambda: M.Transformer(cfg, ex).init(jax.random.key(0), tokens(0, 1, 8)))
      assert nn.get_partition_spec(boxed["params"]) == ref_axes, kernels
      params = M.init_params(cfg, jax.random.key(3), ex)
      assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(ref), kernels
      jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref)


def test_cpu_with_weight_dropout_falls_back_to_plain(monkeypatch):
  def no_blocked(*args, **kwargs):
    raise AssertionError("blocked attention has no weight dropout")

  cfg = small_cfg()
  params = M.init_params(cfg, jax.random.key(0))
  x, rngs = tokens(3), {"dropout": jax.random.key(4)}
  run = lambda k: M.Transformer(cfg, M.Execution(kernels=k, dropout=0.1, attn_dropout=0.1)).apply(
      {"params": params}, x, train=True, rngs=rngs)
  ref = run("reference")
  monkeypatch.setitem(attention.ATTENTION, "cpu", no_blocked)
  np.testing.assert_allclose(run("cpu"), ref, rtol=1e-5, atol=1e-5)  # the same masks, too


def test_cpu_bfloat16_is_close_to_reference():
  cfg = small_cfg()
  params = M.init_params(cfg, jax.random.key(0))
  run = lambda k: M.Transformer(cfg, M.Execution(kernels=k, dtype="bfloat16")).apply(
      {"params": params}, tokens(5))
  out = run("cpu")
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, run("reference"), atol=0.05)


def test_gelu_matches_jax_exact_gelu():
  x = jnp.linspace(-12.0, 12.0, 200_001, dtype=jnp.float32)
  ref = lambda x: jax.nn.gelu(x, approximate=False)
  # 1 + erf(x/√2) loses relative accuracy where GELU itself is below 1e-6 (x < -4.7).
  np.testing.assert_allclose(jax.jit(layers.gelu)(x), ref(x), rtol=1e-6, atol=1e-6)
  dx = lambda f: jax.jit(jax.vmap(jax.grad(f)))(x)
  np.testing.assert_allclose(dx(layers.gelu), dx(ref), rtol=1e-6, atol=1e-6)
  # The textbook values, in float64 through math.erf.
  for v in (-3.0, -1.0, -0.1, 0.0, 0.5, 2.0):
    assert float(layers.gelu(jnp.float32(v))) == pytest.approx(0.5 * v * (1 + math.erf(v / math.sqrt(2))), abs=2e-7)


@pytest.mark.parametrize("use_bias", [True, False])
def test_layer_norm_matches_flax(use_bias):
  x = jax.random.normal(jax.random.key(0), (3, 7, 16)) * 3 + 1
  g = jax.random.normal(jax.random.key(1), (3, 7, 16))
  ref = nn.LayerNorm(epsilon=1e-5, use_bias=use_bias, dtype=jnp.float32)
  ours = layers.LayerNorm(epsilon=1e-5, use_bias=use_bias)
  params = ref.init(jax.random.key(2), x)["params"]
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      ours.init(jax.random.key(2), x)["params"])
  params = jax.tree_util.tree_map(lambda p: p + 0.3, params)
  grads = lambda m: jax.grad(lambda p, x: jnp.sum(m.apply({"params": p}, x) * g), argnums=(0, 1))(params, x)
  np.testing.assert_allclose(ours.apply({"params": params}, x), ref.apply({"params": params}, x),
                             rtol=1e-5, atol=1e-6)
  assert_trees_close(grads(ours), grads(ref), rtol=1e-5, atol=1e-5)
  # The output dtype follows `dtype`, like nn.LayerNorm's; the statistics stay float32.
  out = layers.LayerNorm(epsilon=1e-5, use_bias=use_bias, dtype=jnp.bfloat16).apply({"params": params}, x)
  assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_activation_dense_matches_dense_of_activation(act, use_bias):
  h = jax.random.normal(jax.random.key(0), (2, 5, 16)) * 2
  g = jax.random.normal(jax.random.key(1), (2, 5, 8))
  ours = layers.ActivationDense(8, act, use_bias=use_bias)
  dense = nn.Dense(8, use_bias=use_bias)
  params = dense.init(jax.random.key(2), h)["params"]
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      ours.init(jax.random.key(2), h)["params"])
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)
  ref = lambda p, h: dense.apply({"params": p}, M.ACTIVATIONS[act](h))
  mine = lambda p, h: ours.apply({"params": p}, h)
  np.testing.assert_allclose(jax.jit(mine)(params, h), ref(params, h), rtol=1e-5, atol=1e-6)
  grads = lambda f: jax.grad(lambda p, h: jnp.sum(f(p, h) * g), argnums=(0, 1))(params, h)
  assert_trees_close(jax.jit(lambda: grads(mine))(), grads(ref), rtol=1e-5, atol=1e-5)


def test_mixed_dot_general_rounds_operands_and_sums_in_float32():
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
  w = jax.random.normal(jax.random.key(1), (4, 5, 6))
  g = jax.random.normal(jax.random.key(2), (2, 3, 6))
  bf16 = jnp.bfloat16
  dims = (((2, 3), (0, 1)), ((), ()))  # DenseGeneral over the last two axes
  mixed = lambda x, w: matmul.mixed_dot_general(x, w, dims, operand_dtype=bf16)
  ref = lambda x, w: lax.dot_general(x.astype(bf16), w.astype(bf16), dims,
                                     preferred_element_type=jnp.float32)
  out = jax.jit(mixed)(x, w)
  assert out.dtype == jnp.float32 and out.shape == (2, 3, 6)
  np.testing.assert_allclose(out, ref(x, w), rtol=1e-6, atol=1e-6)
  dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(mixed(x, w) * g), argnums=(0, 1)))(x, w)
  assert dx.dtype == dw.dtype == jnp.float32
  # The backward pass's matmuls take bfloat16 operands too: g, and the stored x and w.
  gb = g.astype(bf16)
  np.testing.assert_allclose(dx, jnp.einsum("btn,ijn->btij", gb, w.astype(bf16),
                                            preferred_element_type=jnp.float32), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, jnp.einsum("btij,btn->ijn", x.astype(bf16), gb,
                                            preferred_element_type=jnp.float32), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="dense layers only"):
    matmul.mixed_dot_general(x, x, (((3,), (3,)), ((0,), (0,))), operand_dtype=bf16)
  assert matmul.dot_general("", "float32") is lax.dot_general
  assert matmul.dot_general("bfloat16", "bfloat16") is lax.dot_general


@pytest.mark.parametrize("kernels", ["cpu", "reference"])
def test_bfloat16_matmuls_stay_close_to_float32(kernels):
  cfg = small_cfg(num_layers=1)
  params = M.init_params(cfg, jax.random.key(3))
  x = tokens(4)
  _, l1, g1 = _logits_loss_and_grads(cfg, M.Execution(kernels=kernels), params, x)
  _, l2, g2 = _logits_loss_and_grads(cfg, M.Execution(kernels=kernels, matmul_dtype="bfloat16"), params, x)
  np.testing.assert_allclose(l1, l2, rtol=1e-3)
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(g2))
  assert_trees_close(g1, g2, rtol=0.1, atol=2e-3)


@pytest.mark.parametrize("kernels,pe,window", [
    ("cpu", "learned", 0), ("reference", "sinusoidal", 5), ("cpu", "rope", 3)])
def test_logits_at_equals_full_logits(kernels, pe, window):
  cfg = small_cfg(pos_encoding=pe, sliding_window=window)
  net = M.Transformer(cfg, M.Execution(kernels=kernels))
  params = M.init_params(cfg, jax.random.key(7))
  x = tokens(8, B=4)
  at = jnp.array([0, 23, 11, 5])
  full = net.apply({"params": params}, x)
  last = jax.jit(lambda p, x, a: net.apply({"params": p}, x, logits_at=a))(params, x, at)
  assert last.shape == (4, V)
  np.testing.assert_allclose(last, full[jnp.arange(4), at], rtol=1e-5, atol=1e-5)


def test_gpt2_cudnn_bfloat16_path_up_to_the_kernel(monkeypatch):
  """GPT-2 at T=1024, bfloat16, cuDNN attention: everything but the GPU kernel, on CPU."""
  c = importlib.import_module("configs.gpt2").get_config()
  c.compute.update(dict(kernels="cudnn", dtype="bfloat16"))
  config_lib.validate(c)
  cfg, ex = config_lib.model_config(c), config_lib.execution(c)
  params = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0), ex))  # no cuDNN needed
  assert sum(p.size for p in jax.tree_util.tree_leaves(params)) == metrics.num_params(cfg) == 124_475_904
  calls = []
  real = jax.nn.dot_product_attention

  def recording(q, k, v, **kw):  # the XLA kernel stands in for cuDNN, which needs a GPU
    calls.append((q.shape, q.dtype, kw["implementation"], kw["is_causal"]))
    return real(q, k, v, **{**kw, "implementation": None})

  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  x = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
  out = jax.eval_shape(lambda p, x: M.Transformer(cfg, ex).apply({"params": p}, x), params, x)
  assert out.shape == (1, 1024, 50304) and out.dtype == jnp.float32
  assert calls == [((1, 1024, 12, 64), jnp.bfloat16, "cudnn", True)] * 12
  c.compute.dtype = "float32"
  with pytest.raises(config_lib.ConfigError, match="bfloat16 or float16"):
    config_lib.execution(c)
