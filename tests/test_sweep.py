"""Sweeps: expansion and names, bad sweeps, skip-and-resume, failures, the report and results tables, the CLI."""

import os
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

from jaxformer import plots, results, runs, sweep
from jaxformer.config import ConfigError
from test_runs import fake_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def make_sweep(axes, method="grid", **fields):
  s = sweep.sweep_config()
  s.config = TINY
  s.overrides = {"train": {"steps": 4}}
  s.method = method
  s.axes = axes
  for k, v in fields.items():
    s[k] = v
  return s


# ---------------------------------------------------------------------------- expansion


def test_grid_expands_in_order_with_names_that_list_the_overrides():
  trials = sweep.expand(make_sweep({"optim": {"lr": (1e-3, 3e-3), "warmup_steps": (0, 10)}, "seed": (7,)}),
                        sweep.load_config_file(TINY))
  assert [t.name for t in trials] == [
      "lr=0.001,warmup_steps=0,seed=7", "lr=0.001,warmup_steps=10,seed=7",
      "lr=0.003,warmup_steps=0,seed=7", "lr=0.003,warmup_steps=10,seed=7"]
  assert trials[1].axes == {"optim.lr": 1e-3, "optim.warmup_steps": 10, "seed": 7}
  assert trials[1].overrides == {"train.steps": 4, "optim.lr": 1e-3, "optim.warmup_steps": 10, "seed": 7}
  assert runs.short_keys(["model.dropout", "optim.dropout", "optim.lr"]) == {
      "model.dropout": "model.dropout", "optim.dropout": "optim.dropout", "optim.lr": "lr"}
  assert sweep.trial_name({"model.activation": "gelu_tanh", "model.use_bias": False, "optim.lr": 1e-5}) == (
      "activation=gelu_tanh,use_bias=false,lr=1e-05")


def test_random_search_is_seeded_log_uniform_within_bounds_and_extends_stably():
  axes = {"optim": {"lr": "log_uniform(1e-4, 1e-2)", "warmup_steps": "int_uniform(0, 100)",
                    "b2": "uniform(0.9, 0.99)", "schedule": ("cosine", "linear")}}
  base = sweep.load_config_file(TINY)
  trials = sweep.expand(make_sweep(axes, "random", num_trials=200, seed=3), base)
  again = sweep.expand(make_sweep(axes, "random", num_trials=200, seed=3), base)
  other = sweep.expand(make_sweep(axes, "random", num_trials=200, seed=4), base)
  first = sweep.expand(make_sweep(axes, "random", num_trials=20, seed=3), base)
  assert trials == again and trials != other and trials[:20] == first
  lrs = np.array([t.axes["optim.lr"] for t in trials])
  assert lrs.min() >= 1e-4 and lrs.max() <= 1e-2
  assert all(float(f"{lr:.3g}") == lr for lr in lrs)  # 3 significant digits: the name is the value
  # Log-uniform: each decade gets about half the draws (uniform would put ~90% in the upper one).
  assert 0.35 < np.mean(lrs < 1e-3) < 0.65
  warm = [t.axes["optim.warmup_steps"] for t in trials]
  assert all(isinstance(w, int) and 0 <= w <= 100 for w in warm) and len(set(warm)) > 50
  assert all(0.9 <= t.axes["optim.b2"] <= 0.99 for t in trials)
  assert {t.axes["optim.schedule"] for t in trials} == {"cosine", "linear"}
  assert len({t.name for t in trials}) == len(trials)
  # Repeated draws of a small choice space run once.
  small = sweep.expand(make_sweep({"optim": {"schedule": ("cosine", "linear")}}, "random", num_trials=10), base)
  assert sorted(t.name for t in small) == ["schedule=cosine", "schedule=linear"]


