"""The device mesh and how parameters and batches are laid on it.

Mesh axes: `data` (replicas), `fsdp` (batch split + parameters sharded),
`tensor` (heads, MLP width and vocabulary split). Logical axis names from
`model.py` map to mesh axes by RULES, the one place that decides layouts: of the
parameters, and (inside the train step) of the activations, whose channels stay
whole on every device.
"""

import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxformer import model as model_lib
from jaxformer.config import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
)


# Auto mode's most CPU devices: measured on 2 cores only (docs/performance.md).
MAX_AUTO_CPU_DEVICES = 8


def auto_cpu_devices(config, cores: int) -> int:
  """mesh.cpu_devices=0's count on `cores` cores: one per core, a divisor of the batch (1: JAX's own)."""
  if (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) != (-1, 1, 1):
    return 1  # an explicit mesh names its own device count
  return max(d for d in range(1, min(cores, MAX_AUTO_CPU_DEVICES) + 1) if config.train.batch_size % d == 0)


def set_cpu_devices(config) -> int:
  """Splits a CPU host into mesh.cpu_devices XLA devices (0: auto); returns the count set, or 0.

  Must run before JAX starts (before any array or device query). Auto leaves
  alone a count the user chose (XLA_FLAGS or jax_num_cpu_devices) and a JAX
  that has already started (as in a test session); an explicit count that can
  no longer be applied is an error.
  """
  want = int(config.mesh.cpu_devices)
  explicit = want > 0
  if not explicit:
    if ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
        or jax.config.jax_num_cpu_devices != -1):
      return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    want = auto_cpu_devices(config, cores)
    if want == 1:
      return 0
  try:
    jax.config.update("jax_num_cpu_devices", want)
  except RuntimeError:  # the backend already exists
    have = len(jax.devices("cpu"))
    if explicit and have != want:
      raise ConfigError(
          f"mesh.cpu_devices={want} cannot apply: JAX already started with {have} CPU device(s) in this "
          "process; set it in a fresh process (scripts/train.py does) or leave it 0 (auto).") from None
    return 0
  return want


def initialize_distributed(dist) -> None:
  """Joins the other processes of a multi-host job (jax.distributed), once, before JAX starts.

  `dist` is the config's `distributed` section. With no coordinator address, JAX
  finds the cluster itself (a TPU slice, SLURM, Open MPI, Kubernetes) or reads
  JAX_COORDINATOR_ADDRESS.
  """
  if not dist.enabled or jax.distributed.is_initialized():
    return
  kwargs = {}
  if dist.coordinator_address:
    kwargs = dict(coordinator_address=dist.coordinator_address, num_processes=int(dist.num_processes),
                  process_id=int(dist.process_id))
  jax.distributed.initialize(**kwargs)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  fsdp, tensor = int(mesh_cfg.fsdp), int(mesh_cfg.tensor)
  data = int(mesh_cfg.data)
  if data == -1:
    if num_devices % (fsdp * tensor):
      raise ConfigError(
          f"mesh.fsdp x mesh.tensor = {fsdp * tensor} does not divide the {num_devices} devices; "
          "choose sizes whose product divides the device count.")
    data = num_devices // (fsdp * tensor)
  if data * fsdp * tensor != num_devices:
    raise ConfigError(
        f"the mesh data x fsdp x tensor = {data}x{fsdp}x{tensor} = {data * fsdp * tensor} does not match "
        f"the {num_devices} available devices; set mesh.data=-1 or sizes whose product is {num_devices}.")
  return data, fsdp, tensor


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  # Plain Mesh (not jax.make_mesh): its axes are not Explicit, so jit with named shardings just works.
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def param_shardings(cfg: model_lib.ModelConfig, mesh: Mesh):
  """A NamedSharding for every parameter, from its logical axis names."""
  return nn.logical_to_mesh_sharding(model_lib.param_axes(cfg), mesh, RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """(B, T) batches: rows split over data x fsdp, positions whole."""
  return NamedSharding(mesh, P(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_rows(sharding: NamedSharding, B: int) -> np.ndarray:
  """The rows of a (B, T) batch that this process's devices hold under `sharding`, in order.

  Derived from the sharding itself, so it is right for any mesh on any number of
  processes: rows replicated over `tensor` are read by every process that holds them.
  """
  rows = set()
  for index in sharding.addressable_devices_indices_map((B, 1)).values():
    rows.update(range(B)[index[0]])
  return np.array(sorted(rows), np.int64)


def global_batch(local: dict, rows: np.ndarray, B: int, sharding: NamedSharding) -> dict:
  """Global (B, ...) arrays from this process's rows: local[k][i] is row rows[i] of the batch."""
  def assemble(x):
    # Each device's block of rows, looked up among the rows this process read.
    take = lambda index: x[np.searchsorted(rows, np.arange(B)[index[0]])]
    return jax.make_array_from_callback((B, *x.shape[1:]), sharding, take)
  return {k: assemble(v) for k, v in local.items()}


def device_batches(batches: list[dict], mesh: Mesh) -> list[dict]:
  """Whole (B, T) numpy batches onto the mesh; each process places only the rows its devices hold."""
  shard = batch_sharding(mesh)
  out = []
  for b in batches:
    B = len(b["inputs"])
    rows = batch_rows(shard, B)
    out.append(global_batch({k: v[rows] for k, v in b.items()}, rows, B, shard))
  return out


def check_mesh(cfg: model_lib.ModelConfig, mesh: Mesh, batch_size: int | None = None) -> None:
  """Refuses, before anything compiles, a mesh that cannot split the batch or the parameters.

  Every dimension a mesh axis splits must divide evenly by that axis's size.
  """
  if batch_size is not None:
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % split:
      raise ConfigError(
          f"train.batch_size ({batch_size}) must be divisible by the data x fsdp mesh axes ({split}); "
          f"use a multiple of {split}.")
  sizes = {"embed": ("model.embed_dim", cfg.embed_dim), "heads": ("model.num_heads", cfg.num_heads),
           "mlp": ("the MLP width (model.mlp_ratio x model.embed_dim)", cfg.mlp_ratio * cfg.embed_dim),
           "vocab": ("the padded vocabulary (model.vocab_size)", cfg.vocab_size)}
  for logical, axis in RULES:
    if logical not in sizes or axis is None:
      continue
    (name, size), n = sizes[logical], mesh.shape[axis]
    if size % n:
      raise ConfigError(
          f"mesh.{axis}={n} does not divide {name} = {size}; choose a mesh.{axis} that divides it "
          "(or change the model).")
