"""Hyperparameter sweeps on Optuna: a sweep file -> a study -> one train.py process per trial.

A sweep file (`configs/sweeps/*.py`, `get_config()` returning `sweep_config()` filled in):

  config      the config file every trial starts from: "configs/tiny.py", or "FILE.py:ARG"
  overrides   fixed changes to it, nested like the config: {"train": {"steps": 300}}
  method      grid (every combination) | random | tpe: Optuna's GridSampler, RandomSampler, TPESampler
  axes        what varies, nested like the config: a tuple of values (a tuple, unlike a list, can be
              replaced from the command line), or "uniform(a, b)", "log_uniform(a, b)",
              "int_uniform(a, b)" (bounds inclusive; random and tpe only)
  num_trials  random and tpe: how many trials
  seed        the grid's order; trial k's random draws depend only on (seed, k)
  pruner      none | successive_halving | hyperband: stops trials whose validation loss lags the others'
  min_resource, reduction_factor   the pruner's first rung in steps (0: train.eval_every) and its rate
  storage     "" = the SQLite file DIR/study.db; or a database URL every worker reaches
  heartbeat_s a worker's pulse: a trial silent for twice this is failed and queued again

Each trial is a normal run folder `DIR/<name>/` named by its values ("lr=0.003,warmup_steps=50"),
trained by scripts/train.py in its own process, with `train.log` (its output) and `trial.json`
(command, worker, exit status, attempts, wall time) next to what train.py writes. The folder
belongs to the values, not to the Optuna trial: a trial retried after its worker died resumes
the folder from its last checkpoint, and a trial that draws values already trained reuses them.

Optuna keeps the trials, their states and losses, picks the values and decides the pruning;
this module launches and watches the training processes and feeds the pruner their losses.
"""

import ctypes
import dataclasses
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import warnings

import ml_collections
import numpy as np
import optuna
import sqlalchemy
from optuna.trial import TrialState

from jaxformer import config as config_lib
from jaxformer import runs
from jaxformer.config import ConfigError

METHODS = ("grid", "random", "tpe")
PRUNERS = ("none", "successive_halving", "hyperband")
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform")
STUDY_DB = "study.db"
POLL_S = 1.0              # how often a worker reads its trial's new evaluations
LOCK_WAIT_S = 600         # longest wait for a dead worker's train.py to checkpoint and let go of the folder
EXIT_RESUMABLE = 75       # train.EXIT_RESUMABLE (not imported: jaxformer.train pulls in the whole model)
ERROR_TAIL_LINES = 20


def sweep_config() -> ml_collections.ConfigDict:
  """The fields of a sweep file and their defaults; sweep files fill them in."""
  s = ml_collections.ConfigDict()
  s.config = ""
  s.overrides = ml_collections.ConfigDict()
  s.method = "grid"
  s.axes = ml_collections.ConfigDict()
  s.num_trials = 0
  s.seed = 0
  s.pruner = "none"
  s.min_resource = 0
  s.reduction_factor = 3
  s.storage = ""
  s.heartbeat_s = 30
  return s


@dataclasses.dataclass(frozen=True)
class Trial:
  """One run folder to train: what a sweep's trial (or a results.py run) becomes."""
  name: str
  config: str        # the base config file ("FILE.py" or "FILE.py:ARG")
  overrides: dict    # dotted field -> value: the sweep's fixed overrides, then this trial's values
  axes: dict         # dotted field -> value: the swept ones only (the name, the table's columns)


class TrialError(Exception):
  """A trial that gives no loss (train.py failed, a drawn value the config refuses); marked failed."""


# ---------------------------------------------------------------------------- the sweep file


