"""train.make_cohort_train_step: N students of one shape, one teacher forward, each
student's update under vmap, against training each of them alone with make_train_step."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import sharding, train
from kd_jax.config_base import train_config
from kd_jax.models.encoder import Encoder, EncoderConfig, init_params

KD = {"att": 1.0, "hid": 1.0, "embd": 1.0, "pred": 1.0, "clf": 1.0}
KD_NO_ATT = {"hid": 1.0, "embd": 1.0, "pred": 1.0, "clf": 1.0}
NON_KD = {"clf": 1.0}


def _batches(n, b=4, t=16, vocab=100, seed=0):
  r = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    lengths = r.integers(4, t + 1, size=b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask, r.integers(3, vocab, (b, t)), 1).astype(np.int32)
    out.append({"input_ids": ids, "attention_mask": mask,
                "labels": r.integers(0, 3, b).astype(np.int32),
                "example_mask": np.ones(b, np.float32)})
  return out


@pytest.mark.parametrize("mode", ["scan", "vmap", "loop"])
def test_seven_students_one_teacher_pass_equal_training_them_one_by_one(mode):
  """Three initialisations x {KD, NON-KD} (and a KD-without-att one): after 3 steps
  every student's parameters and losses equal its own run's within 1e-5."""
  mesh = sharding.create_mesh(1)
  tcfg = EncoderConfig(family="bert", vocab_size=100, hidden_size=32, num_layers=4,
                       num_heads=4, intermediate_size=64, num_labels=3, pad_token_id=1)
  scfg = tcfg.replace(num_layers=2)
  teacher, student = Encoder(tcfg), Encoder(scfg)
  t_params = sharding.replicate(init_params(tcfg, jax.random.PRNGKey(0)), mesh)
  inits = [init_params(scfg, jax.random.PRNGKey(s)) for s in (1, 2, 3)]
  cohort = [(p, w) for p in inits for w in (KD, NON_KD)] + [(inits[0], KD_NO_ATT)]
  n = len(cohort)
  tx, _ = train.make_optimizer(train_config(warmup_ratio=0.0), 10)
  layer_map = (2, 4)
  kw = dict(layer_map=layer_map, prediction_loss="mse", temperature=1.0, mesh=mesh)
  rngs = jax.random.split(jax.random.PRNGKey(7), n)
  batches = [sharding.shard_batch(b, mesh) for b in _batches(3)]

  alone, alone_losses = [], []
  for (params, weights), rng in zip(cohort, rngs):
    teachers = (teacher,) if weights is not NON_KD else ()
    step = train.make_train_step(student, teachers, tx, weights=weights, **kw)
    state, _ = train.create_train_state({"model": params, "proj": {}}, tx, mesh)
    losses = []
    for batch in batches:
      state, metrics = step(state, (t_params,) if teachers else (), batch, rng)
      losses.append(float(metrics["loss"]))
    alone.append(jax.device_get(state.params))
    alone_losses.append(losses)

  step = train.make_cohort_train_step(student, (teacher,), tx, mode=mode,
                                      weights=[w for _, w in cohort], **kw)
  states = tuple(train.create_train_state({"model": p, "proj": {}}, tx, mesh)[0]
                 for p, _ in cohort)
  if mode != "loop":
    states = train.stack_states(states)
  cohort_losses = []
  for batch in batches:
    states, metrics = step(states, (t_params,), batch, rngs)
    assert metrics["loss"].shape == (n,)
    cohort_losses.append(np.asarray(metrics["loss"]))
  np.testing.assert_allclose(np.stack(cohort_losses).T, alone_losses, rtol=1e-5, atol=1e-6)
  states = train.unstack_state(states, n) if mode != "loop" else list(states)
  for i, state in enumerate(states):
    assert int(state.step) == 3
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         jax.device_get(state.params), alone[i])
    assert max(jax.tree.leaves(diffs)) < 1e-5, (i, diffs)
  # the students did move apart: KD and NON-KD from one initialisation differ
  first = states
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), first[0].params,
                       first[1].params)
  assert max(jax.tree.leaves(moved)) > 1e-4


def test_cohort_refuses_no_students_and_model_sharded_meshes():
  cfg = EncoderConfig(family="bert", vocab_size=50, hidden_size=16, num_layers=2,
                      num_heads=2, intermediate_size=32, num_labels=3, pad_token_id=1)
  tx, _ = train.make_optimizer(train_config(), 10)
  mesh = sharding.create_mesh(1)
  with pytest.raises(ValueError, match="mode='unroll'"):
    train.make_cohort_train_step(Encoder(cfg), (), tx, weights=[NON_KD], mode="unroll",
                                 layer_map=(None, None), prediction_loss="mse",
                                 temperature=1.0, mesh=mesh)
  with pytest.raises(ValueError, match="no students"):
    train.make_cohort_train_step(Encoder(cfg), (), tx, weights=[], layer_map=(None, None),
                                 prediction_loss="mse", temperature=1.0, mesh=mesh)
  fsdp = types.SimpleNamespace(shape={"data": 1, "fsdp": 2, "tensor": 1})
  with pytest.raises(ValueError, match="shards the model"):
    train.make_cohort_train_step(Encoder(cfg), (), tx, weights=[NON_KD],
                                 layer_map=(None, None), prediction_loss="mse",
                                 temperature=1.0, mesh=fsdp)
