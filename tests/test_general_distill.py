"""General (MLM) distillation: unlabeled text, dynamic masking, MLM losses against numpy,
the general_distill stage end to end (resume, then task fine-tuning from its weights),
and several teachers (mean of logits)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses, masking
from kd_jax.data import text
from kd_jax.data.tsm import DataError

RTOL = 1e-5


# ---------------------------------------------------------------------------
# masking
# ---------------------------------------------------------------------------
SPECIAL = (0, 1, 2, 3, 4)   # pad, unk, cls, sep, mask (as the tiny tokenizer)
MASK_ID, VOCAB = 4, 50


def _spec(rate=0.15):
  return masking.MaskingSpec(mask_token_id=MASK_ID, special_ids=SPECIAL, vocab_size=VOCAB,
                             rate=rate)


def _random_batch(rng, b=64, t=40):
  """[CLS] words [SEP] pad..., lengths in [3, t]; an [UNK] sprinkled in; two empty rows."""
  lengths = rng.integers(3, t + 1, size=b)
  lengths[-2:] = 0
  ids = np.zeros((b, t), np.int32)
  for i, n in enumerate(lengths):
    if n:
      ids[i, :n] = rng.integers(5, VOCAB, size=n)
      ids[i, 0], ids[i, n - 1] = 2, 3
      if n > 4:
        ids[i, 2] = 1
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
  return ids, mask


def test_num_mask_positions():
  assert masking.num_mask_positions(128) == 20   # ceil(19.2)
  assert masking.num_mask_positions(20) == 3     # 0.15 * 20 = 3 exactly (float 3.0000000000000004)
  assert masking.num_mask_positions(32) == 5
  assert masking.num_mask_positions(1) == 1


def test_masking_proportions_and_specials_never_masked():
  rng = np.random.default_rng(0)
  ids, mask = _random_batch(rng)
  candidate = (mask == 1) & ~np.isin(ids, SPECIAL)
  chosen = kept = masked = randomised = 0
  for step in range(200):
    out = masking.mask_tokens(masking.masking_rng(0, masking.TRAIN_STREAM, step), ids, mask,
                              _spec())
    p = masking.num_mask_positions(ids.shape[1])
    assert out["masked_positions"].shape == out["mlm_labels"].shape == (ids.shape[0], p)
    assert out["masked_positions"].dtype == np.int32 and out["mlm_weights"].dtype == np.float32
    w = out["mlm_weights"] > 0
    pos = out["masked_positions"]
    # per row: round(0.15 * candidates) (at least 1), all chosen positions distinct candidates
    n_cand = candidate.sum(1)
    want = np.where(n_cand > 0, np.maximum(1, np.floor(0.15 * n_cand + 0.5)), 0)
    np.testing.assert_array_equal(w.sum(1), want)
    for r in range(ids.shape[0]):
      assert len(set(pos[r])) == p
      assert candidate[r, pos[r][w[r]]].all()
    np.testing.assert_array_equal(out["mlm_labels"], np.take_along_axis(ids, pos, 1))
    # outside the chosen positions nothing changes: specials, pad, unchosen tokens
    changed = out["input_ids"] != ids
    chosen_mask = np.zeros_like(candidate)
    np.put_along_axis(chosen_mask, pos, w, axis=1)
    assert not changed[~chosen_mask].any()
    new = np.take_along_axis(out["input_ids"], pos, 1)[w]
    orig = out["mlm_labels"][w]
    chosen += w.sum()
    masked += (new == MASK_ID).sum()
    kept += (new == orig).sum()
    randomised += ((new != MASK_ID) & (new != orig)).sum()
    assert not np.isin(new[(new != MASK_ID)], SPECIAL).any()   # random ids are never special
  # 80 / 10 / 10 within 4 binomial standard deviations (a random id equals the original
  # with probability 1/45, moving ~0.2 % of "random" into "kept")
  for count, prob in ((masked, 0.8), (kept, 0.1 + 0.1 / 45), (randomised, 0.1 * 44 / 45)):
    assert abs(count / chosen - prob) < 4 * np.sqrt(prob * (1 - prob) / chosen), (count, chosen)
  assert chosen > 10000


def test_masking_is_a_pure_function_of_the_rng():
  ids, mask = _random_batch(np.random.default_rng(1))
  a = masking.mask_tokens(masking.masking_rng(3, 2, 7), ids, mask, _spec())
  b = masking.mask_tokens(masking.masking_rng(3, 2, 7), ids, mask, _spec())
  c = masking.mask_tokens(masking.masking_rng(3, 2, 8), ids, mask, _spec())
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["masked_positions"], c["masked_positions"])


def test_masking_spec_errors():
  with pytest.raises(ValueError, match="config.general.mask_rate"):
    _spec(rate=0.0)
  with pytest.raises(ValueError, match="random_prob"):
    masking.MaskingSpec(MASK_ID, SPECIAL, VOCAB, mask_prob=0.9, random_prob=0.2)


# ---------------------------------------------------------------------------
# MLM losses against numpy (explicit loops)
# ---------------------------------------------------------------------------
def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_mlm_ce(z, y, w):
  num = den = 0.0
  for b in range(z.shape[0]):
    for p in range(z.shape[1]):
      if w[b, p] > 0:
        num += w[b, p] * -np_log_softmax(np.float64(z[b, p]))[y[b, p]]
        den += w[b, p]
  return num / den


def np_mlm_kl(s, t, w, temp):
  num = den = 0.0
  for b in range(s.shape[0]):
    for p in range(s.shape[1]):
      if w[b, p] > 0:
        lps = np_log_softmax(np.float64(s[b, p]) / temp)
        lpt = np_log_softmax(np.float64(t[b, p]) / temp)
        num += w[b, p] * np.sum(np.exp(lpt) * (lpt - lps))
        den += w[b, p]
  return temp ** 2 * num / den


def np_mlm_mse(s, t, w):
  num = den = 0.0
  for b in range(s.shape[0]):
    for p in range(s.shape[1]):
      if w[b, p] > 0:
        num += w[b, p] * np.mean((np.float64(s[b, p]) - t[b, p]) ** 2)
        den += w[b, p]
  return num / den


def _mlm_inputs(rng, b=4, p=5, v=11):
  s = rng.normal(size=(b, p, v)).astype(np.float32) * 2
  t = rng.normal(size=(b, p, v)).astype(np.float32) * 2
  y = rng.integers(0, v, size=(b, p)).astype(np.int32)
  w = (rng.random((b, p)) < 0.7).astype(np.float32)
  w[0, 0], w[-1] = 1.0, 0.0          # a row with no masked token
  s[w == 0] = np.nan                 # padding slots may hold anything
  t[w == 0] = np.inf
  y[w == 0] = -1
  return s, t, y, w


def test_mlm_losses_match_numpy():
  s, t, y, w = _mlm_inputs(np.random.default_rng(0))
  np.testing.assert_allclose(losses.mlm_cross_entropy(s, y, w), np_mlm_ce(s, y, w), rtol=RTOL)
  for temp in (1.0, 2.5):
    np.testing.assert_allclose(losses.mlm_kl(s, t, w, temp), np_mlm_kl(s, t, w, temp),
                               rtol=RTOL)
  np.testing.assert_allclose(losses.mlm_mse(s, t, w), np_mlm_mse(s, t, w), rtol=RTOL)
  g = jax.jit(jax.grad(lambda z: losses.mlm_kl(z, t, w, 2.0) + losses.mlm_cross_entropy(z, y, w)))(
      jnp.asarray(s))
  assert np.isfinite(np.asarray(g)).all() and not np.asarray(g)[w == 0].any()


class _Out:
  def __init__(self, logits, hidden=None):
    self.logits = logits
    self.last_hidden_state = hidden


def test_distillation_loss_mlm_combinations_match_numpy():
  """KL + MLM, MSE + MLM and KL + cosine + MLM as weight combinations; example weights
  multiply the slot weights."""
  rng = np.random.default_rng(1)
  s, t, y, w = _mlm_inputs(rng)
  s, t = np.nan_to_num(s), np.nan_to_num(t, posinf=0.0)
  ex = np.array([1, 1, 0, 1], np.float32)
  hs = rng.normal(size=(4, 6, 8)).astype(np.float32)
  ht = rng.normal(size=(4, 6, 8)).astype(np.float32)
  attn = np.ones((4, 6), np.int32)
  batch = {"mlm_labels": y, "mlm_weights": w, "example_mask": ex, "attention_mask": attn}
  wx = w * ex[:, None]
  common = {"layer_map": (), "temperature": 2.0}
  total, terms = losses.distillation_loss(_Out(s, hs), _Out(t, ht), batch,
                                          weights={"mlm_kl": 0.5, "mlm": 1.0}, **common)
  np.testing.assert_allclose(terms["mlm_kl"], np_mlm_kl(s, t, wx, 2.0), rtol=RTOL)
  np.testing.assert_allclose(terms["mlm"], np_mlm_ce(s, y, wx), rtol=RTOL)
  np.testing.assert_allclose(total, 0.5 * terms["mlm_kl"] + terms["mlm"], rtol=RTOL)
  _, terms = losses.distillation_loss(_Out(s, hs), _Out(t, ht), batch,
                                      weights={"mlm_mse": 1.0, "mlm": 1.0}, **common)
  np.testing.assert_allclose(terms["mlm_mse"], np_mlm_mse(s, t, wx), rtol=RTOL)
  _, terms = losses.distillation_loss(_Out(s, hs), _Out(t, ht), batch,
                                      weights={"mlm_kl": 1.0, "cos": 1.0, "mlm": 1.0},
                                      **common)
  cos = [1 - hs[b, i] @ ht[b, i] / np.linalg.norm(hs[b, i]) / np.linalg.norm(ht[b, i])
         for b in range(4) if ex[b] for i in range(6)]
  np.testing.assert_allclose(terms["cos"], np.mean(cos), rtol=RTOL)
  # mlm alone needs no teacher; mlm_kl does, and needs MLM logits from it
  _, terms = losses.distillation_loss(_Out(s), None, batch, weights={"mlm": 1.0}, **common)
  assert set(terms) == {"loss", "mlm"}
  with pytest.raises(ValueError, match="teacher_out is None"):
    losses.distillation_loss(_Out(s), None, batch, weights={"mlm_kl": 1.0}, **common)
  with pytest.raises(ValueError, match="mlm_kl needs the teacher's MLM logits"):
    losses.distillation_loss(_Out(s), _Out(None), batch, weights={"mlm_kl": 1.0}, **common)
  with pytest.raises(ValueError, match="mlm_mse needs the teacher's MLM logits"):
    losses.distillation_loss(_Out(s), _Out(t[:, 0]), batch, weights={"mlm_mse": 1.0}, **common)


def test_mean_teacher_logits():
  rng = np.random.default_rng(2)
  zs = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3)]
  np.testing.assert_allclose(losses.mean_teacher_logits(zs), np.mean(zs, 0), rtol=RTOL)
  with pytest.raises(ValueError, match="differ in shape"):
    losses.mean_teacher_logits([zs[0], zs[1][:, :3]])
  with pytest.raises(ValueError, match="without a head"):
    losses.mean_teacher_logits([zs[0], None])


# ---------------------------------------------------------------------------
# unlabeled text
# ---------------------------------------------------------------------------
def test_text_sources(real_data_dir, tmp_path):
  f = tmp_path / "corpus.txt"
  f.write_text("first line\n\n  \nsecond\u2028still second\r\nthird")
  assert text.read_text_file(f) == ["first line", "second\u2028still second", "third"]
  sib = text.read_sib200_texts("eng_Latn", data_dir=real_data_dir)
  assert len(sib) == 701
  assert sib[0] == ("Turkey is encircled by seas on three sides: the Aegean Sea to the west, "
                    "the Black Sea to the north and the Mediterranean Sea to the south.")
  # CSV quoting: the file's "...""settled law of the land""..." is one quoted field
  quoted = [s for s in sib if "settled law of the land" in s]
  assert len(quoted) == 1 and quoted[0].startswith("He did") and quoted[0].endswith("rulings.")
  assert '"settled law of the land"' in quoted[0]
  examples = text.load_text_sources(text_files=[str(f)], tsm_languages=("english",),
                                    sib200_languages=("eng_Latn", "hin_Deva"),
                                    data_dir=str(real_data_dir))
  counts = {}
  for e in examples:
    counts[e.language] = counts.get(e.language, 0) + 1
  assert counts == {"file:corpus.txt": 3, "tsm:english": 1839, "sib200:eng_Latn": 701,
                    "sib200:hin_Deva": 701}
  train, held = text.split_heldout(examples, 100, seed=0)
  assert len(held) == 100 and len(train) + 100 == len(examples)
  assert text.split_heldout(examples, 100, seed=0) == (train, held)
  assert text.split_heldout(examples, 100, seed=1)[1] != held
  with pytest.raises(DataError, match="xyz_Latn.*languages in"):
    text.read_sib200_texts("xyz_Latn", data_dir=real_data_dir)
  with pytest.raises(DataError, match="no text source"):
    text.load_text_sources()
  with pytest.raises(DataError, match="config.general.heldout_size"):
    text.split_heldout(examples[:10], 6, seed=0)
  with pytest.raises(DataError, match="missing.txt"):
    text.read_text_file(tmp_path / "missing.txt")
  bad = tmp_path / "bad" / "sib200" / "eng_Latn"
  bad.mkdir(parents=True)
  (bad / "train.tsv").write_text("id\ttext\n1\thello\n")
  with pytest.raises(DataError, match="header"):
    text.read_sib200_texts("eng_Latn", data_dir=tmp_path / "bad")


def test_loss_registry_names_mlm_terms():
  for term in ("mlm", "mlm_kl", "mlm_mse"):
    assert term in losses.DISTILL_TERMS
  with pytest.raises(ValueError, match="valid terms are .*mlm_kl"):
    losses.distillation_loss(_Out(np.zeros((1, 1, 2))), None, {}, weights={"mlm_klx": 1.0},
                             layer_map=())


# ---------------------------------------------------------------------------
# the general_distill stage end to end, then task training from its weights
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory, synthetic_data_dir):
  """A 2-layer version of conftest's synthetic tiny model (the step functions compile
  faster)."""
  from conftest import make_tiny_model_dir
  return make_tiny_model_dir(tmp_path_factory.mktemp("small") / "model", synthetic_data_dir,
                             layers=2, heads=2)


def general_config(model_dir, data_dir, **general):
  from kd_jax import config_base
  config = config_base.base_config()
  config.model = str(model_dir)
  config.stages = ("general_distill",)
  config.data.data_dir = str(data_dir)
  config.data.languages = ("english", "arabic")
  config.data.train_fraction = 0.05
  config.data.eval_fraction = 0.05
  config.data.max_length = 64
  config.data.buckets = (64,)         # one bucket: one compilation per step function
  config.general.tsm_languages = ("english",)
  config.general.sib200_languages = ("eng_Latn",)
  config.general.max_length = 64
  config.general.buckets = (64,)
  config.general.heldout_size = 24
  config.general.update(general)
  for name in ("general", "student"):
    config[name].train = config_base.train_config(
        batch_size=8, eval_batch_size=16, num_train_steps=4, learning_rate=1e-3,
        eval_every_steps=2, checkpoint_every_steps=2, log_every_steps=1)
  config.student.num_layers = 1
  return config


def _ckpt(stage_dir, which):
  import orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(stage_dir / "checkpoints" / which)
  return mngr.latest_step(), mngr.restore(mngr.latest_step())


def _fake_teacher_dir(out, model_dir, seed, noise):
  """A finetune_teacher stage dir without training: the tiny model with a random
  3-class head, its weights perturbed by `noise` (so two teachers differ)."""
  from kd_jax import checkpoints, hf_io
  cfg, params, _ = hf_io.load_pretrained(str(model_dir), num_labels=3,
                                         init_rng=jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: x + noise * rng.normal(size=x.shape).astype(x.dtype), params)
  out.mkdir(parents=True)
  checkpoints.save_model_config(out, cfg, {"stage": "finetune_teacher"})
  with checkpoints.StageCheckpoints(out, "best") as ckpt:
    ckpt.save_kept(1, params, score=0.0)
  return out


def test_general_distill_resume_then_finetune(small_model_dir, synthetic_data_dir, tmp_path,
                                              compile_cache):
  from kd_jax import train
  config = general_config(small_model_dir, synthetic_data_dir)
  full = train.train_and_evaluate(config, tmp_path / "full")["general_distill"]
  general_dir = tmp_path / "full" / "general"
  assert full["step"] == 4 and full["overall"]["num_masked"] > 0
  assert set(full["per_source"]) == {"tsm:english", "sib200:eng_Latn"}
  assert 0 <= full["overall"]["mlm_accuracy"] <= 100
  assert json.loads((general_dir / "heldout.json").read_text())["overall"] == full["overall"]
  info = json.loads((general_dir / "model_config.json").read_text())
  assert info["encoder"]["head"] == "mlm" and info["encoder"]["num_layers"] == 1
  assert info["layer_map"] == [2] and info["heldout_texts"] == 24
  step, final = _ckpt(general_dir, "final")
  assert step == 4 and "lm_head" in final
  # The tied decoder: there is no separate [V, H] output matrix.
  assert final["lm_head"]["bias"].shape == final["embeddings"]["word_embeddings"]["embedding"][:, 0].shape

  # Killed after step 3 (latest at step 2); the rerun ends exactly where the full run did.
  config.general.train.stop_after_steps = 3
  assert train.train_and_evaluate(config, tmp_path / "resumed")["general_distill"] == {}
  assert _ckpt(tmp_path / "resumed" / "general", "latest")[0] == 2
  config.general.train.stop_after_steps = -1
  resumed = train.train_and_evaluate(config, tmp_path / "resumed")["general_distill"]
  assert resumed["overall"] == full["overall"]
  jax.tree.map(np.testing.assert_array_equal, final,
               _ckpt(tmp_path / "resumed" / "general", "final")[1])

  # Plain fine-tuning (NON-KD) of the general student on tsm: no teacher needed.
  config.stages = ("distill",)
  config.student.init = "from_general"
  config.student.checkpoint = str(general_dir)
  config.distill.kd = False
  config.student.train.num_train_steps = 2
  result = train.train_and_evaluate(config, tmp_path / "ft")["distill"]
  assert set(result["per_language"]) == {"english", "arabic"}
  saved = json.loads((tmp_path / "ft" / "student" / "model_config.json").read_text())
  assert saved["encoder"]["head"] == "sequence" and saved["encoder"]["num_labels"] == 3
  assert saved["init"] == "from_general" and saved["layer_map"] == [2]
  # what it started from: the general weights, MLM head dropped, a fresh classifier
  from kd_jax import stages
  cfg, _ = stages.general_student_config(config, general_dir, 3)
  params, _ = stages.init_student("from_general", cfg, None, jax.random.PRNGKey(0),
                                  config=config, teacher_params=None, layer_map=(),
                                  general_dir=general_dir)
  assert "lm_head" not in params and params["classifier"]["kernel"].shape == (32, 3)
  jax.tree.map(np.testing.assert_array_equal, params["layer_0"], final["layer_0"])
  jax.tree.map(np.testing.assert_array_equal, params["embeddings"], final["embeddings"])

  # KD from the general weights with two teachers (target: the mean of their logits).
  teachers = tuple(str(_fake_teacher_dir(tmp_path / f"teacher{i}", small_model_dir, i, 0.05))
                   for i in (1, 2))
  config.distill.kd = True
  config.teacher.checkpoint = teachers
  with pytest.raises(ValueError, match=r"names 2 teachers.*config.distill.weights.att=1.0"):
    train.train_and_evaluate(config, tmp_path / "kd")
  for term in ("att", "hid", "embd"):
    config.distill.weights[term] = 0.0
  config.distill.prediction_loss = "kl"
  result = train.train_and_evaluate(config, tmp_path / "kd")["distill"]
  assert set(result["per_language"]) == {"english", "arabic"}

  # A wrong general dir is named before anything trains.
  config.student.checkpoint = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere.*general_distill"):
    train.train_and_evaluate(config, tmp_path / "ft2")

  # KL + cosine + MLM needs a teacher with an MLM head: the general student is one; the
  # pretrained tiny BERT (BertModel, no head) is refused before any step.
  config = general_config(small_model_dir, synthetic_data_dir, teacher=str(general_dir))
  config.general.weights.update(att=0.0, hid=0.0, embd=0.0, mlm_kl=1.0, cos=1.0, mlm=1.0)
  config.general.train.num_train_steps = 2
  result = train.train_and_evaluate(config, tmp_path / "mlm_teacher")["general_distill"]
  assert result["teacher"] == str(general_dir) and set(result["weights"]) == {"mlm_kl", "cos",
                                                                              "mlm"}
  config.general.teacher = ""
  with pytest.raises(ValueError, match="config.general.weights.mlm_kl > 0 needs a teacher with "
                                       "an MLM head"):
    train.train_and_evaluate(config, tmp_path / "no_mlm_head")
  assert not (tmp_path / "no_mlm_head" / "general").exists()


def test_two_teachers_equal_one_teacher_on_mean_logits():
  """make_train_step with two teachers: the KL term equals numpy's single-teacher KL
  against the averaged logits (student dropout off, so its logits are reproducible)."""
  from kd_jax import sharding, train
  from kd_jax.models.encoder import Encoder, EncoderConfig, init_params
  base = EncoderConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2,
                       intermediate_size=32, max_position_embeddings=16, num_labels=3,
                       pad_token_id=0, hidden_dropout=0.0, attention_dropout=0.0,
                       classifier_dropout=0.0)
  # the teachers are narrower and shallower than the student; one config for both keeps
  # the number of compilations down
  teacher_cfg = base.replace(num_layers=1, hidden_size=8)
  cfgs = [base, teacher_cfg, teacher_cfg]
  params = [jax.jit(init_params, static_argnums=0)(c, jax.random.PRNGKey(i))
            for i, c in enumerate(cfgs)]
  for p in params:  # spread the logits, so the KL is far from 0
    p["classifier"]["kernel"] = p["classifier"]["kernel"] * 300.0
  student, t1, t2 = (Encoder(c) for c in cfgs)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 40, size=(4, 9)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 5:] = 0
  batch = {"input_ids": ids, "attention_mask": mask, "labels": np.array([0, 1, 2, 1], np.int32),
           "example_mask": np.array([1, 1, 1, 0], np.float32)}
  mesh = sharding.create_mesh()
  tx, _ = train.make_optimizer(train_config_for_test(), 10)
  state, state_sharding = train.create_train_state({"model": params[0], "proj": {}}, tx, mesh)
  step = train.make_train_step(student, (t1, t2), tx, weights={"pred": 1.0}, layer_map=(None,) * 2,
                               prediction_loss="kl", temperature=2.0, mesh=mesh,
                               state_sharding=state_sharding,
                               teacher_sharding=(sharding.replicated(mesh),) * 2)
  _, metrics = step(state, (params[1], params[2]), sharding.shard_global_batch(batch, mesh),
                    jax.random.PRNGKey(0))
  apply = jax.jit(lambda c, p: Encoder(c).apply({"params": p}, ids, mask).logits,
                  static_argnums=0)
  logits = [np.asarray(apply(c, p), np.float64) for c, p in zip(cfgs, params)]
  assert np.ptp(logits[1]) > 1 and np.ptp(logits[2]) > 1
  target = (logits[1] + logits[2]) / 2
  vals = []
  for b in range(3):
    lps = np_log_softmax(logits[0][b] / 2.0)
    lpt = np_log_softmax(target[b] / 2.0)
    vals.append(4.0 * np.sum(np.exp(lpt) * (lpt - lps)))
  np.testing.assert_allclose(float(metrics["pred"]), np.mean(vals), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(vals), rtol=1e-5)


def train_config_for_test():
  from kd_jax import config_base
  return config_base.train_config(learning_rate=1e-3)


def test_config_validation_of_general_fields():
  import importlib.util

  from kd_jax import config_base
  spec = importlib.util.spec_from_file_location(
      "general_distill", pathlib.Path(__file__).parents[1] / "configs" / "general_distill.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config_base.validate_config(config)
  assert config.stages == ("general_distill", "distill")
  assert config.student.init == "from_general" and config.general.tsm_languages
  for field, value, message in [
      ("general.weights.mlm", -1.0, "config.general.weights.mlm=-1.0 is negative"),
      ("general.init", "from_general", "config.general.init='from_general' is not valid"),
      ("general.mask_rate", 0.0, "config.general.mask_rate=0.0"),
      ("general.buckets", (32, 100), "buckets"),
      ("general.sib200_languages", (), None),
  ]:
    bad = module.get_config()
    section, _, key = field.rpartition(".")
    node = bad
    for part in section.split("."):
      node = node[part]
    node[key] = value
    if message is None:  # still has tsm text
      config_base.validate_config(bad)
      continue
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
      config_base.validate_config(bad)
  bad = module.get_config()
  bad.general.tsm_languages = ()
  bad.general.sib200_languages = ()
  with pytest.raises(ValueError, match="config.general: no text"):
    config_base.validate_config(bad)
  bad = config_base.base_config()
  bad.distill.weights.unlock()
  bad.distill.weights.mlm = 1.0
  with pytest.raises(ValueError, match="config.distill.weights.mlm: MLM terms need masked text"):
    config_base.validate_config(bad)
  bad = config_base.base_config()
  bad.general.weights.unlock()
  bad.general.weights.clf = 1.0   # no labels in unlabeled text
  with pytest.raises(ValueError, match="config.general.weights='clf' is not valid"):
    config_base.validate_config(bad)
  # several teachers: "a,b" on the command line or a tuple in a config file
  assert config_base.split_checkpoints("runs/a/teacher, runs/b/teacher") == ("runs/a/teacher",
                                                                       "runs/b/teacher")
  assert config_base.split_checkpoints(("x", "y")) == ("x", "y") and config_base.split_checkpoints("") == ()
  config = config_base.base_config()
  config.teacher.checkpoint = "a,b"
  with pytest.raises(ValueError, match="names 2 teachers"):
    config_base.validate_config(config)
  config.distill.kd = False  # NON-KD ignores the teachers' terms
  config_base.validate_config(config)
