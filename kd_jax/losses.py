"""Distillation and classification losses (pure ``jax.numpy`` / ``jax.lax``).

Implements the TinyBERT-style objective used by "The Privileged Students"
(Wibowo et al., 2024, §2.1, eqs. 1-4), following TinyBERT (Jiao et al., 2020),
plus the classical soft-target KL / soft cross-entropy of Hinton et al. (2015),
PKD's normalised [CLS] loss (Sun et al., 2019), DistilBERT's cosine loss
(Sanh et al., 2019), attention-distribution KL (Aguilar et al., 2020) and
MiniLM's attention + value-relation KL (Wang et al., 2020), and the supervised
cross-entropy ``L_clf``.

The terms :func:`distillation_loss` combines are registered in ``TERMS``
(name -> :class:`Term`: the function, the model outputs it reads and its
flags); the term tuples (``DISTILL_TERMS``, ``GENERAL_TERMS``, ...) and
:func:`outputs_needed` are derived from it.

Conventions
-----------
``B`` batch, ``T`` tokens, ``H`` hidden width, ``h`` attention heads,
``C`` classes, ``L`` number of transformer layers.

* ``attention_mask``: ``[B, T]`` int/float/bool, 1 for real tokens, 0 for padding.
* ``example_weights``: ``[B]`` float, 1 for a real example and 0 for a padding
  row that only exists to keep batch shapes static.
* ``layer_map``: one entry per student layer, the 1-based teacher layer it
  learns from, or ``None`` for an unmapped student layer (e.g. the "last"
  strategy of :func:`kd_jax.student_init.layer_map_for`); layer-wise losses
  average over the mapped layers only.

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

import dataclasses
import numbers
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Term",
    "TermInputs",
    "TERMS",
    "DISTILL_TERMS",
    "SUPERVISED_TERMS",
    "MLM_TERMS",
    "INTERMEDIATE_TERMS",
    "GENERAL_TERMS",
    "LAYERWISE_TERMS",
    "PROJECTION_KEYS",
    "PREDICTION_LOSSES",
    "select_heads",
    "attention_mse",
    "hidden_mse",
    "layerwise_attention_mse",
    "layerwise_hidden_mse",
    "logits_mse",
    "logits_kl",
    "soft_cross_entropy",
    "cls_pkd",
    "layerwise_cls_pkd",
    "hidden_cosine",
    "attention_kl",
    "layerwise_attention_kl",
    "value_relation_kl",
    "minilm_loss",
    "cross_entropy",
    "token_cross_entropy",
    "mlm_cross_entropy",
    "mlm_kl",
    "mlm_mse",
    "mean_teacher_logits",
    "apply_alpha",
    "outputs_needed",
    "distillation_loss",
]

# The term tuples (DISTILL_TERMS, SUPERVISED_TERMS, MLM_TERMS, INTERMEDIATE_TERMS,
# GENERAL_TERMS, LAYERWISE_TERMS, PROJECTION_KEYS) are derived from the registry
# ``TERMS`` below, after the loss functions its entries call.

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


def _check_layer_map(layer_map: Sequence[Optional[int]], num_student: int,
                     num_teacher: int, what: str) -> list[tuple[int, int]]:
  """Validated ``[(student index 0-based, teacher layer 1-based), ...]``.

  ``None`` entries (unmapped student layers) are skipped; at least one entry
  must be mapped.
  """
  layer_map = list(layer_map)
  if len(layer_map) != num_student:
    raise ValueError(
        f"{what}: len(layer_map)={len(layer_map)} (layer_map={layer_map}) "
        f"must equal the number of student layers ({num_student})")
  out = []
  for i, k in enumerate(layer_map, start=1):
    if k is None:
      continue
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
      raise ValueError(
          f"{what}: layer_map entries must be ints (1-based teacher layers) "
          f"or None; entry for student layer {i} is {k!r} (layer_map={layer_map})")
    if not 1 <= int(k) <= num_teacher:
      raise ValueError(
          f"{what}: layer_map[{i - 1}]={k} (student layer {i}) is out of "
          f"range 1..{num_teacher} teacher layers (layer_map={layer_map})")
    out.append((i - 1, int(k)))
  if not out:
    raise ValueError(f"{what}: layer_map={layer_map} maps no student layer")
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
                            layer_map: Sequence[Optional[int]], attention_mask,
                            example_weights) -> jax.Array:
  """Attention loss over mapped layers, ``L_att`` (eq. 1).

  ``L_att = (1/l) sum_{i=1..l} attention_mse(A_S^i, A_T^{k(i)})`` with
  ``k(i) = layer_map[i-1]``, ``l`` the number of mapped (non-None) entries
  (Wibowo et al. 2024, eq. 1 with the mapping of
  eq. 5, e.g. ``k = 2i``; TinyBERT, Jiao et al. 2020).

  Args:
    student_scores_seq: sequence of ``l`` arrays ``[B, h_S, T, T]``
      (student layers 1..l).
    teacher_scores_seq: sequence of ``L`` arrays ``[B, h_T, T, T]``
      (teacher layers 1..L).
    layer_map: one 1-based teacher layer (static Python int) or None per
      student layer.
    attention_mask: ``[B, T]``.
    example_weights: ``[B]`` float.

  Returns:
    float32 scalar.
  """
  lm = _check_layer_map(layer_map, len(student_scores_seq),
                        len(teacher_scores_seq), "layerwise_attention_mse")
  terms = [attention_mse(student_scores_seq[i], teacher_scores_seq[k - 1],
                         attention_mask, example_weights)
           for i, k in lm]
  return sum(terms) / len(terms)


def layerwise_hidden_mse(student_hidden_seq, teacher_hidden_seq,
                         layer_map: Sequence[Optional[int]], attention_mask,
                         example_weights, projection=None) -> jax.Array:
  """Hidden-state loss over mapped layers, ``L_hid`` (eq. 2).

  ``L_hid = (1/l) sum_{i=1..l} hidden_mse(H_S^i W, H_T^{k(i)})`` with
  ``k(i) = layer_map[i-1]``, ``l`` the number of mapped (non-None) entries
  (Wibowo et al. 2024, eq. 2; TinyBERT,
  Jiao et al. 2020).  The sequences hold only transformer-layer outputs
  (index 0 = layer 1); the embedding output is handled separately (eq. 3).
  One shared projection ``W`` is used for all layers, as in TinyBERT.

  Args:
    student_hidden_seq: sequence of ``l`` arrays ``[B, T, H_S]``.
    teacher_hidden_seq: sequence of ``L`` arrays ``[B, T, H_T]``.
    layer_map: one 1-based teacher layer (static Python int) or None per
      student layer.
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
           for i, k in lm]
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


