"""Base config of the studies in configs/studies/ (python -m kd_jax.study).

Every study run starts here; the task presets of configs/studies/common.py set the data
and the budgets. Unpadded training steps (config.unpad) for speed; the train and eval
subsets are drawn with data.subset_seed = 0 whatever the run's seed, so students of every
seed train on the same subset and are tested on the same sentences as their teacher.
"""

from kd_jax.config_base import base_config, train_config


def get_config():
  config = base_config()
  config.unpad = True
  config.data.subset_seed = 0
  config.teacher.train = train_config(learning_rate=1e-4, batch_size=32)
  config.student.train = train_config(learning_rate=1e-4, batch_size=32)
  return config
