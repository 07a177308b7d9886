"""What every script shares: the project's own errors become one clear line and exit status 1.

Only errors whose message already names the problem and the fix are shortened:
the project's error types (config, data, tokenizer, checkpoint, training,
sampling, plot, usage) and a missing or unreadable path. Anything else is a bug and
keeps its traceback.
"""

import sys

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


def run(main, *args, **kwargs):
  """Calls main; a CLEAR_ERRORS error prints as one line, no traceback."""
  try:
    return main(*args, **kwargs)
  except CLEAR_ERRORS as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)
