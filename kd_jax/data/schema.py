"""The example every reader returns, the data error, and seeded stratified subsets.

Every source (tsm, SIB-200, MASSIVE, UNER, Hugging Face datasets, TFDS, local files,
unlabeled text) yields `Example` rows, so tokenisation and batching
(`kd_jax.data.batching`) are the same for all of them.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np


class DataError(ValueError):
  """Data is missing or malformed; the message names the dataset, file, split, row or
  column."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One labelled (or, for general distillation, unlabeled) example.

  Attributes:
    text: the input text (sequence tasks; unused when `tokens` is set).
    label: class id (sequence tasks), or one tag id per word (token tasks).
    language: the language name as the task names it (`english`, `eng_Latn`, `de-DE`).
    text_pair: the second text of a sentence-pair task (XNLI, PAWS-X), else None.
    tokens: the words of a token task (UNER), else None; `label` then has one tag id
      per word.
  """
  text: str
  label: int | tuple[int, ...]
  language: str
  text_pair: str | None = None
  tokens: tuple[str, ...] | None = None


def check_fraction(fraction: float, field: str = "fraction") -> None:
  """Raises DataError unless 0 < fraction <= 1."""
  if not (0.0 < float(fraction) <= 1.0):
    raise DataError(f"{field} must be in (0, 1], got {fraction!r}")


def stratified_subset(rows: Sequence[Example], fraction: float, seed: int,
                      stream: int = 0) -> list[Example]:
  """A seeded subset of one language's rows, stratified by label.

  Each class c with n_c rows keeps `max(1, round(fraction * n_c))` of them (so every class
  present stays present: The Privileged Students, Figure 2's 1/5/10/20 % subsets), drawn
  with `np.random.default_rng((seed, stream, c))`; token tasks (a tag sequence per row)
  are not stratified and keep `max(1, round(fraction * n))` rows drawn with
  `default_rng((seed, stream))`. The input order is kept within the subset.

  Args:
    rows: the examples of one language (and split).
    fraction: in (0, 1]; 1 returns `rows` unchanged.
    seed: the run's seed; the same seed gives the same subset.
    stream: separates independent subsets (the language's index).

  Raises:
    DataError: fraction outside (0, 1].
  """
  check_fraction(fraction)
  rows = list(rows)
  if fraction >= 1.0 or not rows:
    return rows
  if any(isinstance(r.label, tuple) for r in rows):
    groups = {None: list(range(len(rows)))}
  else:
    groups = collections.defaultdict(list)
    for i, r in enumerate(rows):
      groups[int(r.label)].append(i)
  keep: list[int] = []
  for c in sorted(groups, key=lambda c: -1 if c is None else c):
    members = groups[c]
    n_keep = max(1, int(round(fraction * len(members))))
    rng = np.random.default_rng((seed, stream) if c is None else (seed, stream, c))
    keep.extend(members[i] for i in rng.choice(len(members), size=n_keep, replace=False))
  return [rows[i] for i in sorted(keep)]
