"""Export a kd_jax model as an ordinary Hugging Face (transformers) directory.

The result loads with transformers' `AutoModelForSequenceClassification`,
`AutoModelForTokenClassification` or `AutoModelForMaskedLM` (whichever head the model has,
EncoderConfig.head; PyTorch or any framework that reads safetensors) and `AutoTokenizer`::

    <out_dir>/config.json          model_type "bert" | "xlm-roberta" | "distilbert" |
                                   "deberta-v2", architectures, labels, sizes
    <out_dir>/model.safetensors    float32 tensors named as transformers' save_pretrained names them
    <out_dir>/tokenizer.json ...   the tokenizer, written by its own save_pretrained

Only the encoder (and its head) is written; the learnable distillation
projections (`{"model": ..., "proj": ...}` during training) are never exported.

Command line (a run directory exports its student by default)::

    python -m kd_jax.export --workdir runs/default --out exported/student
    python -m kd_jax.export --workdir runs/default --stage teacher --out exported/teacher
    python -m kd_jax.export --workdir runs/general --stage general --out exported/general
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from etils import epath

from kd_jax import hf_io, paths
from kd_jax.config_base import STAGE_SECTIONS
from kd_jax.models.encoder import EncoderConfig, init_params

# family -> (model_type, class with a classification head, base class)
_HF_CLASSES = {
    "bert": ("bert", "BertForSequenceClassification", "BertModel"),
    "roberta": ("xlm-roberta", "XLMRobertaForSequenceClassification", "XLMRobertaModel"),
    "deberta-v2": ("deberta-v2", "DebertaV2ForSequenceClassification", "DebertaV2Model"),
    "distilbert": ("distilbert", "DistilBertForSequenceClassification", "DistilBertModel"),
}
# --stage name (a stage directory's name) -> the stage it holds
STAGES_BY_DIR = {d: stage for stage, d in STAGE_SECTIONS.items()}


def _model_params(params: Mapping) -> Mapping:
  """The encoder's tree out of a training tree ({"model", "proj"}) or a variables dict."""
  if "model" in params and "proj" in params:
    return params["model"]  # drop the distillation projections
  if set(params) == {"params"}:
    return params["params"]
  return params


