"""Causal attention kernels: blocked attention for CPUs, jax.nn.dot_product_attention otherwise.

Replaces the model's written-out `plain_attention` (scores, mask, softmax,
weighted sum over the full (B, H, T, T)) when `Execution.kernels` asks for it:

  cpu:   `blocked_attention_qkv`, exact causal attention that never computes the
         masked blocks and recomputes its weights in the backward pass. On the
         tiny preset (B=32, T=256, 2 CPU cores) one layer's attention went from
         85 ms (plain) to 63 ms (blocks) to ~38 ms (chunked rows, keys-major
         layout), the train step from 852 to 597 ms, and XLA's temp memory from
         767 to 383 MB (docs/performance.md). It does 5/8 of plain attention's
         work at T=256 and never stores a (B, H, T, T) array.
  xla:   `jax.nn.dot_product_attention` with XLA's own kernel.
  cudnn: the same call with cuDNN's flash attention (GPU, bfloat16/float16).
  splash: the Pallas splash attention kernel (TPU), per device under shard_map.

`ATTENTION` maps those names to functions of the fused projection
qkv (B, T, 3, H, D) -> (B, T, H, D). All match plain attention (without dropout)
to float rounding; `causal_mask`, `rope_angles` and `rotate_half` are shared
with the model's reference code.
"""

import functools
import math
from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jaxformer.kernels import layers

# Query rows per block of blocked attention: small enough to skip most of the masked
# upper triangle, large enough to keep each block's matmuls efficient.
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


def rope_angles(T: int, D: int, base: float) -> np.ndarray:
  """(T, D/2) float32 rotation angles: position t, channel pair i turns by t·base^(-2i/D)."""
  inv_freq = base ** (-np.arange(0, D, 2, dtype=np.float32) / D)  # (D/2,)
  return np.arange(T, dtype=np.float32)[:, None] * inv_freq[None, :]


def rotate_half(x, cos, sin):
  """Rotates channel i with channel i + D/2 by angles given as cos, sin (broadcast to x[..., :D/2])."""
  D = x.shape[-1]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : D // 2], xf[..., D // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def blocked_attention_qkv(qkv, *, window: int, block: int, rope_base: Optional[float] = None,
                          chunk_rows: Optional[int] = None):
  """Blocked causal attention of a fused projection: qkv (B, T, 3, H, D) -> (B, T, H, D).

  Each block of `block` queries is scored against its own key prefix only, so the
  blocks above the diagonal (and before a sliding window) are skipped. The
  backward pass recomputes the weights from the saved log-sum-exp, one key block
  against the queries that see it, instead of storing (B, H, T, T). Rows go
  through in chunks of `chunk_rows` (default: `attention_chunk_rows`) so one
  chunk's scores stay in cache. With `rope_base`, q and k are rotated first.
  """
  B, T, _, H, _ = qkv.shape
  rows = chunk_rows or attention_chunk_rows(B, H, T)
  return _blocked_attention(qkv, window, block, rope_base, min(rows, B))


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


def by_chunks(fn, rows: int, *xs, after=None):
  """fn over chunks of `rows` rows of every x (leading axis B), in one loop.

  Only the order of an exact computation changes, never its result. With `after`,
  the loop's output buffers are created only once `after` exists; otherwise XLA
  may allocate them at the start of the step and hold them throughout.
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
        lambda s: layers.after(jnp.zeros((n, *s.shape), s.dtype), after), shapes)

    def body(i, acc):
      res = fn(*(lax.dynamic_index_in_dim(c, i, keepdims=False) for c in chunks))
      return jax.tree_util.tree_map(lambda a, r: lax.dynamic_update_index_in_dim(a, r, i, 0),
                                    acc, res)

    out = lax.fori_loop(0, n, body, init)
  return jax.tree_util.tree_map(merge, out)


def query_blocks(T: int, block: int, window: int):
  """(query start, query end, key start) of each query block: its keys are ks..qe."""
  return [(qs, min(qs + block, T), 0 if window <= 0 else max(0, qs - window + 1))
          for qs in range(0, T, block)]


def key_blocks(T: int, block: int, window: int):
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
  return rotate_half(x, cos, -sin if inverse else sin)


def _chunk_forward(qkv, window, block, rope_base):
  # Keys-major layout: scores are (K, Q) tiles, so that every matmul of both passes
  # but one takes its operands untransposed.
  q, k, v = _heads_major(qkv, rope_base)  # each (B, H, T, D)
  B, H, T, D = q.shape
  scale = 1.0 / math.sqrt(D)
  mask = causal_mask(T, window).T  # [key, query]
  vt = jnp.swapaxes(v, 2, 3)  # (B, H, D, T): (D, K) @ (K, Q) needs no transposed operand
  outs, lses = [], []
  for qs, qe, ks in query_blocks(T, block, window):
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
  for ks, ke, qe in key_blocks(T, block, window):
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
  out, lse = by_chunks(lambda x: _chunk_forward(x, window, block, rope_base), rows, qkv)
  # qkv itself is the residual: kept as it is, not stacked again by the loop.
  return out, (qkv, out, lse)


def _blocked_backward(window, block, rope_base, rows, res, g):
  return (by_chunks(lambda *a: _chunk_backward(*a, window, block, rope_base), rows, *res, g,
                    after=g),)


_blocked_attention.defvjp(_blocked_forward, _blocked_backward)


def fused_attention(q, k, v, *, window: int, implementation: Optional[str]):
  """jax.nn.dot_product_attention: XLA on CPU/TPU, cuDNN flash attention on GPU when asked."""
  local = (window - 1, 0) if window > 0 else None
  return jax.nn.dot_product_attention(
      q, k, v, is_causal=True, local_window_size=local, implementation=implementation)


def cpu_attention(qkv, *, window: int, rope_base: Optional[float], operand_dtype=None):
  """Blocked attention of the fused projection; its matmul operands in `operand_dtype` when set.

  Taking qkv whole costs one layout change for q, k and v together (rope included).
  The softmax stays float32 whatever the operands.
  """
  if operand_dtype is not None:
    qkv = qkv.astype(operand_dtype)
  return blocked_attention_qkv(qkv, window=window, block=ATTENTION_BLOCK, rope_base=rope_base)


def xla_attention(qkv, *, window: int, rope_base: Optional[float], operand_dtype=None):
  """jax.nn.dot_product_attention of the fused projection with XLA's kernel, in the compute dtype."""
  del operand_dtype
  return fused_attention(*_split_rotated(qkv, rope_base), window=window, implementation=None)


