"""The guide's medium preset: 12 layers, 12 heads, C=384, on the built-in stories corpus."""

from jaxformer.config import base_config


def get_config():
  c = base_config()
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.embed_dim = 384
  return c
