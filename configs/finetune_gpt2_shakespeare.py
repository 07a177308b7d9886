"""Fine-tune pretrained GPT-2 small (124M) on Tiny Shakespeare: nanoGPT's finetune_shakespeare.

train.init_from=hf:gpt2 takes the architecture, the weights and the BPE tokenizer from
the Hugging Face hub (cached; HF_HUB_OFFLINE respected). Without the network, put
gpt2's config.json, model.safetensors and tokenizer.json in a folder and pass
--config.train.init_from=FOLDER. Tiny Shakespeare (1.1 MB) is at
https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt;
point --config.data.path at your copy. nanoGPT's recipe: B=32 x T=1024 (here 8 x 4
micro-batches), constant lr 3e-5, 20 steps, no dropout. GPT-2's 50257 ids are padded to
50304 on import (zero rows, never scored or sampled), as configs/gpt2.py pads them.
"""

from jaxformer.config import base_config


def get_config():
  c = base_config()
  # The architecture comes from the checkpoint's config.json; these are GPT-2 small's, for
  # the checks that run before it is read (T <= max_len).
  c.model.num_layers, c.model.num_heads, c.model.embed_dim = 12, 12, 768
  c.model.vocab_size, c.model.vocab_multiple, c.model.max_len = 50304, 64, 1024
  c.model.activation, c.model.dropout = "gelu_tanh", 0.0
  c.train.init_from = "hf:gpt2"
  c.data.source = "text"
  c.data.path = "../shared/data/tinyshakespeare.txt"
  c.data.tokenizer = "bpe"
  c.train.seq_len = 1024
  c.train.batch_size = 32
  c.train.micro_batch_size = 8
  c.train.steps = 20
  c.train.eval_every = 5
  c.train.checkpoint_every = 10
  c.train.num_samples = 2
  c.optim.lr = 3e-5
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  c.optim.weight_decay = 0.0
  return c
