"""Paths as a newcomer gives them: relative workdirs, model and data dirs from another
current directory, relative export / vocab outputs, a gs:// workdir, and the config errors
that only the teacher's shape shows, each raised before any training step."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from etils import epath
from etils.epath import gpath, testing as epath_testing

from kd_jax import checkpoints, config_base, export, paths, train, vocab
from kd_jax.config_base import ConfigError
from kd_jax.data import tsm
from conftest import tiny_config

ROOT = epath.Path(__file__).parent.parent

# Written into the test's current directory; every path in it is relative to that.
TINY_CONFIG = tiny_config("model", "data")


@pytest.fixture
def newcomer_dir(tmp_path, tiny_model_dir, real_data_dir, monkeypatch):
  """A current directory (not the repository) holding `tiny.py`, `model` and `data`."""
  (tmp_path / "tiny.py").write_text(TINY_CONFIG)
  (tmp_path / "model").symlink_to(tiny_model_dir)
  (tmp_path / "data").symlink_to(real_data_dir)
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv(paths.DATA_DIR_ENV, raising=False)
  return tmp_path


def _tiny_config(directory):
  spec = importlib.util.spec_from_file_location("tiny", directory / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _main(*args):
  return [sys.executable, "-m", "kd_jax.main", "--config", "tiny.py",
          "--workdir", "runs/rel", *args]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop(paths.DATA_DIR_ENV, None)
  return env


def test_resolve():
  cwd = os.getcwd()
  assert paths.resolve("runs/a") == epath.Path(cwd, "runs", "a")
  assert paths.resolve("runs/../b/") == epath.Path(cwd, "b")
  assert paths.resolve("~/x") == epath.Path(os.path.expanduser("~"), "x")
  assert os.fspath(paths.resolve("gs://bucket/run")) == "gs://bucket/run"
  with pytest.raises(ValueError, match="empty"):
    paths.resolve("")
  with pytest.raises(ValueError, match="--out=gs://b/x: this writes a local directory"):
    paths.resolve_local("gs://b/x", "--out")


def test_resolve_config_fields(newcomer_dir, monkeypatch):
  config = config_base.base_config()
  config.model = "model"                      # an existing relative dir: resolved
  config.teacher.checkpoint = "t1,../t2"
  config.student.checkpoint = "general"
  config.general.text_files = ("a.txt", "/abs/b.txt")
  config.general.teacher = "xlm-roberta-base"  # a hub id: kept
  monkeypatch.setenv(paths.DATA_DIR_ENV, "data")
  resolved, workdir = paths.resolve_config(config, "runs/x")
  d = os.fspath(newcomer_dir)
  assert workdir == epath.Path(d, "runs", "x")
  assert resolved.model == os.path.join(d, "model")
  assert resolved.teacher.checkpoint == f"{d}/t1,{os.path.dirname(d)}/t2"
  assert resolved.student.checkpoint == os.path.join(d, "general")
  assert resolved.general.text_files == (os.path.join(d, "a.txt"), "/abs/b.txt")
  assert resolved.general.teacher == "xlm-roberta-base"
  assert resolved.data.data_dir == os.path.join(d, "data")  # from $KD_JAX_DATA_DIR
  assert config.model == "model" and config.data.data_dir == ""  # the input is unchanged
  assert config_base.base_config().model == paths.resolve_config(
      config_base.base_config(), "w")[0].model == "multilingual-e5-small"


def test_main_relative_workdir_killed_then_resumed(newcomer_dir):
  """`kd_jax.main` with a relative --workdir, model and data dir, run from a directory that
  is not the repository; killed (SIGKILL) after its first checkpoint, the same command
  resumes and ends with the results of an uninterrupted train_and_evaluate call made
  from Python with the same relative paths."""
  run_dir = newcomer_dir / "runs" / "rel"
  proc = subprocess.Popen(_main(), cwd=newcomer_dir, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  latest = run_dir / "teacher" / "checkpoints" / "latest"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if latest.is_dir() and any(p.name.isdigit() for p in latest.iterdir()):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  _, stderr = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
  assert not (run_dir / "results.md").exists()

  rerun = subprocess.run(_main(), cwd=newcomer_dir, env=_env(), capture_output=True,
                         text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"path --workdir=runs/rel -> {run_dir}" in rerun.stderr
  assert f"path config.model=model -> {newcomer_dir / 'model'}" in rerun.stderr
  assert "resumed " in rerun.stderr or "already finished" in rerun.stderr
  assert f"Test macro-F1 (%), {run_dir}:" in rerun.stdout
  assert "| teacher |" in rerun.stdout and "| student from_teacher KD |" in rerun.stdout
  assert (run_dir / "results.md").read_text().strip() in rerun.stdout
  resumed = json.loads((run_dir / "student" / "test.json").read_text())

  # The same config from Python, relative workdir, same current directory.
  results = train.train_and_evaluate(_tiny_config(newcomer_dir), "runs/py")
  assert (newcomer_dir / "runs" / "py" / "results.md").is_file()
  assert results["distill"]["per_language"] == resumed["per_language"]
  assert results["finetune_teacher"]["overall"] == json.loads(
      (run_dir / "teacher" / "test.json").read_text())["overall"]

  # Export and vocabulary reduction with relative --workdir / --out / --model / --text.
  out = export.main(["--workdir", "runs/rel", "--out", "exported"])
  assert out == newcomer_dir / "exported"
  assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
  (newcomer_dir / "corpus.txt").write_text("good morning\nbuenos días\n")
  summary = vocab.main(["--model", "exported", "--out", "reduced", "--text", "corpus.txt"])
  assert summary["source_model"] == os.fspath(out)
  assert summary["corpus"]["text_files"] == [os.fspath(newcomer_dir / "corpus.txt")]
  assert (newcomer_dir / "reduced" / "vocab_mapping.json").is_file()
  # A relative export workdir that holds no run says so, naming the absolute path.
  with pytest.raises(FileNotFoundError, match=f"{newcomer_dir}/runs/none"):
    export.main(["--workdir", "runs/none", "--out", "exported2"])


def test_gs_workdir_through_mocked_epath(newcomer_dir, tmp_path_factory, monkeypatch):
  """A `gs://bucket/run` workdir, with etils.epath's `testing.mock_epath` backend mapping
  gs://bucket to a local folder (TensorFlow's GCS client switched off, so epath takes
  that backend). Orbax's array data and TensorBoard's event files go through
  tensorstore's and TensorFlow's own GCS clients, which no epath mock reaches: the test
  maps the directories handed to them the same way. Everything kd_jax writes itself
  (model_config.json, results, finished markers, stage layout) goes through epath: the
  run's files land in the bucket folder and nothing is written under the current
  directory as a local 'gs:' path."""
  from clu import metric_writers
  bucket = tmp_path_factory.mktemp("bucket")

  def local(path):
    text = os.fspath(path)
    return text.replace("gs://bucket", os.fspath(bucket), 1) if text.startswith("gs://") else text

  def mapped(fn, path, *args, **kwargs):
    return fn(local(path), *args, **kwargs)

  def mapped2(fn, path, dst, *args, **kwargs):
    return fn(local(path), local(dst), *args, **kwargs)

  def glob(fn, pattern):  # results named as the pattern was: gs:// for gs://
    found = fn(local(pattern))
    if not os.fspath(pattern).startswith("gs://"):
      return found
    return [p.replace(os.fspath(bucket), "gs://bucket", 1) for p in found]

  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  manager = checkpoints.ocp.CheckpointManager
  monkeypatch.setattr(checkpoints.ocp, "CheckpointManager",
                      lambda directory, *a, **k: manager(epath.Path(local(directory)), *a, **k))
  writer = metric_writers.create_default_writer
  monkeypatch.setattr(metric_writers, "create_default_writer",
                      lambda logdir, **k: writer(local(logdir), **k))
  config = _tiny_config(newcomer_dir)
  config.stages = ("finetune_teacher",)
  config.teacher.train.num_train_steps = 4
  with epath_testing.mock_epath(
      exists=mapped, isdir=mapped, listdir=mapped, makedirs=mapped, mkdir=mapped, open=mapped,
      remove=mapped, rmtree=mapped, stat=mapped, walk=mapped, glob=glob, copy=mapped2,
      rename=mapped2, replace=mapped2):
    results = train.train_and_evaluate(config, epath.Path("gs://bucket/run"))
    assert epath.Path("gs://bucket/run/results.md").exists()
  # english and arabic, 5 % of each test class (stratified)
  expected = len(tsm.load_tsm("test", ("english", "arabic"), newcomer_dir / "data",
                              fraction=0.05))
  assert results["finetune_teacher"]["overall"]["num_examples"] == expected == 84
  for name in ("results.md", "teacher/test.json", "teacher/val.md", "teacher/model_config.json"):
    assert (bucket / "run" / name).is_file(), name
  assert any((bucket / "run" / "teacher" / "checkpoints" / "best").iterdir())
  assert not list(newcomer_dir.glob("gs*")), list(newcomer_dir.iterdir())


@pytest.mark.parametrize("field,value,message", [
    ("student.num_layers", 5,
     r"config.student.num_layers=5, .* do not fit a teacher of 4 layers: student has more "
     r"layers \(5\) than teacher \(4\)"),
    ("student.hidden_size", 13, r"config.student.hidden_size=13 is not divisible by 2 heads"),
    ("student.hidden_size", 64, r"config.student.hidden_size=64 is wider than the teacher's 32"),
    ("student.layer_map", (1, 7),
     r"config.student.num_layers=2, layer_map_strategy='uniform', layer_map=\[1, 7\] do not "
     r"fit a teacher of 4 layers: layer_map\[1\] = 7 is out of range"),
    ("distill.layer_map", (2, 9),
     r"config.distill.layer_map_strategy='', layer_map=\[2, 9\] do not fit"),
])
def test_teacher_shape_errors_before_training(newcomer_dir, field, value, message):
  """Errors only the teacher's shape shows are raised before the teacher stage trains."""
  config = _tiny_config(newcomer_dir)
  section, _, key = field.rpartition(".")
  node = config
  for part in section.split("."):
    node = node[part]
  node[key] = value
  start = time.time()
  with pytest.raises(ConfigError, match=message):
    train.train_and_evaluate(config, "runs/bad")
  assert time.time() - start < 60
  assert not (newcomer_dir / "runs" / "bad" / "teacher").exists()


