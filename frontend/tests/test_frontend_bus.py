"""The bus page reads the broker itself (a real one here): topics, partitions, offsets, consumer groups, lag."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from flask import Flask

from conftest import Browser
from frontend.busview import BusInspector, GroupPartition
from miaas.bus import DEPLOYMENT_EVENTS, MODEL_EVENTS, SYSTEM_METRICS


def browse(app: Flask, password: str) -> Browser:
    b = Browser(app.test_client(), password)
    assert b.login().status_code == 303
    return b


def committed_group(bootstrap: str, topic: str, messages: int) -> str:
    """Given: `messages` produced to partition 0 of `topic` and all of them committed by a new group."""
    producer = Producer({"bootstrap.servers": bootstrap})
    for _ in range(messages):
        producer.produce(topic, key=b"k", value=b"{}", partition=0)
    producer.flush(10)
    group = f"bus-page-{uuid.uuid4().hex[:8]}"
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, 0)])
    seen = 0
    for _ in range(50):
        seen += len(consumer.consume(100, timeout=0.2))
        if seen >= messages:
            break
    consumer.commit(asynchronous=False)
    consumer.close()
    return group


def test_the_bus_page_lists_topics_partitions_and_groups(make_portal: Callable[..., Flask], broker: str,
                                                         settings: Any) -> None:
    group = committed_group(broker, MODEL_EVENTS, 5)
    app = make_portal(None, kafka_bootstrap=broker, kafka_ui_url="http://kafka-ui.example:8090")
    page = browse(app, settings.admin_password.get_secret_value()).get("/bus")
    assert page.status_code == 200
    html = page.text
    for topic, partitions in ((DEPLOYMENT_EVENTS, 3), (SYSTEM_METRICS, 3), (MODEL_EVENTS, 1)):
        assert f"<td><code>{topic}</code></td>\n        <td>{partitions}</td>" in html
    assert f"<td><code>{group}</code></td>" in html
    assert f"<code>{MODEL_EVENTS}</code>[0] at " in html
    assert '<a class="button button-quiet" href="http://kafka-ui.example:8090" rel="noopener noreferrer">' in html
    assert f"Read from the broker at <code>{broker}</code>" in html


def test_without_kafka_ui_there_is_no_link(make_portal: Callable[..., Flask], broker: str, settings: Any) -> None:
    app = make_portal(None, kafka_bootstrap=broker)
    assert "Open Kafka-UI" not in browse(app, settings.admin_password.get_secret_value()).get("/bus").text


def test_a_broker_that_cannot_be_reached_gives_a_friendly_page(make_portal: Callable[..., Flask], dead_url: str,
                                                               settings: Any) -> None:
    app = make_portal(None, kafka_bootstrap=dead_url.removeprefix("http://"))
    app.extensions["frontend.bus"].timeout_s = 1.0
    page = browse(app, settings.admin_password.get_secret_value()).get("/bus")
    assert page.status_code == 502
    assert "The Kafka broker cannot be reached right now." in page.text


def test_rates_come_from_the_growth_of_the_high_watermarks(broker: str) -> None:
    clock = iter([100.0, 110.0]).__next__
    inspector = BusInspector(broker, clock)
    first = inspector.inspect()
    assert all(t.rate is None for t in first.topics)
    producer = Producer({"bootstrap.servers": broker})
    for _ in range(20):
        producer.produce(MODEL_EVENTS, value=b"{}", partition=0)
    producer.flush(10)
    second = inspector.inspect()
    [topic] = [t for t in second.topics if t.name == MODEL_EVENTS]
    grown = topic.partitions[0].high - [t for t in first.topics if t.name == MODEL_EVENTS][0].partitions[0].high
    assert topic.rate == grown / 10.0
    assert topic.rate is not None and topic.rate >= 0


def test_lag_never_goes_negative_when_watermarks_run_behind() -> None:
    assert GroupPartition("t", 0, committed=30, high=1).lag == 0
    assert GroupPartition("t", 0, committed=30, high=1).ahead
    assert GroupPartition("t", 0, committed=3, high=10).lag == 7
    assert GroupPartition("t", 0, committed=3, high=None).lag is None
