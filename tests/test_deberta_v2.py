"""DeBERTa-v2 (mDeBERTa-v3) family: parity with transformers' PyTorch DebertaV2 models on
tiny random fp32 models, export round trips of depth- and width-reduced students, loader
errors, and a 2-layer student distilled end to end through `python -m kd_jax.main`."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf_deberta

from kd_jax import export, hf_io, stages, student_init
from kd_jax.models import deberta_v2
from kd_jax.models.encoder import Encoder, EncoderConfig, init_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 120, "hidden_size": 32, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 40, "hidden_act": "gelu",
        "pad_token_id": 0, "relative_attention": True, "pos_att_type": ["p2c", "c2p"]}
# mDeBERTa-v3's options (shared keys, LayerNorm'ed relative embeddings, no absolute
# positions, no token types) and the DeBERTa-v2 ones (separate pos_key/pos_query
# projections, absolute positions, token types), both with buckets smaller than the
# batch's length; one without bucketing, c2p only and clipped distances.
CASES = {
    "v3": {"share_att_key": True, "position_buckets": 4, "max_relative_positions": 12,
           "norm_rel_ebd": "layer_norm", "position_biased_input": False, "type_vocab_size": 0},
    "v2": {"share_att_key": False, "position_buckets": 8, "max_relative_positions": 16,
           "norm_rel_ebd": "layer_norm", "position_biased_input": True, "type_vocab_size": 2},
    "c2p_no_buckets": {"share_att_key": False, "position_buckets": -1,
                       "max_relative_positions": 5, "norm_rel_ebd": "none",
                       "position_biased_input": True, "type_vocab_size": 0,
                       "pos_att_type": ["c2p"]},
}
TEXTS = ["the cat sat on the mat", "a dog ran in the park today", "hello world",
         "good and bad news", "we like the sun", "they read a book at home"]
SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]  # mDeBERTa-v3's ids 0..3


def _torch_model(case, layers=3, num_labels=3, seed=0, **overrides):
  """A tiny DebertaV2ForSequenceClassification with non-trivial LayerNorms and biases."""
  torch.manual_seed(seed)
  cfg = transformers.DebertaV2Config(**{**TINY, **CASES[case], **overrides},
                                     num_hidden_layers=layers, num_labels=num_labels)
  model = transformers.DebertaV2ForSequenceClassification(cfg)
  with torch.no_grad():  # a wrong mapping cannot pass
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.set_attn_implementation("eager")
  return model.eval(), cfg


def _batch(seed=0, with_types=False):
  """3 rows of 11 tokens, real lengths 11, 7, 4 (11 > every bucket count used)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, 120, size=(3, 11)).astype(np.int32)
  mask = np.ones_like(ids)
  for row, length in enumerate([11, 7, 4]):
    ids[row, length:] = 0
    mask[row, length:] = 0
  types = (rng.integers(0, 2, size=ids.shape) * mask).astype(np.int32) if with_types else None
  return ids, mask, types


