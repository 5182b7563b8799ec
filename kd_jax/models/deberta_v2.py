"""DeBERTa-v2 / v3 pieces of kd_jax's encoder (family "deberta-v2", e.g. mDeBERTa-v3).

DeBERTa (He et al. 2021, "DeBERTa: Decoding-enhanced BERT with Disentangled Attention",
§3.1 eq. 2-4; v3 keeps the v2 encoder) replaces BERT's absolute-position attention by
*disentangled* attention: with content projections Q_c, K_c of the hidden states and
position projections Q_r, K_r of a shared table P of relative-position embeddings,

    A[i, j] = ( Q_c[i]·K_c[j]                  content -> content
              + Q_c[i]·K_r[δ(i, j)]             content -> position ("c2p")
              + K_c[j]·Q_r[δ(i, j)] ) / √(d·s)  position -> content ("p2c")

where δ(i, j) = clip(bucket(i - j) + S, 0, 2S - 1) indexes P (2S rows), and s = 1 +
(number of c2p/p2c terms used). `bucket` is DeBERTa-v2's log bucketing
(`log_bucket_positions`). The paper writes δ(j, i) in the p2c term; the reference code
(Microsoft's and transformers') gathers p2c at -bucket(j - i) = bucket(i - j), i.e. δ(i, j)
as above, and so does this module. The module layout and every numerical detail follow
transformers' `modeling_deberta_v2.py` (PyTorch), so HF checkpoints map name by name
(`kd_jax.hf_io`) and outputs agree with it to float32 rounding.

The rest of a DeBERTa layer (attention output dense + LayerNorm, GELU feed-forward,
LayerNorm) is BERT's and lives in `kd_jax.models.encoder.EncoderLayer`, which picks
`DisentangledSelfAttention` for this family. Parameters added by this family::

    rel_embeddings/embedding                  [2S, H]   (relative_attention)
    rel_embeddings/LayerNorm/{scale,bias}     [H]       (norm_rel_ebd == "layer_norm")
    layer_{i}/attention/pos_key/{kernel,bias}    (c2p, share_att_key False)
    layer_{i}/attention/pos_query/{kernel,bias}  (p2c, share_att_key False)

This file does not import `encoder.py` (which imports it); the config is duck-typed
as `kd_jax.models.encoder.EncoderConfig`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.models.dropout import Dropout

FAMILY = "deberta-v2"
POS_ATT_TYPES = ("c2p", "p2c")
NORM_REL_EBD = ("none", "layer_norm")
POOLER_ACTIVATIONS = {"gelu": lambda x: nn.gelu(x, approximate=False), "tanh": jnp.tanh,
                      "relu": jax.nn.relu}


# EncoderConfig fields only this family reads, with the value every other family must keep.
_DEBERTA_ONLY_DEFAULTS = {"relative_attention": False, "max_relative_positions": -1,
                          "position_buckets": -1, "share_att_key": False, "pos_att_type": (),
                          "norm_rel_ebd": "none", "position_biased_input": True,
                          "pooler_dropout": 0.0}


def check_config(config: Any) -> None:
  """Validates and normalises the DeBERTa fields of an EncoderConfig (in place).

  `pos_att_type` becomes a tuple (a list from JSON, or HF's legacy "p2c|c2p" string,
  are accepted); `pooler_hidden_act` None becomes the family default ("gelu" for
  deberta-v2, "relu" for distilbert (HF pre_classifier + ReLU), "tanh" otherwise).

  Raises:
    ValueError: naming the field: an unknown pos_att_type entry, norm_rel_ebd or pooler
      activation; norm_rel_ebd "layer_norm" without relative_attention (HF would keep
      an unused LayerNorm); a negative type_vocab_size; a DeBERTa-only field changed
      on another family.
  """
  set_field = lambda name, value: object.__setattr__(config, name, value)  # frozen dataclass
  pos_att_type = config.pos_att_type
  if isinstance(pos_att_type, str):
    pos_att_type = [x.strip() for x in pos_att_type.lower().split("|") if x.strip()]
  set_field("pos_att_type", tuple(pos_att_type or ()))
  bad = [x for x in config.pos_att_type if x not in POS_ATT_TYPES]
  if bad:
    raise ValueError(f"EncoderConfig.pos_att_type={list(config.pos_att_type)}: {bad} not "
                     f"supported; use a subset of {list(POS_ATT_TYPES)}")
  if config.norm_rel_ebd not in NORM_REL_EBD:
    raise ValueError(f"EncoderConfig.norm_rel_ebd={config.norm_rel_ebd!r}; supported: "
                     f"{list(NORM_REL_EBD)}")
  default_act = {FAMILY: "gelu", "distilbert": "relu"}.get(config.family, "tanh")
  if config.pooler_hidden_act is None:
    set_field("pooler_hidden_act", default_act)
  supported = sorted(POOLER_ACTIVATIONS) if config.family == FAMILY else [default_act]
  if config.pooler_hidden_act not in supported:
    raise ValueError(f"EncoderConfig.pooler_hidden_act={config.pooler_hidden_act!r} is not "
                     f"supported for family {config.family!r}; supported: {supported}")
  if config.type_vocab_size < 0:
    raise ValueError(f"EncoderConfig.type_vocab_size={config.type_vocab_size} is negative")
  if config.family != FAMILY:
    changed = [k for k, v in _DEBERTA_ONLY_DEFAULTS.items() if getattr(config, k) != v]
    if changed:
      raise ValueError(f"EncoderConfig fields {changed} are DeBERTa-v2 options; family "
                       f"{config.family!r} needs their defaults")
  elif config.norm_rel_ebd == "layer_norm" and not config.relative_attention:
    raise ValueError("EncoderConfig.norm_rel_ebd='layer_norm' needs relative_attention=True "
                     "(there are no relative embeddings to normalise)")


def _dense(config: Any, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=config.dtype, name=name,
                  kernel_init=nn.initializers.normal(config.initializer_range))


def _layer_norm(config: Any, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=jnp.float32, name=name)


def max_relative_positions(config: Any) -> int:
  """Largest relative distance: `max_relative_positions`, or max_position_embeddings
  when it is < 1 (HF's rule)."""
  m = config.max_relative_positions
  return m if m >= 1 else config.max_position_embeddings


def attention_span(config: Any) -> int:
  """S: half the rows of the relative-embedding table (position_buckets when > 0)."""
  return config.position_buckets if config.position_buckets > 0 else max_relative_positions(config)


def log_bucket_positions(relative_pos: np.ndarray, bucket_size: int,
                         max_position: int) -> np.ndarray:
  """DeBERTa-v2 log bucketing of relative positions (HF `make_log_bucket_position`).

  Distances |r| <= bucket_size // 2 (= mid) keep their value; larger ones map to
  sign(r) · (mid + ceil(log(|r| / mid) / log((max_position - 1) / mid) · (mid - 1))),
  so buckets grow logarithmically up to `max_position`. Computed in float32 like HF.

  Args:
    relative_pos: integer array of relative positions (query - key), any shape.
    bucket_size: position_buckets (> 0).
    max_position: max_relative_positions (> 0).
  Returns:
    int64 array of the same shape.
  """
  rel = np.asarray(relative_pos, dtype=np.int64)
  sign = np.sign(rel)
  mid = bucket_size // 2
  abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel))
  with np.errstate(divide="ignore", invalid="ignore"):  # log(0) when mid == 1; masked below
    ratio = abs_pos.astype(np.float32) / np.float32(mid)
    log_pos = np.ceil(np.log(ratio) / np.log(np.float32((max_position - 1) / mid))
                      * np.float32(mid - 1)) + np.float32(mid)
  bucket = np.where(abs_pos <= mid, rel.astype(np.float32), log_pos * sign)
  return bucket.astype(np.int64)


