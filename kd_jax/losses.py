"""Distillation and classification losses (pure ``jax.numpy`` / ``jax.lax``).

Implements the TinyBERT-style objective used by "The Privileged Students"
(Wibowo et al., 2024, §2.1, eqs. 1-4), following TinyBERT (Jiao et al., 2020),
plus the classical soft-target KL loss of Hinton et al. (2015) and the
supervised cross-entropy ``L_clf``.

Conventions
-----------
``B`` batch, ``T`` tokens, ``H`` hidden width, ``h`` attention heads,
``C`` classes, ``L`` number of transformer layers.

* ``attention_mask``: ``[B, T]`` int/float/bool, 1 for real tokens, 0 for padding.
* ``example_weights``: ``[B]`` float, 1 for a real example and 0 for a padding
  row that only exists to keep batch shapes static.

Every "mean" in this module is a pooled mean over *real* elements only
(elements of examples with weight 0 and padded token positions contribute
neither to the numerator nor to the denominator).  Denominators are guarded
with ``jnp.maximum(denominator, 1)`` so that an all-padding batch yields 0,
never NaN.  Masked elements are removed with ``jnp.where`` *before* any
arithmetic (the "double where" pattern), so even ``-inf``/``-1e9`` values at
masked positions can neither leak into the value nor produce NaN gradients.

All arithmetic is done in float32 (inputs are cast with ``.astype(jnp.float32)``,
so bfloat16 activations are fine).  Nothing branches on traced values, so every
function is ``jax.jit``-compatible; structural arguments (``layer_map``,
``weights``, ``prediction_loss``) are static Python values and are validated at
trace time.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DISTILL_TERMS",
    "PREDICTION_LOSSES",
    "select_heads",
    "attention_mse",
    "hidden_mse",
    "layerwise_attention_mse",
    "layerwise_hidden_mse",
    "logits_mse",
    "logits_kl",
    "cross_entropy",
    "distillation_loss",
]

#: Valid term names for :func:`distillation_loss` ``weights``.
DISTILL_TERMS = ("att", "hid", "embd", "pred", "clf")
#: Valid values of ``prediction_loss`` in :func:`distillation_loss`.
PREDICTION_LOSSES = ("mse", "kl")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _f32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / max(den, 1)``: 0 (not NaN) when nothing is counted.

    Denominators here are counts of real elements (possibly scaled by example
    weights that are 0/1), so clamping at 1 never changes a non-empty mean.
    """
    return num / jnp.maximum(den, 1.0)


def _token_weights(attention_mask, example_weights) -> jax.Array:
    """``[B, T]`` float32 weight per token: ``example_weights[b] * mask[b, t]``."""
    mask = _f32(attention_mask)
    w = _f32(example_weights)
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be [B, T]; got shape {mask.shape}")
    if w.shape != (mask.shape[0],):
        raise ValueError(
            f"example_weights must be [B]={mask.shape[0]}; got shape {w.shape}")
    return mask * w[:, None]


def _check_layer_map(layer_map: Sequence[int], num_student: int,
                     num_teacher: int, what: str) -> list[int]:
    layer_map = list(layer_map)
    if len(layer_map) != num_student:
        raise ValueError(
            f"{what}: len(layer_map)={len(layer_map)} (layer_map={layer_map}) "
            f"must equal the number of student layers ({num_student})")
    out = []
    for i, k in enumerate(layer_map, start=1):
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise ValueError(
                f"{what}: layer_map entries must be ints (1-based teacher layers); "
                f"entry for student layer {i} is {k!r} (layer_map={layer_map})")
        if not 1 <= int(k) <= num_teacher:
            raise ValueError(
                f"{what}: layer_map[{i - 1}]={k} (student layer {i}) is out of "
                f"range 1..{num_teacher} teacher layers (layer_map={layer_map})")
        out.append(int(k))
    return out


