"""The decoder-only transformer of the guide, as Flax linen modules.

Shapes use the guide's letters: B batch, T time, C channels (embed_dim),
V vocab, H heads, D head dim (C // H).

Every weight carries logical axis names ("embed", "mlp", "heads", "vocab", ...);
`sharding.py` maps them onto the device mesh in one place.
"""

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformer import config as config_lib


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

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def cdtype(self):
    return jnp.dtype(self.dtype)

  @property
  def pdtype(self):
    return jnp.dtype(self.param_dtype)


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
  T, D = x.shape[1], x.shape[-1]
  inv_freq = base ** (-np.arange(0, D, 2, dtype=np.float32) / D)  # (D/2,)
  angles = np.arange(T, dtype=np.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
  cos = jnp.asarray(np.cos(angles))[None, :, None, :]  # (1, T, 1, D/2)
  sin = jnp.asarray(np.sin(angles))[None, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : D // 2], xf[..., D // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


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


def fused_attention(q, k, v, *, window: int, implementation: Optional[str]):
  """jax.nn.dot_product_attention: XLA on CPU/TPU, cuDNN flash attention on GPU when asked."""
  local = (window - 1, 0) if window > 0 else None
  return jax.nn.dot_product_attention(
      q, k, v, is_causal=True, local_window_size=local, implementation=implementation)


class CausalSelfAttention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool):
    cfg = self.cfg
    H, D = cfg.num_heads, cfg.head_dim
    # One fused projection for Q, K and V: (B, T, C) -> (B, T, 3, H, D).
    qkv = nn.DenseGeneral(
        features=(3, H, D), use_bias=cfg.use_bias, dtype=cfg.cdtype, param_dtype=cfg.pdtype,
        kernel_init=_dense_init("embed", None, "heads", "head_dim"),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None, "heads", "head_dim")),
        name="qkv")(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, T, H, D)
    if cfg.pos_encoding == "rope":
      q, k = apply_rope(q, cfg.rope_base), apply_rope(k, cfg.rope_base)
    if cfg.attention == "plain":
      rng = self.make_rng("dropout") if (not deterministic and cfg.attn_dropout > 0) else None
      y = plain_attention(q, k, v, window=cfg.sliding_window, dropout_rate=cfg.attn_dropout,
                          dropout_rng=rng, deterministic=deterministic)
    else:
      impl = "cudnn" if cfg.attention == "cudnn" else None
      y = fused_attention(q, k, v, window=cfg.sliding_window, implementation=impl)
    # Concatenate heads and project back: (B, T, H, D) -> (B, T, C).
    y = nn.DenseGeneral(
        features=cfg.embed_dim, axis=(-2, -1), use_bias=cfg.use_bias, dtype=cfg.cdtype,
        param_dtype=cfg.pdtype, kernel_init=_dense_init("heads", "head_dim", "embed"),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name="proj")(y)
    return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


def activation(name: str):
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
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
                 kernel_init=_dense_init("embed", "mlp"),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                 name="fc")(x)  # (B, T, 4C)
    h = activation(cfg.activation)(h)
    y = nn.Dense(cfg.embed_dim, use_bias=cfg.use_bias, dtype=cfg.cdtype, param_dtype=cfg.pdtype,
                 kernel_init=_dense_init("mlp", "embed"),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                 name="proj")(h)  # (B, T, C)
    return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


def layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
  # Statistics in float32 whatever the compute dtype; epsilon explicit (Flax's default is 1e-6).
  return nn.LayerNorm(
      epsilon=cfg.ln_eps, use_bias=cfg.use_bias, dtype=jnp.float32, param_dtype=cfg.pdtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
      name=name)


class Block(nn.Module):
  """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool):
    dtype = x.dtype
    x = x + CausalSelfAttention(self.cfg, name="attn")(
        layer_norm(self.cfg, "ln1")(x).astype(dtype), deterministic)
    x = x + MLP(self.cfg, name="mlp")(layer_norm(self.cfg, "ln2")(x).astype(dtype), deterministic)
    return x


class Transformer(nn.Module):
  """Token ids (B, T) -> logits (B, T, V) in float32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    cfg = self.cfg
    B, T = tokens.shape
    if T > cfg.max_len:
      raise ValueError(f"sequence length {T} exceeds model.max_len {cfg.max_len}.")
    deterministic = not train
    embed = nn.Embed(
        cfg.vocab_size, cfg.embed_dim, dtype=cfg.cdtype, param_dtype=cfg.pdtype,
        embedding_init=_dense_init("vocab", "embed"), name="embed")
    x = embed(tokens)  # (B, T, C)
    if cfg.pos_encoding == "learned":
      pos = self.param("pos_embed", _dense_init(None, "embed"), (cfg.max_len, cfg.embed_dim),
                       cfg.pdtype)
      x = x + pos[:T].astype(x.dtype)
    elif cfg.pos_encoding == "sinusoidal":
      x = x + jnp.asarray(sinusoidal_table(T, cfg.embed_dim), x.dtype)
    # rope rotates q and k inside attention instead.
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)

    block = nn.remat(Block, static_argnums=(2,)) if cfg.remat else Block
    for i in range(cfg.num_layers):
      x = block(cfg, name=f"block_{i}")(x, deterministic)
    x = layer_norm(cfg, "ln_f")(x).astype(cfg.cdtype)

    if cfg.tie_embeddings:
      logits = embed.attend(x)  # (B, T, V), the same stored matrix as the input embedding
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.cdtype, param_dtype=cfg.pdtype,
                        kernel_init=_dense_init("embed", "vocab"), name="head")(x)
    return logits.astype(jnp.float32)


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


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6N for the matmuls plus 12·L·T·C for attention (PaLM appendix B).

  N counts matmul weights only (the head, not the input lookup or position table). Causal masking is not discounted, as in nanoGPT/PaLM.
  """
  n = num_params(cfg) - (cfg.max_len * cfg.embed_dim if cfg.pos_encoding == "learned" else 0)
  if not cfg.tie_embeddings:
    n -= cfg.vocab_size * cfg.embed_dim  # the input lookup is a gather, not a matmul
  return 6.0 * n + 12.0 * cfg.num_layers * seq_len * cfg.embed_dim
