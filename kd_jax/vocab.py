"""Vocabulary reduction: keep only the tokens a corpus of the target languages uses.

Abdaoui, Pradel, Sigel 2020, "Load What You Need: Smaller Versions of Multilingual
BERT" (arXiv 2010.05609): most of a multilingual encoder's parameters sit in the word
embeddings, and a model meant for a few languages needs only the rows of the tokens
those languages produce. We tokenize a corpus, keep every id it produces (at least
`min_frequency` times) plus every special / added token, slice the embedding matrix
(and an MLM head's output bias), and write a tokenizer whose vocabulary is exactly the
kept tokens, renumbered 0..V'-1 in their old order.

Same tokens, new ids: with `min_frequency=1` the reduced tokenizer splits every corpus
text into the same token strings as the full one (`reduce_model_dir` checks this on the
whole corpus before the directory is put in place), and the reduced model's outputs on
those texts equal the full model's. Why it holds:

* Unigram (SentencePiece: XLM-R, multilingual e5): the Viterbi segmentation maximises
  the sum of piece scores; the reduced lattice is a subset of the full one that still
  holds the full optimum, so the optimum does not change. One catch: a character with
  no single-character piece gets an unknown node scored `min(scores) - 10`, so the
  lowest-scoring piece of the full vocabulary is always kept, which keeps that penalty
  (and thus every unknown node's score) as it was. `unk_id` and `byte_fallback` carry
  over; byte pieces (<0xNN>) used by the corpus are kept like any other piece.
* WordPiece (mBERT): greedy longest-match-first picks the same piece as long as it is
  kept. A word that becomes [UNK] is the exception: the greedy match failed part-way,
  and a reduced vocabulary without the pieces matched before the failure could
  succeed along another path; those pieces are kept too.
* WordLevel needs nothing special. BPE tokenizers are refused (their merges would need
  pruning as well).

With `min_frequency > 1` the tokens rarer than that are dropped, so corpus texts that
contain them tokenize differently (typically into shorter pieces or <unk>); the
guarantee then holds only for the texts whose tokens are all kept, and the number of
the other texts is reported (`texts_with_dropped_tokens`).

Both pipelines a user may meet are covered: `tokenizer.json` as the `tokenizers`
library reads it, and the tokenizer transformers' AutoTokenizer builds from the
directory (transformers 5 rebuilds e.g. XLMRobertaTokenizer with its own
pre-tokenizer, which treats trailing spaces differently). The kept set is the union
over both and both are checked.

Command line (an HF model directory or an offline model name in, an HF directory out;
`--tsm all` takes the 8 tsm languages, `--text` may repeat)::

    python -m kd_jax.vocab --model multilingual-e5-small --out reduced/e5-small-en-es \\
        --tsm english,spanish --data-dir ../shared/data

The output directory holds config.json (vocab_size and token-id fields updated),
model.safetensors (every tensor as in the input, vocabulary tensors sliced), the
tokenizer files and `vocab_mapping.json` (old id -> new id, corpus and sizes). It loads
with transformers' AutoTokenizer / AutoModel / AutoModelForSequenceClassification and
with `kd_jax.hf_io.load_pretrained`. Works before or after distillation (a pretrained
directory, or a student exported by `python -m kd_jax.export`).

In memory (e.g. right after distillation)::

    sel = vocab.select_vocab(tokenizer_dir, texts)
    params, config = vocab.reduce_params(params, config, sel.kept_ids)
    export.export_hf(params, config, out_dir, id2label=labels)
    vocab.write_reduced_tokenizer(tokenizer_dir, sel.kept_ids, out_dir)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from kd_jax import hf_io, paths
from kd_jax.data.text import read_text_file
from kd_jax.data.tsm import TSM_LANGUAGES, load_tsm
from kd_jax.models.encoder import EncoderConfig

MAPPING_FILE = "vocab_mapping.json"
SUPPORTED_MODELS = ("Unigram", "WordPiece", "WordLevel")
# config.json fields holding token ids; they are renumbered and their tokens always kept.
CONFIG_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
                    "cls_token_id", "unk_token_id", "mask_token_id", "decoder_start_token_id")
# Checkpoint tensors indexed by token id (first axis): the word embeddings and the MLM
# heads' output bias / (tied) decoder of BERT, XLM-R, DeBERTa-v2 and DistilBERT
# checkpoints (the names of kd_jax.hf_io's _MLM_NAMES / _MLM_DECODER).
_VOCAB_TENSORS = re.compile(
    r"(^|\.)embeddings\.word_embeddings\.weight$"
    r"|^(lm_head\.(bias|decoder\.(weight|bias))"
    r"|cls\.predictions\.(bias|decoder\.(weight|bias))"
    r"|lm_predictions\.lm_head\.bias"
    r"|vocab_projector\.(weight|bias))$")
# Tokenizer files copied beside the new tokenizer.json (tokenizer_config.json is then
# renumbered). Slow-tokenizer files (vocab.txt, sentencepiece.bpe.model) are not copied:
# they would still hold the full vocabulary.
_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_BATCH = 4096  # texts per encode call
_logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- corpus


def corpus_texts(text_files: Sequence[str | os.PathLike] = (),
                 tsm_languages: Sequence[str] = (), *, tsm_split: str = "train",
                 data_dir: str | os.PathLike | None = None) -> list[str]:
  """The reduction corpus: lines of text files and the texts of tsm languages.

  Args:
    text_files: UTF-8 files, one text per line (empty lines skipped).
    tsm_languages: tsm language names (`kd_jax.data.tsm.TSM_LANGUAGES`), read with
      `load_tsm(tsm_split, ...)`.
    tsm_split: "train" (default), "val" or "test".
    data_dir: tsm data directory (default $KD_JAX_DATA_DIR, see `load_tsm`).
  Returns:
    The texts, files first (in order), then tsm by language.
  Raises:
    FileNotFoundError: a text file does not exist (names it).
    ValueError: nothing given, or no non-empty text at all (names the sources);
      `kd_jax.data.DataError` (a ValueError) for bad tsm languages / data dir.
  """
  if not text_files and not tsm_languages:
    raise ValueError("empty corpus: give text files and/or tsm languages")
  texts: list[str] = []
  for path in text_files:
    texts += read_text_file(path)
  if tsm_languages:
    texts += [ex.text for ex in load_tsm(tsm_split, tuple(tsm_languages), data_dir)
              if ex.text.strip()]
  if not texts:
    sources = [str(p) for p in text_files]
    if tsm_languages:
      sources.append(f"tsm {tsm_split} {list(tsm_languages)}")
    raise ValueError(f"empty corpus: no non-empty text in {', '.join(sources)}")
  return texts


# --------------------------------------------------------------------------- tokenizer


def _tokenizer_json_path(tokenizer_dir: str | os.PathLike) -> epath.Path:
  path = epath.Path(tokenizer_dir) / "tokenizer.json"
  if not path.is_file():
    have = (sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir()
            else "not a directory")
    raise FileNotFoundError(
        f"{path} not found (the directory has: {have}); vocabulary reduction works on "
        "the tokenizers JSON format: convert a slow tokenizer first with "
        "AutoTokenizer.from_pretrained(dir).save_pretrained(dir)")
  return path


def _read_tokenizer_json(tokenizer_dir) -> tuple[dict, epath.Path]:
  path = _tokenizer_json_path(tokenizer_dir)
  try:
    tok_json = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read the tokenizer ({e})") from e
  model_type = tok_json.get("model", {}).get("type")
  if model_type not in SUPPORTED_MODELS:
    raise ValueError(f"{path}: tokenizer model type {model_type!r} is not supported; "
                     f"supported: {SUPPORTED_MODELS} (BPE would need its merges pruned)")
  return tok_json, path


def _model_vocab_ids(tok_json: Mapping) -> dict[int, str]:
  """Id -> piece of the tokenizer model's own vocabulary (not the added tokens)."""
  model = tok_json["model"]
  if model["type"] == "Unigram":
    return {i: piece for i, (piece, _) in enumerate(model["vocab"])}
  return {i: piece for piece, i in model["vocab"].items()}


