"""Sweeps on Optuna: sweep files as search spaces and samplers, bad sweeps, the study, results from it,
the script's dry run, and a real sweep of two worker commands with pruning, one worker killed mid-trial."""

import json
import os
import signal
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags
import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
import pytest

from jaxformer import plots, results, runs, sweep
from jaxformer.config import ConfigError
from test_runs import fake_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
TIMEOUT = 240  # any one subprocess; the whole killed-worker sweep takes well under a minute on 2 cores


def make_sweep(axes, method="grid", **fields):
  s = sweep.sweep_config()
  s.config = TINY
  s.overrides = {"train": {"steps": 4}}
  s.method = method
  s.axes = axes
  for k, v in fields.items():
    s[k] = v
  return s


def names(trials):
  return [t.name for t in trials]


# ---------------------------------------------------------------------------- search spaces and samplers


def test_grid_runs_every_point_once_in_a_seeded_order():
  axes = {"optim": {"lr": (1e-3, 3e-3), "warmup_steps": (0, 10)}, "seed": (7,)}
  trials, note = sweep.preview(make_sweep(axes))
  assert note == "" and sorted(names(trials)) == [
      "lr=0.001,warmup_steps=0,seed=7", "lr=0.001,warmup_steps=10,seed=7",
      "lr=0.003,warmup_steps=0,seed=7", "lr=0.003,warmup_steps=10,seed=7"]
  t = next(t for t in trials if t.name == "lr=0.001,warmup_steps=10,seed=7")
  assert t.axes == {"optim.lr": 1e-3, "optim.warmup_steps": 10, "seed": 7}
  assert t.overrides == {"train.steps": 4, "optim.lr": 1e-3, "optim.warmup_steps": 10, "seed": 7}
  # GridSampler gives trial k grid point k of a shuffle seeded by sweep.seed: workers never collide.
  assert names(sweep.preview(make_sweep(axes))[0]) == names(trials)
  assert len({tuple(names(sweep.preview(make_sweep(axes, seed=s))[0])) for s in range(6)}) > 1
  assert sweep.budget(make_sweep(axes), sweep.check(make_sweep(axes))) == 4
  assert runs.short_keys(["model.dropout", "optim.dropout", "optim.lr"]) == {
      "model.dropout": "model.dropout", "optim.dropout": "optim.dropout", "optim.lr": "lr"}
  assert sweep.trial_name({"model.activation": "gelu_tanh", "model.use_bias": False, "optim.lr": 1e-5}) == (
      "activation=gelu_tanh,use_bias=false,lr=1e-05")


AXES = {"optim": {"lr": "log_uniform(1e-4, 1e-2)", "warmup_steps": "int_uniform(0, 100)",
                  "b2": "uniform(0.9, 0.99)", "schedule": ("cosine", "linear")}}


def test_axes_become_optuna_distributions():
  s = make_sweep(AXES, "random", num_trials=1)
  trial = optuna.create_study().ask()
  sweep.draw(s, sweep.check(s), sweep.base_config(s), trial)
  assert trial.distributions == {
      "optim.lr": FloatDistribution(1e-4, 1e-2, log=True), "optim.warmup_steps": IntDistribution(0, 100),
      "optim.b2": FloatDistribution(0.9, 0.99), "optim.schedule": CategoricalDistribution(["cosine", "linear"])}
  assert trial.user_attrs["values"]["optim.lr"] == float(f"{trial.params['optim.lr']:.3g}")


def test_random_draws_depend_on_seed_and_trial_number_only():
  spec = lambda n, seed=3: make_sweep(AXES, "random", num_trials=n, seed=seed)
  trials, note = sweep.preview(spec(200))
  assert note == "" and trials == sweep.preview(spec(200))[0] and trials != sweep.preview(spec(200, 4))[0]
  assert trials[:20] == sweep.preview(spec(20))[0]  # more trials keep the first ones
  lrs = np.array([t.axes["optim.lr"] for t in trials])
  assert lrs.min() >= 1e-4 and lrs.max() <= 1e-2
  assert all(float(f"{lr:.3g}") == lr for lr in lrs)  # 3 significant digits: the name is the value
  # Log-uniform: each decade gets about half the draws (uniform would put ~90% in the upper one).
  assert 0.35 < np.mean(lrs < 1e-3) < 0.65
  warm = [t.axes["optim.warmup_steps"] for t in trials]
  assert all(isinstance(w, int) and 0 <= w <= 100 for w in warm) and len(set(warm)) > 50
  assert all(0.9 <= t.axes["optim.b2"] <= 0.99 for t in trials)
  assert {t.axes["optim.schedule"] for t in trials} == {"cosine", "linear"}
  # Two workers, each with its own sampler, taking turns on one study: trial k draws what it
  # draws alone (seeded alike, their samplers would otherwise both draw the first values).
  s = spec(6)
  axes, base = sweep.check(s), sweep.base_config(s)
  storage = optuna.storages.InMemoryStorage()
  workers = [optuna.create_study(storage=storage, study_name="shared", sampler=sweep.make_sampler(s, axes),
                                 load_if_exists=True) for _ in range(2)]
  drawn = [sweep.draw(s, axes, base, workers[k % 2].ask()).name for k in range(6)]
  assert drawn == names(trials[:6]) and len(set(drawn)) == 6


