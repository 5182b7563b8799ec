"""Distill a student from a fine-tuned tsm teacher.

  python -m kd_jax.main --config configs/tsm_student.py --workdir runs/student_kd \
      --config.teacher.checkpoint=runs/teacher/teacher
Variants: --config.student.init=from_base|from_scratch, --config.distill.kd=False,
--config.student.num_layers=4, --config.student.hidden_size=192.
"""

from kd_jax.config_base import base_config, train_config


def get_config():
  config = base_config()
  config.stages = ("distill",)
  config.student.train = train_config(num_epochs=1.0, learning_rate=1e-4, batch_size=32)
  return config
