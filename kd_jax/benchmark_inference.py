"""Forward throughput of what users distil for: the teacher against its students.

    python -m kd_jax.benchmark --inference [--data-dir ../shared/data]

Four models of the e5-small family, each timed in kd_jax (the jitted Flax forward that
evaluation runs) and through transformers' PyTorch model loaded from the directory
`kd_jax.export.export_hf` writes (what users deploy):

* `teacher`: multilingual-e5-small, 12 layers x 384, 250,037-token vocabulary;
* `student`: 6 layers x 384 (the paper's default student);
* `half_width`: 6 layers x 192, 6 heads, FFN 768 (the paper's hidden-192 student);
* `reduced_vocab`: `student` with the vocabulary of the benchmark's texts only
  (`kd_jax.vocab.reduce_params`; config.student.vocab).

Inputs are real tsm test tweets of all 8 languages (e5's tokenizer, at most 128 tokens),
in data order. Batch 32: examples/s over the whole batches of the set, each padded to its longest
example (PyTorch, as HF's dynamic padding) or to the smallest bucket of 32/64/128 holding
it (kd_jax: the shapes the timed loops meet are compiled before timing). Batch 1: median latency
over the first 64 examples. Weights are random (speed does not depend on them); the
teacher's are e5-small's. This is a measuring tool, not a test.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.models.encoder import Encoder, EncoderConfig, init_params

BUCKETS = (32, 64, 128)
NUM_LABELS = 3


def reduced_rows(cfg: EncoderConfig, used_ids: np.ndarray) -> np.ndarray:
  """int [V']: the reduced vocabulary's rows (sorted full-vocabulary ids): the ids the
  texts use (`used_ids`) and the special ids up to the pad id."""
  return np.union1d(np.arange(cfg.pad_token_id + 1), used_ids)


def model_set(teacher_cfg: EncoderConfig, teacher_params: Any, used_ids: np.ndarray
              ) -> dict[str, tuple[EncoderConfig, Any]]:
  """{name: (EncoderConfig, params)} of the teacher and the three students;
  `used_ids`: the ids the texts use (`reduced_rows`)."""
  from kd_jax import vocab
  student = teacher_cfg.replace(num_layers=teacher_cfg.num_layers // 2)
  half = student.replace(hidden_size=teacher_cfg.hidden_size // 2,
                         num_heads=teacher_cfg.num_heads // 2,
                         intermediate_size=teacher_cfg.intermediate_size // 2)
  init = lambda cfg, seed: jax.device_get(
      jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(seed)))
  student_params = init(student, 1)
  reduced_params, reduced = vocab.reduce_params(student_params, student,
                                                reduced_rows(teacher_cfg, used_ids))
  return {"teacher": (teacher_cfg, teacher_params), "student": (student, student_params),
          "half_width": (half, init(half, 2)), "reduced_vocab": (reduced, reduced_params)}


def _batches(ids: list[np.ndarray], batch_size: int, pad_id: int, bucketed: bool):
  for i in range(0, len(ids), batch_size):
    rows = ids[i:i + batch_size]
    width = max(len(r) for r in rows)
    if bucketed:
      width = next(b for b in BUCKETS if b >= width)
    out = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for j, r in enumerate(rows):
      out[j, :len(r)], mask[j, :len(r)] = r, 1
    yield out, mask


def time_kd_jax(cfg: EncoderConfig, params: Any, ids: list[np.ndarray], latency_n: int
                ) -> tuple[float, float]:
  """(batch-32 examples/s, batch-1 median seconds) of the jitted Flax forward."""
  model = Encoder(cfg)
  params = jax.device_put(params)
  forward = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m).logits)
  full = ids[:len(ids) // 32 * 32]  # whole batches only: no shape compiled while timed
  shapes = {x.shape for x, _ in _batches(full, 32, cfg.pad_token_id, True)}
  shapes |= {x.shape for x, _ in _batches(ids[:latency_n], 1, cfg.pad_token_id, True)}
  for shape in sorted(shapes):  # compile the shapes the timed loops meet, first
    x = jnp.full(shape, cfg.pad_token_id, jnp.int32)
    jax.block_until_ready(forward(params, x, jnp.ones_like(x)))
  start = time.perf_counter()
  for x, m in _batches(full, 32, cfg.pad_token_id, True):
    jax.block_until_ready(forward(params, x, m))
  throughput = len(full) / (time.perf_counter() - start)
  latency = []
  for x, m in _batches(ids[:latency_n], 1, cfg.pad_token_id, True):
    start = time.perf_counter()
    jax.block_until_ready(forward(params, x, m))
    latency.append(time.perf_counter() - start)
  return throughput, statistics.median(latency)


def time_torch(model_dir: str, pad_id: int, ids: list[np.ndarray], latency_n: int
               ) -> tuple[float, float]:
  """(batch-32 examples/s, batch-1 median seconds) of the exported model in PyTorch."""
  import torch
  from transformers import AutoModelForSequenceClassification
  model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
  run = lambda x, m: model(input_ids=torch.from_numpy(x), attention_mask=torch.from_numpy(m))
  with torch.inference_mode():
    for x, m in _batches(ids[:64], 32, pad_id, False):  # warm up
      run(x, m)
    full = ids[:len(ids) // 32 * 32]
    start = time.perf_counter()
    for x, m in _batches(full, 32, pad_id, False):
      run(x, m)
    throughput = len(full) / (time.perf_counter() - start)
    latency = []
    for x, m in _batches(ids[:latency_n], 1, pad_id, False):
      start = time.perf_counter()
      run(x, m)
      latency.append(time.perf_counter() - start)
  return throughput, statistics.median(latency)


def run_inference(models: dict[str, tuple[EncoderConfig, Any]], ids: list[np.ndarray],
                  reduced_lookup: np.ndarray | None = None, latency_n: int = 64,
                  frameworks=("kd_jax", "pytorch")) -> list[dict]:
  """One row per model: parameters (millions), and per framework batch-32 examples/s
  and batch-1 latency (ms). `ids`: the texts' token ids (int32 arrays, the full
  vocabulary's); the `reduced_vocab` model reads them through `reduced_lookup`
  ([V] -> its own ids)."""
  from kd_jax import export
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, (cfg, params) in models.items():
      model_ids = ids if name != "reduced_vocab" else [reduced_lookup[x] for x in ids]
      row = {"model": name, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
             "vocab": cfg.vocab_size,
             "params_m": sum(np.size(x) for x in jax.tree.leaves(params)) / 1e6}
      if "kd_jax" in frameworks:
        row["kd_jax_b32"], row["kd_jax_b1_ms"] = time_kd_jax(cfg, params, model_ids, latency_n)
        row["kd_jax_b1_ms"] *= 1e3
      if "pytorch" in frameworks:
        out = export.export_hf(params, cfg, os.path.join(tmp, name))
        row["torch_b32"], row["torch_b1_ms"] = time_torch(str(out), cfg.pad_token_id,
                                                          model_ids, latency_n)
        row["torch_b1_ms"] *= 1e3
      rows.append(row)
  return rows


def format_rows(rows: list[dict]) -> str:
  """Markdown table, with each framework's batch-32 speed-up over the teacher."""
  base = rows[0]
  lines = ["| model | layers x hidden | vocab | params (M) | kd_jax b32 ex/s | kd_jax b1 ms | "
           "PyTorch b32 ex/s | PyTorch b1 ms | speed-up b32 (kd_jax / PyTorch) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  cell = lambda r, k, f: format(r[k], f) if k in r else "-"
  for r in rows:
    speed = " / ".join(f"{r[k] / base[k]:.2f}x" if k in r else "-"
                       for k in ("kd_jax_b32", "torch_b32"))
    lines.append(f"| {r['model']} | {r['layers']} x {r['hidden']} | {r['vocab']} | "
                 f"{r['params_m']:.1f} | {cell(r, 'kd_jax_b32', '.1f')} | "
                 f"{cell(r, 'kd_jax_b1_ms', '.1f')} | {cell(r, 'torch_b32', '.1f')} | "
                 f"{cell(r, 'torch_b1_ms', '.1f')} | {speed} |")
  return "\n".join(lines)


def main(data_dir: str | None, model: str = "multilingual-e5-small", max_length: int = 128,
         limit: int = 0) -> list[dict]:
  """The README's inference table: tsm test texts of `data_dir` (default
  $KD_JAX_DATA_DIR); `limit` > 0 keeps that many, evenly spaced over the split."""
  from kd_jax import config_base, hf_io, paths, vocab
  from kd_jax.data import batching, tasks
  config = config_base.base_config()
  if data_dir:
    config.data.data_dir = data_dir
  config, _ = paths.resolve_config(config, ".")
  task = tasks.load_task(config.data, log=None)
  teacher_cfg, teacher_params, model_dir = hf_io.load_pretrained(
      model, num_labels=NUM_LABELS, init_rng=jax.random.PRNGKey(0))
  tokenizer = hf_io.load_tokenizer(model_dir)
  examples = list(task.splits["test"])
  if limit and limit < len(examples):  # evenly spaced: every language keeps its share
    examples = [examples[i] for i in np.linspace(0, len(examples) - 1, limit).astype(int)]
  ids = batching.tokenize_examples(examples, tokenizer, max_length, task.languages).input_ids
  kept = np.unique(np.concatenate(ids))
  models = model_set(teacher_cfg, teacher_params, kept)
  lookup = vocab.id_lookup(reduced_rows(teacher_cfg, kept), teacher_cfg.vocab_size)
  lengths = [len(x) for x in ids]
  print(f"{len(ids)} tsm test texts ({len(task.languages)} languages), tokens per text: "
        f"mean {np.mean(lengths):.1f}, max {max(lengths)}; {os.cpu_count()} CPU cores, "
        f"backend {jax.default_backend()}")
  rows = run_inference(models, ids, lookup)
  print(format_rows(rows))
  return rows
