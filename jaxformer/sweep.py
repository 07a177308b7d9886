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
and `trial.json` (command, exit status, wall time, error tail).
"""

import concurrent.futures
import csv
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import ml_collections
import numpy as np

from jaxformer import config as config_lib
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


def set_field(config: ml_collections.ConfigDict, key: str, value, what: str = "sweep axis") -> None:
  """config[key] = value for a dotted key, or a ConfigError that names the fields there are."""
  parts, node = key.split("."), config
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(parts[:i]) or "the config"
      fields = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "no fields"
      fix = "fix the name in the sweep file" if what.startswith("sweep") else "fix the name"
      raise ConfigError(f"{what} {key!r} names no config field ({where} has {fields}); {fix}.")
    if i < len(parts) - 1:
      node = node[part]
  if isinstance(node[parts[-1]], ml_collections.ConfigDict):
    raise ConfigError(f"{what} {key!r} is a section, not a field; name one of its fields.")
  try:
    node[parts[-1]] = value
  except (TypeError, ValueError) as err:
    raise ConfigError(f"{what} {key!r}: the value {value!r} does not fit the field ({err}).") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict, what: str = "override"):
  """An unlocked copy of `config` with the dotted `overrides` set."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    set_field(config, key, value, what)
  return config


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


def format_value(value) -> str:
  """A value as it appears in a trial's name."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return f"{value:g}"
  return re.sub(r"[\s/\\,=]+", "_", str(value))


def flag_value(value) -> str:
  """A value as train.py's --config.KEY=VALUE flag parses it back exactly."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)
  return str(value)


def short_keys(keys) -> dict:
  """Each dotted key's last part, unless two axes share it (then the whole key)."""
  last = [k.rsplit(".", 1)[-1] for k in keys]
  return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def trial_name(axes: dict) -> str:
  names = short_keys(list(axes))
  return ",".join(f"{names[k]}={format_value(v)}" for k, v in axes.items())


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
  base_fixed = apply_overrides(base, fixed, "sweep override")
  for combo in combos:
    name = trial_name(combo)
    if name in names:  # a random draw repeated (small choice lists): one run is enough
      continue
    names.add(name)
    config = apply_overrides(base_fixed, combo, "sweep axis")
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


