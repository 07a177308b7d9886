"""Launching several JAX processes on 127.0.0.1 for the multi-host tests, each bounded by a timeout."""

import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# A tiny model on the built-in stories, over configs/default.py: what every multi-host test trains.
TINY = {"model.num_layers": 1, "model.num_heads": 4, "model.embed_dim": 32, "model.max_len": 32,
        "train.batch_size": 16, "train.seq_len": 32, "train.steps": 6, "train.eval_every": 6,
        "train.log_every": 1, "train.checkpoint_every": 1000, "train.num_samples": 0,
        "data.num_stories": 300, "data.num_valid_batches": 1,
        "train.micro_batch_size": 16,   # one micro-batch: fewer collectives between the processes
        "compute.kernels": "reference"}  # compiles in half the time of the CPU kernels


def _port_stretch() -> range:
  """This process's stretch of ports: below the ephemeral range, one stretch per xdist worker."""
  low = max(int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0]), 14000)
  worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").lstrip("gw") or 0)
  size = (low - 10000) // 4
  start = 10000 + (worker % 4) * size
  return range(start, start + size)


_STRETCH = _port_stretch()
_next_port = itertools.count(random.Random(os.getpid()).randrange(len(_STRETCH)))


def free_port() -> int:
  """A coordinator port never handed out before by this process, and free now.

  Not bind(0)'s: it lies in the ephemeral range, where the same port can come back to the next
  caller, or go to a connection or a gloo listener, before the coordinator binds it. The
  coordinator's gRPC server sets SO_REUSEPORT, so two coordinators on one port share it without an
  error and the processes of two runs join each other's collectives.
  """
  for _ in range(len(_STRETCH)):
    port = _STRETCH[next(_next_port) % len(_STRETCH)]
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
    return port
  raise RuntimeError(f"no free port in {_STRETCH}")


def distributed(port: int, num_processes: int, process_id: int) -> dict:
  """The distributed.* overrides of process `process_id` of `num_processes` on 127.0.0.1."""
  return {"distributed.enabled": True, "distributed.coordinator_address": f"127.0.0.1:{port}",
          "distributed.num_processes": num_processes, "distributed.process_id": process_id}


def flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def env(extra: dict | None = None) -> dict:
  e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  e.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, **(extra or {})})
  return e


def compilation_cache(directory: str) -> dict:
  """Environment that lets processes reuse each other's compiled programs (JAX's persistent cache)."""
  return {"JAX_COMPILATION_CACHE_DIR": directory, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def start(commands: list[list[str]], extra_env: dict | None = None) -> list[subprocess.Popen]:
  return [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           env=env(extra_env), start_new_session=True) for c in commands]


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
  """(returncode, stdout, stderr) of every process; all are killed if any outlives `timeout` seconds."""
  deadline = time.monotonic() + timeout
  out = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
      out.append((p.returncode, stdout, stderr))
  except subprocess.TimeoutExpired:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    raise AssertionError(f"a process of {len(procs)} was still running after {timeout:.0f} s (a hang); "
                         "all were killed.") from None
  return out


def run(commands: list[list[str]], timeout: float, extra_env: dict | None = None) -> list[tuple[int, str, str]]:
  return finish(start(commands, extra_env), timeout)


def script(name: str, *args: str) -> list[str]:
  return [sys.executable, os.path.join(ROOT, "scripts", name), *args]
