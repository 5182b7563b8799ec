"""Tests for kd_jax.data.tasks: every source read through its real code path (`datasets`,
TFDS, local files, SIB-200 TSVs) from small fixtures written in that source's own schema,
plus the real SIB-200 where it is present."""

import collections
import csv
import json
import os
import pathlib

import numpy as np
import pytest

from kd_jax.config_base import base_config
from kd_jax.data import tasks
from kd_jax.data.schema import DataError, Example, stratified_subset

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers


def data_config(task, data_dir="", columns=None, **fields):
  """`base_config().data` with `task`, `data_dir`, `columns.*` and other fields set."""
  dc = base_config().data
  dc.task = task
  dc.data_dir = os.fspath(data_dir)
  for field, column in (columns or {}).items():
    dc.columns[field] = column
  for field, value in fields.items():
    dc[field] = value
  return dc


def by_language(examples):
  out = collections.defaultdict(list)
  for e in examples:
    out[e.language].append(e)
  return dict(out)


def counts(examples):
  return dict(collections.Counter(e.language for e in examples))


def to_parquet(rows, features, path):
  """`rows` (dicts) as one parquet file with `features` (ClassLabel names kept)."""
  import datasets
  path.parent.mkdir(parents=True, exist_ok=True)
  datasets.Dataset.from_list(rows, features=features).to_parquet(os.fspath(path))


@pytest.fixture(scope="module", autouse=True)
def hf_cache(tmp_path_factory):
  """`datasets` caches what it prepares here, not in ~/.cache."""
  datasets = pytest.importorskip("datasets")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(datasets.config, "HF_DATASETS_CACHE",
               tmp_path_factory.mktemp("hf_cache"))
    yield


# ---------------------------------------------------------------- parse_task


def test_parse_task():
  assert tasks.parse_task("sib200") == ("sib200", "", None)
  assert tasks.parse_task("hf:AmazonScience/massive:en-US") == (
      "hf", "AmazonScience/massive", "en-US")
  assert tasks.parse_task("hf:xnli:{language}") == ("hf", "xnli", "{language}")
  assert tasks.parse_task("hf:/data/xnli") == ("hf", "/data/xnli", None)
  assert tasks.parse_task("tfds:xnli/en") == ("tfds", "xnli/en", None)
  assert tasks.parse_task("files:data/*.csv") == ("files", "data/*.csv", None)


@pytest.mark.parametrize("spec", ["sib-200", "xnli", "hf:", "tfds:", "files:", "hub:xnli",
                                  ""])
def test_parse_task_unknown(spec):
  with pytest.raises(DataError, match="unknown task") as e:
    tasks.parse_task(spec)
  assert repr(spec) in str(e.value)
  with pytest.raises(DataError, match="unknown task"):
    tasks.load_task(data_config(spec))


# ---------------------------------------------------------------- MASSIVE

MASSIVE_SCENARIOS = ("alarm", "weather", "music")
MASSIVE_INTENTS = ("alarm_set", "weather_query", "play_music", "alarm_query")  # not sorted
MASSIVE_UTTS = ("wake me up at {i} am", "what is the weather in city {i}",
                "play song number {i}", "which alarms are set for {i}")
MASSIVE_LOCALES = ("en-US", "de-DE", "fr-FR")
MASSIVE_SIZES = {"train": (8, 6, 4), "validation": (4, 3, 2), "test": (5, 4, 3)}


def massive_rows(split):
  """AmazonScience/massive-shaped rows, locales interleaved (en-US, de-DE, fr-FR, en-US,
  ...); row i of a locale has intent i % 4."""
  rows = []
  for i in range(max(MASSIVE_SIZES[split])):
    for locale, n in zip(MASSIVE_LOCALES, MASSIVE_SIZES[split]):
      if i < n:
        intent = i % len(MASSIVE_INTENTS)
        utt = MASSIVE_UTTS[intent].format(i=i) + f" ({locale})"
        annot = MASSIVE_UTTS[intent].format(i=f"[number : {i}]") + f" ({locale})"
        rows.append({"id": str(len(rows)), "locale": locale, "partition": split,
                     "scenario": (0, 1, 2, 0)[intent], "intent": intent, "utt": utt,
                     "annot_utt": annot, "worker_id": "7",
                     "slot_method": [{"slot": "time", "method": "translation"}]})
  return rows


@pytest.fixture(scope="module")
def massive_dir(tmp_path_factory):
  """<tmp>/massive/data/{train,validation,test}-00000-of-00001.parquet (hub layout)."""
  import datasets
  features = datasets.Features({
      "id": datasets.Value("string"), "locale": datasets.Value("string"),
      "partition": datasets.Value("string"),
      "scenario": datasets.ClassLabel(names=list(MASSIVE_SCENARIOS)),
      "intent": datasets.ClassLabel(names=list(MASSIVE_INTENTS)),
      "utt": datasets.Value("string"), "annot_utt": datasets.Value("string"),
      "worker_id": datasets.Value("string"),
      "slot_method": datasets.List({"slot": datasets.Value("string"),
                                    "method": datasets.Value("string")})})
  root = tmp_path_factory.mktemp("massive_root")
  for split in MASSIVE_SIZES:
    to_parquet(massive_rows(split), features,
               root / "massive" / "data" / f"{split}-00000-of-00001.parquet")
  return root


