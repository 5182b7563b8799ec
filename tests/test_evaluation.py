"""Tests for kd_jax.evaluation against hand-computed numbers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kd_jax.evaluation import classification_metrics, format_markdown_table, write_results

LANGS = ["en", "de", "sw"]  # sw has no examples
NUM_CLASSES = 3

# en: 6 examples, de: 4 examples
EN_Y, EN_P = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
DE_Y, DE_P = [0, 1, 1, 0], [0, 1, 0, 0]
LABELS = np.array(EN_Y + DE_Y)
PREDS = np.array(EN_P + DE_P)
LANG_IDS = np.array([0] * 6 + [1] * 4)


def hand_f1(tp, fp, fn):
  """F1 = 2tp / (2tp + fp + fn); 0 when undefined (zero_division=0)."""
  denom = 2 * tp + fp + fn
  return 0.0 if denom == 0 else 2 * tp / denom


def hand_macro_f1(y, p, k):
  y, p = np.asarray(y), np.asarray(p)
  return 100 * np.mean([
      hand_f1(np.sum((y == c) & (p == c)), np.sum((y != c) & (p == c)), np.sum((y == c) & (p != c)))
      for c in range(k)
  ])


# Worked by hand:
#  en: class0 tp1 fp1 fn1 -> 1/2; class1 tp2 fp1 fn0 -> 4/5; class2 tp1 fp0 fn1 -> 2/3
EN_F1 = 100 * (1 / 2 + 4 / 5 + 2 / 3) / 3  # 65.555...
#  de: class0 tp2 fp1 fn0 -> 4/5; class1 tp1 fp0 fn1 -> 2/3; class2 absent -> 0
DE_F1 = 100 * (4 / 5 + 2 / 3 + 0) / 3  # 48.888...
#  pooled: class0 tp3 fp2 fn1 -> 6/9; class1 tp3 fp1 fn1 -> 6/8; class2 tp1 fp0 fn1 -> 2/3
ALL_F1 = 100 * (6 / 9 + 6 / 8 + 2 / 3) / 3  # 69.444...


def test_hand_numbers_consistent():
  assert hand_macro_f1(EN_Y, EN_P, 3) == pytest.approx(EN_F1)
  assert hand_macro_f1(DE_Y, DE_P, 3) == pytest.approx(DE_F1)
  assert hand_macro_f1(LABELS, PREDS, 3) == pytest.approx(ALL_F1)


def test_classification_metrics_values():
  m = classification_metrics(LABELS, PREDS, LANG_IDS, LANGS, NUM_CLASSES)
  assert m["overall"]["macro_f1"] == pytest.approx(ALL_F1)
  assert m["overall"]["accuracy"] == pytest.approx(70.0)
  assert m["overall"]["num_examples"] == 10
  assert list(m["per_language"]) == ["en", "de"]  # sw has no examples
  en, de = m["per_language"]["en"], m["per_language"]["de"]
  assert en["macro_f1"] == pytest.approx(EN_F1)
  assert en["accuracy"] == pytest.approx(100 * 4 / 6)
  assert en["num_examples"] == 6
  assert de["macro_f1"] == pytest.approx(DE_F1)
  assert de["accuracy"] == pytest.approx(75.0)
  assert de["num_examples"] == 4
  # paper's average = mean of per-language macro-F1 (differs from pooled)
  assert m["avg_macro_f1"] == pytest.approx((EN_F1 + DE_F1) / 2)
  assert m["avg_macro_f1"] != pytest.approx(m["overall"]["macro_f1"])
  assert "seen_avg_macro_f1" not in m


def test_seen_unseen():
  m = classification_metrics(LABELS, PREDS, LANG_IDS, LANGS, NUM_CLASSES, seen_languages=["en"])
  assert m["seen_avg_macro_f1"] == pytest.approx(EN_F1)
  assert m["unseen_avg_macro_f1"] == pytest.approx(DE_F1)
  m2 = classification_metrics(LABELS, PREDS, LANG_IDS, LANGS, NUM_CLASSES, seen_languages=["en", "de"])
  assert m2["unseen_avg_macro_f1"] is None
  with pytest.raises(ValueError, match="xx"):
    classification_metrics(LABELS, PREDS, LANG_IDS, LANGS, NUM_CLASSES, seen_languages=["xx"])


def test_perfect_and_random_larger():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 5, size=200)
  lang = rng.integers(0, 2, size=200)
  m = classification_metrics(y, y, lang, ["a", "b"], 5)
  assert m["overall"]["macro_f1"] == pytest.approx(100.0)
  assert m["avg_macro_f1"] == pytest.approx(100.0)
  p = rng.integers(0, 5, size=200)
  m = classification_metrics(y, p, lang, ["a", "b"], 5)
  assert m["overall"]["macro_f1"] == pytest.approx(hand_macro_f1(y, p, 5))
  for i, name in enumerate(["a", "b"]):
    assert m["per_language"][name]["macro_f1"] == pytest.approx(
        hand_macro_f1(y[lang == i], p[lang == i], 5)
    )
    assert m["per_language"][name]["accuracy"] == pytest.approx(100 * np.mean(y[lang == i] == p[lang == i]))


def test_errors():
  with pytest.raises(ValueError, match=r"10.*9|9.*10"):
    classification_metrics(LABELS, PREDS[:9], LANG_IDS, LANGS, NUM_CLASSES)
  with pytest.raises(ValueError, match="8"):
    classification_metrics(LABELS, PREDS, LANG_IDS[:8], LANGS, NUM_CLASSES)
  with pytest.raises(ValueError, match="language_ids"):
    classification_metrics(LABELS, PREDS, LANG_IDS + 5, LANGS, NUM_CLASSES)
  with pytest.raises(ValueError, match="predictions"):
    classification_metrics(LABELS, PREDS + 3, LANG_IDS, LANGS, NUM_CLASSES)


def _results():
  teacher = classification_metrics(LABELS, LABELS, LANG_IDS, LANGS, NUM_CLASSES)
  student = classification_metrics(LABELS, PREDS, LANG_IDS, LANGS, NUM_CLASSES)
  return {"teacher": teacher, "student KD": student}


def test_format_markdown_table():
  table = format_markdown_table(_results(), LANGS)
  lines = table.strip().split("\n")
  assert lines[0] == "| run | en | de | sw | avg | overall |"
  assert lines[1] == "|---|---:|---:|---:|---:|---:|"
  # de has no class-2 examples: with labels=range(num_classes), zero_division=0 the
  # absent class counts as F1 = 0, so even perfect predictions give 2/3 there.
  assert lines[2] == "| teacher | 100.00 | 66.67 | - | 83.33 | 100.00 |"
  assert lines[3] == "| student KD | 65.56 | 48.89 | - | 57.22 | 69.44 |"
  assert len(lines) == 4


def test_write_results(tmp_path):
  metrics = classification_metrics(LABELS, PREDS, LANG_IDS, LANGS, NUM_CLASSES, seen_languages=["en", "de"])
  workdir = tmp_path / "out"
  json_path, md_path = write_results(workdir, "student_kd", metrics, LANGS)
  assert os.fspath(json_path) == os.path.join(str(workdir), "student_kd.json")
  assert os.fspath(md_path) == os.path.join(str(workdir), "student_kd.md")
  with open(json_path) as f:
    text = f.read()
  loaded = json.loads(text)
  assert text.startswith('{\n  "overall"')  # indent 2
  assert loaded["per_language"]["en"]["macro_f1"] == pytest.approx(EN_F1)
  assert loaded["unseen_avg_macro_f1"] is None
  md = open(md_path).read()
  assert "| student_kd | 65.56 | 48.89 | - | 57.22 | 69.44 |" in md
  # no temp files left behind; overwrite works
  assert sorted(os.listdir(workdir)) == ["student_kd.json", "student_kd.md"]
  write_results(workdir, "student_kd", metrics, LANGS)
  assert sorted(os.listdir(workdir)) == ["student_kd.json", "student_kd.md"]


def test_write_results_atomic_uses_replace(tmp_path, monkeypatch):
  calls = []
  real_replace = os.replace

  def spy(src, dst):
    calls.append((os.path.dirname(src), os.path.basename(dst)))
    assert os.path.exists(src)
    return real_replace(src, dst)

  monkeypatch.setattr(os, "replace", spy)
  metrics = classification_metrics(LABELS, PREDS, LANG_IDS, LANGS, NUM_CLASSES)
  write_results(tmp_path, "r", metrics, LANGS)
  assert [c[1] for c in calls] == ["r.json", "r.md"]
  assert all(c[0] == str(tmp_path) for c in calls)
