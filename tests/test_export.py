"""Export to a transformers directory: tiny BERT / XLM-R teachers and students, loaded back
with AutoModelForSequenceClassification (PyTorch) and AutoTokenizer."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

from kd_jax import checkpoints, export, hf_io, stages, student_init, train  # noqa: E402
from kd_jax.models.encoder import Encoder, init_params  # noqa: E402

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=40, hidden_act="gelu")
TEXTS = ["the cat sat on the mat", "a dog ran in the park today", "hello world",
         "good and bad news", "we like the sun", "they read a book at home"]
SPECIALS = {"bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]}


def _tiny_tokenizer(out, family):
  """A ~100-id WordPiece tokenizer trained offline on TEXTS; pad id 0 (BERT) or 1 (XLM-R)."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  pad, unk, cls, sep, mask = SPECIALS[family]
  tok = Tokenizer(models.WordPiece(unk_token=unk))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  specials = SPECIALS[family] if family == "bert" else [cls, pad, sep, unk, mask]
  tok.train_from_iterator(TEXTS * 5, trainers.WordPieceTrainer(vocab_size=100,
                                                               special_tokens=specials))
  tok.post_processor = processors.TemplateProcessing(
      single=f"{cls} $A {sep}", special_tokens=[(cls, tok.token_to_id(cls)),
                                                (sep, tok.token_to_id(sep))])
  kwargs = dict(pad_token=pad, unk_token=unk, cls_token=cls, sep_token=sep, mask_token=mask)
  if family == "roberta":
    kwargs.update(bos_token=cls, eos_token=sep)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
  fast.save_pretrained(out)
  assert len(fast) <= TINY["vocab_size"]
  return out


@pytest.fixture(scope="module", params=["bert", "roberta"])
def teacher(request, tmp_path_factory):
  """(family, kd_jax config, params, tokenizer dir) of a tiny torch ForSequenceClassification."""
  family = request.param
  d = tmp_path_factory.mktemp(family)
  torch.manual_seed(0)
  if family == "bert":
    cfg = transformers.BertConfig(**TINY, type_vocab_size=2, pad_token_id=0, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg)
  else:
    cfg = transformers.XLMRobertaConfig(**TINY, type_vocab_size=1, pad_token_id=1,
                                        layer_norm_eps=1e-5, num_labels=3)
    model = transformers.XLMRobertaForSequenceClassification(cfg)
  with torch.no_grad():  # non-trivial LayerNorms and biases: a wrong mapping cannot pass
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(d / "model")
  config, params, _ = hf_io.load_pretrained(str(d / "model"), allow_missing_head=False)
  return family, config, params, _tiny_tokenizer(d / "tokenizer", family)


def _student(kind, config, params):
  """The teacher itself, a 2-layer student (layer map 2, 4), or a 2-layer width-halved one."""
  if kind == "teacher":
    return config, params
  if kind == "deep":
    cfg = config.replace(num_layers=2)
  else:
    sc = ml_collections.ConfigDict(dict(num_layers=2, hidden_size=16, init="from_teacher"))
    cfg = stages.student_config(config, sc)
    assert (cfg.hidden_size, cfg.num_heads, cfg.intermediate_size) == (16, 2, 32)
  random = jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(1)))
  student, _ = student_init.init_student("from_teacher", random, teacher_params=params,
                                         layer_map=(2, 4))
  return cfg, student


def _torch_logits(out, enc):
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(out), output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info.get("mismatched_keys"), info
  with torch.no_grad():
    return model.eval()(input_ids=torch.tensor(enc["input_ids"], dtype=torch.long),
                        attention_mask=torch.tensor(enc["attention_mask"])).logits.numpy()


