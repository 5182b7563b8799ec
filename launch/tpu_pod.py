#!/usr/bin/env python3
"""Run kd_jax.main on every worker of a Cloud TPU VM (pod slice) through gcloud.

  python launch/tpu_pod.py --tpu my-v4-32 --zone us-central2-b --config configs/tsm_teacher.py \
      --workdir /mnt/shared/runs/teacher [--repo-url URL --branch main] [--dry-run] [-- overrides]

Steps: code onto all workers (git clone, or a tarball of this tree via gcloud scp),
`pip install -e . "jax[tpu]"`, then kd_jax.main --distributed=on on all workers at once.
"""

import common


def main(argv=None) -> int:
  p = common.parser(__doc__.splitlines()[0])
  p.set_defaults(python="python3")
  p.add_argument("--tpu", required=True, help="TPU VM name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default="")
  p.add_argument("--repo-url", default="", help="git URL to clone on the workers; "
                 "default: copy the local tree with gcloud scp")
  p.add_argument("--branch", default="main")
  p.add_argument("--remote-dir", default="kd_jax", help="checkout directory on the workers")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment for kd_jax.main on the workers (repeatable)")
  p.add_argument("--skip-install", action="store_true")
  args = common.parse(p, argv)
  commands = common.tpu_pod_commands(
      args.config, args.workdir, args.overrides, tpu=args.tpu, zone=args.zone,
      project=args.project, repo_url=args.repo_url, branch=args.branch,
      remote_dir=args.remote_dir, python=args.python, env=common.parse_env(args.env),
      install=not args.skip_install)
  return common.execute(commands, args.dry_run)


if __name__ == "__main__":
  raise SystemExit(main())
