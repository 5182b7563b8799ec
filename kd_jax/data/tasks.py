"""Tasks: labelled multilingual datasets with splits, whatever their source.

A task is selected by `config.data.task` (`parse_task`):

* `tsm`: multilingual tweet sentiment (XLM-T), `kd_jax.data.tsm`.
* `sib200`: SIB-200 topic classification (7 classes, 205 languages and dialects), read
  from `<data_dir>/sib200/<lang_Script>/{train,dev,test}.tsv`, else the hub copy
  `Davlan/sib200`.
* `massive`: MASSIVE intent classification (60 intents, 51 locales),
  `AmazonScience/massive` through `datasets` (columns `locale`, `utt`, `intent`), or a
  local copy in `<data_dir>/massive`.
* `uner`: Universal NER (token classification, IOB2 tags), one `datasets` config per
  language of `universalner/universal_ner` (columns `tokens`, `ner_tags`), or local
  copies in `<data_dir>/uner/<language>`.
* `hf:<id or dir>[:<config>]`: any `datasets` dataset; a config containing `{language}`
  is loaded once per language (`hf:xnli:{language}`).
* `tfds:<name>[/<config>]`: any TensorFlow Datasets dataset (`data_dir`: its TFDS
  data dir).
* `files:<glob>`: local CSV / TSV / JSON / JSONL / Parquet files through
  `datasets.load_dataset(<format>, data_files=...)`, the split of each file named by its
  file name (`train.csv`, `dev.jsonl`, `my_test_part1.parquet`, ...).

The generic sources (hf, tfds, files) map their columns with `config.data.columns`
(`text`, `text_pair`, `label`, `language`, `tokens`, `tags`). A task has an input kind
(`text` or `text_pair`), a label kind (`sequence` classes or `token` tags) and label
names, kept with every stage trained on it. Splits are `train`, `val` and `test` here,
whatever the source calls them (`validation`, `dev`, `valid` for val).

`load_task(data_config, seed)` reads the splits for the configured languages, applies the
seeded stratified `train_fraction` / `eval_fraction` and checks everything (columns,
labels, languages, empty splits, tag lengths), raising `DataError` before training.
"""

from __future__ import annotations

import csv
import dataclasses
import glob as globlib
import io
import logging
import os
import re
from typing import Any, Callable, Mapping, Sequence

from etils import epath

from kd_jax.data import tsm
from kd_jax.data.schema import DataError, Example, check_fraction, stratified_subset
from kd_jax.paths import DATA_DIR_ENV

BUILTIN = ("tsm", "sib200", "massive", "uner")
PREFIXES = ("hf", "tfds", "files")
SPLITS = ("train", "val", "test")
# What sources call each split, in order of preference.
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "dev", "valid"),
               "test": ("test",)}
LABEL_KINDS = ("sequence", "token")
INPUT_KINDS = ("text", "text_pair")
COLUMN_FIELDS = ("text", "text_pair", "label", "language", "tokens", "tags")
# Column names of the generic sources when config.data.columns leaves a field "".
DEFAULT_COLUMNS = {"text": ("text", "sentence"), "label": ("label",), "tokens": ("tokens",),
                   "tags": ("tags", "ner_tags")}
# The language of every example of a source without a language column.
ALL_LANGUAGES = "all"

SIB200_LABELS = ("science/technology", "travel", "politics", "sports", "health",
                 "entertainment", "geography")
SIB200_HEADER = ("index_id", "category", "text")
SIB200_SPLIT_FILES = {"train": "train", "val": "dev", "test": "test"}
SIB200_HUB = "Davlan/sib200"
MASSIVE_HUB = "AmazonScience/massive"
UNER_HUB = "universalner/universal_ner"
# UNER v1 treebanks with train, dev and test splits (the others are test-only).
UNER_LANGUAGES = ("da_ddt", "en_ewt", "hr_set", "pt_bosque", "sk_snk", "sr_set",
                  "sv_talbanken", "zh_gsd", "zh_gsdsimp")

_FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json",
                 ".parquet": "parquet"}


