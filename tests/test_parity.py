"""Parity with transformers' PyTorch models: tiny random BERT and XLM-R, fp32, padded batch."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import jax.numpy as jnp  # noqa: E402

from kd_jax import hf_io  # noqa: E402
from kd_jax.models.encoder import Encoder  # noqa: E402

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=40, hidden_act="gelu")


def _make(kind, tmp_path, num_labels=3):
  torch.manual_seed(0)
  if kind == "bert":
    cfg = transformers.BertConfig(**TINY, type_vocab_size=2, pad_token_id=0, num_labels=num_labels)
    model = transformers.BertForSequenceClassification(cfg)
  else:
    cfg = transformers.XLMRobertaConfig(**TINY, type_vocab_size=1, pad_token_id=1,
                                        layer_norm_eps=1e-5, num_labels=num_labels)
    model = transformers.XLMRobertaForSequenceClassification(cfg)
  # Non-trivial LayerNorm and bias values so that a wrong mapping cannot pass.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path / kind, safe_serialization=True)
  return model.eval(), cfg


def _batch(pad_id, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 120, size=(3, 11)).astype(np.int32)
  mask = np.ones_like(ids)
  for row, length in enumerate([11, 7, 4]):
    ids[row, length:] = pad_id
    mask[row, length:] = 0
  return ids, mask


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_matches_transformers(kind, tmp_path):
  model, cfg = _make(kind, tmp_path)
  model.set_attn_implementation("eager")
  ids, mask = _batch(cfg.pad_token_id)
  with torch.no_grad():
    ref = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                output_hidden_states=True, output_attentions=True)

  config, params, _ = hf_io.load_pretrained(str(tmp_path / kind), allow_missing_head=False)
  assert config.family == kind and config.num_labels == 3
  out = Encoder(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                              output_embeddings=True, output_hidden_states=True,
                              output_attentions=True, output_attention_scores=True)
  np.testing.assert_allclose(out.logits, ref.logits.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(out.embeddings, ref.hidden_states[0].numpy(), atol=1e-4, rtol=0)
  assert len(out.hidden_states) == cfg.num_hidden_layers
  for ours, theirs in zip(out.hidden_states, ref.hidden_states[1:]):
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=0)
  for ours, theirs in zip(out.attentions, ref.attentions):
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=0)
  # Pre-softmax scores: softmax of the masked scores gives the probabilities back.
  s = np.asarray(out.attention_scores[0])
  s = np.where(mask[:, None, None, :] == 1, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  np.testing.assert_allclose(p / p.sum(-1, keepdims=True), ref.attentions[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_scores_of_selected_layers_only(kind, scan_layers, tmp_path):
  """Scores asked for layer 1 only: that layer's scores equal the all-layer run's, the
  others are None, and layers 0 and 2 (through jax.nn.dot_product_attention) give the
  same hidden states and logits as transformers' eager attention; also with the layers
  as one lax.scan."""
  model, cfg = _make(kind, tmp_path)
  model.set_attn_implementation("eager")
  ids, mask = _batch(cfg.pad_token_id)
  with torch.no_grad():
    ref = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                output_hidden_states=True)
  config, params, _ = hf_io.load_pretrained(str(tmp_path / kind))
  encoder = Encoder(config, scan_layers=scan_layers)
  full = encoder.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                       output_attention_scores=True)
  some = encoder.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                       output_hidden_states=True, output_attention_scores=[1])
  assert some.attention_scores[0] is None and some.attention_scores[2] is None
  np.testing.assert_allclose(some.attention_scores[1], full.attention_scores[1], atol=1e-6)
  np.testing.assert_allclose(some.logits, ref.logits.numpy(), atol=1e-5, rtol=0)
  real = mask.astype(bool)  # HF's padded positions carry no meaning
  for ours, theirs in zip(some.hidden_states, ref.hidden_states[1:]):
    np.testing.assert_allclose(np.asarray(ours)[real], theirs.numpy()[real], atol=1e-5, rtol=0)
  none = encoder.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                       output_attention_scores=())
  assert none.attention_scores is None
  np.testing.assert_allclose(none.logits, ref.logits.numpy(), atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match=r"output_attention_scores: layer indices \[3\] "
                                       r"outside 0..2"):
    encoder.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                  output_attention_scores=(0, 3))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_round_trip_state_dict(kind, tmp_path):
  model, _ = _make(kind, tmp_path)
  config, params, _ = hf_io.load_pretrained(str(tmp_path / kind))
  sd = hf_io.params_to_state_dict(params, config)
  ref = {k: v.numpy() for k, v in model.state_dict().items() if "position_ids" not in k}
  assert set(sd) == set(ref)
  for k in ref:
    np.testing.assert_array_equal(sd[k], ref[k])


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
  _make("bert", tmp_path)
  config, _, _ = hf_io.load_pretrained(str(tmp_path / "bert"))
  state, _ = hf_io.read_state_dict(tmp_path / "bert")
  del state["bert.encoder.layer.1.output.dense.bias"]
  state["bert.encoder.layer.9.extra.weight"] = np.zeros(3)
  with pytest.raises(hf_io.CheckpointMismatchError) as e:
    hf_io.state_dict_to_params(state, config.replace(hidden_size=64, num_heads=4), source="x.st")
  msg = str(e.value)
  assert "x.st" in msg and "missing (1): encoder.layer.1.output.dense.bias" in msg
  assert "unexpected (1): encoder.layer.9.extra.weight" in msg
  assert "wrong shape" in msg and "(32, 120)" not in msg and "(120, 32) vs model (120, 64)" in msg


def test_base_checkpoint_gets_random_head(tmp_path):
  torch.manual_seed(0)
  cfg = transformers.BertConfig(**TINY)
  transformers.BertModel(cfg).save_pretrained(tmp_path / "base")
  config, params, _ = hf_io.load_pretrained(str(tmp_path / "base"), num_labels=5)
  assert params["classifier"]["kernel"].shape == (32, 5)
  with pytest.raises(hf_io.CheckpointMismatchError, match="missing"):
    hf_io.load_pretrained(str(tmp_path / "base"), num_labels=5, allow_missing_head=False)


def test_unsupported_model_type(tmp_path):
  with pytest.raises(ValueError, match="model_type='gpt2' is not supported; supported"):
    hf_io.config_from_hf({"model_type": "gpt2"})


def test_unreadable_weights(tmp_path):
  _make("bert", tmp_path)
  (tmp_path / "bert" / "model.safetensors").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="model.safetensors: cannot read model weights"):
    hf_io.load_pretrained(str(tmp_path / "bert"))


def _to_flax_tree(state_dict):
  """PyTorch names/layouts -> the nested tree HF's Flax classes save (kernel = weight.T)."""
  tree = {}
  for name, value in state_dict.items():
    if "position_ids" in name:
      continue
    *path, leaf = name.split(".")
    value = value.numpy()
    if leaf == "weight":
      if "LayerNorm" in path[-1]:
        leaf = "scale"
      elif "embeddings" in path[-1]:
        leaf = "embedding"
      else:
        leaf, value = "kernel", value.T
    node = tree
    for key in path:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


@pytest.mark.parametrize("fmt", ["pytorch_model.bin", "flax_model.msgpack"])
def test_other_weight_formats(fmt, tmp_path):
  from flax import serialization
  model, cfg = _make("roberta", tmp_path)
  d = tmp_path / "roberta"
  (d / "model.safetensors").unlink()
  if fmt == "pytorch_model.bin":
    torch.save(model.state_dict(), d / fmt)
  else:
    (d / fmt).write_bytes(serialization.msgpack_serialize(_to_flax_tree(model.state_dict())))
  ids, mask = _batch(cfg.pad_token_id)
  with torch.no_grad():
    ref = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
  config, params, _ = hf_io.load_pretrained(str(d), allow_missing_head=False)
  out = Encoder(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(out.logits, ref.numpy(), atol=1e-4, rtol=0)
