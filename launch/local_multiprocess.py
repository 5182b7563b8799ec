#!/usr/bin/env python3
"""N kd_jax.main processes on this machine joined by jax.distributed (CPU, gloo).

  python launch/local_multiprocess.py --num-processes 2 --config configs/default.py \
      --workdir runs/mp [--port 12355] [--devices-per-process 1] [--dry-run] [-- overrides]

A local rehearsal of the multi-host path: process i gets
--coordinator_address=localhost:PORT --num_processes=N --process_id=i and JAX_PLATFORMS=cpu.
"""

import common


def main(argv=None) -> int:
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--num-processes", type=int, required=True)
  p.add_argument("--port", type=int, default=12355, help="coordinator port (process 0)")
  p.add_argument("--host", default="localhost")
  p.add_argument("--devices-per-process", type=int, default=0,
                 help="> 0: simulated CPU devices per process (XLA_FLAGS)")
  args = common.parse(p, argv)
  try:
    commands = common.local_multiprocess_commands(
        args.config, args.workdir, args.overrides, num_processes=args.num_processes,
        port=args.port, host=args.host, python=args.python,
        devices_per_process=args.devices_per_process)
  except ValueError as e:
    p.error(str(e))
  return common.execute(commands, args.dry_run, common.run_concurrent)


if __name__ == "__main__":
  raise SystemExit(main())
