"""`python -m kd_jax.main` as 2 processes joined by jax.distributed (CPU, gloo) with the
parameters split across them, preempted and resumed; and a run SIGKILLed in the middle
of a checkpoint save. Tiny model, real tsm slices.

Both compare against one uninterrupted 1-process run of the same config (a
module-scoped fixture): two processes must end at the same parameters and test
metrics (within float tolerance: the gradient sums run in another order), the killed
and restarted run at exactly the same ones.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Test-only hook: the `latest` save of step 4 announces itself and then hangs before
# Orbax commits it (renames the temporary directory), so the test can kill it there.
SLOW_SAVE_DRIVER = """
import os, pathlib, sys, time
from orbax.checkpoint._src.path import atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def hanging_finalize(self, *args, **kwargs):
  if self._final_path.name == "4" and self._final_path.parent.name == "latest":
    pathlib.Path(os.environ["KD_JAX_SAVE_MARKER"]).write_text(str(self._tmp_path))
    time.sleep(600)
  return await finalize(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = hanging_finalize
from absl import app
from kd_jax import main
sys.argv = ["kd_jax.main"] + sys.argv[1:]
app.run(main.main)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch_common():
  """launch/common.py: the local multi-process command builder of the launchers."""
  sys.path.insert(0, str(ROOT / "launch"))
  import common
  return common


def _env(base: pathlib.Path) -> dict:
  # A persistent compilation cache shared by the runs: a resumed run (same programs as
  # the run it resumes) skips compiling.
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"))
  env.pop("XLA_FLAGS", None)
  return env


def _run(commands, base: pathlib.Path, name: str, timeout=1200) -> list[str]:
  """Runs `common.Command`s concurrently from the repository root; returns their logs."""
  procs, logs = [], []
  for i, c in enumerate(commands):
    log = base / f"{name}.{i}.log"
    logs.append(log)
    procs.append(subprocess.Popen(list(c.argv), env={**_env(base), **dict(c.env)}, cwd=ROOT,
                                  stdout=log.open("w"), stderr=subprocess.STDOUT))
  deadline = time.time() + timeout
  for p in procs:
    try:
      p.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  texts = [log.read_text() for log in logs]
  for p, text in zip(procs, texts):
    assert p.returncode == 0, text[-5000:]
  return texts


def _single(config, workdir, *overrides):
  common = _launch_common()
  return [common.cmd(*common.main_argv(str(config), str(workdir), overrides,
                                       python=sys.executable, flags=("--distributed=off",)))]


def _restore_numpy(ckpt_dir: pathlib.Path) -> tuple[int, dict]:
  """Latest step of an Orbax directory and its tree as numpy (whatever the saved sharding)."""
  mngr = ocp.CheckpointManager(ckpt_dir, item_handlers=ocp.StandardCheckpointHandler())
  step = mngr.latest_step()
  meta = mngr.item_metadata(step).tree
  # The saved shardings name devices of the writing processes: restore onto this one.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  return step, jax.tree.map(np.asarray, mngr.restore(step, args=ocp.args.StandardRestore(target)))


def _max_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - y))), a, b)))


def _test_json(stage_dir):
  return json.loads((stage_dir / "test.json").read_text())


@pytest.fixture(scope="module")
def reference(tiny_model_dir, real_data_dir, tmp_path_factory):
  """Both stages, one process, uninterrupted."""
  base = tmp_path_factory.mktemp("multihost")
  config = base / "tiny_config.py"
  # one batch shape: one compilation per step function
  config.write_text(tiny_config(str(tiny_model_dir), str(real_data_dir),
                                languages=("english", "arabic", "hindi"), eval_fraction=0.1,
                                max_length=64, num_train_steps=6, eval_every_steps=2,
                                log_every_steps=1))
  _run(_single(config, base / "reference"), base, "reference")
  return config, base, base / "reference"


