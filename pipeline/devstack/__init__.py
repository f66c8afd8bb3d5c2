"""The local development stack: real Kafka and PostgreSQL on 127.0.0.1, no Docker needed."""

from pipeline.devstack.stack import Endpoints, Stack, endpoints_from_env

__all__ = ["Endpoints", "Stack", "endpoints_from_env"]
