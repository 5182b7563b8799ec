"""Tokenization and length-bucketed batching with static shapes.

Every batch has exactly ``batch_size`` rows and is padded to one of a few
bucket lengths, so a jitted step compiles once per bucket (not per batch)
while short texts are not padded to the global maximum.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterator, Sequence

import numpy as np

from kd_jax.data.schema import Example

# Label of the tokens a token task does not score (special tokens, non-first sub-tokens,
# padding): the ignore index of losses.token_cross_entropy and of HF.
IGNORE_LABEL = -100


@dataclasses.dataclass(frozen=True)
class TokenizedData:
  """Tokenized examples, unpadded.

  Attributes:
    input_ids: N arrays, each int32 [length_i], special tokens included.
    lengths: int32 [N], ``len(input_ids[i])`` (<= the max_length used).
    labels: int32 [N] class ids (sequence tasks; zeros for token tasks).
    language_ids: int32 [N], index into ``language_order``.
    num_truncated: number of examples longer than max_length before truncation.
    language_order: language names indexed by ``language_ids``.
    token_type_ids: None, or (sentence pairs) N arrays int32 [length_i]: 0 for the first
      text, 1 for the second (the tokenizer's own).
    token_labels: None, or (token tasks) N arrays int32 [length_i]: the word's tag id at
      its first sub-token, ``IGNORE_LABEL`` elsewhere (HF's run_ner alignment).
  """

  input_ids: list[np.ndarray]
  lengths: np.ndarray
  labels: np.ndarray
  language_ids: np.ndarray
  num_truncated: int = 0
  language_order: tuple[str, ...] = ()
  token_type_ids: list[np.ndarray] | None = None
  token_labels: list[np.ndarray] | None = None

  def __post_init__(self):
    n = len(self.input_ids)
    for name in ("lengths", "labels", "language_ids"):
      if len(getattr(self, name)) != n:
        raise ValueError(
            f"TokenizedData.{name} has {len(getattr(self, name))} entries, "
            f"input_ids has {n}"
        )

  def __len__(self) -> int:
    return len(self.input_ids)

  @property
  def truncated_fraction(self) -> float:
    return self.num_truncated / len(self) if len(self) else 0.0


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer,
    max_length: int,
    language_order: Sequence[str],
) -> TokenizedData:
  """Tokenizes examples with a transformers tokenizer (no padding).

  The tokenizer is called once on all texts without truncation (to count
  overlong texts), then once more, with ``truncation=True``, only on the
  overlong ones, so the truncated ids are exactly what the tokenizer's own
  truncation produces (special tokens kept). Sentence pairs (`text_pair`) are
  encoded as the tokenizer's pairs (with `token_type_ids`; truncation longest_first);
  token tasks (`tokens`) as pre-split words (`is_split_into_words`), each word's tag
  on its first sub-token (`token_labels`; needs a fast tokenizer for `word_ids`).

  Args:
    examples: examples to tokenize.
    tokenizer: a callable transformers tokenizer (fast tokenizers recommended).
    max_length: maximum tokens per example, special tokens included.
    language_order: languages; ``language_ids`` index into it.

  Returns:
    TokenizedData with int32 arrays.

  Raises:
    ValueError: max_length < 1, or an example's language not in language_order.
  """
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1, got {max_length}")
  language_order = tuple(language_order)
  lang_index = {lang: i for i, lang in enumerate(language_order)}
  missing = sorted({e.language for e in examples} - set(lang_index))
  if missing:
    raise ValueError(
        f"languages {missing} are not in language_order {list(language_order)}"
    )

  token_task = any(e.tokens is not None for e in examples)
  pairs = any(e.text_pair is not None for e in examples)
  if token_task:
    inputs = ([list(e.tokens) for e in examples],)
    kwargs = {"is_split_into_words": True}
  elif pairs:
    inputs = ([e.text for e in examples], [e.text_pair or "" for e in examples])
    kwargs = {"return_token_type_ids": True}
  else:
    inputs, kwargs = ([e.text for e in examples],), {}

  def encode(rows, **more):
    if not rows:
      return None
    return tokenizer(*([x[i] for i in rows] for x in inputs), padding=False,
                     return_attention_mask=False, **kwargs, **more)

  full = encode(range(len(examples)), truncation=False)
  encodings = [(full, i) for i in range(len(examples))]
  long_rows = [i for i in range(len(examples)) if len(full["input_ids"][i]) > max_length]
  pairs = pairs and full is not None and "token_type_ids" in full
  if long_rows:  # the tokenizer's own truncation (longest_first for pairs), specials kept
    truncated = encode(long_rows, truncation=True, max_length=max_length)
    for j, i in enumerate(long_rows):
      encodings[i] = (truncated, j)
  ids_list = [np.asarray(enc["input_ids"][j], np.int32) for enc, j in encodings]
  type_ids = token_labels = None
  if pairs and not token_task:
    type_ids = [np.asarray(enc["token_type_ids"][j], np.int32) for enc, j in encodings]
  if token_task:
    token_labels = [_align_tags(e.label, enc.word_ids(j)) for e, (enc, j)
                    in zip(examples, encodings)]
  labels = [0 if token_task else e.label for e in examples]
  return TokenizedData(
      input_ids=ids_list,
      lengths=np.asarray([len(ids) for ids in ids_list], dtype=np.int32),
      labels=np.asarray(labels, dtype=np.int32),
      language_ids=np.asarray(
          [lang_index[e.language] for e in examples], dtype=np.int32
      ),
      num_truncated=len(long_rows),
      language_order=language_order,
      token_type_ids=type_ids,
      token_labels=token_labels,
  )


def _align_tags(tags, word_ids) -> np.ndarray:
  """Word-level tag ids -> one per token: the tag at each word's first sub-token,
  IGNORE_LABEL at later sub-tokens and special tokens (word id None)."""
  out = np.full(len(word_ids), IGNORE_LABEL, np.int32)
  previous = None
  for t, w in enumerate(word_ids):
    if w is not None and w != previous:
      out[t] = tags[w]
    previous = w
  return out


def bucket_boundaries(max_length: int, num_buckets: int) -> tuple[int, ...]:
  """Halving bucket lengths ending at max_length, e.g. (128, 3) -> (32, 64, 128).

  Raises:
    ValueError: max_length or num_buckets < 1.
  """
  if max_length < 1 or num_buckets < 1:
    raise ValueError(
        f"max_length and num_buckets must be >= 1, got {max_length}, {num_buckets}"
    )
  bounds = sorted({math.ceil(max_length / 2**k) for k in range(num_buckets)})
  return tuple(int(b) for b in bounds)


def validate_buckets(
    buckets: Sequence[int], max_length: int | None = None
) -> tuple[int, ...]:
  """Checks buckets are positive, strictly increasing, last == max_length.

  Returns:
    The buckets as a tuple of ints.

  Raises:
    ValueError: empty, non-positive, unsorted/duplicate, or last != max_length.
  """
  buckets = tuple(int(b) for b in buckets)
  if not buckets:
    raise ValueError("buckets must not be empty")
  if buckets[0] < 1 or any(a >= b for a, b in zip(buckets, buckets[1:])):
    raise ValueError(f"buckets must be positive and strictly increasing, got {buckets}")
  if max_length is not None and buckets[-1] != max_length:
    raise ValueError(
        f"last bucket must equal max_length={max_length}, got buckets {buckets}"
    )
  return buckets


def _assign_buckets(data: TokenizedData, buckets: Sequence[int]) -> np.ndarray:
  """Index of the smallest bucket >= each length; int [N]."""
  buckets = validate_buckets(buckets)
  lengths = np.asarray(data.lengths)
  if len(lengths) and lengths.max() > buckets[-1]:
    worst = int(np.argmax(lengths))
    raise ValueError(
        f"example {worst} has {int(lengths[worst])} tokens, more than the largest "
        f"bucket {buckets[-1]}; tokenize with max_length <= {buckets[-1]}"
    )
  return np.searchsorted(np.asarray(buckets), lengths, side="left")


def check_batch_size(batch_size: int, num_data_shards: int) -> None:
  """Raises ValueError unless batch_size is a positive multiple of num_data_shards."""
  if num_data_shards < 1 or batch_size < 1 or batch_size % num_data_shards:
    raise ValueError(
        f"batch_size ({batch_size}) must be a positive multiple of the number "
        f"of data shards ({num_data_shards})"
    )


def num_batches(
    data: TokenizedData, batch_size: int, buckets: Sequence[int], drop_remainder: bool
) -> int:
  """Number of batches ``batches`` yields for one epoch."""
  counts = np.bincount(_assign_buckets(data, buckets), minlength=len(buckets))
  if drop_remainder:
    return int(sum(c // batch_size for c in counts))
  return int(sum(-(-c // batch_size) for c in counts))


def steps_per_epoch(data: TokenizedData, batch_size: int, buckets: Sequence[int]) -> int:
  """Training steps per epoch (``batches`` with drop_remainder=True)."""
  return num_batches(data, batch_size, buckets, drop_remainder=True)


def batches(
    data: TokenizedData,
    batch_size: int,
    buckets: Sequence[int],
    pad_id: int,
    *,
    shuffle: bool,
    drop_remainder: bool,
    seed: int = 0,
    epoch: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields length-bucketed batches of exactly batch_size rows.

  Each example goes to the smallest bucket >= its length; a batch holds
  examples of one bucket only and is padded to that bucket's length L.
  With shuffle, examples are shuffled within buckets and then the batch
  order is shuffled, using ``np.random.default_rng((seed, epoch))`` only,
  so the order is a pure function of (seed, epoch). Without shuffle,
  batches go bucket by bucket, examples in data order.

  drop_remainder=True (training): each bucket's incomplete last batch is
  dropped. drop_remainder=False (eval): every example appears exactly once;
  a bucket's last batch is filled up to batch_size with padding rows
  (input_ids=pad_id, attention_mask=0, labels=0, language_ids=0,
  example_mask=0, example_index=-1).

  Yields:
    dict with
      input_ids:      int32 [B, L], pad_id after each example's tokens.
      attention_mask: int32 [B, L], 1 for real tokens (all 0 in padding rows).
      labels:         int32 [B]; token tasks: int32 [B, L], IGNORE_LABEL where unscored.
      token_type_ids: int32 [B, L] (sentence pairs only).
      language_ids:   int32 [B].
      example_mask:   float32 [B], 1 for real rows, 0 for padding rows.
      example_index:  int32 [B], row index into ``data``, -1 for padding rows.
    with B = batch_size and L one of ``buckets``.

  Raises:
    ValueError: batch_size < 1, invalid buckets, or an example longer than
      the last bucket.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  buckets = validate_buckets(buckets)
  bucket_of = _assign_buckets(data, buckets)
  rng = np.random.default_rng((seed, epoch)) if shuffle else None

  plan: list[tuple[int, np.ndarray]] = []  # (bucket index, example indices)
  for b in range(len(buckets)):
    idx = np.flatnonzero(bucket_of == b)
    if rng is not None:
      idx = rng.permutation(idx)
    stop = len(idx) - len(idx) % batch_size if drop_remainder else len(idx)
    for start in range(0, stop, batch_size):
      plan.append((b, idx[start : start + batch_size]))
  if rng is not None:
    plan = [plan[i] for i in rng.permutation(len(plan))]

  for b, idx in plan:
    yield _make_batch(data, idx, batch_size, buckets[b], pad_id)


def train_batches(
    data: TokenizedData,
    batch_size: int,
    buckets: Sequence[int],
    pad_id: int,
    *,
    seed: int,
    step: int,
) -> Iterator[dict[str, np.ndarray]]:
  """Training batches from global step ``step`` on, without end.

  Step s is batch s mod S of epoch s div S (S = ``steps_per_epoch``), epoch e
  being ``batches(..., shuffle=True, drop_remainder=True, seed=seed,
  epoch=e)``: the order is a pure function of (seed, step), so a run resumed at
  step s sees the batches an uninterrupted one would.
  """
  spe = steps_per_epoch(data, batch_size, buckets)
  epoch, offset = divmod(step, spe)
  while True:
    epoch_batches = batches(data, batch_size, buckets, pad_id, shuffle=True,
                            drop_remainder=True, seed=seed, epoch=epoch)
    yield from itertools.islice(epoch_batches, offset, spe)
    epoch, offset = epoch + 1, 0


def _make_batch(
    data: TokenizedData, idx: np.ndarray, batch_size: int, length: int, pad_id: int
) -> dict[str, np.ndarray]:
  n = len(idx)
  input_ids = np.full((batch_size, length), pad_id, dtype=np.int32)
  attention_mask = np.zeros((batch_size, length), dtype=np.int32)
  for row, i in enumerate(idx):
    ids = data.input_ids[i]
    input_ids[row, : len(ids)] = ids
    attention_mask[row, : len(ids)] = 1
  language_ids = np.zeros(batch_size, dtype=np.int32)
  language_ids[:n] = data.language_ids[idx]
  extra = {}
  if data.token_labels is not None:  # [B, L], ignored beyond each example and in pad rows
    labels = np.full((batch_size, length), IGNORE_LABEL, dtype=np.int32)
    for row, i in enumerate(idx):
      labels[row, : len(data.token_labels[i])] = data.token_labels[i]
  else:
    labels = np.zeros(batch_size, dtype=np.int32)
    labels[:n] = data.labels[idx]
  if data.token_type_ids is not None:
    types = np.zeros((batch_size, length), dtype=np.int32)
    for row, i in enumerate(idx):
      types[row, : len(data.token_type_ids[i])] = data.token_type_ids[i]
    extra["token_type_ids"] = types
  example_mask = np.zeros(batch_size, dtype=np.float32)
  example_mask[:n] = 1.0
  example_index = np.full(batch_size, -1, dtype=np.int32)
  example_index[:n] = idx
  return {
      "input_ids": input_ids,
      "attention_mask": attention_mask,
      "labels": labels,
      "language_ids": language_ids,
      "example_mask": example_mask,
      "example_index": example_index,
      **extra,
  }


def padding_efficiency(
    data: TokenizedData,
    batch_size: int,
    buckets: Sequence[int],
    drop_remainder: bool = False,
) -> float:
  """Real tokens / padded token slots over one unshuffled epoch of ``batches``.

  Padding rows count as padded slots, so this is what the accelerator sees.
  """
  bucket_of = _assign_buckets(data, buckets)
  buckets = validate_buckets(buckets)
  real = slots = 0
  for b, bucket_len in enumerate(buckets):
    members = np.flatnonzero(bucket_of == b)
    n_batches = (
        len(members) // batch_size if drop_remainder else -(-len(members) // batch_size)
    )
    kept = members[: n_batches * batch_size] if drop_remainder else members
    real += int(np.asarray(data.lengths)[kept].sum())
    slots += n_batches * batch_size * bucket_len
  return real / slots if slots else 0.0
