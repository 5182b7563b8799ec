"""Stage plans: what one stage trains, from what, on which batches, toward what.

`build(name, config, workdir, mesh) -> StagePlan` has one builder per stage kind; each is
the only code that reads its part of the config, and raises every input error (data,
checkpoints, shapes) before the stage's first step. `train.train_stage` runs any plan.

* `finetune_teacher`: the pretrained `config.model` with a fresh head of the task's kind
  (`sequence` classes or `token` tags, `kd_jax.data.tasks`), cross-entropy
  (`config.teacher.train`), kept: the best val step.
* `general_distill`: task-agnostic distillation of a student with an MLM head on
  unlabeled text with dynamic masking (`config.general`: TinyBERT terms, MLM
  cross-entropy, MLM logit KL / MSE, cosine) from `config.general.teacher` (default the
  pretrained model); held-out MLM loss / accuracy; kept: the final step.
* `distill`: a student initialised `from_scratch` / `from_base` / `from_teacher` (paper
  §2.2) or `from_general` (the general_distill student with a fresh classification
  head), trained with `config.distill.weights` (TinyBERT's objective plus cross-entropy,
  §2.1) or cross-entropy alone when `config.distill.kd` is False (NON-KD); several
  teacher dirs: the target is the mean of their logits. Kept: the best val step.

`check_all(config, workdir, mesh)` checks, before any stage trains, the shapes that
later stages will meet (from config.json / model_config.json alone, no weights).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from kd_jax import checkpoints, evaluation, hf_io, losses, masking, sharding, student_init
from kd_jax.config_base import (PRECISIONS, STAGE_SECTIONS, ConfigError, MissingPathError,
                                split_checkpoints)
from kd_jax.data import batching, tasks, text
from kd_jax.models import unpad
from kd_jax.models.encoder import Encoder, EncoderConfig, init_params

@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen teacher: its module (compute dtype), parameters placed on the mesh, and
  their shardings. Never checkpointed with the student."""
  model: Encoder
  params: Any
  sharding: Any


@dataclasses.dataclass(frozen=True)
class Objective:
  """The loss of a stage (`losses.distillation_loss`): term weights, the loss layer map
  (1-based teacher layer per student layer), prediction loss, temperature, alpha."""
  weights: Mapping[str, float]
  layer_map: tuple[int | None, ...] = ()
  prediction_loss: str = "mse"
  temperature: float = 1.0
  alpha: float = -1.0


@dataclasses.dataclass(frozen=True)
class BatchStream:
  """The stage's training batches from step `step` on: `batching.train_batches` (a pure
  function of (seed, step), so resuming is exact), then each transform in order. A
  transform `(batch, step) -> dict` returns only the keys it adds or replaces, so no
  transform can drop another's keys."""
  data: batching.TokenizedData
  batch_size: int
  buckets: tuple[int, ...]
  pad_id: int
  seed: int
  transforms: tuple[Callable[[dict, int], dict], ...] = ()

  def __call__(self, step: int) -> Iterator[dict[str, np.ndarray]]:
    source = batching.train_batches(self.data, self.batch_size, self.buckets, self.pad_id,
                                    seed=self.seed, step=step)
    for i, batch in enumerate(source, start=step):
      batch.pop("example_index")
      for transform in self.transforms:
        batch.update(transform(batch, i))
      yield batch


@dataclasses.dataclass(frozen=True, eq=False)  # ndarray fields: compared by identity
class CompactEmbedding:
  """The word-embedding rows that a stage's training batches touch
  (`config.compact_embeddings`, `compact_embedding`).

  The training module's table is `table[rows]` [A, H] (the batches' ids remapped into
  it), so the optimizer reads and writes A rows instead of V. In dense training every
  other row has a zero gradient at every step, so AdamW only decays it (its Adam moments
  stay 0): row_n = row_0 · Π_{k<n} (1 − lr_k · weight_decay) after n updates, which
  `train.full_params` applies in closed form wherever the full model is needed
  (evaluation, the kept checkpoint). Same parameters as dense training, up to float32
  rounding of that product.
  rows: int32 [A], sorted ids of the full vocabulary (0..pad_token_id included, so the
    padding id keeps its index); table: float32 [V, H], the initial full table (host).
  """
  rows: np.ndarray
  table: np.ndarray


