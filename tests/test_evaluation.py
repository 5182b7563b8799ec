"""Tests for kd_jax.evaluation against hand-computed numbers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kd_jax.evaluation import (classification_metrics, format_markdown_table, retention,
                               token_metrics, write_results)

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
  assert m["metric"] == "macro_f1"


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
  assert "| student_kd | 65.56 | 48.89 | - | 57.22 | 57.22 | - | 69.44 |" in md
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


# ---------------------------------------------------------------------------
# token_metrics (entity F1, seqeval default = conlleval chunking)
# ---------------------------------------------------------------------------
TOK_GOLD = [
    ["B-PER", "I-PER", "O", "B-LOC"],  # en: PER, LOC both found -> tp 2
    ["B-LOC", "O", "B-PER"],           # en: LOC found (tp), PER missed (fn)
    ["O", "O"],                        # en: two spurious entities (fp 2)
    ["B-PER", "I-PER"],                # de: predicted span too short (fp + fn)
    ["B-LOC", "I-LOC", "O"],           # de: wrong type (fp + fn)
    ["O", "B-LOC"],                    # de: stray I-LOC starts an entity -> tp
]
TOK_PRED = [
    ["B-PER", "I-PER", "O", "B-LOC"],
    ["B-LOC", "O", "O"],
    ["B-PER", "B-LOC"],
    ["B-PER", "O"],
    ["B-PER", "I-PER", "O"],
    ["O", "I-LOC"],
]
TOK_LANG_IDS = [0, 0, 0, 1, 1, 1]
# en: tp 3, predicted 5, gold 4; 6 of 9 tags equal
EN_PREC, EN_REC, EN_EF1 = 100 * 3 / 5, 100 * 3 / 4, 100 * 2 * 3 / (5 + 4)
# de: tp 1, predicted 3, gold 3; 3 of 7 tags equal
DE_EF1 = 100 * 1 / 3
# pooled: tp 4, predicted 8, gold 7; 9 of 16 tags equal
ALL_PREC, ALL_REC, ALL_EF1 = 100 * 4 / 8, 100 * 4 / 7, 100 * 2 * 4 / (8 + 7)


def test_token_metrics_values():
  m = token_metrics(TOK_GOLD, TOK_PRED, TOK_LANG_IDS, LANGS, seen_languages=["en"])
  assert m["metric"] == "entity_f1"
  o = m["overall"]
  assert o["entity_f1"] == pytest.approx(ALL_EF1)
  assert o["precision"] == pytest.approx(ALL_PREC)
  assert o["recall"] == pytest.approx(ALL_REC)
  assert o["token_accuracy"] == pytest.approx(100 * 9 / 16)
  assert o["num_examples"] == 6
  assert list(m["per_language"]) == ["en", "de"]  # sw has no examples
  en, de = m["per_language"]["en"], m["per_language"]["de"]
  assert en == pytest.approx({"entity_f1": EN_EF1, "precision": EN_PREC, "recall": EN_REC,
                              "token_accuracy": 100 * 6 / 9, "num_examples": 3})
  assert de == pytest.approx({"entity_f1": DE_EF1, "precision": DE_EF1, "recall": DE_EF1,
                              "token_accuracy": 100 * 3 / 7, "num_examples": 3})
  assert m["avg_entity_f1"] == pytest.approx((EN_EF1 + DE_EF1) / 2)
  assert m["seen_avg_entity_f1"] == pytest.approx(EN_EF1)
  assert m["unseen_avg_entity_f1"] == pytest.approx(DE_EF1)
  assert "avg_macro_f1" not in m
  m = token_metrics(TOK_GOLD, TOK_GOLD, TOK_LANG_IDS, LANGS, seen_languages=["en", "de"])
  assert m["overall"]["entity_f1"] == pytest.approx(100.0)
  assert m["unseen_avg_entity_f1"] is None


def test_token_metrics_errors():
  bad = [list(p) for p in TOK_PRED]
  bad[4] = bad[4][:2]
  with pytest.raises(ValueError, match="example 4"):
    token_metrics(TOK_GOLD, bad, TOK_LANG_IDS, LANGS)
  with pytest.raises(ValueError, match=r"6.*5"):
    token_metrics(TOK_GOLD, TOK_PRED[:5], TOK_LANG_IDS, LANGS)
  with pytest.raises(ValueError, match="language_ids"):
    token_metrics(TOK_GOLD, TOK_PRED, [0, 0, 0, 1, 1, 3], LANGS)
  with pytest.raises(ValueError, match="xx"):
    token_metrics(TOK_GOLD, TOK_PRED, TOK_LANG_IDS, LANGS, seen_languages=["xx"])


# ---------------------------------------------------------------------------
# retention
# ---------------------------------------------------------------------------
def _hand_result(per_lang, metric="macro_f1", seen=None):
  r = {"per_language": {k: {metric: v} for k, v in per_lang.items()},
       f"avg_{metric}": float(np.mean(list(per_lang.values()))), "metric": metric}
  if seen is not None:
    r[f"seen_avg_{metric}"] = None  # the value is not used, only the group
    r["seen_languages"] = list(seen)
  return r


def test_retention_hand_numbers():
  student = _hand_result({"en": 80.0, "de": 60.0, "sw": 40.0}, seen=["en"])
  teacher = _hand_result({"en": 100.0, "de": 75.0})  # no sw: sw drops out everywhere
  r = retention(student, teacher)
  assert r["metric"] == "macro_f1"
  assert r["per_language"] == pytest.approx({"en": 80.0, "de": 80.0})
  assert r["avg"] == pytest.approx(100 * 70 / 87.5)  # means over en, de only
  assert r["seen_avg"] == pytest.approx(80.0)
  assert r["unseen_avg"] == pytest.approx(80.0)  # de only (sw not in teacher)

  # several teachers: mean per language (en 90, de 60)
  teachers = [_hand_result({"en": 100.0, "de": 80.0}), _hand_result({"en": 80.0, "de": 40.0})]
  r = retention(student, teachers)
  assert r["per_language"] == pytest.approx({"en": 100 * 80 / 90, "de": 100.0})
  assert r["avg"] == pytest.approx(100 * 70 / 75)
  assert r["seen_avg"] == pytest.approx(100 * 80 / 90)
  assert r["unseen_avg"] == pytest.approx(100.0)

  # teacher score 0 -> None; no seen group -> no seen/unseen keys
  r = retention(_hand_result({"en": 50.0, "de": 10.0}), _hand_result({"en": 0.0, "de": 20.0}))
  assert r["per_language"]["en"] is None
  assert r["per_language"]["de"] == pytest.approx(50.0)
  assert r["avg"] == pytest.approx(300.0)  # 30 / 10
  assert "seen_avg" not in r


def test_retention_entity_f1_and_errors():
  student = token_metrics(TOK_GOLD, TOK_PRED, TOK_LANG_IDS, LANGS)
  teacher = token_metrics(TOK_GOLD, TOK_GOLD, TOK_LANG_IDS, LANGS)
  r = retention(student, teacher)
  assert r["metric"] == "entity_f1"
  assert r["per_language"] == pytest.approx({"en": EN_EF1, "de": DE_EF1})
  assert r["avg"] == pytest.approx((EN_EF1 + DE_EF1) / 2)
  with pytest.raises(ValueError, match="entity_f1"):
    retention(student, classification_metrics(LABELS, LABELS, LANG_IDS, LANGS, NUM_CLASSES))
  with pytest.raises(ValueError):
    retention(student, [])


def test_format_markdown_table_token_metric():
  ner = token_metrics(TOK_GOLD, TOK_PRED, TOK_LANG_IDS, LANGS)
  lines = format_markdown_table({"ner": ner, **_results()}, LANGS).strip().split("\n")
  assert lines[2] == "| ner | 66.67 | 33.33 | - | 50.00 | 53.33 |"
  assert lines[3] == "| teacher | 100.00 | 66.67 | - | 83.33 | 100.00 |"
  assert len(lines) == 5


def test_write_results_with_teacher(tmp_path):
  student = classification_metrics(LABELS, PREDS, LANG_IDS, LANGS, NUM_CLASSES, seen_languages=["en"])
  teacher = classification_metrics(LABELS, LABELS, LANG_IDS, LANGS, NUM_CLASSES)
  student["retention"] = retention(student, teacher)
  json_path, md_path = write_results(tmp_path, "student_kd", student, LANGS)
  loaded = json.loads(open(json_path).read())
  ret = loaded["retention"]
  # teacher: en 100, de 200/3 (class 2 absent -> 0)
  assert ret["per_language"]["en"] == pytest.approx(EN_F1)
  assert ret["per_language"]["de"] == pytest.approx(100 * DE_F1 / (200 / 3))
  assert ret["avg"] == pytest.approx(100 * (EN_F1 + DE_F1) / (100 + 200 / 3))
  assert ret["seen_avg"] == pytest.approx(EN_F1)
  assert ret["unseen_avg"] == pytest.approx(100 * DE_F1 / (200 / 3))
  md = open(md_path).read()
  lines = md.split("\n")
  i = lines.index("| student_kd | 65.56 | 48.89 | - | 57.22 | 65.56 | 48.89 | 69.44 |")
  assert lines[i + 1] == "| student_kd retention % | 65.56 | 73.33 | - | 68.67 | 65.56 | 73.33 | - |"
  assert "Macro-F1 (%)" in md
  assert "- seen languages avg macro-F1: 65.56" in md
  assert "- retention vs teacher (avg): 68.67 %" in md
  assert "- retention vs teacher (seen avg): 65.56 %" in md
  assert "- retention vs teacher (unseen avg): 73.33 %" in md


def test_write_results_token_metrics(tmp_path):
  m = token_metrics(TOK_GOLD, TOK_PRED, TOK_LANG_IDS, LANGS, seen_languages=["en"])
  _, md_path = write_results(tmp_path, "ner", m, LANGS)
  md = open(md_path).read()
  assert "Entity F1 (%)" in md and "Macro-F1" not in md
  assert "| ner | 66.67 | 33.33 | - | 50.00 | 66.67 | 33.33 | 53.33 |" in md
  assert "- seen languages avg entity F1: 66.67" in md
  assert "- unseen languages avg entity F1: 33.33" in md
  assert "retention" not in md
