"""Training: the train state, the jit'd train and eval steps, set-up, and a flat loop.

The train step is one pure function `(state, batch) -> (state, metrics)`, compiled
once with `jax.jit` over a device mesh with named shardings; the old state is donated.
`train_and_evaluate(config, workdir)` builds everything once (`setup`), then runs
the loop, whose periodic work (logging, evaluation, checkpoints, the profiler) is
a few named functions of the run and the step.
"""

import dataclasses
import errno
import functools
import hashlib
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax

from jaxformer import checkpoint
from jaxformer import config as config_lib
from jaxformer import data as data_lib
from jaxformer import hf
from jaxformer import metrics as metrics_lib
from jaxformer import model as model_lib
from jaxformer import optim
from jaxformer import runs
from jaxformer import sharding
from jaxformer import tokenizer as tokenizer_lib
from jaxformer.config import ConfigError


class TrainingError(RuntimeError):
  """Training cannot go on; the message says why."""


# scripts/train.py's exit status for a run stopped by SIGTERM/SIGINT after its checkpoint:
# not finished, resumable (sysexits' EX_TEMPFAIL, "try again later").
EXIT_RESUMABLE = 75


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # () int32: optimizer steps taken
  params: Any
  opt_state: Any
  rng: jax.Array         # (2,) uint32 raw key; step s draws dropout from fold_in(rng, s)


@jax.custom_vjp
def logsumexp(x):
  """log(sum(exp(x))) over the last axis, in one pass over x (its gradient: softmax(x)).

  jax.nn.logsumexp reads x twice, for the max and then for the sum of exponentials; here one
  reduction carries both, rescaling the sum whenever the max grows (the online softmax). At
  GPT-2's (B=64, T, V) logits one read is 6.6 GB, ~1.4 ms of an H200 step.
  """
  return _logsumexp_fwd(x)[0]


def _logsumexp_fwd(x):
  def combine(a, b):  # one exp per element: the smaller max's sum is rescaled to the larger's
    (m1, s1), (m2, s2) = a, b
    m = jnp.maximum(m1, m2)
    e = jnp.exp(jnp.minimum(m1, m2) - jnp.where(jnp.isfinite(m), m, 0.0))  # not -inf - -inf = NaN
    return m, jnp.where(m1 >= m2, s1 + s2 * e, s1 * e + s2)
  init = (jnp.array(-jnp.inf, x.dtype), jnp.array(0.0, x.dtype))
  m, total = jax.lax.reduce((x, jnp.ones_like(x)), init, combine, (x.ndim - 1,))
  return m + jnp.log(total), (x, m, total)


def _logsumexp_bwd(res, g):
  x, m, total = res  # exp(x - max) / total, not exp(x - lse): lse rounds at large |x|
  base = jnp.where(jnp.isfinite(m), m, 0.0)[..., None]
  return ((g / total)[..., None] * jnp.exp(x - base),)


logsumexp.defvjp(_logsumexp_fwd, _logsumexp_bwd)


def cross_entropy(logits, batch, valid_vocab: int | None = None):
  """Weighted mean next-token cross-entropy in float32, and its weight sum.

  Ids from `valid_vocab` up are the model's padding (V rounded up for fast matmuls):
  no text holds them, so they get no probability (and no gradient).
  """
  V = logits.shape[-1]
  ids = jnp.arange(V)
  if valid_vocab is not None and valid_vocab < V:
    logits = jnp.where(ids < valid_vocab, logits, -jnp.inf)  # (B, T, V)
  # The target's logit picked by a compare, not a gather: its gradient is then elementwise and
  # fuses with the softmax's into one pass over (B, T, V), where a gather's is a scatter plus
  # two more passes (on an H200, GPT-2's step at B=32 spent 7 of 73 ms on those passes).
  target_logit = jnp.sum(jnp.where(ids == batch["targets"][..., None], logits, 0.0), axis=-1)  # (B, T)
  ce = logsumexp(logits) - target_logit  # (B, T)
  w = batch["weights"]
  total = jnp.sum(w)
  return jnp.sum(ce * w) / jnp.maximum(total, 1.0), total