def relative_positions(config: Any, seq_len: int) -> np.ndarray:
  """[T, T] int32 relative positions i - j (log-bucketed when position_buckets > 0),
  HF `build_relative_position`. Depends only on T, so it is a trace-time constant."""
  ids = np.arange(seq_len, dtype=np.int64)
  rel = ids[:, None] - ids[None, :]
  if config.position_buckets > 0:
    rel = log_bucket_positions(rel, config.position_buckets, max_relative_positions(config))
  return rel.astype(np.int32)


class Embeddings(nn.Module):
  """DeBERTa-v2 embeddings: word (+ absolute position when position_biased_input)
  (+ token type when type_vocab_size > 0), LayerNorm, padded positions zeroed, dropout."""
  config: Any

  @nn.compact
  def __call__(self, input_ids, token_type_ids, attention_mask, deterministic: bool):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    x = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init,
                 name="word_embeddings")(input_ids)
    if cfg.position_biased_input:
      pos = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None, :]
      x = x + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                       name="position_embeddings")(pos)
    if cfg.type_vocab_size > 0:
      x = x + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init,
                       name="token_type_embeddings")(token_type_ids)
    x = _layer_norm(cfg, "LayerNorm")(x)
    x = x * attention_mask[..., None].astype(x.dtype)  # HF DebertaV2Embeddings(mask=...)
    x = Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
    return x.astype(cfg.dtype)


