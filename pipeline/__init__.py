"""Exactly-once ingestion of an agent fleet's data from Kafka into PostgreSQL."""
