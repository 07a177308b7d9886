"""Run a hyperparameter sweep: one train.py process per trial, then a results table and plot.

python scripts/sweep.py --sweep=configs/sweeps/lr_warmup.py [--workdir=DIR] [--parallel=N]
                        [--dry_run] [--report] [--sweep.KEY=VALUE ...]
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from jaxformer import cli, plots, results, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SWEEP = config_flags.DEFINE_config_file("sweep", None, "A sweep file (configs/sweeps/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's folder (default: runs/sweeps/<sweep file name>).")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Trials run at the same time.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print one train.py command line per trial and run nothing.")
_REPORT = flags.DEFINE_bool("report", False, "Only write results.csv, results.md and results.png from what is there.")


def resolve(path: str) -> str:
  """A config path as given, else relative to the repository; absolute, so commands run from anywhere."""
  file, sep, arg = path.partition(":")
  if not os.path.isfile(file) and os.path.isfile(os.path.join(REPO, file)):
    file = os.path.join(REPO, file)
  return os.path.abspath(file) + sep + arg


def main(argv):
  cli.flags_only(argv)
  if _SWEEP.value is None:
    raise cli.UsageError("no sweep given; pass --sweep=configs/sweeps/NAME.py.")
  sweep_file = flags.FLAGS["sweep"].config_filename.split(":")[0]  # cli.main checked that it exists
  spec = _SWEEP.value
  if not spec.config:
    raise cli.UsageError("the sweep names no base config; set config = 'configs/tiny.py' (or another) in the sweep file.")
  if _PARALLEL.value < 1:
    raise cli.UsageError(f"--parallel must be at least 1, got {_PARALLEL.value}.")
  spec = spec.copy_and_resolve_references()
  with spec.unlocked():
    spec.config = resolve(spec.config)
  trials = sweep.expand(spec, sweep.load_config_file(spec.config))
  name = os.path.splitext(os.path.basename(sweep_file))[0]
  workdir = _WORKDIR.value or os.path.join("runs", "sweeps", name)
  train_script = os.path.join(REPO, "scripts", "train.py")
  command_for = lambda t: sweep.trial_command(t, workdir, train_script=train_script)

  if _DRY_RUN.value:
    for t in trials:
      print(sweep.shell_line(command_for(t)))
    return
  if not _REPORT.value:
    print(f"{len(trials)} trials in {workdir}, {_PARALLEL.value} at a time", flush=True)
    try:
      sweep.run_trials(trials, workdir, command_for=command_for, parallel=_PARALLEL.value,
                       log=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
      print("interrupted; the same command resumes the sweep.", file=sys.stderr)
      sys.exit(130)
  rows, axes = results.result_rows(trials, workdir), list(trials[0].axes)
  paths = results.write_report(rows, axes, workdir, title=f"sweep {name}")
  if plots.available():
    paths["png"] = plots.plot_sweep(rows, axes, os.path.join(workdir, "results.png"))
  else:
    print("matplotlib is not installed (pip install 'jaxformer[plot]'); no results.png.")
  with open(paths["md"]) as f:
    print(f.read())
  print("wrote " + ", ".join(paths.values()))


if __name__ == "__main__":
  cli.main(main)