def parse_task(spec: str) -> tuple[str, str, str | None]:
  """`config.data.task` -> (kind, argument, config): `("sib200", "", None)`,
  `("hf", "AmazonScience/massive", "en-US")`, `("tfds", "xnli", None)`,
  `("files", "data/*.csv", None)`. No I/O.

  Raises:
    DataError: an unknown name or prefix, or a prefix without an argument.
  """
  spec = str(spec)
  if spec in BUILTIN:
    return spec, "", None
  prefix, sep, rest = spec.partition(":")
  if not sep or prefix not in PREFIXES or not rest:
    raise DataError(f"unknown task {spec!r}; use one of {list(BUILTIN)} or "
                    "hf:<dataset id or dir>[:<config>], tfds:<name>[/<config>], "
                    "files:<glob>")
  if prefix == "hf":
    name, _, config = rest.partition(":")
    return "hf", name, config or None
  return prefix, rest, None


@dataclasses.dataclass(frozen=True)
class TaskData:
  """A task's examples for one run (`load_task`).

  Attributes:
    task: `config.data.task`.
    label_kind: `sequence` (one class per example) or `token` (one tag per word).
    input_kind: `text` or `text_pair`.
    label_names: class (or tag) names, indexed by label id.
    languages: the evaluated languages, in order (`language_ids` index into it).
    train_languages: the languages trained on.
    seen_languages: the languages reported as seen (default: the train languages).
    splits: {"train", "val", "test"} -> Examples (subsets applied), ordered by language.
  """
  task: str
  label_kind: str
  input_kind: str
  label_names: tuple[str, ...]
  languages: tuple[str, ...]
  train_languages: tuple[str, ...]
  seen_languages: tuple[str, ...]
  splits: Mapping[str, list[Example]]

  @property
  def num_labels(self) -> int:
    return len(self.label_names)

  @property
  def unseen_languages(self) -> tuple[str, ...]:
    """The evaluated languages not seen; () when no seen languages are set."""
    if not self.seen_languages:
      return ()
    return tuple(l for l in self.languages if l not in self.seen_languages)

  def info(self) -> dict:
    """What a stage trained on this task records (model_config.json)."""
    return {"data": self.task, "labels": list(self.label_names), "label_kind": self.label_kind,
            "input_kind": self.input_kind, "languages": list(self.languages),
            "train_languages": list(self.train_languages),
            "seen_languages": list(self.seen_languages)}


# ---------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class _Table:
  """One split of a generic source: columns as lists, label names from the source's
  features (ClassLabel) where it has them."""
  columns: dict[str, list]
  names: dict[str, tuple[str, ...]]
  what: str  # "dataset X split Y", for messages
  num_rows: int

  def __len__(self) -> int:
    return self.num_rows


class _Source:
  """A dataset: `languages()` available (None: found only by reading), `read(split,
  languages)` -> {language: Examples}; `label_names`, `label_kind`, `input_kind` known
  after the first `read("train", ...)`."""
  label_names: tuple[str, ...] = ()
  label_kind = "sequence"
  input_kind = "text"

  def languages(self) -> tuple[str, ...] | None:
    return None

  def read(self, split: str, languages: Sequence[str]) -> dict[str, list[Example]]:
    raise NotImplementedError


class _Tsm(_Source):
  label_names = tsm.TSM_LABELS

  def __init__(self, data_dir):
    self.data_dir = data_dir

  def languages(self):
    return tsm.TSM_LANGUAGES

  def read(self, split, languages):
    examples = tsm.load_tsm(split, tuple(languages), data_dir=self.data_dir)
    return _by_language(examples, languages)


def _data_root(data_dir) -> epath.Path | None:
  chosen = data_dir or os.environ.get(DATA_DIR_ENV) or None
  return epath.Path(chosen) if chosen else None


def sib200_root(data_dir=None) -> epath.Path | None:
  """The local folder of SIB-200 language dirs (`<data_dir>/sib200`, or `data_dir` itself
  when it holds `<lang>/train.tsv` dirs; default `$KD_JAX_DATA_DIR`), or None."""
  root = _data_root(data_dir)
  if root is None or not root.is_dir():
    return None
  if (root / "sib200").is_dir():
    return root / "sib200"
  if any((p / "train.tsv").is_file() for p in root.iterdir() if p.is_dir()):
    return root
  return None


