"""Multilingual classification metrics and result tables.

The paper (Wibowo et al. 2024) reports macro-F1 per language and the average
over languages (Table 2 etc.), with languages split into "seen" (in the
training data) and "unseen" (zero-shot cross-lingual) groups.

* :func:`classification_metrics` - macro-F1 and accuracy (percent),
  overall and per language, plus the language average(s).
* :func:`token_metrics` - the same for token tagging (NER): entity-level F1
  (seqeval, CoNLL conlleval style), precision, recall, token accuracy.
* :func:`retention` - a student's score as a percentage of its teacher's(s'),
  per language and for the averages.
* :func:`format_markdown_table` - one row per run, one column per language.
* :func:`write_results` - ``<workdir>/<name>.json`` and ``<workdir>/<name>.md``,
  each written atomically.
* :class:`ClassificationEvaluator`, :class:`MLMEvaluator` - a stage's evaluation on
  the mesh, both ``(params, step) -> (scalars, score)``, so one training loop runs
  every stage.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from sklearn.metrics import f1_score

from kd_jax import masking, paths, sharding
from kd_jax.data import batching
from kd_jax.models import unpad

__all__ = ["classification_metrics", "token_metrics", "retention", "format_markdown_table",
           "write_results", "ClassificationEvaluator", "MLMEvaluator", "Interrupted"]


def _scores(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict[str, Any]:
  """Macro-F1 and accuracy in percent for one group of examples.

  Macro-F1 averages over all ``num_classes`` classes; with
  ``zero_division=0`` a class absent from both labels and predictions of
  the group counts as F1 = 0.
  """
  f1 = f1_score(
      labels,
      predictions,
      average="macro",
      labels=list(range(num_classes)),
      zero_division=0,
  )
  acc = float(np.mean(labels == predictions)) if len(labels) else 0.0
  return {
      "macro_f1": 100.0 * float(f1),
      "accuracy": 100.0 * acc,
      "num_examples": int(len(labels)),
  }


def _mean_or_none(values: list[float]) -> float | None:
  return float(np.mean(values)) if values else None


def _check_same_length(**arrays) -> None:
  """ValueError naming each length unless all have the same, non-zero, length."""
  lengths = {name: len(a) for name, a in arrays.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError("length mismatch: " + ", ".join(f"len({k})={n}" for k, n in lengths.items()))
  if not next(iter(lengths.values())):
    raise ValueError("no examples to evaluate (N = 0)")


def _check_language_ids(language_ids: np.ndarray, names: list[str]) -> None:
  if not np.issubdtype(language_ids.dtype, np.integer):
    raise ValueError(f"language_ids must be integers, got dtype {language_ids.dtype}")
  if language_ids.min() < 0 or language_ids.max() >= len(names):
    raise ValueError(
        f"language_ids out of range: values in [{language_ids.min()}, {language_ids.max()}], "
        f"expected 0..{len(names) - 1}"
    )


def _grouped_metrics(
    scores: Callable[[np.ndarray], dict[str, Any]],
    language_ids: np.ndarray,
    names: list[str],
    metric: str,
    seen_languages: Iterable[str] | None,
) -> dict[str, Any]:
  """Overall / per-language scores and the language averages of ``metric``.

  ``scores(mask)`` scores the examples where the bool mask [N] is true.
  Shared by :func:`classification_metrics` and :func:`token_metrics`;
  returns their common structure (see there).
  """
  seen = None
  if seen_languages is not None:
    seen = set(seen_languages)
    unknown = sorted(seen - set(names))
    if unknown:
      raise ValueError(f"seen_languages not in language_names: {unknown}")

  result: dict[str, Any] = {
      "overall": scores(np.ones(len(language_ids), bool)),
      "per_language": {},
  }
  for lang_id, name in enumerate(names):
    mask = language_ids == lang_id
    if mask.any():
      result["per_language"][name] = scores(mask)

  per_lang = {k: v[metric] for k, v in result["per_language"].items()}
  result[f"avg_{metric}"] = _mean_or_none(list(per_lang.values()))
  if seen is not None:
    result[f"seen_avg_{metric}"] = _mean_or_none([f for k, f in per_lang.items() if k in seen])
    result[f"unseen_avg_{metric}"] = _mean_or_none(
        [f for k, f in per_lang.items() if k not in seen]
    )
    # the group definition, for retention()
    result["seen_languages"] = [n for n in names if n in seen]
  result["metric"] = metric
  return result


def classification_metrics(
    labels,
    predictions,
    language_ids,
    language_names: Sequence[str],
    num_classes: int,
    seen_languages: Iterable[str] | None = None,
) -> dict[str, Any]:
  """Macro-F1 / accuracy overall and per language (all values in percent).

  Args:
    labels: int array [N], gold class ids in ``0..num_classes-1``.
    predictions: int array [N], predicted class ids.
    language_ids: int array [N], index into ``language_names``.
    language_names: name of each language id.
    num_classes: number of classes; macro-F1 averages over
      ``range(num_classes)`` (sklearn ``f1_score(average='macro',
      labels=range(num_classes), zero_division=0)``).
    seen_languages: optional names of languages seen in training; adds
      ``seen_avg_macro_f1`` / ``unseen_avg_macro_f1`` (None for an empty
      group) and ``seen_languages`` (those names, in ``language_names``
      order).

  Returns:
    ``{"overall": {"macro_f1", "accuracy", "num_examples"},
    "per_language": {lang: {...same keys...}},
    "avg_macro_f1": mean per-language macro-F1 (the paper's average),
    ["seen_avg_macro_f1", "unseen_avg_macro_f1", "seen_languages"],
    "metric": "macro_f1"}``. Only languages with at least one example
    appear in ``per_language`` and the averages (in ``language_names``
    order). ``metric`` names the score key (``avg_<metric>`` etc.).

  Raises:
    ValueError: arrays of different lengths (the message names them),
      non-1-D arrays, language ids outside ``language_names``, or labels /
      predictions outside ``0..num_classes-1``, or unknown names in
      ``seen_languages``.
  """
  labels = np.asarray(labels)
  predictions = np.asarray(predictions)
  language_ids = np.asarray(language_ids)
  names = list(language_names)
  lengths = {
      "labels": labels.shape,
      "predictions": predictions.shape,
      "language_ids": language_ids.shape,
  }
  if any(len(s) != 1 for s in lengths.values()):
    raise ValueError(f"labels, predictions and language_ids must be 1-D, got shapes {lengths}")
  _check_same_length(labels=labels, predictions=predictions, language_ids=language_ids)
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  for what, arr in (("labels", labels), ("predictions", predictions)):
    if not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= num_classes:
      raise ValueError(
          f"{what} out of range: values in [{arr.min()}, {arr.max()}], "
          f"expected 0..{num_classes - 1}"
      )
  _check_language_ids(language_ids, names)

  return _grouped_metrics(
      lambda mask: _scores(labels[mask], predictions[mask], num_classes),
      language_ids, names, "macro_f1", seen_languages)


def _token_scores(gold: list[list[str]], pred: list[list[str]]) -> dict[str, Any]:
  """Entity F1 / precision / recall (seqeval) and token accuracy in percent."""
  # imported here: only token tasks need seqeval
  from seqeval import metrics as seqeval_metrics

  kw = dict(zero_division=0)  # default mode: conlleval-style chunking
  n_tokens = sum(len(g) for g in gold)
  n_equal = sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p))
  return {
      "entity_f1": 100.0 * float(seqeval_metrics.f1_score(gold, pred, **kw)),
      "precision": 100.0 * float(seqeval_metrics.precision_score(gold, pred, **kw)),
      "recall": 100.0 * float(seqeval_metrics.recall_score(gold, pred, **kw)),
      "token_accuracy": 100.0 * n_equal / n_tokens if n_tokens else 0.0,
      "num_examples": len(gold),
  }


def token_metrics(
    gold_tags: Sequence[Sequence[str]],
    pred_tags: Sequence[Sequence[str]],
    language_ids,
    language_names: Sequence[str],
    seen_languages: Iterable[str] | None = None,
) -> dict[str, Any]:
  """Entity-level F1 of a token tagger (NER) overall and per language (percent).

  Entities are scored with ``seqeval.metrics`` ``f1_score`` /
  ``precision_score`` / ``recall_score`` in the default mode, i.e. the
  CoNLL-2000 ``conlleval`` chunk F1 (an entity counts only if its type and
  span match exactly; a stray ``I-X`` starts an entity), micro-averaged
  over entities, ``zero_division=0``.

  Args:
    gold_tags: N lists of IOB2 tag strings (``"O"``, ``"B-PER"``, ...),
      one list per example.
    pred_tags: N lists of predicted tags, each as long as its gold list.
    language_ids: int array [N], index into ``language_names``.
    language_names: name of each language id.
    seen_languages: as in :func:`classification_metrics`, for
      ``entity_f1``.

  Returns:
    ``{"overall": {"entity_f1", "precision", "recall", "token_accuracy",
    "num_examples"}, "per_language": {lang: {...same keys...}},
    "avg_entity_f1": mean per-language entity F1,
    ["seen_avg_entity_f1", "unseen_avg_entity_f1", "seen_languages"],
    "metric": "entity_f1"}``, the structure of
    :func:`classification_metrics`. ``token_accuracy`` is the percentage
    of tags equal to the gold tag.

  Raises:
    ValueError: lists of different lengths, an example whose gold and
      predicted tags differ in length (the message names its index), no
      examples, language ids outside ``language_names``, or unknown names
      in ``seen_languages``.
  """
  gold = [list(g) for g in gold_tags]
  pred = [list(p) for p in pred_tags]
  language_ids = np.asarray(language_ids)
  names = list(language_names)
  if language_ids.ndim != 1:
    raise ValueError(f"language_ids must be 1-D, got shape {language_ids.shape}")
  _check_same_length(gold_tags=gold, pred_tags=pred, language_ids=language_ids)
  for i, (g, p) in enumerate(zip(gold, pred)):
    if len(g) != len(p):
      raise ValueError(
          f"example {i}: {len(g)} gold tags but {len(p)} predicted tags")
  _check_language_ids(language_ids, names)

  def scores(mask: np.ndarray) -> dict[str, Any]:
    idx = np.flatnonzero(mask)
    return _token_scores([gold[i] for i in idx], [pred[i] for i in idx])

  return _grouped_metrics(scores, language_ids, names, "entity_f1", seen_languages)


def _ratio(student: float | None, teacher: float | None) -> float | None:
  if student is None or teacher is None or teacher == 0:
    return None
  return 100.0 * student / teacher


def retention(student_metrics: Mapping, teacher_metrics: Mapping | Sequence[Mapping]
              ) -> dict[str, Any]:
  """The student's score as a percentage of the teacher's (100 = on par).

  The score is ``student_metrics["metric"]`` (``"macro_f1"`` when absent),
  taken from ``per_language``. Averages are recomputed over the languages
  in both results, so a language missing on either side drops out of both
  sides.

  Args:
    student_metrics: a :func:`classification_metrics` /
      :func:`token_metrics` result.
    teacher_metrics: one such result, or a list of several (e.g. teacher
      seeds): then the teacher's value for a language is the mean over the
      teachers, over the languages present in every teacher.

  Returns:
    ``{"per_language": {lang: 100 * student / teacher}`` (languages in
    both, student order; None where the teacher's value is 0),
    ``"avg"``: 100 * student mean / teacher mean over those languages,
    [``"seen_avg"``, ``"unseen_avg"``]: the same over the shared languages
    of the student's seen / unseen group, when the student has
    ``seen_avg_<metric>`` and ``seen_languages``, ``"metric": name}``.
    A value without any shared language (or with teacher mean 0) is None.

  Raises:
    ValueError: the results score different metrics, or an empty list of
      teachers.
  """
  metric = student_metrics.get("metric", "macro_f1")
  teachers = [teacher_metrics] if isinstance(teacher_metrics, Mapping) else list(teacher_metrics)
  if not teachers:
    raise ValueError("no teacher metrics given")
  other = sorted({t.get("metric", "macro_f1") for t in teachers} - {metric})
  if other:
    raise ValueError(f"student metric {metric!r} but teacher metric(s) {other}")

  teacher_langs = set.intersection(*(set(t.get("per_language", {})) for t in teachers))
  student = {k: v[metric] for k, v in student_metrics.get("per_language", {}).items()
             if k in teacher_langs}
  teacher = {k: float(np.mean([t["per_language"][k][metric] for t in teachers]))
             for k in student}

  def group_ratio(langs: list[str]) -> float | None:
    return _ratio(_mean_or_none([student[k] for k in langs]),
                  _mean_or_none([teacher[k] for k in langs]))

  result: dict[str, Any] = {
      "per_language": {k: _ratio(student[k], teacher[k]) for k in student},
      "avg": group_ratio(list(student)),
  }
  if f"seen_avg_{metric}" in student_metrics and "seen_languages" in student_metrics:
    seen = set(student_metrics["seen_languages"])
    result["seen_avg"] = group_ratio([k for k in student if k in seen])
    result["unseen_avg"] = group_ratio([k for k in student if k not in seen])
  result["metric"] = metric
  return result


def _fmt(x: float | None) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  return f"{x:.2f}"


def format_markdown_table(results_by_run: Mapping[str, dict], language_names: Sequence[str]) -> str:
  """Markdown table of each run's score (2 decimals): one row per run.

  The score is the result's ``metric`` (``"macro_f1"`` when absent, e.g.
  ``"entity_f1"`` for :func:`token_metrics`). Columns: ``run``, one per
  language (in ``language_names`` order), ``avg`` (mean per-language
  score) and ``overall`` (pooled score). A language missing from a run's
  results is shown as ``-``. When any result has seen/unseen averages
  (``seen_avg_<metric>``), columns ``seen avg`` and ``unseen avg`` come
  before ``overall``. A result with a ``"retention"`` entry
  (:func:`retention`) gets a second row ``"<run> retention %"`` with the
  per-language and avg retention (``overall`` is ``-``).

  Example::

      | run | en | de | avg | overall |
      |---|---:|---:|---:|---:|
      | teacher | 90.00 | 80.00 | 85.00 | 84.50 |
      | student | 81.00 | 76.00 | 78.50 | 78.00 |
      | student retention % | 90.00 | 95.00 | 92.35 | - |
  """
  names = list(language_names)
  groups = any(f"seen_avg_{m.get('metric', 'macro_f1')}" in m for m in results_by_run.values())
  header = ["run", *names, "avg", *(["seen avg", "unseen avg"] if groups else []), "overall"]
  lines = [
      "| " + " | ".join(header) + " |",
      "|---|" + "---:|" * (len(header) - 1),
  ]
  for run, metrics in results_by_run.items():
    metric = metrics.get("metric", "macro_f1")
    per_lang = metrics.get("per_language", {})
    run = str(run).replace("|", "\\|")
    cells = [run]
    cells += [_fmt(per_lang.get(n, {}).get(metric)) for n in names]
    cells.append(_fmt(metrics.get(f"avg_{metric}")))
    if groups:
      cells += [_fmt(metrics.get(f"{g}_avg_{metric}")) for g in ("seen", "unseen")]
    cells.append(_fmt(metrics.get("overall", {}).get(metric)))
    lines.append("| " + " | ".join(cells) + " |")
    ret = metrics.get("retention")
    if ret:
      cells = [f"{run} retention %"]
      cells += [_fmt(ret.get("per_language", {}).get(n)) for n in names]
      cells.append(_fmt(ret.get("avg")))
      if groups:
        cells += [_fmt(ret.get(f"{g}_avg")) for g in ("seen", "unseen")]
      cells.append("-")
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _to_jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _to_jsonable(x.tolist())
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, (np.floating, float)):
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x
  return x


#: metric key -> (heading, in a sentence)
METRIC_LABELS = {"macro_f1": ("Macro-F1", "macro-F1"), "entity_f1": ("Entity F1", "entity F1")}


def write_results(
    workdir: str | os.PathLike,
    name: str,
    metrics: dict,
    language_names: Sequence[str],
) -> tuple[epath.Path, epath.Path]:
  """Write ``<workdir>/<name>.json`` (indent 2) and ``<workdir>/<name>.md``.

  ``metrics`` is a :func:`classification_metrics` / :func:`token_metrics`
  result; the Markdown file holds its one-row table (run name = ``name``)
  of its ``metric``, plus seen/unseen averages when present, and, when it
  holds ``"retention"`` (:func:`retention`), a retention row and lines. Each file is written to a temp file
  in ``workdir`` and renamed into place (``paths.write_text_atomic``).
  NaN / numpy scalars are converted to JSON-safe values. ``workdir`` is
  created if needed.

  Returns:
    ``(json_path, md_path)``.
  """
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  json_path, md_path = workdir / f"{name}.json", workdir / f"{name}.md"

  paths.write_text_atomic(json_path, json.dumps(_to_jsonable(metrics), indent=2) + "\n")

  metric = metrics.get("metric", "macro_f1")
  heading, label = METRIC_LABELS.get(metric, (metric, metric))
  md = [f"# {name}", "", f"{heading} (%)", "",
        format_markdown_table({name: metrics}, language_names)]
  if f"seen_avg_{metric}" in metrics:
    md += [
        f"- seen languages avg {label}: {_fmt(metrics.get(f'seen_avg_{metric}'))}",
        f"- unseen languages avg {label}: {_fmt(metrics.get(f'unseen_avg_{metric}'))}",
    ]
  ret = metrics.get("retention")
  if ret:
    md.append(f"- retention vs teacher (avg): {_fmt(ret.get('avg'))} %")
    for group in ("seen", "unseen"):
      if f"{group}_avg" in ret:
        md.append(f"- retention vs teacher ({group} avg): {_fmt(ret[f'{group}_avg'])} %")
  overall = metrics.get("overall", {})
  for key, what in (("accuracy", "accuracy"), ("token_accuracy", "token accuracy")):
    if key in overall:
      md.append(
          f"- overall {what}: {_fmt(overall.get(key))} "
          f"({overall.get('num_examples', '?')} examples)"
      )
  paths.write_text_atomic(md_path, "\n".join(md).rstrip("\n") + "\n")
  return json_path, md_path


# ---------------------------------------------------------------------------
# evaluators of a training stage
# ---------------------------------------------------------------------------
class Interrupted(Exception):
  """An evaluation stopped between two batches because `interrupt()` said so (SIGTERM)."""


def _eval_batches(data: batching.TokenizedData, batch_size: int, buckets, pad_id: int,
                  interrupt: Callable[[], bool] | None) -> Iterable[dict]:
  """Every example once, in order, padded batches; raises Interrupted between batches."""
  for batch in batching.batches(data, batch_size, buckets, pad_id, shuffle=False,
                                drop_remainder=False):
    if interrupt is not None and interrupt():
      raise Interrupted()
    yield batch


class ClassificationEvaluator:
  """The score of a sequence or token classifier on one split, overall and per language:
  macro-F1 and accuracy (`classification_metrics`) for `label_kind="sequence"`,
  entity-level F1 on the words' first sub-tokens (`token_metrics`, seqeval) for
  `"token"`.

  `evaluator(params, step, interrupt=None) -> (scalars, score)`: `scalars` are the
  TensorBoard values ("<split>/<metric>", "<split>/avg_<metric>", "<split>/accuracy" or
  "<split>/token_accuracy", "<split>/<metric>/<language>"), `score` the overall metric
  (%) that picks the best step; the full result is left in `self.metrics`. `params` (the
  model's tree) may be sharded over `mesh`; the batch is sharded over its batch axes.
  `interrupt`: polled before each batch, raises Interrupted when true.
  `teacher_metrics`: the teachers' results on this split; the result then holds
  `"retention"` (`retention`) too. `unpad_multiple`: None runs the padded batches; an
  int runs the token-wise work on the real tokens only (`kd_jax.models.unpad`, budget a
  multiple of it, 0: `unpad.default_multiple`), as training with `config.unpad` does:
  the same logits up to float32 rounding, one compilation per distinct budget.
  """

  def __init__(self, model, data: batching.TokenizedData, split: str, *, batch_size: int,
               buckets, pad_id: int, mesh, label_names, label_kind: str = "sequence",
               seen_languages=None, teacher_metrics=None, unpad_multiple: int | None = None):
    def predict(params, batch):
      extra = {"token_index": batch["token_index"]} if "token_index" in batch else {}
      logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                           batch.get("token_type_ids"), **extra).logits
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B] or [B, T]
    self.predict = jax.jit(predict, out_shardings=sharding.replicated(mesh))
    self.unpad_multiple = unpad_multiple
    self.data, self.split, self.mesh = data, split, mesh
    self.batch_args = (batch_size, buckets, pad_id)
    self.label_names, self.label_kind = tuple(label_names), label_kind
    self.seen_languages = list(seen_languages) if seen_languages else None
    self.language_names = list(data.language_order)
    self.teacher_metrics = teacher_metrics or None
    self.metrics: dict = {}

  def _predictions(self, params, interrupt) -> list:
    """Per example: the predicted class, or the predicted tag ids at its labelled tokens."""
    out: list = [None] * len(self.data)
    groups = sharding.batch_divisor(self.mesh)
    for batch in _eval_batches(self.data, *self.batch_args, interrupt):
      index = batch.pop("example_index")
      if self.unpad_multiple is not None:
        batch["token_index"] = unpad.token_index(batch["attention_mask"], groups,
                                                 self.unpad_multiple)
      pred = np.asarray(self.predict(params, sharding.shard_global_batch(batch, self.mesh)))
      for row in np.flatnonzero(index >= 0):
        i = index[row]
        if self.label_kind == "token":
          gold = self.data.token_labels[i]
          out[i] = pred[row, : len(gold)][gold != batching.IGNORE_LABEL]
        else:
          out[i] = pred[row]
    return out

  def __call__(self, params, step: int, interrupt=None) -> tuple[dict[str, float], float]:
    del step  # the same for every step
    predictions = self._predictions(params, interrupt)
    d = self.data
    if self.label_kind == "token":
      names = self.label_names
      gold = [[names[t] for t in g[g != batching.IGNORE_LABEL]] for g in d.token_labels]
      pred = [[names[t] for t in p] for p in predictions]
      m = token_metrics(gold, pred, d.language_ids, self.language_names,
                        seen_languages=self.seen_languages)
      extra = "token_accuracy"
    else:
      m = classification_metrics(d.labels, np.asarray(predictions, np.int32), d.language_ids,
                                 self.language_names, len(self.label_names),
                                 seen_languages=self.seen_languages)
      extra = "accuracy"
    if self.teacher_metrics:
      m["retention"] = retention(m, self.teacher_metrics)
    self.metrics = m
    s, metric = self.split, m["metric"]
    scalars = {f"{s}/{metric}": m["overall"][metric], f"{s}/avg_{metric}": m[f"avg_{metric}"],
               f"{s}/{extra}": m["overall"][extra]}
    scalars.update({f"{s}/{metric}/{lang}": v[metric] for lang, v in m["per_language"].items()})
    return scalars, m["overall"][metric]

  def on(self, data: batching.TokenizedData, split: str,
         teacher_metrics=None) -> "ClassificationEvaluator":
    """The same evaluator on another split, sharing the compiled predict (one compilation
    per bucket for val and test)."""
    other = copy.copy(self)
    other.data, other.split, other.metrics = data, split, {}
    other.language_names = list(data.language_order)
    other.teacher_metrics = teacher_metrics or None
    return other

  def summary(self) -> str:
    metric = self.metrics["metric"]
    return f"{self.split} {METRIC_LABELS[metric][1]} {self.metrics['overall'][metric]:.2f}"

  def write(self, stage_dir: epath.Path, metrics: dict) -> None:
    """`<stage_dir>/<split>.json` and `.md` (write_results)."""
    write_results(stage_dir, self.split, metrics, self.language_names)


class MLMEvaluator:
  """Masked-LM loss (mean cross-entropy per masked token, nats) and accuracy (%) of a model
  with the MLM head, overall and per text source, on held-out text.

  Masks come from `masking.masking_rng(seed, HELDOUT_STREAM, batch number)`, so every
  evaluation of a run sees the same masked tokens. Same call as ClassificationEvaluator;
  `score` is minus the MLM loss (higher is better); `self.metrics` = {"overall": ...,
  "per_source": {source: ...}}, each {"mlm_loss", "mlm_accuracy", "num_masked"}.
  """

  def __init__(self, model, data: batching.TokenizedData, spec: masking.MaskingSpec, *,
               batch_size: int, buckets, pad_id: int, seed: int, mesh, split: str = "heldout"):
    def mlm_eval(params, batch):
      logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                           masked_positions=batch["masked_positions"]).logits
      logits = logits.astype(jnp.float32)
      labels = batch["mlm_labels"]
      w = batch["mlm_weights"].astype(jnp.float32)
      logp = jax.nn.log_softmax(logits, axis=-1)
      nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
      correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
      return (jnp.sum(jnp.where(w > 0, nll, 0.0) * w, -1), jnp.sum(correct * w, -1),
              jnp.sum(w, -1))
    self.mlm_eval = jax.jit(mlm_eval, out_shardings=sharding.replicated(mesh))
    self.data, self.spec, self.seed, self.mesh, self.split = data, spec, seed, mesh, split
    self.batch_args = (batch_size, buckets, pad_id)
    self.metrics: dict = {}

  def __call__(self, params, step: int, interrupt=None) -> tuple[dict[str, float], float]:
    del step
    sources = list(self.data.language_order)
    sums = np.zeros((3, len(sources)))
    for i, batch in enumerate(_eval_batches(self.data, *self.batch_args, interrupt)):
      rng = masking.masking_rng(self.seed, masking.HELDOUT_STREAM, i)
      masked = masking.mask_batch(batch, self.spec, rng)
      out = jax.device_get(self.mlm_eval(params, sharding.shard_global_batch(masked, self.mesh)))
      for k in range(3):
        np.add.at(sums[k], batch["language_ids"], np.asarray(out[k], np.float64))  # pads add 0

    def metrics(nll, correct, count):
      return {"mlm_loss": float(nll / max(count, 1)),
              "mlm_accuracy": float(100 * correct / max(count, 1)), "num_masked": int(count)}
    self.metrics = {"overall": metrics(*sums.sum(1)),
                    "per_source": {name: metrics(*sums[:, j]) for j, name in enumerate(sources)}}
    scalars = {f"{self.split}/{k}": v for k, v in self.metrics["overall"].items()
               if k != "num_masked"}
    return scalars, -self.metrics["overall"]["mlm_loss"]

  def summary(self) -> str:
    o = self.metrics["overall"]
    return f"{self.split} MLM loss {o['mlm_loss']:.4f}, accuracy {o['mlm_accuracy']:.2f}%"

  def write(self, stage_dir: epath.Path, metrics: dict) -> None:
    """`<stage_dir>/<split>.json`."""
    paths.write_text_atomic(stage_dir / f"{self.split}.json",
                            json.dumps(_to_jsonable(metrics), indent=2, default=str))