@dataclasses.dataclass
class StagePlan:
  """Everything the loop needs to train one stage, and nothing else.

  `params`: the student's initial host parameters; `projections`: learnable [H_S, H_T]
  kernels of the terms that compare a narrower student with its teacher;
  `teachers`: () without distillation terms; `evaluator`: run every
  `train.eval_every_steps` (and at the end when `keep == "best"`);
  `final_evaluator`: run once on the kept parameters, its result file marks the stage
  finished (`checkpoints.FINISHED_FILES`); `info`: model_config.json's extra fields;
  `result_info`: added to the final result. `embedding`: set when `student` and `params`
  hold only the rows the training batches touch (CompactEmbedding); `model_config`
  and the evaluators are always the full model's.
  """
  name: str
  stage_dir: epath.Path
  train: ml_collections.ConfigDict
  num_steps: int
  steps_per_epoch: int
  model_config: EncoderConfig
  student: Encoder
  params: dict
  projections: dict
  teachers: tuple[Teacher, ...]
  objective: Objective
  batches: BatchStream
  evaluator: Any
  final_evaluator: Any
  keep: str
  nonfinite: str
  dropout_rng: jax.Array
  info: dict
  hparams: dict
  result_info: dict
  embedding: CompactEmbedding | None = None


# ---------------------------------------------------------------------------
# shapes: student config and layer maps (shared with check_all)
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
  `init`: the initialisation strategy (default `sc.init`; general_distill passes its own).
  Raises ConfigError for a student wider than the teacher (unless from_scratch) or a
  width the heads do not divide."""
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


def teacher_dirs(config: ml_collections.ConfigDict,
                 workdir: epath.Path) -> tuple[epath.Path, ...]:
  """The teacher stage dirs of `distill`: config.teacher.checkpoint, else <workdir>/teacher."""
  dirs = split_checkpoints(config.teacher.checkpoint)
  if not dirs:
    return (checkpoints.stage_dir(workdir, "finetune_teacher"),)
  return tuple(epath.Path(d) for d in dirs)


def _teacher_config(teacher_dir: epath.Path, task: str, head: str,
                    num_classes: int) -> EncoderConfig:
  """A finished teacher stage's EncoderConfig; ConfigError when its head is of another
  kind (sequence / token) or has another number of classes than the task."""
  cfg, _ = checkpoints.load_model_config(teacher_dir)
  if cfg.num_labels != num_classes or cfg.head != head:
    raise ConfigError(f"{teacher_dir / 'model_config.json'}: teacher has a {cfg.head} head "
                      f"with num_labels={cfg.num_labels} but task {task!r} has {num_classes} "
                      f"{head} labels (config.teacher.checkpoint)")
  return cfg


def _pretrained_config(name: str, num_labels: int, head: str | None = "sequence"
                       ) -> EncoderConfig:
  """The EncoderConfig of a pretrained model from its config.json alone (no weights)."""
  model_dir = hf_io.resolve_model_dir(name)
  return hf_io.config_from_hf(hf_io.read_hf_config(model_dir), num_labels,
                              source=str(model_dir / "config.json"), head=head)


def _general_teacher_source(config: ml_collections.ConfigDict) -> tuple[str, bool]:
  """The teacher of general_distill, `config.general.teacher` (default `config.model`),
  and whether it is a kd_jax stage dir (else a pretrained model)."""
  name = config.general.teacher or config.model
  return name, checkpoints.is_stage_dir(epath.Path(name))


def check_all(config: ml_collections.ConfigDict, workdir: epath.Path, mesh) -> None:
  """Checks, before any stage trains, what the stages would otherwise find only when they
  start: each stage's batch sizes against `mesh`, the student's depth, width and layer
  maps against each teacher's shape, and the teacher dirs of `distill`. Reads
  config.json / model_config.json only, no weights; the checks are `student_config` and
  `layer_maps`, the functions the builders run.

  The teacher of `distill` is each of `teacher_dirs` (its model_config.json), or, for
  `<workdir>/teacher` trained in this run, `config.model`'s shape.
  Raises:
    config_base.ConfigError: naming the config field and the teacher's shape;
      `MissingPathError` (also a FileNotFoundError) for a teacher dir of `distill` that
      holds no model_config.json and is not trained by this run.
  """
  for stage in config.stages:
    section = STAGE_SECTIONS[stage]
    tc = config[section].train
    for field in ("batch_size", "eval_batch_size"):
      try:
        batching.check_batch_size(tc[field], sharding.batch_divisor(mesh))
      except ValueError as e:
        raise ConfigError(f"config.{section}.train.{field}={tc[field]} "
                          f"(stage {stage}, mesh {dict(mesh.shape)}): {e}") from e
  head, num_classes = (tasks.label_info(config.data)
                       if {"finetune_teacher", "distill"} & set(config.stages) else (None, 0))
  if "general_distill" in config.stages:
    name, is_stage = _general_teacher_source(config)
    teacher_cfg = (checkpoints.load_model_config(epath.Path(name))[0] if is_stage else
                   _pretrained_config(name, 0, head=None))
    student_cfg = student_config(teacher_cfg, config.student, init=config.general.init)
    layer_maps(config, teacher_cfg.num_layers, student_cfg.num_layers)
  if "distill" not in config.stages:
    return
  if config.student.vocab and not (epath.Path(config.student.vocab) / "vocab_mapping.json"
                                   ).is_file():
    raise MissingPathError(f"config.student.vocab={config.student.vocab!r}: no "
                           "vocab_mapping.json there; write the directory with python -m "
                           "kd_jax.vocab --min-frequency 1")
  from_general = config.student.init == "from_general"
  if from_general and not config.distill.kd:
    return  # no teacher: the general student's shape is checked when it is loaded
  trained_here = checkpoints.stage_dir(workdir, "finetune_teacher")
  for teacher_dir in teacher_dirs(config, workdir):
    if checkpoints.is_stage_dir(teacher_dir):
      teacher_cfg = _teacher_config(teacher_dir, config.data.task, head, num_classes)
    elif teacher_dir == trained_here and "finetune_teacher" in config.stages:
      teacher_cfg = _pretrained_config(config.model, num_classes, head)  # fine-tuning keeps it
    else:
      raise MissingPathError(
          f"{teacher_dir / 'model_config.json'} does not exist: config.teacher.checkpoint "
          f"must name finished finetune_teacher stage dirs (got "
          f"{config.teacher.checkpoint!r}), or add finetune_teacher to config.stages")
    num_layers = (config.student.num_layers if from_general else
                  student_config(teacher_cfg, config.student).num_layers)
    layer_maps(config, teacher_cfg.num_layers, num_layers)


# ---------------------------------------------------------------------------
# parts every builder uses
# ---------------------------------------------------------------------------
def _dropout(config: ml_collections.ConfigDict, classifier: bool = True) -> dict:
  out = {"hidden_dropout": config.hidden_dropout, "attention_dropout": config.attention_dropout}
  if classifier:
    out["classifier_dropout"] = config.hidden_dropout
  return out


def _modules(config: ml_collections.ConfigDict, cfg: EncoderConfig, overrides: Mapping
             ) -> tuple[Encoder, Encoder]:
  """(training module with dropout, evaluation module) at config.precision."""
  dtype = PRECISIONS[config.precision]
  return (Encoder(cfg.replace(**overrides, dtype=dtype), remat=config.remat,
                  scan_layers=config.scan_layers),
          Encoder(cfg.replace(dtype=dtype), scan_layers=config.scan_layers))


def _place_teachers(config: ml_collections.ConfigDict, teachers, mesh) -> tuple[Teacher, ...]:
  """[(EncoderConfig, host params)] -> Teachers on `mesh` at config.precision."""
  out = []
  for cfg, params in teachers:
    shardings = sharding.param_shardings(params, mesh)
    out.append(Teacher(Encoder(cfg.replace(dtype=PRECISIONS[config.precision]),
                               scan_layers=config.scan_layers),
                       sharding.shard_tree(params, shardings), shardings))
  return tuple(out)


def _projections(student_cfg: EncoderConfig, teacher_cfg: EncoderConfig | None,
                 weights: Mapping[str, float], rng) -> dict:
  """0.02-normal [H_S, H_T] kernels for the weighted terms with a projection, when the
  student is narrower than the teacher (TinyBERT's W_h); {} otherwise."""
  if teacher_cfg is None or student_cfg.hidden_size == teacher_cfg.hidden_size:
    return {}
  shape = (student_cfg.hidden_size, teacher_cfg.hidden_size)
  keys = jax.random.split(rng, len(losses.PROJECTION_KEYS))
  return {name: 0.02 * jax.random.normal(k, shape)
          for name, k in zip(losses.PROJECTION_KEYS, keys) if weights.get(name, 0) > 0}


def _schedule(section: str, tc: ml_collections.ConfigDict, data: batching.TokenizedData,
              buckets) -> tuple[int, int]:
  """(num_steps, steps_per_epoch): train.num_train_steps when >= 0 (0: evaluate the
  initialised model), else num_epochs epochs."""
  spe = batching.steps_per_epoch(data, tc.batch_size, buckets)
  if spe == 0:
    raise ConfigError(f"config.{section}.train.batch_size={tc.batch_size} is larger than "
                      "every length bucket of the training data")
  return (tc.num_train_steps if tc.num_train_steps >= 0 else math.ceil(tc.num_epochs * spe)), spe


def unpad_transforms(config: ml_collections.ConfigDict, mesh) -> tuple[Callable, ...]:
  """With `config.unpad`, the transform adding "token_index" (`unpad.token_index`, one
  group per batch shard of `mesh`, budget a multiple of `config.unpad_multiple`, or with
  0 of `unpad.default_multiple`: a sixteenth of a shard's positions). The batch is the
  global one, identical on every process, so every process computes the same budget."""
  if not config.unpad:
    return ()
  groups = sharding.batch_divisor(mesh)

  def add_token_index(batch, step):
    del step
    return {"token_index": unpad.token_index(batch["attention_mask"], groups,
                                             config.unpad_multiple)}
  return (add_token_index,)


def init_student(strategy: str, cfg: EncoderConfig, init_rng, head_rng, *,
                 config: ml_collections.ConfigDict, teacher_params: dict | None,
                 layer_map, general_dir: epath.Path | None = None) -> tuple[dict, Any]:
  """The student's initial host parameters and their provenance (None: not copied).

  `from_scratch`: random (init_rng); `from_teacher` / `from_base`: every other layer
  (`layer_map`) and evenly spaced width slices of the fine-tuned teacher or of the
  pretrained `config.model` (student_init; paper §2.2); an MLM head the source lacks
  keeps its random initialisation. `from_general`: the general_distill student of
  `general_dir` without its MLM head, plus a fresh classification head (head_rng).
  For from_base, the pretrained model gets a fresh head drawn from `head_rng` when `cfg`
  has a classification head.
  """
  if strategy == "from_general":
    return _from_general(general_dir, cfg, head_rng), None
  random_params = init_params(cfg, init_rng)
  if strategy == "from_scratch":
    return random_params, None
  source = teacher_params
  if strategy == "from_base":
    source = (hf_io.load_pretrained(config.model, num_labels=0)[1] if cfg.head == "mlm" else
              hf_io.load_pretrained(config.model, num_labels=cfg.num_labels, init_rng=head_rng,
                                    head="sequence")[1])
  fresh = {k: v for k, v in random_params.items() if k == "lm_head" and k not in source}
  target = {k: v for k, v in random_params.items() if k not in fresh}
  params, provenance = student_init.init_student(
      strategy, target, teacher_params=source if strategy == "from_teacher" else None,
      base_params=source if strategy == "from_base" else None, layer_map=layer_map)
  return {**params, **fresh}, provenance


def general_student_config(config: ml_collections.ConfigDict, general_dir: epath.Path,
                            num_classes: int, head: str = "sequence"
                            ) -> tuple[EncoderConfig, dict]:
  """(EncoderConfig with a `head` classifier of `num_classes`, model_config.json) of the
  general_distill student in `general_dir`. Raises MissingPathError / ConfigError naming
  the directory."""
  if not checkpoints.is_stage_dir(general_dir):
    raise MissingPathError(
        f"{general_dir / 'model_config.json'} does not exist: config.student.init="
        "'from_general' needs a finished general_distill stage (config.student.checkpoint, "
        "default <workdir>/general)")
  cfg, info = checkpoints.load_model_config(general_dir)
  if info.get("stage") != "general_distill" or cfg.head != "mlm":
    raise ConfigError(f"{general_dir}: config.student.checkpoint must be a general_distill "
                      f"stage dir (its model_config.json says stage={info.get('stage')!r})")
  sc = config.student
  if cfg.num_layers != sc.num_layers or (sc.hidden_size and cfg.hidden_size != sc.hidden_size):
    raise ConfigError(f"{general_dir}: the general student has {cfg.num_layers} layers of "
                      f"width {cfg.hidden_size}, but config.student.num_layers="
                      f"{sc.num_layers}, config.student.hidden_size={sc.hidden_size}")
  return cfg.replace(head=head, num_labels=num_classes), info


def _from_general(general_dir: epath.Path, cfg: EncoderConfig, head_rng) -> dict:
  params = checkpoints.restore_stage_params(general_dir, cfg.replace(head="mlm", num_labels=0))
  fresh = init_params(cfg, head_rng)
  params = {k: v for k, v in params.items() if k != "lm_head"}
  params.update({k: jax.tree.map(np.asarray, v) for k, v in fresh.items() if k not in params})
  logging.info("student init from_general: %s (MLM head dropped; new %s)", general_dir,
               sorted(k for k in fresh if k not in ("embeddings",) and not k.startswith("layer_")))
  return params


# ---------------------------------------------------------------------------
# the builders
# ---------------------------------------------------------------------------
def _task_data(config: ml_collections.ConfigDict, tokenizer
               ) -> tuple[tasks.TaskData, dict[str, batching.TokenizedData]]:
  """config.data's task (`tasks.load_task`) and its train/val/test, tokenised; every data
  error is raised here."""
  task = tasks.load_task(config.data, config.seed)
  max_length = config.data.max_length

  def tokenize(split):
    data = batching.tokenize_examples(task.splits[split], tokenizer, max_length,
                                      task.languages)
    logging.info("data %s: %d examples, %d truncated at %d tokens (%.2f%%)", split, len(data),
                 data.num_truncated, max_length, 100 * data.truncated_fraction)
    return data
  return task, {split: tokenize(split) for split in tasks.SPLITS}


def _teacher_metrics(config, workdir) -> list[dict]:
  """The test results of the teacher stages of `distill` (for the students' retention);
  [] where a teacher dir holds none."""
  out = []
  for teacher_dir in teacher_dirs(config, workdir):
    path = teacher_dir / checkpoints.FINISHED_FILES["finetune_teacher"]
    if path.exists():
      out.append(checkpoints.read_json(path))
  return out


def _classification(name: str, config, workdir, mesh, *, section: str, tokenizer, task, data,
                    model_cfg, params, teachers, objective, rngs, info,
                    teacher_metrics=(), student_ids: np.ndarray | None = None) -> StagePlan:
  """The plan of a stage that trains a sequence or token classifier (finetune_teacher,
  distill) on `task`; `teacher_metrics`: the teachers' test results (retention);
  `student_ids`: int32 [V_teacher], the student's id of each of the tokenizer's ids (a
  reduced vocabulary; -1: not in it), else the student reads the tokenizer's ids.
  `data["val"]` and `["test"]` are in the student's ids (padded with
  `model_cfg.pad_token_id`). With `config.compact_embeddings` the training module keeps
  only the embedding rows of the training data (`compact_embedding`)."""
  tc = config[section].train
  num_steps, spe = _schedule(section, tc, data["train"], config.data.buckets)
  train_cfg, embedding, lookup = model_cfg, None, student_ids
  if config.compact_embeddings:
    used = np.unique(np.concatenate(data["train"].input_ids))
    if student_ids is not None:
      used = np.unique(student_ids[used])
    params, train_cfg, embedding, rows_lookup = compact_embedding(params, model_cfg, used)
    lookup = rows_lookup if student_ids is None else np.where(
        student_ids >= 0, rows_lookup[student_ids], -1).astype(np.int32)
    logging.info("%s: the training batches touch %d of %d embedding rows; the optimizer "
                 "updates those (config.compact_embeddings)", name, len(embedding.rows),
                 model_cfg.vocab_size)
  transforms = () if lookup is None else (
      lambda batch, step: {"student_input_ids": lookup[batch["input_ids"]]},)
  student, _ = _modules(config, train_cfg, _dropout(config))
  _, eval_model = _modules(config, model_cfg, {})  # evaluation reads the full table
  kwargs = dict(batch_size=tc.eval_batch_size, buckets=config.data.buckets,
                pad_id=model_cfg.pad_token_id, mesh=mesh, label_names=task.label_names,
                label_kind=task.label_kind, seen_languages=task.seen_languages or None,
                unpad_multiple=config.unpad_multiple if config.unpad else None)
  teacher_cfg = teachers[0].model.config if teachers else None
  val = evaluation.ClassificationEvaluator(eval_model, data["val"], "val", **kwargs)
  return StagePlan(
      name=name, stage_dir=checkpoints.stage_dir(workdir, name), train=tc, num_steps=num_steps,
      steps_per_epoch=spe, model_config=model_cfg, student=student,
      params=jax.tree.map(jnp.asarray, params),
      projections=_projections(model_cfg, teacher_cfg, objective.weights, rngs["proj"]),
      teachers=teachers, objective=objective,
      batches=BatchStream(data["train"], tc.batch_size, tuple(config.data.buckets),
                          tokenizer.pad_token_id, config.seed,
                          transforms + unpad_transforms(config, mesh)),
      evaluator=val, final_evaluator=val.on(data["test"], "test", list(teacher_metrics)),
      keep="best", nonfinite=config.nonfinite, dropout_rng=rngs["dropout"], embedding=embedding,
      info=dict(info, stage=name, base_model=config.model, **task.info()),
      hparams={"stage": name, "num_train_steps": num_steps, "steps_per_epoch": spe,
               "train_examples": len(data["train"]),
               "train_truncated_fraction": data["train"].truncated_fraction},
      result_info={"train_truncated_fraction": data["train"].truncated_fraction})


def compact_embedding(params: dict, model_cfg: EncoderConfig, used_ids: np.ndarray,
                      multiple: int = 128
                      ) -> tuple[dict, EncoderConfig, CompactEmbedding, np.ndarray]:
  """The training module's parameters and config holding only the word-embedding rows
  `used_ids` (int [N] ids the training data holds), plus ids 0..pad_token_id (so the
  padding id, and with it the roberta family's position ids, keeps its index) and the
  next unused ids up to a multiple of `multiple` rows (even shapes for sharding).

  Returns (params with embeddings/word_embeddings/embedding [A, H], EncoderConfig with
  vocab_size A, CompactEmbedding(rows [A], table [V, H] float32 host copy), lookup int32
  [V]: the compact index of each id, -1 for ids not kept).
  Raises ValueError for ids outside 0..vocab_size-1 (`vocab.reduce_params`).
  """
  from kd_jax import vocab
  v = model_cfg.vocab_size
  used = np.asarray(used_ids, np.int64)
  if used.size and (used.min() < 0 or used.max() >= v):
    raise ValueError(f"token ids {int(used.min())}..{int(used.max())} outside the "
                     f"vocabulary of {v} embeddings")
  keep = np.zeros(v, bool)
  keep[used] = True
  keep[:model_cfg.pad_token_id + 1] = True
  extra = (-int(keep.sum())) % multiple
  keep[np.flatnonzero(~keep)[:extra]] = True
  rows = np.flatnonzero(keep).astype(np.int32)
  table = np.asarray(params["embeddings"]["word_embeddings"]["embedding"], np.float32)
  compact, compact_cfg = vocab.reduce_params(params, model_cfg, rows)
  return compact, compact_cfg, CompactEmbedding(rows, table), vocab.id_lookup(rows, v)


def _classification_rngs(config) -> dict:
  keys = jax.random.split(jax.random.PRNGKey(config.seed), 4)
  return dict(zip(("init", "head", "proj", "dropout"), keys))


def build_finetune_teacher(config, workdir, mesh) -> StagePlan:
  """The pretrained `config.model` with a fresh head, cross-entropy (config.teacher)."""
  rngs = _classification_rngs(config)
  tokenizer = hf_io.load_tokenizer(hf_io.resolve_model_dir(config.model))
  task, data = _task_data(config, tokenizer)
  model_cfg, params, _ = hf_io.load_pretrained(
      config.model, num_labels=task.num_labels, init_rng=rngs["head"],
      config_overrides=_dropout(config), head=task.label_kind)
  return _classification("finetune_teacher", config, workdir, mesh, section="teacher",
                         tokenizer=tokenizer, task=task, data=data, model_cfg=model_cfg,
                         params=params,
                         teachers=(), objective=Objective({"clf": 1.0}), rngs=rngs,
                         info={"layer_map": [], "loss_layer_map": [], "init": None})


def build_distill(config, workdir, mesh) -> StagePlan:
  """A student distilled from finished teacher stages (config.student, config.distill)."""
  rngs = _classification_rngs(config)
  sc, dc = config.student, config.distill
  tokenizer = hf_io.load_tokenizer(hf_io.resolve_model_dir(config.model))
  task, data = _task_data(config, tokenizer)
  num_classes = task.num_labels
  from_general = sc.init == "from_general"
  general_dir = epath.Path(sc.checkpoint or checkpoints.stage_dir(workdir, "general_distill"))
  host_teachers = []  # (EncoderConfig, host params); a from_general NON-KD run needs none
  if dc.kd or not from_general:
    for teacher_dir in teacher_dirs(config, workdir):
      cfg = _teacher_config(teacher_dir, config.data.task, task.label_kind, num_classes)
      host_teachers.append((cfg, checkpoints.restore_stage_params(teacher_dir, cfg)))
  layer_map, loss_layer_map = (), ()
  if from_general:
    model_cfg, general_info = general_student_config(config, general_dir, num_classes,
                                                     task.label_kind)
    layer_map = tuple(general_info.get("layer_map", ()))
  else:
    model_cfg = student_config(host_teachers[0][0], sc)
  if host_teachers:
    init_map, loss_layer_map = layer_maps(config, host_teachers[0][0].num_layers,
                                          model_cfg.num_layers)
    layer_map = layer_map if from_general else init_map
  if len(host_teachers) > 1 and sc.init == "from_teacher":
    logging.info("student init from_teacher: several teachers, copying from the first (%s)",
                 teacher_dirs(config, workdir)[0])
  params, provenance = init_student(
      sc.init, model_cfg, rngs["init"], rngs["head"], config=config, layer_map=layer_map,
      teacher_params=host_teachers[0][1] if host_teachers else None, general_dir=general_dir)
  if provenance:
    logging.info("student init %s:\n%s", sc.init, student_init.describe_provenance(provenance))
  student_ids, info = None, {}
  if sc.vocab:
    params, model_cfg, data, student_ids, info = reduced_vocab_student(
        config, params, model_cfg, data, task, tokenizer)
  objective, teachers = Objective({"clf": 1.0}), ()
  if dc.kd:
    objective = Objective({k: float(v) for k, v in dc.weights.items() if float(v) > 0},
                          tuple(loss_layer_map), dc.prediction_loss, dc.temperature,
                          float(dc.alpha))
    logging.info("distill: %d teacher(s), weights %s, alpha %s, loss layer map %s",
                 len(host_teachers), objective.weights, objective.alpha, list(loss_layer_map))
    teachers = _place_teachers(config, host_teachers, mesh)
  return _classification("distill", config, workdir, mesh, section="student",
                         tokenizer=tokenizer, task=task, data=data, model_cfg=model_cfg,
                         params=params, teachers=teachers, objective=objective, rngs=rngs,
                         info={"layer_map": list(layer_map),
                               "loss_layer_map": list(loss_layer_map), "init": sc.init,
                               **info},
                         teacher_metrics=_teacher_metrics(config, workdir),
                         student_ids=student_ids)


def reduced_vocab_student(config, params: dict, model_cfg: EncoderConfig,
                          data: Mapping[str, batching.TokenizedData], task: tasks.TaskData,
                          tokenizer):
  """A student with the reduced vocabulary of `config.student.vocab` (a dir written by
  `python -m kd_jax.vocab --min-frequency 1`; Abdaoui et al. 2020): its word-embedding
  rows are those of the kept tokens (`vocab.reduce_params`: the copied teacher's or
  base's rows, or random ones), the teachers keep reading the full tokenizer's ids, and
  a batch transform adds the student's ids of the same tokens (`student_input_ids`), so
  every position lines up for the layer-wise terms. Val and test (read by the student
  alone) are tokenised with the reduced tokenizer, as the exported student will be.
  `tokenizer`: the full one, that tokenised `data` (it names a missing token).

  Returns (params, EncoderConfig, data with val/test re-tokenised, student_ids: int32
  [V] the student's id of each full id (-1: dropped), info for model_config.json: the
  reduced dir, whose tokenizer export and evaluation use).
  Raises:
    MissingPathError: no vocab_mapping.json in the dir.
    ConfigError: a vocabulary made with min_frequency > 1 (texts would tokenize
      differently, so positions would not line up), or one that is not the teacher's
      tokenizer's (more ids than the teacher has embeddings).
    DataError: a training text with a token the reduced vocabulary lacks, naming the
      example, language and token (make the vocabulary from the training texts).
  """
  from kd_jax import vocab
  from kd_jax.data.schema import DataError
  where = f"config.student.vocab={config.student.vocab!r}"
  try:
    kept, mapping = vocab.read_mapping(config.student.vocab)
  except FileNotFoundError as e:
    raise MissingPathError(f"{where}: {e}") from e
  if int(mapping.get("min_frequency", 1)) != 1:
    raise ConfigError(f"{where} was made with --min-frequency {mapping['min_frequency']}: "
                      "texts with a dropped token tokenize differently, so student and "
                      "teacher positions would not line up; make it with --min-frequency 1")
  if kept.max() >= model_cfg.vocab_size:
    raise ConfigError(f"{where}: its mapping names id {int(kept.max())}, but the model has "
                      f"{model_cfg.vocab_size} embeddings (another tokenizer's vocabulary?)")
  lookup = vocab.id_lookup(kept, model_cfg.vocab_size)
  train = data["train"]
  for i, ids in enumerate(train.input_ids):
    missing = ids[lookup[ids] < 0]
    if len(missing):
      raise DataError(
          f"{where}: train example {i} ({train.language_order[train.language_ids[i]]}) "
          f"has token {tokenizer.convert_ids_to_tokens(int(missing[0]))!r} (id "
          f"{int(missing[0])}), which the reduced vocabulary lacks; make it from a corpus "
          f"holding the task's training texts ({list(task.train_languages)})")
  params, model_cfg = vocab.reduce_params(params, model_cfg, kept)
  # Val and test as the exported student meets them: through its own tokenizer.
  own = hf_io.load_tokenizer(config.student.vocab)
  data = dict(data, **{split: batching.tokenize_examples(
      task.splits[split], own, config.data.max_length, task.languages)
      for split in ("val", "test")})
  logging.info("student vocabulary %s: %d of %d tokens", config.student.vocab, len(kept),
               len(lookup))
  return params, model_cfg, data, lookup, {"tokenizer": str(config.student.vocab),
                                            "vocab_size_full": int(len(lookup))}


def load_general_teacher(config) -> tuple[EncoderConfig, dict, str]:
  """The teacher of general_distill: a kd_jax stage dir gives its kept parameters;
  anything else is loaded with `hf_io.load_pretrained(..., num_labels=0)`, which keeps an
  MLM head when the checkpoint's architecture has one (`*ForMaskedLM`).
  Returns (EncoderConfig, host params, the name used)."""
  name, is_stage = _general_teacher_source(config)
  if is_stage:
    cfg, _ = checkpoints.load_model_config(epath.Path(name))
    return cfg, checkpoints.restore_stage_params(epath.Path(name), cfg), name
  cfg, params, _ = hf_io.load_pretrained(name, num_labels=0)
  return cfg, params, name


def build_general_distill(config, workdir, mesh) -> StagePlan:
  """A student with an MLM head distilled on unlabeled text (config.general): teacher and
  student see the same dynamically masked batch (kd_jax.masking, a pure function of
  (seed, step)); the objective is config.general.weights over losses.GENERAL_TERMS."""
  gc, tc = config.general, config.general.train
  init_rng, proj_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
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
  needs_mlm = sorted(t for t in weights if losses.TERMS[t].mlm and losses.TERMS[t].needs_teacher)
  if needs_mlm and teacher_cfg.head != "mlm":
    raise ConfigError(
        f"config.general.weights.{needs_mlm[0]} > 0 needs a teacher with an MLM head, but the "
        f"teacher {teacher_name!r} (config.general.teacher, default config.model) has head "
        f"{teacher_cfg.head!r}; use a *ForMaskedLM checkpoint or a general_distill stage dir, "
        "or set those weights to 0")
  if spec.vocab_size > teacher_cfg.vocab_size:
    raise ConfigError(f"the tokenizer of config.model has {spec.vocab_size} tokens but the "
                      f"teacher {teacher_name!r} only {teacher_cfg.vocab_size} embeddings")
  model_cfg = student_config(teacher_cfg, config.student, init=gc.init).replace(
      head="mlm", num_labels=0)
  layer_map, loss_layer_map = layer_maps(config, teacher_cfg.num_layers, model_cfg.num_layers)
  params, provenance = init_student(gc.init, model_cfg, init_rng, None, config=config,
                                    teacher_params=teacher_params, layer_map=layer_map)
  if provenance:
    logging.info("general student init %s from %s:\n%s", gc.init, teacher_name,
                 student_init.describe_provenance(provenance))
  teachers = ()
  if any(losses.TERMS[t].needs_teacher for t in weights):
    teachers = _place_teachers(config, [(teacher_cfg, teacher_params)], mesh)
  logging.info("general_distill: teacher %s, weights %s, loss layer map %s", teacher_name,
               weights, list(loss_layer_map))
  num_steps, spe = _schedule("general", tc, data.train, gc.buckets)
  student, eval_model = _modules(config, model_cfg, _dropout(config, classifier=False))
  heldout = evaluation.MLMEvaluator(eval_model, data.heldout, spec, batch_size=tc.eval_batch_size,
                                    buckets=gc.buckets, pad_id=tokenizer.pad_token_id,
                                    seed=config.seed, mesh=mesh)
  mask = lambda batch, step: masking.mask_tokens(
      masking.masking_rng(config.seed, masking.TRAIN_STREAM, step), batch["input_ids"],
      batch["attention_mask"], spec)
  return StagePlan(
      name="general_distill", stage_dir=checkpoints.stage_dir(workdir, "general_distill"),
      train=tc, num_steps=num_steps, steps_per_epoch=spe, model_config=model_cfg,
      student=student, params=params,
      projections=_projections(model_cfg, teacher_cfg if teachers else None, weights, proj_rng),
      teachers=teachers,
      objective=Objective(weights, tuple(loss_layer_map), "mse", float(gc.temperature)),
      batches=BatchStream(data.train, tc.batch_size, tuple(gc.buckets), tokenizer.pad_token_id,
                          config.seed, (mask,) + unpad_transforms(config, mesh)),
      evaluator=heldout, final_evaluator=heldout, keep="final", nonfinite=config.nonfinite,
      dropout_rng=dropout_rng,
      info={"stage": "general_distill", "base_model": config.model, "teacher": teacher_name,
            "layer_map": list(layer_map), "loss_layer_map": list(loss_layer_map),
            "init": gc.init, "weights": weights, "text_sources": list(data.train.language_order),
            "train_texts": len(data.train), "heldout_texts": len(data.heldout)},
      hparams={"stage": "general_distill", "num_train_steps": num_steps, "steps_per_epoch": spe,
               "train_texts": len(data.train), "heldout_texts": len(data.heldout),
               "mask_rate": float(gc.mask_rate)},
      result_info={"teacher": teacher_name, "weights": weights})


BUILDERS = {"finetune_teacher": build_finetune_teacher, "general_distill": build_general_distill,
            "distill": build_distill}


def build(name: str, config: ml_collections.ConfigDict, workdir: epath.Path, mesh) -> StagePlan:
  """The plan of stage `name` (config_base.STAGES). Loads data, teachers and the initial
  student; raises every input error (ConfigError, MissingPathError, data errors,
  checkpoint mismatches) before anything trains."""
  return BUILDERS[name](config, workdir, mesh)
