"""A run folder's config.json is enough to run it again, bit for bit (configs/from_run.py)."""

import json
import os

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import pytest

from configs import from_run
from jaxformer import checkpoint, config as config_lib, runs, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def micro_config(cache_dir):
  c = config_lib.base_config()
  c.model.update(dict(num_layers=2, num_heads=2, embed_dim=32, max_len=32, dropout=0.1))
  c.data.update(dict(num_stories=300, cache_dir=str(cache_dir), num_valid_batches=2))
  c.train.update(dict(batch_size=8, seq_len=32, steps=4, eval_every=2, log_every=1, checkpoint_every=2,
                      num_samples=0))
  c.optim.update(dict(lr=3e-3, warmup_steps=2))
  c.seed = 5
  return c


def metric_rows(workdir):
  """metrics.jsonl without the timing columns, which differ from run to run."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k not in ("tokens_per_sec", "mfu", "mfu_contended")} for r in rows]


def test_a_run_started_from_its_config_json_repeats_it_bitwise(tmp_path):
  original, again = str(tmp_path / "original"), str(tmp_path / "again")
  train.train_and_evaluate(micro_config(tmp_path / "cache"), original, log=lambda *_: None)

  config = from_run.get_config(original)
  # The round trip: config.json -> ConfigDict -> config.json is the identity.
  with open(os.path.join(original, "config.json")) as f:
    assert json.loads(config.to_json_best_effort()) == json.load(f)
  assert config.model.vocab_size > 0  # filled in by the first run; the same V again

  train.train_and_evaluate(config, again, log=lambda *_: None)
  a, b = metric_rows(original), metric_rows(again)
  assert len(a) == 4 + 2 and any("eval/loss" in r for r in a)
  assert a == b  # every loss, learning rate and gradient norm, exactly
  # summary.json's numbers too (all but the timings).
  keys = ("status", "step", "steps", "train_loss", "eval_loss", "best_eval_loss", "best_step", "entropy_floor",
          "num_params", "tokens")
  first, second = ({k: runs.read_summary(d)[k] for k in keys} for d in (original, again))
  assert first == second and (first["status"], first["step"], first["tokens"]) == ("finished", 4, 4 * 8 * 32)
  evals = [r["eval/loss"] for r in a if "eval/loss" in r]
  assert first["eval_loss"] == evals[-1] and first["best_eval_loss"] == min(evals)
  for x, y in zip(jax.tree_util.tree_leaves(checkpoint.load_run(original)[2]),
                  jax.tree_util.tree_leaves(checkpoint.load_run(again)[2])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with open(os.path.join(original, "config.json")) as f1, open(os.path.join(again, "config.json")) as f2:
    assert f1.read() == f2.read()

  # What scripts/train.py gets from --config=configs/from_run.py:RUN_DIR --config.train.steps=9.
  argv = ["train.py", f"--config={REPO}/configs/from_run.py:{original}", "--config.train.steps=9"]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  expected = config.copy_and_resolve_references()
  expected.train.steps = 9
  assert holder.value.to_dict() == expected.to_dict()


def test_a_folder_without_config_json_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no config.json; point --config=configs/from_run.py"):
    from_run.get_config(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="needs a run folder: --config=configs/from_run.py:RUN_DIR"):
    from_run.get_config()
