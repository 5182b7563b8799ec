"""Issue 4's comparison: MSE vs KL at T = 1, 2, 4, crossed with alpha in {0.2, 0.5, 0.8}.

  python launch/sweep.py --sweep configs/sweeps/logit_loss_alpha.py \
      --config configs/tsm_logit_kd.py --workdir runs/sweep \
      -- --config.teacher.checkpoint=runs/real/teacher
"""

import itertools

LOSSES = (("mse", 1.0), ("kl", 1.0), ("kl", 2.0), ("kl", 4.0))
ALPHAS = (0.2, 0.5, 0.8)


def get_sweep():
  """Run name -> config overrides (field path -> value), in table order."""
  runs = {}
  for (loss, temperature), alpha in itertools.product(LOSSES, ALPHAS):
    name = f"mse_a{alpha}" if loss == "mse" else f"kl_T{temperature:g}_a{alpha}"
    runs[name] = {"distill.prediction_loss": loss, "distill.temperature": temperature,
                  "distill.alpha": alpha}
  return runs
