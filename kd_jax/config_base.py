"""The full set of config fields with their defaults; `configs/*.py` start from here.

Every field the loop reads is defined here once, so an override of an unknown field
(`--config.student.nmu_layers=4`) is an error from ml_collections, not silently ignored.
`validate_config` checks the values of those fields (one function per section) before any
stage trains; it needs no training module, so nothing here imports `kd_jax.train`.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from kd_jax import losses, sharding, student_init
from kd_jax.data import batching, tasks

# The stages of config.stages, in the order they run.
STAGES = ("finetune_teacher", "general_distill", "distill")
# The config section of each stage (its .train holds the stage's optimiser); also the name
# of the stage's directory under the workdir.
STAGE_SECTIONS = {"finetune_teacher": "teacher", "general_distill": "general",
                  "distill": "student"}
# config.student.init: student_init.STRATEGIES plus the student of a general_distill stage.
INIT_STRATEGIES = ("from_scratch", "from_base", "from_teacher", "from_general")
# config.precision -> compute dtype (EncoderConfig.dtype); parameters stay float32.
PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
# config.nonfinite: what a step with a non-finite loss term or gradient does.
NONFINITE_MODES = ("stop", "skip")
# Longest sequence the position embeddings cover (data.max_length, general.max_length).
_MAX_POSITIONS = 512


class ConfigError(ValueError):
  """A config field (or flag) whose value kd_jax cannot run; the message names the field.
  Raised before any stage trains (`config_base.validate_config`,
  `stages.check_all`, `stages.build`); `kd_jax.main` prints it as one line."""


class MissingPathError(ConfigError, FileNotFoundError):
  """A config path field that names a file or directory which does not exist."""


def train_config(**overrides) -> ml_collections.ConfigDict:
  """Optimiser and schedule of one stage (AdamW, warmup then linear decay)."""
  tc = ml_collections.ConfigDict(dict(
      batch_size=32,              # global batch; a multiple of the mesh's data axis
      eval_batch_size=64,
      num_epochs=2.0,             # used when num_train_steps < 0
      # < 0: num_epochs; 0: no training step, the initialised model is evaluated as it is
      # (the paper's Table 5: a copied student without fine-tuning); > 0: that many steps
      num_train_steps=-1,
      learning_rate=5e-5,
      warmup_ratio=0.1,           # share of the steps with linear warmup
      weight_decay=0.01,
      max_grad_norm=1.0,
      eval_every_steps=250,       # val macro-F1; the best step is checkpointed
      checkpoint_every_steps=250,  # latest state, for resuming
      log_every_steps=50,
      stop_after_steps=-1,        # > 0: stop (as if preempted) after this step
  ))
  tc.update(overrides)
  return tc


def base_config() -> ml_collections.ConfigDict:
  """Every config field with its default: tsm, e5-small teacher, 6-layer TinyBERT student."""
  config = ml_collections.ConfigDict()
  # Pretrained model: the teacher's starting point, the from_base source and the tokenizer.
  # A local HF directory, a hub id (xlm-roberta-base), or an offline short name.
  config.model = "multilingual-e5-small"
  config.stages = ("finetune_teacher", "distill")
  config.seed = 0
  config.hidden_dropout = 0.1
  config.attention_dropout = 0.1

  config.data = ml_collections.ConfigDict(dict(
      # kd_jax.data.tasks: tsm | sib200 | massive | uner | hf:<id or dir>[:<config>]
      # (a "{language}" config: one per language) | tfds:<name>[/<config>] | files:<glob>
      task="tsm",
      # "" -> $KD_JAX_DATA_DIR (the folder of xlmt/, sib200/, massive/, uner/) -> the hub
      # copy through `datasets`; tfds: the TFDS data dir.
      data_dir="",
      # Columns of hf / tfds / files sources; "" -> text|sentence, label, tokens,
      # tags|ner_tags, no text_pair, no language column (every example in language "all").
      columns=ml_collections.ConfigDict(dict(text="", text_pair="", label="", language="",
                                             tokens="", tags="")),
      label_kind="",              # "" -> token when tokens and tags columns exist, else sequence
      label_names=(),             # () -> the source's ClassLabel names, else sorted train values
      languages=(),               # evaluated (and trained, unless train_languages); () -> all
      train_languages=(),         # e.g. seen languages only, ("english",) for Tables 3-4
      seen_languages=(),          # reported as seen; () -> train_languages when set
      unseen_languages=(),        # evaluated only (zero-shot), added to languages
      train_fraction=1.0,         # per-language share of train kept (seeded, stratified)
      eval_fraction=1.0,          # per-language share of val and test kept
      # seed of those subsets; -1 -> config.seed. A study fixes it, so that runs of every
      # seed train on the same subset and are tested on the same sentences as their teacher.
      subset_seed=-1,
      max_length=128,
      buckets=(32, 64, 128),      # batches are padded to the smallest bucket that fits
  ))

  config.teacher = ml_collections.ConfigDict(dict(
      # distill: teacher stage dir; "" -> <workdir>/teacher. Several teachers: a tuple of
      # stage dirs (or "dir1,dir2" on the command line); the prediction target is then the
      # mean of their logits and representation terms (att, hid, ...) are an error.
      checkpoint=config_dict.FieldReference("", field_type=object),
      train=train_config(),
  ))

  config.student = ml_collections.ConfigDict(dict(
      # from_teacher | from_base | from_scratch (paper §2.2) | from_general (the student
      # of a general_distill stage, MLM head dropped, fresh classification head)
      init="from_teacher",
      checkpoint="",              # from_general: general_distill stage dir; "" -> <workdir>/general
      num_layers=6,
      hidden_size=0,              # 0 -> the teacher's; narrower slices weights evenly
      # A reduced vocabulary (a dir written by python -m kd_jax.vocab --min-frequency 1):
      # the student keeps only those tokens' embedding rows and reads the mapped ids of
      # the batch the teacher reads with its own (Abdaoui et al. 2020). "" -> the full one.
      vocab="",
      layer_map=(),               # 1-based teacher layer per student layer; () -> the strategy
      # which teacher layer initialises student layer m (N teacher, M student layers):
      # uniform g(m) = m*N/M (paper eq. 5) | top g(m) = m+N-M | bottom g(m) = m | explicit
      layer_map_strategy="uniform",
      train=train_config(),
  ))

  config.distill = ml_collections.ConfigDict(dict(
      kd=True,                    # False: cross-entropy only (NON-KD)
      # TinyBERT terms + cross-entropy, paper §2.1: L = L_att + L_hid + L_embd + L_pred + L_clf.
      # Off by default: soft_ce (Hinton soft cross-entropy, T^2-scaled), pkd (PKD normalised
      # [CLS] MSE over mapped layers), cos (DistilBERT 1 - cos, last layer), att_kl (KL of
      # attention distributions over mapped layers), minilm (MiniLM last-layer attention KL +
      # value-relation KL). See kd_jax.losses.distillation_loss.
      weights=ml_collections.ConfigDict(dict(att=1.0, hid=1.0, embd=1.0, pred=1.0, clf=1.0,
                                             soft_ce=0.0, pkd=0.0, cos=0.0, att_kl=0.0,
                                             minilm=0.0)),
      prediction_loss="mse",      # mse (paper) | kl (Hinton et al., scaled by T^2)
      temperature=1.0,            # of pred with kl, and of soft_ce
      # alpha >= 0: L = alpha * L_clf + (1 - alpha) * sum_k w_k L_k over the KD terms, and
      # weights.clf is ignored (experiment plan: alpha = 0.2 best). < 0: off, plain sum.
      alpha=-1.0,
      # Layer map of the layer-wise losses (att, hid, pkd, att_kl): "" -> the student's
      # initialisation map; else uniform | top | bottom | last (only student layer M <-
      # teacher layer N) | explicit (with layer_map).
      layer_map_strategy="",
      layer_map=(),               # explicit 1-based teacher layer per student layer
  ))

  # general_distill stage (stages.build_general_distill): task-agnostic distillation with masked
  # language modelling on unlabeled text -> <workdir>/general. The student has the
  # architecture of config.student (num_layers, hidden_size, layer maps) and an MLM head
  # tied to its word embeddings; start task training from it with
  # student.init="from_general" (student.checkpoint: this stage's dir).
  config.general = ml_collections.ConfigDict(dict(
      # "" -> config.model (pretrained); else an HF dir / hub id / offline name, or a
      # kd_jax stage dir (its final, else best, parameters).
      teacher="",
      init="from_teacher",        # from_teacher | from_base | from_scratch (of this stage)
      # Text: files with one text per line, and the text side of train splits (read from
      # config.data.data_dir or $KD_JAX_DATA_DIR): tsm languages, SIB-200 lang_Script dirs.
      text_files=(),
      tsm_languages=(),
      sib200_languages=(),
      heldout_size=512,           # texts held out (seeded) for MLM loss / accuracy
      mask_rate=0.15,             # BERT dynamic masking: 80% [MASK], 10% random, 10% kept
      max_length=128,
      buckets=(32, 64, 128),
      # Loss terms (kd_jax.losses.distillation_loss): mlm (student MLM cross-entropy),
      # mlm_kl (T^2 KL to the teacher's MLM logits), mlm_mse, and the representation
      # terms att, hid, embd (TinyBERT), cos, pkd, att_kl, minilm. mlm_kl / mlm_mse need a
      # teacher with an MLM head. Default: TinyBERT's multilayer objective + MLM.
      weights=ml_collections.ConfigDict(dict(att=1.0, hid=1.0, embd=1.0, mlm=1.0, mlm_kl=0.0,
                                             mlm_mse=0.0, cos=0.0, pkd=0.0, att_kl=0.0,
                                             minilm=0.0)),
      temperature=1.0,            # of mlm_kl
      train=train_config(num_epochs=1.0, learning_rate=1e-4),
  ))

  # Device mesh (kd_jax/sharding.py): data * fsdp * tensor must equal the device count; one
  # axis may be -1 (the remaining devices). The batch is split over (data, fsdp); parameters,
  # optimizer state and the teacher over fsdp (hidden dims) and tensor (mlp, heads, vocab).
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # fp32 | bf16: compute dtype of student and teacher; parameters, optimizer state, softmax,
  # LayerNorm and losses stay float32.
  config.precision = "fp32"
  # A step with a non-finite loss term or gradient: "stop" raises naming the step and the
  # terms; "skip" leaves parameters and optimizer state unchanged (counted in the metrics).
  config.nonfinite = "stop"
  # True: recompute each student layer in the backward pass (jax.checkpoint per layer),
  # trading about one extra forward pass for activation memory.
  config.remat = False
  # True: student and teacher run their layers as one jax.lax.scan (one compiled layer body
  # per encoder; loss terms and optimizer stay per layer). Same parameters and results, other
  # dropout masks (Encoder.scan_layers). Pays off for deep or small models; README, Benchmark.
  config.scan_layers = False
  # True: training steps and evaluation run the encoders' token-wise work (dense layers,
  # LayerNorm, GELU, dropout) on the real tokens only (kd_jax.models.unpad); attention stays
  # [B, T]. Same results on real tokens, other dropout draws; ~20 % faster at a quarter
  # padding on CPU.
  config.unpad = False
  # Token budget granularity of `unpad`: each step's budget (real tokens of the fullest
  # batch shard) is rounded up to a multiple of this; one compilation per distinct budget.
  # 0: a sixteenth of a shard's padded positions (at most 16 budgets per padded shape).
  config.unpad_multiple = 0
  # True: a classification stage's optimizer updates only the word-embedding rows that its
  # training data uses (stages.compact_embedding); the others only see weight decay, applied
  # in closed form. Same parameters as False up to float32 rounding; on a 250k vocabulary
  # the AdamW update of the other rows is most of a small student's step on CPU.
  config.compact_embeddings = True
  # JAX's persistent compilation cache (paths.enable_compilation_cache): "auto" (JAX's own
  # $JAX_COMPILATION_CACHE_DIR if set, else $KD_JAX_CACHE/xla or ~/.cache/kd_jax/models/xla),
  # "off", or a directory. A second run of the same shapes skips XLA compilation.
  config.compilation_cache = "auto"
  return config


# ---------------------------------------------------------------------------
# validation: everything that can be wrong is found before training starts
# ---------------------------------------------------------------------------
def split_checkpoints(value) -> tuple[str, ...]:
  """config.teacher.checkpoint as a tuple of paths: "" -> (), "a" -> ("a",),
  "a,b" (command line) or ("a", "b") (config file) -> ("a", "b"). Entries are stripped
  and empty ones dropped ("a, b" -> ("a", "b")). Raises nothing."""
  if isinstance(value, str):
    value = value.split(",")
  return tuple(str(v).strip() for v in value if str(v).strip())


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the values of `config` (a `base_config()` tree), section by section.

  Raises:
    ConfigError (a ValueError) naming the first bad field, e.g.
    "config.student.init='x' is not valid; choose from [...]" for an unknown name,
    "config.mesh.data=0 must be an int >= 1 or -1 (the rest)" for a bad number,
    "config.distill.weights.mlm: MLM terms need masked text; ..." for a field that
    contradicts another.
  """
  _validate_stages(config)
  _validate_data(config)
  _validate_student(config)
  _validate_distill(config)
  _validate_train(config)
  _validate_general(config)
  _validate_runtime(config)