def test_tpe_dry_run_shows_its_random_start_and_says_the_rest_follow_the_losses():
  trials, note = sweep.preview(make_sweep(AXES, "tpe", num_trials=12))
  assert len(trials) == 4 and note == "trials 4-11 are chosen by TPE from the losses"
  # TPE's random start draws as random search does, trial by trial.
  assert trials == sweep.preview(make_sweep(AXES, "random", num_trials=4))[0]


@pytest.mark.parametrize("axes, method, fields, match", [
    ({"optim": {"lr": (1e-3,)}}, "bayes", {}, r"sweep.method must be one of grid, random, tpe, got 'bayes'\."),
    ({"optim": {"lr": (1e-3,)}}, "grid", {"pruner": "median"}, "sweep.pruner must be one of none, successive_halving"),
    ({"optim": {"lr": (1e-3,)}}, "grid", {"storage": "journal.log"},
     r"sweep.storage 'journal.log' is not a database URL; leave it empty .* e.g. postgresql://"),
    ({"optim": {"lr": (1e-3,)}}, "tpe", {}, r"a tpe sweep needs sweep.num_trials > 0, got 0\."),
    ({"optim": {"lr": (1e-3,)}}, "grid", {"heartbeat_s": 0}, "sweep.heartbeat_s must be at least 1"),
    ({"optim": {"lrr": (1e-3,)}}, "grid", {}, r"sweep axis 'optim.lrr' names no config field \(optim has .*lr.*; "
                                              r"did you mean \"lr\"\?\); fix the name in the sweep file\."),
    ({"optimizer": {"lr": (1e-3,)}}, "grid", {}, "names no config field"),
    ({"optim": {"lr": ()}}, "grid", {}, "'optim.lr' has no values"),
    ({}, "grid", {}, "the sweep has no axes"),
    ({"optim": {"lr": "log_uniform(1e-4, 1e-2)"}}, "grid", {}, "a grid needs a tuple of values"),
    ({"optim": {"lr": "gauss(1, 2)"}}, "random", {}, "is not a distribution; write a tuple of values, or one of"),
    ({"optim": {"lr": "log_uniform(0, 1)"}}, "random", {}, "log_uniform needs positive bounds"),
    ({"optim": {"warmup_steps": "int_uniform(0.2, 0.8)"}}, "random", {}, "holds no whole number"),
    ({"optim": {"lr": (1e-3, -1.0)}}, "grid", {}, "trial lr=-1: optim.lr must be positive"),
    ({"optim": {"warmup_steps": (1.5,)}}, "grid", {}, "'optim.warmup_steps': the value 1.5 does not fit"),
    ({"optim": (1, 2)}, "grid", {}, "'optim' is a section, not a field"),
])
def test_bad_sweeps_fail_with_one_clear_sentence(axes, method, fields, match):
  with pytest.raises(ConfigError, match=match):
    sweep.preview(make_sweep(axes, method, **({"num_trials": 2} if method == "random" else {}), **fields))


def test_bad_override():
  s = make_sweep({"optim": {"lr": (1e-3,)}})
  s.overrides = {"train": {"stepz": 3}}
  with pytest.raises(ConfigError, match="sweep override 'train.stepz' names no config field"):
    sweep.preview(s)


def test_trial_command_flags_parse_back_to_the_same_values(tmp_path):
  trials, _ = sweep.preview(make_sweep({"optim": {"lr": (3e-4,), "schedule": ("linear",)},
                                        "model": {"use_bias": (False,), "dropout": (0.1,)}}))
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


# ---------------------------------------------------------------------------- the study and its results


