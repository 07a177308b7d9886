"""Sharding equivalence on 8 fake CPU devices, in a process of its own."""

import json
import os
import subprocess
import sys

import jax
import pytest

from jaxformer import config as config_lib
from jaxformer import sharding, train

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_meshes_agree_with_one_device_and_checkpoints_move_between_meshes(tmp_path):
  cache = str(tmp_path / "cache")
  proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_worker.py"), cache, str(tmp_path)],
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  result = json.loads(line[len("RESULT "):])

  # The reference: the same run on this process's single device (mesh 1x1x1).
  import sharding_worker  # the worker's config, without its 8-device setup
  c = sharding_worker.config(cache, (1, 1, 1))
  train.train_and_evaluate(c, str(tmp_path / "single"), log=lambda *_: None)
  ref = {str(k): v for k, v in sharding_worker.losses(str(tmp_path / "single")).items()}
  assert len(ref) == 10
  for mesh in ("8x1x1", "2x4x1", "2x2x2", "moved"):
    got = result[mesh]
    assert sorted(got, key=int) == sorted(ref, key=int), mesh
    for step, loss in ref.items():
      assert abs(got[step] - loss) <= 1e-5 * abs(loss), (mesh, step, got[step], loss)
  # With dropout: the same masks on 8 devices as on one, whatever the micro-batches.
  c = sharding_worker.config(cache, (1, 1, 1), dropout=0.1)
  train.train_and_evaluate(c, str(tmp_path / "single_dropout"), log=lambda *_: None)
  ref_dropout = {str(k): v for k, v in sharding_worker.losses(str(tmp_path / "single_dropout")).items()}
  assert max(abs(ref_dropout[s] - ref[s]) for s in ref) > 1e-3  # dropout did change the losses
  for step, loss in ref_dropout.items():
    assert abs(result["dropout"][step] - loss) <= 1e-5 * abs(loss), (step, result["dropout"][step], loss)
  assert "must be divisible by the data x fsdp mesh axes (8)" in result["errors"]["indivisible"]
  assert "does not match the 8 available devices" in result["errors"]["too_big"]


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
