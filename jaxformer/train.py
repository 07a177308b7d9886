"""The train state, the jit'd train and eval steps, and `train_and_evaluate(config, workdir)`.

The train step is one pure function `(state, batch) -> (state, metrics)`, compiled
once with `jax.jit` over a device mesh with named shardings; the old state is donated.
"""

import dataclasses
import functools
import math
import os
import signal
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxformer import checkpoint
from jaxformer import config as config_lib
from jaxformer import data as data_lib
from jaxformer import metrics as metrics_lib
from jaxformer import model as model_lib
from jaxformer import optim
from jaxformer import sharding
from jaxformer import tokenizer as tokenizer_lib
from jaxformer.config import ConfigError


class TrainingError(RuntimeError):
  """Training cannot go on; the message says why."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # () int32: optimizer steps taken
  params: Any
  opt_state: Any
  rng: jax.Array         # (2,) uint32 raw key; step s uses fold_in(rng, s) for dropout


def cross_entropy(logits, batch):
  """Weighted mean next-token cross-entropy in float32, and its weight sum."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # (B, T)
  w = batch["weights"]
  total = jnp.sum(w)
  return jnp.sum(ce * w) / jnp.maximum(total, 1.0), total


def row_groups(grad_fn: Callable, groups: int) -> Callable:
  """grad_fn over a micro-batch's rows in `groups` sequential groups, gradients summed.

  Group g takes rows g, g + groups, ... (so a batch split over devices stays split).
  Each group's loss and gradient count by its share of the token weights, which
  gives the whole micro-batch's weighted mean up to rounding; dropout draws per group.
  """
  if groups == 1:
    return grad_fn

  def grouped(params, micro, rng):
    split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // groups, groups, *x.shape[1:]), 0, 1)
    parts = jax.tree_util.tree_map(split, micro)  # (groups, B / groups, T)
    weights = jnp.sum(parts["weights"].reshape(groups, -1), axis=1)
    share = weights / jnp.maximum(jnp.sum(weights), 1.0)

    def accumulate(carry, part_share_index):
      part, s, i = part_share_index
      loss, grads = grad_fn(params, part, jax.random.fold_in(rng, i))
      return jax.tree_util.tree_map(lambda c, x: c + s * x, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, params))
    out, _ = jax.lax.scan(accumulate, zeros, (parts, share, jnp.arange(groups)))
    return out

  return grouped


