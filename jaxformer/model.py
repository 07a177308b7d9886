"""The decoder-only transformer of the guide, as Flax linen modules.

Shapes use the guide's letters: B batch, T time, C channels (embed_dim),
V vocab, H heads, D head dim (C // H).

`ModelConfig` is the architecture, what a checkpoint's parameters depend on;
`Execution` is how it is computed (kernels, dtypes, remat, dropout), free to
change between runs. With kernels="reference" this file is the whole model; the
other kernels swap in faster code from `jaxformer/kernels/` with the same
parameters and results.

Every weight carries logical axis names ("embed", "mlp", "heads", "vocab", ...);
`sharding.py` maps them onto the device mesh in one place.
"""

import dataclasses
import functools
import math
from typing import Optional

import flax.linen as nn
import jax
from jax import lax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from jaxformer import kernels


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The architecture: what a checkpoint's shapes and function depend on."""
  vocab_size: int
  num_layers: int
  num_heads: int
  embed_dim: int
  mlp_ratio: int
  max_len: int
  pos_encoding: str    # learned | sinusoidal | rope
  rope_base: float
  sliding_window: int  # 0: full causal attention; W > 0: each token sees the last W
  activation: str      # gelu | gelu_tanh | relu
  use_bias: bool
  tie_embeddings: bool
  ln_eps: float

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads


# Remat policies by name: what a block keeps from its forward pass for the backward pass
# (anything else is recomputed). "none" keeps everything (no remat); "full" keeps the block's
# input only. Names tag the values saved by the policies below (jax.ad_checkpoint.checkpoint_name).
REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # every matmul output; recompute the rest
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
    "save_qkv_attention_out": jax.checkpoint_policies.save_only_these_names("qkv", "attention_out"),
}


@dataclasses.dataclass(frozen=True)
class Execution:
  """How the model is computed: never part of a checkpoint, free to change on resume or fine-tune.

  kernels: "reference" (this file), "cpu", "xla", "cudnn" or "splash" (see jaxformer/kernels/).
  matmul_dtype: the dense layers' matmul operands ("" = dtype), summed in float32.
  remat: a policy named in REMAT. The dropout rates apply with train=True only.
  mesh, rules: the train step's device mesh and logical-axis rules (sharding.RULES); given,
  the activations are pinned to the layouts the rules give them and per-device kernels
  (splash) run per device. None: XLA chooses.
  """
  kernels: str = "reference"
  dtype: str = "float32"
  param_dtype: str = "float32"
  matmul_dtype: str = ""
  remat: str = "none"
  dropout: float = 0.0
  attn_dropout: float = 0.0
  mesh: Optional[jax.sharding.Mesh] = None
  rules: tuple = ()

  def __post_init__(self):
    if self.kernels != "reference" and self.kernels not in kernels.attention.ATTENTION:
      raise ValueError(f"unknown kernels {self.kernels!r}; use reference, cpu, xla, cudnn or splash.")
    if self.remat not in REMAT:
      raise ValueError(f"unknown remat policy {self.remat!r}; use one of {', '.join(REMAT)}.")

  @property
  def cdtype(self):
    return jnp.dtype(self.dtype)

  @property
  def pdtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def dot_general(self):
    return kernels.matmul.dot_general(self.matmul_dtype, self.dtype)

  @property
  def operand_dtype(self):
    """The matmul operands' dtype under mixed precision, else None."""
    return None if self.dot_general is lax.dot_general else jnp.dtype(self.matmul_dtype)


_init = nn.initializers.normal(stddev=0.02)


def with_axes(init, axes):
  return nn.with_logical_partitioning(init, axes)


def constrain(x, ex: Execution, axes: tuple):
  """Pins activation `x` to the layout its logical `axes` get from the rules (no-op without a mesh).

  The same rules as the parameters: rows over data x fsdp, heads/MLP/vocabulary over
  tensor; channels (None) whole on every device. Without these GSPMD may choose other
  layouts between layers and move the data there and back (all-to-alls) every block.
  """
  if ex.mesh is None:
    return x
  return nn.with_logical_constraint(x, axes, rules=ex.rules, mesh=ex.mesh)


def dense_args(cfg: ModelConfig, ex: Execution, axes, n_in: int = 1) -> dict:
  """A dense layer's settings: init, dtypes, matmul precision; `axes` name the kernel's, inputs first."""
  return dict(use_bias=cfg.use_bias, dtype=ex.cdtype, param_dtype=ex.pdtype, dot_general=ex.dot_general,
              kernel_init=with_axes(_init, axes),
              bias_init=with_axes(nn.initializers.zeros, axes[n_in:]))


