"""Faults on purpose: corrupt checkpoints, refused resumes, a full disk, a read-only folder,
two writers, kill -9, broken run files (issue 14). Nothing is left stuck or silently wrong, and
every error is one line."""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxformer import checkpoint, config as config_lib, metrics as metrics_lib, runs, train
from test_scripts import MICRO, ROOT, script
from test_train import assert_trees_equal, final_params, losses, micro_config


def train_lines(workdir) -> list[int]:
  """The steps of metrics.jsonl's training lines, as written (duplicates kept)."""
  with open(os.path.join(workdir, runs.METRICS)) as f:
    return [r["step"] for r in map(json.loads, f) if "train/loss" in r]


def error_lines(stderr: str) -> list[str]:
  """stderr without the data preparation's progress bars (a fresh cache tokenizes first)."""
  return [line for line in stderr.strip().splitlines() if line.strip() and "examples/s]" not in line]


def snapshot(folder) -> dict:
  out = {}
  for p in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
    if os.path.isfile(p):
      with open(p, "rb") as f:
        out[os.path.relpath(p, folder)] = (f.read(), os.stat(p).st_mtime_ns)
  return out


# ---------------------------------------------------------------- corrupt newest checkpoint


def _truncate_arrays(step_dir):
  for f in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")):
    with open(f, "r+b") as fh:
      fh.truncate(10)


def _garbage(name):
  def corrupt(step_dir):
    paths = glob.glob(os.path.join(step_dir, "**", name), recursive=True)
    assert paths, name
    for p in paths:
      with open(p, "wb") as fh:
        fh.write(b"\x00garbage{")
  return corrupt


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
  """A run stopped at step 6 whose newest checkpoint (6) is also its best: the collision case."""
  tmp = tmp_path_factory.mktemp("faults")
  c = micro_config(tmp / "cache", steps=8, eval_every=2, checkpoint_every=2, keep_checkpoints=3)
  train.train_and_evaluate(c, str(tmp / "straight"), log=lambda *_: None)
  train.train_and_evaluate(c, str(tmp / "six"), log=lambda *_: None, stop_at=6)
  assert 6 in checkpoint.complete_steps(str(tmp / "six" / "best"))
  return c, tmp


@pytest.mark.parametrize("corrupt", [_truncate_arrays, _garbage("manifest.ocdbt"), _garbage("_METADATA")],
                         ids=["truncated arrays", "garbage manifest.ocdbt", "garbage _METADATA"])
def test_a_corrupt_newest_checkpoint_falls_back_and_the_run_finishes(six_steps, corrupt):
  c, tmp = six_steps
  workdir = tmp / f"run-{corrupt.__name__}-{len(os.listdir(tmp))}"
  shutil.copytree(tmp / "six", workdir)
  corrupt(str(workdir / "checkpoints" / "6"))
  messages = []
  summary = train.train_and_evaluate(c, str(workdir), log=messages.append)
  # Used to retrain to 6 and die on every restart: "Checkpoint for step 6 already exists" (best/6).
  assert summary["status"] == "finished" and summary["step"] == 8, messages
  assert any("resuming from step 4" in m for m in messages), messages
  assert any("removed best/ checkpoint(s) [6]" in m for m in messages), messages
  assert losses(workdir) == losses(tmp / "straight")
  assert_trees_equal(final_params(workdir), final_params(tmp / "straight"))
  # Steps 5 and 6 ran twice; metrics.jsonl keeps one line for each.
  assert train_lines(workdir) == list(range(1, 9))
  assert not os.path.exists(workdir / runs.LOCK)


def test_a_refused_resume_leaves_the_runs_config_alone(six_steps):
  c, tmp = six_steps
  workdir = tmp / "refused"
  shutil.copytree(tmp / "six", workdir)
  before = (workdir / runs.CONFIG).read_bytes()
  other = micro_config(tmp / "cache", steps=8)
  other.model.num_layers = 1
  with pytest.raises(checkpoint.CheckpointError, match="fits this config"):
    train.train_and_evaluate(other, str(workdir), log=lambda *_: None)
  # Used to be overwritten with num_layers=1: sample/evaluate then loaded half the model silently.
  assert (workdir / runs.CONFIG).read_bytes() == before
  assert not os.path.exists(workdir / runs.LOCK)
  assert checkpoint.load_run(str(workdir))[0].model.num_layers == 2