# ---------------------------------------------------------------------------
# individual terms
# ---------------------------------------------------------------------------
def select_heads(num_teacher_heads: int, num_student_heads: int) -> np.ndarray:
    """Teacher head index compared with each student head in ``L_att``.

    Eq. 1 of Wibowo et al. (2024) averages ``MSE(A_S, A_T)`` over heads, which
    presumes equal head counts (as in TinyBERT, Jiao et al. 2020).  When the
    student has fewer heads (e.g. half the hidden width with the same head
    size) we pair student head ``j`` with the *evenly spaced* teacher head
    ``(j * n) // m`` -- the same "evenly spaced elements" rule the paper uses
    for copying the teacher's weights into a narrower student (§2.2, following
    Xu et al. 2024); e.g. 4 teacher heads, 2 student heads -> ``[0, 2]``.
    With equal counts this is the identity; with more student heads than
    teacher heads indices repeat (each teacher head is reused).

    Args:
      num_teacher_heads: ``n`` (positive int).
      num_student_heads: ``m`` (positive int).

    Returns:
      ``np.ndarray`` of shape ``[m]``, dtype int, ``(np.arange(m) * n) // m``.
    """
    n, m = int(num_teacher_heads), int(num_student_heads)
    if n <= 0 or m <= 0:
        raise ValueError(
            f"head counts must be positive; got num_teacher_heads={n}, "
            f"num_student_heads={m}")
    return (np.arange(m) * n) // m


def attention_mse(student_scores, teacher_scores, attention_mask,
                  example_weights) -> jax.Array:
    """Single-layer attention-score MSE (one layer of eq. 1).

    ``L = sum_{b,j,q,k} w_b v_bqk (A_S[b,j,q,k] - A_T[b,s(j),q,k])^2
          / (h_S * sum_{b,q,k} w_b v_bqk)``

    where ``v_bqk = mask[b,q] * mask[b,k]`` (both query and key tokens real),
    ``w_b`` the example weight and ``s = select_heads(h_T, h_S)``.  This is the
    mean over student heads of the per-head MSE over valid (query, key) pairs
    of real examples (Wibowo et al. 2024, eq. 1; TinyBERT, Jiao et al. 2020,
    eq. 7, which also distils the *unnormalised* scores ``QK^T/sqrt(d_k)``).

    Invalid pairs are removed with ``jnp.where`` before subtraction, so
    additive-mask constants (``-1e4``, ``-1e9``, ``-inf``) at masked positions
    can never enter the value or its gradient.

    Args:
      student_scores: ``[B, h_S, T, T]`` float (any float dtype), pre-softmax
        scores ``A = Q K^T / sqrt(d_k)``.
      teacher_scores: ``[B, h_T, T, T]`` float, same meaning.
      attention_mask: ``[B, T]``, 1 for real tokens.
      example_weights: ``[B]`` float, 0 for padding rows.

    Returns:
      float32 scalar.
    """
    s = _f32(student_scores)
    t = _f32(teacher_scores)
    if s.ndim != 4 or t.ndim != 4:
        raise ValueError(
            f"attention scores must be [B, h, T, T]; got student {s.shape}, "
            f"teacher {t.shape}")
    if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
        raise ValueError(
            f"student/teacher attention scores disagree on B/T: student "
            f"{s.shape}, teacher {t.shape}")
    h_s, h_t = s.shape[1], t.shape[1]
    if h_s != h_t:
        t = jnp.take(t, jnp.asarray(select_heads(h_t, h_s)), axis=1)
    mask = _f32(attention_mask)
    w = _token_weights(mask, example_weights)            # [B, T] = w_b * m_bq
    pair_w = w[:, :, None] * mask[:, None, :]            # [B, Tq, Tk]
    valid = (pair_w > 0)[:, None, :, :]                  # [B, 1, Tq, Tk]
    s = jnp.where(valid, s, 0.0)
    t = jnp.where(valid, t, 0.0)
    sq = jnp.square(s - t)                               # zeros where invalid
    num = jnp.sum(sq * pair_w[:, None, :, :])
    den = h_s * jnp.sum(pair_w)
    return _safe_div(num, den)


