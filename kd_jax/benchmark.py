"""Throughput of the KD train step: kd_jax beside an equivalent PyTorch step
(`--inference`: the forward speed of teacher and students, kd_jax.benchmark_inference).

    python -m kd_jax.benchmark --teacher_layers 12 --student_layers 6 --hidden 384 \
        --heads 12 --intermediate 1536 --vocab 250037 --seq_len 128 --batch 32 \
        --steps 5 --warmup 2

One step = teacher forward (frozen, no gradient) + student forward/backward + AdamW
update after global-norm clipping, with the TinyBERT objective of the paper
(att + hid + embd + pred MSE + cross-entropy, all weighted 1, masked to real tokens).

* kd_jax: `kd_jax.train.make_train_step` itself on a 1-device mesh, random init
  (no checkpoint), `make_optimizer` (AdamW, clip 1.0, weight decay 0.01), on the same
  padded [B, T] tensors as PyTorch. The ids come from `--rows` of the vocabulary (a
  corpus's share) and the student trains only those rows (`config.compact_embeddings`,
  the default of training: the same parameters as dense AdamW); `--rows 0`: dense.
* kd_jax_unpadded: the same step with the batch's `token_index`
  (`kd_jax.models.unpad`, what training uses with `config.unpad`, budget rounded
  as there): dense layers, LayerNorms, GELU and dropout on the real tokens only,
  attention on [B, T]. Same examples and loss terms; other dropout draws.
  PyTorch runs padded: transformers' padding-free batches (`DataCollatorWithFlattening`)
  need flash-attention kernels (GPU), which return no attention scores for the loss.
* PyTorch: transformers `BertForSequenceClassification` teacher (eval, no_grad) and
  student (train mode, dropout 0.1 as kd_jax), eager attention, the same loss terms
  with the same masking, `torch.optim.AdamW` with the same decay mask, grad clipping.
  The attention term is computed on pre-softmax scores QKᵀ/√d (what TinyBERT and
  kd_jax distil) through a registered attention function that is HF's eager
  attention returning the unmasked scores instead of the probabilities; with
  `--torch_attention probs` it uses HF's (post-dropout) probabilities instead.

Inputs are random token ids with lengths uniform in [seq_len/2, seq_len]; tokens/s
counts real (non-padding) tokens. Times are medians of wall-clock seconds per step
after compilation (JAX, reported separately) and warmup, each step synchronised
(`jax.block_until_ready`), the frameworks' steps alternating (`run_benchmark`).
The teacher-forward line times each framework's teacher as its step runs it: kd_jax
materialises attention scores only for the teacher layers the loss reads (the layer
map's), transformers returns every layer's (it has no per-layer choice).
Both frameworks run in one process and so share its allocator: mimalloc, which
`kd_jax.allocator` preloads as for training (`KD_JAX_ALLOCATOR=system` for glibc's
malloc); the header says which. See the README's CPU notes on host memory.
This is a measuring tool, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any, Callable

from kd_jax import allocator

if __name__ == "__main__":  # CPU: mimalloc, before JAX or PyTorch allocate
  allocator.reexec("kd_jax.benchmark")

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import losses, sharding, stages
from kd_jax.config_base import PRECISIONS, train_config
from kd_jax.models import unpad as unpad_lib
from kd_jax.models.encoder import Encoder, EncoderConfig, init_params
from kd_jax.train import (TrainState, make_cohort_train_step, make_optimizer, make_train_step,
                          stack_states)

WEIGHTS = {"att": 1.0, "hid": 1.0, "embd": 1.0, "pred": 1.0, "clf": 1.0}
NUM_LABELS = 3
PAD_ID = 0

# Dense peak FLOP/s per GPU (float32 matmuls run as TF32 under JAX's default precision
# on these GPUs; bf16 for reference). Used only for the MFU line on GPU.
PEAK_FLOPS = {  # device_kind substring -> (tf32, bf16) FLOP/s
    "H200": (494.7e12, 989.4e12),
    "H100": (494.7e12, 989.4e12),
    "A100": (156e12, 312e12),
}


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Model and batch sizes of the benchmark (teacher and student share hidden width)."""
  teacher_layers: int = 12
  student_layers: int = 6
  hidden: int = 384
  heads: int = 12
  intermediate: int = 1536
  vocab: int = 250037
  seq_len: int = 128
  batch: int = 32
  # Word-embedding rows the training data touches: the batch's ids are drawn from that
  # many (a fifth of tsm's training tweets, all 8 languages, touch 16,128 of e5's 250,037).
  # kd_jax's optimizer then updates those rows only (config.compact_embeddings, the
  # default), PyTorch's AdamW the whole table. 0: ids over the whole vocabulary, both dense.
  rows: int = 16128


