"""The training loop: one loop for every stage, and the run of `config.stages`.

`train_and_evaluate(config, workdir)` runs the stages in order. Each stage is a plan
(`kd_jax.stages.build`: student, teachers, objective, batches, evaluators, what to keep)
and `train_stage` trains any plan: restore the latest checkpoint, step, log, evaluate,
save, stop on SIGTERM, check for non-finite values one step late, finish. The compiled
step takes gradients of the student (and its projections) only; the teachers are frozen
and never checkpointed (big_vision's distill trainer does the same).

Each stage writes to `<workdir>/<stage dir>` (layout: `kd_jax.checkpoints`); a finished
stage is skipped on a rerun, so the same command resumes a multi-stage job.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import threading
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers, periodic_actions
from flax import struct

from kd_jax import checkpoints, config_base, evaluation, hf_io, losses, paths, sharding, stages
from kd_jax.models.encoder import Encoder


@struct.dataclass
class TrainState:
  """What the optimizer owns. `params` = {"model": student, "proj": projections}."""
  step: jax.Array
  params: Any
  opt_state: Any


class PreemptionGuard:
  """Turns SIGTERM (how TPU VMs, SLURM and Kubernetes preempt) into a flag the loop polls,
  so it can save a checkpoint and return instead of dying mid-step.

  One guard covers the whole run: the flag is read once per step, between evaluation
  batches, after a stage's last step and before each stage starts, so a signal at any
  point stops the run within about one step. Use as a context manager; outside the main
  thread (where signal handlers cannot be installed) it does nothing.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d received: saving a checkpoint and stopping", signum)
    self.requested = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