def read_trial_record(run_dir: str) -> dict:
  path = os.path.join(run_dir, "trial.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, obj) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(path + ".tmp", path)


def run_trial(trial: Trial, workdir: str, command: list[str], launch: Callable = launch_subprocess) -> dict:
  """Runs (or resumes) one trial; records it in trial.json; returns its summary."""
  run_dir = os.path.join(workdir, trial.name)
  os.makedirs(run_dir, exist_ok=True)
  record = read_trial_record(run_dir)
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
  _write_json(os.path.join(run_dir, "trial.json"), record)
  return run_summary(run_dir)


def run_trials(trials: list[Trial], workdir: str, *, command_for: Callable[[Trial], list[str]],
               launch: Callable = launch_subprocess, parallel: int = 1, log: Callable = print) -> list[dict]:
  """Runs every trial that has not finished, `parallel` at a time; a failed one does not stop the rest.

  Returns one summary per trial, in the trials' order.
  """
  if parallel < 1:
    raise ValueError(f"parallel must be at least 1, got {parallel}.")
  os.makedirs(workdir, exist_ok=True)
  summaries = {t.name: run_summary(os.path.join(workdir, t.name)) for t in trials}
  todo = [t for t in trials if summaries[t.name]["status"] != "finished"]
  done = len(trials) - len(todo)
  if done:
    log(f"{done} of {len(trials)} trials already finished; skipping them.")
  for t in todo:
    if summaries[t.name]["status"] in ("interrupted", "failed"):
      log(f"{t.name}: {summaries[t.name]['status']} at step {summaries[t.name]['steps']}; running it again "
          "(train.py resumes from its last checkpoint).")
  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    futures = {pool.submit(run_trial, t, workdir, command_for(t), launch): t for t in todo}
    for future in concurrent.futures.as_completed(futures):
      t = futures[future]
      s = summaries[t.name] = future.result()
      done += 1
      line = f"[{done}/{len(trials)}] {t.name}: {s['status']}"
      if s["wall_s"] is not None:
        line += f" in {s['wall_s']:.0f} s"
      if s["best_eval_loss"] is not None:
        line += f", best validation loss {s['best_eval_loss']:.4f}"
      if s["status"] == "failed":
        line += f": {last_line(s['error'])}"
      log(line)
  return [summaries[t.name] for t in trials]


def last_line(text: str) -> str:
  lines = [l for l in (text or "").splitlines() if l.strip()]
  return lines[-1].strip() if lines else ""


# ---------------------------------------------------------------------------- reading run folders


def read_metrics(run_dir: str) -> list[dict]:
  """metrics.jsonl, one merged row per step; a step logged again after a resume keeps its last values."""
  path = os.path.join(run_dir, "metrics.jsonl")
  rows = {}
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          try:
            row = json.loads(line)
          except json.JSONDecodeError:  # a line cut short by a kill
            continue
          rows.setdefault(row["step"], {}).update(row)
  return [rows[s] for s in sorted(rows)]


def read_config(run_dir: str) -> Optional[dict]:
  path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def tokens_per_step(config: dict) -> int:
  t = config["train"]
  return int(t["batch_size"]) * int(t.get("grad_accum", 1)) * int(t["seq_len"])


def _early_stopped(evals: list[float], patience: int) -> bool:
  """The trainer's rule replayed: `patience` evaluations in a row without a new best."""
  best, since = math.inf, 0
  for loss in evals:
    best, since = (loss, 0) if loss < best else (best, since + 1)
  return patience > 0 and since >= patience


def run_summary(run_dir: str) -> dict:
  """What a run folder says about its run, from config.json, metrics.jsonl and trial.json.

  status: finished (reached train.steps, or stopped early, with its final checkpoint),
  failed (its last process exited non-zero), interrupted (some progress), pending (none).
  """
  config = read_config(run_dir)
  rows = read_metrics(run_dir)
  record = read_trial_record(run_dir)
  evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
  tps = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r]
  last_step = rows[-1]["step"] if rows else 0
  total = int(config["train"]["steps"]) if config else None
  floor = next((r["eval/entropy_floor"] for r in reversed(rows) if "eval/entropy_floor" in r), None)
  best = min(evals, key=lambda e: e[1]) if evals else None
  final = evals[-1][1] if evals else None

  status = "pending"
  if config and rows:
    saved = os.path.isdir(os.path.join(run_dir, "checkpoints", str(last_step)))
    patience = int(config["train"].get("early_stopping_patience", 0))
    stopped_early = bool(evals) and evals[-1][0] == last_step and _early_stopped([e[1] for e in evals], patience)
    status = "finished" if saved and (last_step >= total or stopped_early) else "interrupted"
  if status != "finished" and record.get("returncode", 0) != 0:
    status = "failed"
  per_step = tokens_per_step(config) if config else None
  return {
      "run_dir": run_dir, "status": status, "steps": last_step, "total_steps": total,
      "best_eval_loss": best[1] if best else None, "best_step": best[0] if best else None,
      "final_eval_loss": final, "entropy_floor": floor,
      "excess": final - floor if final is not None and floor is not None else None,
      "tokens_per_sec": statistics.median(tps) if tps else None,
      "tokens": last_step * per_step if per_step else None,
      "wall_s": record.get("wall_s"), "error": record.get("error", "") if status == "failed" else "",
  }


# ---------------------------------------------------------------------------- the report


def _fmt(value, digits: int = 4) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "–"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return str(value)


def format_duration(seconds: Optional[float]) -> str:
  if seconds is None:
    return "–"
  m, s = divmod(int(round(seconds)), 60)
  return f"{m}m {s:02d}s" if m else f"{s}s"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def result_rows(trials: list[Trial], summaries: list[dict]) -> list[dict]:
  """One flat dict per trial: name, axis values, then the numbers (the CSV's rows)."""
  rows = []
  for t, s in zip(trials, summaries):
    row = {"trial": t.name, **t.axes}
    row.update({k: s[k] for k in ("status", "steps", "total_steps", "best_eval_loss", "final_eval_loss",
                                  "excess", "tokens_per_sec", "wall_s")})
    if row["total_steps"] is None:  # not started: the sweep knows its budget when it sets one
      row["total_steps"] = t.overrides.get("train.steps")
    row["error"] = last_line(s["error"])
    rows.append(row)
  return rows


