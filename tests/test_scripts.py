"""The command-line contract: train, resume, sample; bad flags give one clear line."""

import json
import os
import subprocess
import sys

import jax
import pytest

from jaxformer import cli, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(name, *args, cwd=ROOT, env=None):
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *args], capture_output=True,
                        text=True, timeout=600, cwd=cwd, env=env)


MICRO = ["--config.model.num_layers=1", "--config.model.num_heads=2", "--config.model.embed_dim=32",
         "--config.model.max_len=64", "--config.train.seq_len=32", "--config.train.batch_size=8",
         "--config.data.num_stories=300", "--config.data.num_valid_batches=2", "--config.train.eval_every=3",
         "--config.train.log_every=1", "--config.train.num_samples=1", "--config.train.sample_tokens=20"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cli")
  workdir = str(tmp / "run")
  out = script("train.py", f"--workdir={workdir}", "--config.train.steps=3",
               f"--config.data.cache_dir={tmp / 'cache'}", *MICRO)
  assert out.returncode == 0, out.stderr[-2000:]
  return workdir, tmp, out


def test_train_writes_the_run_folder_and_prints_samples(trained):
  workdir, _, out = trained
  for name in ("config.json", "tokenizer.json", "metrics.jsonl", "checkpoints", "best"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert "done: 3 steps" in out.stdout and "--- sample 1" in out.stdout
  assert "Traceback" not in out.stderr


def test_sample_is_reproducible_and_greedy_is_deterministic(trained):
  workdir, _, _ = trained
  args = [f"--workdir={workdir}", "--prompt=Once upon a time", "--max_new_tokens=20", "--num_samples=2"]
  a, b = script("sample.py", *args, "--seed=3"), script("sample.py", *args, "--seed=3")
  assert a.returncode == 0, a.stderr[-2000:]
  assert a.stdout == b.stdout and a.stdout.count("Once upon a time") == 2
  g = script("sample.py", *args, "--temperature=0").stdout.split("---")
  assert g[2] == g[4]  # both greedy samples are the same text


@pytest.mark.parametrize("args,message", [
    (["--prompt=Once upon a time ~"], "the prompt holds characters the run's char tokenizer has never seen: '~'"),
    (["--temperature=-1"], "temperature must be"),
    (["--top_k=-2"], "top_k must be"),
    (["--top_p=1.5"], "top_p must be in (0, 1]"),
    (["--max_new_tokens=0"], "max_new_tokens must be"),
    (["--checkpoint=999"], "has no checkpoint at step 999"),
])
def test_sample_bad_input_is_one_clear_line(trained, args, message):
  workdir, _, _ = trained
  out = script("sample.py", f"--workdir={workdir}", *args)
  assert out.returncode != 0
  assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_sample_without_a_run_and_train_with_a_typo(tmp_path):
  out = script("sample.py", f"--workdir={tmp_path}")
  assert out.returncode != 0 and "has no tokenizer.json" in out.stderr and "Traceback" not in out.stderr
  out = script("train.py", f"--workdir={tmp_path / 'x'}", "--config.train.stepz=3")
  assert out.returncode != 0 and "stepz" in out.stderr
  out = script("train.py", f"--workdir={tmp_path / 'y'}", "--config.model.embed_dim=30",
               f"--config.data.cache_dir={tmp_path / 'cache'}")
  assert out.returncode != 0 and "must be divisible by model.num_heads" in out.stderr
  assert "Traceback" not in out.stderr


def test_train_resumes_in_the_same_workdir(trained):
  workdir, tmp, _ = trained
  out = script("train.py", f"--workdir={workdir}", "--config.train.steps=5",
               f"--config.data.cache_dir={tmp / 'cache'}", *MICRO)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "resumed from step 3" in out.stdout and "done: 5 steps" in out.stdout


def test_sigterm_saves_a_checkpoint_and_exits_resumable(tmp_path):
  import signal
  import time
  workdir = tmp_path / "run"
  args = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), f"--workdir={workdir}",
          "--config.train.steps=100000", f"--config.data.cache_dir={tmp_path / 'cache'}", *MICRO]
  proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
  deadline = time.time() + 300
  metrics_path = workdir / "metrics.jsonl"
  while time.time() < deadline and not (metrics_path.exists() and metrics_path.read_text().count("train/loss") >= 5):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  # Not 0: a scheduler must not read a preempted run as finished. 75 says "resumable".
  assert proc.returncode == train.EXIT_RESUMABLE == 75, err[-2000:]
  assert "(signal 15)" in out
  steps = [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
  assert steps and max(steps) >= 5


def test_a_second_run_loads_its_compiled_step_and_a_torn_cache_entry_is_written_again(tmp_path):
  # The default cache, in a home of this test's own; every compile cached (JAX skips those under 1 s).
  env = {**os.environ, "HOME": str(tmp_path / "home"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  for key in ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE"):
    env.pop(key, None)
  xla = tmp_path / "home" / ".cache" / "jaxformer" / "xla"

  def train(name):
    out = script("train.py", f"--workdir={tmp_path / name}", "--config.train.steps=2",
                 f"--config.data.cache_dir={tmp_path / 'cache'}", *MICRO, "--config.train.num_samples=0", env=env)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "compilation cache" not in out.stderr, out.stderr[-2000:]
    return [json.loads(line)["train/loss"] for line in open(tmp_path / name / "metrics.jsonl") if "train/loss" in line]

  def entries():
    return {p.name: p.read_bytes() for p in xla.iterdir() if p.name != ".lockfile"}

  losses = train("a")
  first = entries()
  step = next(n for n in first if n.startswith("jit_train_step-") and n.endswith("-cache"))
  stamp = step[:-len("cache")] + "atime"
  # The second run read the step from the cache (JAX stamps an entry's -atime when it reads it)
  # and compiled nothing new; it trains the same numbers.
  assert train("b") == losses
  second = entries()
  assert second.keys() == first.keys()
  assert int.from_bytes(second[stamp], "little") > int.from_bytes(first[stamp], "little")
  # A write cut short by kill -9: half the entry and no -atime. JAX alone would warn at every start
  # and never write it again; the next run drops it and writes it whole.
  (xla / step).write_bytes(first[step][:len(first[step]) // 2])
  (xla / stamp).unlink()
  assert train("c") == losses
  third = entries()
  assert third.keys() == first.keys() and len(third[step]) > len(first[step]) // 2


def test_a_compilation_cache_that_cannot_be_made_is_skipped(tmp_path, monkeypatch):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
  assert cli.compilation_cache() is None  # turned off
  (tmp_path / "file").write_text("")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "file" / "xla"))  # a folder under a file
  before = jax.config.jax_compilation_cache_dir
  assert cli.compilation_cache() is None and jax.config.jax_compilation_cache_dir is None
  jax.config.update("jax_compilation_cache_dir", before)
  # Entries with their -atime stay; one without it (a write cut short) goes.
  for name in ("a-1-cache", "a-1-atime", "b-2-cache"):
    (tmp_path / name).write_bytes(b"x")
  cli.drop_torn_entries(str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(("cache", "atime"))) == ["a-1-atime", "a-1-cache"]
