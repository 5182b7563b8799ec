"""A stage's directory on disk: its layout, checkpoints, model config and the workdir lock.

Layout of `<workdir>` (stage directory names: `config_base.STAGE_SECTIONS`)::

  kd_jax.lock                      held by the live run (host, pid), removed when it ends
  results.md                       the per-language table of the classification stages
  <teacher|general|student>/
    model_config.json              EncoderConfig + what the stage was ("stage", "init", ...)
    checkpoints/latest/<step>/     TrainState (student params, projections, optimizer),
                                   the newest two steps, for resuming
    checkpoints/best/<step>/       best-val student params (finetune_teacher, distill)
    checkpoints/final/<step>/      last-step student params (general_distill)
    val.json, val.md               metrics at the best step
    test.json, test.md             test metrics of the best-val params (marks the stage done)
    heldout.json                   held-out MLM metrics (general_distill; marks it done)

The teacher is never part of a student checkpoint (big_vision's distill trainer does the
same): only what the optimizer owns is saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from kd_jax import config_base, hf_io, paths, sharding
from kd_jax.models.encoder import EncoderConfig, init_params

# The file whose existence marks a stage finished (skipped on a rerun).
FINISHED_FILES = {"finetune_teacher": "test.json", "general_distill": "heldout.json",
                  "distill": "test.json"}
# What a stage keeps as its result: "best" by val score, or "final" (the last step).
KEEP = {"finetune_teacher": "best", "general_distill": "final", "distill": "best"}
LOCK_FILE = "kd_jax.lock"
_HELD_LOCKS: set[str] = set()  # lock files this process holds
LATEST_TO_KEEP = 2  # the newest, and the one before it should the newest not restore


class CheckpointError(RuntimeError):
  """No saved step of `checkpoints/latest` restores (all truncated or corrupt)."""


class WorkdirLockedError(config_base.ConfigError):
  """Another live run holds the workdir (its lock file names host and pid)."""


def stage_dir(workdir: epath.Path, stage: str) -> epath.Path:
  """`<workdir>/teacher`, `<workdir>/general` or `<workdir>/student`."""
  return workdir / config_base.STAGE_SECTIONS[stage]


def finished_file(workdir: epath.Path, stage: str) -> epath.Path:
  """The file that marks `stage` of `workdir` finished (FINISHED_FILES)."""
  return stage_dir(workdir, stage) / FINISHED_FILES[stage]


def is_primary() -> bool:
  """Only process 0 writes result files; Orbax coordinates checkpoints across processes."""
  return jax.process_index() == 0


def read_json(path: epath.Path) -> dict:
  return json.loads(path.read_text())


def write_json(path: epath.Path, obj: Any) -> None:
  """Writes `obj` as indented JSON, atomically, on the primary process only."""
  if is_primary():
    paths.write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def save_model_config(stage_dir_: epath.Path, cfg: EncoderConfig, extra: Mapping) -> None:
  """`model_config.json`: the EncoderConfig (without dtype) under "encoder", plus `extra`."""
  fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "dtype"}
  write_json(stage_dir_ / "model_config.json", {"encoder": fields, **extra})


def load_model_config(stage_dir_: epath.Path) -> tuple[EncoderConfig, dict]:
  """(EncoderConfig, the other fields) of a stage's model_config.json.

  Raises FileNotFoundError naming the file when the stage never started."""
  path = stage_dir_ / "model_config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: is {stage_dir_} the directory of a "
                            "finished kd_jax stage? (set config.teacher.checkpoint)")
  info = read_json(path)
  return EncoderConfig(**info.pop("encoder")), info


def is_stage_dir(path: epath.Path) -> bool:
  """True when `path` holds a kd_jax stage's model_config.json."""
  return (path / "model_config.json").is_file()


# ---------------------------------------------------------------------------
# restoring with shape checks
# ---------------------------------------------------------------------------
def check_saved_tree(target: Any, saved: Any, where: str) -> None:
  """Raises hf_io.CheckpointMismatchError listing every leaf that `saved` (the
  checkpoint's metadata tree: shapes) lacks, has in excess, or holds with another shape
  than `target`; `where` names the checkpoint and the model config it was checked
  against. Checked before restoring, so Orbax's own errors are never mistaken for a
  mismatch."""
  flat = lambda tree: {sharding.path_name(k): np.shape(v) for k, v in
                       jax.tree_util.tree_flatten_with_path(tree)[0]}
  want, have = flat(target), flat(saved)
  problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
  problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
  problems += [f"{k}: saved shape {have[k]}, expected {want[k]}"
               for k in sorted(set(want) & set(have)) if have[k] != want[k]]
  if problems:
    raise hf_io.CheckpointMismatchError(f"{where}: " + "; ".join(problems))


