"""Unpadded execution: the encoder's token-wise work on real tokens only.

A padded batch [B, T] of sequences with lengths uniform in [T/2, T] is a quarter
padding, and the dense layers, LayerNorms, GELU and dropout of every layer (over nine
tenths of an encoder's FLOPs at T = 128) would compute on it for nothing. With a
`token_index` the encoder packs the real tokens of each group of examples into
G·N rows [G·N, H] (N, the token budget, close to the real-token count), runs those
token-wise parts there, and goes back to [B, T] only around self-attention, whose
[T, T] scores keep their padded layout (the attention losses read them). The idea is
NVIDIA's and MosaicML's BERT "unpadding" (flash-attn's `unpad_input` / `pad_input`),
here with static shapes: N is a shape, so XLA compiles once per budget.

Groups G are the batch's data-parallel shards (`sharding.batch_divisor`): group g holds
examples [g·B/G, (g+1)·B/G), the slice one device owns, so every gather stays on its
device under SPMD.

Real tokens get exactly the arithmetic of the padded model (same values, up to the
float rounding of a different matmul blocking), so losses masked to real tokens are
unchanged; what the padded model computed at padding positions is not computed, and
outputs hold zeros there. Dropout masks are drawn on the packed shape: the same
distribution, other draws.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


def token_index(attention_mask: np.ndarray, groups: int = 1, multiple: int = 1) -> np.ndarray:
  """Host-side: positions of the real tokens of each group, for `Encoder(token_index=)`.

  attention_mask: [B, T] (nonzero = real token), B divisible by `groups`.
  groups: G, the batch's data-parallel shards (1 on one device).
  multiple: the budget N is the largest group's real-token count rounded up to a
    multiple of this (at most B/G·T): fewer distinct N, fewer compilations; 0:
    `default_multiple` of a group's B/G·T positions.
  Returns int32 [G, N]: entry [g, j] is the j-th real token of group g as an index
    into the group's flattened [B/G·T] positions (row-major, example then token),
    ascending; unused slots hold B/G·T (out of range: a zero row).
  Raises ValueError for a mask that is not 2-D, B not divisible by G, or multiple < 0.
  """
  mask = np.asarray(attention_mask)
  if mask.ndim != 2:
    raise ValueError(f"token_index: attention_mask must be [B, T], got shape {mask.shape}")
  b, t = mask.shape
  if groups < 1 or b % groups:
    raise ValueError(f"token_index: batch {b} is not divisible by groups={groups}")
  if multiple < 0:
    raise ValueError(f"token_index: multiple={multiple} must be >= 0")
  per_group = mask.reshape(groups, -1) != 0  # [G, P]
  p = per_group.shape[1]
  multiple = multiple or default_multiple(p)
  budget = token_budget(int(per_group.sum(1).max()), p, multiple)
  out = np.full((groups, budget), p, np.int32)
  for g in range(groups):
    real = np.flatnonzero(per_group[g])
    out[g, :real.size] = real
  return out


BUDGET_STEPS = 16


def default_multiple(positions: int) -> int:
  """`positions` / BUDGET_STEPS rounded up: budgets rounded to it take at most 16 values
  (compilations) per padded shape, and leave under 1/16 of the positions unused beyond
  the fullest group's real tokens. On 91 tsm batches (buckets 32/64, batch 32): 5
  distinct budgets, against 9 when rounding to the sequence length and 25 to a quarter
  of it."""
  return max(1, -(-positions // BUDGET_STEPS))


def token_budget(max_tokens: int, positions: int, multiple: int) -> int:
  """N: `max_tokens` rounded up to a multiple of `multiple`, at least 1, at most
  `positions` (B/G·T). Every process of a multi-host run must use the same N."""
  return max(1, min(positions, math.ceil(max_tokens / multiple) * multiple))


@jax.custom_vjp
def _take_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """x [G, P, F] -> [G, M, F]: row index[g, m] of group g, zeros where out of range.
  `inverse` [G, P] is index's inverse (out of range where a row is not taken)."""
  del inverse
  return jnp.take_along_axis(x, index[..., None], axis=1, mode="fill", fill_value=0)


def _take_rows_fwd(x, index, inverse):
  return _take_rows(x, index, inverse), (index, inverse)


def _take_rows_bwd(res, ct):
  # index is injective, so the transpose (a scatter-add) is the inverse gather: XLA:CPU
  # runs scatters serially, gathers in parallel.
  index, inverse = res
  return _take_rows(ct, inverse, index), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


@struct.dataclass
class TokenLayout:
  """Where each group's real tokens sit. `index` [G, N] int32 (see `token_index`),
  `inverse` [G, P] int32 (P = B/G·T): slot of each padded position in `index`, N
  where it holds no real token. batch B and seq_len T are static."""

  index: jax.Array
  inverse: jax.Array
  batch: int = struct.field(pytree_node=False)
  seq_len: int = struct.field(pytree_node=False)

  @classmethod
  def create(cls, index: jax.Array, batch: int, seq_len: int) -> "TokenLayout":
    """From a `token_index` [G, N] for a [batch, seq_len] input.
    Raises ValueError when G does not divide batch or N exceeds batch/G·seq_len."""
    groups, budget = index.shape
    if batch % groups:
      raise ValueError(f"token_index has {groups} groups, which do not divide batch {batch}")
    positions = batch // groups * seq_len
    if budget > positions:
      raise ValueError(f"token_index budget {budget} exceeds the {positions} positions "
                       f"of a group ({batch // groups} examples x {seq_len})")
    index = index.astype(jnp.int32)
    slots = jnp.broadcast_to(jnp.arange(budget, dtype=jnp.int32), index.shape)
    inverse = jnp.full((groups, positions), budget, jnp.int32)
    inverse = jax.vmap(lambda inv, i, s: inv.at[i].set(s, mode="drop"))(inverse, index, slots)
    return cls(index=index, inverse=inverse, batch=batch, seq_len=seq_len)

  @property
  def groups(self) -> int:
    return self.index.shape[0]

  def to_tokens(self, x: jax.Array) -> jax.Array:
    """[B, T, *F] -> [G·N, *F]: the real tokens, group after group, zeros in unused
    slots. One token axis, not [G, N]: XLA:CPU reduced [1, N, H] over N (LayerNorm
    gradients) ~3x slower than [N, H]; the G blocks keep the batch's sharding."""
    g, feat = self.groups, x.shape[2:]
    flat = x.reshape((g, -1, math.prod(feat)))
    return _take_rows(flat, self.index, self.inverse).reshape((-1,) + feat)

  def to_padded(self, tokens: jax.Array) -> jax.Array:
    """[G·N, *F] -> [B, T, *F]: tokens back in place, zeros at padding positions."""
    g, feat = self.groups, tokens.shape[1:]
    flat = tokens.reshape((g, -1, math.prod(feat)))
    return _take_rows(flat, self.inverse, self.index).reshape(
        (self.batch, self.seq_len) + feat)