def _tempered_log_probs(student_logits, teacher_logits, example_weights, temperature):
  """log softmax(z/T) of student and teacher [B, C] (padding rows zeroed first, so
  NaN there cannot leak), example weights [B] and T, all float32."""
  s, t = _f32(student_logits), _f32(teacher_logits)
  _check_logits(s, t)
  w = _f32(example_weights)
  temp = _f32(temperature)
  valid = (w > 0)[:, None]
  s = jnp.where(valid, s, 0.0)
  t = jnp.where(valid, t, 0.0)
  return (jax.nn.log_softmax(s / temp, axis=-1), jax.nn.log_softmax(t / temp, axis=-1),
          w, temp)


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
  log_ps, log_pt, w, temp = _tempered_log_probs(student_logits, teacher_logits,
                                                example_weights, temperature)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)        # [B]
  return jnp.square(temp) * _safe_div(jnp.sum(kl * w), jnp.sum(w))


def soft_cross_entropy(student_logits, teacher_logits, example_weights,
                       temperature=1.0) -> jax.Array:
  """Soft-target cross-entropy (Hinton et al. 2015), scaled by ``T^2``.

  ``L = -T^2 * sum_b w_b sum_c p_T[b,c] log p_S[b,c] / sum_b w_b`` with
  ``p_T = softmax(z_T / T)``, ``p_S = softmax(z_S / T)`` (survey "Knowledge
  Distillation for Multilingual Transformers", Hinton loss ``L_H``; the
  DistilBERT / PKD soft-label loss; TinyBERT eq. 10).  It equals
  :func:`logits_kl` plus ``T^2`` times the teacher entropy (a constant w.r.t.
  the student, so gradients are identical; the value is not 0 at the optimum).

  Args:
    student_logits: ``[B, C]`` float.
    teacher_logits: ``[B, C]`` float.
    example_weights: ``[B]`` float, 0 for padding rows.
    temperature: positive scalar (Python float or traced scalar).

  Returns:
    float32 scalar.
  """
  log_ps, log_pt, w, temp = _tempered_log_probs(student_logits, teacher_logits,
                                                example_weights, temperature)
  ce = -jnp.sum(jnp.exp(log_pt) * log_ps, axis=-1)                  # [B]
  return jnp.square(temp) * _safe_div(jnp.sum(ce * w), jnp.sum(w))


_NORM_EPS = 1e-12


def _l2_normalize(x: jax.Array) -> jax.Array:
  """``x / max(||x||_2, eps)`` along the last axis (NaN-free gradient at 0)."""
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS ** 2))


def _project(s: jax.Array, t_width: int, projection, what: str) -> jax.Array:
  """``s @ projection`` (``[..., H_S] -> [..., H_T]``); requires it iff widths differ."""
  if projection is not None:
    p = _f32(projection)
    if p.shape != (s.shape[-1], t_width):
      raise ValueError(
          f"{what}: projection must be [H_S, H_T]=[{s.shape[-1]}, {t_width}]; "
          f"got {p.shape}")
    return jnp.einsum("...h,hk->...k", s, p, precision=jax.lax.Precision.HIGHEST)
  if s.shape[-1] != t_width:
    raise ValueError(
        f"{what}: student hidden width {s.shape[-1]} != teacher hidden width "
        f"{t_width}; pass projection of shape [{s.shape[-1]}, {t_width}]")
  return s


def cls_pkd(student_hidden, teacher_hidden, example_weights,
            projection=None) -> jax.Array:
  """PKD loss for one layer pair: distance of L2-normalised ``[CLS]`` states.

  ``L = sum_b w_b || c_S[b] / ||c_S[b]|| - c_T[b] / ||c_T[b]|| ||_2^2 / sum_b w_b``
  with ``c = H[:, 0]`` the ``[CLS]`` (first-token) hidden state, ``c_S``
  projected by ``projection`` first when given.  Patient KD, Sun et al. 2019,
  eq. 5 (``L_PT``; survey eq. 6 ``L_MSECLS``); per example it is the squared
  Euclidean distance summed over hidden units (not averaged), in ``[0, 4]``
  and equal to ``2 - 2 cos(c_S, c_T)``.

  Args:
    student_hidden: ``[B, T, H_S]`` float.
    teacher_hidden: ``[B, T, H_T]`` float.
    example_weights: ``[B]`` float, 0 for padding rows.
    projection: optional ``[H_S, H_T]`` kernel (required if widths differ).

  Returns:
    float32 scalar.
  """
  s, t = _f32(student_hidden), _f32(teacher_hidden)
  if s.ndim != 3 or t.ndim != 3 or s.shape[:2] != t.shape[:2]:
    raise ValueError(
        f"hidden states must be [B, T, H] with matching B, T; got student "
        f"{s.shape}, teacher {t.shape}")
  w = _f32(example_weights)
  valid = (w > 0)[:, None]
  cs = jnp.where(valid, s[:, 0], 0.0)
  ct = jnp.where(valid, t[:, 0], 0.0)
  cs = _project(cs, ct.shape[-1], projection, "cls_pkd")
  d = jnp.sum(jnp.square(_l2_normalize(cs) - _l2_normalize(ct)), axis=-1)  # [B]
  return _safe_div(jnp.sum(d * w), jnp.sum(w))


def layerwise_cls_pkd(student_hidden_seq, teacher_hidden_seq,
                      layer_map: Sequence[Optional[int]], example_weights,
                      projection=None) -> jax.Array:
  """PKD over mapped layers: ``(1/l) sum_i cls_pkd(H_S^i, H_T^{k(i)})``.

  Sun et al. 2019 sum over layers; we average (like ``L_att``/``L_hid``) so
  the weight does not depend on the number of mapped layers.  PKD-Skip is the
  "uniform" map, PKD-Last the "top" map of
  :func:`kd_jax.student_init.layer_map_for` (PKD leaves the last layer to the
  prediction loss; here it is included whenever the map includes it).

  Args:
    student_hidden_seq: ``l`` arrays ``[B, T, H_S]`` (layers 1..l).
    teacher_hidden_seq: ``L`` arrays ``[B, T, H_T]`` (layers 1..L).
    layer_map: one 1-based teacher layer or None per student layer (static).
    example_weights: ``[B]`` float.
    projection: optional ``[H_S, H_T]`` kernel shared by all layers.

  Returns:
    float32 scalar.
  """
  lm = _check_layer_map(layer_map, len(student_hidden_seq),
                        len(teacher_hidden_seq), "layerwise_cls_pkd")
  terms = [cls_pkd(student_hidden_seq[i], teacher_hidden_seq[k - 1],
                   example_weights, projection) for i, k in lm]
  return sum(terms) / len(terms)