def train_step(state: TrainState, batch: dict, *, model, tx, schedule, micro_batches: int,
               valid_vocab: int | None = None):
  """One optimizer step on a (B, T) batch, run as `micro_batches` sequential micro-batches.

  Micro-batch m takes rows m, m + M, ... (so each device's rows split evenly among
  them, without moving data); its loss and gradient count by its share of the token
  weights, which gives the whole batch's weighted mean up to rounding. Dropout masks
  are drawn per row from the step's key and the row's index, so they do not depend
  on M, the device count or the backend. A non-finite loss, gradient or update
  leaves params and optimizer state unchanged (the metrics say so).
  """
  M = micro_batches
  dropout_key = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params, micro):
    logits = model.apply({"params": params}, micro["inputs"], train=True, row_ids=micro["row_ids"],
                         rngs={"dropout": dropout_key})
    return cross_entropy(logits, micro, valid_vocab)[0]

  mesh = model.ex.mesh
  # Gradients in their parameters' layout: under FSDP each device keeps (reduce-scatters) its
  # shard of the summed gradient rather than all of it (an all-reduce).
  layout = (lambda g: g) if mesh is None else functools.partial(
      jax.lax.with_sharding_constraint, shardings=sharding.param_shardings(model.cfg, mesh))

  def grad_fn(params, micro):
    loss, grads = jax.value_and_grad(loss_fn)(params, micro)
    return loss, layout(grads)

  B = batch["inputs"].shape[0]
  batch = dict(batch, row_ids=jnp.arange(B, dtype=jnp.int32))
  if M == 1:
    loss, grads = grad_fn(state.params, batch)
  else:
    split = lambda x: jnp.swapaxes(x.reshape(B // M, M, *x.shape[1:]), 0, 1)  # (M, B/M, ...)
    micros = jax.tree_util.tree_map(split, batch)
    weights = jnp.sum(micros["weights"].reshape(M, -1), axis=1)
    shares = weights / jnp.maximum(jnp.sum(weights), 1.0)

    def accumulate(carry, micro_and_share):
      micro, share = micro_and_share
      loss, grads = grad_fn(state.params, micro)
      return jax.tree_util.tree_map(lambda c, x: c + share * x, carry, (loss, grads)), None

    # Summed in float32 whatever the parameters' dtype, then cast back for the optimizer.
    zeros = (jnp.zeros((), jnp.float32), layout(jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32),
                                                                         state.params)))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, (micros, shares))
    grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, state.params)

  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # A finite gradient times a bad learning rate is still poison, so the rate is checked too; the
  # AdamW update is then finite (eps > 0, b1 and b2 < 1: validated). Known before the update, the
  # choice of old or new fuses into the update's pass; a norm of the update would take a second
  # pass over parameters and moments (gpt2 at B=64 on an H200: 2.7 GB, ~250 kernels).
  lr = schedule(state.step)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(lr)
  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
  metrics = {"train/loss": loss, "grad_norm": grad_norm, "lr": lr,
             "nonfinite": jnp.logical_not(finite).astype(jnp.int32)}
  return state.replace(step=state.step + 1, params=keep(params, state.params),
                       opt_state=keep(opt_state, state.opt_state)), metrics


def eval_step(params, batch, *, model, valid_vocab: int | None = None):
  """(sum of weighted cross-entropy, sum of weights) for one (B, T) batch."""
  logits = model.apply({"params": params}, batch["inputs"])
  loss, total = cross_entropy(logits, batch, valid_vocab)
  return loss * total, total


def evaluate(eval_fn: Callable, params, batches: list) -> float:
  """Mean loss per scored token over fixed batches; one host sync at the end."""
  sums = jax.device_get([eval_fn(params, b) for b in batches])  # all dispatched, then one fetch
  return sum(float(s) for s, _ in sums) / max(sum(float(c) for _, c in sums), 1.0)


@jax.jit
def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


# ---------------------------------------------------------------------------- set-up


def micro_batches(config, mesh) -> int:
  """How many sequential micro-batches a step runs (train.micro_batch_size; 0 = auto).

  Auto: 4 rows per batch device on CPU (one micro-batch's activations stay in
  cache), the whole batch elsewhere. Every micro-batch keeps the same number of
  rows on each device.
  """
  B, split = config.train.batch_size, mesh.shape["data"] * mesh.shape["fsdp"]
  rows = config.train.micro_batch_size
  if rows:
    if rows % split:
      raise ConfigError(
          f"train.micro_batch_size ({rows}) must be a multiple of the data x fsdp mesh axes ({split}); "
          f"use a multiple of {split}.")
    return B // rows
  rows = 4 * split if mesh.devices.flat[0].platform == "cpu" else B
  M = max(1, B // rows)
  while B % M or (B // M) % split:
    M -= 1
  return M


def state_shardings(model_cfg, tx, mesh, param_dtype="float32"):
  """(abstract state, its NamedShardings): optimizer moments are laid out like their params."""
  p_shard = sharding.param_shardings(model_cfg, mesh)
  abstract_params = jax.eval_shape(
      lambda: model_lib.init_params(model_cfg, jax.random.key(0), model_lib.Execution(param_dtype=param_dtype)))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  repl = sharding.replicated(mesh)
  opt_shard = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, p_shard,
                                    transform_non_params=lambda _: repl)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  shardings = TrainState(step=repl, params=p_shard, opt_state=opt_shard, rng=repl)
  return abstract, shardings


def init_state(model, tx, shardings, seed: int, scaled_residual_init: bool = False) -> TrainState:
  """Created already sharded: no device ever holds the whole unsharded model."""
  def init():
    rng = jax.random.PRNGKey(seed)
    params = model_lib.init_params(model.cfg, jax.random.fold_in(rng, 1), model.ex)
    if scaled_residual_init:
      params = model_lib.scale_residual_projections(params, model.cfg.num_layers)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)
  return jax.jit(init, out_shardings=shardings)()


