"""Training and generation throughput of a config, as one JSON-able dict.

The train step is the real one (`train.state_shardings`, `init_state`,
`compile_steps`) on random tokens, so no data pipeline is timed. MFU is
`metrics.flops_per_token` (6N + 12·L·T·C per token) times tokens/s over the
device's peak: a data-sheet figure for known accelerators (and, beside it, a
large bf16 matmul measured in this same process), or on CPU a large float32
matmul measured in this same process.
"""

import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer import aot
from jaxformer import chips
from jaxformer import config as config_lib
from jaxformer import metrics as metrics_lib
from jaxformer import model as model_lib
from jaxformer import optim
from jaxformer import sampling
from jaxformer import sharding
from jaxformer import train

# The built-in stories corpus with the char tokenizer: 64 ids once padded.
STORIES_CHAR_VOCAB = 64
# 2048² underestimates this kind of CPU's float32 peak; 4096² is near the practical one.
CPU_PEAK_MATMUL = 4096
# On a GPU/TPU: large enough that one matmul runs far past launch overhead (~1.4 ms on an H100).
ACCELERATOR_PEAK_MATMUL = 8192


def peak_rss_mb() -> float:
  """The process's peak resident set so far, in MB (ru_maxrss is KiB on Linux, bytes on macOS)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def random_batch(vocab: int, batch_size: int, seq_len: int, seed: int = 0) -> dict:
  """One (B, T) batch of random ids, every target scored."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, size=(batch_size, seq_len + 1), dtype=np.int32)
  return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((batch_size, seq_len), np.float32)}


def benchmark_train(config, *, steps: int = 10, warmup: int = 2, repeats: int = 3,
                    log: Callable = lambda _: None) -> dict:
  """Compiles and times the real train step; step times are per step, host-synchronised."""
  t = config.train
  model = model_lib.Transformer(config_lib.model_config(config, config.model.vocab_size or STORIES_CHAR_VOCAB),
                            config_lib.execution(config))
  model_cfg, B, T = model.cfg, t.batch_size, t.seq_len
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_mesh(model_cfg, mesh, B)
  micro = train.micro_batches(config, mesh)
  schedule = optim.schedule(config.optim, t.steps)
  tx = optim.make_optimizer(config.optim, t.steps)
  _, shardings = train.state_shardings(model_cfg, tx, mesh, model.ex.param_dtype)
  step_fn, _ = train.compile_steps(model, tx, schedule, shardings, mesh, micro)
  state = train.init_state(model, tx, shardings, config.seed)
  batch, = sharding.device_batches([random_batch(model_cfg.vocab_size, B, T, config.seed)], mesh)

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  log(f"train step compiled in {compile_s:.1f} s")
  t0 = time.perf_counter()
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  first_step_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)

  per_repeat = []
  for r in range(repeats):
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
    per_repeat.append(times)
    log(f"repeat {r + 1}/{repeats}: median step {1e3 * statistics.median(times):.1f} ms")
  loss = float(metrics["train/loss"])
  if not np.isfinite(loss):
    raise RuntimeError(f"the benchmark's train loss is not finite ({loss}).")
  all_times = [x for times in per_repeat for x in times]
  step_s = statistics.median(all_times)
  return {
      "params": metrics_lib.num_params(model_cfg),
      "flops_per_token": metrics_lib.flops_per_token(model_cfg, T),
      "batch_size": B, "seq_len": T, "vocab_size": model_cfg.vocab_size,
      "dtype": model.ex.dtype, "matmul_dtype": model.ex.matmul_dtype or model.ex.dtype,
      "kernels": model.ex.kernels, "activation": model_cfg.activation,
      "remat": model.ex.remat, "micro_batches": micro,
      "compile_s": compile_s, "first_step_s": first_step_s,
      "step_ms_median": 1e3 * step_s,
      "step_ms_repeat_medians": [1e3 * statistics.median(x) for x in per_repeat],
      "step_ms_min": 1e3 * min(all_times),
      "tokens_per_s": B * T / step_s,
      "final_loss": loss,
      "relayouts": aot.relayouts(compiled.as_text()),
      "_model": model,
      # For the roofline check: the compiled step's own counts per device (a scan's body counted once).
      "_cost": {"micro_batches": micro, "flops": float(cost.get("flops", 0.0)),
                "bytes": float(cost.get("bytes accessed", 0.0)),
                "closed_form": metrics_lib.flops_per_token(model_cfg, T) * B * T / jax.device_count()},
  }


