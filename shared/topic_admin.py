"""Creating the topics: what `alliance topics create` (the production topics job) and the
local stack run.

Every topic gets the configured partitions, replication factor and retention; the logs that
reporting replays to rebuild its read models are kept forever. Creating is idempotent (only
missing topics are created), so the job can run on every deploy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from shared.kafka import admin_security_kwargs
from shared.settings import KafkaSettings

log = logging.getLogger("alliance.topics")


def retention_ms(kafka: KafkaSettings, topic: str) -> int:
    """Retention of a topic: reporting rebuilds its read models by replaying the scored,
    deterioration and alert-status logs from the beginning, so those are kept forever (-1)."""
    t = kafka.topics()
    return -1 if topic in (t.scored, t.deterioration, t.alert_status, t.ors_scored, t.outcome_alert,
                           t.outcome_alert_status) else kafka.retention_ms


async def ensure_topics(kafka: KafkaSettings, topics: tuple[str, ...] | None = None,
                        timeout: float = 30.0) -> list[str]:
    """Create missing topics with the configured partitions, replication and retention.

    Retries until the broker answers or `timeout` passes. Returns the names it created.
    """
    names = topics or kafka.topics().all()
    deadline = time.monotonic() + timeout
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap, request_timeout_ms=5000,
                                    **admin_security_kwargs(kafka))
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [t for t in names if t not in existing]
            if missing:
                await admin.create_topics([
                    NewTopic(t, kafka.partitions, kafka.replication_factor,
                             topic_configs={"retention.ms": str(retention_ms(kafka, t))})
                    for t in missing
                ])
            return missing
        except Exception as exc:
            if time.monotonic() > deadline:
                raise
            log.debug("topic creation not possible yet: %r", exc)
            await asyncio.sleep(0.5)
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
