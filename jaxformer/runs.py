"""A run folder, read and written: the one module that knows its files.

  config.json     the whole config, model.vocab_size filled in
  metrics.jsonl   one JSON object per logged step or evaluation, appended (a resume logs steps again)
  summary.json    status and final numbers, rewritten by the trainer at every stop
  tokenizer.json  the run's tokenizer
  train.lock      held by the training process writing the folder (its host and pid)
  errors.log      the full detail (tracebacks, Orbax's log) of errors shown as one line
  trial.json      sweeps only: command, exit status, attempts, wall time, error tail
  checkpoints/, best/   Orbax (checkpoint.py)

Every path goes through `etils.epath` (as Orbax's own do), so a run folder may be
local or in a bucket (`gs://BUCKET/run`). Every whole-file write goes through
`atomic_write`: a reader, or a crash, never sees half a file.
"""

import json
import os
import re
import secrets
import socket
import time
import statistics
from typing import Optional

import ml_collections
from etils import epath

from jaxformer import config as config_lib
from jaxformer import tokenizer as tokenizer_lib

CONFIG, METRICS, SUMMARY, TOKENIZER, TRIAL, LOCK, LOG = (
    "config.json", "metrics.jsonl", "summary.json", "tokenizer.json", "trial.json", "train.lock", "errors.log")
# summary.json statuses of a run that is done: a sweep started again skips it.
DONE = ("finished", "early_stopped")


# ---------------------------------------------------------------------------- writing


def is_remote(path) -> bool:
  return "://" in str(path)


def path(p) -> epath.Path:
  """A local path (made absolute) or a bucket URL, as one epath.Path."""
  return epath.Path(p) if is_remote(p) else epath.Path(os.path.abspath(p))


def join(run_dir, *names) -> str:
  return str(epath.Path(run_dir).joinpath(*names)) if is_remote(run_dir) else os.path.join(run_dir, *names)


def exists(p) -> bool:
  return path(p).exists()


def atomic_write(p, data: str | bytes) -> None:
  """Writes `data` (text as UTF-8) to `p` whole: locally through a temporary file and os.replace.

  An object store's upload appears whole or not at all, so remote paths are written directly.
  """
  data = data.encode("utf-8") if isinstance(data, str) else data
  if is_remote(p):
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return
  directory = os.path.dirname(os.path.abspath(p))
  os.makedirs(directory, exist_ok=True)
  # The same folder keeps the rename on one file system, where it is atomic; "x" never opens another's file.
  tmp = os.path.join(directory, f".{os.path.basename(p)}.{secrets.token_hex(4)}.tmp")
  f = open(tmp, "xb")
  try:
    with f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())  # the data is on disk before the name points at it
    os.replace(tmp, p)
  except BaseException:
    os.remove(tmp)
    raise


def write_json(path: str, obj) -> None:
  atomic_write(path, json.dumps(obj, indent=2) + "\n")


class RunFolderError(RuntimeError):
  """The run folder cannot be used now; the message says why and what to do."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def acquire_lock(run_dir: str, log=print) -> str:
  """Takes run_dir/train.lock for this process; a second writer is refused with one sentence.

  A lock whose holder was on this host and is gone (killed, crashed) is stale and taken
  over. One from another host cannot be checked from here: the message says how to free it.
  """
  p, host, pid = join(run_dir, LOCK), socket.gethostname(), os.getpid()
  mine = json.dumps({"host": host, "pid": pid, "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n"
  for _ in range(2):
    if not is_remote(p):
      os.makedirs(run_dir, exist_ok=True)
      try:
        fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # atomic: one of two racers wins
      except FileExistsError:
        pass
      else:
        with os.fdopen(fd, "w") as f:
          f.write(mine)
        return p
    elif not exists(p):
      atomic_write(p, mine)
      return p
    try:
      holder = json.loads(path(p).read_text())
    except (OSError, ValueError):
      holder = {}
    if holder.get("host") == host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
      log(f"warning: {p} was left by process {holder['pid']}, which is gone; taking it over.")
      path(p).unlink(missing_ok=True)
      continue
    who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
    raise RunFolderError(
        f"{run_dir} is being trained by {who} ({p}); wait for it to finish or stop it, or use another "
        f"--workdir (if that process is gone, delete {p}).")
  raise RunFolderError(f"could not take {p}; delete it if no training is running there.")


def release_lock(lock_path: str) -> None:
  try:
    held = json.loads(path(lock_path).read_text())
  except (OSError, ValueError):
    return
  if held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
    path(lock_path).unlink(missing_ok=True)


# ---------------------------------------------------------------------------- reading


def _read_json(p: str) -> Optional[dict]:
  p = path(p)
  return json.loads(p.read_text()) if p.is_file() else None


def read_config(run_dir: str) -> Optional[ml_collections.ConfigDict]:
  """config.json as a ConfigDict over today's defaults; None when there is none (ConfigError when unreadable)."""
  p = join(run_dir, CONFIG)
  return config_lib.load_config_json(p) if exists(p) else None