def flatten(tree, prefix: str = "") -> dict:
  """A nested dict / ConfigDict as {"a.b": leaf}, keys in sorted order."""
  items = tree.items() if isinstance(tree, (dict, ml_collections.ConfigDict)) else []
  out = {}
  for k, v in sorted(items):
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, as config_flags calls it ("FILE.py:ARG" passes ARG)."""
  file, *arg = path.split(":", 1)
  if not os.path.isfile(file):
    raise ConfigError(f"the config file {file} does not exist; give a path like configs/tiny.py.")
  spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(file))}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*arg)


_DIST = re.compile(r"^\s*(\w+)\s*\(\s*([^,()]+?)\s*,\s*([^,()]+?)\s*\)\s*$")


def parse_distribution(key: str, spec: str) -> tuple[str, float, float]:
  m = _DIST.match(spec)
  if not m or m.group(1) not in DISTRIBUTIONS:
    raise ConfigError(
        f"sweep axis {key!r}: {spec!r} is not a distribution; write a tuple of values, "
        f"or one of {', '.join(d + '(a, b)' for d in DISTRIBUTIONS)}.")
  kind = m.group(1)
  try:
    lo, hi = float(m.group(2)), float(m.group(3))
  except ValueError:
    raise ConfigError(f"sweep axis {key!r}: the bounds of {spec!r} must be numbers.") from None
  if not lo <= hi:
    raise ConfigError(f"sweep axis {key!r}: {spec!r} needs its lower bound first.")
  if kind == "log_uniform" and lo <= 0:
    raise ConfigError(f"sweep axis {key!r}: log_uniform needs positive bounds, got {spec!r}.")
  if kind == "int_uniform" and math.ceil(lo) > math.floor(hi):
    raise ConfigError(f"sweep axis {key!r}: {spec!r} holds no whole number.")
  return kind, lo, hi


def check(spec: ml_collections.ConfigDict) -> dict:
  """The sweep's axes, flat ({"optim.lr": (1e-3, 3e-3)}), once its fields are checked."""
  if spec.method not in METHODS:
    raise ConfigError(f"sweep.method must be one of {', '.join(METHODS)}, got {spec.method!r}.")
  if spec.pruner not in PRUNERS:
    raise ConfigError(f"sweep.pruner must be one of {', '.join(PRUNERS)}, got {spec.pruner!r}.")
  axes = flatten(spec.axes)
  if not axes:
    raise ConfigError("the sweep has no axes; set sweep.axes, e.g. {'optim': {'lr': (1e-3, 3e-3)}}.")
  for key, values in axes.items():
    if isinstance(values, (list, tuple)):
      if not values:
        raise ConfigError(f"sweep axis {key!r} has no values; give it at least one.")
    elif spec.method == "grid":
      raise ConfigError(f"sweep axis {key!r} is {values!r}; a grid needs a tuple of values "
                        "(or set sweep.method='random' or 'tpe').")
    else:
      parse_distribution(key, values)
  if spec.method != "grid" and spec.num_trials <= 0:
    raise ConfigError(f"a {spec.method} sweep needs sweep.num_trials > 0, got {spec.num_trials}.")
  for field, least in (("seed", 0), ("min_resource", 0), ("reduction_factor", 2), ("heartbeat_s", 1)):
    if spec[field] < least:
      raise ConfigError(f"sweep.{field} must be at least {least}, got {spec[field]}.")
  storage_url(spec, "")
  return axes


def base_config(spec: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config every trial starts from: the sweep's config file with its fixed overrides."""
  return config_lib.apply_overrides(load_config_file(spec.config), flatten(spec.overrides), "sweep override")


def budget(spec: ml_collections.ConfigDict, axes: dict) -> int:
  """How many trials the study runs: every grid point, or num_trials."""
  return math.prod(len(v) for v in axes.values()) if spec.method == "grid" else int(spec.num_trials)


def startup_trials(spec: ml_collections.ConfigDict) -> int:
  # Optuna's default of 10 random trials before TPE would leave a small sweep no TPE trial at all.
  return min(10, max(2, spec.num_trials // 3))


# ---------------------------------------------------------------------------- Optuna


def make_sampler(spec, axes: dict, number: int = 0) -> optuna.samplers.BaseSampler:
  """The sweep's sampler; for random and tpe, the one that draws trial `number`'s values.

  Every worker holds its own sampler: seeded alike they would all draw the same values.
  Seeded by (seed, trial number), each trial's draws differ and are reproducible.
  """
  if spec.method == "grid":  # trial k < grid size gets grid point k of the seeded shuffle
    return optuna.samplers.GridSampler({k: list(v) for k, v in axes.items()}, seed=spec.seed)
  seed = int(np.random.SeedSequence([spec.seed, number]).generate_state(1)[0])
  if spec.method == "random":
    return optuna.samplers.RandomSampler(seed=seed)
  return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(spec))


def make_pruner(spec, base: ml_collections.ConfigDict) -> optuna.pruners.BasePruner:
  first = spec.min_resource or int(base.train.eval_every)
  if spec.pruner == "successive_halving":
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=spec.reduction_factor)
  if spec.pruner == "hyperband":
    return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=int(base.train.steps),
                                          reduction_factor=spec.reduction_factor)
  return optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, key: str, spec):
  """One axis's value: drawn floats keep 3 significant digits, so a trial's name is its values."""
  if isinstance(spec, (list, tuple)):
    return trial.suggest_categorical(key, list(spec))
  kind, lo, hi = parse_distribution(key, spec)
  if kind == "int_uniform":
    return trial.suggest_int(key, math.ceil(lo), math.floor(hi))
  value = trial.suggest_float(key, lo, hi, log=kind == "log_uniform")
  return min(max(float(f"{value:.3g}"), lo), hi)


