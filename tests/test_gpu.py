"""The GPU path on a GPU: cuDNN attention against the reference, and the real train step with `auto`.

Skipped where JAX has no GPU backend (CI's CPU machines; tests/conftest.py pins JAX to the CPU
unless JAX_PLATFORMS is set). Run them on a GPU host with:

    JAX_PLATFORMS=cuda,cpu pytest -q tests/test_gpu.py
"""

import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import aot
from jaxformer import benchmark
from jaxformer import config as config_lib
from jaxformer import model as M
from jaxformer.kernels import attention


def _has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


pytestmark = pytest.mark.skipif(not _has_gpu(), reason="needs a GPU (JAX_PLATFORMS=cuda,cpu on a GPU host)")


def _relative_error(x, ref) -> float:
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


# T=200 and 1000 are not multiples of cuDNN's 64/128-row tiles: the decode loop's buffers need not be.
@pytest.mark.parametrize("T,window,rope", [(1024, 0, False), (1024, 256, True), (200, 0, True), (1000, 0, False)])
def test_cudnn_attention_matches_float32_reference(T, window, rope):
  """Outputs and q/k/v gradients of the bf16 cuDNN kernel within bf16 rounding of float32 attention."""
  B, H, D = 2, 4, 64
  qkv, g = (jax.random.normal(k, s) for k, s in zip(jax.random.split(jax.random.key(0)),
                                                     [(B, T, 3, H, D), (B, T, H, D)]))
  rope_base = 10000.0 if rope else None
  ours = lambda x: attention.cudnn_attention(x.astype(jnp.bfloat16), window=window, rope_base=rope_base)
  ref = lambda x: M.plain_attention(*attention._split_rotated(x, rope_base), window=window)[0]
  with jax.default_device(jax.devices("gpu")[0]):
    out, ref_out = jax.jit(ours)(qkv), jax.jit(ref)(qkv)
    assert out.dtype == jnp.bfloat16
    assert _relative_error(out, ref_out) < 2e-2
    grad = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32) * g)))(qkv)
    ours_g, ref_g = grad(ours), grad(ref)
    for i, name in enumerate("qkv"):
      assert _relative_error(ours_g[:, :, i], ref_g[:, :, i]) < 3e-2, name
  # The compiled forward really calls cuDNN (not a silent XLA fallback).
  hlo = jax.jit(ours).lower(qkv).compile().as_text()
  assert "__cudnn$fmha" in hlo


def _gpt2(**overrides):
  c = importlib.import_module("configs.gpt2").get_config()
  # Two of GPT-2's blocks at T=1024: the real layers, shapes and vocabulary; a short compile.
  # No warm-up, so the four steps below move the loss measurably.
  return config_lib.apply_overrides(c, {"model.num_layers": 2, "train.batch_size": 4, "optim.warmup_steps": 0,
                                        "optim.lr": 1e-3, **overrides})


def test_auto_on_a_gpu_is_bfloat16_cudnn_and_trains_like_the_reference():
  """GPT-2's preset with no flags picks bf16 + cuDNN here; its real train step's loss tracks
  the reference kernels' (same init, same batch) to bf16 rounding, and falls."""
  ex = config_lib.execution(_gpt2())
  assert (ex.kernels, ex.dtype, ex.param_dtype) == ("cudnn", "bfloat16", "float32")
  runs = {k: benchmark.benchmark_train(_gpt2(**{"compute.kernels": k}), steps=3, warmup=0, repeats=1)
          for k in ("auto", "reference")}
  fast, ref = runs["auto"], runs["reference"]
  assert fast["kernels"] == "cudnn" and ref["kernels"] == "reference"
  assert abs(fast["final_loss"] - ref["final_loss"]) < 0.02
  # 1 + 3 steps on one repeated batch of random ids: the loss leaves ln V ≈ 10.83 downwards.
  assert fast["final_loss"] < np.log(50304) - 0.1


def test_the_residual_stream_keeps_rows_first_layout():
  """The compiled step lays (B, T, C) activations out rows first: no (T, C, B) array anywhere.

  With learned positions added broadcast over B, XLA made the residual stream B-minor to
  sum their gradient over B, and transposed it at every residual add and LayerNorm
  (gpt2, B=64: 139 ms a step instead of 127 on an H200).
  """
  B = 64  # at B=8 XLA chose rows first either way
  compiled = aot.compile_train_step(_gpt2(**{"train.batch_size": B}), jax.devices("gpu")[:1])["compiled"]
  hlo = compiled.as_text()
  for shape in itertools.permutations((B, 1024, 768)):
    if shape != (B, 1024, 768):  # (T, C, B), (C, B, T), ...: the old code held 149 such transposes at B=64
      assert f"[{','.join(map(str, shape))}]" not in hlo, shape