def hidden_cosine(student_hidden, teacher_hidden, attention_mask,
                  example_weights, projection=None) -> jax.Array:
  """Cosine embedding loss on hidden states (DistilBERT, Sanh et al. 2019).

  ``L = sum_{b,t} w_b m_bt (1 - cos(H_S[b,t] W, H_T[b,t])) / sum_{b,t} w_b m_bt``

  i.e. the mean over real tokens of real examples of one minus the cosine
  similarity of the token vectors (survey eq. 8 ``L_COShidn``; DistilBERT's
  ``L_cos`` with target 1, as ``torch.nn.CosineEmbeddingLoss``).  Norms are
  clamped at ``1e-12`` so a zero vector gives cos 0 and a finite gradient.

  Args:
    student_hidden: ``[B, T, H_S]`` float.
    teacher_hidden: ``[B, T, H_T]`` float.
    attention_mask: ``[B, T]``, 1 for real tokens.
    example_weights: ``[B]`` float, 0 for padding rows.
    projection: optional ``[H_S, H_T]`` kernel (required if widths differ).

  Returns:
    float32 scalar in ``[0, 2]``.
  """
  s, t = _f32(student_hidden), _f32(teacher_hidden)
  if s.ndim != 3 or t.ndim != 3 or s.shape[:2] != t.shape[:2]:
    raise ValueError(
        f"hidden states must be [B, T, H] with matching B, T; got student "
        f"{s.shape}, teacher {t.shape}")
  w = _token_weights(attention_mask, example_weights)   # [B, T]
  valid = (w > 0)[:, :, None]
  s = jnp.where(valid, s, 0.0)
  t = jnp.where(valid, t, 0.0)
  s = _project(s, t.shape[-1], projection, "hidden_cosine")
  cos = jnp.sum(_l2_normalize(s) * _l2_normalize(t), axis=-1)  # [B, T]
  return _safe_div(jnp.sum((1.0 - cos) * w), jnp.sum(w))


_MASKED_LOGIT = -1e9


def _match_heads(s: jax.Array, t: jax.Array, axis: int) -> jax.Array:
  """Teacher heads paired with the student's (:func:`select_heads`) along ``axis``."""
  h_s, h_t = s.shape[axis], t.shape[axis]
  if h_s == h_t:
    return t
  return jnp.take(t, jnp.asarray(select_heads(h_t, h_s)), axis=axis)


def attention_kl(student_scores, teacher_scores, attention_mask,
                 example_weights) -> jax.Array:
  """KL between attention distributions of one layer, from pre-softmax scores.

  ``P = softmax_k(A[b, j, q, k] restricted to real keys k)`` for student and
  teacher (padded keys get probability 0; the model's scores are unmasked,
  so the mask is applied here), then

  ``L = sum_{b,j,q} w_b m_bq KL(P_T[b,s(j),q,:] || P_S[b,j,q,:])
        / (h_S * sum_{b,q} w_b m_bq)``

  i.e. the mean over student heads and real query tokens of real examples of
  the row-wise KL (SID, Aguilar et al. 2020, ``L_KLAtt``; MiniLM, Wang et al.
  2020, eq. 5 ``L_AT``).  ``s = select_heads(h_T, h_S)`` pairs heads when the
  counts differ.  Masked keys are replaced with ``jnp.where`` before the
  softmax, so ``-inf``/NaN there cannot leak into the value or gradient.

  Args:
    student_scores: ``[B, h_S, T, T]`` float, pre-softmax ``QK^T/sqrt(d_k)``.
    teacher_scores: ``[B, h_T, T, T]`` float.
    attention_mask: ``[B, T]``, 1 for real tokens.
    example_weights: ``[B]`` float, 0 for padding rows.

  Returns:
    float32 scalar.
  """
  s, t = _f32(student_scores), _f32(teacher_scores)
  if s.ndim != 4 or t.ndim != 4:
    raise ValueError(
        f"attention scores must be [B, h, T, T]; got student {s.shape}, "
        f"teacher {t.shape}")
  if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
    raise ValueError(
        f"student/teacher attention scores disagree on B/T: student "
        f"{s.shape}, teacher {t.shape}")
  t = _match_heads(s, t, axis=1)
  mask = _f32(attention_mask)
  q_w = _token_weights(mask, example_weights)          # [B, Tq]
  key_valid = (mask > 0)[:, None, None, :]             # [B, 1, 1, Tk]
  s = jnp.where(key_valid, s, _MASKED_LOGIT)
  t = jnp.where(key_valid, t, _MASKED_LOGIT)
  log_ps = jax.nn.log_softmax(s, axis=-1)
  log_pt = jax.nn.log_softmax(t, axis=-1)
  kl = jnp.where(key_valid, jnp.exp(log_pt) * (log_pt - log_ps), 0.0)
  kl = jnp.sum(kl, axis=-1)                            # [B, h, Tq]
  kl = jnp.where((q_w > 0)[:, None, :], kl, 0.0)
  num = jnp.sum(kl * q_w[:, None, :])
  return _safe_div(num, s.shape[1] * jnp.sum(q_w))


def layerwise_attention_kl(student_scores_seq, teacher_scores_seq,
                           layer_map: Sequence[Optional[int]], attention_mask,
                           example_weights) -> jax.Array:
  """``(1/l) sum_i attention_kl(A_S^i, A_T^{k(i)})`` over mapped layers.

  Args:
    student_scores_seq: ``l`` arrays ``[B, h_S, T, T]`` (pre-softmax, unmasked).
    teacher_scores_seq: ``L`` arrays ``[B, h_T, T, T]``.
    layer_map: one 1-based teacher layer or None per student layer (static).
    attention_mask: ``[B, T]``.
    example_weights: ``[B]`` float.

  Returns:
    float32 scalar.
  """
  lm = _check_layer_map(layer_map, len(student_scores_seq),
                        len(teacher_scores_seq), "layerwise_attention_kl")
  terms = [attention_kl(student_scores_seq[i], teacher_scores_seq[k - 1],
                        attention_mask, example_weights) for i, k in lm]
  return sum(terms) / len(terms)


def _value_relation_scores(v: jax.Array) -> jax.Array:
  """``[B, T, h, d] -> [B, h, T, T]``: ``V V^T / sqrt(d)`` per head."""
  return jnp.einsum("bqhd,bkhd->bhqk", v, v,
                    precision=jax.lax.Precision.HIGHEST) / jnp.sqrt(
                        jnp.float32(v.shape[-1]))