def read_sib200_file(path: epath.Path, labelled: bool = True) -> list[tuple[str, str]]:
  """(category, text) rows of one SIB-200 TSV (header `index_id, category, text`, standard
  CSV quoting). `labelled`: check each category is one of `SIB200_LABELS`.

  Raises:
    DataError: a wrong header, a row without three fields, or an unknown category
      (names the file and line).
  """
  rows = list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8"), newline=""),
                         delimiter="\t"))
  if not rows or tuple(rows[0]) != SIB200_HEADER:
    raise DataError(f"{str(path)!r}: header {rows[0] if rows else None} is not "
                    f"{list(SIB200_HEADER)}")
  out = []
  for line_no, row in enumerate(rows[1:], start=2):
    if len(row) != 3:
      raise DataError(f"{str(path)!r} row {line_no}: {len(row)} fields, expected 3")
    if labelled and row[1] not in SIB200_LABELS:
      raise DataError(f"{str(path)!r} row {line_no}: category {row[1]!r} is not one of "
                      f"{list(SIB200_LABELS)}")
    out.append((row[1], row[2]))
  return out


class _Sib200(_Source):
  label_names = SIB200_LABELS

  def __init__(self, data_dir):
    self.root = sib200_root(data_dir)
    self.hub = None
    if self.root is None:  # no local copy: the hub's, one config per language
      logging.info("sib200: no local copy (data_dir / %s), reading %s", DATA_DIR_ENV,
                   SIB200_HUB)
      self.hub = _Generic("hf", SIB200_HUB, "{language}", {"label": "category"},
                          SIB200_LABELS, "sequence")

  def languages(self):
    if self.hub is not None:
      return None
    return tuple(sorted(p.name for p in self.root.iterdir() if (p / "train.tsv").is_file()))

  def read(self, split, languages):
    if self.hub is not None:
      return self.hub.read(split, languages)
    out = {}
    for lang in languages:
      path = self.root / lang / f"{SIB200_SPLIT_FILES[split]}.tsv"
      if not path.is_file():
        raise DataError(f"sib200 file {str(path)!r} not found: language {lang!r} has no "
                        f"{split} split in {str(self.root)!r}")
      out[lang] = [Example(text=text, label=SIB200_LABELS.index(category), language=lang)
                   for category, text in read_sib200_file(path)]
    return out