def test_massive_local_copy(massive_dir):
  task = tasks.load_task(data_config("massive", massive_dir))
  assert task.label_names == MASSIVE_INTENTS  # the ClassLabel's order, not sorted
  assert (task.label_kind, task.input_kind) == ("sequence", "text")
  assert task.languages == MASSIVE_LOCALES == task.train_languages
  assert task.seen_languages == ()
  for split, source_split in (("train", "train"), ("val", "validation"), ("test", "test")):
    assert counts(task.splits[split]) == dict(zip(MASSIVE_LOCALES, MASSIVE_SIZES[source_split]))
    # Ordered by language, then source order; texts and labels as written.
    expected = [Example(text=r["utt"], label=r["intent"], language=r["locale"])
                for locale in MASSIVE_LOCALES for r in massive_rows(source_split)
                if r["locale"] == locale]
    assert task.splits[split] == expected
  assert task.splits["train"][1] == Example("what is the weather in city 1 (en-US)",
                                            MASSIVE_INTENTS.index("weather_query"), "en-US")
  assert task.info()["labels"] == list(MASSIVE_INTENTS)


def test_massive_train_languages(massive_dir):
  task = tasks.load_task(data_config("massive", massive_dir, train_languages=("en-US",)))
  assert task.languages == MASSIVE_LOCALES
  assert task.train_languages == task.seen_languages == ("en-US",)
  assert task.unseen_languages == ("de-DE", "fr-FR")
  assert counts(task.splits["train"]) == {"en-US": 8}
  assert counts(task.splits["val"]) == {"en-US": 4, "de-DE": 3, "fr-FR": 2}
  assert counts(task.splits["test"]) == {"en-US": 5, "de-DE": 4, "fr-FR": 3}
  info = task.info()
  assert info["train_languages"] == info["seen_languages"] == ["en-US"]
  assert info["languages"] == list(MASSIVE_LOCALES)


def test_massive_languages_and_unseen(massive_dir):
  task = tasks.load_task(data_config("massive", massive_dir, languages=("de-DE",),
                                     unseen_languages=("fr-FR",)))
  assert task.languages == ("de-DE", "fr-FR")
  assert task.train_languages == task.seen_languages == ("de-DE",)
  assert task.unseen_languages == ("fr-FR",)
  assert counts(task.splits["train"]) == {"de-DE": 6}
  assert counts(task.splits["test"]) == {"de-DE": 4, "fr-FR": 3}


def test_massive_explicit_seen_languages(massive_dir):
  task = tasks.load_task(data_config("massive", massive_dir,
                                     seen_languages=("en-US", "de-DE")))
  assert task.train_languages == MASSIVE_LOCALES
  assert task.seen_languages == ("en-US", "de-DE")
  assert task.unseen_languages == ("fr-FR",)


def test_massive_unknown_language(massive_dir):
  with pytest.raises(DataError, match=r"config.data.languages: \['ja-JP'\] not in task "
                                      "'massive'"):
    tasks.load_task(data_config("massive", massive_dir, languages=("en-US", "ja-JP")))
  with pytest.raises(DataError, match=r"config.data.train_languages: \['ja-JP'\]"):
    tasks.load_task(data_config("massive", massive_dir, train_languages=("ja-JP",)))
  with pytest.raises(DataError, match="seen_languages: 'fr-FR' is not evaluated"):
    tasks.load_task(data_config("massive", massive_dir, languages=("en-US",),
                                seen_languages=("fr-FR",)))


def test_massive_column_override(massive_dir):
  task = tasks.load_task(data_config("massive", massive_dir, languages=("fr-FR",),
                                     columns={"text": "annot_utt"}))
  assert [e.text for e in task.splits["test"]] == [
      r["annot_utt"] for r in massive_rows("test") if r["locale"] == "fr-FR"]
  assert task.splits["test"][0].text == "wake me up at [number : 0] am (fr-FR)"


def test_massive_missing_column(massive_dir):
  with pytest.raises(DataError) as e:
    tasks.load_task(data_config("massive", massive_dir, columns={"text": "utterance"}))
  message = str(e.value)
  assert "'utterance'" in message and "config.data.columns.text" in message
  assert "split 'train'" in message
  assert "['annot_utt', 'id', 'intent', 'locale', 'partition', 'scenario', " in message


# ---------------------------------------------------------------- UNER

UNER_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
UNER_ROWS = {  # language -> split -> (sentence, tags)
    "en_ewt": {
        "train": [("John lives in New York", "B-PER O O B-LOC I-LOC"),
                  ("Apple hired Mary Smith", "B-ORG O B-PER I-PER"),
                  ("It rains", "O O"),
                  ("Acme Corp opened in Paris", "B-ORG I-ORG O O B-LOC")],
        "validation": [("Bob met Alice", "B-PER O B-PER"), ("Go to Rome", "O O B-LOC")],
        "test": [("IBM is big", "B-ORG O O"), ("Ann Lee left", "B-PER I-PER O")]},
    "pt_bosque": {
        "train": [("Maria mora em Lisboa", "B-PER O O B-LOC"),
                  ("A Petrobras cresceu", "O B-ORG O"),
                  ("Chove", "O")],
        "validation": [("O Porto venceu", "O B-ORG O")],
        "test": [("Ana vive no Rio de Janeiro", "B-PER O O B-LOC I-LOC I-LOC")]},
}


