"""Tests for kd_jax.losses against independent numpy reference implementations."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses

RTOL = 1e-5
ATOL = 1e-6


# ---------------------------------------------------------------------------
# fixtures / random data
# ---------------------------------------------------------------------------
def make_masks(lengths, T, n_pad_rows):
  """attention mask [B, T] and example weights [B]; padding rows get length 0."""
  lengths = list(lengths) + [0] * n_pad_rows
  B = len(lengths)
  mask = np.zeros((B, T), np.int32)
  for b, n in enumerate(lengths):
    mask[b, :n] = 1
  weights = np.array([1.0] * (B - n_pad_rows) + [0.0] * n_pad_rows, np.float32)
  return mask, weights


@pytest.fixture
def rng():
  return np.random.default_rng(0)


T = 7
LENGTHS = (7, 4, 2, 5)   # different lengths per example
N_PAD = 2                # two padding rows with example weight 0
MASK, WEIGHTS = make_masks(LENGTHS, T, N_PAD)
B = MASK.shape[0]


# ---------------------------------------------------------------------------
# numpy references (explicit loops, written independently of the module)
# ---------------------------------------------------------------------------
def np_attention_mse(s, t, mask, w):
  s = np.asarray(s, np.float64)
  t = np.asarray(t, np.float64)
  hs, ht = s.shape[1], t.shape[1]
  # student head j <-> teacher head floor(j * ht / hs)
  tot, cnt = 0.0, 0
  for b in range(s.shape[0]):
    if w[b] == 0:
      continue
    n = int(mask[b].sum())
    for j in range(hs):
      jt = (j * ht) // hs
      for q in range(n):
        for k in range(n):
          tot += (s[b, j, q, k] - t[b, jt, q, k]) ** 2
          cnt += 1
  return tot / cnt if cnt else 0.0


def np_hidden_mse(s, t, mask, w, proj=None):
  s = np.asarray(s, np.float64)
  t = np.asarray(t, np.float64)
  if proj is not None:
    s = s @ np.asarray(proj, np.float64)
  tot, cnt = 0.0, 0
  for b in range(s.shape[0]):
    if w[b] == 0:
      continue
    for tok in range(s.shape[1]):
      if mask[b, tok] == 0:
        continue
      for d in range(t.shape[2]):
        tot += (s[b, tok, d] - t[b, tok, d]) ** 2
        cnt += 1
  return tot / cnt if cnt else 0.0


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_logits_mse(s, t, w):
  rows = [np.mean((np.float64(s[b]) - t[b]) ** 2) for b in range(len(w)) if w[b] > 0]
  return float(np.mean(rows)) if rows else 0.0


def np_logits_kl(s, t, w, temp):
  vals = []
  for b in range(len(w)):
    if w[b] == 0:
      continue
    lps = np_log_softmax(np.float64(s[b]) / temp)
    lpt = np_log_softmax(np.float64(t[b]) / temp)
    vals.append(temp ** 2 * np.sum(np.exp(lpt) * (lpt - lps)))
  return float(np.mean(vals)) if vals else 0.0


def np_cross_entropy(z, y, w):
  vals = [-np_log_softmax(np.float64(z[b]))[y[b]] for b in range(len(w)) if w[b] > 0]
  return float(np.mean(vals)) if vals else 0.0


# ---------------------------------------------------------------------------
# select_heads
# ---------------------------------------------------------------------------
def test_select_heads():
  np.testing.assert_array_equal(losses.select_heads(4, 2), [0, 2])
  np.testing.assert_array_equal(losses.select_heads(12, 6), np.arange(0, 12, 2))
  np.testing.assert_array_equal(losses.select_heads(12, 12), np.arange(12))
  np.testing.assert_array_equal(losses.select_heads(12, 5), [0, 2, 4, 7, 9])
  with pytest.raises(ValueError):
    losses.select_heads(0, 2)


# ---------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("hs,ht", [(4, 4), (2, 4)])
def test_attention_mse_matches_numpy(rng, hs, ht):
  s = rng.normal(size=(B, hs, T, T)).astype(np.float32)
  t = rng.normal(size=(B, ht, T, T)).astype(np.float32)
  got = losses.attention_mse(s, t, MASK, WEIGHTS)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_attention_mse(s, t, MASK, WEIGHTS), rtol=RTOL)


@pytest.mark.parametrize("fill", [-1e9, -1e4, -np.inf, np.nan])
def test_attention_mse_ignores_masked_scores(rng, fill):
  hs, ht = 2, 4
  s = rng.normal(size=(B, hs, T, T)).astype(np.float32)
  t = rng.normal(size=(B, ht, T, T)).astype(np.float32)
  ref = losses.attention_mse(s, t, MASK, WEIGHTS)
  # fill every position where the key or query is padding (and all padding rows)
  pair = (MASK[:, :, None] * MASK[:, None, :] * WEIGHTS[:, None, None]) > 0
  s2, t2 = s.copy(), t.copy()
  s2[~np.broadcast_to(pair[:, None], s.shape)] = fill
  t2[~np.broadcast_to(pair[:, None], t.shape)] = fill
  got = losses.attention_mse(s2, t2, MASK, WEIGHTS)
  np.testing.assert_allclose(got, ref, rtol=RTOL)
  # gradients stay finite and are zero at masked positions
  g = jax.grad(losses.attention_mse)(jnp.asarray(s2), jnp.asarray(t2), MASK, WEIGHTS)
  assert np.all(np.isfinite(g))
  assert np.all(np.asarray(g)[~np.broadcast_to(pair[:, None], s.shape)] == 0)


def test_attention_mse_additive_mask_on_teacher_only(rng):
  """HF-style additive mask (-1e4 on padded keys) applied to one side only."""
  s = rng.normal(size=(B, 2, T, T)).astype(np.float32)
  t = rng.normal(size=(B, 4, T, T)).astype(np.float32)
  t_masked = t + (1.0 - MASK[:, None, None, :]) * -1e9
  np.testing.assert_allclose(losses.attention_mse(s, t_masked, MASK, WEIGHTS),
                             losses.attention_mse(s, t, MASK, WEIGHTS), rtol=RTOL)


def test_bf16_inputs(rng):
  s = rng.normal(size=(B, 2, T, T)).astype(np.float32)
  t = rng.normal(size=(B, 4, T, T)).astype(np.float32)
  sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  got = losses.attention_mse(sb, tb, MASK, WEIGHTS)
  assert got.dtype == jnp.float32
  ref = np_attention_mse(np.asarray(sb.astype(jnp.float32)),
                         np.asarray(tb.astype(jnp.float32)), MASK, WEIGHTS)
  np.testing.assert_allclose(got, ref, rtol=RTOL)


# ---------------------------------------------------------------------------
# hidden / embeddings
# ---------------------------------------------------------------------------
def test_hidden_mse_same_width(rng):
  s = rng.normal(size=(B, T, 8)).astype(np.float32)
  t = rng.normal(size=(B, T, 8)).astype(np.float32)
  np.testing.assert_allclose(losses.hidden_mse(s, t, MASK, WEIGHTS),
                             np_hidden_mse(s, t, MASK, WEIGHTS), rtol=RTOL)


def test_hidden_mse_projection(rng):
  s = rng.normal(size=(B, T, 4)).astype(np.float32)
  t = rng.normal(size=(B, T, 8)).astype(np.float32)
  w = rng.normal(size=(4, 8)).astype(np.float32)
  np.testing.assert_allclose(losses.hidden_mse(s, t, MASK, WEIGHTS, projection=w),
                             np_hidden_mse(s, t, MASK, WEIGHTS, w), rtol=RTOL)
  with pytest.raises(ValueError, match="width"):
    losses.hidden_mse(s, t, MASK, WEIGHTS)
  with pytest.raises(ValueError, match="projection"):
    losses.hidden_mse(s, t, MASK, WEIGHTS, projection=w.T)


def test_hidden_mse_ignores_padding_values(rng):
  s = rng.normal(size=(B, T, 8)).astype(np.float32)
  t = rng.normal(size=(B, T, 8)).astype(np.float32)
  ref = losses.hidden_mse(s, t, MASK, WEIGHTS)
  bad = (MASK * WEIGHTS[:, None]) == 0
  s[bad] = np.inf
  t[bad] = -np.inf
  np.testing.assert_allclose(losses.hidden_mse(s, t, MASK, WEIGHTS), ref, rtol=RTOL)
  g = jax.grad(losses.hidden_mse)(jnp.asarray(s), jnp.asarray(t), MASK, WEIGHTS)
  assert np.all(np.isfinite(g))


def test_zero_weight_batch_gives_zero_not_nan(rng):
  w0 = np.zeros(B, np.float32)
  s = rng.normal(size=(B, 2, T, T)).astype(np.float32)
  t = rng.normal(size=(B, 4, T, T)).astype(np.float32)
  h = rng.normal(size=(B, T, 8)).astype(np.float32)
  z = rng.normal(size=(B, 5)).astype(np.float32)
  y = rng.integers(0, 5, size=B)
  vals = [
      losses.attention_mse(s, t, MASK, w0),
      losses.hidden_mse(h, h + 1, MASK, w0),
      losses.logits_mse(z, z + 1, w0),
      losses.logits_kl(z, z[::-1], w0, 2.0),
      losses.cross_entropy(z, y, w0),
  ]
  for v in vals:
    assert float(v) == 0.0
  # gradient of an empty batch is finite (zero)
  g = jax.grad(lambda a: losses.logits_kl(a, z[::-1], w0, 2.0))(jnp.asarray(z))
  assert np.all(np.asarray(g) == 0)


# ---------------------------------------------------------------------------
# layerwise
# ---------------------------------------------------------------------------
def test_layerwise(rng):
  L_t, L_s = 4, 2
  layer_map = (2, 4)
  ts = [rng.normal(size=(B, 4, T, T)).astype(np.float32) for _ in range(L_t)]
  ss = [rng.normal(size=(B, 2, T, T)).astype(np.float32) for _ in range(L_s)]
  th = [rng.normal(size=(B, T, 8)).astype(np.float32) for _ in range(L_t)]
  sh = [rng.normal(size=(B, T, 4)).astype(np.float32) for _ in range(L_s)]
  w = rng.normal(size=(4, 8)).astype(np.float32)
  ref_att = np.mean([np_attention_mse(ss[i], ts[k - 1], MASK, WEIGHTS)
                     for i, k in enumerate(layer_map)])
  ref_hid = np.mean([np_hidden_mse(sh[i], th[k - 1], MASK, WEIGHTS, w)
                     for i, k in enumerate(layer_map)])
  np.testing.assert_allclose(
      losses.layerwise_attention_mse(tuple(ss), tuple(ts), layer_map, MASK, WEIGHTS),
      ref_att, rtol=RTOL)
  np.testing.assert_allclose(
      losses.layerwise_hidden_mse(tuple(sh), tuple(th), layer_map, MASK, WEIGHTS, w),
      ref_hid, rtol=RTOL)


def test_layerwise_validation(rng):
  ts = [rng.normal(size=(B, 4, T, T)).astype(np.float32) for _ in range(4)]
  ss = [rng.normal(size=(B, 4, T, T)).astype(np.float32) for _ in range(2)]
  with pytest.raises(ValueError, match=r"len\(layer_map\)=3"):
    losses.layerwise_attention_mse(ss, ts, (1, 2, 3), MASK, WEIGHTS)
  with pytest.raises(ValueError, match=r"layer_map\[1\]=5"):
    losses.layerwise_attention_mse(ss, ts, (2, 5), MASK, WEIGHTS)
  with pytest.raises(ValueError, match=r"layer_map\[0\]=0"):
    losses.layerwise_hidden_mse([x[:, 0] for x in ss], [x[:, 0] for x in ts],
                                (0, 2), MASK, WEIGHTS)


# ---------------------------------------------------------------------------
# logits
# ---------------------------------------------------------------------------
C = 5


def test_logits_mse(rng):
  s = rng.normal(size=(B, C)).astype(np.float32)
  t = rng.normal(size=(B, C)).astype(np.float32)
  s[WEIGHTS == 0] = np.nan   # padding rows must not matter
  np.testing.assert_allclose(losses.logits_mse(s, t, WEIGHTS),
                             np_logits_mse(s, t, WEIGHTS), rtol=RTOL)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_logits_kl(rng, temp):
  s = 3 * rng.normal(size=(B, C)).astype(np.float32)
  t = 3 * rng.normal(size=(B, C)).astype(np.float32)
  np.testing.assert_allclose(losses.logits_kl(s, t, WEIGHTS, temp),
                             np_logits_kl(s, t, WEIGHTS, temp), rtol=1e-4, atol=ATOL)
  # KL of identical logits is zero
  np.testing.assert_allclose(losses.logits_kl(t, t, WEIGHTS, temp), 0.0, atol=1e-6)


def test_logits_kl_traced_temperature(rng):
  s = rng.normal(size=(B, C)).astype(np.float32)
  t = rng.normal(size=(B, C)).astype(np.float32)
  f = jax.jit(losses.logits_kl)
  np.testing.assert_allclose(f(s, t, WEIGHTS, jnp.float32(2.0)),
                             np_logits_kl(s, t, WEIGHTS, 2.0), rtol=1e-4)


def test_logits_kl_high_temperature_limit(rng):
  """Hinton et al. (2015) §2.1: for T >> |z|,  T^2 KL -> (1/(2C)) sum_c (zc_S - zc_T)^2.

  Derivation: p = softmax(z/T) ~ (1 + zc/T)/C with zc = z - mean(z); and
  KL(p_T || p_S) ~ (1/2) sum_c (p_T - p_S)^2 / p_T = (1/2) sum_c ((zc_T - zc_S)/(C T))^2 * C
  = sum_c (zc_S - zc_T)^2 / (2 C T^2).
  """
  s = rng.normal(size=(B, C)).astype(np.float32) + 3.0   # offsets: only zero-mean matters
  t = rng.normal(size=(B, C)).astype(np.float32) - 1.0
  temp = 100.0
  zs = s - s.mean(-1, keepdims=True)
  zt = t - t.mean(-1, keepdims=True)
  per_ex = ((zs - zt) ** 2).sum(-1) / (2 * C)
  approx = per_ex[WEIGHTS > 0].mean()
  got = float(losses.logits_kl(s, t, WEIGHTS, temp))
  assert abs(got - approx) / approx < 0.03, (got, approx)
  # the numpy exact value agrees too
  np.testing.assert_allclose(got, np_logits_kl(s, t, WEIGHTS, temp), rtol=1e-2)


def test_cross_entropy(rng):
  z = rng.normal(size=(B, C)).astype(np.float32)
  y = rng.integers(0, C, size=B)
  y[WEIGHTS == 0] = -1   # padding labels are ignored
  np.testing.assert_allclose(losses.cross_entropy(z, y, WEIGHTS),
                             np_cross_entropy(z, y, WEIGHTS), rtol=RTOL)


# ---------------------------------------------------------------------------
# dispatcher
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Out:
  logits: object = None
  embeddings: object = None
  hidden_states: tuple = None
  attention_scores: tuple = None


def make_outputs(rng, L, h, H):
  return Out(
      logits=rng.normal(size=(B, C)).astype(np.float32),
      embeddings=rng.normal(size=(B, T, H)).astype(np.float32),
      hidden_states=tuple(rng.normal(size=(B, T, H)).astype(np.float32) for _ in range(L)),
      attention_scores=tuple(rng.normal(size=(B, h, T, T)).astype(np.float32)
                             for _ in range(L)),
  )


def make_batch(rng):
  y = rng.integers(0, C, size=B)
  return {"attention_mask": MASK, "labels": y, "example_mask": WEIGHTS}


LAYER_MAP = (2, 4)
WEIGHTS_ALL = {"att": 1.0, "hid": 0.5, "embd": 2.0, "pred": 0.25, "clf": 1.5}


def reference_terms(stu, tea, batch, proj, prediction_loss, temp):
  y = batch["labels"]
  ref = {
      "att": np.mean([np_attention_mse(stu.attention_scores[i], tea.attention_scores[k - 1],
                                       MASK, WEIGHTS) for i, k in enumerate(LAYER_MAP)]),
      "hid": np.mean([np_hidden_mse(stu.hidden_states[i], tea.hidden_states[k - 1],
                                    MASK, WEIGHTS, proj["hid"])
                      for i, k in enumerate(LAYER_MAP)]),
      "embd": np_hidden_mse(stu.embeddings, tea.embeddings, MASK, WEIGHTS, proj["embd"]),
      "pred": (np_logits_mse(stu.logits, tea.logits, WEIGHTS) if prediction_loss == "mse"
               else np_logits_kl(stu.logits, tea.logits, WEIGHTS, temp)),
      "clf": np_cross_entropy(stu.logits, y, WEIGHTS),
  }
  return ref


@pytest.mark.parametrize("prediction_loss,temp", [("mse", 1.0), ("kl", 2.0)])
def test_distillation_loss_weighted_sum(rng, prediction_loss, temp):
  stu = make_outputs(rng, L=2, h=2, H=4)
  tea = make_outputs(rng, L=4, h=4, H=8)
  batch = make_batch(rng)
  proj = {"hid": rng.normal(size=(4, 8)).astype(np.float32),
          "embd": rng.normal(size=(4, 8)).astype(np.float32)}
  total, terms = losses.distillation_loss(
      stu, tea, batch, weights=WEIGHTS_ALL, layer_map=LAYER_MAP,
      prediction_loss=prediction_loss, temperature=temp, projections=proj)
  ref = reference_terms(stu, tea, batch, proj, prediction_loss, temp)
  assert set(terms) == {"loss", *WEIGHTS_ALL}
  for k, v in ref.items():
    np.testing.assert_allclose(terms[k], v, rtol=1e-4, err_msg=k)
  ref_total = sum(WEIGHTS_ALL[k] * ref[k] for k in ref)
  np.testing.assert_allclose(total, ref_total, rtol=1e-4)
  np.testing.assert_allclose(terms["loss"], total)


def test_distillation_loss_skips_zero_terms(rng):
  stu = make_outputs(rng, L=2, h=4, H=8)
  tea = make_outputs(rng, L=4, h=4, H=8)
  # intermediates absent: must not be touched since their weights are 0/absent
  stu.attention_scores = None
  stu.hidden_states = None
  stu.embeddings = None
  batch = make_batch(rng)
  total, terms = losses.distillation_loss(
      stu, tea, batch, weights={"att": 0.0, "pred": 1.0, "clf": 1.0}, layer_map=LAYER_MAP)
  assert set(terms) == {"loss", "pred", "clf"}
  np.testing.assert_allclose(
      total, np_logits_mse(stu.logits, tea.logits, WEIGHTS)
      + np_cross_entropy(stu.logits, batch["labels"], WEIGHTS), rtol=1e-5)


def test_distillation_loss_non_kd(rng):
  stu = make_outputs(rng, L=2, h=4, H=8)
  batch = make_batch(rng)
  total, terms = losses.distillation_loss(
      stu, None, batch, weights={"clf": 1.0}, layer_map=LAYER_MAP)
  assert set(terms) == {"loss", "clf"}
  np.testing.assert_allclose(total, np_cross_entropy(stu.logits, batch["labels"], WEIGHTS),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="teacher_out is None"):
    losses.distillation_loss(stu, None, batch, weights={"clf": 1.0, "pred": 1.0},
                             layer_map=LAYER_MAP)


def test_distillation_loss_errors(rng):
  stu = make_outputs(rng, L=2, h=4, H=8)
  tea = make_outputs(rng, L=4, h=4, H=8)
  batch = make_batch(rng)
  with pytest.raises(ValueError, match="valid terms are") as e:
    losses.distillation_loss(stu, tea, batch, weights={"attn": 1.0}, layer_map=LAYER_MAP)
  assert "'att'" in str(e.value) and "'attn'" in str(e.value)
  with pytest.raises(ValueError, match="valid values are"):
    losses.distillation_loss(stu, tea, batch, weights={"pred": 1.0}, layer_map=LAYER_MAP,
                             prediction_loss="ce")
  with pytest.raises(ValueError, match="non-zero weight"):
    losses.distillation_loss(stu, tea, batch, weights={"att": 0.0}, layer_map=LAYER_MAP)
  with pytest.raises(ValueError, match="layer_map"):
    losses.distillation_loss(stu, tea, batch, weights={"att": 1.0}, layer_map=(2,))


def test_distillation_loss_jit_and_grad(rng):
  stu = make_outputs(rng, L=2, h=2, H=4)
  tea = make_outputs(rng, L=4, h=4, H=8)
  batch = make_batch(rng)
  proj = {"hid": rng.normal(size=(4, 8)).astype(np.float32),
          "embd": rng.normal(size=(4, 8)).astype(np.float32)}
  eager_total, eager_terms = losses.distillation_loss(
      stu, tea, batch, weights=WEIGHTS_ALL, layer_map=LAYER_MAP, projections=proj)

  @functools.partial(jax.jit, static_argnames=("layer_map",))
  def step(s_tuple, t_tuple, batch, proj, layer_map):
    s, t = Out(*s_tuple), Out(*t_tuple)
    return losses.distillation_loss(s, t, batch, weights=WEIGHTS_ALL,
                                    layer_map=layer_map, projections=proj)

  astuple = lambda o: (o.logits, o.embeddings, o.hidden_states, o.attention_scores)
  total, terms = step(astuple(stu), astuple(tea), batch, proj, layer_map=LAYER_MAP)
  np.testing.assert_allclose(total, eager_total, rtol=1e-5)
  for k in eager_terms:
    np.testing.assert_allclose(terms[k], eager_terms[k], rtol=1e-5, err_msg=k)

  # gradient w.r.t. student outputs and projections is finite
  def f(s_tuple, proj):
    return losses.distillation_loss(Out(*s_tuple), tea, batch, weights=WEIGHTS_ALL,
                                    layer_map=LAYER_MAP, projections=proj)[0]
  g = jax.jit(jax.grad(f, argnums=(0, 1)))(astuple(stu), proj)
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(g))


def test_traced_weights(rng):
  stu = make_outputs(rng, L=2, h=4, H=8)
  tea = make_outputs(rng, L=4, h=4, H=8)
  batch = make_batch(rng)

  @jax.jit
  def f(w_pred):
    return losses.distillation_loss(stu, tea, batch, weights={"pred": w_pred, "clf": 1.0},
                                    layer_map=LAYER_MAP)[0]
  ref = (0.5 * np_logits_mse(stu.logits, tea.logits, WEIGHTS)
         + np_cross_entropy(stu.logits, batch["labels"], WEIGHTS))
  np.testing.assert_allclose(f(jnp.float32(0.5)), ref, rtol=1e-5)


# ===========================================================================
# additional objectives: soft_ce, pkd, cos, att_kl, minilm; layer maps with
# unmapped (None) layers; alpha weighting
# ===========================================================================
def np_soft_ce(s, t, w, temp):
  """-T^2 sum_c p_T log p_S, mean over real examples (explicit loops)."""
  vals = []
  for b in range(len(w)):
    if w[b] == 0:
      continue
    zs = np.float64(s[b]) / temp
    zt = np.float64(t[b]) / temp
    log_zs = np.log(sum(np.exp(x - zs.max()) for x in zs)) + zs.max()
    pt = [np.exp(x) / sum(np.exp(y) for y in zt) for x in zt]
    vals.append(-temp ** 2 * sum(pt[c] * (zs[c] - log_zs) for c in range(len(zs))))
  return float(np.mean(vals)) if vals else 0.0


def np_cls_pkd(s, t, w, proj=None):
  """sum_d (c_S/|c_S| - c_T/|c_T|)^2 of the [CLS] (token 0) vectors, mean over real rows."""
  vals = []
  for b in range(len(w)):
    if w[b] == 0:
      continue
    cs = np.float64(s[b, 0])
    if proj is not None:
      cs = cs @ np.float64(proj)
    ct = np.float64(t[b, 0])
    ns = np.sqrt(sum(x * x for x in cs))
    nt = np.sqrt(sum(x * x for x in ct))
    vals.append(sum((cs[d] / ns - ct[d] / nt) ** 2 for d in range(len(ct))))
  return float(np.mean(vals)) if vals else 0.0


def np_hidden_cosine(s, t, mask, w, proj=None):
  """1 - cos(s_bt, t_bt), mean over real tokens of real examples."""
  vals = []
  for b in range(len(w)):
    if w[b] == 0:
      continue
    for tok in range(s.shape[1]):
      if mask[b, tok] == 0:
        continue
      a = np.float64(s[b, tok])
      if proj is not None:
        a = a @ np.float64(proj)
      c = np.float64(t[b, tok])
      dot = sum(a[d] * c[d] for d in range(len(c)))
      vals.append(1.0 - dot / (np.sqrt(np.sum(a * a)) * np.sqrt(np.sum(c * c))))
  return float(np.mean(vals)) if vals else 0.0


def np_attention_kl(s, t, mask, w):
  """KL(P_T || P_S) of each row over real keys, mean over student heads and real queries."""
  s = np.asarray(s, np.float64)
  t = np.asarray(t, np.float64)
  hs, ht = s.shape[1], t.shape[1]
  vals = []
  for b in range(s.shape[0]):
    if w[b] == 0:
      continue
    keys = [k for k in range(s.shape[-1]) if mask[b, k]]
    for j in range(hs):
      jt = (j * ht) // hs
      for q in keys:
        zs = np.array([s[b, j, q, k] for k in keys])
        zt = np.array([t[b, jt, q, k] for k in keys])
        ps = np.exp(zs - zs.max()) / np.exp(zs - zs.max()).sum()
        pt = np.exp(zt - zt.max()) / np.exp(zt - zt.max()).sum()
        vals.append(sum(pt[i] * np.log(pt[i] / ps[i]) for i in range(len(keys))))
  return float(np.mean(vals)) if vals else 0.0


def np_value_relation(v):
  """[B, T, h, d] -> [B, h, T, T] with VR[b, j, q, k] = v_q . v_k / sqrt(d)."""
  v = np.asarray(v, np.float64)
  Bv, Tv, hv, dv = v.shape
  out = np.zeros((Bv, hv, Tv, Tv))
  for b in range(Bv):
    for j in range(hv):
      for q in range(Tv):
        for k in range(Tv):
          out[b, j, q, k] = sum(v[b, q, j, d] * v[b, k, j, d]
                                for d in range(dv)) / np.sqrt(dv)
  return out


def np_minilm(ss, st, vs, vt, mask, w):
  return (np_attention_kl(ss, st, mask, w)
          + np_attention_kl(np_value_relation(vs), np_value_relation(vt), mask, w))


@pytest.mark.parametrize("temp", [1.0, 2.0, 5.0])
def test_soft_cross_entropy(rng, temp):
  s = 3 * rng.normal(size=(B, C)).astype(np.float32)
  t = 3 * rng.normal(size=(B, C)).astype(np.float32)
  s[WEIGHTS == 0] = np.nan   # padding rows must not matter
  got = losses.soft_cross_entropy(s, t, WEIGHTS, temp)
  np.testing.assert_allclose(got, np_soft_ce(s, t, WEIGHTS, temp), rtol=1e-5)
  # = KL + T^2 * teacher entropy (same gradient as logits_kl)
  s0 = np.nan_to_num(s)
  ent = []
  for b in np.flatnonzero(WEIGHTS):
    lpt = np_log_softmax(np.float64(t[b]) / temp)
    ent.append(-np.sum(np.exp(lpt) * lpt))
  np.testing.assert_allclose(got, np_logits_kl(s0, t, WEIGHTS, temp)
                             + temp ** 2 * np.mean(ent), rtol=1e-5)
  g_ce = jax.grad(lambda z: losses.soft_cross_entropy(z, t, WEIGHTS, temp))(s0)
  g_kl = jax.grad(lambda z: losses.logits_kl(z, t, WEIGHTS, temp))(s0)
  np.testing.assert_allclose(g_ce, g_kl, atol=1e-6)


def test_cls_pkd(rng):
  s = rng.normal(size=(B, T, 4)).astype(np.float32)
  t = rng.normal(size=(B, T, 4)).astype(np.float32)
  s[WEIGHTS == 0] = np.inf
  s[:, 1:] = np.nan          # only [CLS] (token 0) is used
  np.testing.assert_allclose(losses.cls_pkd(s, t, WEIGHTS), np_cls_pkd(s, t, WEIGHTS),
                             rtol=1e-5)
  # scale invariant, and 2 - 2 cos
  np.testing.assert_allclose(losses.cls_pkd(3 * s, t, WEIGHTS), np_cls_pkd(s, t, WEIGHTS),
                             rtol=1e-5)
  t8 = rng.normal(size=(B, T, 8)).astype(np.float32)
  proj = rng.normal(size=(4, 8)).astype(np.float32)
  np.testing.assert_allclose(losses.cls_pkd(s, t8, WEIGHTS, proj),
                             np_cls_pkd(s, t8, WEIGHTS, proj), rtol=1e-5)
  with pytest.raises(ValueError, match="projection"):
    losses.cls_pkd(s, t8, WEIGHTS)


def test_hidden_cosine(rng):
  s = rng.normal(size=(B, T, 4)).astype(np.float32)
  t = rng.normal(size=(B, T, 4)).astype(np.float32)
  s_pad = s.copy()
  s_pad[MASK == 0] = np.nan  # padded tokens / rows must not matter
  np.testing.assert_allclose(losses.hidden_cosine(s_pad, t, MASK, WEIGHTS),
                             np_hidden_cosine(s, t, MASK, WEIGHTS), rtol=1e-5)
  np.testing.assert_allclose(losses.hidden_cosine(2 * t, t, MASK, WEIGHTS), 0.0, atol=1e-6)
  np.testing.assert_allclose(losses.hidden_cosine(-t, t, MASK, WEIGHTS), 2.0, rtol=1e-6)
  t8 = rng.normal(size=(B, T, 8)).astype(np.float32)
  proj = rng.normal(size=(4, 8)).astype(np.float32)
  np.testing.assert_allclose(losses.hidden_cosine(s, t8, MASK, WEIGHTS, proj),
                             np_hidden_cosine(s, t8, MASK, WEIGHTS, proj), rtol=1e-5)
  with pytest.raises(ValueError, match="projection"):
    losses.hidden_cosine(s, t8, MASK, WEIGHTS)


@pytest.mark.parametrize("hs,ht", [(2, 2), (2, 4)])
def test_attention_kl(rng, hs, ht):
  s = 2 * rng.normal(size=(B, hs, T, T)).astype(np.float32)
  t = 2 * rng.normal(size=(B, ht, T, T)).astype(np.float32)
  ref = np_attention_kl(s, t, MASK, WEIGHTS)
  np.testing.assert_allclose(losses.attention_kl(s, t, MASK, WEIGHTS), ref, rtol=1e-5)
  # values at masked keys / queries / rows (even -inf, nan, additive mask) are ignored
  for fill in (-np.inf, np.nan, -1e9, 1e4):
    s2, t2 = s.copy(), t.copy()
    pad = (MASK == 0)
    s2[np.broadcast_to(pad[:, None, None, :], s2.shape)] = fill
    t2[np.broadcast_to(pad[:, None, :, None], t2.shape)] = fill
    np.testing.assert_allclose(losses.attention_kl(s2, t2, MASK, WEIGHTS), ref,
                               rtol=1e-5, err_msg=str(fill))
  # the teacher's own masked probabilities give the same value (softmax of masked scores)
  t_add = t + np.where(MASK[:, None, None, :] > 0, 0.0, -1e4).astype(np.float32)
  np.testing.assert_allclose(losses.attention_kl(s, t_add, MASK, WEIGHTS), ref, rtol=1e-5)
  np.testing.assert_allclose(losses.attention_kl(s, s, MASK, WEIGHTS), 0.0, atol=1e-6)


def test_value_relation_and_minilm(rng):
  vs = rng.normal(size=(B, T, 2, 3)).astype(np.float32)
  vt = rng.normal(size=(B, T, 2, 5)).astype(np.float32)   # different head size
  ss = rng.normal(size=(B, 2, T, T)).astype(np.float32)
  st = rng.normal(size=(B, 2, T, T)).astype(np.float32)
  ref_vr = np_attention_kl(np_value_relation(vs), np_value_relation(vt), MASK, WEIGHTS)
  vs_pad = vs.copy()
  vs_pad[MASK == 0] = np.nan                               # padded tokens are ignored
  np.testing.assert_allclose(losses.value_relation_kl(vs_pad, vt, MASK, WEIGHTS), ref_vr,
                             rtol=1e-5)
  np.testing.assert_allclose(losses.minilm_loss(ss, st, vs, vt, MASK, WEIGHTS),
                             np_minilm(ss, st, vs, vt, MASK, WEIGHTS), rtol=1e-5)


def test_layerwise_new_terms_with_unmapped_layers(rng):
  stu_h = [rng.normal(size=(B, T, 4)).astype(np.float32) for _ in range(3)]
  tea_h = [rng.normal(size=(B, T, 4)).astype(np.float32) for _ in range(6)]
  stu_a = [rng.normal(size=(B, 2, T, T)).astype(np.float32) for _ in range(3)]
  tea_a = [rng.normal(size=(B, 2, T, T)).astype(np.float32) for _ in range(6)]
  for lm in [(2, 4, 6), (4, 5, 6), (None, None, 6), (1, None, 3)]:
    pairs = [(i, k) for i, k in enumerate(lm) if k is not None]
    np.testing.assert_allclose(
        losses.layerwise_cls_pkd(stu_h, tea_h, lm, WEIGHTS),
        np.mean([np_cls_pkd(stu_h[i], tea_h[k - 1], WEIGHTS) for i, k in pairs]), rtol=1e-5)
    np.testing.assert_allclose(
        losses.layerwise_attention_kl(stu_a, tea_a, lm, MASK, WEIGHTS),
        np.mean([np_attention_kl(stu_a[i], tea_a[k - 1], MASK, WEIGHTS) for i, k in pairs]),
        rtol=1e-5)
    # the TinyBERT terms skip unmapped layers too
    np.testing.assert_allclose(
        losses.layerwise_hidden_mse(stu_h, tea_h, lm, MASK, WEIGHTS),
        np.mean([np_hidden_mse(stu_h[i], tea_h[k - 1], MASK, WEIGHTS) for i, k in pairs]),
        rtol=1e-5)
    np.testing.assert_allclose(
        losses.layerwise_attention_mse(stu_a, tea_a, lm, MASK, WEIGHTS),
        np.mean([np_attention_mse(stu_a[i], tea_a[k - 1], MASK, WEIGHTS)
                 for i, k in pairs]), rtol=1e-5)
  with pytest.raises(ValueError, match="maps no student layer"):
    losses.layerwise_cls_pkd(stu_h, tea_h, (None, None, None), WEIGHTS)
  with pytest.raises(ValueError, match="out of range"):
    losses.layerwise_attention_kl(stu_a, tea_a, (None, None, 7), MASK, WEIGHTS)
  with pytest.raises(ValueError, match="len"):
    losses.layerwise_attention_kl(stu_a, tea_a, (None, 6), MASK, WEIGHTS)


def test_new_terms_zero_weight_batch_and_finite_grads(rng):
  zero_w = np.zeros_like(WEIGHTS)
  s = rng.normal(size=(B, T, 4)).astype(np.float32)
  a = rng.normal(size=(B, 2, T, T)).astype(np.float32)
  a_inf = np.where(MASK[:, None, None, :] > 0, a, -np.inf).astype(np.float32)
  v = rng.normal(size=(B, T, 2, 3)).astype(np.float32)
  z = rng.normal(size=(B, C)).astype(np.float32)
  for val in (losses.cls_pkd(s, s, zero_w), losses.hidden_cosine(s, s, MASK, zero_w),
              losses.attention_kl(a, a, MASK, zero_w),
              losses.value_relation_kl(v, v, MASK, zero_w),
              losses.soft_cross_entropy(z, z, zero_w)):
    assert float(val) == 0.0
  zeros = np.zeros_like(s)   # zero vectors: clamped norms, finite gradient
  g = jax.grad(lambda x: losses.cls_pkd(x, s, WEIGHTS) + losses.hidden_cosine(
      x, s, MASK, WEIGHTS))(zeros)
  assert np.all(np.isfinite(g))
  g = jax.grad(lambda x, y: losses.attention_kl(x, a_inf, MASK, WEIGHTS)
               + losses.value_relation_kl(y, v, MASK, WEIGHTS), argnums=(0, 1))(a_inf, v)
  assert all(np.all(np.isfinite(x)) for x in g)


# ---------------------------------------------------------------------------
# dispatcher with the new terms, alpha
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class FullOut:
  logits: object = None
  last_hidden_state: object = None
  embeddings: object = None
  hidden_states: tuple = None
  attention_scores: tuple = None
  values: tuple = None


def make_full_outputs(rng, L, h, H, d):
  hidden = tuple(rng.normal(size=(B, T, H)).astype(np.float32) for _ in range(L))
  return FullOut(
      logits=2 * rng.normal(size=(B, C)).astype(np.float32),
      last_hidden_state=hidden[-1],
      embeddings=rng.normal(size=(B, T, H)).astype(np.float32),
      hidden_states=hidden,
      attention_scores=tuple(rng.normal(size=(B, h, T, T)).astype(np.float32)
                             for _ in range(L)),
      values=tuple(rng.normal(size=(B, T, h, d)).astype(np.float32) for _ in range(L)),
  )


NEW_WEIGHTS = {"soft_ce": 0.5, "pkd": 2.0, "cos": 1.5, "att_kl": 0.75, "minilm": 0.25,
               "clf": 1.0}


def new_reference_terms(stu, tea, batch, proj, layer_map, temp):
  pairs = [(i, k) for i, k in enumerate(layer_map) if k is not None]
  return {
      "soft_ce": np_soft_ce(stu.logits, tea.logits, WEIGHTS, temp),
      "pkd": np.mean([np_cls_pkd(stu.hidden_states[i], tea.hidden_states[k - 1], WEIGHTS,
                                 proj.get("pkd")) for i, k in pairs]),
      "cos": np_hidden_cosine(stu.hidden_states[-1], tea.hidden_states[-1], MASK, WEIGHTS,
                              proj.get("cos")),
      "att_kl": np.mean([np_attention_kl(stu.attention_scores[i],
                                         tea.attention_scores[k - 1], MASK, WEIGHTS)
                         for i, k in pairs]),
      "minilm": np_minilm(stu.attention_scores[-1], tea.attention_scores[-1],
                          stu.values[-1], tea.values[-1], MASK, WEIGHTS),
      "clf": np_cross_entropy(stu.logits, batch["labels"], WEIGHTS),
  }


@pytest.mark.parametrize("layer_map,temp,widths", [((2, 4), 1.0, (4, 4)),
                                                   ((None, 4), 3.0, (4, 8))])
def test_distillation_loss_new_terms(rng, layer_map, temp, widths):
  hs_, ht_ = widths
  stu = make_full_outputs(rng, L=2, h=2, H=hs_, d=3)
  tea = make_full_outputs(rng, L=4, h=2, H=ht_, d=4)
  batch = make_batch(rng)
  proj = {} if hs_ == ht_ else {k: rng.normal(size=(hs_, ht_)).astype(np.float32)
                                for k in ("pkd", "cos")}
  total, terms = losses.distillation_loss(
      stu, tea, batch, weights=NEW_WEIGHTS, layer_map=layer_map, temperature=temp,
      projections=proj)
  ref = new_reference_terms(stu, tea, batch, proj, layer_map, temp)
  assert set(terms) == {"loss", *NEW_WEIGHTS}
  for k, v in ref.items():
    np.testing.assert_allclose(terms[k], v, rtol=1e-4, err_msg=k)
  np.testing.assert_allclose(total, sum(NEW_WEIGHTS[k] * ref[k] for k in ref), rtol=1e-4)

  # jit (static layer map) and finite gradients
  @jax.jit
  def f(s_tuple):
    return losses.distillation_loss(FullOut(*s_tuple), tea, batch, weights=NEW_WEIGHTS,
                                    layer_map=layer_map, temperature=temp,
                                    projections=proj)[0]
  val, g = jax.value_and_grad(f)(dataclasses.astuple(stu))
  np.testing.assert_allclose(val, total, rtol=1e-5)
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(g))


def test_distillation_loss_cos_falls_back_to_hidden_states(rng):
  stu = make_outputs(rng, L=2, h=2, H=4)   # Out has no last_hidden_state
  tea = make_outputs(rng, L=4, h=2, H=4)
  batch = make_batch(rng)
  _, terms = losses.distillation_loss(stu, tea, batch, weights={"cos": 1.0}, layer_map=(2, 4))
  np.testing.assert_allclose(
      terms["cos"], np_hidden_cosine(stu.hidden_states[-1], tea.hidden_states[-1], MASK,
                                     WEIGHTS), rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
def test_alpha_weighting(rng, alpha):
  stu = make_full_outputs(rng, L=2, h=2, H=4, d=3)
  tea = make_full_outputs(rng, L=4, h=2, H=4, d=3)
  batch = make_batch(rng)
  weights = {"att": 1.0, "hid": 0.5, "pred": 2.0, "pkd": 1.0, "clf": 7.0}  # clf ignored
  total, terms = losses.distillation_loss(stu, tea, batch, weights=weights, layer_map=(2, 4),
                                          alpha=alpha)
  clf = np_cross_entropy(stu.logits, batch["labels"], WEIGHTS)
  kd = {
      "att": np.mean([np_attention_mse(stu.attention_scores[i], tea.attention_scores[k - 1],
                                       MASK, WEIGHTS) for i, k in enumerate((2, 4))]),
      "hid": np.mean([np_hidden_mse(stu.hidden_states[i], tea.hidden_states[k - 1], MASK,
                                    WEIGHTS) for i, k in enumerate((2, 4))]),
      "pred": np_logits_mse(stu.logits, tea.logits, WEIGHTS),
      "pkd": np.mean([np_cls_pkd(stu.hidden_states[i], tea.hidden_states[k - 1], WEIGHTS)
                      for i, k in enumerate((2, 4))]),
  }
  ref = alpha * clf + (1 - alpha) * sum(weights[k] * v for k, v in kd.items())
  np.testing.assert_allclose(total, ref, rtol=1e-4)
  # terms that get a zero effective weight are not computed
  expected = {"loss"} | ({"clf"} if alpha > 0 else set()) | (set(kd) if alpha < 1 else set())
  assert set(terms) == expected


def test_alpha_off_and_errors(rng):
  stu = make_full_outputs(rng, L=2, h=2, H=4, d=3)
  tea = make_full_outputs(rng, L=4, h=2, H=4, d=3)
  batch = make_batch(rng)
  w = {"pred": 2.0, "clf": 3.0}
  plain, _ = losses.distillation_loss(stu, tea, batch, weights=w, layer_map=(2, 4))
  for off in (None, -1.0, -0.5):
    t_off, _ = losses.distillation_loss(stu, tea, batch, weights=w, layer_map=(2, 4),
                                        alpha=off)
    np.testing.assert_allclose(t_off, plain)
  np.testing.assert_allclose(
      plain, 2 * np_logits_mse(stu.logits, tea.logits, WEIGHTS)
      + 3 * np_cross_entropy(stu.logits, batch["labels"], WEIGHTS), rtol=1e-5)
  with pytest.raises(ValueError, match=r"alpha=1.5"):
    losses.distillation_loss(stu, tea, batch, weights=w, layer_map=(2, 4), alpha=1.5)
  # alpha = 1: only clf, so no teacher is needed
  total, terms = losses.distillation_loss(stu, None, batch, weights=w, layer_map=(2, 4),
                                          alpha=1.0)
  assert set(terms) == {"loss", "clf"}
  assert losses.apply_alpha({"pred": 2.0, "clf": 3.0}, 0.2) == pytest.approx(
      {"pred": 1.6, "clf": 0.2})


def test_unknown_term_lists_all_valid_names(rng):
  stu = make_full_outputs(rng, L=2, h=2, H=4, d=3)
  batch = make_batch(rng)
  with pytest.raises(ValueError, match="valid terms are") as e:
    losses.distillation_loss(stu, stu, batch, weights={"mini_lm": 1.0}, layer_map=(1, 2))
  for name in ("att", "hid", "embd", "pred", "soft_ce", "pkd", "cos", "att_kl", "minilm",
               "clf"):
    assert f"'{name}'" in str(e.value)
  with pytest.raises(ValueError, match="valid keys are"):
    losses.distillation_loss(stu, stu, batch, weights={"cos": 1.0}, layer_map=(1, 2),
                             projections={"att": np.zeros((4, 4), np.float32)})


# ---------------------------------------------------------------------------
# the encoder's value projections (MiniLM) and an end-to-end check
# ---------------------------------------------------------------------------
def test_encoder_output_values_and_minilm_end_to_end():
  from kd_jax.models.encoder import Encoder, EncoderConfig, init_params
  cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4,
                      intermediate_size=32, max_position_embeddings=16, num_labels=C)
  params = init_params(cfg, jax.random.PRNGKey(0))
  ids = np.arange(B * T).reshape(B, T).astype(np.int32) % 50
  model = Encoder(cfg)
  out = model.apply({"params": params}, ids, MASK, output_values=True,
                    output_embeddings=True, output_hidden_states=True,
                    output_attention_scores=True)
  assert len(out.values) == 2 and out.values[0].shape == (B, T, 4, 4)
  # layer 1's values are the value projection of the embedding output
  vp = params["layer_0"]["attention"]["value"]
  ref = (np.asarray(out.embeddings) @ np.asarray(vp["kernel"]) + np.asarray(vp["bias"]))
  np.testing.assert_allclose(out.values[0], ref.reshape(B, T, 4, 4), rtol=1e-5, atol=1e-5)
  # backwards compatible: not returned unless asked; other outputs unchanged
  plain = model.apply({"params": params}, ids, MASK)
  assert plain.values is None
  np.testing.assert_allclose(plain.logits, out.logits, rtol=1e-6)
  # the model against itself: every new term is 0 (KL/cos/pkd) or the teacher entropy
  batch = {"attention_mask": MASK, "labels": np.zeros(B, np.int32), "example_mask": WEIGHTS}
  _, terms = losses.distillation_loss(
      out, out, batch, weights={"pkd": 1.0, "cos": 1.0, "att_kl": 1.0, "minilm": 1.0},
      layer_map=(1, 2))
  for k in ("pkd", "cos", "att_kl", "minilm"):
    np.testing.assert_allclose(terms[k], 0.0, atol=1e-5, err_msg=k)


# ---------------------------------------------------------------------------
# the loss-term registry (TERMS) and what is derived from it
# ---------------------------------------------------------------------------
def test_derived_term_tuples_keep_their_values():
  assert losses.DISTILL_TERMS == ("att", "hid", "embd", "pred", "soft_ce", "pkd", "cos",
                                  "att_kl", "minilm", "clf", "mlm", "mlm_kl", "mlm_mse")
  assert losses.DISTILL_TERMS == tuple(losses.TERMS)
  assert losses.SUPERVISED_TERMS == ("clf", "mlm")
  assert losses.MLM_TERMS == ("mlm", "mlm_kl", "mlm_mse")
  assert losses.INTERMEDIATE_TERMS == ("att", "hid", "embd", "pkd", "cos", "att_kl", "minilm")
  assert losses.LAYERWISE_TERMS == ("att", "hid", "pkd", "att_kl")
  assert losses.PROJECTION_KEYS == ("hid", "embd", "pkd", "cos")
  assert losses.GENERAL_TERMS == ("att", "hid", "embd", "pkd", "cos", "att_kl", "minilm",
                                  "mlm", "mlm_kl", "mlm_mse")
  assert losses.GENERAL_TERMS == tuple(
      t for t in losses.DISTILL_TERMS if t not in ("clf", "pred", "soft_ce"))
  for name in ("Term", "TermInputs", "TERMS", "DISTILL_TERMS", "SUPERVISED_TERMS",
               "MLM_TERMS", "INTERMEDIATE_TERMS", "GENERAL_TERMS", "LAYERWISE_TERMS",
               "PROJECTION_KEYS", "outputs_needed", "distillation_loss"):
    assert name in losses.__all__, name
  for name, term in losses.TERMS.items():
    assert isinstance(term, losses.Term) and term.doc, name


def _kwargs(emb=False, hid=False, val=False, att=()):
  return dict(output_embeddings=emb, output_hidden_states=hid, output_values=val,
              output_attention_scores=tuple(att))


@pytest.mark.parametrize("weights,layer_map,sl,tl,expected", [
    # nothing weighted, or only logit terms: no intermediates at all
    ({}, (2, 4), 2, 4, (_kwargs(), _kwargs())),
    ({"pred": 1.0, "clf": 1.0, "soft_ce": 0.5, "mlm": 1.0, "mlm_kl": 1.0}, (2, 4), 2, 4,
     (_kwargs(), _kwargs())),
    # the paper's objective
    ({"att": 1.0, "hid": 1.0, "embd": 1.0, "pred": 1.0, "clf": 1.0}, (2, 4), 2, 4,
     (_kwargs(emb=True, hid=True, att=(0, 1)), _kwargs(emb=True, hid=True, att=(1, 3)))),
    # zero / negative weights do not count; unmapped layers read no attention
    ({"att": 0.0, "hid": -1.0, "att_kl": 2.0}, (None, 4, 6), 3, 6,
     (_kwargs(att=(1, 2)), _kwargs(att=(3, 5)))),
    ({"pkd": 1.0, "cos": 1.0}, (2, 4), 2, 4,
     (_kwargs(hid=True), _kwargs(hid=True))),   # cos reads last_hidden_state only
    ({"minilm": 1.0}, (2, 4), 2, 6,
     (_kwargs(val=True, att=(1,)), _kwargs(val=True, att=(5,)))),
    # minilm + att: the union of the mapped layers and the last ones, sorted
    ({"minilm": 1.0, "att": 1.0}, (1, 3, None), 3, 6,
     (_kwargs(val=True, att=(0, 1, 2)), _kwargs(val=True, att=(0, 2, 5)))),
    ({"minilm": 0.5, "att": 1.0, "att_kl": 1.0, "embd": 1.0}, (2, 2, 4), 3, 4,
     (_kwargs(emb=True, val=True, att=(0, 1, 2)), _kwargs(emb=True, val=True, att=(1, 3)))),
])
def test_outputs_needed(weights, layer_map, sl, tl, expected):
  assert losses.outputs_needed(weights, layer_map, sl, tl) == expected


def np_toy(s, t, w):
  """Mean over real examples of sum_c |z_S - z_T| (explicit loops)."""
  tot, cnt = 0.0, 0
  for b in range(s.shape[0]):
    if w[b] == 0:
      continue
    tot += sum(abs(float(s[b, c]) - float(t[b, c])) for c in range(s.shape[1]))
    cnt += 1
  return tot / cnt


def _toy_fn(x):
  w = jnp.asarray(x.example_weights, jnp.float32)
  d = jnp.sum(jnp.abs(x.student_out.logits - x.teacher_out.logits), axis=-1)
  return jnp.sum(w * d) / jnp.maximum(jnp.sum(w), 1.0)


def test_registered_term_is_computed_with_its_weight(rng, monkeypatch):
  stu = make_full_outputs(rng, L=2, h=2, H=4, d=3)
  tea = make_full_outputs(rng, L=4, h=2, H=4, d=3)
  batch = make_batch(rng)
  weights = {"pred": 0.5, "att": 1.0, "toy": 2.0}
  with pytest.raises(ValueError, match="unknown loss term"):
    losses.distillation_loss(stu, tea, batch, weights=weights, layer_map=(2, 4))
  base_total, base_terms = losses.distillation_loss(
      stu, tea, batch, weights={"pred": 0.5, "att": 1.0}, layer_map=(2, 4))

  monkeypatch.setitem(losses.TERMS, "toy", losses.Term(
      _toy_fn, reads=("logits",), doc="toy: weighted mean L1 distance of the logits"))
  total, terms = losses.distillation_loss(stu, tea, batch, weights=weights, layer_map=(2, 4))
  assert list(terms) == ["loss", "att", "pred", "toy"]   # TERMS order, toy registered last
  toy = np_toy(stu.logits, tea.logits, WEIGHTS)
  np.testing.assert_allclose(terms["toy"], toy, rtol=1e-5)
  for k in ("att", "pred"):   # the other terms are untouched
    np.testing.assert_array_equal(terms[k], base_terms[k])
  np.testing.assert_allclose(total, base_total + 2.0 * toy, rtol=1e-5)
  np.testing.assert_allclose(
      total, 0.5 * np_logits_mse(stu.logits, tea.logits, WEIGHTS) + np.mean(
          [np_attention_mse(stu.attention_scores[i], tea.attention_scores[k - 1], MASK,
                            WEIGHTS) for i, k in enumerate((2, 4))]) + 2.0 * toy, rtol=1e-4)
  # it is a valid term name now (listed in the error), and jit-compatible
  with pytest.raises(ValueError, match="valid terms are") as e:
    losses.distillation_loss(stu, tea, batch, weights={"toyy": 1.0}, layer_map=(2, 4))
  assert "'toy'" in str(e.value)
  f = jax.jit(lambda s: losses.distillation_loss(
      dataclasses.replace(stu, logits=s), tea, batch, weights={"toy": 2.0},
      layer_map=(2, 4))[0])
  np.testing.assert_allclose(f(stu.logits), 2.0 * toy, rtol=1e-5)
  # it needs a teacher (needs_teacher defaults to True)
  with pytest.raises(ValueError, match=r"teacher_out is None.*'toy'"):
    losses.distillation_loss(stu, None, batch, weights={"toy": 1.0}, layer_map=(2, 4))


def test_registered_term_flags_drive_inputs_and_outputs(rng, monkeypatch):
  """A supervised term with a projection, reading embeddings: gets its own projection,
  runs without a teacher, and outputs_needed asks for the embeddings."""
  stu = make_full_outputs(rng, L=2, h=2, H=4, d=3)
  batch = make_batch(rng)
  seen = []

  def fn(x):
    seen.append(x)
    return jnp.mean(jnp.asarray(x.student_out.embeddings) @ x.projection)

  monkeypatch.setitem(losses.TERMS, "toy", losses.Term(
      fn, reads=("embeddings",), needs_teacher=False, projection=True, doc="toy"))
  proj = {"toy": rng.normal(size=(4, 8)).astype(np.float32),
          "hid": rng.normal(size=(4, 8)).astype(np.float32)}
  total, terms = losses.distillation_loss(
      stu, None, batch, weights={"toy": 3.0, "clf": 1.0}, layer_map=(2, 4),
      prediction_loss="kl", temperature=2.0, projections=proj)
  (x,) = seen
  assert x.projection is proj["toy"] and x.teacher_out is None and x.mlm_weights is None
  assert x.layer_map == (2, 4) and x.prediction_loss == "kl" and x.temperature == 2.0
  np.testing.assert_array_equal(x.example_weights, WEIGHTS)
  toy = np.mean(stu.embeddings.astype(np.float64) @ proj["toy"])
  np.testing.assert_allclose(terms["toy"], toy, rtol=1e-5)
  np.testing.assert_allclose(
      total, 3.0 * toy + np_cross_entropy(stu.logits, batch["labels"], WEIGHTS), rtol=1e-5)
  assert losses.outputs_needed({"toy": 1.0}, (2, 4), 2, 4) == (
      _kwargs(emb=True), _kwargs(emb=True))


def test_term_validation():
  fn = lambda x: 0.0
  with pytest.raises(ValueError, match="reads"):
    losses.Term(fn, reads=("hidden",))
  with pytest.raises(ValueError, match="reads"):
    losses.Term(fn, reads="logits")
  with pytest.raises(ValueError, match="attention_layers"):
    losses.Term(fn, reads=("attention_scores",))
  with pytest.raises(ValueError, match="attention_layers"):
    losses.Term(fn, reads=("logits",), attention_layers="last")
  with pytest.raises(ValueError, match="attention_layers"):
    losses.Term(fn, reads=("attention_scores",), attention_layers="all")
  with pytest.raises(ValueError, match="callable"):
    losses.Term(None, reads=("logits",))
  with pytest.raises(dataclasses.FrozenInstanceError):
    losses.TERMS["att"].doc = "x"


def test_mlm_weights_passed_to_terms(rng, monkeypatch):
  """``mlm_weights`` (batch mlm_weights x example weight) reaches the MLM terms."""
  P, V = 3, 5
  stu = Out(logits=rng.normal(size=(B, P, V)).astype(np.float32))
  tea = Out(logits=rng.normal(size=(B, P, V)).astype(np.float32))
  mw = (rng.random((B, P)) > 0.3).astype(np.float32)
  batch = {"attention_mask": MASK, "example_mask": WEIGHTS, "mlm_weights": mw,
           "mlm_labels": rng.integers(0, V, size=(B, P))}
  seen = []
  monkeypatch.setitem(losses.TERMS, "toy", losses.Term(
      lambda x: seen.append(x) or jnp.zeros(()), reads=("logits",), mlm=True))
  _, terms = losses.distillation_loss(stu, tea, batch, weights={"mlm_mse": 1.0, "toy": 1.0},
                                      layer_map=(1,))
  np.testing.assert_array_equal(seen[0].mlm_weights, mw * WEIGHTS[:, None])
  np.testing.assert_array_equal(terms["mlm_mse"], losses.mlm_mse(stu.logits, tea.logits,
                                                                 mw * WEIGHTS[:, None]))


# ---------------------------------------------------------------------------
# token heads: prediction terms per real token, cross-entropy per labelled token
# ---------------------------------------------------------------------------
def test_token_head_terms_match_numpy(rng):
  """Logits [B, T, C] (a token head): pred (MSE and KL) and soft_ce treat every real token
  (attention_mask * example weight) as a row; clf is the cross-entropy over tokens whose
  label is not -100."""
  s = 2 * rng.normal(size=(B, T, C)).astype(np.float32)
  t = 2 * rng.normal(size=(B, T, C)).astype(np.float32)
  labels = rng.integers(0, C, size=(B, T))
  labels[MASK == 0] = -100
  labels[:, 0] = -100                       # [CLS]: unscored, as batching aligns tags
  batch = {"attention_mask": MASK, "labels": labels, "example_mask": WEIGHTS}
  tokens_w = (MASK * WEIGHTS[:, None]).reshape(-1).astype(np.float32)
  flat_s, flat_t = s.reshape(B * T, C), t.reshape(B * T, C)
  _, terms = losses.distillation_loss(
      Out(logits=s), Out(logits=t), batch, weights={"pred": 1.0, "soft_ce": 1.0, "clf": 1.0},
      layer_map=(), temperature=2.0)
  np.testing.assert_allclose(terms["pred"], np_logits_mse(flat_s, flat_t, tokens_w), rtol=1e-5)
  np.testing.assert_allclose(terms["soft_ce"], np_soft_ce(flat_s, flat_t, tokens_w, 2.0),
                             rtol=1e-4)
  keep = labels.reshape(-1) != -100
  logp = np_log_softmax(flat_s)[keep]
  ce = -logp[np.arange(keep.sum()), labels.reshape(-1)[keep]].mean()
  np.testing.assert_allclose(terms["clf"], ce, rtol=1e-5)
  _, kl = losses.distillation_loss(Out(logits=s), Out(logits=t), batch, weights={"pred": 1.0},
                                   layer_map=(), prediction_loss="kl", temperature=2.0)
  np.testing.assert_allclose(kl["pred"], np_logits_kl(flat_s, flat_t, tokens_w, 2.0), rtol=1e-4)
