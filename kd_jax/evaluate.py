"""Evaluate a finished stage on another set of languages (zero-shot), without training.

  python -m kd_jax.evaluate --stage runs/x/student --config configs/study.py \
      --out runs/x/student/eval_all --config.data.task=sib200 --config.data.languages="()" \
      [--teacher runs/t/teacher/eval_all/test.json]

Reads the stage's kept parameters (best val, as export does) and the task of
`config.data` (`tasks.load_task`; only its test split is scored), scores it with the
training stages' evaluator and writes `<out>/test.json` and `test.md`; with `--teacher`
result files (the teacher's scores on the same languages), the retention per language.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from kd_jax import checkpoints, config_base, evaluation, hf_io, paths, sharding
from kd_jax.data import batching, tasks
from kd_jax.data.schema import DataError
from kd_jax.models.encoder import Encoder

FLAGS = flags.FLAGS


def _define_flags():
  """The command's flags, defined only when it runs as a program (kd_jax.main defines
  some of the same names, and tests import both modules)."""
  flags.DEFINE_string("stage", None, "A finished teacher or student stage dir.")
  flags.DEFINE_string("out", None, "Output dir for test.json / test.md.")
  flags.DEFINE_list("teacher", [], "Teacher result files (test.json) on the same languages.")
  config_flags.DEFINE_config_file("config", None, "Config file (its data section).",
                                  lock_config=True)
  flags.mark_flags_as_required(["stage", "out", "config"])


def evaluate_stage(stage_dir: epath.Path, config: ml_collections.ConfigDict, out_dir: epath.Path,
                   teacher_results: Sequence[dict] = ()) -> dict:
  """Scores the kept parameters of `stage_dir` on the test split of `config.data`'s task
  and writes `<out_dir>/test.json|md`; returns the metrics (`ClassificationEvaluator`).

  Raises:
    DataError: the task's label names are not the stage's (the labels its
      model_config.json records), or any `tasks.load_task` error.
    FileNotFoundError: the stage has no model_config.json or kept checkpoint.
  """
  cfg, info = checkpoints.load_model_config(stage_dir)
  task = tasks.load_task(config.data, config.seed)
  if info.get("labels") and tuple(info["labels"]) != tuple(task.label_names):
    raise DataError(f"{stage_dir / 'model_config.json'}: the stage was trained on labels "
                    f"{info['labels']}, but task {task.task!r} has {list(task.label_names)}")
  # A reduced-vocabulary student's own tokenizer, else the base model's.
  tokenizer = hf_io.load_tokenizer(info.get("tokenizer") or hf_io.resolve_model_dir(
      info.get("base_model") or config.model))
  data = batching.tokenize_examples(task.splits["test"], tokenizer, config.data.max_length,
                                    task.languages)
  mesh = sharding.create_mesh_from_config(config.mesh)
  params = checkpoints.restore_stage_params(stage_dir, cfg)  # host arrays; jit places them
  model = Encoder(cfg.replace(dtype=config_base.PRECISIONS[config.precision]))
  evaluator = evaluation.ClassificationEvaluator(
      model, data, "test", batch_size=config.student.train.eval_batch_size,
      buckets=config.data.buckets, pad_id=tokenizer.pad_token_id, mesh=mesh,
      label_names=task.label_names, label_kind=task.label_kind,
      seen_languages=task.seen_languages or None, teacher_metrics=list(teacher_results),
      unpad_multiple=config.unpad_multiple if config.unpad else None)
  evaluator(params, 0)
  metrics = dict(evaluator.metrics, stage_dir=str(stage_dir), languages=list(task.languages))
  if checkpoints.is_primary():
    evaluator.write(out_dir, metrics)
  return metrics


def main(argv):
  del argv
  config, _ = paths.resolve_config(FLAGS.config, FLAGS.out)
  teachers = [checkpoints.read_json(paths.resolve(t)) for t in FLAGS.teacher]
  try:
    metrics = evaluate_stage(paths.resolve(FLAGS.stage), config, paths.resolve(FLAGS.out),
                             teachers)
  except (DataError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
  metric = metrics["metric"]
  print(f"{FLAGS.stage}: test {metric} avg {metrics[f'avg_{metric}']:.2f} over "
        f"{len(metrics['per_language'])} languages; {paths.resolve(FLAGS.out) / 'test.json'}")


if __name__ == "__main__":
  from kd_jax import allocator
  allocator.reexec("kd_jax.evaluate")  # CPU: mimalloc, before anything allocates
  _define_flags()
  app.run(main)
