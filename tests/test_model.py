"""The model against the guide: shapes, causality, positions, attention, dropout, counts."""

import contextlib
import functools
import importlib
import io
import math

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import config as config_lib
from jaxformer import metrics
from jaxformer import model as M

V, T = 64, 24
PES = ("learned", "sinusoidal", "rope")
KERNELS = ("reference", "xla")  # the cpu kernels are checked against reference in test_kernels.py


def small_cfg(**overrides) -> M.ModelConfig:
  c = config_lib.base_config()
  c.model.update(dict(vocab_size=V, num_layers=2, num_heads=4, embed_dim=32, max_len=32))
  c.model.update(overrides)
  return config_lib.model_config(c)


def init(cfg, seed=0):
  return M.init_params(cfg, jax.random.key(seed))


def tokens(seed, B=2):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


def count_params(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


@functools.lru_cache
def forward(cfg, ex=M.Execution()):
  """One compiled forward per (architecture, execution), shared by the tests."""
  return jax.jit(lambda p, x: M.Transformer(cfg, ex).apply({"params": p}, x))


@pytest.mark.parametrize("pe", PES)
@pytest.mark.parametrize("kernels", KERNELS)
def test_shape_and_causality(pe, kernels):
  cfg = small_cfg(pos_encoding=pe)
  params = init(cfg)
  apply = forward(cfg, M.Execution(kernels=kernels))
  x = tokens(1)
  logits = apply(params, x)
  assert logits.shape == (2, T, V) and logits.dtype == jnp.float32
  t = 10
  x2 = x.at[:, t + 1:].set((x[:, t + 1:] + 7) % V)
  logits2 = apply(params, x2)
  np.testing.assert_allclose(logits[:, :t + 1], logits2[:, :t + 1], atol=1e-5, rtol=1e-5)
  # The change must be visible after t, or the test would pass for a constant model.
  assert float(jnp.max(jnp.abs(logits[:, t + 1:] - logits2[:, t + 1:]))) > 1e-3


@pytest.mark.parametrize("kernels", KERNELS)
def test_sliding_window_sees_only_last_w_tokens(kernels):
  W = 4
  cfg = small_cfg(sliding_window=W, num_layers=1)
  params = init(cfg)
  apply = forward(cfg, M.Execution(kernels=kernels))
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
  # Half-split layout: channel i turns with channel i + D/2 by t·base^(-2i/D).
  t, i = 3, 1
  angle = t * 10000.0 ** (-2 * i / D)
  x = np.zeros((1, L, 1, D), np.float32)
  x[0, t, 0, i] = 1.0
  out = np.asarray(M.apply_rope(jnp.asarray(x), 10000.0))[0, t, 0]
  np.testing.assert_allclose([out[i], out[i + D // 2]], [math.cos(angle), math.sin(angle)], atol=1e-6)


@pytest.mark.parametrize("pe,window", [("learned", 0), ("sinusoidal", 0), ("rope", 0), ("learned", 5)])
def test_attention_kernels_agree(pe, window):
  cfg = small_cfg(pos_encoding=pe, sliding_window=window)
  params = init(cfg)
  x = tokens(3)
  outs = [forward(cfg, M.Execution(kernels=k))(params, x) for k in KERNELS]
  np.testing.assert_allclose(outs[0], outs[1], atol=2e-5, rtol=2e-5)


def test_plain_attention_weights_are_sown():
  """kernels="reference" records the (B, H, T, T) softmax weights of every layer (for plots)."""
  cfg = small_cfg()
  params = init(cfg)
  _, state = M.Transformer(cfg).apply({"params": params}, tokens(4), mutable=["intermediates"])
  for i in range(cfg.num_layers):
    (w,) = state["intermediates"][f"block_{i}"]["attn"]["attention_weights"]
    assert w.shape == (2, 4, T, T)
    np.testing.assert_allclose(jnp.sum(w, -1), 1.0, rtol=1e-5)
    assert float(jnp.max(jnp.abs(jnp.triu(w, k=1)))) == 0.0  # causal: nothing above the diagonal


def test_dropout_only_in_training():
  cfg = small_cfg()
  net = M.Transformer(cfg, M.Execution(dropout=0.2, attn_dropout=0.1))
  params = init(cfg)
  x = tokens(5)
  a = net.apply({"params": params}, x)
  np.testing.assert_array_equal(a, net.apply({"params": params}, x))
  train = jax.jit(lambda key: net.apply({"params": params}, x, train=True, rngs={"dropout": key}))
  t1, t2, t1b = train(jax.random.key(1)), train(jax.random.key(2)), train(jax.random.key(1))
  assert float(jnp.max(jnp.abs(t1 - t2))) > 1e-3
  assert float(jnp.max(jnp.abs(t1 - a))) > 1e-3
  np.testing.assert_array_equal(t1, t1b)


@pytest.mark.parametrize("kernels,attn_dropout", [("reference", 0.1), ("cpu", 0.1), ("cpu", 0.0)])
def test_dropout_masks_are_drawn_per_row(kernels, attn_dropout):
  """A row's masks depend on its row id only: rows computed alone equal the whole batch's."""
  cfg = small_cfg()
  net = M.Transformer(cfg, M.Execution(kernels=kernels, dropout=0.1, attn_dropout=attn_dropout))
  params = init(cfg)
  x = tokens(6, B=4)
  apply = jax.jit(lambda x, ids: net.apply({"params": params}, x, train=True, row_ids=ids,
                                           rngs={"dropout": jax.random.key(7)}))
  whole = apply(x, jnp.arange(4))
  alone = apply(x[2:], jnp.array([2, 3]))
  np.testing.assert_allclose(alone, whole[2:], rtol=1e-6, atol=1e-6)
  as_first = apply(x[2:], jnp.array([0, 1]))
  assert float(jnp.max(jnp.abs(as_first - whole[2:]))) > 1e-3


def test_tied_head_is_one_matrix_and_untied_adds_one():
  p_tied, p_untied = init(small_cfg(tie_embeddings=True)), init(small_cfg(tie_embeddings=False))
  assert "head" not in p_tied and p_untied["head"]["kernel"].shape == (32, V)
  assert count_params(p_untied) - count_params(p_tied) == 32 * V


def test_bias_free_and_activation_variants():
  x = tokens(6)
  for over in (dict(use_bias=False), dict(activation="relu"), dict(activation="gelu_tanh")):
    cfg = small_cfg(**over)
    params = init(cfg)
    assert count_params(params) == metrics.num_params(cfg), over
    assert forward(cfg)(params, x).shape == (2, T, V)
  assert not any("bias" in "/".join(map(str, k)) for k, _ in
                 jax.tree_util.tree_flatten_with_path(init(small_cfg(use_bias=False)))[0])


@pytest.mark.parametrize("activation,use_bias", [("gelu_tanh", True), ("gelu", False), ("relu", True)])
def test_dense_activation_is_nn_dense_then_act_keeping_only_the_matmul_output(activation, use_bias):
  """The accelerators' MLP fc: nn.Dense's parameters and numbers, one (B, T, F) residual.

  Autodiff of act(nn.Dense(x)) saves x @ W + b and GELU's intermediates for the backward pass
  (5 arrays here; XLA fuses them down to 2 on a GPU: 9.7 GB a GPT-2 step at B=64).
  """
  B, C, F = 2, 16, 64
  x, r = jax.random.normal(jax.random.key(0), (B, T, C)), jax.random.normal(jax.random.key(1), (B, T, F))
  layer = M.DenseActivation(F, activation, M.Execution(kernels="xla"), ("embed", "mlp"), use_bias)
  stock = nn.DenseGeneral(F, use_bias=use_bias, kernel_init=M.with_axes(M._init, ("embed", "mlp")),
                          bias_init=M.with_axes(nn.initializers.zeros, ("mlp",)))
  params = layer.init(jax.random.key(2), x)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda a, b: bool(jnp.array_equal(a, b)), nn.meta.unbox(params), nn.meta.unbox(stock.init(jax.random.key(2), x))))
  ours = lambda p, x, r: jnp.vdot(layer.apply(p, x), r)
  theirs = lambda p, x, r: jnp.vdot(M.ACTIVATIONS[activation](stock.apply(p, x)), r)
  (a, ga), (b, gb) = jax.value_and_grad(ours, (0, 1))(params, x, r), jax.value_and_grad(theirs, (0, 1))(params, x, r)
  assert float(a) == float(b)
  jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6), ga, gb)

  def residuals(f):  # the (B, T, F) arrays the backward pass reads, arguments aside
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      jax.ad_checkpoint.print_saved_residuals(f, params, x, r)
    return [l for l in out.getvalue().splitlines() if f"[{B},{T},{F}]" in l and "argument" not in l]
  assert len(residuals(ours)) == 1 and "dot_general" in residuals(ours)[0]
  if activation != "relu":
    assert len(residuals(theirs)) >= 3


