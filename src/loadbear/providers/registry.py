"""Provider construction and the per-process registry (one instance per kind).

One instance per kind means one connection pool per wire API, shared by every model that
speaks it. Aliases for OpenAI-compatible hosts ("azure", "ollama", "vllm", "llamacpp",
"openai-compatible") resolve to the same ``openai`` instance.
"""

from __future__ import annotations

from typing import Callable

from .base import ModelConfig, Provider

__all__ = ["PROVIDER_KINDS", "build_provider", "ProviderRegistry"]

PROVIDER_KINDS = ("openai", "anthropic", "local", "scripted")

_ALIASES = {
    "openai": "openai",
    "openai-compatible": "openai",
    "openai_compatible": "openai",
    "azure": "openai",
    "azure-openai": "openai",
    "ollama": "openai",
    "vllm": "openai",
    "llamacpp": "openai",
    "llama.cpp": "openai",
    "anthropic": "anthropic",
    "local": "local",
    "scripted": "scripted",
}


def canonical_kind(kind: str) -> str:
    """The canonical provider kind for ``kind`` (aliases resolved); ValueError if unknown."""
    try:
        return _ALIASES[kind.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown provider kind {kind!r}; expected one of {', '.join(PROVIDER_KINDS)}"
        ) from None


def build_provider(kind: str) -> Provider:
    """A new provider instance for ``kind`` ("openai", "anthropic", "local", "scripted")."""
    kind = canonical_kind(kind)
    if kind == "openai":
        from .openai import OpenAIProvider

        return OpenAIProvider()
    if kind == "anthropic":
        from .anthropic import AnthropicProvider

        return AnthropicProvider()
    if kind == "local":
        from .local import LocalProvider

        return LocalProvider()
    from .scripted import ScriptedProvider

    return ScriptedProvider()


class ProviderRegistry:
    """Lazily builds and keeps one provider per kind.

    ``providers`` pre-registers instances (e.g. a :class:`ScriptedProvider` a test scripts);
    ``factory`` replaces :func:`build_provider`.
    """

    def __init__(
        self,
        providers: dict[str, Provider] | None = None,
        *,
        factory: Callable[[str], Provider] = build_provider,
    ) -> None:
        self._factory = factory
        self._providers: dict[str, Provider] = {}
        for kind, provider in (providers or {}).items():
            self.register(kind, provider)

    def register(self, kind: str, provider: Provider) -> None:
        self._providers[canonical_kind(kind)] = provider

    def get(self, model: ModelConfig) -> Provider:
        provider = self._providers.get(model.provider)
        if provider is None:
            provider = self.get_kind(model.provider)
        return provider

    def get_kind(self, kind: str) -> Provider:
        provider = self._providers.get(kind)
        if provider is not None:
            return provider
        canonical = canonical_kind(kind)
        provider = self._providers.get(canonical)
        if provider is None:
            provider = self._providers[canonical] = self._factory(canonical)
        return provider

    def __contains__(self, kind: str) -> bool:
        try:
            return canonical_kind(kind) in self._providers
        except ValueError:
            return False

    async def aclose(self) -> None:
        providers, self._providers = list(self._providers.values()), {}
        seen: set[int] = set()
        for provider in providers:
            if id(provider) in seen:
                continue
            seen.add(id(provider))
            await provider.aclose()
