"""Run folders: atomic writes, metrics after a resume, status from summary.json."""

import json
import math
import os
import subprocess
import sys

import pytest

from jaxformer import config as config_lib
from jaxformer import runs
from jaxformer import tokenizer as tokenizer_lib
from jaxformer.config import ConfigError

NUM_PARAMS = 826_432


def fake_run(run_dir, *, steps, total, evals=None, train_every=1, floor=None, tps=1000.0, repeat_from=None,
             status="finished", wall_s=12.5):
  """A run folder as train.py leaves it, without training: config.json, metrics.jsonl and (unless
  status is None) summary.json with that status. B=4, T=8: 32 tokens per step."""
  c = config_lib.base_config()
  c.model.vocab_size = 64
  c.train.update(dict(steps=total, batch_size=4, seq_len=8))
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "config.json"), "w") as f:
    f.write(c.to_json_best_effort())
  evals = evals or {}
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    for s in list(range(1, steps + 1)) + list(range(repeat_from or steps + 1, steps + 1)):
      if s % train_every == 0:
        f.write(json.dumps({"step": s, "train/loss": 5.0 - 0.01 * s, "lr": 1e-3, "tokens_per_sec": tps}) + "\n")
      if s in evals:
        row = {"step": s, "eval/loss": evals[s], "eval/bpb": evals[s] / math.log(2)}  # 1 byte per token
        if floor is not None:
          row.update({"eval/entropy_floor": floor, "eval/excess": evals[s] - floor})
        f.write(json.dumps(row) + "\n")
  if status is not None:
    best = min(evals.items(), key=lambda e: e[1]) if evals else (None, None)
    write_summary(run_dir, status=status, step=steps, steps=total, eval_loss=evals[max(evals)] if evals else None,
                  best_eval_loss=best[1], best_step=best[0], entropy_floor=floor, wall_s=wall_s,
                  best_eval_bpb=best[1] / math.log(2) if evals else None,
                  tokens_per_sec=0.9 * tps, tokens=steps * 32)


def write_summary(run_dir, **fields):
  """summary.json in the trainer's format; `fields` replace the defaults."""
  summary = {"status": "finished", "stop_reason": "reached train.steps", "step": 600, "steps": 600,
             "start_step": 0, "train_loss": 0.71, "eval_loss": 0.72, "best_eval_loss": 0.72, "best_step": 600,
             "entropy_floor": None, "wall_s": 70.3, "tokens_per_sec": 21000.0, "num_params": NUM_PARAMS,
             "tokens": 4915200}
  summary.update(fields)
  runs.write_json(os.path.join(run_dir, "summary.json"), summary)


# ---------------------------------------------------------------------------- writing


def test_atomic_write_replaces_whole_files_and_leaves_no_temp_file(tmp_path):
  path = str(tmp_path / "sub" / "summary.json")
  runs.atomic_write(path, "first")  # the folder is made
  runs.atomic_write(path, "zweite Fassung ✓")
  with open(path, encoding="utf-8") as f:
    assert f.read() == "zweite Fassung ✓"
  runs.atomic_write(path, b"\x00\x01bytes")
  with open(path, "rb") as f:
    assert f.read() == b"\x00\x01bytes"
  assert os.listdir(tmp_path / "sub") == ["summary.json"]
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # like open(path, "w"), not mkstemp's 0600
  runs.write_json(path, {"step": 3, "loss": 1.5})
  assert runs.read_summary(str(tmp_path / "sub")) == {"step": 3, "loss": 1.5}


def test_atomic_write_never_shows_a_half_written_target(tmp_path, monkeypatch):
  path = str(tmp_path / "config.json")
  runs.atomic_write(path, "old contents")
  seen = []

  def crash(fd):  # the new data is written, not yet renamed: the process dies here
    with open(path) as f:
      seen.append(f.read())
    raise OSError("disk gone")

  monkeypatch.setattr(os, "fsync", crash)
  with pytest.raises(OSError, match="disk gone"):
    runs.atomic_write(path, "new contents " * 1000)
  assert seen == ["old contents"]  # mid-write, readers see the old file whole
  with open(path) as f:
    assert f.read() == "old contents"
  assert os.listdir(tmp_path) == ["config.json"]  # the temporary file is gone


# ---------------------------------------------------------------------------- reading


def test_read_metrics_merges_a_resumed_runs_steps_and_skips_a_cut_line(tmp_path):
  lines = [{"step": 1, "train/loss": 4.0}, {"step": 2, "train/loss": 3.5}, {"step": 2, "eval/loss": 3.6},
           {"step": 3, "train/loss": 3.25},
           # Killed after step 3, resumed from the checkpoint at step 2: step 3 again, new numbers.
           {"step": 3, "train/loss": 3.2}, {"step": 4, "train/loss": 3.0}]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write("".join(json.dumps(l) + "\n" for l in lines) + '{"step": 5, "train/lo')  # a kill mid-line
  assert runs.read_metrics(str(tmp_path)) == [
      {"step": 1, "train/loss": 4.0}, {"step": 2, "train/loss": 3.5, "eval/loss": 3.6},
      {"step": 3, "train/loss": 3.2}, {"step": 4, "train/loss": 3.0}]
  assert runs.read_metrics(str(tmp_path / "none")) == []