def compile_steps(model, tx, schedule, shardings, mesh, micro: int, valid_vocab: int | None = None):
  """The jit'd train step (state donated) and eval step, with their shardings.

  `valid_vocab`: the tokenizer's V; the padded ids above it are never scored.

  Inside them the model knows the mesh: activations keep the layouts of sharding.RULES
  and per-device kernels run per device.
  """
  model = model.clone(ex=dataclasses.replace(model.ex, mesh=mesh, rules=sharding.RULES))
  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule, micro_batches=micro,
                        valid_vocab=valid_vocab),
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  return step_fn, eval_function(model, shardings.params, mesh, valid_vocab)


def eval_function(model, param_shardings, mesh, valid_vocab: int | None = None) -> Callable:
  """The jit'd eval step over the mesh: sharded params and batch in, replicated sums out."""
  return jax.jit(functools.partial(eval_step, model=model, valid_vocab=valid_vocab),
                 in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def agree_across_processes(value: str, what: str, fix: str) -> None:
  """Raises the same ConfigError on every process when they hold different `value`s."""
  if jax.process_count() == 1:
    return
  digest = np.frombuffer(hashlib.sha256(value.encode()).digest()[:8], np.int64)
  values = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1)
  if len(set(values.tolist())) > 1:
    raise ConfigError(f"{what} differs between the {jax.process_count()} processes; {fix}")


def model_for(config, tokenizer, platform: str | None = None) -> model_lib.Transformer:
  """The model of `config` for `platform` (default: JAX's), V resolved from the tokenizer (padded)."""
  real_vocab = tokenizer_lib.vocab_size(tokenizer)
  V = config.model.vocab_size or config_lib.padded_vocab_size(real_vocab, config.model.vocab_multiple)
  if V < real_vocab:
    raise ConfigError(
        f"model.vocab_size ({V}) is smaller than the tokenizer's vocabulary ({real_vocab}); "
        "set model.vocab_size=0 to take it from the tokenizer.")
  return model_lib.Transformer(config_lib.model_config(config, V), config_lib.execution(config, platform))


def hf_source(init_from: str) -> bool:
  """Whether train.init_from names a GPT-2 checkpoint (hf:NAME, or a folder in the HF layout)."""
  return hf.is_hf(init_from) or runs.exists(runs.join(init_from, hf.WEIGHTS))


def _prepare_init_from(config, workdir: str):
  """(config, HF folder or None): fine-tuning uses the base's tokenizer, so token ids mean the
  same thing; from a GPT-2 checkpoint, its config.json sets the architecture too."""
  init_from, folder = config.train.init_from, None
  if hf_source(init_from):
    folder = hf.resolve(init_from)
    config = config_lib.apply_overrides(
        config, {**hf.model_values(hf.read_config(folder), config.model.vocab_multiple), "data.tokenizer": "bpe"},
        "train.init_from")
    config_lib.validate(config)
    tok = hf.load_tokenizer(folder)
  else:
    src = runs.tokenizer_path(init_from)
    if not runs.exists(src):
      raise ConfigError(f"train.init_from={init_from} has no tokenizer.json; point it at a trained run folder, "
                        "hf:gpt2 or a GPT-2 folder in the Hugging Face layout.")
    tok = tokenizer_lib.load_tokenizer(src)
  dst = runs.tokenizer_path(workdir)
  if not runs.exists(dst) and jax.process_index() == 0:
    runs.atomic_write(dst, tok.to_str())
  return config, folder


def check_init_from(init_from: str, model_cfg: model_lib.ModelConfig) -> None:
  """Fine-tuning needs the base run's architecture; execution settings may differ."""
  base = config_lib.model_config(config_lib.load_config_json(runs.join(init_from, runs.CONFIG)))
  diff = [f"model.{f.name}: {getattr(base, f.name)} vs {getattr(model_cfg, f.name)}"
          for f in dataclasses.fields(model_cfg) if getattr(base, f.name) != getattr(model_cfg, f.name)]
  if diff:
    raise ConfigError(
        f"train.init_from={init_from} has another architecture ({'; '.join(diff)}); "
        "fine-tuning needs the same model settings.")


