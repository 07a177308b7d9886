"""Meshes refused before compiling, and CPU hosts split into devices (many meshes train in test_multihost.py)."""

import os
import subprocess
import sys
import types

import jax
import pytest

from jaxformer import config as config_lib
from jaxformer import sharding

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_meshes_that_cannot_be_laid_out_are_refused_in_one_sentence():
  cfg = config_lib.model_config(config_lib.base_config(), 64)  # 4 heads, C=128
  mesh = lambda d, f, t: types.SimpleNamespace(shape={"data": d, "fsdp": f, "tensor": t})
  sharding.check_mesh(cfg, mesh(2, 2, 2), batch_size=32)
  with pytest.raises(config_lib.ConfigError, match=r"train.batch_size \(12\) must be divisible by the data x fsdp "
                     r"mesh axes \(8\)"):
    sharding.check_mesh(cfg, mesh(8, 1, 1), batch_size=12)
  with pytest.raises(config_lib.ConfigError, match="mesh.tensor=8 does not divide model.num_heads = 4"):
    sharding.check_mesh(cfg, mesh(1, 1, 8))
  with pytest.raises(config_lib.ConfigError, match="mesh.fsdp=3 does not divide model.embed_dim = 128"):
    sharding.check_mesh(cfg, mesh(1, 3, 1))
  with pytest.raises(config_lib.ConfigError, match="does not match the 1 available devices"):
    sharding.make_mesh(config_lib.apply_overrides(config_lib.base_config(), {"mesh.data": 2}).mesh)


def test_cpu_devices_auto_and_explicit():
  """mesh.cpu_devices: auto picks one device per core dividing the batch; explicit after start errs."""
  c = config_lib.base_config()
  assert sharding.auto_cpu_devices(c, cores=2) == 2
  assert sharding.auto_cpu_devices(c, cores=6) == 4  # B=32: 4 is the largest divisor <= 6 cores
  assert sharding.auto_cpu_devices(c, cores=64) == 8  # at most 8
  c.train.batch_size = 30
  assert sharding.auto_cpu_devices(c, cores=6) == 6
  c.train.batch_size = 7
  assert sharding.auto_cpu_devices(c, cores=6) == 1  # of 1..6 only 1 divides 7: JAX's default
  c.train.batch_size = 32
  c.mesh.fsdp = 2
  assert sharding.auto_cpu_devices(c, cores=2) == 1  # an explicit mesh keeps JAX's devices
  c.mesh.fsdp = 1
  # This process's JAX has started (conftest: one device): auto keeps it, an explicit other count errs.
  jax.devices()
  assert sharding.set_cpu_devices(c) == 0
  c.mesh.cpu_devices = jax.device_count() + 1
  with pytest.raises(config_lib.ConfigError, match="mesh.cpu_devices=.*fresh process"):
    sharding.set_cpu_devices(c)
  c.mesh.cpu_devices = -1
  with pytest.raises(config_lib.ConfigError, match="mesh.cpu_devices must be >= 0"):
    config_lib.validate(c)


def _fresh_devices(code: str, xla_flags: str = "") -> list[str]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  prelude = "from jaxformer import config, sharding; c = config.base_config(); c.train.batch_size = 6; "
  out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.split()


def test_cpu_devices_in_a_fresh_process():
  # Explicit: three devices, each with a third of the measured peak.
  out = _fresh_devices("c.mesh.cpu_devices = 3; assert sharding.set_cpu_devices(c) == 3; import jax; "
                       "from jaxformer import metrics; p, src = metrics.peak_flops(matmul_n=256); "
                       "print(jax.device_count(), src)")
  assert out[0] == "3" and " ".join(out).endswith("shared by 3 CPU devices")
  # Auto: one per core of this machine (dividing B=6), unless XLA_FLAGS already chose.
  cores = len(os.sched_getaffinity(0))
  out = _fresh_devices("sharding.set_cpu_devices(c); import jax; print(jax.device_count())")
  c = config_lib.base_config()
  c.train.batch_size = 6
  assert int(out[0]) == sharding.auto_cpu_devices(c, cores)
  out = _fresh_devices("assert sharding.set_cpu_devices(c) == 0; import jax; print(jax.device_count())",
                       xla_flags="--xla_force_host_platform_device_count=5")
  assert out == ["5"]