class RelativeEmbeddings(nn.Module):
  """The shared relative-position table P [2S, H] of all layers, LayerNorm'ed when
  norm_rel_ebd == "layer_norm" (HF `DebertaV2Encoder.get_rel_embedding`)."""
  config: Any

  @nn.compact
  def __call__(self):
    cfg = self.config
    table = self.param("embedding", nn.initializers.normal(cfg.initializer_range),
                       (2 * attention_span(cfg), cfg.hidden_size), jnp.float32)
    if cfg.norm_rel_ebd == "layer_norm":
      table = _layer_norm(cfg, "LayerNorm")(table)
    return table


class DisentangledSelfAttention(nn.Module):
  """Disentangled self-attention (HF `DisentangledSelfAttention`), same outputs as
  `kd_jax.models.encoder.SelfAttention`.

  Call with x [B, T, H], attention_mask [B, T] (1 = real token), rel_embeddings
  [2S, H] (None when relative_attention is off), relative_pos [T, T] int numpy array
  (static, from `relative_positions`). Returns (output [B, T, H], scores [B, h, T, T] float32 =
  the full pre-softmax A above, unmasked; probs [B, h, T, T] float32; values
  [B, T, h, d]).

  Masking follows transformers 5: a (query, key) pair is kept when both tokens are
  real; masked entries get float32 min before the softmax. Rows of padded queries
  are therefore all masked and come out uniform (1/T), exactly as HF computes them;
  they never reach real tokens (their keys are masked) and losses skip them.
  """
  config: Any

  @nn.compact
  def __call__(self, x, attention_mask, rel_embeddings, relative_pos, deterministic: bool):
    cfg = self.config
    b, t, _ = x.shape
    nh, d = cfg.num_heads, cfg.head_dim
    split = lambda y: y.reshape(y.shape[:-1] + (nh, d))
    query, key = _dense(cfg, cfg.hidden_size, "query"), _dense(cfg, cfg.hidden_size, "key")
    q, k = split(query(x)), split(key(x))
    v = split(_dense(cfg, cfg.hidden_size, "value")(x))
    scale_factor = 1 + sum(kind in cfg.pos_att_type for kind in POS_ATT_TYPES)
    scale = jnp.sqrt(jnp.float32(d * scale_factor))
    # Scores in float32: they are distillation targets and bf16 loses them.
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / scale

    if cfg.relative_attention and cfg.pos_att_type:
      span = attention_span(cfg)
      # Rows of P used by a length-T batch (static): c2p reads clip(r + S), p2c
      # clip(-r + S); r is antisymmetric, so both use the same window. Projecting only
      # those rows (<= 2T - 1 of 2S) keeps short batches cheap (mDeBERTa: 2S = 512).
      rel_pos = np.asarray(relative_pos, np.int64)
      c2p_index = np.clip(rel_pos + span, 0, 2 * span - 1)                         # [T, T]
      p2c_index = np.clip(-rel_pos + span, 0, 2 * span - 1)                        # [Tk, Tq]
      lo = int(min(c2p_index.min(), p2c_index.min()))
      hi = int(max(c2p_index.max(), p2c_index.max())) + 1
      rel = Dropout(cfg.hidden_dropout)(rel_embeddings[lo:hi], deterministic=deterministic)
      rel = rel.astype(cfg.dtype)
      gather = lambda a, index: jnp.take_along_axis(
          a, jnp.broadcast_to(jnp.asarray(index - lo, jnp.int32), (b, nh, t, t)), axis=-1)
      if "c2p" in cfg.pos_att_type:
        pos_key = split(key(rel) if cfg.share_att_key
                        else _dense(cfg, cfg.hidden_size, "pos_key")(rel))       # [R, h, d]
        c2p = jnp.einsum("bqhd,rhd->bhqr", q, pos_key, preferred_element_type=jnp.float32)
        scores = scores + gather(c2p, c2p_index) / scale
      if "p2c" in cfg.pos_att_type:
        pos_query = split(query(rel) if cfg.share_att_key
                          else _dense(cfg, cfg.hidden_size, "pos_query")(rel))   # [R, h, d]
        p2c = jnp.einsum("bkhd,rhd->bhkr", k, pos_query, preferred_element_type=jnp.float32)
        scores = scores + jnp.swapaxes(gather(p2c, p2c_index), -1, -2) / scale

    real = attention_mask.astype(bool)
    pair_is_real = real[:, None, :, None] & real[:, None, None, :]
    masked = jnp.where(pair_is_real, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(masked, axis=-1)
    dropped = Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
    context = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(cfg.dtype), v)
    out = _dense(cfg, cfg.hidden_size, "output")(context.reshape(b, t, cfg.hidden_size))
    return out, scores, probs, v
