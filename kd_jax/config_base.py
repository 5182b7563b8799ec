"""The full set of config fields with their defaults; `configs/*.py` start from here.

Every field the loop reads is defined here once, so an override of an unknown field
(`--config.student.nmu_layers=4`) is an error from ml_collections, not silently ignored.
"""

import ml_collections

from kd_jax.data.tsm import TSM_LANGUAGES


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
      checkpoint="",              # distill: teacher stage dir; "" -> <workdir>/teacher
      train=train_config(),
  ))

  config.student = ml_collections.ConfigDict(dict(
      init="from_teacher",        # from_teacher | from_base | from_scratch (paper §2.2)
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

  config.mesh = ml_collections.ConfigDict(dict(data=-1))  # -1: all devices on the data axis
  return config
