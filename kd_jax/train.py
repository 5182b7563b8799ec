"""The training loop: teacher fine-tuning and student distillation share it.

`train_and_evaluate(config, workdir)` runs the stages in `config.stages`:

* `finetune_teacher`: the pretrained `config.model` with a fresh head, cross-entropy.
* `general_distill` (`run_general_stage`, `<workdir>/general`): task-agnostic
  distillation on unlabeled text with dynamic masking: a student with an MLM head
  learns from the pretrained model (config.general: TinyBERT terms, MLM
  cross-entropy, MLM logit KL / MSE, cosine); held-out MLM loss / accuracy instead
  of macro-F1; `checkpoints/final` holds the student.
* `distill`: a student initialised `from_scratch` / `from_base` / `from_teacher`
  (paper §2.2) or `from_general` (the general_distill student with a fresh
  classification head), trained with the TinyBERT objective plus cross-entropy
  (§2.1), or with cross-entropy alone when `config.distill.kd` is False (NON-KD).
  Several teacher dirs in `config.teacher.checkpoint`: the target is the mean of
  their logits.

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
import signal
import threading
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import metric_writers, periodic_actions
from etils import epath
from flax import struct

from kd_jax import evaluation, hf_io, losses, masking, paths, sharding, student_init
from kd_jax.config_base import ConfigError, MissingPathError
from kd_jax.data import batching, text, tsm
from kd_jax.models import unpad
from kd_jax.models.encoder import Encoder, EncoderConfig, init_params

STAGES = ("finetune_teacher", "general_distill", "distill")
STAGE_DIRS = {"finetune_teacher": "teacher", "general_distill": "general", "distill": "student"}
# A stage whose file exists is finished and skipped on a rerun.
FINISHED_FILES = {"finetune_teacher": "test.json", "general_distill": "heldout.json",
                  "distill": "test.json"}
INIT_STRATEGIES = ("from_scratch", "from_base", "from_teacher", "from_general")
# Terms of the general_distill stage: no labels, and the student's logits are MLM logits.
GENERAL_TERMS = tuple(t for t in losses.DISTILL_TERMS if t not in ("clf", "pred", "soft_ce"))
DATASETS = {"tsm": (tsm.load_tsm, tsm.TSM_LABELS, tsm.TSM_LANGUAGES)}
# config.precision -> compute dtype (EncoderConfig.dtype); parameters stay float32.
PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
NONFINITE_MODES = ("stop", "skip")


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
  """Raises config_base.ConfigError (a ValueError) naming the field for unknown or
  invalid values in `config`."""
  def check(field, value, valid):
    if value not in valid:
      raise ConfigError(f"config.{field}={value!r} is not valid; choose from {list(valid)}")

  for stage in config.stages:
    check("stages", stage, STAGES)
  check("data.name", config.data.name, DATASETS)
  _, _, known_languages = DATASETS[config.data.name]
  for field in ("languages", "train_languages", "seen_languages"):
    for lang in config.data[field] or ():
      check(f"data.{field}", lang, known_languages)
  check("student.init", config.student.init, INIT_STRATEGIES)
  check("distill.prediction_loss", config.distill.prediction_loss, losses.PREDICTION_LOSSES)
  check("precision", config.precision, PRECISIONS)
  check("nonfinite", config.nonfinite, NONFINITE_MODES)
  for field in ("remat", "scan_layers", "unpad"):
    check(field, config[field], (False, True))
  if not isinstance(config.unpad_multiple, int) or config.unpad_multiple < 0:
    raise ConfigError(f"config.unpad_multiple={config.unpad_multiple!r} must be an int >= 0 "
                      "(0: a sixteenth of a batch shard's positions)")
  for axis in sharding.MESH_AXES:
    size = config.mesh[axis]
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ConfigError(f"config.mesh.{axis}={size!r} must be an int >= 1 or -1 (the rest)")
  if sum(config.mesh[axis] == -1 for axis in sharding.MESH_AXES) > 1:
    raise ConfigError("config.mesh: only one of data, fsdp, tensor may be -1 (the rest), got "
                      + ", ".join(f"{a}={config.mesh[a]}" for a in sharding.MESH_AXES))
  for term in config.distill.weights:
    check("distill.weights", term, losses.DISTILL_TERMS)
    if float(config.distill.weights[term]) < 0:
      raise ConfigError(f"config.distill.weights.{term}={config.distill.weights[term]} "
                        "is negative")
  check("student.layer_map_strategy", config.student.layer_map_strategy,
        student_init.INIT_LAYER_MAP_STRATEGIES)
  check("distill.layer_map_strategy", config.distill.layer_map_strategy,
        ("",) + student_init.LAYER_MAP_STRATEGIES)
  alpha = float(config.distill.alpha)
  if alpha > 1:
    raise ConfigError(f"config.distill.alpha={alpha} must be in [0, 1] (or negative: off)")
  for name in ("teacher", "student", "general"):
    tc = config[name].train
    if tc.batch_size < 1 or tc.eval_batch_size < 1:
      raise ConfigError(f"config.{name}.train.batch_size and eval_batch_size must be >= 1")
    if tc.num_train_steps <= 0 and tc.num_epochs <= 0:
      raise ConfigError(f"config.{name}.train: set num_train_steps or num_epochs > 0")
  _check_buckets("data", config.data)
  if config.data.max_length > 512:
    raise ConfigError(f"config.data.max_length={config.data.max_length} exceeds 512 positions")
  for term in losses.MLM_TERMS:
    if float(config.distill.weights.get(term, 0.0)) > 0:
      raise ConfigError(f"config.distill.weights.{term}: MLM terms need masked text; they "
                        "belong in config.general.weights (stage general_distill)")
  teacher_dirs = _split_checkpoints(config.teacher.checkpoint)
  if len(teacher_dirs) > 1 and config.distill.kd and "distill" in config.stages:
    # The target of several teachers is the mean of their logits; their hidden states,
    # attention and values live in unrelated bases (and may differ in width, depth and
    # heads), so a mean of them is no representation to distill from.
    bad = [t for t in losses.INTERMEDIATE_TERMS if float(config.distill.weights.get(t, 0)) > 0]
    if bad:
      raise ConfigError(
          f"config.teacher.checkpoint names {len(teacher_dirs)} teachers, but "
          + ", ".join(f"config.distill.weights.{t}={config.distill.weights[t]}" for t in bad)
          + " > 0: with several teachers only the logit terms (pred, soft_ce, clf) are "
          "defined (target = mean of the teachers' logits); set those weights to 0")
  gc = config.general
  check("general.init", gc.init, student_init.STRATEGIES)
  for term in gc.weights:
    check("general.weights", term, GENERAL_TERMS)
    if float(gc.weights[term]) < 0:
      raise ConfigError(f"config.general.weights.{term}={gc.weights[term]} is negative")
  if "general_distill" in config.stages:
    if not any(float(v) > 0 for v in gc.weights.values()):
      raise ConfigError("config.general.weights: no term has a positive weight")
    if not 0 < float(gc.mask_rate) <= 1:
      raise ConfigError(f"config.general.mask_rate={gc.mask_rate} must be in (0, 1]")
    if gc.heldout_size < 1:
      raise ConfigError(f"config.general.heldout_size={gc.heldout_size} must be >= 1")
    _check_buckets("general", gc)
    if gc.max_length > 512:
      raise ConfigError(f"config.general.max_length={gc.max_length} exceeds 512 positions")
    for lang in gc.tsm_languages:
      check("general.tsm_languages", lang, tsm.TSM_LANGUAGES)
    if not (gc.text_files or gc.tsm_languages or gc.sib200_languages):
      raise ConfigError("config.general: no text; set text_files, tsm_languages or "
                        "sib200_languages")


def _check_buckets(section: str, fields: ml_collections.ConfigDict) -> None:
  try:
    batching.validate_buckets(fields.buckets, fields.max_length)
  except ValueError as e:
    raise ConfigError(f"config.{section}.buckets={tuple(fields.buckets)}, "
                      f"config.{section}.max_length={fields.max_length}: {e}") from e


def _split_checkpoints(value) -> tuple[str, ...]:
  """config.teacher.checkpoint as a tuple of paths: "" -> (), "a" -> ("a",),
  "a,b" (command line) or ("a", "b") (config file) -> ("a", "b")."""
  if isinstance(value, str):
    value = value.split(",")
  return tuple(str(v).strip() for v in value if str(v).strip())


def teacher_checkpoints(config: ml_collections.ConfigDict,
                        workdir: epath.Path) -> tuple[epath.Path, ...]:
  """The teacher stage dirs of `distill`: config.teacher.checkpoint, else <workdir>/teacher."""
  dirs = _split_checkpoints(config.teacher.checkpoint)
  if not dirs:
    return (workdir / STAGE_DIRS["finetune_teacher"],)
  return tuple(epath.Path(d) for d in dirs)


# ---------------------------------------------------------------------------
# optimisation
# ---------------------------------------------------------------------------
def _decay_mask(params):
  """Weight decay on matrices and embeddings, not on biases and LayerNorm (HF default)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in (
          "kernel", "embedding", *losses.PROJECTION_KEYS),
      params)