@dataclasses.dataclass
class Result:
  """One framework's numbers. Times in seconds; rates per second."""
  framework: str
  step_s: float              # median wall time of one full KD train step
  examples_per_s: float      # batch / step_s
  tokens_per_s: float        # real (non-padding) tokens / step_s
  teacher_forward_s: float   # median wall time of the teacher forward alone
  compile_s: float = 0.0     # JAX: lowering + compilation of the train step (0 for torch)
  loss: float = float("nan")  # loss of the last timed step (sanity check only)


def layer_map(teacher_layers: int, student_layers: int) -> tuple[int, ...]:
  """Uniform map, 1-based teacher layer per student layer: g(m) = m * N / M."""
  return tuple((m + 1) * teacher_layers // student_layers for m in range(student_layers))


def make_batch(sizes: Sizes, seed: int = 0) -> dict[str, np.ndarray]:
  """Random batch: input_ids int32 [B, T] (PAD_ID after each length; drawn from
  `sizes.rows` fixed ids when that is below the vocabulary), attention_mask int32
  [B, T], labels int32 [B], example_mask float32 [B] (all 1).
  Lengths are uniform in [max(1, T // 2), T]."""
  rng = np.random.default_rng(seed)
  b, t = sizes.batch, sizes.seq_len
  lengths = rng.integers(max(1, t // 2), t + 1, size=b)
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(2, sizes.vocab, size=(b, t))
  if _compact(sizes):  # the ids of a corpus that uses `rows` of them
    ids = _row_ids(sizes)[ids % sizes.rows]
  ids = ids * mask + PAD_ID * (1 - mask)
  return {"input_ids": ids.astype(np.int32), "attention_mask": mask,
          "labels": rng.integers(0, NUM_LABELS, size=b).astype(np.int32),
          "example_mask": np.ones(b, np.float32)}


def _compact(sizes: Sizes) -> bool:
  return 0 < sizes.rows < sizes.vocab - 2


def _row_ids(sizes: Sizes) -> np.ndarray:
  """The `sizes.rows` ids (of 2..vocab-1) that `make_batch` draws from, whatever the seed."""
  rng = np.random.default_rng(0)
  return np.sort(rng.choice(np.arange(2, sizes.vocab), sizes.rows, replace=False))


# ---------------------------------------------------------------------------
# kd_jax
# ---------------------------------------------------------------------------
def encoder_configs(sizes: Sizes) -> tuple[EncoderConfig, EncoderConfig]:
  """(teacher, student) EncoderConfigs: BERT family, dropout 0.1, 3 labels."""
  teacher = EncoderConfig(family="bert", vocab_size=sizes.vocab, hidden_size=sizes.hidden,
                          num_layers=sizes.teacher_layers, num_heads=sizes.heads,
                          intermediate_size=sizes.intermediate, num_labels=NUM_LABELS,
                          pad_token_id=PAD_ID)
  return teacher, teacher.replace(num_layers=sizes.student_layers)


def setup_jax(sizes: Sizes, batch_np: dict, *, seed: int = 0,
              scan_layers: bool = False, unpad: bool = False,
              precision: str = "fp32", students: int = 0,
              cohort_mode: str = "scan") -> "Runner":
  """kd_jax's own `make_train_step` (compiled here) and the jitted teacher forward with
  the intermediates that step reads (scores of the mapped layers only). `scan_layers`:
  both encoders run their layers as one lax.scan (config.scan_layers). `unpad`: the
  batch carries a `token_index` (budget rounded up as `config.unpad_multiple` 0 does
  in training: to a sixteenth of the batch's positions). `precision`: the encoders'
  compute dtype (config.precision; parameters and optimizer stay float32). `students`
  N > 0: the runner's step is one `make_cohort_train_step` step (`cohort_mode`) of N
  students (one teacher forward), their loss the first student's."""
  dtype = PRECISIONS[precision]
  if unpad:
    mask = batch_np["attention_mask"]
    batch_np = dict(batch_np, token_index=unpad_lib.token_index(
        mask, 1, multiple=unpad_lib.default_multiple(mask.size)))
  mesh = sharding.create_mesh(1)
  tcfg, scfg = encoder_configs(sizes)
  kt, ks = jax.random.split(jax.random.PRNGKey(seed))
  t_params = jax.jit(init_params, static_argnums=0)(tcfg, kt)
  s_params = jax.jit(init_params, static_argnums=0)(scfg, ks)
  student_cfg = scfg
  if _compact(sizes):  # as a training stage does with its data's ids (stages._classification)
    s_params, student_cfg, _, lookup = stages.compact_embedding(
        jax.device_get(s_params), scfg, _row_ids(sizes))
    batch_np = dict(batch_np, student_input_ids=lookup[batch_np["input_ids"]])
  tc = train_config()
  tx, _ = make_optimizer(tc, 1000)
  trainable = {"model": s_params, "proj": {}}
  state = sharding.replicate(TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                                        opt_state=tx.init(trainable)), mesh)
  t_params = sharding.replicate(t_params, mesh)
  teacher = Encoder(tcfg.replace(dtype=dtype), scan_layers=scan_layers)
  student = Encoder(student_cfg.replace(dtype=dtype), scan_layers=scan_layers)
  lmap = layer_map(sizes.teacher_layers, sizes.student_layers)
  batch = sharding.shard_batch(batch_np, mesh)
  rng = jax.random.PRNGKey(seed + 1)
  if students:  # the cohort step over `students` copies of the state, own dropout keys
    step_fn = make_cohort_train_step(student, (teacher,), tx, weights=[WEIGHTS] * students,
                                     layer_map=lmap, prediction_loss="mse",
                                     temperature=1.0, mesh=mesh, mode=cohort_mode)
    copies = [jax.tree.map(jnp.copy, state) for _ in range(students)]  # donated apart
    state = tuple(copies) if cohort_mode == "loop" else stack_states(copies)
    rng = jax.random.split(rng, students)
  else:
    step_fn = make_train_step(student, (teacher,), tx, weights=WEIGHTS, layer_map=lmap,
                              prediction_loss="mse", temperature=1.0, mesh=mesh)

  start = time.perf_counter()
  compiled = step_fn.lower(state, (t_params,), batch, rng).compile()
  compile_s = time.perf_counter() - start

  box = {"state": state, "metrics": None}

  def one_step():
    box["state"], box["metrics"] = compiled(box["state"], (t_params,), batch, rng)
    return jax.block_until_ready(box["metrics"]["loss"])

  _, teacher_kwargs = losses.outputs_needed(WEIGHTS, lmap, sizes.student_layers,
                                           sizes.teacher_layers)

  @jax.jit
  def teacher_forward(params, ids, mask, token_index):
    return teacher.apply({"params": params}, ids, mask, deterministic=True,
                         token_index=token_index, **teacher_kwargs)

  ids, mask, index = batch["input_ids"], batch["attention_mask"], batch.get("token_index")
  name = ("kd_jax_unpadded" if unpad else "kd_jax") + (
      f" x{students} cohort ({cohort_mode})" if students else "")
  return Runner(name, one_step,
                lambda: jax.block_until_ready(teacher_forward(t_params, ids, mask, index)),
                lambda: float(np.ravel(box["metrics"]["loss"])[0]), compile_s)


def run_cohort(sizes: Sizes, students: int = 6, *, steps: int = 5, warmup: int = 1,
               seed: int = 0, unpad: bool = True, precision: str = "fp32",
               mode: str = "scan") -> dict:
  """Many students per teacher pass: one cohort step of `students` KD students
  (`train.make_cohort_train_step`) against `students` steps of one student
  (`make_train_step`, what training them one by one costs), alternating for `steps`
  rounds after `warmup`; `mode`: the cohort step's ("scan", "vmap" or "loop"). Returns
  {"students", "mode", "cohort_s", "sequential_s" (students ×
  the median single step), "speedup" (sequential_s / cohort_s: the examples/s ratio),
  "compile_s", "single_compile_s"}."""
  batch_np = make_batch(sizes, seed)
  single = setup_jax(sizes, batch_np, seed=seed, unpad=unpad, precision=precision)
  cohort = setup_jax(sizes, batch_np, seed=seed, unpad=unpad, precision=precision,
                     students=students, cohort_mode=mode)
  for _ in range(warmup):
    single.step()
    cohort.step()
  single_s, cohort_s = _interleaved([single.step, cohort.step], steps)
  sequential = students * float(np.median(single_s))
  out = {"students": students, "mode": mode, "cohort_s": float(np.median(cohort_s)),
         "sequential_s": sequential, "compile_s": cohort.compile_s,
         "single_compile_s": single.compile_s}
  out["speedup"] = sequential / out["cohort_s"]
  return out


@dataclasses.dataclass
class Runner:
  """One framework's prepared KD step. `step` and `teacher_forward` run once and
  return when the work is done; `loss` reads the last step's loss."""
  framework: str
  step: Callable[[], Any]
  teacher_forward: Callable[[], Any]
  loss: Callable[[], float]
  compile_s: float = 0.0


def _result(name, sizes, batch_np, step_s, teacher_s, compile_s, loss) -> Result:
  real_tokens = float(np.sum(batch_np["attention_mask"]))
  return Result(name, step_s, sizes.batch / step_s, real_tokens / step_s, teacher_s,
                compile_s, loss)


# ---------------------------------------------------------------------------
# PyTorch (transformers)
# ---------------------------------------------------------------------------
SCORES_ATTENTION = "kd_eager_scores"


def _register_scores_attention() -> bool:
  """Registers HF eager attention that returns unmasked pre-softmax scores QKᵀ/√d as its
  "attention weights" (the output is unchanged). False if this transformers lacks
  AttentionInterface."""
  try:
    import torch
    from transformers import AttentionInterface
  except ImportError:
    return False

  def eager_scores(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   **kwargs):
    if scaling is None:
      scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    weights = scores + attention_mask if attention_mask is not None else scores
    weights = torch.nn.functional.softmax(weights, dim=-1)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, scores

  AttentionInterface.register(SCORES_ATTENTION, eager_scores)
  return True


def torch_loss(s_out, t_out, mask, labels, lmap):
  """The kd_jax TinyBERT objective in torch, same masking (example weights all 1).

  `s_out`/`t_out`: HF outputs with hidden_states (L+1, [0] = embeddings) and
  attentions ([B, h, T, T] each). Returns the float32 scalar total."""
  import torch
  m = mask.to(torch.float32)                                # [B, T]
  pair = (m[:, :, None] * m[:, None, :])[:, None]           # [B, 1, T, T]
  heads = s_out.attentions[0].shape[1]
  att = sum(((torch.where(pair > 0, s_out.attentions[i], 0.)
              - torch.where(pair > 0, t_out.attentions[k - 1], 0.)) ** 2 * pair).sum()
            / (heads * pair.sum()).clamp_min(1.) for i, k in enumerate(lmap)) / len(lmap)

  def hidden_mse(s, t):
    v = m[:, :, None]
    return (((s - t) * v) ** 2).sum() / (t.shape[-1] * m.sum()).clamp_min(1.)

  hid = sum(hidden_mse(s_out.hidden_states[i + 1], t_out.hidden_states[k])
            for i, k in enumerate(lmap)) / len(lmap)
  embd = hidden_mse(s_out.hidden_states[0], t_out.hidden_states[0])
  pred = ((s_out.logits - t_out.logits) ** 2).mean()
  clf = torch.nn.functional.cross_entropy(s_out.logits, labels.long())
  return att + hid + embd + pred + clf


def setup_torch(sizes: Sizes, batch_np: dict, *, seed: int = 0,
                attention: str = "scores", precision: str = "fp32") -> Runner:
  """The equivalent PyTorch KD step (and the teacher forward under no_grad).

  attention: "scores" (pre-softmax, as kd_jax; needs AttentionInterface) or "probs"
  (HF's eager attention probabilities, post-dropout in the student). precision "bf16":
  the forwards under `torch.autocast("cpu", torch.bfloat16)`, the loss in float32."""
  import torch
  from transformers import BertConfig, BertForSequenceClassification

  impl = "eager"
  if attention == "scores" and _register_scores_attention():
    impl = SCORES_ATTENTION
  torch.manual_seed(seed)

  def model(layers):
    cfg = BertConfig(vocab_size=sizes.vocab, hidden_size=sizes.hidden,
                     num_hidden_layers=layers, num_attention_heads=sizes.heads,
                     intermediate_size=sizes.intermediate, max_position_embeddings=512,
                     num_labels=NUM_LABELS, hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1, pad_token_id=PAD_ID,
                     attn_implementation="eager")
    mdl = BertForSequenceClassification(cfg)
    mdl.config._attn_implementation = impl
    return mdl

  teacher = model(sizes.teacher_layers).eval()
  student = model(sizes.student_layers).train()
  for p in teacher.parameters():
    p.requires_grad_(False)
  decay = [p for n, p in student.named_parameters()
           if not (n.endswith("bias") or "LayerNorm" in n)]
  no_decay = [p for n, p in student.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
  tc = train_config()
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=tc.learning_rate, betas=(0.9, 0.999), eps=1e-8)
  ids = torch.from_numpy(batch_np["input_ids"]).long()
  mask = torch.from_numpy(batch_np["attention_mask"]).long()
  labels = torch.from_numpy(batch_np["labels"]).long()
  lmap = layer_map(sizes.teacher_layers, sizes.student_layers)
  kw = dict(input_ids=ids, attention_mask=mask, output_hidden_states=True,
            output_attentions=True)

  autocast = lambda: torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16")

  def teacher_forward():
    with torch.no_grad(), autocast():
      return teacher(**kw)

  def one_step():
    t_out = teacher_forward()
    with autocast():
      s_out = student(**kw)
    loss = torch_loss(s_out, t_out, mask, labels, lmap)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), tc.max_grad_norm)
    opt.step()
    return loss

  box = {"loss": None}

  def step():
    box["loss"] = one_step()

  name = "pytorch" + ("" if impl == SCORES_ATTENTION else " (att on probs)")
  return Runner(name, step, teacher_forward, lambda: float(box["loss"].detach()))


