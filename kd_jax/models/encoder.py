"""One Flax linen encoder for the BERT, RoBERTa and DeBERTa-v2 families, teacher and student.

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
    head "sequence": pooler/{kernel,bias}, classifier/{kernel,bias}  (none if num_labels == 0)
    head "token":    classifier/{kernel,bias}                          (none if num_labels == 0)
    head "mlm":      lm_head/transform/{kernel,bias}, lm_head/transform_LayerNorm/{scale,bias},
                     lm_head/bias [V]; the decoder is tied to embeddings/word_embeddings

DeBERTa-v2 (`kd_jax.models.deberta_v2`) swaps in disentangled self-attention under the
same `layer_{i}/attention/...` names (HF's query_proj/key_proj/value_proj) and adds
`rel_embeddings/...` and, without share_att_key, `layer_{i}/attention/pos_{key,query}`;
its embeddings have no position table when position_biased_input is False and no
token-type table when type_vocab_size is 0; `pooler` is HF's ContextPooler dense (GELU).

For RoBERTa, `pooler` holds HF's `classifier.dense` and `classifier` its `out_proj`:
both heads are dense(H→H) + tanh followed by a linear layer, and differ only in where
dropout sits, so one tree serves both and weight copying needs no family branch.

DistilBERT (family "distilbert") is BERT's layer without token types (no
`token_type_embeddings` leaf: type_vocab_size 0) and without dropout on the attention
output; its `q_lin/k_lin/v_lin/out_lin`, `sa_layer_norm`, `ffn.lin1/lin2` and
`output_layer_norm` map onto the names above. Its sequence head `pre_classifier` is held
in `pooler`, followed by ReLU (not tanh) and dropout (`seq_classif_dropout`).

The MLM heads of all three (BERT `cls.predictions.transform`, XLM-R `lm_head.dense` /
`lm_head.layer_norm`, DistilBERT `vocab_transform` / `vocab_layer_norm`) are dense(H→H) +
GELU + LayerNorm, then the decoder tied to the word embeddings plus its own bias, so they
share the `lm_head` tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from kd_jax.models import deberta_v2
from kd_jax.models.dropout import Dropout
from kd_jax.models.unpad import TokenLayout

FAMILIES = ("bert", "roberta", "distilbert", deberta_v2.FAMILY)
# Task heads: one label per sequence, one per token, or masked-LM logits over the vocabulary.
HEADS = ("sequence", "token", "mlm")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Sizes and behaviour of an encoder.

  Attributes:
    family: "bert" (BERT, mBERT, multilingual e5), "roberta" (XLM-R): RoBERTa
      offsets position ids by `pad_token_id + 1` and puts dropout before the head,
      or "deberta-v2" (DeBERTa-v2/v3, mDeBERTa-v3; `kd_jax.models.deberta_v2`), or
      "distilbert" (DistilBERT: no token types, position ids 0..T-1 like BERT).
    vocab_size, hidden_size, num_layers, num_heads, intermediate_size: sizes; the
      head dimension is hidden_size / num_heads.
    max_position_embeddings, type_vocab_size: rows of those embedding tables.
    num_labels: classes of the classification head (sequence or token); 0 means no
      classification head (a base encoder, or the masked-LM head, which needs 0).
    head: "sequence" (HF *ForSequenceClassification: logits [B, C] from the first
      token), "token" (*ForTokenClassification: dropout + linear on every token,
      logits [B, T, C]) or "mlm" (*ForMaskedLM: logits [B, T, V] over the vocabulary,
      decoder tied to the word embeddings).
    layer_norm_eps: LayerNorm epsilon (1e-12 for BERT, 1e-5 for XLM-R).
    hidden_dropout, attention_dropout, classifier_dropout: dropout rates.
    pad_token_id: id of the padding token (RoBERTa position ids depend on it).
    initializer_range: stddev of the normal initialiser (HF default 0.02).
    dtype: compute dtype; parameters stay float32.
    relative_attention: (deberta-v2) disentangled attention over relative positions
      (He et al. 2021, eq. 2-4); False leaves content-to-content attention only.
    max_relative_positions: (deberta-v2) largest relative distance k; < 1 means
      max_position_embeddings (HF's rule).
    position_buckets: (deberta-v2) S, half the rows of the relative-embedding table;
      > 0 log-buckets distances beyond S/2 up to max_relative_positions (mDeBERTa-v3:
      256); <= 0 uses 2·max_relative_positions rows and no bucketing.
    share_att_key: (deberta-v2) project relative embeddings with the content query/key
      projections (True in v3) instead of separate `pos_query` / `pos_key` ones.
    pos_att_type: (deberta-v2) disentangled terms used, a subset of ("c2p", "p2c");
      each also adds one to the score scale √(d·(1 + len)).
    norm_rel_ebd: (deberta-v2) "layer_norm" (LayerNorm on the relative embeddings,
      v3) or "none".
    position_biased_input: (deberta-v2) add absolute position embeddings to the input
      (False in v3, which then has no position_embeddings table); other families
      always add them.
    pooler_hidden_act: activation after the pooler dense layer: None means the
      family's own ("tanh" for bert/roberta, "gelu" for deberta-v2, HF's
      `pooler_hidden_act`, "relu" for distilbert); bert/roberta support only "tanh",
      distilbert only "relu".
    pooler_dropout: (deberta-v2) dropout on the first token before the pooler dense
      layer (HF ContextPooler's `pooler_dropout`); classifier_dropout (HF
      `cls_dropout`) acts after it.
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
  head: str = "sequence"
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  classifier_dropout: float = 0.1
  pad_token_id: int = 1
  initializer_range: float = 0.02
  dtype: Any = jnp.float32
  relative_attention: bool = False
  max_relative_positions: int = -1
  position_buckets: int = -1
  share_att_key: bool = False
  pos_att_type: tuple[str, ...] = ()
  norm_rel_ebd: str = "none"
  position_biased_input: bool = True
  pooler_hidden_act: str | None = None
  pooler_dropout: float = 0.0

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"EncoderConfig.family={self.family!r}; supported: {FAMILIES}")
    deberta_v2.check_config(self)
    if self.head not in HEADS:
      raise ValueError(f"EncoderConfig.head={self.head!r}; supported: {HEADS}")
    if self.head == "mlm" and self.num_labels:
      raise ValueError(f"EncoderConfig.head='mlm' has no classes but num_labels="
                       f"{self.num_labels}; set num_labels=0")
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
    logits: float32 logits of the head: [B, C] (head "sequence"), [B, T, C] ("token"),
      [B, T, V] ("mlm"); with `masked_positions` [B, P] only at those positions:
      [B, P, C] or [B, P, V]. None when there is no head (num_labels == 0, not "mlm").
    last_hidden_state: [B, T, H] output of the last layer.
    embeddings: [B, T, H] embedding-layer output (after LayerNorm), or None.
    hidden_states: tuple of L arrays [B, T, H], outputs of layers 1..L, or None.
    attention_scores: tuple of L arrays [B, h, T, T], pre-softmax A = QKᵀ/√d_k
      without the padding mask added (what TinyBERT distills), or None. DeBERTa-v2:
      the full disentangled A (content + c2p + p2c, scaled; `deberta_v2`). Entries
      are None for layers not asked for (`output_attention_scores` a set of layers).
    attentions: tuple of L arrays [B, h, T, T], attention probabilities, or None
      (DeBERTa-v2, as transformers 5: rows of padded queries are uniform, 1/T).
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


class _DenseParams(nn.Module):
  """The `kernel` [in, features] and `bias` [features] of an `nn.Dense` (same names,
  initialisers and float32 storage), returned instead of applied."""

  features: int
  config: EncoderConfig

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
    init = nn.initializers.normal(self.config.initializer_range)
    return (self.param("kernel", init, (in_features, self.features), jnp.float32),
            self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32))


def _fused_dense(config: EncoderConfig, x: jax.Array, names: tuple[str, ...],
                 features: int) -> jax.Array:
  """`nn.Dense(features, name=n)(x)` for each of `names`, concatenated on the last axis
  ([..., len(names)·features]) and computed as one matmul over the concatenated
  kernels, so that one gather (unpadded) moves them all. Same parameters (names,
  initialisers) and values as separate nn.Dense layers."""
  params = [_DenseParams(features, config, name=n)(x.shape[-1]) for n in names]
  kernel = jnp.concatenate([k for k, _ in params], axis=1)
  bias = jnp.concatenate([b for _, b in params])
  x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=config.dtype)
  return jnp.dot(x, kernel) + bias


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
    x = word(input_ids) + pos(position_ids_for(cfg, input_ids))
    if cfg.type_vocab_size > 0:  # DistilBERT has no token types
      typ = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init,
                     name="token_type_embeddings")
      x = x + typ(token_type_ids)
    x = _layer_norm(cfg, "LayerNorm")(x)
    x = Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
    return x.astype(cfg.dtype)


class SelfAttention(nn.Module):
  """BERT self-attention. `need_scores` False (a layer no loss reads, evaluated without
  attention dropout) routes through `jax.nn.dot_product_attention`, which picks cuDNN's
  fused kernel on GPU and never materialises the [B, h, T, T] scores there; scores and
  probabilities are then None. Returns (output [B, T, H], scores, probs, values
  [B, T, h, d]). With a `layout` (`kd_jax.models.unpad`), x and the output are the
  packed real tokens [G·N, H]: the projections run there, attention on [B, T]."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool, need_scores: bool = True,
               layout: TokenLayout | None = None):
    cfg = self.config
    b, t = attention_mask.shape
    qkv = _fused_dense(cfg, x, ("query", "key", "value"), cfg.hidden_size)
    if layout is not None:  # back to [B, T] for attention
      qkv = layout.to_padded(qkv)
    q, k, v = (y.reshape(b, t, cfg.num_heads, cfg.head_dim) for y in jnp.split(qkv, 3, -1))
    key_is_real = attention_mask[:, None, None, :].astype(bool)  # [B, 1, 1, T]
    output = _dense(cfg, cfg.hidden_size, "output")

    def project_out(context):  # [B, T, H] -> output dense, on the real tokens if packed
      return output(context if layout is None else layout.to_tokens(context))

    if not need_scores and (deterministic or cfg.attention_dropout == 0.0):
      context = jax.nn.dot_product_attention(q, k, v, mask=key_is_real)
      return project_out(context.reshape(b, t, cfg.hidden_size)), None, None, v
    # Head-major [B, h, T, d] operands: the e5-small-sized teacher forward ran ~15 %
    # faster on XLA:CPU than with [B, T, h, d] ones. Scores and softmax in float32:
    # they are distillation targets and bf16 loses them.
    qh, kh, vh = (y.transpose(0, 2, 1, 3) for y in (q, k, v))
    scores = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(cfg.head_dim))
    masked = jnp.where(key_is_real, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(masked, axis=-1)
    dropped = Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
    # bhqd then a transpose: XLA:CPU ran the "->bqhd" einsum's dot ~1.5x slower.
    context = jnp.einsum("bhqk,bhkd->bhqd", dropped.astype(cfg.dtype), vh).transpose(0, 2, 1, 3)
    return project_out(context.reshape(b, t, cfg.hidden_size)), scores, probs, v


class EncoderLayer(nn.Module):
  """One post-LayerNorm layer: x [B, T, H], or the packed real tokens [G·N, H] with a
  `layout` (DeBERTa-v2's attention block then runs on [B, T], the rest packed)."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool, rel_embeddings=None,
               relative_pos=None, need_scores: bool = True, layout: TokenLayout | None = None):
    cfg = self.config
    if cfg.family == deberta_v2.FAMILY:
      attn, scores, probs, values = deberta_v2.DisentangledSelfAttention(cfg, name="attention")(
          x if layout is None else layout.to_padded(x), attention_mask, rel_embeddings,
          relative_pos, deterministic)
      attn = attn if layout is None else layout.to_tokens(attn)
    else:
      attn, scores, probs, values = SelfAttention(cfg, name="attention")(
          x, attention_mask, deterministic, need_scores, layout)
    if cfg.family != "distilbert":  # HF TransformerBlock has no dropout here
      attn = Dropout(cfg.hidden_dropout)(attn, deterministic=deterministic)
    x = _layer_norm(cfg, "attention_LayerNorm")(attn + x).astype(cfg.dtype)
    h = _dense(cfg, cfg.intermediate_size, "intermediate")(x)
    h = nn.gelu(h, approximate=False)  # HF "gelu" is the exact erf form
    h = _dense(cfg, cfg.hidden_size, "output")(h)
    h = Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
    x = _layer_norm(cfg, "output_LayerNorm")(h + x).astype(cfg.dtype)
    return x, scores, probs, values


class LMHead(nn.Module):
  """Masked-LM head: dense(H→H) + GELU + LayerNorm, then the decoder tied to the word
  embeddings plus its own bias [V] (HF BertLMPredictionHead, XLMRobertaLMHead,
  DistilBertForMaskedLM's vocab_transform / vocab_layer_norm / vocab_projector)."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, x, word_embeddings):
    """x [..., H], word_embeddings [V, H] -> logits [..., V] float32."""
    cfg = self.config
    h = nn.gelu(_dense(cfg, cfg.hidden_size, "transform")(x), approximate=False)
    h = _layer_norm(cfg, "transform_LayerNorm")(h).astype(cfg.dtype)
    bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,), jnp.float32)
    logits = jnp.einsum("...h,vh->...v", h, word_embeddings.astype(cfg.dtype),
                        preferred_element_type=jnp.float32)
    return logits + bias