class _Generic(_Source):
  """hf / tfds / files: columns mapped by config.data.columns."""

  def __init__(self, kind: str, name: str, config: str | None, columns: Mapping[str, str],
               label_names: Sequence[str] = (), label_kind: str = "",
               data_dir: str | None = None, local_dirs: bool = False):
    """`local_dirs`: `name` is a folder of per-language dataset dirs (`{language}` config),
    each read with `datasets.load_dataset(<name>/<language>)`."""
    self.kind, self.name, self.config, self.data_dir = kind, name, config, data_dir
    self.local_dirs = local_dirs
    self.columns = {k: v for k, v in columns.items() if v}
    self.label_names = tuple(label_names)
    self.requested_kind = label_kind
    self.per_language = bool(config and "{language}" in config)
    self._splits: dict[str | None, dict[str, Any]] = {}
    self.input_kind = "text_pair" if self.columns.get("text_pair") else "text"
    self._names_from = None  # the split whose values gave label_names

  def describe(self, language=None) -> str:
    if self.local_dirs:
      return os.path.join(self.name, language or "")
    config = self.config.format(language=language) if self.per_language else self.config
    return f"{self.kind}:{self.name}" + (f" (config {config})" if config else "")

  # -- loading -------------------------------------------------------------
  def _load(self, language) -> dict[str, Any]:
    """{source split name: dataset} of one config (cached)."""
    if language not in self._splits:
      if self.kind == "tfds":
        self._splits[language] = _tfds_splits(self.name, self.data_dir)
      elif self.kind == "files":
        self._splits[language] = _files_splits(self.name)
      elif self.local_dirs:
        path = os.path.join(self.name, language)
        if not os.path.isdir(path):
          raise DataError(f"{self.name}: no folder for language {language!r}; found "
                          f"{self.languages()}")
        self._splits[language] = _hf_splits(path, None)
      else:
        config = self.config.format(language=language) if self.per_language else self.config
        self._splits[language] = _hf_splits(self.name, config)
    return self._splits[language]

  def _split(self, split: str, language) -> _Table:
    found = self._load(language)
    for name in SPLIT_NAMES[split]:
      if name in found:
        return _table(self, found[name], f"{self.describe(language)} split {name!r}")
    raise DataError(f"{self.describe(language)} has no {split} split (looked for "
                    f"{list(SPLIT_NAMES[split])}); its splits are {sorted(found)}")

  def languages(self):
    if self.local_dirs:
      return tuple(sorted(d for d in os.listdir(self.name)
                          if os.path.isdir(os.path.join(self.name, d))))
    if self.per_language:
      return None
    if "language" not in self.columns:
      return (ALL_LANGUAGES,)
    found = []  # every split's: a language may be in val/test only (zero-shot)
    present = self._load(None)
    for split, names in SPLIT_NAMES.items():
      if any(n in present for n in names):  # a missing split is reported when it is read
        table = self._split(split, None)
        found += [str(v) for v in _column(table, self.columns["language"], "language")]
    return tuple(dict.fromkeys(found))

  # -- examples ------------------------------------------------------------
  def _resolve_columns(self, table: _Table) -> dict[str, str]:
    """The columns this source reads from `table` (explicit mapping, else defaults)."""
    cols = dict(self.columns)
    for field, candidates in DEFAULT_COLUMNS.items():
      if field not in cols:
        found = next((c for c in candidates if c in table.columns), None)
        if found:
          cols[field] = found
    kind = self.requested_kind or ("token" if "tags" in cols and "tokens" in cols else
                                   "sequence")
    needed = (("tokens", "tags") if kind == "token" else
              ("text", "label") + (("text_pair",) if "text_pair" in cols else ()))
    for field in needed + (("language",) if "language" in cols else ()):
      if field not in cols:
        raise DataError(f"{table.what}: no {field} column (config.data.columns.{field}; "
                        f"its columns are {sorted(table.columns)})")
      if cols[field] not in table.columns:
        raise DataError(f"{table.what}: no column {cols[field]!r} (config.data.columns."
                        f"{field}); its columns are {sorted(table.columns)}")
    self.label_kind = kind
    return {f: cols[f] for f in needed + (("language",) if "language" in cols else ())}

  def _set_label_names(self, tables: Sequence[tuple[_Table, str]]) -> None:
    """label_names, unless given (config.data.label_names) or already set by train: the
    source's ClassLabel names, else the sorted values of `tables` ((table, label column)
    pairs of every language read; "O" first for tags)."""
    if self.label_names:
      return
    names = next((t.names[c] for t, c in tables if c in t.names), None)
    if names:
      self.label_names = names
      return
    flat = self.label_kind == "token"
    values = {str(v) for t, c in tables for row in t.columns[c] for v in (row if flat else [row])}
    self.label_names = tuple(sorted(values, key=lambda s: (
        s != "O", int(s) if s.lstrip("-").isdigit() else 0, s)))
    self._names_from = ", ".join(t.what for t, _ in tables)

  def _label_index(self, table: _Table, column: str) -> dict:
    """value -> label id: a label name, or an integer indexing the source's ClassLabel."""
    index = {name: i for i, name in enumerate(self.label_names)}
    if column in table.names:
      index.update({i: index.get(n) for i, n in enumerate(table.names[column])})
    return index

  def read(self, split, languages):
    out = {lang: [] for lang in languages}
    wanted = set(languages)
    tables = []
    for language in (languages if self.per_language else (None,)):
      table = self._split(split, language)
      cols = self._resolve_columns(table)
      label_col = cols["tags"] if self.label_kind == "token" else cols["label"]
      tables.append((language, table, cols, label_col))
    self._set_label_names([(t, c) for _, t, _, c in tables])
    for language, table, cols, label_col in tables:
      index = self._label_index(table, label_col)
      if self.per_language:
        langs = [language] * len(table)
      elif "language" in cols:
        langs = [str(v) for v in table.columns[cols["language"]]]
      else:
        langs = [ALL_LANGUAGES] * len(table)
      values = table.columns[label_col]
      for row, lang in enumerate(langs):
        if lang in wanted:
          out[lang].append(self._example(table, cols, row, lang, values[row], index))
    return out

  def _label(self, table, row, value, index, column):
    label = index.get(value)
    if label is None and not isinstance(value, str):
      label = index.get(str(value))
    if label is None:
      where = f" (label names from {self._names_from})" if self._names_from else ""
      source_names = table.names.get(column)
      if source_names and isinstance(value, int) and 0 <= value < len(source_names):
        value = source_names[value]  # name the class, not its id
      raise DataError(f"{table.what} row {row}: {column} {value!r} is not one of the "
                      f"label names {list(self.label_names)}{where}; set "
                      "config.data.label_names to the full label set")
    return label

  def _example(self, table, cols, row, lang, value, index) -> Example:
    c = table.columns
    if self.label_kind == "token":
      tokens = tuple(str(t) for t in c[cols["tokens"]][row])
      tags = tuple(self._label(table, row, v, index, cols["tags"]) for v in value)
      if len(tags) != len(tokens):
        raise DataError(f"{table.what} row {row}: {len(tokens)} tokens ({cols['tokens']!r}) "
                        f"but {len(tags)} tags ({cols['tags']!r})")
      return Example(text=" ".join(tokens), label=tags, language=lang, tokens=tokens)
    pair = str(c[cols["text_pair"]][row]) if "text_pair" in cols else None
    return Example(text=str(c[cols["text"]][row]),
                   label=self._label(table, row, value, index, cols["label"]),
                   language=lang, text_pair=pair)


