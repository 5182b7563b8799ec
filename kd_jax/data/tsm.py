"""Multilingual tweet sentiment ("tsm", XLM-T) loader.

Local layout (as shipped in the XLM-T repository, ``data/sentiment``)::

    <data_dir>/xlmt/<language>/{train,val,test}_text.txt
    <data_dir>/xlmt/<language>/{train,val,test}_labels.txt

one tweet / one integer label per line (0 negative, 1 neutral, 2 positive).
Without a local copy the same data is read from the Hugging Face hub
(``cardiffnlp/tweet_sentiment_multilingual``).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from etils import epath

from kd_jax.data.schema import DataError, Example, check_fraction, stratified_subset
from kd_jax.paths import DATA_DIR_ENV  # the one name of the variable

HUB_NAME = "cardiffnlp/tweet_sentiment_multilingual"

TSM_LANGUAGES = (
    "arabic",
    "english",
    "french",
    "german",
    "hindi",
    "italian",
    "portuguese",
    "spanish",
)
TSM_LABELS = ("negative", "neutral", "positive")
TSM_SPLITS = ("train", "val", "test")
# The hub copy calls the validation split "validation".
_HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}


def load_tsm(
    split: str,
    languages: Sequence[str] = TSM_LANGUAGES,
    data_dir: str | os.PathLike | None = None,
    fraction: float = 1.0,
    seed: int = 0,
) -> list[Example]:
  """Loads one split of tsm for the given languages.

  Args:
    split: one of "train", "val", "test".
    languages: language folder names (see ``TSM_LANGUAGES``).
    data_dir: folder containing ``xlmt/``, the ``xlmt`` folder itself, or a
      folder directly containing language folders. If None, the env var
      ``KD_JAX_DATA_DIR`` is used; if that is unset too, the hub copy is
      loaded with ``datasets.load_dataset``.
    fraction: in (0, 1]; keeps a seeded subset of each language, stratified by
      label (``schema.stratified_subset``: ``max(1, round(fraction * n_c))`` of
      each class c; file order is kept within the subset).
    seed: seed for the subset.

  Returns:
    Examples ordered by language (in ``languages`` order), then file order.

  Raises:
    DataError: unknown split, fraction out of range, missing data dir or
      language folder, text/label files of different lengths, bad label.
  """
  if split not in TSM_SPLITS:
    raise DataError(f"unknown tsm split {split!r}; expected one of {TSM_SPLITS}")
  check_fraction(fraction)
  languages = tuple(languages)
  if data_dir is None:
    data_dir = os.environ.get(DATA_DIR_ENV) or None

  examples: list[Example] = []
  if data_dir is None:
    per_language = {lang: _load_hub(split, lang) for lang in languages}
  else:
    root = _resolve_root(epath.Path(data_dir))
    per_language = {lang: _load_local(root, split, lang) for lang in languages}

  for lang_index, lang in enumerate(languages):
    # The language index separates the languages' subsets.
    examples.extend(stratified_subset(per_language[lang], fraction, seed, lang_index))
  return examples


def _resolve_root(data_dir: epath.Path) -> epath.Path:
  """Returns the folder that directly contains the language folders."""
  if not data_dir.is_dir():
    raise DataError(
        f"tsm data dir {str(data_dir)!r} does not exist or is not a directory; "
        f"pass data_dir= or set {DATA_DIR_ENV} to the folder containing 'xlmt/' "
        f"(e.g. {DATA_DIR_ENV}=../shared/data)"
    )
  if (data_dir / "xlmt").is_dir():
    return data_dir / "xlmt"
  return data_dir


def _read_lines(path: epath.Path) -> list[str]:
  # Split on "\n" only: str.splitlines would also split on U+2028/U+0085,
  # which can occur inside tweets and would misalign texts and labels.
  content = path.read_bytes().decode("utf-8")  # bytes: keep "\r" and U+2028 as they are
  if content == "":
    return []
  lines = content.split("\n")
  if lines[-1] == "":  # tolerate a trailing newline
    lines.pop()
  return [line[:-1] if line.endswith("\r") else line for line in lines]


def _load_local(root: epath.Path, split: str, language: str) -> list[Example]:
  lang_dir = root / language
  if not lang_dir.is_dir():
    available = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise DataError(
        f"tsm language folder {str(lang_dir)!r} not found; "
        f"available languages in {str(root)!r}: {available}"
    )
  text_path = lang_dir / f"{split}_text.txt"
  label_path = lang_dir / f"{split}_labels.txt"
  for path in (text_path, label_path):
    if not path.is_file():
      raise DataError(f"tsm file {str(path)!r} not found")
  texts = _read_lines(text_path)
  raw_labels = _read_lines(label_path)
  if len(texts) != len(raw_labels):
    raise DataError(
        f"tsm line count mismatch: {str(text_path)!r} has {len(texts)} lines but "
        f"{str(label_path)!r} has {len(raw_labels)} lines"
    )
  examples = []
  for line_no, (text, raw) in enumerate(zip(texts, raw_labels), start=1):
    label = _parse_label(raw)
    if label is None:
      raise DataError(
          f"{str(label_path)!r} line {line_no}: invalid label {raw!r}; "
          f"expected an integer in [0, {len(TSM_LABELS) - 1}]"
      )
    examples.append(Example(text=text, label=label, language=language))
  return examples


def _parse_label(raw: str) -> int | None:
  try:
    label = int(raw.strip())
  except ValueError:
    return None
  return label if 0 <= label < len(TSM_LABELS) else None


def _load_hub(split: str, language: str) -> list[Example]:
  """Reads one language/split from the hub copy (needs network or HF cache)."""
  if language not in TSM_LANGUAGES:
    raise DataError(
        f"tsm language {language!r} not on the hub copy {HUB_NAME}; "
        f"available: {list(TSM_LANGUAGES)}"
    )
  try:
    import datasets
  except ImportError as e:  # pragma: no cover - datasets is a dependency
    raise DataError(
        f"no local tsm data ({DATA_DIR_ENV} unset) and the 'datasets' package "
        f"is not installed; set {DATA_DIR_ENV} to the folder containing 'xlmt/'"
    ) from e
  try:
    ds = datasets.load_dataset(HUB_NAME, language, split=_HUB_SPLITS[split])
  except Exception as e:
    raise DataError(
        f"no local tsm data ({DATA_DIR_ENV} unset) and loading {HUB_NAME} "
        f"({language}, {_HUB_SPLITS[split]}) from the hub failed: {e}; "
        f"set {DATA_DIR_ENV} to the folder containing 'xlmt/'"
    ) from e
  examples = []
  for row_no, row in enumerate(ds, start=1):
    label = row["label"]
    if not isinstance(label, (int, np.integer)) or not 0 <= label < len(TSM_LABELS):
      raise DataError(
          f"{HUB_NAME} ({language}, {_HUB_SPLITS[split]}) row {row_no}: "
          f"invalid label {label!r}"
      )
    examples.append(Example(text=row["text"], label=int(label), language=language))
  return examples