def trial_name(axes: dict) -> str:
  names = runs.short_keys(list(axes))
  return ",".join(f"{names[k]}={runs.format_value(v)}" for k, v in axes.items())


def draw(spec, axes: dict, base: ml_collections.ConfigDict, trial: optuna.Trial) -> Trial:
  """The values of an Optuna trial (drawn now, or a retried trial's own) as a Trial, its config validated."""
  if spec.method != "grid":
    trial.study.sampler = make_sampler(spec, axes, trial.number)
  values = {k: suggest(trial, k, v) for k, v in axes.items()}
  name = trial_name(values)
  trial.set_user_attr("name", name)
  trial.set_user_attr("values", values)
  config = config_lib.apply_overrides(base, values, "sweep axis")
  try:
    config_lib.validate(config)
  except ConfigError as err:
    raise ConfigError(f"trial {name}: {err}") from None
  return Trial(name=name, config=spec.config, overrides={**flatten(spec.overrides), **values}, axes=values)


def preview(spec) -> tuple[list[Trial], str]:
  """The first trials a sweep runs, as its workers draw them, and a note on what it cannot show.

  A grid: all of it; random: all num_trials; tpe: its random start-up trials (TPE picks the
  rest from their losses). Trial numbers taken by retries shift the later draws.
  Every config is validated, so a bad sweep fails here before anything runs.
  """
  axes, base = check(spec), base_config(spec)
  optuna.logging.set_verbosity(optuna.logging.ERROR)
  study = optuna.create_study(sampler=make_sampler(spec, axes))  # in memory: nothing is written
  n, note = budget(spec, axes), ""
  if spec.method == "tpe" and startup_trials(spec) < n:
    n, note = startup_trials(spec), f"trials {startup_trials(spec)}-{n - 1} are chosen by TPE from the losses"
  trials = [draw(spec, axes, base, study.ask()) for _ in range(n)]
  return trials, note


def storage_url(spec, workdir: str) -> str:
  """The study's database: DIR/study.db unless the sweep names one.

  A database, not Optuna's journal file: only RDBStorage keeps heartbeats, which find a killed
  worker's trial and queue it again.
  """
  if not spec.storage:
    return "sqlite:///" + os.path.abspath(os.path.join(workdir, STUDY_DB))
  try:
    sqlalchemy.engine.make_url(spec.storage)
  except sqlalchemy.exc.ArgumentError:
    raise ConfigError(f"sweep.storage {spec.storage!r} is not a database URL; leave it empty for DIR/{STUDY_DB}, "
                      "or give one every worker reaches, e.g. postgresql://user:password@host/db.") from None
  return spec.storage


def _identity(spec, axes: dict) -> dict:
  """What makes a study this sweep's: a study of other axes would count other trials."""
  return json.loads(json.dumps({"method": spec.method, "axes": axes, "overrides": flatten(spec.overrides)}))