def make_optimizer(tc: ml_collections.ConfigDict, num_train_steps: int, nonfinite: str = "stop"):
  """AdamW with linear warmup then linear decay to 0, after global-norm clipping.

  `nonfinite="skip"` wraps it in `optax.apply_if_finite`: a step with non-finite
  gradients leaves the optimizer state (and, through zero updates, the parameters)
  unchanged and counts it in the state's `total_notfinite` (checkpointed, so the count
  survives a resume). The schedule's step count does not advance on skipped steps.
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
  if nonfinite == "skip":
    tx = optax.apply_if_finite(tx, max_consecutive_errors=2**30)  # never apply a bad step
  return tx, schedule


# ---------------------------------------------------------------------------
# the compiled steps
# ---------------------------------------------------------------------------
def _outputs_needed(weights: Mapping[str, float], layer_map: Sequence[int | None],
                    student_layers: int,
                    teacher_layers: int) -> tuple[dict[str, Any], dict[str, Any]]:
  """(student, teacher) Encoder keyword arguments: the intermediates the weighted loss
  terms read (cos uses last_hidden_state, which is always returned).

  Attention scores are asked for only at the layers a term reads: the pairs of the
  loss `layer_map` (1-based teacher layer per student layer) for att and att_kl, the
  last layer for minilm. The other layers then skip materialising [B, h, T, T] (the
  teacher's through `jax.nn.dot_product_attention`, see `Encoder`)."""
  needs = lambda *terms: any(weights.get(t, 0) > 0 for t in terms)
  student_att, teacher_att = set(), set()
  if needs("att", "att_kl"):
    for i, k in enumerate(layer_map):
      if k is not None:
        student_att.add(i)
        teacher_att.add(k - 1)
  if needs("minilm"):
    student_att.add(student_layers - 1)
    teacher_att.add(teacher_layers - 1)
  common = dict(output_embeddings=needs("embd"), output_hidden_states=needs("hid", "pkd"),
                output_values=needs("minilm"))
  return (dict(common, output_attention_scores=tuple(sorted(student_att))),
          dict(common, output_attention_scores=tuple(sorted(teacher_att))))


def make_train_step(student: Encoder, teacher: Encoder | None, tx, *, weights: Mapping[str, float],
                    layer_map: tuple[int | None, ...], prediction_loss: str, temperature: float,
                    mesh, alpha: float = -1.0, state_sharding: Any = None,
                    teacher_sharding: Any = None) -> Any:
  """Builds the jitted `train_step(state, teacher_params, batch, rng) -> (state, metrics)`.

  Teacher forward (frozen, deterministic, no gradient), student forward with
  dropout keyed by fold_in(rng, step), `value_and_grad` over the student's
  parameters (and projections) only, optax update. The state is donated; the batch
  is sharded over the mesh's batch axes (data, fsdp); the state and the teacher's
  parameters with `state_sharding` / `teacher_sharding` (trees of NamedSharding, see
  `create_train_state`; None: replicated), the rng and the metrics replicated.
  metrics: {"loss", one entry per computed term, "grad_norm", "nonfinite_terms" (how
  many of the others are NaN/Inf)} float32 scalars, and "skipped_steps" (total so far)
  when `tx` comes from `make_optimizer(..., nonfinite="skip")`. Compute dtype is the
  encoders' `config.dtype` (bf16 or fp32); gradients and updates are float32.
  `layer_map` is the loss map (None entries: unmapped student layers); `alpha` >= 0
  switches to alpha * clf + (1 - alpha) * KD terms (losses.apply_alpha).
  Several teachers: `teacher` a tuple of Encoders and `teacher_params` a list of their
  parameters; the teacher output is the first one's with logits replaced by the mean of
  all teachers' logits (losses.mean_teacher_logits) and no intermediates.
  A batch with `masked_positions` (kd_jax.masking) gives models with the MLM head
  (`head="mlm"`) those positions, so their logits are [B, P, V] (the MLM terms).
  """
  weights = dict(weights)
  teachers = (() if teacher is None else tuple(teacher) if isinstance(teacher, (tuple, list))
              else (teacher,))
  kd = bool(teachers)
  student_outputs, teacher_outputs = _outputs_needed(
      weights, layer_map, student.config.num_layers,
      teachers[0].config.num_layers if teachers else 0)

  def apply(model, params, batch, **kwargs):
    if "masked_positions" in batch and model.config.head == "mlm":
      kwargs["masked_positions"] = batch["masked_positions"]
    if "token_index" in batch:  # unpadded execution (kd_jax.models.unpad)
      kwargs["token_index"] = batch["token_index"]
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], **kwargs)

  def train_step(state: TrainState, teacher_params, batch, rng):
    teacher_out = None
    if len(teachers) == 1:
      teacher_out = apply(teachers[0], teacher_params, batch, deterministic=True,
                          **teacher_outputs)
    elif teachers:
      outs = [apply(t, p, batch, deterministic=True, **teacher_outputs)
              for t, p in zip(teachers, teacher_params)]
      teacher_out = type(outs[0])(logits=losses.mean_teacher_logits([o.logits for o in outs]),
                                  last_hidden_state=None)
    if kd:
      teacher_out = jax.lax.stop_gradient(teacher_out)
    dropout_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
      student_out = apply(student, params["model"], batch, deterministic=False,
                          rngs={"dropout": dropout_rng}, **student_outputs)
      return losses.distillation_loss(student_out, teacher_out, batch, weights=weights,
                                      layer_map=layer_map, prediction_loss=prediction_loss,
                                      temperature=temperature, projections=params["proj"],
                                      alpha=alpha)

    (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    terms["grad_norm"] = optax.tree.norm(grads)
    # Per-term finiteness in the step: the loop fetches one scalar to decide.
    terms["nonfinite_terms"] = sum(jnp.logical_not(jnp.isfinite(v)).astype(jnp.float32)
                                   for v in terms.values())
    skipping = isinstance(state.opt_state, optax.ApplyIfFiniteState)
    if skipping:  # apply_if_finite reads the gradients only: also skip a non-finite loss
      finite = terms["nonfinite_terms"] == 0
      grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.nan), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if skipping:
      terms["skipped_steps"] = opt_state.total_notfinite.astype(jnp.float32)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), terms

  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  state_sharding = repl if state_sharding is None else state_sharding
  teacher_sharding = repl if teacher_sharding is None else teacher_sharding
  return jax.jit(train_step, in_shardings=(state_sharding, teacher_sharding, data, repl),
                 out_shardings=(state_sharding, repl), donate_argnums=(0,))


