"""The training loop: teacher fine-tuning and student distillation share it.

`train_and_evaluate(config, workdir)` runs the stages in `config.stages`:

* `finetune_teacher`: the pretrained `config.model` with a fresh head, cross-entropy.
* `distill`: a student initialised `from_scratch` / `from_base` / `from_teacher`
  (paper §2.2), trained with the TinyBERT objective plus cross-entropy (§2.1), or
  with cross-entropy alone when `config.distill.kd` is False (NON-KD).

Each stage writes to `<workdir>/<stage dir>`: Orbax checkpoints (`checkpoints/latest`
for resuming, `checkpoints/best` by val macro-F1; the teacher is never part of a
student checkpoint), TensorBoard events, `model_config.json`, and the results
(`val.json`/`.md` at the best step, `test.json`/`.md` with the best-val parameters).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import signal
import threading
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import metric_writers, periodic_actions
from flax import struct

from kd_jax import evaluation, hf_io, losses, sharding, student_init
from kd_jax.data import batching, tsm
from kd_jax.models.encoder import Encoder, EncoderConfig, init_params

STAGES = ("finetune_teacher", "distill")
STAGE_DIRS = {"finetune_teacher": "teacher", "distill": "student"}
INIT_STRATEGIES = ("from_scratch", "from_base", "from_teacher")
DATASETS = {"tsm": (tsm.load_tsm, tsm.TSM_LABELS, tsm.TSM_LANGUAGES)}


@struct.dataclass
class TrainState:
  """What the optimizer owns. `params` = {"model": student, "proj": projections}."""
  step: jax.Array
  params: Any
  opt_state: Any


class PreemptionGuard:
  """Turns SIGTERM (how TPU VMs, SLURM and Kubernetes preempt) into a flag the loop polls,
  so it can save a checkpoint and return instead of dying mid-step.

  Use as a context manager; outside the main thread (where signal handlers cannot be
  installed) it does nothing.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d received: saving a checkpoint and stopping", signum)
    self.requested = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


# ---------------------------------------------------------------------------
# config checks: everything that can be wrong is found before training starts
# ---------------------------------------------------------------------------
def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field for unknown values in `config`."""
  def check(field, value, valid):
    if value not in valid:
      raise ValueError(f"config.{field}={value!r} is not valid; choose from {list(valid)}")

  for stage in config.stages:
    check("stages", stage, STAGES)
  check("data.name", config.data.name, DATASETS)
  _, _, known_languages = DATASETS[config.data.name]
  for field in ("languages", "train_languages", "seen_languages"):
    for lang in config.data[field] or ():
      check(f"data.{field}", lang, known_languages)
  check("student.init", config.student.init, INIT_STRATEGIES)
  check("distill.prediction_loss", config.distill.prediction_loss, losses.PREDICTION_LOSSES)
  for term in config.distill.weights:
    check("distill.weights", term, losses.DISTILL_TERMS)
    if float(config.distill.weights[term]) < 0:
      raise ValueError(f"config.distill.weights.{term}={config.distill.weights[term]} is negative")
  check("student.layer_map_strategy", config.student.layer_map_strategy,
        student_init.INIT_LAYER_MAP_STRATEGIES)
  check("distill.layer_map_strategy", config.distill.layer_map_strategy,
        ("",) + student_init.LAYER_MAP_STRATEGIES)
  alpha = float(config.distill.alpha)
  if alpha > 1:
    raise ValueError(f"config.distill.alpha={alpha} must be in [0, 1] (or negative: off)")
  for name in ("teacher", "student"):
    tc = config[name].train
    if tc.batch_size < 1 or tc.eval_batch_size < 1:
      raise ValueError(f"config.{name}.train.batch_size and eval_batch_size must be >= 1")
    if tc.num_train_steps <= 0 and tc.num_epochs <= 0:
      raise ValueError(f"config.{name}.train: set num_train_steps or num_epochs > 0")
  batching.validate_buckets(config.data.buckets, config.data.max_length)
  if config.data.max_length > 512:
    raise ValueError(f"config.data.max_length={config.data.max_length} exceeds 512 positions")


# ---------------------------------------------------------------------------
# optimisation
# ---------------------------------------------------------------------------
def _decay_mask(params):
  """Weight decay on matrices and embeddings, not on biases and LayerNorm (HF default)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in (
          "kernel", "embedding", *losses.PROJECTION_KEYS),
      params)


