"""kd_jax.allocator: when an entry point re-executes itself under mimalloc, and that the
re-executed process really has it mapped."""

import os
import subprocess
import sys

import pytest

from kd_jax import allocator

LIB = "/opt/lib/libmimalloc.so"


def test_plan_preloads_mimalloc_on_a_cpu_linux_machine_only():
  env = allocator.plan({"PATH": "/bin"}, "linux", LIB)
  assert env["LD_PRELOAD"] == LIB and env["PATH"] == "/bin"
  assert env["MIMALLOC_PURGE_DELAY"] == "-1"  # freed blocks stay mapped
  assert env[allocator._DONE_ENV] == "1"  # the re-executed process does not re-execute
  assert allocator.plan(env, "linux", LIB) is None
  # the user's choices win: an option of theirs, their own preload, or glibc
  assert allocator.plan({"MIMALLOC_PURGE_DELAY": "5"}, "linux", LIB)[
      "MIMALLOC_PURGE_DELAY"] == "5"
  assert allocator.plan({"LD_PRELOAD": "/usr/lib/libtcmalloc.so"}, "linux", LIB) is None
  assert allocator.plan({allocator.ENV: "system"}, "linux", LIB) is None
  assert allocator.plan({}, "darwin", LIB) is None
  assert allocator.plan({"JAX_PLATFORMS": "cuda"}, "linux", LIB) is None
  assert allocator.plan({"JAX_PLATFORMS": "cpu"}, "linux", LIB)["LD_PRELOAD"] == LIB
  assert allocator.plan({"TPU_NAME": "v4-8"}, "linux", LIB) is None
  with pytest.raises(ValueError, match="KD_JAX_ALLOCATOR='tcmalloc'"):
    allocator.plan({allocator.ENV: "tcmalloc"}, "linux", LIB)


def _probe(**env):
  clean = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", allocator._DONE_ENV, allocator.ENV)}
  out = subprocess.run([sys.executable, "-m", "kd_jax.allocator"], env={**clean, **env},
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux") or allocator.library() is None,
                    reason="needs Linux and the cmeel-mimalloc wheel")
def test_entry_point_reexecutes_under_mimalloc():
  line = _probe(JAX_PLATFORMS="cpu")
  assert line.startswith("mimalloc (") and allocator.library() in line, line
  assert "MIMALLOC_PURGE_DELAY=-1" in line
  assert _probe(JAX_PLATFORMS="cpu", KD_JAX_ALLOCATOR="system").startswith("glibc malloc")
