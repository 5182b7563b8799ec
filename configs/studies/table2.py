"""Table 2 of the paper: initialisation (from_teacher / from_base / from_scratch) x
distillation loss (KD: TinyBERT terms + cross-entropy; KDnoatt: the same without the
attention-score term; NON-KD: cross-entropy) x student
width (384 = e5-small's full width, 192 = half), 6 layers, 3 seeds, on tsm and SIB-200.

  export KD_JAX_DATA_DIR=../shared/data
  python -m kd_jax.study --study configs/studies/table2.py --workdir runs/studies/table2

One teacher per task (seed 0) and 54 students per task. Budgets: configs/studies/common.py.
"""

import common

# The paper's KD (TinyBERT's terms + cross-entropy) and NON-KD, plus KD without the
# attention-score term: at this budget that term owns > 99 % of the gradient
# (python -m kd_jax.diagnose; README, "Why KD hurt at the default budget").
KD = dict(common.KD, KDnoatt={"distill.kd": True, "distill.weights.att": 0.0})


def get_study():
  tables, paper = [], {}
  for task in common.TASKS:
    tables.append(dict(name=f"table2_{task}", title=f"Table 2, {task}", rows="init",
                       columns=("width", "kd"), where={"task": task}, paper=f"table2_{task}"))
    paper[f"table2_{task}"] = common.paper_cells(common.PAPER_TABLE2, task)
    tables.append(dict(name=f"table2_{task}_retention", title=f"Table 2, {task}: retention",
                       rows="init", columns=("width", "kd"), where={"task": task},
                       metric="retention_avg", teacher=False))
  return dict(
      title="Table 2: initialisation x distillation loss x width",
      config="configs/study.py",
      # seed varies before init and kd: every cell gets its first seed early.
      axes=dict(task=common.TASKS, width=common.WIDTH, seed=common.SEEDS, init=common.INIT,
                kd=KD),
      tables=tables, paper=paper,
      comparisons=[dict(axis=axis, a=a, b=b, where={"task": task})
                   for task in common.TASKS
                   for axis, a, b in (("init", "from_teacher", "from_base"),
                                      ("init", "from_base", "from_scratch"),
                                      ("kd", "KD", "NONKD"), ("kd", "KDnoatt", "NONKD"),
                                      ("kd", "KDnoatt", "KD"))],
      plots=[dict(name=f"languages_{task}", kind="languages", bars="init",
                  where={"task": task, "width": "h384", "kd": "KD"},
                  title=f"{task}: per-language test macro-F1, 6 x 384 KD students")
             for task in common.TASKS],
      budget=common.BUDGET,
  )