def write_uner(root, rows=UNER_ROWS, tag_names=UNER_TAGS):
  """<root>/<language>/data/<split>-00000-of-00001.parquet, universalner/universal_ner's
  columns (ner_tags: a sequence of ClassLabel `tag_names`)."""
  import datasets
  features = datasets.Features({
      "idx": datasets.Value("string"), "text": datasets.Value("string"),
      "tokens": datasets.List(datasets.Value("string")),
      "ner_tags": datasets.List(datasets.ClassLabel(names=list(tag_names))),
      "annotator": datasets.Value("string")})
  for language, splits in rows.items():
    for split, sentences in splits.items():
      table = [{"idx": f"{language}-{split}-{i}", "text": text, "tokens": text.split(),
                "ner_tags": [tag_names.index(t) for t in tags.split()], "annotator": "a1"}
               for i, (text, tags) in enumerate(sentences)]
      to_parquet(table, features, root / language / "data" / f"{split}-00000-of-00001.parquet")
  return root


@pytest.fixture(scope="module")
def uner_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("uner_root")
  write_uner(root / "uner")
  return root


def test_uner_local_copies(uner_dir):
  task = tasks.load_task(data_config("uner", uner_dir, languages=("en_ewt", "pt_bosque")))
  assert (task.label_kind, task.input_kind) == ("token", "text")
  assert task.label_names == UNER_TAGS  # the ClassLabel's order ("B-LOC" is not second)
  assert task.languages == task.train_languages == ("en_ewt", "pt_bosque")
  for split, source_split in (("train", "train"), ("val", "validation"), ("test", "test")):
    expected = [Example(text=text, label=tuple(UNER_TAGS.index(t) for t in tags.split()),
                        language=lang, tokens=tuple(text.split()))
                for lang in ("en_ewt", "pt_bosque")
                for text, tags in UNER_ROWS[lang][source_split]]
    assert task.splits[split] == expected
  first = task.splits["train"][0]
  assert first.tokens == ("John", "lives", "in", "New", "York")
  assert first.label == (1, 0, 0, 5, 6)
  assert [task.label_names[t] for t in task.splits["test"][-1].label] == [
      "B-PER", "O", "O", "B-LOC", "I-LOC", "I-LOC"]


def test_uner_default_languages_and_label_info(uner_dir):
  task = tasks.load_task(data_config("uner", uner_dir, train_languages=("en_ewt",)))
  assert task.languages == ("en_ewt", "pt_bosque")  # the folders, sorted
  assert counts(task.splits["train"]) == {"en_ewt": 4}
  assert task.unseen_languages == ("pt_bosque",)
  assert tasks.label_info(data_config("uner", uner_dir)) == ("token", 7)


def test_uner_train_fraction_not_stratified(uner_dir):
  task = tasks.load_task(data_config("uner", uner_dir, train_fraction=0.5), seed=3)
  # Tag sequences: max(1, round(0.5 * n)) rows per language, in source order.
  assert counts(task.splits["train"]) == {"en_ewt": 2, "pt_bosque": 2}
  full = tasks.load_task(data_config("uner", uner_dir))
  for lang, rows in by_language(task.splits["train"]).items():
    kept = [e for e in by_language(full.splits["train"])[lang] if e in rows]
    assert kept == rows


def test_uner_unknown_language(uner_dir):
  with pytest.raises(DataError, match=r"\['hr_set'\] not in task 'uner'") as e:
    tasks.load_task(data_config("uner", uner_dir, languages=("en_ewt", "hr_set")))
  assert "'en_ewt', 'pt_bosque'" in str(e.value)


def test_uner_languages_with_other_classlabel_order(tmp_path):
  """A language whose ClassLabel orders the tags differently: its ids are mapped by name
  to the first language's names."""
  write_uner(tmp_path / "uner", {"en_ewt": UNER_ROWS["en_ewt"]})
  write_uner(tmp_path / "uner", {"pt_bosque": UNER_ROWS["pt_bosque"]},
             tag_names=tuple(reversed(UNER_TAGS)))
  task = tasks.load_task(data_config("uner", tmp_path))
  assert task.label_names == UNER_TAGS
  pt = by_language(task.splits["train"])["pt_bosque"]
  assert [task.label_names[t] for t in pt[0].label] == ["B-PER", "O", "O", "B-LOC"]


def test_uner_tag_length_mismatch(tmp_path):
  rows = {"en_ewt": {split: list(UNER_ROWS["en_ewt"][split]) for split in UNER_ROWS["en_ewt"]}}
  rows["en_ewt"]["train"][2] = ("It rains hard", "O O")
  write_uner(tmp_path / "uner", rows)
  with pytest.raises(DataError) as e:
    tasks.load_task(data_config("uner", tmp_path))
  message = str(e.value)
  assert "split 'train' row 2: 3 tokens ('tokens') but 2 tags ('ner_tags')" in message
  assert os.fspath(tmp_path / "uner" / "en_ewt") in message


# ---------------------------------------------------------------- XNLI-shaped files

NLI_LABELS = ("entailment", "neutral", "contradiction")
NLI_ROWS = {  # split -> (premise, hypothesis, label, language)
    "train": [
        ("The cat sat on the mat, quietly.", "A cat is sitting.", "entailment", "en"),
        ("Le chat dort, au soleil.", "Le chat court.", "contradiction", "fr"),
        ("He plays football on Sundays.", "He likes sports.", "neutral", "en"),
        ("It is raining, so we stay in.", "The sun is shining.", "contradiction", "en"),
        ("Elle lit un livre.", "Elle lit.", "entailment", "fr"),
        ("Il est en retard.", "Il a raté le bus.", "neutral", "fr")],
    "dev": [
        ("A man drives a car.", "A man is driving.", "entailment", "en"),
        ("Un homme mange, vite.", "Un homme dort.", "contradiction", "fr"),
        ("She sings loudly.", "She is a singer.", "neutral", "en")],
    "test": [
        ("Two dogs run, fast.", "Animals are running.", "entailment", "en"),
        ("Deux enfants jouent.", "Des enfants dorment.", "contradiction", "fr"),
        ("Le train part.", "Le train est en retard.", "neutral", "fr")],
}
NLI_COLUMNS = {"text": "premise", "text_pair": "hypothesis", "language": "language"}
NLI_FIELDS = ("premise", "hypothesis", "label", "language")


