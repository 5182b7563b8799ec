"""Real Hugging Face Flax checkpoints (flax_model.msgpack) load into kd_jax and give the same outputs.

The fixtures in tests/fixtures/flax/ were written by transformers 4's own Flax classes
(`make_flax_fixtures.py` there says how to rerun it): each directory holds config.json and
flax_model.msgpack (the hub format of xlm-roberta-base and bert-base-multilingual-cased),
expected.npz (that Flax model's outputs on a padded batch) and pt/ (the same weights
converted to PyTorch by transformers 4). kd_jax's outputs are compared to both the stored
Flax outputs and transformers 5's PyTorch model run on pt/.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import hf_io
from kd_jax.models.encoder import Encoder

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "flax"
ATOL = 1e-4
# name -> (kd_jax family, has a classification head)
MODELS = {"bert": ("bert", True), "bert-base": ("bert", False),
          "xlm-roberta": ("roberta", True), "distilbert": ("distilbert", True)}
NAMES = list(MODELS)


def _expected(name: str) -> dict[str, np.ndarray]:
  with np.load(FIXTURES / name / "expected.npz", allow_pickle=False) as f:
    return dict(f)


@functools.cache
def _kd_jax(name: str):
  """kd_jax's outputs for the fixture's batch, read from flax_model.msgpack."""
  family, has_head = MODELS[name]
  d = FIXTURES / name
  config, params, _ = hf_io.load_pretrained(str(d), allow_missing_head=not has_head)
  assert config.family == family
  assert config.num_labels == (3 if has_head else 0)
  exp = _expected(name)
  out = Encoder(config).apply(
      {"params": params}, jnp.asarray(exp["input_ids"]), jnp.asarray(exp["attention_mask"]),
      None if "token_type_ids" not in exp else jnp.asarray(exp["token_type_ids"]),
      output_embeddings=True, output_hidden_states=True, output_attentions=True)
  return config, params, jax.tree.map(np.asarray, out)


@functools.cache
def _torch(name: str) -> dict[str, np.ndarray]:
  """transformers 5 PyTorch (eager attention) on the pt/ safetensors of the same weights."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  auto = (transformers.AutoModelForSequenceClassification if MODELS[name][1]
          else transformers.AutoModel)
  model = auto.from_pretrained(str(FIXTURES / name / "pt"), attn_implementation="eager").eval()
  exp = _expected(name)
  inputs = {k: torch.tensor(exp[k], dtype=torch.long)
            for k in ("input_ids", "attention_mask", "token_type_ids") if k in exp}
  with torch.no_grad():
    ref = model(**inputs, output_hidden_states=True, output_attentions=True)
  out = {"hidden_states": np.stack([h.numpy() for h in ref.hidden_states]),
         "attentions": np.stack([a.numpy() for a in ref.attentions])}
  if MODELS[name][1]:
    out["logits"] = ref.logits.numpy()
  else:
    out["last_hidden_state"] = ref.last_hidden_state.numpy()
    out["pooler_output"] = ref.pooler_output.numpy()
  return out


def _assert_close(ours, reference: dict[str, np.ndarray], name: str):
  """Compares kd_jax's EncoderOutput to reference arrays in HF layout (embeddings first)."""
  hidden = np.stack((ours.embeddings,) + tuple(ours.hidden_states))
  np.testing.assert_allclose(hidden, reference["hidden_states"], atol=ATOL, rtol=0,
                             err_msg=f"{name}: hidden_states")
  np.testing.assert_allclose(np.stack(ours.attentions), reference["attentions"], atol=ATOL,
                             rtol=0, err_msg=f"{name}: attentions")
  if "logits" in reference:
    np.testing.assert_allclose(ours.logits, reference["logits"], atol=ATOL, rtol=0,
                               err_msg=f"{name}: logits")
  if "last_hidden_state" in reference:
    np.testing.assert_allclose(ours.last_hidden_state, reference["last_hidden_state"],
                               atol=ATOL, rtol=0, err_msg=f"{name}: last_hidden_state")


@pytest.mark.parametrize("name", NAMES)
def test_msgpack_is_what_gets_read(name):
  d = FIXTURES / name
  weights = sorted(p.name for p in d.iterdir()
                   if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))
  assert not weights, f"{d} must hold only flax_model.msgpack, found {weights}"
  _, source = hf_io.read_state_dict(d)
  assert pathlib.Path(source).name == "flax_model.msgpack"
  # Same tensors as transformers 4's own Flax -> PyTorch conversion in pt/.
  _, from_msgpack, _ = hf_io.load_pretrained(str(d), allow_missing_head=False)
  _, from_pt, _ = hf_io.load_pretrained(str(d / "pt"), allow_missing_head=False)
  assert jax.tree.structure(from_msgpack) == jax.tree.structure(from_pt)
  for a, b in zip(jax.tree.leaves(from_msgpack), jax.tree.leaves(from_pt)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_matches_transformers4_flax_outputs(name):
  _, _, ours = _kd_jax(name)
  _assert_close(ours, _expected(name), name)


@pytest.mark.parametrize("name", NAMES)
def test_matches_transformers_pytorch(name):
  _, _, ours = _kd_jax(name)
  _assert_close(ours, _torch(name), name)


def test_base_checkpoint_pooler_and_random_head():
  """FlaxBertModel has a pooler but no classifier: asking for a head keeps the pooler."""
  exp = _expected("bert-base")
  config, params, _ = hf_io.load_pretrained(str(FIXTURES / "bert-base"), num_labels=3,
                                            init_rng=jax.random.PRNGKey(1))
  assert config.num_labels == 3 and params["classifier"]["kernel"].shape == (32, 3)
  out = Encoder(config).apply({"params": params}, jnp.asarray(exp["input_ids"]),
                              jnp.asarray(exp["attention_mask"]),
                              jnp.asarray(exp["token_type_ids"]))
  # BERT's pooler: tanh(W h_[CLS] + b), from the checkpoint.
  cls = np.asarray(out.last_hidden_state)[:, 0]
  pooled = np.tanh(cls @ params["pooler"]["kernel"] + params["pooler"]["bias"])
  np.testing.assert_allclose(pooled, exp["pooler_output"], atol=ATOL, rtol=0)
  np.testing.assert_allclose(pooled, _torch("bert-base")["pooler_output"], atol=ATOL, rtol=0)
