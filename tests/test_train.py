"""The loop end to end on a tiny model and synthetic tsm slices (conftest's
synthetic_data_dir: the real layout and row counts): results, exact resume, bad input."""

import json
import os
import pathlib
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kd_jax import config_base, losses, stages, train
from kd_jax.data.tsm import DataError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(model_dir, data_dir, **student):
  config = config_base.base_config()
  config.model = str(model_dir)
  config.data.data_dir = str(data_dir)
  config.data.languages = ("english", "arabic", "hindi")
  config.data.train_fraction = 0.05   # 92 tweets per language
  config.data.eval_fraction = 0.1
  config.data.max_length = 64
  config.data.buckets = (32, 64)
  for name in ("teacher", "student"):
    config[name].train = config_base.train_config(
        batch_size=8, eval_batch_size=16, num_train_steps=6, learning_rate=1e-3,
        eval_every_steps=2, checkpoint_every_steps=2, log_every_steps=1)
  config.student.num_layers = 2
  config.student.update(student)
  return config


def _latest_params(stage_dir):
  mngr = ocp.CheckpointManager(stage_dir / "checkpoints" / "latest")
  restored = mngr.restore(mngr.latest_step())
  return mngr.latest_step(), restored


def test_both_stages_then_exact_resume(synthetic_model_dir, synthetic_data_dir, tmp_path,
                                       monkeypatch):
  config = tiny_config(synthetic_model_dir, synthetic_data_dir)
  full = train.train_and_evaluate(config, tmp_path / "full")
  teacher, student = full["finetune_teacher"], full["distill"]
  for metrics in (teacher, student):
    assert set(metrics["per_language"]) == {"english", "arabic", "hindi"}
    assert 0 <= metrics["overall"]["macro_f1"] <= 100
    assert metrics["overall"]["num_examples"] == 3 * 87  # 10% of 870 test tweets
  for name in ("teacher/test.json", "teacher/val.md", "student/test.md", "results.md"):
    assert (tmp_path / "full" / name).exists(), name
  assert "student from_teacher KD" in (tmp_path / "full" / "results.md").read_text()
  saved = json.loads((tmp_path / "full" / "student" / "model_config.json").read_text())
  assert saved["layer_map"] == [2, 4] and saved["encoder"]["num_layers"] == 2

  # Stop the student after step 3 (latest checkpoint at step 2), rerun the same command.
  resumed_dir = tmp_path / "resumed"
  config.student.train.stop_after_steps = 3
  partial = train.train_and_evaluate(config, resumed_dir)
  assert partial["distill"] == {}
  assert _latest_params(resumed_dir / "student")[0] == 2
  config.student.train.stop_after_steps = -1
  resumed = train.train_and_evaluate(config, resumed_dir)
  assert resumed["distill"]["overall"] == student["overall"]
  assert resumed["distill"]["per_language"] == student["per_language"]
  step_a, a = _latest_params(tmp_path / "full" / "student")
  step_b, b = _latest_params(resumed_dir / "student")
  assert step_a == step_b == 6
  jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])

  # SIGTERM during the student's 4th step: a checkpoint at step 4, a clean return, and
  # the rerun ends where the uninterrupted run did.
  preempted_dir = tmp_path / "preempted"
  make_step = train.make_train_step
  calls = []

  def make_step_sending_sigterm(*args, **kwargs):
    step_fn = make_step(*args, **kwargs)

    def wrapped(*a):
      calls.append(1)
      if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGTERM)
      return step_fn(*a)
    return wrapped

  monkeypatch.setattr(train, "make_train_step", make_step_sending_sigterm)
  config.stages = ("distill",)
  config.teacher.checkpoint = str(tmp_path / "full" / "teacher")
  assert train.train_and_evaluate(config, preempted_dir)["distill"] == {}
  monkeypatch.undo()  # the rerun below steps with the real make_train_step
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  assert _latest_params(preempted_dir / "student")[0] == 4
  finished = train.train_and_evaluate(config, preempted_dir)
  assert finished["distill"]["per_language"] == student["per_language"]
  jax.tree.map(np.testing.assert_array_equal, a["params"],
               _latest_params(preempted_dir / "student")[1]["params"])