def write_nli(folder, fmt, rows=NLI_ROWS, names=None):
  """`rows` as <folder>/<split>.<fmt> (jsonl, csv, tsv); returns the folder."""
  folder.mkdir(parents=True, exist_ok=True)
  for split, split_rows in rows.items():
    path = folder / f"{(names or {}).get(split, split)}.{fmt}"
    if fmt == "jsonl":
      path.write_text("".join(json.dumps(dict(zip(NLI_FIELDS, r))) + "\n" for r in split_rows),
                      encoding="utf-8")
    else:
      with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
        writer.writerow(NLI_FIELDS)
        writer.writerows(split_rows)
  return folder


def nli_expected(split, label_names):
  """Examples of NLI_ROWS[split] ordered by language (en, fr), labels indexing names."""
  return [Example(text=p, label=label_names.index(l), language=g, text_pair=h)
          for lang in ("en", "fr") for p, h, l, g in NLI_ROWS[split] if g == lang]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_files_sentence_pairs(tmp_path, fmt):
  folder = write_nli(tmp_path / "xnli", fmt)
  task = tasks.load_task(data_config(f"files:{folder}/*.{fmt}", columns=NLI_COLUMNS))
  assert task.input_kind == "text_pair" and task.label_kind == "sequence"
  # No ClassLabel: the train split's values, sorted.
  assert task.label_names == ("contradiction", "entailment", "neutral")
  assert task.languages == ("en", "fr")  # first seen in train
  for split, source_split in (("train", "train"), ("val", "dev"), ("test", "test")):
    assert task.splits[split] == nli_expected(source_split, task.label_names)
  assert task.splits["train"][0] == Example(
      "The cat sat on the mat, quietly.", 1, "en", text_pair="A cat is sitting.")


def test_files_label_names_override(tmp_path):
  folder = write_nli(tmp_path / "xnli", "jsonl")
  task = tasks.load_task(data_config(f"files:{folder}/*.jsonl", columns=NLI_COLUMNS,
                                     label_names=NLI_LABELS))
  assert task.label_names == NLI_LABELS
  assert task.splits["test"] == nli_expected("test", NLI_LABELS)
  assert [e.label for e in task.splits["train"]] == [0, 1, 2, 2, 0, 1]


def test_files_without_language_column(tmp_path):
  folder = write_nli(tmp_path / "xnli", "csv")
  task = tasks.load_task(data_config(f"files:{folder}/*.csv",
                                     columns={"text": "premise", "text_pair": "hypothesis"}))
  assert task.languages == (tasks.ALL_LANGUAGES,) == ("all",)
  assert counts(task.splits["train"]) == {"all": 6}
  assert [e.text for e in task.splits["val"]] == [r[0] for r in NLI_ROWS["dev"]]


def test_files_integer_labels_sorted_numerically(tmp_path):
  for split in ("train", "dev", "test"):
    (tmp_path / f"{split}.csv").write_text("text,label\na,10\nb,2\nc,0\nd,1\ne,-1\n")
  task = tasks.load_task(data_config(f"files:{tmp_path}/*.csv"))  # default columns
  assert task.label_names == ("-1", "0", "1", "2", "10")
  assert [(e.text, e.label) for e in task.splits["train"]] == [
      ("a", 4), ("b", 3), ("c", 1), ("d", 2), ("e", 0)]


@pytest.mark.parametrize("names", [
    {"train": "xnli_train", "dev": "xnli-validation-part1", "test": "my_test_part1"},
    # dots inside the name: MultiNLI's and XNLI 1.0's own file names
    {"train": "multinli_1.0_train", "dev": "xnli.dev", "test": "xnli.test"},
])
def test_files_split_names(tmp_path, names):
  folder = write_nli(tmp_path / "xnli", "jsonl", names=names)
  task = tasks.load_task(data_config(f"files:{folder}/*.jsonl", columns=NLI_COLUMNS))
  assert task.splits["val"] == nli_expected("dev", task.label_names)
  assert task.splits["test"] == nli_expected("test", task.label_names)


