"""What every script shares: the project's own errors become one clear line and exit status 1.

Only errors whose message already names the problem and the fix are shortened:
the project's error types (config, data, tokenizer, checkpoint, training,
sampling, plot, usage) and a missing or unreadable path. Anything else is a bug and
keeps its traceback.
"""

import importlib.util
import os
import sys

import jax

from jaxformer.checkpoint import CheckpointError
from jaxformer.config import ConfigError
from jaxformer.data import DataError
from jaxformer.plots import PlotError
from jaxformer.sampling import SamplingError
from jaxformer.tokenizer import TokenizerError
from jaxformer.train import TrainingError


class UsageError(ValueError):
  """A bad command-line flag or argument; the message names it and the fix."""


CLEAR_ERRORS = (ConfigError, DataError, TokenizerError, CheckpointError, TrainingError, SamplingError,
                PlotError, UsageError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def skip_absent_tpu() -> None:
  """Keeps JAX on the CPU where libtpu is installed (the dev and tpu extras) but no TPU chip is.

  JAX would otherwise probe for a TPU at start-up and print libtpu's warnings. Left
  alone: a JAX_PLATFORMS the user set, a host with TPU chips, a host with a GPU plugin.
  """
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return
  if importlib.util.find_spec("jax_plugins") is not None or importlib.util.find_spec("jax_cuda12_plugin"):
    return
  try:
    from jax._src import hardware_utils  # JAX's own check for TPU chips on the PCI bus
    chips = hardware_utils.num_available_tpu_chips_and_device_id()[0]
  except Exception:  # a JAX without it: let JAX decide
    return
  if chips == 0:
    jax.config.update("jax_platforms", "cpu")


def run(main, *args, **kwargs):
  """Calls main (JAX kept off an absent TPU); a CLEAR_ERRORS error prints as one line, no traceback."""
  skip_absent_tpu()
  try:
    return main(*args, **kwargs)
  except CLEAR_ERRORS as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)
