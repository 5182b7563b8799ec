"""General (task-agnostic) distillation on unlabeled text, then task fine-tuning on tsm.

Stage 1, general_distill -> <workdir>/general: the pretrained model (e5-small) teaches a
6-layer from_teacher student on the text of the tsm and SIB-200 train splits with
dynamic BERT masking; objective TinyBERT's multilayer terms (att, hid, embd) + the
student's MLM cross-entropy (e5-small has no MLM head, so mlm_kl / mlm_mse need another
teacher). Stage 2, distill -> <workdir>/student: the student starts from the general
weights (student.init=from_general; MLM head dropped, fresh classification head) and is
fine-tuned on tsm with cross-entropy (distill.kd=False), so no fine-tuned teacher is
needed.

  python -m kd_jax.main --config configs/general_distill.py --workdir runs/general

Sized for ~25 minutes on a 2-core CPU (a demonstration, not a converged run): 60 general
steps of 32 texts (~10 s each: the MLM logits over e5's 250k-token vocabulary dominate),
then 150 fine-tuning steps (~3 s each) and evaluation on half of val / test.

Task distillation instead of plain fine-tuning (TinyBERT's two stages):
  --config.stages='("finetune_teacher", "general_distill", "distill")' --config.distill.kd=True
Other objectives: --config.general.weights.mlm_kl=1 (needs a teacher with an MLM head,
--config.general.teacher=<HF dir or general stage dir>), --config.general.weights.cos=1, ...
"""

from kd_jax.config_base import base_config, train_config
from kd_jax.data.tsm import TSM_LANGUAGES

# SIB-200 languages whose text is used (tsm's eight languages and a few more scripts).
SIB200_LANGUAGES = ("arb_Arab", "eng_Latn", "fra_Latn", "deu_Latn", "hin_Deva", "ita_Latn",
                    "por_Latn", "spa_Latn", "zho_Hans", "rus_Cyrl", "ind_Latn", "swh_Latn")


def get_config():
  config = base_config()
  config.stages = ("general_distill", "distill")
  config.general.tsm_languages = TSM_LANGUAGES
  config.general.sib200_languages = SIB200_LANGUAGES
  config.general.max_length = 64
  config.general.buckets = (32, 64)
  config.general.train = train_config(num_train_steps=60, learning_rate=1e-4, batch_size=32,
                                      eval_batch_size=64, eval_every_steps=30,
                                      checkpoint_every_steps=20, log_every_steps=5)
  config.student.init = "from_general"
  config.distill.kd = False
  config.data.max_length = 64
  config.data.buckets = (32, 64)
  config.data.eval_fraction = 0.5       # 162 val / 435 test tweets per language
  config.student.train = train_config(num_train_steps=150, learning_rate=1e-4, batch_size=32,
                                      eval_every_steps=75, checkpoint_every_steps=75,
                                      log_every_steps=10)
  return config