@pytest.mark.parametrize("kind", ["teacher", "deep", "narrow"])
def test_export_loads_in_transformers_with_same_logits(teacher, kind, tmp_path):
  family, config, params, tok_dir = teacher
  cfg, student = _student(kind, config, params)
  out = export.export_hf(student, cfg, tmp_path / "out", tokenizer_dir=tok_dir,
                         id2label=["negative", "neutral", "positive"])
  hf = json.loads((out / "config.json").read_text())
  assert hf["model_type"] == {"bert": "bert", "roberta": "xlm-roberta"}[family]
  assert hf["architectures"] == [{"bert": "BertForSequenceClassification",
                                  "roberta": "XLMRobertaForSequenceClassification"}[family]]
  assert hf["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
  assert (hf["num_hidden_layers"], hf["hidden_size"]) == (cfg.num_layers, cfg.hidden_size)
  # Round trip through our own reader, too.
  assert hf_io.config_from_hf(hf) == cfg

  # A padded batch from the exported tokenizer (rows of different lengths).
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  enc = tokenizer(TEXTS[:4], padding=True, return_tensors="np")
  assert (enc["attention_mask"] == 0).any()
  ours = Encoder(cfg).apply({"params": student}, jnp.asarray(enc["input_ids"]),
                            jnp.asarray(enc["attention_mask"])).logits
  np.testing.assert_allclose(_torch_logits(out, enc), np.asarray(ours), atol=1e-4, rtol=0)


def test_safetensors_names_match_save_pretrained(teacher, tmp_path):
  family, config, params, tok_dir = teacher
  out = export.export_hf(params, config, tmp_path / "out")
  ours = load_file(str(out / "model.safetensors"))
  # What transformers' own save_pretrained wrote for the teacher.
  ref = load_file(str(tok_dir.parent / "model" / "model.safetensors"))
  model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out))
  theirs = {k for k in model.state_dict() if not k.endswith(("position_ids", "token_type_ids"))}
  assert set(ours) == theirs
  assert all(v.dtype == np.float32 for v in ours.values())
  assert set(ours) == set(ref)
  assert not (out / "tokenizer.json").exists()  # no tokenizer_dir, no tokenizer


def test_projections_are_not_exported(teacher, tmp_path):
  family, config, params, _ = teacher
  cfg, student = _student("narrow", config, params)
  proj = {"hid": np.ones((16, 32), np.float32), "embd": np.ones((16, 32), np.float32)}
  out = export.export_hf({"model": student, "proj": proj}, cfg, tmp_path / "out")
  names = set(load_file(str(out / "model.safetensors")))
  assert names == set(hf_io.params_to_state_dict(student, cfg))
  assert not any(n.split(".")[0] in ("proj", "hid", "embd") for n in names)
  assert len(names) == len(jax.tree.leaves(student))
  # Projections mixed into the model tree are an error, not silently written or dropped.
  with pytest.raises(ValueError, match="unexpected.*hid"):
    export.export_hf(dict(student, hid=proj["hid"]), cfg, tmp_path / "bad")
  assert not (tmp_path / "bad").exists()


