"""Settings and the model catalog."""

from __future__ import annotations

import pytest

from loadbear.config.catalog import Catalog, CatalogError
from loadbear.config.settings import Settings
from loadbear.providers.base import ModelConfig, Usage


def test_catalog_without_keys_is_local_only():
    cat = Catalog.from_settings({}, env={})
    assert cat.names() == ["local"] and cat.default_model == "local"


def test_provider_keys_and_base_urls_from_env():
    cat = Catalog.from_settings({}, env={"OPENAI_API_KEY": "sk-1", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
                                         "ANTHROPIC_API_KEY": "sk-ant", "ANTHROPIC_BASE_URL": "http://127.0.0.1:8"})
    assert {"gpt-4o-mini", "gpt-4o", "claude-3-5-haiku-latest", "local"} <= set(cat.names())
    mini = cat.get("gpt-4o-mini")
    assert mini.base_url == "http://127.0.0.1:9/v1" and mini.api_key == "sk-1" and mini.provider == "openai"
    assert cat.get("claude-3-5-haiku-latest").base_url == "http://127.0.0.1:8"
    assert cat.default_model == "gpt-4o-mini"
    # strong model → cheap same provider → other provider's cheap model → local
    assert [m.name for m in cat.chain("gpt-4o")] == ["gpt-4o", "gpt-4o-mini", "claude-3-5-haiku-latest", "local"]
    assert cat.get("gpt-4o").tier == "complex" and mini.tier == "simple"


def test_toml_entries_override_and_validate(tmp_path):
    cfg = tmp_path / "loadbear.toml"
    cfg.write_text(
        'port = 9001\n[models.my-llama]\nprovider = "ollama"\nupstream_model = "llama3.1"\n'
        'base_url = "http://127.0.0.1:11434/v1"\ninput_price = 0.0\nfallbacks = ["local"]\n'
        '[models.my-llama.timeouts]\nfirst_token = 2.5\n'
    )
    s = Settings.load(env={"LOADBEAR_PORT": "9002"}, config_path=cfg)
    assert s.port == 9002, "environment wins over the file"
    cat = Catalog.from_settings(s.models, env={})
    llama = cat.get("my-llama")
    assert llama.upstream_model == "llama3.1" and llama.timeouts.first_token == 2.5
    assert [m.name for m in cat.chain("my-llama")] == ["my-llama", "local"]
    with pytest.raises(CatalogError, match="unknown model"):
        Catalog.from_settings({"x": {"provider": "openai", "fallbacks": ["ghost"]}}, env={})
    with pytest.raises(CatalogError, match="unknown fields"):
        Catalog.from_settings({"x": {"provider": "openai", "colour": "red"}}, env={})
    with pytest.raises(CatalogError, match="provider"):
        Catalog.from_settings({"x": {"upstream_model": "y"}}, env={})


def test_settings_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 'red'\n")
    with pytest.raises(ValueError, match="colour"):
        Settings.load(env={}, config_path=bad)
    with pytest.raises(ValueError, match="LOADBEAR_PORT"):
        Settings.load(env={"LOADBEAR_PORT": "eighty"})


def test_cost_is_integer_micro_usd_with_cached_price():
    m = ModelConfig(name="m", provider="openai", upstream_model="m", input_price=2.5, cached_input_price=1.25,
                    output_price=10.0)
    # 1000 prompt tokens of which 400 cached, 200 completion tokens
    cost = m.cost_micro_usd(Usage(prompt_tokens=1000, completion_tokens=200, cached_tokens=400))
    assert cost == 600 * 2.5 + 400 * 1.25 + 200 * 10 == 4000
    assert isinstance(cost, int)
