"""Run in its own process by test_sharding.py: 8 fake CPU devices must be set before JAX starts."""

import json
import os
import sys

if __name__ == "__main__":  # only in the worker's own process: importing it must not change the parent
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from jaxformer import config as config_lib, runs, train  # noqa: E402
from jaxformer.config import ConfigError  # noqa: E402


def config(cache, mesh, steps=10, dropout=0.0):
  c = config_lib.base_config()
  c.model.update(dict(num_layers=2, num_heads=4, embed_dim=32, max_len=32, dropout=dropout, attn_dropout=dropout))
  c.data.update(dict(num_stories=300, cache_dir=cache, num_valid_batches=2))
  c.train.update(dict(batch_size=16, seq_len=32, steps=steps, eval_every=steps, log_every=1,
                      checkpoint_every=5, num_samples=0))
  c.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh)))
  return c


def losses(workdir):
  return {r["step"]: r["train/loss"] for r in runs.read_metrics(workdir) if "train/loss" in r}


def main(cache, out):
  assert jax.device_count() == 8, jax.devices()
  quiet = lambda *_: None
  result = {}
  for mesh in ((8, 1, 1), (2, 4, 1), (2, 2, 2)):
    wd = os.path.join(out, "x".join(map(str, mesh)))
    train.train_and_evaluate(config(cache, mesh), wd, log=quiet)
    result["x".join(map(str, mesh))] = losses(wd)
  # Saved on one mesh (2x4x1, stopped at 5), resumed on another (2x2x2).
  wd = os.path.join(out, "moved")
  train.train_and_evaluate(config(cache, (2, 4, 1)), wd, log=quiet, stop_at=5)
  train.train_and_evaluate(config(cache, (2, 2, 2)), wd, log=quiet)
  result["moved"] = losses(wd)
  # Dropout on: the masks are drawn per row, so 8 devices (one micro-batch) give the losses
  # of one device (four micro-batches of 4 rows).
  wd = os.path.join(out, "dropout")
  train.train_and_evaluate(config(cache, (8, 1, 1), dropout=0.1), wd, log=quiet)
  result["dropout"] = losses(wd)
  errors = {}
  for name, mesh, batch in (("indivisible", (8, 1, 1), 12), ("too_big", (4, 4, 1), 16)):
    c = config(cache, mesh)
    c.train.batch_size = batch
    try:
      train.train_and_evaluate(c, os.path.join(out, name), log=quiet)
    except ConfigError as err:
      errors[name] = str(err)
  result["errors"] = errors
  print("RESULT " + json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
