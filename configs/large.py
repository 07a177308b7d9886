"""The guide's large preset: 24 layers, 16 heads, C=768, on the built-in stories corpus."""

from jaxformer.config import base_config


def get_config():
  c = base_config()
  c.model.num_layers = 24
  c.model.num_heads = 16
  c.model.embed_dim = 768
  return c
