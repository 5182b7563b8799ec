"""One Flax linen encoder for the BERT and RoBERTa families, teacher and student alike.

The layout follows Hugging Face's `BertForSequenceClassification` and
`XLMRobertaForSequenceClassification` (post-LayerNorm, GELU, dropout), so that
checkpoints map onto it name by name (see `kd_jax.hf_io`). Teacher and student are
the same module with different `EncoderConfig`s.

Parameter tree (the `params` collection), used by `student_init` and `hf_io`::

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
    embeddings/LayerNorm/{scale,bias}
    layer_{i}/attention/{query,key,value,output}/{kernel,bias}
    layer_{i}/{attention_LayerNorm,output_LayerNorm}/{scale,bias}
    layer_{i}/{intermediate,output}/{kernel,bias}
    pooler/{kernel,bias}, classifier/{kernel,bias}     (absent when num_labels == 0)

For RoBERTa, `pooler` holds HF's `classifier.dense` and `classifier` its `out_proj`:
both heads are dense(H→H) + tanh followed by a linear layer, and differ only in where
dropout sits, so one tree serves both and weight copying needs no family branch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

FAMILIES = ("bert", "roberta")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Sizes and behaviour of an encoder.

  Attributes:
    family: "bert" (BERT, mBERT, multilingual e5) or "roberta" (XLM-R): RoBERTa
      offsets position ids by `pad_token_id + 1` and puts dropout before the head.
    vocab_size, hidden_size, num_layers, num_heads, intermediate_size: sizes; the
      head dimension is hidden_size / num_heads.
    max_position_embeddings, type_vocab_size: rows of those embedding tables.
    num_labels: classes of the sequence-classification head; 0 means no head.
    layer_norm_eps: LayerNorm epsilon (1e-12 for BERT, 1e-5 for XLM-R).
    hidden_dropout, attention_dropout, classifier_dropout: dropout rates.
    pad_token_id: id of the padding token (RoBERTa position ids depend on it).
    initializer_range: stddev of the normal initialiser (HF default 0.02).
    dtype: compute dtype; parameters stay float32.
  """

  family: str = "bert"
  vocab_size: int = 250037
  hidden_size: int = 384
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  num_labels: int = 3
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  classifier_dropout: float = 0.1
  pad_token_id: int = 1
  initializer_range: float = 0.02
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"EncoderConfig.family={self.family!r}; supported: {FAMILIES}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"EncoderConfig.hidden_size={self.hidden_size} is not divisible by "
          f"num_heads={self.num_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def replace(self, **changes) -> "EncoderConfig":
    return dataclasses.replace(self, **changes)


@struct.dataclass
class EncoderOutput:
  """What the encoder returns.

  Attributes:
    logits: [B, C] float32 classification logits (None when num_labels == 0).
    last_hidden_state: [B, T, H] output of the last layer.
    embeddings: [B, T, H] embedding-layer output (after LayerNorm), or None.
    hidden_states: tuple of L arrays [B, T, H], outputs of layers 1..L, or None.
    attention_scores: tuple of L arrays [B, h, T, T], pre-softmax A = QKᵀ/√d_k
      without the padding mask added (what TinyBERT distills), or None.
    attentions: tuple of L arrays [B, h, T, T], attention probabilities, or None.
    values: tuple of L arrays [B, T, h, d] (d = head_dim), the per-head value
      projections V = x W_V + b_V of each layer (MiniLM's value relation), or None.
  """

  logits: jax.Array | None
  last_hidden_state: jax.Array
  embeddings: jax.Array | None = None
  hidden_states: tuple[jax.Array, ...] | None = None
  attention_scores: tuple[jax.Array, ...] | None = None
  attentions: tuple[jax.Array, ...] | None = None
  values: tuple[jax.Array, ...] | None = None


def _dense(config: EncoderConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=config.dtype, name=name,
                  kernel_init=nn.initializers.normal(config.initializer_range))


def _layer_norm(config: EncoderConfig, name: str) -> nn.LayerNorm:
  # LayerNorm statistics in float32 even under bf16 compute.
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=jnp.float32, name=name)


def position_ids_for(config: EncoderConfig, input_ids: jax.Array) -> jax.Array:
  """Position ids [B, T] int32: 0..T-1 (BERT), or RoBERTa's padding-aware ids.

  RoBERTa (HF `create_position_ids_from_input_ids`): real tokens get
  pad_token_id + 1 + their index among real tokens; padding tokens get pad_token_id.
  """
  if config.family == "roberta":
    real = (input_ids != config.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + config.pad_token_id
  return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)


