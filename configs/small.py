"""The guide's small preset: 6 layers, 6 heads, C=192, on the built-in stories corpus."""

from jaxformer.config import base_config


def get_config():
  c = base_config()
  c.model.num_layers = 6
  c.model.num_heads = 6
  c.model.embed_dim = 192
  return c
