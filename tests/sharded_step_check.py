"""Runs one KD train step on a 1-device and an 8-device mesh and prints the differences.

Started by tests/test_train.py with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import config_base, sharding, student_init, train
from kd_jax.models.encoder import Encoder, EncoderConfig, init_params


def main():
  teacher_cfg = EncoderConfig(vocab_size=50, hidden_size=32, num_layers=4, num_heads=4,
                              intermediate_size=64, max_position_embeddings=32, num_labels=3,
                              pad_token_id=0)
  student_cfg = teacher_cfg.replace(num_layers=2, hidden_size=16, num_heads=2,
                                    intermediate_size=32)
  teacher_params = init_params(teacher_cfg, jax.random.PRNGKey(0))
  layer_map = student_init.uniform_layer_map(4, 2)
  student_params, _ = student_init.init_student(
      "from_teacher", init_params(student_cfg, jax.random.PRNGKey(1)),
      teacher_params=teacher_params, layer_map=layer_map)
  # Host copies: the state is donated, so each mesh must get fresh device buffers.
  teacher_params, student_params = jax.tree.map(np.asarray, (teacher_params, student_params))
  rng = np.random.default_rng(0)
  ids = rng.integers(2, 50, size=(16, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  for row, length in enumerate(rng.integers(3, 13, size=16)):
    ids[row, length:], mask[row, length:] = 0, 0
  batch = {"input_ids": ids, "attention_mask": mask,
           "labels": rng.integers(0, 3, size=16).astype(np.int32),
           "language_ids": np.zeros(16, np.int32),
           "example_mask": np.r_[np.ones(14), np.zeros(2)].astype(np.float32)}
  tc = config_base.train_config(learning_rate=1e-3, warmup_ratio=0.0)
  tx, _ = train.make_optimizer(tc, 10)
  weights = dict(att=1.0, hid=1.0, embd=1.0, pred=1.0, clf=1.0)
  proj = {"hid": np.full((16, 32), 0.02, np.float32), "embd": np.full((16, 32), 0.01, np.float32)}

  results = {}
  for n in (1, 8):
    mesh = sharding.create_mesh(n)
    trainable = {"model": student_params, "proj": proj}
    state = sharding.replicate(train.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                                                opt_state=tx.init(trainable)), mesh)
    step = train.make_train_step(Encoder(student_cfg), Encoder(teacher_cfg), tx, weights=weights,
                                 layer_map=layer_map, prediction_loss="mse", temperature=1.0,
                                 mesh=mesh)
    sharded = sharding.shard_batch(batch, mesh)
    if n == 8:
      results["batch_sharding_devices"] = len(sharded["input_ids"].sharding.device_set)
    for i in range(2):
      state, metrics = step(state, sharding.replicate(teacher_params, mesh), sharded,
                            jax.random.PRNGKey(42))
    results[n] = (float(metrics["loss"]), jax.device_get(state.params))
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), results[1][1], results[8][1])
  print(json.dumps({"devices": jax.device_count(), "loss_1": results[1][0], "loss_8": results[8][0],
                    "batch_sharding_devices": results["batch_sharding_devices"],
                    "max_param_diff": max(jax.tree.leaves(diffs))}))


if __name__ == "__main__":
  main()
