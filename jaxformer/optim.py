"""The Optax transformation from the config: warmup + decay schedule, AdamW, decay mask, clipping."""

import jax
import optax


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to lr, then cosine / linear decay to lr * min_lr_ratio, or constant."""
  lr, warmup = optim_cfg.lr, int(optim_cfg.warmup_steps)
  floor = lr * optim_cfg.min_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  if optim_cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=optim_cfg.min_lr_ratio)
  elif optim_cfg.schedule == "linear":
    decay = optax.linear_schedule(lr, floor, decay_steps)
  else:
    decay = optax.constant_schedule(lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params, decay_embeddings: bool = False):
  """Weight decay on matrices only (kernels, and embeddings if asked); never biases or LayerNorm."""
  def decide(path, leaf):
    name = jax.tree_util.keystr(path)
    if "embedding" in name or "pos_embed" in name:
      return decay_embeddings
    return leaf.ndim >= 2
  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping first; moments are kept in the parameters' float32."""
  sched = schedule(optim_cfg, total_steps)
  adamw = optax.adamw(
      sched, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
      weight_decay=optim_cfg.weight_decay,
      mask=lambda p: decay_mask(p, optim_cfg.decay_embeddings))
  if optim_cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), adamw)
  return adamw
