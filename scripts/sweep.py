"""Run a hyperparameter sweep on Optuna: workers pull trials from one study, one train.py process each.

python scripts/sweep.py --sweep=configs/sweeps/lr_warmup.py [--workdir=DIR] [--workers=N]
                        [--dry_run] [--report] [--sweep.KEY=VALUE ...]

The same command run again, on other hosts or as SLURM array tasks, adds workers to the same
study (DIR shared; on several hosts, sweep.storage a database they all reach). Each returns
when the study is done and writes DIR/results.md, results.csv, results.png and best_config.json.
"""

import multiprocessing
import os
import sys

from absl import flags
from ml_collections import config_flags

from jaxformer import cli, plots, results, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "scripts", "train.py")

_SWEEP = config_flags.DEFINE_config_file("sweep", None, "A sweep file (configs/sweeps/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's folder (default: runs/sweeps/<sweep file name>).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Worker processes started here, each training one trial at a time.",
                                 lower_bound=1)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the trials' train.py command lines and run nothing.")
_REPORT = flags.DEFINE_bool("report", False, "Only write the results from the study as it is.")


def resolve(path: str) -> str:
  """A config path as given, else relative to the repository; absolute, so commands run from anywhere."""
  file, sep, arg = path.partition(":")
  if not os.path.isfile(file) and os.path.isfile(os.path.join(REPO, file)):
    file = os.path.join(REPO, file)
  return os.path.abspath(file) + sep + arg


def worker(spec, workdir: str, name: str) -> None:
  """A --workers process: sweep.work, its errors one line, an interrupt quiet (its trial is queued again)."""
  try:
    cli.run(sweep.work, spec, workdir, TRAIN, name, log=lambda m: print(m, flush=True))
  except KeyboardInterrupt:
    sys.exit(130)


def report(spec, workdir: str, name: str) -> None:
  study = sweep.open_study(spec, workdir, name, create=False)
  rows, axes = results.study_rows(study.get_trials(), workdir), list(sweep.check(spec))
  paths = results.write_report(rows, axes, workdir, title=f"sweep {name}")
  if plots.available():
    paths["png"] = plots.plot_sweep(rows, axes, os.path.join(workdir, "results.png"))
  else:
    print("matplotlib is not installed (pip install 'jaxformer[plot]'); no results.png.")
  with open(paths["md"]) as f:
    print(f.read())
  print("wrote " + ", ".join(paths.values()))


def main(argv):
  cli.flags_only(argv)
  if _SWEEP.value is None:
    raise cli.UsageError("no sweep given; pass --sweep=configs/sweeps/NAME.py.")
  spec = _SWEEP.value.copy_and_resolve_references()
  if not spec.config:
    raise cli.UsageError("the sweep names no base config; set config = 'configs/tiny.py' (or another) in the sweep file.")
  with spec.unlocked():
    spec.config = resolve(spec.config)
  name = os.path.splitext(os.path.basename(flags.FLAGS["sweep"].config_filename.split(":")[0]))[0]
  workdir = os.path.abspath(_WORKDIR.value or os.path.join("runs", "sweeps", name))

  if _DRY_RUN.value:
    trials, note = sweep.preview(spec)
    for t in trials:
      print(sweep.shell_line(sweep.trial_command(t, workdir, train_script=TRAIN)))
    if note:
      print(f"# {note}")
    return
  if not _REPORT.value:
    sweep.preview(spec)  # every grid point's (the first draws') config is checked before anything runs
    if _WORKERS.value == 1:
      try:
        sweep.work(spec, workdir, TRAIN, name, log=lambda m: print(m, flush=True))
      except KeyboardInterrupt:
        print("interrupted; the trial that was running is queued again: the same command resumes the sweep.",
              file=sys.stderr)
        sys.exit(130)
    else:
      sweep.open_study(spec, workdir, name)  # made once here, before the workers race to make it
      # Fresh interpreters ("spawn"): a forked copy of this process would inherit JAX's threads.
      context = multiprocessing.get_context("spawn")
      procs = [context.Process(target=worker, args=(spec, workdir, name)) for _ in range(_WORKERS.value)]
      for p in procs:
        p.start()
      try:
        for p in procs:
          p.join()
      except KeyboardInterrupt:  # the workers got it too: each checkpoints its trial and queues it again
        for p in procs:
          p.join()
        print("interrupted; the trials that were running are queued again: the same command resumes the sweep.",
              file=sys.stderr)
        sys.exit(130)
      if all(p.exitcode for p in procs):  # one killed is fine: another finishes its trial
        cli.fail(f"every worker failed (exit status {', '.join(str(p.exitcode) for p in procs)}); "
                 "their errors are above.")
  report(spec, workdir, name)


if __name__ == "__main__":
  cli.main(main)
