"""The benchmark library on a micro config: every JSON key there, with sane values."""

import json

import jax
import jax.numpy as jnp
import pytest

from jaxformer import benchmark
from jaxformer import config as config_lib
from jaxformer import metrics
from jaxformer import model as M
from jaxformer import sampling


def micro_config():
  c = config_lib.base_config()
  c.model.update(dict(num_layers=1, num_heads=2, embed_dim=32, max_len=64))
  c.train.update(dict(batch_size=4, seq_len=32))
  return c


def test_benchmark_reports_every_figure():
  c = micro_config()
  out = benchmark.benchmark(c, steps=2, warmup=1, repeats=1, gen_batch_sizes=(1, 2),
                            gen_new_tokens=8, gen_repeats=1, peak_matmul_n=256)
  json.dumps(out)  # plain JSON types only
  for key in ("device", "jax", "params", "batch_size", "seq_len", "dtype", "kernels",
              "compile_s", "step_ms_median", "tokens_per_s", "mfu", "peak_flops", "peak_source",
              "peak_rss_mb", "peak_rss_train_mb", "flops_per_token", "generation", "relayouts"):
    assert key in out, key
  assert (out["batch_size"], out["seq_len"], out["vocab_size"]) == (4, 32, 64)
  assert out["kernels"] == "cpu" and out["dtype"] == "float32" and out["micro_batches"] == 1
  assert out["tokens_per_s"] == 4 * 32 / (out["step_ms_median"] / 1e3)
  assert out["peak_source"].startswith("measured:f32 matmul 256") and out["peak_flops"] > 1e8
  # Clamped to 1: on a busy machine the peak measured first can be lower than the step's rate.
  assert 0 < out["mfu"] <= 1
  assert out["mfu"] == min(1.0, out["tokens_per_s"] * out["flops_per_token"] / out["peak_flops_all_devices"])
  assert out["peak_flops_all_devices"] == out["peak_flops"] * out["num_devices"]
  assert out["compile_s"] > 0 and 50 < out["peak_rss_train_mb"] <= out["peak_rss_mb"] < 1e5
  gen = out["generation"]
  assert set(gen) == {"B1", "B2", "max_speedup_over_B1"}
  for name, b in (("B1", 1), ("B2", 2)):
    g = gen[name]
    assert g["batch_size"] == b and g["new_tokens"] == 8 and g["compile_s"] > 0
    assert g["tokens_per_s"] > 0 and g["flops_per_token"] == gen["B1"]["flops_per_token"]
    assert g["mfu"] == pytest.approx(g["tokens_per_s"] * g["flops_per_token"] / out["peak_flops_all_devices"])
  assert gen["max_speedup_over_B1"] == 1 / gen["B1"]["mfu"]
  # The roofline estimate of this device against the step it measured (compile.py's estimate, checked).
  r = out["roofline"]
  assert r["compute_s"] > 0 and r["memory_s"] > 0 and r["memory_bandwidth"] > 1e8
  assert r["step_s_overlapped"] == max(r["compute_s"], r["memory_s"]) < r["step_s_serial"]
  assert r["measured_step_s"] == out["step_ms_median"] / 1e3
  assert r["measured_over_overlapped"] == r["measured_step_s"] / r["step_s_overlapped"] > 0


def test_the_roofline_takes_the_closed_form_where_the_compiler_counts_less():
  # As on an H200, where XLA's cost analysis saw 0.3% of GPT-2's FLOPs (the GEMMs are cuBLAS calls).
  cost = {"micro_batches": 2, "flops": 1e9, "bytes": 1e6, "closed_form": 8e9}
  r = benchmark.roofline_check(cost, peak=1e12, measured_step_s=0.02, B=4, T=32)
  assert r["compute_flops"] == 8e9 and r["compute_s"] == pytest.approx(8e-3)
  assert r["compute_flops_source"].startswith("closed form (the compiled count, 25.0% of it")
  r = benchmark.roofline_check({**cost, "flops": 5e9}, peak=1e12, measured_step_s=0.02, B=4, T=32)
  assert r["compute_flops"] == 1e10 and r["compute_flops_source"] == "compiled"


def test_benchmark_without_generation():
  out = benchmark.benchmark(micro_config(), steps=1, warmup=0, repeats=1, generate=False,
                            peak_matmul_n=128)
  assert "generation" not in out and out["tokens_per_s"] > 0


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


@pytest.mark.parametrize("kernels,T", [("cpu", 128), ("cpu", 40), ("reference", 64)])
def test_forward_flops_agree_with_xla(kernels, T):
  """Our matmul count against XLA's count of the compiled forward (which adds elementwise ops)."""
  c = micro_config()
  c.model.update(dict(num_layers=2, max_len=128))
  c.compute.kernels = kernels
  model = M.Transformer(config_lib.model_config(c, 64), config_lib.execution(c))
  params = M.init_params(model.cfg, jax.random.key(0))
  x = jnp.zeros((1, T), jnp.int32)
  full = _xla_flops(lambda p, x: model.apply({"params": p}, x), params, x)
  last = _xla_flops(lambda p, x: model.apply({"params": p}, x, logits_at=jnp.array([T - 1])), params, x)
  flops = lambda last_only: metrics.forward_flops(model.cfg, T, last_only, kernels=kernels)
  # XLA also counts elementwise work: more of it in the stock GELU (erfc) and LayerNorm.
  share = 0.85 if kernels == "cpu" else 0.7
  assert share * full < flops(False) <= full
  assert (share - 0.05) * last < flops(True) <= last
  assert flops(True) < 0.7 * flops(False)


def test_decode_flops_follow_the_buckets():
  c = micro_config()
  c.model.max_len = 128  # buckets 32, 64, then the window of 128
  model = M.Transformer(config_lib.model_config(c, 64), config_lib.execution(c))
  f = lambda T: metrics.forward_flops(model.cfg, T, last_only=True, kernels="cpu")
  # Prompt of 30: 3 steps at 32 positions (30..32 ids so far), 32 at 64, 64 at 128, 1 at 128 sliding.
  assert sampling.decode_flops(model, 30, 100, 256) == 3 * f(32) + 32 * f(64) + 65 * f(128)
  assert sampling.decode_flops(model, 30, 2, 48) == 2 * f(32) and sampling.decode_flops(model, 40, 2, 48) == 2 * f(48)
