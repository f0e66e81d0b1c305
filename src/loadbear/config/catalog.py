"""The model catalog: which models exist, who serves them, what they cost, what to try next.

Built from three sources, later ones winning: the always-present ``local`` model, the default
models of every provider whose key is in the environment (``OPENAI_API_KEY``,
``ANTHROPIC_API_KEY``; ``OPENAI_BASE_URL`` / ``ANTHROPIC_BASE_URL`` redirect them as the official
SDKs do), and ``[models.NAME]`` tables in ``loadbear.toml``.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any, Iterable, Mapping

from loadbear.providers.base import ModelConfig, Timeouts
from loadbear.providers.registry import canonical_kind

# USD per 1M tokens: (input, cached input, output). Edit through [models.NAME] in loadbear.toml.
OPENAI_DEFAULTS: dict[str, tuple[float, float, float, str]] = {
    "gpt-4o-mini": (0.15, 0.075, 0.60, "simple"),
    "gpt-4o": (2.50, 1.25, 10.00, "complex"),
    "gpt-4.1-mini": (0.40, 0.10, 1.60, "simple"),
}
ANTHROPIC_DEFAULTS: dict[str, tuple[float, float, float, str]] = {
    "claude-3-5-haiku-latest": (0.80, 0.08, 4.00, "simple"),
    "claude-sonnet-4-0": (3.00, 0.30, 15.00, "complex"),
}
LOCAL_MODEL = "local"


class CatalogError(ValueError):
    pass


class Catalog:
    def __init__(self, models: Iterable[ModelConfig], default_model: str | None = None) -> None:
        self._models: dict[str, ModelConfig] = {}
        for m in models:
            self._models[m.name] = m
        for m in self._models.values():
            for fb in m.fallbacks:
                if fb not in self._models:
                    raise CatalogError(f"model {m.name!r} falls back to unknown model {fb!r}")
        if default_model is not None and default_model not in self._models:
            raise CatalogError(f"default model {default_model!r} is not in the catalog")
        self.default_model = default_model or _pick_default(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def __iter__(self):
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def get(self, name: str) -> ModelConfig | None:
        return self._models.get(name)

    def names(self) -> list[str]:
        return list(self._models)

    def chain(self, name: str, override: Mapping[str, list[str]] | None = None) -> list[ModelConfig]:
        """The model and the models to try after it, in order, each at most once."""
        seen: list[str] = []
        order = [name]
        while order:
            current = order.pop(0)
            if current in seen or current not in self._models:
                continue
            seen.append(current)
            nexts = (override or {}).get(current)
            if nexts is None:
                nexts = self._models[current].fallbacks
            order.extend(nexts)
        return [self._models[n] for n in seen]

    @classmethod
    def from_settings(
        cls,
        entries: Mapping[str, Mapping[str, Any]] | None = None,
        env: Mapping[str, str] | None = None,
        default_model: str | None = None,
    ) -> "Catalog":
        env = os.environ if env is None else env
        models: dict[str, ModelConfig] = {LOCAL_MODEL: local_model()}
        openai_key = env.get("OPENAI_API_KEY")
        anthropic_key = env.get("ANTHROPIC_API_KEY")
        if openai_key:
            base = env.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
            for name, (inp, cached, out, tier) in OPENAI_DEFAULTS.items():
                models[name] = ModelConfig(
                    name=name, provider="openai", upstream_model=name, base_url=base,
                    api_key=openai_key, input_price=inp, cached_input_price=cached,
                    output_price=out, tier=tier,
                )
        if anthropic_key:
            base = env.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com"
            for name, (inp, cached, out, tier) in ANTHROPIC_DEFAULTS.items():
                models[name] = ModelConfig(
                    name=name, provider="anthropic", upstream_model=name, base_url=base,
                    api_key=anthropic_key, input_price=inp, cached_input_price=cached,
                    output_price=out, tier=tier,
                )
        _default_fallbacks(models)
        for name, raw in (entries or {}).items():
            models[name] = model_from_mapping(name, raw, models.get(name))
        return cls(models.values(), default_model=default_model)


def local_model() -> ModelConfig:
    return ModelConfig(
        name=LOCAL_MODEL, provider="local", upstream_model="loadbear-local-extractive",
        tier="local", max_retries=0,
        timeouts=Timeouts(connect=None, first_token=10.0, idle=10.0, total=30.0),
    )


def _default_fallbacks(models: dict[str, ModelConfig]) -> None:
    """Strong → cheap in the same provider → the other provider's cheap model → local."""
    cheap_openai = "gpt-4o-mini" if "gpt-4o-mini" in models else None
    cheap_anthropic = "claude-3-5-haiku-latest" if "claude-3-5-haiku-latest" in models else None
    for m in models.values():
        if m.provider == LOCAL_MODEL:
            continue
        chain: list[str] = []
        own_cheap = cheap_openai if m.provider == "openai" else cheap_anthropic
        other_cheap = cheap_anthropic if m.provider == "openai" else cheap_openai
        for candidate in (own_cheap, other_cheap, LOCAL_MODEL):
            if candidate and candidate != m.name and candidate not in chain:
                chain.append(candidate)
        m.fallbacks = chain


