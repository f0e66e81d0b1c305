"""Builds the app for ``uvicorn --factory`` (one Gateway per worker process)."""

from __future__ import annotations

import logging

from loadbear.api.app import create_app
from loadbear.config.settings import Settings
from loadbear.gateway.core import Gateway


def build_app():
    settings = Settings.load()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    gateway = Gateway.from_settings(settings)
    gateway.migrate()
    # Load the tokenizer now (1-3 s) rather than on the first request that needs an estimate.
    from loadbear.providers.tokens import warm_up

    warm_up()
    return create_app(gateway, own_gateway=True)