def test_the_gpu_mlp_keeps_two_arrays_of_4c_and_the_others_keep_theirs():
  """On cudnn kernels, fc's matmul output (for the recomputation) and act(h) (for proj's weight
  gradient); the xla kernels' MLP (and so TPU's) keeps what autodiff keeps, the cpu's only h."""
  cfg, B = small_cfg(activation="gelu_tanh"), 2
  F = cfg.mlp_ratio * cfg.embed_dim
  x = jax.random.normal(jax.random.key(0), (B, T, cfg.embed_dim))

  def residuals(kernels):
    mlp = M.MLP(cfg, M.Execution(kernels=kernels))
    params = mlp.init(jax.random.key(1), x, False, jnp.arange(B))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      jax.ad_checkpoint.print_saved_residuals(lambda p: jnp.sum(mlp.apply(p, x, True, jnp.arange(B)) ** 2), params)
    return len([l for l in out.getvalue().splitlines() if f"[{B},{T},{F}]" in l])
  assert (residuals("cudnn"), residuals("cpu")) == (2, 1) and residuals("xla") >= 4


def test_bfloat16_compute_keeps_float32_params():
  cfg = small_cfg()
  ex = M.Execution(dtype="bfloat16")
  params = M.init_params(cfg, jax.random.key(0), ex)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  logits = forward(cfg, ex)(params, tokens(8))
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, forward(cfg)(params, tokens(8)), atol=0.1)


