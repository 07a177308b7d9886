"""Train (or resume) a run, then print a few samples.

python scripts/train.py [--config=configs/default.py] [--workdir=DIR] [--config.KEY=VALUE ...]
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxformer import allocator, checkpoint, cli, sampling, train

with cli.flag_errors():  # ml_collections reads the --config.KEY overrides here
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "default.py"),
      "A config file with get_config(), or a run's config.json to reproduce it.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (default: runs/<config file name>).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.ERROR)  # Orbax logs every save and restore
  config = _CONFIG.value
  name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename.split(":")[0]))[0]
  workdir = _WORKDIR.value or os.path.join("runs", name)
  cli.compilation_cache()  # a resumed or repeated run loads its compiled step
  allocator.configure()  # XLA:CPU reuses its large buffers instead of page-faulting them every step
  summary = train.train_and_evaluate(config, workdir)
  print(train.summary_line(summary), flush=True)
  if summary["status"] == "stopped":  # by a signal: the scheduler should start it again
    sys.exit(train.EXIT_RESUMABLE)
  if config.train.num_samples > 0:
    _, model, params, tok, _, _ = checkpoint.load_run(workdir)
    texts = sampling.sample_text(
        params, model, tok, [""] * config.train.num_samples, max_new_tokens=config.train.sample_tokens,
        temperature=0.8, top_p=0.95, seed=config.seed)
    for i, text in enumerate(texts):
      print(f"\n--- sample {i + 1} (temperature 0.8, top_p 0.95) ---\n{text}")


if __name__ == "__main__":
  cli.main(main)
