"""Experiment plan, experiments 1 and 3: the logit loss (MSE, or KL at temperature 1, 2,
4) crossed with alpha in {0.2, 0.5, 0.8}, L = alpha * CE + (1 - alpha) * L_pred (no
intermediate-layer terms), for a 6-layer from_teacher student on tsm, 3 seeds.

  export KD_JAX_DATA_DIR=../shared/data
  python -m kd_jax.study --study configs/studies/loss_alpha.py --workdir runs/studies/loss_alpha
"""

import common

LOSSES = {"mse": {"distill.prediction_loss": "mse", "distill.temperature": 1.0},
          "klT1": {"distill.prediction_loss": "kl", "distill.temperature": 1.0},
          "klT2": {"distill.prediction_loss": "kl", "distill.temperature": 2.0},
          "klT4": {"distill.prediction_loss": "kl", "distill.temperature": 4.0}}
ALPHAS = {f"a{a}": {"distill.alpha": a} for a in (0.2, 0.5, 0.8)}


def get_study():
  logit_only = {"distill.weights.att": 0.0, "distill.weights.hid": 0.0,
                "distill.weights.embd": 0.0, "distill.weights.pred": 1.0,
                "student.init": "from_teacher"}
  return dict(
      title="Logit loss x alpha (experiment plan 1, 3)",
      config="configs/study.py",
      overrides=dict(common.TSM, **logit_only),
      axes=dict(seed=common.SEEDS, loss=LOSSES, alpha=ALPHAS),
      tables=[dict(name="loss_alpha", title="Logit loss x alpha, tsm", rows="loss",
                   columns="alpha")],
      comparisons=[dict(axis="loss", a="klT1", b="mse"), dict(axis="loss", a="klT4", b="klT1"),
                   dict(axis="alpha", a="a0.2", b="a0.8")],
      budget=common.BUDGET,
  )
