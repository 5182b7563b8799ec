"""Entry point: python -m kd_jax.main --config configs/default.py --workdir runs/default"""

import logging as py_logging
import os
import re
import sys
from collections.abc import Sequence

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


def unknown_field_message(argv: Sequence[str], error: Exception) -> str | None:
  """One line naming the unknown field of a `--config.<field>=...` override in `argv`
  that ml_collections rejected with `error` (an AttributeError or KeyError whose message
  quotes the key and may say "Did you mean"), with the suggestion as a full field name;
  None when no override holds the key."""
  key = re.search(r"\\?'(\w+)\\?'", str(error))  # quoted as \'key\' in the message
  if key is None:
    return None
  key = key.group(1)
  for arg in argv:
    if not arg.startswith(("--config.", "-config.")):
      continue
    parts = arg.lstrip("-").split("=", 1)[0].split(".")
    if key in parts[1:]:
      i = parts.index(key, 1)
      field, parent = ".".join(parts[:i + 1]), ".".join(parts[:i])
      message = f"error: {field} is not a field of {parent}"
      suggestion = re.search(r'Did you mean "(\w+)"', str(error))
      if suggestion:
        message += f"; did you mean {parent}.{suggestion.group(1)}?"
      return message + " (all fields and their defaults: kd_jax/config_base.py)"
  return None


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with an unknown config field (`--config.student.nmu_layers=3`)
  reported as one line naming it instead of ml_collections' raw AttributeError."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    message = unknown_field_message(argv, e)
    if message is None:
      raise
    print(message, file=sys.stderr)
    sys.exit(2)


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
  from kd_jax.checkpoints import CheckpointError
  from kd_jax.config_base import ConfigError
  from kd_jax.data.schema import DataError
  from kd_jax.hf_io import CheckpointMismatchError
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ConfigError, CheckpointError, CheckpointMismatchError, DataError) as e:  # names it
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  from kd_jax import allocator
  allocator.reexec("kd_jax.main")  # CPU: mimalloc, before anything allocates
  app.run(main, flags_parser=parse_flags)