def _column(table: _Table, name: str, field: str) -> list:
  if name not in table.columns:
    raise DataError(f"{table.what}: no column {name!r} (config.data.columns.{field}); its "
                    f"columns are {sorted(table.columns)}")
  return table.columns[name]


def _feature_names(feature) -> tuple[str, ...] | None:
  """Class names of a ClassLabel feature, or of a sequence of them (datasets or TFDS)."""
  names = getattr(feature, "names", None)
  if names is None:
    names = getattr(getattr(feature, "feature", None), "names", None)
  return tuple(names) if names else None


def _decode(value):
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if hasattr(value, "tolist"):
    value = value.tolist()
  if isinstance(value, list):
    return [_decode(v) for v in value]
  return value


def _table(source: _Generic, dataset, what: str) -> _Table:
  """A datasets.Dataset, or a TFDS split ({column: list}, {column: names}), as a _Table."""
  if isinstance(dataset, tuple):
    columns, names = dataset
    num_rows = len(next(iter(columns.values()), []))
  else:
    names = {c: n for c, n in ((c, _feature_names(f)) for c, f in dataset.features.items()) if n}
    # Only the columns a task can read are materialised (MASSIVE has 10 more).
    wanted = set(source.columns.values()) | {c for cs in DEFAULT_COLUMNS.values() for c in cs}
    columns = {c: list(dataset[c]) if c in wanted else [] for c in dataset.column_names}
    num_rows = len(dataset)
  if num_rows == 0:
    raise DataError(f"{what} is empty")
  return _Table(columns, names, what, num_rows)


def _hf_splits(name: str, config: str | None) -> dict[str, Any]:
  import datasets
  try:
    return dict(datasets.load_dataset(name, config))
  except Exception as e:  # network, unknown id or config, unreadable files
    raise DataError(f"loading the datasets dataset {name!r}" +
                    (f" config {config!r}" if config else "") + f" failed: {e}") from e


