"""jaxformer's train step on nanoGPT's shakespeare-char recipe (configs/nanogpt_parity.py:tiny, one
micro-batch), writing what nanogpt.py needs to retrace it: the initial parameters, every step's
batch and learning rate, the losses, and the final parameters.

python docs/nanogpt_parity/ours.py TINY_SHAKESPEARE.txt OUT_DIR [--steps=200 --seed=0 --dropout=0.2]

Not part of the package: the evidence behind the README's loss-parity section.
"""

import argparse
import importlib
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from jaxformer import cli  # noqa: E402
from jaxformer import config as config_lib  # noqa: E402
from jaxformer import model as model_lib  # noqa: E402
from jaxformer import optim, sharding, train  # noqa: E402
from jaxformer import tokenizer as tokenizer_lib  # noqa: E402
from jaxformer.data import batches, pipeline  # noqa: E402


def params_npz(path, params):
  np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)})


def main():
  cli.skip_absent_tpu()
  jax.config.update("jax_num_cpu_devices", 1)
  p = argparse.ArgumentParser()
  p.add_argument("text"), p.add_argument("out")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dropout", type=float, default=0.2)
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  c = importlib.import_module("configs.nanogpt_parity").get_config("tiny")
  c = config_lib.apply_overrides(c, {"data.path": a.text, "model.dropout": a.dropout, "model.attn_dropout": a.dropout,
                                     "train.micro_batch_size": 32, "mesh.cpu_devices": 1, "train.steps": a.steps,
                                     "seed": a.seed})
  data = pipeline.load_data(c.data, os.path.join(a.out, "work"), c.train.seq_len)
  real = tokenizer_lib.vocab_size(data.tokenizer)
  model = model_lib.Transformer(config_lib.model_config(c, config_lib.padded_vocab_size(real, c.model.vocab_multiple)),
                                config_lib.execution(c))
  mesh = sharding.make_mesh(c.mesh)
  schedule, tx = optim.schedule(c.optim, a.steps), optim.make_optimizer(c.optim, a.steps)
  _, shardings = train.state_shardings(model.cfg, tx, mesh, model.ex.param_dtype)
  step_fn, _ = train.compile_steps(model, tx, schedule, shardings, mesh, 1, real)
  state = train.init_state(model, tx, shardings, a.seed)
  params_npz(os.path.join(a.out, "init.npz"), state.params)
  losses, xs, ys, lrs = [], [], [], []
  for step in range(a.steps):
    b = batches.train_batch(data.train, seed=a.seed, step=step, batch_size=c.train.batch_size, seq_len=c.train.seq_len)
    xs.append(b["inputs"]), ys.append(b["targets"]), lrs.append(float(schedule(step)))
    batch, = sharding.device_batches([b], mesh)
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["train/loss"]))
  params_npz(os.path.join(a.out, "final.npz"), state.params)
  np.savez(os.path.join(a.out, "run.npz"), losses=np.array(losses), xs=np.stack(xs), ys=np.stack(ys),
           lrs=np.array(lrs), valid=np.asarray(data.valid), vocab=real, num_layers=model.cfg.num_layers,
           num_heads=model.cfg.num_heads, embed_dim=model.cfg.embed_dim, seq_len=c.train.seq_len)
  print(f"V {real} (padded {model.cfg.vocab_size}); train loss: first {losses[0]:.6f}, last {losses[-1]:.6f}")


if __name__ == "__main__":
  main()
