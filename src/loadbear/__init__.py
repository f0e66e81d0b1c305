"""loadbear: the load-bearing AI layer between a multi-tenant SaaS app and the LLM providers."""

from loadbear.config.catalog import Catalog
from loadbear.config.settings import Settings
from loadbear.gateway.core import Gateway
from loadbear.gateway.errors import ApiError
from loadbear.gateway.validation import ChatBody, parse_chat_body

__all__ = ["ApiError", "Catalog", "ChatBody", "Gateway", "Settings", "parse_chat_body"]
__version__ = "0.1.0"