def test_files_token_task_tag_names_sorted_o_first(tmp_path):
  (tmp_path / "ner").mkdir()
  for split, source_split in (("train", "train"), ("dev", "validation"), ("test", "test")):
    lines = [json.dumps({"tokens": text.split(), "ner_tags": tags.split(), "lang": lang})
             for lang in ("en_ewt", "pt_bosque") for text, tags in UNER_ROWS[lang][source_split]]
    (tmp_path / "ner" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
  task = tasks.load_task(data_config(f"files:{tmp_path}/ner/*.jsonl",
                                     columns={"language": "lang"}))
  assert task.label_kind == "token"  # from the default tokens / ner_tags columns
  assert task.label_names == ("O", "B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER")
  assert task.languages == ("en_ewt", "pt_bosque")
  ex = task.splits["val"][0]
  assert ex.tokens == ("Bob", "met", "Alice") and ex.text == "Bob met Alice"
  assert [task.label_names[t] for t in ex.label] == ["B-PER", "O", "B-PER"]


def test_hf_parquet_folder(tmp_path):
  """hf:<dir> of parquet files with XNLI's ClassLabel; `dev` is the val split."""
  import datasets
  features = datasets.Features({
      "premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
      "label": datasets.ClassLabel(names=list(NLI_LABELS)),
      "language": datasets.Value("string")})
  for split, rows in NLI_ROWS.items():
    to_parquet([{"premise": p, "hypothesis": h, "label": NLI_LABELS.index(l), "language": g}
                for p, h, l, g in rows], features, tmp_path / "xnli" / f"{split}.parquet")
  task = tasks.load_task(data_config(f"hf:{tmp_path / 'xnli'}", columns=NLI_COLUMNS))
  assert task.label_names == NLI_LABELS  # the ClassLabel's order
  assert task.input_kind == "text_pair" and task.languages == ("en", "fr")
  for split, source_split in (("train", "train"), ("val", "dev"), ("test", "test")):
    assert task.splits[split] == nli_expected(source_split, NLI_LABELS)
  assert tasks.label_info(data_config(f"hf:{tmp_path / 'xnli'}", columns=NLI_COLUMNS)) == (
      "sequence", 3)
  # label_names reorders the ids; the ClassLabel's integers are mapped by name.
  names = ("contradiction", "entailment", "neutral")
  task = tasks.load_task(data_config(f"hf:{tmp_path / 'xnli'}", columns=NLI_COLUMNS,
                                     label_names=names))
  assert task.label_names == names
  assert task.splits["test"] == nli_expected("test", names)
  with pytest.raises(DataError, match="split .train. row 1: label 'contradiction' is not one of"):
    tasks.load_task(data_config(f"hf:{tmp_path / 'xnli'}", columns=NLI_COLUMNS,
                                label_names=("entailment", "neutral")))


def test_files_language_only_in_eval_splits(tmp_path):
  rows = dict(NLI_ROWS, train=[r for r in NLI_ROWS["train"] if r[3] == "en"])
  folder = write_nli(tmp_path / "xnli", "jsonl", rows)
  task = tasks.load_task(data_config(f"files:{folder}/*.jsonl", columns=NLI_COLUMNS,
                                     train_languages=("en",), unseen_languages=("fr",)))
  assert task.languages == ("en", "fr")
  assert counts(task.splits["test"]) == {"en": 1, "fr": 2}


# ---------------------------------------------------------------- files: bad input


def test_files_missing_column(tmp_path):
  folder = write_nli(tmp_path / "xnli", "jsonl")
  with pytest.raises(DataError) as e:
    tasks.load_task(data_config(f"files:{folder}/*.jsonl",
                                columns=dict(NLI_COLUMNS, text_pair="hyp")))
  message = str(e.value)
  assert "no column 'hyp' (config.data.columns.text_pair)" in message
  assert "['hypothesis', 'label', 'language', 'premise']" in message


def test_files_missing_language_column(tmp_path):
  folder = write_nli(tmp_path / "xnli", "jsonl")
  with pytest.raises(DataError, match=r"no column 'lang' \(config.data.columns.language\)"):
    tasks.load_task(data_config(f"files:{folder}/*.jsonl",
                                columns=dict(NLI_COLUMNS, language="lang")))


def test_files_label_outside_label_names(tmp_path):
  folder = write_nli(tmp_path / "xnli", "jsonl")
  with pytest.raises(DataError) as e:
    tasks.load_task(data_config(f"files:{folder}/*.jsonl", columns=NLI_COLUMNS,
                                label_names=("entailment", "neutral")))
  # Row 1 of train.jsonl is the first contradiction.
  assert "split 'train' row 1: label 'contradiction' is not one of the label names " \
         "['entailment', 'neutral']" in str(e.value)


def test_files_eval_label_not_in_train(tmp_path):
  rows = dict(NLI_ROWS, test=NLI_ROWS["test"] + [("X.", "Y.", "unrelated", "en")])
  folder = write_nli(tmp_path / "xnli", "jsonl", rows)
  with pytest.raises(DataError) as e:
    tasks.load_task(data_config(f"files:{folder}/*.jsonl", columns=NLI_COLUMNS))
  message = str(e.value)
  assert "split 'test' row 3: label 'unrelated'" in message
  assert "label names from files:" in message and "split 'train'" in message


def test_files_missing_val_split(tmp_path):
  folder = write_nli(tmp_path / "xnli", "csv", {s: NLI_ROWS[s] for s in ("train", "test")})
  with pytest.raises(DataError) as e:
    tasks.load_task(data_config(f"files:{folder}/*.csv", columns=NLI_COLUMNS))
  message = str(e.value)
  assert "has no val split" in message and "its splits are ['test', 'train']" in message


def test_files_empty_split_for_a_language(tmp_path):
  rows = dict(NLI_ROWS, dev=[r for r in NLI_ROWS["dev"] if r[3] == "en"])
  folder = write_nli(tmp_path / "xnli", "jsonl", rows)
  with pytest.raises(DataError, match="the val split has no examples for language 'fr'"):
    tasks.load_task(data_config(f"files:{folder}/*.jsonl", columns=NLI_COLUMNS))


def test_files_empty_file(tmp_path):
  folder = write_nli(tmp_path / "xnli", "csv", dict(NLI_ROWS, test=[]))
  # `datasets` refuses a split without rows; the DataError names the file.
  with pytest.raises(DataError, match="reading .* failed") as e:
    tasks.load_task(data_config(f"files:{folder}/*.csv", columns=NLI_COLUMNS))
  assert os.fspath(folder / "test.csv") in str(e.value)


def test_files_split_not_in_name(tmp_path):
  folder = write_nli(tmp_path / "xnli", "csv", names={"dev": "notes"})
  with pytest.raises(DataError, match="cannot tell the split of") as e:
    tasks.load_task(data_config(f"files:{folder}/*.csv", columns=NLI_COLUMNS))
  assert repr(os.fspath(folder / "notes.csv")) in str(e.value)


def test_files_no_match_and_bad_extension(tmp_path):
  with pytest.raises(DataError, match="no file matches"):
    tasks.load_task(data_config(f"files:{tmp_path}/*.csv"))
  (tmp_path / "train.txt").write_text("a\n")
  with pytest.raises(DataError, match="train.txt' is not one of"):
    tasks.load_task(data_config(f"files:{tmp_path}/train.*"))


# ---------------------------------------------------------------- TFDS

TFDS_LABELS = ("sports", "politics", "health")  # not sorted
TFDS_ROWS = {  # split -> (text, label, language)
    "train": [("The team won the cup", "sports", "en"), ("El gobierno cayó", "politics", "es"),
              ("Drink more water", "health", "en"), ("Ganó el partido", "sports", "es"),
              ("Parliament voted today", "politics", "en")],
    "validation": [("A new striker signed", "sports", "en"),
                   ("Duerme ocho horas", "health", "es")],
    "test": [("Elections next week", "politics", "en"), ("Vacunas gratis", "health", "es"),
             ("El equipo perdió", "sports", "es")],
}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A TFDS dataset `kd_jax_test_topics` built and prepared locally; the data dir."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class KdJaxTestTopics(tfds.core.GeneratorBasedBuilder):
    """Three topics in two languages (TFDS_ROWS)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "text": tfds.features.Text(),
          "label": tfds.features.ClassLabel(names=list(TFDS_LABELS)),
          "language": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(rows) for split, rows in TFDS_ROWS.items()}

    def _generate_examples(self, rows):
      for i, (text, label, language) in enumerate(rows):
        yield i, {"text": text, "label": label, "language": language}

  root = tmp_path_factory.mktemp("tfds")
  builder = KdJaxTestTopics(data_dir=os.fspath(root))
  assert builder.name == "kd_jax_test_topics"
  builder.download_and_prepare()
  return root


def test_tfds_builder(tfds_dir):
  task = tasks.load_task(data_config("tfds:kd_jax_test_topics", tfds_dir,
                                     columns={"language": "language"}))
  assert task.label_names == TFDS_LABELS
  assert (task.label_kind, task.input_kind) == ("sequence", "text")
  assert set(task.languages) == {"en", "es"}
  for split, source_split in (("train", "train"), ("val", "validation"), ("test", "test")):
    got = by_language(task.splits[split])
    for lang in ("en", "es"):
      # TFDS shuffles the rows of a split when it prepares it: compare as sorted lists.
      expected = [Example(text, TFDS_LABELS.index(label), lang)
                  for text, label, g in TFDS_ROWS[source_split] if g == lang]
      assert sorted(got[lang], key=lambda e: e.text) == sorted(expected, key=lambda e: e.text)
  assert tasks.label_info(data_config("tfds:kd_jax_test_topics", tfds_dir)) == ("sequence", 3)


def test_tfds_unknown_builder(tfds_dir):
  with pytest.raises(DataError, match="tfds:kd_jax_no_such_dataset: loading the builder "
                                      "failed"):
    tasks.load_task(data_config("tfds:kd_jax_no_such_dataset", tfds_dir))


def test_tfds_missing_column(tfds_dir):
  with pytest.raises(DataError) as e:
    tasks.load_task(data_config("tfds:kd_jax_test_topics", tfds_dir,
                                columns={"text": "sentence1", "language": "language"}))
  assert "no column 'sentence1'" in str(e.value)
  assert "['label', 'language', 'text']" in str(e.value)


# ---------------------------------------------------------------- SIB-200 (fixture)

SIB_COUNTS = (121, 83, 62, 47, 26, 9, 1)  # train rows per class, in SIB200_LABELS order
SIB_LANGUAGES = ("eng_Latn", "rus_Cyrl", "zho_Hans")


def write_sib200(root, languages=SIB_LANGUAGES, train_counts=SIB_COUNTS, eval_per_class=2):
  """<root>/sib200/<lang>/{train,dev,test}.tsv (index_id, category, text), classes
  shuffled (seeded); returns root."""
  rng = np.random.default_rng(0)
  for lang in languages:
    (root / "sib200" / lang).mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", train_counts), ("dev", (eval_per_class,) * 7),
                             ("test", (eval_per_class,) * 7)):
      labels = rng.permutation(np.repeat(np.arange(7), per_class))
      with open(root / "sib200" / lang / f"{split}.tsv", "w", encoding="utf-8",
                newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(tasks.SIB200_HEADER)
        for i, c in enumerate(labels):
          writer.writerow((i, tasks.SIB200_LABELS[c], f"{lang} {split} {i}"))
  return root


@pytest.fixture(scope="module")
def sib_dir(tmp_path_factory):
  return write_sib200(tmp_path_factory.mktemp("sib"))


def test_sib200_fixture(sib_dir):
  task = tasks.load_task(data_config("sib200", sib_dir))
  assert task.label_names == tasks.SIB200_LABELS
  assert task.languages == SIB_LANGUAGES  # the folders, sorted
  assert counts(task.splits["train"]) == {lang: sum(SIB_COUNTS) for lang in SIB_LANGUAGES}
  assert counts(task.splits["val"]) == counts(task.splits["test"]) == {
      lang: 14 for lang in SIB_LANGUAGES}
  with open(sib_dir / "sib200" / "rus_Cyrl" / "dev.tsv", encoding="utf-8") as f:
    rows = list(csv.reader(f, delimiter="\t"))[1:]
  assert by_language(task.splits["val"])["rus_Cyrl"] == [
      Example(text, tasks.SIB200_LABELS.index(category), "rus_Cyrl") for _, category, text in rows]
  # data_dir may also be the sib200 folder itself.
  same = tasks.load_task(data_config("sib200", sib_dir / "sib200", languages=("zho_Hans",)))
  assert same.splits["test"] == by_language(task.splits["test"])["zho_Hans"]


def test_sib200_unknown_language(sib_dir):
  with pytest.raises(DataError, match=r"config.data.languages: \['fra_Latn'\] not in task "
                                      "'sib200'; it has 3 languages"):
    tasks.load_task(data_config("sib200", sib_dir, languages=("eng_Latn", "fra_Latn")))


def test_sib200_bad_category(tmp_path):
  write_sib200(tmp_path, languages=("eng_Latn",))
  path = tmp_path / "sib200" / "eng_Latn" / "test.tsv"
  lines = path.read_text(encoding="utf-8").split("\n")
  lines[3] = "2\tfinance\tStocks fell."
  path.write_text("\n".join(lines), encoding="utf-8")
  with pytest.raises(DataError, match=r"test.tsv' row 4: category 'finance' is not one of"):
    tasks.load_task(data_config("sib200", tmp_path))


def class_counts(examples):
  return dict(collections.Counter((e.language, e.label) for e in examples))


def check_stratified(full, subset, fraction):
  """Every (language, class) of `full` kept with max(1, round(fraction * n_c)) rows, a
  subsequence of `full`."""
  expected = {k: max(1, round(fraction * n)) for k, n in class_counts(full).items()}
  assert class_counts(subset) == expected
  for lang, rows in by_language(subset).items():
    assert {e.label for e in rows} == set(range(7))
    assert [e for e in by_language(full)[lang] if e in rows] == rows


def test_sib200_train_fraction_stratified(sib_dir):
  """The paper's Figure 2: 5% of train, every class of every language kept."""
  full = tasks.load_task(data_config("sib200", sib_dir))
  task = tasks.load_task(data_config("sib200", sib_dir, train_fraction=0.05), seed=0)
  check_stratified(full.splits["train"], task.splits["train"], 0.05)
  # By hand: 121, 83, 62, 47, 26, 9, 1 rows -> 6, 4, 3, 2, 1, 1, 1.
  assert counts(task.splits["train"]) == {lang: 18 for lang in SIB_LANGUAGES}
  assert task.splits["val"] == full.splits["val"]  # eval_fraction 1
  again = tasks.load_task(data_config("sib200", sib_dir, train_fraction=0.05), seed=0)
  other = tasks.load_task(data_config("sib200", sib_dir, train_fraction=0.05), seed=1)
  assert again.splits["train"] == task.splits["train"]
  assert other.splits["train"] != task.splits["train"]
  check_stratified(full.splits["train"], other.splits["train"], 0.05)


def test_sib200_eval_fraction(sib_dir):
  task = tasks.load_task(data_config("sib200", sib_dir, eval_fraction=0.5))
  # 2 rows per class -> round(1.0) = 1.
  assert counts(task.splits["val"]) == counts(task.splits["test"]) == {
      lang: 7 for lang in SIB_LANGUAGES}
  assert counts(task.splits["train"]) == {lang: sum(SIB_COUNTS) for lang in SIB_LANGUAGES}


@pytest.mark.parametrize("field", ["train_fraction", "eval_fraction"])
@pytest.mark.parametrize("value", [0.0, 1.5, -0.1])
def test_fraction_out_of_range(sib_dir, field, value):
  with pytest.raises(DataError, match=f"config.data.{field} must be in"):
    tasks.load_task(data_config("sib200", sib_dir, **{field: value}))


# ---------------------------------------------------------------- stratified_subset


def test_stratified_subset_by_hand():
  rows = [Example(f"r{i}", label, "x") for i, label in enumerate([0, 1, 0, 2, 0, 1, 0, 0, 1,
                                                                  0, 0, 1, 0, 0, 0, 0])]
  # Classes: 0 -> 11 rows, 1 -> 4 rows, 2 -> 1 row. 30%: round(3.3)=3, round(1.2)=1,
  # max(1, round(0.3))=1.
  subset = stratified_subset(rows, 0.3, seed=5, stream=2)
  assert collections.Counter(e.label for e in subset) == {0: 3, 1: 1, 2: 1}
  assert subset == [r for r in rows if r in subset]  # input order kept
  zeros = [i for i, r in enumerate(rows) if r.label == 0]
  drawn = np.random.default_rng((5, 2, 0)).choice(len(zeros), size=3, replace=False)
  assert [r for r in subset if r.label == 0] == [rows[zeros[i]] for i in sorted(drawn)]
  assert stratified_subset(rows, 0.3, seed=5, stream=2) == subset
  assert stratified_subset(rows, 1.0, seed=5) == rows
  assert stratified_subset([], 0.5, seed=0) == []


def test_stratified_subset_token_rows():
  rows = [Example(f"t{i}", (0,) * (i + 1), "x", tokens=("w",) * (i + 1)) for i in range(10)]
  subset = stratified_subset(rows, 0.3, seed=1)
  assert len(subset) == 3 and subset == [r for r in rows if r in subset]
  drawn = np.random.default_rng((1, 0)).choice(10, size=3, replace=False)
  assert subset == [rows[i] for i in sorted(drawn)]
  assert len(stratified_subset(rows, 0.01, seed=1)) == 1


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.01])
def test_stratified_subset_bad_fraction(fraction):
  with pytest.raises(DataError, match="must be in"):
    stratified_subset([Example("a", 0, "x")], fraction, seed=0)


