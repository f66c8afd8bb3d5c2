"""The local stack's Kafka users, by role; :mod:`pipeline.devstack.kafka_auth` gives them
their passwords and ACLs. Apart so that `pipeline dev --help` can name them without loading
aiokafka."""

AGENT_USER = "pipeline-agent"
PRODUCER_USER = "pipeline-producer"
ORCHESTRATOR_USER = "antigravity"
USERS = (AGENT_USER, PRODUCER_USER, ORCHESTRATOR_USER)
