"""Evaluate a trained run's checkpoint; prints one JSON object.

python scripts/evaluate.py --workdir=DIR [--checkpoint=best|latest|STEP] [--config.data.KEY=VALUE ...]
                           [--config.train.batch_size=B] [--config.train.seq_len=T]
                           [--config.mesh.KEY=VALUE] [--config.distributed.KEY=VALUE]
With no --config flags it scores the run's own validation batches; --config.data.*
evaluates on another corpus with the run's tokenizer.
"""

import json

from absl import flags, logging
from ml_collections import config_flags

from jaxformer import cli, evaluate
from jaxformer.config import base_config

_WORKDIR = flags.DEFINE_string("workdir", None, "The run folder to evaluate.", required=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.")
flags.register_validator(_CHECKPOINT, cli.is_checkpoint, message=cli.CHECKPOINT_HELP)  # before any work
# Only the fields given on the command line are used; the rest come from the run's config.json.
with cli.flag_errors():  # ml_collections reads the --config.KEY overrides here
  _CONFIG = config_flags.DEFINE_config_dict("config", base_config(), "Overrides: --config.data.*, "
                                            "--config.train.batch_size, --config.train.seq_len, "
                                            "--config.mesh.*, --config.distributed.* (many hosts).")


def main(argv):
  cli.flags_only(argv)
  cli.compilation_cache()  # the next evaluation of the same shapes loads its compiled step
  logging.set_verbosity(logging.ERROR)  # Orbax logs every restore
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  result = evaluate.evaluate_run(_WORKDIR.value, _CHECKPOINT.value, overrides)
  print(json.dumps(result))


if __name__ == "__main__":
  cli.main(main)