def make_optimizer(tc: ml_collections.ConfigDict, num_train_steps: int):
  """AdamW with linear warmup then linear decay to 0, after global-norm clipping.

  Returns (optax.GradientTransformation, learning-rate schedule).
  """
  warmup = int(round(tc.warmup_ratio * num_train_steps))
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, tc.learning_rate, max(warmup, 1)),
       optax.linear_schedule(tc.learning_rate, 0.0, max(num_train_steps - warmup, 1))],
      [warmup])
  tx = optax.chain(
      optax.clip_by_global_norm(tc.max_grad_norm),
      optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=tc.weight_decay,
                  mask=_decay_mask))
  return tx, schedule


# ---------------------------------------------------------------------------
# the compiled steps
# ---------------------------------------------------------------------------
def _outputs_needed(weights: Mapping[str, float]) -> dict[str, bool]:
  """Encoder intermediates the weighted loss terms read (cos uses last_hidden_state,
  which is always returned)."""
  needs = lambda *terms: any(weights.get(t, 0) > 0 for t in terms)
  return dict(output_embeddings=needs("embd"),
              output_hidden_states=needs("hid", "pkd"),
              output_attention_scores=needs("att", "att_kl", "minilm"),
              output_values=needs("minilm"))


def make_train_step(student: Encoder, teacher: Encoder | None, tx, *, weights: Mapping[str, float],
                    layer_map: tuple[int | None, ...], prediction_loss: str, temperature: float,
                    mesh, alpha: float = -1.0) -> Any:
  """Builds the jitted `train_step(state, teacher_params, batch, rng) -> (state, metrics)`.

  Teacher forward (frozen, deterministic, no gradient), student forward with
  dropout keyed by fold_in(rng, step), `value_and_grad` over the student's
  parameters (and projections) only, optax update. The state is donated; the batch
  is sharded on the mesh's data axis, everything else replicated.
  metrics: {"loss", one entry per computed term, "grad_norm"} float32 scalars.
  `layer_map` is the loss map (None entries: unmapped student layers); `alpha` >= 0
  switches to alpha * clf + (1 - alpha) * KD terms (losses.apply_alpha).
  """
  weights = dict(weights)
  kd = teacher is not None
  outputs = _outputs_needed(weights)

  def train_step(state: TrainState, teacher_params, batch, rng):
    model_inputs = (batch["input_ids"], batch["attention_mask"])
    teacher_out = None
    if kd:
      teacher_out = teacher.apply({"params": teacher_params}, *model_inputs,
                                  deterministic=True, **outputs)
      teacher_out = jax.lax.stop_gradient(teacher_out)
    dropout_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
      student_out = student.apply({"params": params["model"]}, *model_inputs,
                                  deterministic=False, rngs={"dropout": dropout_rng}, **outputs)
      return losses.distillation_loss(student_out, teacher_out, batch, weights=weights,
                                      layer_map=layer_map, prediction_loss=prediction_loss,
                                      temperature=temperature, projections=params["proj"],
                                      alpha=alpha)

    (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    terms["grad_norm"] = optax.tree.norm(grads)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), terms

  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(repl, repl, data, repl),
                 out_shardings=(repl, repl), donate_argnums=(0,))


