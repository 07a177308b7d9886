"""Validation loss of a trained run's checkpoint, on its own corpus or another one.

The run's tokenizer is always used (`load_data` takes `workdir/tokenizer.json`), so
the numbers are the model's own: a char tokenizer meeting characters it has never
seen is a DataError unless data.unknown_chars=unk maps them (the count is reported).
"""

import math

import numpy as np

from jaxformer import checkpoint
from jaxformer import config as config_lib
from jaxformer import data as data_lib
from jaxformer import metrics
from jaxformer import sharding
from jaxformer import tokenizer
from jaxformer import train
from jaxformer.config import ConfigError

# What may change between training and evaluation: the data, the windows it is cut into, and
# the devices (mesh.*, distributed.*: see checkpoint.load_run).
OVERRIDABLE = ("data.", "train.batch_size", "train.seq_len")
PLACEMENT = ("mesh.", "distributed.")


def evaluate_run(workdir: str, which: str = "best", overrides: dict | None = None) -> dict:
  """Loss, perplexity, bits per byte and tokens scored of checkpoint `which` (best | latest | a step) of `workdir`.

  `overrides` ({"data.path": ..., "train.seq_len": ...}) change the data or the
  windows; with none, the batches are exactly the ones the run validated on.
  On stories the entropy floor of the scored documents and the excess over it are added.
  """
  overrides = dict(overrides or {})
  for key in overrides:
    if not key.startswith(OVERRIDABLE + PLACEMENT):
      raise ConfigError(
          f"--config.{key} cannot change at evaluation; only data.*, train.batch_size, train.seq_len, mesh.* "
          "and distributed.* can (the model and its training come from the run).")
  placement = {k: v for k, v in overrides.items() if k.startswith(PLACEMENT)}
  config, model, params, _, step, mesh = checkpoint.load_run(workdir, which, placement)
  config = config_lib.apply_overrides(
      config, {k: v for k, v in overrides.items() if k not in placement}, "evaluation override")
  config_lib.validate(config)
  t = config.train
  sharding.check_mesh(model.cfg, mesh, t.batch_size)
  data = data_lib.load_data(config.data, workdir, t.seq_len)
  valid = data_lib.validation_set(data, num_batches=config.data.num_valid_batches, batch_size=t.batch_size,
                                  seq_len=t.seq_len)
  eval_fn = train.eval_function(model, sharding.param_shardings(model.cfg, mesh), mesh,
                                tokenizer.vocab_size(data.tokenizer))
  loss = train.evaluate(eval_fn, params, sharding.device_batches(valid.batches, mesh))
  bytes_per_token = metrics.bytes_per_token(valid.batches, tokenizer.token_bytes(data.tokenizer))
  result = {
      "workdir": workdir, "checkpoint": which, "step": step, "loss": loss,
      "perplexity": math.exp(min(loss, 50.0)), "bpb": metrics.bits_per_byte(loss, bytes_per_token),
      "bytes_per_token": bytes_per_token, "unknown_chars": data.manifest.get("unknown_chars", 0),
      "tokens": int(sum(float(np.sum(b["weights"])) for b in valid.batches)),
      "batches": len(valid.batches), "batch_size": t.batch_size, "seq_len": t.seq_len,
      "data": data_lib.describe_source(config.data),
  }
  if valid.entropy_floor is not None:
    result.update({"entropy_floor": valid.entropy_floor, "excess": loss - valid.entropy_floor,
                   "bpb_floor": metrics.bits_per_byte(valid.entropy_floor, bytes_per_token),
                   "documents": valid.num_docs})
  return result