def test_learned_positions_gradient_is_no_sum_over_the_batch():
  """The position table is looked up per token, so its gradient scatters rows back.

  Added as pos[:T] broadcast over B, its gradient was a sum over the batch axis of a
  (B, T, C) array; XLA's GPU layout assignment then laid the whole residual stream out
  B-minor, with a transpose at every residual add (gpt2 on an H200: 139 ms a step, not
  127). tests/test_gpu.py checks the compiled layout itself on a GPU.
  """
  cfg = small_cfg()
  params, x = init(cfg), tokens(3)
  grad = jax.grad(lambda p: jnp.sum(forward(cfg)(p, x) ** 2))
  eqns, stack = [], [jax.make_jaxpr(grad)(params).jaxpr]
  while stack:  # the equations of the jaxpr and of every jaxpr inside it (pjit, custom_vjp, ...)
    j = stack.pop()
    eqns += j.eqns
    stack += [getattr(v, "jaxpr", v) for e in j.eqns for v in e.params.values()
              if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns")]
  assert not [e for e in eqns if e.primitive.name == "reduce_sum" and e.params["axes"] == (0,)
              and e.invars[0].aval.shape == (2, T, cfg.embed_dim)]
  assert [e for e in eqns if e.primitive.name == "scatter-add" and e.outvars[0].aval.shape == (cfg.max_len, cfg.embed_dim)]
  g = grad(params)["pos_embed"]
  assert jnp.all(jnp.any(g[:T] != 0, axis=1)) and not jnp.any(g[T:])  # rows 0..T-1, each of them


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
  logits = forward(cfg)(params, x)
  loss = float(jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[..., None], -1)[..., 0]))
  assert abs(loss - math.log(V)) < 0.05, loss


