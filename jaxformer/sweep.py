"""Hyperparameter sweeps: a sweep config -> trials -> one training process each -> a results table.

A sweep config (`configs/sweeps/*.py`, `get_config()` returning `sweep_config()` filled in):

  config      the config file every trial starts from: "configs/tiny.py", or "FILE.py:ARG"
  overrides   fixed changes to it, nested like the config: {"train": {"steps": 300}}
  method      grid | random
  axes        what varies, nested like the config. grid: a tuple of values per field
              (a tuple, unlike a list, can be replaced from the command line).
              random: a tuple (one is chosen uniformly) or a string "uniform(a, b)",
              "log_uniform(a, b)" or "int_uniform(a, b)" (both bounds inclusive)
  num_trials  random only: how many trials to draw
  seed        random only: the draws are a pure function of it

Each trial is a normal run folder `DIR/<name>/` whose name lists its axis values
("lr=0.003,warmup_steps=50"), so adding a value to a grid reuses the trials done.
Next to what train.py writes, the sweep keeps `train.log` (the process's output)
and `trial.json` (command, exit status, wall time, error tail). Whether a trial is
done is its summary.json's word (runs.run_status); the tables are results.py's.
"""

import concurrent.futures
import dataclasses
import importlib.util
import itertools
import math
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Callable

import ml_collections
import numpy as np

from jaxformer import config as config_lib
from jaxformer import runs
from jaxformer.config import ConfigError

METHODS = ("grid", "random")
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform")
ERROR_TAIL_LINES = 20


def sweep_config() -> ml_collections.ConfigDict:
  """The fields of a sweep config and their defaults; sweep files fill them in."""
  s = ml_collections.ConfigDict()
  s.config = ""
  s.overrides = ml_collections.ConfigDict()
  s.method = "grid"
  s.axes = ml_collections.ConfigDict()
  s.num_trials = 0
  s.seed = 0
  return s


@dataclasses.dataclass(frozen=True)
class Trial:
  name: str
  config: str        # the base config file ("FILE.py" or "FILE.py:ARG")
  overrides: dict    # dotted field -> value: the sweep's fixed overrides, then this trial's axis values
  axes: dict         # dotted field -> value: the swept ones only (the name, the table's columns)


# ---------------------------------------------------------------------------- expansion


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
  return kind, lo, hi


def draw(rng, key: str, spec) -> Any:
  """One value of a random-search axis; floats rounded to 3 significant digits, so the name is the value."""
  if isinstance(spec, (list, tuple)):
    return spec[int(rng.integers(len(spec)))]
  kind, lo, hi = parse_distribution(key, spec)
  if kind == "int_uniform":
    return int(rng.integers(math.ceil(lo), math.floor(hi) + 1))
  if kind == "log_uniform":
    value = math.exp(rng.uniform(math.log(lo), math.log(hi)))
  else:
    value = rng.uniform(lo, hi)
  return min(max(float(f"{value:.3g}"), lo), hi)


def flag_value(value) -> str:
  """A value as train.py's --config.KEY=VALUE flag parses it back exactly."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)
  return str(value)


def trial_name(axes: dict) -> str:
  names = runs.short_keys(list(axes))
  return ",".join(f"{names[k]}={runs.format_value(v)}" for k, v in axes.items())


def _check_axes(method: str, axes: dict) -> None:
  if not axes:
    raise ConfigError("the sweep has no axes; set sweep.axes, e.g. {'optim': {'lr': (1e-3, 3e-3)}}.")
  for key, spec in axes.items():
    if isinstance(spec, (list, tuple)):
      if not spec:
        raise ConfigError(f"sweep axis {key!r} has no values; give it at least one.")
    elif method == "grid":
      raise ConfigError(
          f"sweep axis {key!r} is {spec!r}; a grid needs a tuple of values (or set sweep.method='random').")
    else:
      parse_distribution(key, spec)


def expand(sweep: ml_collections.ConfigDict, base: ml_collections.ConfigDict) -> list[Trial]:
  """The sweep's trials in order, each checked against `base` (fields exist, values validate)."""
  if sweep.method not in METHODS:
    raise ConfigError(f"sweep.method must be grid or random, got {sweep.method!r}.")
  axes = flatten(sweep.axes)
  fixed = flatten(sweep.overrides)
  _check_axes(sweep.method, axes)
  if sweep.method == "grid":
    keys = list(axes)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]
  else:
    if sweep.num_trials <= 0:
      raise ConfigError(f"a random sweep needs sweep.num_trials > 0, got {sweep.num_trials}.")
    rng = np.random.default_rng(int(sweep.seed))
    combos = [{k: draw(rng, k, spec) for k, spec in axes.items()} for _ in range(sweep.num_trials)]
  trials, names = [], set()
  base_fixed = config_lib.apply_overrides(base, fixed, "sweep override")
  for combo in combos:
    name = trial_name(combo)
    if name in names:  # a random draw repeated (small choice lists): one run is enough
      continue
    names.add(name)
    config = config_lib.apply_overrides(base_fixed, combo, "sweep axis")
    try:
      config_lib.validate(config)
    except ConfigError as err:
      raise ConfigError(f"trial {name}: {err}") from None
    trials.append(Trial(name=name, config=sweep.config, overrides={**fixed, **combo}, axes=combo))
  return trials


