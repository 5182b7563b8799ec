"""A study's results: per-cell mean and spread over seeds, the paper's table layouts,
paired comparisons with a verdict per claim, and plots (`kd_jax.study`).

`write_report(study, workdir)` reads every finished run's test result
(`<workdir>/runs/<name>/{teacher,student}/test.json`) and writes into `<workdir>`:

* `results.json`: every run (labels, metrics, wall time) and every cell (the student's
  labels without the seed axis): for each metric, the per-seed values, mean, standard
  deviation (n - 1) and n; per language too;
* `report.md`: the tables of `study.tables`, the comparisons of `study.comparisons`, the
  plots of `study.plots` (PNG files beside it) and the runs' wall times.

Metrics (the run's own metric, macro-F1 or entity F1, in %): `avg` (mean over languages),
`seen_avg`, `unseen_avg`, `overall` (pooled), `retention_avg` / `retention_seen_avg` /
`retention_unseen_avg` (student / teacher, %), and `lang:<language>`.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from kd_jax import paths
from kd_jax.study import Study, StudyError, expand, read_record, state

METRIC_NAMES = {"avg": "avg", "seen_avg": "seen avg", "unseen_avg": "unseen avg",
                "overall": "overall", "retention_avg": "retention avg",
                "retention_seen_avg": "retention seen avg",
                "retention_unseen_avg": "retention unseen avg"}


def run_metrics(result: Mapping) -> dict[str, float]:
  """The report's metrics of one test result (`evaluation.classification_metrics` /
  `token_metrics` with optional retention); absent ones are left out."""
  metric = result.get("metric", "macro_f1")
  out = {"avg": result.get(f"avg_{metric}"), "seen_avg": result.get(f"seen_avg_{metric}"),
         "unseen_avg": result.get(f"unseen_avg_{metric}"),
         "overall": result.get("overall", {}).get(metric)}
  ret = result.get("retention") or {}
  out.update(retention_avg=ret.get("avg"), retention_seen_avg=ret.get("seen_avg"),
             retention_unseen_avg=ret.get("unseen_avg"))
  for lang, scores in result.get("per_language", {}).items():
    out[f"lang:{lang}"] = scores.get(metric)
  return {k: float(v) for k, v in out.items() if v is not None}


def summarize(values: Sequence[float]) -> dict[str, Any]:
  """{"mean", "std" (sample, n - 1; None for n < 2), "n"} of `values`."""
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()) if len(v) else None,
          "std": float(v.std(ddof=1)) if len(v) > 1 else None, "n": int(len(v))}


def collect(study: Study, workdir: str | os.PathLike) -> dict[str, Any]:
  """{"runs": {name: record}, "cells": {cell name: cell}}.

  A run record (teachers and students): kind, labels, teacher, state, wall_s and, when
  finished, metrics (`run_metrics`). A cell groups the students whose labels differ only
  in the seed axis: labels (without seed), teachers, runs, and per metric {"values":
  {seed label: value}, "mean", "std", "n"}.
  """
  root = paths.resolve(workdir)
  runs = expand(study)
  records, cells = {}, {}
  for run in runs:
    rec = {"kind": run.kind, "labels": dict(run.labels), "teacher": run.teacher,
           "state": state(run, root), "wall_s": read_record(run, root).get("wall_s")}
    if rec["state"] == "finished":
      rec["metrics"] = run_metrics(json.loads(run.result_file(root).read_text()))
    records[run.name] = rec
    if run.kind != "student":
      continue
    labels = {a: l for a, l in run.labels if a != study.seed_axis}
    cell_name = "-".join(labels.values()) or "all"
    cell = cells.setdefault(cell_name, {"labels": labels, "teachers": [], "runs": [],
                                        "metrics": {}})
    cell["runs"].append(run.name)
    if run.teacher not in cell["teachers"]:
      cell["teachers"].append(run.teacher)
    seed = dict(run.labels).get(study.seed_axis, "-")
    for key, value in rec.get("metrics", {}).items():
      cell["metrics"].setdefault(key, {"values": {}})["values"][seed] = value
  for cell in cells.values():
    for entry in cell["metrics"].values():
      entry.update(summarize(list(entry["values"].values())))
  return {"runs": records, "cells": cells}


# ---------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------
def _fmt(summary: Mapping | None, digits: int = 2, seeds: int = 0) -> str:
  """"mean ± std", "-" when empty; "(n=k)" appended when fewer than `seeds` seeds."""
  if not summary or summary.get("mean") is None:
    return "-"
  text = f"{summary['mean']:.{digits}f}"
  if summary.get("std") is not None:
    text += f" ± {summary['std']:.{digits}f}"
  if summary.get("n", seeds) < seeds:
    text += f" (n={summary['n']})"
  return text


def _as_tuple(axes) -> tuple[str, ...]:
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def _teacher_summary(collected: Mapping, teachers: Sequence[str], metric: str) -> dict | None:
  values = [collected["runs"][t].get("metrics", {}).get(metric) for t in teachers]
  values = [v for v in values if v is not None]
  return summarize(values) if values else None


def format_table(study: Study, collected: Mapping, spec: Mapping) -> str:
  """One Markdown table in a paper layout: rows = the labels of `spec["rows"]` (an axis
  or a tuple of axes), columns = those of `spec["columns"]`, each cell the metric's
  mean ± std over seeds (`spec["metric"]`, default "avg"), with the paper's value in
  brackets where `study.paper[spec["paper"]]` has one ({(row, column): value}, the
  column named by its labels joined with "/"). `spec["extra_rows"]`: {row name: {column:
  value}} printed as given (e.g. the chance score 100 / classes). A first row "teacher" (unless
  `spec["teacher"]` is False) gives the teachers of each column's cells. The axes left
  (neither rows, columns, seed nor fixed by `spec["where"]`) make one table per label
  combination. Raises StudyError for an axis the study lacks."""
  rows, columns = _as_tuple(spec.get("rows")), _as_tuple(spec.get("columns"))
  where = dict(spec.get("where", {}))
  metric = spec.get("metric", "avg")
  for axis in (*rows, *columns, *where):
    if axis not in study.axes:
      raise StudyError(f"{study.path}: table {spec.get('name')!r} names axis {axis!r}; the "
                       f"study's axes are {list(study.axes)}")
  rest = [a for a in study.axes if a not in (*rows, *columns, *where, study.seed_axis)]
  paper = study.paper.get(spec.get("paper", ""), {}) if spec.get("paper") else {}
  labels = lambda axes: list(itertools.product(
      *[[l for l in study.axes[a] if a not in where or where[a] == l] for a in axes]))
  out = []
  for fixed in labels(rest):
    fixed_labels = dict(zip(rest, fixed), **where)
    head = [" / ".join(rows) or "run"] + ["/".join(c) or metric for c in labels(columns)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def cell_of(r, c):
      want = dict(zip(rows, r), **dict(zip(columns, c)), **fixed_labels)
      for cell in collected["cells"].values():
        if all(cell["labels"].get(a) == l for a, l in want.items()):
          return cell
      return None

    def text(summary, key, seeds=len(study.axes.get(study.seed_axis, ()))):
      value = _fmt(summary, seeds=seeds if key[0] != "teacher" else 0)
      if key in paper:
        value += f" [{paper[key]:.2f}]"
      return value

    if spec.get("teacher", True):
      cells = ["teacher"]
      for c in labels(columns):
        teachers = sorted({t for r in labels(rows) for t in (cell_of(r, c) or {}).get(
            "teachers", [])})
        cells.append(text(_teacher_summary(collected, teachers, metric),
                          ("teacher", "/".join(c))))
      lines.append("| " + " | ".join(cells) + " |")
    for name, values in spec.get("extra_rows", {}).items():
      lines.append("| " + " | ".join([name] + [
          f"{values['/'.join(c)]:.2f}" if "/".join(c) in values else "-"
          for c in labels(columns)]) + " |")
    for r in labels(rows):
      cells = ["/".join(r)]
      for c in labels(columns):
        cell = cell_of(r, c)
        cells.append(text(cell["metrics"].get(metric) if cell else None,
                          ("/".join(r), "/".join(c))))
      lines.append("| " + " | ".join(cells) + " |")
    if fixed_labels and rest:
      out.append("*" + ", ".join(f"{a} = {l}" for a, l in fixed_labels.items()) + "*\n")
    out.append("\n".join(lines) + "\n")
  return "\n".join(out)


# ---------------------------------------------------------------------------
# paired comparisons
# ---------------------------------------------------------------------------
def compare(study: Study, collected: Mapping, spec: Mapping) -> dict[str, Any]:
  """A paired comparison `spec = {"axis", "a", "b", "metric"="avg", "where"={}}`: for
  every pair of finished students (among those matching `where`) that differ only in
  `axis` (a vs b; same seed, so the same data order and dropout keys where the seed sets
  them), the difference a - b. Returns
  {"pairs": {pair name: diff}, "mean", "std", "n", "p_value" (two-sided one-sample t-test
  of the differences, scipy; None for n < 2), "verdict"}; verdict, for the claim a > b:
  "reproduced" (mean > 0, p < 0.05), "opposite" (mean < 0, p < 0.05), "inconclusive"
  (otherwise), "no pairs" (nothing finished)."""
  axis, a, b = spec["axis"], spec["a"], spec["b"]
  metric, where = spec.get("metric", "avg"), dict(spec.get("where", {}))
  if axis not in study.axes or a not in study.axes[axis] or b not in study.axes[axis]:
    raise StudyError(f"{study.path}: comparison {axis}: {a} - {b} names an axis or label the "
                     "study lacks")
  students = {n: r for n, r in collected["runs"].items() if r["kind"] == "student"
              and all(r["labels"].get(k) == v for k, v in where.items())}
  pairs = {}
  for name, rec in students.items():
    if rec["labels"].get(axis) != a or metric not in rec.get("metrics", {}):
      continue
    other = dict(rec["labels"], **{axis: b})
    for name_b, rec_b in students.items():
      if rec_b["labels"] == other and metric in rec_b.get("metrics", {}):
        pairs[f"{name} vs {name_b}"] = rec["metrics"][metric] - rec_b["metrics"][metric]
  result = {"axis": axis, "a": a, "b": b, "metric": metric, "where": where, "pairs": pairs,
            **summarize(list(pairs.values())), "p_value": None}
  if len(pairs) >= 2 and result["std"]:
    from scipy import stats
    result["p_value"] = float(stats.ttest_1samp(list(pairs.values()), 0.0).pvalue)
  if not pairs:
    result["verdict"] = "no pairs"
  elif result["p_value"] is not None and result["p_value"] < 0.05:
    result["verdict"] = "reproduced" if result["mean"] > 0 else "opposite"
  else:
    result["verdict"] = "inconclusive"
  return result


def format_comparisons(results: Sequence[Mapping]) -> str:
  lines = ["| claim | metric | pairs | mean a - b | std | p | verdict |",
           "|---|---|---:|---:|---:|---:|---|"]
  for r in results:
    fmt = lambda x: "-" if x is None else f"{x:.2f}"
    p = "-" if r["p_value"] is None else f"{r['p_value']:.3f}"
    scope = "".join(f", {k} = {v}" for k, v in r.get("where", {}).items())
    lines.append(f"| {r['axis']}: {r['a']} > {r['b']}{scope} | {r['metric']} | {r['n']} | "
                 f"{fmt(r['mean'])} | {fmt(r['std'])} | {p} | {r['verdict']} |")
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------
def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def train_curve(stage_dir: epath.Path, tag: str = "train/loss") -> tuple[list, list]:
  """(steps, values) of scalar `tag` from a stage's TensorBoard event files (the CLU
  writer's), in step order; ([], []) when there are none."""
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.util import tensor_util
  points = {}
  for f in sorted(stage_dir.glob("events.out.tfevents.*")):
    for event in event_file_loader.EventFileLoader(os.fspath(f)).Load():
      for value in event.summary.value:
        if value.tag != tag:
          continue
        v = (value.simple_value if value.HasField("simple_value")
             else float(tensor_util.make_ndarray(value.tensor)))
        points[int(event.step)] = float(v)
  steps = sorted(points)
  return steps, [points[s] for s in steps]


