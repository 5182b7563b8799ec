"""A study in one command: a grid of teacher and student runs, then its tables and plots.

  python -m kd_jax.study --study configs/studies/table2.py --workdir runs/table2 \
      [--index I --count N] [--only axis=label,...] [--dry-run] [--report] [--reuse DIRS] \
      [-- --config.field=value ...]

A study file is Python, like `configs/`: `get_study()` returns a dict with

* `config`: the base config file (`configs/...`, relative to the current directory or to
  the repository holding the study file), and `overrides` (field -> value) for every run;
* `axes`: {axis: {label: {field: value}}}, in order; every combination of one label per
  axis is one student run, named by its labels joined with "-". A field applies to the
  teacher and the student, except `student.*`, `distill.*` (student only) and
  `teacher.train.*` (teacher only), `general.*` (student only); `teacher:<field>` /
  `student:<field>` say it
  explicitly (`student:seed`: students of several seeds share one teacher);
* `seed_axis` (default "seed"): the axis that results are averaged over;
* `evaluations`: [{"name", "where": {axis: label}, "overrides": {field: value}}]: after
  training, every finished student matching `where` and its teacher are scored on the
  data the overrides select (`python -m kd_jax.evaluate`, e.g. every SIB-200 language),
  into `<stage dir>/eval_<name>/test.json`, the student with retention vs its teacher;
* `tables`, `comparisons`, `plots`, `paper`, `budget`: what the report shows
  (`kd_jax.study_report`).

The runner trains each distinct teacher once (the teacher is identified by the overrides
that reach it) and every student from its teacher's stage dir, each as one
`python -m kd_jax.main` process under `<workdir>/runs/<name>`. A finished run (its result
file exists) is skipped, a stopped one resumes from its checkpoint (kd_jax.main does
that), a failed one is recorded and its students are skipped. `--index I --count N` runs
the I-th of N disjoint shares (teachers and students dealt round robin), so N processes
or hosts on a shared workdir cover the grid once; a student whose teacher is another
share's waits for it. `<workdir>/manifest.json` lists every run and its state; when the
runs of this share are done, the report is written (`kd_jax.study_report.write_report`).
SIGTERM stops the run in progress (it saves a checkpoint) and the study after it.

Runs are shared between studies: a pending run whose `kd_jax.main` flags (the config file
by content, without its workdir and teacher dir) and teacher are those of a finished run
of another study (`--reuse DIRS`; default: every study workdir beside this one) is not
trained again: its directory links to that run (`manifest.json` names it in
`reused_from`). Table 5's fine-tuned students are Table 2's from_teacher KD students,
and most studies share Table 2's teachers.

An archive keeps a study across machines and sessions (`--archive DIR`, e.g. the study's
`configs/studies/results/<name>` in the repository): after every run the finished runs'
small files (results, model config, event files, run record; not checkpoints or logs)
are copied to `DIR/runs/<name>` and listed in `DIR/manifest.json`, each with its
identity. On a new machine the same command restores every archived run whose identity
matches into the workdir (copied) instead of training it, and copies the report into
`DIR`. An archived teacher has no weights: when a student still needs it, it is trained
again (the runs are deterministic: the tsm teacher scored the same float on an AMD and
an Intel machine; the new result is printed beside the archived one).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import hashlib
import importlib.util
import itertools
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from etils import epath

from kd_jax import paths

STUDENT_ONLY = ("student.", "distill.", "general.", "teacher.checkpoint", "stages")
TEACHER_ONLY = ("teacher.train.",)
SCOPES = ("teacher", "student")
STATES = ("pending", "running", "stopped", "failed", "finished")
MANIFEST = "manifest.json"
RUN_RECORD = "study_run.json"  # per run: command, return codes, wall time
# Not archived: weights, the live lock, the run's console log.
ARCHIVE_SKIP = ("checkpoints", "kd_jax.lock", "study.log")
ARCHIVE_MAX_BYTES = 8 << 20


class StudyError(ValueError):
  """A study file (or its use) that cannot run; the message names the file and field."""


def seeds(values: Sequence[int], field: str = "student:seed") -> dict[str, dict]:
  """A seed axis: {"seed0": {"student:seed": 0}, ...}. With the default field the students
  of every seed distill from one teacher (as in the paper: one teacher, three student
  seeds); `field="seed"` trains one teacher per seed."""
  return {f"seed{v}": {field: int(v)} for v in values}


@dataclasses.dataclass(frozen=True)
class Study:
  """A parsed study file (see the module docstring)."""
  path: str
  config: str
  axes: dict[str, dict[str, dict[str, Any]]]
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  skip: tuple[dict[str, str], ...] = ()
  seed_axis: str = "seed"
  tables: tuple[dict, ...] = ()
  comparisons: tuple[dict, ...] = ()
  plots: tuple[dict, ...] = ()
  evaluations: tuple[dict, ...] = ()
  paper: dict = dataclasses.field(default_factory=dict)
  budget: str = ""
  title: str = ""


@dataclasses.dataclass(frozen=True)
class Run:
  """One kd_jax.main run of a study: a teacher (finetune_teacher) or a student (distill).
  `labels`: (axis, label) pairs: all axes for a student, those that change the teacher
  for a teacher. `overrides`: config field -> value, without the stage and teacher link."""
  name: str
  kind: str
  labels: tuple[tuple[str, str], ...]
  overrides: tuple[tuple[str, Any], ...]
  teacher: str | None = None

  @property
  def stage(self) -> str:
    return "finetune_teacher" if self.kind == "teacher" else "distill"

  @property
  def stage_name(self) -> str:
    return "teacher" if self.kind == "teacher" else "student"

  def workdir(self, root: epath.Path) -> epath.Path:
    return root / "runs" / self.name

  def stage_dir(self, root: epath.Path) -> epath.Path:
    return self.workdir(root) / self.stage_name

  def result_file(self, root: epath.Path) -> epath.Path:
    return self.stage_dir(root) / "test.json"

  def teacher_stage_dir(self, root: epath.Path) -> epath.Path:
    """A student's teacher stage dir (its teacher run's `<workdir>/teacher`)."""
    return root / "runs" / self.teacher / "teacher"


# ---------------------------------------------------------------------------
# the study file
# ---------------------------------------------------------------------------
def _resolve_config_file(name: str, study_path: epath.Path) -> str:
  for base in (epath.Path(os.getcwd()), *study_path.parents):
    candidate = base / name
    if candidate.is_file():
      return os.fspath(candidate)
  raise StudyError(f"{study_path}: config={name!r} is not a file (looked in the current "
                   "directory and above the study file)")


def _split_scope(field: str) -> tuple[str | None, str]:
  if ":" in field:
    scope, field = field.split(":", 1)
    return scope, field
  return None, field


def load_study(path: str | os.PathLike) -> Study:
  """Reads and checks `get_study()` of a study file.

  Raises:
    StudyError naming the file and the field: no such file, no get_study(), no config or
      axes, an axis without labels, a label that is not a plain name, an override that
      is not {field: value}, an unknown scope, or a seed axis that is not an axis.
  """
  p = paths.resolve(path)
  if not p.is_file():
    raise StudyError(f"--study {path}: no such file")
  spec = importlib.util.spec_from_file_location(f"_kd_jax_study_{p.stem}", os.fspath(p))
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, os.fspath(p.parent))  # study files may import their neighbours
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(os.fspath(p.parent))
  if not hasattr(module, "get_study"):
    raise StudyError(f"{p}: defines no get_study()")
  raw = dict(module.get_study())
  known = {f.name for f in dataclasses.fields(Study)} - {"path"}
  unknown = sorted(set(raw) - known)
  if unknown:
    raise StudyError(f"{p}: get_study() has unknown keys {unknown}; known: {sorted(known)}")
  if not raw.get("config"):
    raise StudyError(f"{p}: get_study() names no config (the base config file)")
  axes = raw.get("axes") or {}
  if not axes:
    raise StudyError(f"{p}: get_study() has no axes")
  checked = {}
  for axis, labels in axes.items():
    if not isinstance(labels, Mapping) or not labels:
      raise StudyError(f"{p}: axes[{axis!r}] must be a non-empty {{label: overrides}} dict")
    for label, overrides in labels.items():
      if not label or any(c in str(label) for c in "/-: ") or str(label).startswith("."):
        raise StudyError(f"{p}: axes[{axis!r}] label {label!r} must be a plain name "
                         "(no '/', '-', ':' or spaces)")
      if not isinstance(overrides, Mapping):
        raise StudyError(f"{p}: axes[{axis!r}][{label!r}] must be a {{field: value}} dict")
      for field in overrides:
        scope, _ = _split_scope(field)
        if scope is not None and scope not in SCOPES:
          raise StudyError(f"{p}: axes[{axis!r}][{label!r}] field {field!r}: the scope must "
                           f"be one of {list(SCOPES)}")
    checked[str(axis)] = {str(k): dict(v) for k, v in labels.items()}
  study = Study(path=os.fspath(p), config=_resolve_config_file(raw["config"], p), axes=checked,
                overrides=dict(raw.get("overrides", {})),
                skip=tuple(dict(x) for x in raw.get("skip", ())),
                seed_axis=raw.get("seed_axis", "seed"),
                tables=tuple(raw.get("tables", ())),
                comparisons=tuple(raw.get("comparisons", ())),
                plots=tuple(raw.get("plots", ())),
                evaluations=tuple(dict(e) for e in raw.get("evaluations", ())), paper=dict(raw.get("paper", {})),
                budget=str(raw.get("budget", "")), title=str(raw.get("title", p.stem)))
  for spec in study.evaluations:
    if not spec.get("name") or not isinstance(spec.get("overrides", {}), Mapping):
      raise StudyError(f"{p}: every evaluation needs a name and an overrides dict: {spec}")
  for rule in study.skip:
    for axis, label in rule.items():
      if axis not in checked or label not in checked[axis]:
        raise StudyError(f"{p}: skip {rule} names {axis}={label!r}, which is not an axis "
                         "label of the study")
  if "seed_axis" in raw and study.seed_axis not in checked:
    raise StudyError(f"{p}: seed_axis={study.seed_axis!r} is not one of the axes "
                     f"{list(checked)}")
  return study


def _scoped(overrides: Mapping[str, Any]) -> tuple[dict, dict]:
  """(teacher overrides, student overrides) of one {field: value} dict."""
  teacher, student = {}, {}
  for field, value in overrides.items():
    scope, name = _split_scope(field)
    if scope in (None, "teacher") and not (scope is None and name.startswith(STUDENT_ONLY)):
      teacher[name] = value
    if scope in (None, "student") and not (scope is None and name.startswith(TEACHER_ONLY)):
      student[name] = value
  return teacher, student


def expand(study: Study) -> list[Run]:
  """Every run of the grid: the distinct teachers (in order of first use), then one
  student per combination of axis labels (the axes' order; the last axis varies fastest).
  Run names: students "<label>-<label>-...", teachers "teacher[-<label>...]" with the
  labels of the axes that reach the teacher (an axis with a teacher field in any label)."""
  base_teacher, base_student = _scoped(study.overrides)
  teacher_axes = [axis for axis, labels in study.axes.items()
                  if any(_scoped(o)[0] for o in labels.values())]
  teachers: dict[str, Run] = {}
  students = []
  for combo in itertools.product(*[list(labels.items()) for labels in study.axes.values()]):
    labels = tuple((axis, label) for axis, (label, _) in zip(study.axes, combo))
    if any(all(dict(labels)[a] == l for a, l in rule.items()) for rule in study.skip):
      continue
    t_over, s_over = dict(base_teacher), dict(base_student)
    t_labels = [(axis, label) for axis, label in labels if axis in teacher_axes]
    for (axis, label), (_, overrides) in zip(labels, combo):
      t, s = _scoped(overrides)
      t_over.update(t)
      s_over.update(s)
    for over in (t_over, s_over):  # values computed from the combination's labels
      over.update({k: v(dict(labels)) for k, v in over.items() if callable(v)})
    key = json.dumps(sorted(t_over.items()), default=repr)
    if key not in teachers:
      name = "-".join(["teacher", *(label for _, label in t_labels)])
      teachers[key] = Run(name=name, kind="teacher", labels=tuple(t_labels),
                          overrides=tuple(t_over.items()))
    students.append(Run(name="-".join(label for _, label in labels), kind="student",
                        labels=labels, overrides=tuple(s_over.items()),
                        teacher=teachers[key].name))
  return [*teachers.values(), *students]


def select(runs: Sequence[Run], study: Study, only: Mapping[str, Sequence[str]]) -> list[Run]:
  """The students whose label on each axis of `only` ({axis: labels}) is one of those
  labels, and their teachers, in grid order (`--only`: finish some cells first).
  Raises StudyError naming an axis or label the study does not have."""
  for axis, labels in only.items():
    if axis not in study.axes:
      raise StudyError(f"--only {axis}=...: the study has no axis {axis!r} (axes: "
                       f"{list(study.axes)})")
    unknown = sorted(set(labels) - set(study.axes[axis]))
    if unknown:
      raise StudyError(f"--only {axis}={'|'.join(labels)}: no label(s) {unknown} on axis "
                       f"{axis!r} (labels: {list(study.axes[axis])})")
  students = [r for r in runs if r.kind == "student"
              and all(dict(r.labels)[a] in labels for a, labels in only.items())]
  needed = {r.teacher for r in students}
  return [r for r in runs if r in students or r.name in needed]


def parse_only(text: str) -> dict[str, tuple[str, ...]]:
  """`--only` text `axis=label|label,axis=label` -> {axis: (label, ...)}; "" -> {}.
  Raises StudyError for an item without "="."""
  out = {}
  for item in filter(None, (p.strip() for p in text.split(","))):
    axis, eq, labels = item.partition("=")
    if not eq or not labels:
      raise StudyError(f"--only {item!r}: write axis=label (several: axis=a|b)")
    out[axis.strip()] = tuple(label.strip() for label in labels.split("|"))
  return out


def share(runs: Sequence[Run], index: int, count: int) -> list[Run]:
  """The runs of share `index` of `count`: teachers and students each dealt round robin
  in grid order, so the shares are disjoint and cover the grid; each teacher comes just
  before the first student that needs it. Raises StudyError for an index outside
  0..count-1."""
  if count < 1 or not 0 <= index < count:
    raise StudyError(f"--index {index} --count {count}: need 0 <= index < count")
  teachers = [r for r in runs if r.kind == "teacher"]
  students = [r for r in runs if r.kind == "student"]
  first_use = {}
  for i, s in enumerate(students):
    first_use.setdefault(s.teacher, i)
  # Each teacher just before the first student (of any share) that needs it.
  order = {r.name: first_use.get(r.name, len(students)) - 0.5 for r in teachers}
  order.update({r.name: float(i) for i, r in enumerate(students)})
  return sorted(teachers[index::count] + students[index::count], key=lambda r: order[r.name])


# ---------------------------------------------------------------------------
# commands and state
# ---------------------------------------------------------------------------
def flag_value(value: Any) -> str:
  """A config value as ml_collections parses it from the command line: strings as they
  are, tuples and lists as a Python tuple literal, numbers and bools by repr."""
  if isinstance(value, str):
    return value
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return repr(value)


def command(run: Run, study: Study, root: epath.Path, *, python: str = sys.executable,
            extra: Sequence[str] = ()) -> list[str]:
  """The `python -m kd_jax.main` argv of `run` (absolute workdir and teacher dir)."""
  overrides = dict(run.overrides)
  if run.kind == "teacher" or "stages" not in overrides:
    overrides["stages"] = (run.stage,)
  if run.kind == "student":
    overrides["teacher.checkpoint"] = os.fspath(run.teacher_stage_dir(root))
  return [python, "-m", "kd_jax.main", f"--config={study.config}",
          f"--workdir={run.workdir(root)}",
          *(f"--config.{k}={flag_value(v)}" for k, v in overrides.items()), *extra]


def eval_dir(run: Run, root: epath.Path, name: str) -> epath.Path:
  """Where evaluation `name` of a finished run writes its test.json."""
  return _eval_dir(run.stage_dir(root), name)


def _eval_dir(stage_dir: epath.Path, name: str) -> epath.Path:
  return stage_dir / f"eval_{name}"


def evaluations(study: Study, runs: Sequence[Run]) -> list[tuple[Run, dict]]:
  """(run, evaluation spec) for every student matching a spec's `where`, each preceded
  by its teacher (once per teacher and spec). A share runs the evaluations of every
  `count`-th teacher's group (the teacher's result is its students' retention base)."""
  by_name = {r.name: r for r in runs}
  out, seen = [], set()
  for spec in study.evaluations:
    where = dict(spec.get("where", {}))
    for run in runs:
      if run.kind != "student" or any(dict(run.labels).get(a) != l for a, l in where.items()):
        continue
      for r in (by_name[run.teacher], run):
        if (r.name, spec["name"]) not in seen:
          seen.add((r.name, spec["name"]))
          out.append((r, spec))
  return out


def eval_command(run: Run, spec: Mapping, study: Study, root: epath.Path, *,
                 python: str = sys.executable) -> list[str]:
  """The `python -m kd_jax.evaluate` argv of evaluation `spec` of a finished run: the
  run's own overrides (its data fields), then the spec's; a student's retention is
  against its teacher's result of the same evaluation."""
  overrides = dict(run.overrides, **dict(spec.get("overrides", {})))
  argv = [python, "-m", "kd_jax.evaluate", f"--config={study.config}",
          f"--stage={run.stage_dir(root)}", f"--out={eval_dir(run, root, spec['name'])}",
          *(f"--config.{k}={flag_value(v)}" for k, v in overrides.items())]
  if run.teacher is not None:
    argv.append(f"--teacher={_eval_dir(run.teacher_stage_dir(root), spec['name'])}/test.json")
  return argv


def read_record(run: Run, root: epath.Path) -> dict:
  f = run.workdir(root) / RUN_RECORD
  return json.loads(f.read_text()) if f.exists() else {}


def state(run: Run, root: epath.Path) -> str:
  """finished (result file) | running (lock held) | failed (last attempt's exit code
  not 0) | stopped (a checkpoint) | pending."""
  if run.result_file(root).exists():
    return "finished"
  if (run.workdir(root) / "kd_jax.lock").exists():
    return "running"
  if read_record(run, root).get("returncode", 0) != 0:
    return "failed"
  if (run.stage_dir(root) / "checkpoints").exists():
    return "stopped"
  return "pending"


def _literal(text: str) -> Any:
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return list(value) if isinstance(value, tuple) else value


@functools.lru_cache(maxsize=None)
def _config_defaults(path: str) -> dict[str, Any]:
  """{dotted field: value} of a config file's get_config() ({} if it does not load)."""
  try:
    spec = importlib.util.spec_from_file_location("_study_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config().to_dict()
  except Exception:  # noqa: BLE001 - then every flag counts
    return {}
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  walk(config, "")
  return out


def run_identity(argv: Sequence[str], teacher: str | None = None) -> str:
  """What a run computes, whichever study holds it: the `--config.<field>=<value>`
  flags of its `kd_jax.main` argv (`command`, or a record's command split) that differ
  from the config file's own values, without --workdir and the teacher dir; the config
  file by a hash of its text (a missing file: by its path); and `teacher`, the teacher
  run's identity (None for a teacher). Raises nothing."""
  config_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
  defaults = _config_defaults(config_path) if config_path else {}
  try:
    config_id = "sha256:" + hashlib.sha256(epath.Path(config_path).read_bytes()).hexdigest()
  except OSError:
    config_id = config_path
  flags = {}
  for arg in argv[3:]:  # after python -m kd_jax.main
    if not arg.startswith("--config.") or "=" not in arg:
      continue
    field, text = arg[len("--config."):].split("=", 1)
    if field == "teacher.checkpoint":
      continue
    value = _literal(text)
    if field in defaults and defaults[field] == value:
      continue
    flags[field] = value
  return json.dumps([config_id, sorted(flags.items(), key=lambda kv: kv[0]), teacher],
                    default=repr)


def finished_runs(workdirs: Sequence[str | os.PathLike]) -> dict[str, epath.Path]:
  """{run_identity: run dir (links resolved)} of the finished runs recorded in the
  `manifest.json` of each study workdir or archive in `workdirs`: the identity the run's
  record stores (written when it ran), else computed from its command now; dirs without
  a manifest are skipped."""
  out: dict[str, epath.Path] = {}
  for directory in workdirs:
    manifest = epath.Path(directory) / MANIFEST
    if not manifest.exists():
      continue
    entries = {e["name"]: e for e in json.loads(manifest.read_text())["runs"]}
    for e in entries.values():  # an archive's are relative to it
      e["workdir"] = os.fspath(epath.Path(directory) / e["workdir"])

    def identity(entry):
      record = epath.Path(entry["workdir"]) / RUN_RECORD
      if not record.exists():
        return None
      record = json.loads(record.read_text())
      if record.get("identity"):  # as it ran: the config file may have changed since
        return record["identity"]
      command = record.get("command")
      teacher = None
      if entry.get("teacher"):
        teacher = identity(entries[entry["teacher"]])
        if teacher is None:
          return None
      return run_identity(shlex.split(command), teacher) if command else None

    for entry in entries.values():
      stage = "teacher" if entry["kind"] == "teacher" else "student"
      if not (epath.Path(entry["workdir"]) / stage / "test.json").exists():
        continue
      key = identity(entry)
      if key is not None:  # a link (reused itself): where it points
        out.setdefault(key, epath.Path(os.path.realpath(entry["workdir"])))
  return out


def _identities(runs: Sequence[Run], study: Study, root: epath.Path, extra) -> dict[str, str]:
  by_name, out = {r.name: r for r in runs}, {}
  for run in runs:  # teachers come before their students (expand)
    teacher = out[by_name[run.teacher].name] if run.teacher else None
    out[run.name] = run_identity(command(run, study, root, extra=extra), teacher)
  return out


def _sibling_workdirs(root: epath.Path) -> list[epath.Path]:
  if not root.parent.exists():
    return []
  return sorted(d for d in root.parent.iterdir()
                if d != root and d.is_dir() and (d / MANIFEST).exists())


def write_manifest(study: Study, runs: Sequence[Run], root: epath.Path) -> dict:
  """`<workdir>/manifest.json`: the study file, base config and every run with its
  kind, labels, teacher, state, command and wall time (seconds, over all attempts)."""
  entries = []
  for run in runs:
    record = read_record(run, root)
    entries.append({"name": run.name, "kind": run.kind, "labels": dict(run.labels),
                    "teacher": run.teacher, "state": state(run, root),
                    "workdir": os.fspath(run.workdir(root)),
                    "overrides": {k: v for k, v in run.overrides},
                    "wall_s": record.get("wall_s", 0.0),
                    "command": record.get("command")})
    if os.path.islink(run.workdir(root)):
      entries[-1]["reused_from"] = os.path.realpath(run.workdir(root))
  counts = {s: sum(e["state"] == s for e in entries) for s in STATES}
  manifest = {"study": study.path, "config": study.config, "counts": counts, "runs": entries}
  root.mkdir(parents=True, exist_ok=True)
  paths.write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=2, default=repr) + "\n")
  return manifest