def open_study(spec, workdir: str, name: str, create: bool = True) -> optuna.Study:
  """The sweep's study: made by the first worker, loaded by the others (and by --report)."""
  optuna.logging.set_verbosity(optuna.logging.ERROR)  # workers print their own lines
  warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
  axes, url = check(spec), storage_url(spec, workdir)
  local = os.path.join(workdir, STUDY_DB) if not spec.storage else None
  if not create and local and not os.path.isfile(local):
    raise ConfigError(f"{workdir} has no {STUDY_DB}; run the sweep first (without --report).")
  if local:
    os.makedirs(workdir, exist_ok=True)
  engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # wait for other workers' writes
  for attempt in range(5):
    try:
      storage = optuna.storages.RDBStorage(
          url, engine_kwargs=engine, heartbeat_interval=spec.heartbeat_s,
          heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())
      study = (optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                   sampler=make_sampler(spec, axes), pruner=make_pruner(spec, base_config(spec)))
               if create else optuna.load_study(study_name=name, storage=storage))
      break
    except ImportError as err:
      raise ConfigError(f"sweep.storage {url}: its database driver is missing ({err.__cause__ or err}); "
                        "install it, e.g. pip install psycopg2-binary for postgresql.") from None
    except KeyError:
      raise ConfigError(f"{url} holds no study {name!r}; run the sweep first (without --report).") from None
    except sqlalchemy.exc.SQLAlchemyError as err:  # workers starting together race to create the tables
      if attempt == 4:
        raise ConfigError(f"cannot open the study in {url}: {getattr(err, 'orig', None) or err}; check "
                          "sweep.storage and that the database is reachable.") from None
      time.sleep(1 + attempt)
  said, mine = study.user_attrs.get("sweep"), _identity(spec, axes)
  if said is None:
    study.set_user_attr("sweep", mine)
  elif said != mine:
    raise ConfigError(f"the study {name!r} in {url} belongs to another sweep (its method, axes or overrides "
                      f"differ); use another --workdir, or delete {local or 'the study'} to start it again "
                      "(finished run folders are reused).")
  return study


# ---------------------------------------------------------------------------- training one trial


def flag_value(value) -> str:
  """A value as train.py's --config.KEY=VALUE flag parses it back exactly."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)
  return str(value)


def trial_command(trial: Trial, workdir: str, *, train_script: str, python: str = sys.executable) -> list[str]:
  """The train.py command line of one trial, run in `workdir/<name>`."""
  return ([python, train_script, f"--config={trial.config}", f"--workdir={os.path.join(workdir, trial.name)}"]
          + [f"--config.{k}={flag_value(v)}" for k, v in trial.overrides.items()])


def shell_line(command: list[str]) -> str:
  return shlex.join(command)


def _tail(path: str, lines: int = ERROR_TAIL_LINES) -> str:
  if not os.path.isfile(path):
    return ""
  with open(path, errors="replace") as f:
    return "".join(f.readlines()[-lines:]).strip()


_PRCTL = getattr(ctypes.CDLL(None), "prctl", None) if sys.platform == "linux" else None


def _die_with_worker() -> None:
  """Runs in train.py's process before exec: SIGTERM when the worker dies, even by SIGKILL
  (PR_SET_PDEATHSIG), so train.py checkpoints and stops instead of training on unwatched."""
  _PRCTL(1, signal.SIGTERM)


def train(trial: Trial, workdir: str, train_script: str, stop=lambda: False,
          python: str = sys.executable) -> tuple[dict, bool]:
  """Runs (or resumes) one trial's train.py with its output appended to train.log.

  `stop()` is asked every POLL_S; when it says so, train.py gets SIGTERM and checkpoints
  and exits. So does it when the worker is interrupted. Returns the folder's
  runs.run_status and whether `stop` stopped it.
  """
  run_dir = os.path.join(workdir, trial.name)
  os.makedirs(run_dir, exist_ok=True)
  command = trial_command(trial, workdir, train_script=train_script, python=python)
  old = runs.read_trial(run_dir)
  record = {"name": trial.name, "config": trial.config, "overrides": trial.overrides, "axes": trial.axes,
            "command": shell_line(command), "worker": f"{socket.gethostname()}:{os.getpid()}",
            "attempts": old.get("attempts", 0) + 1, "returncode": None, "wall_s": old.get("wall_s", 0.0),
            "error": ""}
  runs.write_json(os.path.join(run_dir, runs.TRIAL), record)  # who trains the folder now
  log_path, start, stopped = os.path.join(run_dir, "train.log"), time.time(), False
  with open(log_path, "a") as log:
    log.write(f"$ {shell_line(command)}\n")
    log.flush()
    try:
      # Its own session: a Ctrl-C meant for the worker reaches train.py once, from the worker.
      proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              start_new_session=True, preexec_fn=_die_with_worker if _PRCTL else None)
    except OSError as err:  # the command could not start at all
      returncode, error = -1, f"{type(err).__name__}: {err}"
    else:
      try:
        while True:
          try:
            returncode = proc.wait(timeout=POLL_S)
            break
          except subprocess.TimeoutExpired:
            if not stopped and stop():
              proc.terminate()
              stopped = True
      except BaseException:  # the worker is stopping: let train.py checkpoint first
        proc.terminate()
        proc.wait()
        raise
      error = _tail(log_path) if returncode not in (0, EXIT_RESUMABLE) and not stopped else ""
  record.update(returncode=returncode, wall_s=record["wall_s"] + time.time() - start, error=error)
  runs.write_json(os.path.join(run_dir, runs.TRIAL), record)
  return runs.run_status(run_dir), stopped


def evaluations(run_dir: str) -> dict:
  """{step: eval/loss} logged so far. Only evaluation lines are parsed: the file has a line per logged step."""
  try:
    f = open(os.path.join(run_dir, runs.METRICS))
  except FileNotFoundError:
    return {}
  out = {}
  with f:
    for line in f:
      if '"eval/loss"' in line:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:  # being written
          continue
        out[row["step"]] = row["eval/loss"]
  return out


def _twin_running(trial: optuna.Trial, name: str) -> bool:
  """Whether an earlier trial of the same values is running (a repeated draw): once it ends, its run is ours."""
  optuna.storages.fail_stale_trials(trial.study)  # a dead worker's trial would keep us waiting
  return any(t.state == TrialState.RUNNING and t.number < trial.number and t.user_attrs.get("name") == name
             for t in trial.study.get_trials(deepcopy=False))


def _held(run_dir: str) -> bool:
  """Whether a process holds the run folder: a dead worker's train.py, still saving its checkpoint."""
  try:  # taken and given back at once; a live holder refuses
    runs.release_lock(runs.acquire_lock(run_dir, log=lambda _: None))
  except runs.RunFolderError:
    return True
  return False