def sweep_markdown(rows: list[dict], axes: list[str], title: str = "", mark_best: bool = True) -> str:
  """The results table: the best finished trial's best loss in bold, failed trials' errors below."""
  names = short_keys(axes)
  show_excess = any(r["excess"] is not None for r in rows)
  header = [names[a] for a in axes] + ["best val loss", "final val loss"] + (
      ["excess"] if show_excess else []) + ["steps", "tokens/s", "wall", "status"]
  finished = [r for r in rows if r["status"] == "finished" and r["best_eval_loss"] is not None]
  winner = min(finished, key=lambda r: r["best_eval_loss"]) if finished and mark_best else None
  body = []
  for r in rows:
    best = _fmt(r["best_eval_loss"])
    body.append([format_value(r[a]) for a in axes]
                + [f"**{best}**" if r is winner else best, _fmt(r["final_eval_loss"])]
                + ([_fmt(r["excess"])] if show_excess else [])
                + [f"{r['steps']}/{r['total_steps'] or '?'}",
                   _fmt(round(r["tokens_per_sec"])) if r["tokens_per_sec"] else "–",
                   format_duration(r["wall_s"]), r["status"]])
  text = (f"## {title}\n\n" if title else "") + markdown_table(header, body)
  failed = [r for r in rows if r["status"] == "failed"]
  if failed:
    text += "\nFailed trials (full output in `<trial>/train.log`):\n\n"
    text += "".join(f"- `{r['trial']}`: {r['error'] or 'no output'}\n" for r in failed)
  return text


def write_csv(rows: list[dict], path: str) -> None:
  columns = list(dict.fromkeys(k for r in rows for k in r))
  with open(path + ".tmp", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
  os.replace(path + ".tmp", path)


def report(trials: list[Trial], workdir: str, title: str = "", log: Callable = print) -> dict:
  """Writes results.csv, results.md and (with matplotlib) results.png in `workdir`; returns their paths."""
  summaries = [run_summary(os.path.join(workdir, t.name)) for t in trials]
  rows = result_rows(trials, summaries)
  axes = list(trials[0].axes) if trials else []
  paths = {"csv": os.path.join(workdir, "results.csv"), "md": os.path.join(workdir, "results.md")}
  os.makedirs(workdir, exist_ok=True)
  write_csv(rows, paths["csv"])
  with open(paths["md"], "w") as f:
    f.write(sweep_markdown(rows, axes, title))
  try:
    from jaxformer import plots  # pylint: disable=g-import-not-at-top
    paths["png"] = plots.plot_sweep(rows, axes, os.path.join(workdir, "results.png"))
  except ImportError:
    log("matplotlib is not installed (pip install 'jaxformer[plot]'); no results.png.")
  return paths


def format_count(n: Optional[int]) -> str:
  if n is None:
    return "–"
  return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def num_params(run_dir: str) -> Optional[int]:
  """The model's parameter count from config.json (no checkpoint read)."""
  config = read_config(run_dir)
  if config is None or not config["model"].get("vocab_size"):
    return None
  from jaxformer import model as model_lib  # pylint: disable=g-import-not-at-top
  return model_lib.num_params(model_lib.model_config(config_lib.load_config_json(
      os.path.join(run_dir, "config.json")).model))


def results_table(trials: list[Trial], workdir: str, note: str = "") -> str:
  """The README's results: one row per run with its parameter count; `note` says how it was measured."""
  summaries = [run_summary(os.path.join(workdir, t.name)) for t in trials]
  rows = result_rows(trials, summaries)
  for row, t in zip(rows, trials):
    row["params"] = format_count(num_params(os.path.join(workdir, t.name)))
  axes = (list(trials[0].axes) if trials else []) + ["params"]
  # Losses on different corpora (and tokenizers) are not comparable: no winner in bold.
  return (note + "\n\n" if note else "") + sweep_markdown(rows, axes, mark_best=False)
