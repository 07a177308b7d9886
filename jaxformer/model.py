"""The decoder-only transformer of the guide, as Flax linen modules.

Shapes use the guide's letters: B batch, T time, C channels (embed_dim),
V vocab, H heads, D head dim (C // H).

Every weight carries logical axis names ("embed", "mlp", "heads", "vocab", ...);
`sharding.py` maps them onto the device mesh in one place.
"""

import dataclasses
import functools
import math
from typing import Callable, Optional

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jaxformer import allocator
from jaxformer import config as config_lib

allocator.configure()  # before the first training step allocates (see allocator.py)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model section of a run's config, frozen so modules can hold it."""
  vocab_size: int
  num_layers: int
  num_heads: int
  embed_dim: int
  mlp_ratio: int
  max_len: int
  pos_encoding: str
  rope_base: float
  attention: str
  sliding_window: int
  activation: str
  dropout: float
  attn_dropout: float
  use_bias: bool
  tie_embeddings: bool
  ln_eps: float
  dtype: str
  param_dtype: str
  remat: bool
  micro_batch_rows: int
  matmul_dtype: str

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def cdtype(self):
    return jnp.dtype(self.dtype)

  @property
  def pdtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def dot_general(self):
    """The dense layers' lax.dot_general: mixed precision when matmul_dtype is set."""
    if not self.matmul_dtype or jnp.dtype(self.matmul_dtype) == self.cdtype:
      return lax.dot_general
    return functools.partial(mixed_dot_general, operand_dtype=jnp.dtype(self.matmul_dtype))


def model_config(model_cfg, vocab_size: Optional[int] = None) -> ModelConfig:
  """Freezes `config.model`; `vocab_size` (the padded V) fills a 0 in the config."""
  config_lib.validate_model(model_cfg)
  fields = {f.name: model_cfg[f.name] for f in dataclasses.fields(ModelConfig)}
  if vocab_size is not None:
    fields["vocab_size"] = int(vocab_size)
  if fields["vocab_size"] <= 0:
    raise config_lib.ConfigError("model.vocab_size is 0 and no tokenizer was given to take it from.")
  return ModelConfig(**fields)


