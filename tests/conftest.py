"""Shared fixtures: the real data directory and a tiny BERT-shaped model directory."""

import json
import os
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def data_dir() -> pathlib.Path | None:
  """$KD_JAX_DATA_DIR, else ../shared/data beside the project."""
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


def save_tiny_wordpiece_tokenizer(out: pathlib.Path, data: pathlib.Path):
  """Trains a 400-token WordPiece tokenizer (BERT specials, [CLS] x [SEP]) on tsm text of
  4 languages, saves it into `out` and returns the `tokenizers.Tokenizer`."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  texts = []
  for lang in ("english", "spanish", "arabic", "hindi"):
    texts += (data / "xlmt" / lang / "train_text.txt").read_text().split("\n")[:300]
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                 cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
  out.mkdir(parents=True, exist_ok=True)
  fast.save_pretrained(out)
  return tok


def make_tiny_model_dir(out: pathlib.Path, data: pathlib.Path, *, hidden=32, layers=4, heads=4,
                        seed=0) -> pathlib.Path:
  """A small WordPiece tokenizer trained on tsm text and a random BERT base checkpoint."""
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