def test_teacher_dir_errors_before_training(newcomer_dir):
  """distill with a finished teacher whose shape rules out the student, or none at all."""
  config = _tiny_config(newcomer_dir)
  config.stages = ("finetune_teacher",)
  config.teacher.train.num_train_steps = 2
  train.train_and_evaluate(config, "runs/t")
  config.stages = ("distill",)
  config.teacher.checkpoint = "runs/t/teacher"
  config.student.num_layers = 3  # 4 % 3: no uniform map
  with pytest.raises(ConfigError, match=r"config.student.num_layers=3, .* 4 layers: "
                                        r"num_teacher_layers=4 is not divisible"):
    train.train_and_evaluate(config, "runs/s")
  config.teacher.checkpoint = "runs/nothing"
  with pytest.raises(FileNotFoundError, match=f"{newcomer_dir}/runs/nothing/model_config.json "
                                              "does not exist: config.teacher.checkpoint"):
    train.train_and_evaluate(config, "runs/s")
  assert not (newcomer_dir / "runs" / "s").exists()


def test_main_default_config_errors_in_seconds(tmp_path):
  """The newcomer's case, on the real default config: a 20-layer student of the 12-layer
  e5-small teacher, and a misspelt field, each one line naming the field, before any
  training (the e5 conversion on first use included)."""
  base = [sys.executable, "-m", "kd_jax.main", "--config", "configs/default.py",
          "--workdir", os.fspath(tmp_path / "run")]
  for override, expected in [
      ("--config.student.num_layers=20",
       "error: config.student.num_layers=20, layer_map_strategy='uniform', layer_map=[] do "
       "not fit a teacher of 12 layers"),
      ("--config.student.nmu_layers=3",
       "error: config.student.nmu_layers is not a field of config.student; did you mean "
       "config.student.num_layers?")]:
    start = time.time()
    proc = subprocess.run(base + [override], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    elapsed = time.time() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(expected), last
    assert elapsed < 60, elapsed
    assert not (tmp_path / "run" / "teacher").exists()


def test_unknown_field_message():
  """ml_collections' own errors for a misspelt field and a misspelt section, as one line."""
  from kd_jax.main import unknown_field_message
  config = config_base.base_config()
  with pytest.raises(AttributeError) as field_error:
    config.student.nmu_layers  # noqa: B018
  with pytest.raises(KeyError) as section_error:
    config["studnt"]  # noqa: B018
  argv = ["kd_jax.main", "--config", "c.py", "--config.student.nmu_layers=3"]
  assert unknown_field_message(argv, field_error.value) == (
      "error: config.student.nmu_layers is not a field of config.student; did you mean "
      "config.student.num_layers? (all fields and their defaults: kd_jax/config_base.py)")
  assert unknown_field_message(["--config.studnt.num_layers=3"], section_error.value) == (
      "error: config.studnt is not a field of config; did you mean config.student? (all "
      "fields and their defaults: kd_jax/config_base.py)")
  assert unknown_field_message(["--config.seed=1"], field_error.value) is None


@pytest.fixture
def jax_cache_settings():
  """Restores JAX's compilation-cache settings (process-wide) after the test."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
           "jax_persistent_cache_min_compile_time_secs")
  before = {n: getattr(jax.config, n) for n in names}
  yield
  for n, v in before.items():
    jax.config.update(n, v)
  compilation_cache.reset_cache()


def test_compilation_cache_auto_off_and_dir(tmp_path, monkeypatch, jax_cache_settings):
  import jax
  import jax.numpy as jnp
  monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "models"))
  # auto keeps a directory JAX already has (here the test session's)
  session_dir = jax.config.jax_compilation_cache_dir
  assert session_dir and paths.enable_compilation_cache("auto") == paths.resolve(session_dir)
  # auto without one: under the kd_jax cache root
  jax.config.update("jax_compilation_cache_dir", None)
  assert paths.enable_compilation_cache("auto") == tmp_path / "models" / "xla"
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
  f = lambda x: jnp.sin(x) * 3.0 + x.sum()
  x = jnp.arange(7.0)
  jax.block_until_ready(jax.jit(f)(x))
  entries = sorted(p.name for p in (tmp_path / "models" / "xla").iterdir())
  assert entries  # the compiled function was written
  # the same function jitted anew (a rerun's new closure) is read back: nothing new written
  jax.block_until_ready(jax.jit(lambda x: jnp.sin(x) * 3.0 + x.sum())(x))
  assert sorted(p.name for p in (tmp_path / "models" / "xla").iterdir()) == entries
  # an explicit directory, then off
  assert paths.enable_compilation_cache(str(tmp_path / "mine")) == tmp_path / "mine"
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
  assert paths.enable_compilation_cache("off") is None
  assert not jax.config.jax_enable_compilation_cache
  jax.block_until_ready(jax.jit(lambda x: jnp.cos(x) - 1.0)(x))
  assert not (tmp_path / "mine").exists()
  with pytest.raises(ValueError, match="compilation_cache is empty"):
    paths.enable_compilation_cache("")


def test_compilation_cache_config_validated():
  config = config_base.base_config()
  assert config.compilation_cache == "auto"
  config.compilation_cache = ""
  with pytest.raises(ConfigError, match="config.compilation_cache="):
    config_base.validate_config(config)