def has_weights(run: Run, root: epath.Path) -> bool:
  """Whether a run's stage dir holds checkpoints (a restored archived run does not)."""
  return (run.stage_dir(root) / "checkpoints").exists()


def _archived_files(run_dir: epath.Path):
  """(relative path, file) of a run dir's files that an archive keeps."""
  base = os.path.realpath(run_dir)
  for dirpath, dirnames, filenames in os.walk(base):
    dirnames[:] = sorted(d for d in dirnames if d not in ARCHIVE_SKIP)
    for name in sorted(filenames):
      f = os.path.join(dirpath, name)
      if name not in ARCHIVE_SKIP and os.path.getsize(f) <= ARCHIVE_MAX_BYTES:
        yield os.path.relpath(f, base), f


def archive_runs(study: Study, runs: Sequence[Run], root: epath.Path, archive: epath.Path,
                 identities: Mapping[str, str]) -> int:
  """Copies every finished run of `runs` under `root` into `archive/runs/<name>` (its
  small files, `_archived_files`; a file whose size and time match is not copied again;
  its record with its identity, `identities[name]` if it has none) and lists it in
  `archive/manifest.json` (workdirs relative to the archive; entries of other runs
  kept). Returns the number of files copied."""
  manifest_file = archive / MANIFEST
  entries = {}
  if manifest_file.exists():
    entries = {e["name"]: e for e in json.loads(manifest_file.read_text())["runs"]}
  copied = 0
  for run in runs:
    if state(run, root) != "finished":
      continue
    target = archive / "runs" / run.name
    for rel, src in _archived_files(run.workdir(root)):
      dst = target / rel
      if rel == RUN_RECORD:
        record = json.loads(epath.Path(src).read_text())
        record.setdefault("identity", identities[run.name])
        text = json.dumps(record, indent=2) + "\n"
        if not dst.exists() or dst.read_text() != text:
          dst.parent.mkdir(parents=True, exist_ok=True)
          paths.write_text_atomic(dst, text)
          copied += 1
        continue
      st = os.stat(src)
      if os.path.exists(dst) and (os.path.getsize(dst), int(os.path.getmtime(dst))) == (
          st.st_size, int(st.st_mtime)):
        continue
      dst.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src, os.fspath(dst))
      copied += 1
    entries[run.name] = {"name": run.name, "kind": run.kind, "labels": dict(run.labels),
                         "teacher": run.teacher, "state": "finished",
                         "workdir": os.fspath(epath.Path("runs") / run.name)}
  if copied or not manifest_file.exists():
    archive.mkdir(parents=True, exist_ok=True)
    paths.write_text_atomic(manifest_file, json.dumps(
        {"study": os.path.basename(study.path), "runs": list(entries.values())},
        indent=2, default=repr) + "\n")
  return copied


