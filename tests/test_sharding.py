"""Mesh and logical-axis sharding, bf16 precision, and non-finite steps (stop / skip).

The 8-device comparison runs in its own process (the device count is fixed when jax
starts): tests/sharded_step_check.py with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from kd_jax import config_base, sharding, student_init, train
from kd_jax.models.encoder import Encoder, EncoderConfig, init_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- mesh, rules
def test_mesh_shape_resolves_rest_and_names_fields():
  assert sharding.mesh_shape(8) == (8, 1, 1)
  assert sharding.mesh_shape(8, data=2, fsdp=-1) == (2, 4, 1)
  assert sharding.mesh_shape(8, data=-1, fsdp=2, tensor=2) == (2, 2, 2)
  assert sharding.mesh_shape(8, data=2, fsdp=2, tensor=2) == (2, 2, 2)
  with pytest.raises(ValueError, match=r"config.mesh.data=2, config.mesh.fsdp=2, "
                                       r"config.mesh.tensor=1: .* must equal .* 8"):
    sharding.mesh_shape(8, data=2, fsdp=2)
  with pytest.raises(ValueError, match="only one of them may be -1"):
    sharding.mesh_shape(8, data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="8 devices are not divisible by the product 3"):
    sharding.mesh_shape(8, data=-1, tensor=3)
  with pytest.raises(ValueError, match=r"\['fsdp'\] must be >= 1"):
    sharding.mesh_shape(8, fsdp=0)


def test_mesh_config_validated_before_training():
  config = config_base.base_config()
  config_base.validate_config(config)
  config.mesh.tensor = -1
  with pytest.raises(ValueError, match="only one of data, fsdp, tensor may be -1"):
    config_base.validate_config(config)
  config = config_base.base_config()
  config.mesh.fsdp = 0
  with pytest.raises(ValueError, match=r"config.mesh.fsdp=0"):
    config_base.validate_config(config)
  for field, value in (("precision", "fp16"), ("nonfinite", "ignore")):
    config = config_base.base_config()
    config[field] = value
    with pytest.raises(ValueError, match=f"config.{field}='{value}' is not valid"):
      config_base.validate_config(config)


def _families():
  """Encoder configs of every family, with all optional parameters present."""
  base = {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
          "intermediate_size": 64, "max_position_embeddings": 32, "num_labels": 3,
          "pad_token_id": 0}
  configs = [EncoderConfig(family="bert", **base), EncoderConfig(family="roberta", **base),
             EncoderConfig(family="distilbert", **dict(base, type_vocab_size=0)),
             EncoderConfig(family="bert", head="token", **base)]
  configs.append(EncoderConfig(family="deberta-v2", relative_attention=True,
                               position_buckets=8, max_relative_positions=16,
                               pos_att_type=("c2p", "p2c"), share_att_key=False,
                               norm_rel_ebd="layer_norm", **base))
  mlm = EncoderConfig(family="bert", head="mlm", **dict(base, num_labels=0))
  return configs, mlm


def test_every_encoder_parameter_has_a_rule():
  """No parameter of any family falls through to the replicated default, and every
  rule gives as many logical axes as the leaf has dimensions."""
  configs, mlm = _families()
  for cfg in (*configs, mlm):
    params = jax.eval_shape(lambda c=cfg: init_params(c, jax.random.PRNGKey(0)))
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
      name = sharding.path_name(path)
      assert any(re.search(p, name) for p, _ in sharding.PARAM_AXES), (cfg.family, name)
    if cfg is mlm:
      logical = sharding.logical_axes(params)
      assert logical["lm_head"]["bias"] == jax.sharding.PartitionSpec("vocab")
      continue
    logical = sharding.logical_axes(params)
    spec = lambda *path, tree=logical: _get(tree, path)
    assert spec("embeddings", "word_embeddings", "embedding") == jax.sharding.PartitionSpec(
        "vocab", "embed")
    assert spec("layer_1", "intermediate", "kernel") == jax.sharding.PartitionSpec(
        "embed", "mlp")
    assert spec("layer_1", "output", "kernel") == jax.sharding.PartitionSpec("mlp", "embed")
    assert spec("layer_0", "attention", "output", "kernel") == jax.sharding.PartitionSpec(
        "heads", "embed")
    assert spec("classifier", "kernel") == jax.sharding.PartitionSpec("mlp", "labels")


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_rule_with_wrong_rank_is_an_error():
  with pytest.raises(ValueError, match="'layer_0/intermediate/kernel' has 3 dimensions"):
    sharding.logical_axes_for("layer_0/intermediate/kernel", 3)
  assert sharding.logical_axes_for("something/new", 2) == jax.sharding.PartitionSpec()


def test_sharded_steps_match_single_device():
  """(8,1,1), (2,4,1), (2,2,2) meshes of 8 simulated CPU devices: same loss, parameters
  and Adam moments as 1 device after two KD steps, with parameters, teacher and
  optimizer state really split (shards smaller than the arrays)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_step_check.py")],
                          env=env, capture_output=True, text=True, timeout=1500, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["devices"] == 8
  assert set(report["meshes"]) == {"8x1x1", "2x4x1", "2x2x2"}
  for name, m in report["meshes"].items():
    assert abs(m["loss"] - report["loss_1"]) < 1e-5, name
    assert m["max_param_diff"] < 1e-5, name
    assert m["max_mu_diff"] < 1e-5, name
    assert m["batch_devices"] == 8, name
    assert m["word_embeddings"]["spec"] == ["tensor", "fsdp"], name
    assert m["intermediate_kernel"]["spec"] == ["fsdp", "tensor"], name
    assert m["mu_intermediate_kernel"]["spec"] == ["fsdp", "tensor"], name
    assert m["mu_word_embeddings"]["spec"] == ["tensor", "fsdp"], name
    assert m["teacher_intermediate_spec"] == ["fsdp", "tensor"], name
  # word embeddings [64, 16], intermediate kernel [16, 32]
  shard = lambda mesh, leaf: report["meshes"][mesh][leaf]["shard_shape"]
  assert shard("8x1x1", "word_embeddings") == [64, 16]   # fsdp = tensor = 1
  assert shard("2x4x1", "word_embeddings") == [64, 4]
  assert shard("2x4x1", "intermediate_kernel") == [4, 32]
  assert shard("2x4x1", "mu_intermediate_kernel") == [4, 32]
  assert shard("2x2x2", "word_embeddings") == [32, 8]
  assert shard("2x2x2", "intermediate_kernel") == [8, 16]
  assert shard("2x2x2", "mu_word_embeddings") == [32, 8]
  assert report["odd_vocab_spec"] == [None, "fsdp"]  # vocab 51 over tensor=2: replicated
  # Unpadded steps (kd_jax.models.unpad), one token group per batch shard, no dropout:
  # the padded 1-device step's loss and parameters on every mesh.
  assert set(report["unpadded"]) == {"1x1x1", "8x1x1", "2x2x2"}
  for name, m in report["unpadded"].items():
    assert abs(m["loss"] - report["loss_1_no_dropout"]) < 1e-5, name
    assert m["max_param_diff"] < 1e-5, name
    assert m["max_mu_diff"] < 1e-5, name
    groups = {"1x1x1": 1, "8x1x1": 8, "2x2x2": 4}[name]  # data x fsdp
    assert m["token_index_shape"][0] == groups, name
    # each device holds its own group's whole index row
    assert m["token_index_shard_shape"] == [1, m["token_index_shape"][1]], name