_MODEL_FIELDS = {f.name for f in fields(ModelConfig)}


def model_from_mapping(name: str, raw: Mapping[str, Any], base: ModelConfig | None = None) -> ModelConfig:
    unknown = set(raw) - _MODEL_FIELDS
    if unknown:
        raise CatalogError(f"model {name!r}: unknown fields {', '.join(sorted(unknown))}")
    data: dict[str, Any] = {}
    if base is not None:
        data = {f: getattr(base, f) for f in _MODEL_FIELDS}
    data.update(raw)
    data["name"] = name
    if "provider" not in data:
        raise CatalogError(f"model {name!r}: 'provider' is required")
    # A typo here would otherwise start fine and fail every request to the model with a 500.
    try:
        canonical_kind(data["provider"])
    except ValueError as exc:
        raise CatalogError(f"model {name!r}: {exc}") from None
    data.setdefault("upstream_model", name)
    timeouts = data.get("timeouts")
    if isinstance(timeouts, Mapping):
        data["timeouts"] = _timeouts(name, timeouts)
    elif timeouts is None:
        data.pop("timeouts", None)
    elif not isinstance(timeouts, Timeouts):
        raise CatalogError(f"model {name!r}: 'timeouts' must be a table like {{first_token = 10, total = 60}}")
    retries = data.get("max_retries", 0)
    # A negative count would make the executor skip the model without a call or a ledger row.
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise CatalogError(f"model {name!r}: 'max_retries' must be an integer >= 0")
    fallbacks = data.get("fallbacks") or []
    # A bare string would be read as one-letter model names.
    if not isinstance(fallbacks, (list, tuple)) or not all(isinstance(f, str) and f for f in fallbacks):
        raise CatalogError(f"model {name!r}: 'fallbacks' must be a list of model names")
    data["fallbacks"] = list(fallbacks)
    return ModelConfig(**data)


_TIMEOUT_FIELDS = tuple(f.name for f in fields(Timeouts))


def _timeouts(name: str, raw: Mapping[str, Any]) -> Timeouts:
    unknown = set(raw) - set(_TIMEOUT_FIELDS)
    if unknown:
        raise CatalogError(f"model {name!r}: unknown timeouts {', '.join(sorted(unknown))} "
                           f"(known: {', '.join(_TIMEOUT_FIELDS)})")
    for key, value in raw.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise CatalogError(f"model {name!r}: timeouts.{key} must be a number of seconds > 0")
    return Timeouts(**raw)


def _pick_default(models: Mapping[str, ModelConfig]) -> str:
    for preferred in ("gpt-4o-mini", "claude-3-5-haiku-latest"):
        if preferred in models:
            return preferred
    return LOCAL_MODEL if LOCAL_MODEL in models else next(iter(models))
