"""GPT-2 small, architecturally exact: 12 layers, 12 heads, C=768, V=50257, T=1024.

Learned positions, tied head, biases, tanh-approximated GELU, LayerNorm eps 1e-5,
so GPT-2's published weights load into it with matching logits.
"""

from jaxformer.config import base_config


def get_config():
  c = base_config()
  m = c.model
  m.num_layers, m.num_heads, m.embed_dim = 12, 12, 768
  m.vocab_size, m.vocab_multiple, m.max_len = 50257, 1, 1024
  m.pos_encoding, m.activation = "learned", "gelu_tanh"
  m.use_bias, m.tie_embeddings, m.ln_eps = True, True, 1e-5
  m.dropout = 0.0
  c.train.seq_len = 1024
  c.train.batch_size = 8
  c.optim.lr = 6e-4
  c.optim.warmup_steps = 100
  return c