def _maybe_unpad(batch: dict[str, np.ndarray], config: ml_collections.ConfigDict,
                 mesh) -> dict[str, np.ndarray]:
  """With `config.unpad`, adds the batch's "token_index" (`unpad.token_index`, one group
  per batch shard of `mesh`, budget a multiple of `config.unpad_multiple`, or with 0 of
  `unpad.default_multiple`: a sixteenth of a shard's positions). The batch is the global
  one, identical on every process, so every process computes the same budget."""
  if not config.unpad:
    return batch
  mask = batch["attention_mask"]
  groups = sharding.batch_divisor(mesh)
  multiple = config.unpad_multiple or unpad.default_multiple(mask.size // groups)
  return dict(batch, token_index=unpad.token_index(mask, groups, multiple))


def make_predict_step(model: Encoder, mesh, params_sharding: Any = None):
  """Jitted `predict(params, batch) -> [B] int32 argmax of the logits` (replicated out).

  `params_sharding`: tree of NamedSharding of the parameters (None: replicated)."""
  def predict(params, batch):
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"]).logits
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  params_sharding = sharding.replicated(mesh) if params_sharding is None else params_sharding
  return jax.jit(predict, in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def create_train_state(trainable: Any, tx, mesh) -> tuple[TrainState, TrainState]:
  """The initial TrainState placed on `mesh`, and the tree of its shardings.

  Parameters (cast to float32: the master copy, whatever the compute dtype) get
  `sharding.param_shardings`; the optimizer state mirrors them
  (`sharding.optimizer_state_shardings`: Adam's mu and nu follow their parameter,
  counters replicated) and is created sharded by a jitted `tx.init`. `trainable`
  holds host values that are the same on every process.
  Returns (state, state_sharding); the latter goes to `make_train_step` and, as the
  restore target's shardings, to Orbax.
  """
  as_f32 = lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x
  trainable = jax.tree.map(lambda x: as_f32(np.asarray(x)), trainable)
  params_sharding = sharding.param_shardings(trainable, mesh)
  params = sharding.shard_tree(trainable, params_sharding)
  opt_sharding = sharding.optimizer_state_shardings(tx, jax.eval_shape(tx.init, params),
                                                    params_sharding, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(params)
  repl = sharding.replicated(mesh)
  state_sharding = TrainState(step=repl, params=params_sharding, opt_state=opt_sharding)
  step = sharding.shard_tree(np.zeros((), np.int32), repl)
  return TrainState(step=step, params=params, opt_state=opt_state), state_sharding


def evaluate(predict, params, data: batching.TokenizedData, *, batch_size: int, buckets,
             pad_id: int, mesh, num_classes: int, seen_languages=None) -> dict:
  """Macro-F1 and accuracy, overall and per language (see evaluation.classification_metrics)."""
  predictions = np.full(len(data), -1, np.int32)
  for batch in batching.batches(data, batch_size, buckets, pad_id, shuffle=False,
                                drop_remainder=False):
    index = batch.pop("example_index")
    pred = np.asarray(predict(params, sharding.shard_global_batch(batch, mesh)))
    predictions[index[index >= 0]] = pred[index >= 0]
  return evaluation.classification_metrics(
      data.labels, predictions, data.language_ids, list(data.language_order), num_classes,
      seen_languages=list(seen_languages) if seen_languages else None)


# ---------------------------------------------------------------------------
# models and data for a stage
# ---------------------------------------------------------------------------
def layer_maps(config: ml_collections.ConfigDict, num_teacher_layers: int,
               num_student_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(initialisation map, loss map) from config.student / config.distill layer-map fields
  (see `student_init.resolve_layer_maps`; 1-based teacher layer per student layer).

  Raises ConfigError naming the config fields (and the teacher's depth) when a map cannot
  be built: more student than teacher layers, a uniform map that does not divide, an
  explicit map of the wrong length or with a layer outside 1..N."""
  sc, dc = config.student, config.distill
  kwargs = dict(student_strategy=sc.layer_map_strategy,
                student_layer_map=tuple(sc.layer_map) or None)
  try:
    student_init.resolve_layer_maps(num_teacher_layers, num_student_layers, **kwargs)
  except ValueError as e:
    raise ConfigError(
        f"config.student.num_layers={num_student_layers}, layer_map_strategy="
        f"{sc.layer_map_strategy!r}, layer_map={list(sc.layer_map)} do not fit a teacher of "
        f"{num_teacher_layers} layers: {e}") from e
  try:
    return student_init.resolve_layer_maps(
        num_teacher_layers, num_student_layers, distill_strategy=dc.layer_map_strategy,
        distill_layer_map=tuple(dc.layer_map) or None, **kwargs)
  except ValueError as e:
    raise ConfigError(
        f"config.distill.layer_map_strategy={dc.layer_map_strategy!r}, layer_map="
        f"{list(dc.layer_map)} do not fit a {num_student_layers}-layer student of a "
        f"{num_teacher_layers}-layer teacher: {e}") from e


def student_config(teacher: EncoderConfig, sc: ml_collections.ConfigDict,
                   init: str | None = None) -> EncoderConfig:
  """Student EncoderConfig: `num_layers` layers; when `hidden_size` is narrower, heads and
  intermediate size shrink in proportion (head size kept; paper §2.2, Xu et al. 2024).
  `init`: the initialisation strategy (default `sc.init`; general_distill passes its own)."""
  hidden = sc.hidden_size or teacher.hidden_size
  if hidden > teacher.hidden_size and (init or sc.init) != "from_scratch":
    raise ConfigError(f"config.student.hidden_size={hidden} is wider than the teacher's "
                      f"{teacher.hidden_size}; weight copying needs hidden_size <= teacher's")
  ratio = hidden / teacher.hidden_size
  heads = max(1, round(teacher.num_heads * ratio))
  if hidden % heads:
    raise ConfigError(f"config.student.hidden_size={hidden} is not divisible by {heads} heads")
  return teacher.replace(num_layers=sc.num_layers, hidden_size=hidden, num_heads=heads,
                         intermediate_size=int(round(teacher.intermediate_size * ratio)))


def _is_primary() -> bool:
  """Only process 0 writes result files; Orbax coordinates checkpoints across processes."""
  return jax.process_index() == 0


def _write_json_atomic(path: epath.Path, obj) -> None:
  if not _is_primary():
    return
  paths.write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def _save_model_config(stage_dir: epath.Path, cfg: EncoderConfig, extra: Mapping) -> None:
  fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "dtype"}
  _write_json_atomic(stage_dir / "model_config.json", {"encoder": fields, **extra})


def _teacher_config(teacher_dir: epath.Path, task: str, num_classes: int) -> EncoderConfig:
  """A finished teacher stage's EncoderConfig (model_config.json); ConfigError when its
  head has another number of classes than the task `task`."""
  teacher_cfg, _ = _load_model_config(teacher_dir)
  if teacher_cfg.num_labels != num_classes:
    raise ConfigError(f"{teacher_dir / 'model_config.json'}: teacher has num_labels="
                      f"{teacher_cfg.num_labels} but {task} has {num_classes} classes "
                      "(config.teacher.checkpoint)")
  return teacher_cfg


def _load_model_config(stage_dir: epath.Path) -> tuple[EncoderConfig, dict]:
  path = stage_dir / "model_config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: is {stage_dir} the directory of a "
                            "finished finetune_teacher stage? (set config.teacher.checkpoint)")
  info = json.loads(path.read_text())
  return EncoderConfig(**info.pop("encoder")), info


def _best_params_manager(stage_dir: epath.Path, create: bool) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      stage_dir / "checkpoints" / "best",
      options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["val_macro_f1"],
                                           best_mode="max", create=create),
      item_handlers=ocp.StandardCheckpointHandler())  # so item_metadata reads the tree


def _check_saved_tree(target: Any, saved: Any, where: str) -> None:
  """Raises hf_io.CheckpointMismatchError listing every leaf that `saved` (the
  checkpoint's metadata tree: shapes) lacks, has in excess, or holds with another shape
  than `target`; `where` names the checkpoint and the model config it was checked
  against. Checked before restoring, so Orbax's own errors are never mistaken for a
  mismatch."""
  flat = lambda tree: {sharding.path_name(k): np.shape(v) for k, v in
                       jax.tree_util.tree_flatten_with_path(tree)[0]}
  want, have = flat(target), flat(saved)
  problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
  problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
  problems += [f"{k}: saved shape {have[k]}, expected {want[k]}"
               for k in sorted(set(want) & set(have)) if have[k] != want[k]]
  if problems:
    raise hf_io.CheckpointMismatchError(f"{where}: " + "; ".join(problems))


def _restore_params(mngr: ocp.CheckpointManager, step: int, ckpt_dir: epath.Path,
                    stage_dir: epath.Path, cfg: EncoderConfig, *, as_numpy: bool) -> dict:
  """Restores step `step` of `mngr` as `cfg`'s parameter tree (numpy or jax arrays).

  Raises hf_io.CheckpointMismatchError (a ValueError) naming the checkpoint and
  model_config.json when the saved tree or a leaf's shape does not fit `cfg`; any other
  error (I/O, Orbax) propagates as it is."""
  target = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  if as_numpy:
    target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), target)
  _check_saved_tree(target, mngr.item_metadata(step).tree,
                    f"{ckpt_dir}/{step}: checkpoint does not match the model config "
                    f"{stage_dir / 'model_config.json'}")
  return mngr.restore(step, args=ocp.args.StandardRestore(target))


def restore_best_params(stage_dir: epath.Path, cfg: EncoderConfig, *,
                        as_numpy: bool = False) -> dict:
  """The best-val parameters saved by a stage (e.g. the fine-tuned teacher).

  `as_numpy`: host numpy arrays, read in full by every process (the teacher: weight
  copying reads them, then they are sharded with `sharding.shard_tree`); else arrays
  on the default device (one process).
  Raises FileNotFoundError naming the directory when there is no such checkpoint."""
  ckpt_dir = stage_dir / "checkpoints" / "best"
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f"{ckpt_dir}: no best checkpoint (did the stage finish an eval?)")
  with _best_params_manager(stage_dir, create=False) as mngr:  # closed even on an error
    step = mngr.best_step()
    if step is None:
      raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint")
    return _restore_params(mngr, step, ckpt_dir, stage_dir, cfg, as_numpy=as_numpy)


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
def run_stage(stage: str, config: ml_collections.ConfigDict, workdir: epath.Path, mesh,
              preemption: PreemptionGuard | None = None) -> dict:
  """Trains one stage to the end (or resumes it) and returns its test metrics, or {} when
  it stopped early (SIGTERM through `preemption`, or train.stop_after_steps)."""
  preemption = preemption or PreemptionGuard()
  stage_dir = workdir / STAGE_DIRS[stage]
  is_teacher = stage == "finetune_teacher"
  tc = config.teacher.train if is_teacher else config.student.train
  compute_dtype = PRECISIONS[config.precision]
  rng = jax.random.PRNGKey(config.seed)
  init_rng, head_rng, proj_rng, dropout_rng = jax.random.split(rng, 4)

  # Everything that can fail on bad input happens before the first step.
  model_dir = hf_io.resolve_model_dir(config.model)
  tokenizer = hf_io.load_tokenizer(model_dir)
  data = load_stage_data(config, tokenizer)
  num_classes = len(data.labels)
  overrides = {"hidden_dropout": config.hidden_dropout, "attention_dropout": config.attention_dropout,
               "classifier_dropout": config.hidden_dropout}

  teacher_model = teacher_params = teacher_sharding = None
  weights = {"clf": 1.0}
  layer_map: tuple[int, ...] = ()
  loss_layer_map: tuple[int | None, ...] = ()
  alpha = -1.0
  if is_teacher:
    model_cfg, params, _ = hf_io.load_pretrained(config.model, num_labels=num_classes,
                                                 init_rng=head_rng, config_overrides=overrides,
                                                 head="sequence")
    provenance = None
  else:
    from_general = config.student.init == "from_general"
    teachers = []  # (EncoderConfig, host params) per teacher stage dir
    if config.distill.kd or not from_general:  # a from_general NON-KD run needs no teacher
      for teacher_dir in teacher_checkpoints(config, workdir):
        teacher_cfg = _teacher_config(teacher_dir, config.data.name, num_classes)
        teachers.append((teacher_cfg, restore_best_params(teacher_dir, teacher_cfg,
                                                          as_numpy=True)))
    teacher_cfg, teacher_params = teachers[0] if teachers else (None, None)
    if from_general:
      model_cfg, params, general_info = load_general_student(config, workdir, num_classes,
                                                             head_rng)
      layer_map = tuple(general_info.get("layer_map", ()))
      provenance = None
    else:
      model_cfg = student_config(teacher_cfg, config.student)
    if teachers:
      init_map, loss_layer_map = layer_maps(config, teacher_cfg.num_layers, model_cfg.num_layers)
      layer_map = layer_map if from_general else init_map
    if not from_general:
      if len(teachers) > 1 and config.student.init == "from_teacher":
        logging.info("student init from_teacher: several teachers, copying from the first (%s)",
                     teacher_checkpoints(config, workdir)[0])
      random_params = init_params(model_cfg, init_rng)
      base_params = None
      if config.student.init == "from_base":
        _, base_params, _ = hf_io.load_pretrained(config.model, num_labels=num_classes,
                                                  init_rng=head_rng, head="sequence")
      params, provenance = student_init.init_student(
          config.student.init, random_params, teacher_params=teacher_params,
          base_params=base_params, layer_map=layer_map)
    if provenance:
      logging.info("student init %s:\n%s", config.student.init,
                   student_init.describe_provenance(provenance))
    if config.distill.kd:
      weights = {k: float(v) for k, v in config.distill.weights.items() if float(v) > 0}
      alpha = float(config.distill.alpha)
      logging.info("distill: %d teacher(s), weights %s, alpha %s, loss layer map %s",
                   len(teachers), weights, alpha, list(loss_layer_map))
      models = tuple(Encoder(c.replace(dtype=compute_dtype), scan_layers=config.scan_layers)
                     for c, _ in teachers)
      shardings = [sharding.param_shardings(p, mesh) for _, p in teachers]
      placed = [sharding.shard_tree(p, sh) for (_, p), sh in zip(teachers, shardings)]
      if len(teachers) == 1:
        teacher_model, teacher_sharding, teacher_params = models[0], shardings[0], placed[0]
      else:  # prediction target: the mean of the teachers' logits (make_train_step)
        teacher_model, teacher_sharding, teacher_params = models, shardings, placed
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

  student = Encoder(model_cfg.replace(**overrides, dtype=compute_dtype), remat=config.remat,
                    scan_layers=config.scan_layers)
  proj = {}
  first_teacher = teacher_model[0] if isinstance(teacher_model, tuple) else teacher_model
  if first_teacher is not None and model_cfg.hidden_size != first_teacher.config.hidden_size:
    shape = (model_cfg.hidden_size, first_teacher.config.hidden_size)
    keys = jax.random.split(proj_rng, len(losses.PROJECTION_KEYS))
    proj = {name: 0.02 * jax.random.normal(k, shape)
            for name, k in zip(losses.PROJECTION_KEYS, keys) if weights.get(name, 0) > 0}
  trainable = {"model": jax.tree.map(jnp.asarray, params), "proj": proj}
  tx, schedule = make_optimizer(tc, num_steps, config.nonfinite)
  state, state_sharding = create_train_state(trainable, tx, mesh)

  latest = _latest_manager(stage_dir)
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
                               temperature=config.distill.temperature, mesh=mesh, alpha=alpha,
                               state_sharding=state_sharding, teacher_sharding=teacher_sharding)
  predict = make_predict_step(Encoder(model_cfg.replace(dtype=compute_dtype),
                                     scan_layers=config.scan_layers), mesh,
                              state_sharding.params["model"])
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

  # The order is a pure function of (seed, step): exact resume.
  train_batches = batching.train_batches(data.train, tc.batch_size, config.data.buckets,
                                         data.pad_id, seed=config.seed, step=step)
  stop_after = tc.stop_after_steps
  pending = None  # (stage, step, metrics) not yet checked for non-finite values
  dropout_rng = sharding.replicate(dropout_rng, mesh)
  while step < num_steps:
    batch = _maybe_unpad(next(train_batches), config, mesh)
    batch.pop("example_index")
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      state, metrics = train_step(state, teacher_params, sharding.shard_global_batch(batch, mesh),
                                  dropout_rng)
    step += 1
    # nonfinite="stop": the previous step is checked once this one is queued (one scalar
    # fetched, dispatch stays a step ahead); a step that logs, evaluates, saves or stops
    # is checked at once, so no checkpoint or result ever holds a non-finite state.
    preempted = preemption.requested  # read once: a step is checked before it is saved
    if pending is not None:
      _check_finite(*pending)
    pending = (stage, step, metrics) if config.nonfinite == "stop" else None
    if pending is not None and (
        step % tc.log_every_steps == 0 or step % tc.eval_every_steps == 0 or step == num_steps
        or step % tc.checkpoint_every_steps == 0 or preempted or 0 < stop_after <= step):
      _check_finite(*pending)
      pending = None
    report(step)
    if step % tc.log_every_steps == 0 or step == num_steps:
      scalars = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
      scalars["train/learning_rate"] = float(schedule(step - 1))
      writer.write_scalars(step, scalars)
    if step % tc.eval_every_steps == 0 or step == num_steps:
      do_eval(step)
    if step % tc.checkpoint_every_steps == 0 or step == num_steps or preempted:
      latest.save(step, args=ocp.args.StandardSave(state))
    # stop_after_steps simulates a hard kill (no extra save), for resume tests.
    if preempted or 0 < stop_after <= step < num_steps:
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


def _check_finite(stage: str, step: int, metrics: Mapping[str, jax.Array]) -> None:
  """Raises FloatingPointError naming the step and the non-finite loss terms (or
  grad_norm) when the step's "nonfinite_terms" count is not 0."""
  if float(metrics["nonfinite_terms"]) == 0:
    return
  values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "nonfinite_terms"}
  bad = sorted(k for k, v in values.items() if not math.isfinite(v))
  raise FloatingPointError(
      f"{stage} step {step}: non-finite loss term(s) {bad} (metrics {values}); nothing was "
      "saved for this step. Lower the learning rate, or set config.nonfinite='skip' to skip "
      "such steps.")


def _latest_manager(stage_dir: epath.Path) -> ocp.CheckpointManager:
  """Orbax manager of the resumable state (`checkpoints/latest`, the newest step only).

  What makes a save killed half-way (SIGKILL, power loss) harmless is Orbax's own
  atomicity: a step is written into `<step>.orbax-checkpoint-tmp-<n>` and becomes
  `<step>` only after every process has finished writing (a `commit_success.txt` is
  written, then the directory is atomically renamed; on object stores without atomic
  rename Orbax relies on the commit file instead). `latest_step()` lists finished steps
  only, and the previous step is deleted only after the new one is committed, so a
  killed save leaves the last complete checkpoint in place and a rerun resumes from it.
  `cleanup_tmp_directories` removes the half-written directory when the manager is
  created again.
  """
  return ocp.CheckpointManager(
      stage_dir / "checkpoints" / "latest",
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                           cleanup_tmp_directories=True))


# ---------------------------------------------------------------------------
# general (task-agnostic) distillation: masked language modelling on unlabeled text
# ---------------------------------------------------------------------------
def _final_params_manager(stage_dir: epath.Path, create: bool) -> ocp.CheckpointManager:
  """`checkpoints/final`: the general_distill student's parameters (MLM head included)."""
  return ocp.CheckpointManager(stage_dir / "checkpoints" / "final",
                               options=ocp.CheckpointManagerOptions(max_to_keep=1, create=create),
                               item_handlers=ocp.StandardCheckpointHandler())


def restore_stage_params(stage_dir: epath.Path, cfg: EncoderConfig) -> dict:
  """Host (numpy) parameters of a finished stage: `checkpoints/final` (general_distill),
  else `checkpoints/best` (finetune_teacher, distill).

  Raises:
    FileNotFoundError: naming the directory, when the stage has no finished checkpoint.
    ValueError: the checkpoint does not fit `cfg` (model_config.json).
  """
  final_dir = stage_dir / "checkpoints" / "final"
  if not final_dir.is_dir():
    return restore_best_params(stage_dir, cfg, as_numpy=True)
  with _final_params_manager(stage_dir, create=False) as mngr:  # closed even on an error
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"{final_dir}: no complete checkpoint (did the stage finish?)")
    return _restore_params(mngr, step, final_dir, stage_dir, cfg, as_numpy=True)


def load_general_teacher(config: ml_collections.ConfigDict) -> tuple[EncoderConfig, dict, str]:
  """The teacher of general_distill: `config.general.teacher`, default `config.model`.

  A kd_jax stage dir (with model_config.json) gives its final (else best) parameters;
  anything else is loaded with `hf_io.load_pretrained(..., num_labels=0)`, which keeps
  an MLM head when the checkpoint's architecture has one (`*ForMaskedLM`).
  Returns (EncoderConfig, host params, the name used).
  """
  name = config.general.teacher or config.model
  path = epath.Path(name)
  if (path / "model_config.json").is_file():
    cfg, _ = _load_model_config(path)
    return cfg, restore_stage_params(path, cfg), name
  cfg, params, _ = hf_io.load_pretrained(name, num_labels=0)
  return cfg, params, name


def _init_general_student(config: ml_collections.ConfigDict, random_params: dict,
                          teacher_params: dict, layer_map) -> tuple[dict, Any]:
  """config.general.init applied to the MLM student: weights copied from the teacher or
  the pretrained `config.model` (student_init); the MLM head is copied when the source
  has one and otherwise keeps its random initialisation (the decoder is the word
  embedding table, copied either way)."""
  init = config.general.init
  if init == "from_scratch":
    return random_params, None
  source = teacher_params
  if init == "from_base":
    _, source, _ = hf_io.load_pretrained(config.model, num_labels=0)
  fresh = {k: v for k, v in random_params.items() if k == "lm_head" and k not in source}
  target = {k: v for k, v in random_params.items() if k not in fresh}
  params, provenance = student_init.init_student(
      init, target, teacher_params=source if init == "from_teacher" else None,
      base_params=source if init == "from_base" else None, layer_map=layer_map)
  return {**params, **fresh}, provenance


def load_general_student(config: ml_collections.ConfigDict, workdir: epath.Path,
                         num_classes: int, head_rng) -> tuple[EncoderConfig, dict, dict]:
  """Student of `student.init="from_general"`: the general_distill student's final weights
  (`config.student.checkpoint`, default <workdir>/general) without its MLM head, plus a
  freshly initialised sequence-classification head (pooler, classifier).

  Returns (EncoderConfig with head "sequence", host params, the stage's model_config.json).
  Raises:
    FileNotFoundError: no finished general_distill stage there.
    ValueError: not a general_distill stage, or its depth / width differ from
      config.student.num_layers / hidden_size.
  """
  general_dir = epath.Path(config.student.checkpoint or workdir / STAGE_DIRS["general_distill"])
  if not (general_dir / "model_config.json").is_file():
    raise FileNotFoundError(
        f"{general_dir / 'model_config.json'} does not exist: config.student.init="
        "'from_general' needs a finished general_distill stage (config.student.checkpoint, "
        "default <workdir>/general)")
  cfg, info = _load_model_config(general_dir)
  if info.get("stage") != "general_distill" or cfg.head != "mlm":
    raise ValueError(f"{general_dir}: config.student.checkpoint must be a general_distill stage "
                     f"dir (its model_config.json says stage={info.get('stage')!r})")
  sc = config.student
  if cfg.num_layers != sc.num_layers or (sc.hidden_size and cfg.hidden_size != sc.hidden_size):
    raise ValueError(f"{general_dir}: the general student has {cfg.num_layers} layers of width "
                     f"{cfg.hidden_size}, but config.student.num_layers={sc.num_layers}, "
                     f"config.student.hidden_size={sc.hidden_size}")
  params = restore_stage_params(general_dir, cfg)
  model_cfg = cfg.replace(head="sequence", num_labels=num_classes)
  fresh = init_params(model_cfg, head_rng)
  params = {k: v for k, v in params.items() if k != "lm_head"}
  params.update({k: jax.tree.map(np.asarray, v) for k, v in fresh.items() if k not in params})
  logging.info("student init from_general: %s (MLM head dropped; new %s)", general_dir,
               sorted(k for k in fresh if k not in ("embeddings",) and not k.startswith("layer_")))
  return model_cfg, params, info


def make_mlm_eval_step(model: Encoder, mesh, params_sharding: Any = None):
  """Jitted `mlm_eval(params, batch) -> (nll, correct, count)`, each float32 [B]: per row,
  the summed cross-entropy, number of correct argmax predictions and number of masked
  tokens (weighted by mlm_weights), at `batch["masked_positions"]`."""
  def mlm_eval(params, batch):
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                         masked_positions=batch["masked_positions"]).logits
    logits = logits.astype(jnp.float32)
    labels = batch["mlm_labels"]
    w = batch["mlm_weights"].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return (jnp.sum(jnp.where(w > 0, nll, 0.0) * w, -1), jnp.sum(correct * w, -1),
            jnp.sum(w, -1))
  params_sharding = sharding.replicated(mesh) if params_sharding is None else params_sharding
  return jax.jit(mlm_eval, in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def evaluate_mlm(mlm_eval, params, data: batching.TokenizedData, spec: masking.MaskingSpec, *,
                 batch_size: int, buckets, pad_id: int, seed: int, mesh) -> dict:
  """MLM loss (mean cross-entropy per masked token, nats) and accuracy (%) on `data`,
  overall and per text source. Masks come from masking_rng(seed, HELDOUT_STREAM, batch
  number), so every evaluation of a run sees the same masked tokens."""
  sources = list(data.language_order)
  sums = np.zeros((3, len(sources)))
  for i, batch in enumerate(batching.batches(data, batch_size, buckets, pad_id, shuffle=False,
                                             drop_remainder=False)):
    source = batch["language_ids"]
    masked = masking.mask_batch(batch, spec, masking.masking_rng(seed, masking.HELDOUT_STREAM, i))
    out = jax.device_get(mlm_eval(params, sharding.shard_global_batch(masked, mesh)))
    for k in range(3):
      np.add.at(sums[k], source, np.asarray(out[k], np.float64))  # padding rows add 0

  def metrics(nll, correct, count):
    return {"mlm_loss": float(nll / max(count, 1)),
            "mlm_accuracy": float(100 * correct / max(count, 1)), "num_masked": int(count)}
  return {"overall": metrics(*sums.sum(1)),
          "per_source": {name: metrics(*sums[:, j]) for j, name in enumerate(sources)}}


def run_general_stage(stage: str, config: ml_collections.ConfigDict, workdir: epath.Path, mesh,
                      preemption: PreemptionGuard | None = None) -> dict:
  """general_distill: task-agnostic distillation of a student with an MLM head on unlabeled
  text (config.general), to the end or resumed; returns the held-out MLM metrics, or {}
  when it stopped early.

  The teacher (`load_general_teacher`) and the student see the same dynamically masked
  batch (kd_jax.masking, a pure function of (seed, step)); the objective is
  config.general.weights over GENERAL_TERMS (e.g. att + hid + embd + mlm). Writes
  `<workdir>/general/`: checkpoints/latest (resumable state), checkpoints/final (the
  student with its MLM head), model_config.json, TensorBoard events (train terms,
  heldout/mlm_loss, heldout/mlm_accuracy) and heldout.json at the end.
  """
  preemption = preemption or PreemptionGuard()
  gc, tc = config.general, config.general.train
  stage_dir = workdir / STAGE_DIRS[stage]
  compute_dtype = PRECISIONS[config.precision]
  init_rng, proj_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)

  # Everything that can fail on bad input happens before the first step.
  tokenizer = hf_io.load_tokenizer(hf_io.resolve_model_dir(config.model))
  spec = masking.MaskingSpec.from_tokenizer(tokenizer, float(gc.mask_rate))
  data = text.load_text_data(
      tokenizer, max_length=gc.max_length, heldout_size=gc.heldout_size, seed=config.seed,
      text_files=tuple(gc.text_files), tsm_languages=tuple(gc.tsm_languages),
      sib200_languages=tuple(gc.sib200_languages), data_dir=config.data.data_dir or None)
  logging.info("general text: %d train / %d held-out texts from %s; %d truncated at %d tokens",
               len(data.train), len(data.heldout), list(data.train.language_order),
               data.train.num_truncated, gc.max_length)
  weights = {k: float(v) for k, v in gc.weights.items() if float(v) > 0}
  teacher_cfg, teacher_params, teacher_name = load_general_teacher(config)
  needs_mlm = sorted(t for t in ("mlm_kl", "mlm_mse") if t in weights)
  if needs_mlm and teacher_cfg.head != "mlm":
    raise ValueError(
        f"config.general.weights.{needs_mlm[0]} > 0 needs a teacher with an MLM head, but the "
        f"teacher {teacher_name!r} (config.general.teacher, default config.model) has head "
        f"{teacher_cfg.head!r}; use a *ForMaskedLM checkpoint or a general_distill stage dir, "
        "or set those weights to 0")
  if spec.vocab_size > teacher_cfg.vocab_size:
    raise ValueError(f"the tokenizer of config.model has {spec.vocab_size} tokens but the "
                     f"teacher {teacher_name!r} only {teacher_cfg.vocab_size} embeddings")
  model_cfg = student_config(teacher_cfg, config.student, init=gc.init).replace(
      head="mlm", num_labels=0)
  layer_map, loss_layer_map = layer_maps(config, teacher_cfg.num_layers, model_cfg.num_layers)
  params, provenance = _init_general_student(config, init_params(model_cfg, init_rng),
                                             teacher_params, layer_map)
  if provenance:
    logging.info("general student init %s from %s:\n%s", gc.init, teacher_name,
                 student_init.describe_provenance(provenance))
  teacher_model = teacher_sharding = None
  if any(t not in losses.SUPERVISED_TERMS for t in weights):
    teacher_model = Encoder(teacher_cfg.replace(dtype=compute_dtype),
                            scan_layers=config.scan_layers)
    teacher_sharding = sharding.param_shardings(teacher_params, mesh)
    teacher_params = sharding.shard_tree(teacher_params, teacher_sharding)
  else:
    teacher_params = None
  logging.info("general_distill: teacher %s, weights %s, loss layer map %s", teacher_name,
               weights, list(loss_layer_map))

  spe = batching.steps_per_epoch(data.train, tc.batch_size, gc.buckets)
  if spe == 0:
    raise ValueError(f"config.general.train.batch_size={tc.batch_size} is larger than every "
                     "length bucket of the text")
  num_steps = tc.num_train_steps if tc.num_train_steps > 0 else math.ceil(tc.num_epochs * spe)

  stage_dir.mkdir(parents=True, exist_ok=True)
  _save_model_config(stage_dir, model_cfg, {
      "stage": stage, "base_model": config.model, "teacher": teacher_name,
      "layer_map": list(layer_map), "loss_layer_map": list(loss_layer_map), "init": gc.init,
      "weights": weights, "text_sources": list(data.train.language_order),
      "train_texts": len(data.train), "heldout_texts": len(data.heldout)})

  overrides = {"hidden_dropout": config.hidden_dropout,
               "attention_dropout": config.attention_dropout}
  student = Encoder(model_cfg.replace(**overrides, dtype=compute_dtype), remat=config.remat,
                    scan_layers=config.scan_layers)
  proj = {}
  if teacher_model is not None and model_cfg.hidden_size != teacher_cfg.hidden_size:
    shape = (model_cfg.hidden_size, teacher_cfg.hidden_size)
    keys = jax.random.split(proj_rng, len(losses.PROJECTION_KEYS))
    proj = {name: 0.02 * jax.random.normal(k, shape)
            for name, k in zip(losses.PROJECTION_KEYS, keys) if weights.get(name, 0) > 0}
  tx, schedule = make_optimizer(tc, num_steps, config.nonfinite)
  state, state_sharding = create_train_state({"model": params, "proj": proj}, tx, mesh)
  latest = _latest_manager(stage_dir)
  final = _final_params_manager(stage_dir, create=True)
  if latest.latest_step() is not None:
    state = latest.restore(latest.latest_step(), args=ocp.args.StandardRestore(state))
    logging.info("resumed %s from step %d", stage_dir, int(state.step))

  train_step = make_train_step(student, teacher_model, tx, weights=weights,
                               layer_map=loss_layer_map, prediction_loss="mse",
                               temperature=float(gc.temperature), mesh=mesh,
                               state_sharding=state_sharding, teacher_sharding=teacher_sharding)
  mlm_eval = make_mlm_eval_step(Encoder(model_cfg.replace(dtype=compute_dtype),
                                        scan_layers=config.scan_layers), mesh,
                                state_sharding.params["model"])
  eval_kwargs = {"batch_size": tc.eval_batch_size, "buckets": gc.buckets,
                 "pad_id": tokenizer.pad_token_id, "seed": config.seed, "mesh": mesh}

  writer = metric_writers.create_default_writer(stage_dir, just_logging=jax.process_index() > 0)
  if int(state.step) == 0:
    writer.write_hparams({"stage": stage, "num_train_steps": num_steps, "steps_per_epoch": spe,
                          "train_texts": len(data.train), "heldout_texts": len(data.heldout),
                          "mask_rate": float(gc.mask_rate)})
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
  step = int(state.step)
  logging.info("%s: %d steps (%d per epoch), start at %d", stage, num_steps, spe, step)

  def do_eval(step) -> dict:
    metrics = evaluate_mlm(mlm_eval, state.params["model"], data.heldout, spec, **eval_kwargs)
    writer.write_scalars(step, {f"heldout/{k}": v for k, v in metrics["overall"].items()
                                if k != "num_masked"})
    logging.info("step %d held-out MLM loss %.4f, accuracy %.2f%%", step,
                 metrics["overall"]["mlm_loss"], metrics["overall"]["mlm_accuracy"])
    return metrics

  # The order is a pure function of (seed, step): exact resume.
  train_batches = batching.train_batches(data.train, tc.batch_size, gc.buckets,
                                         tokenizer.pad_token_id, seed=config.seed, step=step)
  stop_after = tc.stop_after_steps
  dropout_rng = sharding.replicate(dropout_rng, mesh)
  while step < num_steps:
    batch = masking.mask_batch(_maybe_unpad(next(train_batches), config, mesh), spec,
                               masking.masking_rng(config.seed, masking.TRAIN_STREAM, step))
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      state, metrics = train_step(state, teacher_params, sharding.shard_global_batch(batch, mesh),
                                  dropout_rng)
    step += 1
    if config.nonfinite == "stop":
      _check_finite(stage, step, metrics)
    report(step)
    if step % tc.log_every_steps == 0 or step == num_steps:
      scalars = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
      scalars["train/learning_rate"] = float(schedule(step - 1))
      writer.write_scalars(step, scalars)
    if step % tc.eval_every_steps == 0 and step < num_steps:
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

  if final.latest_step() != step:
    final.save(step, args=ocp.args.StandardSave(state.params["model"]))
    final.wait_until_finished()
  metrics = dict(do_eval(step), step=step, stage=stage, teacher=teacher_name, weights=weights)
  _write_json_atomic(stage_dir / FINISHED_FILES[stage], metrics)  # marks the stage finished
  writer.flush()
  return metrics


def _read_json(path: epath.Path) -> dict:
  return json.loads(path.read_text())


def _pretrained_config(name: str, num_labels: int, head: str = "sequence") -> EncoderConfig:
  """The EncoderConfig of a pretrained model from its config.json alone (no weights)."""
  model_dir = hf_io.resolve_model_dir(name)
  return hf_io.config_from_hf(hf_io.read_hf_config(model_dir), num_labels,
                              source=str(model_dir / "config.json"), head=head)


def check_before_training(config: ml_collections.ConfigDict, workdir: epath.Path,
                          mesh) -> None:
  """Checks, before any stage trains, what the stages would otherwise find only when they
  start: each stage's batch sizes against `mesh` (checked only here), the student's
  depth, width and layer maps against each teacher's shape, and the teacher dirs of
  `distill`. Reads config.json / model_config.json only, no weights.

  The teacher of `distill` is each stage dir of `teacher_checkpoints` (its
  model_config.json), or, for `<workdir>/teacher` trained in this run, `config.model`'s
  shape; that of `general_distill` is `config.general.teacher` (a stage dir or a
  pretrained model), default `config.model`. The checks are `student_config` and
  `layer_maps`, the functions the stages themselves run.
  Raises:
    config_base.ConfigError: naming the config field (student.num_layers,
      student.hidden_size, student.layer_map, distill.layer_map, ...) and the teacher's
      shape; `MissingPathError` (also a FileNotFoundError) for a teacher dir of
      `distill` that holds no model_config.json and is not trained by this run.
  """
  for stage in config.stages:
    section = STAGE_DIRS[stage]  # teacher / general / student: its config section too
    tc = config[section].train
    for field in ("batch_size", "eval_batch_size"):
      try:
        batching.check_batch_size(tc[field], sharding.batch_divisor(mesh))
      except ValueError as e:
        raise ConfigError(f"config.{section}.train.{field}={tc[field]} "
                          f"(stage {stage}, mesh {dict(mesh.shape)}): {e}") from e
  _, labels, _ = DATASETS[config.data.name]

  if "general_distill" in config.stages:
    gc = config.general
    name = gc.teacher or config.model
    if (epath.Path(name) / "model_config.json").is_file():
      teacher_cfg = _load_model_config(epath.Path(name))[0]
    else:
      teacher_cfg = _pretrained_config(name, 0, head=None)
    student_cfg = student_config(teacher_cfg, config.student, init=gc.init)
    layer_maps(config, teacher_cfg.num_layers, student_cfg.num_layers)

  if "distill" not in config.stages:
    return
  from_general = config.student.init == "from_general"
  if from_general and not config.distill.kd:
    return  # no teacher: the general student's shape is checked when it is loaded
  trained_here = workdir / STAGE_DIRS["finetune_teacher"]
  for teacher_dir in teacher_checkpoints(config, workdir):
    if (teacher_dir / "model_config.json").is_file():
      teacher_cfg = _teacher_config(teacher_dir, config.data.name, len(labels))
    elif teacher_dir == trained_here and "finetune_teacher" in config.stages:
      teacher_cfg = _pretrained_config(config.model, len(labels))  # fine-tuning keeps it
    else:
      raise MissingPathError(
          f"{teacher_dir / 'model_config.json'} does not exist: config.teacher.checkpoint "
          f"must name finished finetune_teacher stage dirs (got "
          f"{config.teacher.checkpoint!r}), or add finetune_teacher to config.stages")
    if from_general:
      layer_maps(config, teacher_cfg.num_layers, config.student.num_layers)
    else:
      student_cfg = student_config(teacher_cfg, config.student)
      layer_maps(config, teacher_cfg.num_layers, student_cfg.num_layers)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | os.PathLike) -> dict[str, dict]:
  """Runs `config.stages` in order under `workdir`; returns {stage: test metrics}.

  `workdir` and the config's path fields may be relative: they are resolved once here
  against the current directory (`paths.resolve_config`, logged), and everything below
  works on absolute `epath.Path`s (a `gs://` workdir is kept as it is).
  Every config error that the pretrained model's or the teachers' config files can show
  (`validate_config`, `check_before_training`) is raised before the first stage starts.
  A stage whose `FINISHED_FILES` entry exists (`test.json`; `heldout.json` for
  general_distill) is finished and not rerun, so the same command resumes a multi-stage
  job. Prints and writes `<workdir>/results.md` (classification stages; general_distill
  returns its held-out MLM metrics).
  """
  validate_config(config)
  config, workdir = paths.resolve_config(config, workdir)
  mesh = sharding.create_mesh_from_config(config.mesh)
  check_before_training(config, workdir, mesh)
  results = {}
  for stage in config.stages:
    finished = workdir / STAGE_DIRS[stage] / FINISHED_FILES[stage]
    if finished.exists():
      logging.info("%s already finished (%s); skipping", stage, finished)
      results[stage] = _read_json(finished)
      continue
    run = run_general_stage if stage == "general_distill" else run_stage
    with PreemptionGuard() as preemption:
      results[stage] = run(stage, config, workdir, mesh, preemption)
    if not results[stage]:
      return results  # stopped early: preempted, or train.stop_after_steps
  languages = list(config.data.languages)
  names = {"finetune_teacher": "teacher",
           "distill": f"student {config.student.init} {'KD' if config.distill.kd else 'NON-KD'}"}
  if not any(s in names for s in results):
    return results
  table = evaluation.format_markdown_table(
      {names[s]: r for s, r in results.items() if s in names}, languages)
  if _is_primary():
    (workdir / "results.md").write_text(table + "\n")
  print(f"\nTest macro-F1 (%), {workdir}:\n{table}")
  return results