def _hf_forward_with_scores(model, ids, mask, types):
  """HF outputs plus the pre-softmax scores it feeds to the softmax in each layer."""
  captured = []
  softmax = torch.nn.functional.softmax

  def recording_softmax(x, *args, **kwargs):
    if x.dim() == 4:
      captured.append(x.detach().clone())
    return softmax(x, *args, **kwargs)

  with pytest.MonkeyPatch.context() as patch, torch.no_grad():
    patch.setattr(torch.nn.functional, "softmax", recording_softmax)
    out = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                token_type_ids=None if types is None else torch.tensor(types, dtype=torch.long),
                output_hidden_states=True, output_attentions=True)
  return out, captured


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers(case, tmp_path):
  model, cfg = _torch_model(case)
  model.save_pretrained(tmp_path / "m", safe_serialization=True)
  ids, mask, types = _batch(with_types=cfg.type_vocab_size > 0)
  ref, hf_scores = _hf_forward_with_scores(model, ids, mask, types)
  assert len(hf_scores) == cfg.num_hidden_layers

  config, params, _ = hf_io.load_pretrained(str(tmp_path / "m"), allow_missing_head=False)
  assert config.family == "deberta-v2" and config.num_labels == 3
  assert config.pos_att_type == tuple(cfg.pos_att_type)
  assert ("position_embeddings" in params["embeddings"]) == cfg.position_biased_input
  assert ("token_type_embeddings" in params["embeddings"]) == (cfg.type_vocab_size > 0)
  assert ("pos_key" in params["layer_0"]["attention"]) == (not cfg.share_att_key)
  assert ("LayerNorm" in params["rel_embeddings"]) == (cfg.norm_rel_ebd == "layer_norm")
  out = Encoder(config).apply(
      {"params": params}, jnp.asarray(ids), jnp.asarray(mask),
      None if types is None else jnp.asarray(types), output_embeddings=True,
      output_hidden_states=True, output_attentions=True, output_attention_scores=True)
  close = lambda ours, theirs: np.testing.assert_allclose(
      np.asarray(ours), theirs.numpy(), atol=1e-4, rtol=0)
  close(out.logits, ref.logits)
  close(out.embeddings, ref.hidden_states[0])
  assert len(out.hidden_states) == len(ref.hidden_states) - 1 == cfg.num_hidden_layers
  for ours, theirs in zip(out.hidden_states, ref.hidden_states[1:]):
    close(ours, theirs)
  # Probabilities everywhere, padded query rows included (transformers 5 masks both
  # query and key, so those rows come out uniform, 1/T, in both).
  for ours, theirs in zip(out.attentions, ref.attentions):
    close(ours, theirs)
  np.testing.assert_allclose(np.asarray(out.attentions[0])[2, :, 6], 1 / 11, atol=1e-6)
  # Pre-softmax scores (content + c2p + p2c, scaled) at every real (query, key) pair.
  pair = (mask[:, None, :, None] * mask[:, None, None, :]).astype(bool)
  pair = np.broadcast_to(pair, hf_scores[0].shape)
  for ours, theirs in zip(out.attention_scores, hf_scores):
    np.testing.assert_allclose(np.asarray(ours)[pair], theirs.numpy()[pair], atol=1e-4, rtol=0)
    assert (theirs.numpy()[~pair] == np.finfo(np.float32).min).all()


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_state_dict(case, tmp_path):
  model, _ = _torch_model(case, layers=2)
  model.save_pretrained(tmp_path / "m")
  config, params, _ = hf_io.load_pretrained(str(tmp_path / "m"))
  sd = hf_io.params_to_state_dict(params, config)
  ref = {k: v.numpy() for k, v in model.state_dict().items() if "position_ids" not in k}
  assert set(sd) == set(ref)
  for k, value in ref.items():
    np.testing.assert_array_equal(sd[k], value)


@pytest.mark.parametrize(("bucket_size", "max_position"),
                         [(256, 512), (4, 12), (8, 16), (8, 40), (3, 10)])
def test_log_buckets_match_transformers(bucket_size, max_position):
  rel = np.arange(-1100, 1101)
  theirs = hf_deberta.make_log_bucket_position(torch.tensor(rel), bucket_size, max_position)
  np.testing.assert_array_equal(
      deberta_v2.log_bucket_positions(rel, bucket_size, max_position), theirs.long().numpy())


def test_relative_positions_match_transformers():
  config = EncoderConfig(family="deberta-v2", relative_attention=True, position_buckets=4,
                         max_relative_positions=12)
  for t in (1, 5, 11, 64):
    x = torch.zeros(1, t, 8)
    theirs = hf_deberta.build_relative_position(x, x, bucket_size=4, max_position=12)[0]
    np.testing.assert_array_equal(deberta_v2.relative_positions(config, t), theirs.numpy())


