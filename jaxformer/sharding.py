"""The device mesh and how parameters and batches are laid on it.

Mesh axes: `data` (replicas), `fsdp` (batch split + parameters sharded),
`tensor` (heads, MLP width and vocabulary split). Logical axis names from
`model.py` map to mesh axes by RULES, the one place that decides layouts.
"""

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
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
)


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


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Rows split over data x fsdp; the rest replicated. (A, B, T) batches split B."""
  spec = P(BATCH_AXES, *([None] * (ndim - 1))) if ndim == 2 else P(None, BATCH_AXES, None)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict, sharding: NamedSharding) -> dict:
  """Assembles each process's rows into one global array per key (no copy on one host)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
