"""Builds the app for ``uvicorn --factory`` (one Gateway per worker process)."""

from __future__ import annotations

from loadbear.api.app import create_app
from loadbear.config.settings import Settings
from loadbear.gateway.core import Gateway
from loadbear.observability import configure_logging


def build_app():
    settings = Settings.load()
    # JSON lines by default (LOADBEAR_LOG_FORMAT); reuses the handler `loadbear serve` set up.
    configure_logging(settings.log_level, settings.log_format)
    gateway = Gateway.from_settings(settings)
    gateway.migrate()
    # Load the tokenizer now (1-3 s) rather than on the first request that needs an estimate.
    from loadbear.providers.tokens import warm_up

    warm_up()
    return create_app(gateway, own_gateway=True)