def _post_processor_ids(node: Any) -> set[int]:
  """Token ids a post_processor JSON inserts (TemplateProcessing, Roberta/BertProcessing,
  Sequence)."""
  ids: set[int] = set()
  if isinstance(node, Mapping):
    kind = node.get("type")
    if kind == "TemplateProcessing":
      for special in node.get("special_tokens", {}).values():
        ids.update(special["ids"])
    elif kind in ("RobertaProcessing", "BertProcessing"):
      ids.update(node[k][1] for k in ("sep", "cls") if k in node)
    for processor in node.get("processors", None) or ():  # Sequence
      ids |= _post_processor_ids(processor)
  return ids


def _remap_post_processor(node: Any, old_to_new: Mapping[int, int]) -> Any:
  node = copy.deepcopy(node)
  if isinstance(node, dict):
    kind = node.get("type")
    if kind == "TemplateProcessing":
      for special in node.get("special_tokens", {}).values():
        special["ids"] = [old_to_new[i] for i in special["ids"]]
    elif kind in ("RobertaProcessing", "BertProcessing"):
      for k in ("sep", "cls"):
        if k in node:
          node[k] = [node[k][0], old_to_new[node[k][1]]]
    if node.get("processors"):
      node["processors"] = [_remap_post_processor(p, old_to_new) for p in node["processors"]]
  return node


def _required_ids(tok_json: Mapping) -> set[int]:
  """Ids every reduced tokenizer keeps: added/special tokens, the post-processor's
  tokens, padding, the unknown token, and (Unigram) the lowest-scoring piece, which
  fixes the unknown-node penalty min(score) - 10."""
  ids = {t["id"] for t in tok_json.get("added_tokens") or ()}
  ids |= _post_processor_ids(tok_json.get("post_processor"))
  if tok_json.get("padding") and tok_json["padding"].get("pad_id") is not None:
    ids.add(tok_json["padding"]["pad_id"])
  model = tok_json["model"]
  if model["type"] == "Unigram":
    if model.get("unk_id") is not None:
      ids.add(model["unk_id"])
    scores = [score for _, score in model["vocab"]]
    ids.add(int(np.argmin(scores)))
  elif model.get("unk_token") in model["vocab"]:
    ids.add(model["vocab"][model["unk_token"]])
  return ids