def value_relation_kl(student_values, teacher_values, attention_mask,
                      example_weights) -> jax.Array:
  """MiniLM value-relation transfer for one layer (Wang et al. 2020, eq. 6-7).

  ``VR = softmax(V V^T / sqrt(d_k))`` per head (``d_k`` each model's own head
  size, so student and teacher widths may differ), masked to real keys, and
  ``L_VR = mean_{heads, real queries} KL(VR_T || VR_S)`` exactly as
  :func:`attention_kl` applied to the relation scores (heads paired by
  :func:`select_heads` when the counts differ; MiniLM itself assumes equal
  counts).

  Args:
    student_values: ``[B, T, h_S, d_S]`` value projections of the layer.
    teacher_values: ``[B, T, h_T, d_T]``.
    attention_mask: ``[B, T]``, 1 for real tokens.
    example_weights: ``[B]`` float, 0 for padding rows.

  Returns:
    float32 scalar.
  """
  vs, vt = _f32(student_values), _f32(teacher_values)
  if vs.ndim != 4 or vt.ndim != 4 or vs.shape[:2] != vt.shape[:2]:
    raise ValueError(
        f"values must be [B, T, h, d] with matching B, T; got student "
        f"{vs.shape}, teacher {vt.shape}")
  return attention_kl(_value_relation_scores(vs), _value_relation_scores(vt),
                      attention_mask, example_weights)


def minilm_loss(student_scores, teacher_scores, student_values, teacher_values,
                attention_mask, example_weights) -> jax.Array:
  """MiniLM deep self-attention distillation: ``L = L_AT + L_VR`` (Wang et al. 2020, eq. 8).

  Both on the *last* transformer layer of student and teacher:
  ``L_AT = attention_kl(A_S^M, A_T^N)`` and
  ``L_VR = value_relation_kl(V_S^M, V_T^N)``.

  Args:
    student_scores: ``[B, h_S, T, T]`` pre-softmax scores of the student's last layer.
    teacher_scores: ``[B, h_T, T, T]`` of the teacher's last layer.
    student_values: ``[B, T, h_S, d_S]`` value projections of the student's last layer.
    teacher_values: ``[B, T, h_T, d_T]`` of the teacher's last layer.
    attention_mask: ``[B, T]``.
    example_weights: ``[B]`` float.

  Returns:
    float32 scalar.
  """
  return (attention_kl(student_scores, teacher_scores, attention_mask, example_weights)
          + value_relation_kl(student_values, teacher_values, attention_mask,
                              example_weights))


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
  return _weighted_nll(z, labels, _f32(example_weights))


def token_cross_entropy(logits, labels, ignore_index: int = -100) -> jax.Array:
  """Token-classification loss (HF ``*ForTokenClassification``, e.g. NER / POS).

  ``L = - sum_{b,t: y_bt != ignore} log softmax(z[b,t])[y_bt] / #{b,t: y_bt != ignore}``,
  the mean over labelled tokens, as ``torch.nn.CrossEntropyLoss(ignore_index=-100)``
  on the flattened logits.  Tokens labelled ``ignore_index`` (padding, special
  tokens, non-first sub-words) are removed with ``jnp.where`` first, so their
  logits may be anything; no labelled token at all gives 0, not NaN.

  Args:
    logits: ``[B, T, C]`` float (the Encoder's head "token" logits).
    labels: ``[B, T]`` int class indices in ``[0, C)``, or ``ignore_index``.
    ignore_index: label value that contributes nothing (HF's -100).

  Returns:
    float32 scalar.

  Raises:
    ValueError: logits not 3-D or labels not ``[B, T]``.
  """
  z = _f32(logits)
  if z.ndim != 3:
    raise ValueError(f"token logits must be [B, T, C]; got {z.shape}")
  labels = jnp.asarray(labels)
  if labels.shape != z.shape[:2]:
    raise ValueError(f"token labels must be [B, T]={z.shape[:2]}; got {labels.shape}")
  return _weighted_nll(z, labels, (labels != ignore_index).astype(jnp.float32))


def _weighted_nll(z, labels, w) -> jax.Array:
  """sum w * (-log softmax(z)[label]) / sum w over [..., V] logits and [...] labels /
  weights; slots with w == 0 are removed with jnp.where first (any logits, any label)."""
  valid = w > 0
  z = jnp.where(valid[..., None], z, 0.0)
  y = jnp.clip(labels.astype(jnp.int32), 0, z.shape[-1] - 1)
  logp = jax.nn.log_softmax(z, axis=-1)
  nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
  nll = jnp.where(valid, nll, 0.0)
  return _safe_div(jnp.sum(nll * w), jnp.sum(w))


# ---------------------------------------------------------------------------
# masked language modelling (general distillation)
# ---------------------------------------------------------------------------
def _check_mlm(what: str, logits, weights, teacher_logits=None):
  """float32 ``[B, P, V]`` logits (and teacher's) and ``[B, P]`` weights, or ValueError."""
  z = _f32(logits)
  w = _f32(weights)
  if z.ndim != 3 or w.shape != z.shape[:2]:
    raise ValueError(
        f"{what}: MLM logits must be [B, P, V] and mlm_weights [B, P]; got logits "
        f"{z.shape}, mlm_weights {w.shape}")
  if teacher_logits is None:
    return z, w, None
  t = _f32(teacher_logits)
  if t.shape != z.shape:
    raise ValueError(
        f"{what}: teacher MLM logits {t.shape} must match the student's {z.shape} "
        f"(same tokenizer / vocabulary and masked_positions)")
  return z, w, t


def mlm_cross_entropy(logits, labels, weights) -> jax.Array:
  """Masked-LM loss: cross-entropy at masked positions only (BERT, Devlin et al. 2019).

  ``L = - sum_{b,p} w_bp log softmax(z[b,p])[y_bp] / sum_{b,p} w_bp``.
  Slots with weight 0 (padding slots of ``masked_positions``, padding rows) are
  removed with ``jnp.where`` first; their labels may be anything.

  Args:
    logits: ``[B, P, V]`` float, the MLM head's logits at ``masked_positions``.
    labels: ``[B, P]`` int, the original token ids there.
    weights: ``[B, P]`` float ``mlm_weights`` (1 = a masked token, 0 = padding slot).

  Returns:
    float32 scalar.
  """
  z, w, _ = _check_mlm("mlm", logits, weights)
  labels = jnp.asarray(labels)
  if labels.shape != w.shape:
    raise ValueError(f"mlm: mlm_labels must be [B, P]={w.shape}; got {labels.shape}")
  return _weighted_nll(z, labels, w)


