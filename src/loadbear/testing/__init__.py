"""Test doubles for loadbear: an upstream simulator that speaks the OpenAI and Anthropic wire
formats and injects faults (see :mod:`loadbear.testing.simulator`).

The names are resolved lazily so ``python -m loadbear.testing.simulator`` does not import
the module twice (runpy warns when a package pre-imports the module it is asked to run).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .simulator import RequestRecord, SimulatorConfig, UpstreamSimulator
    from .simulator_faults import DEFAULT_RATE_FAULTS, FAULT_KINDS, Fault

__all__ = [
    "DEFAULT_RATE_FAULTS",
    "FAULT_KINDS",
    "Fault",
    "RequestRecord",
    "SimulatorConfig",
    "UpstreamSimulator",
]

_EXPORTS = {
    "UpstreamSimulator": ".simulator",
    "SimulatorConfig": ".simulator",
    "RequestRecord": ".simulator",
    "Fault": ".simulator_faults",
    "FAULT_KINDS": ".simulator_faults",
    "DEFAULT_RATE_FAULTS": ".simulator_faults",
}


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module_name, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
