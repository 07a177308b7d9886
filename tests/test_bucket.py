"""A run folder in a bucket (gs://), against a GCS emulator on 127.0.0.1: train, stop, resume, sample, evaluate."""

import os

from etils import epath

from configs import default
from jaxformer import checkpoint, config as config_lib, evaluate, runs, sampling, train
from gcs_emulator import gcs_bucket  # noqa: F401  (the fixture)
import multihost


def test_a_run_folder_in_a_bucket_trains_stops_resumes_samples_and_evaluates(gcs_bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would land here
  c = config_lib.apply_overrides(default.get_config(), {
      **multihost.TINY, "train.steps": 8, "train.eval_every": 4, "train.checkpoint_every": 4,
      "data.cache_dir": str(tmp_path / "cache")})
  quiet = lambda *_: None
  workdir = gcs_bucket + "/runs/tiny"
  stopped = train.train_and_evaluate(c, workdir, log=quiet, stop_at=4)
  assert stopped["status"] == "stopped" and runs.read_summary(workdir)["status"] == "stopped"
  names = {p.name for p in epath.Path(workdir).iterdir()}
  assert {"config.json", "tokenizer.json", "metrics.jsonl", "summary.json", "checkpoints", "best"} <= names
  assert any(n.startswith("events.out.tfevents") for n in names)  # TensorBoard, uploaded whole
  assert runs.read_config(workdir).train.steps == 8

  finished = train.train_and_evaluate(c, workdir, log=quiet)
  assert finished["status"] == "finished" and finished["start_step"] == 4
  assert [r["step"] for r in runs.read_metrics(workdir) if "train/loss" in r] == list(range(1, 9))
  # The same run in a local folder: the bucket changes nothing, to the bit.
  local = train.train_and_evaluate(c, str(tmp_path / "local"), log=quiet)
  assert finished["eval_loss"] == local["eval_loss"]
  assert sorted(os.listdir(tmp_path)) == ["cache", "local"]  # nothing of the bucket run landed locally

  _, model, params, tok, step, _ = checkpoint.load_run(workdir)
  assert step == 8
  texts = sampling.sample_text(params, model, tok, ["Once"], max_new_tokens=12, seed=0)
  _, model, local_params, tok, _, _ = checkpoint.load_run(str(tmp_path / "local"))
  assert texts == sampling.sample_text(local_params, model, tok, ["Once"], max_new_tokens=12, seed=0)
  assert evaluate.evaluate_run(workdir)["loss"] == evaluate.evaluate_run(str(tmp_path / "local"))["loss"]
