"""`python -m kd_jax.main` on tasks other than tsm, with the same command shape as the
README's: a token-classification teacher and distilled student on a UNER-shaped dataset
(read through `datasets`, as the hub's), a sentence-pair teacher and student on XNLI-shaped
JSON lines (`files:`), and the exported token student in
`transformers.AutoModelForTokenClassification` with the same logits."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import NLI_LABELS, ROOT, UNER_TAGS, write_nli_files, write_uner_dataset
from kd_jax import checkpoints, export
from kd_jax.models.encoder import Encoder


def _main(workdir, model_dir, *overrides):
  """The README's command on configs/default.py, shrunk to a few steps of a tiny model."""
  small = ["--config.data.max_length=32", "--config.data.buckets=(16,32)",
           "--config.data.train_fraction=1.0", "--config.data.eval_fraction=1.0",
           "--config.student.num_layers=2", f"--config.model={model_dir}"]
  for section in ("teacher", "student"):
    small += [f"--config.{section}.train.{k}={v}" for k, v in (
        ("num_train_steps", 6), ("batch_size", 16), ("eval_batch_size", 16),
        ("eval_every_steps", 3), ("checkpoint_every_steps", 3), ("log_every_steps", 1))]
  cmd = [sys.executable, "-m", "kd_jax.main", "--config", "configs/default.py",
         "--workdir", os.fspath(workdir), *small, *overrides]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("KD_JAX_DATA_DIR", None)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _read(path):
  return json.loads(path.read_text())


def test_token_classification_teacher_student_and_export(synthetic_model_dir, tmp_path):
  write_uner_dataset(tmp_path / "data" / "uner")
  workdir = tmp_path / "run"
  proc = _main(workdir, synthetic_model_dir, "--config.data.task=uner",
               f"--config.data.data_dir={tmp_path / 'data'}",
               "--config.data.languages=('en_ewt','pt_bosque')",
               "--config.data.train_languages=('en_ewt',)")
  assert "Test entity F1 (%)" in proc.stdout

  for stage in ("teacher", "student"):
    info = _read(workdir / stage / "model_config.json")
    assert info["encoder"]["head"] == "token" and info["labels"] == list(UNER_TAGS)
    assert info["label_kind"] == "token" and info["seen_languages"] == ["en_ewt"]
    test = _read(workdir / stage / "test.json")
    assert test["metric"] == "entity_f1"
    assert list(test["per_language"]) == ["en_ewt", "pt_bosque"]
    assert test["per_language"]["pt_bosque"]["num_examples"] == 24
    assert test["seen_avg_entity_f1"] == pytest.approx(
        test["per_language"]["en_ewt"]["entity_f1"])
    assert test["unseen_avg_entity_f1"] == pytest.approx(
        test["per_language"]["pt_bosque"]["entity_f1"])
  teacher, student = (_read(workdir / s / "test.json") for s in ("teacher", "student"))
  for lang, ratio in student["retention"]["per_language"].items():
    t = teacher["per_language"][lang]["entity_f1"]
    assert ratio == (None if t == 0 else pytest.approx(
        100 * student["per_language"][lang]["entity_f1"] / t))

  out = export.export_stage(workdir / "student", tmp_path / "exported")
  hf = json.loads((out / "config.json").read_text())
  assert hf["architectures"] == ["BertForTokenClassification"]
  assert hf["id2label"] == {str(i): t for i, t in enumerate(UNER_TAGS)}
  torch_model = transformers.AutoModelForTokenClassification.from_pretrained(str(out)).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  words = [["Ana", "lives", "in", "Lisboa"], ["the", "cat"]]
  enc = tokenizer(words, is_split_into_words=True, padding=True, return_tensors="np")
  with torch.no_grad():
    theirs = torch_model(input_ids=torch.from_numpy(enc["input_ids"]),
                         attention_mask=torch.from_numpy(enc["attention_mask"])).logits.numpy()
  cfg, _ = checkpoints.load_model_config(workdir / "student")
  params = checkpoints.restore_stage_params(workdir / "student", cfg)
  ours = Encoder(cfg).apply({"params": params}, jnp.asarray(enc["input_ids"]),
                            jnp.asarray(enc["attention_mask"])).logits
  assert theirs.shape == (2, enc["input_ids"].shape[1], len(UNER_TAGS))
  real = enc["attention_mask"].astype(bool)
  np.testing.assert_allclose(theirs[real], np.asarray(ours)[real], atol=1e-4, rtol=0)


def test_sentence_pair_teacher_and_student(synthetic_model_dir, tmp_path):
  data = write_nli_files(tmp_path / "xnli")
  workdir = tmp_path / "run"
  _main(workdir, synthetic_model_dir, f"--config.data.task=files:{data}/*.jsonl",
        "--config.data.columns.text=premise", "--config.data.columns.text_pair=hypothesis",
        "--config.data.columns.language=language", "--config.distill.weights.att=0")
  for stage in ("teacher", "student"):
    info = _read(workdir / stage / "model_config.json")
    assert info["input_kind"] == "text_pair" and info["encoder"]["head"] == "sequence"
    assert info["labels"] == sorted(NLI_LABELS)  # no ClassLabel: sorted train values
    test = _read(workdir / stage / "test.json")
    assert test["metric"] == "macro_f1" and list(test["per_language"]) == ["en", "de"]
    assert test["overall"]["num_examples"] == 48
  assert (workdir / "student" / "test.md").read_text().count("retention") >= 2