# ---------------------------------------------------------------- label_info


def test_label_info_tsm_reads_nothing(tmp_path):
  assert tasks.label_info(data_config("tsm", tmp_path / "does_not_exist")) == ("sequence", 3)
  with pytest.raises(DataError, match=r"config.data.languages: \['klingon'\] not in task"):
    tasks.label_info(data_config("tsm", tmp_path / "does_not_exist", languages=("klingon",)))


def test_label_info_sib200_reads_no_rows(tmp_path):
  for lang in ("eng_Latn", "fra_Latn"):
    (tmp_path / "sib200" / lang).mkdir(parents=True)
    (tmp_path / "sib200" / lang / "train.tsv").write_text("not a SIB-200 file\n")
  assert tasks.label_info(data_config("sib200", tmp_path)) == ("sequence", 7)
  with pytest.raises(DataError, match=r"\['deu_Latn'\] not in task 'sib200'"):
    tasks.label_info(data_config("sib200", tmp_path, languages=("deu_Latn",)))
  with pytest.raises(DataError, match="header"):  # load_task does read them
    tasks.load_task(data_config("sib200", tmp_path))


def test_label_info_files(tmp_path):
  folder = write_nli(tmp_path / "xnli", "tsv")
  assert tasks.label_info(data_config(f"files:{folder}/*.tsv", columns=NLI_COLUMNS)) == (
      "sequence", 3)


