"""Experiment plan, experiment 5 (Abdaoui et al. 2020): a 6-layer from_teacher student
with the reduced vocabulary of its training languages, distilled from the
full-vocabulary teacher (the teacher reads its own ids, the student the mapped ids of
the same tokens; config.student.vocab), against the same student with the full
vocabulary; KD and NON-KD, tsm, 3 seeds. Val and test go through the reduced tokenizer,
as the exported student would meet them.

Make the reduced vocabulary first, from the 8 languages' train texts (min-frequency 1):

  export KD_JAX_DATA_DIR=../shared/data
  python -m kd_jax.vocab --model multilingual-e5-small --out runs/vocab/tsm8 \
      --tsm arabic,english,french,german,hindi,italian,portuguese,spanish --data-dir ../shared/data
  python -m kd_jax.study --study configs/studies/vocab.py --workdir runs/studies/vocab

(e5-small: 250,037 -> 33,002 tokens, 117.5 M -> 34.2 M parameters.)
"""

import common


def get_study():
  return dict(
      title="Reduced vocabulary student (experiment plan, experiment 5)",
      config="configs/study.py",
      overrides=dict(common.TSM, **{"student.init": "from_teacher"}),
      axes=dict(seed=common.SEEDS,
                vocab={"full": {}, "tsm8": {"student.vocab": "runs/vocab/tsm8"}},
                kd=common.KD),
      tables=[dict(name="vocab", title="Vocabulary, tsm", rows="vocab", columns="kd")],
      comparisons=[dict(axis="vocab", a="tsm8", b="full"), dict(axis="kd", a="KD", b="NONKD")],
      budget=common.BUDGET,
  )