@dataclasses.dataclass
class Run:
  """Everything the loop needs, built once by `setup`."""
  config: ml_collections.ConfigDict
  workdir: str
  lead: bool                 # process 0: the one that writes files and logs
  data: Any
  model: model_lib.Transformer
  mesh: Any
  rows: np.ndarray           # the rows of each (B, T) batch this process's devices hold
  step_fn: Callable
  eval_fn: Callable
  state: TrainState
  start: int
  valid_batches: list
  entropy_floor: float | None
  bytes_per_token: float     # UTF-8 bytes per scored validation token, for bits per byte
  checkpoints: Any           # CheckpointManager of checkpoints/
  best: Any                  # CheckpointManager of best/
  meta: dict                 # written with every checkpoint
  stopping: "EarlyStopping"
  lock: str | None = None    # train.lock, held by process 0
  timing: dict = dataclasses.field(default_factory=dict)  # seconds: data (tokenizer + token cache), setup


@dataclasses.dataclass
class EarlyStopping:
  """The best validation loss so far and the evaluations since; saved with each checkpoint."""
  patience: int
  best_loss: float = math.inf
  best_step: int | None = None
  since_best: int = 0

  def update(self, loss: float, step: int) -> bool:
    """Records an evaluation; True when it is a new best."""
    if loss < self.best_loss:
      self.best_loss, self.best_step, self.since_best = loss, step, 0
      return True
    self.since_best += 1
    return False

  @property
  def stop(self) -> bool:
    return self.patience > 0 and self.since_best >= self.patience


def setup(config, workdir: str, log: Callable = print) -> Run:
  """config -> data -> model -> mesh -> state (restored, fine-tuned from a base run, or fresh)."""
  config_lib.validate(config)
  sharding.set_cpu_devices(config)  # before anything starts JAX
  sharding.initialize_distributed(config.distributed)
  new_folder = not runs.exists(workdir)
  lock = runs.acquire_lock(workdir, log) if jax.process_index() == 0 else None
  start = time.perf_counter()
  try:
    run = _setup(config, workdir, lock, log)
    run.timing["setup_s"] = time.perf_counter() - start
    return run
  except BaseException:
    if lock:
      runs.release_lock(lock)
      if new_folder:  # a start that failed leaves no folder behind (its data cache lives elsewhere)
        runs.path(workdir).rmtree(missing_ok=True)
    raise