class Encoder(nn.Module):
  """Transformer encoder with an optional head (`EncoderConfig.head`).

  Call with `input_ids` [B, T] int32, `attention_mask` [B, T] (1 = real token) and
  optionally `token_type_ids` [B, T] (zeros by default; ignored without a token-type
  table). Intermediates are returned only when asked, so a loss that does not read
  them costs nothing.

  `masked_positions` [B, P] int32 (heads "mlm" and "token"): indices into T; logits are
  computed only there ([B, P, V] / [B, P, C]), equal to the full logits gathered at
  those positions. With a 250k vocabulary the full [B, T, V] logits cost more than the
  encoder, so masked-LM training should pass them. Indices >= T are clipped to T - 1
  and negative ones count from the end (numpy), so padding slots may hold any index
  (e.g. 0) and be masked in the loss.
  `token_index` [G, N] int32 (`kd_jax.models.unpad.token_index` of the attention mask,
  G groups of B/G examples): the token-wise work of every layer (projections, FFN,
  LayerNorm, dropout) runs on the G·N packed real tokens only, attention on [B, T] as
  usual; outputs are [B, T, ...] as without it, with zeros at padding positions of
  hidden states. Same values and gradients as the padded call (`tests/test_unpad.py`);
  dropout masks differ (drawn on [G·N, H]).
  `output_attention_scores`: True for every layer's scores, or a collection of 0-based
  layer indices for only those (the returned tuple keeps L entries, None at the others).
  Layers whose scores are not returned (and `output_attentions` False) run through
  `jax.nn.dot_product_attention` when no attention dropout applies (see SelfAttention):
  on GPU the teacher's unread layers then never materialise [B, h, T, T].
  `remat=True` recomputes each layer's activations in the backward pass
  (`nn.remat`, i.e. jax.checkpoint per layer) instead of keeping them: less memory,
  about one more forward pass of compute; same parameters and results.
  `scan_layers=True` runs the layers as one `jax.lax.scan` (XLA compiles one layer body,
  not L); same parameter tree and results, except that dropout masks come from other
  keys and that asking for any layer's scores computes every layer's.
  Raises ValueError for `masked_positions` with head "sequence", or a layer index
  outside [0, L) in `output_attention_scores`.
  """

  config: EncoderConfig
  remat: bool = False
  scan_layers: bool = False

  def _scan(self, x, attention_mask, deterministic, rel_embeddings, relative_pos,
            need_scores: bool, need_probs: bool, need_values: bool, layout):
    """The L layers as one `jax.lax.scan` over their parameters, stacked on the fly from
    the usual `layer_{i}` trees: XLA compiles one layer body instead of L. Returns
    (x, hidden, scores, probs, values), lists of L (scores and probs of every layer when
    `need_scores`, since a scan's layers are alike; else Nones)."""
    cfg = self.config
    layers = [self.variables["params"][f"layer_{i}"] for i in range(cfg.num_layers)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)
    keys = (None if deterministic else
            jax.random.split(self.make_rng("dropout"), cfg.num_layers))
    layer = EncoderLayer(cfg)

    def body(h, per_layer):
      params, key = per_layer
      h, scores, probs, values = layer.apply(
          {"params": params}, h, attention_mask, deterministic, rel_embeddings, relative_pos,
          need_scores, layout, rngs=None if key is None else {"dropout": key})
      return h, (h, scores, probs if need_probs else None, values if need_values else None)

    if self.remat:
      body = jax.checkpoint(body)
    x, (hidden, scores, probs, values) = jax.lax.scan(body, x, (stacked, keys))
    n = cfg.num_layers
    return x, _unstack(hidden, n), _unstack(scores, n), _unstack(probs, n), _unstack(values, n)

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, *,
               deterministic: bool = True, output_embeddings: bool = False,
               output_hidden_states: bool = False,
               output_attention_scores: bool | Collection[int] = False,
               output_attentions: bool = False, output_values: bool = False,
               masked_positions=None, token_index=None) -> EncoderOutput:
    cfg = self.config
    if masked_positions is not None and cfg.head == "sequence":
      raise ValueError("masked_positions needs EncoderConfig.head 'mlm' or 'token', "
                       "not 'sequence'")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    rel_embeddings = relative_pos = None
    if cfg.family == deberta_v2.FAMILY:
      x = deberta_v2.Embeddings(cfg, name="embeddings")(
          input_ids, token_type_ids, attention_mask, deterministic)
      if cfg.relative_attention:
        rel_embeddings = deberta_v2.RelativeEmbeddings(cfg, name="rel_embeddings")()
        relative_pos = deberta_v2.relative_positions(cfg, input_ids.shape[1])
    else:
      x = Embeddings(cfg, name="embeddings")(input_ids, token_type_ids, deterministic)
    embeddings = x
    layout = None
    if token_index is not None:  # the layers run on the packed real tokens
      layout = TokenLayout.create(jnp.asarray(token_index), *input_ids.shape)
      x = layout.to_tokens(x)
    score_layers = _layer_set(output_attention_scores, cfg.num_layers, "output_attention_scores")
    if self.scan_layers and not self.is_initializing():
      x, hidden, scores_all, probs_all, values_all = self._scan(
          x, attention_mask, deterministic, rel_embeddings, relative_pos,
          bool(score_layers) or bool(output_attentions), bool(output_attentions),
          bool(output_values), layout)
      scores_all = [s if i in score_layers else None for i, s in enumerate(scores_all)]
    else:
      hidden, scores_all, probs_all, values_all = [], [], [], []
      # static_argnums counts self: 3 is `deterministic`, 6 `need_scores`, Python bools.
      layer_cls = (nn.remat(EncoderLayer, static_argnums=(3, 6)) if self.remat
                   else EncoderLayer)
      for i in range(cfg.num_layers):
        x, scores, probs, values = layer_cls(cfg, name=f"layer_{i}")(
            x, attention_mask, deterministic, rel_embeddings, relative_pos,
            i in score_layers or bool(output_attentions), layout)
        hidden.append(x)
        scores_all.append(scores if i in score_layers else None)
        probs_all.append(probs)
        values_all.append(values)

    if layout is not None:  # unused outputs' gathers are dropped by XLA
      hidden = [layout.to_padded(h) for h in hidden]
      x = layout.to_padded(x)
    logits = None
    tokens = x  # [B, T, H], or [B, P, H] at masked_positions
    if masked_positions is not None:
      tokens = jnp.take_along_axis(x, jnp.asarray(masked_positions, jnp.int32)[..., None],
                                   axis=1, mode="clip")
    if cfg.head == "mlm":
      table = self.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
      logits = LMHead(cfg, name="lm_head")(tokens, table)
    elif cfg.head == "token" and cfg.num_labels > 0:  # HF *ForTokenClassification
      tokens = Dropout(cfg.classifier_dropout)(tokens, deterministic=deterministic)
      logits = _dense(cfg, cfg.num_labels, "classifier")(tokens).astype(jnp.float32)
    elif cfg.num_labels > 0:
      cls = x[:, 0]
      drop = Dropout(cfg.classifier_dropout)
      if cfg.family == "roberta":  # HF RobertaClassificationHead
        cls = drop(cls, deterministic=deterministic)
      elif cfg.family == deberta_v2.FAMILY:  # HF ContextPooler
        cls = Dropout(cfg.pooler_dropout)(cls, deterministic=deterministic)
      pooled = _dense(cfg, cfg.hidden_size, "pooler")(cls)
      pooled = deberta_v2.POOLER_ACTIVATIONS[cfg.pooler_hidden_act](pooled)
      pooled = drop(pooled, deterministic=deterministic)
      logits = _dense(cfg, cfg.num_labels, "classifier")(pooled).astype(jnp.float32)

    return EncoderOutput(
        logits=logits,
        last_hidden_state=x,
        embeddings=embeddings if output_embeddings else None,
        hidden_states=tuple(hidden) if output_hidden_states else None,
        attention_scores=tuple(scores_all) if score_layers else None,
        attentions=tuple(probs_all) if output_attentions else None,
        values=tuple(values_all) if output_values else None,
    )


