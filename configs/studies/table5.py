"""Table 5 of the paper: a from_teacher student (6 layers, full width) evaluated right
after copying the fine-tuned teacher's weights (no training step:
student.train.num_train_steps=0), against the same student after KD training and the
chance score, on tsm and SIB-200.

  export KD_JAX_DATA_DIR=../shared/data
  python -m kd_jax.study --study configs/studies/table5.py --workdir runs/studies/table5
"""

import common


def get_study():
  return dict(
      title="Table 5: copied student with and without fine-tuning",
      config="configs/study.py",
      overrides={"student.init": "from_teacher", "distill.kd": True},
      axes=dict(task=common.TASKS, seed=common.SEEDS,
                finetune={"yes": {}, "no": {"student.train.num_train_steps": 0}}),
      # Without training the seeds differ only in the fresh parts (none for from_teacher):
      # one seed is enough.
      skip=[{"finetune": "no", "seed": "seed1"}, {"finetune": "no", "seed": "seed2"}],
      tables=[dict(name="table5", title="Table 5", rows="finetune", columns="task",
                   paper="table5",
                   extra_rows={"chance (100 / classes)": common.CHANCE})],
      paper={"table5": common.PAPER_TABLE5},
      comparisons=[dict(axis="finetune", a="yes", b="no")],
      budget=common.BUDGET,
  )
