"""TPE search with Hyperband pruning on the tiny preset: learning rate, warmup and weight decay.

12 trials of 300 steps; the first 4 are random, then TPE proposes values near the best so far.
Every evaluation (each 50 steps) goes to the pruner, which stops trials whose validation loss
lags the others' at the same step (Hyperband's brackets start at 50 steps, a third kept per rung).

python scripts/sweep.py --sweep=configs/sweeps/lr_tpe.py --workers=2
"""

from jaxformer import sweep


def get_config():
  s = sweep.sweep_config()
  s.config = "configs/tiny.py"
  s.overrides = {
      "train": {"batch_size": 16, "seq_len": 128, "steps": 300, "eval_every": 50,
                "checkpoint_every": 50, "log_every": 25, "num_samples": 0},
  }
  s.method = "tpe"
  s.num_trials = 12
  s.seed = 0
  s.axes = {"optim": {"lr": "log_uniform(3e-4, 3e-2)", "warmup_steps": "int_uniform(0, 100)",
                      "weight_decay": (0.0, 0.1)}}
  s.pruner = "hyperband"
  s.min_resource = 50
  s.reduction_factor = 3
  return s
