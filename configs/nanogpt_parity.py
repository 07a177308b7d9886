"""nanoGPT's shakespeare-char recipe for a 200-step loss comparison: `configs/nanogpt_parity.py:tiny` or `:small`.

The settings of nanoGPT's config/train_shakespeare_char.py with B=32 and a smaller
model (tiny 4L/4H/128, small 6L/6H/192; nanoGPT's own is 6L/6H/384 at B=64):
T=256, dropout 0.2 (residual, embedding and attention weights), no biases, AdamW
lr 1e-3, beta2 0.99, weight decay 0.1 on every matrix (embeddings too), clipping 1.0,
100 warm-up steps. nanoGPT decays the rate over 5000 steps, so at step 200 it is
still 99.9% of lr: a constant rate after warm-up here. The split is nanoGPT's
(first 90% of characters train). The validation batches cover the whole held-out
10%. Point data.path at your copy of Tiny Shakespeare.
"""

from jaxformer.config import base_config

SIZES = {"tiny": (4, 4, 128), "small": (6, 6, 192)}


def get_config(size: str = "tiny"):
  c = base_config()
  c.data.source, c.data.tokenizer = "text", "char"
  c.data.path = "data/tinyshakespeare.txt"
  c.data.num_valid_batches = 14      # 14 x 32 windows of 256: all 111,540 validation characters
  c.model.num_layers, c.model.num_heads, c.model.embed_dim = SIZES[size]
  c.model.max_len, c.model.use_bias = 256, False
  c.model.dropout = c.model.attn_dropout = 0.2
  c.model.scaled_residual_init = True  # nanoGPT's (GPT-2's) init
  c.train.update(dict(batch_size=32, seq_len=256, steps=200, eval_every=200, checkpoint_every=200, num_samples=0))
  c.optim.update(dict(lr=1e-3, b2=0.99, weight_decay=0.1, decay_embeddings=True, clip_norm=1.0,
                      warmup_steps=100, schedule="constant"))
  return c
