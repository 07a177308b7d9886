"""Metric writers (JSONL + TensorBoard), progress output, throughput and MFU arithmetic."""

import json
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per chip from vendors' data sheets (no sparsity).
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "a100": 312e12, "l4": 121e12, "a10": 125e12,
    "v100": 125e12, "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12,
    "tpu v5p": 459e12, "tpu v6": 918e12,
}

_measured_peak: dict = {}


def measure_matmul_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of an n x n matmul through JAX on the default device: the practical peak.

  The best of `repeats`, so that sharing the machine lowers MFU, never raises it.
  """
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / min(times)


def peak_flops(device=None, matmul_n: int = 2048) -> tuple[float, str]:
  """(peak FLOP/s per device, where it came from): a data-sheet table, or measured on CPU.

  A CPU host's measured peak is shared by its CPU devices (mesh.cpu_devices), so
  each gets its share and MFU over all devices still compares with the host's peak.
  """
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  for name, flops in PEAK_FLOPS.items():
    if name in kind:
      return flops, f"table:{name}"
  if matmul_n not in _measured_peak:
    _measured_peak[matmul_n] = measure_matmul_flops(matmul_n)
  share = jax.local_device_count()
  source = f"measured:f32 matmul {matmul_n}, best of 5" + (f", shared by {share} CPU devices" if share > 1 else "")
  return _measured_peak[matmul_n] / share, source


def mfu(tokens_per_sec: float, flops_per_token: float, peak: float, num_devices: int) -> float:
  return tokens_per_sec * flops_per_token / (peak * num_devices)


class Writer:
  """Writes one JSON object per event to metrics.jsonl and the same scalars to TensorBoard.

  Only process 0 writes; other processes get a writer that does nothing.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._file = self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter  # imported lazily: slow import
      self._tb = SummaryWriter(workdir)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if not isinstance(v, str) else v) for k, v in scalars.items()}
    self._file.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._file.flush()
    for k, v in clean.items():
      if not isinstance(v, str):
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """A tqdm bar on a terminal; plain log lines otherwise (CI logs, files)."""

  def __init__(self, total: int, initial: int, enabled: bool = True):
    self.enabled = enabled
    self.tty = enabled and sys.stderr.isatty()
    self._bar = None
    if self.tty:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step")

  def update(self, step: int, info: dict, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)
      self._bar.set_postfix({k: _fmt(v) for k, v in info.items()}, refresh=False)

  def log(self, message: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(message)
    else:
      print(message, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def _fmt(v):
  if isinstance(v, float):
    return f"{v:.4g}"
  return v


def format_line(step: int, total: int, info: dict, eta_s: Optional[float] = None) -> str:
  parts = [f"step {step}/{total}"] + [f"{k} {_fmt(v)}" for k, v in info.items()]
  if eta_s is not None:
    parts.append(f"eta {eta_s / 60:.1f} min")
  return " | ".join(parts)
