"""`MIAAS_KAFKA_CONFIG`: broker settings (SASL/SCRAM, TLS) reach every Kafka client, and bad ones are refused."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaException

from miaas.bus import KafkaBus, client_config, kafka_config


def test_settings_are_parsed_and_the_platforms_own_keys_refused() -> None:
    assert kafka_config("") == {}
    assert kafka_config('{"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512"}') == {
        "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512"}
    with pytest.raises(ValueError, match="not JSON"):
        kafka_config("security.protocol=SASL")
    with pytest.raises(ValueError, match="JSON object"):
        kafka_config('["a"]')
    with pytest.raises(ValueError, match="bootstrap.servers"):
        kafka_config('{"bootstrap.servers": "evil:9092"}')


def test_every_client_gets_them(monkeypatch: pytest.MonkeyPatch, broker: str) -> None:
    monkeypatch.setenv("MIAAS_KAFKA_CONFIG", '{"socket.timeout.ms": 12345}')
    assert client_config(broker)["socket.timeout.ms"] == 12345
    # librdkafka itself reads them: a setting it does not know is refused when the producer is made
    monkeypatch.setenv("MIAAS_KAFKA_CONFIG", '{"no.such.setting": "1"}')
    with pytest.raises(KafkaException, match="no.such.setting"):
        KafkaBus(broker)