def _params_manager(directory: epath.Path, create: bool, best: bool) -> ocp.CheckpointManager:
  options = (ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["val_macro_f1"],
                                          best_mode="max", create=create) if best else
             ocp.CheckpointManagerOptions(max_to_keep=1, create=create))
  return ocp.CheckpointManager(directory, options=options,
                               item_handlers=ocp.StandardCheckpointHandler())  # item_metadata


def _restore_params(mngr: ocp.CheckpointManager, step: int, ckpt_dir: epath.Path,
                    stage_dir_: epath.Path, cfg: EncoderConfig) -> dict:
  target = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), target)
  check_saved_tree(target, mngr.item_metadata(step).tree,
                   f"{ckpt_dir}/{step}: checkpoint does not match the model config "
                   f"{stage_dir_ / 'model_config.json'}")
  return mngr.restore(step, args=ocp.args.StandardRestore(target))


def restore_stage_params(stage_dir_: epath.Path, cfg: EncoderConfig | None = None) -> dict:
  """Host (numpy) parameters a finished stage kept: `checkpoints/final` (general_distill),
  else `checkpoints/best` (finetune_teacher, distill). Every process reads them in full
  (weight copying reads them; `sharding.shard_tree` places them). `cfg`: default the
  stage's model_config.json.

  Raises:
    FileNotFoundError: naming the directory, when the stage has no finished checkpoint.
    hf_io.CheckpointMismatchError (a ValueError): the saved tree does not fit `cfg`.
  """
  if cfg is None:
    cfg, _ = load_model_config(stage_dir_)
  final_dir = stage_dir_ / "checkpoints" / "final"
  ckpt_dir = final_dir if final_dir.is_dir() else stage_dir_ / "checkpoints" / "best"
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f"{ckpt_dir}: no best checkpoint (did the stage finish an eval?)")
  with _params_manager(ckpt_dir, create=False, best=ckpt_dir != final_dir) as mngr:
    step = mngr.latest_step() if ckpt_dir == final_dir else mngr.best_step()
    if step is None:
      raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint (did the stage finish?)")
    return _restore_params(mngr, step, ckpt_dir, stage_dir_, cfg)


# ---------------------------------------------------------------------------
# a training stage's checkpoints
# ---------------------------------------------------------------------------
class StageCheckpoints:
  """The Orbax managers of one training stage behind one object (a context manager).

  `latest` holds the resumable TrainState. What makes a save killed half-way (SIGKILL,
  power loss) harmless is Orbax's own atomicity: a step is written into
  `<step>.orbax-checkpoint-tmp-<n>` and becomes `<step>` only after every process has
  finished (commit file, then atomic rename); `cleanup_tmp_directories` removes the
  half-written directory when the manager is created again. The newest LATEST_TO_KEEP
  steps are kept, so a step whose files were damaged after the commit (truncated by a
  full disk, a bad copy) is skipped with a warning and the run resumes from the one
  before it (`restore_latest`), never silently from step 0.
  `kept` is `checkpoints/best` (keep "best": the best val score, `save_kept(..., score)`)
  or `checkpoints/final` (keep "final").
  """

  def __init__(self, stage_dir_: epath.Path, keep: str):
    self.stage_dir, self.keep = stage_dir_, keep
    self.latest_dir = stage_dir_ / "checkpoints" / "latest"
    self.latest = ocp.CheckpointManager(
        self.latest_dir,
        options=ocp.CheckpointManagerOptions(max_to_keep=LATEST_TO_KEEP, create=True,
                                             cleanup_tmp_directories=True),
        item_handlers=ocp.StandardCheckpointHandler())
    self.kept_dir = stage_dir_ / "checkpoints" / keep
    self.kept = _params_manager(self.kept_dir, create=True, best=keep == "best")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.latest.close()
    self.kept.close()
    return False

  def restore_latest(self, state: Any) -> Any:
    """The newest restorable step of `checkpoints/latest` as `state`'s tree and shardings,
    or `state` itself when nothing was saved yet.

    A step whose files do not read (truncated, corrupt) is skipped with a warning naming
    it, and deleted once an older one restores (so the run can save that step again).
    Raises:
      hf_io.CheckpointMismatchError: a step's saved tree does not fit `state` (the config
        changed): nothing is skipped.
      CheckpointError: steps exist but none restores.
    """
    skipped = []
    for step in sorted(self.latest.all_steps(), reverse=True):
      try:
        saved = self.latest.item_metadata(step).tree
      except Exception as e:  # noqa: BLE001 - unreadable metadata: a damaged step
        saved, error = None, e
      if saved is not None:
        check_saved_tree(state, saved, f"{self.latest_dir}/{step}: the saved training state "
                         "does not match this config")
        try:
          restored = self.latest.restore(step, args=ocp.args.StandardRestore(state))
        except Exception as e:  # noqa: BLE001 - unreadable array files: a damaged step
          error = e
        else:
          for bad in skipped:
            self.latest.delete(bad)
          if skipped:
            logging.warning("resuming %s from step %d; skipped and deleted damaged step(s) %s",
                            self.stage_dir, step, skipped)
          else:
            logging.info("resumed %s from step %d", self.stage_dir, step)
          return restored
      logging.warning("%s/%d does not restore (%s: %s); trying the step before it",
                      self.latest_dir, step, type(error).__name__, str(error)[:300])
      skipped.append(step)
    if skipped:
      raise CheckpointError(f"{self.latest_dir}: no saved step restores (damaged: {skipped}); "
                            "delete that directory to start the stage from step 0")
    return state

  def save_latest(self, step: int, state: Any) -> None:
    self.latest.save(step, args=ocp.args.StandardSave(state))

  def wait(self) -> None:
    self.latest.wait_until_finished()

  def kept_step(self) -> int | None:
    """The step `kept` holds: the best one, or the final one; None before the first save."""
    return self.kept.best_step() if self.keep == "best" else self.kept.latest_step()

  def save_kept(self, step: int, params: Any, score: float | None = None) -> None:
    """Saves `params` as the best (with its val `score`) or final step; returns once the
    files are complete, so no result file ever names an unfinished checkpoint."""
    metrics = {"val_macro_f1": score} if self.keep == "best" else None
    self.kept.save(step, args=ocp.args.StandardSave(params), metrics=metrics)
    self.kept.wait_until_finished()

  def restore_kept(self, target: Any) -> Any:
    """The kept parameters as `target`'s tree and shardings."""
    return self.kept.restore(self.kept_step(), args=ocp.args.StandardRestore(target))