def _setup(config, workdir: str, lock: str | None, log: Callable) -> Run:
  lead, hf_folder = jax.process_index() == 0, None
  if config.train.init_from:
    config, hf_folder = _prepare_init_from(config, workdir)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("base tokenizer copied")
  t = config.train

  # Every process prepares the same tokenizer and data (one process per host builds the
  # cache, the others on that host wait for it); only process 0 writes run-folder files.
  data_start = time.perf_counter()
  data = data_lib.load_data(config.data, workdir, t.seq_len, save_tokenizer=lead)
  data_s = time.perf_counter() - data_start
  if lead:
    unknown = data.manifest.get("unknown_chars", 0)
    log(f"data ready in {data_s:.1f} s (tokenizer and token cache: {data.manifest['cache_dir']})"
        + (f"; {unknown} unknown characters written as <|unk|>" if unknown else ""))
  agree_across_processes(tokenizer_lib.fingerprint(data.tokenizer), "the tokenizer",
                         "give every host the same data and data.* settings.")
  model = model_for(config, data.tokenizer)
  config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy with V filled in
  config.model.vocab_size = model.cfg.vocab_size
  if config.optim.warmup_steps >= t.steps and lead:
    log(f"warning: optim.warmup_steps {config.optim.warmup_steps} >= train.steps {t.steps}: the learning rate "
        f"never leaves warm-up and never reaches optim.lr; lower optim.warmup_steps.")
  if model.cfg.pos_encoding == "learned" and t.seq_len < model.cfg.max_len:
    log(f"warning: train.seq_len {t.seq_len} < model.max_len {model.cfg.max_len}: learned positions past "
        f"{t.seq_len} are never trained, and samples longer than that degrade.")

  mesh = sharding.make_mesh(config.mesh)
  sharding.check_mesh(model.cfg, mesh, t.batch_size)
  micro = micro_batches(config, mesh)
  if lead:
    shape = " x ".join(f"{k} {v}" for k, v in mesh.shape.items())
    log(f"mesh: {shape} over {jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"{micro} micro-batch(es) of {t.batch_size // micro} rows per step")
  schedule = optim.schedule(config.optim, t.steps)
  tx = optim.make_optimizer(config.optim, t.steps)
  abstract, shardings = state_shardings(model.cfg, tx, mesh, model.ex.param_dtype)
  step_fn, eval_fn = compile_steps(model, tx, schedule, shardings, mesh, micro,
                                   tokenizer_lib.vocab_size(data.tokenizer))

  fingerprint = tokenizer_lib.fingerprint(data.tokenizer)
  meta = {"jax": jax.__version__, "flax": flax.__version__, "orbax": checkpoint.ocp.__version__,
          "tokenizer": fingerprint, "num_params": metrics_lib.num_params(model.cfg)}
  ckpts = checkpoint.manager(runs.join(workdir, "checkpoints"), keep=t.keep_checkpoints)
  best = checkpoint.manager(runs.join(workdir, "best"), keep=1)
  abstract = checkpoint.abstract_like(abstract, shardings)
  stopping = EarlyStopping(patience=t.early_stopping_patience)
  restored = checkpoint.restore_latest(ckpts, abstract, log=log)
  if restored is not None:
    state, data_state, old_meta, start = restored
    if old_meta.get("tokenizer") != fingerprint:
      raise checkpoint.CheckpointError(
          f"the checkpoints in {workdir} were trained with another tokenizer ({old_meta.get('tokenizer')} vs "
          f"{fingerprint}); restore the run's tokenizer.json or use a new --workdir.")
    if data_state.get("seed") != config.seed:
      raise ConfigError(f"the run in {workdir} was started with seed {data_state.get('seed')}, not {config.seed}; "
                        "keep the seed to resume, or use a new --workdir.")
    stopping.best_loss = old_meta.get("best_loss", math.inf)
    stopping.best_step = old_meta.get("best_step")
    stopping.since_best = old_meta.get("evals_since_best", 0)
    log(f"resumed from step {start} in {workdir}")
  else:
    state, start = init_state(model, tx, shardings, config.seed, config.model.scaled_residual_init), 0
    if hf_folder:
      state = state.replace(params=hf.load_params(hf_folder, model.cfg, abstract.params))
      log(f"fine-tuning from {t.init_from} (GPT-2 weights, {hf_folder}) with a fresh optimizer")
    elif t.init_from:
      check_init_from(t.init_from, model.cfg)
      params, _, base_step = checkpoint.restore_params(t.init_from, "latest", abstract.params)
      state = state.replace(params=params)
      log(f"fine-tuning from {t.init_from} (step {base_step}) with a fresh optimizer")
  drop_later_best(best, start, log)
  # Only now is the run known to start: a refused resume never replaces the config its checkpoints need.
  if lead:
    runs.atomic_write(runs.join(workdir, runs.CONFIG), config.to_json_best_effort(indent=2, sort_keys=True))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("config.json written")
    agree_across_processes(str(runs.exists(runs.join(workdir, runs.CONFIG))), "whether the run folder holds "
                           "config.json", f"--workdir={workdir} must be one folder every process sees: a bucket "
                           "(gs://...) or a shared file system.")

  valid = data_lib.validation_set(data, num_batches=config.data.num_valid_batches,
                                  batch_size=t.batch_size, seq_len=t.seq_len)
  valid_batches = sharding.device_batches(valid.batches, mesh)  # on the devices once
  rows = sharding.batch_rows(sharding.batch_sharding(mesh), t.batch_size)
  return Run(config=config, workdir=workdir, lead=lead, data=data, model=model, mesh=mesh, rows=rows,
             step_fn=step_fn,
             eval_fn=eval_fn, state=state, start=start, valid_batches=valid_batches,
             entropy_floor=valid.entropy_floor, checkpoints=ckpts, best=best, meta=meta, stopping=stopping,
             bytes_per_token=metrics_lib.bytes_per_token(valid.batches, tokenizer_lib.token_bytes(data.tokenizer)),
             lock=lock, timing={"data_s": data_s})


def drop_later_best(best, start: int, log: Callable) -> None:
  """Deletes best/ checkpoints after the step the run resumes from.

  They belong to steps the run is about to compute again (after a fallback past an
  unreadable checkpoint, or with checkpoints/ emptied); left there, the same step's new
  best could not be saved.
  """
  later = [s for s in best.all_steps() if s > start]
  for s in later:
    best.delete(s)
  if later:
    best.reload()
    log(f"warning: removed best/ checkpoint(s) {later}: they are after step {start}, where the run resumes.")


# ---------------------------------------------------------------------------- periodic work


def get_batch(run: Run, step: int) -> dict:
  """The global (B, T) batch of `step`, assembled from the rows this process's devices hold."""
  t = run.config.train
  local = data_lib.train_batch(run.data.train, seed=run.config.seed, step=step, batch_size=t.batch_size,
                               seq_len=t.seq_len, rows=run.rows)
  return sharding.global_batch(local, run.rows, t.batch_size, sharding.batch_sharding(run.mesh))


def save_checkpoint(run: Run, step: int, best: bool = False, log: Callable = print) -> None:
  """Saves the state (async) unless its parameters are not finite."""
  if not bool(all_finite(run.state.params)):
    log(f"warning: parameters at step {step} are not finite; not checkpointed.")
    return
  s = run.stopping
  meta = dict(run.meta, best_loss=s.best_loss, best_step=s.best_step, evals_since_best=s.since_best, step=step)
  checkpoint.save(run.best if best else run.checkpoints, step, run.state, {"seed": run.config.seed, "step": step},
                  meta)


def run_evaluation(run: Run, step: int) -> dict:
  """Validation loss (and on stories the entropy floor) of the current parameters."""
  loss = evaluate(run.eval_fn, run.state.params, run.valid_batches)
  info = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)),
          "eval/bpb": metrics_lib.bits_per_byte(loss, run.bytes_per_token)}
  if run.entropy_floor is not None:
    info.update({"eval/entropy_floor": run.entropy_floor, "eval/excess": loss - run.entropy_floor,
                 "eval/bpb_floor": metrics_lib.bits_per_byte(run.entropy_floor, run.bytes_per_token)})
  return info


