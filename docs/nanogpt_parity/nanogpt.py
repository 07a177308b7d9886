"""nanoGPT's own model.py and AdamW retracing a run of ours.py: same initial weights, same batches,
same learning rates. Prints both per-step losses' largest difference and both validation losses,
scored the same way (the whole held-out split in non-overlapping windows).

python docs/nanogpt_parity/nanogpt.py NANOGPT_CHECKOUT OUT_DIR [--dropout=0.2 --torch_seed=0
    --classes=N --nanogpt_warmup]

--classes keeps the first N of the vocabulary (65: nanoGPT's characters, without our <|endoftext|>
and <|unk|>); --nanogpt_warmup uses nanoGPT's lr * (it + 1) / (warmup + 1) instead of ours.
Needs torch (a CPU build will do) and a nanoGPT checkout (github.com/karpathy/nanoGPT, model.py).
"""

import argparse
import os
import sys

import numpy as np
import torch


def main():
  p = argparse.ArgumentParser()
  p.add_argument("nanogpt"), p.add_argument("out")
  p.add_argument("--dropout", type=float, default=0.2)
  p.add_argument("--torch_seed", type=int, default=0)
  p.add_argument("--classes", type=int, default=0)
  p.add_argument("--nanogpt_warmup", action="store_true")
  a = p.parse_args()
  sys.path.insert(0, a.nanogpt)
  from model import GPT, GPTConfig  # nanoGPT's
  torch.manual_seed(a.torch_seed)
  run = np.load(os.path.join(a.out, "run.npz"))
  L, H, C, T = (int(run[k]) for k in ("num_layers", "num_heads", "embed_dim", "seq_len"))
  V = a.classes or int(run["vocab"])
  t = lambda x: torch.tensor(np.ascontiguousarray(x), dtype=torch.float32)

  def build(params):
    m = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=H, n_embd=C, dropout=a.dropout, bias=False))
    with torch.no_grad():  # our (in, out) kernels are torch's (out, in) weights transposed
      m.transformer.wte.weight.copy_(t(params["['embed']['embedding']"][:V]))
      m.transformer.wpe.weight.copy_(t(params["['pos_embed']"][:T]))
      m.transformer.ln_f.weight.copy_(t(params["['ln_f']['scale']"]))
      for i, b in enumerate(m.transformer.h):
        g = lambda name: params[f"['block_{i}']{name}"]
        b.ln_1.weight.copy_(t(g("['ln1']['scale']")))
        b.ln_2.weight.copy_(t(g("['ln2']['scale']")))
        b.attn.c_attn.weight.copy_(t(g("['attn']['qkv']['kernel']").reshape(C, 3 * C).T))  # (C, 3, H, D): q|k|v
        b.attn.c_proj.weight.copy_(t(g("['attn']['proj']['kernel']").reshape(C, C).T))
        b.mlp.c_fc.weight.copy_(t(g("['mlp']['fc']['kernel']").T))
        b.mlp.c_proj.weight.copy_(t(g("['mlp']['proj']['kernel']").T))
    return m

  def valid_loss(m):
    m.eval()
    v = run["valid"].astype(np.int64)
    n, total = (len(v) - 1) // T, 0.0
    with torch.no_grad():
      for i in range(0, n, 32):
        starts = np.arange(i, min(i + 32, n)) * T
        x = torch.tensor(np.stack([v[s:s + T] for s in starts]))
        y = torch.tensor(np.stack([v[s + 1:s + T + 1] for s in starts]))
        logits, _ = m(x, y)
        total += torch.nn.functional.cross_entropy(logits.view(-1, V), y.view(-1), reduction="sum").item()
    return total / (n * T)

  m = build(np.load(os.path.join(a.out, "init.npz")))
  opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")  # nanoGPT's: decay on every matrix
  m.train()
  losses = []
  for step, lr in enumerate(run["lrs"]):
    for group in opt.param_groups:
      group["lr"] = 1e-3 * min(1.0, (step + 1) / 101) if a.nanogpt_warmup else float(lr)
    _, loss = m(torch.tensor(run["xs"][step].astype(np.int64)), torch.tensor(run["ys"][step].astype(np.int64)))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(loss.item())
  diff = np.abs(np.array(losses) - run["losses"])
  print(f"train loss, largest |nanoGPT - ours| over {len(diff)} steps: {diff.max():.2e}")
  print(f"validation loss: nanoGPT {valid_loss(m):.6f}, "
        f"ours {valid_loss(build(np.load(os.path.join(a.out, 'final.npz')))):.6f}")


if __name__ == "__main__":
  main()