def _check(field: str, value, valid) -> None:
  if value not in valid:
    raise ConfigError(f"config.{field}={value!r} is not valid; choose from {list(valid)}")


def _check_buckets(section: str, fields: ml_collections.ConfigDict) -> None:
  try:
    batching.validate_buckets(fields.buckets, fields.max_length)
  except ValueError as e:
    raise ConfigError(f"config.{section}.buckets={tuple(fields.buckets)}, "
                      f"config.{section}.max_length={fields.max_length}: {e}") from e


def _check_max_length(section: str, max_length: int) -> None:
  if max_length > _MAX_POSITIONS:
    raise ConfigError(f"config.{section}.max_length={max_length} exceeds "
                      f"{_MAX_POSITIONS} positions")


def _validate_stages(config: ml_collections.ConfigDict) -> None:
  """config.stages: known stage names."""
  for stage in config.stages:
    _check("stages", stage, STAGES)


def _validate_data(config: ml_collections.ConfigDict) -> None:
  """config.data: the task's name (its languages, columns and labels are checked when it
  is read, kd_jax.data.tasks.load_task), label kind, fractions, buckets and max_length."""
  dc = config.data
  try:
    tasks.parse_task(dc.task)
  except ValueError as e:
    raise ConfigError(f"config.data.task={dc.task!r}: {e}") from e
  _check("data.label_kind", dc.label_kind, ("",) + tasks.LABEL_KINDS)
  for field in ("train_fraction", "eval_fraction"):
    if not 0 < float(dc[field]) <= 1:
      raise ConfigError(f"config.data.{field}={dc[field]} must be in (0, 1]")
  if not isinstance(dc.subset_seed, int) or dc.subset_seed < -1:
    raise ConfigError(f"config.data.subset_seed={dc.subset_seed!r} must be an int >= 0, or -1 "
                      "(config.seed)")
  _check_buckets("data", dc)
  _check_max_length("data", dc.max_length)