def hidden_mse(student_hidden, teacher_hidden, attention_mask, example_weights,
               projection=None) -> jax.Array:
    """Hidden-state / embedding MSE (eq. 2 for one layer, eq. 3).

    ``L = sum_{b,t,d} w_b m_bt ((H_S W)[b,t,d] - H_T[b,t,d])^2
          / (H_T_width * sum_{b,t} w_b m_bt)``

    i.e. ``MSE(W . H_S, H_T)`` over real tokens of real examples and all hidden
    units (Wibowo et al. 2024, eqs. 2-3; TinyBERT, Jiao et al. 2020, eqs. 8-9).
    ``W`` is the learnable projection used when the student is narrower; with
    equal widths it may be omitted (the paper's footnote 1: "we omit W").

    Args:
      student_hidden: ``[B, T, H_S]`` float.
      teacher_hidden: ``[B, T, H_T]`` float.
      attention_mask: ``[B, T]``, 1 for real tokens.
      example_weights: ``[B]`` float, 0 for padding rows.
      projection: optional kernel ``[H_S, H_T]``; the student is mapped as
        ``student_hidden @ projection``.  Required when ``H_S != H_T``
        (``ValueError`` at trace time otherwise).

    Returns:
      float32 scalar.
    """
    s = _f32(student_hidden)
    t = _f32(teacher_hidden)
    if s.ndim != 3 or t.ndim != 3 or s.shape[:2] != t.shape[:2]:
        raise ValueError(
            f"hidden states must be [B, T, H] with matching B, T; got student "
            f"{s.shape}, teacher {t.shape}")
    if projection is not None:
        p = _f32(projection)
        if p.shape != (s.shape[-1], t.shape[-1]):
            raise ValueError(
                f"projection must be [H_S, H_T]=[{s.shape[-1]}, {t.shape[-1]}]; "
                f"got {p.shape}")
        s = jnp.einsum("bth,hk->btk", s, p,
                       precision=jax.lax.Precision.HIGHEST)
    elif s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"student hidden width {s.shape[-1]} != teacher hidden width "
            f"{t.shape[-1]}; pass projection of shape "
            f"[{s.shape[-1]}, {t.shape[-1]}]")
    w = _token_weights(attention_mask, example_weights)   # [B, T]
    valid = (w > 0)[:, :, None]
    s = jnp.where(valid, s, 0.0)
    t = jnp.where(valid, t, 0.0)
    num = jnp.sum(jnp.square(s - t) * w[:, :, None])
    den = t.shape[-1] * jnp.sum(w)
    return _safe_div(num, den)


def layerwise_attention_mse(student_scores_seq, teacher_scores_seq,
                            layer_map: Sequence[int], attention_mask,
                            example_weights) -> jax.Array:
    """Attention loss over mapped layers, ``L_att`` (eq. 1).

    ``L_att = (1/l) sum_{i=1..l} attention_mse(A_S^i, A_T^{k(i)})`` with
    ``k(i) = layer_map[i-1]`` (Wibowo et al. 2024, eq. 1 with the mapping of
    eq. 5, e.g. ``k = 2i``; TinyBERT, Jiao et al. 2020).

    Args:
      student_scores_seq: sequence of ``l`` arrays ``[B, h_S, T, T]``
        (student layers 1..l).
      teacher_scores_seq: sequence of ``L`` arrays ``[B, h_T, T, T]``
        (teacher layers 1..L).
      layer_map: ``l`` 1-based teacher layer numbers (static Python ints).
      attention_mask: ``[B, T]``.
      example_weights: ``[B]`` float.

    Returns:
      float32 scalar.
    """
    lm = _check_layer_map(layer_map, len(student_scores_seq),
                          len(teacher_scores_seq), "layerwise_attention_mse")
    terms = [attention_mse(student_scores_seq[i], teacher_scores_seq[k - 1],
                           attention_mask, example_weights)
             for i, k in enumerate(lm)]
    return sum(terms) / len(terms)


