"""Dynamic BERT masking for masked language modelling (Devlin et al. 2019, §3.1, App. A).

Every training step draws a new mask (RoBERTa's "dynamic masking", Liu et al. 2019):
in each row, ``round(rate * n)`` of the ``n`` real, non-special tokens are chosen
uniformly without replacement (at least 1 when ``n > 0``; the per-sequence count of
BERT's ``create_pretraining_data.py``); of the chosen tokens 80 % become the mask
token, 10 % a random non-special token and 10 % stay unchanged; the model predicts
the original token at every chosen position.

Shapes are static so a jitted step compiles once per length bucket: a batch padded to
``T`` tokens gets ``P = ceil(rate * T)`` prediction slots per row
(:func:`num_mask_positions`); slots beyond a row's count have weight 0.

Implemented in numpy on the host: the masking is a pure function of a
``numpy.random.Generator`` (:func:`masking_rng` seeds it from (seed, stream, index)),
so resuming at step ``s`` replays exactly the masks of an uninterrupted run, and every
process of a multi-host job masks the same global batch identically.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

#: ``stream`` values of :func:`masking_rng` (training steps, held-out batches).
TRAIN_STREAM, HELDOUT_STREAM = 2, 3


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
  """What to mask and with what.

  Attributes:
    mask_token_id: id of the mask token (``[MASK]`` / ``<mask>``).
    special_ids: ids that are never chosen and never drawn as random replacements
      (CLS/SEP/PAD/UNK/MASK...; padding is excluded by the attention mask as well).
    vocab_size: random replacements are drawn from ``[0, vocab_size)`` minus
      ``special_ids``; use the tokenizer's size (``len(tokenizer)``), not a
      model's padded embedding table.
    rate: share of real, non-special tokens predicted (BERT: 0.15).
    mask_prob, random_prob: of the chosen tokens, share replaced by the mask token
      and by a random token; the rest (1 - both) is kept unchanged (BERT: 0.8, 0.1).
  """
  mask_token_id: int
  special_ids: tuple[int, ...]
  vocab_size: int
  rate: float = 0.15
  mask_prob: float = 0.8
  random_prob: float = 0.1

  def __post_init__(self):
    if not 0 < self.rate <= 1:
      raise ValueError(f"masking rate={self.rate} must be in (0, 1] (config.general.mask_rate)")
    if self.mask_prob < 0 or self.random_prob < 0 or self.mask_prob + self.random_prob > 1:
      raise ValueError(f"mask_prob={self.mask_prob}, random_prob={self.random_prob} must be "
                       ">= 0 with a sum <= 1")
    if self.vocab_size - len({i for i in self.special_ids if 0 <= i < self.vocab_size}) < 1:
      raise ValueError(f"vocab_size={self.vocab_size} leaves no non-special token")
    if self.mask_token_id not in self.special_ids:
      object.__setattr__(self, "special_ids", tuple(self.special_ids) + (self.mask_token_id,))

  @classmethod
  def from_tokenizer(cls, tokenizer, rate: float = 0.15, **kwargs) -> MaskingSpec:
    """From a transformers tokenizer: its mask token, ``all_special_ids`` and size.

    Raises:
      ValueError: the tokenizer has no mask token.
    """
    if tokenizer.mask_token_id is None:
      raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no mask "
                       "token; masked language modelling needs one")
    return cls(mask_token_id=int(tokenizer.mask_token_id),
               special_ids=tuple(sorted({int(i) for i in tokenizer.all_special_ids})),
               vocab_size=len(tokenizer), rate=rate, **kwargs)


def num_mask_positions(seq_len: int, rate: float = 0.15) -> int:
  """Prediction slots per row for a batch of ``seq_len`` tokens: ``ceil(rate * T)``."""
  return max(1, math.ceil(rate * seq_len - 1e-9))


def masking_rng(seed: int, stream: int, index: int) -> np.random.Generator:
  """The generator for one batch: ``default_rng((seed, stream, index))`` (index = the
  training step, or the held-out batch number, which keeps held-out masks fixed)."""
  return np.random.default_rng((int(seed), int(stream), int(index)))


def _random_non_special(rng: np.random.Generator, shape, spec: MaskingSpec) -> np.ndarray:
  """Uniform over ``[0, vocab_size)`` minus the special ids: draw from the smaller
  range and shift past each special id in increasing order."""
  specials = sorted({i for i in spec.special_ids if 0 <= i < spec.vocab_size})
  x = rng.integers(0, spec.vocab_size - len(specials), size=shape)
  for s in specials:
    x = x + (x >= s)
  return x.astype(np.int32)


def mask_tokens(rng: np.random.Generator, input_ids: np.ndarray, attention_mask: np.ndarray,
                spec: MaskingSpec) -> dict[str, np.ndarray]:
  """BERT masking of one batch.

  Args:
    rng: numpy Generator; the result is a pure function of its state and the inputs
      (it always draws [B, T] uniforms, then [B, P] uniforms, then [B, P] ids).
    input_ids: int [B, T].
    attention_mask: int/bool [B, T], 1 for real tokens (padding is never chosen).
    spec: MaskingSpec.

  Returns:
    dict with
      input_ids: int32 [B, T], the corrupted ids (unchanged outside chosen positions).
      masked_positions: int32 [B, P] with P = num_mask_positions(T, rate); chosen
        positions first; the remaining slots hold distinct unchosen positions.
      mlm_labels: int32 [B, P], the original ids at masked_positions.
      mlm_weights: float32 [B, P], 1 for chosen slots, 0 for padding slots.
  """
  ids = np.asarray(input_ids, np.int32)
  mask = np.asarray(attention_mask).astype(bool)
  if ids.ndim != 2 or mask.shape != ids.shape:
    raise ValueError(f"input_ids and attention_mask must both be [B, T]; got {ids.shape}, "
                     f"{mask.shape}")
  b, t = ids.shape
  p = num_mask_positions(t, spec.rate)
  candidate = mask & ~np.isin(ids, np.asarray(spec.special_ids, np.int32))
  n_cand = candidate.sum(axis=1)
  n_chosen = np.where(n_cand > 0, np.maximum(1, np.floor(spec.rate * n_cand + 0.5)), 0)
  n_chosen = np.minimum(n_chosen, p).astype(np.int32)

  keys = np.where(candidate, rng.random((b, t)), 2.0)   # non-candidates sort last
  positions = np.argsort(keys, axis=1, kind="stable")[:, :p].astype(np.int32)
  weights = (np.arange(p)[None, :] < n_chosen[:, None])
  labels = np.take_along_axis(ids, positions, axis=1)

  u = rng.random((b, p))
  random_ids = _random_non_special(rng, (b, p), spec)
  replacement = np.where(u < spec.mask_prob, spec.mask_token_id,
                         np.where(u < spec.mask_prob + spec.random_prob, random_ids, labels))
  new_values = np.where(weights, replacement, labels).astype(np.int32)
  out_ids = ids.copy()
  np.put_along_axis(out_ids, positions, new_values, axis=1)   # positions are distinct per row
  return {"input_ids": out_ids, "masked_positions": positions, "mlm_labels": labels,
          "mlm_weights": weights.astype(np.float32)}


def mask_batch(batch: Mapping[str, np.ndarray], spec: MaskingSpec, rng: np.random.Generator,
               keys: Sequence[str] = ("input_ids", "attention_mask", "example_mask")
               ) -> dict[str, np.ndarray]:
  """``batch`` (from ``batching.batches``) restricted to ``keys``, with ``input_ids``
  masked and ``masked_positions``, ``mlm_labels``, ``mlm_weights`` added."""
  out = {k: batch[k] for k in keys if k in batch}
  out.update(mask_tokens(rng, batch["input_ids"], batch["attention_mask"], spec))
  return out
