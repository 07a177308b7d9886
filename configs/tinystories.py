"""TinyStories from a local text file: stories separated by <|endoftext|>, byte-level BPE.

The default path is the 1,727-story sample in ../shared/data; any file in the
same format works (--config.data.path=FILE), e.g. TinyStoriesV2-GPT4-train.txt.
Every 10th story is held out for validation.
"""

from jaxformer.config import base_config


def get_config():
  c = base_config()
  c.data.source = "text"
  c.data.path = "../shared/data/tinystories_sample.txt"
  c.data.doc_separator = "<|endoftext|>"
  c.data.tokenizer = "bpe"
  c.data.bpe_vocab_size = 5000
  c.model.num_layers, c.model.num_heads, c.model.embed_dim = 4, 4, 192
  c.model.max_len = 256
  c.model.dropout = 0.1
  c.train.batch_size = 32
  c.train.seq_len = 256
  c.train.steps = 2000
  c.train.eval_every = 250
  c.train.checkpoint_every = 500
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  return c
