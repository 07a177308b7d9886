"""The benchmark library on a micro config: every JSON key there, with sane values."""

import json

from jaxformer import benchmark
from jaxformer import config as config_lib


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
  for key in ("device", "jax", "params", "batch_size", "seq_len", "dtype", "attention",
              "compile_s", "step_ms_median", "tokens_per_s", "mfu", "peak_flops", "peak_source",
              "peak_rss_mb", "peak_rss_train_mb", "flops_per_token", "generation"):
    assert key in out, key
  assert (out["batch_size"], out["seq_len"], out["vocab_size"]) == (4, 32, 64)
  assert out["attention"] == "blocked" and out["dtype"] == "float32"
  assert out["tokens_per_s"] == 4 * 32 / (out["step_ms_median"] / 1e3)
  assert out["peak_source"].startswith("measured:f32 matmul 256") and out["peak_flops"] > 1e8
  assert 0 < out["mfu"] < 1
  assert out["mfu"] == out["tokens_per_s"] * out["flops_per_token"] / out["peak_flops"]
  assert out["compile_s"] > 0 and 50 < out["peak_rss_train_mb"] <= out["peak_rss_mb"] < 1e5
  gen = out["generation"]
  assert set(gen) == {"B1", "B2"}
  for name, b in (("B1", 1), ("B2", 2)):
    g = gen[name]
    assert g["batch_size"] == b and g["new_tokens"] == 8 and g["compile_s"] > 0
    assert g["tokens_per_s"] > 0


def test_benchmark_without_generation():
  out = benchmark.benchmark(micro_config(), steps=1, warmup=0, repeats=1, generate=False,
                            peak_matmul_n=128)
  assert "generation" not in out and out["tokens_per_s"] > 0
