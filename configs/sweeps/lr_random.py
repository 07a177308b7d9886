"""Random search on the tiny preset: learning rate log-uniform, warmup and weight decay chosen.

Draws are a pure function of sweep.seed; --sweep.num_trials=N draws more (the
first trials stay the same, so a larger search reuses the finished ones).

python scripts/sweep.py --sweep=configs/sweeps/lr_random.py --parallel=2
"""

from jaxformer import sweep


def get_config():
  s = sweep.sweep_config()
  s.config = "configs/tiny.py"
  s.overrides = {
      "train": {"batch_size": 16, "seq_len": 128, "steps": 300, "eval_every": 100,
                "checkpoint_every": 100, "log_every": 25, "num_samples": 0},
  }
  s.method = "random"
  s.num_trials = 6
  s.seed = 0
  s.axes = {"optim": {"lr": "log_uniform(3e-4, 3e-2)", "warmup_steps": (10, 50, 100),
                      "weight_decay": (0.0, 0.1)}}
  return s