def _wordpiece_greedy_prefix(word: str, vocab: Mapping[str, int], prefix: str,
                             max_chars: int) -> list[int] | None:
  """Ids matched by WordPiece's greedy longest-match before it fails on `word`
  (None when it succeeds; the `tokenizers` WordPiece algorithm)."""
  if len(word) > max_chars:
    return []
  ids, start = [], 0
  while start < len(word):
    end, match = len(word), None
    while start < end:
      piece = word[start:end] if start == 0 else prefix + word[start:end]
      if piece in vocab:
        match = vocab[piece]
        break
      end -= 1
    if match is None:
      return ids
    ids.append(match)
    start = end
  return None


def _wordpiece_unk_prefix_ids(backend, texts: Sequence[str], ids: Sequence[Sequence[int]]
                              ) -> set[int]:
  """Pieces matched before the failure in every word of `texts` that became the unknown
  token (see module docstring); `backend` is a tokenizers.Tokenizer with a WordPiece model."""
  model = backend.model
  vocab = backend.get_vocab(with_added_tokens=False)
  unk = vocab.get(model.unk_token)
  needed: set[int] = set()
  for text, text_ids in zip(texts, ids):
    if unk is None or unk not in text_ids:
      continue
    normalized = backend.normalizer.normalize_str(text) if backend.normalizer else text
    words = (backend.pre_tokenizer.pre_tokenize_str(normalized) if backend.pre_tokenizer
             else [(normalized, None)])
    for word, _ in words:
      matched = _wordpiece_greedy_prefix(word, vocab, model.continuing_subword_prefix,
                                         model.max_input_chars_per_word)
      if matched:
        needed.update(matched)
  return needed


class _Pipelines:
  """The two ways a tokenizer directory is read: tokenizer.json through `tokenizers`,
  and transformers' AutoTokenizer (kd_jax's `hf_io.load_tokenizer`)."""

  def __init__(self, tokenizer_dir):
    from tokenizers import Tokenizer
    self.tok_json, self.path = _read_tokenizer_json(tokenizer_dir)
    self.raw = Tokenizer.from_file(str(self.path))
    self.hf = hf_io.load_tokenizer(tokenizer_dir)
    raw_vocab = self.raw.get_vocab(with_added_tokens=True)
    hf_vocab = self.hf.get_vocab()
    if hf_vocab != raw_vocab:
      diff = sorted(set(hf_vocab.items()) ^ set(raw_vocab.items()), key=lambda kv: kv[1])[:5]
      raise ValueError(f"{tokenizer_dir}: transformers' AutoTokenizer ({type(self.hf).__name__},"
                       f" {len(hf_vocab)} ids) and {self.path.name} ({len(raw_vocab)} ids) "
                       f"disagree, e.g. on {diff}")
    self.size = len(raw_vocab)

  def encode(self, texts: Sequence[str]) -> dict[str, list[list[int]]]:
    """Ids without special tokens, per pipeline: {"tokenizer.json": ..., "transformers": ...}."""
    raw, hf = [], []
    for i in range(0, len(texts), _BATCH):
      chunk = list(texts[i:i + _BATCH])
      raw += [e.ids for e in self.raw.encode_batch(chunk, add_special_tokens=False)]
      hf += self.hf(chunk, add_special_tokens=False)["input_ids"]
    return {"tokenizer.json": raw, "transformers": hf}

  def backends(self):
    return {"tokenizer.json": self.raw, "transformers": self.hf.backend_tokenizer}


@dataclasses.dataclass(frozen=True)
class VocabSelection:
  """Which token ids a reduced vocabulary keeps.

  Attributes:
    kept_ids: int64 [V'], old ids in new-id order (new id = index): the tokenizer
      model's own vocabulary ascending, then added tokens outside it ascending.
    counts: int64 [V_tok], occurrences of each old id in the corpus (the larger count
      of the two pipelines, see module docstring).
    tokenizer_size: V_tok, ids of the full tokenizer (with added tokens).
    num_texts, num_tokens: corpus texts, and tokens (tokenizer.json pipeline, no
      special tokens).
    texts_with_dropped_tokens: texts holding a token below `min_frequency` (0 when
      min_frequency is 1): these tokenize differently with the reduced tokenizer.
    min_frequency: the threshold used.
  """

  kept_ids: np.ndarray
  counts: np.ndarray
  tokenizer_size: int
  num_texts: int
  num_tokens: int
  texts_with_dropped_tokens: int
  min_frequency: int

  def old_to_new(self) -> np.ndarray:
    """int64 [V_tok]: new id of each old id, -1 where dropped."""
    return id_lookup(self.kept_ids, self.tokenizer_size, np.int64)