# ---------------------------------------------------------------------------
# export round trip: teacher, 12 -> 6 layers, width halved
# ---------------------------------------------------------------------------
def _unigram_tokenizer(out, texts, vocab_size):
  """A small Unigram (SentencePiece-style, like mDeBERTa's) fast tokenizer, trained offline."""
  import tokenizers as tk
  from transformers import PreTrainedTokenizerFast
  tok = tk.Tokenizer(tk.models.Unigram())
  tok.normalizer = tk.normalizers.NFKC()
  tok.pre_tokenizer = tk.pre_tokenizers.Metaspace()
  tok.decoder = tk.decoders.Metaspace()
  tok.train_from_iterator(texts, tk.trainers.UnigramTrainer(
      vocab_size=vocab_size, special_tokens=SPECIALS, unk_token="[UNK]"))
  tok.post_processor = tk.processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]",
                                 sep_token="[SEP]", unk_token="[UNK]", mask_token="[MASK]")
  assert [fast.convert_tokens_to_ids(t) for t in SPECIALS] == [0, 1, 2, 3, 4]
  fast.save_pretrained(out)
  return out


_TEACHERS = {}


def _teacher(case, tmp_path_factory):
  """(kd_jax config, params, model dir, tokenizer dir) of a 12-layer torch DeBERTa teacher,
  built once per case."""
  if case not in _TEACHERS:
    d = tmp_path_factory.mktemp(case)
    model, _ = _torch_model(case, layers=12)
    model.save_pretrained(d / "model")
    config, params, _ = hf_io.load_pretrained(str(d / "model"), allow_missing_head=False)
    tok_dir = _unigram_tokenizer(d / "tokenizer", TEXTS * 5, 100)
    assert len(transformers.AutoTokenizer.from_pretrained(str(tok_dir))) <= TINY["vocab_size"]
    _TEACHERS[case] = (config, params, d / "model", tok_dir)
  return _TEACHERS[case]


def _student(kind, config, params):
  """A 6-layer student (teacher layers 2, 4, ..., 12), full width ("deep") or width-halved
  ("narrow"), initialised from_teacher. Every leaf is copied, so the random init is only
  a shape template (eval_shape: no compute)."""
  sc = ml_collections.ConfigDict({"num_layers": 6, "init": "from_teacher",
                                  "hidden_size": 16 if kind == "narrow" else 0})
  cfg = stages.student_config(config, sc)
  if kind == "narrow":
    assert (cfg.hidden_size, cfg.num_heads, cfg.intermediate_size) == (16, 2, 32)
  template = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(1)))
  student, provenance = student_init.init_student("from_teacher", template,
                                                  teacher_params=params, layer_map=None)
  for student_layer, teacher_layer in ((0, 1), (5, 11)):
    source = provenance[f"layer_{student_layer}/attention/query/kernel"].source_path
    assert source == f"layer_{teacher_layer}/attention/query/kernel"
  assert provenance["rel_embeddings/embedding"].source_path == "rel_embeddings/embedding"
  return cfg, student


