"""The DatabaseAgent: Kafka consumer groups landing the agent data streams in PostgreSQL."""