def check_finite(run: Run, metrics: dict, step: int, log: Callable) -> None:
  """Stops the run on a skipped (non-finite) update when train.nonfinite=stop, else warns."""
  if metrics["nonfinite"]:
    if run.config.train.nonfinite == "stop":
      raise TrainingError(
          f"non-finite loss or gradient at step {step} (loss {metrics['train/loss']}); the update was "
          "not applied and the last checkpoint is intact. Lower optim.lr, or set train.nonfinite=skip.")
    log(f"warning: non-finite loss or gradient at step {step}; update skipped.")


class Throughput:
  """Tokens per second over the training steps since the last reading (evaluation time excluded)."""

  def __init__(self, step: int, tokens_per_step: int):
    self.tokens_per_step, self.step, self.time = tokens_per_step, step, time.perf_counter()

  def read(self, step: int) -> float:
    now = time.perf_counter()
    tps = self.tokens_per_step * (step - self.step) / max(now - self.time, 1e-9)
    self.step, self.time = step, now
    return tps

  def restart(self, step: int) -> None:
    self.step, self.time = step, time.perf_counter()


class Profiler:
  """A JAX profiler trace of the steps in train.profile_steps ("START,END") in WORKDIR/profile."""

  def __init__(self, run: Run):
    self.window = config_lib.profile_steps(run.config.train) if run.lead else None
    self.path, self.active = runs.join(run.workdir, "profile"), False

  def at(self, step: int, state) -> None:
    """Called before step `step` is dispatched."""
    if self.window and step == self.window[0]:
      jax.profiler.start_trace(self.path)
      self.active = True
    elif self.window and step == self.window[1]:
      self.stop(state)

  def stop(self, state) -> None:
    if self.active:
      jax.block_until_ready(state)  # the traced steps' device work belongs in the trace
      jax.profiler.stop_trace()
      self.active = False


@dataclasses.dataclass
class Reporter:
  """Training metrics every train.log_every steps and evaluations, to metrics.jsonl, TensorBoard, console."""
  writer: metrics_lib.Writer
  progress: metrics_lib.Progress
  throughput: Throughput
  flops_per_token: float
  peak: float
  steps: int
  log_every: int
  last: dict = dataclasses.field(default_factory=dict)   # the newest train metrics fetched
  tokens_per_sec: float | None = None
  warned_contended: bool = False

  def train(self, metrics: dict, step: int) -> None:
    self.last = metrics
    if step % self.log_every and step != self.steps:
      return
    tps = self.tokens_per_sec = self.throughput.read(step)
    info = {"train/loss": float(metrics["train/loss"]), "lr": float(metrics["lr"]),
            "grad_norm": float(metrics["grad_norm"]), "tokens_per_sec": tps,
            "mfu": metrics_lib.mfu(tps, self.flops_per_token, self.peak, jax.device_count())}
    if metrics_lib.contended(tps, self.flops_per_token, self.peak, jax.device_count()):
      info["mfu_contended"] = 1.0
      if not self.warned_contended:
        self.warned_contended = True
        self.progress.log("warning: these steps ran faster than the peak measured at start (the machine was "
                          "busier then); MFU is clamped to 1 and marked mfu_contended in metrics.jsonl.")
    self.writer.write(step, info)
    short = {"loss": info["train/loss"], "lr": info["lr"], "tok/s": int(tps)}
    if self.progress.tty:
      self.progress.update(step, short, n=0)
    else:
      eta = (self.steps - step) * self.throughput.tokens_per_step / max(tps, 1e-9)
      self.progress.log(metrics_lib.format_line(step, self.steps, dict(short, mfu=info["mfu"]), eta))

  def eval(self, info: dict, step: int) -> None:
    self.writer.write(step, info)
    self.progress.log(metrics_lib.format_line(step, self.steps, info))
    self.throughput.restart(step)  # evaluation time is not training throughput

  def close(self) -> None:
    self.progress.close()
    self.writer.close()