def cudnn_attention(qkv, *, window: int, rope_base: Optional[float], operand_dtype=None):
  """The same with cuDNN's flash attention (GPU; bfloat16 or float16 inputs)."""
  del operand_dtype
  return fused_attention(*_split_rotated(qkv, rope_base), window=window, implementation="cudnn")


def _split_rotated(qkv, rope_base):
  """(B, T, 3, H, D) -> q, k, v, each (B, T, H, D), q and k rotated by rope as the model does."""
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  if rope_base is not None:
    angles = rope_angles(q.shape[1], q.shape[-1], rope_base)[None, :, None, :]  # (1, T, 1, D/2)
    q, k = (rotate_half(x, np.cos(angles), np.sin(angles)) for x in (q, k))
  return q, k, v


# Splash's query/key block: 512 (as MaxText on v5e/v5p) or the largest of 256, 128 that divides T.
SPLASH_BLOCKS = (512, 256, 128)


def splash_attention(qkv, *, window: int, rope_base: Optional[float], operand_dtype=None, mesh=None,
                     spec=None):
  """The Pallas splash attention kernel (TPU): causal or sliding-window, masked blocks never computed.

  A Pallas kernel sees one device's data, so under a `mesh` it runs inside shard_map,
  each of q, k, v (B, T, H, D) split as `spec` says: the activations' own layout, rows
  over the batch axes and heads over tensor, so no data moves. Off TPU it runs in
  Pallas's interpreter (slow; for tests).
  """
  del operand_dtype
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
  T = qkv.shape[1]
  if T % SPLASH_BLOCKS[-1]:
    # The kernel's blocks are multiples of 128 positions; other lengths (the decode loop's
    # short windows) take XLA's attention.
    return xla_attention(qkv, window=window, rope_base=rope_base)
  q, k, v = _split_rotated(qkv, rope_base)  # each (B, T, H, D)
  D = q.shape[-1]
  q = q * jnp.asarray(1.0 / math.sqrt(D), q.dtype)  # splash does not scale the scores
  block = next((b for b in SPLASH_BLOCKS if T % b == 0), T)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)

  def local(q, k, v):  # one device's (b, T, h, D)
    h = q.shape[2]
    mask = (masks.CausalMask((T, T)) if window == 0
            else masks.LocalMask((T, T), window_size=(window - 1, 0), offset=0))
    # Its residuals carry the model's name for the attention output, so a remat policy that
    # saves "attention_out" also spares the kernel's forward pass.
    kernel = splash.make_splash_mha(masks.MultiHeadMask([mask] * h), head_shards=1, q_seq_shards=1,
                                    block_sizes=sizes, residual_checkpoint_name="attention_out",
                                    interpret=platform != "tpu")
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # (b, h, T, D), the kernel's layout
    return heads_major(jax.vmap(kernel)(heads_major(q), heads_major(k), heads_major(v)))

  if mesh is None:
    return local(q, k, v)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def splash_flops(B: int, T: int, H: int, D: int, window: int = 0) -> float:
  """The matmul FLOPs one splash_attention call's forward and backward pass compute.

  XLA's cost analysis cannot see inside a Pallas kernel, so `compile.py` adds this
  count: the (query block, key block) pairs the mask leaves non-empty, each with 2
  matmuls forward and 7 backward (scores and probabilities again in both the dq and
  the dk/dv kernels), 2·block²·D FLOPs each.
  """
  block = next((b for b in SPLASH_BLOCKS if T % b == 0), T)
  n = T // block
  mask = causal_mask(T, window)
  live = sum(bool(mask[i * block:(i + 1) * block, j * block:(j + 1) * block].any())
             for i in range(n) for j in range(n))
  return live * 9 * 2.0 * block * block * D * B * H


# Execution.kernels -> attention of the fused projection, qkv (B, T, 3, H, D) -> (B, T, H, D).
# "reference" is the model's own plain_attention; only splash takes the mesh (it runs per device).
ATTENTION = {"cpu": cpu_attention, "xla": xla_attention, "cudnn": cudnn_attention, "splash": splash_attention}
