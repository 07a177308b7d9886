"""Metric writers (JSONL + TensorBoard), progress output, throughput, MFU and FLOPs arithmetic."""

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer import chips
from jaxformer import model as model_lib
from jaxformer import runs
from jaxformer.kernels import attention as attention_kernels

_measured_peak: dict = {}


def measure_matmul_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of an n x n matmul through JAX on the default device: the practical peak.

  The best of `repeats`, so that sharing the machine lowers MFU, never raises it.
  """
  # Random values: a GPU multiplies zeros or ones measurably faster (less switching power).
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  return 2 * n ** 3 / _best_time(lambda x: x @ x, x, repeats)


def _best_time(fn, x, repeats: int) -> float:
  """The fastest of `repeats` runs of jit(fn)(x), after one untimed run that compiles it."""
  f = jax.jit(fn)
  f(x).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t0)
  return min(times)


def measure_memory_bandwidth(n_bytes: int = 1 << 28, repeats: int = 5) -> float:
  """Bytes/s the default device reads and writes: x + 1 over an n_bytes float32 array (best of `repeats`)."""
  return 2 * n_bytes / _best_time(lambda x: x + 1.0, jnp.ones((n_bytes // 4,), jnp.float32), repeats)


def peak_flops(device=None, matmul_n: int = 2048) -> tuple[float, str]:
  """(peak FLOP/s per device, where it came from): a data-sheet table, or measured on CPU.

  A CPU host's measured peak is shared by its CPU devices (mesh.cpu_devices), so
  each gets its share and MFU over all devices still compares with the host's peak.
  """
  device = device or jax.devices()[0]
  chip = chips.find(device.device_kind)
  if chip is not None:
    return chip.bf16_flops, f"table:{chip.name} dense bf16 ({chip.source})"
  if matmul_n not in _measured_peak:
    _measured_peak[matmul_n] = measure_matmul_flops(matmul_n)
  share = jax.local_device_count()
  source = f"measured:f32 matmul {matmul_n}, best of 5" + (f", shared by {share} CPU devices" if share > 1 else "")
  return _measured_peak[matmul_n] / share, source


def mfu(tokens_per_sec: float, flops_per_token: float, peak: float, num_devices: int) -> float:
  """Model FLOPs utilisation, at most 1 (see `contended`)."""
  return min(1.0, raw_mfu(tokens_per_sec, flops_per_token, peak, num_devices))


def raw_mfu(tokens_per_sec: float, flops_per_token: float, peak: float, num_devices: int) -> float:
  return tokens_per_sec * flops_per_token / (peak * num_devices)


def contended(tokens_per_sec: float, flops_per_token: float, peak: float, num_devices: int) -> bool:
  """Whether the throughput beats the peak: a CPU's peak measured while the machine was busier
  than during the steps. MFU is then clamped to 1 and the metrics say so (`mfu_contended`)."""
  return raw_mfu(tokens_per_sec, flops_per_token, peak, num_devices) > 1.0


class Writer:
  """Writes one JSON object per event to metrics.jsonl and the same scalars to TensorBoard.

  Only process 0 writes; other processes get a writer that does nothing. In a
  bucket, where objects cannot be appended to, both files are kept locally and
  uploaded whole every `sync_every_s` seconds and at close.
  """

  def __init__(self, workdir: str, enabled: bool = True, sync_every_s: float = 30.0, start_step: int = 0):
    self.enabled, self.remote = enabled, runs.is_remote(workdir)
    self.workdir, self.sync_every_s, self._synced = workdir, sync_every_s, time.monotonic()
    self._file = self._tb = None
    if not enabled:
      return
    # A resumed run logs its steps after `start_step` again: their old lines go first, so
    # metrics.jsonl keeps one line per step (and a line cut short by a kill goes too).
    target = runs.path(runs.join(workdir, runs.METRICS))
    old = target.read_text() if target.exists() else ""
    kept = "".join(line for line in old.splitlines(keepends=True) if _step_of(line) <= start_step)
    if self.remote:
      # metrics.jsonl as it stands, and TensorBoard's events, staged locally and uploaded whole.
      self._local = tempfile.mkdtemp(prefix="jaxformer-metrics-")
      self._lines = [kept] if kept else []
      tb_dir = self._local
    else:
      if kept != old:
        runs.atomic_write(str(target), kept)
      os.makedirs(workdir, exist_ok=True)
      self._file = open(os.path.join(workdir, runs.METRICS), "a")
      tb_dir = workdir
    from tensorboardX import SummaryWriter  # imported lazily: slow import
    self._tb = SummaryWriter(tb_dir)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if not isinstance(v, str) else v) for k, v in scalars.items()}
    line = json.dumps({"step": int(step), **clean}) + "\n"
    for k, v in clean.items():
      if not isinstance(v, str):
        self._tb.add_scalar(k, v, step)
    if not self.remote:
      self._file.write(line)
      self._file.flush()
      return
    self._lines.append(line)
    if time.monotonic() - self._synced >= self.sync_every_s:
      self._tb.flush()
      self._sync()

  def _sync(self) -> None:
    """Uploads metrics.jsonl and the event files whole."""
    runs.atomic_write(runs.join(self.workdir, runs.METRICS), "".join(self._lines))
    for name in os.listdir(self._local):
      with open(os.path.join(self._local, name), "rb") as f:
        runs.atomic_write(runs.join(self.workdir, name), f.read())
    self._synced = time.monotonic()

  def close(self) -> None:
    if not self.enabled:
      return
    self._tb.close()
    if self.remote:
      self._sync()
      shutil.rmtree(self._local, ignore_errors=True)
    else:
      self._file.close()


def _step_of(line: str) -> float:
  """The step of a metrics.jsonl line; infinity for one that is not whole JSON (so it is dropped)."""
  try:
    return json.loads(line)["step"] if line.endswith("\n") else math.inf
  except (ValueError, KeyError, TypeError):
    return math.inf


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


def bytes_per_token(batches: list[dict], token_bytes: np.ndarray) -> float:
  """UTF-8 bytes of text per scored target over fixed (B, T) batches (`tokenizer.token_bytes`).

  Each scored target counts the bytes of the text it stands for, so a character
  split over several byte-level tokens is counted once, in pieces; EOT counts 0
  bytes, but its loss stays in the numerator: where a document ends is part of
  the text's information (and the stories' entropy floor includes it too).
  """
  tokens = sum(float(np.sum(b["weights"])) for b in batches)
  nbytes = sum(float(np.sum(b["weights"] * token_bytes[b["targets"]])) for b in batches)
  return nbytes / max(tokens, 1.0)


def bits_per_byte(nats_per_token: float, bytes_per_token_: float) -> float:
  """A loss in nats per token as bits per byte of the original text: comparable across tokenizers."""
  return nats_per_token / (math.log(2) * bytes_per_token_) if bytes_per_token_ > 0 else math.nan


def num_params(cfg: model_lib.ModelConfig) -> int:
  """Closed-form parameter count of the model; equals the count of `model.init_params`."""
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


def flops_per_token(cfg: model_lib.ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6N for the matmuls plus 12·L·T·C for attention (PaLM appendix B).

  N counts matmul weights only (the head, not the input lookup or position table).
  Causal masking is not discounted, as in nanoGPT/PaLM.
  """
  n = num_params(cfg) - (cfg.max_len * cfg.embed_dim if cfg.pos_encoding == "learned" else 0)
  if not cfg.tie_embeddings:
    n -= cfg.vocab_size * cfg.embed_dim  # the input lookup is a gather, not a matmul
  return 6.0 * n + 12.0 * cfg.num_layers * seq_len * cfg.embed_dim


