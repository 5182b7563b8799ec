"""Runs two KD train steps on a 1-device mesh and on (data, fsdp, tensor) meshes of 8
devices, and prints one JSON line: losses, largest parameter / Adam-state differences,
and how the parameters were sharded.

Started by tests/test_sharding.py with
XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import json

import jax
import numpy as np
import optax

from kd_jax import config_base, sharding, student_init, train
from kd_jax.models import unpad
from kd_jax.models.encoder import Encoder, EncoderConfig, init_params

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))
WORD = ("model", "embeddings", "word_embeddings", "embedding")
INTERMEDIATE = ("model", "layer_0", "intermediate", "kernel")


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _sharding_report(state) -> dict:
  """Specs and per-device shard shapes of a few leaves (params and Adam's mu)."""
  mu = optax.tree.get(state.opt_state, "mu")
  leaves = {"word_embeddings": _get(state.params, WORD),
            "intermediate_kernel": _get(state.params, INTERMEDIATE),
            "mu_intermediate_kernel": _get(mu, INTERMEDIATE),
            "mu_word_embeddings": _get(mu, WORD)}
  return {name: {"spec": [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec],
                 "global_shape": list(x.shape),
                 "shard_shape": list(x.addressable_shards[0].data.shape),
                 "num_devices": len(x.sharding.device_set)}
          for name, x in leaves.items()}


def main():
  teacher_cfg = EncoderConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4,
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
  ids = rng.integers(2, 64, size=(16, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  for row, length in enumerate(rng.integers(3, 13, size=16)):
    ids[row, length:], mask[row, length:] = 0, 0
  batch = {"input_ids": ids, "attention_mask": mask,
           "labels": rng.integers(0, 3, size=16).astype(np.int32),
           "language_ids": np.zeros(16, np.int32),
           "example_mask": np.r_[np.ones(14), np.zeros(2)].astype(np.float32)}
  tc = config_base.train_config(learning_rate=1e-3, warmup_ratio=0.0)
  tx, _ = train.make_optimizer(tc, 10)
  weights = {"att": 1.0, "hid": 1.0, "embd": 1.0, "pred": 1.0, "clf": 1.0}
  proj = {"hid": np.full((16, 32), 0.02, np.float32), "embd": np.full((16, 32), 0.01, np.float32)}

  no_dropout = dict(hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0)

  def run(mesh, unpadded=False, dropout=True):
    scfg, tcfg = ((student_cfg, teacher_cfg) if dropout else
                  (student_cfg.replace(**no_dropout), teacher_cfg.replace(**no_dropout)))
    state, state_sharding = train.create_train_state({"model": student_params, "proj": proj},
                                                     tx, mesh)
    teacher_sharding = sharding.param_shardings(teacher_params, mesh)
    step = train.make_train_step(Encoder(scfg), (Encoder(tcfg),), tx, weights=weights,
                                 layer_map=layer_map, prediction_loss="mse", temperature=1.0,
                                 mesh=mesh, state_sharding=state_sharding,
                                 teacher_sharding=(teacher_sharding,))
    b = batch
    if unpadded:
      b = dict(batch, token_index=unpad.token_index(batch["attention_mask"],
                                                    sharding.batch_divisor(mesh), multiple=4))
    sharded = sharding.shard_global_batch(b, mesh)
    teacher = sharding.shard_tree(teacher_params, teacher_sharding)
    rng = sharding.replicate(jax.random.PRNGKey(42), mesh)
    for _ in range(2):
      state, metrics = step(state, (teacher,), sharded, rng)
    report = _sharding_report(state)
    report["teacher_intermediate_spec"] = list(
        teacher["layer_0"]["intermediate"]["kernel"].sharding.spec)
    report["batch_devices"] = len(sharded["input_ids"].sharding.device_set)
    if unpadded:
      report["token_index_shape"] = list(sharded["token_index"].shape)
      report["token_index_shard_shape"] = list(
          sharded["token_index"].addressable_shards[0].data.shape)
    host = jax.device_get((state.params, optax.tree.get(state.opt_state, "mu")))
    return float(metrics["loss"]), host, report

  loss_1, ref, _ = run(sharding.create_mesh(1, 1, 1, devices=jax.devices()[:1]))
  out = {"devices": jax.device_count(), "loss_1": loss_1, "meshes": {}}
  for shape in MESHES:
    loss, got, report = run(sharding.create_mesh(*shape))
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), ref, got)
    out["meshes"]["x".join(map(str, shape))] = dict(
        report, loss=loss, max_param_diff=max(jax.tree.leaves(diffs[0])),
        max_mu_diff=max(jax.tree.leaves(diffs[1])))
  # Unpadded (one token group per batch shard) against the padded 1-device step. Unpadded
  # steps draw dropout on [G·N, H] (G = batch shards), so both go without dropout.
  loss_1, ref, _ = run(sharding.create_mesh(1, 1, 1, devices=jax.devices()[:1]), dropout=False)
  out["loss_1_no_dropout"], out["unpadded"] = loss_1, {}
  # (2,4,1) would repeat (8,1,1)'s 8 groups; (2,2,2) adds tensor sharding and 4 groups.
  for shape in ((1, 1, 1), (8, 1, 1), (2, 2, 2)):
    devices = jax.devices()[:1] if shape == (1, 1, 1) else None
    loss, got, report = run(sharding.create_mesh(*shape, devices=devices), unpadded=True,
                            dropout=False)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), ref, got)
    out["unpadded"]["x".join(map(str, shape))] = dict(
        loss=loss, max_param_diff=max(jax.tree.leaves(diffs[0])),
        max_mu_diff=max(jax.tree.leaves(diffs[1])),
        token_index_shape=report["token_index_shape"],
        token_index_shard_shape=report["token_index_shard_shape"])
  # A dimension its mesh axis does not divide (vocab 51 over tensor=2) is replicated there.
  odd = {"word_embeddings": {"embedding": jax.ShapeDtypeStruct((51, 32), np.float32)}}
  spec = sharding.param_shardings(odd, sharding.create_mesh(2, 2, 2))
  out["odd_vocab_spec"] = list(spec["word_embeddings"]["embedding"].spec)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