def read_metrics(run_dir: str) -> list[dict]:
  """metrics.jsonl, one merged row per step; a step logged again after a resume keeps its last values."""
  p = path(join(run_dir, METRICS))
  rows = {}
  if p.is_file():
    with p.open() as f:
      for line in f:
        if line.strip():
          try:
            row = json.loads(line)
          except json.JSONDecodeError:  # a line cut short by a kill
            continue
          rows.setdefault(row["step"], {}).update(row)
  return [rows[s] for s in sorted(rows)]


def read_summary(run_dir: str) -> Optional[dict]:
  """summary.json as the trainer wrote it; None before a run's first stop."""
  return _read_json(join(run_dir, SUMMARY))


def read_trial(run_dir: str) -> dict:
  """trial.json of a sweep's trial; {} for a run the sweep runner did not start."""
  return _read_json(join(run_dir, TRIAL)) or {}


def tokenizer_path(run_dir: str) -> str:
  return join(run_dir, TOKENIZER)


def read_tokenizer(run_dir: str):
  """The run's tokenizer; FileNotFoundError when the folder has none."""
  return tokenizer_lib.load_tokenizer(tokenizer_path(run_dir))


def tokens_per_step(config) -> int:
  """Tokens of one optimizer step: train.batch_size (the global B) x train.seq_len."""
  return int(config.train.batch_size) * int(config.train.seq_len)


def _last_line(text: str) -> str:
  lines = [l for l in (text or "").splitlines() if l.strip()]
  return lines[-1].strip() if lines else ""


def run_status(run_dir: str) -> dict:
  """A run folder's status and numbers, as the sweep runner and the results tables use them.

  status: finished (summary.json says finished or early_stopped), failed (summary.json
  says so, or the trial's last process exited non-zero), interrupted (stopped by a signal,
  died while running, or metrics without a summary: train.py resumes it), pending (nothing yet).
  The numbers are summary.json's; metrics.jsonl gives the median tokens/s, and the rest
  when no process lived to write a final summary. wall_s is trial.json's (every attempt,
  start-up included) where there is one.
  """
  summary = read_summary(run_dir) or {}
  rows = read_metrics(run_dir)
  trial = read_trial(run_dir)
  said = summary.get("status")
  if said in DONE:
    status = "finished"
  elif said == "failed":
    status = "failed"
  else:
    status = "interrupted" if summary or rows else "pending"
    # A stop by a signal is an interruption whatever the exit status; other non-zero exits are failures.
    if said != "stopped" and trial.get("returncode", 0) != 0:
      status = "failed"

  evals = [(r["step"], r["eval/loss"], r.get("eval/bpb")) for r in rows if "eval/loss" in r]
  best = min(evals, key=lambda e: e[1]) if evals else (None, None, None)
  logged = {"step": rows[-1]["step"] if rows else None, "best_eval_loss": best[1], "best_step": best[0],
            "best_eval_bpb": best[2],
            "eval_loss": evals[-1][1] if evals else None,
            "entropy_floor": next((r["eval/entropy_floor"] for r in reversed(rows) if "eval/entropy_floor" in r),
                                  None)}
  # A summary written at a stop is the run's last word; one left "running" is older than metrics.jsonl.
  first, second = (summary, logged) if said not in (None, "running") else (logged, summary)
  n = {k: first.get(k) if first.get(k) is not None else second.get(k) for k in logged}

  total = summary.get("steps")
  if total is None:
    config = read_config(run_dir)
    total = int(config.train.steps) if config else None
  tps = [r["tokens_per_sec"] for r in rows if r.get("tokens_per_sec")]
  final, floor = n["eval_loss"], n["entropy_floor"]
  error = (_last_line(trial.get("error", "")) or summary.get("stop_reason", "")) if status == "failed" else ""
  return {
      "run_dir": run_dir, "status": status, "stop_reason": summary.get("stop_reason"),
      "steps": n["step"] or 0, "total_steps": total,
      "best_eval_loss": n["best_eval_loss"], "best_eval_bpb": n["best_eval_bpb"], "best_step": n["best_step"],
      "final_eval_loss": final,
      "entropy_floor": floor, "excess": final - floor if final is not None and floor is not None else None,
      "tokens_per_sec": statistics.median(tps) if tps else summary.get("tokens_per_sec"),
      "tokens": summary.get("tokens"), "num_params": summary.get("num_params"),
      "wall_s": trial.get("wall_s", summary.get("wall_s")), "error": error,
  }


# ---------------------------------------------------------------------------- names


def format_value(value) -> str:
  """A value as it appears in a run folder's name (a sweep's trial) and in tables."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return f"{value:g}"
  return re.sub(r"[\s/\\,=]+", "_", str(value))


def short_keys(keys) -> dict:
  """Each dotted key's last part, unless two keys share it (then the whole key)."""
  last = [k.rsplit(".", 1)[-1] for k in keys]
  return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}
