"""The local development stack: real Kafka and PostgreSQL on 127.0.0.1, no Docker needed.

:class:`Stack`, :class:`Endpoints` and :func:`endpoints_from_env` load on first use: the
stack needs the drivers, and `pipeline --help` reads the driver-free modules of this package
(kafka_versions, kafka_users) without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.devstack.stack import Endpoints, Stack, endpoints_from_env

__all__ = ["Endpoints", "Stack", "endpoints_from_env"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("pipeline.devstack.stack"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