def test_after_a_failed_read_what_orbaxs_coroutines_print_goes_to_the_log(tmp_path):
  """A failed read leaves coroutines that print as they are collected, in any thread: a coroutine
  never started warns "was never awaited", one stopped mid-way may raise on closing. Once in a CI
  run the first reached the console (sample.py's one warning became three lines)."""
  log = tmp_path / "background.log"
  code = f"""
import gc, types
from jaxformer import checkpoint
checkpoint.quiet_background({str(log)!r})

@types.coroutine
def pause():
  yield

async def stopped():
  try:
    await pause()
  finally:
    raise RuntimeError("Event loop is closed")

async def never_started():
  pass

c = stopped(); c.send(None)
del c
never_started()
gc.collect()
print("done")
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert (out.returncode, out.stdout, out.stderr) == (0, "done\n", "")
  text = log.read_text()
  assert "Exception ignored in: <coroutine object stopped" in text and "RuntimeError: Event loop is closed" in text
  assert "coroutine 'never_started' was never awaited" in text


def test_sample_and_evaluate_skip_a_corrupt_newest_checkpoint_with_one_warning(six_steps):
  _, tmp = six_steps
  workdir = tmp / "read-corrupt"
  shutil.copytree(tmp / "six", workdir)
  _truncate_arrays(str(workdir / "checkpoints" / "6"))
  before = snapshot(workdir)
  for name, args in (("sample.py", ["--max_new_tokens=5", "--num_samples=1"]), ("evaluate.py", ["--checkpoint=latest"])):
    out = script(name, f"--workdir={workdir}", *args)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: checkpoint 6 ") and "using step 4" in lines[0], lines
  assert json.loads(out.stdout)["step"] == 4
  assert snapshot(workdir) == before  # readers never write


# ---------------------------------------------------------------- storage


def _mount(*args) -> bool:
  return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def _train_args(workdir, tmp, *extra):
  return [f"--workdir={workdir}", f"--config.data.cache_dir={tmp / 'cache'}", *MICRO,
          "--config.train.num_samples=0", *extra]


def test_a_full_disk_is_one_line_and_the_last_checkpoint_survives(tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  if not _mount("-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)):
    pytest.skip("mounting a small tmpfs needs root")  # a root CI machine runs it
  try:
    workdir = disk / "run"
    out = script("train.py", *_train_args(workdir, tmp_path, "--config.train.steps=200",
                                         "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=100"))
    lines = error_lines(out.stderr)
    # Used to be ~1,650 lines and 179 tracebacks from Orbax's threads and asyncio.
    assert out.returncode == 1 and len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith(f"error: could not write the run in {workdir} (disk full); the newest complete "
                               "checkpoint (step "), lines
    kept = checkpoint.complete_steps(str(workdir / "checkpoints"))
    assert f"(step {kept[-1]}) is kept" in lines[0] and kept[-1] >= 1
    detail = lines[0].rsplit("details: ", 1)[1].rstrip(").")
    assert "No space left on device" in open(detail).read()
    # Given room, the same command resumes from what was kept.
    shutil.copytree(workdir, tmp_path / "moved")
  finally:
    subprocess.run(["umount", "-l", str(disk)])
  out = script("train.py", *_train_args(tmp_path / "moved", tmp_path, f"--config.train.steps={kept[-1] + 2}"))
  assert out.returncode == 0 and f"resumed from step {kept[-1]}" in out.stdout, out.stderr[-2000:]


def test_a_read_only_run_folder_is_one_line_and_nothing_changes(tmp_path):
  workdir = tmp_path / "run"
  out = script("train.py", *_train_args(workdir, tmp_path, "--config.train.steps=2"))
  assert out.returncode == 0, out.stderr[-2000:]
  if not (_mount("--bind", str(workdir), str(workdir)) and _mount("-o", "remount,ro,bind", str(workdir))):
    pytest.skip("a read-only bind mount needs root")
  try:
    before = snapshot(workdir)
    out = script("train.py", *_train_args(workdir, tmp_path, "--config.train.steps=4"))
    lines = error_lines(out.stderr)
    assert out.returncode == 1 and len(lines) == 1, out.stderr[-3000:]
    assert "(read-only file system)" in lines[0] and "(step 2) is kept" in lines[0], lines
    assert snapshot(workdir) == before
  finally:
    subprocess.run(["umount", "-l", str(workdir)])


# ---------------------------------------------------------------- two writers, kill -9


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
  workdir = str(tmp_path / "run")
  held = runs.acquire_lock(workdir)
  with pytest.raises(runs.RunFolderError, match=f"being trained by process {os.getpid()} on "):
    runs.acquire_lock(workdir)
  out = script("train.py", *_train_args(workdir, tmp_path, "--config.train.steps=2"))
  assert out.returncode == 1 and len(error_lines(out.stderr)) == 1 and "is being trained by process" in out.stderr
  assert os.listdir(workdir) == [runs.LOCK]  # the refused writer wrote nothing
  runs.release_lock(held)
  assert not os.path.exists(held)
  # A holder on this host that is gone (kill -9) left a stale lock: taken over with a warning.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  with open(held, "w") as f:
    json.dump({"host": socket.gethostname(), "pid": dead.pid, "since": "then"}, f)
  messages = []
  runs.release_lock(runs.acquire_lock(workdir, log=messages.append))
  assert "which is gone; taking it over" in messages[0]


def test_kill_9_anywhere_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
  args = lambda w, *extra: _train_args(w, tmp_path, "--config.train.steps=9", "--config.train.checkpoint_every=1",
                                        "--config.train.eval_every=3", *extra)
  out = script("train.py", *args(tmp_path / "straight"))
  assert out.returncode == 0, out.stderr[-2000:]
  workdir = tmp_path / "killed"
  # Killed after the 2nd and 6th logged step: every step checkpoints, so kills land mid-save too.
  for lines in (2, 6):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "train.py"), *args(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(workdir / runs.METRICS) and len(train_lines(workdir)) >= lines:
        break
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  out = script("train.py", *args(workdir))
  assert out.returncode == 0 and "resumed from step" in out.stdout, out.stderr[-2000:]
  assert losses(workdir) == losses(tmp_path / "straight")
  assert train_lines(workdir) == list(range(1, 10))
  assert_trees_equal(final_params(str(workdir)), final_params(str(tmp_path / "straight")))


# ---------------------------------------------------------------- broken run files


def test_a_broken_tokenizer_or_config_json_is_one_line(six_steps):
  _, tmp = six_steps
  # sample.py and evaluate.py read a run the same way (checkpoint.load_run): one each.
  for name, text, args in ((runs.TOKENIZER, '{"model": ', ["sample.py", "--max_new_tokens=5"]),
                           (runs.CONFIG, "{not json", ["evaluate.py"])):
    workdir = tmp / f"broken-{name}"
    shutil.copytree(tmp / "six", workdir)
    (workdir / name).write_text(text)
    before = snapshot(workdir)
    out = script(args[0], f"--workdir={workdir}", *args[1:])
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and name in lines[0], (args, out.stderr[-2000:])
    assert snapshot(workdir) == before


# ---------------------------------------------------------------- MFU


def test_mfu_is_never_above_one_and_says_when_the_peak_was_contended():
  # 1,000 tokens/s x 6e6 FLOPs/token against a 1 GFLOP/s peak measured on a busy machine: 6x.
  assert metrics_lib.mfu(1000, 6e6, 1e9, 1) == 1.0 and metrics_lib.contended(1000, 6e6, 1e9, 1)
  assert metrics_lib.mfu(100, 6e6, 1e9, 1) == pytest.approx(0.6) and not metrics_lib.contended(100, 6e6, 1e9, 1)
  written, logged = [], []

  class Writer:
    def write(self, step, info):
      written.append(info)

  class Progress:
    tty = False

    def log(self, message):
      logged.append(message)

  report = train.Reporter(Writer(), Progress(), train.Throughput(0, 1000), 6e6, 1e9, steps=10, log_every=1)
  report.throughput.time -= 1.0  # one step of 1,000 tokens took a second
  report.train({"train/loss": 1.0, "lr": 0.1, "grad_norm": 1.0}, 1)
  assert written[0]["mfu"] == 1.0 and written[0]["mfu_contended"] == 1.0
  assert any("clamped to 1" in m for m in logged), logged


def test_a_failed_start_leaves_no_folder_and_a_warmup_past_the_end_is_a_warning(tmp_path):
  c = micro_config(tmp_path / "cache", steps=4)
  c.optim.warmup_steps = 4
  c.mesh.data = 3  # 3 devices on a 1-device process: refused after the data is prepared
  messages = []
  with pytest.raises(config_lib.ConfigError, match="mesh"):
    train.train_and_evaluate(c, str(tmp_path / "new"), log=messages.append)
  assert not os.path.exists(tmp_path / "new")  # not even the tokenizer.json it had written
  assert any("never leaves warm-up" in m for m in messages), messages
