"""GPT-2 small: 12 layers, 12 heads, C=768, T=1024, for training from scratch.

Learned positions, tied head, biases, tanh-approximated GELU, LayerNorm eps 1e-5:
GPT-2's architecture. Its 50257 token ids are padded to 50304, a multiple of 64, as
nanoGPT does: the head's matmul then tiles evenly (GPT-2's step on an H200 ran 1.22x
faster), and the padded ids are never scored or sampled. GPT-2's published weights
(V = 50257) load through --config.train.init_from=hf:gpt2, which takes the
architecture from their config.json and pads their table the same way.
"""

from jaxformer.config import base_config


def get_config():
  c = base_config()
  m = c.model
  m.num_layers, m.num_heads, m.embed_dim = 12, 12, 768
  m.vocab_size, m.vocab_multiple, m.max_len = 50304, 64, 1024
  m.pos_encoding, m.activation = "learned", "gelu_tanh"
  m.use_bias, m.tie_embeddings, m.ln_eps = True, True, 1e-5
  m.dropout = 0.0
  c.train.seq_len = 1024
  c.train.batch_size = 8
  c.optim.lr = 6e-4
  c.optim.warmup_steps = 100
  return c