@pytest.mark.parametrize("axes, method, match", [
    ({"optim": {"lrr": (1e-3,)}}, "grid", r"sweep axis 'optim.lrr' names no config field \(optim has .*lr.*; "
                                          r"did you mean \"lr\"\?\); fix the name in the sweep file\."),
    ({"optimizer": {"lr": (1e-3,)}}, "grid", "names no config field"),
    ({"optim": {"lr": ()}}, "grid", "'optim.lr' has no values"),
    ({}, "grid", "the sweep has no axes"),
    ({"optim": {"lr": "log_uniform(1e-4, 1e-2)"}}, "grid", "a grid needs a tuple of values"),
    ({"optim": {"lr": "gauss(1, 2)"}}, "random", "is not a distribution"),
    ({"optim": {"lr": "log_uniform(0, 1)"}}, "random", "log_uniform needs positive bounds"),
    ({"optim": {"lr": (1e-3, -1.0)}}, "grid", "trial lr=-1: optim.lr must be positive"),
    ({"optim": {"warmup_steps": (1.5,)}}, "grid", "'optim.warmup_steps': the value 1.5 does not fit"),
    ({"optim": (1, 2)}, "grid", "'optim' is a section, not a field"),
])
def test_bad_sweeps_fail_with_one_clear_sentence(axes, method, match):
  with pytest.raises(ConfigError, match=match):
    sweep.expand(make_sweep(axes, method, num_trials=2), sweep.load_config_file(TINY))


def test_bad_override_and_random_without_trials():
  s = make_sweep({"optim": {"lr": (1e-3,)}})
  s.overrides = {"train": {"stepz": 3}}
  with pytest.raises(ConfigError, match="sweep override 'train.stepz' names no config field"):
    sweep.expand(s, sweep.load_config_file(TINY))
  with pytest.raises(ConfigError, match="num_trials > 0"):
    sweep.expand(make_sweep({"optim": {"lr": (1e-3,)}}, "random"), sweep.load_config_file(TINY))


def test_trial_command_flags_parse_back_to_the_same_values(tmp_path):
  trials = sweep.expand(make_sweep({"optim": {"lr": (3e-4,), "schedule": ("linear",)},
                                    "model": {"use_bias": (False,), "dropout": (0.1,)}}),
                        sweep.load_config_file(TINY))
  command = sweep.trial_command(trials[0], str(tmp_path), train_script="train.py", python="python")
  assert command[:4] == ["python", "train.py", f"--config={TINY}",
                         f"--workdir={tmp_path}/dropout=0.1,use_bias=false,lr=0.0003,schedule=linear"]
  values = flags.FlagValues()
  argv = ["train.py"] + command[2:3] + command[4:]
  holder = config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  c = holder.value
  assert (c.optim.lr, c.optim.schedule, c.model.use_bias, c.model.dropout, c.train.steps) == (
      3e-4, "linear", False, 0.1, 4)


# ---------------------------------------------------------------------------- running and reading