# ---------------------------------------------------------------------------
# one live run per workdir
# ---------------------------------------------------------------------------
def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


class WorkdirLock:
  """`<workdir>/kd_jax.lock`, held for the whole run by the primary process.

  A second run started on a workdir that a live run holds raises WorkdirLockedError
  naming the holder (host, pid) before it writes anything (also a second run in the same
  process). A lock left by a dead process on this host (SIGKILL, a crash; or a pid that
  is now this process's, as in a restarted container) is taken over with a warning; one
  from another host cannot be checked and is refused (the message says to delete it if
  that run is gone).
  On a local file system the lock is created atomically (O_EXCL); on an object store
  (gs://) it is a best-effort check-then-write.
  """

  def __init__(self, workdir: epath.Path):
    self.path = workdir / LOCK_FILE
    self.owner = {"host": socket.gethostname(), "pid": os.getpid()}
    self._held = False

  def _create(self) -> bool:
    text = json.dumps(dict(self.owner, started=time.strftime("%Y-%m-%d %H:%M:%S")))
    if paths.is_uri(self.path):
      if self.path.exists():
        return False
      self.path.write_text(text)
      return True
    try:
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True

  def __enter__(self):
    if not is_primary():
      return self
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
      if self._create():
        self._held = True
        _HELD_LOCKS.add(os.fspath(self.path))
        return self
      try:
        holder = read_json(self.path)
      except (FileNotFoundError, ValueError):  # released meanwhile, or being written
        time.sleep(0.2)
        continue
      same_host = holder.get("host") == self.owner["host"]
      pid = int(holder.get("pid", -1))
      mine = pid == self.owner["pid"]
      if not same_host or (os.fspath(self.path) in _HELD_LOCKS if mine else _alive(pid)):
        raise WorkdirLockedError(
            f"{self.path}: the workdir is held by a live run (host {holder.get('host')}, pid "
            f"{holder.get('pid')}, started {holder.get('started')}); wait for it, or use "
            "another --workdir" + ("" if same_host else "; if that run is gone, delete the "
                                   "lock file"))
      logging.warning("%s: taking over a stale lock of pid %s (no run of it is alive on %s)",
                      self.path, holder.get("pid"), holder.get("host"))
      self.path.unlink(missing_ok=True)
    raise WorkdirLockedError(f"{self.path}: could not create the lock file")

  def __exit__(self, *exc):
    if self._held:
      _HELD_LOCKS.discard(os.fspath(self.path))
      try:
        if read_json(self.path).get("pid") == self.owner["pid"]:
          self.path.unlink(missing_ok=True)
      except (FileNotFoundError, ValueError):
        pass
      self._held = False
    return False