# ---------------------------------------------------------------------------
# FLOPs and the machine's limit
# ---------------------------------------------------------------------------
def step_flops(sizes: Sizes, tokens: int | None = None) -> float:
  """Model FLOPs of one KD step on `tokens` tokens (default the padded B*T):
  6·P_s·N + 2·P_t·N (P = non-embedding parameters per model, N tokens) plus
  attention matmuls on [B, T] (QKᵀ and PV: 4·B·T²·H per layer forward, ×3 for the
  student's forward + backward)."""
  h, i = sizes.hidden, sizes.intermediate
  per_layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h   # attn, FFN, 2 LayerNorms
  head = h * h + h + h * NUM_LABELS + NUM_LABELS
  p_s = sizes.student_layers * per_layer + head
  p_t = sizes.teacher_layers * per_layer + head
  n = sizes.batch * sizes.seq_len if tokens is None else tokens
  attn = 4 * sizes.batch * sizes.seq_len ** 2 * h
  return (6 * p_s * n + 2 * p_t * n
          + 3 * attn * sizes.student_layers + attn * sizes.teacher_layers)


def mfu(sizes: Sizes, step_s: float, peak_flops: float | None = None) -> tuple[float, float]:
  """(achieved FLOP/s, model-FLOPs utilisation vs the device's dense TF32 peak); the
  peak comes from `peak_flops` or PEAK_FLOPS by device kind (nan if unknown)."""
  achieved = step_flops(sizes) / step_s
  if peak_flops is None:
    kind = jax.devices()[0].device_kind
    peak_flops = next((v[0] for k, v in PEAK_FLOPS.items() if k in kind), float("nan"))
  return achieved, achieved / peak_flops


