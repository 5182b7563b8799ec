"""The one loop across stage kinds: SIGTERM at every point of a multi-stage run, unpadding
in general_distill, the general student exported as a masked LM, the workdir lock, and a
damaged latest checkpoint. All on synthetic data (no real data needed)."""

import collections
import json
import logging
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath

from kd_jax import checkpoints, config_base, evaluation, paths, stages, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory, synthetic_data_dir):
  from conftest import make_tiny_model_dir
  return make_tiny_model_dir(tmp_path_factory.mktemp("small") / "model", synthetic_data_dir,
                             layers=2, heads=2)


def run_config(model_dir, data_dir, stages_=("finetune_teacher", "general_distill", "distill")):
  """Teacher, general student and its KD fine-tuning: 4 steps each, eval and save every 2."""
  config = config_base.base_config()
  config.model = str(model_dir)
  config.stages = stages_
  config.data.data_dir = str(data_dir)
  config.data.languages = ("english", "arabic")
  config.data.train_fraction = 0.05
  config.data.eval_fraction = 0.05   # 2 evaluation batches per split
  config.data.max_length = 64
  config.data.buckets = (64,)
  config.general.tsm_languages = ("english",)
  config.general.max_length = 64
  config.general.buckets = (64,)
  config.general.heldout_size = 24
  for name in ("teacher", "general", "student"):
    config[name].train = config_base.train_config(
        batch_size=8, eval_batch_size=16, num_train_steps=4, learning_rate=1e-3,
        eval_every_steps=2, checkpoint_every_steps=2, log_every_steps=1)
  config.student.num_layers = 1
  config.student.init = "from_general" if "general_distill" in stages_ else "from_teacher"
  return config


class Signals:
  """Sends this process a SIGTERM at one chosen point of a run: the `nth` time `hook` is
  reached in `stage`. Hooks: "build" (a stage is being set up), "step" (inside a train
  step), "save_latest" (after the loop read the flag, before the save), "save_kept" (a
  best / final save), "eval:<split>" (between two evaluation batches), "write:<split>"
  (a result file was just written). Counts the train steps run after the signal."""

  def __init__(self, monkeypatch):
    self.target, self.stage, self.split = None, None, None
    self.fired, self.steps_after, self.counts = False, 0, collections.Counter()
    build, make_step = stages.build, train.make_train_step

    def spy_build(name, *a, **k):
      self.stage = name
      self.hit("build")
      return build(name, *a, **k)

    def spy_make_step(*a, **k):
      step_fn = make_step(*a, **k)

      def step(*args):
        self.steps_after += self.fired
        self.hit("step")
        return step_fn(*args)
      return step
    monkeypatch.setattr(stages, "build", spy_build)
    monkeypatch.setattr(train, "make_train_step", spy_make_step)
    for name in ("save_latest", "save_kept"):
      original = getattr(checkpoints.StageCheckpoints, name)
      monkeypatch.setattr(checkpoints.StageCheckpoints, name,
                          lambda ckpt, *a, _o=original, _n=name: (self.hit(_n), _o(ckpt, *a)))
    for cls in (evaluation.ClassificationEvaluator, evaluation.MLMEvaluator):
      call, write = cls.__call__, cls.write

      def spy_call(ev, params, step, interrupt=None, _call=call):
        self.split = ev.split
        return _call(ev, params, step, interrupt)

      def spy_write(ev, *a, _write=write):
        _write(ev, *a)
        self.hit(f"write:{ev.split}")
      monkeypatch.setattr(cls, "__call__", spy_call)
      monkeypatch.setattr(cls, "write", spy_write)
    eval_batches = evaluation._eval_batches

    def spy_eval_batches(*a):
      for i, batch in enumerate(eval_batches(*a)):
        yield batch
        if i == 0:
          self.hit(f"eval:{self.split}")
    monkeypatch.setattr(evaluation, "_eval_batches", spy_eval_batches)

  def arm(self, stage, hook, nth=1):
    self.target, self.fired, self.steps_after = (stage, hook, nth), False, 0
    self.counts.clear()

  def hit(self, hook):
    if self.target is None or self.fired or self.target[:2] != (self.stage, hook):
      return
    self.counts[hook] += 1
    if self.counts[hook] == self.target[2]:
      self.fired = True
      os.kill(os.getpid(), signal.SIGTERM)