def dense(cfg: ModelConfig, ex: Execution, features, axes, name: str, axis=-1) -> nn.DenseGeneral:
  n_in = 1 if isinstance(axis, int) else len(axis)
  return nn.DenseGeneral(features, axis=axis, **dense_args(cfg, ex, axes, n_in), name=name)


def layer_norm(cfg: ModelConfig, ex: Execution, name: str):
  # Statistics in float32 whatever the compute dtype; epsilon explicit (Flax's default is 1e-6).
  norm = kernels.layers.LayerNorm if ex.kernels == "cpu" else nn.LayerNorm
  return norm(epsilon=cfg.ln_eps, dtype=ex.cdtype, param_dtype=ex.pdtype, use_bias=cfg.use_bias,
              scale_init=with_axes(nn.initializers.ones, ("embed",)),
              bias_init=with_axes(nn.initializers.zeros, ("embed",)), name=name)


ACTIVATIONS = {"gelu": functools.partial(jax.nn.gelu, approximate=False),
               "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
               "relu": jax.nn.relu}


class DenseActivation(nn.Module):
  """act(x @ kernel + bias), x: (..., C) -> (..., F), with nn.Dense's parameters.

  The bias add and the activation are recomputed in the backward pass from the matmul's
  output. Autodiff of act(nn.Dense(x)) instead keeps x @ kernel + bias and GELU's tanh for
  it: two more (B, T, F) arrays written and read back per block. GPT-2 at B=64 compiled for
  an H200: 9.7 GB less traffic a step, 4.5 GiB less memory (docs/performance.md).
  """
  features: int
  activation: str
  ex: Execution
  axes: tuple  # the kernel's logical axes, input first
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    ex = self.ex
    kernel = self.param("kernel", with_axes(_init, self.axes), (x.shape[-1], self.features), ex.pdtype)
    h = ex.dot_general(x.astype(ex.cdtype), kernel.astype(ex.cdtype), (((x.ndim - 1,), (0,)), ((), ())))
    h = constrain(h, ex, ("batch", "length", self.axes[1]))  # (B, T, F)
    bias = jnp.zeros((), ex.cdtype)
    if self.use_bias:
      bias = self.param("bias", with_axes(nn.initializers.zeros, self.axes[1:]), (self.features,), ex.pdtype)
    return jax.checkpoint(lambda h, b: ACTIVATIONS[self.activation](h + b.astype(h.dtype)))(h, bias)


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

  x: (B, T, H, D), positions 0..T-1; position t turns pair i by t·base^(-2i/D), in float32.
  """
  angles = kernels.attention.rope_angles(x.shape[1], x.shape[-1], base)[None, :, None, :]
  return kernels.attention.rotate_half(x, np.cos(angles), np.sin(angles))  # angles: (1, T, 1, D/2)


class Dropout(nn.Module):
  """Inverted dropout; row r's mask is drawn from fold_in(key, row_ids[r]).

  A row's mask then depends on its index in the step's batch only, not on the
  micro-batch or device it is computed in.
  """
  rate: float

  @nn.compact
  def __call__(self, x, train: bool, row_ids):
    if not train or self.rate == 0.0:
      return x
    key, keep_prob = self.make_rng("dropout"), 1.0 - self.rate
    keep = jax.vmap(
        lambda r: jax.random.bernoulli(jax.random.fold_in(key, r), keep_prob, x.shape[1:]))(row_ids)
    return jnp.where(keep, x / keep_prob, 0.0).astype(x.dtype)


def plain_attention(q, k, v, *, window: int = 0, dropout=None):
  """The guide's attention written out: scores, causal mask, softmax (float32), dropout, weighted sum.

  q, k, v: (B, T, H, D) -> (B, T, H, D), and the weights (B, H, T, T) before dropout.
  """
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)  # (B, H, T, T)
  scores = scores / math.sqrt(q.shape[-1])
  scores = jnp.where(kernels.attention.causal_mask(q.shape[1], window), scores, -jnp.inf)
  weights = jax.nn.softmax(scores, axis=-1)
  dropped = weights if dropout is None else dropout(weights)
  return jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(v.dtype), v), weights


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


class CausalSelfAttention(nn.Module):
  cfg: ModelConfig
  ex: Execution

  @nn.compact
  def __call__(self, x, train: bool, row_ids, query_at: Optional[jax.Array] = None):
    """(B, T, C) -> (B, T, C); with `query_at` (B,) positions, (B, 1, C) for those queries only."""
    cfg, ex = self.cfg, self.ex
    H, D = cfg.num_heads, cfg.head_dim
    # One fused projection for q, k and v: (B, T, C) -> (B, T, 3, H, D).
    qkv = dense(cfg, ex, (3, H, D), ("embed", None, "heads", "head_dim"), "qkv")(x)
    qkv = checkpoint_name(constrain(qkv, ex, ("batch", "length", None, "heads", None)), "qkv")
    rope = cfg.rope_base if cfg.pos_encoding == "rope" else None
    # cuDNN and splash only once initialised: the parameters are the same, and init runs on
    # a tiny dummy batch (and possibly without the accelerator).
    name = "xla" if ex.kernels in ("cudnn", "splash") and self.is_initializing() else ex.kernels
    kernel = kernels.attention.ATTENTION.get(name)  # None for "reference": the guide's code below
    if train and ex.attn_dropout > 0:
      kernel = None  # the fast kernels have no dropout on the weights
    if kernel is not None and query_at is None:
      extra = {}
      if name == "splash" and ex.mesh is not None:  # per device: its rows and heads, laid out as the rules say
        extra = {"mesh": ex.mesh, "spec": nn.logical_to_mesh_axes(("batch", "length", "heads", None), ex.rules)}
      y = kernel(qkv, window=cfg.sliding_window, rope_base=rope, operand_dtype=ex.operand_dtype, **extra)
    else:
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, T, H, D)
      if rope is not None:
        q, k = apply_rope(q, rope), apply_rope(k, rope)
      if query_at is not None:
        q = jnp.take_along_axis(q, query_at[:, None, None, None], axis=1)  # (B, 1, H, D)
        y = single_query_attention(q, k, v, query_at, window=cfg.sliding_window)
      else:
        drop = Dropout(ex.attn_dropout)
        y, weights = plain_attention(q, k, v, window=cfg.sliding_window,
                                     dropout=lambda w: drop(w, train, row_ids))
        self.sow("intermediates", "attention_weights", weights)
    y = checkpoint_name(constrain(y, ex, ("batch", "length", "heads", None)), "attention_out")
    # Concatenate heads and project back: (B, T, H, D) -> (B, T, C).
    y = dense(cfg, ex, cfg.embed_dim, ("heads", "head_dim", "embed"), "proj", axis=(-2, -1))(y)
    return Dropout(ex.dropout)(y, train, row_ids)


class MLP(nn.Module):
  """Linear C -> 4C, activation, Linear 4C -> C, dropout."""
  cfg: ModelConfig
  ex: Execution

  @nn.compact
  def __call__(self, x, train: bool, row_ids):
    cfg, ex = self.cfg, self.ex
    F = cfg.mlp_ratio * cfg.embed_dim
    if ex.kernels == "cudnn":  # the GPU's: act(h) from the matmul output kept (not on TPU: 11% more bytes)
      a = DenseActivation(F, cfg.activation, ex, ("embed", "mlp"), cfg.use_bias, name="fc")(x)  # (B, T, 4C)
      return Dropout(ex.dropout)(dense(cfg, ex, cfg.embed_dim, ("mlp", "embed"), "proj")(a), train, row_ids)
    h = dense(cfg, ex, F, ("embed", "mlp"), "fc")(x)  # (B, T, 4C)
    h = constrain(h, ex, ("batch", "length", "mlp"))
    if ex.kernels == "cpu":  # act(h) recomputed in the backward pass, not stored
      y = kernels.layers.ActivationDense(cfg.embed_dim, cfg.activation, name="proj",
                                         **dense_args(cfg, ex, ("mlp", "embed")))(h)
    else:
      y = dense(cfg, ex, cfg.embed_dim, ("mlp", "embed"), "proj")(ACTIVATIONS[cfg.activation](h))
    return Dropout(ex.dropout)(y, train, row_ids)  # (B, T, C)


class Block(nn.Module):
  """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x))."""
  cfg: ModelConfig
  ex: Execution

  @nn.compact
  def __call__(self, x, train: bool, row_ids, query_at: Optional[jax.Array] = None):
    cfg, ex = self.cfg, self.ex
    y = CausalSelfAttention(cfg, ex, name="attn")(layer_norm(cfg, ex, "ln1")(x), train, row_ids,
                                                  query_at)
    if query_at is not None:  # keys and values come from every position, the rest from one
      x = jnp.take_along_axis(x, query_at[:, None, None], axis=1)  # (B, 1, C)
    x = constrain(x + y, ex, ("batch", "length", None))
    x = x + MLP(cfg, ex, name="mlp")(layer_norm(cfg, ex, "ln2")(x), train, row_ids)
    return constrain(x, ex, ("batch", "length", None))


class Transformer(nn.Module):
  """Token ids (B, T) -> logits (B, T, V) in float32.

  `logits_at` (B,) positions give (B, V) instead: the logits of one position per
  row, as the full call computes them. Only what those depend on is computed:
  the last block runs its queries, MLP and the head at those positions alone.
  `row_ids` (B,) are the rows' indices in the step's batch (default 0..B-1);
  dropout masks are drawn per row from them.
  """
  cfg: ModelConfig
  ex: Execution = Execution()

  @nn.compact
  def __call__(self, tokens, *, train: bool = False, logits_at: Optional[jax.Array] = None,
               row_ids: Optional[jax.Array] = None):
    cfg, ex = self.cfg, self.ex
    B, T = tokens.shape
    if T > cfg.max_len:
      raise ValueError(f"sequence length {T} exceeds model.max_len {cfg.max_len}.")
    row_ids = jnp.arange(B) if row_ids is None else jnp.asarray(row_ids, jnp.int32)
    at = None if logits_at is None else jnp.asarray(logits_at, jnp.int32)

    embed = nn.Embed(cfg.vocab_size, cfg.embed_dim, dtype=ex.cdtype, param_dtype=ex.pdtype,
                     embedding_init=with_axes(_init, ("vocab", "embed")), name="embed")
    # The lookup of nn.Embed, from a table whole on every device (FSDP gathers it): a lookup
    # into a table split over channels would come out split over channels and cost an
    # all-to-all to reach the rows' layout, and another one back. The tied head uses the same
    # gathered table: one gather per step, hoisted out of the micro-batch loop.
    table = constrain(embed.embedding.astype(ex.cdtype), ex, (None, None))  # (V, C)
    x = jnp.take(table, tokens, axis=0)  # (B, T, C)
    if cfg.pos_encoding == "learned":
      pos = self.param("pos_embed", with_axes(_init, (None, "embed")), (cfg.max_len, cfg.embed_dim),
                       ex.pdtype)
      # Looked up per token like the token's own row (and whole on every device like the
      # table), not pos[:T] broadcast over B: that broadcast's gradient is a sum over B, and
      # for it XLA's GPU layout assignment laid the whole residual stream out B-minor, as
      # (T, C, B), with a transpose at every residual add and LayerNorm. The lookup's gradient
      # is a scatter-add instead; gpt2 at B=64 on an H200 went from 139 to 127 ms a step.
      pos = constrain(pos.astype(x.dtype), ex, (None, None))  # (max_len, C)
      x = x + jnp.take(pos, jnp.broadcast_to(jnp.arange(T), (B, T)), axis=0)  # (B, T, C)
    elif cfg.pos_encoding == "sinusoidal":
      x = x + jnp.asarray(sinusoidal_table(T, cfg.embed_dim), x.dtype)
    # rope rotates q and k inside attention instead.
    x = Dropout(ex.dropout)(x, train, row_ids)

    x = constrain(x, ex, ("batch", "length", None))
    block = Block if ex.remat == "none" else nn.remat(Block, static_argnums=(2,), policy=REMAT[ex.remat])
    for i in range(cfg.num_layers):
      last = i == cfg.num_layers - 1
      x = block(cfg, ex, name=f"block_{i}")(x, train, row_ids, at if last else None)
    x = layer_norm(cfg, ex, "ln_f")(x)

    if not cfg.tie_embeddings:
      args = {**dense_args(cfg, ex, ("embed", "vocab")), "use_bias": False}
      logits = nn.Dense(cfg.vocab_size, **args, name="head")(x)  # (B, T, V)
    else:  # nn.Embed.attend's matmul, in the dense layers' precision
      logits = ex.dot_general(x, table.T.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())))  # (B, T, V)
    logits = constrain(logits.astype(jnp.float32), ex, ("batch", "length", "vocab"))
    return logits if at is None else logits[:, 0]


def _dummy_tokens(cfg: ModelConfig):
  return jnp.zeros((1, min(8, cfg.max_len)), jnp.int32)


def init_params(cfg: ModelConfig, rng: jax.Array, ex: Execution = Execution()):
  """Plain (unboxed) parameter arrays; the logical axis names live in `param_axes`."""
  return nn.meta.unbox(Transformer(cfg, ex).init(rng, _dummy_tokens(cfg))["params"])


def scale_residual_projections(params, num_layers: int):
  """GPT-2's init: each block's two output projections (attention, MLP) scaled by 1/sqrt(2 * layers).

  Each block adds both to the residual stream, so its variance then stays near
  that of the embeddings however deep the stack is.
  """
  def scale(path, x):
    names = [getattr(k, "key", "") for k in path]
    return x / np.sqrt(2 * num_layers) if names[-2:] == ["proj", "kernel"] else x
  return jax.tree_util.tree_map_with_path(scale, params)


def param_axes(cfg: ModelConfig):
  """The logical axis names of every parameter, as a PartitionSpec tree (no computation)."""
  boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), _dummy_tokens(cfg)))
  return nn.get_partition_spec(boxed["params"])