def train_step(state: TrainState, batch: dict, *, model, tx, schedule, skip_nonfinite: bool = True):
  """One optimizer step; `batch` arrays are (A, B, T): A micro-batches accumulated in a scan.

  A non-finite loss or gradient leaves params and optimizer state unchanged
  (the metrics say so); the host decides whether to stop.
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params, micro, rng):
    logits = model.apply({"params": params}, micro["inputs"], train=True, rngs={"dropout": rng})
    return cross_entropy(logits, micro)[0]

  grad_fn = row_groups(jax.value_and_grad(loss_fn),
                       model_lib.train_row_groups(model.cfg, batch["inputs"].shape[1]))
  num_micro = batch["inputs"].shape[0]
  if num_micro == 1:
    loss, grads = grad_fn(state.params, jax.tree_util.tree_map(lambda x: x[0], batch), dropout_rng)
  else:
    def accumulate(carry, micro_and_index):
      micro, i = micro_and_index
      loss, grads = grad_fn(state.params, micro, jax.random.fold_in(dropout_rng, i))
      return jax.tree_util.tree_map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, (batch, jnp.arange(num_micro)))
    loss, grads = jax.tree_util.tree_map(lambda x: x / num_micro, (loss, grads))

  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # The update itself too: a finite gradient times a bad learning rate is still poison.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
  if skip_nonfinite:
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
  metrics = {"train/loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
             "nonfinite": jnp.logical_not(finite).astype(jnp.int32)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, model):
  """(sum of weighted cross-entropy, sum of weights) for one (B, T) batch."""
  logits = model.apply({"params": params}, batch["inputs"])
  loss, total = cross_entropy(logits, batch)
  return loss * total, total


def evaluate(eval_fn: Callable, params, batches: list) -> float:
  """Mean loss per scored token over fixed batches; one host sync at the end."""
  sums = jax.device_get([eval_fn(params, b) for b in batches])  # all dispatched, then one fetch
  loss_sum = sum(float(s) for s, _ in sums)
  count = sum(float(c) for _, c in sums)
  return loss_sum / max(count, 1.0)


@jax.jit
def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


# ---------------------------------------------------------------------------- setup


def model_for(config, tokenizer) -> model_lib.ModelConfig:
  """The model config with V resolved from the tokenizer (padded), checked against it."""
  real_vocab = tokenizer_lib.vocab_size(tokenizer)
  V = config.model.vocab_size or model_lib.padded_vocab_size(real_vocab, config.model.vocab_multiple)
  if V < real_vocab:
    raise ConfigError(
        f"model.vocab_size ({V}) is smaller than the tokenizer's vocabulary ({real_vocab}); "
        "set model.vocab_size=0 to take it from the tokenizer.")
  return model_lib.model_config(config.model, V)


def state_shardings(model_cfg, tx, mesh):
  """(abstract state, its NamedShardings): optimizer moments are laid out like their params."""
  p_shard = sharding.param_shardings(model_cfg, mesh)
  abstract_params = jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.key(0)))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  repl = sharding.replicated(mesh)
  opt_shard = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, p_shard,
                                    transform_non_params=lambda _: repl)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  shardings = TrainState(step=repl, params=p_shard, opt_state=opt_shard, rng=repl)
  return abstract, shardings


def init_state(model_cfg, tx, shardings, seed: int) -> TrainState:
  """Created already sharded: no device ever holds the whole unsharded model."""
  def init():
    rng = jax.random.PRNGKey(seed)
    params = model_lib.init_params(model_cfg, jax.random.fold_in(rng, 1))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)
  return jax.jit(init, out_shardings=shardings)()


def compile_steps(model_cfg, tx, schedule, shardings, mesh, skip_nonfinite: bool):
  model = model_lib.Transformer(model_cfg)
  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule, skip_nonfinite=skip_nonfinite),
      in_shardings=(shardings, sharding.batch_sharding(mesh, 3)),
      out_shardings=(shardings, sharding.replicated(mesh)),
      donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, model=model),
                    in_shardings=(shardings.params, sharding.batch_sharding(mesh, 2)),
                    out_shardings=sharding.replicated(mesh))
  return step_fn, eval_fn


def maybe_initialize_distributed(config) -> None:
  """Multi-host through JAX's own runtime; settings from the config or the cluster's environment."""
  dist = config.distributed
  if not dist.enabled:
    return
  kwargs = {}
  if dist.coordinator_address:
    kwargs = dict(coordinator_address=dist.coordinator_address, num_processes=int(dist.num_processes),
                  process_id=int(dist.process_id))
  jax.distributed.initialize(**kwargs)


def check_batch(config, mesh) -> None:
  split = mesh.shape["data"] * mesh.shape["fsdp"]
  B = config.train.batch_size
  if B % split:
    raise ConfigError(
        f"train.batch_size ({B}) must be divisible by the data x fsdp mesh axes ({split}); "
        f"use a multiple of {split}.")
  if B % jax.process_count():
    raise ConfigError(f"train.batch_size ({B}) must be divisible by the {jax.process_count()} processes.")


def save_config(config, path: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(path + ".tmp", path)


def _prepare_init_from(config, workdir: str) -> None:
  """Fine-tuning uses the base run's tokenizer, so token ids mean the same thing."""
  src = os.path.join(config.train.init_from, "tokenizer.json")
  if not os.path.isfile(src):
    raise ConfigError(f"train.init_from={config.train.init_from} has no tokenizer.json; point it at a trained run folder.")
  dst = os.path.join(workdir, "tokenizer.json")
  if not os.path.exists(dst):
    tokenizer_lib.save_tokenizer(tokenizer_lib.load_tokenizer(src), dst)


def _check_init_from_arch(config, model_cfg) -> None:
  base = config_lib.load_config_json(os.path.join(config.train.init_from, "config.json"))
  base_cfg = model_lib.model_config(base.model)
  arch = lambda c: {k: v for k, v in dataclasses.asdict(c).items()
                    if k not in ("dropout", "attn_dropout", "dtype", "remat", "attention")}
  a, b = arch(base_cfg), arch(model_cfg)
  diff = [f"{k}: {a[k]} vs {b[k]}" for k in a if a[k] != b[k]]
  if diff:
    raise ConfigError(
        f"train.init_from={config.train.init_from} has another architecture ({'; '.join(diff)}); "
        "fine-tuning needs the same model settings.")