# (stage, hook, nth): each run of the same command is stopped at the next point.
STOPS = [
    ("finetune_teacher", "step", 2),          # inside a step
    ("finetune_teacher", "save_latest", 1),   # between reading the flag and saving (step 4)
    ("finetune_teacher", "eval:val", 1),      # during an evaluation
    ("finetune_teacher", "eval:test", 1),     # during the test evaluation
    ("finetune_teacher", "write:test", 1),    # between stages: the teacher just finished
    ("general_distill", "build", 1),          # between stages: while the next one loads
    ("general_distill", "step", 1),
    ("general_distill", "eval:heldout", 1),   # during an evaluation (step 2)
    ("general_distill", "eval:heldout", 2),   # during the final held-out evaluation
    ("distill", "save_kept", 1),              # during a checkpoint save (best at step 2)
    ("distill", "step", 1),
    ("distill", "eval:test", 1),
]


def test_sigterm_at_every_point_then_resume(small_model_dir, synthetic_data_dir, tmp_path,
                                            monkeypatch, compile_cache):
  config = run_config(small_model_dir, synthetic_data_dir)
  full = train.train_and_evaluate(config, tmp_path / "full")
  assert full["general_distill"]["step"] == 4 and full["distill"]["step"] in (2, 4)

  signals = Signals(monkeypatch)
  stops = []
  for stage, hook, nth in STOPS:
    signals.arm(stage, hook, nth)
    results = train.train_and_evaluate(config, tmp_path / "run")
    assert signals.fired, (stage, hook, nth)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    stopped = [s for s, r in results.items() if not r]
    stops.append((stage, hook, nth, stopped, signals.steps_after))
    # Stopped within one step: the run returns, the stage (or the next) is unfinished.
    assert len(stopped) == 1 and list(results)[-1] == stopped[0], stops[-1]
    assert signals.steps_after <= 1, stops[-1]
  signals.arm(None, None)
  resumed = train.train_and_evaluate(config, tmp_path / "run")
  for stage in config.stages:
    for key in ("overall", "per_language", "per_source", "step"):
      assert resumed[stage].get(key) == full[stage].get(key), (stage, key)
  a = checkpoints.restore_stage_params(tmp_path / "full" / "student")
  b = checkpoints.restore_stage_params(tmp_path / "run" / "student")
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert (tmp_path / "run" / "results.md").read_text() == (
      tmp_path / "full" / "results.md").read_text().replace(str(tmp_path / "full"),
                                                            str(tmp_path / "run"))
  assert not (tmp_path / "run" / checkpoints.LOCK_FILE).exists()

  # The general_distill student exports as a masked LM that transformers loads.
  import torch
  import transformers

  from kd_jax import export, hf_io
  out = export.main(["--workdir", str(tmp_path / "full"), "--stage", "general",
                     "--out", str(tmp_path / "exported")])
  hf = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
  assert type(hf).__name__.endswith("ForMaskedLM")
  cfg, _ = checkpoints.load_model_config(tmp_path / "full" / "general")
  params = checkpoints.restore_stage_params(tmp_path / "full" / "general")
  tokenizer = hf_io.load_tokenizer(out)
  enc = tokenizer(["a small test sentence", "another one here ok"], padding=True,
                  return_tensors="np")
  from kd_jax.models.encoder import Encoder
  ours = Encoder(cfg).apply({"params": params}, enc["input_ids"], enc["attention_mask"]).logits
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(enc["input_ids"]),
                attention_mask=torch.tensor(enc["attention_mask"])).logits.numpy()
  mask = enc["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[mask], theirs[mask], atol=2e-4, rtol=1e-4)


def test_unpad_reaches_the_general_distill_step(small_model_dir, synthetic_data_dir,
                                                tmp_path, monkeypatch):
  config = run_config(small_model_dir, synthetic_data_dir, stages_=("general_distill",))
  config.unpad = True
  config.general.train.num_train_steps = 2
  seen = []
  make_step = train.make_train_step

  def spy(*a, **k):
    step_fn = make_step(*a, **k)

    def step(state, teacher_params, batch, rng):
      seen.append((batch["token_index"].shape, batch["input_ids"].shape,
                   "masked_positions" in batch))
      return step_fn(state, teacher_params, batch, rng)
    return step
  monkeypatch.setattr(train, "make_train_step", spy)
  result = train.train_and_evaluate(config, tmp_path)["general_distill"]
  assert result["step"] == 2 and len(seen) == 2
  for (groups, budget), (rows, length), masked in seen:
    assert groups == 1 and budget < rows * length and masked


def _teacher_only(model_dir, data_dir):
  config = run_config(model_dir, data_dir, stages_=("finetune_teacher",))
  config.teacher.train.num_train_steps = 6
  return config


def test_a_held_workdir_is_refused_and_a_stale_lock_taken_over(
    small_model_dir, synthetic_data_dir, tmp_path, caplog, monkeypatch):
  workdir = tmp_path / "run"
  workdir.mkdir()
  lock = workdir / checkpoints.LOCK_FILE
  # A live holder (this process): kd_jax.main refuses before doing anything.
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
  proc = subprocess.run(
      [sys.executable, "-m", "kd_jax.main", "--config", "configs/default.py",
       "--workdir", str(workdir)], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f"pid {os.getpid()}" in proc.stderr and "held by a live run" in proc.stderr
  assert sorted(p.name for p in workdir.iterdir()) == [checkpoints.LOCK_FILE]

  # A run in progress holds it; a second one is refused and the first finishes unharmed.
  lock.unlink()
  config = _teacher_only(small_model_dir, synthetic_data_dir)
  seen = []
  build = stages.build

  def second_run_during_build(*a, **k):
    with pytest.raises(checkpoints.WorkdirLockedError, match="held by a live run"):
      train.train_and_evaluate(config, workdir)
    seen.append(json.loads(lock.read_text()))
    return build(*a, **k)
  monkeypatch.setattr(stages, "build", second_run_during_build)
  first = train.train_and_evaluate(config, workdir)["finetune_teacher"]
  monkeypatch.setattr(stages, "build", build)
  assert seen == [dict(seen[0], host=socket.gethostname(), pid=os.getpid())]
  assert first["step"] in (2, 4, 6) and (workdir / "teacher" / "test.json").exists()
  assert not lock.exists()

  # A lock left by a dead process is taken over, with a warning.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
  with caplog.at_level(logging.WARNING):
    again = train.train_and_evaluate(config, workdir)["finetune_teacher"]
  assert again["overall"] == first["overall"]  # finished: read back, not retrained
  assert f"stale lock of pid {dead.pid}" in caplog.text
  assert not lock.exists()
  # This process's own pid in a lock it does not hold (a pid reused after a restart).
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
  with caplog.at_level(logging.WARNING):
    assert train.train_and_evaluate(config, workdir)["finetune_teacher"] == again
  assert f"stale lock of pid {os.getpid()}" in caplog.text and not lock.exists()


def test_damaged_latest_checkpoint_falls_back_to_the_one_before(
    small_model_dir, synthetic_data_dir, tmp_path, caplog, compile_cache):
  config = _teacher_only(small_model_dir, synthetic_data_dir)
  full = train.train_and_evaluate(config, tmp_path / "full")["finetune_teacher"]
  config.teacher.train.stop_after_steps = 5  # killed after step 5: latest holds 2 and 4
  assert train.train_and_evaluate(config, tmp_path / "run")["finetune_teacher"] == {}
  latest = tmp_path / "run" / "teacher" / "checkpoints" / "latest"
  assert sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit()) == [2, 4]
  truncated = 0
  for path in (latest / "4").rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
      truncated += 1
  assert truncated > 0
  config.teacher.train.stop_after_steps = -1
  with caplog.at_level(logging.WARNING):
    resumed = train.train_and_evaluate(config, tmp_path / "run")["finetune_teacher"]
  assert "skipped and deleted damaged step(s) [4]" in caplog.text
  assert f"{latest}/4 does not restore" in caplog.text
  for key in ("overall", "per_language", "step"):
    assert resumed[key] == full[key], key

  # Every step damaged: a clear error, never a silent restart from step 0.
  for step in (4, 6):
    for path in (latest / str(step)).rglob("*"):
      if path.is_file():
        path.write_bytes(b"")
  (tmp_path / "run" / "teacher" / "test.json").unlink()
  with pytest.raises(checkpoints.CheckpointError, match="no saved step restores"):
    train.train_and_evaluate(config, tmp_path / "run")


@pytest.fixture(scope="module")
def teacher_dir(small_model_dir, synthetic_data_dir, tmp_path_factory):
  """A finished 4-step teacher stage of `run_config` (shared by the tests below)."""
  workdir = tmp_path_factory.mktemp("teacher")
  train.train_and_evaluate(run_config(small_model_dir, synthetic_data_dir,
                                      ("finetune_teacher",)), workdir)
  return workdir / "teacher"


def test_diagnose_terms_add_up_and_zero_steps_evaluate_the_copy(small_model_dir,
                                                                synthetic_data_dir, tmp_path,
                                                                teacher_dir):
  """kd_jax.diagnose: the per-term gradients of one batch add up to the gradient of the
  whole objective (recomputed here with jax.grad of losses.distillation_loss), and the
  clf share is the norm of the cross-entropy's gradient alone. A student with
  num_train_steps=0 is tested exactly as initialised (the paper's Table 5)."""
  import jax.numpy as jnp
  from kd_jax import diagnose, losses, sharding
  config = run_config(small_model_dir, synthetic_data_dir, ("distill",))
  config.student.init = "from_teacher"
  config.student.train.num_train_steps = 0
  config.teacher.checkpoint = str(teacher_dir)
  workdir = epath.Path(tmp_path)
  results = train.train_and_evaluate(config, workdir)
  assert results["distill"]["step"] == 0
  mesh = sharding.create_mesh_from_config(config.mesh)
  config.compact_embeddings = False  # the plan's params: the full model, as initialised
  plan = stages.build("distill", paths.resolve_config(config, workdir)[0], workdir, mesh)
  scalars, _ = plan.final_evaluator(plan.params, 0)
  assert results["distill"]["per_language"] == plan.final_evaluator.metrics["per_language"]

  stats = diagnose.term_gradients(plan, 1)
  assert set(stats) == set(plan.objective.weights) == {"att", "hid", "embd", "pred", "clf"}
  batch = jax.tree.map(jnp.asarray, next(plan.batches(0)))
  teacher = plan.teachers[0]
  needed = losses.outputs_needed(plan.objective.weights, plan.objective.layer_map, 1,
                                 teacher.model.config.num_layers)
  run = lambda m, p, **kw: m.apply({"params": p}, batch["input_ids"], batch["attention_mask"],
                                   deterministic=True, **kw)
  t_out = run(teacher.model, teacher.params, **needed[1])

  def grad_norm(weights):
    g = jax.grad(lambda p: losses.distillation_loss(
        run(plan.student, p, **needed[0]), t_out, batch, weights=weights,
        layer_map=plan.objective.layer_map)[0])(plan.params)
    return float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g))))
  total = grad_norm(plan.objective.weights)
  assert stats["att"]["total_grad_norm"] == pytest.approx(total, rel=1e-4)
  assert stats["clf"]["grad_norm"] == pytest.approx(grad_norm({"clf": 1.0}), rel=1e-4)
  assert sum(s["grad_norm"] for s in stats.values()) >= total * (1 - 1e-5)  # triangle
  report = diagnose.format_report(stats, 1.0)
  assert f"|g| (all terms) = {total:.3f}" in report