def test_non_kd_narrow_student_from_base(synthetic_model_dir, synthetic_data_dir, tmp_path):
  config = tiny_config(synthetic_model_dir, synthetic_data_dir, init="from_base", hidden_size=16)
  config.distill.kd = False
  config.student.train.num_train_steps = 2
  train.train_and_evaluate(config, tmp_path)
  saved = json.loads((tmp_path / "student" / "model_config.json").read_text())["encoder"]
  assert (saved["hidden_size"], saved["num_heads"], saved["intermediate_size"]) == (16, 2, 32)


def test_kd_narrow_student_uses_projections_unpadded(synthetic_model_dir, synthetic_data_dir,
                                                    tmp_path, monkeypatch):
  """A narrower student trains its projections W; with config.unpad, where every
  training step of both stages gets a token_index whose budget (a multiple of
  unpad_multiple) is below the padded batch's positions."""
  calls = []
  token_index = stages.unpad.token_index

  def spy(mask, groups, multiple):
    out = token_index(mask, groups, multiple)
    calls.append((mask.size, multiple, out.size))
    return out

  monkeypatch.setattr(stages.unpad, "token_index", spy)
  config = tiny_config(synthetic_model_dir, synthetic_data_dir, hidden_size=16)
  config.unpad, config.unpad_multiple = True, 8
  config.teacher.train.num_train_steps = 2
  config.student.train.num_train_steps = 2
  for name in ("teacher", "student"):  # eval batches of other sizes than the train ones
    config[name].train.eval_batch_size = 4
  results = train.train_and_evaluate(config, tmp_path)
  assert 0 <= results["distill"]["overall"]["macro_f1"] <= 100
  _, state = _latest_params(tmp_path / "student")
  assert state["params"]["proj"]["hid"].shape == (16, 32)
  assert state["params"]["proj"]["embd"].shape == (16, 32)
  train_positions = config.student.train.batch_size * config.data.max_length
  train_calls = [c for c in calls if c[0] == train_positions]
  assert len(train_calls) == 4, calls  # 2 steps per stage
  for positions, multiple, budget in train_calls:
    assert multiple == 8 and budget % 8 == 0 and budget < positions, calls
  eval_calls = [c for c in calls if c[0] != train_positions]  # val and test run unpadded
  assert eval_calls and all(m == 8 and b % 8 == 0 and b <= p for p, m, b in eval_calls)


@pytest.mark.parametrize("field,value,message", [
    ("student.init", "from_nowhere", "config.student.init='from_nowhere' is not valid"),
    ("stages", ("finetune",), "config.stages='finetune' is not valid"),
    ("distill.prediction_loss", "l1", "config.distill.prediction_loss='l1'"),
    ("data.task", "sst2", "config.data.task='sst2'"),
    ("data.buckets", (32, 100), "buckets"),
])
def test_bad_config_values(field, value, message, synthetic_model_dir, synthetic_data_dir):
  config = tiny_config(synthetic_model_dir, synthetic_data_dir)
  section, _, key = field.rpartition(".")
  (config[section] if section else config)[key] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    config_base.validate_config(config)


def test_unknown_weight_term(synthetic_model_dir, synthetic_data_dir):
  config = tiny_config(synthetic_model_dir, synthetic_data_dir)
  with config.distill.weights.unlocked():
    config.distill.weights.attn = 1.0
  with pytest.raises(ValueError, match="config.distill.weights='attn'"):
    config_base.validate_config(config)


def test_bad_input_stops_before_training_and_keeps_workdir(synthetic_model_dir,
                                                          synthetic_data_dir, tmp_path):
  (tmp_path / "notes.txt").write_text("keep me")
  config = tiny_config(synthetic_model_dir, synthetic_data_dir)
  config.data.data_dir = str(tmp_path / "no_such_dir")
  with pytest.raises(DataError, match="no_such_dir"):
    train.train_and_evaluate(config, tmp_path)
  # A distill stage pointed at a directory without a finished teacher.
  config = tiny_config(synthetic_model_dir, synthetic_data_dir)
  config.stages = ("distill",)
  config.teacher.checkpoint = str(tmp_path / "missing_teacher")
  with pytest.raises(FileNotFoundError, match="missing_teacher.*model_config.json"):
    train.train_and_evaluate(config, tmp_path)
  assert (tmp_path / "notes.txt").read_text() == "keep me"
  assert not (tmp_path / "student" / "checkpoints").exists()


