"""Families (BERT, XLM-R, DistilBERT) x heads (sequence, token, masked LM): parity with
transformers' PyTorch models, export round trips of distilled students, loader errors, the
token loss, and a tiny DistilBERT teacher distilled end to end with configs/default.py."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import save_tiny_wordpiece_tokenizer

from kd_jax import export, hf_io, losses, student_init
from kd_jax.models.encoder import Encoder, EncoderConfig, init_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAMILIES = ("bert", "roberta", "distilbert")
HEADS = ("sequence", "token", "mlm")
VOCAB = 120
AUTO = {"sequence": "AutoModelForSequenceClassification",
        "token": "AutoModelForTokenClassification", "mlm": "AutoModelForMaskedLM"}
ARCH = {"bert": "Bert", "roberta": "XLMRoberta", "distilbert": "DistilBert"}
SUFFIX = {"sequence": "ForSequenceClassification", "token": "ForTokenClassification",
          "mlm": "ForMaskedLM"}
PAD = {"bert": 0, "roberta": 1, "distilbert": 0}


def _hf_config(family, layers, head):
  labels = {} if head == "mlm" else {"num_labels": 3}
  if family == "distilbert":
    return transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=layers, n_heads=4,
                                         hidden_dim=64, max_position_embeddings=40,
                                         pad_token_id=0, **labels)
  tiny = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=40, hidden_act="gelu", **labels)
  if family == "bert":
    return transformers.BertConfig(**tiny, type_vocab_size=2, pad_token_id=0)
  return transformers.XLMRobertaConfig(**tiny, type_vocab_size=1, pad_token_id=1,
                                       layer_norm_eps=1e-5)


def _hf_model(family, head, out, layers=2, seed=0):
  """A random transformers model with that head (fp32, eval, eager attention), saved to `out`."""
  torch.manual_seed(seed)
  auto = getattr(transformers, AUTO[head])
  model = auto.from_config(_hf_config(family, layers, head), attn_implementation="eager")
  assert type(model).__name__ == ARCH[family] + SUFFIX[head]
  # Non-trivial LayerNorms and biases (HF starts them at 1 / 0): a wrong mapping cannot pass.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name.lower() or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(out)
  return model.eval()


def _batch(pad_id, seed=0, b=3, t=11):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, VOCAB, size=(b, t)).astype(np.int32)
  mask = np.ones_like(ids)
  for row, length in enumerate([t, 7, 4][:b]):
    ids[row, length:] = pad_id
    mask[row, length:] = 0
  return ids, mask


def _torch_out(model, ids, mask, **kwargs):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask), **kwargs)


# ---------------------------------------------------------------------------
# parity
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers(family, head, tmp_path):
  model = _hf_model(family, head, tmp_path / "m")
  ids, mask = _batch(PAD[family])
  ref = _torch_out(model, ids, mask, output_hidden_states=True, output_attentions=True)

  # The head comes from config.json's `architectures`.
  config, params, _ = hf_io.load_pretrained(str(tmp_path / "m"), allow_missing_head=False)
  assert (config.family, config.head) == (family, head)
  assert config.num_labels == (0 if head == "mlm" else 3)
  assert ("token_type_embeddings" in params["embeddings"]) == (family != "distilbert")
  assert ("pooler" in params) == (head == "sequence")
  out = Encoder(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                              output_embeddings=True, output_hidden_states=True,
                              output_attentions=True)
  expected_shape = {"sequence": (3, 3), "token": (3, 11, 3), "mlm": (3, 11, VOCAB)}[head]
  assert out.logits.shape == expected_shape and out.logits.dtype == jnp.float32
  np.testing.assert_allclose(out.logits, ref.logits.numpy(), atol=1e-4, rtol=0)
  assert len(ref.hidden_states) == len(out.hidden_states) + 1 == 3
  np.testing.assert_allclose(out.embeddings, ref.hidden_states[0].numpy(), atol=1e-4, rtol=0)
  for ours, theirs in zip(out.hidden_states, ref.hidden_states[1:]):
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=0)
  assert len(ref.attentions) == len(out.attentions) == 2
  for ours, theirs in zip(out.attentions, ref.attentions):
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=0)

  if head != "sequence":  # logits at masked_positions are the gathered full logits
    positions = np.array([[0, 3, 10], [6, 1, 1], [2, 0, 0]], np.int32)
    at = Encoder(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                               masked_positions=jnp.asarray(positions)).logits
    assert at.shape == (3, 3, expected_shape[-1])
    gathered = np.take_along_axis(np.asarray(out.logits), positions[..., None], axis=1)
    np.testing.assert_allclose(at, gathered, atol=1e-5, rtol=0)
  else:
    with pytest.raises(ValueError, match="masked_positions needs"):
      Encoder(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                            masked_positions=jnp.zeros((3, 2), jnp.int32))

  # Our names and layouts are exactly what save_pretrained wrote (tied decoders aside).
  sd = hf_io.params_to_state_dict(params, config)
  tied = set(getattr(model, "_tied_weights_keys", None) or {})
  theirs = {k: v.numpy() for k, v in model.state_dict().items()
            if not k.endswith("position_ids") and k not in tied}
  assert set(sd) == set(theirs)
  for k in theirs:
    np.testing.assert_array_equal(sd[k], theirs[k], err_msg=k)


# ---------------------------------------------------------------------------
# export round trips: 12-layer teachers, 6-layer and width-halved students
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[(f, h) for f in FAMILIES for h in HEADS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def teacher12(request, tmp_path_factory):
  family, head = request.param
  d = tmp_path_factory.mktemp(f"{family}-{head}") / "teacher"
  _hf_model(family, head, d, layers=12)
  config, params, _ = hf_io.load_pretrained(str(d), allow_missing_head=False)
  return family, head, config, params


def _student(kind, config, params):
  from kd_jax import stages
  if kind == "deep":
    cfg = config.replace(num_layers=6)
  else:
    cfg = stages.student_config(config, ml_collections.ConfigDict(
        {"num_layers": 6, "hidden_size": 16, "init": "from_teacher"}))
    assert (cfg.hidden_size, cfg.num_heads, cfg.intermediate_size) == (16, 2, 32)
  random = jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(1)))
  student, provenance = student_init.init_student(
      "from_teacher", random, teacher_params=params,
      layer_map=student_init.uniform_layer_map(12, 6))
  assert provenance["layer_0/attention/query/kernel"][0] == "layer_1/attention/query/kernel"
  return cfg, student


@pytest.mark.parametrize("kind", ["deep", "narrow"])
def test_student_export_loads_in_transformers(teacher12, kind, tmp_path):
  family, head, config, params = teacher12
  cfg, student = _student(kind, config, params)
  labels = None if head == "mlm" else ["O", "B-X", "I-X"]
  out = export.export_hf(student, cfg, tmp_path / "out", id2label=labels)
  hf = json.loads((out / "config.json").read_text())
  assert hf["architectures"] == [ARCH[family] + SUFFIX[head]]
  assert hf["model_type"] == {"bert": "bert", "roberta": "xlm-roberta",
                              "distilbert": "distilbert"}[family]
  if family == "distilbert":  # DistilBertConfig's own names
    assert (hf["n_layers"], hf["dim"], hf["n_heads"], hf["hidden_dim"]) == (6, cfg.hidden_size,
                                                                           cfg.num_heads,
                                                                           cfg.intermediate_size)
    assert "hidden_size" not in hf and "num_hidden_layers" not in hf
  else:
    assert (hf["num_hidden_layers"], hf["hidden_size"]) == (6, cfg.hidden_size)
  if labels:
    assert hf["id2label"] == {"0": "O", "1": "B-X", "2": "I-X"}
    assert hf["label2id"] == {"O": 0, "B-X": 1, "I-X": 2}
  else:
    assert "id2label" not in hf
  assert hf_io.config_from_hf(hf) == cfg  # our own reader gives the same config back

  model, info = getattr(transformers, AUTO[head]).from_pretrained(
      str(out), output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info.get("mismatched_keys"), info
  assert type(model).__name__ == ARCH[family] + SUFFIX[head]
  ids, mask = _batch(PAD[family], seed=1)
  theirs = _torch_out(model.eval(), ids, mask).logits.numpy()
  ours = Encoder(cfg).apply({"params": student}, jnp.asarray(ids), jnp.asarray(mask)).logits
  np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)


def test_distilbert_export_rejects_token_types():
  cfg = EncoderConfig(family="distilbert", vocab_size=50, hidden_size=16, num_layers=1,
                      num_heads=2, intermediate_size=32, type_vocab_size=2)
  with pytest.raises(ValueError, match="type_vocab_size=2"):
    export.hf_config_dict(cfg)


# ---------------------------------------------------------------------------
# loader errors and head selection
# ---------------------------------------------------------------------------
def test_unsupported_architecture_names_config_and_supported(tmp_path):
  _hf_model("bert", "sequence", tmp_path / "m")
  path = tmp_path / "m" / "config.json"
  hf = json.loads(path.read_text())
  hf["architectures"] = ["BertForQuestionAnswering"]
  path.write_text(json.dumps(hf))
  with pytest.raises(ValueError) as e:
    hf_io.load_pretrained(str(tmp_path / "m"))
  msg = str(e.value)
  assert str(path) in msg and "'BertForQuestionAnswering' is not supported" in msg
  for name in ("BertForSequenceClassification", "BertForTokenClassification",
               "BertForMaskedLM", "BertModel"):
    assert name in msg
  # The caller can still say which head to use.
  config, params, _ = hf_io.load_pretrained(str(tmp_path / "m"), head="token")
  assert config.head == "token" and "pooler" not in params  # BERT's pooler ignored
  # An architecture of another model type is not accepted either.
  with pytest.raises(ValueError, match="supported architectures: .*DistilBertModel"):
    hf_io.config_from_hf({"model_type": "distilbert", "architectures": ["BertModel"]})


def test_unsupported_model_type_lists_supported():
  with pytest.raises(ValueError, match="model_type='gpt2' is not supported; supported") as e:
    hf_io.config_from_hf({"model_type": "gpt2"}, source="x/config.json")
  assert "x/config.json" in str(e.value)
  for model_type in ("bert", "distilbert", "xlm-roberta"):
    assert f"'{model_type}'" in str(e.value)


def test_distilbert_config_errors():
  base = {"model_type": "distilbert", "vocab_size": 50, "dim": 16, "n_layers": 1, "n_heads": 2,
          "hidden_dim": 32}
  with pytest.raises(ValueError, match="m/config.json: sinusoidal_pos_embds=true"):
    hf_io.config_from_hf(dict(base, sinusoidal_pos_embds=True), source="m/config.json")
  with pytest.raises(ValueError, match="m/config.json: activation='relu'"):
    hf_io.config_from_hf(dict(base, activation="relu"), source="m/config.json")
  cfg = hf_io.config_from_hf(dict(base, seq_classif_dropout=0.3, dropout=0.05, num_labels=2,
                                  id2label={"0": "a", "1": "b"}))
  assert (cfg.family, cfg.hidden_size, cfg.type_vocab_size, cfg.head) == (
      "distilbert", 16, 0, "sequence")
  assert (cfg.classifier_dropout, cfg.hidden_dropout, cfg.pooler_hidden_act) == (0.3, 0.05,
                                                                                 "relu")
  assert hf_io.config_from_hf(dict(base, dropout=0.05), head="token").classifier_dropout == 0.05


def test_mlm_checkpoint_heads(tmp_path):
  """A ForMaskedLM checkpoint: mlm by default, a classifier only when asked, and the
  decoder must be tied."""
  model = _hf_model("bert", "mlm", tmp_path / "m")
  with pytest.raises(ValueError, match="head 'mlm' \\(from architectures\\).*num_labels=3.*"
                                       "head='sequence'"):
    hf_io.load_pretrained(str(tmp_path / "m"), num_labels=3)
  config, params, _ = hf_io.load_pretrained(str(tmp_path / "m"), num_labels=3, head="sequence")
  assert config.head == "sequence" and "lm_head" not in params
  assert params["classifier"]["kernel"].shape == (32, 3)  # random: cls.* ignored

  state, _ = hf_io.read_state_dict(tmp_path / "m")
  config, reference, _ = hf_io.load_pretrained(str(tmp_path / "m"))
  # TF-era names (mBERT): LayerNorm.gamma / .beta read as .weight / .bias.
  legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                     "LayerNorm.beta"): v
            for k, v in state.items()}
  assert sum(".gamma" in k for k in legacy) == 6  # embeddings, 2 per layer, MLM transform
  jax.tree.map(np.testing.assert_array_equal, reference,
               hf_io.state_dict_to_params(legacy, config, allow_missing_head=False))
  # Older checkpoints store the tied decoder (equal to the embeddings) and its bias alias.
  tied = dict(state)
  tied["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
  tied["cls.predictions.decoder.bias"] = tied.pop("cls.predictions.bias")
  params = hf_io.state_dict_to_params(tied, config, allow_missing_head=False)
  np.testing.assert_array_equal(params["lm_head"]["bias"],
                                model.cls.predictions.bias.detach().numpy())
  untied = dict(state, **{"cls.predictions.decoder.weight":
                          state["bert.embeddings.word_embeddings.weight"] + 1})
  with pytest.raises(hf_io.CheckpointMismatchError, match="decoder.weight differs"):
    hf_io.state_dict_to_params(untied, config, source="x.st")


def test_mlm_head_on_classification_checkpoint(tmp_path):
  _hf_model("roberta", "sequence", tmp_path / "m")
  config, params, _ = hf_io.load_pretrained(str(tmp_path / "m"), head="mlm")
  assert config.num_labels == 0 and "classifier" not in params  # classifier.* ignored
  assert params["lm_head"]["bias"].shape == (VOCAB,)  # initialised randomly
  with pytest.raises(hf_io.CheckpointMismatchError, match="missing.*lm_head.dense.weight"):
    hf_io.load_pretrained(str(tmp_path / "m"), head="mlm", allow_missing_head=False)
  with pytest.raises(ValueError, match="head='mlm' has no classes but num_labels=3"):
    EncoderConfig(head="mlm", num_labels=3)
  with pytest.raises(ValueError, match="EncoderConfig.head='seq'"):
    EncoderConfig(head="seq")


# ---------------------------------------------------------------------------
# token loss
# ---------------------------------------------------------------------------
def test_token_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 6, 5)).astype(np.float32) * 3
  labels = rng.integers(0, 5, size=(3, 6))
  labels[0, :2] = -100
  labels[2, :] = -100  # a row without labelled tokens
  logits[2] = np.nan  # ignored positions cannot leak into the loss
  valid = labels != -100
  z = logits[valid].astype(np.float64)
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  expected = -logp[np.arange(len(z)), labels[valid]].mean()
  got = losses.token_cross_entropy(logits, labels)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  grad = jax.grad(lambda x: losses.token_cross_entropy(x, labels))(jnp.asarray(logits))
  assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad)[2].any()
  assert float(losses.token_cross_entropy(logits, np.full((3, 6), -100))) == 0.0
  with pytest.raises(ValueError, match=r"token labels must be \[B, T\]"):
    losses.token_cross_entropy(logits, labels[:, :3])


# ---------------------------------------------------------------------------
# end to end: a tiny DistilBERT teacher distilled into a 2-layer student
# ---------------------------------------------------------------------------
def make_tiny_distilbert_dir(out: pathlib.Path, data: pathlib.Path, layers=4) -> pathlib.Path:
  """A WordPiece tokenizer trained on tsm text and a random DistilBertForMaskedLM (saved by
  transformers, like distilbert-base-multilingual-cased: a pretraining checkpoint)."""
  tok = save_tiny_wordpiece_tokenizer(out, data)
  torch.manual_seed(0)
  cfg = transformers.DistilBertConfig(vocab_size=tok.get_vocab_size(), dim=32, n_layers=layers,
                                      n_heads=4, hidden_dim=64, max_position_embeddings=130,
                                      pad_token_id=0)
  transformers.DistilBertForMaskedLM(cfg).save_pretrained(out)
  return out


def test_distilbert_distilled_end_to_end(real_data_dir, tmp_path):
  from kd_jax import checkpoints, train
  teacher_dir = make_tiny_distilbert_dir(tmp_path / "distilbert", real_data_dir)
  spec = importlib.util.spec_from_file_location("default", ROOT / "configs" / "default.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()  # the foundation's tsm config, then test-sized overrides
  config.model = str(teacher_dir)
  config.data.data_dir = str(real_data_dir)
  config.data.languages = ("english", "arabic")
  config.data.train_fraction = 0.05
  config.data.eval_fraction = 0.05
  config.data.max_length = 64
  config.data.buckets = (64,)  # one shape: one compilation per step function
  for name in ("teacher", "student"):
    config[name].train.update(batch_size=8, eval_batch_size=16, num_train_steps=2,
                              learning_rate=1e-3, eval_every_steps=2, checkpoint_every_steps=2,
                              log_every_steps=1)
  config.student.num_layers = 2
  workdir = tmp_path / "run"
  results = train.train_and_evaluate(config, workdir)
  for stage in ("finetune_teacher", "distill"):
    assert 0 <= results[stage]["overall"]["macro_f1"] <= 100
  saved = json.loads((workdir / "student" / "model_config.json").read_text())
  assert saved["encoder"]["family"] == "distilbert" and saved["encoder"]["num_layers"] == 2
  assert saved["encoder"]["head"] == "sequence" and saved["layer_map"] == [2, 4]

  # The distilled student exports as a DistilBertForSequenceClassification.
  out = export.main(["--workdir", str(workdir), "--out", str(tmp_path / "student")])
  hf = json.loads((out / "config.json").read_text())
  assert hf["architectures"] == ["DistilBertForSequenceClassification"] and hf["n_layers"] == 2
  cfg, _ = checkpoints.load_model_config(workdir / "student")
  params = checkpoints.restore_stage_params(workdir / "student", cfg)
  assert "token_type_embeddings" not in params["embeddings"]
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  enc = tokenizer(["good morning", "this is not good at all, really"], padding=True,
                  return_tensors="np")
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(out), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  theirs = _torch_out(model.eval(), enc["input_ids"], enc["attention_mask"]).logits.numpy()
  ours = Encoder(cfg).apply({"params": params}, jnp.asarray(enc["input_ids"]),
                            jnp.asarray(enc["attention_mask"])).logits
  np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)
