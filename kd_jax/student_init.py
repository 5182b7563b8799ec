"""Student initialisation by copying weights (Wibowo et al. 2024, §2.2).

"The Privileged Students" initialises a smaller student encoder by copying
weights from a larger model:

* ``from_teacher`` - copy from the fine-tuned teacher (the paper's best
  strategy);
* ``from_base`` - copy from the pretrained, not fine-tuned checkpoint
  (e.g. ``xlm-roberta-base``; its classification head may be a random init);
* ``from_scratch`` - no copying, keep the random initialisation.

Layer selection (paper eq. 5 and 6): student layer ``i`` (1-based) takes
teacher layer ``k = i * divisor`` with ``divisor = N // M`` for an
``N``-layer teacher and ``M``-layer student; for 12 -> 6 this is
``(2, 4, ..., 12)``, i.e. "the second self-attention layer of the teacher
model will be mapped to the first self-attention layer of the student".
:func:`layer_map_for` also offers the survey's "top", "bottom" and "last"
mappings (the latter for losses only) and explicit maps; :func:`resolve_layer_maps`
gives the initialisation map and the (possibly different) loss map of a run.

Width reduction (§2.2, following Xu et al. 2024, "Initializing Models with
Larger Ones"): along every dimension where the student is smaller than the
teacher, evenly spaced slices are selected: ``(arange(m) * n) // m``; a
4x4 weight mapped to 2x2 takes the 1st and 3rd slices along both
dimensions, a bias is sliced along its one dimension. The indices depend only
on ``(n, m)``, so every leaf that has a hidden dimension of size ``H`` picks
the same hidden units, keeping the residual stream aligned across layers,
embeddings, LayerNorms, pooler and classifier.

Note on attention heads: the number of heads is config-only. With evenly
spaced selection over ``H`` the student's head ``h`` (if the student keeps the
teacher's number of heads, with half the head_dim) consists of every 2nd
unit of teacher head ``h``; with fewer heads the student heads mix units
from neighbouring teacher heads. Both are valid initialisations; the former
is the natural reading of the paper.

Parameters are plain nested dicts (Flax linen ``params`` collection without
the outer ``{'params': ...}``); top-level modules named ``layer_{i}``
(0-based ``i``) are the transformer layers. All other leaves are matched by
identical path, so new top-level entries (e.g. an MLM head) are handled
generically.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = [
    "STRATEGIES",
    "LeafProvenance",
    "evenly_spaced_indices",
    "uniform_layer_map",
    "resolve_layer_map",
    "LAYER_MAP_STRATEGIES",
    "INIT_LAYER_MAP_STRATEGIES",
    "layer_map_for",
    "layer_pairs",
    "resolve_layer_maps",
    "count_layers",
    "copy_from",
    "init_student",
    "describe_provenance",
]

STRATEGIES = ("from_scratch", "from_base", "from_teacher")

_LAYER_RE = re.compile(r"^layer_(\d+)$")


class LeafProvenance(tuple):
  """``(source_path, indices)`` pair; unpacks and indexes like a 2-tuple.

  ``indices`` has one entry per dimension: an int index array for sliced
  dimensions, ``None`` for dimensions copied whole. The extra attribute
  ``source_shape`` records the source leaf's shape (used for logging,
  because the source size cannot be recovered from the indices alone).
  """

  source_shape: tuple[int, ...]

  def __new__(cls, source_path: str, indices: tuple, source_shape: tuple[int, ...] = ()):
    self = super().__new__(cls, (source_path, indices))
    self.source_shape = tuple(int(d) for d in source_shape)
    return self

  @property
  def source_path(self) -> str:
    return self[0]

  @property
  def indices(self) -> tuple:
    return self[1]

  def __getnewargs__(self):  # pickle / copy support
    return (self[0], self[1], self.source_shape)

  def __repr__(self) -> str:
    return f"LeafProvenance({self[0]!r}, {self[1]!r}, source_shape={self.source_shape})"


# provenance: target path -> (source path, per-dim index arrays or None)
Provenance = dict[str, LeafProvenance]


def evenly_spaced_indices(n: int, m: int) -> np.ndarray:
  """Indices of ``m`` evenly spaced elements out of ``n``: ``(arange(m) * n) // m``.

  ``evenly_spaced_indices(4, 2) == [0, 2]`` (the paper's "1st and 3rd
  slices", §2.2; uniform selection of Xu et al. 2024). ``m == n`` gives
  ``arange(n)``.

  Raises:
    ValueError: if ``m < 1`` or ``m > n``.
  """
  n, m = int(n), int(m)
  if m < 1:
    raise ValueError(f"evenly_spaced_indices: m must be >= 1, got m={m} (n={n})")
  if m > n:
    raise ValueError(
        f"evenly_spaced_indices: cannot select m={m} elements out of n={n} (m > n)"
    )
  return (np.arange(m, dtype=np.int64) * n) // m


def _check_layer_counts(n: int, m: int) -> None:
  if m < 1 or n < 1:
    raise ValueError(
        f"layer counts must be >= 1, got num_teacher_layers={n}, num_student_layers={m}"
    )
  if m > n:
    raise ValueError(
        f"student has more layers ({m}) than teacher ({n}); cannot build a layer map"
    )


def uniform_layer_map(num_teacher_layers: int, num_student_layers: int) -> tuple[int, ...]:
  """Uniform 1-based layer map of paper eq. 5/6: ``k = i * divisor``.

  Args:
    num_teacher_layers: N, number of teacher (source) layers.
    num_student_layers: M, number of student (target) layers.

  Returns:
    Tuple of length M; entry ``i - 1`` is the 1-based teacher layer
    ``i * (N // M)`` for student layer ``i = 1..M``. E.g. 12 -> 6 gives
    ``(2, 4, 6, 8, 10, 12)``; 12 -> 4 gives ``(3, 6, 9, 12)``.

  Raises:
    ValueError: if M < 1, M > N, or N is not divisible by M.
  """
  n, m = int(num_teacher_layers), int(num_student_layers)
  _check_layer_counts(n, m)
  if n % m != 0:
    raise ValueError(
        f"num_teacher_layers={n} is not divisible by num_student_layers={m}; "
        "the uniform map k = i * divisor (paper eq. 5) needs N % M == 0. "
        "Give an explicit layer_map (1-based teacher layer per student layer)."
    )
  divisor = n // m
  return tuple(i * divisor for i in range(1, m + 1))


def resolve_layer_map(
    num_teacher_layers: int,
    num_student_layers: int,
    layer_map: Sequence[int] | None = None,
) -> tuple[int, ...]:
  """Validated explicit layer map, or the uniform map if ``layer_map`` is None.

  Args:
    num_teacher_layers: N.
    num_student_layers: M.
    layer_map: optional explicit 1-based teacher layer for each of the M
      student layers (length M, each entry in 1..N; repeats allowed).

  Raises:
    ValueError: wrong length, an entry outside 1..N (the message names the
      offending value and its position), or (without ``layer_map``) N % M != 0.
  """
  n, m = int(num_teacher_layers), int(num_student_layers)
  if layer_map is None:
    return uniform_layer_map(n, m)
  lm = list(layer_map)
  if len(lm) != m:
    raise ValueError(
        f"layer_map has length {len(lm)} but the student has {m} layers: {lm}"
    )
  out = []
  for pos, k in enumerate(lm):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
      raise ValueError(
          f"layer_map[{pos}] = {k!r} is not an integer (1-based teacher layer)"
      )
    if not 1 <= int(k) <= n:
      raise ValueError(
          f"layer_map[{pos}] = {k} is out of range: teacher layers are 1-based, "
          f"1..{n}"
      )
    out.append(int(k))
  return tuple(out)


#: Layer-mapping strategies ``g(m)`` (survey eq. 5): student layer ``m`` (1-based)
#: learns from teacher layer ``g(m)``; N teacher layers, M student layers.
LAYER_MAP_STRATEGIES = ("uniform", "top", "bottom", "last", "explicit")
#: Strategies that map *every* student layer, so they can initialise one ("last" cannot).
INIT_LAYER_MAP_STRATEGIES = ("uniform", "top", "bottom", "explicit")


def layer_map_for(
    strategy: str,
    num_teacher_layers: int,
    num_student_layers: int,
    explicit: Sequence[int] | None = None,
) -> tuple[int | None, ...]:
  """One entry per student layer: the 1-based teacher layer ``g(m)``, or None.

  Strategies (survey "Knowledge Distillation for Multilingual Transformers",
  eq. 5 and the list after it; N teacher, M student layers, ``m = 1..M``):

  * ``"uniform"``: ``g(m) = m * N / M`` (paper eq. 5/6; needs ``N % M == 0``),
    12 -> 6 gives ``(2, 4, 6, 8, 10, 12)``.
  * ``"top"``: ``g(m) = m + N - M`` (the teacher's top M layers),
    12 -> 6 gives ``(7, ..., 12)``.
  * ``"bottom"``: ``g(m) = m`` (the teacher's bottom M layers),
    12 -> 6 gives ``(1, ..., 6)``.
  * ``"last"``: only ``g(M) = N``; the other student layers are unmapped and
    their entries are ``None``, 12 -> 6 gives ``(None,)*5 + (12,)``.  The
    layer-wise losses skip ``None`` entries; a map with ``None`` cannot
    initialise a student (see ``INIT_LAYER_MAP_STRATEGIES``).
  * ``"explicit"``: ``explicit`` (length M, entries in 1..N) validated by
    :func:`resolve_layer_map`.

  ``explicit`` (non-empty) is also accepted with ``strategy="uniform"`` (the
  config default), where it takes precedence -- so ``student.layer_map`` works
  as before; combined with ``"top"``, ``"bottom"`` or ``"last"`` it is an error.

  Raises:
    ValueError: unknown strategy (lists the valid ones), M < 1, M > N,
      uniform with ``N % M != 0``, ``"explicit"`` without ``explicit``,
      ``explicit`` with a conflicting strategy, or a bad explicit map.
  """
  if strategy not in LAYER_MAP_STRATEGIES:
    raise ValueError(
        f"unknown layer map strategy {strategy!r}; valid values: "
        f"{', '.join(LAYER_MAP_STRATEGIES)}"
    )
  n, m = int(num_teacher_layers), int(num_student_layers)
  explicit = tuple(explicit) if explicit is not None else ()
  if explicit:
    if strategy not in ("explicit", "uniform"):
      raise ValueError(
          f"an explicit layer map {list(explicit)} was given together with layer map "
          f"strategy {strategy!r}; use strategy 'explicit' (or 'uniform') with it, "
          "or drop the explicit map"
      )
    return resolve_layer_map(n, m, explicit)
  if strategy == "explicit":
    raise ValueError("layer map strategy 'explicit' needs an explicit layer map (length M)")
  if strategy == "uniform":
    return uniform_layer_map(n, m)
  _check_layer_counts(n, m)
  if strategy == "top":
    return tuple(i + n - m for i in range(1, m + 1))
  if strategy == "bottom":
    return tuple(range(1, m + 1))
  return (None,) * (m - 1) + (n,)  # "last"


def layer_pairs(layer_map: Sequence[int | None]) -> tuple[tuple[int, int], ...]:
  """``((student_layer, teacher_layer), ...)`` for the mapped entries, both 1-based.

  ``layer_pairs((None, None, 12)) == ((3, 12),)``; ``layer_pairs((2, 4)) ==
  ((1, 2), (2, 4))``.
  """
  return tuple((i, int(k)) for i, k in enumerate(layer_map, start=1) if k is not None)


def resolve_layer_maps(
    num_teacher_layers: int,
    num_student_layers: int,
    *,
    student_strategy: str = "uniform",
    student_layer_map: Sequence[int] | None = None,
    distill_strategy: str = "",
    distill_layer_map: Sequence[int] | None = None,
) -> tuple[tuple[int, ...], tuple[int | None, ...]]:
  """The initialisation map and the loss map of a distillation run.

  ``init_map = layer_map_for(student_strategy, N, M, student_layer_map)``
  (config ``student.layer_map_strategy`` / ``student.layer_map``) must map
  every student layer.  The loss map is ``init_map`` when
  ``distill_strategy == ""`` and no ``distill_layer_map`` is given (config
  ``distill.layer_map_strategy`` / ``distill.layer_map``), otherwise
  ``layer_map_for(distill_strategy or "explicit", N, M, distill_layer_map)``;
  so e.g. a student initialised with ``"uniform"`` can be distilled with
  ``"last"``.

  Returns:
    ``(init_map, loss_map)``, both of length M; ``loss_map`` may hold None.
  """
  if student_strategy not in INIT_LAYER_MAP_STRATEGIES:
    raise ValueError(
        f"layer map strategy {student_strategy!r} cannot initialise a student (it does "
        f"not map every student layer); valid values: "
        f"{', '.join(INIT_LAYER_MAP_STRATEGIES)}"
    )
  init_map = layer_map_for(student_strategy, num_teacher_layers, num_student_layers,
                           student_layer_map or None)
  distill_layer_map = tuple(distill_layer_map or ())
  if not distill_strategy and not distill_layer_map:
    return init_map, init_map
  loss_map = layer_map_for(distill_strategy or "explicit", num_teacher_layers,
                           num_student_layers, distill_layer_map or None)
  return init_map, loss_map


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out: dict[tuple[str, ...], Any] = {}
  for key, value in tree.items():
    path = prefix + (str(key),)
    if isinstance(value, Mapping):
      out.update(_flatten(value, path))
    else:
      out[path] = value
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def _layer_index(name: str) -> int | None:
  match = _LAYER_RE.match(name)
  return int(match.group(1)) if match else None


def count_layers(params: Mapping[str, Any]) -> int:
  """Number of top-level ``layer_{i}`` modules in a parameter tree."""
  return sum(1 for k in params if _layer_index(str(k)) is not None)


def copy_from(
    source_params: Mapping[str, Any],
    target_params: Mapping[str, Any],
    layer_map: Sequence[int],
) -> tuple[dict[str, Any], Provenance]:
  """Copy (and evenly slice) source weights into the structure of ``target_params``.

  For every leaf of ``target_params`` the source leaf at the same path is
  used, except that target ``layer_{i}`` (0-based) reads source
  ``layer_{layer_map[i] - 1}`` (``layer_map`` is 1-based, paper eq. 5/6).
  Along every dimension ``d`` where the target is smaller than the source
  the slices ``evenly_spaced_indices(src.shape[d], tgt.shape[d])`` are
  taken (both dims of a kernel ``[H, H]`` / ``[H, I]`` / ``[H, C]``, the
  one dim of a bias / LayerNorm; dims of equal size are copied whole). As
  the indices depend only on the sizes, all leaves share the same hidden
  units.

  Args:
    source_params: nested dict of arrays (teacher or base checkpoint).
    target_params: nested dict of arrays (randomly initialised student);
      defines the output structure, shapes and dtypes.
    layer_map: 1-based source layer for each target layer, length equal to
      the number of ``layer_{i}`` modules in ``target_params``.

  Returns:
    ``(new_params, provenance)``: ``new_params`` has the structure, shapes
    and dtypes of ``target_params`` (jnp arrays); ``provenance`` maps the
    target path string (``'layer_0/attention/query/kernel'``) to
    ``(source path string, per-dim indices)`` where each per-dim entry is
    an index array for sliced dims or ``None`` for dims copied whole.

  Raises:
    ValueError: one error listing all problems: bad layer_map (wrong
      length / entry out of range), target leaves with no source leaf,
      rank mismatches, and dims where the target is larger than the source.
      Source leaves absent from the target are ignored.
  """
  layer_map = tuple(int(k) for k in layer_map)
  n_src = count_layers(source_params)
  n_tgt = count_layers(target_params)
  resolve_layer_map(n_src, n_tgt, layer_map)  # validates length and range

  src_flat = _flatten(source_params)
  tgt_flat = _flatten(target_params)

  missing: list[str] = []
  incompatible: list[str] = []
  new_flat: dict[tuple[str, ...], Any] = {}
  provenance: Provenance = {}

  for tpath, tleaf in tgt_flat.items():
    spath = tpath
    layer = _layer_index(tpath[0])
    if layer is not None:
      if layer >= len(layer_map):
        missing.append(
            f"{'/'.join(tpath)} (target layer_{layer} has no layer_map entry)"
        )
        continue
      spath = (f"layer_{layer_map[layer] - 1}",) + tpath[1:]
    tname, sname = "/".join(tpath), "/".join(spath)
    if spath not in src_flat:
      missing.append(f"{tname} (expected source {sname})")
      continue
    src = np.asarray(src_flat[spath])
    # .shape also covers jax.ShapeDtypeStruct targets (from jax.eval_shape).
    tshape = tuple(tleaf.shape) if hasattr(tleaf, "shape") else np.shape(tleaf)
    if src.ndim != len(tshape):
      incompatible.append(
          f"{tname}: target shape {tshape} vs source {sname} shape {src.shape} "
          "(rank differs)"
      )
      continue
    bad = [d for d in range(src.ndim) if tshape[d] > src.shape[d]]
    if bad:
      incompatible.append(
          f"{tname}: target shape {tshape} larger than source {sname} shape "
          f"{src.shape} along dim(s) {bad}"
      )
      continue
    per_dim: list[np.ndarray | None] = []
    for d in range(src.ndim):
      if tshape[d] == src.shape[d]:
        per_dim.append(None)
      else:
        per_dim.append(evenly_spaced_indices(src.shape[d], tshape[d]))
    value = src
    if any(ix is not None for ix in per_dim):
      # ndim >= 1 here: a scalar has no dims to slice.
      value = src[np.ix_(*[
          ix if ix is not None else np.arange(src.shape[d])
          for d, ix in enumerate(per_dim)
      ])]
    dtype = tleaf.dtype if hasattr(tleaf, "dtype") else np.asarray(tleaf).dtype
    new_flat[tpath] = jnp.asarray(value, dtype=dtype)
    provenance[tname] = LeafProvenance(sname, tuple(per_dim), src.shape)

  if missing or incompatible:
    lines = ["copy_from: source and target parameter trees are incompatible:"]
    if missing:
      lines.append(f"  missing source leaves ({len(missing)}):")
      lines += [f"    - {m}" for m in missing]
    if incompatible:
      lines.append(f"  incompatible shapes ({len(incompatible)}):")
      lines += [f"    - {m}" for m in incompatible]
    raise ValueError("\n".join(lines))

  return _unflatten(new_flat), provenance


def init_student(
    strategy: str,
    random_params: Mapping[str, Any],
    *,
    teacher_params: Mapping[str, Any] | None = None,
    base_params: Mapping[str, Any] | None = None,
    layer_map: Sequence[int] | None,
) -> tuple[Any, Provenance | None]:
  """Initialise student parameters with one of the paper's three strategies (§3.1).

  Args:
    strategy: ``"from_scratch"`` (return ``random_params`` unchanged, no
      provenance), ``"from_base"`` (copy from ``base_params``, the
      pretrained non-fine-tuned checkpoint) or ``"from_teacher"`` (copy
      from ``teacher_params``, the fine-tuned teacher).
    random_params: the student's random init; defines structure/shapes.
    teacher_params, base_params: source trees (only the needed one is
      required).
    layer_map: 1-based source layer per student layer; ``None`` means the
      uniform map of eq. 5/6 computed from the layer counts of the trees.

  Returns:
    ``(params, provenance)``; provenance is None for from_scratch.

  Raises:
    ValueError: unknown strategy (lists the valid ones), required source is
      None, or any error from :func:`copy_from` / :func:`resolve_layer_map`.
  """
  if strategy not in STRATEGIES:
    raise ValueError(
        f"unknown init strategy {strategy!r}; valid values: {', '.join(STRATEGIES)}"
    )
  if strategy == "from_scratch":
    return random_params, None
  if strategy == "from_base":
    source, name = base_params, "base_params"
  else:
    source, name = teacher_params, "teacher_params"
  if source is None:
    raise ValueError(f"strategy {strategy!r} needs {name}, but it is None")
  resolved = resolve_layer_map(count_layers(source), count_layers(random_params), layer_map)
  return copy_from(source, random_params, resolved)


def _ordinal(k: int) -> str:
  if 10 <= k % 100 <= 20:
    suffix = "th"
  else:
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
  return f"{k}{suffix}"


def describe_provenance(provenance: Provenance | None, source_name: str = "teacher") -> str:
  """Short human-readable summary of a provenance dict, for logs.

  Example output::

      student layer 1 <- teacher layer 2
      student layer 2 <- teacher layer 4
      dim 384->192 (every 2nd)
      12 leaves copied, 10 sliced

  Layer numbers are 1-based (as in the paper); width reductions list each
  distinct ``src->tgt`` size pair that was sliced.
  """
  if provenance is None:
    return "no weights copied (from_scratch)"
  layers: dict[int, int] = {}
  shrinks: set[tuple[int, int]] = set()
  n_sliced = 0
  for tpath, prov in provenance.items():
    spath, per_dim = prov
    t_layer = _layer_index(tpath.split("/", 1)[0])
    s_layer = _layer_index(spath.split("/", 1)[0])
    if t_layer is not None and s_layer is not None:
      layers[t_layer] = s_layer
    src_shape = getattr(prov, "source_shape", None)
    sliced = False
    for d, ix in enumerate(per_dim):
      if ix is not None:
        sliced = True
        n = src_shape[d] if src_shape else _infer_src_dim(ix)
        shrinks.add((int(n), len(ix)))
    n_sliced += sliced
  lines = [
      f"student layer {t + 1} <- {source_name} layer {layers[t] + 1}"
      for t in sorted(layers)
  ]
  for n, m in sorted(shrinks, reverse=True):
    how = f"every {_ordinal(n // m)}" if n % m == 0 else "evenly spaced"
    lines.append(f"dim {n}->{m} ({how})")
  if not shrinks:
    lines.append("no width reduction (all dims copied whole)")
  lines.append(f"{len(provenance)} leaves copied, {n_sliced} sliced")
  return "\n".join(lines)


def _infer_src_dim(ix: np.ndarray) -> int:
  """Smallest n with ``evenly_spaced_indices(n, len(ix)) == ix`` (fallback only:
  several n can give the same indices, e.g. (4, 2) and (5, 2) both give [0, 2])."""
  m = len(ix)
  lo = int(ix[-1]) + 1
  # (m - 1) * n // m == ix[-1] bounds n to a small range above ix[-1].
  for n in range(max(lo, m), lo + m + 2):
    if np.array_equal(evenly_spaced_indices(n, m), ix):
      return n
  return lo  # not produced by evenly_spaced_indices; best effort