def make_predict_step(model: Encoder, mesh):
  """Jitted `predict(params, batch) -> [B] int32 argmax of the logits` (replicated out)."""
  def predict(params, batch):
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"]).logits
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.jit(predict, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def _local_rows(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's rows of a global host batch (all of it with one process)."""
  n, i = jax.process_count(), jax.process_index()
  return {k: v[i * len(v) // n:(i + 1) * len(v) // n] for k, v in batch.items()}


def evaluate(predict, params, data: batching.TokenizedData, *, batch_size: int, buckets,
             pad_id: int, mesh, num_classes: int, seen_languages=None) -> dict:
  """Macro-F1 and accuracy, overall and per language (see evaluation.classification_metrics)."""
  predictions = np.full(len(data), -1, np.int32)
  for batch in batching.batches(data, batch_size, buckets, pad_id, shuffle=False,
                                drop_remainder=False):
    index = batch.pop("example_index")
    pred = np.asarray(predict(params, sharding.shard_batch(_local_rows(batch), mesh)))
    predictions[index[index >= 0]] = pred[index >= 0]
  return evaluation.classification_metrics(
      data.labels, predictions, data.language_ids, list(data.language_order), num_classes,
      seen_languages=list(seen_languages) if seen_languages else None)


# ---------------------------------------------------------------------------
# models and data for a stage
# ---------------------------------------------------------------------------
def student_config(teacher: EncoderConfig, sc: ml_collections.ConfigDict) -> EncoderConfig:
  """Student EncoderConfig: `num_layers` layers; when `hidden_size` is narrower, heads and
  intermediate size shrink in proportion (head size kept; paper §2.2, Xu et al. 2024)."""
  hidden = sc.hidden_size or teacher.hidden_size
  if hidden > teacher.hidden_size and sc.init != "from_scratch":
    raise ValueError(f"config.student.hidden_size={hidden} is wider than the teacher's "
                     f"{teacher.hidden_size}; weight copying needs hidden_size <= teacher's")
  ratio = hidden / teacher.hidden_size
  heads = max(1, round(teacher.num_heads * ratio))
  if hidden % heads:
    raise ValueError(f"config.student.hidden_size={hidden} is not divisible by {heads} heads")
  return teacher.replace(num_layers=sc.num_layers, hidden_size=hidden, num_heads=heads,
                         intermediate_size=int(round(teacher.intermediate_size * ratio)))


def _is_primary() -> bool:
  """Only process 0 writes result files; Orbax coordinates checkpoints across processes."""
  return jax.process_index() == 0


def _write_json_atomic(path: pathlib.Path, obj) -> None:
  if not _is_primary():
    return
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, default=str))
  os.replace(tmp, path)


def _save_model_config(stage_dir: pathlib.Path, cfg: EncoderConfig, extra: Mapping) -> None:
  fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "dtype"}
  _write_json_atomic(stage_dir / "model_config.json", {"encoder": fields, **extra})


def _load_model_config(stage_dir: pathlib.Path) -> tuple[EncoderConfig, dict]:
  path = stage_dir / "model_config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: is {stage_dir} the directory of a "
                            "finished finetune_teacher stage? (set config.teacher.checkpoint)")
  info = json.loads(path.read_text())
  return EncoderConfig(**info.pop("encoder")), info


def _best_params_manager(stage_dir: pathlib.Path, create: bool) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      stage_dir / "checkpoints" / "best",
      options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["val_macro_f1"],
                                           best_mode="max", create=create))


def restore_best_params(stage_dir: pathlib.Path, cfg: EncoderConfig) -> dict:
  """The best-val parameters saved by a stage (e.g. the fine-tuned teacher).

  Raises FileNotFoundError naming the directory when there is no such checkpoint."""
  ckpt_dir = stage_dir / "checkpoints" / "best"
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f"{ckpt_dir}: no best checkpoint (did the stage finish an eval?)")
  mngr = _best_params_manager(stage_dir, create=False)
  step = mngr.best_step()
  if step is None:
    raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint")
  target = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(target))
  except (ValueError, KeyError) as e:
    raise ValueError(f"{ckpt_dir}/{step}: checkpoint does not match the model config "
                     f"{stage_dir / 'model_config.json'}: {e}") from e


@dataclasses.dataclass
class StageData:
  train: batching.TokenizedData
  val: batching.TokenizedData
  test: batching.TokenizedData
  labels: tuple[str, ...]
  pad_id: int