# ---------------------------------------------------------------------------
# optimisation and the compiled step
# ---------------------------------------------------------------------------
def _decay_mask(params):
  """Weight decay on matrices and embeddings, not on biases and LayerNorm (HF default)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in (
          "kernel", "embedding", *losses.PROJECTION_KEYS),
      params)


def make_optimizer(tc: ml_collections.ConfigDict, num_train_steps: int, nonfinite: str = "stop"):
  """AdamW with linear warmup then linear decay to 0, after global-norm clipping.

  `nonfinite="skip"` wraps it in `optax.apply_if_finite`: a step with non-finite
  gradients leaves the optimizer state (and, through zero updates, the parameters)
  unchanged and counts it in the state's `total_notfinite` (checkpointed, so the count
  survives a resume). The schedule's step count does not advance on skipped steps.
  Returns (optax.GradientTransformation, learning-rate schedule).
  """
  warmup = int(round(tc.warmup_ratio * num_train_steps))
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, tc.learning_rate, max(warmup, 1)),
       optax.linear_schedule(tc.learning_rate, 0.0, max(num_train_steps - warmup, 1))],
      [warmup])
  tx = optax.chain(
      optax.clip_by_global_norm(tc.max_grad_norm),
      optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=tc.weight_decay,
                  mask=_decay_mask))
  if nonfinite == "skip":
    tx = optax.apply_if_finite(tx, max_consecutive_errors=2**30)  # never apply a bad step
  return tx, schedule


def apply_model(model: Encoder, params, batch: Mapping[str, jax.Array], **kwargs):
  """`model` on `batch` (input_ids, attention_mask, optional token_type_ids [B, L]): the
  batch's `token_index` (unpadded execution, kd_jax.models.unpad) and, for a model with
  the MLM head, its `masked_positions` are passed on; `kwargs` go to `Encoder.__call__`
  (deterministic, rngs, the intermediates to return). Returns the `EncoderOutput`:
  logits float [B, C] (sequence head), [B, L, C] (token head) or [B, P, V] (MLM head at
  P masked positions), and what `kwargs` asked for."""
  if "masked_positions" in batch and model.config.head == "mlm":
    kwargs["masked_positions"] = batch["masked_positions"]
  if "token_index" in batch:
    kwargs["token_index"] = batch["token_index"]
  return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                     batch.get("token_type_ids"), **kwargs)


def student_view(batch: Mapping[str, jax.Array]) -> Mapping[str, jax.Array]:
  """The batch as the student reads it: `student_input_ids` as its input_ids when the
  student's ids differ from the tokenizer's (a reduced vocabulary, config.student.vocab;
  the compact embedding rows, config.compact_embeddings); the teachers keep
  `input_ids`."""
  if "student_input_ids" not in batch:
    return batch
  return dict(batch, input_ids=batch["student_input_ids"])


def full_params(plan: stages.StagePlan, schedule, weight_decay: float, mesh):
  """`state -> the full model's parameters` of `plan` (what evaluation and the kept
  checkpoint take): `state.params["model"]` itself, or with a CompactEmbedding the
  full word-embedding table: the initial rows × Π_{k<n} (1 − schedule(k) · weight_decay)
  for the n updates applied so far (AdamW's decoupled decay of rows whose gradient was
  always 0; `_decay_mask` decays embeddings), the trained rows scattered in: float32
  [V, H]. Placed with `sharding.param_shardings` of the full tree. `fn` reads the step
  counters to the host (blocks on the step in flight)."""
  if plan.embedding is None:
    return lambda state: state.params["model"]
  rows, table = plan.embedding.rows, plan.embedding.table
  path = ("embeddings", "word_embeddings", "embedding")

  def with_table(tree, leaf):
    tree = dict(tree)
    node = tree
    for key in path[:-1]:
      node[key] = dict(node[key])
      node = node[key]
    node[path[-1]] = leaf
    return tree

  full_shapes = with_table(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                        plan.params), jax.ShapeDtypeStruct(table.shape,
                                                                           jnp.float32))
  shardings = sharding.param_shardings(full_shapes, mesh)
  table_sharding = shardings
  for key in path:
    table_sharding = table_sharding[key]
  initial = sharding.shard_tree(table, table_sharding)

  @functools.partial(jax.jit, out_shardings=shardings)
  def expand(model_params, initial, decay):
    compact = model_params
    for key in path:
      compact = compact[key]
    return with_table(model_params, (initial * decay).at[rows].set(compact))

  def fn(state):
    applied = int(state.step)
    if isinstance(state.opt_state, optax.ApplyIfFiniteState):  # skipped steps decay nothing
      applied -= int(state.opt_state.total_notfinite)
    lr = np.asarray(schedule(jnp.arange(applied)), np.float64) if applied else np.zeros(0)
    decay = np.prod(1.0 - lr * weight_decay)
    return expand(state.params["model"], initial, jnp.float32(decay))
  return fn


def _teacher_forward(teachers: Sequence[Encoder], teacher_params, batch,
                     teacher_outputs: Mapping[str, Any]):
  """The frozen teachers' output on `batch` (no gradient; with several, the mean of
  their logits and no intermediates); None without teachers."""
  if not teachers:
    return None
  if len(teachers) == 1:
    out = apply_model(teachers[0], teacher_params[0], batch, deterministic=True,
                      **teacher_outputs)
  else:
    outs = [apply_model(t, p, batch, deterministic=True, **teacher_outputs)
            for t, p in zip(teachers, teacher_params)]
    out = type(outs[0])(logits=losses.mean_teacher_logits([o.logits for o in outs]),
                        last_hidden_state=None)
  return jax.lax.stop_gradient(out)


def _student_update(student: Encoder, tx, state: TrainState, teacher_out, batch, rng, *,
                    weights, layer_map, prediction_loss, temperature, alpha,
                    student_outputs) -> tuple[TrainState, dict]:
  """One student's forward with dropout keyed by fold_in(rng, step), the gradient of
  its objective over its parameters and projections, and the optax update: the part of
  a train step each student does for itself (`make_train_step`,
  `make_cohort_train_step`). `weights` may hold traced scalars."""
  dropout_rng = jax.random.fold_in(rng, state.step)
  student_batch = student_view(batch)

  def loss_fn(params):
    student_out = apply_model(student, params["model"], student_batch, deterministic=False,
                              rngs={"dropout": dropout_rng}, **student_outputs)
    return losses.distillation_loss(student_out, teacher_out, batch, weights=weights,
                                    layer_map=layer_map, prediction_loss=prediction_loss,
                                    temperature=temperature, projections=params["proj"],
                                    alpha=alpha)

  (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  terms["grad_norm"] = optax.tree.norm(grads)
  # Per-term finiteness in the step: the loop fetches one scalar to decide.
  terms["nonfinite_terms"] = sum(jnp.logical_not(jnp.isfinite(v)).astype(jnp.float32)
                                 for v in terms.values())
  skipping = isinstance(state.opt_state, optax.ApplyIfFiniteState)
  if skipping:  # apply_if_finite reads the gradients only: also skip a non-finite loss
    finite = terms["nonfinite_terms"] == 0
    grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.nan), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if skipping:
    terms["skipped_steps"] = opt_state.total_notfinite.astype(jnp.float32)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), terms


def make_train_step(student: Encoder, teachers: Sequence[Encoder], tx, *,
                    weights: Mapping[str, float], layer_map: tuple[int | None, ...],
                    prediction_loss: str, temperature: float, mesh, alpha: float = -1.0,
                    state_sharding: Any = None, teacher_sharding: Any = None) -> Any:
  """Builds the jitted `train_step(state, teacher_params, batch, rng) -> (state, metrics)`.

  Teacher forward (frozen, deterministic, no gradient), student forward with
  dropout keyed by fold_in(rng, step), `value_and_grad` over the student's
  parameters (and projections) only, optax update. The state is donated; the batch
  is sharded over the mesh's batch axes (data, fsdp); the state and the teacher's
  parameters with `state_sharding` / `teacher_sharding` (trees of NamedSharding, see
  `create_train_state`; None: replicated), the rng and the metrics replicated.
  metrics: {"loss", one entry per computed term, "grad_norm", "nonfinite_terms" (how
  many of the others are NaN/Inf)} float32 scalars, and "skipped_steps" (total so far)
  when `tx` comes from `make_optimizer(..., nonfinite="skip")`. Compute dtype is the
  encoders' `config.dtype` (bf16 or fp32); gradients and updates are float32.
  `layer_map` is the loss map (None entries: unmapped student layers); `alpha` >= 0
  switches to alpha * clf + (1 - alpha) * KD terms (losses.apply_alpha).
  `teachers`: () without distillation terms (teacher_params ()), else one Encoder per
  entry of `teacher_params`; with several, the teacher output is the mean of their logits
  (losses.mean_teacher_logits) and no intermediates.
  A batch with `student_input_ids` (`student_view`: a reduced vocabulary or compact
  embedding rows) gives the student those ids and the teachers `input_ids`.
  A batch with `masked_positions` (kd_jax.masking) gives models with the MLM head
  (`head="mlm"`) those positions, so their logits are [B, P, V] (the MLM terms).
  """
  weights = dict(weights)
  teachers = tuple(teachers)
  student_outputs, teacher_outputs = losses.outputs_needed(
      weights, layer_map, student.config.num_layers,
      teachers[0].config.num_layers if teachers else 0)
  objective = dict(weights=weights, layer_map=layer_map, prediction_loss=prediction_loss,
                   temperature=temperature, alpha=alpha)

  def train_step(state: TrainState, teacher_params, batch, rng):
    teacher_out = _teacher_forward(teachers, teacher_params, batch, teacher_outputs)
    return _student_update(student, tx, state, teacher_out, batch, rng,
                           student_outputs=student_outputs, **objective)

  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  state_sharding = repl if state_sharding is None else state_sharding
  teacher_sharding = tuple(repl for _ in teachers) if teacher_sharding is None else tuple(
      teacher_sharding)
  return jax.jit(train_step, in_shardings=(state_sharding, teacher_sharding, data, repl),
                 out_shardings=(state_sharding, repl), donate_argnums=(0,))


def make_cohort_train_step(student: Encoder, teachers: Sequence[Encoder], tx, *,
                           weights: Sequence[Mapping[str, float]],
                           layer_map: tuple[int | None, ...], prediction_loss: str,
                           temperature: float, mesh, alpha: float = -1.0,
                           mode: str = "scan") -> Any:
  """Builds the jitted `cohort_step(states, teacher_params, batch, rngs) -> (states,
  metrics)` of N students of one shape that train on the same batches from the same
  teachers: one teacher forward, then each student's `_student_update`.

  `mode` "scan": `states` is one TrainState whose leaves are the N students' stacked on
  a new leading axis ([N, ...]; `stack_states`), and `lax.scan` runs the updates one
  after the other (one student's activations live at a time, plain matmuls, one
  compiled body). "vmap": the same stacked states, the updates under `jax.vmap`
  (batched matmuls). "loop": `states` is a tuple of N TrainStates and the N updates are
  N copies of the student's graph in the one compiled step (N times the compile time).
  On XLA:CPU vmap and loop were no faster than N single steps (README, Benchmark).
  Each student has its own parameters and optimizer state; `rngs`:
  [N, 2] uint32 dropout keys (student i's key as its own run's `rng`); `weights`: one
  objective per student (N dicts, so NON-KD students sit beside KD ones; a term weighted
  for some and 0 for others is computed, under "vmap", for all and multiplied by a [N]
  weight (also under "scan"), under "loop" only where weighted). Every metric is [N] (0 for a term a student
  does not compute). Student i's parameters follow what `make_train_step` with
  `weights[i]` gives on its own, up to float32 rounding (tests/test_cohort.py: 1e-5
  after 3 steps).
  Runs on a mesh without model sharding (every array replicated; the batch sharded over
  the data axis). Raises ValueError for no students, an unknown mode, or a mesh with
  fsdp/tensor axes > 1.
  """
  if mode not in ("scan", "vmap", "loop"):
    raise ValueError(f"make_cohort_train_step: mode={mode!r}; use 'scan', 'vmap' or 'loop'")
  if not weights:
    raise ValueError("make_cohort_train_step: no students (weights is empty)")
  if any(mesh.shape.get(axis, 1) > 1 for axis in ("fsdp", "tensor")):
    raise ValueError(f"make_cohort_train_step: mesh {dict(mesh.shape)} shards the model; "
                     "a cohort runs replicated (data axis only)")
  teachers = tuple(teachers)
  names = sorted({k for w in weights for k, v in w.items() if v})
  stacked = {k: jnp.asarray([float(w.get(k, 0.0)) for w in weights], jnp.float32)
             for k in names}
  student_outputs, teacher_outputs = losses.outputs_needed(
      {k: 1.0 for k in names}, layer_map, student.config.num_layers,
      teachers[0].config.num_layers if teachers else 0)

  def cohort_step(states: TrainState, teacher_params, batch, rngs):
    teacher_out = _teacher_forward(teachers, teacher_params, batch, teacher_outputs)

    def one(state, w, rng):
      return _student_update(student, tx, state, teacher_out, batch, rng, weights=w,
                             layer_map=layer_map, prediction_loss=prediction_loss,
                             temperature=temperature, alpha=alpha,
                             student_outputs=student_outputs)
    if mode == "vmap":
      return jax.vmap(one)(states, stacked, rngs)
    if mode == "scan":
      _, out = jax.lax.scan(lambda carry, xs: (carry, one(*xs)), None,
                            (states, stacked, rngs))
      return out
    # Python floats: a student's zero-weighted terms are not computed at all.
    outs = [one(state, {k: float(weights[i].get(k, 0.0)) for k in names}, rngs[i])
            for i, state in enumerate(states)]
    keys = list(dict.fromkeys(k for _, terms in outs for k in terms))
    return (tuple(state for state, _ in outs),
            {k: jnp.stack([terms.get(k, jnp.float32(0.0)) for _, terms in outs])
             for k in keys})

  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(cohort_step, in_shardings=(repl, tuple(repl for _ in teachers), data, repl),
                 out_shardings=(repl, repl), donate_argnums=(0,))


def stack_states(states: Sequence[TrainState]) -> TrainState:
  """N TrainStates of one structure -> one whose leaves are stacked [N, ...]
  (`make_cohort_train_step`); `unstack_state` undoes it."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def unstack_state(states: TrainState, n: int) -> list[TrainState]:
  """The N TrainStates of a stacked one (`stack_states`)."""
  return [jax.tree.map(lambda x: x[i], states) for i in range(n)]