def _cells_where(collected, where: Mapping[str, str]) -> list[dict]:
  return [c for c in collected["cells"].values()
          if all(c["labels"].get(a) == l for a, l in where.items())]


def plot_lines(study: Study, collected: Mapping, spec: Mapping, out: epath.Path) -> bool:
  """Figure 2: the metric (mean over seeds, ± std shaded) against the numeric value of
  axis `spec["x"]` (`spec["x_values"]` {label: number}, else the label's only override
  value), one line per label of `spec["lines"]`. False when nothing is finished."""
  plt = _pyplot()
  x_axis, line_axis = spec["x"], spec["lines"]
  metric, where = spec.get("metric", "avg"), dict(spec.get("where", {}))
  x_values = dict(spec.get("x_values", {}))
  for label, overrides in study.axes[x_axis].items():
    if label not in x_values:
      numbers = [v for v in overrides.values() if isinstance(v, (int, float))]
      x_values[label] = float(numbers[0]) if numbers else float(len(x_values))
  fig, ax = plt.subplots(figsize=(6, 4))
  drawn = False
  for line in study.axes[line_axis]:
    xs, ms, ss = [], [], []
    for label in study.axes[x_axis]:
      for cell in _cells_where(collected, dict(where, **{x_axis: label, line_axis: line})):
        entry = cell["metrics"].get(metric)
        if entry:
          xs.append(x_values[label] * spec.get("x_scale", 1.0))
          ms.append(entry["mean"])
          ss.append(entry["std"] or 0.0)
    if not xs:
      continue
    order = np.argsort(xs)
    xs, ms, ss = (np.asarray(v)[order] for v in (xs, ms, ss))
    ax.plot(xs, ms, marker="o", label=line)
    ax.fill_between(xs, ms - ss, ms + ss, alpha=0.2)
    drawn = True
  if not drawn:
    plt.close(fig)
    return False
  ax.set_xlabel(spec.get("xlabel", x_axis))
  ax.set_ylabel(spec.get("ylabel", f"test {METRIC_NAMES.get(metric, metric)}"))
  ax.set_title(spec.get("title", ""))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.fspath(out), dpi=110)
  plt.close(fig)
  return True