def objective(trial: optuna.Trial, spec, axes: dict, base, workdir: str, train_script: str) -> float:
  """One trial: its run folder trained (or resumed, or reused), reporting each evaluation to the pruner.

  The value is the run's best validation loss (summary.json's, through runs.run_status).
  """
  try:
    t = draw(spec, axes, base, trial)
  except ConfigError as err:
    trial.set_user_attr("error", str(err))
    raise TrialError(str(err)) from None
  run_dir = os.path.join(workdir, t.name)
  deadline = time.time() + LOCK_WAIT_S  # then train.py says who holds the folder, and the trial fails
  while _twin_running(trial, t.name) or (_held(run_dir) and time.time() < deadline):
    time.sleep(POLL_S)
  reported = set()

  def report(judge: bool = True) -> bool:
    """Reports the run's new evaluations in order; True once the pruner would stop the run at one.

    Judged at each step, not only at the last one read: a rung compares every trial's loss at it.
    """
    new = {s: v for s, v in evaluations(run_dir).items() if s not in reported}
    for step in sorted(new):
      trial.report(new[step], step)
      reported.add(step)
      if judge and trial.should_prune():
        return True
    return False

  status, stopped = runs.run_status(run_dir), False
  if status["status"] != "finished":  # finished: a retry whose run ended, or values trained before
    stopped = report()  # a folder with evaluations (a retry, a pruned run drawn again) is judged first
    if not stopped:
      status, stopped = train(t, workdir, train_script, stop=report)
  if stopped and status["status"] != "finished":  # else the run ended before SIGTERM came: complete
    raise optuna.TrialPruned(f"at step {status['steps']}")
  report(judge=False)
  error = ""
  if status["status"] != "finished":
    error = status["error"] or f"train.py stopped at step {status['steps']} of {status['total_steps']}"
  elif status["best_eval_loss"] is None:
    error = "the run logged no validation loss; set train.eval_every <= train.steps"
  if error:
    trial.set_user_attr("error", error)
    raise TrialError(error)
  return status["best_eval_loss"]