def restore_runs(runs: Sequence[Run], root: epath.Path, archived: Mapping[str, epath.Path],
                 identities: Mapping[str, str], out: Callable[[str], None] = print,
                 dry_run: bool = False, linked: Mapping[str, epath.Path] | None = None
                 ) -> list[Run]:
  """Copies the archived run of the same identity (`archived`: `finished_runs` of an
  archive) into the workdir of every run of `runs` that has none and that `linked`
  (finished runs with weights, of sibling studies) does not hold; returns those runs.
  With `dry_run` only says which it would restore."""
  restored = []
  for run in runs:
    found = archived.get(identities.get(run.name))
    if (found is None or os.path.lexists(run.workdir(root))
        or identities[run.name] in (linked or {})):
      continue
    out(f"# {run.name}: restore {found}" if dry_run else
        f"[study] {run.name}: restored from the archive {found}")
    if not dry_run:
      shutil.copytree(os.fspath(found), os.fspath(run.workdir(root)))
    restored.append(run)
  return restored


def _retrain_teacher(run: Run, root: epath.Path, out: Callable[[str], None]) -> float | None:
  """Clears a finished teacher that has no weights (restored from an archive, or a link
  to one) so it trains again; returns its archived avg score."""
  if os.path.islink(run.workdir(root)):
    target = os.path.realpath(run.workdir(root))
    os.unlink(run.workdir(root))
    shutil.copytree(target, os.fspath(run.workdir(root)),
                    ignore=shutil.ignore_patterns(*ARCHIVE_SKIP))
  archived = json.loads(run.result_file(root).read_text()).get("avg_macro_f1")
  shutil.rmtree(os.fspath(run.stage_dir(root)))
  out(f"[study] {run.name}: its weights are not archived and a student needs them: "
      "training it again")
  return archived


