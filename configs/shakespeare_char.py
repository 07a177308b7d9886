"""Tiny Shakespeare, char level: nanoGPT's shakespeare-char baseline, scaled to a CPU.

nanoGPT uses 6 layers, 6 heads, C=384, T=256, B=64, dropout 0.2 for 5000 steps;
here C=192 and B=32. The file is split as usual: first 90% of characters train,
last 10% validation. Point it at your copy with --config.data.path=FILE.
"""

from jaxformer.config import base_config


def get_config():
  c = base_config()
  c.data.source = "text"
  c.data.path = "../shared/data/tinyshakespeare.txt"
  c.data.tokenizer = "char"
  c.model.num_layers, c.model.num_heads, c.model.embed_dim = 6, 6, 192
  c.model.max_len = 256
  c.model.dropout = 0.2
  c.train.batch_size = 32
  c.train.seq_len = 256
  c.train.steps = 2000
  c.train.eval_every = 250
  c.train.checkpoint_every = 500
  c.optim.lr = 1e-3
  c.optim.b2 = 0.99             # nanoGPT's choice for this small a batch
  c.optim.warmup_steps = 100
  return c