def mlm_kl(student_logits, teacher_logits, weights, temperature=1.0) -> jax.Array:
  """Soft-target KL on MLM logits at masked positions, scaled by ``T^2``.

  ``L = T^2 sum_{b,p} w_bp KL(softmax(z_T[b,p]/T) || softmax(z_S[b,p]/T)) / sum w``
  (Hinton et al. 2015 applied per masked token, as DistilBERT's ``L_ce`` over the
  vocabulary, Sanh et al. 2019; :func:`logits_kl` with slots in place of examples).

  Args:
    student_logits: ``[B, P, V]`` float.
    teacher_logits: ``[B, P, V]`` float (a teacher with an MLM head, same positions).
    weights: ``[B, P]`` float ``mlm_weights``.
    temperature: positive scalar.

  Returns:
    float32 scalar.
  """
  s, w, t = _check_mlm("mlm_kl", student_logits, weights, teacher_logits)
  valid = (w > 0)[..., None]
  temp = _f32(temperature)
  log_ps = jax.nn.log_softmax(jnp.where(valid, s, 0.0) / temp, axis=-1)
  log_pt = jax.nn.log_softmax(jnp.where(valid, t, 0.0) / temp, axis=-1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)        # [B, P]
  return jnp.square(temp) * _safe_div(jnp.sum(kl * w), jnp.sum(w))


def mlm_mse(student_logits, teacher_logits, weights) -> jax.Array:
  """MSE of MLM logits at masked positions (:func:`logits_mse` per masked token).

  ``L = sum_{b,p,v} w_bp (z_S[b,p,v] - z_T[b,p,v])^2 / (V sum_{b,p} w_bp)``.

  Args:
    student_logits: ``[B, P, V]`` float.
    teacher_logits: ``[B, P, V]`` float.
    weights: ``[B, P]`` float ``mlm_weights``.

  Returns:
    float32 scalar.
  """
  s, w, t = _check_mlm("mlm_mse", student_logits, weights, teacher_logits)
  valid = (w > 0)[..., None]
  s = jnp.where(valid, s, 0.0)
  t = jnp.where(valid, t, 0.0)
  num = jnp.sum(jnp.square(s - t) * w[..., None])
  return _safe_div(num, s.shape[-1] * jnp.sum(w))


def mean_teacher_logits(teacher_logits: Sequence[Any]) -> jax.Array:
  """Prediction target of several teachers: the mean of their logits.

  ``z_T = (1/K) sum_k z_T^(k)`` (TextBrewer's ``MultiTeacherDistiller`` and
  big_vision's ensemble distillation average the teachers' logits). Every loss on
  logits (``pred``, ``soft_ce``, ``mlm_kl``, ``mlm_mse``) then treats ``z_T`` as
  one teacher. Terms on intermediate representations (``INTERMEDIATE_TERMS``)
  have no such target: teachers' hidden states, attention and values live in
  unrelated bases (and may differ in width, depth and heads), so their mean is
  not a representation of any model.

  Args:
    teacher_logits: K >= 1 arrays of one shape (``[B, C]`` or ``[B, P, V]``).

  Returns:
    float32 array of that shape.

  Raises:
    ValueError: no teachers, a teacher without logits, or different shapes.
  """
  zs = list(teacher_logits)
  if not zs or any(z is None for z in zs):
    raise ValueError("mean_teacher_logits needs >= 1 teacher, each with logits "
                     "(a teacher without a head has none)")
  shapes = {tuple(jnp.shape(z)) for z in zs}
  if len(shapes) != 1:
    raise ValueError(f"teachers' logits differ in shape: {sorted(shapes)}")
  return sum(_f32(z) for z in zs) / len(zs)


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


def _last_hidden(out) -> jax.Array:
  h = getattr(out, "last_hidden_state", None)
  return h if h is not None else out.hidden_states[-1]


def apply_alpha(weights: Mapping[str, Any], alpha) -> dict[str, Any]:
  """Effective weights of the α-weighted objective.

  ``alpha`` None or a concrete negative number: ``weights`` unchanged.
  Otherwise ``total = α L_clf + (1 - α) sum_{k != clf} w_k L_k``: the returned
  weights are ``{clf: α, k: (1 - α) w_k}`` and ``weights["clf"]`` is ignored
  (experiment plan, "Experiment 3: varying loss weights": higher α means
  less distillation; α = 0.2 was best there; DistilBERT's convex combination
  in the survey is the same idea).

  Raises:
    ValueError: a concrete ``alpha > 1``.
  """
  if alpha is None:
    return dict(weights)
  if not isinstance(alpha, jax.core.Tracer):
    if float(alpha) < 0:
      return dict(weights)
    if float(alpha) > 1:
      raise ValueError(f"alpha={alpha} must be in [0, 1] (or negative: off)")
    alpha = float(alpha)
  out = {k: (1.0 - alpha) * v for k, v in weights.items() if k != "clf"}
  out["clf"] = alpha
  return out


# ---------------------------------------------------------------------------
# the loss-term registry
# ---------------------------------------------------------------------------
# Model outputs a term may read (attributes of the encoder's output).
_OUTPUT_NAMES = ("logits", "embeddings", "hidden_states", "attention_scores", "values",
                "last_hidden_state")
# Outputs that are intermediate representations (not logits): terms reading any of
# them are INTERMEDIATE_TERMS.
_INTERMEDIATE_OUTPUTS = ("embeddings", "hidden_states", "attention_scores", "values",
                         "last_hidden_state")
_ATTENTION_LAYERS = (None, "mapped", "last")


@dataclasses.dataclass(frozen=True)
class TermInputs:
  """What a term's ``fn`` gets from :func:`distillation_loss`.

  Attributes:
    student_out, teacher_out: the models' outputs (``teacher_out`` None only
      when no term that ``needs_teacher`` is active).
    batch: the batch mapping.
    layer_map: the static loss layer map (1-based teacher layer or None per
      student layer).
    attention_mask: ``batch["attention_mask"]`` ``[B, T]`` (None if absent).
    example_weights: ``[B]`` (``batch["example_mask"]``, else ones).
    mlm_weights: ``[B, P]`` ``batch["mlm_weights"]`` times the example weight,
      None unless an ``mlm`` term is active.
    projection: ``projections[name]`` for a term with ``projection=True``
      (None if not given or the term has none).
    prediction_loss: ``"mse"`` or ``"kl"`` (``pred``).
    temperature: softmax temperature (``pred`` with ``"kl"``, ``soft_ce``,
      ``mlm_kl``).
  """
  student_out: Any
  teacher_out: Any
  batch: Mapping[str, Any]
  layer_map: Sequence[Optional[int]]
  attention_mask: Any
  example_weights: Any
  mlm_weights: Any = None
  projection: Any = None
  prediction_loss: str = "mse"
  temperature: Any = 1.0


