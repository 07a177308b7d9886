"""A run's own config.json, to start the run again: --config=configs/from_run.py:RUN_DIR.

python scripts/train.py --config=configs/from_run.py:runs/tiny --workdir=runs/tiny_again
On the same machine the new run's losses equal the original's bit for bit;
--config.KEY=VALUE flags change it as with any config file.
"""

import os

from jaxformer.config import load_config_json


def get_config(run_dir: str = ""):
  # FileNotFoundError, not ConfigError: config_flags defers an IOError until the config is
  # used, so train.py reports it as one line instead of a traceback at flag parsing.
  if not run_dir:
    raise FileNotFoundError("configs/from_run.py needs a run folder: --config=configs/from_run.py:RUN_DIR.")
  path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{run_dir} has no config.json; point --config=configs/from_run.py:RUN_DIR "
                            "at a run folder made by scripts/train.py.")
  return load_config_json(path)
