"""What every script shares: a known error becomes one clear line and exit status 1."""

import sys

from jaxformer.checkpoint import CheckpointError
from jaxformer.config import ConfigError
from jaxformer.data import DataError
from jaxformer.train import TrainingError

CLEAR_ERRORS = (ConfigError, DataError, CheckpointError, TrainingError, ValueError, OSError)


def run(main, *args, **kwargs):
  """Calls main; errors that already name the problem and the fix print as one line, no traceback."""
  try:
    return main(*args, **kwargs)
  except CLEAR_ERRORS as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)