# ---------------------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, log: Callable = print,
                       stop_at: int | None = None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns a summary dict of the final numbers.

  `stop_at` ends this process early at that step with a checkpoint, as a preemption
  would; started again, the run continues exactly as if never stopped.
  """
  config_lib.validate(config)
  sharding.set_cpu_devices(config)  # before anything starts JAX
  maybe_initialize_distributed(config)
  os.makedirs(workdir, exist_ok=True)
  t, lead = config.train, jax.process_index() == 0
  if t.init_from:
    _prepare_init_from(config, workdir)

  data = data_lib.load_data(config.data, workdir, t.seq_len)
  model_cfg = model_for(config, data.tokenizer)
  config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy with V filled in
  config.model.vocab_size = model_cfg.vocab_size
  if lead:
    save_config(config, os.path.join(workdir, "config.json"))

  if model_cfg.pos_encoding == "learned" and t.seq_len < model_cfg.max_len:
    log(f"warning: train.seq_len {t.seq_len} < model.max_len {model_cfg.max_len}: learned positions past "
        f"{t.seq_len} are never trained, and samples longer than that degrade.")
  mesh = sharding.make_mesh(config.mesh)
  check_batch(config, mesh)
  if lead:
    shape = " x ".join(f"{k} {v}" for k, v in mesh.shape.items())
    log(f"mesh: {shape} over {jax.device_count()} {jax.devices()[0].platform} device(s)")
  schedule = optim.schedule(config.optim, t.steps)
  tx = optim.make_optimizer(config.optim, t.steps)
  abstract, shardings = state_shardings(model_cfg, tx, mesh)
  step_fn, eval_fn = compile_steps(model_cfg, tx, schedule, shardings, mesh, skip_nonfinite=True)

  fingerprint = tokenizer_lib.fingerprint(data.tokenizer)
  meta = {"jax": jax.__version__, "flax": flax.__version__, "orbax": checkpoint.ocp.__version__,
          "tokenizer": fingerprint, "num_params": model_lib.num_params(model_cfg)}
  mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints)
  best_mgr = checkpoint.manager(os.path.join(workdir, "best"), keep=1)
  abstract_sharded = checkpoint.abstract_like(abstract, shardings)
  restored = checkpoint.restore_latest(mgr, abstract_sharded, log=log)
  best_loss, evals_since_best = math.inf, 0
  if restored is not None:
    state, data_state, old_meta, start = restored
    if old_meta.get("tokenizer") != fingerprint:
      raise checkpoint.CheckpointError(
          f"the checkpoints in {workdir} were trained with another tokenizer ({old_meta.get('tokenizer')} vs "
          f"{fingerprint}); restore the run's tokenizer.json or use a new --workdir.")
    if data_state.get("seed") != config.seed:
      raise ConfigError(f"the run in {workdir} was started with seed {data_state.get('seed')}, not {config.seed}; "
                        "keep the seed to resume, or use a new --workdir.")
    best_loss = old_meta.get("best_loss", math.inf)
    evals_since_best = old_meta.get("evals_since_best", 0)
    log(f"resumed from step {start} in {workdir}")
  else:
    state = init_state(model_cfg, tx, shardings, config.seed)
    start = 0
    if t.init_from:
      _check_init_from_arch(config, model_cfg)
      params, _, base_step = checkpoint.restore_params(t.init_from, "latest", abstract_sharded.params)
      state = state.replace(params=params)
      log(f"fine-tuning from {t.init_from} (step {base_step}) with a fresh optimizer")

  valid = data_lib.validation_set(data, num_batches=config.data.num_valid_batches,
                                  batch_size=t.batch_size, seq_len=t.seq_len)
  batch2 = sharding.batch_sharding(mesh, 2)
  valid_batches = [sharding.global_batch(b, batch2) for b in valid.batches]  # put on devices once
  floor = valid.entropy_floor

  writer = metrics_lib.Writer(workdir, enabled=lead)
  progress = metrics_lib.Progress(t.steps, start, enabled=lead)
  flops_tok = model_lib.flops_per_token(model_cfg, t.seq_len)
  peak, peak_source = metrics_lib.peak_flops()
  tokens_per_step = t.batch_size * t.grad_accum * t.seq_len
  batch3 = sharding.batch_sharding(mesh, 3)
  A, B_local = t.grad_accum, t.batch_size // jax.process_count()

  def get_batch(step):
    local = data_lib.train_batch(data.train, seed=config.seed, step=step, batch_size=t.batch_size * A,
                                 seq_len=t.seq_len, process_index=jax.process_index(),
                                 process_count=jax.process_count())
    # (A*B_local, T) -> (A, B_local, T): micro-batch i is rows i*B_local..; same rows whatever A divides.
    local = {k: v.reshape(A, B_local, *v.shape[1:]) for k, v in local.items()}
    return sharding.global_batch(local, batch3)

  def save(state, step, best=False):
    if not bool(all_finite(state.params)):
      log(f"warning: parameters at step {step} are not finite; not checkpointed.")
      return
    m = dict(meta, best_loss=best_loss, evals_since_best=evals_since_best, step=step)
    checkpoint.save(best_mgr if best else mgr, step, state, {"seed": config.seed, "step": step}, m)

  stop = {"signal": None}
  def on_signal(signum, _frame):
    stop["signal"] = signum
  old_handlers = {}
  for sig in (signal.SIGINT, signal.SIGTERM):
    try:
      old_handlers[sig] = signal.signal(sig, on_signal)
    except ValueError:  # not the main thread
      pass

  summary = {"workdir": workdir, "start_step": start, "num_params": model_lib.num_params(model_cfg)}
  pending = None  # step n-1's metrics, read after step n is dispatched
  window = {"step": start, "time": time.perf_counter()}  # throughput since the last log line
  train_start = time.perf_counter()
  last = {}
  eval_loss = None
  step = start
  stopped_reason = "finished"

  def handle(metrics_host, at_step):
    nonlocal last
    if metrics_host["nonfinite"]:
      if t.nonfinite == "stop":
        raise TrainingError(
            f"non-finite loss or gradient at step {at_step} (loss {metrics_host['train/loss']}); the update was "
            "not applied and the last checkpoint is intact. Lower optim.lr, or set train.nonfinite=skip.")
      log(f"warning: non-finite loss or gradient at step {at_step}; update skipped.")
    last = metrics_host
    if at_step % t.log_every == 0 or at_step == t.steps:
      now = time.perf_counter()  # step at_step has finished: its metrics were just fetched
      tps = tokens_per_step * (at_step - window["step"]) / max(now - window["time"], 1e-9)
      window.update(step=at_step, time=now)
      info = {"train/loss": float(metrics_host["train/loss"]), "lr": float(metrics_host["lr"]),
              "grad_norm": float(metrics_host["grad_norm"]), "tokens_per_sec": tps,
              "mfu": metrics_lib.mfu(tps, flops_tok, peak, jax.device_count())}
      writer.write(at_step, info)
      eta = (t.steps - at_step) * tokens_per_step / max(tps, 1e-9)
      if progress.tty:
        progress.update(at_step, {"loss": info["train/loss"], "lr": info["lr"], "tok/s": int(tps)}, n=0)
      else:
        progress.log(metrics_lib.format_line(at_step, t.steps, {
            "loss": info["train/loss"], "lr": info["lr"], "tok/s": int(tps), "mfu": info["mfu"]}, eta))

  try:
    while step < t.steps:
      if stop["signal"] is not None or step == stop_at:
        stopped_reason = f"signal {stop['signal']}" if stop["signal"] is not None else f"stopped at {step}"
        break
      batch = get_batch(step)
      state, metrics = step_fn(state, batch)
      step += 1
      progress.update(step, {}, n=1)
      if pending is not None:
        handle(jax.device_get(pending[0]), pending[1])
      pending = (metrics, step)

      if step % t.eval_every == 0 or step == t.steps:
        handle(jax.device_get(pending[0]), pending[1])
        pending = None
        eval_loss = evaluate(eval_fn, state.params, valid_batches)
        improved = eval_loss < best_loss
        if improved:
          best_loss, evals_since_best = eval_loss, 0
        else:
          evals_since_best += 1
        info = {"eval/loss": eval_loss, "eval/perplexity": math.exp(min(eval_loss, 50.0))}
        if floor is not None:
          info.update({"eval/entropy_floor": floor, "eval/excess": eval_loss - floor})
        writer.write(step, info)
        progress.log(metrics_lib.format_line(step, t.steps, info))
        if improved:
          save(state, step, best=True)
        window.update(step=step, time=time.perf_counter())  # evaluation time is not training throughput
        if t.early_stopping_patience and evals_since_best >= t.early_stopping_patience:
          stopped_reason = f"early stopping: no improvement in {evals_since_best} evaluations"
          progress.log(stopped_reason)
          break
      if step % t.checkpoint_every == 0 and step != t.steps:
        save(state, step)
    if pending is not None:
      handle(jax.device_get(pending[0]), pending[1])
    if not mgr.latest_step() == step:
      save(state, step)
  finally:
    checkpoint.wait(mgr)
    checkpoint.wait(best_mgr)
    mgr.close()
    best_mgr.close()
    progress.close()
    writer.close()
    for sig, handler in old_handlers.items():
      signal.signal(sig, handler)

  wall = time.perf_counter() - train_start
  summary.update({
      "step": step, "stopped": stopped_reason, "wall_s": wall,
      "train/loss": float(last.get("train/loss", float("nan"))) if last else None,
      "eval/loss": eval_loss, "best_eval_loss": best_loss if best_loss < math.inf else None,
      "entropy_floor": floor, "peak_flops": peak, "peak_source": peak_source})
  return summary


def summary_line(s: dict) -> str:
  parts = [f"done: {s['step']} steps ({s['stopped']}) in {s['wall_s']:.0f} s"]
  if s.get("eval/loss") is not None:
    parts.append(f"validation loss {s['eval/loss']:.4f}")
  if s.get("entropy_floor") is not None and s.get("eval/loss") is not None:
    parts.append(f"entropy floor {s['entropy_floor']:.4f} (excess {s['eval/loss'] - s['entropy_floor']:.4f})")
  parts.append(f"run folder {s['workdir']}")
  return "; ".join(parts)
