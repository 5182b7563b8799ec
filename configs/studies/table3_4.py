"""Tables 3 and 4 of the paper: zero-shot cross-lingual transfer, on tsm and SIB-200.

Teacher trained on the seen languages; students trained on the seen languages
(train=seen) or on English only (train=english), KD and NON-KD (Table 3); teacher and
student both trained on English only, KD (train=english_teacher, Table 4). Everything is
tested on seen and unseen languages (configs/studies/common.py fixes the split); the
tables report the unseen average. The SIB-200 teacher and KD students trained on the
seen languages are then scored on all 205 SIB-200 languages (evaluation only).

  export KD_JAX_DATA_DIR=../shared/data
  python -m kd_jax.study --study configs/studies/table3_4.py --workdir runs/studies/table3_4
"""

import common

ENGLISH = {"tsm": "english", "sib200": "eng_Latn"}


def get_study():
  tasks = {task: common.seen_unseen(task) for task in common.TASKS}
  english = lambda labels: (ENGLISH[labels["task"]],)  # a value computed from the labels
  train = {"seen": {},
           "english": {"student:data.train_languages": english},
           "english_teacher": {"data.train_languages": english}}
  tables, paper = [], {}
  for task in tasks:
    tables.append(dict(name=f"table3_{task}", title=f"Table 3, {task}: unseen languages",
                       rows="init", columns=("train", "kd"), metric="unseen_avg",
                       where={"task": task}, paper=f"table3_{task}"))
    tables.append(dict(name=f"table3_{task}_seen", title=f"Table 3, {task}: seen languages",
                       rows="init", columns=("train", "kd"), metric="seen_avg",
                       where={"task": task}))
    tables.append(dict(name=f"table4_{task}", title=f"Table 4, {task}: teacher and student "
                       "trained on English, unseen languages", rows="init", columns="kd",
                       metric="unseen_avg", where={"task": task, "train": "english_teacher"},
                       paper=f"table4_{task}"))
    paper[f"table3_{task}"] = common.paper_cells(common.PAPER_TABLE3, task)
    paper[f"table4_{task}"] = common.paper_cells(common.PAPER_TABLE4, task)
  return dict(
      title="Tables 3 and 4: seen / unseen languages, English-only training",
      config="configs/study.py",
      axes=dict(task=tasks, train=train, seed=common.SEEDS, init=common.INIT, kd=common.KD),
      skip=[{"train": "english_teacher", "kd": "NONKD"}],  # Table 4 is KD only
      tables=tables, paper=paper,
      # Beyond the paper: the SIB-200 teacher and KD students trained on the seen
      # languages, scored zero-shot on all 205 SIB-200 languages (204 test sentences each).
      evaluations=[dict(name="sib200_all", where={"task": "sib200", "train": "seen",
                                                  "kd": "KD"},
                        overrides={"data.languages": (), "data.unseen_languages": (),
                                   "data.eval_fraction": 1.0},
                        bars="init", seen_languages=common.SIB200_SEEN,
                        title="SIB-200, all 205 languages: teacher and KD students "
                              "trained on 12 seen languages")],
      comparisons=[dict(axis=axis, a=a, b=b, metric="unseen_avg", where={"task": task})
                   for task in tasks
                   for axis, a, b in (("init", "from_teacher", "from_base"),
                                      ("init", "from_base", "from_scratch"),
                                      ("kd", "KD", "NONKD"))],
      plots=[dict(name=f"languages_{task}", kind="languages", bars="init",
                  where={"task": task, "train": "seen", "kd": "KD"},
                  title=f"{task}: teacher and KD students trained on seen languages")
             for task in tasks],
      budget=common.BUDGET,
  )
