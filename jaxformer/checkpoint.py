"""Every Orbax call lives here: save, restore (latest, best, a step), resume, fine-tune.

A run folder holds `checkpoints/` (the last N) and `best/` (the best by validation
loss). Each checkpoint has three items: `state` (params, optimizer state, step,
RNG), `data` (the batch stream's state) and `meta` (versions, tokenizer fingerprint).
"""

import gc
import logging
import os
import sys
import tempfile
import threading
import traceback
import warnings
from typing import Any, Optional

import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp

from jaxformer import config as config_lib
from jaxformer import model as model_lib
from jaxformer import runs
from jaxformer import sharding
from jaxformer import tokenizer as tokenizer_lib

ITEMS = ("state", "data", "meta")


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used; the message says why and what to do."""


def manager(directory: str, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
  # On many processes Orbax names its save barriers by step; checkpoints/ and best/ both save
  # the last step, so each folder's barriers carry its name or the two saves collide.
  prefix = runs.path(directory).name
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=not read_only,
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix))
  return ocp.CheckpointManager(runs.path(directory), options=options, item_names=ITEMS)


def save(mgr: ocp.CheckpointManager, step: int, state, data_state: dict, meta: dict) -> None:
  """Starts an asynchronous save; call `wait(mgr)` before the process exits."""
  mgr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
      meta=ocp.args.JsonSave(meta)), force=True)


def complete_steps(directory: str) -> list[int]:
  """The steps of the finished checkpoints in `directory` (a save cut short leaves a *-tmp folder)."""
  p = runs.path(directory)
  return sorted(int(d.name) for d in p.iterdir() if d.name.isdigit()) if p.is_dir() else []


def wait(mgr: ocp.CheckpointManager) -> None:
  mgr.wait_until_finished()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, so a checkpoint restores onto any mesh."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _restore_step(mgr, step: int, abstract_state):
  out = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
      meta=ocp.args.JsonRestore()))
  return out["state"], dict(out["data"]), dict(out["meta"])


def restore_latest(mgr, abstract_state, log=print) -> Optional[tuple[Any, dict, dict, int]]:
  """(state, data_state, meta, step) from the newest readable checkpoint, or None if there are none.

  A checkpoint that cannot be read (truncated or corrupt files) is reported and the one
  before it is used. If none can be read, that is an error (most often another model
  or optimizer than the one saved): training never starts afresh over a run's checkpoints.
  """
  steps = sorted(mgr.all_steps(), reverse=True)
  if not steps:
    return None
  errors = []
  for step in steps:
    try:
      state, data_state, meta = _restore_step(mgr, step, abstract_state)
    except Exception as err:  # pylint: disable=broad-except
      errors.append((step, _one_line(err)))
      continue
    for bad_step, why in errors:
      # Moved aside (not deleted) so the run can save that step again and the files stay inspectable.
      directory = runs.path(mgr.directory)
      aside = directory.parent / (directory.name + "_unreadable") / str(bad_step)
      if jax.process_index() == 0:
        aside.parent.mkdir(parents=True, exist_ok=True)
        if aside.exists():
          aside.rmtree()
        (directory / str(bad_step)).rename(aside)
      log(f"warning: checkpoint {bad_step} in {mgr.directory} could not be read ({why}); "
          f"moved it to {aside} and resuming from step {step} instead.")
    if errors:
      if jax.process_count() > 1:  # every process lists the steps after process 0 has moved them
        multihost_utils.sync_global_devices("unreadable checkpoints moved aside")
      mgr.reload()
    return state, data_state, meta, step
  raise CheckpointError(
      f"no checkpoint in {mgr.directory} fits this config (step {errors[0][0]}: {errors[0][1]}); "
      "resume with the config the run was started with, or use a new --workdir.")


def _one_line(err: Exception) -> str:
  text = str(err).strip().split(" See full TensorStore details")[0].splitlines()
  return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def restore_params(directory: str, which: str, abstract_params, log=None) -> tuple[Any, dict, int]:
  """Only the parameters (and meta) of a run: for sampling, evaluation and fine-tuning.

  `which`: "latest", "best" or a step number. `abstract_params` carries target shardings.
  For "latest", an unreadable newest checkpoint is skipped with one warning (training
  moves it aside when it resumes) and the newest readable one is used.
  """
  sub = "best" if which == "best" else "checkpoints"
  path = runs.join(directory, sub)
  if not runs.path(path).is_dir():
    raise CheckpointError(
        f"{directory} has no {sub}/ folder; train a model there first (scripts/train.py --workdir={directory}).")
  mgr = manager(path, read_only=True)
  steps = sorted(mgr.all_steps())
  if not steps:
    raise CheckpointError(f"{path} holds no finished checkpoint; train longer or pick another run.")
  if which == "latest":
    candidates = steps[::-1]
  elif which == "best":
    candidates = steps[-1:]
  else:
    step = int(which)
    if step not in steps:
      raise CheckpointError(f"{path} has no checkpoint at step {step}; it has steps {steps}.")
    candidates = [step]
  target = {"params": abstract_params}
  args = ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item=target, partial_restore=True,
          restore_args=jax.tree_util.tree_map(
              lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), target)),
      meta=ocp.args.JsonRestore())
  errors = []
  # A damaged checkpoint's reads fail in tensorstore's threads too, which print into Orbax's
  # closed event loop for a while: that goes to a log file, the one warning to the console.
  stderr = sys.stderr
  if not isinstance(stderr, MainThreadOnly):
    sys.stderr = MainThreadOnly(stderr, os.path.join(tempfile.gettempdir(), f"jaxformer-{os.getpid()}.log"))
  try:
    for step in candidates:
      try:
        out = mgr.restore(step, args=args)
      except Exception as err:  # pylint: disable=broad-except
        errors.append((step, _one_line(err)))
        # The failed read leaves coroutines that print as they are collected, which can be in the
        # main thread during the next read ("Exception ignored in: <coroutine ...>"): from here on
        # that goes to the log too, and they are collected now.
        quiet_background(sys.stderr.log.path)
        gc.collect()
        continue
      for bad, why in errors:
        (log or _warn)(f"warning: checkpoint {bad} in {path} could not be read ({why}); using step {step}.")
      return out["state"]["params"], dict(out["meta"]), step
  finally:
    mgr.close()
    if not errors:  # after a failed read they keep printing for a while: not onto the console
      sys.stderr = stderr
  step, why = errors[0]
  raise CheckpointError(
      f"the parameters in {path} (step {step}) could not be read into this model ({why}); the architectures "
      "must match, and a damaged checkpoint needs another (--checkpoint=STEP).")


def _warn(message: str) -> None:
  print(message, file=sys.stderr)


class Appender:
  """A text stream that appends to a file and never fails (the disk may be full)."""

  def __init__(self, path: str):
    self.path = path

  def write(self, text: str) -> int:
    try:
      with open(self.path, "a") as f:
        f.write(text)
    except OSError:
      pass
    return len(text)

  def flush(self) -> None:
    pass


class MainThreadOnly:
  """sys.stderr for the main thread; what other threads write is appended to a log file."""

  def __init__(self, stream, path: str):
    self.stream, self.log = stream, Appender(path)

  def write(self, text: str) -> int:
    if threading.current_thread() is threading.main_thread():
      return self.stream.write(text)
    return self.log.write(text)

  def __getattr__(self, name):  # flush, isatty, fileno, encoding: the stream's
    return getattr(self.stream, name)


def serving_mesh(config, overrides: dict):
  """The mesh a trained run is loaded onto: the run's own, unless `overrides` (mesh.* keys) say
  otherwise or it does not fit these devices (then every device holds the whole model)."""
  mesh_cfg = config_lib.apply_overrides(config, overrides, "--config").mesh
  try:
    return sharding.make_mesh(mesh_cfg)
  except config_lib.ConfigError:
    if overrides:
      raise
    return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))


def load_run(workdir: str, which: str = "latest", overrides: dict | None = None):
  """(config, model, params, tokenizer, step, mesh) of a trained run, its parameters on the mesh.

  `overrides` may hold distributed.* keys (this process then joins the others: every
  process calls this and holds its shards) and mesh.* keys (the mesh to load onto;
  default `serving_mesh`). The model computes with the run's own execution
  settings (config.compute).
  """
  overrides = dict(overrides or {})
  for key in overrides:
    if not key.startswith(("mesh.", "distributed.")):
      raise config_lib.ConfigError(
          f"--config.{key} cannot change when loading a trained run; only mesh.* and distributed.* can.")
  pick = lambda prefix: {k: v for k, v in overrides.items() if k.startswith(prefix)}
  if "mesh.cpu_devices" in overrides:  # a CPU host split into devices, as in training
    sharding.set_cpu_devices(config_lib.apply_overrides(config_lib.base_config(), pick("mesh."), "--config"))
  sharding.initialize_distributed(
      config_lib.apply_overrides(config_lib.base_config(), pick("distributed."), "--config").distributed)
  tok_path = runs.tokenizer_path(workdir)
  if not runs.exists(tok_path):
    raise CheckpointError(f"{workdir} has no tokenizer.json; point --workdir at a run folder made by scripts/train.py.")
  config = config_lib.load_config_json(runs.join(workdir, runs.CONFIG))
  tokenizer = runs.read_tokenizer(workdir)
  model = model_lib.Transformer(config_lib.model_config(config), config_lib.execution(config))
  mesh = serving_mesh(config, pick("mesh."))
  sharding.check_mesh(model.cfg, mesh)
  abstract = abstract_like(
      jax.eval_shape(lambda: model_lib.init_params(model.cfg, jax.random.key(0), model.ex)),
      sharding.param_shardings(model.cfg, mesh))
  params, meta, step = restore_params(workdir, which, abstract)
  if meta.get("tokenizer") not in (None, tokenizer_lib.fingerprint(tokenizer)):
    raise CheckpointError(
        f"{tok_path} is not the tokenizer the checkpoint was trained with; restore the run's own tokenizer.json.")
  return config, model, params, tokenizer, step, mesh


logging.getLogger("absl").setLevel(logging.WARNING)


def quiet_background(log_path: str, everything: bool = False) -> None:
  """Sends what Orbax's threads and coroutines print after a failed read or write to `log_path`.

  They fail in turn until the process exits ("Event loop is closed", "Task exception
  was never retrieved", "coroutine ... was never awaited" as each is collected, in
  any thread): their detail goes to the log, the console keeps the main
  thread's output (all of stderr with `everything`; scripts print their one-line
  error to sys.__stderr__).
  """
  to_log = Appender(log_path).write
  if everything:
    sys.stderr = Appender(log_path)
  elif not isinstance(sys.stderr, MainThreadOnly):
    sys.stderr = MainThreadOnly(sys.stderr, log_path)
  asyncio_log = logging.getLogger("asyncio")
  asyncio_log.propagate = False
  if not asyncio_log.handlers:
    asyncio_log.addHandler(logging.StreamHandler(Appender(log_path)))
  threading.excepthook = lambda a: to_log("".join(traceback.format_exception(a.exc_type, a.exc_value,
                                                                             a.exc_traceback)))
  sys.unraisablehook = lambda u: to_log(f"{u.err_msg or 'Exception ignored in'}: {u.object!r}\n" + "".join(
      traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))
  show = warnings.showwarning

  def showwarning(message, category, filename, lineno, file=None, line=None):  # the coroutines never run
    if issubclass(category, RuntimeWarning) and "was never awaited" in str(message):
      to_log(warnings.formatwarning(message, category, filename, lineno, line))
    else:
      show(message, category, filename, lineno, file, line)
  warnings.showwarning = showwarning