def matmul_flops_per_s(m: int = 4096, k: int = 384, n: int = 1536, repeats: int = 10,
                       precision: str = "fp32") -> float:
  """This machine's rate on one jitted [m, k] x [k, n] matmul (the student's FFN shape at
  32 x 128 tokens) in `precision` ("fp32" or "bf16"): FLOP/s of the median of `repeats`
  timed calls. The attainable limit the step's achieved rate is compared with."""
  a = jnp.ones((m, k), PRECISIONS[precision])
  b = jnp.ones((k, n), PRECISIONS[precision])
  f = jax.jit(jnp.matmul)
  jax.block_until_ready(f(a, b))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(a, b))
    times.append(time.perf_counter() - start)
  return 2 * m * k * n / float(np.median(times))


def limit_lines(results: dict, sizes: Sizes, batch_np: dict, matmul: float) -> list[str]:
  """Per framework: model FLOPs per step (padded, or real tokens for kd_jax_unpadded,
  which computes only those), achieved GFLOP/s and its share of `matmul` FLOP/s."""
  real = int(np.sum(batch_np["attention_mask"]))
  lines = [f"single matmul [4096,384]x[384,1536]: {matmul / 1e9:.1f} GFLOP/s (the limit)"]
  for key, r in results.items():
    if not isinstance(r, Result):
      continue
    flops = step_flops(sizes, real if key == "kd_jax_unpadded" else None)
    rate = flops / r.step_s
    lines.append(f"{r.framework}: {flops / 1e9:.0f} GFLOP per step "
                 f"({'real tokens' if key == 'kd_jax_unpadded' else 'padded'}), "
                 f"{rate / 1e9:.1f} GFLOP/s = {rate / matmul:.0%} of the matmul rate")
  return lines


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------
FRAMEWORKS = ("kd_jax", "kd_jax_unpadded", "pytorch")


