"""Provider interface, the wire providers, offline token counting and the registry."""

from __future__ import annotations

from .anthropic import AnthropicProvider
from .base import (
    CLIENT_FAULT,
    RETRYABLE,
    ChatRequest,
    Completion,
    ErrorKind,
    ModelConfig,
    Provider,
    ProviderError,
    StreamDelta,
    Timeouts,
    Usage,
)
from .local import LocalProvider
from .openai import OpenAIProvider
from .registry import PROVIDER_KINDS, ProviderRegistry, build_provider
from .scripted import Call, ScriptedProvider, Step
from .tokens import count_messages, count_text

__all__ = [
    "AnthropicProvider",
    "CLIENT_FAULT",
    "Call",
    "ChatRequest",
    "Completion",
    "ErrorKind",
    "LocalProvider",
    "ModelConfig",
    "OpenAIProvider",
    "PROVIDER_KINDS",
    "Provider",
    "ProviderError",
    "ProviderRegistry",
    "RETRYABLE",
    "ScriptedProvider",
    "Step",
    "StreamDelta",
    "Timeouts",
    "Usage",
    "build_provider",
    "count_messages",
    "count_text",
]
