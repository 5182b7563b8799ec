"""Unpadded execution (kd_jax.models.unpad): the same numbers as the padded encoder on
real tokens, for every family, forward and gradient, and in the KD train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import config_base, sharding, stages, student_init, train
from kd_jax.models import unpad
from kd_jax.models.encoder import Encoder, EncoderConfig, init_params

B, T = 8, 16


def _batch(seed=0, vocab=100):
  r = np.random.default_rng(seed)
  lens = r.integers(3, T + 1, B)
  lens[0] = T  # one full row
  mask = (np.arange(T)[None] < lens[:, None]).astype(np.int32)
  ids = np.where(mask, r.integers(3, vocab, (B, T)), 1).astype(np.int32)
  return ids, mask


def test_token_index_positions_groups_and_budget():
  mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
  np.testing.assert_array_equal(unpad.token_index(mask), [[0, 1, 3, 6, 7, 8]])
  # two groups of two examples (6 positions each); budget 5 = 3 real tokens rounded up to 5
  np.testing.assert_array_equal(unpad.token_index(mask, groups=2, multiple=5),
                                [[0, 1, 3, 6, 6], [0, 1, 2, 6, 6]])
  # the budget never exceeds a group's positions
  assert unpad.token_index(np.ones((2, 3)), groups=1, multiple=4).shape == (1, 6)
  assert unpad.token_index(np.zeros((2, 3)), groups=1).shape == (1, 1)
  with pytest.raises(ValueError, match=r"attention_mask must be \[B, T\]"):
    unpad.token_index(np.ones(4))
  with pytest.raises(ValueError, match="batch 4 is not divisible by groups=3"):
    unpad.token_index(mask, groups=3)
  with pytest.raises(ValueError, match="multiple=-1"):
    unpad.token_index(mask, multiple=-1)
  # default rounding: a sixteenth of the positions, so at most 16 budgets per shape
  assert [unpad.default_multiple(p) for p in (4096, 17, 8)] == [256, 2, 1]
  lengths = np.random.default_rng(0).integers(1, 129, size=(200, 32))
  budgets = {unpad.token_index(np.arange(128) < n[:, None], 1, unpad.default_multiple(4096))
             .shape[1] for n in lengths}
  assert budgets <= set(range(256, 4097, 256))  # the 16 multiples of 256
  # multiple=0 means that default: 32 x 128 = 4096 positions -> multiples of 256
  mask = np.arange(128) < lengths[0][:, None]
  np.testing.assert_array_equal(unpad.token_index(mask, 1, 0),
                                unpad.token_index(mask, 1, 256))


def test_layout_gathers_and_their_gradients_against_numpy():
  ids, mask = _batch()
  index = unpad.token_index(mask, groups=2, multiple=8)
  layout = unpad.TokenLayout.create(jnp.asarray(index), B, T)
  r = np.random.default_rng(1)
  x = r.standard_normal((B, T, 3)).astype(np.float32)
  # numpy reference: real tokens group by group, each group padded to the budget
  per_group = [x.reshape(2, -1, 3)[g][mask.reshape(2, -1)[g] != 0] for g in range(2)]
  want = np.zeros((2, index.shape[1], 3), np.float32)
  for g, rows in enumerate(per_group):
    want[g, :len(rows)] = rows
  tokens = layout.to_tokens(jnp.asarray(x))
  np.testing.assert_array_equal(tokens, want.reshape(-1, 3))
  back = layout.to_padded(tokens)
  np.testing.assert_array_equal(back, np.where(mask[..., None] != 0, x, 0))
  # to_tokens' transpose puts cotangents back in place (zeros at padding), and vice versa
  ct = r.standard_normal(tokens.shape).astype(np.float32)
  (dx,) = jax.vjp(layout.to_tokens, jnp.asarray(x))[1](jnp.asarray(ct))
  want_dx = np.zeros_like(x).reshape(2, -1, 3)
  for g in range(2):
    real = np.flatnonzero(mask.reshape(2, -1)[g])
    want_dx[g, real] = ct.reshape(2, -1, 3)[g, :len(real)]
  np.testing.assert_array_equal(dx, want_dx.reshape(x.shape))
  ct2 = r.standard_normal(x.shape).astype(np.float32)
  (dt,) = jax.vjp(layout.to_padded, tokens)[1](jnp.asarray(ct2))
  np.testing.assert_array_equal(dt, layout.to_tokens(jnp.asarray(ct2)))
  with pytest.raises(ValueError, match="3 groups, which do not divide batch 8"):
    unpad.TokenLayout.create(jnp.zeros((3, 4), jnp.int32), B, T)
  with pytest.raises(ValueError, match="budget 65 exceeds the 64 positions"):
    unpad.TokenLayout.create(jnp.zeros((2, 65), jnp.int32), B, T)


FAMILIES = {
    "bert": {},
    "roberta": dict(layer_norm_eps=1e-5),
    "distilbert": dict(type_vocab_size=0),
    "deberta-v2": dict(relative_attention=True, pos_att_type=("c2p", "p2c"), position_buckets=4,
                       share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
                       type_vocab_size=0),
}


def _config(family, **kw):
  return EncoderConfig(family=family, vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                       intermediate_size=64, max_position_embeddings=64,
                       **dict(FAMILIES[family], **kw))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unpadded_encoder_equals_padded_on_real_tokens(family, groups):
  cfg = _config(family)
  params = init_params(cfg, jax.random.PRNGKey(0))
  ids, mask = _batch()
  index = unpad.token_index(mask, groups, multiple=8)
  assert index.shape[1] < B * T // groups  # the budget really is smaller than padded
  model = Encoder(cfg)
  real = mask[..., None] != 0
  pair = (mask[:, None, :, None] * mask[:, None, None, :]) != 0
  probes = {}

  def run(p, token_index):
    return model.apply({"params": p}, ids, mask, output_hidden_states=True,
                       output_attention_scores=True, output_embeddings=True,
                       output_values=True, token_index=token_index)

  def loss(p, token_index):
    # random linear probes of every output at real tokens / real pairs
    out = run(p, token_index)
    terms = [out.logits, out.embeddings * real]
    terms += [h * real for h in out.hidden_states]
    terms += [jnp.where(pair, s, 0) for s in out.attention_scores]
    terms += [v * real[..., None] for v in out.values]
    total = 0.0
    for i, t in enumerate(terms):
      if i not in probes:
        probes[i] = np.random.default_rng(i).standard_normal(t.shape).astype(np.float32)
      total = total + (t * probes[i]).sum()
    return total

  padded, packed = run(params, None), run(params, index)
  np.testing.assert_allclose(packed.logits, padded.logits, atol=1e-6)
  for a, b in zip(padded.hidden_states, packed.hidden_states):
    np.testing.assert_allclose(np.where(real, b, 0), np.where(real, a, 0), atol=2e-6)
    assert not np.any(np.where(real, 0, b))  # padding positions are zeros
  for a, b in zip(padded.attention_scores, packed.attention_scores):
    np.testing.assert_allclose(np.where(pair, b, 0), np.where(pair, a, 0), atol=1e-6)
  np.testing.assert_array_equal(packed.embeddings, padded.embeddings)
  g_pad, g_packed = jax.grad(loss)(params, None), jax.grad(loss)(params, index)
  for path, a in jax.tree_util.tree_leaves_with_path(g_pad):
    b = g_packed
    for key in path:
      b = b[key.key]
    scale = float(np.abs(a).max()) + 1e-6  # floor: key-bias gradients are 0 up to rounding
    np.testing.assert_allclose(b / scale, a / scale, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("scan_layers,remat", [(True, False), (False, True), (True, True)])
def test_unpadded_scan_and_remat(scan_layers, remat):
  cfg = _config("bert")
  params = init_params(cfg, jax.random.PRNGKey(0))
  ids, mask = _batch(3)
  index = unpad.token_index(mask, 2, multiple=4)
  real = mask[..., None] != 0
  probe = np.random.default_rng(0).standard_normal((2, B, T, cfg.hidden_size)).astype(np.float32)

  def last(p, model, token_index):
    out = model.apply({"params": p}, ids, mask, output_hidden_states=True,
                      token_index=token_index)
    return out.logits.sum() + (jnp.stack(out.hidden_states) * real * probe).sum(), out

  (v0, o0), g0 = jax.value_and_grad(last, has_aux=True)(params, Encoder(cfg), None)
  (v1, o1), g1 = jax.value_and_grad(last, has_aux=True)(
      params, Encoder(cfg, scan_layers=scan_layers, remat=remat), index)
  assert abs(float(v0) - float(v1)) < 1e-5 * float(np.abs(probe).sum())
  np.testing.assert_allclose(o1.logits, o0.logits, atol=1e-6)
  # relative to each leaf's largest entry, plus a floor for leaves that are zero up to
  # rounding (key biases: softmax ignores them)
  excess = jax.tree.map(lambda a, b: float(np.abs(a - b).max() - 1e-5 * np.abs(a).max()), g0, g1)
  assert max(jax.tree.leaves(excess)) < 1e-8


def test_unpadded_train_step_equals_padded_without_dropout():
  """Two KD steps with and without token_index, dropout off: the same loss terms and
  parameters; with dropout on, the unpadded step still trains (finite, parameters move)."""
  no_drop = dict(hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0)
  teacher_cfg = EncoderConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4,
                              intermediate_size=64, max_position_embeddings=32, num_labels=3,
                              pad_token_id=0)
  student_cfg = teacher_cfg.replace(num_layers=2)
  teacher = jax.tree.map(np.asarray, init_params(teacher_cfg, jax.random.PRNGKey(0)))
  layer_map = student_init.uniform_layer_map(4, 2)
  student, _ = student_init.init_student("from_teacher",
                                         init_params(student_cfg, jax.random.PRNGKey(1)),
                                         teacher_params=teacher, layer_map=layer_map)
  student = jax.tree.map(np.asarray, student)
  ids, mask = _batch(5, vocab=64)
  ids = np.where(mask, ids, 0)
  batch = {"input_ids": ids, "attention_mask": mask,
           "labels": np.arange(B, dtype=np.int32) % 3, "example_mask": np.ones(B, np.float32)}
  mesh = sharding.create_mesh(1, 1, 1, devices=jax.devices()[:1])
  tx, _ = train.make_optimizer(config_base.train_config(learning_rate=1e-3, warmup_ratio=0.0), 10)
  weights = {"att": 1.0, "hid": 1.0, "embd": 1.0, "pred": 1.0, "clf": 1.0}

  def run(cfg_changes, token_index):
    state, state_sharding = train.create_train_state({"model": student, "proj": {}}, tx, mesh)
    step = train.make_train_step(Encoder(student_cfg.replace(**cfg_changes)),
                                 (Encoder(teacher_cfg.replace(**cfg_changes)),), tx,
                                 weights=weights, layer_map=layer_map, prediction_loss="mse",
                                 temperature=1.0, mesh=mesh, state_sharding=state_sharding)
    b = batch if token_index is None else dict(batch, token_index=token_index)
    b = sharding.shard_global_batch(b, mesh)
    rng = sharding.replicate(jax.random.PRNGKey(3), mesh)
    for _ in range(2):
      state, metrics = step(state, (teacher,), b, rng)
    return state, jax.device_get(metrics)

  index = unpad.token_index(mask, 1, multiple=T)
  padded, m_pad = run(no_drop, None)
  packed, m_packed = run(no_drop, index)
  for term in ("loss", "att", "hid", "embd", "pred", "clf"):
    assert abs(m_pad[term] - m_packed[term]) <= 1e-5 * abs(m_pad[term]) + 1e-6, term
  # The gradient norm sums every parameter's squared gradient in another order on each
  # path: relative 1.1e-5 measured on an Intel Xeon (AVX-512), below 1e-5 on AMD Zen 3.
  assert abs(m_pad["grad_norm"] - m_packed["grad_norm"]) <= 3e-5 * m_pad["grad_norm"]
  # Adam divides by √v, so float rounding in rarely hit embedding rows (tiny gradients)
  # shows as ~1 % of a step of lr 1e-3; the transformer layers agree to ~1e-6.
  diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), padded.params, packed.params)
  assert max(jax.tree.leaves(diffs)) < 5e-5
  assert max(jax.tree.leaves(diffs["model"]["layer_1"])) < 5e-6
  dropped, m_drop = run({}, index)
  assert np.isfinite(m_drop["loss"]) and m_drop["loss"] != m_packed["loss"]
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), dropped.params["model"],
                       jax.tree.map(jnp.asarray, student))
  assert max(jax.tree.leaves(moved)) > 1e-4


def test_config_unpad_adds_token_index_per_batch_shard():
  config = config_base.base_config()
  batch = {"attention_mask": np.array([[1, 1, 0, 0], [1, 1, 1, 1]]), "input_ids": np.ones((2, 4))}
  mesh = sharding.create_mesh(1, 1, 1, devices=jax.devices()[:1])
  assert stages.unpad_transforms(config, mesh) == ()
  config.unpad = True
  np.testing.assert_array_equal(stages.unpad_transforms(config, mesh)[0](batch, 0)["token_index"],
                                [[0, 1, 4, 5, 6, 7]])  # 0: multiples of 8/16 -> 1 token
  config.unpad_multiple = 3
  assert stages.unpad_transforms(config, mesh)[0](batch, 0)["token_index"].shape == (1, 6)
  config.unpad_multiple = -1
  with pytest.raises(ValueError, match="config.unpad_multiple=-1"):
    config_base.validate_config(config)


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_unpadded_evaluator_equals_padded(head):
  """ClassificationEvaluator with unpad_multiple (what config.unpad gives val and test):
  the same logits as the padded evaluator, so the same predictions and metrics, on
  batches whose lengths vary (budgets below the padded size)."""
  from kd_jax import evaluation
  from kd_jax.data.batching import IGNORE_LABEL, TokenizedData
  cfg = _config("bert", num_labels=3, head=head)
  params = init_params(cfg, jax.random.PRNGKey(0))
  r = np.random.default_rng(1)
  lengths = r.integers(3, T + 1, 40)
  ids = [np.concatenate([[2], r.integers(5, 100, n - 2), [3]]).astype(np.int32)
         for n in lengths]
  token_labels = None
  if head == "token":
    token_labels = [np.where(r.random(n) < 0.7, r.integers(0, 3, n), IGNORE_LABEL)
                    .astype(np.int32) for n in lengths]
  data = TokenizedData(ids, lengths.astype(np.int32), r.integers(0, 3, 40).astype(np.int32),
                       (np.arange(40) % 2).astype(np.int32), language_order=("en", "ar"),
                       token_labels=token_labels)
  mesh = sharding.create_mesh(1, 1, 1, devices=jax.devices()[:1])
  names = ("O", "B-X", "I-X") if head == "token" else ("a", "b", "c")
  kwargs = dict(batch_size=8, buckets=(T,), pad_id=1, mesh=mesh, label_names=names,
                label_kind=head)
  padded = evaluation.ClassificationEvaluator(Encoder(cfg), data, "val", **kwargs)
  unpadded = evaluation.ClassificationEvaluator(Encoder(cfg), data, "val", unpad_multiple=0,
                                                **kwargs)
  p, u = padded._predictions(params, None), unpadded._predictions(params, None)
  for a, b in zip(p, u):
    np.testing.assert_array_equal(a, b)
  budgets = set()
  real = unpadded.predict
  unpadded.predict = lambda params, batch: (budgets.add(batch["token_index"].shape[-1]),
                                            real(params, batch))[1]
  assert unpadded(params, 0) == padded(params, 0)
  assert budgets and max(budgets) < 8 * T  # the real tokens, not the padded positions
