"""Evaluation of a trained run: the trainer's own numbers back, other corpora, errors; its attention plot."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxformer import checkpoint, evaluate, plots, runs, train
from jaxformer import config as config_lib
from jaxformer.config import ConfigError
from jaxformer.data import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny trained run: evaluations (and checkpoints) at steps 3 and 6."""
  root = tmp_path_factory.mktemp("evaluate")
  c = config_lib.base_config()
  c.model.update(dict(num_layers=2, num_heads=2, embed_dim=32, max_len=32))
  c.data.update(dict(num_stories=300, cache_dir=str(root / "cache"), num_valid_batches=2))
  c.train.update(dict(batch_size=8, seq_len=32, steps=6, eval_every=3, log_every=3, checkpoint_every=3,
                      num_samples=0))
  c.optim.update(dict(lr=1e-2, warmup_steps=1))
  train.train_and_evaluate(c, str(root / "run"), log=lambda *_: None)
  return str(root / "run")


def eval_rows(run_dir):
  return {r["step"]: r for r in runs.read_metrics(run_dir) if "eval/loss" in r}


def test_evaluate_gives_back_the_trainers_validation_loss(run_dir):
  evals = eval_rows(run_dir)
  latest = evaluate.evaluate_run(run_dir, "latest")
  assert latest["step"] == 6
  assert latest["loss"] == pytest.approx(evals[6]["eval/loss"], abs=1e-6)
  assert latest["entropy_floor"] == pytest.approx(evals[6]["eval/entropy_floor"], abs=1e-12)
  assert latest["excess"] == pytest.approx(evals[6]["eval/excess"], abs=1e-6)
  assert latest["perplexity"] == pytest.approx(evals[6]["eval/perplexity"], rel=1e-6)
  assert latest["tokens"] > 0 and latest["batches"] == 2
  # Bits per byte: the same nats over the text's UTF-8 bytes (stories are ASCII: a byte per character,
  # EOT none), and the trainer logged the same.
  assert 0.9 < latest["bytes_per_token"] < 1.0
  assert latest["bpb"] == pytest.approx(latest["loss"] / (math.log(2) * latest["bytes_per_token"]), rel=1e-12)
  assert latest["bpb"] == pytest.approx(evals[6]["eval/bpb"], rel=1e-6)
  assert latest["bpb_floor"] == pytest.approx(evals[6]["eval/bpb_floor"], rel=1e-9)
  step3 = evaluate.evaluate_run(run_dir, "3")
  assert step3["loss"] == pytest.approx(evals[3]["eval/loss"], abs=1e-6)
  best = evaluate.evaluate_run(run_dir, "best")
  assert best["loss"] == pytest.approx(min(r["eval/loss"] for r in evals.values()), abs=1e-6)
  json.dumps(best)  # the script prints it as one JSON object
  # summary.json, which sweeps and the results table read, says the same.
  summary = runs.read_summary(run_dir)
  assert (summary["status"], summary["step"], summary["steps"]) == ("finished", 6, 6)
  assert summary["eval_loss"] == pytest.approx(latest["loss"], abs=1e-6)
  assert summary["best_eval_loss"] == pytest.approx(best["loss"], abs=1e-6)
  status = runs.run_status(run_dir)
  assert status["status"] == "finished" and status["final_eval_loss"] == summary["eval_loss"]


def test_evaluate_with_other_windows_and_on_another_corpus(run_dir, tmp_path):
  shorter = evaluate.evaluate_run(run_dir, "latest", {"train.seq_len": 16, "train.batch_size": 32})
  assert shorter["seq_len"] == 16 and shorter["batch_size"] == 32 and shorter["loss"] > 0
  # Text made of the stories' own characters evaluates with the run's tokenizer...
  text = tmp_path / "same_chars.txt"
  text.write_text("Sam was a gentle boy who lived in a quiet town. He loved to read books. " * 40)
  other = evaluate.evaluate_run(run_dir, "latest", {"data.source": "text", "data.path": str(text)})
  assert other["data"]["kind"] == "text" and "entropy_floor" not in other and other["loss"] > 0
  # ...and a character it has never seen is a clear DataError, not a silent remapping...
  (tmp_path / "odd.txt").write_text("Sam was a gentle boy. § ¶ ~ " * 40)
  odd = {"data.source": "text", "data.path": str(tmp_path / "odd.txt")}
  with pytest.raises(DataError, match="characters the run's char tokenizer has never seen: '~', '§', '¶'; "
                                      "pass --config.data.unknown_chars=unk"):
    evaluate.evaluate_run(run_dir, "latest", odd)
  # ...unless asked to map them to <|unk|>: then it scores the text and says how many it mapped.
  mapped = evaluate.evaluate_run(run_dir, "latest", {**odd, "data.unknown_chars": "unk"})
  assert mapped["unknown_chars"] == 3 * 40 and mapped["loss"] > 0
  # The cache that holds <|unk|> ids is not read under the refusing policy.
  with pytest.raises(DataError, match="holds 120 characters the run's char tokenizer has never seen"):
    evaluate.evaluate_run(run_dir, "latest", odd)


def test_evaluate_errors(run_dir, tmp_path):
  with pytest.raises(ConfigError, match="--config.model.num_layers cannot change at evaluation"):
    evaluate.evaluate_run(run_dir, "latest", {"model.num_layers": 3})
  with pytest.raises(ConfigError, match=r"^evaluation override 'data.pathh' names no config field \(data has .*; "
                                        r"did you mean \"path\"\?\); fix the name\.$"):
    evaluate.evaluate_run(run_dir, "latest", {"data.pathh": "x.txt"})
  with pytest.raises(ConfigError, match="train.seq_len .* is longer than model.max_len"):
    evaluate.evaluate_run(run_dir, "latest", {"train.seq_len": 64})
  with pytest.raises(checkpoint.CheckpointError, match="has no tokenizer.json"):
    evaluate.evaluate_run(str(tmp_path), "best")
  with pytest.raises(checkpoint.CheckpointError, match="has no checkpoint at step 5"):
    evaluate.evaluate_run(run_dir, "5")


def test_evaluate_script_prints_one_json_object(run_dir):
  out = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), f"--workdir={run_dir}",
                        "--checkpoint=latest", "--config.data.num_valid_batches=1", "--config.train.batch_size=32"],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout)
  assert result["step"] == 6 and result["batches"] == 1 and set(result) >= {"loss", "perplexity", "tokens",
                                                                             "entropy_floor", "excess"}


def test_positions_plot_of_a_trained_run_shows_its_learned_table(run_dir, tmp_path):
  model_cfg, table = plots.position_encoding(run_dir, "latest")
  assert model_cfg.pos_encoding == "learned" and table.shape == (32, 32)
  _, _, params, *_ = checkpoint.load_run(run_dir, "latest")
  np.testing.assert_array_equal(table, np.asarray(params["pos_embed"]))  # the trained table, not an init
  out = plots.plot_positions(model_cfg, str(tmp_path / "positions.png"), table)
  assert os.path.getsize(out) > 1000


def test_attention_plot_of_a_trained_run(run_dir, tmp_path):
  weights, labels = plots.prompt_attention(run_dir, "Sam was kind.", "latest")
  assert weights.shape == (2, 2, 14, 14) and labels[0] == "<eot>" and labels[1:4] == ["S", "a", "m"]
  out = plots.plot_attention(weights, labels, str(tmp_path / "attention.png"))
  assert os.path.getsize(out) > 1000
  with pytest.raises(ValueError, match="the model sees at most 31"):
    plots.prompt_attention(run_dir, "Sam " * 10, "latest")