def _check_params(params: Mapping, config: EncoderConfig) -> None:
  """ValueError listing every missing, unexpected or wrongly shaped leaf."""
  reference = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  ref = {jax.tree_util.keystr(k): v.shape
         for k, v in jax.tree_util.tree_flatten_with_path(reference)[0]}
  got = {jax.tree_util.keystr(k): tuple(np.shape(v))
         for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  missing = sorted(set(ref) - set(got))
  unexpected = sorted(set(got) - set(ref))
  shapes = [f"{k}: {got[k]} vs config {tuple(ref[k])}" for k in sorted(set(ref) & set(got))
            if tuple(got[k]) != tuple(ref[k])]
  if missing or unexpected or shapes:
    raise ValueError(hf_io.mismatch_message("parameters do not match the EncoderConfig",
                                            config, missing, unexpected, shapes))


def _labels(id2label, num_labels: int) -> dict[int, str]:
  if id2label is None:
    return {i: f"LABEL_{i}" for i in range(num_labels)}
  if isinstance(id2label, Mapping):
    labels = {int(k): str(v) for k, v in id2label.items()}
  else:
    labels = {i: str(v) for i, v in enumerate(id2label)}
  if sorted(labels) != list(range(num_labels)):
    raise ValueError(f"id2label has ids {sorted(labels)} but the model has num_labels="
                     f"{num_labels} (ids 0..{num_labels - 1})")
  if len(set(labels.values())) != len(labels):
    raise ValueError(f"id2label has repeated names: {labels}")
  return labels


def hf_config_dict(config: EncoderConfig, *, id2label=None, tokenizer=None) -> dict[str, Any]:
  """config.json contents for `config` (what transformers' own config would write).

  Args:
    config: the model's EncoderConfig.
    id2label: class names, as {id: name} or a sequence indexed by id; default LABEL_i.
    tokenizer: optional; its bos/eos ids are recorded (XLM-R defaults 0 and 2 otherwise).
  Raises:
    ValueError: id2label does not cover exactly ids 0..num_labels-1.
  """
  model_type = _HF_CLASSES[config.family][0]
  d: dict[str, Any] = {
      "model_type": model_type,
      "architectures": [hf_architecture(config)],
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "intermediate_size": config.intermediate_size,
      "hidden_act": "gelu",  # the Encoder's exact (erf) GELU
      "hidden_dropout_prob": config.hidden_dropout,
      "attention_probs_dropout_prob": config.attention_dropout,
      "classifier_dropout": config.classifier_dropout,
      "max_position_embeddings": config.max_position_embeddings,
      "type_vocab_size": config.type_vocab_size,
      "initializer_range": config.initializer_range,
      "layer_norm_eps": config.layer_norm_eps,
      "pad_token_id": config.pad_token_id,
      "position_embedding_type": "absolute",
      "dtype": "float32",
  }
  if config.family == "deberta-v2":
    del d["classifier_dropout"], d["position_embedding_type"]  # BERT-only fields
    d.update(_deberta_fields(config))
  if config.family == "distilbert":  # DistilBertConfig's own field names
    d = {"model_type": model_type, "architectures": d["architectures"],
         **_distilbert_fields(config)}
  if config.head == "mlm":
    d["tie_word_embeddings"] = True  # the decoder is the word-embedding table
  if config.family == "roberta":
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    d["bos_token_id"] = 0 if bos is None else bos
    d["eos_token_id"] = 2 if eos is None else eos
  if config.num_labels > 0:
    labels = _labels(id2label, config.num_labels)
    d["id2label"] = {str(i): name for i, name in sorted(labels.items())}
    d["label2id"] = {name: i for i, name in sorted(labels.items())}
  return d


def hf_architecture(config: EncoderConfig) -> str:
  """The transformers class for `config`'s head: <Family>ForSequenceClassification,
  …ForTokenClassification, …ForMaskedLM, or the base …Model when there is no head."""
  head_class, base_class = _HF_CLASSES[config.family][1:]
  if config.head == "mlm":
    return head_class.replace("ForSequenceClassification", "ForMaskedLM")
  if config.num_labels == 0:
    return base_class
  if config.head == "token":
    return head_class.replace("ForSequenceClassification", "ForTokenClassification")
  return head_class


def _distilbert_fields(config: EncoderConfig) -> dict[str, Any]:
  """config.json fields of a DistilBERT model, in DistilBertConfig's names. The sequence
  head's dropout is `seq_classif_dropout`; DistilBertForTokenClassification uses `dropout`.

  Raises ValueError for what DistilBERT cannot express: token types or a LayerNorm eps
  other than 1e-12 (fixed in HF's code)."""
  if config.type_vocab_size or config.layer_norm_eps != 1e-12:
    raise ValueError(f"DistilBERT has no token types and LayerNorm eps 1e-12; this config "
                     f"has type_vocab_size={config.type_vocab_size}, layer_norm_eps="
                     f"{config.layer_norm_eps}")
  return {
      "vocab_size": config.vocab_size,
      "dim": config.hidden_size,
      "n_layers": config.num_layers,
      "n_heads": config.num_heads,
      "hidden_dim": config.intermediate_size,
      "activation": "gelu",
      "dropout": config.hidden_dropout,
      "attention_dropout": config.attention_dropout,
      "seq_classif_dropout": config.classifier_dropout,
      "max_position_embeddings": config.max_position_embeddings,
      "sinusoidal_pos_embds": False,
      "initializer_range": config.initializer_range,
      "pad_token_id": config.pad_token_id,
      "dtype": "float32",
  }


def _deberta_fields(config: EncoderConfig) -> dict[str, Any]:
  """config.json fields of a DeBERTa-v2 model (transformers keeps the ones DebertaV2Config
  does not declare, e.g. position_buckets, as attributes and the model reads them)."""
  return {
      "cls_dropout": config.classifier_dropout,  # DebertaV2ForSequenceClassification's
      "relative_attention": config.relative_attention,
      "max_relative_positions": config.max_relative_positions,
      "position_buckets": config.position_buckets,
      "share_att_key": config.share_att_key,
      "pos_att_type": list(config.pos_att_type),
      "norm_rel_ebd": config.norm_rel_ebd,
      "position_biased_input": config.position_biased_input,
      "pooler_hidden_act": config.pooler_hidden_act,
      "pooler_dropout": config.pooler_dropout,
      "pooler_hidden_size": config.hidden_size,
      "conv_kernel_size": 0,
      "legacy": True,  # masked LM: the cls.predictions.* head names kd_jax writes
  }


def export_state_dict(params: Mapping, config: EncoderConfig) -> dict[str, np.ndarray]:
  """HF tensors for `params`, named as the `hf_architecture(config)` class's
  save_pretrained writes them (`bert.` / `roberta.` / `deberta.` / `distilbert.` prefix on
  the base model; BERT's pooler inside it, XLM-R's head as `classifier.dense` /
  `classifier.out_proj`, DistilBERT's as `pre_classifier` / `classifier`; masked-LM heads
  as `cls.predictions.*`, `lm_head.*`, `vocab_transform` / `vocab_layer_norm` /
  `vocab_projector.bias`), or as the base model writes them (no prefix) when there is no
  head. Linear weights are [out, in], float32. Buffers (`position_ids`, `token_type_ids`)
  are not persistent in transformers and are not written; the masked-LM decoder weight
  is tied to the word embeddings and, as transformers does, not written. Without a head
  kd_jax has no pooler, so load such an export with
  `AutoModel.from_pretrained(out, add_pooling_layer=False)` (BERT, XLM-R)
  (otherwise transformers reports pooler.dense.* missing and initialises it randomly).

  Returns: name -> float32 numpy array.
  Raises: ValueError listing every leaf of `params` that does not fit `config`.
  """
  params = _model_params(params)
  _check_params(params, config)
  params = jax.tree.map(lambda x: np.asarray(x, dtype=np.float32), params)
  prefix = None if config.num_labels > 0 or config.head == "mlm" else ""
  return hf_io.params_to_state_dict(params, config, prefix=prefix)


def _prepare_out_dir(out_dir: epath.Path, overwrite: bool) -> None:
  if out_dir.exists() and not out_dir.is_dir():
    raise FileExistsError(f"{out_dir} exists and is not a directory")
  if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
    raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) to "
                          "replace it")


