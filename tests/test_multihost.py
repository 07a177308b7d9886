"""Many hosts, proved on 127.0.0.1: two JAX processes of 2 CPU devices each, bounded by timeouts.

Every mesh trains on 2 processes as on one device (dropout masks included); a
preempted 2-process run resumes bitwise; a run trained on 2 processes samples and
evaluates there as on 1 process (its checkpoint restored onto another mesh); a mesh
that cannot be laid out is refused on every process.
"""

import itertools
import json
import os
import signal
import socket
import sys
import time

import pytest

from configs import default
from jaxformer import checkpoint, config as config_lib, data as data_lib, evaluate, runs, sampling, train
import multihost

WORKER = os.path.join(multihost.HERE, "multihost_worker.py")
MESHES = {"data4": {"mesh.data": 4}, "fsdp4": {"mesh.data": 1, "mesh.fsdp": 4},
          "tensor4": {"mesh.data": 1, "mesh.tensor": 4}, "2x1x2": {"mesh.data": 2, "mesh.tensor": 2},
          "1x2x2": {"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2}}
DROPOUT = {"model.dropout": 0.1, "model.attn_dropout": 0.1}
WITH_DROPOUT = ("data4", "tensor4", "1x2x2")  # the masks are drawn per row: any mesh, the same masks
STEPS = {"train.steps": 12, "train.eval_every": 12}
REFUSED = [{"mesh.data": 1, "mesh.tensor": 4, "model.num_heads": 2}, {"mesh.data": 3}]


def result_of(stdout: str) -> dict:
  return json.loads([l for l in stdout.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])


def single_device(cache, workdir, **overrides) -> dict:
  c = config_lib.apply_overrides(default.get_config(),
                                 {**multihost.TINY, **STEPS, "data.cache_dir": cache, **overrides})
  train.train_and_evaluate(c, workdir, log=lambda *_: None)
  return {str(r["step"]): r["train/loss"] for r in runs.read_metrics(workdir) if "train/loss" in r}


def wait_for_step(workdir: str, step: int, procs, timeout: float) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and all(p.poll() is None for p in procs):
    if any(r.get("step", 0) >= step for r in runs.read_metrics(workdir)):
      return
    time.sleep(0.05)
  for p in procs:  # one may wait for the other in a collective: stop both, then read what each said
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
  said = [f"process {i} (exit {p.wait()}): {p.communicate()[1][-1500:]}" for i, p in enumerate(procs)]
  raise AssertionError(f"{workdir} did not reach step {step}:\n" + "\n".join(said))


def test_coordinator_ports_never_repeat_and_stay_out_of_the_ephemeral_range(monkeypatch):
  # bind(0) handed the same port to two calls in a row 1 time in 2000 here, and a second
  # coordinator on a port shares it silently (SO_REUSEPORT): its processes then join the first run's.
  low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
  ports = [multihost.free_port() for _ in range(3000)]
  assert len(set(ports)) == len(ports)
  assert all(10000 <= p < max(low, 14000) for p in ports)
  monkeypatch.setattr(multihost, "_next_port", itertools.count(0))
  with socket.socket() as held:  # a port something holds is skipped
    held.bind(("127.0.0.1", multihost._STRETCH[0]))
    held.listen()
    assert multihost.free_port() == multihost._STRETCH[1]


def test_two_processes_train_every_mesh_resume_from_preemption_and_sample_like_one(tmp_path):
  cache = str(tmp_path / "cache")
  jit_cache = multihost.compilation_cache(str(tmp_path / "jit"))  # a resume reuses what its start compiled
  data_config = config_lib.apply_overrides(default.get_config(), {**multihost.TINY, "data.cache_dir": cache}).data
  data_lib.load_data(data_config, None, seq_len=32)  # the data cache, built once for every process

  # The worker: every mesh in turn on 2 processes.
  runs_spec = {name: {**STEPS, **o, **(DROPOUT if name in WITH_DROPOUT else {})} for name, o in MESHES.items()}
  spec = json.dumps({"runs": runs_spec, "refuse": REFUSED})
  port = multihost.free_port()
  worker = multihost.start([[sys.executable, WORKER, str(i), "2", str(port), "2", cache, str(tmp_path / "w"), spec]
                            for i in range(2)], jit_cache)

  # Meanwhile scripts/train.py on 2 processes (the worker's 2x1x2 config), preempted by SIGTERM.
  # A checkpoint every step changes no number but makes each step wait for the last save: the
  # signal lands mid-run even where 12 bare steps would finish before it reaches both processes.
  cut = str(tmp_path / "cut")
  overrides = {**multihost.TINY, **STEPS, **MESHES["2x1x2"], "data.cache_dir": cache, "mesh.cpu_devices": 2,
               "train.checkpoint_every": 1}

  def train_cmds():
    port = multihost.free_port()
    return [multihost.script("train.py", f"--workdir={cut}",
                             *multihost.flags({**overrides, **multihost.distributed(port, 2, i)})) for i in range(2)]

  interrupted = multihost.start(train_cmds(), jit_cache)
  wait_for_step(cut, 2, interrupted, timeout=400)
  for p in interrupted:  # a preemption: every process is told, each at its own moment
    p.send_signal(signal.SIGTERM)
  for rc, _, err in multihost.finish(interrupted, timeout=300):
    assert rc == train.EXIT_RESUMABLE, err[-3000:]  # stopped and resumable, not finished
  stopped = runs.read_summary(cut)
  assert stopped["status"] == "stopped" and 2 <= stopped["step"] < 12, stopped
  for rc, _, err in multihost.run(train_cmds(), timeout=400, extra_env=jit_cache):
    assert rc == 0, err[-3000:]
  resumed = runs.read_summary(cut)
  assert resumed["status"] == "finished" and resumed["start_step"] == stopped["step"]

  ref = single_device(cache, str(tmp_path / "single"))
  ref_dropout = single_device(cache, str(tmp_path / "single_dropout"), **DROPOUT)
  (rc0, out0, err0), (rc1, out1, err1) = multihost.finish(worker, timeout=600)
  assert rc0 == rc1 == 0, (err0 + err1)[-3000:]
  two = result_of(out0)

  assert len(ref) == 12 and max(abs(ref_dropout[s] - ref[s]) for s in ref) > 1e-3  # dropout changes losses
  for name in MESHES:
    want = ref_dropout if name in WITH_DROPOUT else ref
    # Only the order of the sums differs from one device (seen: at most 3.5e-7 relative).
    assert two[name]["losses"] == pytest.approx(want, rel=1e-6), name
  # The preempted run, resumed, ends exactly where the same run never stopped ends.
  assert resumed["eval_loss"] == two["2x1x2"]["eval_loss"]
  # A mesh that cannot be laid out is refused with its sentence on every process, before compiling.
  for stdout in (out0, out1):
    refused = [l for l in stdout.splitlines() if l.startswith("REFUSED ")]
    assert len(refused) == 2, stdout[-2000:]
    assert "mesh.tensor=4 does not divide model.num_heads = 2" in refused[0]
    assert "data x fsdp x tensor = 3x1x1 = 3 does not match the 4 available devices" in refused[1]

  # Sampling and evaluation on 2 processes (the run's own mesh) give what 1 process (this one) gives.
  _, model, params, tok, step, _ = checkpoint.load_run(cut)
  texts = sampling.sample_text(params, model, tok, ["Once upon a time"] * 2, max_new_tokens=24, seed=3)
  alone = "".join(f"--- sample {i + 1} of 2 (step {step}) ---\nOnce upon a time{t}\n" for i, t in enumerate(texts))
  port = multihost.free_port()
  dist = lambda i: multihost.flags({**multihost.distributed(port, 2, i), "mesh.cpu_devices": 2})
  sample = ["--prompt=Once upon a time", "--num_samples=2", "--max_new_tokens=24", "--seed=3"]
  for rc, text, err in multihost.run(
      [multihost.script("sample.py", f"--workdir={cut}", *sample, *dist(i)) for i in range(2)], timeout=300):
    assert rc == 0, err[-3000:]
    # Gloo prints its connections to stdout; the samples follow in one block.
    assert text[text.index("--- sample 1"):] == alone + "---\n"
  port = multihost.free_port()
  dist = lambda i: multihost.flags({**multihost.distributed(port, 2, i), "mesh.cpu_devices": 2})
  alone = evaluate.evaluate_run(cut)
  for rc, out, err in multihost.run(
      [multihost.script("evaluate.py", f"--workdir={cut}", *dist(i)) for i in range(2)], timeout=300):
    assert rc == 0, err[-3000:]
    got = json.loads(out.splitlines()[-1])
    assert got["loss"] == pytest.approx(alone["loss"], rel=1e-6) and got["tokens"] == alone["tokens"]