def layerwise_hidden_mse(student_hidden_seq, teacher_hidden_seq,
                         layer_map: Sequence[int], attention_mask,
                         example_weights, projection=None) -> jax.Array:
    """Hidden-state loss over mapped layers, ``L_hid`` (eq. 2).

    ``L_hid = (1/l) sum_{i=1..l} hidden_mse(H_S^i W, H_T^{k(i)})`` with
    ``k(i) = layer_map[i-1]`` (Wibowo et al. 2024, eq. 2; TinyBERT,
    Jiao et al. 2020).  The sequences hold only transformer-layer outputs
    (index 0 = layer 1); the embedding output is handled separately (eq. 3).
    One shared projection ``W`` is used for all layers, as in TinyBERT.

    Args:
      student_hidden_seq: sequence of ``l`` arrays ``[B, T, H_S]``.
      teacher_hidden_seq: sequence of ``L`` arrays ``[B, T, H_T]``.
      layer_map: ``l`` 1-based teacher layer numbers (static Python ints).
      attention_mask: ``[B, T]``.
      example_weights: ``[B]`` float.
      projection: optional ``[H_S, H_T]`` kernel (required if widths differ).

    Returns:
      float32 scalar.
    """
    lm = _check_layer_map(layer_map, len(student_hidden_seq),
                          len(teacher_hidden_seq), "layerwise_hidden_mse")
    terms = [hidden_mse(student_hidden_seq[i], teacher_hidden_seq[k - 1],
                        attention_mask, example_weights, projection)
             for i, k in enumerate(lm)]
    return sum(terms) / len(terms)


def _check_logits(s, t):
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(
            f"logits must both be [B, C] with equal shapes; got student "
            f"{s.shape}, teacher {t.shape}")


def logits_mse(student_logits, teacher_logits, example_weights) -> jax.Array:
    """Prediction-layer MSE, ``L_pred = MSE(z_S, z_T)`` (eq. 4).

    ``L = sum_{b,c} w_b (z_S[b,c] - z_T[b,c])^2 / (C * sum_b w_b)``
    (Wibowo et al. 2024, eq. 4; the paper prefers MSE over KL following
    Nityasya et al. 2022).

    Args:
      student_logits: ``[B, C]`` float.
      teacher_logits: ``[B, C]`` float.
      example_weights: ``[B]`` float, 0 for padding rows.

    Returns:
      float32 scalar.
    """
    s, t = _f32(student_logits), _f32(teacher_logits)
    _check_logits(s, t)
    w = _f32(example_weights)
    valid = (w > 0)[:, None]
    s = jnp.where(valid, s, 0.0)
    t = jnp.where(valid, t, 0.0)
    num = jnp.sum(jnp.square(s - t) * w[:, None])
    return _safe_div(num, s.shape[-1] * jnp.sum(w))


def logits_kl(student_logits, teacher_logits, example_weights,
              temperature=1.0) -> jax.Array:
    """Soft-target KL, ``T^2 * KL(softmax(z_T/T) || softmax(z_S/T))``.

    ``L = T^2 * sum_b w_b sum_c p_T[b,c] (log p_T[b,c] - log p_S[b,c])
          / sum_b w_b``, ``p = softmax(z / T)`` computed via ``log_softmax``.
    Hinton et al. (2015); also the TinyBERT prediction loss with temperature
    (Jiao et al. 2020, eq. 10, which uses soft cross-entropy = this KL plus the
    teacher entropy, a constant w.r.t. the student).  The ``T^2`` factor keeps
    gradient magnitudes comparable across temperatures; for large ``T`` it
    tends to ``(1/(2C)) * sum_c (zc_S - zc_T)^2`` with ``zc`` the zero-mean
    logits (Hinton et al. 2015, §2.1).

    Args:
      student_logits: ``[B, C]`` float.
      teacher_logits: ``[B, C]`` float.
      example_weights: ``[B]`` float, 0 for padding rows.
      temperature: positive scalar (Python float or traced scalar).

    Returns:
      float32 scalar.
    """
    s, t = _f32(student_logits), _f32(teacher_logits)
    _check_logits(s, t)
    w = _f32(example_weights)
    temp = _f32(temperature)
    valid = (w > 0)[:, None]
    s = jnp.where(valid, s, 0.0)
    t = jnp.where(valid, t, 0.0)
    log_ps = jax.nn.log_softmax(s / temp, axis=-1)
    log_pt = jax.nn.log_softmax(t / temp, axis=-1)
    pt = jnp.exp(log_pt)
    kl = jnp.sum(pt * (log_pt - log_ps), axis=-1)        # [B]
    return jnp.square(temp) * _safe_div(jnp.sum(kl * w), jnp.sum(w))