def create_train_state(trainable: Any, tx, mesh) -> tuple[TrainState, TrainState]:
  """The initial TrainState placed on `mesh`, and the tree of its shardings.

  Parameters (cast to float32: the master copy, whatever the compute dtype) get
  `sharding.param_shardings`; the optimizer state mirrors them
  (`sharding.optimizer_state_shardings`: Adam's mu and nu follow their parameter,
  counters replicated) and is created sharded by a jitted `tx.init`. `trainable`
  holds host values that are the same on every process.
  Returns (state, state_sharding); the latter goes to `make_train_step` and, as the
  restore target's shardings, to Orbax.
  """
  as_f32 = lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x
  trainable = jax.tree.map(lambda x: as_f32(np.asarray(x)), trainable)
  params_sharding = sharding.param_shardings(trainable, mesh)
  params = sharding.shard_tree(trainable, params_sharding)
  opt_sharding = sharding.optimizer_state_shardings(tx, jax.eval_shape(tx.init, params),
                                                    params_sharding, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(params)
  repl = sharding.replicated(mesh)
  state_sharding = TrainState(step=repl, params=params_sharding, opt_state=opt_sharding)
  step = sharding.shard_tree(np.zeros((), np.int32), repl)
  return TrainState(step=step, params=params, opt_state=opt_state), state_sharding


def _check_finite(stage: str, step: int, metrics: Mapping[str, jax.Array]) -> None:
  """Raises FloatingPointError naming the step and the non-finite loss terms (or
  grad_norm) when the step's "nonfinite_terms" count is not 0."""
  if float(metrics["nonfinite_terms"]) == 0:
    return
  values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "nonfinite_terms"}
  bad = sorted(k for k, v in values.items() if not math.isfinite(v))
  raise FloatingPointError(
      f"{stage} step {step}: non-finite loss term(s) {bad} (metrics {values}); nothing was "
      "saved for this step. Lower the learning rate, or set config.nonfinite='skip' to skip "
      "such steps.")