def _files_splits(pattern: str) -> dict[str, Any]:
  """Local files matched by `pattern`, each put in the split its name says."""
  import datasets
  files = sorted(globlib.glob(os.path.expanduser(pattern), recursive=True))
  if not files:
    raise DataError(f"files:{pattern}: no file matches")
  by_split: dict[str, list[str]] = {}
  formats = set()
  for path in files:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FILE_FORMATS:
      raise DataError(f"files:{pattern}: {path!r} is not one of {sorted(_FILE_FORMATS)}")
    formats.add((_FILE_FORMATS[ext], ext == ".tsv"))
    parts = re.split(r"[._-]", os.path.splitext(os.path.basename(path))[0].lower())
    split = next((s for s in SPLIT_NAMES for n in SPLIT_NAMES[s] if n in parts), None)
    if split is None:
      raise DataError(f"files:{pattern}: cannot tell the split of {path!r}; name files "
                      "train.*, validation.* / dev.* / val.*, test.* (or *_train.* etc.)")
    by_split.setdefault(SPLIT_NAMES[split][0], []).append(path)
  if len(formats) > 1:
    raise DataError(f"files:{pattern}: mixed formats {sorted(f for f, _ in formats)}")
  (fmt, tsv), = formats
  kwargs = {"delimiter": "\t"} if tsv else {}
  try:
    return dict(datasets.load_dataset(fmt, data_files=by_split, **kwargs))
  except Exception as e:
    raise DataError(f"files:{pattern}: reading {by_split} failed: {e}") from e


def _tfds_splits(name: str, data_dir: str | None) -> dict[str, Any]:
  """{split: ({column: list}, {column: label names})} of a TFDS dataset (prepared in
  `data_dir`, else downloaded and prepared there)."""
  try:
    import tensorflow_datasets as tfds
    builder = tfds.builder(name, data_dir=data_dir or None)
    if not builder.is_prepared():
      builder.download_and_prepare()
  except Exception as e:
    raise DataError(f"tfds:{name}: loading the builder failed"
                    + (f" (data_dir {data_dir!r})" if data_dir else "") + f": {e}") from e
  features = builder.info.features
  names = {c: n for c, n in ((c, _feature_names(f)) for c, f in features.items()) if n}
  out = {}
  for split in builder.info.splits:
    columns: dict[str, list] = {c: [] for c in features}
    for row in tfds.as_numpy(builder.as_dataset(split=split)):
      for c in columns:
        columns[c].append(_decode(row[c]))
    out[split] = (columns, names)
  return out


def _by_language(examples: Sequence[Example], languages) -> dict[str, list[Example]]:
  out = {lang: [] for lang in languages}
  for e in examples:
    out[e.language].append(e)
  return out


def make_source(data_config) -> _Source:
  """The source of `config.data` (`parse_task`); reads nothing yet for tsm/sib200 local."""
  kind, arg, config = parse_task(data_config.task)
  data_dir = data_config.data_dir or None
  columns = dict(data_config.columns)
  names = tuple(data_config.label_names)
  if kind == "tsm":
    return _Tsm(data_dir)
  if kind == "sib200":
    return _Sib200(data_dir)
  root = _data_root(data_dir)
  if kind == "massive":
    local = root / "massive" if root is not None else None
    local = str(local) if local is not None and local.is_dir() else None
    return _Generic("hf", local or MASSIVE_HUB, None if local else "all",
                    {"text": "utt", "label": "intent", "language": "locale", **_set(columns)},
                    names, "sequence")
  if kind == "uner":
    local = root / "uner" if root is not None else None
    if local is not None and local.is_dir():  # <data_dir>/uner/<language>: one config each
      return _Generic("hf", str(local), "{language}", {"tokens": "tokens", "tags": "ner_tags"},
                      names, "token", local_dirs=True)
    return _Generic("hf", UNER_HUB, "{language}", {"tokens": "tokens", "tags": "ner_tags"},
                    names, "token")
  return _Generic(kind, arg, config, columns, names, data_config.label_kind,
                  data_dir=data_dir)


def _set(columns: Mapping[str, str]) -> dict[str, str]:
  return {k: v for k, v in columns.items() if v}