def id_lookup(kept_ids: np.ndarray, size: int, dtype=np.int32) -> np.ndarray:
  """[size] `dtype`: the index of each id in `kept_ids` (distinct ids in 0..size-1, the
  rows a smaller embedding table keeps, in its order), -1 for an id not kept. Indexing
  it with full-vocabulary ids gives the smaller table's ids.
  Raises IndexError for a kept id outside 0..size-1."""
  table = np.full(size, -1, dtype)
  table[np.asarray(kept_ids)] = np.arange(len(kept_ids), dtype=dtype)
  return table


def _check_texts(texts: Iterable[str]) -> list[str]:
  texts = [t for t in texts if t.strip()]
  if not texts:
    raise ValueError("empty corpus: no non-empty text to select the vocabulary from")
  return texts


def _select(pipes: _Pipelines, texts: list[str], min_frequency: int,
            keep_ids: Iterable[int]) -> tuple[VocabSelection, dict[str, list[list[int]]]]:
  if not isinstance(min_frequency, (int, np.integer)) or min_frequency < 1:
    raise ValueError(f"min_frequency={min_frequency!r}; must be an integer >= 1")
  encoded = pipes.encode(texts)
  counts = np.zeros(pipes.size, np.int64)
  for ids in encoded.values():
    flat = np.fromiter((i for seq in ids for i in seq), np.int64)
    counts = np.maximum(counts, np.bincount(flat, minlength=pipes.size))
  keep = counts >= min_frequency
  required = _required_ids(pipes.tok_json)
  for i in keep_ids:
    if not 0 <= int(i) < pipes.size:
      raise ValueError(f"keep id {i} is not a token id of {pipes.path} (0..{pipes.size - 1})")
    required.add(int(i))
  if pipes.tok_json["model"]["type"] == "WordPiece":
    for name, backend in pipes.backends().items():
      required |= _wordpiece_unk_prefix_ids(backend, texts, encoded[name])
  keep[sorted(required)] = True

  model_ids = _model_vocab_ids(pipes.tok_json)
  kept = np.nonzero(keep)[0]
  in_model = np.array([i in model_ids for i in kept], bool)
  kept_ids = np.concatenate([kept[in_model], kept[~in_model]]).astype(np.int64)
  dropped = set(np.nonzero(~keep)[0].tolist())
  affected = sum(any(any(i in dropped for i in ids[n]) for ids in encoded.values())
                 for n in range(len(texts))) if dropped and min_frequency > 1 else 0
  return VocabSelection(
      kept_ids=kept_ids, counts=counts, tokenizer_size=pipes.size, num_texts=len(texts),
      num_tokens=int(sum(map(len, encoded["tokenizer.json"]))),
      texts_with_dropped_tokens=int(affected), min_frequency=int(min_frequency)), encoded


def select_vocab(tokenizer_dir: str | os.PathLike, texts: Iterable[str], *,
                 min_frequency: int = 1, keep_ids: Iterable[int] = ()) -> VocabSelection:
  """Selects the token ids to keep for a corpus.

  Kept: every id the corpus produces at least `min_frequency` times (with either
  pipeline, see module docstring), every added / special token, the ids the
  post-processor and padding use, the unknown token, the Unigram's lowest-scoring
  piece, the pieces WordPiece matched inside words that became [UNK], and `keep_ids`.

  Args:
    tokenizer_dir: directory with tokenizer.json (Unigram, WordPiece or WordLevel).
    texts: the corpus (empty texts are skipped).
    min_frequency: >= 1; see the module docstring for what > 1 gives up.
    keep_ids: old ids to keep regardless (e.g. config.json's pad_token_id).
  Raises:
    FileNotFoundError: no tokenizer.json (names the path).
    ValueError: empty corpus, unsupported tokenizer model (BPE), bad min_frequency or
      keep id, or transformers and tokenizer.json disagreeing on ids.
  """
  return _select(_Pipelines(tokenizer_dir), _check_texts(texts), min_frequency, keep_ids)[0]


def _check_kept_ids(kept_ids, size: int, what: str) -> np.ndarray:
  kept = np.asarray(kept_ids)
  if kept.ndim != 1 or kept.size == 0 or not np.issubdtype(kept.dtype, np.integer):
    raise ValueError(f"kept_ids must be a non-empty 1-D integer sequence, got shape "
                     f"{kept.shape} dtype {kept.dtype}")
  if kept.min() < 0 or kept.max() >= size:
    raise ValueError(f"kept_ids hold ids outside 0..{size - 1} ({what})")
  if len(np.unique(kept)) != len(kept):
    raise ValueError("kept_ids hold repeated ids")
  return kept.astype(np.int64)


