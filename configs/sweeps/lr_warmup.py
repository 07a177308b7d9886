"""Learning rate x warmup on the tiny preset: a 3 x 2 grid of 300-step runs.

The tiny model (4 layers, 4 heads, C=128) at B=16, T=128 on the built-in stories;
6 trials take about 10 minutes on a 2-core CPU at --parallel=1.

python scripts/sweep.py --sweep=configs/sweeps/lr_warmup.py
"""

from jaxformer import sweep


def get_config():
  s = sweep.sweep_config()
  s.config = "configs/tiny.py"
  s.overrides = {
      "train": {"batch_size": 16, "seq_len": 128, "steps": 300, "eval_every": 100,
                "checkpoint_every": 100, "log_every": 25, "num_samples": 0},
  }
  s.method = "grid"
  s.axes = {"optim": {"lr": (1e-3, 3e-3, 1e-2), "warmup_steps": (10, 100)}}
  return s