# ---------------------------------------------------------------------------- launching


def trial_command(trial: Trial, workdir: str, *, train_script: str, python: str = sys.executable) -> list[str]:
  """The train.py command line of one trial, run in `workdir/<name>`."""
  return ([python, train_script, f"--config={trial.config}", f"--workdir={os.path.join(workdir, trial.name)}"]
          + [f"--config.{k}={flag_value(v)}" for k, v in trial.overrides.items()])


def shell_line(command: list[str]) -> str:
  return shlex.join(command)


def launch_subprocess(command: list[str], log_path: str) -> int:
  """Runs the command with its output appended to `log_path`; returns the exit status."""
  with open(log_path, "a") as log:
    log.write(f"$ {shell_line(command)}\n")
    log.flush()
    return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          check=False).returncode


def _tail(path: str, lines: int = ERROR_TAIL_LINES) -> str:
  if not os.path.isfile(path):
    return ""
  with open(path, errors="replace") as f:
    return "".join(f.readlines()[-lines:]).strip()


def run_trial(trial: Trial, workdir: str, command: list[str], launch: Callable = launch_subprocess) -> dict:
  """Runs (or resumes) one trial; records it in trial.json; returns its runs.run_status."""
  run_dir = os.path.join(workdir, trial.name)
  os.makedirs(run_dir, exist_ok=True)
  record = runs.read_trial(run_dir)
  start = time.time()
  try:
    returncode = launch(command, os.path.join(run_dir, "train.log"))
  except OSError as err:  # the command could not start at all
    returncode, tail = -1, f"{type(err).__name__}: {err}"
  else:
    tail = _tail(os.path.join(run_dir, "train.log")) if returncode else ""
  record = {"name": trial.name, "config": trial.config, "overrides": trial.overrides, "axes": trial.axes,
            "command": shell_line(command), "returncode": returncode,
            "wall_s": record.get("wall_s", 0.0) + time.time() - start,
            "attempts": record.get("attempts", 0) + 1, "error": tail}
  runs.write_json(os.path.join(run_dir, runs.TRIAL), record)
  return runs.run_status(run_dir)


def run_trials(trials: list[Trial], workdir: str, *, command_for: Callable[[Trial], list[str]],
               launch: Callable = launch_subprocess, parallel: int = 1, log: Callable = print) -> list[dict]:
  """Runs every trial that has not finished, `parallel` at a time; a failed one does not stop the rest.

  Returns one runs.run_status per trial, in the trials' order.
  """
  if parallel < 1:
    raise ValueError(f"parallel must be at least 1, got {parallel}.")
  os.makedirs(workdir, exist_ok=True)
  states = {t.name: runs.run_status(os.path.join(workdir, t.name)) for t in trials}
  todo = [t for t in trials if states[t.name]["status"] != "finished"]
  done = len(trials) - len(todo)
  if done:
    log(f"{done} of {len(trials)} trials already finished; skipping them.")
  for t in todo:
    if states[t.name]["status"] in ("interrupted", "failed"):
      log(f"{t.name}: {states[t.name]['status']} at step {states[t.name]['steps']}; running it again "
          "(train.py resumes from its last checkpoint).")
  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    futures = {pool.submit(run_trial, t, workdir, command_for(t), launch): t for t in todo}
    for future in concurrent.futures.as_completed(futures):
      t = futures[future]
      s = states[t.name] = future.result()
      done += 1
      line = f"[{done}/{len(trials)}] {t.name}: {s['status']}"
      if s["wall_s"] is not None:
        line += f" in {s['wall_s']:.0f} s"
      if s["best_eval_loss"] is not None:
        line += f", best validation loss {s['best_eval_loss']:.4f}"
      if s["status"] == "failed":
        line += f": {s['error']}"
      log(line)
  return [states[t.name] for t in trials]