def reduce_tokenizer_json(tok_json: Mapping, kept_ids: Sequence[int]) -> dict:
  """The tokenizers JSON of the reduced tokenizer (new id = position in `kept_ids`).

  Unigram keeps its pieces with their scores (and unk_id / byte_fallback), WordPiece /
  WordLevel their pieces; added tokens, post-processor and padding ids are renumbered;
  normalizer, pre-tokenizer and decoder are unchanged.

  Args:
    tok_json: parsed tokenizer.json.
    kept_ids: old ids in new order; the model's own vocabulary first (new ids
      0..m-1), added tokens outside it after, as `select_vocab` orders them.
  Raises:
    ValueError: unsupported model type, an added / special / unknown token not kept,
      or the order above violated.
  """
  model = tok_json.get("model", {})
  if model.get("type") not in SUPPORTED_MODELS:
    raise ValueError(f"tokenizer model type {model.get('type')!r} is not supported; "
                     f"supported: {SUPPORTED_MODELS}")
  model_ids = _model_vocab_ids(tok_json)
  size = max([*model_ids, *(t["id"] for t in tok_json.get("added_tokens") or ())]) + 1
  kept = _check_kept_ids(kept_ids, size, "the tokenizer")
  old_to_new = {int(old): new for new, old in enumerate(kept)}
  in_model = [int(i) in model_ids for i in kept]
  if in_model != sorted(in_model, reverse=True):
    raise ValueError("kept_ids must list the tokenizer model's vocabulary ids before added "
                     "tokens outside it (as select_vocab returns them)")
  missing = sorted(_required_ids(tok_json) - set(old_to_new))
  if missing:
    names = [model_ids.get(i, next((t["content"] for t in tok_json["added_tokens"]
                                    if t["id"] == i), "?")) for i in missing]
    raise ValueError("kept_ids lack required (special / added / unknown / lowest-scoring) "
                     f"tokens: {dict(zip(missing, names))}")

  out = copy.deepcopy({k: v for k, v in tok_json.items() if k != "model"})
  new_model = {k: copy.deepcopy(v) for k, v in model.items() if k != "vocab"}
  model_kept = [int(i) for i in kept if int(i) in model_ids]
  if model["type"] == "Unigram":
    new_model["vocab"] = [list(model["vocab"][i]) for i in model_kept]
    if model.get("unk_id") is not None:
      new_model["unk_id"] = old_to_new[model["unk_id"]]
  else:
    new_model["vocab"] = {model_ids[i]: old_to_new[i] for i in model_kept}
  out["model"] = new_model
  out["added_tokens"] = [dict(t, id=old_to_new[t["id"]]) for t in tok_json.get("added_tokens")
                         or ()]
  if tok_json.get("post_processor") is not None:
    out["post_processor"] = _remap_post_processor(tok_json["post_processor"], old_to_new)
  if tok_json.get("padding") and tok_json["padding"].get("pad_id") is not None:
    out["padding"]["pad_id"] = old_to_new[tok_json["padding"]["pad_id"]]
  return out