class _Stop:
  """SIGTERM / SIGINT: passed on to the run in progress (which saves and exits), and the
  study stops after it."""

  def __init__(self):
    self.requested, self.child = False, None

  def handle(self, signum, frame):
    del frame
    self.requested = True
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signal.SIGTERM)
    logging.warning("signal %d: stopping the study after the run in progress", signum)


def _spawn(argv: list[str], log_file: epath.Path, stop: _Stop, env) -> int:
  """Runs `argv` with its output appended to `log_file` (after a dated command line),
  as `stop`'s child; returns its exit code."""
  with open(os.fspath(log_file), "a") as log:
    log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n")
    log.flush()
    stop.child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    rc = stop.child.wait()
    stop.child = None
  return rc


def _execute(run: Run, argv: list[str], root: epath.Path, stop: _Stop, env,
             identity: str) -> int:
  """Runs one kd_jax.main process; its output goes to <run>/study.log; records the
  command, its `run_identity`, exit code and accumulated wall time in
  <run>/study_run.json."""
  workdir = run.workdir(root)
  workdir.mkdir(parents=True, exist_ok=True)
  record = read_record(run, root)
  start = time.time()
  rc = _spawn(argv, workdir / "study.log", stop, env)
  record.update(command=shlex.join(argv), identity=identity, returncode=rc,
                wall_s=record.get("wall_s", 0.0) + time.time() - start,
                attempts=record.get("attempts", 0) + 1)
  paths.write_text_atomic(workdir / RUN_RECORD, json.dumps(record, indent=2) + "\n")
  return rc


