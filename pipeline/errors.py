"""The pipeline's error tree: one root, shallow, behaviour on the class."""

from __future__ import annotations


class PipelineError(Exception):
    """Root of every error this project raises on purpose."""

    retriable: bool = False


class ConfigError(PipelineError):
    """Bad configuration, detected at start-up; the message names the field."""


class DevStackError(PipelineError):
    """The local Kafka/PostgreSQL stack cannot be set up; the message says what to do."""