def write_mapping(out_dir: str | os.PathLike, kept_ids: Sequence[int],
                  info: Mapping[str, Any] | None = None) -> epath.Path:
  """Writes `<out_dir>/vocab_mapping.json`: `info` plus "old_to_new" {old id: new id}."""
  path = epath.Path(out_dir) / MAPPING_FILE
  mapping = dict(info or {}, old_to_new={str(int(o)): n for n, o in enumerate(kept_ids)})
  path.write_text(json.dumps(mapping, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
  return path


def read_mapping(reduced_dir: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
  """(kept old ids in new-id order, the other fields) of `<reduced_dir>/vocab_mapping.json`.

  Raises FileNotFoundError naming the file; ValueError when its new ids are not
  0..V'-1 exactly once."""
  path = epath.Path(reduced_dir) / MAPPING_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: not a directory written by "
                            "python -m kd_jax.vocab")
  mapping = json.loads(path.read_text(encoding="utf-8"))
  old_to_new = {int(o): int(n) for o, n in mapping.pop("old_to_new").items()}
  kept = np.full(len(old_to_new), -1, np.int64)
  for old, new in old_to_new.items():
    if not 0 <= new < len(kept) or kept[new] != -1:
      raise ValueError(f"{path}: new id {new} is out of range or repeated")
    kept[new] = old
  return kept, mapping


def write_reduced_tokenizer(tokenizer_dir: str | os.PathLike, kept_ids: Sequence[int],
                            out_dir: str | os.PathLike) -> epath.Path:
  """Writes the reduced tokenizer of `tokenizer_dir` into the existing `out_dir`.

  Writes tokenizer.json (`reduce_tokenizer_json`), tokenizer_config.json (added-token
  ids renumbered; `vocab_file` / `tokenizer_file` entries dropped),
  special_tokens_map.json / added_tokens.json when the source has them, and
  vocab_mapping.json (`write_mapping`). The slow tokenizer files
  (sentencepiece.bpe.model, vocab.txt) hold the full vocabulary and are not copied.
  Returns `out_dir`.
  Raises: as `reduce_tokenizer_json`; FileNotFoundError without tokenizer.json.
  """
  from tokenizers import Tokenizer
  src, out = epath.Path(tokenizer_dir), epath.Path(out_dir)
  tok_json, _ = _read_tokenizer_json(src)
  reduced = reduce_tokenizer_json(tok_json, kept_ids)
  old_to_new = {int(old): new for new, old in enumerate(kept_ids)}
  text = json.dumps(reduced, ensure_ascii=False, indent=2)
  Tokenizer.from_str(text)  # the tokenizers library accepts it
  (out / "tokenizer.json").write_text(text + "\n", encoding="utf-8")
  for name in _TOKENIZER_FILES:
    if (src / name).is_file():
      shutil.copyfile(src / name, out / name)
  config_path = out / "tokenizer_config.json"
  if config_path.is_file():
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("vocab_file", "tokenizer_file"):
      config.pop(key, None)
    if "added_tokens_decoder" in config:
      config["added_tokens_decoder"] = {
          str(old_to_new[int(i)]): v for i, v in config["added_tokens_decoder"].items()
          if int(i) in old_to_new}
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                           encoding="utf-8")
  if (src / "added_tokens.json").is_file():
    added = json.loads((src / "added_tokens.json").read_text(encoding="utf-8"))
    (out / "added_tokens.json").write_text(json.dumps(
        {tok: old_to_new[i] for tok, i in added.items() if i in old_to_new},
        ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
  write_mapping(out, kept_ids, {"source_tokenizer": str(src)})
  return out


# --------------------------------------------------------------------------- weights


def reduce_params(params: Mapping, config: EncoderConfig, kept_ids: Sequence[int]
                  ) -> tuple[dict, EncoderConfig]:
  """Keeps the rows of `kept_ids` in the word embeddings (and the MLM head's bias).

  Slices `embeddings/word_embeddings/embedding` [V, H] -> [V', H] and, when the tree
  has an MLM head, `lm_head/bias` [V] -> [V'] (its decoder is tied to the word
  embeddings, so nothing else has a vocabulary axis). Other leaves are shared, not
  copied.

  Args:
    params: the Encoder's `params` collection (numpy or jax arrays).
    config: its EncoderConfig.
    kept_ids: old ids in new-id order (new id i = kept_ids[i]), unique, in 0..V-1;
      must hold `config.pad_token_id`.
  Returns:
    (params, config) with vocab_size = V' and pad_token_id renumbered.
  Raises:
    ValueError: bad kept_ids, no word embeddings, a padding id that is dropped or (for
      the roberta family, whose position ids start at pad_token_id + 1) that moves, or
      an lm_head leaf with a vocabulary axis other than `bias`.
  """
  kept = _check_kept_ids(kept_ids, config.vocab_size, f"vocab_size={config.vocab_size}")
  try:
    table = params["embeddings"]["word_embeddings"]["embedding"]
  except (KeyError, TypeError) as e:
    raise ValueError("params have no embeddings/word_embeddings/embedding") from e
  if table.shape[0] != config.vocab_size:
    raise ValueError(f"embeddings/word_embeddings/embedding has {table.shape[0]} rows but "
                     f"config.vocab_size={config.vocab_size}")
  positions = np.nonzero(kept == config.pad_token_id)[0]
  if not len(positions):
    raise ValueError(f"kept_ids do not hold pad_token_id={config.pad_token_id}")
  new_pad = int(positions[0])
  if config.family == "roberta" and new_pad != config.pad_token_id:
    raise ValueError(f"roberta family: pad_token_id {config.pad_token_id} would become "
                     f"{new_pad}, which shifts the position ids (pad_token_id + 1 + index);"
                     f" keep ids 0..{config.pad_token_id} in place")
  out = dict(params)
  out["embeddings"] = dict(params["embeddings"])
  out["embeddings"]["word_embeddings"] = dict(params["embeddings"]["word_embeddings"],
                                              embedding=table[kept])
  if "lm_head" in params:
    head = dict(params["lm_head"])
    for name, leaf in _flat(head).items():
      if name != "bias" and config.vocab_size in np.shape(leaf):
        raise ValueError(f"lm_head/{name} {np.shape(leaf)} has a vocabulary axis; only a "
                         "tied head (lm_head/bias) is supported")
    if "bias" in head:
      head["bias"] = head["bias"][kept]
    out["lm_head"] = head
  return out, config.replace(vocab_size=len(kept), pad_token_id=new_pad)


def _flat(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def reduce_state_dict(state_dict: Mapping[str, np.ndarray], kept_ids: Sequence[int],
                      vocab_size: int, source: str = "checkpoint") -> dict[str, np.ndarray]:
  """Slices the checkpoint tensors indexed by token id (HF names, any prefix).

  Sliced along their first axis: `*embeddings.word_embeddings.weight` and the MLM
  heads' `lm_head.{bias,decoder.weight,decoder.bias}`,
  `cls.predictions.{bias,decoder.weight,decoder.bias}`, `lm_predictions.lm_head.bias`,
  `vocab_projector.{weight,bias}` (DistilBERT).
  Other tensors are returned as they are (same arrays, same dtypes).
  Raises:
    ValueError: (naming `source`) no word embeddings, or a vocabulary tensor whose
      first axis is not `vocab_size`.
  """
  kept = _check_kept_ids(kept_ids, vocab_size, f"{source}: vocab_size={vocab_size}")
  out, found = {}, False
  for name, value in state_dict.items():
    if _VOCAB_TENSORS.search(name):
      if value.shape[0] != vocab_size:
        raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, expected "
                         f"{vocab_size} rows (config.json vocab_size)")
      found |= name.endswith("word_embeddings.weight")
      out[name] = np.ascontiguousarray(value[kept])
    else:
      if vocab_size in np.shape(value)[:1] and vocab_size > 1024:
        _logger.warning("%s: %s %s has vocab_size rows but is not a known vocabulary tensor;"
                        " left unchanged", source, name, tuple(value.shape))
      out[name] = value
  if not found:
    raise ValueError(f"{source}: no embeddings.word_embeddings.weight tensor")
  return out


# --------------------------------------------------------------------------- directories


def _check_same_tokens(pipes: _Pipelines, reduced_dir: epath.Path, texts: list[str],
                       encoded: Mapping[str, list[list[int]]], old_to_new: np.ndarray) -> int:
  """Encodes the corpus with the reduced tokenizer (both pipelines) and compares with
  the full one's ids mapped to new ids; texts with dropped tokens are skipped.
  Returns the number of (text, pipeline) pairs checked.
  Raises RuntimeError on the first difference (a bug: the guarantee is violated)."""
  reduced = _Pipelines(reduced_dir).encode(texts)
  checked = 0
  for name, full_ids in encoded.items():
    for n, (ids, got) in enumerate(zip(full_ids, reduced[name])):
      expected = old_to_new[np.asarray(ids, np.int64)]
      if (expected < 0).any():
        continue
      checked += 1
      if list(expected) != list(got):
        raise RuntimeError(f"reduced tokenizer ({name}) tokenizes corpus text {n} "
                           f"differently: {texts[n]!r}: expected ids {list(expected)}, "
                           f"got {list(got)}")
  return checked


def _swap_into_place(tmp: epath.Path, out_dir: epath.Path, overwrite: bool) -> None:
  from kd_jax import export
  export._prepare_out_dir(out_dir, overwrite)  # again: someone may have written there
  old = None
  try:
    if out_dir.exists():
      old = epath.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
      os.replace(out_dir, old / "d")
    os.replace(tmp, out_dir)
  except BaseException:
    if old is not None and not out_dir.exists():
      os.replace(old / "d", out_dir)
    raise
  finally:
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)


def reduce_model_dir(model: str | os.PathLike, out_dir: str | os.PathLike,
                     texts: Iterable[str], *, min_frequency: int = 1, overwrite: bool = False,
                     corpus: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Writes the vocabulary-reduced copy of an HF model directory.

  Args:
    model: an HF directory (config.json, weights, tokenizer.json: a pretrained model,
      `kd_jax.export` output, ...) or a name `hf_io.resolve_model_dir` knows
      ("multilingual-e5-small", a hub id when online).
    out_dir: directory to create (written next to it, checked, then renamed into place).
    texts: the corpus (see `corpus_texts`).
    min_frequency: keep corpus tokens seen at least this often (module docstring).
    overwrite: replace a non-empty `out_dir`.
    corpus: description of the corpus recorded in vocab_mapping.json.
  Returns:
    The summary written to vocab_mapping.json (without the mapping): vocab_size,
    tokenizer_size, params and embedding_params {"before", "after"} (parameter counts
    from the checkpoint's tensors), num_texts, num_tokens, texts_with_dropped_tokens,
    encodings_checked ((text, pipeline) pairs whose reduced ids were compared), ...
  Raises:
    FileNotFoundError: missing model directory, tokenizer.json or weights (named).
    FileExistsError: non-empty `out_dir` without `overwrite`.
    ValueError: empty corpus, unsupported tokenizer, or tensors that do not fit.
    RuntimeError: the reduced tokenizer does not reproduce the corpus tokens (a bug).
  """
  from safetensors.numpy import save_file

  from kd_jax import export
  model_dir = hf_io.resolve_model_dir(str(model))
  out_dir = paths.resolve_local(out_dir, "out_dir")
  export._prepare_out_dir(out_dir, overwrite)
  texts = _check_texts(texts)
  pipes = _Pipelines(model_dir)
  hf_config = hf_io.read_hf_config(model_dir)
  vocab_size = hf_config.get("vocab_size")
  if not isinstance(vocab_size, int) or vocab_size < pipes.size:
    raise ValueError(f"{model_dir / 'config.json'}: vocab_size={vocab_size!r} but the "
                     f"tokenizer has {pipes.size} ids")
  config_ids = {k: hf_config[k] for k in CONFIG_TOKEN_IDS if isinstance(hf_config.get(k), int)}
  for k, i in config_ids.items():
    if not 0 <= i < pipes.size:
      raise ValueError(f"{model_dir / 'config.json'}: {k}={i} is not a token id of "
                       f"{pipes.path} (0..{pipes.size - 1})")
  keep_ids = set(config_ids.values())
  if hf_io.MODEL_TYPES.get(hf_config.get("model_type")) == "roberta" and "pad_token_id" in \
      config_ids:
    keep_ids |= set(range(config_ids["pad_token_id"]))  # position ids start at pad + 1
  selection, encoded = _select(pipes, texts, min_frequency, keep_ids)
  kept = selection.kept_ids
  old_to_new = selection.old_to_new()

  state_dict, source = hf_io.read_state_dict(model_dir)
  reduced = reduce_state_dict(state_dict, kept, vocab_size, source=source)
  emb_name = next(n for n in state_dict if n.endswith("embeddings.word_embeddings.weight"))
  new_config = dict(hf_config, vocab_size=len(kept))
  new_config.update({k: int(old_to_new[i]) for k, i in config_ids.items()})
  summary = {
      "method": "vocabulary reduction (Abdaoui et al. 2020, arXiv 2010.05609)",
      "source_model": str(model_dir),
      "corpus": dict(corpus or {}),
      "min_frequency": selection.min_frequency,
      "num_texts": selection.num_texts,
      "num_tokens": selection.num_tokens,
      "texts_with_dropped_tokens": selection.texts_with_dropped_tokens,
      "vocab_size": {"before": vocab_size, "after": len(kept)},
      "tokenizer_size": {"before": pipes.size, "after": len(kept)},
      "params": {"before": int(sum(np.size(v) for v in state_dict.values())),
                 "after": int(sum(np.size(v) for v in reduced.values()))},
      "embedding_params": {"before": int(np.size(state_dict[emb_name])),
                           "after": int(np.size(reduced[emb_name]))},
  }
  new_config["kd_jax_vocab_reduction"] = {"source_model": str(model_dir),
                                          "vocab_size_before": vocab_size,
                                          "mapping": MAPPING_FILE}

  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = epath.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
  try:
    (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
    save_file(reduced, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    write_reduced_tokenizer(model_dir, kept, tmp)
    summary["encodings_checked"] = _check_same_tokens(pipes, tmp, texts, encoded, old_to_new)
    write_mapping(tmp, kept, summary)
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700 (and save_file its file 0600)
    for path in tmp.iterdir():
      os.chmod(path, 0o644)
    _swap_into_place(tmp, out_dir, overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _logger.info("reduced %s -> %s: vocab %d -> %d", model_dir, out_dir, vocab_size, len(kept))
  return summary


# --------------------------------------------------------------------------- CLI


def _format_summary(summary: Mapping[str, Any], out_dir) -> str:
  v, p, e = summary["vocab_size"], summary["params"], summary["embedding_params"]
  share = lambda k: 100.0 * e[k] / p[k]
  lines = [
      f"reduced {summary['source_model']} -> {out_dir}",
      (f"corpus: {summary['num_texts']:,} texts, {summary['num_tokens']:,} tokens, "
       f"min_frequency {summary['min_frequency']} "
       f"({summary['texts_with_dropped_tokens']:,} texts hold dropped tokens)"),
      f"vocab_size: {v['before']:,} -> {v['after']:,}",
      (f"parameters: {p['before']:,} -> {p['after']:,} "
       f"({100.0 * p['after'] / p['before']:.1f} %)"),
      (f"word embeddings: {e['before']:,} -> {e['after']:,} "
       f"({share('before'):.1f} % -> {share('after'):.1f} % of the parameters)"),
  ]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
      prog="python -m kd_jax.vocab",
      description="Vocabulary reduction (Abdaoui et al. 2020): keep the tokens a corpus of "
                  "the target languages uses; write a smaller HF model directory.")
  parser.add_argument("--model", required=True,
                      help="HF model directory (or multilingual-e5-small / a hub id)")
  parser.add_argument("--out", required=True, help="output directory (created)")
  parser.add_argument("--text", action="append", default=[], metavar="FILE",
                      help="corpus text file, one text per line (repeatable)")
  parser.add_argument("--tsm", default="",
                      help="comma-separated tsm languages whose texts join the corpus, or "
                           f"'all' ({','.join(TSM_LANGUAGES)})")
  parser.add_argument("--tsm-split", default="train", choices=("train", "val", "test"))
  parser.add_argument("--data-dir", default=None,
                      help="tsm data directory (default $KD_JAX_DATA_DIR)")
  parser.add_argument("--min-frequency", type=int, default=1,
                      help="keep tokens seen at least this often (default 1: every corpus "
                           "text keeps its exact tokens)")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  languages = (list(TSM_LANGUAGES) if args.tsm.strip() == "all"
               else [x.strip() for x in args.tsm.split(",") if x.strip()])
  if not args.text and not languages:
    parser.error("give a corpus: --text FILE and/or --tsm LANGUAGES")
  # Paths are resolved once here, against the current directory.
  model = os.fspath(paths.resolve(args.model)) if paths.looks_like_path(args.model) else args.model
  out = paths.resolve_local(args.out, "--out")
  text_files = [paths.resolve(p) for p in args.text]
  data_dir = args.data_dir or os.environ.get(paths.DATA_DIR_ENV)
  data_dir = paths.resolve(data_dir) if data_dir else None
  texts = corpus_texts(text_files, languages, tsm_split=args.tsm_split, data_dir=data_dir)
  corpus = {"text_files": [os.fspath(p) for p in text_files]}
  if languages:
    corpus["tsm"] = {"languages": languages, "split": args.tsm_split,
                     "data_dir": None if data_dir is None else os.fspath(data_dir)}
  summary = reduce_model_dir(model, out, texts, min_frequency=args.min_frequency,
                             overwrite=args.overwrite, corpus=corpus)
  print(_format_summary(summary, out))
  return summary


if __name__ == "__main__":
  try:
    main()
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