def run_study(study: Study, workdir: str | os.PathLike, *, index: int = 0, count: int = 1,
              python: str = sys.executable, extra: Sequence[str] = (), dry_run: bool = False,
              poll_s: float = 30.0, out: Callable[[str], None] = print,
              reuse: Sequence[str | os.PathLike] | None = None,
              only: Mapping[str, Sequence[str]] | None = None,
              archive: str | os.PathLike | None = None) -> int:
  """Runs share `index` of `count` of the study's grid under `workdir` (see the module
  docstring); `extra`: config flags added to every run. Returns 0 when no run of the
  share failed (a run may have stopped itself: `train.stop_after_steps`), 1 when one
  failed or was skipped, 130 when stopped by a signal. `reuse`: study workdirs whose
  finished runs stand in for identical pending ones (linked, not retrained); None:
  every study workdir beside `workdir`; () none. `only`: run just the cells it selects
  (`select`); the manifest still lists the whole grid. `archive`: restore matching
  archived runs first, archive every finished run of the share after each run (see the
  module docstring).
  With `dry_run`, prints the commands still to run (and the runs it would reuse or
  restore) and runs nothing."""
  root = paths.resolve(workdir)
  runs = expand(study)
  selected = select(runs, study, only) if only else runs
  mine = share(selected, index, count)
  by_name = {r.name: r for r in runs}
  elsewhere = finished_runs(_sibling_workdirs(root) if reuse is None else
                            [paths.resolve(d) for d in reuse if paths.resolve(d) != root])
  archive = paths.resolve(archive) if archive else None
  archived = finished_runs([archive]) if archive else {}
  identities = _identities(runs, study, root, extra)
  restored = restore_runs(mine, root, archived, identities, out=out, dry_run=dry_run,
                          linked=elsewhere)

  def students_waiting(teacher):
    return any(r.teacher == teacher.name and r not in restored
               and state(r, root) != "finished" for r in selected)

  def reusable(run):
    found = elsewhere.get(identities.get(run.name))
    return found if found is not None and not os.path.lexists(run.workdir(root)) else None

  if dry_run:
    for run in mine:
      if run in restored and not (run.kind == "teacher" and students_waiting(run)):
        continue
      if state(run, root) != "finished":
        found = reusable(run)
        out(f"# {run.name}: reuse {found}" if found else
            shlex.join(command(run, study, root, python=python, extra=extra)))
    return 0
  env = dict(os.environ)
  stop, rc_total = _Stop(), 0
  previous = {s: signal.signal(s, stop.handle) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    write_manifest(study, runs, root)
    for i, run in enumerate(mine):
      if stop.requested:
        break
      current = state(run, root)
      archived_avg = None
      if (current == "finished" and run.kind == "teacher" and not has_weights(run, root)
          and students_waiting(run)):
        archived_avg, current = _retrain_teacher(run, root, out), "pending"
      if current == "finished":
        continue
      if os.path.islink(run.workdir(root)) and not run.workdir(root).exists():
        out(f"[study] {run.name}: its link to {os.readlink(run.workdir(root))} is broken: "
            "removed, the run trains here")
        os.unlink(run.workdir(root))
      found = reusable(run)
      if found is not None:  # the same run, finished by another study
        run.workdir(root).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(found, run.workdir(root), target_is_directory=True)
        out(f"[study] {run.name}: reused {found} (same command, finished)")
        continue
      if run.teacher is not None:
        teacher = by_name[run.teacher]

        def ready():
          return state(teacher, root) == "finished" and has_weights(teacher, root)
        while not ready() and state(teacher, root) != "failed" and not stop.requested:
          if teacher in mine and mine.index(teacher) < i:
            break  # this share's teacher did not finish (stopped): nothing to wait for
          out(f"[study] {run.name}: waiting for {teacher.name} (another share)")
          time.sleep(poll_s)
        if not ready():
          out(f"[study] {run.name}: skipped, its teacher {teacher.name} is "
              f"{state(teacher, root)}" + ("" if state(teacher, root) != "finished" else
                                           " without weights"))
          rc_total = 1
          continue
      argv = command(run, study, root, python=python, extra=extra)
      out(f"[study] {run.name} ({current}): {shlex.join(argv)}")
      rc = _execute(run, argv, root, stop, env, identities[run.name])
      out(f"[study] {run.name}: {state(run, root)} (exit {rc}, "
          f"{read_record(run, root)['wall_s']:.0f} s)")
      if archived_avg is not None and state(run, root) == "finished":
        again = json.loads(run.result_file(root).read_text()).get("avg_macro_f1")
        out(f"[study] {run.name}: trained again: avg {again} (archived: {archived_avg})")
      if rc != 0 and not stop.requested:
        rc_total = 1
      write_manifest(study, runs, root)
      if archive:
        archive_runs(study, mine, root, archive, identities)
    all_evals = evaluations(study, runs)
    groups = list(dict.fromkeys(r.teacher or r.name for r, _ in all_evals))
    mine_evals = [(r, spec) for r, spec in all_evals
                  if groups.index(r.teacher or r.name) % count == index]
    for run, spec in mine_evals:
      done = eval_dir(run, root, spec["name"]) / "test.json"
      if done.exists() or state(run, root) != "finished" or stop.requested:
        continue
      argv = eval_command(run, spec, study, root, python=python)
      out(f"[study] evaluate {spec['name']} {run.name}: {shlex.join(argv)}")
      rc = _spawn(argv, run.workdir(root) / "study.log", stop, env)
      if rc != 0 and not stop.requested:
        out(f"[study] evaluate {spec['name']} {run.name}: failed (exit {rc}), see its study.log")
        rc_total = 1
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  write_manifest(study, runs, root)
  if archive:
    archive_runs(study, mine, root, archive, identities)
  if stop.requested:
    out("[study] stopped; run the same command again to resume")
    return 130
  return rc_total


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra: list[str] = []
  if "--" in argv:
    i = argv.index("--")
    argv, extra = argv[:i], argv[i + 1:]
  p = argparse.ArgumentParser(prog="python -m kd_jax.study", description=__doc__.split("\n")[0],
                              epilog="Arguments after `--` go to every kd_jax.main run.")
  p.add_argument("--study", required=True, help="study file with get_study()")
  p.add_argument("--workdir", required=True, help="the study's directory")
  p.add_argument("--index", type=int, default=0, help="this share, 0..count-1")
  p.add_argument("--count", type=int, default=1, help="number of shares (processes, hosts)")
  p.add_argument("--python", default=sys.executable, help="interpreter of the runs")
  p.add_argument("--dry-run", action="store_true", help="print the commands still to run")
  p.add_argument("--report", action="store_true",
                 help="only write the report (tables, plots) of the finished runs")
  p.add_argument("--poll", type=float, default=30.0, help="seconds between teacher checks")
  p.add_argument("--only", default="",
                 help="run only these cells first: axis=label[|label],... "
                      "(e.g. task=tsm,width=h384); their teachers come along")
  p.add_argument("--archive", default="",
                 help="directory that keeps the finished runs' results across machines "
                      "(e.g. configs/studies/results/<name>): restored from, copied to, and "
                      "given the report")
  p.add_argument("--reuse", default="auto",
                 help="comma-separated study workdirs whose finished runs stand in for "
                      "identical ones here; auto: every study workdir beside --workdir; "
                      "none: train everything here")
  args = p.parse_args(argv)
  reuse = (None if args.reuse == "auto" else () if args.reuse == "none" else
           [d for d in args.reuse.split(",") if d])
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    study = load_study(args.study)
    only = parse_only(args.only)
    share(select(expand(study), study, only), args.index, args.count)
  except StudyError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  rc = 0
  out = functools.partial(print, flush=True)
  if not args.report:
    rc = run_study(study, args.workdir, index=args.index, count=args.count, python=args.python,
                   extra=extra, dry_run=args.dry_run, poll_s=args.poll, out=out, reuse=reuse,
                   only=only, archive=args.archive or None)
  elif args.archive:
    root, runs = paths.resolve(args.workdir), expand(study)
    restore_runs(runs, root, finished_runs([paths.resolve(args.archive)]),
                 _identities(runs, study, root, extra), out=out)
  if args.dry_run or rc == 130:
    return rc
  from kd_jax import study_report
  report = study_report.write_report(study, args.workdir)
  print(f"[study] report: {report}", flush=True)
  if args.archive:
    for f in report.parent.iterdir():
      if f.name in ("report.md", "results.json") or f.suffix == ".png" or (
          f.name.startswith("eval_") and f.suffix == ".json"):
        shutil.copy2(os.fspath(f), os.fspath(paths.resolve(args.archive) / f.name))
    print(f"[study] report copied to {args.archive}", flush=True)
  return rc


if __name__ == "__main__":
  raise SystemExit(main())
