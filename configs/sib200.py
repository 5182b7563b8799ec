"""SIB-200 topic classification (7 classes): e5-small teacher, then a 6-layer student.

Trained on the full train splits of 12 languages in 9 scripts, evaluated on those
(seen) and on 4 more (unseen, zero-shot: Telugu, Yoruba, Khmer, Ukrainian).

  export KD_JAX_DATA_DIR=../shared/data
  python -m kd_jax.main --config configs/sib200.py --workdir runs/sib200
  python -m kd_jax.main --config configs/sib200.py --workdir runs/sib200_nonkd \
      --config.stages=distill --config.teacher.checkpoint=runs/sib200/teacher \
      --config.distill.kd=False
"""

from kd_jax.config_base import base_config, train_config

SEEN = ("eng_Latn", "fra_Latn", "ind_Latn", "swh_Latn", "rus_Cyrl", "arb_Arab", "hin_Deva",
        "zho_Hans", "jpn_Jpan", "kor_Hang", "ell_Grek", "heb_Hebr")
UNSEEN = ("tel_Telu", "yor_Latn", "khm_Khmr", "ukr_Cyrl")


def get_config():
  config = base_config()
  config.data.task = "sib200"
  config.data.languages = SEEN            # trained on and evaluated: 701 train each
  config.data.unseen_languages = UNSEEN   # evaluated only
  config.data.max_length = 128
  config.data.buckets = (32, 48, 64, 128)
  # 8,412 train sentences: 262 steps of 32 per epoch; teacher 2 epochs, students 1.
  config.teacher.train = train_config(num_epochs=2.0, learning_rate=1e-4, batch_size=32,
                                      eval_every_steps=131, checkpoint_every_steps=131)
  config.student.train = train_config(num_epochs=1.0, learning_rate=1e-4, batch_size=32,
                                      eval_every_steps=131, checkpoint_every_steps=131)
  return config
