"""When and how to call `jax.distributed.initialize` (multi-host TPU pods, SLURM, local).

`should_initialize` is a pure function of the environment and the flags, so the
decision is unit-tested without starting anything; `maybe_initialize` applies it.
"""

from __future__ import annotations

from typing import Any, Mapping

MODES = ("auto", "on", "off")


def _int(value: str | None, default: int = 0) -> int:
  try:
    return int(value) if value not in (None, "") else default
  except ValueError:
    return default


def _hosts(value: str | None) -> int:
  return len([h for h in (value or "").split(",") if h.strip()])


def detect_cluster(env: Mapping[str, str]) -> str | None:
  """Names the multi-process environment found in `env`, or None for a single process.

  SLURM: SLURM_NTASKS > 1. TPU: more than one host in TPU_WORKER_HOSTNAMES or
  TPU_PROCESS_ADDRESSES (GKE), or a multislice job (MEGASCALE_NUM_SLICES > 1 or
  MEGASCALE_COORDINATOR_ADDRESS). CLOUD_TPU_TASK_ID alone says nothing about the
  host count, and Cloud TPU VMs keep theirs in the metadata server, not the
  environment: the TPU pod launcher therefore passes --distributed=on.
  """
  if _int(env.get("SLURM_NTASKS"), 1) > 1:
    return "slurm"
  if max(_hosts(env.get("TPU_WORKER_HOSTNAMES")), _hosts(env.get("TPU_PROCESS_ADDRESSES"))) > 1:
    return "tpu"
  if _int(env.get("MEGASCALE_NUM_SLICES"), 1) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu-multislice"
  return None


def should_initialize(env: Mapping[str, str], *, distributed: str = "auto",
                      coordinator_address: str | None = None,
                      num_processes: int | None = None,
                      process_id: int | None = None) -> tuple[bool, dict[str, Any]]:
  """Whether to call `jax.distributed.initialize`, and with which keyword arguments.

  - `off`: never (an explicit coordinator/process flag with `off` is an error).
  - any of coordinator_address / num_processes / process_id given: initialize with
    exactly those arguments.
  - `on`: initialize; JAX detects the cluster (SLURM, Cloud TPU metadata, ...).
  - `auto`: initialize only when `detect_cluster(env)` finds a SLURM job with several
    tasks or a multi-host TPU; otherwise one process.
  With no explicit arguments the kwargs are empty, except in a SLURM job with one task
  per node and SLURM_GPUS_ON_NODE=G > 1: local_device_ids=[0..G-1] (see below).
  """
  if distributed not in MODES:
    raise ValueError(f"--distributed={distributed!r}: expected one of {MODES}")
  kwargs = {k: v for k, v in (("coordinator_address", coordinator_address),
                              ("num_processes", num_processes),
                              ("process_id", process_id)) if v is not None}
  if distributed == "off":
    if kwargs:
      raise ValueError(f"--distributed=off conflicts with {sorted(kwargs)}")
    return False, {}
  if kwargs:
    return True, kwargs
  if distributed == "on" or detect_cluster(env) is not None:
    return True, _slurm_local_devices(env)
  return False, {}


def _slurm_local_devices(env: Mapping[str, str]) -> dict[str, Any]:
  """`local_device_ids` for one SLURM task per node driving all the node's GPUs.

  JAX's SLURM detection assumes one process per GPU (local_device_ids=[SLURM_LOCALID]);
  with one task per node that would leave all but GPU 0 idle, so name them all.
  """
  if "SLURM_JOB_ID" not in env or "SLURM_NTASKS" not in env:
    return {}
  gpus = _int(env.get("SLURM_GPUS_ON_NODE"), 0)
  per_node = _int(env.get("SLURM_NTASKS_PER_NODE"), 0)
  nodes = _int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES")
               or env.get("SLURM_NNODES"), 0)
  if not per_node and nodes:
    per_node = _int(env.get("SLURM_NTASKS"), 0) / nodes
  if per_node == 1 and gpus > 1:
    return {"local_device_ids": list(range(gpus))}
  return {}


def maybe_initialize(env: Mapping[str, str], **flags) -> bool:
  """Applies `should_initialize`; returns whether jax.distributed was initialised."""
  from absl import logging
  init, kwargs = should_initialize(env, **flags)
  if init:
    import jax
    logging.info("jax.distributed.initialize(%s) (cluster: %s)",
                 ", ".join(f"{k}={v!r}" for k, v in kwargs.items()),
                 detect_cluster(env) or "from flags")
    jax.distributed.initialize(**kwargs)
  else:
    logging.info("Single process: jax.distributed not initialised.")
  return init