def _unstack(stacked, num_layers: int) -> list:
  """[L, ...] scan output -> L arrays (None -> L Nones)."""
  return [None] * num_layers if stacked is None else [stacked[i] for i in range(num_layers)]


def _layer_set(selection: bool | Collection[int], num_layers: int, field: str) -> frozenset[int]:
  """True/False or 0-based layer indices -> the set of selected layers."""
  if not isinstance(selection, Collection):
    return frozenset(range(num_layers)) if selection else frozenset()
  layers = frozenset(int(i) for i in selection)
  bad = sorted(i for i in layers if not 0 <= i < num_layers)
  if bad:
    raise ValueError(f"{field}: layer indices {bad} outside 0..{num_layers - 1} "
                     f"(the encoder has {num_layers} layers)")
  return layers


def init_params(config: EncoderConfig, rng: jax.Array, seq_len: int = 8) -> dict:
  """Randomly initialised parameters (the `params` collection) for `config`."""
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return Encoder(config).init(rng, ids, jnp.ones_like(ids))["params"]


def mean_pool(last_hidden_state: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mean over real tokens: [B, T, H], [B, T] -> [B, H] float32 (e5 sentence embeddings)."""
  m = attention_mask[..., None].astype(jnp.float32)
  return (last_hidden_state.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