# ---------------------------------------------------------------------------- one device
TEACHER_CFG = EncoderConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4,
                            intermediate_size=64, max_position_embeddings=32, num_labels=3,
                            pad_token_id=0, hidden_dropout=0.0, attention_dropout=0.0,
                            classifier_dropout=0.0)
STUDENT_CFG = TEACHER_CFG.replace(num_layers=2)
WEIGHTS = {"att": 1.0, "hid": 1.0, "embd": 1.0, "pred": 1.0, "clf": 1.0}


@pytest.fixture(scope="module")
def kd_setup():
  teacher = jax.tree.map(np.asarray, init_params(TEACHER_CFG, jax.random.PRNGKey(0)))
  layer_map = student_init.uniform_layer_map(4, 2)
  student, _ = student_init.init_student(
      "from_teacher", init_params(STUDENT_CFG, jax.random.PRNGKey(1)),
      teacher_params=teacher, layer_map=layer_map)
  rng = np.random.default_rng(0)
  ids = rng.integers(2, 64, size=(8, 16)).astype(np.int32)
  mask = np.ones_like(ids)
  for row, length in enumerate(rng.integers(4, 17, size=8)):
    ids[row, length:], mask[row, length:] = 0, 0
  batch = {"input_ids": ids, "attention_mask": mask,
           "labels": rng.integers(0, 3, size=8).astype(np.int32),
           "example_mask": np.ones(8, np.float32)}
  mesh = sharding.create_mesh(1, 1, 1, devices=jax.devices()[:1])
  return {"teacher": teacher, "student": jax.tree.map(np.asarray, student),
          "layer_map": layer_map, "batch": batch, "mesh": mesh}