def test_sweep_skips_finished_resumes_interrupted_and_records_failures(tmp_path):
  trials = sweep.expand(make_sweep({"optim": {"lr": (1e-3, 2e-3, 3e-3, 4e-3)}}), sweep.load_config_file(TINY))
  workdir = str(tmp_path / "sweep")
  done, cut_short, fresh, crashing = [os.path.join(workdir, t.name) for t in trials]
  fake_run(done, steps=4, total=4, evals={4: 1.5})
  fake_run(cut_short, steps=2, total=4, evals={2: 3.0}, status="stopped")  # preempted: train.py resumes it
  launched = []

  def launch(command, log_path):
    run_dir = os.path.dirname(log_path)
    launched.append(os.path.basename(run_dir))
    if run_dir == crashing:
      with open(log_path, "a") as f:
        f.write("Traceback (most recent call last):\n  ...\nerror: the model diverged at step 3.\n")
      return 1
    fake_run(run_dir, steps=4, total=4, evals={2: 3.0, 4: float(len(launched))})
    return 0

  messages = []
  command_for = lambda t: sweep.trial_command(t, workdir, train_script="train.py")
  states = sweep.run_trials(trials, workdir, command_for=command_for, launch=launch, log=messages.append)
  assert sorted(launched) == sorted(t.name for t in trials[1:])
  assert [s["status"] for s in states] == ["finished", "finished", "finished", "failed"]
  assert states[3]["error"].endswith("error: the model diverged at step 3.")
  assert any("1 of 4 trials already finished" in m for m in messages)
  assert any(m.startswith("lr=0.002: interrupted at step 2") for m in messages)
  assert any("failed" in m and "diverged" in m for m in messages)
  record = runs.read_trial(crashing)
  assert record["returncode"] == 1 and record["attempts"] == 1 and "--config.optim.lr=0.004" in record["command"]

  # Started again: only the failed trial runs again (and fails again).
  launched.clear()
  sweep.run_trials(trials, workdir, command_for=command_for, launch=launch, parallel=2, log=messages.append)
  assert launched == [trials[3].name]
  assert runs.read_trial(crashing)["attempts"] == 2

  rows = results.result_rows(trials, workdir)
  paths = results.write_report(rows, ["optim.lr"], workdir, title="lr")
  with open(paths["md"]) as f:
    md = f.read()
  assert "| lr | best val loss | final val loss | steps | tokens/s | wall | status |" in md
  assert "| 0.002 | **1.0000** |" in md  # the best finished trial is bold
  assert "- `lr=0.004`: error: the model diverged at step 3." in md
  with open(paths["csv"]) as f:
    lines = f.read().splitlines()
  assert lines[0] == ("trial,optim.lr,status,steps,total_steps,best_eval_loss,final_eval_loss,excess,"
                      "tokens_per_sec,wall_s,num_params,error") and len(lines) == 5
  assert lines[4].startswith("lr=0.004,0.004,failed,0,4,,,,,") and lines[4].endswith(
      ",error: the model diverged at step 3.")
  assert not [n for n in os.listdir(workdir) if n.endswith(".tmp")]  # atomic writes leave no temporary files
  assert os.path.getsize(plots.plot_sweep(rows, ["optim.lr"], os.path.join(workdir, "results.png"))) > 1000


def test_a_launch_that_cannot_start_is_a_failed_trial(tmp_path):
  trials = sweep.expand(make_sweep({"optim": {"lr": (1e-3,)}}), sweep.load_config_file(TINY))
  states = sweep.run_trials(trials, str(tmp_path), command_for=lambda t: ["/no/such/python"], log=lambda m: None)
  assert states[0]["status"] == "failed" and "No such file" in states[0]["error"]


def test_results_table_from_fake_runs(tmp_path):
  trials = [sweep.Trial(name=sweep.trial_name(a), config="x.py", overrides={}, axes=a)
            for a in ({"preset": "tiny", "corpus": "stories"}, {"preset": "tiny", "corpus": "shakespeare"},
                      {"preset": "small", "corpus": "stories"})]
  fake_run(str(tmp_path / trials[0].name), steps=4, total=4, evals={2: 1.0, 4: 0.75}, floor=0.5, wall_s=75.0)
  fake_run(str(tmp_path / trials[1].name), steps=4, total=4, evals={4: 1.5}, wall_s=5.0)
  rows = results.result_rows(trials, str(tmp_path))
  table = results.results_table(rows, ["preset", "corpus"], note="Measured on a test.")
  lines = table.splitlines()
  assert lines[0] == "Measured on a test."
  assert lines[2] == ("| preset | corpus | params | best val loss | final val loss | excess | steps | tokens/s | "
                      "wall | status |")
  # 826,432 parameters from summary.json; 1000 tokens/s the logged windows' median; wall time the summary's.
  assert lines[4] == "| tiny | stories | 0.83M | 0.7500 | 0.7500 | 0.2500 | 4/4 | 1000 | 1m 15s | finished |"
  assert lines[5] == "| tiny | shakespeare | 0.83M | 1.5000 | 1.5000 | – | 4/4 | 1000 | 5s | finished |"
  assert lines[6] == "| small | stories | – | – | – | – | 0/? | – | – | pending |"  # no budget in its overrides
  assert "**" not in table  # no winner across corpora
  assert [results.format_count(n) for n in (None, 9_500, 99_999, 100_000, 12_345_678)] == [
      "–", "9.5k", "100.0k", "0.10M", "12.35M"]


