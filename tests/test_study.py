"""The study runner (kd_jax.study) and its report (kd_jax.study_report): the grid's
teachers and students, shares, commands, skipping and resuming, aggregation against hand
computation, tables, comparisons and plots; and a tiny grid run end to end."""

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
from etils import epath

from kd_jax import study as study_lib
from kd_jax import study_report

from conftest import ROOT, tiny_config

STUDY = '''
from kd_jax.study import seeds

def get_study():
  return dict(
      config={config!r},
      overrides={{"data.train_fraction": 0.5}},
      axes=dict(
          data={{"all": {{}}, "en": {{"data.train_languages": ("english",)}}}},
          init={{"from_teacher": {{"student.init": "from_teacher"}},
                "from_base": {{"student.init": "from_base"}}}},
          seed=seeds((0, 1))),
      tables=[dict(name="t2", rows="init", columns="data")],
      comparisons=[dict(axis="init", a="from_teacher", b="from_base")],
      plots=[dict(name="bars", kind="languages", bars="init", where={{"data": "all"}})],
  )
'''


def write_study(tmp_path, body=STUDY, config="configs/default.py"):
  f = tmp_path / "study.py"
  f.write_text(body.format(config=config))
  return study_lib.load_study(f)


def test_grid_trains_each_teacher_once_and_scopes_fields(tmp_path):
  study = write_study(tmp_path)
  runs = study_lib.expand(study)
  teachers = [r for r in runs if r.kind == "teacher"]
  students = [r for r in runs if r.kind == "student"]
  # student.init never reaches the teacher and the seeds are student:seed: one teacher
  # per training-data label.
  assert [t.name for t in teachers] == ["teacher-all", "teacher-en"]
  assert dict(teachers[1].overrides) == {"data.train_fraction": 0.5,
                                         "data.train_languages": ("english",)}
  assert len(students) == 8 and students[0].name == "all-from_teacher-seed0"
  assert dict(students[1].overrides) == {"data.train_fraction": 0.5,
                                         "student.init": "from_teacher", "seed": 1}
  assert {s.teacher for s in students if dict(s.labels)["data"] == "en"} == {"teacher-en"}
  argv = study_lib.command(students[1], study, epath.Path("/w"), python="py")
  assert argv == ["py", "-m", "kd_jax.main", f"--config={ROOT / 'configs/default.py'}",
                  "--workdir=/w/runs/all-from_teacher-seed1",
                  "--config.data.train_fraction=0.5", "--config.student.init=from_teacher",
                  "--config.seed=1", "--config.stages=('distill',)",
                  "--config.teacher.checkpoint=/w/runs/teacher-all/teacher"]
  assert study_lib.command(teachers[1], study, epath.Path("/w"), python="py")[5:] == [
      "--config.data.train_fraction=0.5", "--config.data.train_languages=('english',)",
      "--config.stages=('finetune_teacher',)"]
  # One teacher per seed when the seed axis reaches the teacher.
  per_seed = write_study(tmp_path, STUDY.replace("seeds((0, 1))", 'seeds((0, 1), "seed")'))
  assert len([r for r in study_lib.expand(per_seed) if r.kind == "teacher"]) == 4


def test_shares_are_disjoint_and_cover_the_grid(tmp_path):
  runs = study_lib.expand(write_study(tmp_path))
  shares = [study_lib.share(runs, i, 3) for i in range(3)]
  names = [r.name for s in shares for r in s]
  assert sorted(names) == sorted(r.name for r in runs) and len(set(names)) == len(runs)
  # A teacher comes just before the first student that needs it.
  assert [r.name for r in shares[0][:3]] == ["teacher-all", "all-from_teacher-seed0",
                                            "all-from_base-seed1"]
  assert [r.name for r in shares[1][:3]] == ["all-from_teacher-seed1", "teacher-en",
                                            "en-from_teacher-seed0"]
  with pytest.raises(study_lib.StudyError, match="--index 3 --count 3"):
    study_lib.share(runs, 3, 3)


