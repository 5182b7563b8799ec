"""Dropout whose mask is one fused elementwise pass, bit for bit Flax's `nn.Dropout`.

`flax.linen.Dropout` draws its mask with `jax.random.bernoulli`. On CPU, JAX lowers the
Threefry-2x32 hash (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3")
as a rolled loop of 5 iterations, each a separate pass over the whole array: one
[32, 12, 128, 128] attention-probability mask took ~100 ms on this project's 2-core
CPU, and a 6-layer student draws ~58 M mask elements per step. Written out here unrolled over
broadcasted iotas, counter, hash, uniform and select fuse into one XLA loop (~8 ms for
that mask) that the SPMD partitioner still splits like any elementwise op.

The bits are those `jax.random.bits` returns for the same key (threefry2x32 keys with
`jax_threefry_partitionable`, JAX's default), so `Dropout` keeps nn.Dropout's masks and a
run with it equals a run with nn.Dropout. Other key implementations, arrays of keys,
the non-partitionable layout, jax_enable_x64, and arrays of 2**32 elements or more take
`jax.random`'s path.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_THREEFRY = "threefry2x32"
# Threefry-2x32 rotation schedule and key-schedule parity constant (Salmon et al. 2011;
# Random123's threefry.h), as in jax.random.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KS_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: jax.Array, r: int) -> jax.Array:
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array,
                 x2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The Threefry-2x32 block cipher, 20 rounds, written out (no loop) so XLA fuses it.

  Args:
    k1, k2: uint32 scalars, the key words.
    x1, x2: uint32 arrays of one shape, the counter words.

  Returns:
    Two uint32 arrays of that shape, equal to JAX's `threefry2x32_p` on the same inputs.

  Source: Salmon, Moraes, Dror, Shaw (SC 2011), Threefry-2x32 with 20 rounds and key
  injection every 4 rounds.
  """
  ks = (k1, k2, k1 ^ k2 ^ _KS_PARITY)
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = x1 ^ _rotate_left(x2, r)
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """uint32 row-major element index of `shape`, built from per-dimension iotas (what
  jax.random's partitionable counter is for arrays under 2**32 elements)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    if shape[dim] > 1:
      index = index + lax.broadcasted_iota(jnp.uint32, shape, dim) * np.uint32(stride)
    stride *= shape[dim]
  return index


def _threefry_key_words(key: jax.Array) -> tuple[jax.Array, jax.Array] | None:
  """(k1, k2) of one threefry2x32 key, typed (shape ()) or raw (uint32[2]); None for
  other keys and for arrays of keys."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != () or str(jax.random.key_impl(key)) != _THREEFRY:
      return None
    data = jax.random.key_data(key)
  else:
    if key.dtype != jnp.uint32 or key.shape != (2,):
      return None
    if jax.config.jax_default_prng_impl != _THREEFRY:
      return None
    data = key
  return data[0], data[1]


def fused_bits_supported(key: jax.Array, shape: Sequence[int]) -> bool:
  """Whether `random_bits(key, shape)` takes the fused path (see the module docstring)."""
  return (jax.config.jax_threefry_partitionable and math.prod(shape) < 2**32
          and _threefry_key_words(key) is not None)


def random_bits(key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """uint32 random bits [*shape], equal to `jax.random.bits(key, shape)`.

  Fused Threefry when `fused_bits_supported(key, shape)`, else `jax.random.bits`.
  """
  shape = tuple(int(d) for d in shape)
  if not fused_bits_supported(key, shape):
    return jax.random.bits(key, shape, jnp.uint32)
  return _fused_bits(key, shape)


def _fused_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """`random_bits` where `fused_bits_supported(key, shape)` holds."""
  k1, k2 = _threefry_key_words(key)
  b1, b2 = threefry2x32(k1, k2, jnp.zeros(shape, jnp.uint32), _flat_index(shape))
  return b1 ^ b2


def bernoulli(key: jax.Array, p: float, shape: Sequence[int]) -> jax.Array:
  """bool [*shape], True with probability `p`; equal to `jax.random.bernoulli(key, p,
  shape)` (float32 uniform from the top 23 bits, compared with float32(p)). Under
  jax_enable_x64 a Python float `p` makes JAX draw float64, so that case, like keys the
  fused path does not take, goes to `jax.random.bernoulli`."""
  shape = tuple(int(d) for d in shape)
  if jax.config.jax_enable_x64 or not fused_bits_supported(key, shape):
    return jax.random.bernoulli(key, p, shape)
  bits = _fused_bits(key, shape)
  floats = lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000),
                                    jnp.float32) - jnp.float32(1.0)
  return floats < jnp.float32(p)


class Dropout(nn.Module):
  """`flax.linen.Dropout` with the fused mask: same fields, same rng stream and masks.

  Attributes:
    rate: probability of dropping an element (not the keep rate).
    broadcast_dims: dimensions that share one mask value.
    deterministic: if True, inputs pass unchanged.
    rng_collection: the rng collection the key comes from.
  """
  rate: float
  broadcast_dims: Sequence[int] = ()
  deterministic: bool | None = None
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, inputs, deterministic: bool | None = None, rng=None):
    """inputs: any shape and float dtype; returns the same shape and dtype, kept
    elements scaled by 1 / (1 - rate)."""
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - self.rate
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    shape = list(inputs.shape)
    for dim in self.broadcast_dims:
      shape[dim] = 1
    mask = jnp.broadcast_to(bernoulli(rng, keep_prob, shape), inputs.shape)
    return lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))
