"""Shared fixtures: the real data directory, a synthetic one in the same layout, and tiny
BERT-shaped model directories whose tokenizers are trained on either."""

import atexit
import csv
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# One persistent XLA compilation cache for the whole session, inherited by the
# `kd_jax.main` subprocesses: the tests compile the same tiny models' steps many times.
# Set before jax is imported; a test's own `compile_cache` fixture swaps it and back.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _xla_cache = tempfile.mkdtemp(prefix="kd_jax_tests_xla_")
  atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def tiny_config(model: str, data: str, *, languages=("english", "arabic"),
                train_fraction=0.05, eval_fraction=0.05, max_length=32, num_train_steps=12,
                eval_batch_size=16, eval_every_steps=4, checkpoint_every_steps=2,
                log_every_steps=4, extra: str = "") -> str:
  """The text of a config file (`get_config()`, as `--config` loads it) of a tiny job on
  `model` and `data` (paths as written, relative ones too): 2-layer student, teacher and
  student trained for `num_train_steps` steps of 8 examples, one bucket of `max_length`;
  `extra`: more lines of get_config's body (indented by 2)."""
  return f'''
from kd_jax import config_base


def get_config():
  config = config_base.base_config()
  config.model = {model!r}
  config.data.data_dir = {data!r}
  config.data.languages = {tuple(languages)!r}
  config.data.train_fraction = {train_fraction!r}
  config.data.eval_fraction = {eval_fraction!r}
  config.data.max_length = {max_length!r}
  config.data.buckets = ({max_length!r},)
  for name in ("teacher", "student"):
    config[name].train = config_base.train_config(
        batch_size=8, eval_batch_size={eval_batch_size}, num_train_steps={num_train_steps},
        learning_rate=1e-3, eval_every_steps={eval_every_steps},
        checkpoint_every_steps={checkpoint_every_steps}, log_every_steps={log_every_steps})
  config.student.num_layers = 2
{extra}  return config
'''


# Set to 1 to run the tests as if there were no real data (real_data_dir skips).
NO_REAL_DATA_ENV = "KD_JAX_TEST_NO_REAL_DATA"


def data_dir() -> pathlib.Path | None:
  """$KD_JAX_DATA_DIR, else ../shared/data beside the project; None with
  $KD_JAX_TEST_NO_REAL_DATA=1."""
  if os.environ.get(NO_REAL_DATA_ENV) == "1":
    return None
  for candidate in (os.environ.get("KD_JAX_DATA_DIR"), ROOT.parent / "shared" / "data"):
    if candidate and pathlib.Path(candidate, "xlmt").is_dir():
      return pathlib.Path(candidate).absolute()  # tests may change the current directory
  return None


@pytest.fixture(scope="session")
def real_data_dir():
  d = data_dir()
  if d is None:
    pytest.skip("tsm data not found: set KD_JAX_DATA_DIR (e.g. ../shared/data)")
  return d


def tiny_tokenizer_texts(data: pathlib.Path) -> list[str]:
  """The tokenizer's training text: the first 300 train tweets of 4 languages of the
  tsm folder `data` (the real data or `write_synthetic_data`'s)."""
  texts = []
  for lang in ("english", "spanish", "arabic", "hindi"):
    texts += (data / "xlmt" / lang / "train_text.txt").read_text().split("\n")[:300]
  return texts


