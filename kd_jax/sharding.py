"""Device mesh and shardings: parameters replicated, the batch split on the `data` axis."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def create_mesh(data: int = -1, devices=None) -> Mesh:
  """A 1-D mesh with axis "data".

  Args:
    data: number of devices on the data axis; -1 uses all devices.
  Raises:
    ValueError: more devices asked for than exist (names both numbers).
  """
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices) if data == -1 else data
  if n < 1 or n > len(devices):
    raise ValueError(f"config.mesh.data={data} but {len(devices)} devices are available")
  return Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host numpy batch -> global arrays sharded on the data axis.

  Each process passes its own rows; `make_array_from_process_local_data` assembles
  the global batch, so the same code serves one process and many.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))