def test_read_config_and_tokenizer(tmp_path):
  assert runs.read_config(str(tmp_path)) is None and runs.read_summary(str(tmp_path)) is None
  fake_run(str(tmp_path), steps=2, total=7)
  config = runs.read_config(str(tmp_path))
  assert (config.train.steps, config.model.vocab_size, runs.tokens_per_step(config)) == (7, 64, 32)
  with open(tmp_path / "config.json") as f:
    values = json.load(f)
  values["train"]["stepz"] = 3
  with open(tmp_path / "config.json", "w") as f:
    json.dump(values, f)
  with pytest.raises(ConfigError, match="fields this version does not know: train.stepz"):
    runs.read_config(str(tmp_path))

  with pytest.raises(FileNotFoundError):
    runs.read_tokenizer(str(tmp_path))
  tok = tokenizer_lib.train_char(["abc cab"])
  runs.atomic_write(runs.tokenizer_path(str(tmp_path)), tok.to_str())
  back = runs.read_tokenizer(str(tmp_path))
  assert back.encode("cab a").ids == tok.encode("cab a").ids and len(back.get_vocab()) == 6  # a b c ' ' EOT UNK


# ---------------------------------------------------------------------------- status


def test_finished_and_early_stopped_runs_take_their_numbers_from_the_summary(tmp_path):
  d = str(tmp_path / "r")
  # Steps 5..6 logged twice (a resume from step 4); evaluations at 2, 4, 6.
  fake_run(d, steps=6, total=10, evals={2: 2.0, 4: 2.5, 6: 2.1}, floor=0.5, repeat_from=5, tps=2000.0,
           status="early_stopped")
  s = runs.run_status(d)
  assert s["status"] == "finished"
  assert (s["best_eval_loss"], s["best_step"], s["final_eval_loss"], s["steps"], s["total_steps"]) == (
      2.0, 2, 2.1, 6, 10)
  assert s["excess"] == pytest.approx(1.6) and s["tokens"] == 6 * 32 and s["num_params"] == NUM_PARAMS
  assert s["tokens_per_sec"] == 2000.0  # the median of the logged windows, not the summary's 1800
  assert s["wall_s"] == 12.5 and s["error"] == ""
  # The summary is the run's word even where metrics.jsonl says otherwise (its final numbers win).
  write_summary(d, status="finished", step=10, steps=10, best_eval_loss=1.25, best_step=10, eval_loss=1.25,
                entropy_floor=0.5)
  s = runs.run_status(d)
  assert (s["status"], s["steps"], s["best_eval_loss"], s["final_eval_loss"], s["excess"]) == (
      "finished", 10, 1.25, 1.25, 0.75)


@pytest.mark.parametrize("said, status", [("stopped", "interrupted"), ("running", "interrupted"),
                                          (None, "interrupted"), ("failed", "failed")])
def test_runs_that_did_not_finish(tmp_path, said, status):
  d = str(tmp_path / "r")
  fake_run(d, steps=6, total=10, evals={2: 2.0, 4: 1.5}, status=said)
  if said == "running":  # written at the start of the process that died, before any evaluation
    write_summary(d, status="running", step=0, steps=10, eval_loss=None, best_eval_loss=None, best_step=None,
                  wall_s=None)
  if said == "failed":
    write_summary(d, status="failed", stop_reason="TrainingError: non-finite loss at step 6", step=6, steps=10,
                  eval_loss=1.5, best_eval_loss=1.5, best_step=4)
  s = runs.run_status(d)
  assert s["status"] == status
  # What metrics.jsonl logged stands where no final summary says more.
  assert (s["steps"], s["total_steps"], s["best_eval_loss"], s["best_step"], s["final_eval_loss"]) == (
      6, 10, 1.5, 4, 1.5)
  assert s["error"] == ("TrainingError: non-finite loss at step 6" if said == "failed" else "")


def test_pending_and_failed_trials(tmp_path):
  s = runs.run_status(str(tmp_path / "none"))
  assert (s["status"], s["steps"], s["total_steps"], s["best_eval_loss"], s["wall_s"]) == (
      "pending", 0, None, None, None)
  # A trial whose process exited non-zero before writing anything, and one that got as far as step 4.
  for name, steps in (("crashed", 0), ("late", 4)):
    d = str(tmp_path / name)
    if steps:
      fake_run(d, steps=steps, total=10, evals={2: 2.0}, status="running")
    runs.write_json(os.path.join(d, "trial.json"), {"returncode": 1, "wall_s": 3.0,
                                                    "error": "Traceback ...\n  ...\nValueError: bad thing\n\n"})
    s = runs.run_status(d)
    assert (s["status"], s["steps"], s["error"], s["wall_s"]) == ("failed", steps, "ValueError: bad thing", 3.0)
  # A run stopped by a signal is interrupted whatever its exit status; a finished one stays finished.
  write_summary(d, status="stopped", step=4, steps=10)
  assert runs.run_status(d)["status"] == "interrupted"
  write_summary(d, status="finished", step=10, steps=10)
  assert runs.run_status(d)["status"] == "finished"