@pytest.mark.parametrize("preset,expected", [
    ("tiny", 834_304), ("small", 2_731_008), ("medium", 21_417_216), ("large", 170_356_224),
    ("gpt2", 124_475_904)])
def test_param_counts_of_presets(preset, expected):
  c = importlib.import_module(f"configs.{preset}").get_config()
  cfg = config_lib.model_config(c, c.model.vocab_size or 64)  # stories presets: a 64-id char vocabulary
  shapes = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
  assert count_params(shapes) == metrics.num_params(cfg) == expected


def test_flops_per_token_counts_matmul_weights():
  cfg = small_cfg(num_layers=2, max_len=32)
  C, L = cfg.embed_dim, cfg.num_layers
  n = metrics.num_params(cfg) - 32 * C  # the learned position table is no matmul
  assert metrics.flops_per_token(cfg, 16) == 6.0 * n + 12.0 * L * 16 * C
  # Untied: the head is a matmul and the input lookup is not, so the count is the same.
  assert metrics.flops_per_token(small_cfg(tie_embeddings=False), 16) == metrics.flops_per_token(cfg, 16)
  # Blocked attention skips masked blocks; the others compute all T² pairs.
  assert metrics.forward_flops(cfg, 256, kernels="cpu") < metrics.forward_flops(cfg, 256)
  assert metrics.forward_flops(cfg, 32, kernels="xla") == metrics.forward_flops(cfg, 32)


def test_gpt2_preset_is_gpt2_small():
  cfg = config_lib.model_config(importlib.import_module("configs.gpt2").get_config())
  # GPT-2's 50257 ids padded to a multiple of 64, as nanoGPT: 124,439,808 parameters unpadded.
  assert (cfg.num_layers, cfg.num_heads, cfg.embed_dim, cfg.vocab_size, cfg.max_len) == (12, 12, 768, 50304, 1024)
  assert metrics.num_params(cfg) - 47 * 768 == 124_439_808
  assert cfg.pos_encoding == "learned" and cfg.tie_embeddings and cfg.use_bias
  assert cfg.activation == "gelu_tanh" and cfg.ln_eps == 1e-5



