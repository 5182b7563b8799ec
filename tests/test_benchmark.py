"""kd_jax.benchmark runs end to end at tiny sizes (a smoke test, not a timing assertion)."""

import math

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from kd_jax import benchmark, vocab  # noqa: E402


@pytest.mark.parametrize("rows", [0, 40])
def test_benchmark_tiny_returns_positive_finite_numbers(rows):
  sizes = benchmark.Sizes(teacher_layers=2, student_layers=2, hidden=32, heads=4,
                          intermediate=64, vocab=100, seq_len=16, batch=4, rows=rows)
  if rows:
    assert set(np.unique(benchmark.make_batch(sizes)["input_ids"])) <= set(
        benchmark._row_ids(sizes)) | {benchmark.PAD_ID}
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
  lines = benchmark.limit_lines(results, sizes, benchmark.make_batch(sizes), 1e9)
  flops = benchmark.step_flops(sizes)
  assert f"{flops / 1e9 / results['kd_jax'].step_s:.1f} GFLOP/s" in lines[1]


def test_benchmark_bf16_runs_both_frameworks_near_their_fp32_loss():
  """--precision bf16: kd_jax's encoders compute in bfloat16, PyTorch under CPU autocast;
  each framework's first-step loss (same initialisation) stays within 3 % of its fp32
  one, and the bf16 matmul rate is measured."""
  sizes = benchmark.Sizes(teacher_layers=2, student_layers=2, hidden=32, heads=4,
                          intermediate=64, vocab=100, seq_len=16, batch=4, rows=0)
  kw = dict(steps=1, warmup=0, threads=1, frameworks=("kd_jax", "pytorch"))
  fp32 = benchmark.run_benchmark(sizes, **kw)
  bf16 = benchmark.run_benchmark(sizes, precision="bf16", **kw)
  for name in ("kd_jax", "pytorch"):
    assert bf16[name].loss == pytest.approx(fp32[name].loss, rel=0.03), name
  assert benchmark.matmul_flops_per_s(256, 64, 128, repeats=2, precision="bf16") > 0


def test_cohort_benchmark_times_one_cohort_step_against_single_steps():
  sizes = benchmark.Sizes(teacher_layers=2, student_layers=2, hidden=32, heads=4,
                          intermediate=64, vocab=100, seq_len=16, batch=4, rows=0)
  r = benchmark.run_cohort(sizes, 3, steps=2, warmup=0)
  assert r["students"] == 3 and r["cohort_s"] > 0 and r["sequential_s"] > 0
  assert r["speedup"] == pytest.approx(r["sequential_s"] / r["cohort_s"])


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


def test_inference_benchmark_tiny_models(synthetic_model_dir):
  """--inference's timing and table on a tiny teacher (random inputs): every model runs
  in kd_jax and, exported, in PyTorch; the reduced-vocabulary student reads its own ids."""
  import jax
  from kd_jax import benchmark_inference as bi
  from kd_jax import hf_io
  cfg, params, _ = hf_io.load_pretrained(str(synthetic_model_dir), num_labels=3,
                                         init_rng=jax.random.PRNGKey(0))
  r = np.random.default_rng(0)
  ids = [r.integers(5, cfg.vocab_size // 2, r.integers(4, 40)).astype(np.int32)
         for _ in range(70)]
  kept = np.unique(np.concatenate(ids))
  models = bi.model_set(cfg, params, kept)
  reduced_cfg = models["reduced_vocab"][0]
  assert reduced_cfg.vocab_size == len(np.union1d(np.arange(cfg.pad_token_id + 1), kept))
  assert models["half_width"][0].hidden_size == cfg.hidden_size // 2
  keep = np.union1d(np.arange(cfg.pad_token_id + 1), kept)  # by hand: specials + used
  lookup = np.full(cfg.vocab_size, -1, np.int32)
  lookup[keep] = np.arange(len(keep))
  np.testing.assert_array_equal(lookup, vocab.id_lookup(bi.reduced_rows(cfg, kept),
                                                        cfg.vocab_size))
  rows = bi.run_inference(models, ids, lookup, latency_n=3)
  assert [row["model"] for row in rows] == ["teacher", "student", "half_width", "reduced_vocab"]
  for row in rows:
    for key in ("kd_jax_b32", "kd_jax_b1_ms", "torch_b32", "torch_b1_ms"):
      assert math.isfinite(row[key]) and row[key] > 0, (row, key)
  assert rows[1]["params_m"] < rows[0]["params_m"] and rows[3]["params_m"] < rows[1]["params_m"]
  assert "| reduced_vocab |" in bi.format_rows(rows)