# v3: shared keys (mDeBERTa-v3); v2: pos_key / pos_query projections sliced too.
@pytest.mark.parametrize(("case", "kind"), [("v3", "deep"), ("v3", "narrow"), ("v2", "narrow")])
def test_export_loads_in_transformers_with_same_logits(case, kind, tmp_path, tmp_path_factory):
  config, params, _, tok_dir = _teacher(case, tmp_path_factory)
  cfg, student = _student(kind, config, params)
  out = export.export_hf(student, cfg, tmp_path / "out", tokenizer_dir=tok_dir,
                         id2label=["negative", "neutral", "positive"])
  hf = json.loads((out / "config.json").read_text())
  assert hf["model_type"] == "deberta-v2"
  assert hf["architectures"] == ["DebertaV2ForSequenceClassification"]
  assert (hf["num_hidden_layers"], hf["hidden_size"]) == (cfg.num_layers, cfg.hidden_size)
  assert hf_io.config_from_hf(hf) == cfg

  tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  enc = tokenizer(TEXTS[:4], padding=True, return_tensors="np")
  assert (enc["attention_mask"] == 0).any() and enc["input_ids"].shape[1] > 8  # > buckets
  ours = Encoder(cfg).apply({"params": student}, jnp.asarray(enc["input_ids"]),
                            jnp.asarray(enc["attention_mask"])).logits
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(out), output_loading_info=True)
  assert type(model).__name__ == "DebertaV2ForSequenceClassification"
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info.get("mismatched_keys"), info
  with torch.no_grad():
    theirs = model.eval()(input_ids=torch.tensor(enc["input_ids"], dtype=torch.long),
                          attention_mask=torch.tensor(enc["attention_mask"])).logits.numpy()
  np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["v3", "v2"])
def test_exported_names_are_save_pretrained_names(case, tmp_path, tmp_path_factory):
  config, params, model_dir, _ = _teacher(case, tmp_path_factory)
  out = export.export_hf(params, config, tmp_path / "out")
  ours = load_file(str(out / "model.safetensors"))
  assert set(ours) == set(load_file(str(model_dir / "model.safetensors")))
  assert all(v.dtype == np.float32 for v in ours.values())
  hf = json.loads((out / "config.json").read_text())
  assert "classifier_dropout" not in hf and hf["cls_dropout"] == config.classifier_dropout


# ---------------------------------------------------------------------------
# token-classification and masked-LM heads
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["token", "mlm", "mlm_non_legacy"])
def test_other_heads_match_transformers_and_export(head, tmp_path):
  torch.manual_seed(0)
  cfg = transformers.DebertaV2Config(**{**TINY, **CASES["v3"]}, num_hidden_layers=2,
                                     num_labels=5, legacy=head != "mlm_non_legacy")
  cls = (transformers.DebertaV2ForTokenClassification if head == "token"
         else transformers.DebertaV2ForMaskedLM)
  model = cls(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.eval().save_pretrained(tmp_path / "m")
  ids, mask, _ = _batch()
  with torch.no_grad():
    ref = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits

  config, params, _ = hf_io.load_pretrained(str(tmp_path / "m"), allow_missing_head=False)
  assert config.head == ("token" if head == "token" else "mlm")
  out = Encoder(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(out.logits), ref.numpy(), atol=1e-4, rtol=0)

  exported = export.export_hf(params, config, tmp_path / "out")
  auto = (transformers.AutoModelForTokenClassification if head == "token"
          else transformers.AutoModelForMaskedLM)
  loaded, info = auto.from_pretrained(str(exported), output_loading_info=True)
  assert type(loaded).__name__ == ("DebertaV2ForTokenClassification" if head == "token"
                                   else "DebertaV2ForMaskedLM")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  with torch.no_grad():
    theirs = loaded.eval()(torch.tensor(ids, dtype=torch.long),
                           attention_mask=torch.tensor(mask)).logits.numpy()
  np.testing.assert_allclose(theirs, np.asarray(out.logits), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------
# loader errors
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value", "message"), [
    ("conv_kernel_size", 3, "conv_kernel_size=3"),
    ("embedding_size", 16, "embedding_size=16"),
    ("pooler_hidden_size", 16, "pooler_hidden_size=16"),
    ("norm_rel_ebd", "batch_norm", "norm_rel_ebd='batch_norm'"),
    ("pos_att_type", ["p2p"], "pos_att_type"),
    ("pooler_hidden_act", "swish", "pooler_hidden_act='swish'"),
])
def test_unsupported_options_name_file_and_field(field, value, message, tmp_path):
  model, _ = _torch_model("v3", layers=1)
  model.save_pretrained(tmp_path / "m")
  path = tmp_path / "m" / "config.json"
  hf = json.loads(path.read_text())
  hf[field] = value
  path.write_text(json.dumps(hf))
  with pytest.raises(ValueError) as e:
    hf_io.load_pretrained(str(tmp_path / "m"))
  assert str(path) in str(e.value) and message in str(e.value), str(e.value)


