"""The full set of config fields with their defaults; `configs/*.py` start from here.

Every field the loop reads is defined here once, so an override of an unknown field
(`--config.student.nmu_layers=4`) is an error from ml_collections, not silently ignored.
"""

import ml_collections
from ml_collections import config_dict

from kd_jax.data.tsm import TSM_LANGUAGES


class ConfigError(ValueError):
  """A config field (or flag) whose value kd_jax cannot run; the message names the field.
  Raised before any stage trains (`train.validate_config`, `train.check_before_training`);
  `kd_jax.main` prints it as one line."""


class MissingPathError(ConfigError, FileNotFoundError):
  """A config path field that names a file or directory which does not exist."""


def train_config(**overrides) -> ml_collections.ConfigDict:
  """Optimiser and schedule of one stage (AdamW, warmup then linear decay)."""
  tc = ml_collections.ConfigDict(dict(
      batch_size=32,              # global batch; a multiple of the mesh's data axis
      eval_batch_size=64,
      num_epochs=2.0,             # used when num_train_steps <= 0
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
  config = ml_collections.ConfigDict()
  # Pretrained model: the teacher's starting point, the from_base source and the tokenizer.
  # A local HF directory, a hub id (xlm-roberta-base), or an offline short name.
  config.model = "multilingual-e5-small"
  config.stages = ("finetune_teacher", "distill")
  config.seed = 0
  config.hidden_dropout = 0.1
  config.attention_dropout = 0.1

  config.data = ml_collections.ConfigDict(dict(
      name="tsm",
      data_dir="",                # "" -> $KD_JAX_DATA_DIR -> hub copy through `datasets`
      languages=TSM_LANGUAGES,    # evaluated languages (and trained, unless train_languages)
      train_languages=(),         # e.g. seen languages only, for zero-shot transfer
      seen_languages=(),          # reported as seen/unseen averages when set
      train_fraction=1.0,         # per-language share of train kept (seeded)
      eval_fraction=1.0,          # per-language share of val and test kept
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

  # general_distill stage (train.run_general_stage): task-agnostic distillation with masked
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
  # True: training steps run the encoders' token-wise work (dense layers, LayerNorm, GELU,
  # dropout) on the real tokens only (kd_jax.models.unpad); attention stays [B, T]. Same
  # results on real tokens, other dropout draws; ~20 % faster at a quarter padding on CPU.
  config.unpad = False
  # Token budget granularity of `unpad`: each step's budget (real tokens of the fullest
  # batch shard) is rounded up to a multiple of this; one compilation per distinct budget.
  # 0: a sixteenth of a shard's padded positions (at most 16 budgets per padded shape).
  config.unpad_multiple = 0
  return config
