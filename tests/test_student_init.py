"""Tests for kd_jax.student_init (paper §2.2, eq. 5/6)."""

from __future__ import annotations

import numpy as np
import pytest

from kd_jax.student_init import (
    LeafProvenance,
    copy_from,
    count_layers,
    describe_provenance,
    evenly_spaced_indices,
    init_student,
    resolve_layer_map,
    uniform_layer_map,
)

V, P, TT, C = 10, 12, 2, 3
OFFSET_STEP = 10_000  # > size of any leaf, so offset identifies the leaf


def make_tree(num_layers, H, I, extra_head=False):
  """Encoder tree of leaf shapes; values filled by `fill_unique`."""
  def dense(i, o):
    return {"kernel": (i, o), "bias": (o,)}

  def ln(h):
    return {"scale": (h,), "bias": (h,)}

  tree = {
      "embeddings": {
          "word_embeddings": {"embedding": (V, H)},
          "position_embeddings": {"embedding": (P, H)},
          "token_type_embeddings": {"embedding": (TT, H)},
          "LayerNorm": ln(H),
      },
      "pooler": dense(H, H),
      "classifier": dense(H, C),
  }
  for i in range(num_layers):
    tree[f"layer_{i}"] = {
        "attention": {
            "query": dense(H, H),
            "key": dense(H, H),
            "value": dense(H, H),
            "output": dense(H, H),
        },
        "attention_LayerNorm": ln(H),
        "intermediate": dense(H, I),
        "output": dense(I, H),
        "output_LayerNorm": ln(H),
    }
  if extra_head:
    tree["mlm_head"] = {"dense": dense(H, H), "LayerNorm": ln(H)}
  return tree


