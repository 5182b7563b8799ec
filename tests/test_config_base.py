"""config_base.validate_config, section by section, and the shipped configs."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import pytest

from kd_jax import config_base, losses
from kd_jax.config_base import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))


def load_config(name):
  """configs/<name>.py's get_config(), loaded from its file like --config does."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def set_field(config, field, value):
  """config.<field> = value for a dotted field; a new key is added (unlocked)."""
  *sections, key = field.split(".")
  node = config
  for part in sections:
    node = node[part]
  with node.unlocked():
    node[key] = value
  return config


def assert_invalid(config, section_fn, message):
  """section_fn(config) and validate_config(config) both raise ConfigError with message."""
  for fn in (section_fn, config_base.validate_config):
    with pytest.raises(ConfigError, match=re.escape(message)):
      fn(config)


def test_names():
  assert config_base.STAGES == ("finetune_teacher", "general_distill", "distill")
  assert set(config_base.STAGE_SECTIONS) == set(config_base.STAGES)
  assert config_base.STAGE_SECTIONS["general_distill"] == "general"
  assert config_base.PRECISIONS == {"fp32": jnp.float32, "bf16": jnp.bfloat16}
  assert config_base.base_config().data.task == "tsm"
  assert "from_general" in config_base.INIT_STRATEGIES
  assert issubclass(ConfigError, ValueError)