def test_compact_embeddings_train_as_the_full_table(small_model_dir, synthetic_data_dir,
                                                   tmp_path):
  """config.compact_embeddings: teacher and student update only the embedding rows their
  training data uses, and end where dense AdamW over the whole table ends (optax itself,
  compact_embeddings=False): the same kept parameters within float32 rounding, rows
  never used included (they only decay: weight decay 5 makes that visible), and the
  same test scores."""
  from kd_jax import sharding
  runs, plans = {}, {}
  for compact in (False, True):
    config = run_config(small_model_dir, synthetic_data_dir, ("finetune_teacher", "distill"))
    config.compact_embeddings = compact
    for name in ("teacher", "student"):
      config[name].train.weight_decay = 5.0
    workdir = tmp_path / str(compact)
    runs[compact] = train.train_and_evaluate(config, workdir)
    mesh = sharding.create_mesh_from_config(config.mesh)
    plans[compact] = stages.build("finetune_teacher", paths.resolve_config(config, workdir)[0],
                                  workdir, mesh)
  for stage in ("finetune_teacher", "distill"):
    assert runs[True][stage]["per_language"] == runs[False][stage]["per_language"]
    assert runs[True][stage]["step"] == runs[False][stage]["step"]
  rows = plans[True].embedding.rows
  vocab_size = plans[False].model_config.vocab_size
  assert len(rows) < vocab_size and plans[False].embedding is None
  emb = lambda p: np.asarray(p["embeddings"]["word_embeddings"]["embedding"])
  assert emb(plans[True].params).shape[0] == len(rows)
  unused = np.setdiff1d(np.arange(vocab_size), rows)
  initial = emb(plans[False].params)
  for stage in ("teacher", "student"):
    cfg, _ = checkpoints.load_model_config(tmp_path / "False" / stage)
    dense = checkpoints.restore_stage_params(tmp_path / "False" / stage, cfg)
    compact = checkpoints.restore_stage_params(tmp_path / "True" / stage, cfg)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(dense),
                            jax.tree.leaves(compact)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6,
                                 err_msg=jax.tree_util.keystr(path))
    if stage == "teacher":  # unused rows decayed (the kept step >= 2 updates at lr 1e-3)
      ratio = emb(compact)[unused] / initial[unused]
      assert np.all(ratio < 1 - 1e-3) and np.ptp(ratio) < 1e-5