def test_deberta_fields_rejected_on_other_families():
  with pytest.raises(ValueError, match=r"\['relative_attention'\] are DeBERTa-v2 options"):
    EncoderConfig(family="bert", relative_attention=True)
  with pytest.raises(ValueError, match="norm_rel_ebd='layer_norm' needs relative_attention"):
    EncoderConfig(family="deberta-v2", norm_rel_ebd="layer_norm")


# ---------------------------------------------------------------------------
# end to end: python -m kd_jax.main on a tiny mDeBERTa-shaped teacher
# ---------------------------------------------------------------------------
def test_distill_two_layer_student_end_to_end(real_data_dir, tmp_path):
  texts = []
  for lang in ("english", "hindi"):
    texts += (real_data_dir / "xlmt" / lang / "train_text.txt").read_text().split("\n")[:300]
  model_dir = _unigram_tokenizer(tmp_path / "mdeberta", texts, 400)
  vocab = len(transformers.AutoTokenizer.from_pretrained(str(model_dir)))
  torch.manual_seed(0)
  cfg = transformers.DebertaV2Config(**{
      **TINY, **CASES["v3"], "position_buckets": 8, "max_relative_positions": 32,
      "vocab_size": vocab, "num_hidden_layers": 4, "max_position_embeddings": 130})
  transformers.DebertaV2Model(cfg).save_pretrained(model_dir)  # a base model: no head

  workdir = tmp_path / "run"
  steps = ["--config.teacher.train.num_train_steps=4", "--config.student.train.num_train_steps=4"]
  for stage in ("teacher", "student"):
    steps += [f"--config.{stage}.train.{k}={v}" for k, v in
              {"batch_size": 8, "eval_batch_size": 32, "eval_every_steps": 4,
               "checkpoint_every_steps": 4, "log_every_steps": 1, "learning_rate": 1e-3}.items()]
  cmd = [sys.executable, "-m", "kd_jax.main", "--config", "configs/default.py",
         "--workdir", str(workdir), f"--config.model={model_dir}",
         f"--config.data.data_dir={real_data_dir}",
         "--config.data.languages=('english','hindi')", "--config.data.train_fraction=0.02",
         "--config.data.eval_fraction=0.05", "--config.student.num_layers=2",
         # one length bucket (one compiled shape per step function); 32 > position_buckets
         "--config.data.max_length=32", "--config.data.buckets=(32,)", *steps]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 0, result.stderr[-4000:]

  info = json.loads((workdir / "student" / "model_config.json").read_text())
  assert info["encoder"]["family"] == "deberta-v2" and info["encoder"]["num_layers"] == 2
  assert info["layer_map"] == [2, 4] and info["init"] == "from_teacher"
  test = json.loads((workdir / "student" / "test.json").read_text())
  assert 0 <= test["overall"]["macro_f1"] <= 100
  assert "student from_teacher KD" in (workdir / "results.md").read_text()

  # The distilled student exports and gives kd_jax's logits in transformers.
  out = export.export_stage(workdir / "student", tmp_path / "exported")
  config, params, _ = hf_io.load_pretrained(str(out), allow_missing_head=False)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  enc = tokenizer(texts[:6], padding=True, truncation=True, max_length=32, return_tensors="np")
  ours = Encoder(config).apply({"params": params}, jnp.asarray(enc["input_ids"]),
                               jnp.asarray(enc["attention_mask"])).logits
  model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(enc["input_ids"], dtype=torch.long),
                   attention_mask=torch.tensor(enc["attention_mask"])).logits.numpy()
  np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)