def test_two_processes_preempted_and_resumed_match_one_process(reference):
  config, base, ref_dir = reference
  workdir = base / "two_processes"
  # The teacher stage (fine-tuning); data=1, fsdp=2: every parameter and Adam moment
  # is split across the two processes, and so is the batch.
  common = _launch_common()
  commands = lambda *extra: common.local_multiprocess_commands(
      str(config), str(workdir), ("--config.mesh.data=1", "--config.mesh.fsdp=2",
                                  '--config.stages=("finetune_teacher",)', *extra),
      num_processes=2, port=_free_port(), python=sys.executable)
  logs = _run(commands("--config.teacher.train.stop_after_steps=3"), base, "mp_first")
  assert "JAX process 1/2" in logs[1] and "2 global devices" in logs[0]
  assert not (workdir / "teacher" / "test.json").exists()
  assert _restore_numpy(workdir / "teacher" / "checkpoints" / "latest")[0] == 2
  logs = _run(commands(), base, "mp_resume")
  assert "resumed" in logs[0] and "from step 2" in logs[0]
  # only process 0 writes result files
  assert {"results.md", "teacher"} == {p.name for p in workdir.iterdir()}
  assert {"test.json", "val.json", "model_config.json"} <= {
      p.name for p in (workdir / "teacher").iterdir()}

  for stage in ("teacher",):
    ref_step, ref = _restore_numpy(ref_dir / stage / "checkpoints" / "latest")
    step, got = _restore_numpy(workdir / stage / "checkpoints" / "latest")
    assert step == ref_step == 6
    param_diff = _max_diff(ref["params"], got["params"])
    opt_diff = _max_diff(ref["opt_state"], got["opt_state"])
    print(f"{stage}: 2 processes vs 1, max |param diff| {param_diff:.3g}, "
          f"max |opt-state diff| {opt_diff:.3g}")
    assert param_diff < 1e-4 and opt_diff < 1e-4, (stage, param_diff, opt_diff)
    a, b = _test_json(ref_dir / stage), _test_json(workdir / stage)
    assert a["step"] == b["step"]
    for lang in a["per_language"]:
      assert abs(a["per_language"][lang]["macro_f1"] - b["per_language"][lang]["macro_f1"]) < 1e-6


def test_sigkill_during_checkpoint_save_resumes_from_previous(reference):
  config, base, ref_dir = reference
  workdir = base / "killed"
  overrides = ('--config.stages=("distill",)', f"--config.teacher.checkpoint={ref_dir / 'teacher'}")
  marker = base / "save_marker"
  driver = base / "slow_save_driver.py"
  driver.write_text(SLOW_SAVE_DRIVER)
  argv = [sys.executable, str(driver), f"--config={config}", f"--workdir={workdir}",
          "--distributed=off", *overrides]
  log = (base / "killed.log").open("w")
  proc = subprocess.Popen(argv, cwd=ROOT, env=dict(_env(base), KD_JAX_SAVE_MARKER=str(marker)),
                          stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.2)
    assert marker.exists(), (base / "killed.log").read_text()[-5000:]
    latest = workdir / "student" / "checkpoints" / "latest"
    half_written = pathlib.Path(marker.read_text())
    assert half_written.parent == latest and half_written.name.startswith("4.orbax-checkpoint-tmp")
    assert half_written.is_dir()
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  # step 2 is complete, step 4 only a temporary directory
  assert sorted(p.name for p in latest.iterdir() if not p.name.startswith(".")) == sorted(
      ["2", half_written.name])

  logs = _run(_single(config, workdir, *overrides), base, "after_kill")
  assert "resumed" in logs[0] and "from step 2" in logs[0], logs[0][-5000:]
  assert not half_written.exists()  # removed by cleanup_tmp_directories, never read
  step, got = _restore_numpy(latest)
  ref_step, ref = _restore_numpy(ref_dir / "student" / "checkpoints" / "latest")
  assert step == ref_step == 6
  jax.tree.map(np.testing.assert_array_equal, ref["params"], got["params"])
  assert _test_json(workdir / "student")["per_language"] == _test_json(
      ref_dir / "student")["per_language"]
