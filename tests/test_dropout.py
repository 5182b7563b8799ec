"""kd_jax.models.dropout against JAX's own Threefry and Flax's nn.Dropout (bit for bit)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.models import dropout
from kd_jax.models.encoder import Encoder, EncoderConfig, init_params

SHAPES = [(), (1,), (7,), (3, 5), (2, 1, 4, 5), (4, 3, 17, 19)]
KEYS = {"raw": lambda s: jax.random.PRNGKey(s), "typed": lambda s: jax.random.key(s)}


@pytest.mark.parametrize("kind", sorted(KEYS))
@pytest.mark.parametrize("shape", SHAPES)
def test_random_bits_equal_jax_random(kind, shape):
  for seed in (0, 7, 2**31 + 5):
    key = KEYS[kind](seed)
    assert dropout.fused_bits_supported(key, shape)
    ours = jax.jit(dropout.random_bits, static_argnums=1)(key, shape)
    ref = jax.random.bits(key, shape, jnp.uint32)
    assert ours.dtype == jnp.uint32 and ours.shape == shape
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_threefry_known_answer():
  # Random123's known-answer vector for threefry2x32_20 with key = counter = 0
  # (kat_vectors: "threefry2x32 20 00000000 00000000 00000000 00000000 6b200159 99ba4efe").
  z = jnp.zeros((), jnp.uint32)
  x1, x2 = dropout.threefry2x32(z, z, z, z)
  assert (int(x1), int(x2)) == (0x6B200159, 0x99BA4EFE)


@pytest.mark.parametrize("p", [0.9, 0.5, 0.1])
def test_bernoulli_equal_jax_random(p):
  key = jax.random.PRNGKey(3)
  shape = (8, 64, 33)
  ours = jax.jit(dropout.bernoulli, static_argnums=(1, 2))(key, p, shape)
  np.testing.assert_array_equal(np.asarray(ours),
                                np.asarray(jax.random.bernoulli(key, p, shape)))
  assert abs(float(ours.mean()) - p) < 0.01


def test_other_key_impls_fall_back():
  assert not dropout.fused_bits_supported(jax.random.split(jax.random.key(0)), (4,))
  key = jax.random.key(1, impl="rbg")
  assert not dropout.fused_bits_supported(key, (4, 4))
  np.testing.assert_array_equal(np.asarray(dropout.bernoulli(key, 0.7, (4, 4))),
                                np.asarray(jax.random.bernoulli(key, 0.7, (4, 4))))
  np.testing.assert_array_equal(np.asarray(dropout.random_bits(key, (4, 4))),
                                np.asarray(jax.random.bits(key, (4, 4), jnp.uint32)))


class _Pair(nn.Module):
  """Runs kd_jax's Dropout and Flax's under the same module path, so both draw the same
  key from make_rng."""
  rate: float
  broadcast_dims: tuple = ()
  ours: bool = True

  @nn.compact
  def __call__(self, x, deterministic):
    cls = dropout.Dropout if self.ours else nn.Dropout
    return cls(self.rate, broadcast_dims=self.broadcast_dims, name="drop")(x, deterministic)


@pytest.mark.parametrize("rate,broadcast_dims,dtype", [
    (0.1, (), jnp.float32), (0.5, (1,), jnp.float32), (0.3, (), jnp.bfloat16),
    (0.0, (), jnp.float32), (1.0, (), jnp.float32)])
def test_dropout_equals_flax(rate, broadcast_dims, dtype):
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 24)).astype(dtype)
  rngs = {"dropout": jax.random.PRNGKey(11)}
  outs = [_Pair(rate, broadcast_dims, ours).apply({}, x, False, rngs=rngs)
          for ours in (True, False)]
  assert outs[0].dtype == dtype
  np.testing.assert_array_equal(np.asarray(outs[0], np.float32), np.asarray(outs[1], np.float32))
  same = _Pair(rate, broadcast_dims).apply({}, x, True)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(x))
  if 0.0 < rate < 1.0:
    kept = np.asarray(outs[0], np.float32) != 0
    assert abs(kept.mean() - (1 - rate)) < 0.08


def test_encoder_dropout_matches_flax_dropout(monkeypatch):
  """A training-mode encoder forward and gradient are unchanged when nn.Dropout stands in
  for kd_jax's (same rng stream, same masks)."""
  cfg = EncoderConfig(family="bert", vocab_size=50, hidden_size=16, num_layers=2,
                      num_heads=2, intermediate_size=32, num_labels=3, max_position_embeddings=16,
                      hidden_dropout=0.2, attention_dropout=0.2, classifier_dropout=0.2)
  params = init_params(cfg, jax.random.PRNGKey(0))
  ids = jax.random.randint(jax.random.PRNGKey(1), (3, 9), 3, 50)
  mask = jnp.ones((3, 9), jnp.int32).at[0, 6:].set(0)

  def loss(p):
    out = Encoder(cfg).apply({"params": p}, ids, mask, deterministic=False,
                             rngs={"dropout": jax.random.PRNGKey(5)},
                             output_attention_scores=True)
    return jnp.sum(out.logits ** 2) + sum(jnp.sum(s) for s in out.attention_scores)

  ours = jax.value_and_grad(loss)(params)
  from kd_jax.models import deberta_v2, encoder
  monkeypatch.setattr(encoder, "Dropout", nn.Dropout)
  monkeypatch.setattr(deberta_v2, "Dropout", nn.Dropout)
  ref = jax.value_and_grad(loss)(params)
  np.testing.assert_array_equal(np.asarray(ours[0]), np.asarray(ref[0]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               ours[1], ref[1])
  dropped = Encoder(cfg).apply({"params": params}, ids, mask, deterministic=False,
                               rngs={"dropout": jax.random.PRNGKey(5)})
  kept = Encoder(cfg).apply({"params": params}, ids, mask, deterministic=True)
  assert not np.allclose(dropped.logits, kept.logits)
