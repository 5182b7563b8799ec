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
