"""Multilingual classification metrics and result tables.

The paper (Wibowo et al. 2024) reports macro-F1 per language and the average
over languages (Table 2 etc.), with languages split into "seen" (in the
training data) and "unseen" (zero-shot cross-lingual) groups.

* :func:`classification_metrics` - macro-F1 and accuracy (percent),
  overall and per language, plus the language average(s).
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

__all__ = ["classification_metrics", "format_markdown_table", "write_results",
           "ClassificationEvaluator", "MLMEvaluator", "Interrupted"]


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
      group).

  Returns:
    ``{"overall": {"macro_f1", "accuracy", "num_examples"},
    "per_language": {lang: {...same keys...}},
    "avg_macro_f1": mean per-language macro-F1 (the paper's average),
    ["seen_avg_macro_f1", "unseen_avg_macro_f1"]}``. Only languages with
    at least one example appear in ``per_language`` and the averages
    (in ``language_names`` order).

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
  if not (len(labels) == len(predictions) == len(language_ids)):
    raise ValueError(
        "length mismatch: "
        f"len(labels)={len(labels)}, len(predictions)={len(predictions)}, "
        f"len(language_ids)={len(language_ids)}"
    )
  if len(labels) == 0:
    raise ValueError("no examples to evaluate (N = 0)")
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  for what, arr, hi in (
      ("labels", labels, num_classes),
      ("predictions", predictions, num_classes),
      ("language_ids", language_ids, len(names)),
  ):
    if not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= hi:
      raise ValueError(
          f"{what} out of range: values in [{arr.min()}, {arr.max()}], expected 0..{hi - 1}"
      )

  result: dict[str, Any] = {
      "overall": _scores(labels, predictions, num_classes),
      "per_language": {},
  }
  for lang_id, name in enumerate(names):
    mask = language_ids == lang_id
    if mask.any():
      result["per_language"][name] = _scores(labels[mask], predictions[mask], num_classes)

  per_lang_f1 = {k: v["macro_f1"] for k, v in result["per_language"].items()}
  result["avg_macro_f1"] = _mean_or_none(list(per_lang_f1.values()))

  if seen_languages is not None:
    seen = set(seen_languages)
    unknown = sorted(seen - set(names))
    if unknown:
      raise ValueError(f"seen_languages not in language_names: {unknown}")
    result["seen_avg_macro_f1"] = _mean_or_none([f for k, f in per_lang_f1.items() if k in seen])
    result["unseen_avg_macro_f1"] = _mean_or_none(
        [f for k, f in per_lang_f1.items() if k not in seen]
    )
  return result


def _fmt(x: float | None) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  return f"{x:.2f}"


def format_markdown_table(results_by_run: Mapping[str, dict], language_names: Sequence[str]) -> str:
  """Markdown table of macro-F1 (2 decimals): one row per run.

  Columns: ``run``, one per language (in ``language_names`` order),
  ``avg`` (mean per-language macro-F1) and ``overall`` (pooled macro-F1).
  A language missing from a run's results is shown as ``-``.

  Example::

      | run | en | de | avg | overall |
      |---|---:|---:|---:|---:|
      | teacher | 90.00 | 80.00 | 85.00 | 84.50 |
  """
  names = list(language_names)
  header = ["run", *names, "avg", "overall"]
  lines = [
      "| " + " | ".join(header) + " |",
      "|---|" + "---:|" * (len(header) - 1),
  ]
  for run, metrics in results_by_run.items():
    per_lang = metrics.get("per_language", {})
    cells = [str(run).replace("|", "\\|")]
    cells += [_fmt(per_lang.get(n, {}).get("macro_f1")) for n in names]
    cells.append(_fmt(metrics.get("avg_macro_f1")))
    cells.append(_fmt(metrics.get("overall", {}).get("macro_f1")))
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


def write_results(
    workdir: str | os.PathLike,
    name: str,
    metrics: dict,
    language_names: Sequence[str],
) -> tuple[epath.Path, epath.Path]:
  """Write ``<workdir>/<name>.json`` (indent 2) and ``<workdir>/<name>.md``.

  ``metrics`` is a :func:`classification_metrics` result; the Markdown
  file holds its one-row table (run name = ``name``), plus seen/unseen
  averages when present. Each file is written to a temp file in
  ``workdir`` and renamed into place (``paths.write_text_atomic``). NaN /
  numpy scalars are converted to JSON-safe values. ``workdir`` is created
  if needed.

  Returns:
    ``(json_path, md_path)``.
  """
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  json_path, md_path = workdir / f"{name}.json", workdir / f"{name}.md"

  paths.write_text_atomic(json_path, json.dumps(_to_jsonable(metrics), indent=2) + "\n")

  md = [f"# {name}", "", "Macro-F1 (%)", "", format_markdown_table({name: metrics}, language_names)]
  if "seen_avg_macro_f1" in metrics:
    md += [
        f"- seen languages avg macro-F1: {_fmt(metrics.get('seen_avg_macro_f1'))}",
        f"- unseen languages avg macro-F1: {_fmt(metrics.get('unseen_avg_macro_f1'))}",
    ]
  overall = metrics.get("overall", {})
  if "accuracy" in overall:
    md.append(
        f"- overall accuracy: {_fmt(overall.get('accuracy'))} "
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
  """Macro-F1 and accuracy of a sequence classifier on one split, overall and per language.

  `evaluator(params, step, interrupt=None) -> (scalars, score)`: `scalars` are the
  TensorBoard values ("<split>/macro_f1", "<split>/avg_macro_f1", "<split>/accuracy",
  "<split>/macro_f1/<language>"), `score` the overall macro-F1 (%) that picks the best
  step; the full `classification_metrics` result is left in `self.metrics`. `params`
  (the model's tree) may be sharded over `mesh`; the batch is sharded over its batch
  axes. `interrupt`: polled before each batch, raises Interrupted when true.
  """

  def __init__(self, model, data: batching.TokenizedData, split: str, *, batch_size: int,
               buckets, pad_id: int, mesh, num_classes: int, seen_languages=None):
    def predict(params, batch):
      logits = model.apply({"params": params}, batch["input_ids"],
                           batch["attention_mask"]).logits
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    self.predict = jax.jit(predict, out_shardings=sharding.replicated(mesh))
    self.data, self.split, self.mesh = data, split, mesh
    self.batch_args = (batch_size, buckets, pad_id)
    self.num_classes = num_classes
    self.seen_languages = list(seen_languages) if seen_languages else None
    self.language_names = list(data.language_order)
    self.metrics: dict = {}

  def __call__(self, params, step: int, interrupt=None) -> tuple[dict[str, float], float]:
    del step  # the same for every step
    predictions = np.full(len(self.data), -1, np.int32)
    for batch in _eval_batches(self.data, *self.batch_args, interrupt):
      index = batch.pop("example_index")
      pred = np.asarray(self.predict(params, sharding.shard_global_batch(batch, self.mesh)))
      predictions[index[index >= 0]] = pred[index >= 0]
    m = classification_metrics(self.data.labels, predictions, self.data.language_ids,
                               self.language_names, self.num_classes,
                               seen_languages=self.seen_languages)
    self.metrics = m
    s = self.split
    scalars = {f"{s}/macro_f1": m["overall"]["macro_f1"], f"{s}/avg_macro_f1": m["avg_macro_f1"],
               f"{s}/accuracy": m["overall"]["accuracy"]}
    scalars.update({f"{s}/macro_f1/{lang}": v["macro_f1"]
                    for lang, v in m["per_language"].items()})
    return scalars, m["overall"]["macro_f1"]

  def on(self, data: batching.TokenizedData, split: str) -> "ClassificationEvaluator":
    """The same evaluator on another split, sharing the compiled predict (one compilation
    per bucket for val and test)."""
    other = copy.copy(self)
    other.data, other.split, other.metrics = data, split, {}
    other.language_names = list(data.language_order)
    return other

  def summary(self) -> str:
    return f"{self.split} macro-F1 {self.metrics['overall']['macro_f1']:.2f}"

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