def _validate_student(config: ml_collections.ConfigDict) -> None:
  """config.student: initialisation strategy and its layer map strategy."""
  _check("student.init", config.student.init, INIT_STRATEGIES)
  _check("student.layer_map_strategy", config.student.layer_map_strategy,
         student_init.INIT_LAYER_MAP_STRATEGIES)


def _validate_distill(config: ml_collections.ConfigDict) -> None:
  """config.distill: loss terms and weights, prediction loss, layer map, alpha; and the
  terms several teachers (config.teacher.checkpoint) can define."""
  dc = config.distill
  _check("distill.prediction_loss", dc.prediction_loss, losses.PREDICTION_LOSSES)
  for term in dc.weights:
    _check("distill.weights", term, losses.DISTILL_TERMS)
    if float(dc.weights[term]) < 0:
      raise ConfigError(f"config.distill.weights.{term}={dc.weights[term]} is negative")
  for term in losses.MLM_TERMS:
    if float(dc.weights.get(term, 0.0)) > 0:
      raise ConfigError(f"config.distill.weights.{term}: MLM terms need masked text; they "
                        "belong in config.general.weights (stage general_distill)")
  _check("distill.layer_map_strategy", dc.layer_map_strategy,
         ("",) + student_init.LAYER_MAP_STRATEGIES)
  alpha = float(dc.alpha)
  if alpha > 1:
    raise ConfigError(f"config.distill.alpha={alpha} must be in [0, 1] (or negative: off)")
  teacher_dirs = split_checkpoints(config.teacher.checkpoint)
  if len(teacher_dirs) > 1 and dc.kd and "distill" in config.stages:
    # The target of several teachers is the mean of their logits; their hidden states,
    # attention and values live in unrelated bases (and may differ in width, depth and
    # heads), so a mean of them is no representation to distill from.
    bad = [t for t in losses.INTERMEDIATE_TERMS if float(dc.weights.get(t, 0)) > 0]
    if bad:
      raise ConfigError(
          f"config.teacher.checkpoint names {len(teacher_dirs)} teachers, but "
          + ", ".join(f"config.distill.weights.{t}={dc.weights[t]}" for t in bad)
          + " > 0: with several teachers only the logit terms (pred, soft_ce, clf) are "
          "defined (target = mean of the teachers' logits); set those weights to 0")


