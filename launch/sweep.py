#!/usr/bin/env python3
"""Runs a grid of kd_jax.main runs one after another and tabulates their test macro-F1.

  python launch/sweep.py --sweep configs/sweeps/logit_loss_alpha.py \
      --config configs/tsm_logit_kd.py --workdir runs/sweep [--dry-run] [-- overrides]

The sweep file defines `get_sweep()` -> {run name: {config field: value}}; run `name`
goes to <workdir>/<name>. Runs whose results exist are not started again (a stopped
sweep resumes where it was). At the end <workdir>/sweep.md gets one table row per run
(per-language test macro-F1, their average and the pooled score) plus the best-val
average, and is printed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Mapping

from etils import epath  # kd_jax's one path type: local dirs and gs:// alike

import common

STAGE_DIRS = ("student", "teacher")  # the last stage a run trains


def load_sweep(path: str) -> dict[str, dict]:
  """Reads `get_sweep()` from a Python file.

  Raises:
    ValueError: no such file, no get_sweep(), or a run without overrides / with a name
      that is not a plain directory name.
  """
  p = epath.Path(path)
  if not p.is_file():
    raise ValueError(f"--sweep {path}: no such file")
  spec = importlib.util.spec_from_file_location("_kd_jax_sweep", os.fspath(p))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"--sweep {path}: defines no get_sweep()")
  runs = dict(module.get_sweep())
  for name, overrides in runs.items():
    if not name or "/" in name or name.startswith("."):
      raise ValueError(f"--sweep {path}: run name {name!r} is not a plain directory name")
    if not isinstance(overrides, Mapping) or not overrides:
      raise ValueError(f"--sweep {path}: run {name!r} has no overrides")
  return runs


def override_flags(overrides: Mapping[str, object]) -> list[str]:
  """{"distill.alpha": 0.2} -> ["--config.distill.alpha=0.2"]."""
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def result_file(run_dir: epath.Path, split: str = "test") -> epath.Path | None:
  for stage in STAGE_DIRS:
    f = run_dir / stage / f"{split}.json"
    if f.is_file():
      return f
  return None


def sweep_commands(runs: Mapping[str, Mapping], config: str, workdir: str,
                   common_overrides=(), *, python: str = "python") -> list[common.Command]:
  """One kd_jax.main command per run still without results, in sweep order."""
  out = []
  for name, overrides in runs.items():
    run_dir = epath.Path(workdir) / name
    if result_file(run_dir) is None:
      argv = common.main_argv(config, str(run_dir), [*common_overrides, *override_flags(overrides)],
                              python=python)
      out.append(common.cmd(*argv))
  return out


def sweep_table(runs: Mapping[str, Mapping], workdir: str) -> str:
  """Markdown table of the finished runs' test macro-F1; unfinished runs are listed below."""
  from kd_jax.evaluation import format_markdown_table

  test, val_avg, missing, languages = {}, {}, [], []
  for name in runs:
    f = result_file(epath.Path(workdir) / name)
    if f is None:
      missing.append(name)
      continue
    test[name] = json.loads(f.read_text())
    for lang in test[name].get("per_language", {}):
      if lang not in languages:
        languages.append(lang)
    v = result_file(epath.Path(workdir) / name, "val")
    metric = test[name].get("metric", "macro_f1")
    val_avg[name] = json.loads(v.read_text()).get(f"avg_{metric}") if v else None
  table = format_markdown_table(test, languages)
  lines = table.rstrip("\n").split("\n")
  lines[0] += " best val avg |"
  lines[1] += "---:|"
  rows = iter(test)  # one row per run, each maybe followed by its retention row
  for i in range(2, len(lines)):
    if lines[i].split(" | ")[0].endswith(" retention %"):
      lines[i] += " - |"
      continue
    value = val_avg[next(rows)]
    lines[i] += f" {value:.2f} |" if value is not None else " - |"
  text = "\n".join(lines) + "\n"
  if missing:
    text += f"\nNot finished: {', '.join(missing)}\n"
  return text


def main(argv=None) -> int:
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--sweep", required=True, help="Python file with get_sweep()")
  args = common.parse(p, argv)
  try:
    runs = load_sweep(args.sweep)
  except ValueError as e:
    p.error(str(e))
  commands = sweep_commands(runs, args.config, args.workdir, args.overrides, python=args.python)
  rc = common.execute(commands, args.dry_run)
  if args.dry_run or rc:
    return rc
  table = sweep_table(runs, args.workdir)
  (epath.Path(args.workdir) / "sweep.md").write_text(table)
  sys.stdout.write(table)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
