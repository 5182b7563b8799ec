"""Device mesh (data, fsdp, tensor), logical-axis rules, and the shardings derived from them.

Every parameter leaf gets logical axis names ("vocab", "embed", "mlp", "heads", ...) from
one table, `PARAM_AXES`: ordered (regex on the leaf's path, logical names per dimension)
pairs, first match wins, in the style of t5x / big_vision partitioning rules. Logical
names map to mesh axes through flax.linen's rules machinery
(`nn.logical_to_mesh_sharding` with `LOGICAL_RULES`), as in Flax's lm1b example.

Why a path table rather than `nn.with_logical_partitioning` in the modules: parameters
reach the loop from Hugging Face checkpoints (`hf_io`), from weight copying
(`student_init`) and from Orbax, and only rarely from `Module.init`; boxed metadata
would exist on the init path alone, so every other path would need a second, path-based
description that had to agree with it. One table covers every source, the teacher, the
distillation projections and (through `optax.tree_map_params`) the optimizer state,
and the encoder modules stay free of sharding code.

Defaults (`LOGICAL_RULES`): "batch" over (data, fsdp), "embed" over fsdp (ZeRO-3 style
parameter sharding), "mlp", "heads" and "vocab" over tensor (Megatron style); "norm"
(LayerNorm and hidden-size biases), "labels" and "proj" replicated. Layers are unrolled
(`layer_{i}`), so there is no stacked "layers" dimension. A dimension not divisible by
the size of its mesh axes is replicated on them instead (logged once per case), and a
leaf no rule matches is replicated (logged once per path pattern).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS, FSDP_AXIS, TENSOR_AXIS = "data", "fsdp", "tensor"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS)

# Logical name -> mesh axes (flax.linen logical rules; a name not listed is replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", (DATA_AXIS, FSDP_AXIS)),
    ("embed", FSDP_AXIS),
    ("vocab", TENSOR_AXIS),
    ("mlp", TENSOR_AXIS),
    ("heads", TENSOR_AXIS),
    ("labels", None),
    ("norm", None),
    ("proj", None),
)

# (regex searched in "a/b/c" leaf paths, logical axis names of the leaf's dimensions).
# Paths are those of `kd_jax.models.encoder` (HF names), optionally under "model/" or
# "proj/" (the trainable tree) or inside the optimizer state.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(^|/)word_embeddings/embedding$", ("vocab", "embed")),
    (r"(^|/)(position_embeddings|token_type_embeddings|rel_embeddings)/embedding$",
     (None, "embed")),
    (r"(^|/)attention/(query|key|value|pos_query|pos_key)/kernel$", ("embed", "heads")),
    (r"(^|/)attention/(query|key|value|pos_query|pos_key)/bias$", ("heads",)),
    (r"(^|/)attention/output/kernel$", ("heads", "embed")),
    (r"(^|/)intermediate/kernel$", ("embed", "mlp")),
    (r"(^|/)intermediate/bias$", ("mlp",)),
    (r"(^|/)layer_\d+/output/kernel$", ("mlp", "embed")),
    (r"(^|/)pooler/kernel$", ("embed", "mlp")),
    (r"(^|/)pooler/bias$", ("mlp",)),
    (r"(^|/)classifier/kernel$", ("mlp", "labels")),   # sequence and token heads
    (r"(^|/)classifier/bias$", ("labels",)),
    (r"(^|/)lm_head/transform/kernel$", ("embed", "mlp")),  # masked-LM head; its decoder
    (r"(^|/)lm_head/transform/bias$", ("mlp",)),            # is tied to word_embeddings
    (r"(^|/)lm_head/bias$", ("vocab",)),
    (r"LayerNorm/(scale|bias)$", ("norm",)),
    (r"(^|/)output/bias$", ("norm",)),
    (r"(^|/)proj/[^/]+$", ("embed", "proj")),   # [H_student, H_teacher] projections W
)

_logger = logging.getLogger(__name__)
_warned: set = set()


def _warn_once(key, message: str, *args) -> None:
  if key not in _warned:
    _warned.add(key)
    _logger.warning(message, *args)


def mesh_shape(devices: int, data: int = -1, fsdp: int = 1, tensor: int = 1) -> tuple[int, int, int]:
  """Resolves config.mesh's (data, fsdp, tensor) sizes for `devices` devices.

  One field may be -1: it takes the remaining devices.
  Raises:
    ValueError: naming the config.mesh fields, when a size is 0 or below -1, more
      than one field is -1, or the product differs from the device count.
  """
  sizes = {"data": int(data), "fsdp": int(fsdp), "tensor": int(tensor)}
  text = ", ".join(f"config.mesh.{k}={v}" for k, v in sizes.items())
  bad = [k for k, v in sizes.items() if v == 0 or v < -1]
  if bad:
    raise ValueError(f"{text}: {bad} must be >= 1 or -1 (the remaining devices)")
  rest = [k for k, v in sizes.items() if v == -1]
  if len(rest) > 1:
    raise ValueError(f"{text}: only one of them may be -1 (the remaining devices)")
  known = math.prod(v for v in sizes.values() if v != -1)
  if rest:
    if devices % known:
      raise ValueError(f"{text}: {devices} devices are not divisible by the product "
                       f"{known} of the other fields")
    sizes[rest[0]] = devices // known
  if math.prod(sizes.values()) != devices:
    raise ValueError(f"{text}: data*fsdp*tensor = {math.prod(sizes.values())} must equal the "
                     f"number of devices, {devices}")
  return sizes["data"], sizes["fsdp"], sizes["tensor"]


def create_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A mesh with axes ("data", "fsdp", "tensor") over `devices` (default all devices).

  Args:
    data, fsdp, tensor: axis sizes (config.mesh); one may be -1 = the rest.
    devices: the devices to use (e.g. `jax.devices()[:1]` for a 1-device mesh).
  Raises:
    ValueError: see `mesh_shape`.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(len(devices), data, fsdp, tensor)
  return Mesh(mesh_utils.create_device_mesh(shape, devices), MESH_AXES)


def create_mesh_from_config(mesh_config: Mapping[str, int], devices=None) -> Mesh:
  """`create_mesh` from config.mesh (fields data, fsdp, tensor)."""
  return create_mesh(mesh_config["data"], mesh_config["fsdp"], mesh_config["tensor"], devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules=LOGICAL_RULES) -> NamedSharding:
  """Leading (batch) dimension split over the "batch" rule's axes, (data, fsdp)."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), rules))