# ---------------------------------------------------------------------------
# one loop for every stage
# ---------------------------------------------------------------------------
def _due(step: int, every: int, last: int | None = None) -> bool:
  """Is it time (big_vision's `u.itstime`): every `every` steps, and at step `last`."""
  return step % every == 0 or step == last


class _Evaluations:
  """A stage's periodic evaluations and what it keeps: with keep "best", the parameters
  of the best val score (`checkpoints/best`, `val.json`); with "final", nothing until the
  last step. Resumes its best score from `val.json`."""

  def __init__(self, plan: stages.StagePlan, ckpt: checkpoints.StageCheckpoints, writer,
               guard: PreemptionGuard):
    self.plan, self.ckpt, self.writer = plan, ckpt, writer
    # Evaluations are collective across processes; only a lone process may stop inside one.
    self.interrupt = (lambda: guard.requested) if jax.process_count() == 1 else None
    self.best_score, self.best_metrics = -math.inf, None
    val = plan.stage_dir / "val.json"  # written after the best save finished
    if plan.keep == "best" and ckpt.kept_step() is not None and val.exists():
      self.best_metrics = checkpoints.read_json(val)
      self.best_score = self.best_metrics["overall"][self.best_metrics.get("metric", "macro_f1")]

  def due(self, step: int) -> bool:
    tc, last = self.plan.train, self.plan.num_steps
    if self.plan.keep == "best":
      return _due(step, tc.eval_every_steps, last)
    return step % tc.eval_every_steps == 0 and step < last  # the last one is the final eval

  def run(self, step: int, params) -> bool:
    """Evaluates `params` at `step`, keeps them when best; False when a SIGTERM cut the
    evaluation short (nothing kept: the resumed run evaluates this step again)."""
    evaluator = self.plan.evaluator
    try:
      scalars, score = evaluator(params, step, interrupt=self.interrupt)
    except evaluation.Interrupted:
      return False
    self.writer.write_scalars(step, scalars)
    best = f" (best {self.best_score:.2f})" if self.plan.keep == "best" else ""
    logging.info("step %d %s%s", step, evaluator.summary(), best)
    if self.plan.keep == "best" and score > self.best_score:
      self.best_score, self.best_metrics = score, dict(evaluator.metrics, step=step)
      self.ckpt.save_kept(step, params, score)  # val.json never names an unfinished save
      if checkpoints.is_primary():
        evaluator.write(self.plan.stage_dir, self.best_metrics)
    return True

  def finish(self, step: int, params) -> dict:
    """The kept parameters (best, or `params` saved as final) through the final
    evaluator; writes the result file that marks the stage finished. {} when stopped."""
    plan, ckpt = self.plan, self.ckpt
    if plan.keep == "best":
      if self.best_metrics is None and not self.run(step, params):
        return {}
      kept, params = ckpt.kept_step(), ckpt.restore_kept(params)
    else:
      kept = step
      if ckpt.kept_step() != step:
        ckpt.save_kept(step, params)
    try:
      scalars, _ = plan.final_evaluator(params, kept, interrupt=self.interrupt)
    except evaluation.Interrupted:
      return {}
    metrics = dict(plan.final_evaluator.metrics, step=kept, stage=plan.name, **plan.result_info)
    logging.info("%s: %s at step %d", plan.name, plan.final_evaluator.summary(), kept)
    if checkpoints.is_primary():
      plan.final_evaluator.write(plan.stage_dir, metrics)  # marks the stage finished
    self.writer.write_scalars(step, scalars)
    return metrics