def load_stage_data(config: ml_collections.ConfigDict, tokenizer) -> StageData:
  """Reads and tokenises train/val/test; every data error is raised here, before training."""
  dc = config.data
  load, labels, _ = DATASETS[dc.name]
  data_dir = dc.data_dir or None
  languages = tuple(dc.languages)
  train_languages = tuple(dc.train_languages or languages)

  def read(split, langs, fraction):
    examples = load(split, langs, data_dir=data_dir, fraction=fraction, seed=config.seed)
    return batching.tokenize_examples(examples, tokenizer, dc.max_length, languages)

  data = StageData(read("train", train_languages, dc.train_fraction),
                   read("val", languages, dc.eval_fraction),
                   read("test", languages, dc.eval_fraction), labels, tokenizer.pad_token_id)
  for split in ("train", "val", "test"):
    d = getattr(data, split)
    logging.info("data %s: %d examples, %d truncated at %d tokens (%.2f%%)", split, len(d),
                 d.num_truncated, dc.max_length, 100 * d.truncated_fraction)
  return data


# ---------------------------------------------------------------------------
# one stage
# ---------------------------------------------------------------------------
def run_stage(stage: str, config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh,
              preemption: PreemptionGuard | None = None) -> dict:
  """Trains one stage to the end (or resumes it) and returns its test metrics, or {} when
  it stopped early (SIGTERM through `preemption`, or train.stop_after_steps)."""
  preemption = preemption or PreemptionGuard()
  stage_dir = workdir / STAGE_DIRS[stage]
  is_teacher = stage == "finetune_teacher"
  tc = config.teacher.train if is_teacher else config.student.train
  batching.check_batch_size(tc.batch_size, mesh.shape[sharding.DATA_AXIS])
  batching.check_batch_size(tc.eval_batch_size, mesh.shape[sharding.DATA_AXIS])
  rng = jax.random.PRNGKey(config.seed)
  init_rng, head_rng, proj_rng, dropout_rng = jax.random.split(rng, 4)

  # Everything that can fail on bad input happens before the first step.
  model_dir = hf_io.resolve_model_dir(config.model)
  tokenizer = hf_io.load_tokenizer(model_dir)
  data = load_stage_data(config, tokenizer)
  num_classes = len(data.labels)
  overrides = {"hidden_dropout": config.hidden_dropout, "attention_dropout": config.attention_dropout,
               "classifier_dropout": config.hidden_dropout}

  teacher_model = teacher_params = None
  weights = {"clf": 1.0}
  layer_map: tuple[int, ...] = ()
  loss_layer_map: tuple[int | None, ...] = ()
  alpha = -1.0
  if is_teacher:
    model_cfg, params, _ = hf_io.load_pretrained(config.model, num_labels=num_classes,
                                                 init_rng=head_rng, config_overrides=overrides)
    provenance = None
  else:
    teacher_dir = pathlib.Path(config.teacher.checkpoint or workdir / STAGE_DIRS["finetune_teacher"])
    teacher_cfg, _ = _load_model_config(teacher_dir)
    if teacher_cfg.num_labels != num_classes:
      raise ValueError(f"{teacher_dir / 'model_config.json'}: teacher has num_labels="
                       f"{teacher_cfg.num_labels} but {config.data.name} has {num_classes} classes")
    teacher_params = restore_best_params(teacher_dir, teacher_cfg)
    model_cfg = student_config(teacher_cfg, config.student)
    layer_map, loss_layer_map = student_init.resolve_layer_maps(
        teacher_cfg.num_layers, model_cfg.num_layers,
        student_strategy=config.student.layer_map_strategy,
        student_layer_map=tuple(config.student.layer_map) or None,
        distill_strategy=config.distill.layer_map_strategy,
        distill_layer_map=tuple(config.distill.layer_map) or None)
    random_params = init_params(model_cfg, init_rng)
    base_params = None
    if config.student.init == "from_base":
      _, base_params, _ = hf_io.load_pretrained(config.model, num_labels=num_classes,
                                                init_rng=head_rng)
    params, provenance = student_init.init_student(
        config.student.init, random_params, teacher_params=teacher_params,
        base_params=base_params, layer_map=layer_map)
    if provenance:
      logging.info("student init %s:\n%s", config.student.init,
                   student_init.describe_provenance(provenance))
    if config.distill.kd:
      weights = {k: float(v) for k, v in config.distill.weights.items() if float(v) > 0}
      alpha = float(config.distill.alpha)
      logging.info("distill: weights %s, alpha %s, loss layer map %s", weights, alpha,
                   list(loss_layer_map))
      teacher_model = Encoder(teacher_cfg)
      teacher_params = sharding.replicate(teacher_params, mesh)
    else:
      teacher_params = None

  spe = batching.steps_per_epoch(data.train, tc.batch_size, config.data.buckets)
  if spe == 0:
    raise ValueError(f"config.{'teacher' if is_teacher else 'student'}.train.batch_size="
                     f"{tc.batch_size} is larger than every length bucket of the training data")
  num_steps = tc.num_train_steps if tc.num_train_steps > 0 else math.ceil(tc.num_epochs * spe)

  stage_dir.mkdir(parents=True, exist_ok=True)
  _save_model_config(stage_dir, model_cfg, {"stage": stage, "base_model": config.model,
                                             "layer_map": list(layer_map),
                                             "loss_layer_map": list(loss_layer_map),
                                             "init": None if is_teacher else config.student.init,
                                             "data": config.data.name,
                                             "labels": list(data.labels)})

  student = Encoder(model_cfg.replace(**overrides))
  proj = {}
  if teacher_model is not None and model_cfg.hidden_size != teacher_model.config.hidden_size:
    shape = (model_cfg.hidden_size, teacher_model.config.hidden_size)
    keys = jax.random.split(proj_rng, len(losses.PROJECTION_KEYS))
    proj = {name: 0.02 * jax.random.normal(k, shape)
            for name, k in zip(losses.PROJECTION_KEYS, keys) if weights.get(name, 0) > 0}
  trainable = {"model": jax.tree.map(jnp.asarray, params), "proj": proj}
  tx, schedule = make_optimizer(tc, num_steps)
  state = sharding.replicate(TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                                        opt_state=tx.init(trainable)), mesh)

  latest = ocp.CheckpointManager(stage_dir / "checkpoints" / "latest",
                                 options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
  best = _best_params_manager(stage_dir, create=True)
  best_val, best_metrics = -1.0, None
  if latest.latest_step() is not None:
    state = latest.restore(latest.latest_step(), args=ocp.args.StandardRestore(state))
    logging.info("resumed %s from step %d", stage_dir, int(state.step))
  if best.best_step() is not None and (stage_dir / "val.json").exists():
    best_metrics = _read_json(stage_dir / "val.json")  # written after the best save finished
    best_val = best_metrics["overall"]["macro_f1"]

  train_step = make_train_step(student, teacher_model, tx, weights=weights,
                               layer_map=loss_layer_map,
                               prediction_loss=config.distill.prediction_loss,
                               temperature=config.distill.temperature, mesh=mesh, alpha=alpha)
  predict = make_predict_step(Encoder(model_cfg), mesh)
  eval_kwargs = dict(batch_size=tc.eval_batch_size, buckets=config.data.buckets,
                     pad_id=data.pad_id, mesh=mesh, num_classes=num_classes,
                     seen_languages=tuple(config.data.seen_languages) or None)

  writer = metric_writers.create_default_writer(stage_dir, just_logging=jax.process_index() > 0)
  if int(state.step) == 0:
    writer.write_hparams({"stage": stage, "num_train_steps": num_steps, "steps_per_epoch": spe,
                          "train_examples": len(data.train),
                          "train_truncated_fraction": data.train.truncated_fraction})
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
  language_names = list(data.val.language_order)
  step = int(state.step)
  logging.info("%s: %d steps (%d per epoch), start at %d", stage, num_steps, spe, step)

  def do_eval(step):
    nonlocal best_val, best_metrics
    metrics = evaluate(predict, state.params["model"], data.val, **eval_kwargs)
    scalars = {"val/macro_f1": metrics["overall"]["macro_f1"],
               "val/avg_macro_f1": metrics["avg_macro_f1"],
               "val/accuracy": metrics["overall"]["accuracy"]}
    scalars.update({f"val/macro_f1/{lang}": m["macro_f1"]
                    for lang, m in metrics["per_language"].items()})
    writer.write_scalars(step, scalars)
    score = metrics["overall"]["macro_f1"]
    logging.info("step %d val macro-F1 %.2f (best %.2f)", step, score, best_val)
    if score > best_val:
      best_val, best_metrics = score, dict(metrics, step=step)
      best.save(step, args=ocp.args.StandardSave(state.params["model"]),
                metrics={"val_macro_f1": score})
      best.wait_until_finished()  # val.json must never point at an unfinished checkpoint
      if _is_primary():
        evaluation.write_results(stage_dir, "val", best_metrics, language_names)

  epoch_iter = None
  stop_after = tc.stop_after_steps
  while step < num_steps:
    epoch, offset = divmod(step, spe)
    if epoch_iter is None:  # the order is a pure function of (seed, epoch): exact resume
      epoch_iter = batching.batches(data.train, tc.batch_size, config.data.buckets, data.pad_id,
                                    shuffle=True, drop_remainder=True, seed=config.seed, epoch=epoch)
      for _ in range(offset):
        next(epoch_iter)
    batch = next(epoch_iter)
    batch.pop("example_index")
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      state, metrics = train_step(state, teacher_params, sharding.shard_batch(_local_rows(batch), mesh),
                                  dropout_rng)
    step += 1
    if step % spe == 0:
      epoch_iter = None
    report(step)
    if step % tc.log_every_steps == 0 or step == num_steps:
      scalars = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
      scalars["train/learning_rate"] = float(schedule(step - 1))
      if not all(math.isfinite(v) for v in scalars.values()):
        raise FloatingPointError(f"step {step}: non-finite training metrics {scalars}")
      writer.write_scalars(step, scalars)
    if step % tc.eval_every_steps == 0 or step == num_steps:
      do_eval(step)
    if step % tc.checkpoint_every_steps == 0 or step == num_steps or preemption.requested:
      latest.save(step, args=ocp.args.StandardSave(state))
    # stop_after_steps simulates a hard kill (no extra save), for resume tests.
    if preemption.requested or 0 < stop_after <= step < num_steps:
      latest.wait_until_finished()
      logging.info("stopped after step %d; run the same command again to resume", step)
      writer.flush()
      return {}
  latest.wait_until_finished()

  if best_metrics is None:
    do_eval(step)
  params_best = best.restore(best.best_step(), args=ocp.args.StandardRestore(state.params["model"]))
  test_metrics = evaluate(predict, params_best, data.test, **eval_kwargs)
  test_metrics.update(step=best.best_step(), stage=stage,
                      train_truncated_fraction=data.train.truncated_fraction)
  if _is_primary():
    evaluation.write_results(stage_dir, "test", test_metrics, language_names)
  writer.write_scalars(step, {"test/macro_f1": test_metrics["overall"]["macro_f1"],
                              "test/avg_macro_f1": test_metrics["avg_macro_f1"]})
  writer.flush()
  return test_metrics


def _read_json(path: pathlib.Path) -> dict:
  return json.loads(path.read_text())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
  """Runs `config.stages` in order under `workdir`; returns {stage: test metrics}.

  A stage whose `test.json` exists is finished and not rerun, so the same command
  resumes a multi-stage job. Prints and writes `<workdir>/results.md`.
  """
  validate_config(config)
  workdir = pathlib.Path(workdir)
  mesh = sharding.create_mesh(config.mesh.data)
  results = {}
  for stage in config.stages:
    stage_dir = workdir / STAGE_DIRS[stage]
    if (stage_dir / "test.json").exists():
      logging.info("%s already finished (%s); skipping", stage, stage_dir / "test.json")
      results[stage] = _read_json(stage_dir / "test.json")
      continue
    with PreemptionGuard() as preemption:
      results[stage] = run_stage(stage, config, workdir, mesh, preemption)
    if not results[stage]:
      return results  # stopped early: preempted, or train.stop_after_steps
  languages = list(config.data.languages)
  names = {"finetune_teacher": "teacher",
           "distill": f"student {config.student.init} {'KD' if config.distill.kd else 'NON-KD'}"}
  table = evaluation.format_markdown_table({names[s]: r for s, r in results.items()}, languages)
  if _is_primary():
    (workdir / "results.md").write_text(table + "\n")
  print(f"\nTest macro-F1 (%), {workdir}:\n{table}")
  return results
