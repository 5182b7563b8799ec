"""conftest's synthetic data folder: the real layout, row counts and labels, read by the
real readers (tsm and SIB-200), the same bytes on every generation."""

import collections

import numpy as np
import pytest

from conftest import (SIB200_CATEGORIES, SYNTHETIC_SIB200_SIZES, SYNTHETIC_TSM_SIZES,
                      tiny_tokenizer_texts, write_synthetic_data)
from kd_jax.data import tasks, text
from kd_jax.data.tsm import TSM_LABELS, TSM_LANGUAGES, TSM_SPLITS, load_tsm


def test_sizes_are_the_real_ones():
  assert SYNTHETIC_TSM_SIZES == {"train": 1839, "val": 324, "test": 870}
  assert tuple(SYNTHETIC_TSM_SIZES) == TSM_SPLITS


@pytest.mark.parametrize("split", TSM_SPLITS)
def test_load_tsm_reads_every_language(synthetic_data_dir, split):
  n = SYNTHETIC_TSM_SIZES[split]
  examples = load_tsm(split, data_dir=synthetic_data_dir)
  assert len(examples) == len(TSM_LANGUAGES) * n
  by_language = collections.defaultdict(list)
  for e in examples:
    by_language[e.language].append(e)
  assert tuple(by_language) == TSM_LANGUAGES
  for language, rows in by_language.items():
    assert len(rows) == n, language
    counts = collections.Counter(e.label for e in rows)
    assert set(counts) == set(range(len(TSM_LABELS))), language
    assert max(counts.values()) - min(counts.values()) <= 1, (language, counts)  # balanced
    assert all(e.text.strip() and "\n" not in e.text for e in rows), language
    # the same folder as the real one: as many rows per file, no trailing newline
    lang_dir = synthetic_data_dir / "xlmt" / language
    for kind in ("text", "labels"):
      content = (lang_dir / f"{split}_{kind}.txt").read_text(encoding="utf-8")
      assert not content.endswith("\n") and content.count("\n") == n - 1
  # the xlmt folder itself is accepted too
  assert load_tsm(split, ("hindi",), data_dir=synthetic_data_dir / "xlmt") == by_language["hindi"]


def test_fractions_give_the_real_counts(synthetic_data_dir):
  """The loop tests' fractions: 5% of train and 10% of test per language."""
  # Stratified: round(0.05 * 613) = 31 of each of the 3 classes.
  assert len(load_tsm("train", ("english",), synthetic_data_dir, fraction=0.05)) == 93
  assert len(load_tsm("test", ("english", "arabic", "hindi"), synthetic_data_dir,
                      fraction=0.1)) == 3 * 87


def test_languages_have_their_own_words_and_scripts(synthetic_data_dir):
  words = {}
  for language in TSM_LANGUAGES:
    texts = [e.text for e in load_tsm("train", (language,), synthetic_data_dir)]
    words[language] = {w.strip("#!?.") for t in texts for w in t.split()}
    letters = {c for t in texts for c in t if c.isalpha()}
    if language == "arabic":
      assert all("\u0600" <= c <= "\u06ff" for c in letters)
    elif language == "hindi":
      assert all("\u0900" <= c <= "\u097f" for c in letters)
    else:
      assert all(c.isascii() or "\u00c0" <= c <= "\u00ff" for c in letters), language
  for a in TSM_LANGUAGES:
    for b in TSM_LANGUAGES:
      if a < b:
        assert len(words[a] & words[b]) < 0.2 * min(len(words[a]), len(words[b])), (a, b)


def test_label_shifts_the_words(synthetic_data_dir):
  """Each label has words that are far more frequent under it than under the others."""
  for language in ("english", "arabic"):
    counts = [collections.Counter() for _ in TSM_LABELS]
    for e in load_tsm("train", (language,), synthetic_data_dir):
      counts[e.label].update(e.text.split())
    for label, own in enumerate(counts):
      others = sum((c for i, c in enumerate(counts) if i != label), collections.Counter())
      marked = [w for w, n in own.items() if n >= 20 and others[w] == 0]
      assert len(marked) >= 10, (language, label, len(marked))


def test_sib200_is_read_by_the_text_reader(synthetic_data_dir):
  for split, n in SYNTHETIC_SIB200_SIZES.items():
    texts = text.read_sib200_texts("eng_Latn", split, data_dir=synthetic_data_dir)
    assert len(texts) == n and all(t.strip() for t in texts)
  header, *rows = (synthetic_data_dir / "sib200" / "eng_Latn" / "train.tsv").read_text(
      encoding="utf-8").splitlines()
  assert header.split("\t") == list(tasks.SIB200_HEADER)
  assert {r.split("\t")[1] for r in rows} == set(SIB200_CATEGORIES)
  examples = text.load_text_sources(tsm_languages=("english",), sib200_languages=("eng_Latn",),
                                    data_dir=str(synthetic_data_dir))
  counts = collections.Counter(e.language for e in examples)
  assert counts == {"tsm:english": 1839, "sib200:eng_Latn": 701}


def test_tokenizer_texts(synthetic_data_dir):
  texts = tiny_tokenizer_texts(synthetic_data_dir)
  assert len(texts) == 4 * 300 and all(texts)


def test_generation_is_deterministic(synthetic_data_dir, tmp_path):
  again = write_synthetic_data(tmp_path / "again")
  files = sorted(p.relative_to(synthetic_data_dir) for p in synthetic_data_dir.rglob("*")
                 if p.is_file())
  assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
  assert len(files) == len(TSM_LANGUAGES) * 6 + 3
  for f in files:
    assert (synthetic_data_dir / f).read_bytes() == (again / f).read_bytes(), f
  other = write_synthetic_data(tmp_path / "other", seed=1)
  assert (other / "xlmt/english/train_text.txt").read_bytes() != (
      again / "xlmt/english/train_text.txt").read_bytes()
  np.testing.assert_array_equal(
      np.loadtxt(again / "xlmt/english/test_labels.txt", dtype=int),
      [e.label for e in load_tsm("test", ("english",), synthetic_data_dir)])
