"""Unlabeled text for general (task-agnostic) distillation.

Texts come from any mix of

* plain text files, one text per line (empty lines skipped),
* the text side of tsm's train split (``kd_jax.data.tsm``), one source per language,
* the text side of SIB-200's train split, ``<data_dir>/sib200/<lang_Script>/train.tsv``
  (tab-separated, header ``index_id, category, text``, standard CSV quoting; the
  category is not used).

They become ``kd_jax.data.tsm.Example`` rows (label 0, ``language`` = the source name,
e.g. ``tsm:english``, ``sib200:eng_Latn``, ``file:wiki.txt``), so tokenisation, length
buckets and the (seed, epoch)-determined shuffling of ``kd_jax.data.batching`` apply
unchanged. A seeded held-out slice is split off for MLM loss / accuracy.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from etils import epath

from kd_jax.data import batching, tasks, tsm
from kd_jax.data.schema import DataError, Example


def _resolve_data_dir(data_dir: str | os.PathLike | None, what: str) -> epath.Path:
  """``data_dir``, else ``$KD_JAX_DATA_DIR``; DataError naming both when neither exists."""
  chosen = data_dir or os.environ.get(tsm.DATA_DIR_ENV) or None
  if chosen is None:
    raise DataError(f"{what}: no data dir; set config.data.data_dir or {tsm.DATA_DIR_ENV} "
                    f"(e.g. {tsm.DATA_DIR_ENV}=../shared/data)")
  path = epath.Path(chosen)
  if not path.is_dir():
    raise DataError(f"{what}: data dir {str(path)!r} does not exist or is not a directory")
  return path


def read_text_file(path: str | os.PathLike) -> list[str]:
  """Non-empty lines of a UTF-8 text file (one text per line, ``\\n`` separated).

  Raises:
    DataError: the file does not exist or is not UTF-8 (names the file).
  """
  path = epath.Path(path)
  if not path.is_file():
    raise DataError(f"text file {str(path)!r} not found")
  try:
    content = path.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"text file {str(path)!r} is not UTF-8: {e}") from e
  # Split on "\n" only (str.splitlines also splits on U+2028 inside a text).
  lines = (line.removesuffix("\r") for line in content.split("\n"))
  return [line for line in lines if line.strip()]


def read_sib200_texts(language: str, split: str = "train",
                      data_dir: str | os.PathLike | None = None) -> list[str]:
  """The ``text`` column of ``sib200/<language>/<split>.tsv``.

  Args:
    language: a SIB-200 folder name such as ``eng_Latn``.
    split: ``train``, ``dev`` or ``test``.
    data_dir: the folder holding ``sib200/`` or ``sib200/`` itself; default
      ``$KD_JAX_DATA_DIR``.

  Raises:
    DataError: missing folder or file (lists the available languages), a wrong
      header, or a row without three fields (names file and line).
  """
  given = _resolve_data_dir(data_dir, "sib200")
  root = tasks.sib200_root(given)
  if root is None:
    raise DataError(f"sib200: no sib200/ language folders in {str(given)!r}")
  path = root / language / f"{split}.tsv"
  if not path.is_file():
    available = sorted(p.name for p in root.iterdir() if (p / f"{split}.tsv").is_file())
    raise DataError(f"sib200 file {str(path)!r} not found (config.general.sib200_languages="
                    f"{language!r}); {len(available)} languages in {str(root)!r}, e.g. "
                    f"{available[:8]}")
  return [text for _, text in tasks.read_sib200_file(path, labelled=False) if text.strip()]


def load_text_sources(*, text_files: Sequence[str] = (), tsm_languages: Sequence[str] = (),
                      sib200_languages: Sequence[str] = (),
                      data_dir: str | os.PathLike | None = None) -> list[Example]:
  """All texts of the given sources as Examples (label 0, language = source name).

  Order: text files, then tsm languages, then SIB-200 languages, each in file order
  (shuffling is the batcher's job).

  Raises:
    DataError: no source given, a source with no text, or any reader error above.
  """
  sources: list[tuple[str, list[str]]] = []
  for path in text_files:
    sources.append((f"file:{epath.Path(path).name}", read_text_file(path)))
  if tsm_languages:
    examples = tsm.load_tsm("train", tuple(tsm_languages), data_dir=data_dir or None)
    for lang in tsm_languages:
      sources.append((f"tsm:{lang}", [e.text for e in examples if e.language == lang]))
  for lang in sib200_languages:
    sources.append((f"sib200:{lang}", read_sib200_texts(lang, "train", data_dir)))
  if not sources:
    raise DataError("no text source: set config.general.text_files, tsm_languages or "
                    "sib200_languages")
  names = [name for name, _ in sources]
  duplicated = sorted({n for n in names if names.count(n) > 1})
  if duplicated:
    raise DataError(f"text sources listed twice: {duplicated}")
  out = []
  for name, texts in sources:
    if not texts:
      raise DataError(f"text source {name} has no non-empty text")
    out.extend(Example(text=t, label=0, language=name) for t in texts)
  return out


@dataclasses.dataclass(frozen=True)
class TextData:
  """Tokenised unlabeled text: a training part and a held-out part.

  ``train`` / ``heldout`` are ``batching.TokenizedData`` whose ``language_order`` are
  the source names (``tsm:english``, ...) and whose labels are all 0.
  """
  train: batching.TokenizedData
  heldout: batching.TokenizedData


def split_heldout(examples: Sequence[Example], heldout_size: int,
                  seed: int) -> tuple[list[Example], list[Example]]:
  """(train, heldout): ``heldout_size`` examples drawn with ``default_rng((seed, 1))``
  (both parts keep the input order).

  Raises:
    DataError: heldout_size < 1 or more than half of the examples.
  """
  n = len(examples)
  if heldout_size < 1 or 2 * heldout_size > n:
    raise DataError(f"config.general.heldout_size={heldout_size} must be in [1, {n // 2}] "
                    f"(half of the {n} texts)")
  held = np.zeros(n, bool)
  held[np.random.default_rng((seed, 1)).choice(n, size=heldout_size, replace=False)] = True
  return ([e for e, h in zip(examples, held) if not h],
          [e for e, h in zip(examples, held) if h])


def load_text_data(tokenizer, *, max_length: int, heldout_size: int, seed: int,
                   **sources) -> TextData:
  """Reads ``sources`` (see :func:`load_text_sources`), splits off the held-out slice
  and tokenises both with ``batching.tokenize_examples`` (truncated at max_length)."""
  examples = load_text_sources(**sources)
  order = tuple(dict.fromkeys(e.language for e in examples))
  train, heldout = split_heldout(examples, heldout_size, seed)
  return TextData(batching.tokenize_examples(train, tokenizer, max_length, order),
                  batching.tokenize_examples(heldout, tokenizer, max_length, order))