# ---------------------------------------------------------------- the real SIB-200

REAL_SIB_LANGUAGES = ("arb_Arab", "eng_Latn", "zho_Hans")  # three scripts


@pytest.fixture(scope="module")
def real_sib200_dir():
  """The real data folder holding sib200/ (../shared/data or $KD_JAX_DATA_DIR); skips
  without it or with $KD_JAX_TEST_NO_REAL_DATA=1."""
  if os.environ.get("KD_JAX_TEST_NO_REAL_DATA") == "1":
    pytest.skip("KD_JAX_TEST_NO_REAL_DATA=1")
  for candidate in (os.environ.get("KD_JAX_DATA_DIR"), REPO_ROOT.parent / "shared" / "data"):
    if candidate and (pathlib.Path(candidate) / "sib200" / "eng_Latn").is_dir():
      return pathlib.Path(candidate).absolute()
  pytest.skip("real SIB-200 not found: set KD_JAX_DATA_DIR to the folder holding sib200/")


@pytest.fixture(scope="module")
def real_sib200(real_sib200_dir):
  return tasks.load_task(data_config("sib200", real_sib200_dir, languages=REAL_SIB_LANGUAGES))


def test_real_sib200(real_sib200):
  task = real_sib200
  assert task.label_names == tasks.SIB200_LABELS and task.num_labels == 7
  assert task.languages == REAL_SIB_LANGUAGES
  for split, n in (("train", 701), ("val", 99), ("test", 204)):
    assert counts(task.splits[split]) == {lang: n for lang in REAL_SIB_LANGUAGES}, split
    assert {e.label for e in task.splits[split]} == set(range(7))
  # eng_Latn/train.tsv, first row: 431, geography, "Turkey is encircled by seas ...".
  first = by_language(task.splits["train"])["eng_Latn"][0]
  assert first.label == tasks.SIB200_LABELS.index("geography")
  assert first.text.startswith("Turkey is encircled by seas on three sides: the Aegean Sea")