def _step_fn(setup, dtype=jnp.float32, nonfinite="stop", lr=1e-3, remat=False,
             student_cfg=STUDENT_CFG, scan_layers=False):
  tc = config_base.train_config(learning_rate=lr, warmup_ratio=0.0)
  tx, _ = train.make_optimizer(tc, 10, nonfinite)
  mesh = setup["mesh"]
  state, state_sharding = train.create_train_state({"model": setup["student"], "proj": {}},
                                                   tx, mesh)
  teacher_sharding = sharding.param_shardings(setup["teacher"], mesh)
  step = train.make_train_step(
      Encoder(student_cfg.replace(dtype=dtype), remat=remat, scan_layers=scan_layers),
      (Encoder(TEACHER_CFG.replace(dtype=dtype), scan_layers=scan_layers),), tx,
      weights=WEIGHTS, layer_map=setup["layer_map"], prediction_loss="mse", temperature=1.0,
      mesh=mesh, state_sharding=state_sharding, teacher_sharding=(teacher_sharding,))
  teacher = (sharding.shard_tree(setup["teacher"], teacher_sharding),)
  rng = sharding.replicate(jax.random.PRNGKey(3), mesh)
  return state, lambda state, batch: step(state, teacher, sharding.shard_global_batch(batch, mesh),
                                          rng)


def test_bf16_step_close_to_fp32_with_fp32_master_state(kd_setup):
  state32, step32 = _step_fn(kd_setup)
  state16, step16 = _step_fn(kd_setup, dtype=jnp.bfloat16)
  state32, m32 = step32(state32, kd_setup["batch"])
  state16, m16 = step16(state16, kd_setup["batch"])
  m32, m16 = jax.device_get((m32, m16))
  for term in ("loss", "att", "hid", "embd", "pred", "clf"):
    assert m16[term].dtype == np.float32
    assert abs(m16[term] - m32[term]) <= 0.03 * abs(m32[term]) + 1e-3, (term, m16, m32)
  assert abs(m16["grad_norm"] - m32["grad_norm"]) <= 0.05 * m32["grad_norm"]
  # master parameters and Adam moments stay float32, and the bf16 step did train
  for tree in (state16.params, optax.tree.get(state16.opt_state, "mu"),
               optax.tree.get(state16.opt_state, "nu")):
    assert {leaf.dtype for leaf in jax.tree.leaves(tree)} == {jnp.dtype(jnp.float32)}
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state16.params["model"],
                       jax.tree.map(jnp.asarray, kd_setup["student"]))
  assert max(jax.tree.leaves(moved)) > 1e-4
  # the forward really ran in bf16: hidden states come out in bfloat16
  out = Encoder(STUDENT_CFG.replace(dtype=jnp.bfloat16)).apply(
      {"params": state16.params["model"]}, kd_setup["batch"]["input_ids"],
      kd_setup["batch"]["attention_mask"], output_hidden_states=True,
      output_attention_scores=True)
  assert out.hidden_states[0].dtype == jnp.bfloat16
  assert out.attention_scores[0].dtype == jnp.float32 and out.logits.dtype == jnp.float32