def test_teacher_checkpoint_mismatch(synthetic_model_dir, synthetic_data_dir, tmp_path):
  config = tiny_config(synthetic_model_dir, synthetic_data_dir)
  config.stages = ("finetune_teacher",)
  config.teacher.train.num_train_steps = 2
  train.train_and_evaluate(config, tmp_path)
  info_path = tmp_path / "teacher" / "model_config.json"
  info = json.loads(info_path.read_text())
  info["encoder"]["hidden_size"] = 64
  info_path.write_text(json.dumps(info))
  config.stages = ("distill",)
  with pytest.raises(ValueError, match="does not match the model config"):
    train.train_and_evaluate(config, tmp_path)


@pytest.mark.parametrize("name", ["default", "tsm_teacher", "tsm_student"])
def test_configs_validate(name):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config_base.validate_config(module.get_config())


def test_configs_validate_new_objectives():
  """Layer-map strategies, alpha and the extra loss weights are checked by name."""
  config = config_base.base_config()
  assert config.student.layer_map_strategy == "uniform"
  assert config.distill.layer_map_strategy == "" and config.distill.alpha == -1.0
  # the default objective is unchanged: the new terms are off
  assert {k for k, v in config.distill.weights.items() if v > 0} == {
      "att", "hid", "embd", "pred", "clf"}
  config_base.validate_config(config)
  config.distill.layer_map_strategy = "last"
  config.student.layer_map_strategy = "top"
  config.distill.alpha = 0.2
  config.distill.weights.minilm = 1.0
  config_base.validate_config(config)
  for field, value, message in [
      ("student.layer_map_strategy", "last", "config.student.layer_map_strategy='last'"),
      ("student.layer_map_strategy", "skip", "config.student.layer_map_strategy='skip'"),
      ("distill.layer_map_strategy", "skip", "config.distill.layer_map_strategy='skip'"),
      ("distill.alpha", 1.5, "config.distill.alpha=1.5"),
      ("distill.weights.pkd", -1.0, "config.distill.weights.pkd=-1.0"),
  ]:
    bad = config_base.base_config()
    section, _, key = field.rpartition(".")
    node = bad
    for part in section.split("."):
      node = node[part]
    node[key] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
      config_base.validate_config(bad)


def test_outputs_needed():
  """Scores only at the layers the terms read: the loss map's pairs, the last for MiniLM."""
  lmap = (2, 4, None, 12)  # 4-layer student, 12-layer teacher; student layer 3 unmapped

  def needed(weights):
    return losses.outputs_needed(weights, lmap, 4, 12)

  none = dict(output_embeddings=False, output_hidden_states=False,
              output_attention_scores=(), output_values=False)
  assert needed({"pred": 1.0, "clf": 1.0, "soft_ce": 1.0, "cos": 1.0}) == (none, none)
  assert needed({"att": 0.0, "hid": 0.0}) == (none, none)
  embd = dict(none, output_embeddings=True)
  assert needed({"embd": 1.0}) == (embd, embd)
  for term in ("hid", "pkd"):
    hid = dict(none, output_hidden_states=True)
    assert needed({term: 1.0}) == (hid, hid)
  for term in ("att", "att_kl"):
    assert needed({term: 1.0}) == (dict(none, output_attention_scores=(0, 1, 3)),
                                   dict(none, output_attention_scores=(1, 3, 11)))
  assert needed({"minilm": 0.5}) == (
      dict(none, output_attention_scores=(3,), output_values=True),
      dict(none, output_attention_scores=(11,), output_values=True))
  assert needed({"att": 1.0, "minilm": 0.5})[1]["output_attention_scores"] == (1, 3, 11)
