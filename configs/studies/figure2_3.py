"""Figures 2 and 3 of the paper on SIB-200 (the paper draws them on MASSIVE, its parallel
dataset): test macro-F1 against the share of training data (1, 5, 10, 20 % of each seen
language's train split, stratified), per initialisation, KD, 3 seeds (Figure 2), and the
training loss per step of those runs (Figure 3). The teacher is trained on the full
train splits of the 12 seen languages; the students on the subsets, 5 epochs each.

  export KD_JAX_DATA_DIR=../shared/data
  python -m kd_jax.study --study configs/studies/figure2_3.py --workdir runs/studies/figure2_3
"""

import common

FRACTIONS = {"p1": 0.01, "p5": 0.05, "p10": 0.10, "p20": 0.20}


def get_study():
  sib = dict(common.SIB200, **{"data.languages": common.SIB200_SEEN,
                               "teacher:data.train_fraction": 1.0,
                               "teacher.train.num_epochs": 2.0,
                               "student.train.num_epochs": 5.0})
  sib.pop("data.train_fraction")
  return dict(
      title="Figures 2 and 3: data subsets per initialisation (SIB-200)",
      config="configs/study.py",
      overrides=dict(sib, **{"distill.kd": True}),
      axes=dict(seed=common.SEEDS,
                fraction={k: {"student:data.train_fraction": v} for k, v in FRACTIONS.items()},
                init=common.INIT),
      tables=[dict(name="figure2", title="Figure 2 as a table", rows="init",
                   columns="fraction")],
      comparisons=[dict(axis="init", a="from_teacher", b="from_base"),
                   dict(axis="init", a="from_base", b="from_scratch")],
      plots=[dict(name="figure2", kind="lines", x="fraction", lines="init",
                  x_values={k: 100 * v for k, v in FRACTIONS.items()},
                  xlabel="training data (% of each language)",
                  title="SIB-200: test macro-F1 vs training data"),
             dict(name="figure3", kind="loss", panels="fraction", lines="init",
                  tag="train/loss", title="training loss")],
      budget="SIB-200, 12 seen languages; teacher: full train splits, 2 epochs; students: "
             "1 / 5 / 10 / 20 % of each language's train split (7 / 35 / 70 / 140 "
             "sentences), 5 epochs; dev / test: 50 %; 128 tokens.",
  )
