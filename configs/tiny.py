"""The guide's tiny preset: 4 layers, 4 heads, C=128, on the built-in stories corpus."""

from jaxformer.config import base_config


def get_config():
  c = base_config()
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.embed_dim = 128
  return c
