#!/usr/bin/env python3
"""Write an sbatch script for kd_jax.main on a SLURM cluster and submit it.

  python launch/slurm.py --nodes 2 --gpus-per-node 8 --time 04:00:00 --config configs/tsm_teacher.py \
      --workdir /shared/runs/teacher [--per-gpu] [--script job.sbatch] [--dry-run] [-- overrides]

One task per node driving all its GPUs (default) or one per GPU (--per-gpu); under srun
kd_jax.main sees SLURM_NTASKS > 1 and calls jax.distributed.initialize(), which reads
the coordinator, process count and id from SLURM. --dry-run prints the script, then the
sbatch command, and writes nothing.
"""

import pathlib

import common


def main(argv=None) -> int:
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--nodes", type=int, required=True)
  p.add_argument("--gpus-per-node", type=int, required=True)
  p.add_argument("--time", default="04:00:00", help="#SBATCH --time")
  p.add_argument("--job-name", default="kd_jax")
  p.add_argument("--per-gpu", action="store_true", help="one process per GPU, not per node")
  p.add_argument("--partition", default="")
  p.add_argument("--account", default="")
  p.add_argument("--setup", action="append", default=[], metavar="LINE",
                 help="shell line before srun, e.g. 'source .venv/bin/activate' (repeatable)")
  p.add_argument("--chdir", default="", help="cd here before srun (default: submit directory)")
  p.add_argument("--script", default="", help="sbatch file to write (default: <job-name>.sbatch)")
  args = common.parse(p, argv)
  try:
    script = common.slurm_script(
        args.config, args.workdir, args.overrides, nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, time=args.time, job_name=args.job_name,
        per_gpu=args.per_gpu, partition=args.partition, account=args.account,
        python=args.python, setup=args.setup, chdir=args.chdir)
  except ValueError as e:
    p.error(str(e))
  path = args.script or f"{args.job_name}.sbatch"
  submit = [common.cmd("sbatch", path)]
  if args.dry_run:
    print(script, end="")
    common.print_commands(submit)
    return 0
  pathlib.Path(path).write_text(script)
  print(f"wrote {path}")
  return common.run_sequential(submit, cwd=".")


if __name__ == "__main__":
  raise SystemExit(main())