def forward_flops(cfg: model_lib.ModelConfig, T: int, last_only: bool = False,
                  kernels: str = "reference") -> float:
  """Matmul FLOPs of one row's forward over T positions, as the model computes them.

  The "cpu" kernels' blocked attention counts the (query, key) pairs of the blocks
  it computes, the others all T². With `last_only` (`logits_at`), the last block
  computes keys and values at every position but its query, MLP and the head at one.
  """
  C, L, V, F = cfg.embed_dim, cfg.num_layers, cfg.vocab_size, cfg.mlp_ratio * cfg.embed_dim
  per_position = 2 * (4 * C * C + 2 * C * F)  # qkv, output projection, MLP
  if kernels == "cpu":
    blocks = attention_kernels.query_blocks(T, attention_kernels.ATTENTION_BLOCK, cfg.sliding_window)
    pairs = sum((qe - qs) * (qe - ks) for qs, qe, ks in blocks)
  else:
    pairs = T * T
  layer = T * per_position + 4 * C * pairs  # scores and weighted values: 2·D·H per pair each
  if not last_only:
    return L * layer + T * 2 * C * V
  last = T * 4 * C * C + 2 * (2 * C * C + 2 * C * F) + 4 * C * T  # k, v; q, out, MLP; one query
  return (L - 1) * layer + last + 2 * C * V