def test_only_selects_cells_and_their_teachers(tmp_path):
  study = write_study(tmp_path)
  runs = study_lib.expand(study)
  only = study_lib.parse_only("data=en, seed=seed1|seed0 ,init=from_base")
  assert only == {"data": ("en",), "seed": ("seed1", "seed0"), "init": ("from_base",)}
  assert [r.name for r in study_lib.select(runs, study, only)] == [
      "teacher-en", "en-from_base-seed0", "en-from_base-seed1"]
  for text, message in [("data=xx", r"no label\(s\) \['xx'\] on axis 'data'"),
                        ("width=h384", "the study has no axis 'width'")]:
    with pytest.raises(study_lib.StudyError, match=message):
      study_lib.select(runs, study, study_lib.parse_only(text))
  with pytest.raises(study_lib.StudyError, match="write axis=label"):
    study_lib.parse_only("data")
  lines = []
  assert study_lib.run_study(study, tmp_path / "w", dry_run=True, out=lines.append,
                             only={"init": ("from_teacher",), "data": ("all",)}) == 0
  assert [line.split("--workdir=")[1].split()[0].rsplit("/", 1)[1] for line in lines] == [
      "teacher-all", "all-from_teacher-seed0", "all-from_teacher-seed1"]


@pytest.mark.parametrize("body, message", [
    ("x = 1\n", "defines no get_study"),
    ("def get_study():\n  return dict(config='configs/default.py')\n", "has no axes"),
    ("def get_study():\n  return dict(config='nope.py', axes={'a': {'x': {}}})\n",
     "config='nope.py' is not a file"),
    ("def get_study():\n  return dict(config='configs/default.py', axes={'a': {'x-y': {}}})\n",
     "label 'x-y' must be a plain name"),
    ("def get_study():\n  return dict(config='configs/default.py', axes={'a': {'x': {}}},"
     " tabels=[])\n", "unknown keys \\['tabels'\\]"),
    ("def get_study():\n  return dict(config='configs/default.py',"
     " axes={'a': {'x': {'both:seed': 1}}})\n", "field 'both:seed': the scope"),
])
def test_study_file_errors_name_the_file_and_field(tmp_path, body, message):
  f = tmp_path / "bad.py"
  f.write_text(body)
  with pytest.raises(study_lib.StudyError, match=message) as e:
    study_lib.load_study(f)
  assert str(f) in str(e.value)


def _fake_result(path, per_language, teacher=None):
  """A test.json as the evaluator writes it (macro-F1, two languages)."""
  result = {"metric": "macro_f1", "per_language": {k: {"macro_f1": v}
                                                   for k, v in per_language.items()},
            "avg_macro_f1": float(np.mean(list(per_language.values()))),
            "overall": {"macro_f1": float(np.mean(list(per_language.values()))) - 1.0}}
  if teacher:
    result["retention"] = {"avg": 100 * result["avg_macro_f1"] / teacher}
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result))