def plot_loss(study: Study, collected: Mapping, spec: Mapping, out: epath.Path,
              root: epath.Path) -> bool:
  """Figure 3: the training loss per step (`spec["tag"]`, default "train/loss", from the
  students' event files; mean over seeds), one panel per label of `spec["panels"]`, one
  line per label of `spec["lines"]`."""
  plt = _pyplot()
  panels = list(study.axes[spec["panels"]]) if spec.get("panels") else [None]
  tag, where = spec.get("tag", "train/loss"), dict(spec.get("where", {}))
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
  drawn = False
  for ax, panel in zip(axes[0], panels):
    for line in study.axes[spec["lines"]]:
      want = dict(where, **{spec["lines"]: line}, **({spec["panels"]: panel} if panel else {}))
      curves = []
      for cell in _cells_where(collected, want):
        for name in cell["runs"]:
          steps, values = train_curve(root / "runs" / name / "student", tag)
          if steps:
            curves.append((steps, values))
      if not curves:
        continue
      n = min(len(c[0]) for c in curves)
      mean = np.mean([c[1][:n] for c in curves], axis=0)
      ax.plot(curves[0][0][:n], mean, label=line)
      drawn = True
    ax.set_title(f"{spec['panels']} = {panel}" if panel else spec.get("title", ""))
    ax.set_xlabel("step")
    ax.set_ylabel(tag)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  if drawn:
    fig.savefig(os.fspath(out), dpi=110)
  plt.close(fig)
  return drawn