def test_real_sib200_rows_match_tsv(real_sib200, real_sib200_dir):
  path = real_sib200_dir / "sib200" / "zho_Hans" / "test.tsv"
  with open(path, encoding="utf-8", newline="") as f:
    rows = list(csv.reader(f, delimiter="\t"))
  assert tuple(rows[0]) == tasks.SIB200_HEADER
  got = by_language(real_sib200.splits["test"])["zho_Hans"]
  assert [(tasks.SIB200_LABELS[e.label], e.text) for e in got] == [(c, t) for _, c, t in rows[1:]]


def test_real_sib200_train_fraction(real_sib200, real_sib200_dir):
  task = tasks.load_task(data_config("sib200", real_sib200_dir, languages=REAL_SIB_LANGUAGES,
                                     train_fraction=0.05), seed=0)
  check_stratified(real_sib200.splits["train"], task.splits["train"], 0.05)
  again = tasks.load_task(data_config("sib200", real_sib200_dir, languages=REAL_SIB_LANGUAGES,
                                      train_fraction=0.05), seed=0)
  other = tasks.load_task(data_config("sib200", real_sib200_dir, languages=REAL_SIB_LANGUAGES,
                                      train_fraction=0.05), seed=1)
  assert again.splits["train"] == task.splits["train"]
  assert other.splits["train"] != task.splits["train"]
  assert task.splits["test"] == real_sib200.splits["test"]
