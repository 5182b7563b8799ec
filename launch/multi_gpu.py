#!/usr/bin/env python3
"""One process driving N GPUs of this host (batch split on the mesh's data axis).

  python launch/multi_gpu.py --num-gpus 4 [--gpus 0,1,2,3] --config configs/tsm_teacher.py \
      --workdir runs/teacher [--dry-run] [-- overrides]
"""

import common


def main(argv=None) -> int:
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--num-gpus", type=int, required=True, help="devices on the data axis")
  p.add_argument("--gpus", default="", help="CUDA_VISIBLE_DEVICES, e.g. 4,5,6,7 (default: the first --num-gpus GPUs)")
  args = common.parse(p, argv)
  try:
    commands = common.multi_gpu_commands(args.config, args.workdir, args.overrides,
                                         num_gpus=args.num_gpus, gpus=args.gpus,
                                         python=args.python)
  except ValueError as e:
    p.error(str(e))
  return common.execute(commands, args.dry_run)


if __name__ == "__main__":
  raise SystemExit(main())