def test_import_needs_no_training_stack():
  """config_base is read by configs/*.py and launch/: no train, orbax, clu or transformers."""
  code = ("import sys, kd_jax.config_base; "
          "print(sorted(m for m in ('kd_jax.train', 'orbax', 'orbax.checkpoint', 'clu', "
          "'transformers') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == "[]"


@pytest.mark.parametrize("value,expected", [
    ("", ()),
    ("a", ("a",)),
    ("a, b", ("a", "b")),
    ("a,b,", ("a", "b")),
    (("a", "b"), ("a", "b")),
    ((), ()),
])
def test_split_checkpoints(value, expected):
  assert config_base.split_checkpoints(value) == expected


def test_base_config_validates():
  config = config_base.base_config()
  config_base.validate_config(config)
  for fn in (config_base._validate_stages, config_base._validate_data,
             config_base._validate_student, config_base._validate_distill,
             config_base._validate_train, config_base._validate_general,
             config_base._validate_runtime):
    fn(config)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_files_validate(name):
  config_base.validate_config(load_config(name))


def test_every_config_file_is_covered():
  assert {"default", "general_distill", "tsm_student", "tsm_teacher"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("field,value,message", [
    ("stages", ("finetune",), "config.stages='finetune' is not valid"),
    ("stages", ("distill", "teacher"), "config.stages='teacher' is not valid"),
])
def test_stages(field, value, message):
  config = set_field(config_base.base_config(), field, value)
  assert_invalid(config, config_base._validate_stages, message)


@pytest.mark.parametrize("field,value,message", [
    ("data.task", "sst2", "config.data.task='sst2': unknown task 'sst2'"),
    ("data.task", "hf:", "config.data.task='hf:': unknown task"),
    ("data.task", "kaggle:x", "config.data.task='kaggle:x': unknown task"),
    ("data.label_kind", "span", "config.data.label_kind='span' is not valid"),
    ("data.train_fraction", 0.0, "config.data.train_fraction=0.0 must be in (0, 1]"),
    ("data.eval_fraction", 1.5, "config.data.eval_fraction=1.5 must be in (0, 1]"),
    ("data.buckets", (32, 100), "config.data.buckets=(32, 100), config.data.max_length=128"),
    ("data.buckets", (), "buckets must not be empty"),
    ("data.max_length", 1024, "config.data.buckets=(32, 64, 128), config.data.max_length=1024"),
])
def test_data(field, value, message):
  config = set_field(config_base.base_config(), field, value)
  assert_invalid(config, config_base._validate_data, message)


def test_data_max_length_over_positions():
  config = config_base.base_config()
  config.data.max_length = 1024
  config.data.buckets = (512, 1024)
  assert_invalid(config, config_base._validate_data,
                 "config.data.max_length=1024 exceeds 512 positions")


@pytest.mark.parametrize("field,value,message", [
    ("student.init", "x", "config.student.init='x' is not valid"),
    ("student.layer_map_strategy", "last", "config.student.layer_map_strategy='last'"),
    ("student.layer_map_strategy", "skip", "config.student.layer_map_strategy='skip'"),
])
def test_student(field, value, message):
  config = set_field(config_base.base_config(), field, value)
  assert_invalid(config, config_base._validate_student, message)


@pytest.mark.parametrize("field,value,message", [
    ("distill.prediction_loss", "l1", "config.distill.prediction_loss='l1' is not valid"),
    ("distill.weights.attn", 1.0, "config.distill.weights='attn' is not valid"),
    ("distill.weights.pkd", -1.0, "config.distill.weights.pkd=-1.0 is negative"),
    ("distill.weights.mlm", 1.0, "config.distill.weights.mlm: MLM terms need masked text"),
    ("distill.weights.mlm_kl", 0.5, "config.distill.weights.mlm_kl: MLM terms"),
    ("distill.layer_map_strategy", "skip", "config.distill.layer_map_strategy='skip'"),
    ("distill.alpha", 1.5, "config.distill.alpha=1.5 must be in [0, 1]"),
])
def test_distill(field, value, message):
  config = set_field(config_base.base_config(), field, value)
  assert_invalid(config, config_base._validate_distill, message)


def test_distill_accepts_the_new_objectives():
  config = config_base.base_config()
  config.distill.layer_map_strategy = "last"
  config.distill.alpha = 0.2
  config.distill.weights.minilm = 1.0
  config.distill.weights.mlm = 0.0  # an MLM term at weight 0 is no error
  config_base.validate_config(config)


@pytest.mark.parametrize("checkpoint", ["runs/a/teacher, runs/b/teacher", ("a", "b")])
def test_distill_several_teachers_with_intermediate_terms(checkpoint):
  config = config_base.base_config()
  config.teacher.checkpoint = checkpoint
  assert_invalid(config, config_base._validate_distill,
                 "config.teacher.checkpoint names 2 teachers, but config.distill.weights.att=1.0, "
                 "config.distill.weights.hid=1.0, config.distill.weights.embd=1.0 > 0")
  config.distill.kd = False  # NON-KD reads no teacher
  config_base.validate_config(config)
  config.distill.kd = True
  config.stages = ("finetune_teacher",)  # no distill stage
  config_base.validate_config(config)
  config.stages = ("distill",)
  w = config.distill.weights
  w.att, w.hid, w.embd, w.soft_ce = 0.0, 0.0, 0.0, 1.0  # logit terms only
  config_base.validate_config(config)


@pytest.mark.parametrize("section", ["teacher", "student", "general"])
def test_train(section):
  config = set_field(config_base.base_config(), f"{section}.train.batch_size", 0)
  assert_invalid(config, config_base._validate_train,
                 f"config.{section}.train.batch_size and eval_batch_size must be >= 1")
  config = set_field(config_base.base_config(), f"{section}.train.eval_batch_size", 0)
  assert_invalid(config, config_base._validate_train, f"config.{section}.train.batch_size")
  config = config_base.base_config()
  config[section].train.num_train_steps = -1
  config[section].train.num_epochs = 0.0
  assert_invalid(config, config_base._validate_train,
                 f"config.{section}.train: set num_train_steps >= 0 or num_epochs > 0")
  config[section].train.num_train_steps = 5  # steps alone are enough
  config_base.validate_config(config)
  config[section].train.num_train_steps = 0  # no step: the initialised model is evaluated
  config_base.validate_config(config)


def general_config():
  return load_config("general_distill")


@pytest.mark.parametrize("field,value,message", [
    ("general.init", "from_general", "config.general.init='from_general' is not valid"),
    ("general.weights.clf", 1.0, "config.general.weights='clf' is not valid"),
    ("general.weights.pred", 1.0, "config.general.weights='pred' is not valid"),
    ("general.weights.mlm", -1.0, "config.general.weights.mlm=-1.0 is negative"),
    ("general.mask_rate", 0.0, "config.general.mask_rate=0.0 must be in (0, 1]"),
    ("general.mask_rate", 1.5, "config.general.mask_rate=1.5"),
    ("general.heldout_size", 0, "config.general.heldout_size=0 must be >= 1"),
    ("general.buckets", (32, 100), "config.general.buckets=(32, 100)"),
])
def test_general(field, value, message):
  config = set_field(general_config(), field, value)
  assert_invalid(config, config_base._validate_general, message)


def test_general_weights_none_positive():
  config = general_config()
  for term in config.general.weights:
    config.general.weights[term] = 0.0
  assert_invalid(config, config_base._validate_general,
                 "config.general.weights: no term has a positive weight")


def test_general_distill_with_no_text():
  config = general_config()
  config.general.sib200_languages = ()
  config_base.validate_config(config)  # still has tsm text
  config.general.tsm_languages = ()
  assert_invalid(config, config_base._validate_general,
                 "config.general: no text; set text_files, tsm_languages or sib200_languages")
  config.general.text_files = ("corpus.txt",)
  config_base.validate_config(config)


def test_general_stage_fields_only_checked_when_it_runs():
  config = config_base.base_config()
  assert "general_distill" not in config.stages
  config.general.mask_rate = 0.0
  config.general.tsm_languages = ("klingon",)
  config_base.validate_config(config)  # no text and bad masking: no general stage
  config.general.weights.unlock()
  config.general.weights.clf = 1.0  # names are checked always
  assert_invalid(config, config_base._validate_general,
                 "config.general.weights='clf' is not valid")


def test_general_terms_are_task_free():
  assert set(losses.GENERAL_TERMS) == (set(losses.DISTILL_TERMS)
                                       - {"clf", "pred", "soft_ce"})


@pytest.mark.parametrize("field,value,message", [
    ("precision", "fp16", "config.precision='fp16' is not valid"),
    ("nonfinite", "ignore", "config.nonfinite='ignore' is not valid"),
    ("remat", 1, None),  # 1 == True: accepted as today
    ("remat", "yes", "config.remat='yes' is not valid"),
    ("scan_layers", "no", "config.scan_layers='no' is not valid"),
    ("unpad", None, "config.unpad=None is not valid"),
    ("unpad_multiple", -1, "config.unpad_multiple=-1 must be an int >= 0"),
    ("unpad_multiple", 2.5, "config.unpad_multiple=2.5 must be an int >= 0"),
    ("mesh.data", 0, "config.mesh.data=0 must be an int >= 1 or -1 (the rest)"),
    ("mesh.fsdp", -2, "config.mesh.fsdp=-2"),
    ("mesh.tensor", 1.0, "config.mesh.tensor=1.0"),
    ("mesh.tensor", -1, "config.mesh: only one of data, fsdp, tensor may be -1 (the rest), "
                        "got data=-1, fsdp=1, tensor=-1"),
])
def test_runtime(field, value, message):
  config = config_base.base_config()
  *sections, key = field.split(".")
  node = config
  for part in sections:
    node = node[part]
  # replacing the field's type (int <- float, bool <- str) needs the reference undone
  node.unlock()
  del node[key]
  node[key] = value
  if message is None:
    config_base.validate_config(config)
    return
  assert_invalid(config, config_base._validate_runtime, message)


def test_runtime_accepts_valid_values():
  config = config_base.base_config()
  config.precision = "bf16"
  config.nonfinite = "skip"
  config.remat = config.scan_layers = config.unpad = True
  config.unpad_multiple = 8
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, -1, 2
  config_base.validate_config(config)