def test_the_study_is_a_database_in_the_sweep_folder_shared_and_checked(tmp_path):
  s = make_sweep({"optim": {"lr": (1e-3, 2e-3)}}, pruner="hyperband", heartbeat_s=5)
  with pytest.raises(ConfigError, match=r"has no study.db; run the sweep first \(without --report\)\."):
    sweep.open_study(s, str(tmp_path), "lr", create=False)
  study = sweep.open_study(s, str(tmp_path), "lr")
  assert os.path.isfile(tmp_path / "study.db") and isinstance(study.pruner, optuna.pruners.HyperbandPruner)
  assert isinstance(study.sampler, optuna.samplers.GridSampler)
  study.enqueue_trial({"optim.lr": 1e-3})
  again = sweep.open_study(s, str(tmp_path), "lr", create=False)  # another worker, or --report
  assert [t.state for t in again.get_trials()] == [TrialState.WAITING]
  s.axes.optim.lr = (1e-3, 5e-3)
  with pytest.raises(ConfigError, match=r"belongs to another sweep .*; use another --workdir, or delete .*study.db"):
    sweep.open_study(s, str(tmp_path), "lr")


def test_a_launch_that_cannot_start_is_a_failed_run(tmp_path):
  trial = sweep.preview(make_sweep({"optim": {"lr": (1e-3,)}}))[0][0]
  status, stopped = sweep.train(trial, str(tmp_path), "train.py", python="/no/such/python")
  assert status["status"] == "failed" and "No such file" in status["error"] and not stopped
  assert runs.read_trial(str(tmp_path / "lr=0.001"))["attempts"] == 1


def test_results_table_plot_and_best_config_come_from_the_study(tmp_path):
  lr = CategoricalDistribution([1e-3, 2e-3, 3e-3, 4e-3])
  study = optuna.create_study()

  def add(number_lr, state, value=None, **attrs):
    name = f"lr={number_lr:g}"
    study.add_trial(optuna.trial.create_trial(
        state=state, value=value, params={"optim.lr": number_lr}, distributions={"optim.lr": lr},
        user_attrs={"name": name, "values": {"optim.lr": number_lr}, **attrs.pop("user_attrs", {})}, **attrs))

  add(1e-3, TrialState.FAIL)  # its worker died: retried as trial 4
  add(2e-3, TrialState.COMPLETE, 1.0)
  add(3e-3, TrialState.PRUNED, intermediate_values={2: 3.0})
  add(4e-3, TrialState.FAIL, user_attrs={"error": "the model diverged at step 3."})
  add(1e-3, TrialState.COMPLETE, 1.5, system_attrs={"failed_trial": 0, "retry_history": [0]})
  fake_run(str(tmp_path / "lr=0.001"), steps=4, total=4, evals={2: 3.0, 4: 1.5})
  fake_run(str(tmp_path / "lr=0.002"), steps=4, total=4, evals={2: 3.0, 4: 1.0})
  fake_run(str(tmp_path / "lr=0.003"), steps=2, total=4, evals={2: 3.0}, status="stopped")
  fake_run(str(tmp_path / "lr=0.004"), steps=3, total=4, status="failed")
  rows = results.study_rows(study.get_trials(), str(tmp_path))
  assert [(r["trial"], r["number"], r["status"]) for r in rows] == [
      ("lr=0.002", 1, "complete"), ("lr=0.003", 2, "pruned"), ("lr=0.004", 3, "failed"),
      ("lr=0.001", 4, "complete (retry 1)")]
  paths = results.write_report(rows, ["optim.lr"], str(tmp_path), title="lr")
  md = open(paths["md"]).read()
  assert "| lr | best val loss | best val bpb | final val loss | steps | tokens/s | wall | status |" in md
  assert "| 0.002 | **1.0000** | 1.4427 | 1.0000 | 4/4 | 1000 | 12s | complete |" in md
  assert "| 0.003 | 3.0000 | 4.3281 | 3.0000 | 2/4 | 1000 | 12s | pruned |" in md
  assert "| 0.001 | 1.5000 | 2.1640 | 1.5000 | 4/4 | 1000 | 12s | complete (retry 1) |" in md
  assert "- `lr=0.004`: the model diverged at step 3." in md
  assert "Best: `lr=0.002`, validation loss 1.0000; its whole config is `best_config.json`." in md
  assert open(paths["best"]).read() == open(tmp_path / "lr=0.002" / "config.json").read()
  lines = open(paths["csv"]).read().splitlines()
  assert lines[0] == ("trial,number,optim.lr,status,steps,total_steps,best_eval_loss,best_eval_bpb,final_eval_loss,"
                      "excess,tokens_per_sec,wall_s,num_params,error") and len(lines) == 5
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # atomic writes leave no temporary files
  assert os.path.getsize(plots.plot_sweep(rows, ["optim.lr"], str(tmp_path / "results.png"))) > 1000


