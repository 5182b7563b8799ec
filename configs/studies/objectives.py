"""Experiment plan, objective combinations of general distillation: a 6-layer student
distilled task-agnostically on tsm's unlabeled train text (masked language modelling)
with KL + MLM, MSE + MLM, KL + cosine + MLM or TinyBERT's multilayer objective
(attention + hidden + embedding MSE + MLM), then trained on tsm with KD from the tsm
teacher (student.init=from_general), 3 seeds.

The MLM-logit terms (mlm_kl, mlm_mse) need a teacher with an MLM head: the pretrained
e5-small has none, so the general teacher is the pretrained model with
config.general.teacher set to an MLM checkpoint when one is at hand
(`-- --config.general.teacher=<dir>`); without one only the `tinybert` label runs.

  export KD_JAX_DATA_DIR=../shared/data
  python -m kd_jax.study --study configs/studies/objectives.py --workdir runs/studies/objectives
"""

import common
from kd_jax.data.tsm import TSM_LANGUAGES

_NONE = {"att": 0.0, "hid": 0.0, "embd": 0.0, "mlm": 1.0, "mlm_kl": 0.0, "mlm_mse": 0.0,
         "cos": 0.0}


def _weights(**w):
  return {f"general.weights.{k}": v for k, v in dict(_NONE, **w).items()}


OBJECTIVES = {"kl_mlm": _weights(mlm_kl=1.0), "mse_mlm": _weights(mlm_mse=1.0),
              "kl_cos_mlm": _weights(mlm_kl=1.0, cos=1.0),
              "tinybert": _weights(att=1.0, hid=1.0, embd=1.0)}


def get_study():
  general = {"stages": ("general_distill", "distill"), "student.init": "from_general",
             "general.tsm_languages": TSM_LANGUAGES, "general.max_length": 64,
             "general.buckets": (32, 64), "general.train.num_epochs": 1.0}
  return dict(
      title="General-distillation objectives (experiment plan)",
      config="configs/study.py",
      overrides=dict(common.TSM, **general),
      axes=dict(seed=common.SEEDS, objective=OBJECTIVES),
      tables=[dict(name="objectives", title="Objectives, tsm", rows="objective",
                   columns=())],
      comparisons=[dict(axis="objective", a="kl_mlm", b="mse_mlm"),
                   dict(axis="objective", a="kl_cos_mlm", b="kl_mlm"),
                   dict(axis="objective", a="tinybert", b="kl_mlm")],
      budget="tsm presets (configs/studies/common.py); general distillation: 1 epoch over "
             "the 8 languages' train text, 64 tokens.",
  )
