"""Tables of runs: one row per run folder, as CSV and markdown (a sweep's report, the README's results).

A row is a run's axis values, then what runs.run_status reads from its folder: for a sweep,
one row per run folder of its Optuna study (`study_rows`), its status the trial's state; for
scripts/results.py, one per sweep.Trial (`result_rows`). The figure of a sweep is
plots.plot_sweep(rows, axes, out), drawn by the scripts.
"""

import csv
import io
import math
import os
from typing import Optional

from jaxformer import runs

NUMBERS = ("status", "steps", "total_steps", "best_eval_loss", "best_eval_bpb", "final_eval_loss", "excess",
           "tokens_per_sec", "wall_s", "num_params")


def result_rows(trials, workdir: str) -> list[dict]:
  """One flat dict per trial (a sweep.Trial: name, axes, overrides): name, axis values, then the numbers."""
  rows = []
  for t in trials:
    s = runs.run_status(os.path.join(workdir, t.name))
    row = {"trial": t.name, **t.axes, **{k: s[k] for k in NUMBERS}}
    if row["total_steps"] is None:  # not started: the sweep knows its budget when it sets one
      row["total_steps"] = t.overrides.get("train.steps")
    row["error"] = s["error"]
    rows.append(row)
  return rows


# Optuna's trial states as the table says them.
STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}
DONE = ("finished", "complete")  # a run folder's word, a trial's word: rows that can win
BEST_CONFIG = "best_config.json"


def study_rows(trials, workdir: str) -> list[dict]:
  """One row per run folder of a study's trials (Optuna FrozenTrials), in trial order.

  A trial failed with its worker and retried, or one that drew values already trained, shares
  its folder with another: the folder's row is the latest such trial that was not retried.
  """
  retried = {k for t in trials for k in t.system_attrs.get("retry_history", [])}
  rows = {}
  for t in trials:
    name = t.user_attrs.get("name")
    if name is None or t.number in retried:
      continue
    s = runs.run_status(os.path.join(workdir, name))
    status = STATES.get(t.state.name, t.state.name.lower())
    retries = len(t.system_attrs.get("retry_history", []))
    row = {"trial": name, "number": t.number, **t.user_attrs.get("values", {}), **{k: s[k] for k in NUMBERS}}
    row["status"] = status + (f" (retry {retries})" if retries else "")
    row["error"] = (t.user_attrs.get("error") or s["error"]) if status == "failed" else ""
    rows[name] = row
  return list(rows.values())


def best_row(rows: list[dict]) -> Optional[dict]:
  """The finished row with the lowest best validation loss."""
  done = [r for r in rows if r["status"].split()[0] in DONE and r["best_eval_loss"] is not None]
  return min(done, key=lambda r: r["best_eval_loss"]) if done else None


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


def format_count(n: Optional[int]) -> str:
  if n is None:
    return "–"
  return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def sweep_markdown(rows: list[dict], axes: list[str], title: str = "", mark_best: bool = True) -> str:
  """The results table: the best finished trial's best loss in bold, failed trials' errors below."""
  names = runs.short_keys(axes)
  show_excess = any(r["excess"] is not None for r in rows)
  header = [names[a] for a in axes] + ["best val loss", "best val bpb", "final val loss"] + (
      ["excess"] if show_excess else []) + ["steps", "tokens/s", "wall", "status"]
  winner = best_row(rows) if mark_best else None
  body = []
  for r in rows:
    best = _fmt(r["best_eval_loss"])
    body.append([runs.format_value(r[a]) for a in axes]
                + [f"**{best}**" if r is winner else best, _fmt(r["best_eval_bpb"]), _fmt(r["final_eval_loss"])]
                + ([_fmt(r["excess"])] if show_excess else [])
                + [f"{r['steps']}/{r['total_steps'] or '?'}",
                   _fmt(round(r["tokens_per_sec"])) if r["tokens_per_sec"] else "–",
                   format_duration(r["wall_s"]), r["status"]])
  text = (f"## {title}\n\n" if title else "") + markdown_table(header, body)
  failed = [r for r in rows if r["status"].startswith("failed")]
  if failed:
    text += "\nFailed trials (full output in `<trial>/train.log`):\n\n"
    text += "".join(f"- `{r['trial']}`: {r['error'] or 'no output'}\n" for r in failed)
  return text


def results_table(rows: list[dict], axes: list[str], note: str = "") -> str:
  """The README's results: `sweep_markdown` with each run's parameter count; `note` says how it was measured."""
  rows = [dict(r, params=format_count(r["num_params"])) for r in rows]
  # Losses on different corpora (and tokenizers) are not comparable: no winner in bold.
  return (note + "\n\n" if note else "") + sweep_markdown(rows, axes + ["params"], mark_best=False)


def write_csv(rows: list[dict], path: str) -> None:
  columns = list(dict.fromkeys(k for r in rows for k in r))
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=columns)
  writer.writeheader()
  for r in rows:
    writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
  runs.atomic_write(path, text.getvalue())


def write_report(rows: list[dict], axes: list[str], workdir: str, title: str = "") -> dict:
  """results.csv, results.md and best_config.json (the best run's whole config) in `workdir`.

  Returns their paths {"csv": ..., "md": ..., "best": ...}; no "best" before a run finishes.
  """
  paths = {"csv": os.path.join(workdir, "results.csv"), "md": os.path.join(workdir, "results.md")}
  write_csv(rows, paths["csv"])
  text, best = sweep_markdown(rows, axes, title), best_row(rows)
  if best is not None:
    run_dir = os.path.join(workdir, best["trial"])
    paths["best"] = os.path.join(workdir, BEST_CONFIG)
    runs.atomic_write(paths["best"], runs.path(runs.join(run_dir, runs.CONFIG)).read_text())
    text += (f"\nBest: `{best['trial']}`, validation loss {best['best_eval_loss']:.4f}; its whole config is "
             f"`{BEST_CONFIG}`. Train it again: `python scripts/train.py --config=configs/from_run.py:{run_dir} "
             "--workdir=DIR`.\n")
  runs.atomic_write(paths["md"], text)
  return paths