def test_results_table_from_fake_runs(tmp_path):
  """scripts/results.py's table: rows over run folders named by sweep.Trials, no study."""
  trials = [sweep.Trial(name=sweep.trial_name(a), config="x.py", overrides={}, axes=a)
            for a in ({"preset": "tiny", "corpus": "stories"}, {"preset": "tiny", "corpus": "shakespeare"},
                      {"preset": "small", "corpus": "stories"})]
  fake_run(str(tmp_path / trials[0].name), steps=4, total=4, evals={2: 1.0, 4: 0.75}, floor=0.5, wall_s=75.0)
  fake_run(str(tmp_path / trials[1].name), steps=4, total=4, evals={4: 1.5}, wall_s=5.0)
  rows = results.result_rows(trials, str(tmp_path))
  table = results.results_table(rows, ["preset", "corpus"], note="Measured on a test.")
  lines = table.splitlines()
  assert lines[0] == "Measured on a test."
  assert lines[2] == ("| preset | corpus | params | best val loss | best val bpb | final val loss | excess | steps | "
                      "tokens/s | wall | status |")
  # 826,432 parameters from summary.json; 1000 tokens/s the logged windows' median; wall time the summary's.
  assert lines[4] == "| tiny | stories | 0.83M | 0.7500 | 1.0820 | 0.7500 | 0.2500 | 4/4 | 1000 | 1m 15s | finished |"
  assert lines[5] == "| tiny | shakespeare | 0.83M | 1.5000 | 2.1640 | 1.5000 | – | 4/4 | 1000 | 5s | finished |"
  # No budget in its overrides:
  assert lines[6] == "| small | stories | – | – | – | – | – | 0/? | – | – | pending |"
  assert "**" not in table  # no winner across corpora
  assert [results.format_count(n) for n in (None, 9_500, 99_999, 100_000, 12_345_678)] == [
      "–", "9.5k", "100.0k", "0.10M", "12.35M"]


# ---------------------------------------------------------------------------- the script


def script(*args, cwd=REPO):
  return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "sweep.py"), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=TIMEOUT)


def test_dry_run_prints_every_trial_and_writes_nothing(tmp_path):
  for name, count in (("lr_warmup", 6), ("lr_random", 6), ("lr_tpe", 4)):
    spec = sweep.load_config_file(os.path.join(REPO, "configs", "sweeps", f"{name}.py"))
    spec.config = os.path.join(REPO, spec.config)
    assert len(sweep.preview(spec)[0]) == count
  out = script("--sweep=configs/sweeps/lr_warmup.py", f"--workdir={tmp_path}", "--dry_run")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert len(lines) == 6 and all("scripts/train.py --config=" in l and "--config.optim.lr=" in l for l in lines)
  assert len({l.split("--workdir=")[1].split()[0] for l in lines}) == 6
  assert not os.listdir(tmp_path)  # a dry run writes nothing, not even the study
  # A bad sweep is one `error:` line too: test_flags.py runs sweep.py with bad fields, and
  # test_bad_sweeps_fail_with_one_clear_sentence checks the sentences.


# ---------------------------------------------------------------------------- a real sweep, a worker killed

# The micro model; 80 steps, an evaluation every 10 (the pruner's rungs at 10 and 30 steps):
# long enough for a trial pruned at step 10 to be stopped before it ends.
MICRO_SWEEP = """from jaxformer import sweep

def get_config():
  s = sweep.sweep_config()
  s.config = 'configs/tiny.py'
  s.overrides = {{'model': {{'num_layers': 1, 'num_heads': 2, 'embed_dim': 32, 'max_len': 32}},
                 'mesh': {{'cpu_devices': 1}},  # one device per train.py: they share 2 cores
                 'data': {{'num_stories': 300, 'cache_dir': {cache!r}, 'num_valid_batches': 2}},
                 'optim': {{'warmup_steps': 2}},
                 'train': {{'batch_size': 8, 'seq_len': 32, 'steps': 80, 'eval_every': 10, 'log_every': 2,
                           'checkpoint_every': 40, 'num_samples': 0}}}}
  s.axes = {{'optim': {{'lr': (1e-2, 1e-3, 1e-5)}}}}
  s.seed = 5  # the grid's order: 0.01, 0.001, then 1e-05, started only once a first trial is done
  s.pruner = 'successive_halving'
  s.min_resource = 10
  s.heartbeat_s = 2  # a killed worker's trial is queued again 4 s after its last heartbeat
  return s
"""