def _validate_train(config: ml_collections.ConfigDict) -> None:
  """config.teacher/student/general.train: batch sizes and a stage length."""
  for name in STAGE_SECTIONS.values():
    tc = config[name].train
    if tc.batch_size < 1 or tc.eval_batch_size < 1:
      raise ConfigError(f"config.{name}.train.batch_size and eval_batch_size must be >= 1")
    if tc.num_train_steps < 0 and tc.num_epochs <= 0:
      raise ConfigError(f"config.{name}.train: set num_train_steps >= 0 or num_epochs > 0")


def _validate_general(config: ml_collections.ConfigDict) -> None:
  """config.general: init and loss terms always; masking, text and lengths when the
  general_distill stage runs."""
  gc = config.general
  _check("general.init", gc.init, student_init.STRATEGIES)
  for term in gc.weights:
    _check("general.weights", term, losses.GENERAL_TERMS)
    if float(gc.weights[term]) < 0:
      raise ConfigError(f"config.general.weights.{term}={gc.weights[term]} is negative")
  if "general_distill" not in config.stages:
    return
  if not any(float(v) > 0 for v in gc.weights.values()):
    raise ConfigError("config.general.weights: no term has a positive weight")
  if not 0 < float(gc.mask_rate) <= 1:
    raise ConfigError(f"config.general.mask_rate={gc.mask_rate} must be in (0, 1]")
  if gc.heldout_size < 1:
    raise ConfigError(f"config.general.heldout_size={gc.heldout_size} must be >= 1")
  _check_buckets("general", gc)
  _check_max_length("general", gc.max_length)
  if not (gc.text_files or gc.tsm_languages or gc.sib200_languages):
    raise ConfigError("config.general: no text; set text_files, tsm_languages or "
                      "sib200_languages")


def _validate_runtime(config: ml_collections.ConfigDict) -> None:
  """How the steps run: precision, nonfinite, remat, scan_layers, unpad, unpad_multiple,
  compact_embeddings, compilation_cache and the device mesh."""
  _check("precision", config.precision, PRECISIONS)
  _check("nonfinite", config.nonfinite, NONFINITE_MODES)
  for field in ("remat", "scan_layers", "unpad", "compact_embeddings"):
    _check(field, config[field], (False, True))
  if not config.compilation_cache:
    raise ConfigError(f"config.compilation_cache={config.compilation_cache!r} must be "
                      "'auto', 'off' or a directory")
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
