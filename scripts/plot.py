"""Figures as PNG files: losses of runs, the LR schedule, attention weights, positional encodings.

python scripts/plot.py loss      --workdir=RUN [--workdir=RUN2 ...] [--x=step|tokens|time] [--log_y]
python scripts/plot.py lr        (--workdir=RUN | --config=FILE [--config.KEY=VALUE ...])
python scripts/plot.py attention --workdir=RUN [--prompt=TEXT] [--checkpoint=best|latest|STEP]
python scripts/plot.py positions (--workdir=RUN | --config=FILE)
Every command takes --out=FILE.png (default: RUN/plots/<command>.png, or plots/<command>.png).
A --workdir may be a glob ('runs/sweeps/lr_warmup/*').
"""

import glob
import os

from absl import flags, logging
from ml_collections import config_flags

from jaxformer import cli, plots, runs
from jaxformer import config as config_lib

COMMANDS = ("loss", "lr", "attention", "positions")
_WORKDIR = flags.DEFINE_multi_string("workdir", [], "Run folder(s); repeat the flag or use a glob for several.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file, instead of a run folder (lr, positions).")
_X = flags.DEFINE_enum("x", "step", plots.X_AXES, "loss: the x axis.")
_LOG_Y = flags.DEFINE_bool("log_y", False, "loss: a logarithmic y axis.")
_PROMPT = flags.DEFINE_string("prompt", "Sam was a gentle boy who lived in a quiet town.",
                              "attention: the text to look at.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "attention, positions: best, latest or a step number.")
flags.register_validator(_CHECKPOINT, cli.is_checkpoint, message=cli.CHECKPOINT_HELP)  # before any work
_OUT = flags.DEFINE_string("out", "", "The PNG to write.")


def run_dirs() -> list[str]:
  dirs = []
  for pattern in _WORKDIR.value:
    matches = sorted(glob.glob(pattern)) or [pattern]
    # A glob over a sweep folder also matches results.md and such: keep run folders only.
    dirs += [d for d in matches if os.path.isfile(os.path.join(d, runs.CONFIG))] if len(matches) > 1 else matches
  return dirs


def run_config(command: str):
  """The config of --workdir (its config.json) or of --config."""
  dirs = run_dirs()
  if dirs:
    config = runs.read_config(dirs[0])
    if config is None:
      raise FileNotFoundError(f"{dirs[0]} has no config.json; point --workdir at a run folder made by scripts/train.py.")
    return config
  if _CONFIG.value is None:
    raise cli.UsageError(f"plot.py {command} needs --workdir=RUN or --config=FILE.")
  return _CONFIG.value


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    got = " ".join(argv[1:]) or "none"
    raise cli.UsageError(f"give one command, {' | '.join(COMMANDS)} (got {got}); "
                         "e.g. scripts/plot.py loss --workdir=RUN.")
  command = argv[1]
  logging.set_verbosity(logging.ERROR)  # JAX and Orbax log at INFO
  if not plots.available():
    raise cli.UsageError(plots.MISSING)
  dirs = run_dirs()
  out = _OUT.value or os.path.join(dirs[0] if len(dirs) == 1 else "", "plots", f"{command}.png")
  if command == "loss":
    if not dirs:
      raise cli.UsageError("plot.py loss needs at least one --workdir=RUN.")
    path = plots.plot_losses(dirs, out, x=_X.value, log_y=_LOG_Y.value)
  elif command == "lr":
    config = run_config(command)
    path = plots.plot_schedule(config.optim, config.train.steps, out)
  elif command == "positions":
    if dirs:  # the run's own encoding: its learned table, RoPE's rotations or the sinusoidal table
      model_cfg, table = plots.position_encoding(dirs[0], _CHECKPOINT.value)
    else:
      config = run_config(command)
      if config.model.pos_encoding == "learned":
        raise cli.UsageError("learned positions exist only in a trained run; pass --workdir=RUN instead of --config.")
      model_cfg, table = config_lib.model_config(config, config.model.vocab_size or 1), None
    path = plots.plot_positions(model_cfg, out, table)
  else:
    if len(dirs) != 1:
      raise cli.UsageError("plot.py attention needs exactly one --workdir=RUN.")
    weights, labels = plots.prompt_attention(dirs[0], _PROMPT.value, _CHECKPOINT.value)
    path = plots.plot_attention(weights, labels, out, title=f"{dirs[0]}: attention for {_PROMPT.value!r}")
  print(f"wrote {path}")


if __name__ == "__main__":
  flags.FLAGS.set_gnu_getopt(True)  # flags may follow the command: plot.py loss --workdir=...
  cli.main(main)
