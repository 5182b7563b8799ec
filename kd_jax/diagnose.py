"""Which loss term drives a distillation step: per-term value, gradient norm, and how
much of the update the cross-entropy still owns, at the student's initialisation.

  python -m kd_jax.diagnose --config configs/default.py --workdir runs/diag \
      --config.teacher.checkpoint=runs/default/teacher --config.student.init=from_base

Builds the `distill` stage exactly as training would (`stages.build`), takes its first
`--batches` training batches and, without dropout, differentiates each weighted term
`w_k L_k` alone with respect to the student's parameters (and projections). Prints,
per term and averaged over the batches:

* the term's value and weight;
* `|g_k|`: the global L2 norm of its gradient, and its share of the sum of all terms'
  gradient norms;
* `cos(g_k, g)`: the cosine between its gradient and the total gradient g;
* `sign = clf`: among the parameters the cross-entropy moves (a non-zero gradient),
  the share whose total-gradient sign equals the sign of the cross-entropy's gradient
  (Adam's first steps move each parameter by about -lr * sign(g), so 50 % means the
  cross-entropy steers none of them);

and the clipping factor `max_grad_norm / |g|` that `optax.clip_by_global_norm` applies.
Writes nothing; the workdir is only where `<workdir>/teacher` is looked for.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from kd_jax import config_base, losses, paths, sharding, stages, train

FLAGS = flags.FLAGS


def _define_flags():
  """The command's flags, defined only when it runs as a program (kd_jax.main defines
  some of the same names, and tests import both modules)."""
  flags.DEFINE_string("workdir", None, "Run directory (for <workdir>/teacher).")
  config_flags.DEFINE_config_file("config", None, "Config file (get_config()).", lock_config=True)
  flags.DEFINE_integer("batches", 4, "Training batches to average over.")
  flags.mark_flags_as_required(["config", "workdir"])


def term_gradients(plan: stages.StagePlan, batches: int) -> dict[str, dict[str, float]]:
  """Per weighted term of `plan.objective`: {"value", "weight", "grad_norm", "cos_total",
  "sign_agree_clf", "total_grad_norm"} averaged over the first `batches` training batches
  (student without dropout; the teacher frozen as in training). `alpha` >= 0 is applied
  as in training (`losses.apply_alpha`). Raises ValueError for a plan without `clf`."""
  objective = plan.objective
  weights = losses.apply_alpha(objective.weights, objective.alpha)
  weights = {k: float(v) for k, v in weights.items() if float(v) != 0}
  if "clf" not in weights:
    raise ValueError(f"the objective {weights} has no clf term to compare against")
  teacher = plan.teachers[0] if plan.teachers else None
  s_needed, t_needed = losses.outputs_needed(
      weights, objective.layer_map, plan.model_config.num_layers,
      teacher.model.config.num_layers if teacher else 0)
  trainable = {"model": plan.params, "proj": plan.projections}

  @jax.jit
  def grads(trainable, teacher_params, batch):
    teacher_out = (train.apply_model(teacher.model, teacher_params, batch, deterministic=True,
                                     **t_needed) if teacher else None)

    def term(params, name):
      out = train.apply_model(plan.student, params["model"], train.student_view(batch),
                              deterministic=True, **s_needed)
      total, values = losses.distillation_loss(
          out, teacher_out, batch, weights={name: weights[name]},
          layer_map=objective.layer_map, prediction_loss=objective.prediction_loss,
          temperature=objective.temperature, projections=params["proj"])
      return total, values[name]
    return {name: jax.grad(functools.partial(term, name=name), has_aux=True)(trainable)
            for name in weights}

  flat = lambda tree: jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])
  rows = {name: [] for name in weights}
  source = plan.batches(0)
  for _ in range(batches):
    batch = next(source)
    batch.pop("token_index", None)  # padded execution: same values
    out = grads(trainable, teacher.params if teacher else None,
                jax.tree.map(jnp.asarray, batch))
    g = {name: flat(gr) for name, (gr, _) in out.items()}
    total = sum(g.values())
    total_norm = float(jnp.linalg.norm(total))
    steered = g["clf"] != 0  # parameters the cross-entropy moves at all
    for name, (_, value) in out.items():
      norm = float(jnp.linalg.norm(g[name]))
      rows[name].append({
          "value": float(value), "weight": weights[name], "grad_norm": norm,
          "cos_total": float(jnp.dot(g[name], total) / max(norm * total_norm, 1e-30)),
          "sign_agree_clf": float(jnp.sum((jnp.sign(total) == jnp.sign(g["clf"])) & steered)
                                  / jnp.maximum(jnp.sum(steered), 1)),
          "total_grad_norm": total_norm})
  return {name: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]}
          for name, rs in rows.items()}


def format_report(stats: dict[str, dict[str, float]], max_grad_norm: float) -> str:
  """The Markdown table `python -m kd_jax.diagnose` prints."""
  norms = sum(s["grad_norm"] for s in stats.values())
  total = next(iter(stats.values()))["total_grad_norm"]
  lines = ["| term | weight | value | \\|g_k\\| | share of Σ\\|g_k\\| | cos(g_k, g) |",
           "|---|---:|---:|---:|---:|---:|"]
  for name, s in stats.items():
    lines.append(f"| {name} | {s['weight']:g} | {s['value']:.4f} | {s['grad_norm']:.3f} | "
                 f"{100 * s['grad_norm'] / norms:.1f} % | {s['cos_total']:.3f} |")
  clip = min(1.0, max_grad_norm / total) if total > 0 else 1.0
  agree = next(iter(stats.values()))["sign_agree_clf"]
  lines += ["", f"|g| (all terms) = {total:.3f}; clip_by_global_norm({max_grad_norm:g}) scales "
            f"the gradient by {clip:.4f}; sign(g) = sign(g_clf) for {100 * agree:.1f} % of the "
            "parameters that g_clf moves (50 %: the cross-entropy steers none)."]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  config = FLAGS.config
  with config.unlocked():
    config.stages = ("distill",)
    config.unpad = False
  config_base.validate_config(config)
  config, workdir = paths.resolve_config(config, FLAGS.workdir)
  mesh = sharding.create_mesh_from_config(config.mesh)
  plan = stages.build("distill", config, workdir, mesh)
  stats = term_gradients(plan, FLAGS.batches)
  print(f"\nGradient of each loss term at {config.student.init} initialisation, mean of "
        f"{FLAGS.batches} batches of {plan.train.batch_size}:\n")
  print(format_report(stats, float(plan.train.max_grad_norm)))


if __name__ == "__main__":
  from kd_jax import allocator
  allocator.reexec("kd_jax.diagnose")  # CPU: mimalloc, before anything allocates
  _define_flags()
  app.run(main)