def numpy_gpt2(params, ids, ln_eps):
  """GPT-2's forward for one row in float64 numpy, as nanoGPT writes it: learned positions,
  pre-LN blocks, tanh GELU, the head tied to the token embedding."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)

  def ln(x, q):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + ln_eps) * q["scale"] + q["bias"]

  def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

  T = len(ids)
  x = p["embed"]["embedding"][ids] + p["pos_embed"][:T]  # (T, C)
  for i in range(sum(k.startswith("block_") for k in p)):
    b = p[f"block_{i}"]
    qkv = np.einsum("tc,cshd->tshd", ln(x, b["ln1"]), b["attn"]["qkv"]["kernel"]) + b["attn"]["qkv"]["bias"]
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (T, H, D)
    att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
    att = np.where(np.tril(np.ones((T, T), bool)), att, -np.inf)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    y = np.einsum("hqk,khd->qhd", att, v)
    x = x + np.einsum("thd,hdc->tc", y, b["attn"]["proj"]["kernel"]) + b["attn"]["proj"]["bias"]
    h = gelu(ln(x, b["ln2"]) @ b["mlp"]["fc"]["kernel"] + b["mlp"]["fc"]["bias"])
    x = x + h @ b["mlp"]["proj"]["kernel"] + b["mlp"]["proj"]["bias"]
  return ln(x, p["ln_f"]) @ p["embed"]["embedding"].T  # (T, V)


@pytest.mark.parametrize("kernels", ["reference", "cpu"])
def test_gpt2_architecture_matches_a_numpy_gpt2(kernels):
  """The gpt2 preset's architecture, shrunk, computes GPT-2's function (so its weights would load)."""
  c = importlib.import_module("configs.gpt2").get_config()
  c.model.update(dict(num_layers=2, num_heads=4, embed_dim=32, max_len=32, vocab_size=V))
  cfg = config_lib.model_config(c)
  leaves, tree = jax.tree_util.tree_flatten(init(cfg))
  keys = jax.random.split(jax.random.key(11), len(leaves))
  # Noise on every parameter, so LayerNorm scales and all biases take part.
  params = jax.tree_util.tree_unflatten(
      tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  x = tokens(12)
  logits = forward(cfg, M.Execution(kernels=kernels))(params, x)
  for b in range(2):
    np.testing.assert_allclose(logits[b], numpy_gpt2(params, np.asarray(x[b]), cfg.ln_eps),
                               rtol=1e-5, atol=1e-6)

def _escaped(message):
  return message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")


@pytest.mark.parametrize("overrides,message", [
    (dict(embed_dim=30, num_heads=4), "must be divisible by model.num_heads"),
    (dict(embed_dim=33, num_heads=1, pos_encoding="sinusoidal"), "must be even for sinusoidal"),
    (dict(embed_dim=36, num_heads=4, pos_encoding="rope"), "must be even for rope"),
    (dict(num_layers=0), "model.num_layers must be positive"),
    (dict(embed_dim=-8), "model.embed_dim must be positive"),
    (dict(dropout=1.0), "model.dropout must be in [0, 1)"),
    (dict(attn_dropout=-0.1), "model.attn_dropout must be in [0, 1)"),
    (dict(pos_encoding="alibi"), "model.pos_encoding must be one of"),
    (dict(activation="swish"), "model.activation must be one of"),
])
def test_model_validation_errors(overrides, message):
  c = config_lib.base_config()
  c.model.update(overrides)
  with pytest.raises(config_lib.ConfigError, match=_escaped(message)):
    config_lib.model_config(c, V)


@pytest.mark.parametrize("model,compute,message", [
    ({}, dict(kernels="flash"), "compute.kernels must be one of"),
    (dict(attn_dropout=0.1), dict(kernels="xla"), "has no attention-weight dropout"),
    ({}, dict(kernels="cudnn"), "runs in bfloat16 or float16 only"),
    ({}, dict(dtype="float64"), "compute.dtype must be one of"),
    ({}, dict(matmul_dtype="int8"), "compute.matmul_dtype must be"),
])
def test_compute_validation_errors(model, compute, message):
  c = config_lib.base_config()
  c.model.update(model)
  c.compute.update(compute)
  with pytest.raises(config_lib.ConfigError, match=_escaped(message)):
    config_lib.execution(c)


def test_execution_comes_from_compute_and_model_dropout():
  c = config_lib.base_config()
  c.compute.update(dict(kernels="reference", remat="full"))
  c.model.update(dict(dropout=0.1, attn_dropout=0.2))
  assert config_lib.execution(c, "cpu") == M.Execution(kernels="reference", remat="full", dropout=0.1,
                                                attn_dropout=0.2)
  with pytest.raises(ValueError, match="unknown kernels 'blocked'"):
    M.Execution(kernels="blocked")


def test_sequence_longer_than_max_len_is_refused():
  c = config_lib.base_config()
  c.train.seq_len = 512
  with pytest.raises(config_lib.ConfigError, match=r"train\.seq_len \(512\) is longer than model\.max_len"):
    config_lib.validate(c)
  cfg = small_cfg()
  with pytest.raises(ValueError, match="exceeds model.max_len"):
    M.Transformer(cfg).apply({"params": init(cfg)}, jnp.zeros((1, 40), jnp.int32))