def padded_vocab_size(tokenizer_vocab: int, multiple: int) -> int:
  """Rounds V up so the head's matmul has friendly sizes; extra ids are never sampled."""
  return -(-tokenizer_vocab // multiple) * multiple if multiple > 1 else tokenizer_vocab


_init = nn.initializers.normal(stddev=0.02)


def mixed_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                      *, operand_dtype):
  """A dense layer's dot_general with `operand_dtype` (bfloat16) operands, float32 sums and result.

  Covers Flax's Dense and DenseGeneral (lhs's trailing axes against rhs's leading
  axes, no batch axes) as one 2-D matmul whose backward pass runs in the same
  mixed precision; the inputs are stored for it in `operand_dtype`, half the bytes.
  """
  del precision, preferred_element_type
  (lc, rc), (lb, rb) = dimension_numbers
  n = len(lc)
  if lb or rb or tuple(lc) != tuple(range(lhs.ndim - n, lhs.ndim)) or tuple(rc) != tuple(range(n)):
    raise ValueError(f"mixed_dot_general covers dense layers only, got {dimension_numbers}.")
  K = math.prod(lhs.shape[lhs.ndim - n:])
  out = _mixed_matmul(lhs.reshape(-1, K), rhs.reshape(K, -1), operand_dtype)
  return out.reshape(*lhs.shape[:lhs.ndim - n], *rhs.shape[n:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_matmul(x, w, operand_dtype):
  return _mixed_matmul_fwd(x, w, operand_dtype)[0]


def _mixed_matmul_fwd(x, w, operand_dtype):
  xo, wo = x.astype(operand_dtype), w.astype(operand_dtype)
  y = jnp.dot(xo, wo, preferred_element_type=jnp.float32)
  return y, (xo, wo, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _mixed_matmul_bwd(operand_dtype, res, g):
  xo, wo, x_like, w_like = res
  go = g.astype(operand_dtype)
  dx = jnp.dot(go, wo.T, preferred_element_type=jnp.float32)
  dw = jnp.dot(xo.T, go, preferred_element_type=jnp.float32)
  return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


_mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


def _dense_init(*axes):
  return nn.with_logical_partitioning(_init, axes)


def sinusoidal_table(max_len: int, dim: int) -> np.ndarray:
  """The guide's table: PE[pos, 2i] = sin(pos / 10000^(2i/C)), PE[pos, 2i+1] = cos(...)."""
  position = np.arange(max_len, dtype=np.float64)[:, None]
  div_term = np.exp(np.arange(0, dim, 2, dtype=np.float64) * (-math.log(10000.0) / dim))
  table = np.zeros((max_len, dim), dtype=np.float64)
  table[:, 0::2] = np.sin(position * div_term)
  table[:, 1::2] = np.cos(position * div_term)
  return table.astype(np.float32)  # (T_max, C)


def apply_rope(x: jax.Array, base: float) -> jax.Array:
  """Rotary positions, half-split layout (GPT-NeoX / LLaMA-HF): channel i pairs with i + D/2.

  x: (B, T, H, D), positions 0..T-1. Rotation is done in float32.
  """
  angles = rope_angles(x.shape[1], x.shape[-1], base)[None, :, None, :]  # (1, T, 1, D/2)
  return _rotate_half(x, np.cos(angles), np.sin(angles))


def rope_angles(T: int, D: int, base: float) -> np.ndarray:
  """(T, D/2) float32 rotation angles: position t, channel pair i turns by t·base^(-2i/D)."""
  inv_freq = base ** (-np.arange(0, D, 2, dtype=np.float32) / D)  # (D/2,)
  return np.arange(T, dtype=np.float32)[:, None] * inv_freq[None, :]


def _rotate_half(x, cos, sin):
  """Rotates channel i with channel i + D/2 by angles given as cos, sin (broadcast to x[..., :D/2])."""
  D = x.shape[-1]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : D // 2], xf[..., D // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# Query rows per block of "blocked" attention: small enough to skip most of the masked
# upper triangle, large enough to keep each block's matmuls efficient (docs/performance.md).
ATTENTION_BLOCK = 64
# Scores per chunk of rows in blocked attention (B·H·T² floats): ~4 MB stays in cache.
ATTENTION_CHUNK_SCORES = 1 << 20


def causal_mask(T: int, window: int = 0) -> np.ndarray:
  """(T, T) bool: query i sees key j iff j <= i (and i - j < window when window > 0)."""
  i = np.arange(T)[:, None]
  j = np.arange(T)[None, :]
  mask = j <= i
  if window > 0:
    mask &= (i - j) < window
  return mask


def plain_attention(q, k, v, *, window: int, dropout_rate: float, dropout_rng, deterministic: bool):
  """The guide's attention written out: scores, mask, softmax (float32), weighted sum.

  q, k, v: (B, T, H, D) -> (B, T, H, D).
  """
  D = q.shape[-1]
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)  # (B, H, T, T)
  scores = scores / math.sqrt(D)
  mask = causal_mask(q.shape[1], window)
  scores = jnp.where(mask, scores, -jnp.inf)
  weights = jax.nn.softmax(scores, axis=-1)
  if not deterministic and dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


def blocked_attention(q, k, v, *, window: int, block: int, chunk_rows: Optional[int] = None):
  """Exact causal attention that never computes masked blocks, with a recomputing VJP.

  q, k, v: (B, T, H, D) -> (B, T, H, D). See `blocked_attention_qkv`, which the
  model calls on its fused projection directly.
  """
  return blocked_attention_qkv(jnp.stack([q, k, v], axis=2), window=window, block=block,
                               chunk_rows=chunk_rows)


def blocked_attention_qkv(qkv, *, window: int, block: int, rope_base: Optional[float] = None,
                          chunk_rows: Optional[int] = None):
  """Blocked causal attention of a fused projection: qkv (B, T, 3, H, D) -> (B, T, H, D).

  Each block of `block` queries is scored against its own key prefix only, so the
  blocks above the diagonal (and before a sliding window) are skipped: 5/8 of
  plain attention's work at T=256 with blocks of 64. The backward pass recomputes
  the weights from the saved log-sum-exp, one key block against the queries that
  see it, instead of storing (B, H, T, T). Rows go through in chunks of
  `chunk_rows` (default: `attention_chunk_rows`) so one chunk's scores stay in
  cache. With `rope_base`, q and k are rotated first, as `apply_rope` does.
  Matches `plain_attention` (deterministic) to float32 rounding.
  """
  B, T, _, H, _ = qkv.shape
  rows = chunk_rows or attention_chunk_rows(B, H, T)
  return _blocked_attention(qkv, window, block, rope_base, min(rows, B))


def _by_chunks(fn, rows: int, *xs, after=None):
  """fn over chunks of `rows` rows of every x (leading axis B), in one loop.

  With `after`, the loop's output buffers are created only once `after` exists;
  otherwise XLA may allocate them at the start of the step and hold them throughout.
  """
  B = xs[0].shape[0]
  if rows >= B:
    return fn(*xs)
  n = B // rows
  if jax.device_count() == 1:
    split = lambda x: x.reshape(n, rows, *x.shape[1:])  # free: chunk i is rows i*rows..
    merge = lambda x: x.reshape(B, *x.shape[2:])
  else:
    # Chunk i takes rows i, i+n, ...: a batch split over devices stays split within each chunk.
    split = lambda x: jnp.swapaxes(x.reshape(rows, n, *x.shape[1:]), 0, 1)
    merge = lambda x: jnp.swapaxes(x, 0, 1).reshape(B, *x.shape[2:])
  chunks = tuple(split(x) for x in xs)
  if after is None:
    out = lax.map(lambda chunk: fn(*chunk), chunks)
  else:
    shapes = jax.eval_shape(fn, *(c[0] for c in chunks))
    init = jax.tree_util.tree_map(
        lambda s: _after(jnp.zeros((n, *s.shape), s.dtype), after), shapes)

    def body(i, acc):
      res = fn(*(lax.dynamic_index_in_dim(c, i, keepdims=False) for c in chunks))
      return jax.tree_util.tree_map(lambda a, r: lax.dynamic_update_index_in_dim(a, r, i, 0),
                                    acc, res)

    out = lax.fori_loop(0, n, body, init)
  return jax.tree_util.tree_map(merge, out)


def attention_chunk_rows(B: int, H: int, T: int) -> int:
  """Rows per chunk of blocked attention: on CPU about 2^20 scores (4 MB), dividing B."""
  if jax.default_backend() != "cpu":
    return B  # caches are not the point on accelerators
  rows = max(1, min(B, ATTENTION_CHUNK_SCORES // (H * T * T)))
  while B % rows or (rows < B and rows % jax.device_count()):
    rows -= 1
    if rows == 0:
      return B  # no chunking keeps every device's rows where they are
  return rows


def _query_blocks(T: int, block: int, window: int):
  """(query start, query end, key start) of each query block: its keys are ks..qe."""
  return [(qs, min(qs + block, T), 0 if window <= 0 else max(0, qs - window + 1))
          for qs in range(0, T, block)]


def _key_blocks(T: int, block: int, window: int):
  """(key start, key end, query end) of each key block: queries ks..qe see keys ks..ke."""
  return [(ks, min(ks + block, T), T if window <= 0 else min(T, min(ks + block, T) + window - 1))
          for ks in range(0, T, block)]


def _heads_major(qkv, rope_base, inverse=False):
  """(B, T, 3, H, D) -> (3, B, H, T, D), q and k rotated by rope (back, with `inverse`)."""
  x = qkv.transpose(2, 0, 3, 1, 4)
  if rope_base is None:
    return x
  angles = rope_angles(x.shape[3], x.shape[4], rope_base)  # (T, D/2)
  # v's slot rotates by zero, so one elementwise pass covers all three.
  cos = np.stack([np.cos(angles)] * 2 + [np.ones_like(angles)])[:, None, None]  # (3, 1, 1, T, D/2)
  sin = np.stack([np.sin(angles)] * 2 + [np.zeros_like(angles)])[:, None, None]
  return _rotate_half(x, cos, -sin if inverse else sin)


def _chunk_forward(qkv, window, block, rope_base):
  # Keys-major layout: scores are (K, Q) tiles, so that every matmul of both passes
  # but one takes its operands untransposed (docs/performance.md).
  q, k, v = _heads_major(qkv, rope_base)  # each (B, H, T, D)
  B, H, T, D = q.shape
  scale = 1.0 / math.sqrt(D)
  mask = causal_mask(T, window).T  # [key, query]
  vt = jnp.swapaxes(v, 2, 3)  # (B, H, D, T): (D, K) @ (K, Q) needs no transposed operand
  outs, lses = [], []
  for qs, qe, ks in _query_blocks(T, block, window):
    s = jnp.einsum("bhkd,bhqd->bhkq", k[:, :, ks:qe], q[:, :, qs:qe],
                   preferred_element_type=jnp.float32)  # (B, H, K, Q)
    s = jnp.where(mask[ks:qe, qs:qe], s * scale, -jnp.inf)
    m = jnp.max(s, axis=2, keepdims=True)  # (B, H, 1, Q)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=2, keepdims=True)
    o = jnp.einsum("bhdk,bhkq->bhdq", vt[..., ks:qe], p.astype(v.dtype),
                   preferred_element_type=jnp.float32)
    outs.append(o / l)  # normalising (D, Q) is cheaper than (K, Q)
    lses.append(m + jnp.log(l))
  out = jnp.concatenate(outs, axis=3).transpose(0, 3, 1, 2).astype(v.dtype)  # (B, T, H, D)
  return out, jnp.concatenate(lses, axis=3)  # (B, T, H, D), (B, H, 1, T)


def _chunk_backward(qkv, out, lse, g, window, block, rope_base):
  q, k, v = _heads_major(qkv, rope_base)
  B, H, T, D = q.shape
  scale = 1.0 / math.sqrt(D)
  f32 = jnp.float32
  # Row sums of dP * P equal those of dO * O: the softmax backward's correction term.
  delta = jnp.sum(g.astype(f32) * out.astype(f32), axis=-1).transpose(0, 2, 1)[:, :, None]
  gt = g.transpose(0, 2, 1, 3)  # (B, H, T, D)
  mask = causal_mask(T, window).T
  dks, dvs = [], []
  dq = jnp.zeros((B, H, D, T), f32)  # transposed: each key block adds a (D, Q) product
  kt = jnp.swapaxes(k, 2, 3)  # (B, H, D, T)
  for ks, ke, qe in _key_blocks(T, block, window):
    kb, vb, qb, gb = k[:, :, ks:ke], v[:, :, ks:ke], q[:, :, ks:qe], gt[:, :, ks:qe]
    s = jnp.einsum("bhkd,bhqd->bhkq", kb, qb, preferred_element_type=f32)  # (B, H, K, Q)
    p = jnp.where(mask[ks:ke, ks:qe], jnp.exp(s * scale - lse[..., ks:qe]), 0.0)
    dp = jnp.einsum("bhkd,bhqd->bhkq", vb, gb, preferred_element_type=f32)
    ds = (p * (dp - delta[..., ks:qe]) * scale).astype(q.dtype)
    dvs.append(jnp.einsum("bhkq,bhqd->bhkd", p.astype(gt.dtype), gb, preferred_element_type=f32))
    dks.append(jnp.einsum("bhkq,bhqd->bhkd", ds, qb, preferred_element_type=f32))
    dq = dq.at[..., ks:qe].add(jnp.einsum("bhdk,bhkq->bhdq", kt[..., ks:ke], ds,
                                          preferred_element_type=f32))
  dx = jnp.stack([dq.transpose(0, 1, 3, 2), jnp.concatenate(dks, axis=2),
                  jnp.concatenate(dvs, axis=2)])  # (3, B, H, T, D)
  if rope_base is not None:
    dx = _heads_major(dx.transpose(1, 3, 0, 2, 4), rope_base, inverse=True)
  return dx.transpose(1, 3, 0, 2, 4).astype(qkv.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _blocked_attention(qkv, window, block, rope_base, rows):
  return _blocked_forward(qkv, window, block, rope_base, rows)[0]


def _blocked_forward(qkv, window, block, rope_base, rows):
  out, lse = _by_chunks(lambda x: _chunk_forward(x, window, block, rope_base), rows, qkv)
  # qkv itself is the residual: kept as it is, not stacked again by the loop.
  return out, (qkv, out, lse)


def _blocked_backward(window, block, rope_base, rows, res, g):
  return (_by_chunks(lambda *a: _chunk_backward(*a, window, block, rope_base), rows, *res, g,
                     after=g),)


_blocked_attention.defvjp(_blocked_forward, _blocked_backward)


def single_query_attention(q, k, v, positions, *, window: int):
  """Plain attention of one query per row: q (B, 1, H, D) at `positions` (B,), k, v (B, T, H, D)."""
  D, T = q.shape[-1], k.shape[1]
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(D)
  j, i = jnp.arange(T)[None, :], positions[:, None]  # (1, T), (B, 1)
  mask = j <= i
  if window > 0:
    mask &= (i - j) < window
  weights = jax.nn.softmax(jnp.where(mask[:, None, None, :], scores, -jnp.inf), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


def fused_attention(q, k, v, *, window: int, implementation: Optional[str]):
  """jax.nn.dot_product_attention: XLA on CPU/TPU, cuDNN flash attention on GPU when asked."""
  local = (window - 1, 0) if window > 0 else None
  return jax.nn.dot_product_attention(
      q, k, v, is_causal=True, local_window_size=local, implementation=implementation)


class CausalSelfAttention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool, query_at: Optional[jax.Array] = None):
    """(B, T, C) -> (B, T, C); with `query_at` (B,) positions, (B, 1, C) for those queries only."""
    cfg = self.cfg
    H, D = cfg.num_heads, cfg.head_dim
    # One fused projection for Q, K and V: (B, T, C) -> (B, T, 3, H, D).
    qkv = nn.DenseGeneral(
        features=(3, H, D), use_bias=cfg.use_bias, dtype=cfg.cdtype, param_dtype=cfg.pdtype,
        dot_general=cfg.dot_general,
        kernel_init=_dense_init("embed", None, "heads", "head_dim"),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None, "heads", "head_dim")),
        name="qkv")(x)
    weight_dropout = not deterministic and cfg.attn_dropout > 0
    if cfg.attention == "blocked" and query_at is None and not weight_dropout:
      # Takes the fused projection whole: one layout change for q, k and v together.
      rope = cfg.rope_base if cfg.pos_encoding == "rope" else None
      if cfg.dot_general is not lax.dot_general:
        qkv = qkv.astype(cfg.matmul_dtype)  # the mixed precision's operands; softmax stays float32
      y = blocked_attention_qkv(qkv, window=cfg.sliding_window, block=ATTENTION_BLOCK, rope_base=rope)
    else:
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, T, H, D)
      if cfg.pos_encoding == "rope":
        q, k = apply_rope(q, cfg.rope_base), apply_rope(k, cfg.rope_base)
      if query_at is not None:
        q = jnp.take_along_axis(q, query_at[:, None, None, None], axis=1)  # (B, 1, H, D)
        y = single_query_attention(q, k, v, query_at, window=cfg.sliding_window)
      elif cfg.attention in ("plain", "blocked"):
        # Dropout on the weights needs them materialised: "blocked" falls back to plain then.
        rng = self.make_rng("dropout") if weight_dropout else None
        y = plain_attention(q, k, v, window=cfg.sliding_window, dropout_rate=cfg.attn_dropout,
                            dropout_rng=rng, deterministic=deterministic)
      else:
        # Parameters do not depend on the kernel: init (and eval_shape) run without a GPU.
        cudnn = cfg.attention == "cudnn" and not self.is_initializing()
        y = fused_attention(q, k, v, window=cfg.sliding_window,
                            implementation="cudnn" if cudnn else None)
    # Concatenate heads and project back: (B, T, H, D) -> (B, T, C).
    y = nn.DenseGeneral(
        features=cfg.embed_dim, axis=(-2, -1), use_bias=cfg.use_bias, dtype=cfg.cdtype,
        param_dtype=cfg.pdtype, dot_general=cfg.dot_general,
        kernel_init=_dense_init("heads", "head_dim", "embed"),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name="proj")(y)
    return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_jvp
def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x·Φ(x) = x/2·(1 + erf(x/√2)), without erfc.

  XLA evaluates erf as a rational polynomial (~1e-7 accurate), which is cheap on
  CPU; the erfc of `jax.nn.gelu(approximate=False)` costs an exp and branches.
  The two agree to float32 rounding, except where GELU itself is below 1e-6
  (x < -4.7), whose absolute error stays under 1e-6. The derivative is
  Φ(x) + x·φ(x), with one exp.
  """
  return 0.5 * x * (1.0 + lax.erf(x * _SQRT_HALF))


@gelu.defjvp
def _gelu_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  cdf = 0.5 * (1.0 + lax.erf(x * _SQRT_HALF))
  pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)
  return x * cdf, (cdf + x * pdf) * dx


def activation(name: str):
  if name == "gelu":
    return gelu
  if name == "gelu_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  return jax.nn.relu


class MLP(nn.Module):
  """Linear C -> 4C, GELU, Linear 4C -> C, dropout."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool):
    cfg = self.cfg
    hidden = cfg.mlp_ratio * cfg.embed_dim
    h = nn.Dense(hidden, use_bias=cfg.use_bias, dtype=cfg.cdtype, param_dtype=cfg.pdtype,
                 dot_general=cfg.dot_general, kernel_init=_dense_init("embed", "mlp"),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                 name="fc")(x)  # (B, T, 4C)
    y = ActivationDense(cfg.embed_dim, cfg.activation, use_bias=cfg.use_bias, dtype=cfg.cdtype,
                        param_dtype=cfg.pdtype, dot_general=cfg.dot_general,
                        name="proj")(h)  # (B, T, C)
    return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


class ActivationDense(nn.Module):
  """act(h) @ kernel + bias: nn.Dense's parameters and maths on the activation of h.

  Only h is kept for the backward pass, which recomputes act(h) and its derivative
  (one cheap elementwise pass): two fewer (B, T, 4C) arrays stored per layer.
  """
  features: int
  activation: str
  use_bias: bool
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  dot_general: Callable = lax.dot_general

  @nn.compact
  def __call__(self, h):
    kernel = self.param("kernel", _dense_init("mlp", "embed"), (h.shape[-1], self.features),
                        self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                        (self.features,), self.param_dtype)
    return _activation_dense(h, kernel, bias, self.activation, self.dtype, self.dot_general)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _activation_dense(h, kernel, bias, act: str, dtype, dot_general):
  return _activation_dense_fwd(h, kernel, bias, act, dtype, dot_general)[0]


def _dense(a, kernel, bias, dtype, dot_general):
  y = dot_general(a.astype(dtype), kernel.astype(dtype), (((a.ndim - 1,), (0,)), ((), ())))
  return y if bias is None else y + bias.astype(dtype)


def _activation_dense_fwd(h, kernel, bias, act, dtype, dot_general):
  return _dense(activation(act)(h), kernel, bias, dtype, dot_general), (h, kernel, bias)


def _activation_dense_bwd(act, dtype, dot_general, res, g):
  h, kernel, bias = res
  h = _after(h, g)
  a, act_vjp = jax.vjp(lambda h: activation(act)(h).astype(dtype), h)
  _, dense_vjp = jax.vjp(lambda a, k, b: _dense(a, k, b, dtype, dot_general), a, kernel, bias)
  da, dkernel, dbias = dense_vjp(g)
  return (act_vjp(da)[0], dkernel, dbias)


_activation_dense.defvjp(_activation_dense_fwd, _activation_dense_bwd)


def _after(x, g):
  """x, made to depend on the gradient g so its recomputation waits for the backward pass.

  XLA would otherwise merge a backward pass's recomputation with the forward pass's
  identical ops (or schedule it early) and keep the result alive in between, which
  is the memory the recomputation was meant to save. x·0 is not folded (NaN semantics).
  """
  return x + (0.0 * g.reshape(-1)[0]).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_fn(x, scale, bias, eps: float):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32.

  `bias` may be None. The hand-written backward pass works from the saved
  normalised x, in fewer passes than XLA's autodiff of the statistics.
  """
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  xc = xf - mean
  rstd = lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
  xhat = xc * rstd
  y = xhat * scale
  if bias is not None:
    y = y + bias
  return y, (xhat, rstd, scale, bias, jnp.zeros((), x.dtype))


def _layer_norm_bwd(eps, res, g):
  xhat, rstd, scale, bias, x_dtype = res
  gs = g * scale
  dx = rstd * (gs - jnp.mean(gs, axis=-1, keepdims=True)
               - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True))
  rows = tuple(range(xhat.ndim - 1))
  dscale = jnp.sum(g * xhat, axis=rows).astype(scale.dtype)
  dbias = None if bias is None else jnp.sum(g, axis=rows).astype(bias.dtype)
  return dx.astype(x_dtype.dtype), dscale, dbias


layer_norm_fn.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """nn.LayerNorm's parameters ("scale", "bias") and maths, statistics in float32, faster on CPU."""
  epsilon: float
  use_bias: bool = True
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (C,), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                        (C,), self.param_dtype)
    return layer_norm_fn(x, scale.astype(jnp.float32),
                         None if bias is None else bias.astype(jnp.float32), self.epsilon)


def layer_norm(cfg: ModelConfig, name: str) -> LayerNorm:
  # Statistics in float32 whatever the compute dtype; epsilon explicit (Flax's default is 1e-6).
  return LayerNorm(epsilon=cfg.ln_eps, use_bias=cfg.use_bias, param_dtype=cfg.pdtype, name=name)


class Block(nn.Module):
  """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool, query_at: Optional[jax.Array] = None):
    dtype = x.dtype
    y = CausalSelfAttention(self.cfg, name="attn")(
        layer_norm(self.cfg, "ln1")(x).astype(dtype), deterministic, query_at)
    if query_at is not None:  # keys and values come from every position, the rest from one
      x = jnp.take_along_axis(x, query_at[:, None, None], axis=1)  # (B, 1, C)
    x = x + y
    x = x + MLP(self.cfg, name="mlp")(layer_norm(self.cfg, "ln2")(x).astype(dtype), deterministic)
    return x


class Transformer(nn.Module):
  """Token ids (B, T) -> logits (B, T, V) in float32.

  `logits_at` (B,) positions give (B, V) instead: the logits of one position per
  row, as the full call computes them. Only what those depend on is computed:
  the last block runs its queries, MLP and the head at those positions alone.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens, *, train: bool = False, logits_at: Optional[jax.Array] = None):
    cfg = self.cfg
    B, T = tokens.shape
    if T > cfg.max_len:
      raise ValueError(f"sequence length {T} exceeds model.max_len {cfg.max_len}.")
    embed = nn.Embed(
        cfg.vocab_size, cfg.embed_dim, dtype=cfg.cdtype, param_dtype=cfg.pdtype,
        embedding_init=_dense_init("vocab", "embed"), name="embed")
    pos = None
    if cfg.pos_encoding == "learned":
      pos = self.param("pos_embed", _dense_init(None, "embed"), (cfg.max_len, cfg.embed_dim),
                       cfg.pdtype)
    block = nn.remat(Block, static_argnums=(2,)) if cfg.remat else Block
    blocks = [block(cfg, name=f"block_{i}") for i in range(cfg.num_layers)]
    ln_f = layer_norm(cfg, "ln_f")
    head = None
    if not cfg.tie_embeddings:
      head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.cdtype, param_dtype=cfg.pdtype,
                      dot_general=cfg.dot_general, kernel_init=_dense_init("embed", "vocab"),
                      name="head")
    if logits_at is not None:
      logits_at = jnp.asarray(logits_at, jnp.int32)

    x = embed(tokens)  # (B, T, C)
    if pos is not None:
      x = x + pos[:T].astype(x.dtype)
    elif cfg.pos_encoding == "sinusoidal":
      x = x + jnp.asarray(sinusoidal_table(T, cfg.embed_dim), x.dtype)
    # rope rotates q and k inside attention instead.
    x = nn.Dropout(cfg.dropout)(x, deterministic=not train)
    for i, blk in enumerate(blocks):
      x = blk(x, not train, logits_at if i == cfg.num_layers - 1 else None)
    x = ln_f(x).astype(cfg.cdtype)
    if head is not None:
      logits = head(x)  # (B, T, V)
    elif cfg.dot_general is lax.dot_general:
      logits = embed.attend(x)  # the same stored matrix as the input embedding
    else:  # attend's matmul, in the dense layers' mixed precision
      logits = cfg.dot_general(x, embed.embedding.T.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())))
    logits = logits.astype(jnp.float32)
    return logits if logits_at is None else logits[:, 0]