def batch_divisor(mesh: Mesh, rules=LOGICAL_RULES) -> int:
  """Number of shards of the batch dimension: global batch sizes must be multiples."""
  spec = batch_sharding(mesh, rules).spec
  axes = spec[0] if spec else None
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(mesh.shape[a] for a in axes)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded on the batch axes.

  `make_array_from_process_local_data` assembles the global batch from every
  process's rows (the rows of the devices it owns, in process order).
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def shard_global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """The whole global batch (identical on every process) -> sharded global arrays.

  Each process copies only the slices its own devices hold, whatever the mesh layout
  (also when one batch shard spans devices of several processes).
  """
  sharding = batch_sharding(mesh)
  return {k: _from_host(np.asarray(v), sharding) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  return shard_tree(tree, jax.tree.map(lambda _: replicated(mesh), tree))


# ---------------------------------------------------------------------------
# parameters: logical axes from paths, then mesh shardings
# ---------------------------------------------------------------------------
def path_name(path: Sequence[Any]) -> str:
  """A tree path as "a/b/c" (dict keys, attribute names and sequence indices)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def logical_axes_for(name: str, ndim: int) -> P:
  """Logical PartitionSpec of the leaf at path `name` ("layer_0/intermediate/kernel").

  Rank-0 leaves (step counters) and leaves no rule matches are replicated (P()).
  Raises:
    ValueError: a matching rule names a different number of axes than `ndim`.
  """
  if ndim == 0:
    return P()
  for pattern, axes in PARAM_AXES:
    if re.search(pattern, name):
      if len(axes) != ndim:
        raise ValueError(f"sharding rule {pattern!r} gives {len(axes)} logical axes {axes} "
                         f"but parameter {name!r} has {ndim} dimensions")
      return P(*axes)
  _warn_once(("unmatched", re.sub(r"\d+", "N", name)),
             "no sharding rule matches parameter %r: replicated", name)
  return P()


def logical_axes(tree: Any) -> Any:
  """Tree of logical PartitionSpecs, one per leaf of `tree` (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: logical_axes_for(path_name(path), np.ndim(x)), tree)


def _fit_to_shape(spec: P, shape: tuple[int, ...], mesh: Mesh, logical: P) -> P:
  """Replicates dimensions that their mesh axes do not divide (logged once per case)."""
  out = []
  for i, dim in enumerate(shape):
    axes = spec[i] if i < len(spec) else None
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    if names and dim % size:
      name = logical[i] if i < len(logical) else None
      _warn_once(("indivisible", name, dim, names, size),
                 "logical axis %r of size %d is not divisible by mesh axes %s (size %d): "
                 "replicated on them", name, dim, names, size)
      axes = None
    out.append(axes)
  return P(*out)


def param_shardings(tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedSharding per leaf of a parameter tree (arrays or ShapeDtypeStructs).

  Logical axes from `PARAM_AXES`, mapped to mesh axes by `nn.logical_to_mesh_sharding`
  with `rules`, then indivisible dimensions replicated.
  """
  logical = logical_axes(tree)
  mapped = nn.logical_to_mesh_sharding(logical, mesh, rules)
  return jax.tree.map(
      lambda lg, sh, x: NamedSharding(mesh, _fit_to_shape(sh.spec, np.shape(x), mesh, lg)),
      logical, mapped, tree, is_leaf=lambda x: isinstance(x, P))


def optimizer_state_shardings(tx: optax.GradientTransformation, opt_state_shapes: Any,
                              params_shardings: Any, mesh: Mesh) -> Any:
  """Shardings of `tx`'s state: the parts that mirror the parameters (Adam's mu and nu)
  follow the parameters' shardings; everything else (counters) is replicated."""
  return optax.tree_map_params(
      tx, lambda _, sh: sh, opt_state_shapes, params_shardings,
      transform_non_params=lambda _: replicated(mesh),
      is_leaf=lambda x: isinstance(x, NamedSharding))


def _from_host(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def shard_tree(tree: Any, shardings: Any) -> Any:
  """Places every leaf of `tree` with the matching sharding of `shardings`.

  Host values (numpy, or arrays on one local device) must be the same on every
  process: each process copies only the shards its devices hold, so this works on one
  host and on many. Arrays already spread over several processes are resharded.
  """
  def put(x, sharding):
    if isinstance(x, jax.Array):
      if x.sharding == sharding:
        return x
      if not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    return _from_host(np.asarray(x), sharding)
  return jax.tree.map(put, tree, shardings)
