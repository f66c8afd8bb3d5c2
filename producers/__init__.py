"""The agent SDK: typed publishing, a non-blocking logging handler, and a fleet simulator.

``producers`` imports ``pipeline`` (records, errors), never the reverse.
"""

from producers.log_handler import KafkaLogHandler
from producers.publisher import AgentPublisher, PublishError, PublishTimeoutError
from producers.simulator import (
    MIXES,
    FleetSimulator,
    Mix,
    SentRecord,
    SimulationResult,
    simulate,
)

__all__ = [
    "MIXES",
    "AgentPublisher",
    "FleetSimulator",
    "KafkaLogHandler",
    "Mix",
    "PublishError",
    "PublishTimeoutError",
    "SentRecord",
    "SimulationResult",
    "simulate",
]
