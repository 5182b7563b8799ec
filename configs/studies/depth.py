"""Experiment plan, layer reduction: from_teacher students of 2, 4 and 6 layers (uniform
layer map: every 6th, 3rd, 2nd teacher layer), KD and NON-KD, on tsm, 3 seeds.

  export KD_JAX_DATA_DIR=../shared/data
  python -m kd_jax.study --study configs/studies/depth.py --workdir runs/studies/depth
"""

import common


def get_study():
  return dict(
      title="Student depth (experiment plan: layer reduction)",
      config="configs/study.py",
      overrides=dict(common.TSM, **{"student.init": "from_teacher"}),
      axes=dict(seed=common.SEEDS,
                depth={f"L{n}": {"student.num_layers": n} for n in (2, 4, 6)},
                kd=common.KD),
      tables=[dict(name="depth", title="Depth, tsm", rows="depth", columns="kd"),
              dict(name="depth_retention", title="Depth, tsm: retention", rows="depth",
                   columns="kd", metric="retention_avg", teacher=False)],
      comparisons=[dict(axis="depth", a="L6", b="L4"), dict(axis="depth", a="L4", b="L2"),
                   dict(axis="kd", a="KD", b="NONKD")],
      budget=common.BUDGET,
  )
