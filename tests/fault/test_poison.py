"""Poison messages written straight to every input topic are dead-lettered with a reason, and
consumption goes on: a valid submission sent after them still reaches its trajectory."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from shared.events import DeadLetter
from shared.topic_admin import ensure_topics
from tests.fault.helpers import make_tenant, post_batch, submission, trajectory_sessions
from tests.support.reporting import assert_counters_agree
from tests.support.services import Namespace, running
from tests.support.stack import StackUnderTest
from tests.support.wait import eventually

POISON: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = [
    (b"acme:x", b"not json at all", []),
    (b"acme:x", b"\xff\xfe\x00binary", [("correlation_id", b"\xff\xfe")]),
    (b"acme:x", b'{"schema_version": 1, "tenant_id": "acme"}', []),
    (None, b"[1, 2, 3]", []),
    (b"acme:x", b"", []),
]


async def test_poison_on_every_input_topic_is_deadlettered_and_consumption_continues(
        fault_stack: StackUnderTest, log_dir: Path) -> None:
    ns = Namespace.fresh(fault_stack)
    await ensure_topics(ns.kafka())
    topics = ns.kafka().topics()
    inputs = [topics.submitted, topics.scored, topics.deterioration, topics.alert_status]
    keys = await make_tenant(ns, "acme")
    with running(["intake", "scoring", "alerts", "reporting"], ns, log_dir) as procs:
        producer = AIOKafkaProducer(bootstrap_servers=ns.stack.bootstrap, acks="all")
        await producer.start()
        try:
            for topic in inputs:
                for key, value, headers in POISON:
                    await producer.send_and_wait(topic, value, key=key, headers=headers)
        finally:
            await producer.stop()

        async with httpx.AsyncClient(timeout=30) as http:
            await post_batch(http, procs["intake"].url, keys.submit, [submission(1, 1)])

            async def visible() -> bool:
                return await trajectory_sessions(http, procs["reporting"].url, keys.read, "client-1") == [1]

            await eventually(visible, timeout=120)
            await assert_counters_agree(ns.mongo())

        consumer = AIOKafkaConsumer(topics.deadletter, bootstrap_servers=ns.stack.bootstrap,
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        letters: list[DeadLetter] = []
        try:
            async def all_deadlettered() -> bool:
                batch = await consumer.getmany(timeout_ms=1000)
                letters.extend(DeadLetter.model_validate_json(r.value) for rs in batch.values() for r in rs)
                per_topic: dict[str, int] = {}
                for dl in letters:
                    per_topic[dl.source_topic] = per_topic.get(dl.source_topic, 0) + 1
                # the alert status topic is consumed by reporting only; the others by one or two services
                return all(per_topic.get(t, 0) >= len(POISON) for t in inputs)

            try:
                await eventually(all_deadlettered, timeout=90)
            except AssertionError:
                seen = sorted((d.source_topic, d.service, d.reason, d.source_offset) for d in letters)
                raise AssertionError(f"not every poison record was dead-lettered; got {seen}") from None
        finally:
            await consumer.stop()
    for dl in letters:
        assert dl.reason and dl.source_offset is not None and dl.source_partition is not None
    print("\ndead letters by (topic, service, reason):",
          json.dumps(sorted({(d.source_topic, d.service, d.reason) for d in letters}), indent=1))