class StopSignals:
  """SIGINT/SIGTERM set a flag that the loop reads between steps (a checkpoint, then exit).

  On many processes a signal reaches each at its own moment, but all must stop after
  the same step: JAX's preemption notifier (started by jax.distributed) catches
  SIGTERM and the processes agree on the step to stop after.
  """

  def __init__(self):
    self.signal, self._old = None, {}
    self.many = jax.process_count() > 1
    for sig in () if self.many else (signal.SIGINT, signal.SIGTERM):
      try:
        self._old[sig] = signal.signal(sig, self._on_signal)
      except ValueError:  # not the main thread
        pass

  def _on_signal(self, signum, _frame):
    self.signal = signum

  def stop(self, step: int) -> bool:
    """Whether to stop before `step`; call it at every step, on every process."""
    if self.many and multihost_utils.reached_preemption_sync_point(step):
      self.signal = signal.SIGTERM
    return self.signal is not None

  def restore(self) -> None:
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def write_summary(run: Run, **fields) -> dict:
  """summary.json: how the run stands (status, steps, losses, time); process 0 writes it."""
  s = run.stopping
  summary = {"workdir": run.workdir, "steps": run.config.train.steps, "start_step": run.start,
             "best_eval_loss": s.best_loss if s.best_loss < math.inf else None, "best_step": s.best_step,
             "entropy_floor": run.entropy_floor, "num_params": run.meta["num_params"],
             "valid_bytes_per_token": run.bytes_per_token, **fields}
  if summary["best_eval_loss"] is not None:
    summary["best_eval_bpb"] = metrics_lib.bits_per_byte(summary["best_eval_loss"], run.bytes_per_token)
  summary["tokens"] = summary.get("step", run.start) * run.config.train.batch_size * run.config.train.seq_len
  if run.lead:
    runs.write_json(runs.join(run.workdir, runs.SUMMARY), summary)
  return summary


def record(run: Run, report: Reporter, pending: tuple, log: Callable) -> None:
  """Fetches a dispatched step's (metrics, step) in one host sync, then checks and logs them."""
  metrics, step = jax.device_get(pending)
  check_finite(run, metrics, step, log)
  report.train(metrics, step)