def plot_languages(study: Study, collected: Mapping, spec: Mapping, out: epath.Path) -> bool:
  """Per-language bars: the teacher and one bar per label of `spec["bars"]` (mean over
  seeds), for the cells fixed by `spec["where"]`."""
  plt = _pyplot()
  where, bars = dict(spec.get("where", {})), spec["bars"]
  series, teachers = {}, set()
  for label in study.axes[bars]:
    for cell in _cells_where(collected, dict(where, **{bars: label})):
      langs = {k[5:]: v["mean"] for k, v in cell["metrics"].items() if k.startswith("lang:")}
      if langs:
        series[label] = langs
        teachers.update(cell["teachers"])
  teacher = {}
  for t in sorted(teachers):
    for k, v in collected["runs"][t].get("metrics", {}).items():
      if k.startswith("lang:"):
        teacher.setdefault(k[5:], []).append(v)
  if teacher:
    series = {"teacher": {k: float(np.mean(v)) for k, v in teacher.items()}, **series}
  if not series:
    return False
  languages = list(dict.fromkeys(l for s in series.values() for l in s))
  fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(languages) * len(series) / 2), 4))
  width = 0.8 / len(series)
  for i, (name, values) in enumerate(series.items()):
    ax.bar(np.arange(len(languages)) + i * width, [values.get(l, np.nan) for l in languages],
           width, label=name)
  ax.set_xticks(np.arange(len(languages)) + 0.4 - width / 2)
  ax.set_xticklabels(languages, rotation=45, ha="right")
  ax.set_ylabel(spec.get("ylabel", "test macro-F1 (%)"))
  ax.set_title(spec.get("title", ""))
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.fspath(out), dpi=110)
  plt.close(fig)
  return True