def run_benchmark(sizes: Sizes, *, steps: int = 5, warmup: int = 2, threads: int | None = None,
                  frameworks=FRAMEWORKS, torch_attention: str = "scores",
                  seed: int = 0, scan_layers: bool = False, precision: str = "fp32") -> dict:
  """Runs the benchmark; returns {framework: Result} for each of `frameworks` (a subset
  of FRAMEWORKS) and, when PyTorch ran, "ratio" (kd_jax examples/s ÷ PyTorch's) and
  "ratio_unpadded" (kd_jax_unpadded's), for those that ran.
  Raises ValueError for an unknown framework name.

  After `warmup` untimed steps each, the frameworks' steps alternate one by one for
  `steps` rounds (then their teacher forwards likewise), and each reports its median:
  load from elsewhere on a shared machine then hits both alike, and the ratio holds
  where the absolute times drift. `precision`: "fp32" or "bf16" compute in both
  frameworks (`setup_jax`, `setup_torch`)."""
  unknown = sorted(set(frameworks) - set(FRAMEWORKS))
  if unknown:
    raise ValueError(f"unknown frameworks {unknown}; choose from {FRAMEWORKS}")
  batch_np = make_batch(sizes, seed)
  if "pytorch" in frameworks:
    import torch
    torch.set_num_threads(threads or os.cpu_count() or 1)
  runners = []
  for name, unpad in (("kd_jax", False), ("kd_jax_unpadded", True)):
    if name in frameworks:
      runners.append(setup_jax(sizes, batch_np, seed=seed, scan_layers=scan_layers,
                               unpad=unpad, precision=precision))
  if "pytorch" in frameworks:
    runners.append(setup_torch(sizes, batch_np, seed=seed, attention=torch_attention,
                               precision=precision))
  for runner in runners:
    for _ in range(warmup):
      runner.step()
      runner.teacher_forward()
  step_times = _interleaved([r.step for r in runners], steps)
  teacher_times = _interleaved([r.teacher_forward for r in runners], steps)
  out: dict[str, Any] = {}
  for runner, st, tt in zip(runners, step_times, teacher_times):
    key = "pytorch" if runner.framework.startswith("pytorch") else runner.framework
    out[key] = _result(runner.framework, sizes, batch_np, float(np.median(st)),
                       float(np.median(tt)), runner.compile_s, runner.loss())
  for name, ratio in (("kd_jax", "ratio"), ("kd_jax_unpadded", "ratio_unpadded")):
    if name in out and "pytorch" in out:
      out[ratio] = out[name].examples_per_s / out["pytorch"].examples_per_s
  return out