@dataclasses.dataclass(frozen=True)
class Term:
  """One loss term of :func:`distillation_loss` (an entry of ``TERMS``).

  Attributes:
    fn: ``TermInputs -> float32 scalar``, the unweighted term.
    reads: model outputs it reads, among ``logits``, ``embeddings``,
      ``hidden_states``, ``attention_scores``, ``values``, ``last_hidden_state``; drives
      :func:`outputs_needed` and ``INTERMEDIATE_TERMS`` / ``GENERAL_TERMS``.
    needs_teacher: False for a supervised term (``SUPERVISED_TERMS``).
    layerwise: uses the ``layer_map`` (``LAYERWISE_TERMS``).
    projection: has a learnable ``[H_S, H_T]`` projection named after the term
      (``PROJECTION_KEYS``).
    mlm: on masked-LM logits ``[B, P, V]`` (``MLM_TERMS``; gets ``mlm_weights``).
    attention_layers: the layers whose ``attention_scores`` it reads:
      ``"mapped"`` (the pairs of ``layer_map``), ``"last"`` (the last layer of
      each model) or None (reads no attention scores).
    doc: one line: what it is (paper / equation).
  """
  fn: Callable[["TermInputs"], jax.Array]
  reads: tuple[str, ...]
  needs_teacher: bool = True
  layerwise: bool = False
  projection: bool = False
  mlm: bool = False
  attention_layers: str | None = None
  doc: str = ""

  def __post_init__(self):
    if not callable(self.fn):
      raise ValueError(f"Term.fn must be callable; got {self.fn!r}")
    bad = [r for r in self.reads if r not in _OUTPUT_NAMES]
    if isinstance(self.reads, str) or bad:
      raise ValueError(f"Term.reads must be a tuple of {list(_OUTPUT_NAMES)}; got "
                       f"{self.reads!r}")
    if self.attention_layers not in _ATTENTION_LAYERS:
      raise ValueError(f"Term.attention_layers must be one of {list(_ATTENTION_LAYERS)}; "
                       f"got {self.attention_layers!r}")
    if (self.attention_layers is None) != ("attention_scores" not in self.reads):
      raise ValueError(
          "Term.attention_layers must be set exactly when the term reads "
          f"attention_scores; got reads={self.reads!r}, "
          f"attention_layers={self.attention_layers!r}")


