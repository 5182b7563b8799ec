"""Entry point: python -m kd_jax.main --config configs/default.py --workdir runs/default"""

import logging as py_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
config_flags.DEFINE_config_file("config", None, "Config file (get_config()).", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
# Multi-process (kd_jax/distributed.py): auto initialises under SLURM (> 1 task) or on
# a multi-host TPU found in the environment; an explicit coordinator implies on.
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "jax.distributed.initialize?")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Number of processes.")
flags.DEFINE_integer("process_id", None, "This process's id, 0..num_processes-1.")


class _QuietCheckpointing(py_logging.Filter):
  """Orbax logs several INFO lines per save; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietCheckpointing())
  from kd_jax import distributed
  distributed.maybe_initialize(os.environ, distributed=FLAGS.distributed,
                               coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  import jax
  from kd_jax import train
  logging.info("JAX process %d/%d, %d local / %d global devices: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices())
  logging.info("config:\n%s", FLAGS.config)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