PLOTS = {"lines": plot_lines, "loss": plot_loss, "languages": plot_languages}


# ---------------------------------------------------------------------------
# evaluations: every language of a task, grouped by script
# ---------------------------------------------------------------------------
def script_of(language: str) -> str:
  """The script of a FLORES / SIB-200 language code ("tel_Telu" -> "Telu"); the code
  itself when it has no script part."""
  return language.rsplit("_", 1)[1] if "_" in language else language


def collect_evaluation(study: Study, root: epath.Path, spec: Mapping) -> dict[str, Any]:
  """Per language of evaluation `spec` (see `kd_jax.study`): the teacher's score (mean
  over the teachers involved) and, per label of `spec["bars"]` (default the study's
  first axis), the mean over the matching students (all seeds). Returns {"languages":
  {language: {series: value}}, "scripts": {script: {"languages": n, series: mean}},
  "series": [...], "metric"}; empty when nothing was evaluated."""
  from kd_jax.study import eval_dir
  bars = spec.get("bars", next(iter(study.axes)))
  where = dict(spec.get("where", {}))
  values: dict[str, dict[str, list]] = {}
  metric, teachers = None, set()
  by_name = {r.name: r for r in expand(study)}
  for run in by_name.values():
    labels = dict(run.labels)
    if run.kind != "student" or any(labels.get(a) != l for a, l in where.items()):
      continue
    for series, r in ((labels[bars], run), ("teacher", by_name[run.teacher])):
      if series == "teacher" and r.name in teachers:
        continue
      f = eval_dir(r, root, spec["name"]) / "test.json"
      if not f.exists():
        continue
      if series == "teacher":
        teachers.add(r.name)
      result = json.loads(f.read_text())
      metric = result.get("metric", "macro_f1")
      for lang, scores in result["per_language"].items():
        values.setdefault(lang, {}).setdefault(series, []).append(scores[metric])
  if not values:
    return {}
  series = ["teacher"] + [l for l in study.axes[bars]
                          if any(l in v for v in values.values())]
  languages = {lang: {k: float(np.mean(v[k])) for k in series if k in v}
               for lang, v in values.items()}
  scripts: dict[str, dict] = {}
  for lang, v in languages.items():
    entry = scripts.setdefault(script_of(lang), {"languages": 0, **{k: [] for k in series}})
    entry["languages"] += 1
    for k in series:
      if k in v:
        entry[k].append(v[k])
  scripts = {sc: {"languages": e["languages"],
                  **{k: float(np.mean(e[k])) for k in series if e[k]}}
             for sc, e in sorted(scripts.items(), key=lambda x: -x[1]["languages"])}
  return {"languages": languages, "scripts": scripts, "series": series, "metric": metric,
          "seen_languages": list(spec.get("seen_languages", ()))}