def _prediction_pairs(x: TermInputs) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(student logits, teacher logits, weights) of the prediction terms: [B, C] logits
  with the example weights, or, for a token head's [B, T, C], every real token as a row
  ([B·T, C], weights attention_mask * example weight), so pred and soft_ce are
  token-level for token tasks."""
  s, t = x.student_out.logits, x.teacher_out.logits
  if jnp.ndim(s) != 3:
    return s, t, x.example_weights
  rows = s.shape[0] * s.shape[1]
  w = _f32(x.attention_mask) * _f32(x.example_weights)[:, None]
  return s.reshape(rows, -1), jnp.reshape(t, (rows, -1)), w.reshape(rows)


def _pred(x: TermInputs) -> jax.Array:
  s, t, w = _prediction_pairs(x)
  if x.prediction_loss == "mse":
    return logits_mse(s, t, w)
  return logits_kl(s, t, w, x.temperature)


def _clf(x: TermInputs) -> jax.Array:
  if jnp.ndim(x.student_out.logits) == 3:  # token head: labels [B, T], -100 unscored
    return token_cross_entropy(x.student_out.logits, x.batch["labels"])
  return cross_entropy(x.student_out.logits, x.batch["labels"], x.example_weights)


#: The loss terms of :func:`distillation_loss`, in the order they are computed
#: and summed.  Adding a term here is all :func:`distillation_loss`,
#: :func:`outputs_needed` and the derived tuples need.
TERMS: dict[str, Term] = {
    "att": Term(
        lambda x: layerwise_attention_mse(
            x.student_out.attention_scores, x.teacher_out.attention_scores,
            x.layer_map, x.attention_mask, x.example_weights),
        reads=("attention_scores",), layerwise=True, attention_layers="mapped",
        doc="attention-score MSE over mapped layers (Wibowo et al. 2024 eq. 1; "
            "TinyBERT)"),
    "hid": Term(
        lambda x: layerwise_hidden_mse(
            x.student_out.hidden_states, x.teacher_out.hidden_states,
            x.layer_map, x.attention_mask, x.example_weights, x.projection),
        reads=("hidden_states",), layerwise=True, projection=True,
        doc="hidden-state MSE over mapped layers (eq. 2; TinyBERT)"),
    "embd": Term(
        lambda x: hidden_mse(
            x.student_out.embeddings, x.teacher_out.embeddings, x.attention_mask,
            x.example_weights, x.projection),
        reads=("embeddings",), projection=True,
        doc="embedding-output MSE (eq. 3; TinyBERT)"),
    "pred": Term(
        _pred, reads=("logits",),
        doc="logits MSE (eq. 4) if prediction_loss='mse', else tempered KL "
            "(Hinton et al. 2015); per real token for a token head"),
    "soft_ce": Term(
        lambda x: soft_cross_entropy(*_prediction_pairs(x), x.temperature),
        reads=("logits",),
        doc="soft-target cross-entropy with temperature (Hinton et al. 2015); per "
            "real token for a token head"),
    "pkd": Term(
        lambda x: layerwise_cls_pkd(
            x.student_out.hidden_states, x.teacher_out.hidden_states, x.layer_map,
            x.example_weights, x.projection),
        reads=("hidden_states",), layerwise=True, projection=True,
        doc="normalised [CLS] MSE over mapped layers (PKD, Sun et al. 2019)"),
    "cos": Term(
        lambda x: hidden_cosine(
            _last_hidden(x.student_out), _last_hidden(x.teacher_out),
            x.attention_mask, x.example_weights, x.projection),
        reads=("last_hidden_state",), projection=True,
        doc="last-layer hidden-state cosine loss (DistilBERT, Sanh et al. 2019)"),
    "att_kl": Term(
        lambda x: layerwise_attention_kl(
            x.student_out.attention_scores, x.teacher_out.attention_scores,
            x.layer_map, x.attention_mask, x.example_weights),
        reads=("attention_scores",), layerwise=True, attention_layers="mapped",
        doc="attention-distribution KL over mapped layers (Aguilar et al. 2020)"),
    "minilm": Term(
        lambda x: minilm_loss(
            x.student_out.attention_scores[-1], x.teacher_out.attention_scores[-1],
            x.student_out.values[-1], x.teacher_out.values[-1], x.attention_mask,
            x.example_weights),
        reads=("attention_scores", "values"), attention_layers="last",
        doc="last-layer attention + value-relation KL (MiniLM, Wang et al. 2020)"),
    "clf": Term(
        _clf, reads=("logits",), needs_teacher=False,
        doc="cross-entropy against batch['labels'] (L_clf); [B, T] tags with "
            "ignore index -100 for a token head"),
    "mlm": Term(
        lambda x: mlm_cross_entropy(x.student_out.logits, x.batch["mlm_labels"],
                                    x.mlm_weights),
        reads=("logits",), needs_teacher=False, mlm=True,
        doc="masked-LM cross-entropy against batch['mlm_labels']"),
    "mlm_kl": Term(
        lambda x: mlm_kl(x.student_out.logits, x.teacher_out.logits, x.mlm_weights,
                         x.temperature),
        reads=("logits",), mlm=True,
        doc="tempered KL to the teacher's MLM logits at masked positions"),
    "mlm_mse": Term(
        lambda x: mlm_mse(x.student_out.logits, x.teacher_out.logits, x.mlm_weights),
        reads=("logits",), mlm=True,
        doc="MSE to the teacher's MLM logits at masked positions"),
}


def _term_names(pred: Callable[[Term], bool]) -> tuple[str, ...]:
  """Names of the entries of ``TERMS`` (as it is now) satisfying ``pred``, in order."""
  return tuple(name for name, term in TERMS.items() if pred(term))


def _supervised(t: Term) -> bool:
  return not t.needs_teacher


def _intermediate(t: Term) -> bool:
  return any(r in _INTERMEDIATE_OUTPUTS for r in t.reads)


def _general(t: Term) -> bool:
  return t.mlm or "logits" not in t.reads


#: Valid term names for :func:`distillation_loss` ``weights``.
DISTILL_TERMS = tuple(TERMS)
#: Terms that need no teacher (supervised by the batch's own targets).
SUPERVISED_TERMS = _term_names(_supervised)
#: Terms on masked-LM logits ``[B, P, V]`` (a model with the MLM head, ``masked_positions``).
MLM_TERMS = _term_names(lambda t: t.mlm)
#: Terms comparing intermediate representations (embeddings, hidden states, attention,
#: values); with several teachers these are undefined (see :func:`mean_teacher_logits`).
INTERMEDIATE_TERMS = _term_names(_intermediate)
#: Terms usable without class labels or a classification head (general
#: distillation): all but those on classification logits (``clf``, ``pred``, ``soft_ce``).
GENERAL_TERMS = _term_names(_general)
#: Terms that use the layer map.
LAYERWISE_TERMS = _term_names(lambda t: t.layerwise)
#: Valid keys of ``projections`` (one learnable ``[H_S, H_T]`` kernel per term).
PROJECTION_KEYS = _term_names(lambda t: t.projection)


def outputs_needed(weights: Mapping[str, float], layer_map: Sequence[Optional[int]],
                   student_layers: int,
                   teacher_layers: int) -> tuple[dict[str, Any], dict[str, Any]]:
  """(student, teacher) Encoder keyword arguments: the intermediates the weighted
  terms read (``Term.reads``; ``last_hidden_state`` and ``logits`` are always
  returned).

  A term is weighted when ``weights.get(name, 0) > 0``.  Attention scores are
  asked for only at the layers a term reads (``Term.attention_layers``): the
  pairs of the loss ``layer_map`` (1-based teacher layer per student layer)
  for ``"mapped"`` (att, att_kl), the last layer of each model for ``"last"``
  (minilm).  The other layers then skip materialising ``[B, h, T, T]``.

  Returns:
    ``(student_kwargs, teacher_kwargs)``, each ``{output_embeddings,
    output_hidden_states, output_values: bool, output_attention_scores: sorted
    tuple of 0-based layer indices}``.
  """
  active = [term for name, term in TERMS.items() if weights.get(name, 0) > 0]
  reads = lambda output: any(output in term.reads for term in active)
  student_att, teacher_att = set(), set()
  for term in active:
    if term.attention_layers == "mapped":
      for i, k in enumerate(layer_map):
        if k is not None:
          student_att.add(i)
          teacher_att.add(k - 1)
    elif term.attention_layers == "last":
      student_att.add(student_layers - 1)
      teacher_att.add(teacher_layers - 1)
  common = dict(output_embeddings=reads("embeddings"),
                output_hidden_states=reads("hidden_states"),
                output_values=reads("values"))
  return (dict(common, output_attention_scores=tuple(sorted(student_att))),
          dict(common, output_attention_scores=tuple(sorted(teacher_att))))


def distillation_loss(student_out, teacher_out, batch, *,
                      weights: Mapping[str, float],
                      layer_map: Sequence[Optional[int]],
                      prediction_loss: str = "mse",
                      temperature=1.0,
                      projections: Optional[Mapping[str, Any]] = None,
                      alpha=None,
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted distillation objective ``L_overall = L_KD + L_clf``.

  ``total = sum_k w_k L_k`` over the terms below (Wibowo et al. 2024, §2.1:
  with ``att, hid, embd, pred`` and ``clf`` all weighted 1 this is exactly
  the paper's TinyBERT-style objective).  With ``alpha >= 0`` the total is
  instead ``alpha * L_clf + (1 - alpha) * sum_{k != clf} w_k L_k`` and
  ``w_clf`` is ignored (:func:`apply_alpha`).  The terms are the entries of
  the registry ``TERMS`` (names ``DISTILL_TERMS``; each :class:`Term` has the
  function it calls, the outputs it reads and a one-line ``doc``), computed
  and summed in ``TERMS`` order:

  * ``att``: :func:`layerwise_attention_mse` on ``attention_scores`` (eq. 1).
  * ``hid``: :func:`layerwise_hidden_mse` on ``hidden_states`` (eq. 2).
  * ``embd``: :func:`hidden_mse` on ``embeddings`` (eq. 3).
  * ``pred``: :func:`logits_mse` (eq. 4) if ``prediction_loss == "mse"`` or
    :func:`logits_kl` with ``temperature`` if ``"kl"`` (Hinton et al. 2015).
  * ``soft_ce``: :func:`soft_cross_entropy` with ``temperature`` (Hinton).
  * ``pkd``: :func:`layerwise_cls_pkd` on ``hidden_states`` (PKD, Sun et al. 2019).
  * ``cos``: :func:`hidden_cosine` on the last layer's hidden states
    (``last_hidden_state``, DistilBERT).
  * ``att_kl``: :func:`layerwise_attention_kl` on ``attention_scores``.
  * ``minilm``: :func:`minilm_loss` on the last layer's ``attention_scores``
    and ``values`` (MiniLM, Wang et al. 2020).
  * ``clf``: :func:`cross_entropy` against ``batch["labels"]``.
  * ``mlm``: :func:`mlm_cross_entropy` of the student's MLM logits ``[B, P, V]``
    against ``batch["mlm_labels"]`` (no teacher needed, like ``clf``).
  * ``mlm_kl``: :func:`mlm_kl` with ``temperature``; ``mlm_mse``: :func:`mlm_mse`;
    both against the teacher's MLM logits (a teacher with an MLM head).

  ``hid``, ``embd``, ``pkd`` and ``cos`` (``PROJECTION_KEYS``) apply the
  projection ``projections[<term>]`` when given (needed when the hidden widths
  differ).  ``att``, ``hid``, ``pkd`` and ``att_kl`` (``LAYERWISE_TERMS``) use
  ``layer_map`` (mapped layers only).  The MLM terms (``MLM_TERMS``) weight
  each slot by ``batch["mlm_weights"] [B, P]`` times the example weight
  (:mod:`kd_jax.masking`).

  A term whose weight is absent or a concrete 0 is not computed at all, so
  the model need not return the corresponding intermediates (and
  ``teacher_out`` may be ``None`` when only ``clf`` is weighted: the NON-KD
  baseline).  Weights may be traced scalars; those are always computed.

  Args:
    student_out, teacher_out: objects with attributes ``logits [B, C]``,
      ``last_hidden_state [B, T, H]`` (optional; else ``hidden_states[-1]``),
      ``embeddings [B, T, H]``, ``hidden_states`` (tuple of ``[B, T, H]``,
      layers 1..L), ``attention_scores`` (tuple of ``[B, h, T, T]``, layers
      1..L, pre-softmax, unmasked) and ``values`` (tuple of ``[B, T, h, d]``).
    batch: mapping with ``attention_mask [B, T]``, ``labels [B]`` (needed for
      ``clf``), ``mlm_labels [B, P]`` (for ``mlm``), ``mlm_weights [B, P]`` (for
      the MLM terms) and ``example_mask [B]`` (example weights; all ones if
      absent).
    weights: mapping from term names in ``TERMS`` to floats.
    layer_map: one 1-based teacher layer (or None: unmapped) per student
      layer (static).
    prediction_loss: ``"mse"`` or ``"kl"``.
    temperature: temperature of ``pred`` with ``"kl"`` and of ``soft_ce``.
    projections: optional ``{key: [H_S, H_T]}`` for keys in ``PROJECTION_KEYS``.
    alpha: None or negative: off; in ``[0, 1]``: α weighting (see above).

  Returns:
    ``(total, terms)`` where ``total`` is a float32 scalar and ``terms`` is
    ``{"loss": total, <term>: unweighted value, ...}`` for computed terms.

  Raises:
    ValueError: unknown term name (lists the valid ones) or prediction_loss,
      no non-zero weight, ``teacher_out is None`` with a KD term weighted,
      bad ``layer_map``, alpha > 1, or hidden-width mismatch without a
      projection.
  """
  valid_terms = list(TERMS)   # read now, not at import: a registered term counts
  unknown = sorted(set(weights) - set(valid_terms))
  if unknown:
    raise ValueError(
        f"unknown loss term(s) {unknown}; valid terms are {valid_terms}")
  if prediction_loss not in PREDICTION_LOSSES:
    raise ValueError(
        f"unknown prediction_loss {prediction_loss!r}; valid values are "
        f"{list(PREDICTION_LOSSES)}")
  projection_keys = _term_names(lambda t: t.projection)
  projections = dict(projections or {})
  bad_proj = sorted(set(projections) - set(projection_keys))
  if bad_proj:
    raise ValueError(
        f"unknown projection key(s) {bad_proj}; valid keys are {list(projection_keys)}")
  weights = apply_alpha(weights, alpha)

  active = [(name, weights[name]) for name in TERMS
            if name in weights and not _is_static_zero(weights[name])]
  if not active:
    raise ValueError(
        f"no loss term has a non-zero weight (weights={dict(weights)}, alpha={alpha})")
  kd_active = [n for n, _ in active if TERMS[n].needs_teacher]
  if teacher_out is None and kd_active:
    raise ValueError(
        f"teacher_out is None but distillation term(s) {kd_active} have "
        f"non-zero weight; only {list(_term_names(_supervised))} can be used without "
        f"a teacher")

  logits = student_out.logits
  attn_mask = batch.get("attention_mask")  # only needed by token-level terms
  if "example_mask" in batch:
    ex_w = batch["example_mask"]
  else:
    rows = jnp.shape(logits if logits is not None else attn_mask)[0]
    ex_w = jnp.ones((rows,), jnp.float32)
  mlm_w = None
  if any(TERMS[n].mlm for n, _ in active):
    mlm_w = _f32(batch["mlm_weights"]) * _f32(ex_w)[:, None]
  for name in kd_active:
    if TERMS[name].mlm and (teacher_out.logits is None
                            or jnp.ndim(teacher_out.logits) != 3):
      raise ValueError(
          f"{name} needs the teacher's MLM logits [B, P, V] (a teacher with the MLM "
          f"head, head='mlm'); the teacher's logits are "
          f"{None if teacher_out.logits is None else jnp.shape(teacher_out.logits)}")

  inputs = TermInputs(
      student_out=student_out, teacher_out=teacher_out, batch=batch,
      layer_map=layer_map, attention_mask=attn_mask, example_weights=ex_w,
      mlm_weights=mlm_w, projection=None, prediction_loss=prediction_loss,
      temperature=temperature)
  terms: dict[str, jax.Array] = {}
  for name, _ in active:
    term = TERMS[name]
    term_inputs = (dataclasses.replace(inputs, projection=projections.get(name))
                   if term.projection else inputs)
    terms[name] = term.fn(term_inputs)

  total = jnp.zeros((), jnp.float32)
  for name, w in active:
    total = total + _f32(w) * terms[name]
  return total, {"loss": total, **terms}