# ---------------------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, log: Callable = print,
                       stop_at: int | None = None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the summary it writes to summary.json.

  `stop_at` ends this process early at that step with a checkpoint, as a preemption
  would; started again, the run continues exactly as if never stopped.
  """
  # Orbax logs a failed background write as an error with its traceback, then raises it:
  # its log goes to errors.log, the exception to the caller.
  orbax_log = logging.getLogger("absl")
  handler = logging.FileHandler(detail_log_path(workdir), delay=True)
  handler.handleError = lambda record: None  # a full disk loses the log, not the run
  orbax_log.addHandler(handler)
  propagate, orbax_log.propagate = orbax_log.propagate, False
  # What background threads print (tensorstore's callbacks after a failed write) goes there too.
  stderr, sys.stderr = sys.stderr, checkpoint.MainThreadOnly(sys.stderr, detail_log_path(workdir))
  keep_quiet = False
  try:
    run = setup(config, workdir, log)
    try:
      return _train(run, log, stop_at)
    finally:
      if run.lock:
        runs.release_lock(run.lock)
  except Exception as err:
    why = storage_problem(err, workdir)
    if why is None:
      raise
    detail, keep_quiet = quiet_storage_errors(workdir, err), True
    steps = checkpoint.complete_steps(runs.join(workdir, "checkpoints"))
    kept = f"the newest complete checkpoint (step {steps[-1]}) is kept" if steps else "no checkpoint was complete"
    raise TrainingError(f"could not write the run in {workdir} ({why}); {kept}. Free space or fix the "
                        f"permissions, then run the same command to resume (details: {detail}).") from None
  finally:
    if not keep_quiet:
      orbax_log.removeHandler(handler)
      orbax_log.propagate = propagate
      sys.stderr = stderr
    try:
      handler.close()
    except OSError:  # what it held could not be written (a full disk): the log is lost, not the run
      pass


def detail_log_path(workdir: str) -> str:
  """WORKDIR/errors.log, or a local file for a run in a bucket (objects cannot be appended to)."""
  if runs.is_remote(workdir):
    return os.path.join(tempfile.gettempdir(), f"jaxformer-{os.getpid()}.log")
  return runs.join(workdir, runs.LOG)


def _train(run: Run, log: Callable, stop_at: int | None) -> dict:
  t, workdir = run.config.train, run.workdir
  peak, peak_source = metrics_lib.peak_flops()
  report = Reporter(metrics_lib.Writer(workdir, enabled=run.lead, start_step=run.start),
                    metrics_lib.Progress(t.steps, run.start, run.lead),
                    Throughput(run.start, t.batch_size * t.seq_len),
                    metrics_lib.flops_per_token(run.model.cfg, t.seq_len), peak, t.steps, t.log_every)
  profiler, signals = Profiler(run), StopSignals()
  step, pending, eval_loss, compile_s = run.start, None, None, None
  status, reason = "finished", "reached train.steps"
  wall_start = time.perf_counter()
  write_summary(run, status="running", stop_reason="", step=step)
  try:
    while step < t.steps:
      if signals.stop(step) or step == stop_at:
        status = "stopped"
        reason = f"signal {signals.signal}" if signals.signal is not None else f"stopped at step {step}"
        break
      profiler.at(step, run.state)
      step_start = time.perf_counter()
      run.state, metrics = run.step_fn(run.state, get_batch(run, step))
      if compile_s is None:  # the first call compiles before it dispatches
        compile_s = time.perf_counter() - step_start
      step += 1
      report.progress.update(step, {}, n=1)
      if pending is not None:  # step n-1's metrics, fetched once step n is dispatched
        record(run, report, pending, log)
      pending = (metrics, step)

      if step % t.eval_every == 0 or step == t.steps:
        record(run, report, pending, log)
        pending = None
        info = run_evaluation(run, step)
        eval_loss = info["eval/loss"]
        report.eval(info, step)
        if run.stopping.update(eval_loss, step):
          save_checkpoint(run, step, best=True, log=log)
        if run.stopping.stop:
          status = "early_stopped"
          reason = f"early stopping: no improvement in {run.stopping.since_best} evaluations"
          report.progress.log(reason)
          break
      if step % t.checkpoint_every == 0 and step != t.steps:
        save_checkpoint(run, step, log=log)
    if pending is not None:
      record(run, report, pending, log)
    if run.checkpoints.latest_step() != step:
      save_checkpoint(run, step, log=log)
  except BaseException as err:
    status, reason = "failed", f"{type(err).__name__}: {err}"
    if storage_problem(err, workdir):  # before the clean-up below, whose Orbax calls fail noisily in turn
      quiet_storage_errors(workdir, err)
    raise
  finally:
    profiler.stop(run.state)
    checkpoint.wait(run.checkpoints)
    checkpoint.wait(run.best)
    run.checkpoints.close()
    run.best.close()
    report.close()
    signals.restore()
    last = report.last
    summary = write_summary(
        run, status=status, stop_reason=reason, step=step, wall_s=time.perf_counter() - wall_start,
        train_loss=float(last["train/loss"]) if last else None, eval_loss=eval_loss,
        tokens_per_sec=report.tokens_per_sec, peak_flops=peak, peak_source=peak_source,
        timing={**run.timing, "compile_s": compile_s})  # wall_s: the training loop, compile included
  return summary


STORAGE_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "quota exceeded", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied", errno.EROFS: "read-only file system"}


def storage_problem(err: BaseException, workdir: str) -> str | None:
  """'disk full', 'permission denied', ... if `err` (or an error it came from) is one, else None.

  Orbax reports them as ValueErrors that carry only the text of the OS error. A
  permission error counts only where it names the run folder (not, say, a data file).
  """
  seen, folder = set(), str(runs.path(workdir))
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    code = err.errno if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS else None
    code = code or next((c for c in STORAGE_ERRNOS if os.strerror(c) in str(err)), None)
    about_run = folder in f"{getattr(err, 'filename', '')} {err}"
    if code is not None and (code in (errno.ENOSPC, errno.EDQUOT) or about_run):
      return STORAGE_ERRNOS[code]
    err = err.__cause__ or err.__context__
  return None


def quiet_storage_errors(workdir: str, err: BaseException) -> str:
  """Writes `err`'s traceback to WORKDIR/errors.log (on a full disk, a temporary file), then sends
  stderr there too: what Orbax's threads print as they fail in turn. Returns the log's path."""
  if isinstance(sys.stderr, checkpoint.Appender):  # already quiet
    return sys.stderr.path
  text = "".join(traceback.format_exception(err))
  for log_path in (detail_log_path(workdir), os.path.join(tempfile.gettempdir(), f"jaxformer-{os.getpid()}.log")):
    try:
      with open(log_path, "a") as f:
        f.write(text)
      break
    except OSError:
      continue

  checkpoint.quiet_background(log_path, everything=True)
  return log_path


def summary_line(s: dict) -> str:
  parts = [f"done: {s['step']} steps ({s['stop_reason']}) in {s['wall_s']:.0f} s"]
  timing = s.get("timing") or {}
  if timing.get("compile_s") is not None:
    parts[0] += f" (compiling {timing['compile_s']:.0f} s)"
  if timing.get("data_s") is not None:
    parts.append(f"data preparation {timing['data_s']:.0f} s, set-up {timing['setup_s']:.0f} s before that")
  if s.get("eval_loss") is not None:
    bpb = metrics_lib.bits_per_byte(s["eval_loss"], s.get("valid_bytes_per_token", 0.0))
    parts.append(f"validation loss {s['eval_loss']:.4f} ({bpb:.4f} bits per byte)")
  if s.get("entropy_floor") is not None and s.get("eval_loss") is not None:
    parts.append(f"entropy floor {s['entropy_floor']:.4f} (excess {s['eval_loss'] - s['entropy_floor']:.4f})")
  parts.append(f"run folder {s['workdir']}")
  return "; ".join(parts)