def train_steps(run_dir):
  with open(os.path.join(run_dir, runs.METRICS)) as f:
    return [json.loads(l)["step"] for l in f if '"train/loss"' in l]


def test_two_worker_commands_share_a_study_prune_and_survive_a_killed_worker(tmp_path):
  """`--workers=2` trains the first two grid points; the worker training lr=0.01 is killed at step ~12.

  Its train.py gets SIGTERM as its worker dies and checkpoints; a second command joins the study,
  and the trial, failed by its stale heartbeat and queued again, resumes its folder. lr=1e-05,
  the third grid point, starts when a worker is free, trails the others at step 10 and is pruned.
  """
  spec, workdir = tmp_path / "micro.py", tmp_path / "sweep"
  spec.write_text(MICRO_SWEEP.format(cache=str(tmp_path / "cache")))
  micro = sweep.load_config_file(str(spec))
  micro.config = TINY
  assert names(sweep.preview(micro)[0]) == ["lr=0.01", "lr=0.001", "lr=1e-05"]
  command = [sys.executable, os.path.join(REPO, "scripts", "sweep.py"), f"--sweep={spec}", f"--workdir={workdir}"]
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jit"),  # the resume reuses the first compile
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  start = lambda *extra: subprocess.Popen(command + list(extra), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
  first, second = start("--workers=2"), None
  killed = workdir / "lr=0.01"
  try:
    deadline = time.time() + TIMEOUT
    while not (os.path.exists(killed / runs.METRICS) and max(train_steps(killed), default=0) >= 12):
      assert time.time() < deadline and first.poll() is None, "lr=0.01 never reached step 12"
      time.sleep(0.05)
    pid = int(runs.read_trial(str(killed))["worker"].split(":")[1])
    assert pid != first.pid  # one of the two worker processes, not the command that started them
    os.kill(pid, signal.SIGKILL)
    second = start()  # the same command again: one more worker for the same study
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in (first, second)]
  finally:
    for p in (first, second):
      if p is not None and p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
  assert first.returncode == 0 and second.returncode == 0, outputs

  study = optuna.load_study(study_name="micro", storage=f"sqlite:///{workdir}/study.db")
  trials = study.get_trials()
  retried = {k for t in trials for k in t.system_attrs.get("retry_history", [])}
  live = {t.user_attrs["name"]: t for t in trials if t.number not in retried}
  # Every grid point ran once; no trial lost or left running; the killed one failed and was retried.
  assert sorted(live) == ["lr=0.001", "lr=0.01", "lr=1e-05"] and len(trials) == 4
  assert live["lr=0.01"].state == TrialState.COMPLETE and len(live["lr=0.01"].system_attrs["retry_history"]) == 1
  (dead,) = [t for t in trials if t.number in retried]
  assert dead.state == TrialState.FAIL and dead.user_attrs["name"] == "lr=0.01" and dead.params == live["lr=0.01"].params
  assert live["lr=1e-05"].state == TrialState.PRUNED and live["lr=0.001"].state in (TrialState.COMPLETE,
                                                                                    TrialState.PRUNED)
  assert live["lr=0.01"].value == runs.read_summary(str(killed))["best_eval_loss"]

  # The killed run resumed where it stopped: two launches, every step trained and logged once.
  log = (killed / "train.log").read_text()
  assert sum(l.startswith("$ ") for l in log.splitlines()) == 2
  assert int(log.split("resumed from step ")[1].split()[0]) >= 12
  assert train_steps(killed) == list(range(2, 81, 2)) and runs.run_status(str(killed))["status"] == "finished"
  for other in ("lr=0.001", "lr=1e-05"):  # each trained by one process
    assert sum(l.startswith("$ ") for l in (workdir / other / "train.log").read_text().splitlines()) == 1
  pruned = runs.run_status(str(workdir / "lr=1e-05"))
  assert pruned["status"] == "interrupted" and 10 <= pruned["steps"] < 80

  md = (workdir / "results.md").read_text()
  assert "complete (retry 1) |" in md and "| 1e-05 |" in md and "| pruned |" in md
  best = results.best_row(results.study_rows(trials, str(workdir)))
  assert (workdir / "best_config.json").read_text() == (workdir / best["trial"] / "config.json").read_text()
  assert os.path.getsize(workdir / "results.png") > 1000
  assert " lr=1e-05: pruned at step " in "".join(outputs)