# ---------------------------------------------------------------------------- workers


def _retried(study: optuna.Study, number: int) -> bool:
  """Whether trial `number` has been queued again (RetryHeartbeatStaleTrialCallback keeps the history)."""
  return any(number in t.system_attrs.get("retry_history", []) for t in study.get_trials(deepcopy=False))


def _next(study: optuna.Study, n: int) -> str:
  """run (a trial is queued or the budget is not spent), wait (others' trials still run) or done."""
  optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed, and queued again by the callback
  trials = study.get_trials(deepcopy=False)
  retried = {k for t in trials for k in t.system_attrs.get("retry_history", [])}
  live = [t for t in trials if t.number not in retried]
  if len(live) < n or any(t.state == TrialState.WAITING for t in live):
    return "run"
  return "wait" if any(t.state == TrialState.RUNNING for t in live) else "done"


def describe(trial: optuna.trial.FrozenTrial, workdir: str) -> str:
  """One line on a finished trial, for the worker's output."""
  name = trial.user_attrs.get("name", "?")
  line = f"trial {trial.number} {name}: {trial.state.name.lower()}"
  s = runs.run_status(os.path.join(workdir, name)) if "name" in trial.user_attrs else {}
  if trial.state == TrialState.COMPLETE:
    line += f", best validation loss {trial.value:.4f} at step {s.get('best_step')}"
  elif trial.state == TrialState.PRUNED:
    line += f" at step {s.get('steps')}"
  elif trial.state == TrialState.FAIL:
    line += f": {trial.user_attrs.get('error') or 'interrupted'}"
  if trial.duration is not None:
    line += f" ({trial.duration.total_seconds():.0f} s)"
  return line


def _interrupt(signum, frame):
  """SIGINT or SIGTERM: once. A second would cut short the first's clean-up (train.py's checkpoint, the requeue)."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  raise KeyboardInterrupt


def work(spec, workdir: str, train_script: str, name: str, log=print) -> None:
  """One worker: runs the study's trials, one at a time, until none is left to start or running.

  Start as many as you like, here, on other hosts or as array jobs: they share the study.
  A trial of a worker that is killed is failed once its heartbeat stops (Optuna's heartbeat)
  and queued again with the same values (RetryHeartbeatStaleTrialCallback): the next free
  worker resumes its run folder. An interrupted worker (SIGINT, SIGTERM) checkpoints its
  trial's run and queues it again before leaving.
  """
  axes, base = check(spec), base_config(spec)
  study, n = open_study(spec, workdir, name), budget(spec, axes)
  log(f"worker {socket.gethostname()}:{os.getpid()}: study {name!r}, {n} trials ({spec.method}, "
      f"pruner {spec.pruner})")
  signal.signal(signal.SIGINT, _interrupt)
  signal.signal(signal.SIGTERM, _interrupt)
  while (state := _next(study, n)) != "done":
    if state == "wait":
      time.sleep(POLL_S)
      continue
    mine = []

    def run(trial):
      mine.append(trial.number)
      return objective(trial, spec, axes, base, workdir, train_script)

    try:
      # One trial per call: optimize() keeps the trial's heartbeat and fails stale trials first.
      study.optimize(run, n_trials=1, catch=(TrialError,))
    except KeyboardInterrupt:  # optimize() has failed the trial; its train.py has saved a checkpoint
      trial = next((t for t in study.get_trials() if mine and t.number == mine[0]), None)
      if trial is not None and trial.state == TrialState.FAIL and not _retried(study, trial.number):
        optuna.storages.RetryHeartbeatStaleTrialCallback()(study, trial)
        log(f"trial {trial.number} {trial.user_attrs.get('name', '')}: interrupted; queued again")
      raise
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
      # Our heartbeat came late (a stalled host): the trial was failed and queued again while it
      # ran. Its train.py has stopped or finished; the retry resumes or reuses its folder.
      if not (mine and _retried(study, mine[0])):
        raise
      log(f"trial {mine[0]}: failed by a late heartbeat while running; queued again")
      continue
    if mine:
      log(describe(next(t for t in study.get_trials(deepcopy=False) if t.number == mine[0]), workdir))