# ---------------------------------------------------------------------------
# a run's task
# ---------------------------------------------------------------------------
def _languages(dc, source: _Source) -> tuple[tuple[str, ...], ...]:
  """(evaluated, trained, seen) languages of config.data (see `load_task`), checked
  against the languages the source has when it knows them without reading its splits."""
  available = source.languages()
  languages = tuple(dc.languages) or available
  if not languages:
    raise DataError(f"task {dc.task!r}: set config.data.languages (the source's languages "
                    "are found per config, e.g. {language} configs)")
  languages = tuple(dict.fromkeys(tuple(languages) + tuple(dc.unseen_languages)))
  train_languages = tuple(dc.train_languages) or tuple(dc.languages) or tuple(available)
  seen = tuple(dc.seen_languages) or (train_languages if (dc.train_languages or
                                                          dc.unseen_languages) else ())
  if available is not None:
    for field, langs in (("languages", languages), ("train_languages", train_languages),
                         ("seen_languages", seen)):
      missing = [l for l in langs if l not in available]
      if missing:
        raise DataError(f"config.data.{field}: {missing} not in task {dc.task!r}; it has "
                        f"{len(available)} languages: {list(available[:40])}"
                        + (" ..." if len(available) > 40 else ""))
  for l in seen:
    if l not in languages:
      raise DataError(f"config.data.seen_languages: {l!r} is not evaluated "
                      f"(config.data.languages {list(languages)})")
  return languages, train_languages, seen


def load_task(data_config, seed: int = 0,
              log: Callable[[str], None] | None = logging.info) -> TaskData:
  """Reads `config.data`'s task for the run.

  Languages: `data.languages` (default: every language of the source) plus
  `data.unseen_languages` are evaluated (val, test); `data.train_languages` (default
  `data.languages`) are trained on; `data.seen_languages` (default the train languages)
  are reported as seen. `data.train_fraction` / `data.eval_fraction` keep a seeded subset
  of each language stratified by label (`schema.stratified_subset`), drawn with
  `data.subset_seed` when it is >= 0, else with `seed` (the run's config.seed).

  Raises:
    DataError: an unknown task, a missing split or column, a language the source does not
      have, an empty split of a language, a label outside the label set, or a tag
      sequence whose length differs from its token sequence; each naming the dataset,
      split, row or column.
  """
  dc = data_config
  if dc.get("subset_seed", -1) >= 0:
    seed = int(dc.subset_seed)
  check_fraction(dc.train_fraction, "config.data.train_fraction")
  check_fraction(dc.eval_fraction, "config.data.eval_fraction")
  source = make_source(dc)
  languages, train_languages, seen = _languages(dc, source)
  splits = {}
  for split, langs, fraction in (("train", train_languages, dc.train_fraction),
                                 ("val", languages, dc.eval_fraction),
                                 ("test", languages, dc.eval_fraction)):
    per_language = source.read(split, langs)
    rows = []
    for i, lang in enumerate(langs):
      if not per_language.get(lang):
        raise DataError(f"task {dc.task!r}: the {split} split has no examples for language "
                        f"{lang!r}")
      rows.extend(stratified_subset(per_language[lang], fraction, seed,
                                    languages.index(lang) if lang in languages else i))
    splits[split] = rows
  task = TaskData(task=str(dc.task), label_kind=source.label_kind,
                  input_kind=source.input_kind, label_names=tuple(source.label_names),
                  languages=languages, train_languages=train_languages,
                  seen_languages=seen, splits=splits)
  if log:
    log(f"task {task.task}: {task.label_kind} labels {list(task.label_names)[:12]}"
        f"{' ...' if task.num_labels > 12 else ''} ({task.num_labels}), {task.input_kind}; "
        + ", ".join(f"{s} {len(v)}" for s, v in splits.items())
        + f" examples; languages {list(languages)}")
  return task


def label_info(data_config) -> tuple[str, int]:
  """(label kind, number of labels) of `config.data`'s task, reading as little as the
  source allows (tsm and a local SIB-200: only its languages are checked), for the shape
  checks before training. Raises DataError as `load_task`."""
  source = make_source(data_config)
  if isinstance(source, (_Tsm, _Sib200)) and source.languages() is not None:
    _languages(data_config, source)
    return source.label_kind, len(source.label_names)
  task = load_task(data_config, log=None)
  return task.label_kind, task.num_labels