def train_row_groups(cfg: ModelConfig, B: int) -> int:
  """Sequential groups of rows the train step splits a (B, T) batch into (see model.micro_batch_rows).

  Auto (0) is groups of 4 rows per device on CPU, where one group's activations
  then stay in cache, and the whole batch on accelerators. A group keeps at least
  one row per device, and the group count divides B.
  """
  rows = cfg.micro_batch_rows or (4 * jax.device_count() if jax.default_backend() == "cpu" else B)
  rows = max(rows, jax.device_count())
  groups = max(1, B // rows)
  while B % groups or (B // groups) % jax.device_count():
    groups -= 1
  return groups


def init_params(cfg: ModelConfig, rng: jax.Array):
  """Plain (unboxed) parameter arrays; the logical axis names live in `param_axes`."""
  variables = Transformer(cfg).init(rng, jnp.zeros((1, min(8, cfg.max_len)), jnp.int32))
  return nn.meta.unbox(variables["params"])


def param_axes(cfg: ModelConfig):
  """The logical axis names of every parameter, as a PartitionSpec tree (no computation)."""
  boxed = jax.eval_shape(
      lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, min(8, cfg.max_len)), jnp.int32)))
  return nn.get_partition_spec(boxed["params"])


def count_params(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def num_params(cfg: ModelConfig) -> int:
  """Closed-form parameter count; equals count_params(init(...))."""
  C, V, L, F = cfg.embed_dim, cfg.vocab_size, cfg.num_layers, cfg.mlp_ratio * cfg.embed_dim
  b = 1 if cfg.use_bias else 0
  ln = C + b * C
  attn = C * 3 * C + b * 3 * C + C * C + b * C
  mlp = C * F + b * F + F * C + b * C
  total = V * C + L * (2 * ln + attn + mlp) + ln
  if cfg.pos_encoding == "learned":
    total += cfg.max_len * C
  if not cfg.tie_embeddings:
    total += C * V
  return total


def forward_flops(cfg: ModelConfig, T: int, last_only: bool = False) -> float:
  """Matmul FLOPs of one row's forward over T positions, as this model computes them.

  Blocked attention counts the (query, key) pairs of the blocks it computes, the
  other kernels all T². With `last_only` (`logits_at`), the last block computes
  keys and values at every position but its query, MLP and the head at one.
  """
  C, L, V, F = cfg.embed_dim, cfg.num_layers, cfg.vocab_size, cfg.mlp_ratio * cfg.embed_dim
  per_position = 2 * (4 * C * C + 2 * C * F)  # qkv, output projection, MLP
  if cfg.attention == "blocked":
    pairs = sum((qe - qs) * (qe - ks) for qs, qe, ks in _query_blocks(T, ATTENTION_BLOCK, cfg.sliding_window))
  else:
    pairs = T * T
  layer = T * per_position + 4 * C * pairs  # scores and weighted values: 2·D·H per pair each
  if not last_only:
    return L * layer + T * 2 * C * V
  last = T * 4 * C * C + 2 * (2 * C * C + 2 * C * F) + 4 * C * T  # k, v; q, out, MLP; one query
  return (L - 1) * layer + last + 2 * C * V


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6N for the matmuls plus 12·L·T·C for attention (PaLM appendix B).

  N counts matmul weights only (the head, not the input lookup or position table). Causal masking is not discounted, as in nanoGPT/PaLM.
  """
  n = num_params(cfg) - (cfg.max_len * cfg.embed_dim if cfg.pos_encoding == "learned" else 0)
  if not cfg.tie_embeddings:
    n -= cfg.vocab_size * cfg.embed_dim  # the input lookup is a gather, not a matmul
  return 6.0 * n + 12.0 * cfg.num_layers * seq_len * cfg.embed_dim