def _interleaved(fns: list[Callable[[], Any]], rounds: int) -> list[list[float]]:
  """Wall seconds of each fn, called in turn for `rounds` rounds: [fn][round]."""
  times: list[list[float]] = [[] for _ in fns]
  for _ in range(rounds):
    for fn, out in zip(fns, times):
      start = time.perf_counter()
      fn()
      out.append(time.perf_counter() - start)
  return times


def format_table(results: dict, sizes: Sizes) -> str:
  """The printed table (Markdown)."""
  rows = [r for k, r in results.items() if isinstance(r, Result)]
  real = None
  lines = ["| framework | step s | examples/s | tokens/s (real) | teacher fwd s | "
           "teacher share | compile s | loss |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r.framework} | {r.step_s:.3f} | {r.examples_per_s:.2f} | "
                 f"{r.tokens_per_s:.0f} | {r.teacher_forward_s:.3f} | "
                 f"{r.teacher_forward_s / r.step_s:.0%} | "
                 f"{r.compile_s:.1f} | {r.loss:.3f} |")
    real = r.tokens_per_s * r.step_s
  text = "\n".join(lines)
  ratios = [f"{name} / PyTorch examples/s: {results[key]:.2f}x"
            for key, name in (("ratio", "kd_jax"), ("ratio_unpadded", "kd_jax_unpadded"))
            if key in results]
  if ratios:
    text += "\n\n" + "\n".join(ratios)
  text += (f"\n({sizes.batch} examples × {sizes.seq_len} positions, {real:.0f} real tokens "
           f"per step; teacher {sizes.teacher_layers} / student {sizes.student_layers} layers, "
           f"hidden {sizes.hidden}, heads {sizes.heads}, FFN {sizes.intermediate}, "
           f"vocab {sizes.vocab}, " + (f"{sizes.rows} rows touched: kd_jax updates those, "
                                      "PyTorch the whole table)" if _compact(sizes) else
                                      "ids over the whole table)"))
  return text


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  for name, default in dataclasses.asdict(Sizes()).items():
    p.add_argument(f"--{name}", type=int, default=default)
  p.add_argument("--steps", type=int, default=5, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--threads", type=int, default=None,
                 help="torch intra-op threads (default: all cores); XLA uses all cores "
                      "unless XLA_FLAGS says otherwise")
  p.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                 help=f"comma-separated subset of {', '.join(FRAMEWORKS)}")
  p.add_argument("--torch_attention", choices=("scores", "probs"), default="scores")
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="GPU peak for MFU (default: dense TF32 peak by device kind)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                 help="compute dtype of both frameworks' forwards (config.precision; "
                      "PyTorch: CPU autocast)")
  p.add_argument("--scan_layers", action="store_true",
                 help="kd_jax encoders run their layers as one lax.scan (less compile time)")
  p.add_argument("--students", type=int, default=0,
                 help="N > 0: time one cohort step of N students (one teacher pass) "
                      "against N single-student steps instead (unpadded)")
  p.add_argument("--cohort_mode", choices=("scan", "vmap", "loop"), default="scan",
                 help="--students: the students' updates scanned, vmapped, or N graphs")
  p.add_argument("--inference", action="store_true",
                 help="forward throughput of teacher and students instead "
                      "(kd_jax.benchmark_inference): kd_jax and exported PyTorch models")
  p.add_argument("--data-dir", default=None,
                 help="--inference: data folder with tsm (default $KD_JAX_DATA_DIR)")
  p.add_argument("--limit", type=int, default=0,
                 help="--inference: this many tsm test texts, evenly spaced (0: all 6960)")
  a = p.parse_args(argv)
  if a.inference:
    from kd_jax import benchmark_inference
    return benchmark_inference.main(a.data_dir, limit=a.limit)
  sizes = Sizes(**{k: getattr(a, k) for k in dataclasses.asdict(Sizes())})
  threads = a.threads or os.cpu_count()
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPU cores, torch threads {threads}; steps {a.steps}, warmup {a.warmup}"
        f"; scan_layers {a.scan_layers}; precision {a.precision}; "
        f"allocator: {allocator.describe()}"
        + (f", GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']!r}"
           if os.environ.get("GLIBC_TUNABLES") else ""))
  if a.students:
    r = run_cohort(sizes, a.students, steps=a.steps, warmup=a.warmup, seed=a.seed,
                   precision=a.precision, mode=a.cohort_mode)
    print(f"| students ({a.cohort_mode}) | cohort step s | {a.students} single steps s | speed-up | compile s "
          f"(cohort / single) |\n|---:|---:|---:|---:|---:|\n| {a.students} | "
          f"{r['cohort_s']:.3f} | {r['sequential_s']:.3f} | {r['speedup']:.2f}x | "
          f"{r['compile_s']:.1f} / {r['single_compile_s']:.1f} |")
    return r
  results = run_benchmark(sizes, steps=a.steps, warmup=a.warmup, threads=threads,
                          frameworks=tuple(a.frameworks.split(",")),
                          torch_attention=a.torch_attention, seed=a.seed,
                          scan_layers=a.scan_layers, precision=a.precision)
  print(format_table(results, sizes))
  if jax.default_backend() == "cpu":
    # The limit: the faster of the float32 and the step's own precision (XLA:CPU's bf16
    # dot can be slower than its float32 one).
    rate = max(matmul_flops_per_s(precision=p) for p in {"fp32", a.precision})
    print("\n".join(limit_lines(results, sizes, make_batch(sizes, a.seed), rate)))
  torch_r = results.get("pytorch")
  if torch_r is not None:
    print("PyTorch attention loss on " + (
        "pre-softmax scores QKᵀ/√d (registered eager variant), as kd_jax"
        if "probs" not in torch_r.framework else
        "HF eager attention probabilities (post-softmax, post-dropout in the student), "
        "not kd_jax's pre-softmax scores"))
  if jax.default_backend() == "gpu" and "kd_jax" in results:
    peak = a.peak_tflops * 1e12 if a.peak_tflops else None
    achieved, util = mfu(sizes, results["kd_jax"].step_s, peak)
    print(f"kd_jax model FLOPs/step {step_flops(sizes) / 1e12:.3f} TFLOP, "
          f"{achieved / 1e12:.1f} TFLOP/s, MFU {util:.1%} (of dense TF32 peak)")
  return results


if __name__ == "__main__":
  main()