def export_hf(params: Mapping, config: EncoderConfig, out_dir: str | os.PathLike, *,
              tokenizer_dir: str | os.PathLike | None = None,
              id2label: Mapping[int, str] | Sequence[str] | None = None,
              overwrite: bool = False) -> epath.Path:
  """Writes `params` as a transformers model directory.

  Args:
    params: the Encoder's `params` collection (numpy or jax arrays, any float dtype,
      written as float32); a training tree {"model": ..., "proj": ...} or a variables
      dict {"params": ...} is accepted and only the model parameters are written.
    config: the EncoderConfig the parameters belong to.
    out_dir: local directory to create (a relative path is resolved against the current
      directory). Written into a temporary sibling directory and renamed into place, so
      a failed export leaves no partial directory behind.
    tokenizer_dir: directory of the model's tokenizer (read with hf_io.load_tokenizer and
      written with its save_pretrained); None writes no tokenizer.
    id2label: class names ({id: name} or a sequence); default LABEL_0.. .
    overwrite: replace a non-empty `out_dir`.
  Returns:
    `out_dir` as a Path.
  Raises:
    FileExistsError: `out_dir` is non-empty (and not `overwrite`) or is a file.
    ValueError: `out_dir` is a URI (gs://...): export locally, then copy.
    ValueError: parameters that do not fit `config` (lists every mismatch), bad
      id2label, or a tokenizer that cannot be loaded or has more ids than vocab_size.
  """
  out_dir = paths.resolve_local(out_dir, "out_dir")
  _prepare_out_dir(out_dir, overwrite)
  # Everything that can fail on bad input is done before anything is written.
  state_dict = export_state_dict(params, config)
  tokenizer = hf_io.load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
  if tokenizer is not None and len(tokenizer) > config.vocab_size:
    raise ValueError(f"{tokenizer_dir}: tokenizer has {len(tokenizer)} ids but the model's "
                     f"vocab_size is {config.vocab_size}")
  hf_config = hf_config_dict(config, id2label=id2label, tokenizer=tokenizer)

  from safetensors.numpy import save_file
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = epath.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
  old = None
  try:
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(state_dict, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    for f in tmp.iterdir():  # safetensors writes 0600
      os.chmod(f, 0o644)
    _prepare_out_dir(out_dir, overwrite)  # again: someone may have written there meanwhile
    if out_dir.exists():  # empty, or overwrite: move it aside, then swap in the new one
      old = epath.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
      os.replace(out_dir, old / "d")
    os.replace(tmp, out_dir)
  except BaseException:
    if old is not None and not out_dir.exists():
      os.replace(old / "d", out_dir)  # put the previous export back
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  logging.info("exported %s (%s, %d tensors)", out_dir, hf_config["architectures"][0],
               len(state_dict))
  return out_dir


def stage_labels(info: Mapping) -> tuple[str, ...] | None:
  """Class names of a stage: the `labels` its model_config.json records (the names of
  the task that trained it, `tasks.TaskData.info`), else None (LABEL_i)."""
  return tuple(info["labels"]) if info.get("labels") else None


def export_stage(stage_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                 overwrite: bool = False, labels: Sequence[str] | None = None,
                 tokenizer_dir: str | os.PathLike | None = None) -> epath.Path:
  """Exports the parameters a finished stage kept: the best-val ones of `<workdir>/student`
  or `teacher`, the final ones of `general` (with its MLM head: `...ForMaskedLM`).

  Reads `<stage_dir>/model_config.json`, restores `checkpoints/best` (or `final`), takes the
  tokenizer of the stage's reduced vocabulary (`tokenizer`, config.student.vocab) or of
  its `base_model` (resolved with hf_io.resolve_model_dir) unless `tokenizer_dir` is
  given. Class names: `labels`, else those of the task that trained the stage (recorded
  in model_config.json), else LABEL_i.
  Raises:
    FileNotFoundError: no model_config.json or no best checkpoint (names the path).
    FileExistsError, ValueError: as export_hf.
  """
  from kd_jax import checkpoints  # heavy imports (orbax) only when needed
  stage_dir = paths.resolve(stage_dir)
  out_dir = paths.resolve_local(out_dir, "out_dir")
  _prepare_out_dir(out_dir, overwrite)  # refused before the checkpoint is read
  config, info = checkpoints.load_model_config(stage_dir)
  params = checkpoints.restore_stage_params(stage_dir, config)
  if tokenizer_dir is None and info.get("tokenizer"):  # a reduced-vocabulary student's
    tokenizer_dir = info["tokenizer"]
  if tokenizer_dir is None and info.get("base_model"):
    tokenizer_dir = hf_io.resolve_model_dir(info["base_model"])
  if labels is None:
    labels = stage_labels(info)
  return export_hf(params, config, out_dir, tokenizer_dir=tokenizer_dir, id2label=labels,
                   overwrite=overwrite)


def find_stage_dir(workdir: str | os.PathLike, stage: str | None = None) -> epath.Path:
  """The stage directory to export: `workdir` itself when it holds model_config.json
  (and no `stage` is asked for), else `<workdir>/<stage>` (`teacher`, `general` or
  `student`), by default `student` when present, else `teacher`, else `general`.
  Raises FileNotFoundError naming what was looked for."""
  workdir = paths.resolve(workdir)
  if stage is not None:
    if stage not in STAGES_BY_DIR:
      raise ValueError(f"stage={stage!r}; choose from {list(STAGES_BY_DIR)}")
    candidate = workdir / stage
    if (candidate / "model_config.json").exists():
      return candidate
    if (workdir / "model_config.json").exists():
      info = json.loads((workdir / "model_config.json").read_text())
      if info.get("stage") == STAGES_BY_DIR[stage]:
        return workdir
    raise FileNotFoundError(f"{candidate / 'model_config.json'} does not exist: no finished "
                            f"{stage} stage in {workdir}")
  if (workdir / "model_config.json").exists():
    return workdir
  for name in ("student", "teacher", "general"):
    if (workdir / name / "model_config.json").exists():
      return workdir / name
  raise FileNotFoundError(f"{workdir}: neither a stage directory (model_config.json) nor a "
                          "run directory with student/, teacher/ or general/")


def main(argv: Sequence[str] | None = None) -> epath.Path:
  parser = argparse.ArgumentParser(
      prog="python -m kd_jax.export",
      description="Export a trained kd_jax stage as a Hugging Face transformers directory.")
  parser.add_argument("--workdir", required=True,
                      help="run directory (holding student/ and teacher/) or a stage directory")
  parser.add_argument("--out", required=True, help="output directory (created)")
  parser.add_argument("--stage", choices=sorted(STAGES_BY_DIR), default=None,
                      help="which stage of a run directory (default: student if present)")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  parser.add_argument("--labels", default=None,
                      help="comma-separated class names (default: the stage's, e.g. tsm's)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  # Paths are resolved once here, against the current directory.
  stage_dir = find_stage_dir(paths.resolve(args.workdir), args.stage)
  out = paths.resolve_local(args.out, "--out")
  labels = tuple(args.labels.split(",")) if args.labels else None
  out = export_stage(stage_dir, out, overwrite=args.overwrite, labels=labels)
  print(f"exported {stage_dir} -> {out}")
  return out


if __name__ == "__main__":
  try:
    main()
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