def format_scripts(evaluation: Mapping) -> str:
  """Markdown: per script, its number of languages and each series' mean score, the
  students' retention (% of the teacher's mean) in parentheses."""
  series = evaluation["series"]
  lines = ["| script | languages | " + " | ".join(series) + " |",
           "|---|---:|" + "---:|" * len(series)]
  for script, e in evaluation["scripts"].items():
    cells = []
    for k in series:
      if k not in e:
        cells.append("-")
      elif k == "teacher" or not e.get("teacher"):
        cells.append(f"{e[k]:.2f}")
      else:
        cells.append(f"{e[k]:.2f} ({100 * e[k] / e['teacher']:.0f} %)")
    lines.append(f"| {script} | {e['languages']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_scripts(evaluation: Mapping, out: epath.Path, title: str = "") -> bool:
  """Per-language scores of the teacher (line) and each student series (dots), languages
  grouped by script (largest scripts first) and sorted by the teacher's score within."""
  plt = _pyplot()
  langs = evaluation["languages"]
  order = list(evaluation["scripts"])
  ordered = sorted(langs, key=lambda l: (order.index(script_of(l)),
                                         -langs[l].get("teacher", 0.0)))
  fig, ax = plt.subplots(figsize=(max(8, 0.09 * len(ordered)), 4.5))
  x = np.arange(len(ordered))
  for k in evaluation["series"]:
    y = [langs[l].get(k, np.nan) for l in ordered]
    if k == "teacher":
      ax.plot(x, y, color="black", lw=1, label="teacher")
    else:
      ax.scatter(x, y, s=8, label=k)
  start = 0
  for script in order:
    n = evaluation["scripts"][script]["languages"]
    ax.axvline(start - 0.5, color="grey", lw=0.3)
    if n >= 3:
      ax.text(start + n / 2, 1, script, ha="center", fontsize=7)
    start += n
  seen = set(evaluation.get("seen_languages", ()))
  for i, lang in enumerate(ordered):
    if lang in seen:
      ax.axvspan(i - 0.5, i + 0.5, color="gold", alpha=0.3, lw=0)
  ax.set_xlim(-1, len(ordered))
  ax.set_xticks([])
  ax.set_ylabel(f"test {evaluation['metric']} (%)")
  ax.set_title(title or "per language, grouped by script (shaded: seen in training)")
  ax.legend(fontsize=8, loc="lower left")
  fig.tight_layout()
  fig.savefig(os.fspath(out), dpi=110)
  plt.close(fig)
  return True


# ---------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------
def write_report(study: Study, workdir: str | os.PathLike) -> epath.Path:
  """Writes `results.json`, `report.md` and the plots' PNGs into `workdir` (see the
  module docstring) from the runs finished so far; returns report.md's path."""
  root = paths.resolve(workdir)
  collected = collect(study, root)
  counts = {}
  for rec in collected["runs"].values():
    counts[rec["state"]] = counts.get(rec["state"], 0) + 1
  shown = lambda p: os.path.relpath(p) if not os.path.relpath(p).startswith("..") else p
  md = [f"# {study.title}", "",
        f"Study file: `{shown(study.path)}`; base config `{shown(study.config)}`.",
        "", "Runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + "."]
  if study.budget:
    md += ["", f"Budget: {study.budget}"]
  md += ["", "Cells: mean ± standard deviation over seeds (n - 1); in brackets the paper's "
         "value where it has one."]
  for spec in study.tables:
    metric = spec.get("metric", "avg")
    md += ["", f"## {spec.get('title', spec.get('name', 'table'))}", "",
           f"Test {METRIC_NAMES.get(metric, metric)} (%).", "",
           format_table(study, collected, spec)]
  comparisons = [compare(study, collected, c) for c in study.comparisons]
  if comparisons:
    md += ["", "## Paired comparisons", "",
           "Same seed and data order; a - b per pair, t-test of the differences.", "",
           format_comparisons(comparisons)]
  images = []
  for spec in study.plots:
    out = root / f"{spec['name']}.png"
    kind = spec.get("kind", "lines")
    if kind not in PLOTS:
      raise StudyError(f"{study.path}: plot {spec['name']!r} has kind {kind!r}; choose from "
                       f"{list(PLOTS)}")
    drawn = (plot_loss(study, collected, spec, out, root) if kind == "loss" else
             PLOTS[kind](study, collected, spec, out))
    if drawn:
      images.append(out.name)
      md += ["", f"![{spec.get('title', spec['name'])}]({out.name})"]
  evaluations = {}
  for spec in study.evaluations:
    evaluation = collect_evaluation(study, root, spec)
    if not evaluation:
      continue
    evaluations[spec["name"]] = evaluation
    paths.write_text_atomic(root / f"eval_{spec['name']}.json",
                            json.dumps(evaluation, indent=2) + "\n")
    md += ["", f"## {spec.get('title', spec['name'])}", "",
           f"{len(evaluation['languages'])} languages; mean test {evaluation['metric']} (%) "
           "per script (students: mean over seeds; retention vs the teacher in "
           "parentheses). Per language: "
           f"`eval_{spec['name']}.json`.", "", format_scripts(evaluation)]
    if plot_scripts(evaluation, root / f"eval_{spec['name']}.png", spec.get("title", "")):
      images.append(f"eval_{spec['name']}.png")
      md += ["", f"![{spec['name']}](eval_{spec['name']}.png)"]
  walls = [(n, r["wall_s"]) for n, r in collected["runs"].items() if r.get("wall_s")]
  if walls:
    md += ["", "## Wall time", "", "| run | state | wall s |", "|---|---|---:|"]
    md += [f"| {n} | {collected['runs'][n]['state']} | {w:.0f} |" for n, w in walls]
    md += [f"| total | | {sum(w for _, w in walls):.0f} |"]
  paths.write_text_atomic(root / "results.json", json.dumps(
      {"study": study.path, **collected, "comparisons": comparisons, "plots": images,
       "evaluations": sorted(evaluations)},
      indent=2) + "\n")
  paths.write_text_atomic(root / "report.md", "\n".join(md).rstrip("\n") + "\n")
  return root / "report.md"