def _paths(tree, prefix=()):
  for k in sorted(tree):
    v = tree[k]
    if isinstance(v, dict):
      yield from _paths(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def fill_unique(shape_tree, dtype=np.float32):
  """Every leaf = arange(size).reshape(shape) + per-leaf offset; returns (tree, offsets)."""
  out, offsets = {}, {}
  for n, (path, shape) in enumerate(_paths(shape_tree)):
    offset = (n + 1) * OFFSET_STEP
    offsets["/".join(path)] = offset
    leaf = (np.arange(int(np.prod(shape))).reshape(shape) + offset).astype(dtype)
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return out, offsets


def fill_random(shape_tree, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  out = {}
  for path, shape in _paths(shape_tree):
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = rng.normal(size=shape).astype(dtype) * 0.02
  return out


def get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


@pytest.fixture(scope="module")
def teacher():
  return fill_unique(make_tree(12, H=8, I=16))


# --------------------------------------------------------------------------- indices / maps


def test_evenly_spaced_indices():
  np.testing.assert_array_equal(evenly_spaced_indices(4, 2), [0, 2])  # paper: 1st and 3rd
  np.testing.assert_array_equal(evenly_spaced_indices(8, 4), [0, 2, 4, 6])
  np.testing.assert_array_equal(evenly_spaced_indices(5, 5), np.arange(5))
  np.testing.assert_array_equal(evenly_spaced_indices(10, 3), [0, 3, 6])
  np.testing.assert_array_equal(evenly_spaced_indices(768, 384), np.arange(0, 768, 2))
  with pytest.raises(ValueError):
    evenly_spaced_indices(2, 3)
  with pytest.raises(ValueError):
    evenly_spaced_indices(2, 0)


def test_uniform_layer_map():
  assert uniform_layer_map(12, 6) == (2, 4, 6, 8, 10, 12)  # eq. 5/6
  assert uniform_layer_map(12, 4) == (3, 6, 9, 12)
  assert uniform_layer_map(4, 4) == (1, 2, 3, 4)
  assert uniform_layer_map(12, 1) == (12,)
  with pytest.raises(ValueError, match=r"12.*5|5.*12") as e:
    uniform_layer_map(12, 5)
  assert "layer_map" in str(e.value)
  with pytest.raises(ValueError):
    uniform_layer_map(4, 6)


def test_resolve_layer_map():
  assert resolve_layer_map(12, 6) == (2, 4, 6, 8, 10, 12)
  assert resolve_layer_map(12, 5, [1, 3, 6, 9, 12]) == (1, 3, 6, 9, 12)
  with pytest.raises(ValueError, match="13"):
    resolve_layer_map(12, 2, [1, 13])
  with pytest.raises(ValueError, match="0"):
    resolve_layer_map(12, 2, [0, 12])
  with pytest.raises(ValueError, match="length 3"):
    resolve_layer_map(12, 2, [1, 2, 3])
  with pytest.raises(ValueError, match="divisible"):
    resolve_layer_map(12, 5)


# --------------------------------------------------------------------------- copy_from


def _check_copy(student, prov, teacher_tree, offsets, layer_map):
  """Leaf-by-leaf: which teacher leaf (via offset) and which indices each weight came from."""
  n_checked = 0
  for path, s_leaf in _paths(student):
    tname = "/".join(path)
    s_leaf = np.asarray(s_leaf)
    if path[0].startswith("layer_"):
      i = int(path[0].split("_")[1])
      src_name = "/".join((f"layer_{layer_map[i] - 1}",) + path[1:])
    else:
      src_name = tname
    t_leaf = get(teacher_tree, src_name)
    spath, idx = prov[tname]
    assert spath == src_name
    # the offset identifies the teacher leaf (and so the teacher layer)
    flat_min = int(s_leaf.min())
    assert offsets[src_name] <= flat_min < offsets[src_name] + OFFSET_STEP, tname
    expected_ix = [
        evenly_spaced_indices(t, s) if t != s else None
        for t, s in zip(t_leaf.shape, s_leaf.shape)
    ]
    assert len(idx) == t_leaf.ndim
    for got, exp in zip(idx, expected_ix):
      if exp is None:
        assert got is None
      else:
        np.testing.assert_array_equal(got, exp)
    full = [e if e is not None else np.arange(d) for e, d in zip(expected_ix, t_leaf.shape)]
    np.testing.assert_array_equal(s_leaf, t_leaf[np.ix_(*full)], err_msg=tname)
    n_checked += 1
  return n_checked


def test_copy_same_width_12_to_6(teacher):
  t_tree, offsets = teacher
  s_rand = fill_random(make_tree(6, H=8, I=16))
  lm = uniform_layer_map(12, 6)
  student, prov = copy_from(t_tree, s_rand, lm)
  assert _check_copy(student, prov, t_tree, offsets, lm) == len(list(_paths(s_rand)))
  # same width: everything copied whole, no slicing
  assert all(all(ix is None for ix in p[1]) for p in prov.values())
  # student layer_0 <- teacher layer_1 (1-based 2); student layer_5 <- teacher layer_11
  np.testing.assert_array_equal(
      student["layer_0"]["attention"]["query"]["kernel"],
      t_tree["layer_1"]["attention"]["query"]["kernel"],
  )
  np.testing.assert_array_equal(
      student["layer_5"]["output"]["kernel"], t_tree["layer_11"]["output"]["kernel"]
  )
  assert prov["layer_2/intermediate/bias"][0] == "layer_5/intermediate/bias"
  assert set(student) == set(s_rand)  # no extra teacher layers


def test_copy_half_width_12_to_6(teacher):
  t_tree, offsets = teacher
  s_rand = fill_random(make_tree(6, H=4, I=8))
  lm = uniform_layer_map(12, 6)
  student, prov = copy_from(t_tree, s_rand, lm)
  _check_copy(student, prov, t_tree, offsets, lm)

  h_ix = np.array([0, 2, 4, 6])
  i_ix = np.arange(0, 16, 2)
  # explicit hand-written expectations for a few leaves
  q = np.asarray(student["layer_0"]["attention"]["query"]["kernel"])
  assert q.shape == (4, 4)
  np.testing.assert_array_equal(q, t_tree["layer_1"]["attention"]["query"]["kernel"][np.ix_(h_ix, h_ix)])
  inter = np.asarray(student["layer_3"]["intermediate"]["kernel"])
  np.testing.assert_array_equal(inter, t_tree["layer_7"]["intermediate"]["kernel"][np.ix_(h_ix, i_ix)])
  out_b = np.asarray(student["layer_3"]["output"]["bias"])
  np.testing.assert_array_equal(out_b, t_tree["layer_7"]["output"]["bias"][h_ix])
  ln = np.asarray(student["layer_4"]["output_LayerNorm"]["scale"])
  np.testing.assert_array_equal(ln, t_tree["layer_9"]["output_LayerNorm"]["scale"][h_ix])
  # embeddings: vocab / positions copied whole, hidden sliced
  we = np.asarray(student["embeddings"]["word_embeddings"]["embedding"])
  assert we.shape == (V, 4)
  np.testing.assert_array_equal(we, t_tree["embeddings"]["word_embeddings"]["embedding"][:, h_ix])
  src, idx = prov["embeddings/word_embeddings/embedding"]
  assert idx[0] is None
  np.testing.assert_array_equal(idx[1], h_ix)
  # classifier [H, C]: only the first dim shrinks
  ck = np.asarray(student["classifier"]["kernel"])
  assert ck.shape == (4, C)
  np.testing.assert_array_equal(ck, t_tree["classifier"]["kernel"][h_ix, :])
  assert prov["classifier/kernel"][1][1] is None
  np.testing.assert_array_equal(prov["classifier/kernel"][1][0], h_ix)
  np.testing.assert_array_equal(np.asarray(student["classifier"]["bias"]), t_tree["classifier"]["bias"])
  assert prov["classifier/bias"][1] == (None,)
  # same hidden indices in every layer (residual stream stays aligned)
  for i in range(6):
    np.testing.assert_array_equal(prov[f"layer_{i}/attention/output/kernel"][1][1], h_ix)


def test_copy_12_to_4(teacher):
  t_tree, offsets = teacher
  s_rand = fill_random(make_tree(4, H=4, I=8))
  lm = resolve_layer_map(12, 4)
  assert lm == (3, 6, 9, 12)
  student, prov = copy_from(t_tree, s_rand, lm)
  _check_copy(student, prov, t_tree, offsets, lm)
  assert [prov[f"layer_{i}/attention/key/bias"][0] for i in range(4)] == [
      f"layer_{k}/attention/key/bias" for k in (2, 5, 8, 11)
  ]


def test_copy_explicit_map(teacher):
  t_tree, offsets = teacher
  s_rand = fill_random(make_tree(5, H=8, I=16))
  with pytest.raises(ValueError, match="divisible"):
    init_student("from_teacher", s_rand, teacher_params=t_tree, layer_map=None)
  lm = (1, 3, 6, 9, 12)
  student, prov = init_student("from_teacher", s_rand, teacher_params=t_tree, layer_map=lm)
  _check_copy(student, prov, t_tree, offsets, lm)
  assert prov["layer_0/output/kernel"][0] == "layer_0/output/kernel"
  assert prov["layer_4/output/kernel"][0] == "layer_11/output/kernel"
  with pytest.raises(ValueError, match="13"):
    copy_from(t_tree, s_rand, (1, 3, 6, 9, 13))
  with pytest.raises(ValueError, match="length 4"):
    copy_from(t_tree, s_rand, (1, 3, 6, 9))


def test_dtype_follows_target(teacher):
  t_tree, _ = teacher
  import jax.numpy as jnp

  small = {}
  for path, leaf in _paths(t_tree):  # keep values inside float16 range
    small.setdefault(path[0], {})
    node = small
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf / 1e4
  s_rand = fill_random(make_tree(6, H=4, I=8), dtype=np.float16)
  student, _ = copy_from(small, s_rand, uniform_layer_map(12, 6))
  for _, leaf in _paths(student):
    assert isinstance(leaf, jnp.ndarray)
    assert leaf.dtype == np.float16
  np.testing.assert_allclose(
      np.asarray(student["pooler"]["bias"], np.float32), small["pooler"]["bias"][[0, 2, 4, 6]], rtol=1e-3
  )


def test_extra_top_level_entries_generic():
  t_tree, offsets = fill_unique(make_tree(4, H=8, I=16, extra_head=True))
  s_rand = fill_random(make_tree(2, H=4, I=8, extra_head=True))
  student, prov = copy_from(t_tree, s_rand, (2, 4))
  _check_copy(student, prov, t_tree, offsets, (2, 4))
  assert prov["mlm_head/dense/kernel"][0] == "mlm_head/dense/kernel"
  # source-only entries are ignored
  s_rand2 = fill_random(make_tree(2, H=4, I=8, extra_head=False))
  student2, _ = copy_from(t_tree, s_rand2, (2, 4))
  assert "mlm_head" not in student2


def test_incompatible_trees_single_error(teacher):
  t_tree, _ = teacher
  s_rand = fill_random(make_tree(6, H=16, I=16, extra_head=True))  # wider than teacher + extra head
  s_rand["layer_0"]["attention"]["query"]["kernel"] = np.zeros((8, 8, 1), np.float32)  # rank differs
  with pytest.raises(ValueError) as e:
    copy_from(t_tree, s_rand, uniform_layer_map(12, 6))
  msg = str(e.value)
  assert "missing source leaves" in msg and "incompatible shapes" in msg
  assert "mlm_head/dense/kernel" in msg and "mlm_head/LayerNorm/scale" in msg
  assert "embeddings/word_embeddings/embedding" in msg
  assert "layer_5/attention/key/kernel" in msg  # problem in the last layer also listed
  assert "classifier/kernel" in msg
  assert "rank differs" in msg
  assert "(16, 16)" in msg and "(8, 8)" in msg


def test_init_student_strategies(teacher):
  t_tree, offsets = teacher
  s_rand = fill_random(make_tree(6, H=4, I=8))
  params, prov = init_student("from_scratch", s_rand, layer_map=None)
  assert params is s_rand and prov is None

  base, base_offsets = fill_unique(make_tree(12, H=8, I=16))
  base = {k: v for k, v in base.items()}
  # make base distinguishable from teacher
  for path, leaf in _paths(base):
    get(base, "/".join(path[:-1]))[path[-1]] = -leaf
  p_base, prov_b = init_student("from_base", s_rand, base_params=base, teacher_params=t_tree, layer_map=None)
  p_teach, prov_t = init_student("from_teacher", s_rand, base_params=base, teacher_params=t_tree, layer_map=None)
  lm = (2, 4, 6, 8, 10, 12)
  _check_copy(p_teach, prov_t, t_tree, offsets, lm)
  np.testing.assert_array_equal(np.asarray(p_base["layer_0"]["output"]["bias"]),
                                -t_tree["layer_1"]["output"]["bias"][[0, 2, 4, 6]])

  with pytest.raises(ValueError, match="teacher_params"):
    init_student("from_teacher", s_rand, base_params=base, layer_map=None)
  with pytest.raises(ValueError, match="base_params"):
    init_student("from_base", s_rand, teacher_params=t_tree, layer_map=None)
  with pytest.raises(ValueError, match="from_scratch.*from_base.*from_teacher"):
    init_student("from_pretrained", s_rand, teacher_params=t_tree, layer_map=None)


def test_describe_provenance(teacher):
  t_tree, _ = teacher
  s_rand = fill_random(make_tree(6, H=4, I=8))
  _, prov = copy_from(t_tree, s_rand, uniform_layer_map(12, 6))
  assert isinstance(prov["pooler/kernel"], LeafProvenance)
  assert prov["pooler/kernel"].source_shape == (8, 8)
  text = describe_provenance(prov)
  assert "student layer 1 <- teacher layer 2" in text
  assert "student layer 6 <- teacher layer 12" in text
  assert "8->4 (every 2nd)" in text
  assert "16->8 (every 2nd)" in text
  assert describe_provenance(None).startswith("no weights copied")
  same = copy_from(t_tree, fill_random(make_tree(6, H=8, I=16)), uniform_layer_map(12, 6))[1]
  assert "no width reduction" in describe_provenance(same, source_name="base")


def test_count_layers(teacher):
  assert count_layers(teacher[0]) == 12


# --------------------------------------------------------------------------- layer map strategies

from kd_jax import student_init  # noqa: E402


def _formula(strategy, n, m):
  """Survey eq. 5 mapping g(m), written out per student layer m = 1..M."""
  out = []
  for i in range(1, m + 1):
    if strategy == "uniform":
      out.append(i * n // m)
    elif strategy == "top":
      out.append(i + n - m)
    elif strategy == "bottom":
      out.append(i)
    elif strategy == "last":
      out.append(n if i == m else None)
  return tuple(out)


@pytest.mark.parametrize("strategy", ["uniform", "top", "bottom", "last"])
@pytest.mark.parametrize("n,m", [(12, 6), (12, 4), (12, 3), (24, 6)])
def test_layer_map_for_formulas(strategy, n, m):
  got = student_init.layer_map_for(strategy, n, m)
  assert got == _formula(strategy, n, m)
  assert len(got) == m
  assert all(k is None or 1 <= k <= n for k in got)
  pairs = student_init.layer_pairs(got)
  assert pairs == tuple((i, k) for i, k in enumerate(_formula(strategy, n, m), 1)
                        if k is not None)


def test_layer_map_for_examples():
  assert student_init.layer_map_for("uniform", 12, 6) == (2, 4, 6, 8, 10, 12)
  assert student_init.layer_map_for("top", 12, 4) == (9, 10, 11, 12)
  assert student_init.layer_map_for("bottom", 12, 3) == (1, 2, 3)
  assert student_init.layer_map_for("last", 24, 6) == (None,) * 5 + (24,)
  assert student_init.layer_pairs((None, None, 12)) == ((3, 12),)
  # uniform is the existing eq. 5 map
  assert student_init.layer_map_for("uniform", 24, 6) == uniform_layer_map(24, 6)


def test_layer_map_for_explicit_and_errors():
  assert student_init.layer_map_for("explicit", 12, 3, [1, 5, 12]) == (1, 5, 12)
  # the default strategy with an explicit map: the explicit map wins (config compat)
  assert student_init.layer_map_for("uniform", 12, 3, [1, 5, 12]) == (1, 5, 12)
  with pytest.raises(ValueError, match="valid values: uniform, top, bottom, last, explicit"):
    student_init.layer_map_for("skip", 12, 6)
  with pytest.raises(ValueError, match="needs an explicit"):
    student_init.layer_map_for("explicit", 12, 6)
  with pytest.raises(ValueError, match="'top'"):
    student_init.layer_map_for("top", 12, 3, [1, 2, 3])
  with pytest.raises(ValueError, match="13"):
    student_init.layer_map_for("explicit", 12, 2, [1, 13])
  with pytest.raises(ValueError, match="divisible"):
    student_init.layer_map_for("uniform", 12, 5)
  assert student_init.layer_map_for("top", 12, 5) == (8, 9, 10, 11, 12)  # no divisibility
  for strategy in ("top", "bottom", "last"):
    with pytest.raises(ValueError, match="more layers"):
      student_init.layer_map_for(strategy, 4, 6)


def test_resolve_layer_maps():
  # default: the loss map is the init map
  assert student_init.resolve_layer_maps(12, 6) == ((2, 4, 6, 8, 10, 12),) * 2
  init, loss = student_init.resolve_layer_maps(12, 4, student_strategy="top",
                                               distill_strategy="last")
  assert init == (9, 10, 11, 12) and loss == (None, None, None, 12)
  init, loss = student_init.resolve_layer_maps(12, 3, student_layer_map=[2, 7, 12],
                                               distill_strategy="bottom")
  assert init == (2, 7, 12) and loss == (1, 2, 3)
  init, loss = student_init.resolve_layer_maps(12, 3, student_layer_map=[2, 7, 12])
  assert loss == init == (2, 7, 12)
  init, loss = student_init.resolve_layer_maps(12, 3, distill_layer_map=[3, 3, 12])
  assert init == (4, 8, 12) and loss == (3, 3, 12)
  with pytest.raises(ValueError, match="cannot initialise"):
    student_init.resolve_layer_maps(12, 6, student_strategy="last")


def test_init_with_top_map(teacher):
  tree, offsets = teacher
  student = fill_random(make_tree(4, H=8, I=16))
  lm = student_init.layer_map_for("top", 12, 4)
  params, prov = init_student("from_teacher", student, teacher_params=tree, layer_map=lm)
  _check_copy(params, prov, tree, offsets, lm)
  assert prov["layer_0/attention/query/kernel"][0] == "layer_8/attention/query/kernel"
  assert prov["layer_3/attention/query/kernel"][0] == "layer_11/attention/query/kernel"
  # a "last" map leaves layers unmapped: it cannot initialise a student
  with pytest.raises(ValueError, match="not an integer"):
    init_student("from_teacher", student, teacher_params=tree,
                 layer_map=student_init.layer_map_for("last", 12, 4))
