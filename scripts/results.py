"""The README's results table: each preset trained on each corpus with one fixed step budget.

python scripts/results.py [--steps=500] [--presets=tiny,small] [--corpora=stories,shakespeare,tinystories]
                          [--workdir=runs/results] [--parallel=1] [--dry_run] [--report]
Each run is one train.py process (sweep.train): started again, it skips finished runs and resumes the rest.
Writes WORKDIR/results.md (and .csv) and prints the table.
"""

import concurrent.futures
import os
import platform

from absl import flags, logging

from jaxformer import cli, results, runs, sweep
from jaxformer import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# corpus -> (its recipe, whether it reads a file given by --<corpus>=PATH)
CORPORA = {"stories": ("configs/default.py", False),
           "shakespeare": ("configs/shakespeare_char.py", True),
           "tinystories": ("configs/tinystories.py", True)}
PRESETS = ("tiny", "small", "medium", "large")

_STEPS = flags.DEFINE_integer("steps", 500, "Training steps of every run (the fixed budget).", lower_bound=1)
_PRESETS = flags.DEFINE_list("presets", ["tiny", "small"], f"Model presets: {', '.join(PRESETS)}.")
_CORPORA = flags.DEFINE_list("corpora", list(CORPORA), f"Corpora: {', '.join(CORPORA)}.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "B of every run.", lower_bound=1)
_SEQ = flags.DEFINE_integer("seq_len", 128, "T of every run.", lower_bound=1)
_LR = flags.DEFINE_float("lr", 2e-3, "Peak learning rate of every run (warmup: a tenth of the steps).")
flags.register_validator(_LR, lambda lr: lr > 0, message="give a positive learning rate.")
_SHAKESPEARE = flags.DEFINE_string("shakespeare", "", "Tiny Shakespeare text (default: the recipe's data.path).")
_TINYSTORIES = flags.DEFINE_string("tinystories", "", "TinyStories text (default: the recipe's data.path).")
_WORKDIR = flags.DEFINE_string("workdir", os.path.join("runs", "results"), "Folder of the runs and the table.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at the same time (1 gives comparable tokens/s).",
                                  lower_bound=1)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print one train.py command line per run and run nothing.")
_REPORT = flags.DEFINE_bool("report", False, "Only write the table from the runs there are.")


def corpus_path(corpus: str, recipe: dict) -> str:
  given = {"shakespeare": _SHAKESPEARE.value, "tinystories": _TINYSTORIES.value}[corpus]
  # The recipes' default paths are relative to the repository root.
  path = given or os.path.normpath(os.path.join(REPO, recipe.data.path))
  if not _REPORT.value and not os.path.isfile(path):
    raise cli.UsageError(f"the {corpus} text {path} does not exist; pass --{corpus}=PATH or leave {corpus} "
                     "out of --corpora.")
  return os.path.abspath(path)


def make_trials() -> list:
  steps = _STEPS.value
  unknown = [p for p in _PRESETS.value if p not in PRESETS] + [c for c in _CORPORA.value if c not in CORPORA]
  if unknown:
    raise cli.UsageError(f"unknown preset or corpus: {', '.join(unknown)}; presets are {', '.join(PRESETS)}, "
                     f"corpora {', '.join(CORPORA)}.")
  fixed = {"model.dropout": 0.0, "train.batch_size": _BATCH.value, "train.seq_len": _SEQ.value,
           "train.steps": steps, "train.eval_every": max(steps // 2, 1),
           "train.checkpoint_every": max(steps // 2, 1), "train.log_every": max(steps // 20, 1),
           "train.num_samples": 0, "train.early_stopping_patience": 0,
           "optim.lr": _LR.value, "optim.warmup_steps": steps // 10}
  trials = []
  for corpus in _CORPORA.value:
    recipe_file, has_file = CORPORA[corpus]
    recipe_file = os.path.join(REPO, recipe_file)
    recipe = sweep.load_config_file(recipe_file)
    data = {"data.path": corpus_path(corpus, recipe)} if has_file else {}
    for preset in _PRESETS.value:
      m = sweep.load_config_file(os.path.join(REPO, "configs", f"{preset}.py")).model
      model = {f"model.{k}": m[k] for k in ("num_layers", "num_heads", "embed_dim", "mlp_ratio")}
      axes = {"preset": preset, "corpus": corpus}
      trials.append(sweep.Trial(name=sweep.trial_name(axes), config=recipe_file,
                                overrides={**fixed, **model, **data}, axes=axes))
      # A bad field or value fails here, before any run starts.
      config_lib.validate(config_lib.apply_overrides(recipe, trials[-1].overrides, "results setting"))
  return trials


def cpu_name() -> str:
  """platform.processor() is empty on most Linux systems; /proc/cpuinfo names the model."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_note(steps: int) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  cpu = cpu_name()
  tokens = _BATCH.value * _SEQ.value
  return (f"Measured by `python scripts/results.py --steps={steps}` on {cpu}, {os.cpu_count()} CPU cores, "
          f"{jax.default_backend()} ({device.device_kind}), jax {jax.__version__}, one run at a time. Every run: "
          f"B={_BATCH.value}, T={_SEQ.value}, {steps} steps ({steps * tokens / 1e6:.2f}M tokens), AdamW at "
          f"lr {_LR.value:g} with {steps // 10} warmup steps and cosine decay, no dropout; validation loss in nats "
          "per token on the run's fixed validation batches (excess: over the stories' entropy floor); "
          "tokens/s is the median of the logged windows; wall time includes start-up, compilation and "
          "data preparation.")


def main(argv):
  cli.flags_only(argv)
  logging.set_verbosity(logging.ERROR)  # JAX logs at INFO
  trials = make_trials()
  workdir = _WORKDIR.value
  train_script = os.path.join(REPO, "scripts", "train.py")
  command_for = lambda t: sweep.trial_command(t, workdir, train_script=train_script)
  if _DRY_RUN.value:
    for t in trials:
      print(sweep.shell_line(command_for(t)))
    return
  if not _REPORT.value:
    todo = [t for t in trials if runs.run_status(os.path.join(workdir, t.name))["status"] != "finished"]
    print(f"{len(trials)} runs of {_STEPS.value} steps in {workdir}, {len(trials) - len(todo)} already finished",
          flush=True)
    with concurrent.futures.ThreadPoolExecutor(_PARALLEL.value) as pool:
      for t, (s, _) in zip(todo, pool.map(lambda t: sweep.train(t, workdir, train_script), todo)):
        loss = f", best validation loss {s['best_eval_loss']:.4f}" if s["best_eval_loss"] is not None else ""
        print(f"{t.name}: {s['status']}{loss}" + (f": {s['error']}" if s["status"] == "failed" else ""), flush=True)
  rows = results.result_rows(trials, workdir)
  table = results.results_table(rows, ["preset", "corpus"], machine_note(_STEPS.value))
  results.write_csv(rows, os.path.join(workdir, "results.csv"))
  path = os.path.join(workdir, "results.md")
  runs.atomic_write(path, table)
  print(table)
  print(f"wrote {path}")


if __name__ == "__main__":
  cli.main(main)
