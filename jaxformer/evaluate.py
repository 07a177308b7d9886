"""Validation loss of a trained run's checkpoint, on its own corpus or another one.

The run's tokenizer is always used (`load_data` takes `workdir/tokenizer.json`), so
the numbers are the model's own: a char tokenizer meeting characters it has never
seen is a DataError, not a silent remapping.
"""

import functools
import math

import jax
import numpy as np

from jaxformer import checkpoint
from jaxformer import config as config_lib
from jaxformer import data as data_lib
from jaxformer import runs
from jaxformer import train
from jaxformer.config import ConfigError

# What may change between training and evaluation: the data, and the windows it is cut into.
OVERRIDABLE = ("data.", "train.batch_size", "train.seq_len")


def evaluate_run(workdir: str, which: str = "best", overrides: dict | None = None) -> dict:
  """Loss, perplexity and tokens scored of checkpoint `which` (best | latest | a step) of `workdir`.

  `overrides` ({"data.path": ..., "train.seq_len": ...}) change the data or the
  windows; with none, the batches are exactly the ones the run validated on.
  On stories the entropy floor of the scored documents and the excess over it are added.
  """
  overrides = dict(overrides or {})
  for key in overrides:
    if not key.startswith(OVERRIDABLE):
      raise ConfigError(
          f"--config.{key} cannot change at evaluation; only data.*, train.batch_size and train.seq_len "
          "can (the model and its training come from the run).")
  config, model, params, _, step = checkpoint.load_run(workdir, which)
  config = config_lib.apply_overrides(config, overrides, "evaluation override")
  config_lib.validate(config)
  t = config.train
  data = data_lib.load_data(config.data, workdir, t.seq_len)
  valid = data_lib.validation_set(data, num_batches=config.data.num_valid_batches, batch_size=t.batch_size,
                                  seq_len=t.seq_len)
  eval_fn = jax.jit(functools.partial(train.eval_step, model=model))
  loss = train.evaluate(eval_fn, params, valid.batches)
  result = {
      "workdir": workdir, "checkpoint": which, "step": step, "loss": loss,
      "perplexity": math.exp(min(loss, 50.0)),
      "tokens": int(sum(float(np.sum(b["weights"])) for b in valid.batches)),
      "batches": len(valid.batches), "batch_size": t.batch_size, "seq_len": t.seq_len,
      "data": data_lib.describe_source(config.data),
  }
  if valid.entropy_floor is not None:
    result.update({"entropy_floor": valid.entropy_floor, "excess": loss - valid.entropy_floor,
                   "documents": valid.num_docs})
  return result