def test_report_aggregates_seeds_compares_pairs_and_plots(tmp_path):
  study = write_study(tmp_path)
  root = tmp_path / "w"
  _fake_result(root / "runs/teacher-all/teacher/test.json", {"english": 70.0, "hindi": 60.0})
  scores = {("from_teacher", 0): (62.0, 50.0), ("from_teacher", 1): (60.0, 54.0),
            ("from_base", 0): (58.0, 44.0), ("from_base", 1): (57.0, 49.0)}
  for (init, seed), (en, hi) in scores.items():
    _fake_result(root / f"runs/all-{init}-seed{seed}/student/test.json",
                 {"english": en, "hindi": hi}, teacher=65.0)
  report = study_report.write_report(study, root)
  results = json.loads((root / "results.json").read_text())
  cell = results["cells"]["all-from_teacher"]["metrics"]
  # avg per seed: (62 + 50) / 2 = 56, (60 + 54) / 2 = 57 -> mean 56.5, sample std 0.7071
  assert cell["avg"]["values"] == {"seed0": 56.0, "seed1": 57.0}
  assert cell["avg"]["mean"] == pytest.approx(56.5)
  assert cell["avg"]["std"] == pytest.approx(np.sqrt(0.5))
  assert cell["lang:hindi"]["mean"] == pytest.approx(52.0)
  assert cell["retention_avg"]["mean"] == pytest.approx(100 * 56.5 / 65.0)
  # Pairs of the same seed: 56 - 51 = 5 and 57 - 53 = 4 -> mean 4.5, std 0.7071;
  # t = 4.5 / (0.7071 / sqrt 2) = 9, two-sided p with 1 dof = 0.0704.
  comparison = results["comparisons"][0]
  assert comparison["n"] == 2 and comparison["mean"] == pytest.approx(4.5)
  assert comparison["std"] == pytest.approx(np.sqrt(0.5))
  assert comparison["p_value"] == pytest.approx(0.07045, abs=1e-4)
  assert comparison["verdict"] == "inconclusive"
  text = report.read_text()
  assert "| init | all | en |" in text
  assert "| teacher | 65.00 | - |" in text
  assert "| from_teacher | 56.50 ± 0.71 | - |" in text
  assert "| init: from_teacher > from_base | avg | 2 | 4.50 | 0.71 | 0.070 | inconclusive |" in text
  png = root / "bars.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "![" in text
  assert results["runs"]["en-from_base-seed1"]["state"] == "pending"


def test_finished_runs_of_another_study_are_reused_not_retrained(tmp_path):
  """A second study whose teacher and one student are, flag for flag (a flag equal to
  the config's own value does not count), runs that a sibling study finished links
  them instead of training them; the others still run (here `false`: exit 1)."""
  study = write_study(tmp_path)
  first, second = tmp_path / "studies" / "a", tmp_path / "studies" / "b"
  runs = study_lib.expand(study)
  by_name = {r.name: r for r in runs}
  done = [by_name["teacher-all"], by_name["all-from_teacher-seed0"]]
  for run in done:  # a teacher and one of its students: finished in study a
    argv = study_lib.command(run, study, epath.Path(first))
    (first / "runs" / run.name).mkdir(parents=True)
    (first / "runs" / run.name / "study_run.json").write_text(json.dumps(
        {"command": shlex.join(argv), "returncode": 0, "wall_s": 5.0}))
    _fake_result(first / "runs" / run.name / run.stage_name / "test.json", {"english": 50.0})
  study_lib.write_manifest(study, runs, epath.Path(first))
  # Study b names the student's init differently and states a default explicitly.
  (tmp_path / "b_files").mkdir()
  other = write_study(tmp_path / "b_files", STUDY.replace(
      '"from_teacher": {{"student.init": "from_teacher"}}',
      '"copy": {{"student.init": "from_teacher", "student.num_layers": 6}}'))
  copy = {r.name: r for r in study_lib.expand(other)}["all-copy-seed0"]
  assert study_lib.run_identity(study_lib.command(copy, other, epath.Path(second))) == \
      study_lib.run_identity(study_lib.command(done[1], study, epath.Path(first)))
  lines = []
  rc = study_lib.run_study(other, second, python="false", out=lines.append)
  assert rc == 1
  teacher, student = (second / "runs" / "teacher-all"), (second / "runs" / "all-copy-seed0")
  assert teacher.is_symlink() and os.path.realpath(teacher) == str(first / "runs/teacher-all")
  assert student.is_symlink() and os.path.realpath(student) == str(
      first / "runs" / done[1].name)
  assert not (second / "runs" / "all-copy-seed1").is_symlink()  # another seed: trained
  manifest = json.loads((second / "manifest.json").read_text())
  reused = {e["name"]: e.get("reused_from") for e in manifest["runs"]}
  assert reused["all-copy-seed0"] == str(first / "runs" / done[1].name)
  assert reused["all-copy-seed1"] is None
  assert any("all-copy-seed0: reused" in line for line in lines)
  # --reuse none: nothing is linked
  third = tmp_path / "studies" / "c"
  study_lib.run_study(other, third, python="false", out=lines.append, reuse=())
  assert not (third / "runs" / "teacher-all").is_symlink()


def test_training_loss_curve_from_event_files(tmp_path):
  from clu import metric_writers
  writer = metric_writers.create_default_writer(str(tmp_path))
  for step, loss in ((10, 1.5), (20, 1.25), (30, 0.75)):
    writer.write_scalars(step, {"train/loss": loss, "train/clf": loss / 2})
  writer.flush()
  assert study_report.train_curve(epath.Path(tmp_path)) == ([10, 20, 30], [1.5, 1.25, 0.75])
  assert study_report.train_curve(epath.Path(tmp_path), "train/clf")[1] == [0.75, 0.625, 0.375]


TINY_STUDY = '''
from kd_jax.study import seeds


def get_study():
  return dict(
      config="base.py",
      overrides={"student.init": "from_teacher"},
      axes=dict(seed=seeds((0, 1)), layers={"L2": {"student.num_layers": 2}}),
      tables=[dict(name="t", rows="layers", columns=())],
      plots=[dict(name="loss", kind="loss", lines="layers"),
             dict(name="bars", kind="languages", bars="layers")],
      evaluations=[dict(name="en", where={"seed": "seed0"}, bars="layers",
                        overrides={"data.languages": ("english",)})],
  )
'''


def test_a_run_is_reused_by_the_config_it_ran_with(tmp_path):
  """The runner records each run's identity when it runs; a config file edited since
  then no longer matches it, so the run is not reused for the edited one."""
  (tmp_path / "base.py").write_text("from kd_jax.config_base import base_config\n\n"
                                    "def get_config():\n  return base_config()\n")
  study = write_study(tmp_path, config=str(tmp_path / "base.py"))
  first = epath.Path(tmp_path / "studies/a")
  study_lib.run_study(study, first, python="true", out=lambda s: None, reuse=(),
                      only={"data": ["all"], "init": ["from_teacher"], "seed": ["seed0"]})
  teacher = study_lib.expand(study)[0]
  record = study_lib.read_record(teacher, first)
  assert record["returncode"] == 0 and record["identity"] == study_lib.run_identity(
      study_lib.command(teacher, study, first))
  _fake_result(teacher.result_file(first), {"english": 50.0})
  study_lib.write_manifest(study, study_lib.expand(study), first)
  second = epath.Path(tmp_path / "studies/b")
  assert study_lib.run_study(study, second, python="true", out=lambda s: None, dry_run=True,
                             only={"data": ["all"]}) == 0
  lines = []
  study_lib.run_study(study, second, python="false", out=lines.append,
                      only={"data": ["all"], "init": ["from_teacher"], "seed": ["seed0"]})
  assert os.path.islink(teacher.workdir(second))  # same config: linked
  with open(tmp_path / "base.py", "a") as f:
    f.write("# edited: another config now\n")
  study_lib._config_defaults.cache_clear()
  third = epath.Path(tmp_path / "studies/c")
  study_lib.run_study(study, third, python="false", out=lines.append,
                      only={"data": ["all"], "init": ["from_teacher"], "seed": ["seed0"]})
  assert not os.path.islink(teacher.workdir(third))
  assert study_lib.state(teacher, third) == "failed"  # trained here (`false`)


def test_archive_restores_finished_runs_elsewhere_and_retrains_a_needed_teacher(tmp_path):
  """Finished runs archived from one workdir are restored (copied, without checkpoints)
  into a new one, where nothing of them runs again; an archived teacher (no weights)
  trains again only when one of its students still has to train."""
  study = write_study(tmp_path)
  runs = study_lib.expand(study)
  first, archive = epath.Path(tmp_path / "first"), epath.Path(tmp_path / "archive")
  done = [r for r in runs if r.name == "teacher-all" or r.teacher == "teacher-all"]
  assert len(done) == 5
  for run in done:
    argv = study_lib.command(run, study, first)
    (first / "runs" / run.name).mkdir(parents=True)
    (first / "runs" / run.name / "study_run.json").write_text(json.dumps(
        {"command": shlex.join(argv), "returncode": 0, "wall_s": 5.0, "attempts": 1}))
    _fake_result(first / "runs" / run.name / run.stage_name / "test.json", {"english": 50.0})
    (run.stage_dir(first) / "checkpoints/best").mkdir(parents=True)
    (run.stage_dir(first) / "checkpoints/best/weights").write_bytes(b"w" * 100)
  identities = study_lib._identities(runs, study, first, ())
  assert study_lib.archive_runs(study, runs, first, archive, identities) == 10
  assert study_lib.archive_runs(study, runs, first, archive, identities) == 0  # unchanged
  manifest = json.loads((archive / "manifest.json").read_text())
  assert {e["name"]: e["workdir"] for e in manifest["runs"]} == {
      r.name: f"runs/{r.name}" for r in done}
  assert not list(archive.glob("runs/*/*/checkpoints"))
  record = json.loads((archive / "runs/teacher-all/study_run.json").read_text())
  assert record["identity"] == identities["teacher-all"] and record["attempts"] == 1

  # A new machine: every archived run is restored; teacher-en (not archived) runs.
  second, lines = epath.Path(tmp_path / "second"), []
  rc = study_lib.run_study(study, second, python="false", out=lines.append, reuse=(),
                           archive=archive)
  assert rc == 1  # teacher-en's `false`
  for run in done:
    assert study_lib.state(run, second) == "finished" and not os.path.islink(run.workdir(second))
    assert study_lib.read_record(run, second)["attempts"] == 1
  assert not any("training it again" in line for line in lines)
  assert study_lib.read_record(runs[1], second)["attempts"] == 1  # teacher-en: tried once
  # One student is not archived: its teacher must train again, then the student.
  import shutil
  shutil.rmtree(archive / "runs/all-from_base-seed1")
  third, lines = epath.Path(tmp_path / "third"), []
  study_lib.run_study(study, third, python="false", out=lines.append, reuse=(),
                      archive=archive)
  assert any("teacher-all: its weights are not archived" in line for line in lines)
  teacher = {r.name: r for r in runs}["teacher-all"]
  assert study_lib.state(teacher, third) == "failed"  # trained again (here: `false`)
  assert any("all-from_base-seed1: skipped, its teacher teacher-all is failed" in line
             for line in lines)
  assert study_lib.state({r.name: r for r in runs}["all-from_base-seed0"], third) == "finished"


def _study_argv(*args):
  return [sys.executable, "-m", "kd_jax.study", "--study", "study.py", "--workdir", "w",
          "--poll", "1", *args]


def _study(cwd, *args):
  return subprocess.run(_study_argv(*args), cwd=cwd, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=900)


def test_tiny_grid_shares_stop_resume_and_report(tmp_path, synthetic_model_dir,
                                                 synthetic_data_dir):
  """Two shares at once over 1 teacher + 2 students: share 1's student waits for share
  0's teacher, then finishes; share 0's is stopped after 2 of 6 steps
  (`stop_after_steps`). Then one full run resumes exactly the stopped one, skips
  everything else, runs the evaluation and writes the report."""
  (tmp_path / "base.py").write_text(tiny_config(
      str(synthetic_model_dir), str(synthetic_data_dir), train_fraction=0.02,
      eval_batch_size=32, num_train_steps=6, eval_every_steps=3, log_every_steps=2,
      extra="  config.data.subset_seed = 0\n"))
  (tmp_path / "study.py").write_text(TINY_STUDY)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  second = subprocess.Popen(_study_argv("--index", "1", "--count", "2"), cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
  first = _study(tmp_path, "--index", "0", "--count", "2", "--",
                 "--config.student.train.stop_after_steps=2")
  assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
  out, _ = second.communicate(timeout=900)
  assert second.returncode == 0, out[-3000:]
  assert "seed1-L2: waiting for teacher (another share)" in out
  root = tmp_path / "w"
  manifest = json.loads((root / "manifest.json").read_text())
  states = {r["name"]: r["state"] for r in manifest["runs"]}
  assert states == {"teacher": "finished", "seed0-L2": "stopped", "seed1-L2": "finished"}
  dry = _study(tmp_path, "--dry-run")
  assert dry.stdout.count("kd_jax.main") == 1 and "seed0-L2" in dry.stdout

  third = _study(tmp_path, "--archive", "arch")
  assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-3000:]
  attempts = {r["name"]: json.loads((root / "runs" / r["name"] / "study_run.json").read_text()
                                    )["attempts"] for r in manifest["runs"]}
  assert attempts == {"teacher": 1, "seed0-L2": 2, "seed1-L2": 1}
  assert "resumed" in (root / "runs/seed0-L2/study.log").read_text()
  assert _study(tmp_path, "--dry-run").stdout == ""
  results = json.loads((root / "results.json").read_text())
  values = [json.loads((root / f"runs/seed{s}-L2/student/test.json").read_text()
                       )["avg_macro_f1"] for s in (0, 1)]
  entry = results["cells"]["L2"]["metrics"]["avg"]
  assert entry["values"] == {"seed0": values[0], "seed1": values[1]}
  assert entry["mean"] == pytest.approx(np.mean(values))
  assert entry["std"] == pytest.approx(np.std(values, ddof=1))
  assert (root / "loss.png").is_file() and (root / "bars.png").is_file()
  # The evaluation re-scores the teacher and the seed-0 student on English alone: the
  # same numbers as their own test results, retention against the teacher's.
  for name, stage in (("teacher", "teacher"), ("seed0-L2", "student")):
    own = json.loads((root / f"runs/{name}/{stage}/test.json").read_text())
    again = json.loads((root / f"runs/{name}/{stage}/eval_en/test.json").read_text())
    assert list(again["per_language"]) == ["english"]
    assert again["per_language"]["english"] == own["per_language"]["english"]
  assert again["retention"]["avg"] == pytest.approx(
      100 * again["avg_macro_f1"] / json.loads(
          (root / "runs/teacher/teacher/eval_en/test.json").read_text())["avg_macro_f1"])
  assert not (root / "runs/seed1-L2/student/eval_en").exists()
  zero_shot = json.loads((root / "eval_en.json").read_text())
  assert zero_shot["series"] == ["teacher", "L2"]
  assert zero_shot["languages"]["english"]["L2"] == again["per_language"]["english"][
      "macro_f1"]
  assert (root / "eval_en.png").is_file() and "eval_en.png" in (root / "report.md").read_text()
  # Another machine, from the archive alone (no weights): the same report.
  assert (tmp_path / "arch/report.md").is_file() and (tmp_path / "arch/loss.png").is_file()
  os.rename(root, tmp_path / "w_first")
  again = _study(tmp_path, "--report", "--archive", "arch")
  assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
  assert json.loads((root / "results.json").read_text())["cells"] == results["cells"]
  assert not list(root.glob("runs/*/*/checkpoints"))