def train_stage(plan: stages.StagePlan, mesh, guard: PreemptionGuard) -> dict:
  """Trains `plan` to the end, or resumes it, and returns its final metrics (test, or
  held-out MLM); {} when it stopped early: SIGTERM through `guard` (the state of the last
  step is saved first) or `train.stop_after_steps` (simulates a hard kill: no extra
  save). The batch order and dropout keys are pure functions of (seed, step), so a
  resumed stage ends bit for bit where an uninterrupted one does.
  Raises FloatingPointError (nonfinite "stop") naming the step and the non-finite terms;
  nothing of that step is saved.
  """
  tc, last = plan.train, plan.num_steps
  tx, schedule = make_optimizer(tc, last, plan.nonfinite)
  model_params = full_params(plan, schedule, tc.weight_decay, mesh)
  state, state_sharding = create_train_state({"model": plan.params, "proj": plan.projections},
                                             tx, mesh)
  train_step = make_train_step(
      plan.student, tuple(t.model for t in plan.teachers), tx, **vars(plan.objective),
      mesh=mesh, state_sharding=state_sharding,
      teacher_sharding=tuple(t.sharding for t in plan.teachers))
  teacher_params = tuple(t.params for t in plan.teachers)
  plan.stage_dir.mkdir(parents=True, exist_ok=True)
  checkpoints.save_model_config(plan.stage_dir, plan.model_config, plan.info)
  writer = metric_writers.create_default_writer(plan.stage_dir,
                                                just_logging=jax.process_index() > 0)
  with checkpoints.StageCheckpoints(plan.stage_dir, plan.keep) as ckpt:
    try:
      state = ckpt.restore_latest(state)
    except hf_io.CheckpointMismatchError as e:
      if plan.embedding is None or "word_embeddings" not in str(e):
        raise
      raise hf_io.CheckpointMismatchError(
          f"{e}. This run was saved with the whole embedding table: resume it with "
          "--config.compact_embeddings=False") from e
    step = int(state.step)
    if step == 0:
      writer.write_hparams(plan.hparams)
    evals = _Evaluations(plan, ckpt, writer, guard)
    logging.info("%s: %d steps (%d per epoch), start at %d", plan.name, last,
                 plan.steps_per_epoch, step)
    # A resumed step that was due an evaluation may have been stopped during it.
    stopped = guard.requested or (step > 0 and evals.due(step)
                                  and not evals.run(step, model_params(state)))
    report = periodic_actions.ReportProgress(num_train_steps=last, writer=writer)
    batches, pending = plan.batches(step), None  # pending: metrics not yet checked
    dropout_rng = sharding.replicate(plan.dropout_rng, mesh)
    while step < last and not stopped:
      batch = sharding.shard_global_batch(next(batches), mesh)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = train_step(state, teacher_params, batch, dropout_rng)
      step += 1
      preempted = guard.requested  # read once: a step is checked before it is saved
      killed = 0 < tc.stop_after_steps <= step < last
      log, evaluate = _due(step, tc.log_every_steps, last), evals.due(step)
      save = _due(step, tc.checkpoint_every_steps, last) or preempted
      # nonfinite "stop": the previous step is checked once this one is queued (dispatch
      # stays a step ahead); a step that logs, evaluates, saves or stops is checked at
      # once, so no checkpoint or result ever holds a non-finite state.
      if pending is not None:
        _check_finite(*pending)
      pending = (plan.name, step, metrics) if plan.nonfinite == "stop" else None
      if pending is not None and (log or evaluate or save or killed):
        _check_finite(*pending)
        pending = None
      report(step)
      if log:
        scalars = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
        scalars["train/learning_rate"] = float(schedule(step - 1))
        writer.write_scalars(step, scalars)
      if evaluate and not preempted and not evals.run(step, model_params(state)):
        preempted = save = True  # stopped during the evaluation: resume evaluates again
      if save:
        ckpt.save_latest(step, state)
      stopped = preempted or killed
    ckpt.wait()
    results = {} if stopped or guard.requested else evals.finish(step, model_params(state))
  if not results:
    logging.info("%s stopped after step %d; run the same command again to resume",
                 plan.name, step)
  writer.flush()
  return results


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------
RUN_NAMES = {"finetune_teacher": lambda config: "teacher",
             "distill": lambda config: (f"student {config.student.init} "
                                        f"{'KD' if config.distill.kd else 'NON-KD'}")}


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | os.PathLike) -> dict[str, dict]:
  """Runs `config.stages` in order under `workdir`; returns {stage: final metrics} ({}
  for a stage that stopped early, after which no later stage starts).

  `workdir` and the config's path fields may be relative: they are resolved once here
  against the current directory (`paths.resolve_config`, logged), and everything below
  works on absolute `epath.Path`s (a `gs://` workdir is kept as it is). Every config
  error that the config files can show (`config_base.validate_config`,
  `stages.check_all`) is raised before the first stage starts; a workdir held by a live
  run raises checkpoints.WorkdirLockedError before anything is written. A stage whose
  `checkpoints.FINISHED_FILES` entry exists is finished and not rerun, so the same
  command resumes a multi-stage job. One PreemptionGuard covers every stage. Prints and
  writes `<workdir>/results.md` (the classification stages). JAX's persistent
  compilation cache is turned on as `config.compilation_cache` says
  (`paths.enable_compilation_cache`), so a rerun of the same shapes compiles nothing.
  """
  config_base.validate_config(config)
  config, workdir = paths.resolve_config(config, workdir)
  paths.enable_compilation_cache(config.compilation_cache)
  mesh = sharding.create_mesh_from_config(config.mesh)
  stages.check_all(config, workdir, mesh)  # before the lock: a config error writes nothing
  results = {}
  with checkpoints.WorkdirLock(workdir), PreemptionGuard() as guard:
    for name in config.stages:
      finished = checkpoints.finished_file(workdir, name)
      if finished.exists():
        logging.info("%s already finished (%s); skipping", name, finished)
        results[name] = checkpoints.read_json(finished)
        continue
      if guard.requested:
        logging.info("stopped before %s; run the same command again to resume", name)
        results[name] = {}
        return results
      results[name] = train_stage(stages.build(name, config, workdir, mesh), mesh, guard)
      if not results[name]:
        return results
  runs = {RUN_NAMES[s](config): r for s, r in results.items() if s in RUN_NAMES}
  if runs:
    languages = list(dict.fromkeys(l for r in runs.values() for l in r.get("per_language", {})))
    table = evaluation.format_markdown_table(runs, languages)
    if checkpoints.is_primary():
      (workdir / "results.md").write_text(table + "\n")
    metric = next(iter(runs.values())).get("metric", "macro_f1")
    print(f"\nTest {evaluation.METRIC_LABELS.get(metric, (metric, metric))[1]} (%), {workdir}:\n{table}")
  return results
