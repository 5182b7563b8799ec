"""Logit-only KD of a 6-layer from_teacher student on tsm: L = alpha * CE + (1 - alpha) * L_pred.

The student of the issue-4 comparison (experiment plan, experiments 1 and 3): no
intermediate-layer terms, L_pred = MSE on logits or KL(teacher || student) at
temperature T (scaled by T^2); 200 steps of 32 (0.44 epoch) to fit 12 runs on a CPU.

  python -m kd_jax.main --config configs/tsm_logit_kd.py --workdir runs/logit_kd \
      --config.teacher.checkpoint=runs/real/teacher \
      --config.distill.prediction_loss=kl --config.distill.temperature=2 \
      --config.distill.alpha=0.2
The full grid, with seeds: python -m kd_jax.study --study configs/studies/loss_alpha.py.
"""

from kd_jax.config_base import base_config, train_config


def get_config():
  config = base_config()
  config.stages = ("distill",)
  config.student.train = train_config(num_train_steps=200, learning_rate=1e-4, batch_size=32,
                                      eval_every_steps=200, checkpoint_every_steps=100)
  w = config.distill.weights
  w.att, w.hid, w.embd, w.pred = 0.0, 0.0, 0.0, 1.0
  config.distill.alpha = 0.2
  return config
