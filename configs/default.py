"""The demo: the tiny model on the built-in stories corpus, a few minutes on a laptop CPU."""

from jaxformer.config import base_config


def get_config():
  c = base_config()
  c.model.num_layers, c.model.num_heads, c.model.embed_dim = 4, 4, 128
  c.model.max_len = 256
  c.train.batch_size = 8
  c.train.seq_len = 256  # = max_len: learned positions past seq_len would never be trained
  c.train.steps = 600
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.train.log_every = 50
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  return c
