"""The host allocator of CPU runs: mimalloc (PyPI `cmeel-mimalloc`, a kd_jax dependency),
preloaded by re-executing the entry point once.

XLA:CPU allocates each step's temporaries as one large block (about 2 GB for the
benchmark's step). glibc's malloc serves such a block with `mmap` and returns it to the
kernel on `free`, so every step page-faults the whole block in again; what that costs
depends on the VM's memory state (README, "Host memory on CPU"). An allocator that keeps
freed memory mapped removes the faults. `LD_PRELOAD` has to be set before the process
starts, so `reexec(module)` at the top of an entry point (`kd_jax.main`,
`kd_jax.evaluate`, `kd_jax.benchmark`, `kd_jax.diagnose`) replaces the process with the
same command under mimalloc, once.

It does nothing when `KD_JAX_ALLOCATOR=system`, when `LD_PRELOAD` is already set (the
user's choice wins, tcmalloc included), off Linux, with an accelerator in sight
(`JAX_PLATFORMS` naming one, or NVIDIA / TPU device files: there the host allocator is
not on the step's path and the accelerator runtimes bring their own), or when the library
is not installed.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Mapping, Sequence

ENV = "KD_JAX_ALLOCATOR"  # "mimalloc" (default) or "system"
_DONE_ENV = "KD_JAX_ALLOCATOR_PRELOADED"  # set in the re-executed process
# Freed memory stays mapped (mimalloc's default returns it after 10 ms of disuse).
MIMALLOC_OPTIONS = {"MIMALLOC_PURGE_DELAY": "-1"}


def library() -> str | None:
  """The path of the installed `libmimalloc.so` (cmeel-mimalloc's wheel puts it under
  `<site-packages>/cmeel.prefix/lib/`), or None."""
  for base in sys.path:
    path = os.path.join(base or ".", "cmeel.prefix", "lib", "libmimalloc.so")
    if os.path.isfile(path):
      return path
  return None


def _accelerator(environ: Mapping[str, str]) -> bool:
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0] != "cpu"
  return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*")
              or environ.get("TPU_NAME") or environ.get("TPU_ACCELERATOR_TYPE"))


def plan(environ: Mapping[str, str], platform: str = sys.platform,
         lib: str | None = None) -> dict[str, str] | None:
  """The environment to re-execute under (`environ` plus LD_PRELOAD and mimalloc's
  options), or None when nothing should change (see the module docstring). `lib`: the
  library's path (default `library()`). Raises ValueError for a `KD_JAX_ALLOCATOR`
  other than "mimalloc" or "system"."""
  choice = environ.get(ENV, "mimalloc")
  if choice not in ("mimalloc", "system"):
    raise ValueError(f"{ENV}={choice!r}: use mimalloc (the default) or system")
  if (choice == "system" or environ.get(_DONE_ENV) or environ.get("LD_PRELOAD")
      or not platform.startswith("linux") or _accelerator(environ)):
    return None
  lib = lib or library()
  if lib is None:
    return None
  return {**environ, **{k: environ.get(k, v) for k, v in MIMALLOC_OPTIONS.items()},
          "LD_PRELOAD": lib, _DONE_ENV: "1"}


def reexec(module: str, argv: Sequence[str] | None = None) -> None:
  """Replaces this process with `python -m <module> <argv>` (default: this process's
  arguments) under mimalloc when `plan` says so; returns otherwise. Call it first thing
  in an entry point, before JAX or PyTorch allocate."""
  env = plan(os.environ)
  if env is None:
    return
  args = list(sys.argv[1:] if argv is None else argv)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, "-m", module, *args], env)


def loaded() -> bool:
  """Whether mimalloc is mapped into this process (Linux: /proc/self/maps)."""
  try:
    with open("/proc/self/maps") as f:
      return "libmimalloc" in f.read()
  except OSError:
    return False


def describe(environ: Mapping[str, str] = os.environ) -> str:
  """One line for logs and the benchmark header: which allocator this process runs."""
  preload = environ.get("LD_PRELOAD", "")
  if "mimalloc" in preload and loaded():
    options = " ".join(f"{k}={environ[k]}" for k in MIMALLOC_OPTIONS if k in environ)
    return f"mimalloc ({preload}{', ' + options if options else ''})"
  if preload:
    return f"LD_PRELOAD={preload}"
  return "glibc malloc (KD_JAX_ALLOCATOR=system, no mimalloc installed, or an accelerator)"


if __name__ == "__main__":  # python -m kd_jax.allocator: what an entry point would run under
  reexec("kd_jax.allocator")
  print(describe())