def test_reduced_vocabulary_student_distills_from_the_full_teacher(small_model_dir,
                                                                   synthetic_data_dir, tmp_path,
                                                                   teacher_dir):
  """A student with the reduced vocabulary of the task's texts (kd_jax.vocab,
  min-frequency 1) distilled from the full-vocabulary teacher: the teacher reads its
  ids, the student the mapped ones of the same tokens, so it trains exactly as the
  full-vocabulary student (same metrics; its embedding rows are the full student's kept
  rows, every other parameter equal) and exports with the reduced tokenizer. A
  vocabulary that lacks a task token is refused before training, naming the example."""
  from kd_jax import export, vocab
  from kd_jax.data import tasks
  from kd_jax.data.schema import DataError
  teacher = run_config(small_model_dir, synthetic_data_dir, ("finetune_teacher",))
  task = tasks.load_task(teacher.data, teacher.seed, log=None)
  texts = [e.text for split in task.splits.values() for e in split]
  vocab.reduce_model_dir(small_model_dir, tmp_path / "reduced", texts)
  kept, _ = vocab.read_mapping(tmp_path / "reduced")
  runs = {}
  for name, vocab_dir in (("full", ""), ("reduced", str(tmp_path / "reduced"))):
    config = run_config(small_model_dir, synthetic_data_dir, ("distill",))
    config.student.init = "from_teacher"
    config.teacher.checkpoint = str(teacher_dir)
    config.student.vocab = vocab_dir
    runs[name] = train.train_and_evaluate(config, tmp_path / name)["distill"]
  assert runs["reduced"]["per_language"] == runs["full"]["per_language"]
  cfg_full, _ = checkpoints.load_model_config(tmp_path / "full" / "student")
  cfg_red, info = checkpoints.load_model_config(tmp_path / "reduced" / "student")
  assert cfg_red.vocab_size == len(kept) < cfg_full.vocab_size
  assert info["tokenizer"] == str(tmp_path / "reduced")
  full = checkpoints.restore_stage_params(tmp_path / "full" / "student", cfg_full)
  red = checkpoints.restore_stage_params(tmp_path / "reduced" / "student", cfg_red)
  emb = lambda p: np.asarray(p["embeddings"]["word_embeddings"]["embedding"])
  np.testing.assert_allclose(emb(red), emb(full)[kept], atol=1e-5)
  for path, leaf in jax.tree_util.tree_leaves_with_path(red):
    if "word_embeddings" not in jax.tree_util.keystr(path):
      other = full
      for key in path:
        other = other[key.key]
      np.testing.assert_allclose(np.asarray(leaf), np.asarray(other), atol=1e-5)
  out = export.export_stage(tmp_path / "reduced" / "student", tmp_path / "exported")
  import transformers
  assert len(transformers.AutoTokenizer.from_pretrained(str(out))) == len(kept)

  english_only = [e.text for split in task.splits.values() for e in split
                  if e.language == "english"]
  vocab.reduce_model_dir(small_model_dir, tmp_path / "english", english_only)
  config.student.vocab = str(tmp_path / "english")
  with pytest.raises(DataError, match=r"example \d+ \(arabic\) has token .* which the "
                                      "reduced vocabulary lacks"):
    train.train_and_evaluate(config, tmp_path / "refused")
  assert not (tmp_path / "refused" / "student" / "checkpoints").exists()
