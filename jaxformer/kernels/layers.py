"""CPU kernels for the model's elementwise layers: GELU, the MLP's second projection, LayerNorm.

Each replaces a stock layer with the same parameters and maths, under
`Execution.kernels="cpu"`:

  gelu:            jax.nn.gelu(approximate=False) goes through erfc (an exp and
                   branches); x/2·(1 + erf(x/√2)) uses XLA's cheap rational erf,
                   with a one-exp custom JVP. Tiny train step 597 -> 557 ms on 2
                   CPU cores (docs/performance.md); GELU is ~21 ms of a 451 ms step.
  ActivationDense: nn.Dense applied to act(h), storing only h for the backward
                   pass, which recomputes act(h) and its derivative in one cheap
                   pass: two fewer (B, T, 4C) arrays stored per layer.
  LayerNorm:       nn.LayerNorm with a hand-written VJP from the saved normalised
                   x, in fewer passes than autodiff of the statistics: 5% of the
                   tiny step in one run, within noise in another; XLA temp
                   memory 351 -> 334 MB.
"""

import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_jvp
def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x·Φ(x) = x/2·(1 + erf(x/√2)), without erfc.

  Agrees with `jax.nn.gelu(approximate=False)` to float32 rounding, except where
  GELU itself is below 1e-6 (x < -4.7), whose absolute error stays under 1e-6.
  The derivative is Φ(x) + x·φ(x), with one exp.
  """
  return 0.5 * x * (1.0 + lax.erf(x * _SQRT_HALF))


@gelu.defjvp
def _gelu_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  cdf = 0.5 * (1.0 + lax.erf(x * _SQRT_HALF))
  pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)
  return x * cdf, (cdf + x * pdf) * dx


def activation(name: str) -> Callable:
  """The CPU kernels' activation by config name: "gelu" is `gelu` above."""
  if name == "gelu":
    return gelu
  if name == "gelu_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  return jax.nn.relu


def after(x, g):
  """x, made to depend on the gradient g so its recomputation waits for the backward pass.

  XLA would otherwise merge a backward pass's recomputation with the forward pass's
  identical ops (or schedule it early) and keep the result alive in between, which
  is the memory the recomputation was meant to save. x·0 is not folded (NaN semantics).
  """
  return x + (0.0 * g.reshape(-1)[0]).astype(x.dtype)


class ActivationDense(nn.Module):
  """nn.Dense(features) applied to act(h), h: (..., F) -> (..., features); nn.Dense's parameters."""
  features: int
  activation: str
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  dot_general: Callable = lax.dot_general
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, h):
    kernel = self.param("kernel", self.kernel_init, (h.shape[-1], self.features), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    dtype = self.dtype or jnp.result_type(h, kernel)
    return _activation_dense(h, kernel, bias, self.activation, jnp.dtype(dtype), self.dot_general)


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
  h = after(h, g)
  a, act_vjp = jax.vjp(lambda h: activation(act)(h).astype(dtype), h)
  _, dense_vjp = jax.vjp(lambda a, k, b: _dense(a, k, b, dtype, dot_general), a, kernel, bias)
  da, dkernel, dbias = dense_vjp(g)
  return (act_vjp(da)[0], dkernel, dbias)


_activation_dense.defvjp(_activation_dense_fwd, _activation_dense_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_fn(x, scale, bias: Optional[jax.Array], eps: float):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32; `bias` may be None."""
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
  """nn.LayerNorm over the last axis: its parameters ("scale", "bias"), statistics in float32.

  `dtype` is the output's (default float32).
  """
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    scale = self.param("scale", self.scale_init, (C,), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (C,), self.param_dtype).astype(jnp.float32)
    y = layer_norm_fn(x, scale.astype(jnp.float32), bias, self.epsilon)
    return y.astype(self.dtype or jnp.float32)