def save_tiny_wordpiece_tokenizer(out: pathlib.Path, data: pathlib.Path):
  """Trains a 400-token WordPiece tokenizer (BERT specials, [CLS] x [SEP]) on
  `tiny_tokenizer_texts(data)`, saves it into `out` and returns the
  `tokenizers.Tokenizer`."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  texts = tiny_tokenizer_texts(data)
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                 cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
  out.mkdir(parents=True, exist_ok=True)
  fast.save_pretrained(out)
  return tok


def make_tiny_model_dir(out: pathlib.Path, data: pathlib.Path, *, hidden=32, layers=4, heads=4,
                        seed=0) -> pathlib.Path:
  """A small WordPiece tokenizer trained on the tsm text of `data` (real or synthetic)
  and a random BERT base checkpoint."""
  import jax

  from kd_jax import hf_io
  from kd_jax.models.encoder import EncoderConfig, init_params
  from safetensors.numpy import save_file

  tok = save_tiny_wordpiece_tokenizer(out, data)
  cfg = EncoderConfig(family="bert", vocab_size=tok.get_vocab_size(), hidden_size=hidden,
                      num_layers=layers, num_heads=heads, intermediate_size=2 * hidden,
                      max_position_embeddings=130, num_labels=0, pad_token_id=0)
  (out / "config.json").write_text(json.dumps({
      "model_type": "bert", "architectures": ["BertModel"], "vocab_size": cfg.vocab_size,
      "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
      "intermediate_size": 2 * hidden, "max_position_embeddings": 130, "type_vocab_size": 2,
      "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0}))
  params = jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(seed)))
  state = hf_io.params_to_state_dict(params, cfg, prefix="")
  # A base model has a pooler but no classifier.
  save_file({k: v for k, v in state.items() if not k.startswith("classifier")},
            str(out / "model.safetensors"))
  return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real_data_dir):
  return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", real_data_dir)


@pytest.fixture(scope="session")
def synthetic_model_dir(tmp_path_factory, synthetic_data_dir):
  """`tiny_model_dir` with the tokenizer trained on the synthetic texts: needs no real data."""
  return make_tiny_model_dir(tmp_path_factory.mktemp("synthetic_tiny") / "model",
                             synthetic_data_dir)


# ---------------------------------------------------------------------------
# synthetic data in the on-disk layout of the real folder
# ---------------------------------------------------------------------------
# Rows per language and split, as the real tsm (so fractions give the same counts:
# 5% of train = 92, 10% of test = 87).
SYNTHETIC_TSM_SIZES = {"train": 1839, "val": 324, "test": 870}
SYNTHETIC_SIB200_LANGUAGES = ("eng_Latn",)
SYNTHETIC_SIB200_SIZES = {"train": 701, "dev": 99, "test": 204}   # as the real SIB-200
SIB200_CATEGORIES = ("science/technology", "travel", "politics", "sports", "health",
                     "entertainment", "geography")

# Per language: how a pseudo-word is spelt. Latin languages: syllables (consonant, vowel,
# sometimes a final consonant) from their own letters; arabic: runs of Arabic letters;
# hindi: Devanagari consonants with vowel signs. So every language has its own words and
# the tokenizer (trained on english, spanish, arabic, hindi) splits them differently.
_LATIN = {
    "english": ("bcdfghklmnprstvwy", "aeiou"),
    "spanish": ("bcdfgjlmnprstvzñ", "aeiouáéó"),
    "french": ("bcdfgjlmnprstvzç", "aeiouéèê"),
    "german": ("bcdfghkmnprstwz", "aeiouäöü"),
    "italian": ("bcdfglmnprstvz", "aeiouàò"),
    "portuguese": ("bcdfgjlmnprstvx", "aeiouãõâ"),
}
_ARABIC_LETTERS = "ابتثجحخدذرزسشصضطظعغفقكلمنهوي"
_DEVANAGARI_CONSONANTS = "कखगघचछजझटठडढणतथदधनपफबभमयरलवशषसह"
_DEVANAGARI_SIGNS = "ािीोौ"   # spacing vowel signs: BERT's accent stripping keeps them


def _pseudo_word(rng: np.random.Generator, language: str) -> str:
  pick = lambda letters: letters[rng.integers(len(letters))]
  if language == "arabic":
    return "".join(pick(_ARABIC_LETTERS) for _ in range(rng.integers(2, 6)))
  if language == "hindi":
    return "".join(pick(_DEVANAGARI_CONSONANTS) + (pick(_DEVANAGARI_SIGNS)
                                                    if rng.random() < 0.6 else "")
                   for _ in range(rng.integers(1, 4)))
  consonants, vowels = _LATIN[language]
  word = ""
  for _ in range(rng.integers(1, 4)):
    word += pick(consonants) + pick(vowels)
    if rng.random() < 0.3:
      word += pick(consonants)
  return word


def _vocabulary(rng: np.random.Generator, language: str, num_classes: int,
                common: int = 150, per_class: int = 25) -> tuple[list[str], list[list[str]]]:
  """Distinct pseudo-words: a common pool and one pool per class."""
  words: list[str] = []
  seen = set()
  while len(words) < common + num_classes * per_class:
    w = _pseudo_word(rng, language)
    if w not in seen:
      seen.add(w)
      words.append(w)
  pools = [words[common + c * per_class:common + (c + 1) * per_class]
           for c in range(num_classes)]
  return words[:common], pools


def _sentences(rng: np.random.Generator, labels: np.ndarray, common: list[str],
               pools: list[list[str]], class_prob: float = 0.3) -> list[str]:
  """One sentence per label: 4-18 pseudo-words, each from the label's pool with
  probability `class_prob`, else from the common pool (Zipf-like weights); sometimes a
  hashtag or a final "!" / "?" / "..."."""
  zipf = 1.0 / np.arange(3, len(common) + 3)
  zipf /= zipf.sum()
  endings = ("", "", "!", "?", "...")
  out = []
  for label in labels:
    n = int(rng.integers(4, 19))
    from_class = rng.random(n) < class_prob
    common_ids = rng.choice(len(common), size=n, p=zipf)
    class_ids = rng.integers(len(pools[label]), size=n)
    words = [pools[label][j] if c else common[i]
             for c, i, j in zip(from_class, common_ids, class_ids)]
    if rng.random() < 0.2:
      words.append("#" + words[int(rng.integers(n))])
    out.append(" ".join(words) + endings[int(rng.integers(len(endings)))])
  return out


def _balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
  return rng.permutation(np.arange(n) % num_classes)


def write_synthetic_data(out: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """Writes a deterministic (numpy, `seed`) stand-in for the real data folder into `out`
  and returns `out`:

  * ``xlmt/<language>/{train,val,test}_{text,labels}.txt`` for the 8 tsm languages,
    `SYNTHETIC_TSM_SIZES` rows each, labels 0/1/2 balanced, one text / label per line
    and no trailing newline (as the real files);
  * ``sib200/eng_Latn/{train,dev,test}.tsv`` (header ``index_id, category, text``),
    `SYNTHETIC_SIB200_SIZES` rows, for the general-distillation tests.

  Texts are pseudo-word sentences whose words depend on the language and, partly, on the
  label, so a model can learn something.
  """
  from kd_jax.data.tsm import TSM_LABELS, TSM_LANGUAGES

  for lang_index, language in enumerate(TSM_LANGUAGES):
    rng = np.random.default_rng((seed, 0, lang_index))
    common, pools = _vocabulary(rng, language, len(TSM_LABELS))
    lang_dir = out / "xlmt" / language
    lang_dir.mkdir(parents=True, exist_ok=True)
    for split, n in SYNTHETIC_TSM_SIZES.items():
      labels = _balanced_labels(rng, n, len(TSM_LABELS))
      texts = _sentences(rng, labels, common, pools)
      (lang_dir / f"{split}_text.txt").write_text("\n".join(texts), encoding="utf-8")
      (lang_dir / f"{split}_labels.txt").write_text("\n".join(map(str, labels)))
  for lang_index, language in enumerate(SYNTHETIC_SIB200_LANGUAGES):
    rng = np.random.default_rng((seed, 1, lang_index))
    common, pools = _vocabulary(rng, "english", len(SIB200_CATEGORIES))
    lang_dir = out / "sib200" / language
    lang_dir.mkdir(parents=True, exist_ok=True)
    index_ids = rng.permutation(sum(SYNTHETIC_SIB200_SIZES.values()))
    start = 0
    for split, n in SYNTHETIC_SIB200_SIZES.items():
      labels = _balanced_labels(rng, n, len(SIB200_CATEGORIES))
      texts = _sentences(rng, labels, common, pools)
      with open(lang_dir / f"{split}.tsv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(("index_id", "category", "text"))
        for i, label, t in zip(index_ids[start:start + n], labels, texts):
          writer.writerow((int(i), SIB200_CATEGORIES[label], t))
      start += n
  return out


UNER_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
NLI_LABELS = ("entailment", "neutral", "contradiction")


def write_uner_dataset(out: pathlib.Path, languages=("en_ewt", "pt_bosque"),
                       sizes=(("train", 96), ("validation", 24), ("test", 24)),
                       seed: int = 0) -> pathlib.Path:
  """Universal NER in its hub schema, one dataset dir per language (the hub's configs):
  ``out/<language>/data/<split>-00000-of-00001.parquet`` with columns idx, text, tokens,
  ner_tags (a sequence of ClassLabel `UNER_TAGS`), annotator. Entities are pseudo-word
  names from per-type pools (PER spans of 1-2 words), so they can be learned."""
  import datasets
  features = datasets.Features({
      "idx": datasets.Value("string"), "text": datasets.Value("string"),
      "tokens": datasets.List(datasets.Value("string")),
      "ner_tags": datasets.List(datasets.ClassLabel(names=list(UNER_TAGS))),
      "annotator": datasets.Value("string")})
  for lang_index, language in enumerate(languages):
    rng = np.random.default_rng((seed, 2, lang_index))
    common = [_pseudo_word(rng, "english") for _ in range(40)]
    names = {kind: [_pseudo_word(rng, "spanish").capitalize() for _ in range(8)]
             for kind in ("PER", "ORG", "LOC")}
    for split, n in sizes:
      rows = {k: [] for k in features}
      for i in range(n):
        tokens, tags = [], []
        for _ in range(int(rng.integers(4, 10))):
          if rng.random() < 0.25:
            kind = ("PER", "ORG", "LOC")[int(rng.integers(3))]
            span = int(rng.integers(1, 3))
            for j in range(span):
              tokens.append(names[kind][int(rng.integers(8))])
              tags.append(UNER_TAGS.index(("B-" if j == 0 else "I-") + kind))
          else:
            tokens.append(common[int(rng.integers(40))])
            tags.append(0)
        for k, v in (("idx", f"{language}-{split}-{i}"), ("text", " ".join(tokens)),
                     ("tokens", tokens), ("ner_tags", tags), ("annotator", "synthetic")):
          rows[k].append(v)
      path = out / language / "data" / f"{split}-00000-of-00001.parquet"
      path.parent.mkdir(parents=True, exist_ok=True)
      datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
  return out


def write_nli_files(out: pathlib.Path, languages=("en", "de"),
                    sizes=(("train", 96), ("dev", 24), ("test", 24)), seed: int = 0
                    ) -> pathlib.Path:
  """XNLI-shaped sentence pairs as JSON lines, ``out/{train,dev,test}.jsonl`` with fields
  premise, hypothesis, label (a name of `NLI_LABELS`), language. The hypothesis repeats
  the premise (entailment), shares half of it (neutral) or is unrelated (contradiction)."""
  out.mkdir(parents=True, exist_ok=True)
  for split, n in sizes:
    lines = []
    for lang_index, language in enumerate(languages):
      rng = np.random.default_rng((seed, 3, lang_index, len(split)))
      words = [_pseudo_word(rng, "english") for _ in range(60)]
      for i in range(n):
        premise = [words[int(k)] for k in rng.integers(60, size=6)]
        label = i % 3
        other = [words[int(k)] for k in rng.integers(60, size=6)]
        hypothesis = {0: premise, 1: premise[:3] + other[:3], 2: other}[label]
        lines.append(json.dumps({"premise": " ".join(premise),
                                 "hypothesis": " ".join(hypothesis),
                                 "label": NLI_LABELS[label], "language": language}))
    (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  return out


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
  """A synthetic data folder in the real folder's layout (`write_synthetic_data`)."""
  return write_synthetic_data(tmp_path_factory.mktemp("synthetic") / "data")


@pytest.fixture
def compile_cache(tmp_path):
  """A persistent compilation cache for this test only: the resumed and repeated runs
  compile the same step functions as the first run (new closures, same HLO)."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_compilation_cache_dir", before[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
  compilation_cache.reset_cache()
