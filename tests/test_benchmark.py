"""kd_jax.benchmark runs end to end at tiny sizes (a smoke test, not a timing assertion)."""

import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from kd_jax import benchmark  # noqa: E402


def test_benchmark_tiny_returns_positive_finite_numbers():
  sizes = benchmark.Sizes(teacher_layers=2, student_layers=2, hidden=32, heads=4,
                          intermediate=64, vocab=100, seq_len=16, batch=4)
  results = benchmark.run_benchmark(sizes, steps=1, warmup=0, threads=1)
  for name in ("kd_jax", "pytorch"):
    r = results[name]
    for value in (r.step_s, r.examples_per_s, r.tokens_per_s, r.teacher_forward_s):
      assert math.isfinite(value) and value > 0, (name, r)
    assert math.isfinite(r.loss), (name, r)
  assert results["kd_jax"].compile_s > 0
  assert results["ratio"] == pytest.approx(
      results["kd_jax"].examples_per_s / results["pytorch"].examples_per_s)
  assert "kd_jax / PyTorch" in benchmark.format_table(results, sizes)


def test_torch_scores_attention_returns_pre_softmax_scores():
  torch = pytest.importorskip("torch")
  from transformers import BertConfig, BertForSequenceClassification
  assert benchmark._register_scores_attention()
  cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=32, num_labels=3, attn_implementation="eager")
  model = BertForSequenceClassification(cfg).eval()
  model.config._attn_implementation = benchmark.SCORES_ATTENTION
  ids = torch.randint(2, 50, (2, 6))
  mask = torch.ones_like(ids)
  mask[0, 4:] = 0
  out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
  scores = out.attentions[0]
  # raw scores: not rows summing to 1, and padded keys are not masked out
  assert not torch.allclose(scores.sum(-1), torch.ones(()))
  assert (scores[0, :, :, 4:] != 0).any()
  model.config._attn_implementation = "eager"
  probs = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[0]
  masked = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
  assert torch.allclose(torch.softmax(masked, -1), probs, atol=1e-6)