# ---------------------------------------------------------------------------- the script


def script(*args, cwd=REPO):
  return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "sweep.py"), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_example_sweeps_expand_and_dry_run_prints_one_command_per_trial(tmp_path):
  for name, count in (("lr_warmup", 6), ("lr_random", 6)):
    spec = sweep.load_config_file(os.path.join(REPO, "configs", "sweeps", f"{name}.py"))
    spec.config = os.path.join(REPO, spec.config)
    assert len(sweep.expand(spec, sweep.load_config_file(spec.config))) == count
  out = script("--sweep=configs/sweeps/lr_warmup.py", f"--workdir={tmp_path}", "--dry_run")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert len(lines) == 6 and all("scripts/train.py --config=" in l and "--config.optim.lr=" in l for l in lines)
  assert not os.listdir(tmp_path)  # a dry run writes nothing

  bad = tmp_path / "bad.py"
  bad.write_text("from jaxformer import sweep\n\ndef get_config():\n  s = sweep.sweep_config()\n"
                 "  s.config = 'configs/tiny.py'\n  s.axes = {'optim': {'lrr': (1e-3,)}}\n  return s\n")
  out = script(f"--sweep={bad}", "--dry_run")
  assert out.returncode == 1 and out.stderr.strip().splitlines() == [
      "error: sweep axis 'optim.lrr' names no config field (optim has b1, b2, clip_norm, decay_embeddings, "
      "eps, lr, min_lr_ratio, schedule, warmup_steps, weight_decay; did you mean \"lr\"?); "
      "fix the name in the sweep file."]


def test_one_real_trial_end_to_end(tmp_path):
  """The real launcher: train.py in its own process, then the report."""
  spec = tmp_path / "micro.py"
  spec.write_text(f"""from jaxformer import sweep

def get_config():
  s = sweep.sweep_config()
  s.config = 'configs/tiny.py'
  s.overrides = {{'model': {{'num_layers': 1, 'num_heads': 2, 'embed_dim': 32, 'max_len': 32}},
                 'data': {{'num_stories': 300, 'cache_dir': {str(tmp_path / 'cache')!r}, 'num_valid_batches': 2}},
                 'train': {{'batch_size': 8, 'seq_len': 32, 'steps': 4, 'eval_every': 4, 'log_every': 2,
                           'checkpoint_every': 4, 'num_samples': 0}}}}
  s.axes = {{'optim': {{'lr': (3e-3,)}}}}
  return s
""")
  workdir = tmp_path / "sweep"
  out = script(f"--sweep={spec}", f"--workdir={workdir}")
  assert out.returncode == 0, out.stdout + out.stderr
  assert "[1/1] lr=0.003: finished" in out.stdout
  md = (workdir / "results.md").read_text()
  assert "| 0.003 |" in md and "| 4/4 |" in md and "finished" in md
  run = workdir / "lr=0.003"
  assert (run / "train.log").read_text().startswith("$ ") and runs.read_trial(str(run))["returncode"] == 0
  # The trainer's summary.json says finished, so a sweep started again skips the trial.
  summary = runs.read_summary(str(run))
  assert (summary["status"], summary["step"], summary["steps"]) == ("finished", 4, 4)
  assert runs.run_status(str(run))["status"] == "finished"
  out = script(f"--sweep={spec}", f"--workdir={workdir}")
  assert out.returncode == 0 and "1 of 1 trials already finished; skipping them." in out.stdout
  assert runs.read_trial(str(run))["attempts"] == 1