def test_base_model_without_head(teacher, tmp_path):
  family, config, params, _ = teacher
  cfg = config.replace(num_labels=0)
  base = {k: v for k, v in params.items() if k not in ("pooler", "classifier")}
  out = export.export_hf(base, cfg, tmp_path / "out")
  hf = json.loads((out / "config.json").read_text())
  assert hf["architectures"] == [{"bert": "BertModel", "roberta": "XLMRobertaModel"}[family]]
  assert "id2label" not in hf
  names = set(load_file(str(out / "model.safetensors")))
  assert "embeddings.word_embeddings.weight" in names  # no bert./roberta. prefix
  # kd_jax has no pooler without a head: load without one.
  model, info = transformers.AutoModel.from_pretrained(str(out), add_pooling_layer=False,
                                                       output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_overwrite_refused_and_failures_leave_nothing(teacher, tmp_path):
  family, config, params, tok_dir = teacher
  out = tmp_path / "out"
  out.mkdir()
  (out / "old.txt").write_text("keep")
  with pytest.raises(FileExistsError, match=str(out)):
    export.export_hf(params, config, out)
  assert (out / "old.txt").read_text() == "keep"
  # Bad input: nothing written, the previous directory untouched, no temp dirs left.
  with pytest.raises(ValueError, match="wrong shape"):
    export.export_hf(params, config.replace(hidden_size=64, num_heads=4), out, overwrite=True)
  with pytest.raises(ValueError, match="num_labels=3"):
    export.export_hf(params, config, out, id2label=["a", "b"], overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  assert (out / "old.txt").exists()
  export.export_hf(params, config, out, tokenizer_dir=tok_dir, overwrite=True)
  assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  # An empty directory is fine without overwrite.
  (tmp_path / "empty").mkdir()
  export.export_hf(params, config, tmp_path / "empty")


def test_tokenizer_round_trip(teacher, tmp_path):
  family, config, params, tok_dir = teacher
  out = export.export_hf(params, config, tmp_path / "out", tokenizer_dir=tok_dir)
  original = hf_io.load_tokenizer(tok_dir)
  exported = transformers.AutoTokenizer.from_pretrained(str(out))
  assert exported.pad_token_id == original.pad_token_id == config.pad_token_id
  assert exported(TEXTS)["input_ids"] == original(TEXTS)["input_ids"]


def test_export_stage_after_tiny_training(tiny_model_dir, real_data_dir, tmp_path):
  from test_train import tiny_config
  config = tiny_config(tiny_model_dir, real_data_dir, hidden_size=16)
  config.teacher.train.num_train_steps = 2
  config.student.train.num_train_steps = 2
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, workdir)

  out = export.main(["--workdir", str(workdir), "--out", str(tmp_path / "student")])
  assert out == tmp_path / "student"
  hf = json.loads((out / "config.json").read_text())
  assert hf["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
  assert (hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]) == (2, 16, 2)
  with pytest.raises(FileExistsError, match="student"):
    export.export_stage(workdir / "student", out)
  teacher_out = export.export_stage(workdir / "teacher", tmp_path / "teacher")
  assert json.loads((teacher_out / "config.json").read_text())["num_hidden_layers"] == 4

  cfg, _ = checkpoints.load_model_config(workdir / "student")
  params = checkpoints.restore_stage_params(workdir / "student", cfg)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  enc = tokenizer(["good morning", "this is not good at all, really"], padding=True,
                  return_tensors="np")
  ours = Encoder(cfg).apply({"params": params}, jnp.asarray(enc["input_ids"]),
                            jnp.asarray(enc["attention_mask"])).logits
  np.testing.assert_allclose(_torch_logits(out, enc), np.asarray(ours), atol=1e-4, rtol=0)

  # A checkpoint that does not fit model_config.json is reported as such, leaf by leaf
  # (checked on the saved metadata before restoring) ...
  info_path = workdir / "student" / "model_config.json"
  saved = info_path.read_text()
  info = json.loads(saved)
  info["encoder"]["intermediate_size"] = 48
  info_path.write_text(json.dumps(info))
  with pytest.raises(hf_io.CheckpointMismatchError,
                     match=r"student/checkpoints/best/\d+: checkpoint does not match the model "
                           r"config .*student/model_config.json: .*intermediate.*saved shape "
                           r"\(16, 32\), expected \(16, 48\)"):
    export.export_stage(workdir / "student", tmp_path / "mismatch")
  info_path.write_text(saved)
  # ... and any other failure says what it is, not that the config is wrong.
  best = workdir / "student" / "checkpoints" / "best"
  for f in best.glob("*/default/ocdbt.process_*/d/*"):
    f.unlink()
  with pytest.raises(Exception) as failure:
    export.export_stage(workdir / "student", tmp_path / "broken")
  assert not isinstance(failure.value, hf_io.CheckpointMismatchError), failure.value
  assert "does not match the model config" not in str(failure.value)
  assert not (tmp_path / "broken").exists()


def test_find_stage_dir(tmp_path):
  (tmp_path / "student").mkdir()
  (tmp_path / "student" / "model_config.json").write_text('{"stage": "distill"}')
  (tmp_path / "teacher").mkdir()
  (tmp_path / "teacher" / "model_config.json").write_text('{"stage": "finetune_teacher"}')
  assert export.find_stage_dir(tmp_path) == tmp_path / "student"
  assert export.find_stage_dir(tmp_path, "teacher") == tmp_path / "teacher"
  assert export.find_stage_dir(tmp_path / "teacher") == tmp_path / "teacher"
  assert export.find_stage_dir(tmp_path / "teacher", "teacher") == tmp_path / "teacher"
  with pytest.raises(FileNotFoundError, match="no finished student stage"):
    export.find_stage_dir(tmp_path / "teacher", "student")
  with pytest.raises(FileNotFoundError, match="neither a stage directory"):
    export.find_stage_dir(tmp_path / "nothing")
  assert export.stage_labels({"data": "tsm"}) is None
  assert export.stage_labels({"labels": ["a", "b"]}) == ("a", "b")
  assert export.stage_labels({}) is None
