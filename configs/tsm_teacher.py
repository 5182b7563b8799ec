"""Fine-tune the teacher (e5-small by default) on tsm, full train split, all 8 languages."""

from kd_jax.config_base import base_config, train_config


def get_config():
  config = base_config()
  config.stages = ("finetune_teacher",)
  config.teacher.train = train_config(num_epochs=2.0, learning_rate=1e-4, batch_size=32)
  return config
