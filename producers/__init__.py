"""The agent SDK: publishing to any catalog stream and the typed records, a non-blocking
logging handler, and a fleet simulator.

``producers`` imports ``pipeline`` (records, errors), never the reverse.
"""

from producers.log_handler import KafkaLogHandler
from producers.publisher import AgentPublisher, PublishError, PublishTimeoutError, RecordRefused
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
    "RecordRefused",
    "SentRecord",
    "SimulationResult",
    "simulate",
]
