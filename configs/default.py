"""Both stages on a small real slice of tsm, <= 15 minutes on a 2-core CPU.

e5-small teacher fine-tuned briefly on all 8 languages, then a 6-layer from_teacher
student with the TinyBERT loss; prints the per-language test macro-F1 table.
"""

from kd_jax.config_base import base_config, train_config


def get_config():
  config = base_config()
  config.data.train_fraction = 0.2    # 368 tweets per language: 92 steps of 32
  config.data.eval_fraction = 0.2     # 65 val / 174 test tweets per language
  config.data.max_length = 64
  config.data.buckets = (32, 64)
  config.teacher.train = train_config(num_epochs=1.0, learning_rate=1e-4, batch_size=32,
                                      eval_every_steps=46, checkpoint_every_steps=46,
                                      log_every_steps=10)
  config.student.train = train_config(num_epochs=1.0, learning_rate=1e-4, batch_size=32,
                                      eval_every_steps=46, checkpoint_every_steps=46,
                                      log_every_steps=10)
  return config