class Embeddings(nn.Module):
  config: EncoderConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, deterministic: bool):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    word = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, name="word_embeddings")
    pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                   name="position_embeddings")
    typ = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init,
                   name="token_type_embeddings")
    x = word(input_ids) + pos(position_ids_for(cfg, input_ids)) + typ(token_type_ids)
    x = _layer_norm(cfg, "LayerNorm")(x)
    x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
    return x.astype(cfg.dtype)


class SelfAttention(nn.Module):
  config: EncoderConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool):
    cfg = self.config
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, cfg.num_heads, cfg.head_dim)
    q = split(_dense(cfg, cfg.hidden_size, "query")(x))
    k = split(_dense(cfg, cfg.hidden_size, "key")(x))
    v = split(_dense(cfg, cfg.hidden_size, "value")(x))
    # Scores and softmax in float32: they are distillation targets and bf16 loses them.
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(cfg.head_dim))
    key_is_real = attention_mask[:, None, None, :].astype(bool)
    masked = jnp.where(key_is_real, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(masked, axis=-1)
    dropped = nn.Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
    context = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(cfg.dtype), v)
    out = _dense(cfg, cfg.hidden_size, "output")(context.reshape(b, t, cfg.hidden_size))
    return out, scores, probs, v


class EncoderLayer(nn.Module):
  config: EncoderConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool):
    cfg = self.config
    attn, scores, probs, values = SelfAttention(cfg, name="attention")(
        x, attention_mask, deterministic)
    attn = nn.Dropout(cfg.hidden_dropout)(attn, deterministic=deterministic)
    x = _layer_norm(cfg, "attention_LayerNorm")(attn + x).astype(cfg.dtype)
    h = _dense(cfg, cfg.intermediate_size, "intermediate")(x)
    h = nn.gelu(h, approximate=False)  # HF "gelu" is the exact erf form
    h = _dense(cfg, cfg.hidden_size, "output")(h)
    h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
    x = _layer_norm(cfg, "output_LayerNorm")(h + x).astype(cfg.dtype)
    return x, scores, probs, values


class Encoder(nn.Module):
  """Transformer encoder with an optional sequence-classification head.

  Call with `input_ids` [B, T] int32, `attention_mask` [B, T] (1 = real token) and
  optionally `token_type_ids` [B, T] (zeros by default). Intermediates are returned
  only when asked, so a loss that does not read them costs nothing.
  """

  config: EncoderConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, *,
               deterministic: bool = True, output_embeddings: bool = False,
               output_hidden_states: bool = False, output_attention_scores: bool = False,
               output_attentions: bool = False, output_values: bool = False) -> EncoderOutput:
    cfg = self.config
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = Embeddings(cfg, name="embeddings")(input_ids, token_type_ids, deterministic)
    embeddings = x
    hidden, scores_all, probs_all, values_all = [], [], [], []
    for i in range(cfg.num_layers):
      x, scores, probs, values = EncoderLayer(cfg, name=f"layer_{i}")(
          x, attention_mask, deterministic)
      hidden.append(x)
      scores_all.append(scores)
      probs_all.append(probs)
      values_all.append(values)

    logits = None
    if cfg.num_labels > 0:
      cls = x[:, 0]
      drop = nn.Dropout(cfg.classifier_dropout)
      if cfg.family == "roberta":  # HF RobertaClassificationHead
        cls = drop(cls, deterministic=deterministic)
      pooled = jnp.tanh(_dense(cfg, cfg.hidden_size, "pooler")(cls))
      pooled = drop(pooled, deterministic=deterministic)
      logits = _dense(cfg, cfg.num_labels, "classifier")(pooled).astype(jnp.float32)

    return EncoderOutput(
        logits=logits,
        last_hidden_state=x,
        embeddings=embeddings if output_embeddings else None,
        hidden_states=tuple(hidden) if output_hidden_states else None,
        attention_scores=tuple(scores_all) if output_attention_scores else None,
        attentions=tuple(probs_all) if output_attentions else None,
        values=tuple(values_all) if output_values else None,
    )


def init_params(config: EncoderConfig, rng: jax.Array, seq_len: int = 8) -> dict:
  """Randomly initialised parameters (the `params` collection) for `config`."""
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return Encoder(config).init(rng, ids, jnp.ones_like(ids))["params"]


def mean_pool(last_hidden_state: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mean over real tokens: [B, T, H], [B, T] -> [B, H] float32 (e5 sentence embeddings)."""
  m = attention_mask[..., None].astype(jnp.float32)
  return (last_hidden_state.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