def benchmark(config, *, steps: int = 10, warmup: int = 2, repeats: int = 3, generate: bool = True,
              gen_batch_sizes=(1, 8), gen_prompt_len: int = 1, gen_new_tokens: int = 500,
              gen_repeats: int = 3, peak_matmul_n: int = CPU_PEAK_MATMUL,
              log: Callable = lambda _: None) -> dict:
  """The whole benchmark of `config`: train step, peak FLOP/s, MFU, memory, generation."""
  sharding.set_cpu_devices(config)  # before anything starts JAX, as train.py does
  device = jax.devices()[0]
  out = {"device": device.device_kind, "platform": device.platform,
         "num_devices": jax.device_count(), "jax": jax.__version__,
         "python": platform.python_version()}
  tr = benchmark_train(config, steps=steps, warmup=warmup, repeats=repeats, log=log)
  model, cost = tr.pop("_model"), tr.pop("_cost")
  out.update(tr)
  # Taken before the peak matmul and generation allocate: the training process's own peak.
  out["peak_rss_train_mb"] = peak_rss_mb()
  stats = device.memory_stats() or {}  # None on CPU
  if "peak_bytes_in_use" in stats:
    out["device_peak_memory_gb"] = stats["peak_bytes_in_use"] / 1e9
  peak, source = metrics_lib.peak_flops(device, peak_matmul_n)  # per device
  out.update({"peak_flops": peak, "peak_flops_all_devices": peak * jax.device_count(),
              "peak_source": source,
              "mfu": metrics_lib.mfu(tr["tokens_per_s"], tr["flops_per_token"], peak,
                                     jax.device_count())})
  log(f"train: {tr['tokens_per_s']:.0f} tokens/s, MFU {out['mfu']:.1%} of {out['peak_flops_all_devices'] / 1e9:.0f} GFLOP/s")
  if device.platform != "cpu":
    # The data sheet's peak is a promise; a large bf16 matmul in this run is what the chip delivers now.
    n = ACCELERATOR_PEAK_MATMUL
    measured = metrics_lib.measure_matmul_flops(n, jnp.bfloat16, repeats=10)
    out.update({"matmul_flops_measured": measured, "matmul_measured": f"bf16 {n}x{n}x{n}, random, best of 10",
                "mfu_of_measured_matmul": metrics_lib.raw_mfu(tr["tokens_per_s"], tr["flops_per_token"], measured,
                                                              jax.device_count())})
    log(f"bf16 matmul {n}^3: {measured / 1e12:.0f} TFLOP/s; the step reaches {out['mfu_of_measured_matmul']:.1%} of it")
  out["roofline"] = roofline_check(cost, peak, out["step_ms_median"] / 1e3, tr["batch_size"], tr["seq_len"])
  if generate:
    gen, cpu = {}, device.platform == "cpu"
    for gb in gen_batch_sizes:
      g = sampling.benchmark_generation(model, gb, gen_prompt_len, gen_new_tokens,
                                        repeats=gen_repeats, seed=config.seed)
      gen[f"B{gb}"] = {k: g[k] for k in ("batch_size", "prompt_len", "new_tokens", "buffer_len",
                                         "window", "compile_s", "first_run_s", "median_s",
                                         "tokens_per_s", "ms_per_step", "flops_per_token")}
      # One device generates, but on a CPU it has the whole host's threads.
      gen[f"B{gb}"]["mfu"] = g["flops_per_s"] / (peak * (jax.local_device_count() if cpu else 1))
      log(f"generation B={gb}: {g['tokens_per_s']:.0f} tokens/s, MFU {gen[f'B{gb}']['mfu']:.1%} "
          f"(compiled in {g['compile_s']:.1f} s)")
    # Even at the full peak, B>1 can only gain what B=1 leaves idle: peak / B=1's FLOP/s.
    if "B1" in gen:
      gen["max_speedup_over_B1"] = 1.0 / gen["B1"]["mfu"]
    out["generation"] = gen
  out["peak_rss_mb"] = peak_rss_mb()
  out["load_avg_1m"] = _load_average()
  return out


def roofline_check(cost: dict, peak: float, measured_step_s: float, B: int, T: int) -> dict:
  """The roofline estimate scripts/compile.py makes for a TPU, made here for this device and set
  against the step just measured: how far the estimate is from a real step.

  The device's peak is the one MFU uses. Its memory bandwidth is the data sheet's for a
  known accelerator, as compile.py's estimate takes it (a 256 MB copy on an H200 measured
  1.1-2.2 TB/s of its 4.8, launch-bound), else measured (a large array read and written),
  shared like the peak. The compute term takes the compiled step's FLOPs, or the closed
  form's where the compiler counted fewer.
  """
  this = jax.devices()[0]
  share = jax.local_device_count() if this.platform == "cpu" else 1
  chip = chips.find(this.device_kind)
  bandwidth = chip.hbm_bandwidth if chip else metrics_lib.measure_memory_bandwidth() / share
  device = chips.Chip("this device", (), peak, 0.0, bandwidth, 1.0,
                      "data sheet" if chip else "measured in this run")
  # XLA's GPU cost analysis does not count the library calls (cuBLAS GEMMs, cuDNN attention):
  # on an H200 it saw 0.3% of GPT-2's FLOPs. A step does at least the closed form's work.
  compiled = cost["flops"] * cost["micro_batches"]
  flops, source = (compiled, "compiled") if compiled >= cost["closed_form"] else (
      cost["closed_form"], f"closed form (the compiled count, {compiled / cost['closed_form']:.1%} of it, "
                           "misses calls into libraries or kernels)")
  result = {"flops": {"compiled_total": flops, "closed_form": cost["closed_form"]},
            "bytes_accessed": cost["bytes"] * cost["micro_batches"], "collectives": {},
            "micro_batches": cost["micro_batches"]}
  estimate = aot.roofline(result, device, B, T)
  return {**{k: estimate[k] for k in ("compute_s", "memory_s", "bound", "step_s_overlapped", "step_s_serial")},
          "compute_flops": flops, "compute_flops_source": source,
          "memory_bandwidth": device.hbm_bandwidth * share, "memory_bandwidth_source": device.source,
          "measured_step_s": measured_step_s,
          "measured_over_overlapped": measured_step_s / estimate["step_s_overlapped"],
          "measured_over_serial": measured_step_s / estimate["step_s_serial"]}


def _load_average() -> Optional[float]:
  try:
    return os.getloadavg()[0]
  except OSError:
    return None