def cross_entropy(logits, labels, example_weights) -> jax.Array:
    """Classification loss ``L_clf = CE(z_S, GT)`` (Wibowo et al. 2024, §2.1).

    ``L = - sum_b w_b log softmax(z[b])[y_b] / sum_b w_b``.  Labels of padding
    rows (weight 0) may be anything (e.g. -1); they are clipped into range
    and masked out.

    Args:
      logits: ``[B, C]`` float.
      labels: ``[B]`` int class indices.
      example_weights: ``[B]`` float, 0 for padding rows.

    Returns:
      float32 scalar.
    """
    z = _f32(logits)
    if z.ndim != 2:
        raise ValueError(f"logits must be [B, C]; got {z.shape}")
    labels = jnp.asarray(labels)
    if labels.shape != z.shape[:1]:
        raise ValueError(f"labels must be [B]={z.shape[0]}; got {labels.shape}")
    w = _f32(example_weights)
    valid = w > 0
    z = jnp.where(valid[:, None], z, 0.0)
    y = jnp.clip(labels.astype(jnp.int32), 0, z.shape[-1] - 1)
    logp = jax.nn.log_softmax(z, axis=-1)
    nll = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
    nll = jnp.where(valid, nll, 0.0)
    return _safe_div(jnp.sum(nll * w), jnp.sum(w))


# ---------------------------------------------------------------------------
# dispatcher used by the trainer
# ---------------------------------------------------------------------------
def _is_static_zero(v: Any) -> bool:
    """True iff ``v`` is a concrete (non-traced) number equal to 0."""
    if isinstance(v, jax.core.Tracer):
        return False
    try:
        return float(v) == 0.0
    except (TypeError, ValueError):
        return False