def test_remat_gives_the_same_step(kd_setup):
  """jax.checkpoint per student layer recomputes activations (dropout masks included);
  the step is unchanged."""
  cfg = STUDENT_CFG.replace(hidden_dropout=0.1, attention_dropout=0.1)
  plain, step_plain = _step_fn(kd_setup, student_cfg=cfg)
  remat, step_remat = _step_fn(kd_setup, remat=True, student_cfg=cfg)
  for _ in range(2):
    plain, m_plain = step_plain(plain, kd_setup["batch"])
    remat, m_remat = step_remat(remat, kd_setup["batch"])
  assert abs(float(m_plain["loss"]) - float(m_remat["loss"])) < 1e-6
  diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), plain.params, remat.params)
  assert max(jax.tree.leaves(diffs)) < 1e-6
  assert jax.tree.structure(plain.params) == jax.tree.structure(remat.params)


@pytest.mark.parametrize("remat", [False, True])
def test_scan_layers_gives_the_same_step(kd_setup, remat):
  """Layers as one lax.scan (student and teacher, with and without remat): the same two
  KD steps as the unrolled layers (no dropout, so no key difference)."""
  plain, step_plain = _step_fn(kd_setup)
  scanned, step_scan = _step_fn(kd_setup, scan_layers=True, remat=remat)
  for _ in range(2):
    plain, m_plain = step_plain(plain, kd_setup["batch"])
    scanned, m_scan = step_scan(scanned, kd_setup["batch"])
  for term in ("loss", "att", "hid", "embd", "pred", "clf"):
    assert abs(float(m_plain[term]) - float(m_scan[term])) < 1e-6, term
  diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), plain.params, scanned.params)
  assert max(jax.tree.leaves(diffs)) < 1e-6
  assert jax.tree.structure(plain.params) == jax.tree.structure(scanned.params)


def _poisoned(batch):
  return dict(batch, example_mask=np.full_like(batch["example_mask"], np.nan))


def test_nonfinite_stop_names_step_and_terms(kd_setup):
  state, step = _step_fn(kd_setup)
  state, metrics = step(state, kd_setup["batch"])
  assert float(metrics["nonfinite_terms"]) == 0
  train._check_finite("distill", 1, metrics)  # finite: no error
  state, metrics = step(state, _poisoned(kd_setup["batch"]))
  assert float(metrics["nonfinite_terms"]) > 0
  with pytest.raises(FloatingPointError,
                     match=r"distill step 2: non-finite loss term\(s\) \[.*'clf'.*'loss'"):
    train._check_finite("distill", 2, metrics)


def test_nonfinite_skip_keeps_state_and_counts(kd_setup):
  state, step = _step_fn(kd_setup, nonfinite="skip")
  state, metrics = step(state, kd_setup["batch"])
  assert float(metrics["skipped_steps"]) == 0
  before = jax.device_get((state.params, state.opt_state))
  state, metrics = step(state, _poisoned(kd_setup["batch"]))
  assert float(metrics["skipped_steps"]) == 1 and float(metrics["nonfinite_terms"]) > 0
  assert int(state.step) == 2
  after = jax.device_get((state.params, state.opt_state.inner_state))
  jax.tree.map(np.testing.assert_array_equal, (before[0], before[1].inner_state), after)
  state, metrics = step(state, kd_setup["batch"])  # training goes on from there
  assert float(metrics["skipped_steps"]) == 1 and np.isfinite(float(metrics["loss"]))
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), before[0],
                       jax.device_get(state.params))
  assert max(jax.tree.leaves(moved)) > 0


# ---------------------------------------------------------------------------- the loop
def test_loop_stops_on_nonfinite_before_saving(tiny_model_dir, real_data_dir, tmp_path):
  """A huge learning rate blows the parameters up after step 1: step 2 is non-finite,
  the loop raises naming it, and no checkpoint holds the broken state."""
  from test_train import tiny_config
  config = tiny_config(tiny_model_dir, real_data_dir)
  config.stages = ("finetune_teacher",)
  config.teacher.train.update(learning_rate=1e30, warmup_ratio=0.0, num_train_steps=4,
                              log_every_steps=4, eval_every_steps=4)
  with pytest.raises(FloatingPointError,
                     match=r"finetune_teacher step 2: non-finite loss term\(s\) \[.*'clf'"):
    train.train_and_evaluate(config, tmp_path)
  latest = ocp.CheckpointManager(tmp_path / "teacher" / "checkpoints" / "latest")
  assert latest.latest_step() is None