def distillation_loss(student_out, teacher_out, batch, *,
                      weights: Mapping[str, float],
                      layer_map: Sequence[int],
                      prediction_loss: str = "mse",
                      temperature=1.0,
                      projections: Optional[Mapping[str, Any]] = None,
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted TinyBERT-style objective ``L_overall = L_KD + L_clf``.

    ``total = w_att L_att + w_hid L_hid + w_embd L_embd + w_pred L_pred
              + w_clf L_clf`` (Wibowo et al. 2024, §2.1: eqs. 1-4, ``L_KD`` and
    ``L_overall``; with all KD weights 1 and ``w_clf = 1`` this is exactly the
    paper's objective).  Terms:

    * ``att``: :func:`layerwise_attention_mse` on ``attention_scores`` (eq. 1).
    * ``hid``: :func:`layerwise_hidden_mse` on ``hidden_states`` (eq. 2),
      projection ``projections["hid"]``.
    * ``embd``: :func:`hidden_mse` on ``embeddings`` (eq. 3), projection
      ``projections["embd"]``.
    * ``pred``: :func:`logits_mse` (eq. 4) if ``prediction_loss == "mse"`` or
      :func:`logits_kl` with ``temperature`` if ``"kl"`` (Hinton et al. 2015).
    * ``clf``: :func:`cross_entropy` against ``batch["labels"]``.

    A term whose weight is absent or a concrete 0 is not computed at all, so
    the model need not return the corresponding intermediates (and
    ``teacher_out`` may be ``None`` when only ``clf`` is weighted: the NON-KD
    baseline).  Weights may be traced scalars; those are always computed.

    Args:
      student_out, teacher_out: objects with attributes ``logits [B, C]``,
        ``embeddings [B, T, H]``, ``hidden_states`` (tuple of ``[B, T, H]``,
        layers 1..L) and ``attention_scores`` (tuple of ``[B, h, T, T]``,
        layers 1..L, pre-softmax, unmasked).
      batch: mapping with ``attention_mask [B, T]``, ``labels [B]`` (needed for
        ``clf``) and ``example_mask [B]`` (example weights; all ones if
        absent).
      weights: mapping from term names in ``DISTILL_TERMS`` to floats.
      layer_map: 1-based teacher layer per student layer (static).
      prediction_loss: ``"mse"`` or ``"kl"``.
      temperature: KL temperature (only used for ``"kl"``).
      projections: optional ``{"hid": [H_S, H_T], "embd": [H_S, H_T]}``.

    Returns:
      ``(total, terms)`` where ``total`` is a float32 scalar and ``terms`` is
      ``{"loss": total, <term>: unweighted value, ...}`` for computed terms.

    Raises:
      ValueError: unknown term name or prediction_loss, no non-zero weight,
        ``teacher_out is None`` with a KD term weighted, bad ``layer_map``, or
        hidden-width mismatch without a projection.
    """
    unknown = sorted(set(weights) - set(DISTILL_TERMS))
    if unknown:
        raise ValueError(
            f"unknown loss term(s) {unknown}; valid terms are {list(DISTILL_TERMS)}")
    if prediction_loss not in PREDICTION_LOSSES:
        raise ValueError(
            f"unknown prediction_loss {prediction_loss!r}; valid values are "
            f"{list(PREDICTION_LOSSES)}")
    projections = dict(projections or {})
    bad_proj = sorted(set(projections) - {"hid", "embd"})
    if bad_proj:
        raise ValueError(
            f"unknown projection key(s) {bad_proj}; valid keys are ['hid', 'embd']")

    active = [(name, weights[name]) for name in DISTILL_TERMS
              if name in weights and not _is_static_zero(weights[name])]
    if not active:
        raise ValueError(
            f"no loss term has a non-zero weight (weights={dict(weights)})")
    kd_active = [n for n, _ in active if n != "clf"]
    if teacher_out is None and kd_active:
        raise ValueError(
            f"teacher_out is None but distillation term(s) {kd_active} have "
            f"non-zero weight; only 'clf' can be used without a teacher")

    logits = student_out.logits
    if "example_mask" in batch:
        ex_w = batch["example_mask"]
    else:
        ex_w = jnp.ones((jnp.shape(logits)[0],), jnp.float32)
    attn_mask = batch.get("attention_mask")  # only needed by att/hid/embd

    terms: dict[str, jax.Array] = {}
    for name, _ in active:
        if name == "att":
            terms[name] = layerwise_attention_mse(
                student_out.attention_scores, teacher_out.attention_scores,
                layer_map, attn_mask, ex_w)
        elif name == "hid":
            terms[name] = layerwise_hidden_mse(
                student_out.hidden_states, teacher_out.hidden_states,
                layer_map, attn_mask, ex_w, projections.get("hid"))
        elif name == "embd":
            terms[name] = hidden_mse(
                student_out.embeddings, teacher_out.embeddings, attn_mask,
                ex_w, projections.get("embd"))
        elif name == "pred":
            if prediction_loss == "mse":
                terms[name] = logits_mse(logits, teacher_out.logits, ex_w)
            else:
                terms[name] = logits_kl(logits, teacher_out.logits, ex_w,
                                        temperature)
        elif name == "clf":
            terms[name] = cross_entropy(logits, batch["labels"], ex_w)

    total = jnp.zeros((), jnp.float32)
    for name, w in active:
        total = total + _f32(w) * terms[name]
    return total, {"loss": total, **terms}
